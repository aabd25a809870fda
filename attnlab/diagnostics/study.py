"""Diagnostics of a whole study (``attnlab compare``): every trained model, one section.

The study's time budget (minutes on a 2-core CPU) does not fit every diagnostic on every
model, so each runs where it says something (``plan``): capacity and forgetting (+ memory
horizons of linear layers) on all models, the selection audit on models with sparse (W/D)
layers, layer attribution on the hybrids (more than one kind of layer). Each model's result
is kept in ``models/<name>/diagnostics.json`` (with the settings that made it), so a resumed
study reuses it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_json
from .run import applicable, run_diagnostics
from .section import INTRO, tables, write_plots


@dataclasses.dataclass
class StudyDiagnosticsSettings:
    """Probe sizes for the study's diagnostics (small: they share the study's CPU budget)."""

    n_samples: int = 16
    facts: tuple[int, ...] = (1, 4, 16, 32)
    bins: int = 8
    batch_size: int = 16
    seed: int = 0


def probe_spec(tasks: Sequence[str], vocab_size: int) -> str | None:
    """The first MQAR task of the study (without its mixture weight), else its needle task
    (byte vocabulary only); None if neither is there."""
    for want in ("mqar", "needle"):
        for spec in tasks:
            if spec.split(":")[0] == want and (want != "needle" or vocab_size >= 256):
                return ",".join(p for p in spec.split(",") if not p.strip().startswith("weight="))
    return None


def plan(pattern: str) -> list[str]:
    """The diagnostics the study runs on a model of this layer pattern."""
    which = ["capacity", "forgetting"]
    if any(c in "WD" for c in pattern):
        which.append("selection")
    if len(set(pattern)) > 1:
        which.append("attribution")
    return which


def run_study_diagnostics(
    out_dir: str | os.PathLike,
    names: Sequence[str],
    tasks: Sequence[str],
    seq_len: int,
    settings: StudyDiagnosticsSettings | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Diagnostics of each model ``out_dir/models/<name>/checkpoint`` with probes of the
    study's MQAR (else needle) task at ``seq_len``; returns {name: result} (see
    :func:`attnlab.diagnostics.run_diagnostics`), each with ``plan`` and ``reused`` added."""
    from ..model import HybridLM

    s = settings or StudyDiagnosticsSettings()
    say = progress or (lambda msg: None)
    out_dir = Path(out_dir)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        model_dir = out_dir / "models" / name
        model = HybridLM.from_pretrained(model_dir / "checkpoint").eval()
        spec = probe_spec(tasks, model.cfg.vocab_size)
        if spec is None:  # no mqar task, and needle needs a byte vocabulary
            say(f"diagnostics: {name} skipped (no mqar task; needle needs vocab >= 256)")
            continue
        which = [w for w in plan(model.cfg.layer_pattern) if applicable(model)[w] is None]
        weights = (model_dir / "checkpoint" / "model.safetensors").stat()
        key = {"weights": [weights.st_size, weights.st_mtime_ns],  # a retrained model is diagnosed again
               "spec": spec, "seq_len": seq_len, "which": which, "config": model.cfg.to_dict(),
               **dataclasses.asdict(s)}  # fmt: skip
        key = json.loads(json.dumps(key))  # as it reads back from the file (tuples -> lists)
        cached = _load(model_dir / "diagnostics.json", key)
        if cached is not None:
            results[name] = {**cached, "reused": True}
            continue
        say(f"diagnostics: {name} ({', '.join(which)})")
        t0 = time.perf_counter()
        vocab = model.cfg.vocab_size
        fits = [f for f in s.facts if 4 * f <= seq_len and 2 * f + 2 <= vocab]  # MQAR's limits
        facts = fits if spec.startswith("mqar") else None
        with torch.no_grad():
            result = run_diagnostics(model, spec, seq_len, s.n_samples, s.seed, which, facts, s.bins,
                                     s.batch_size)  # fmt: skip
        result["plan"] = which
        result["wall_s"] = time.perf_counter() - t0
        _save({"key": key, "result": result}, model_dir / "diagnostics.json")
        results[name] = {**result, "reused": False}
    return results


def study_sections(results: dict[str, dict[str, Any]], out_dir: str | os.PathLike) -> list[Any]:
    """The report's Diagnostics subsections (``attnlab.report.Section``), plots written into
    ``out_dir``: what is measured and where it ran, then one subsection per diagnostic."""
    from ..report import Section, Table
    from .section import _fmt

    out_dir = Path(out_dir)
    plots = write_plots(results, out_dir)
    ran = {w: [n for n, r in results.items() if w in r.get("plan", [])] for w in
           ("capacity", "forgetting", "selection", "attribution")}  # fmt: skip
    wall = sum(r.get("wall_s", 0.0) for r in results.values() if not r.get("reused"))
    first = next(iter(results.values()))["settings"]
    reused = (
        " (some results reused from an earlier run)" if any(r.get("reused") for r in results.values()) else ""
    )
    where = (
        f"Probes: `{first['spec']}` at {first['seq_len']} tokens, {first['n_samples']} samples per setting. "
        "To fit the study's time budget, capacity and forgetting ran on every model, the selection audit "
        f"on the models with sparse layers ({', '.join(ran['selection']) or 'none'}) and layer attribution "
        f"on the hybrids ({', '.join(ran['attribution']) or 'none'}). Diagnostics took {wall:.0f} s in this "
        f"run{reused}."
    )
    sections = [Section("What the diagnostics measure", paragraphs=[INTRO, where])]
    captions = {
        "capacity": "recall vs facts stored; legend: cache bytes per sequence at the probe length, and D_k",
        "forgetting": "recall vs distance from the fact to its query",
        "horizons": "half-lives of linear layers' decays (log10 tokens); dotted line: the probe length",
        "selection": "fact position kept by a sparse layer; recall when kept vs pruned",
        "attribution": "recall with one layer's mixer output zeroed; dashed: intact",
    }
    for key, title, header, rows in tables(results):
        sec = Section(title)
        if key in plots:
            sec.images.append((out_dir / plots[key], captions[key]))
        sec.tables.append(Table(header, [[_fmt(c) for c in row] for row in rows]))
        if key == "selection":
            sec.paragraphs.append(
                "`kept`: fraction of answer positions whose fact position the layer attends to (DSA: in "
                "its indexer's top-k, recomputed from the layer's input; W: inside window + sinks); "
                "`chance`: the same for a random choice of that many positions. A fact pruned by every "
                "sparse layer can only reach the query through other positions that copied it."
            )
        sections.append(sec)
    return sections


def study_diagnostics(
    out_dir: str | os.PathLike,
    names: Sequence[str],
    tasks: Sequence[str],
    seq_len: int,
    settings: StudyDiagnosticsSettings | None = None,
) -> list[Any]:
    """Run the study's diagnostics (progress on stderr) and return the report's Diagnostics
    subsections: ``write_report(..., diagnostics=study_diagnostics(out, s.models, s.tasks, s.train_len))``."""

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = run_study_diagnostics(out_dir, names, tasks, seq_len, settings, say)
    if not results:
        from ..report import Section

        why = f"No diagnostics: they probe with an MQAR or needle task; this study has {', '.join(tasks)}."
        return [Section("What the diagnostics measure", paragraphs=[INTRO, why])]
    return study_sections(results, out_dir)


def _load(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data["result"] if data.get("key") == key else None


def _save(obj: dict[str, Any], path: Path) -> None:
    atomic_write_json(path, obj)
