"""Probes: recall samples that know where each fact sits in the context.

A :class:`Probe` is an evaluation batch of a recall task plus, for every target position,
the position of the context token that holds the answer (``source``). That is what the
diagnostics need beyond an accuracy: the distance between a fact and its query, and whether
a sparse layer kept the fact's position.

"The token a query needs" is the position whose token *is* the answer:

- MQAR ``k1 v1 ... kN vN | ... kq``: the queried key's value, position ``2i + 1``. (A causal
  model cannot read the value from the key's position ``2i``, which precedes it; the value
  position is the one that carries both the value and, through its previous token, the key.)
- Needle ``... The magic number for <key> is <digits>. ...``: answer digit ``j`` comes from
  digit ``j`` of the needle's value.

Recall is scored as ``attnlab.evaluate`` does: teacher-forced argmax at target positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from ..tasks import IGNORE, MQAR, Needle, eval_rng, make_task
from ..tasks.base import finish

_NEEDLE_HEAD = len(b"The magic number for ")
_NEEDLE_IS = len(b" is ")


@dataclasses.dataclass
class Probe:
    """A scored batch with fact positions.

    tokens:  int64 [N, T], what the model reads.
    targets: int64 [N, T], the next token to predict, ``IGNORE`` (-100) where none.
    source:  int64 [N, T], for each target position the position of the context token holding
             the answer (< the target position), -1 where there is no target.
    facts:   facts stored per sample (MQAR pairs, needles).
    task:    the task's options (JSON-ready).
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    source: torch.Tensor
    facts: int
    task: dict[str, Any]

    def __post_init__(self) -> None:
        n, t = self.tokens.shape
        for name in ("targets", "source"):
            if tuple(getattr(self, name).shape) != (n, t):
                raise ValueError(
                    f"{name}: expected shape {(n, t)} like tokens, got {tuple(getattr(self, name).shape)}"
                )
        mask = self.mask
        pos = torch.arange(t).expand(n, t)  # (N, T)
        if bool(((self.source < 0) & mask).any()) or bool(((self.source >= pos) & mask).any()):
            raise ValueError("source: every target position needs a source position before it")

    @property
    def mask(self) -> torch.Tensor:
        """bool [N, T]: target positions."""
        return self.targets != IGNORE

    @property
    def distance(self) -> torch.Tensor:
        """int64 [N, T]: target position minus source position (0 where no target)."""
        pos = torch.arange(self.tokens.shape[1]).expand_as(self.tokens)  # (N, T)
        return torch.where(self.mask, pos - self.source, 0)

    def concat(self, other: Probe) -> Probe:
        """Both probes' samples (same length) in one; ``task`` and ``facts`` are this probe's."""
        return Probe(
            torch.cat([self.tokens, other.tokens]),
            torch.cat([self.targets, other.targets]),
            torch.cat([self.source, other.source]),
            self.facts,
            self.task,
        )


def mqar_probe(task: MQAR, n_samples: int, seed: int = 0) -> Probe:
    """The evaluation batch of ``task`` (as ``attnlab.evaluate`` scores it) with value positions."""
    tokens, targets = task.eval_batch(n_samples, seed)  # (N, T) each
    n = task.num_pairs
    keys = tokens[:, 0 : 2 * n : 2]  # (N, n)
    match = tokens[:, :, None] == keys[:, None, :]  # (N, T, n)
    source = 2 * match.int().argmax(-1) + 1  # (N, T): the queried key's value position
    source = torch.where(targets != IGNORE, source, -1)
    return Probe(tokens, targets, source.long(), n, task.options())


def needle_probe(task: Needle, n_samples: int, seed: int = 0) -> Probe:
    """``n_samples`` needle samples (from the evaluation stream) with each answer digit's source.
    Needles with one value per key only (``num_values == 1``)."""
    if task.num_values != 1:
        raise ValueError(f"task: the needle probe needs num_values=1, got {task.num_values}")
    rng = eval_rng(seed)
    toks, tgts, srcs = [], [], []
    for _ in range(n_samples):
        built = task.build(rng)
        tokens, targets = finish(np.frombuffer(built.text, dtype=np.uint8), built.answer_spans, task.seq_len)
        pad = task.seq_len - len(built.text)
        source = torch.full((task.seq_len,), -1, dtype=torch.int64)
        # question i asks keys[i], whose (single) needle is needle i
        for i, (start, end) in enumerate(built.answer_spans):
            value_start = built.needle_offsets[i] + _NEEDLE_HEAD + task.key_len + _NEEDLE_IS
            for j in range(end - start):  # answer byte start + j is predicted at position start + j - 1
                source[pad + start + j - 1] = pad + value_start + j
        toks.append(tokens)
        tgts.append(targets)
        srcs.append(source)
    return Probe(torch.stack(toks), torch.stack(tgts), torch.stack(srcs), task.num_keys, task.options())


def make_probe(
    spec: str | dict[str, Any], seq_len: int, vocab_size: int, n_samples: int, seed: int = 0, **options: Any
) -> Probe:
    """A probe from a task spec (``"mqar:num_pairs=4"``, ``"needle:variant=multi-key"``), with
    ``options`` overriding the spec's. MQAR and needle have fact positions; others raise."""
    task = make_task(spec, seq_len, vocab_size)
    if options:
        task = task.with_options(**options)
    if isinstance(task, MQAR):
        return mqar_probe(task, n_samples, seed)
    if isinstance(task, Needle):
        return needle_probe(task, n_samples, seed)
    raise ValueError(
        f"spec: diagnostics need fact positions, which only mqar and needle have; got {task.name!r}"
    )


@torch.no_grad()
def predict(model: nn.Module, probe: Probe, batch_size: int = 64) -> torch.Tensor:
    """bool [N, T] on the CPU: the argmax at each target position is right (False elsewhere)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, probe.tokens.shape[0], batch_size):
            tokens = probe.tokens[start : start + batch_size].to(device)  # (b, T)
            targets = probe.targets[start : start + batch_size].to(device)  # (b, T)
            out.append((model(tokens).argmax(-1) == targets).cpu())  # (b, T)
    finally:
        model.train(was_training)
    return torch.cat(out) & probe.mask  # (N, T)


def recall(correct: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Fraction of ``mask`` positions that are ``correct`` (None if there are none)."""
    n = int(mask.sum())
    return None if n == 0 else int((correct & mask).sum()) / n
