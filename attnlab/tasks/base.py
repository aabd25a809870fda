"""What every recall task shares: the sample format, the random streams, small helpers.

A task is a dataclass whose first two fields are ``seq_len`` and ``vocab_size``; its
``sample(rng)`` returns one ``(tokens, targets)`` pair, both int64 ``[seq_len]``:

- ``tokens[t]`` is what the model reads at position ``t``;
- ``targets[t]`` is the token it must predict there (the next token), or ``IGNORE`` (-100)
  where there is no loss.

So a task is scored by next-token prediction at its target positions only. Under teacher
forcing, "every target position predicted right" is the same event as "greedy decoding
reproduces the whole answer", which is what ``exact`` measures. Generators draw only from
the ``numpy.random.Generator`` passed in, so a task is deterministic by seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

IGNORE = -100  # targets value where there is no loss (torch.nn.functional.cross_entropy's ignore_index)
BYTE_VOCAB = 256  # byte-level tasks read raw UTF-8/ASCII bytes


@dataclasses.dataclass
class Task:
    """Base class: ``seq_len`` tokens per sample over a vocabulary of ``vocab_size`` ids."""

    seq_len: int
    vocab_size: int

    name: ClassVar[str] = "task"
    # "argmax": teacher-forced accuracy at target positions; "ratio": greedy-decode the answer
    # and score it with difflib.SequenceMatcher (MRCR).
    scoring: ClassVar[str] = "argmax"

    def __post_init__(self) -> None:
        _positive("seq_len", self.seq_len)
        _positive("vocab_size", self.vocab_size)
        if self.vocab_size < self.min_vocab():
            raise ValueError(
                f"vocab_size: {self.name} with these options needs a vocabulary of at least "
                f"{self.min_vocab()} tokens, got {self.vocab_size}"
            )

    def min_vocab(self) -> int:
        """Smallest vocabulary these options fit in."""
        return 1

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample: ``(tokens, targets)``, int64 ``[seq_len]`` each."""
        raise NotImplementedError

    def batch(self, rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` samples stacked: ``(tokens, targets)``, int64 ``[B, seq_len]``."""
        _positive("batch_size", batch_size)
        pairs = [self.sample(rng) for _ in range(batch_size)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])  # (B, T), (B, T)

    def eval_batch(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed evaluation set: ``n`` samples from a stream that training never draws from."""
        return self.batch(eval_rng(seed), n)

    def with_options(self, **changes: Any) -> Task:
        """A copy with some fields changed (validated again), e.g. ``task.with_options(seq_len=256)``."""
        return dataclasses.replace(self, **changes)

    def options(self) -> dict[str, Any]:
        """Every field, JSON-ready (for checkpoints and result files)."""
        return {"task": self.name, **dataclasses.asdict(self)}


# Salts keep the evaluation stream apart from the training streams of the same seed.
_EVAL_SALT = 0xE7A1
_TRAIN_SALT = 0x7A19


def eval_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), _EVAL_SALT])))


def train_rngs(seed: int, n: int) -> list[np.random.Generator]:
    """``n`` independent training streams for one seed."""
    children = np.random.SeedSequence([int(seed), _TRAIN_SALT]).spawn(n)
    return [np.random.Generator(np.random.PCG64(s)) for s in children]


def finish(tokens: Sequence[int] | np.ndarray, answer_spans: Sequence[tuple[int, int]], seq_len: int,
           pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``tokens`` to ``seq_len`` with ``pad`` and build next-token targets.

    ``answer_spans`` are ``[start, end)`` ranges of ``tokens`` (before padding) that the model
    must produce: for each answer token at position p, ``targets[p - 1] = tokens[p]``.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n_pad = seq_len - tokens.shape[0]
    if n_pad < 0:
        raise ValueError(f"seq_len: the sample needs {tokens.shape[0]} tokens, more than seq_len={seq_len}")
    out = np.full(seq_len, pad, dtype=np.int64)
    out[n_pad:] = tokens
    targets = np.full(seq_len, IGNORE, dtype=np.int64)
    for start, end in answer_spans:
        if not 1 <= start <= end <= tokens.shape[0]:
            raise ValueError(f"answer span [{start}, {end}) outside the {tokens.shape[0]} sample tokens")
        targets[n_pad + start - 1 : n_pad + end - 1] = out[n_pad + start : n_pad + end]
    return torch.from_numpy(out), torch.from_numpy(targets)


def _positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected a fraction in [0, 1], got {value!r}")
