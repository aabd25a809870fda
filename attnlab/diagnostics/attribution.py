"""Layer attribution: which layers carry retrieval? Recall with each layer's mixer output
zeroed, one layer at a time (e.g. the one softmax layer of a 7:1 hybrid)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .hooks import ablate_mixers
from .probes import Probe, recall


@torch.no_grad()
def _target_logits(model: nn.Module, probe: Probe, batch_size: int) -> torch.Tensor:
    """float32 [n_targets, V]: the logits at the probe's target positions, in order."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, probe.tokens.shape[0], batch_size):
        logits = model(probe.tokens[start : start + batch_size].to(device)).cpu()  # (b, T, V)
        out.append(logits[probe.mask[start : start + batch_size]])  # (n_b, V)
    return torch.cat(out)


@torch.no_grad()
def layer_attribution(
    model: nn.Module, probe: Probe, layers: Sequence[int] | None = None, batch_size: int = 64
) -> list[dict[str, Any]]:
    """Recall on ``probe`` intact (first row, ``layer=None``) and with each of ``layers``
    (default: all) ablated. Rows: ``layer``, ``letter``, ``recall``, ``recall_drop`` (intact −
    ablated), ``max_logit_change`` and ``mean_logit_change`` (|Δ logits| at target positions)."""
    layers = list(range(len(model.blocks))) if layers is None else list(layers)
    was_training = model.training
    model.eval()
    try:
        targets = probe.targets[probe.mask]  # (n,)
        base = _target_logits(model, probe, batch_size)  # (n, V)
        base_recall = recall(base.argmax(-1) == targets, torch.ones_like(targets, dtype=torch.bool))
        rows = [
            {
                "layer": None,
                "letter": "",
                "recall": base_recall,
                "recall_drop": 0.0,
                "max_logit_change": 0.0,
                "mean_logit_change": 0.0,
            }
        ]
        for i in layers:
            with ablate_mixers(model, [i]):
                logits = _target_logits(model, probe, batch_size)  # (n, V)
            r = recall(logits.argmax(-1) == targets, torch.ones_like(targets, dtype=torch.bool))
            change = (logits - base).abs()
            rows.append(
                {
                    "layer": i,
                    "letter": model.blocks[i].letter,
                    "recall": r,
                    "recall_drop": None if r is None or base_recall is None else base_recall - r,
                    "max_logit_change": float(change.max()) if change.numel() else 0.0,
                    "mean_logit_change": float(change.mean()) if change.numel() else 0.0,
                }
            )
    finally:
        model.train(was_training)
    return rows
