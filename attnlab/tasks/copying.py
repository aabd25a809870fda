"""Copying: read a random string, then repeat it (Jelassi et al. 2024, "Repeat After Me:
Transformers are Better than State Space Models at Copying").

Layout over V ids: 0 = pad, 1 = separator, string tokens from ``[2, V)``::

    (pad) s1 s2 ... sn  SEP  s1 s2 ... sn          n = (seq_len - 1) // 2 unless ``copy_len`` is set

The loss covers every copied token: the separator predicts s1, each copied token the next.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .base import Task, _positive, finish

PAD, SEP = 0, 1


@dataclasses.dataclass
class Copying(Task):
    """Repeat a random string of ``copy_len`` tokens (default: as long as ``seq_len`` allows)."""

    copy_len: int | None = None

    name = "copying"

    def __post_init__(self) -> None:
        if self.copy_len is not None:
            _positive("copy_len", self.copy_len)
        if self.seq_len < 2 * self.n + 1:
            raise ValueError(
                f"seq_len: copying {self.n} tokens needs seq_len >= {2 * self.n + 1}, got {self.seq_len}"
            )
        if self.n < 1:
            raise ValueError(f"seq_len: copying needs seq_len >= 3, got {self.seq_len}")
        super().__post_init__()

    @property
    def n(self) -> int:
        return self.copy_len if self.copy_len is not None else (self.seq_len - 1) // 2

    def min_vocab(self) -> int:
        return 3  # pad, separator, and at least one string token

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        string = rng.integers(2, self.vocab_size, size=self.n)
        tokens = np.concatenate([string, [SEP], string])
        return finish(tokens, [(self.n + 1, 2 * self.n + 1)], self.seq_len, pad=PAD)
