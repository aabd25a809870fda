"""Score a model on recall tasks: the ``evaluate`` API and the ``attnlab eval`` command.

Every task is scored on a fixed evaluation set (seeded, disjoint from the training streams)
at each requested length — lengths beyond the training length included — and, for tasks
with a ``depth`` option (needle, passkey), at each requested needle depth. Per
(task, length, depth) the results hold:

- ``accuracy``: teacher-forced next-token accuracy at the target positions;
- ``exact_match``: fraction of samples with every target position right (the same event as
  greedy decoding reproducing the whole answer);
- ``loss``: mean cross-entropy at the target positions (nats; ``bits_per_token`` = loss / ln 2,
  bits per byte for the byte-level tasks);
- ``score`` (MRCR only): the answer decoded greedily, scored with ``mrcr_score``
  (``difflib.SequenceMatcher`` ratio, as OpenAI's grader does), averaged.

Tasks that read the text corpus are scored on its validation split unless the spec names a
split (``evaluation_task``). The results JSON is written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._io import atomic_write_text
from .tasks import IGNORE, Task, corpus_fingerprint, make_task, mrcr_score, parse_task_spec


@torch.no_grad()
def score_task(
    model: nn.Module,
    task: Task,
    n_samples: int = 256,
    seed: int = 0,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    amp: bool = False,
    decode: bool = True,
) -> dict[str, float]:
    """Score ``model`` on ``n_samples`` evaluation samples of ``task``. ``decode=False``
    skips greedy decoding (MRCR's ``score``), keeping only teacher-forced metrics."""
    if n_samples < 1 or batch_size < 1:
        raise ValueError(
            f"n_samples and batch_size: expected positive integers, got {n_samples}, {batch_size}"
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens_all, targets_all = task.eval_batch(n_samples, seed)  # (N, T), (N, T)
    loss_sum, correct, counted, exact, ratio_sum = 0.0, 0, 0, 0, 0.0
    try:
        for start in range(0, n_samples, batch_size):
            tokens = tokens_all[start : start + batch_size].to(device)  # (b, T)
            targets = targets_all[start : start + batch_size].to(device)  # (b, T)
            logits = _forward(model, tokens, amp)  # (b, T, V)
            mask = targets != IGNORE  # (b, T)
            loss_sum += float(
                F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
            )
            hit = (logits.argmax(-1) == targets) & mask  # (b, T)
            correct += int(hit.sum())
            counted += int(mask.sum())
            exact += int((hit.sum(1) == mask.sum(1)).sum())
            if decode and task.scoring == "ratio":
                ratio_sum += _ratio_scores(model, task, tokens, amp)
    finally:
        model.train(was_training)
    counted = max(counted, 1)
    out = {
        "accuracy": correct / counted,
        "exact_match": exact / n_samples,
        "loss": loss_sum / counted,
        "bits_per_token": loss_sum / counted / math.log(2),
        "n_samples": n_samples,
    }
    if decode and task.scoring == "ratio":
        out["score"] = ratio_sum / n_samples
    return out


def evaluation_task(spec: str, seq_len: int, vocab_size: int) -> Task:
    """The task a spec names, as evaluated: tasks that read the text corpus (``text``, and
    ``needle`` with a text haystack) use its validation split unless the spec sets ``split``."""
    task = make_task(spec, seq_len, vocab_size)
    if hasattr(task, "split") and "split" not in parse_task_spec(spec)[1]:
        task = task.with_options(split="validation")
    return task


def _forward(model: nn.Module, tokens: torch.Tensor, amp: bool) -> torch.Tensor:
    with torch.autocast(device_type=tokens.device.type, dtype=torch.bfloat16, enabled=amp):
        return model(tokens).float()  # (B, T, V)


def _ratio_scores(model: nn.Module, task: Any, tokens: torch.Tensor, amp: bool) -> float:
    """Sum over the batch of ``mrcr_score(greedy answer, true answer)``. Decoding re-runs the
    full forward per new token (answers are a few tokens; no cache needed)."""
    start, end = task.answer_span()
    seq = tokens[:, :start]  # (b, start)
    for _ in range(end - start):
        nxt = _forward(model, seq, amp)[:, -1].argmax(-1, keepdim=True)  # (b, 1)
        seq = torch.cat([seq, nxt], dim=1)  # (b, t + 1)
    outputs, answers = seq[:, start:].tolist(), tokens[:, start:end].tolist()
    prefix_len = getattr(task, "prefix_len", 0)
    return sum(mrcr_score(o, a, a[:prefix_len]) for o, a in zip(outputs, answers, strict=True))


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """A model from a checkpoint (or run) directory, in eval mode, and what is known about
    its training (``trainer_state.json``; empty for a plain ``save_pretrained`` directory)."""
    from .model import HybridLM
    from .train import find_checkpoint

    ckpt = find_checkpoint(path)
    model = HybridLM.from_pretrained(ckpt)
    state_file = ckpt / "trainer_state.json"
    info = json.loads(state_file.read_text()) if state_file.is_file() else {}
    info["checkpoint"] = str(ckpt)
    return model.to(device).eval(), info


def evaluate(
    model: nn.Module,
    tasks: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float] | None = None,
    n_samples: int = 256,
    seed: int = 0,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    amp: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Score every task spec at every length (and depth, for tasks that have one).
    Returns one record per (task, length, depth): the spec, its full options and the metrics."""
    vocab = _vocab_size(model)
    if not tasks:
        raise ValueError("tasks: expected at least one task spec")
    if not lengths or any(int(L) < 1 for L in lengths):
        raise ValueError(f"lengths: expected positive integers, got {list(lengths)}")
    records = []
    for spec in tasks:
        for length in lengths:
            task = evaluation_task(spec, int(length), vocab)
            task_depths = [None]
            if depths is not None and hasattr(task, "depth"):
                task_depths = [float(d) for d in depths]
            for depth in task_depths:
                variant = task if depth is None else task.with_options(depth=depth)
                metrics = score_task(model, variant, n_samples, seed, batch_size, device, amp)
                record = {
                    "task": variant.name,
                    "spec": spec,
                    "length": int(length),
                    "depth": getattr(variant, "depth", None),
                    **metrics,
                    "options": variant.options(),
                }
                records.append(record)
                if progress:
                    where = f" depth {record['depth']}" if record["depth"] is not None else ""
                    extra = f" score {metrics['score']:.3f}" if "score" in metrics else ""
                    print(
                        f"{spec} @ {length}{where}: accuracy {metrics['accuracy']:.3f} "
                        f"exact {metrics['exact_match']:.3f}{extra}",
                        file=sys.stderr,
                        flush=True,
                    )
    return records


def _vocab_size(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "vocab_size"):
        raise ValueError("model: expected a HybridLM (with .cfg or .config holding vocab_size)")
    return int(cfg.vocab_size)


def write_results(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------- CLI
def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a checkpoint on recall tasks, lengths and depths",
        description="Score a checkpoint on recall tasks at chosen lengths (beyond training too) and needle "
        "depths; writes a results JSON (one record per task, length, depth).",
    )
    p.add_argument("checkpoint", help="a run directory (uses its checkpoint/) or a checkpoint directory")
    p.add_argument(
        "--task",
        action="append",
        metavar="SPEC",
        help="task spec, repeatable (default: the tasks the run was trained on)",
    )
    p.add_argument("--lengths", help="comma-separated sequence lengths (default: the training length)")
    p.add_argument(
        "--depths", help="comma-separated needle depths in [0, 1] for needle/passkey (default 0,0.5,1)"
    )
    p.add_argument("--samples", type=int, default=256, help="samples per (task, length, depth); default 256")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--out", help="results JSON (default: eval.json next to the checkpoint, in the run directory)"
    )
    p.set_defaults(func=_cli_eval)


def _cli_eval(args: argparse.Namespace) -> int:
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    model, info = load_model(args.checkpoint, device)
    trained = info.get("train_config", {})
    tasks = args.task or trained.get("tasks")
    if not tasks:
        raise ValueError("--task: this checkpoint records no training tasks; name at least one")
    lengths = _floats(args.lengths, "--lengths", int) if args.lengths else [trained.get("seq_len", 64)]
    depths = _floats(args.depths, "--depths", float) if args.depths else [0.0, 0.5, 1.0]
    records = evaluate(
        model,
        tasks,
        lengths,
        depths,
        args.samples,
        args.seed,
        args.batch_size,
        device,
        amp=device.type == "cuda",
        progress=True,
    )
    payload = {
        "checkpoint": info["checkpoint"],
        "step": info.get("step"),
        "trained_on": {"tasks": trained.get("tasks"), "seq_len": trained.get("seq_len")},
        "model_config": json.loads((Path(info["checkpoint"]) / "config.json").read_text()),
        "seed": args.seed,
        "samples": args.samples,
        "corpus_fingerprint": corpus_fingerprint()
        if any(r["task"] == "text" or r["options"].get("haystack") == "text" for r in records)
        else None,
        "results": records,
    }
    ckpt = Path(info["checkpoint"])
    # default: the trainer's run directory (checkpoint/'s parent holds run.json), else the
    # checkpoint directory itself, never an unrelated parent directory
    default_dir = ckpt.parent if (ckpt.parent / "run.json").is_file() else ckpt
    out = Path(args.out) if args.out else default_dir / "eval.json"
    write_results(out, payload)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _floats(text: str, flag: str, kind: type) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
