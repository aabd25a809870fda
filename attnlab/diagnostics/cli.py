"""``attnlab diagnose CHECKPOINT --out DIR``: every diagnostic that applies to a checkpoint,
written as diagnostics.json, PNG plots and diagnostics.md (all-or-nothing: the files appear
together, by renaming a finished staging directory into place)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .run import DIAGNOSTICS, run_diagnostics
from .section import diagnostics_section
from .study import probe_spec


def default_spec(info: dict[str, Any], vocab_size: int) -> str:
    """The probe task the study's diagnostics would pick from the checkpoint's training tasks
    (:func:`attnlab.diagnostics.study.probe_spec`: its MQAR, else needle), else MQAR with 4 pairs."""
    return probe_spec(info.get("train_config", {}).get("tasks") or [], vocab_size) or "mqar:num_pairs=4"


def study_train_config(checkpoint: Path) -> dict[str, Any]:
    """``{"tasks", "seq_len"}`` of the ``attnlab compare`` study holding ``checkpoint``
    (``OUT/models/NAME/checkpoint``, settings in ``OUT/study.json``); empty if there is none."""
    for parent in list(checkpoint.resolve().parents)[:3]:
        path = parent / "study.json"
        if path.is_file():
            try:
                settings = json.loads(path.read_text()).get("settings", {})
            except json.JSONDecodeError:
                return {}
            return {"tasks": settings.get("tasks") or [], "seq_len": settings.get("train_len")}
    return {}


def write_outputs(result: dict[str, Any], label: str, out: Path, force: bool) -> Path:
    """Write diagnostics.json, the PNGs and diagnostics.md into ``out`` atomically."""
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    old = None
    try:
        (staging / "diagnostics.json").write_text(json.dumps(result, indent=1) + "\n")
        md, _ = diagnostics_section({label: result}, staging, heading=f"# Diagnostics: {label}")
        (staging / "diagnostics.md").write_text(md)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{staging.name[-8:]}")
            out.rename(old)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():
            old.rename(out)  # the new output did not land: put the previous one back
        raise
    if old is not None:
        shutil.rmtree(old)
    return out


def _check_out(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"--out: {out} exists and is not a directory")
        if any(out.iterdir()):
            if not force:
                raise FileExistsError(f"--out: {out} is not empty; pass --force to replace it")
            if not (out / "diagnostics.json").is_file():  # --force replaces only an earlier output of ours
                raise FileExistsError(
                    f"--out: {out} is not empty and holds no diagnostics.json (not an attnlab diagnose "
                    f"output); refusing to replace it, even with --force; choose another --out"
                )


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--facts: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--facts: expected positive integers, got {text!r}")
    return values


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from ..evaluate import load_model

    out = Path(args.out)
    _check_out(out, args.force)  # refuse before spending minutes
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    model, info = load_model(args.checkpoint, device)
    if "train_config" not in info:  # a model of an `attnlab compare` study: its tasks and length
        info["train_config"] = study_train_config(Path(info["checkpoint"]))
    spec = args.task or default_spec(info, model.cfg.vocab_size)
    seq_len = args.seq_len or info.get("train_config", {}).get("seq_len") or 64
    which = None if not args.only else [w.strip() for w in args.only.split(",") if w.strip()]
    result = run_diagnostics(
        model,
        spec,
        int(seq_len),
        args.samples,
        args.seed,
        which,
        _ints(args.facts) if args.facts else None,
        args.bins,
        args.batch_size,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    result["checkpoint"] = info["checkpoint"]
    result["step"] = info.get("step")
    label = (
        Path(info["checkpoint"]).parent.name
        if Path(info["checkpoint"]).name == "checkpoint"
        else Path(info["checkpoint"]).name
    )
    write_outputs(result, label or model.cfg.layer_pattern, out, args.force)
    for key, value in result["summary"].items():
        print(f"{key}: {value}")
    print(f"wrote {out}/diagnostics.json, diagnostics.md and plots", file=sys.stderr)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "diagnose",
        help="why a checkpoint forgets: capacity, forgetting, selection audit, layer attribution",
        description="Run every diagnostic that applies to a checkpoint (capacity curve, forgetting curve and "
        "memory horizons, selection audit of W/D layers, layer attribution) and write diagnostics.json, "
        "PNG plots and diagnostics.md into --out.",
    )
    p.add_argument("checkpoint", help="a run directory (uses its checkpoint/) or a save_pretrained directory")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent unless --force)")
    p.add_argument("--force", action="store_true", help="replace an earlier diagnose output in --out")
    p.add_argument(
        "--task", help="probe task spec, mqar or needle (default: the run's first mqar/needle task)"
    )
    p.add_argument(
        "--seq-len", type=int, help="context of the probes (default: the training length, else 64)"
    )
    p.add_argument("--facts", help="comma-separated fact counts for the capacity curve (default 1,2,4,...)")
    p.add_argument("--samples", type=int, default=128, help="probe samples per setting (default 128)")
    p.add_argument("--bins", type=int, default=8, help="distance bins of the forgetting curve (default 8)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help=f"comma-separated subset of {','.join(DIAGNOSTICS)}")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_diagnose)
