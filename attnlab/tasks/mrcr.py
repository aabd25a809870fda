"""Token-level multi-round coreference resolution (MRCR), after OpenAI's MRCR
(openai/mrcr on Hugging Face; Vodrahalli et al. 2024, "Michelangelo") — several identical
requests in one conversation, each with a different answer; the model is asked for the i-th.

Layout over V ids: 0 pad, 1 REQ, 2 RESP, 3 ASK, 4 ANS, then ``num_needles`` ordinal ids,
then ``num_topics`` topic ids, then response ids::

    (pad) [REQ t RESP r r r r] x n_turns   ASK ord(i) t* p.. ANS  p.. r r r r

``num_needles`` of the turns request topic t*, the rest request other topics. The answer is
the random prefix ``p..`` (``prefix_len`` ids, shown in the question) followed by the response
of the i-th t* request. Training uses teacher forcing on the answer; evaluation decodes the
answer greedily and scores it with ``mrcr_score`` — OpenAI's grader: 0 unless the output
starts with the prefix, else ``difflib.SequenceMatcher(None, output, answer).ratio()`` with
the prefix removed from both.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence

import numpy as np
import torch

from .base import Task, _positive, finish

PAD, REQ, RESP, ASK, ANS = 0, 1, 2, 3, 4
_N_SPECIAL = 5


def mrcr_score(output: Sequence[int], answer: Sequence[int], prefix: Sequence[int] = ()) -> float:
    """OpenAI MRCR's grade(): 0.0 unless ``output`` starts with ``prefix``; else the
    SequenceMatcher ratio of ``output`` and ``answer`` with ``prefix`` removed from each."""
    output, answer, prefix = list(output), list(answer), list(prefix)
    if output[: len(prefix)] != prefix:
        return 0.0
    if answer[: len(prefix)] == prefix:
        answer = answer[len(prefix) :]
    return float(difflib.SequenceMatcher(None, output[len(prefix) :], answer).ratio())


@dataclasses.dataclass
class MRCR(Task):
    """Ask for the i-th of ``num_needles`` identical requests; see the module docstring."""

    num_needles: int = 2
    num_topics: int = 8
    response_len: int = 4
    prefix_len: int = 0

    name = "mrcr"
    scoring = "ratio"

    def __post_init__(self) -> None:
        for name in ("num_needles", "num_topics", "response_len"):
            _positive(name, getattr(self, name))
        if self.prefix_len < 0:
            raise ValueError(f"prefix_len: expected >= 0, got {self.prefix_len}")
        if self.num_topics < 2:
            raise ValueError(f"num_topics: need >= 2 (the asked one and distractors), got {self.num_topics}")
        if self.n_turns < self.num_needles:
            raise ValueError(
                f"seq_len: {self.seq_len} fits {self.n_turns} turns of {self.response_len + 3} tokens "
                f"after the question, fewer than num_needles={self.num_needles}"
            )
        super().__post_init__()

    @property
    def question_len(self) -> int:
        return 4 + self.prefix_len

    @property
    def answer_len(self) -> int:
        return self.prefix_len + self.response_len

    @property
    def n_turns(self) -> int:
        return max(0, (self.seq_len - self.question_len - self.answer_len) // (self.response_len + 3))

    def answer_span(self) -> tuple[int, int]:
        """``[start, end)`` of the answer tokens in every sample (samples are left-padded)."""
        return self.seq_len - self.answer_len, self.seq_len

    def min_vocab(self) -> int:
        return _N_SPECIAL + self.num_needles + self.num_topics + 2

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        first_topic = _N_SPECIAL + self.num_needles
        first_resp = first_topic + self.num_topics
        topic = int(rng.integers(0, self.num_topics))
        others = np.delete(np.arange(self.num_topics), topic)
        turn_topics = others[rng.integers(0, len(others), size=self.n_turns)]
        needle_turns = np.sort(rng.choice(self.n_turns, size=self.num_needles, replace=False))
        turn_topics[needle_turns] = topic
        responses = rng.integers(first_resp, self.vocab_size, size=(self.n_turns, self.response_len))
        ask = int(rng.integers(0, self.num_needles))  # 0-based: the (ask+1)-th request of the topic
        prefix = rng.integers(first_resp, self.vocab_size, size=self.prefix_len)
        parts = [np.array([REQ, first_topic + t, RESP]) for t in turn_topics]
        turns = np.concatenate([np.concatenate([p, r]) for p, r in zip(parts, responses, strict=True)])
        question = np.concatenate([[ASK, _N_SPECIAL + ask, first_topic + topic], prefix, [ANS]])
        answer = np.concatenate([prefix, responses[needle_turns[ask]]])
        tokens = np.concatenate([turns, question, answer])
        n = tokens.shape[0]
        return finish(tokens, [(n - self.answer_len, n)], self.seq_len, pad=PAD)
