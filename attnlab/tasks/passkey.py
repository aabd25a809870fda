"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", the prompt also used by
LongLoRA and YaRN), byte-level (vocabulary 256)::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.
    I will quiz you about the important information there. <noise ...> The pass key is 71432.
    Remember it. 71432 is the pass key. <noise ...> What is the pass key? The pass key is 71432

The passkey (``digits`` digits) sits at the sentence boundary nearest ``depth`` of the noise;
the loss covers the answer digits only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .base import BYTE_VOCAB, Task, _fraction, _positive, finish
from .needle import build_haystack_sample, random_number

INTRO = (
    b"There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    b"I will quiz you about the important information there. "
)
QUESTION = b"What is the pass key? The pass key is "


@dataclasses.dataclass
class Passkey(Task):
    """Find a ``digits``-digit pass key hidden at ``depth`` in noise; ``intro=False`` drops the
    instruction sentence (saves 151 bytes at short lengths)."""

    depth: float = 0.5
    digits: int = 5
    intro: bool = True

    name = "passkey"

    def __post_init__(self) -> None:
        _fraction("depth", self.depth)
        _positive("digits", self.digits)
        super().__post_init__()
        self.sample(np.random.default_rng(0))  # fail now if seq_len is too short

    def min_vocab(self) -> int:
        return BYTE_VOCAB

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        key = random_number(rng, self.digits)
        needle = b"The pass key is " + key + b". Remember it. " + key + b" is the pass key. "
        prefix = INTRO if self.intro else b""
        built = build_haystack_sample(rng, self.seq_len, "noise", "train", [needle], [self.depth], prefix,
                                      [(QUESTION, key)])
        return finish(np.frombuffer(built.text, dtype=np.uint8), built.answer_spans, self.seq_len)
