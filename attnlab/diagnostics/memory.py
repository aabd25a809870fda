"""How much a model remembers and for how long: capacity and forgetting curves, and the
memory horizons its learned gates imply.

- **Capacity** (Zoology, Arora et al. 2023; Based, Arora et al. 2024: recall tracks state
  size): recall against the number of facts in a fixed context, beside the cache bytes the
  model's layers declare at that context (``attnlab.cost.ModelCost``). A linear-attention
  head's memory is a ``D_k × D_v`` outer-product sum, which stores at most ``D_k`` keys
  without interference (Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight
  Programmers", §4); that bound is reported as ``linear_key_dim``.
- **Forgetting**: recall against the distance between a fact and its query.
- **Horizons**: a linear layer multiplies its state by ``α = e^g`` per token, so a fact's
  weight halves every ``ln 2 / −g`` tokens. Lightning's ``g = −s_h`` is a constant per head
  (exact); Gated DeltaNet's ``g = −exp(A_log)·softplus(a(x) + dt_bias)`` depends on the
  token, one per head, and KDA's one per head and key channel — both are computed here on the
  probe's own hidden states (hooked mixer inputs) and summarised over tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .hooks import capture_mixer_inputs
from .probes import Probe, make_probe, predict, recall

LINEAR = "LGK"
_MAX_QUANTILE_ROWS = 16384
# log10 half-life bins: 0.1 token to 10^8 tokens, a quarter decade each
HISTOGRAM_EDGES = tuple(np.arange(-1.0, 8.0 + 1e-9, 0.25).tolist())


def _cfg(model: nn.Module):
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "layer_pattern"):
        raise ValueError("model: expected a HybridLM (with .cfg)")
    return cfg


def default_fact_counts(spec: str, seq_len: int, vocab_size: int) -> list[int]:
    """Powers of two (1, 2, 4, ...) of facts that fit ``seq_len`` and the vocabulary:
    MQAR needs 4N <= seq_len and 2N + 2 <= vocab; a needle sample must fit its needles."""
    counts, n = [], 1
    while n <= 64:
        try:
            make_probe(spec, seq_len, vocab_size, 1, **_facts_option(spec, n))
        except ValueError:
            break
        counts.append(n)
        n *= 2
    if not counts:
        raise ValueError(f"seq_len: {seq_len} tokens hold not even one fact of {spec!r}")
    return counts


def _facts_option(spec: str, n: int) -> dict[str, Any]:
    if spec.split(":")[0] == "needle":
        return {"variant": "multi-key", "num_keys": n, "num_queries": 1}
    return {"num_pairs": n}


def linear_key_dim(model: nn.Module) -> int | None:
    """Smallest key dimension per head over the model's linear layers (the outer-product
    memory's interference-free capacity, in keys), None without linear layers."""
    dims = []
    for block in model.blocks:
        mixer = block.mixer
        if block.letter == "L":
            dims.append(mixer.head_dim)
        elif block.letter in "GK":
            dims.append(mixer.key_head_dim)
    return min(dims) if dims else None


