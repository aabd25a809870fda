"""Multi-query associative recall (MQAR), as in Zoology (Arora et al. 2023, "Zoology:
Measuring and Improving Recall in Efficient Language Models", zoology/data/associative_recall.py).

Layout over a vocabulary of V ids (the same split Zoology uses)::

    k1 v1 k2 v2 ... kN vN | 0 0 kq 0 0 0 kq' 0 ...          (length seq_len = L)

- keys are drawn without replacement from ``[1, V//2)``, values without replacement from
  ``[V//2, V)``; id 0 is the filler;
- the query region (the last ``L - 2N`` positions) holds every key once, in random order, at
  random even offsets, with filler between (``filler="noise"`` fills it with random value
  ids instead of 0);
- ``targets`` is the queried key's value at each query position and -100 elsewhere, so the
  loss and the accuracy are taken at query positions only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .base import IGNORE, Task, _positive


@dataclasses.dataclass
class MQAR(Task):
    """N key-value pairs, then N queries. ``num_pairs`` = N; ``filler`` = "zero" or "noise"."""

    num_pairs: int = 4
    filler: str = "zero"

    name = "mqar"

    def __post_init__(self) -> None:
        _positive("num_pairs", self.num_pairs)
        if self.filler not in ("zero", "noise"):
            raise ValueError(f"filler: expected 'zero' or 'noise', got {self.filler!r}")
        if self.seq_len < 4 * self.num_pairs:
            raise ValueError(
                f"seq_len: MQAR with num_pairs={self.num_pairs} needs seq_len >= 4 * num_pairs = "
                f"{4 * self.num_pairs} (2N for the pairs, 2N for queries at even offsets), got {self.seq_len}"
            )
        super().__post_init__()

    def min_vocab(self) -> int:
        # keys in [1, V//2) and values in [V//2, V) must each hold num_pairs distinct ids
        return 2 * self.num_pairs + 2

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, length, half = self.num_pairs, self.seq_len, self.vocab_size // 2
        keys = rng.choice(np.arange(1, half), size=n, replace=False)
        values = rng.choice(np.arange(half, self.vocab_size), size=n, replace=False)
        tokens = np.zeros(length, dtype=np.int64)
        tokens[0 : 2 * n : 2] = keys
        tokens[1 : 2 * n : 2] = values
        n_query = length - 2 * n
        if self.filler == "noise":
            tokens[2 * n :] = rng.integers(half, self.vocab_size, size=n_query)
        # distinct even offsets in the query region, one per key (Zoology's `gaps * 2`)
        slots = 2 * rng.choice(n_query // 2, size=n, replace=False) + 2 * n
        order = rng.permutation(n)
        tokens[slots] = keys[order]
        targets = np.full(length, IGNORE, dtype=np.int64)
        targets[slots] = values[order]
        return torch.from_numpy(tokens), torch.from_numpy(targets)
