"""Selection audit: did a sparse layer keep the token a query needs? "Once pruned, forgotten"
as a number.

For every target position ``t`` of a probe and its fact position ``s`` (see ``probes.py``):

- ``D`` (DeepSeek Sparse Attention): is ``s`` among the ``index_topk`` positions the
  lightning indexer picks for query ``t``? The indexer is re-run on the layer's real input
  (hooked), with the layer's own projections and ``ops.dsa_index_scores`` / ``ops.dsa_topk``,
  so the selection is the one the layer's forward used.
- ``W`` (sliding window + sinks): is ``t − s < window`` or ``s < sink_tokens``?

Recall (of the whole model, teacher-forced) is then split by kept / pruned, next to the kept
rate a random choice of the same budget would give (``chance_rate``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import ops
from .hooks import capture_mixer_inputs
from .probes import Probe, recall

SPARSE = "WD"


def sparse_layers(model: nn.Module) -> list[int]:
    return [i for i, b in enumerate(model.blocks) if b.letter in SPARSE]


@torch.no_grad()
def dsa_topk_indices(mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """int64 [B, T, k]: the positions a ``D`` layer's indexer picks for each query (-1 = empty
    slot), given the layer's input ``x [B, T, d_model]`` — the layer's own projections, as in
    ``DeepSeekSparseAttention.forward`` without a cache."""
    T = x.shape[1]
    _, _, _, q_latent, cos_sin = mixer._project(x, mixer._positions(x, None))
    q_idx, k_idx, w = mixer._index_qkw(x, q_latent, cos_sin)
    scores = ops.dsa_index_scores(q_idx, k_idx, w)  # (B, T, T)
    return ops.dsa_topk(scores, min(mixer.index_topk, T), causal=True)  # (B, T, k)


def dsa_selected(mixer: nn.Module, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: ``source[b, t]`` is among the top-k positions a ``D`` layer's indexer picks
    for query ``t`` (False where source < 0); ``x [B, T, d_model]`` is the layer's input."""
    idx = dsa_topk_indices(mixer, x)  # (B, T, k)
    src = source.to(idx.device)
    return ((idx == src[..., None]).any(-1) & (src >= 0)).cpu()  # (B, T)


def window_selected(window: int, sink_tokens: int, source: torch.Tensor) -> torch.Tensor:
    """bool [N, T]: position ``source[n, t]`` is visible to query ``t`` under a sliding window
    of ``window`` keys (itself included) plus the first ``sink_tokens`` keys."""
    pos = torch.arange(source.shape[1]).expand_as(source)  # (N, T)
    return (source >= 0) & ((pos - source < window) | (source < sink_tokens))


def _chance(budget: int, mask: torch.Tensor) -> float:
    """Mean over target positions t of min(budget, t + 1) / (t + 1): the kept rate of a random pick."""
    pos = torch.arange(mask.shape[1]).expand_as(mask)[mask].double()  # (n,)
    return float((pos + 1).clamp(max=budget).div(pos + 1).mean()) if pos.numel() else 0.0


@torch.no_grad()
def selection_audit(
    model: nn.Module, probe: Probe, batch_size: int = 64
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Audit every ``W`` / ``D`` layer on ``probe``.

    Returns ``(rows, correct)``: one row per sparse layer — ``layer``, ``letter``, ``mechanism``
    (``"top-k"`` / ``"window"``), ``budget`` (k, or window + sinks), ``targets``,
    ``selected_rate``, ``chance_rate``, ``recall_selected``, ``recall_pruned`` (None where no
    target falls in the group), ``n_selected``, ``n_pruned`` — plus, with several sparse
    layers, a row ``layer="any"``: kept by at least one of them vs pruned by all; and
    ``correct`` (bool [N, T], the model's predictions on the probe, for reuse)."""
    layers = sparse_layers(model)
    if not layers:
        raise ValueError(f"model: pattern {model.cfg.layer_pattern!r} has no sparse (W or D) layer to audit")
    device = next(model.parameters()).device
    dsa = [i for i in layers if model.blocks[i].letter == "D"]
    selected = {i: [] for i in layers}
    correct = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, probe.tokens.shape[0], batch_size):
            tokens = probe.tokens[start : start + batch_size]  # (b, T)
            source = probe.source[start : start + batch_size]  # (b, T)
            with capture_mixer_inputs(model, dsa) as xs:
                logits = model(tokens.to(device))  # (b, T, V)
            correct.append(logits.argmax(-1).cpu() == probe.targets[start : start + batch_size])
            for i in dsa:
                selected[i].append(dsa_selected(model.blocks[i].mixer, xs[i], source))
    finally:
        model.train(was_training)
    correct_all = torch.cat(correct) & probe.mask  # (N, T)
    mask = probe.mask
    rows = []
    kept_any = torch.zeros_like(mask)
    for i in layers:
        mixer = model.blocks[i].mixer
        if i in dsa:
            sel, mechanism, budget = torch.cat(selected[i]), "top-k", mixer.index_topk
        else:
            sel = window_selected(mixer.window, mixer.sink_tokens, probe.source)
            mechanism, budget = "window", mixer.window + mixer.sink_tokens
        kept_any |= sel
        rows.append(
            {
                "layer": i,
                "letter": model.blocks[i].letter,
                "mechanism": mechanism,
                "budget": int(budget),
                **_split(sel, mask, correct_all),
                "chance_rate": _chance(budget, mask),
            }
        )
    if len(layers) > 1:
        rows.append(
            {
                "layer": "any",
                "letter": "W/D",
                "mechanism": "kept by >= 1 sparse layer",
                "budget": None,
                **_split(kept_any, mask, correct_all),
                "chance_rate": None,
            }
        )
    return rows, correct_all


def _split(sel: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor) -> dict[str, Any]:
    n = int(mask.sum())
    kept, pruned = sel & mask, ~sel & mask
    return {
        "targets": n,
        "selected_rate": int(kept.sum()) / max(n, 1),
        "recall_selected": recall(correct, kept),
        "recall_pruned": recall(correct, pruned),
        "n_selected": int(kept.sum()),
        "n_pruned": int(pruned.sum()),
    }