def capacity_curve(
    model: nn.Module,
    spec: str = "mqar",
    seq_len: int = 64,
    facts: Sequence[int] | None = None,
    n_samples: int = 128,
    seed: int = 0,
    batch_size: int = 64,
    known: dict[int, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Recall against the number of facts stored at context ``seq_len``.

    ``spec``: ``"mqar"`` (facts = ``num_pairs``) or ``"needle"`` (facts = ``num_keys`` of a
    multi-key needle, one asked). One row per fact count: ``facts``, ``recall`` (teacher-forced
    accuracy at the answer positions), ``exact`` (samples with every answer right), ``guess_recall``
    (1/N: picking any stored value, the level of a model that stores values but no bindings), ``targets``,
    ``cache_bytes`` (one sequence's cache at ``seq_len``, bf16, as the layers declare it) and
    ``cache_bytes_per_fact``. ``known`` maps a fact count to predictions (bool [N, T]) already
    made on the very probe this function builds for it (same spec, length, samples, seed)."""
    from ..cost import ModelCost

    cfg = _cfg(model)
    facts = list(facts) if facts is not None else default_fact_counts(spec, seq_len, cfg.vocab_size)
    cache_bytes = ModelCost(cfg).cache_bytes(seq_len)
    rows = []
    for n in facts:
        probe = make_probe(spec, seq_len, cfg.vocab_size, n_samples, seed, **_facts_option(spec, n))
        correct = known[n] if known and n in known else predict(model, probe, batch_size)  # (N, T)
        per_sample = (correct | ~probe.mask).all(1)  # (N,)
        rows.append(
            {
                "facts": int(n),
                "recall": recall(correct, probe.mask),
                "exact": float(per_sample.float().mean()),
                "targets": int(probe.mask.sum()),
                "cache_bytes": int(cache_bytes),
                "cache_bytes_per_fact": cache_bytes / n,
                # recall of a model that knows which values are stored but not which key owns
                # which: one of the n stored values at random (MQAR; None for needles)
                "guess_recall": 1.0 / n if probe.task.get("task") == "mqar" else None,
            }
        )
    return rows


def capacity_cliff(rows: list[dict[str, Any]], threshold: float = 0.5, min_recall: float = 0.1) -> int | None:
    """The fewest facts at which recall falls below ``threshold`` times the best recall of the
    curve; None if it never does, or if the best recall is under ``min_recall`` (a model that
    recalls nothing has no cliff to find)."""
    best = max((r["recall"] or 0.0 for r in rows), default=0.0)
    if best < min_recall:
        return None
    for r in sorted(rows, key=lambda r: r["facts"]):
        if (r["recall"] or 0.0) < threshold * best:
            return r["facts"]
    return None


def forgetting_curve(
    model: nn.Module, probe: Probe, bins: int = 8, batch_size: int = 64, correct: torch.Tensor | None = None
) -> list[dict[str, Any]]:
    """Recall against distance (target position − fact position), in ``bins`` equal-width
    distance bins over the probe's range (empty bins dropped). Rows: ``distance_lo``,
    ``distance_hi`` (inclusive), ``distance_mean``, ``recall``, ``targets``.
    ``correct`` (bool [N, T]) reuses predictions already made on this probe."""
    if bins < 1:
        raise ValueError(f"bins: expected a positive integer, got {bins}")
    correct = predict(model, probe, batch_size) if correct is None else correct
    mask = probe.mask
    dist = probe.distance[mask].double()  # (n,)
    hit = correct[mask]  # (n,)
    lo, hi = float(dist.min()), float(dist.max())
    edges = np.linspace(lo, hi + 1, bins + 1)
    rows = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        inside = (dist >= a) & (dist < b)
        if not bool(inside.any()):
            continue
        d = dist[inside]
        rows.append(
            {
                "distance_lo": int(d.min()),
                "distance_hi": int(d.max()),
                "distance_mean": float(d.mean()),
                "recall": float(hit[inside].float().mean()),
                "targets": int(inside.sum()),
            }
        )
    return rows


def needle_depth_probe(
    spec: str, seq_len: int, vocab_size: int, n_samples: int, depths: int = 8, seed: int = 0
) -> Probe:
    """A needle probe whose asked needle sits at ``depths`` evenly spaced depths (0 = start of
    the haystack, 1 = end), ``n_samples // depths`` samples each: controlled fact-query gaps."""
    per = max(1, n_samples // depths)
    probe = None
    for i, depth in enumerate(np.linspace(0.0, 1.0, depths)):
        p = make_probe(spec, seq_len, vocab_size, per, seed + i, depth=float(depth))
        probe = p if probe is None else probe.concat(p)
    return probe


# ---------------------------------------------------------------------- horizons
@torch.no_grad()
def log_decays(model: nn.Module, tokens: torch.Tensor, batch_size: int = 64) -> dict[int, torch.Tensor]:
    """Per linear layer, its per-token log-decay ``g`` (natural log of the state multiplier):

    - ``L``: float64 ``[H]`` (``−slope``, input-independent);
    - ``G``: float64 ``[N·T, H]``; ``K``: float64 ``[N·T, H, D_k]`` — on ``tokens`` [N, T]'s
      hidden states, by the layer's own ``log_decay`` on its hooked input.
    """
    layers = [i for i, b in enumerate(model.blocks) if b.letter in LINEAR]
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for i in layers:
        if model.blocks[i].letter == "L":
            out[i] = [-model.blocks[i].mixer.slope.double().cpu()]  # (H,)
    data_layers = [i for i in layers if model.blocks[i].letter in "GK"]
    if data_layers:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            for start in range(0, tokens.shape[0], batch_size):
                with capture_mixer_inputs(model, data_layers) as xs:
                    model(tokens[start : start + batch_size].to(device))
                for i in data_layers:
                    mixer = model.blocks[i].mixer
                    proj = mixer.in_proj(xs[i])  # (b, T, sum(in_sizes))
                    parts = dict(
                        zip(mixer.in_sizes, proj.split(list(mixer.in_sizes.values()), -1), strict=True)
                    )
                    g = mixer.log_decay(parts).double().cpu()  # (b, T, H) or (b, T, H, D_k)
                    out[i].append(g.flatten(0, 1))  # (b*T, H[, D_k])
        finally:
            model.train(was_training)
    return {i: torch.cat(v) if len(v) > 1 else v[0] for i, v in out.items()}


def half_life(g: torch.Tensor) -> torch.Tensor:
    """Tokens until a stored fact's weight halves under log-decay ``g`` (≤ 0): ``ln 2 / −g``
    (``inf`` where ``g == 0``)."""
    return math.log(2) / (-g.double())


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def memory_horizons(model: nn.Module, decays: dict[int, torch.Tensor]) -> list[dict[str, Any]]:
    """One row per (linear layer, head) — per (layer, head, channel) for KDA — from
    :func:`log_decays`: ``half_life`` (the median over tokens; exact for Lightning), ``p10`` /
    ``p90`` over tokens, and ``source`` (``"slope"`` or ``"gate on probe tokens"``).
    Infinite half-lives (no decay) are None."""
    rows = []
    for i, g in decays.items():
        letter = model.blocks[i].letter
        hl = half_life(g)
        if letter == "L":
            for h, v in enumerate(hl.tolist()):
                rows.append(
                    {
                        "layer": i,
                        "letter": letter,
                        "head": h,
                        "channel": None,
                        "half_life": _finite(v),
                        "p10": _finite(v),
                        "p90": _finite(v),
                        "source": "slope",
                    }
                )
            continue
        if hl.shape[0] > _MAX_QUANTILE_ROWS:  # torch.quantile caps its input size; evenly spaced tokens
            hl = hl[torch.linspace(0, hl.shape[0] - 1, _MAX_QUANTILE_ROWS).long()]
        q = torch.quantile(hl.clamp(max=1e30).float(), torch.tensor([0.1, 0.5, 0.9]), dim=0)  # (3, H[, D_k])
        q = torch.where(q >= 1e30, math.inf, q.double())
        for idx in np.ndindex(*q.shape[1:]):
            p10, med, p90 = (float(q[(k, *idx)]) for k in range(3))
            rows.append(
                {
                    "layer": i,
                    "letter": letter,
                    "head": int(idx[0]),
                    "channel": int(idx[1]) if len(idx) > 1 else None,
                    "half_life": _finite(med),
                    "p10": _finite(p10),
                    "p90": _finite(p90),
                    "source": "gate on probe tokens",
                }
            )
    return rows


def horizon_histograms(
    model: nn.Module, decays: dict[int, torch.Tensor], edges: Sequence[float] = HISTOGRAM_EDGES
) -> list[dict[str, Any]]:
    """Per linear layer, a histogram of log10(half-life in tokens) on shared ``edges`` (so
    layers and models compare; values outside go to the end bins): over heads (L), over
    tokens × heads (G), over tokens × heads × channels (K). Rows: ``layer``, ``letter``,
    ``edges``, ``counts``, ``infinite`` (values with no decay, not counted in a bin)."""
    edges = np.asarray(edges, dtype=np.float64)
    out = []
    for i, g in decays.items():
        hl = half_life(g).flatten()
        finite = hl[torch.isfinite(hl)]
        logs = finite.clamp(min=1e-30).log10().numpy().clip(edges[0], edges[-1])
        counts, _ = np.histogram(logs, bins=edges)
        out.append(
            {
                "layer": i,
                "letter": model.blocks[i].letter,
                "edges": edges.tolist(),
                "counts": counts.tolist(),
                "infinite": int((~torch.isfinite(hl)).sum()),
            }
        )
    return out
