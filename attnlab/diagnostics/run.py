"""Run every diagnostic that applies to a model; plain data out."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .attribution import layer_attribution
from .memory import (
    LINEAR,
    capacity_cliff,
    capacity_curve,
    forgetting_curve,
    horizon_histograms,
    linear_key_dim,
    log_decays,
    memory_horizons,
    needle_depth_probe,
)
from .probes import make_probe, predict, recall
from .selection import selection_audit, sparse_layers

DIAGNOSTICS = ("capacity", "forgetting", "selection", "attribution")


def applicable(model: nn.Module) -> dict[str, str | None]:
    """For each diagnostic, None if it applies to ``model``, else why not."""
    pattern = model.cfg.layer_pattern
    return {
        "capacity": None,
        "forgetting": None,
        "selection": None if sparse_layers(model) else f"no sparse (W/D) layer in {pattern!r}",
        "attribution": None if len(pattern) > 1 else "a one-layer model has nothing to attribute",
    }


def run_diagnostics(
    model: nn.Module,
    spec: str = "mqar:num_pairs=4",
    seq_len: int = 64,
    n_samples: int = 128,
    seed: int = 0,
    which: Sequence[str] | None = None,
    facts: Sequence[int] | None = None,
    bins: int = 8,
    batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the diagnostics in ``which`` (default: all that apply) on ``model`` with probes of
    ``spec`` (an ``mqar`` or ``needle`` task spec) at ``seq_len`` tokens.

    Returns a JSON-ready dict: ``model`` (pattern, params, cache bytes), ``settings``,
    ``summary`` (the headline numbers), one table (list of dicts) per diagnostic run —
    ``capacity``, ``forgetting``, ``horizons`` + ``horizon_histograms`` (linear layers),
    ``selection``, ``attribution`` — ``skipped`` (name -> reason) and ``seconds`` per part."""
    cfg = model.cfg
    reasons = applicable(model)
    which = [w for w in DIAGNOSTICS if reasons[w] is None] if which is None else list(which)
    unknown = sorted(set(which) - set(DIAGNOSTICS))
    if unknown:
        raise ValueError(f"which: unknown diagnostic(s) {unknown}; choose from {', '.join(DIAGNOSTICS)}")
    say = progress or (lambda msg: None)
    from ..cost import ModelCost

    out: dict[str, Any] = {
        "model": {
            "pattern": cfg.layer_pattern,
            "num_params": model.num_params(),
            "cache_bytes": ModelCost(cfg).cache_bytes(seq_len),
            "cache_bytes_context": seq_len,
            "linear_key_dim": linear_key_dim(model),
        },
        "settings": {"spec": spec, "seq_len": seq_len, "n_samples": n_samples, "seed": seed, "bins": bins},
        "skipped": {w: r for w, r in reasons.items() if w not in which and r is not None},
        "seconds": {},
        "summary": {},
    }
    for w in which:
        if reasons[w] is not None:
            out["skipped"][w] = reasons[w]
    which = [w for w in which if reasons[w] is None]
    task_name = spec.split(":")[0]
    probe = make_probe(spec, seq_len, cfg.vocab_size, n_samples, seed)
    correct = None

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        say(f"diagnostics: {name} ({cfg.layer_pattern})")
        t0 = time.perf_counter()
        result = fn()
        out["seconds"][name] = round(time.perf_counter() - t0, 3)
        return result

    if "selection" in which:  # its forward also gives the probe's predictions
        rows, correct = timed("selection", lambda: selection_audit(model, probe, batch_size))
        out["selection"] = rows
        main = rows[-1]
        out["summary"]["selected_rate"] = main["selected_rate"]
        out["summary"]["recall_selected"] = main["recall_selected"]
        out["summary"]["recall_pruned"] = main["recall_pruned"]
    if task_name == "mqar":
        correct = predict(model, probe, batch_size) if correct is None else correct
    out["summary"]["recall"] = None if correct is None else recall(correct, probe.mask)
    if "capacity" in which:
        known = {probe.facts: correct} if task_name == "mqar" else None  # the same probe at N = probe.facts
        rows = timed(
            "capacity",
            lambda: capacity_curve(model, spec, seq_len, facts, n_samples, seed, batch_size, known),
        )
        out["capacity"] = rows
        out["summary"]["cliff_facts"] = capacity_cliff(rows)
    if "forgetting" in which:
        if task_name == "needle":  # controlled gaps: the asked needle at evenly spaced depths
            fprobe = needle_depth_probe(spec, seq_len, cfg.vocab_size, n_samples, bins, seed)
            fcorrect = None
        else:  # MQAR queries already spread over distances; bin them
            fprobe, fcorrect = probe, correct
        rows = timed("forgetting", lambda: forgetting_curve(model, fprobe, bins, batch_size, fcorrect))
        out["forgetting"] = rows
        if rows:
            out["summary"]["recall_nearest"] = rows[0]["recall"]
            out["summary"]["recall_farthest"] = rows[-1]["recall"]
        if any(b.letter in LINEAR for b in model.blocks):
            decays = timed("horizons", lambda: log_decays(model, fprobe.tokens, batch_size))
            out["horizons"] = memory_horizons(model, decays)
            out["horizon_histograms"] = horizon_histograms(model, decays)
            out["summary"]["median_half_life"] = _median_half_lives(out["horizons"])
    if "attribution" in which:
        rows = timed("attribution", lambda: layer_attribution(model, probe, None, batch_size))
        out["attribution"] = rows
        worst = max(rows[1:], key=lambda r: r["recall_drop"] or 0.0)
        out["summary"]["most_needed_layer"] = {
            "layer": worst["layer"],
            "letter": worst["letter"],
            "recall_drop": worst["recall_drop"],
        }
    if out["summary"]["recall"] is None:
        correct = predict(model, probe, batch_size)
        out["summary"]["recall"] = recall(correct, probe.mask)
    return out


def _median_half_lives(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per linear layer, the median over its heads (channels) of the per-unit half-life."""
    by_layer: dict[int, list[float]] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(float("inf") if r["half_life"] is None else r["half_life"])
    out = {}
    for layer, values in by_layer.items():
        m = float(torch.tensor(values, dtype=torch.float64).median())
        out[str(layer)] = m if m != float("inf") else None
    return out
