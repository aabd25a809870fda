"""Train a HybridLM on recall tasks: the ``Trainer`` API and the ``attnlab train`` command.

One code path for one process and for several (``torchrun``): the model is built for one
device and DDP or FSDP2 is applied from outside it, in ``_parallelize`` only. Every rank
draws the same global batch from the same seeded task streams and keeps its own rows, so
the data, the checkpoint and a resumed run do not depend on the number of processes.

A run directory holds::

    run.json          model and training configuration (written once, at the start)
    metrics.jsonl     one JSON object per logged step / evaluation
    checkpoint/       model.safetensors, config.json, optimizer.safetensors, optimizer.json,
                      rng.json (torch, numpy, python and every task stream), trainer_state.json

A checkpoint is written to a temporary directory, fsync'ed, then renamed into place; the
previous one is kept (as ``checkpoint.old``) until the new one is complete, so a crash at
any moment leaves one complete checkpoint. On the CPU, ``resume`` continues bit-exactly:
the losses after resuming equal those of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ._io import atomic_write_text, fsync_path
from .config import ModelConfig
from .evaluate import evaluation_task, score_task
from .model import HybridLM
from .tasks import IGNORE, TaskMixture, make_task, parse_task_spec

CHECKPOINT = "checkpoint"
_OLD = "checkpoint.old"
# fields of TrainConfig that may change when a run is resumed (they do not change the math
# of the steps already taken; `steps` reshapes the cosine tail, which is what a user wants)
_RESUMABLE_CHANGES = {
    "steps",
    "eval_every",
    "eval_samples",
    "save_every",
    "log_every",
    "stop_at",
    "device",
    "threads",
}


class TrainingDiverged(RuntimeError):
    """Raised when the loss or the gradient norm stops being finite."""


@dataclasses.dataclass
class TrainConfig:
    """How to train. ``tasks`` are task specs (``"mqar:num_pairs=4,weight=2"``), all at
    ``seq_len``; ``batch_size`` is the global batch (split across processes)."""

    tasks: list[str] = dataclasses.field(default_factory=lambda: ["mqar:num_pairs=4"])
    seq_len: int = 64
    batch_size: int = 64
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 50
    weight_decay: float = 0.1  # on matrices only (embeddings and linear weights), not norms/biases
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    eval_every: int = 100  # 0 = only at the end
    eval_samples: int = 256
    save_every: int = 200  # 0 = only at the end
    log_every: int = 10
    seed: int = 0
    stop_at: float | None = None  # stop early once every task's eval accuracy reaches this
    device: str = "auto"  # "auto" = cuda if available, else cpu
    amp: bool = True  # bf16 autocast, on CUDA only
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2, torch.distributed.fsdp.fully_shard)
    threads: int | None = None  # torch CPU threads per process; None = torch's default

    def validate(self) -> TrainConfig:
        if not self.tasks:
            raise ValueError("tasks: expected at least one task spec")
        for name in ("seq_len", "batch_size", "steps", "eval_samples", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected in [0, 1], got {self.min_lr_ratio}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel: expected 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: expected a positive integer, got {self.threads}")
        if self.stop_at is not None and not 0 < self.stop_at <= 1:
            raise ValueError(f"stop_at: expected an accuracy in (0, 1], got {self.stop_at}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train config: unknown field(s) {', '.join(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine to
    ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """Trains ``HybridLM(model_config)`` on ``train_config.tasks``.

    ``run_dir`` None keeps everything in memory (no checkpoints, no metrics file).
    ``resume=True`` continues the run in ``run_dir`` from its last checkpoint;
    ``force=True`` deletes an existing attnlab run directory first. Without either, an
    existing non-empty ``run_dir`` is an error: a run is never overwritten silently.
    """

    def __init__(
        self,
        model_config: ModelConfig | None = None,
        train_config: TrainConfig | None = None,
        run_dir: str | os.PathLike | None = None,
        resume: bool = False,
        force: bool = False,
        progress: bool = True,
    ):
        if resume and force:
            raise ValueError(
                "resume and force: pass one, not both (force deletes the run that resume continues)"
            )
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if resume:
            if self.run_dir is None:
                raise ValueError("resume: needs a run_dir")
            model_config, train_config = _resumed_configs(self.run_dir, model_config, train_config)
        if model_config is None:
            raise ValueError("model_config: expected a ModelConfig")
        self.model_config = model_config.validate()
        self.cfg = (train_config or TrainConfig()).validate()
        self.progress = progress

        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        self.rank, self.world = _init_distributed(self.cfg.device)
        self.device = _pick_device(self.cfg.device, self.world)
        self.amp = self.cfg.amp and self.device.type == "cuda"
        if self.cfg.batch_size % self.world:
            raise ValueError(f"batch_size: {self.cfg.batch_size} does not split over {self.world} processes")

        specs = [parse_task_spec(s) for s in self.cfg.tasks]
        self.tasks = [make_task(s, self.cfg.seq_len, self.model_config.vocab_size) for s in self.cfg.tasks]
        self.task_labels = _labels(self.cfg.tasks)
        # corpus-reading tasks are evaluated on validation text (see evaluate.evaluation_task)
        self.eval_tasks = [
            evaluation_task(s, self.cfg.seq_len, self.model_config.vocab_size) for s in self.cfg.tasks
        ]
        self.data = TaskMixture(self.tasks, [w for _, _, w in specs], seed=self.cfg.seed)

        _seed_everything(self.cfg.seed)
        self.model: nn.Module = HybridLM(self.model_config).to(self.device)
        self.wrapped = _parallelize(self.model, self.cfg.parallel, self.world, self.device)
        self.optimizer = _adamw(self.model, self.cfg, fused=self.device.type == "cuda")
        self.step = 0
        self.elapsed = 0.0
        self.losses: list[float] = []  # training loss of every step taken by this object
        self.last_eval: dict[str, dict[str, float]] = {}

        if self.run_dir is not None:
            if resume:
                self._load(find_checkpoint(self.run_dir))
            else:
                self._prepare_run_dir(force)

    # ------------------------------------------------------------------ training
    def fit(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to ``train_config.steps`` (or to ``until_step``, to stop early and resume
        later); evaluate and checkpoint on the way and at the end. Returns a summary."""
        end = self.cfg.steps if until_step is None else min(until_step, self.cfg.steps)
        bar = _Progress(end, enabled=self.progress and self.rank == 0)
        last_saved = self.step
        tokens_since, t_log = 0, time.perf_counter()
        stop_reason = "steps"
        try:
            while self.step < end:
                t0 = time.perf_counter()
                loss, grad_norm, lr = self._train_step()
                self.elapsed += time.perf_counter() - t0
                self.losses.append(loss)
                tokens_since += self.cfg.batch_size * self.cfg.seq_len
                if self.step % self.cfg.log_every == 0 or self.step == end:
                    now = time.perf_counter()
                    rate = tokens_since / max(now - t_log, 1e-9)
                    record = {
                        "step": self.step,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": rate,
                        "elapsed_s": self.elapsed,
                    }
                    self._log(record)
                    bar.update(self.step, loss, rate, self.elapsed)
                    tokens_since, t_log = 0, now
                if (
                    self.cfg.eval_every and self.step % self.cfg.eval_every == 0
                ) or self.step == self.cfg.steps:
                    self.evaluate()
                    bar.note(self.step, self.last_eval)
                    if self._reached_target():
                        stop_reason = f"every task reached accuracy {self.cfg.stop_at}"
                        break
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save()
                    last_saved = self.step
        except KeyboardInterrupt:
            if self.world == 1 and self.step > last_saved:
                self.save()
            bar.close()
            raise
        if self.step > last_saved:
            self.save()
        bar.close()
        summary = {
            "step": self.step,
            "loss": self.losses[-1] if self.losses else None,
            "eval": self.last_eval,
            "elapsed_s": self.elapsed,
            "stopped": stop_reason,
        }
        if self.rank == 0 and self.progress:
            print(f"done: step {self.step}, {stop_reason}, {self.elapsed:.1f} s of training", file=sys.stderr)
        return summary

    def _train_step(self) -> tuple[float, float, float]:
        """One optimizer step on one global batch; returns (loss, grad norm, lr)."""
        tokens, targets, _ = self.data.batch(self.cfg.batch_size)  # (B, T), (B, T): same on every rank
        rows = self.cfg.batch_size // self.world
        tokens = tokens[self.rank * rows : (self.rank + 1) * rows].to(self.device)  # (B / world, T)
        targets = targets[self.rank * rows : (self.rank + 1) * rows].to(self.device)  # (B / world, T)
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.wrapped(tokens)  # (B / world, T, V)
        loss_sum = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        # normalize by the GLOBAL count of target tokens: DDP/FSDP average gradients over
        # ranks, so scaling by `world` makes the update equal to the single-process one
        stats = torch.stack([loss_sum.detach(), (targets != IGNORE).sum().to(loss_sum.dtype)])
        if self.world > 1:
            dist.all_reduce(stats)
        count = stats[1].clamp(min=1)
        loss = float(stats[0] / count)
        if not math.isfinite(loss):
            self._diverged(f"loss is {loss}")
        self.optimizer.zero_grad(set_to_none=True)
        (loss_sum * (self.world / count)).backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not math.isfinite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm}")
        self.optimizer.step()
        self.step += 1
        return loss, grad_norm, lr

    def _diverged(self, what: str) -> None:
        where = "no checkpoint was written (run_dir is None)"
        if self.run_dir is not None:
            try:
                ckpt = find_checkpoint(self.run_dir)
                step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
                where = f"the last good checkpoint is {ckpt} (step {step}), left untouched"
            except FileNotFoundError:
                where = f"no checkpoint had been written yet in {self.run_dir}"
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: {what}; stopped without updating the weights. "
            f"{where}. Try a lower --lr or a stronger --grad-clip; non-finite values in the first steps "
            f"point at the model's own forward/backward."
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Teacher-forced accuracy / exact match / loss of every training task on its fixed
        evaluation set (``eval_samples`` samples at ``seq_len``); logged and returned."""
        self.last_eval = {
            label: score_task(
                self.model,
                task,
                self.cfg.eval_samples,
                seed=self.cfg.seed,
                batch_size=self.cfg.batch_size,
                device=self.device,
                amp=self.amp,
                decode=False,
            )
            for label, task in zip(self.task_labels, self.eval_tasks, strict=True)
        }
        self._log({"step": self.step, "eval": self.last_eval})
        return self.last_eval

    def _reached_target(self) -> bool:
        if self.cfg.stop_at is None or not self.last_eval:
            return False
        return all(r["accuracy"] >= self.cfg.stop_at for r in self.last_eval.values())

    # ------------------------------------------------------------------ files
    def _prepare_run_dir(self, force: bool) -> None:
        assert self.run_dir is not None
        if self.rank == 0:
            if self.run_dir.exists() and (not self.run_dir.is_dir() or any(self.run_dir.iterdir())):
                if not force:
                    raise FileExistsError(
                        f"run directory {self.run_dir} exists and is not empty; pass --resume to continue it "
                        f"or --force to delete it and start over"
                    )
                if not (self.run_dir / "run.json").is_file():
                    raise FileExistsError(
                        f"run directory {self.run_dir} is not an attnlab run (no run.json); refusing to "
                        f"delete it even with --force; choose another directory"
                    )
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run = {"model_config": self.model_config.to_dict(), "train_config": self.cfg.to_dict()}
            atomic_write_text(self.run_dir / "run.json", json.dumps(run, indent=2) + "\n")
        _barrier(self.world)

    def _log(self, record: dict[str, Any]) -> None:
        if self.run_dir is None or self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self) -> Path | None:
        """Write a checkpoint of the current step into ``run_dir/checkpoint`` (atomically)."""
        if self.run_dir is None:
            return None
        model_sd, optim_sd = _full_state_dicts(self.model, self.optimizer, self.cfg.parallel, self.world)
        if self.rank == 0:
            state = {
                "step": self.step,
                "elapsed_s": self.elapsed,
                "world_size": self.world,
                "train_config": self.cfg.to_dict(),
                "last_eval": self.last_eval,
            }
            _write_checkpoint(
                self.run_dir, model_sd, optim_sd, self.model_config.to_json(), _rng_state(self.data), state
            )
        _barrier(self.world)
        return self.run_dir / CHECKPOINT

    def _load(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        model_sd = load_file(str(ckpt / "model.safetensors"))
        optim_sd = _unflatten(
            json.loads((ckpt / "optimizer.json").read_text()), load_file(str(ckpt / "optimizer.safetensors"))
        )
        _set_full_state_dicts(self.model, self.optimizer, model_sd, optim_sd, self.cfg.parallel, self.world)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        self.last_eval = state.get("last_eval", {})
        _set_rng_state(json.loads((ckpt / "rng.json").read_text()), self.data)
        if self.rank == 0:  # drop metrics logged after this checkpoint (they will be redone)
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            run = {"model_config": self.model_config.to_dict(), "train_config": self.cfg.to_dict()}
            atomic_write_text(self.run_dir / "run.json", json.dumps(run, indent=2) + "\n")
        _barrier(self.world)


# ---------------------------------------------------------------------- parallelism (the one place)
def _init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size); joins the process group (nccl on GPU, gloo on CPU) under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if on_gpu:
            local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl", device_id=local)
        else:
            dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def _pick_device(name: str, world: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' asked for, but torch sees no CUDA GPU")
        if world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _parallelize(model: nn.Module, mode: str, world: int, device: torch.device) -> nn.Module:
    """Apply DDP or FSDP2 from outside the model (torchtitan style); identity for one process.
    Returns the module to call for training forwards."""
    if world == 1:
        return model
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for child in model.modules():  # shard each block of every layer list, then the root
            if isinstance(child, nn.ModuleList):
                for block in child:
                    fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer, mode: str, world: int
) -> tuple[dict, dict]:
    """Unsharded model and optimizer state (only rank 0's copy is complete under FSDP)."""
    if world > 1 and mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(
            model, optimizer, options=opts
        )
    return model.state_dict(), optimizer.state_dict()


def _set_full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict, mode: str, world: int
) -> None:
    if world > 1 and mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
        return
    model.load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _adamw(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


# ---------------------------------------------------------------------- checkpoints
def find_checkpoint(path: str | os.PathLike) -> Path:
    """The complete checkpoint for ``path``: a checkpoint directory itself, or a run
    directory's ``checkpoint`` (or ``checkpoint.old`` if a save was cut off mid-rename)."""
    path = Path(path)
    for candidate in (path, path / CHECKPOINT, path / _OLD):
        if (candidate / "model.safetensors").is_file() and (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no checkpoint in {path} (expected model.safetensors and config.json, or a run directory)"
    )


def _write_checkpoint(
    run_dir: Path, model_sd: dict, optim_sd: dict, config_json: str, rng: dict, state: dict
) -> None:
    from safetensors.torch import save_file

    final, old = run_dir / CHECKPOINT, run_dir / _OLD
    _remove_stale_staging(run_dir)
    tmp = run_dir / f".{CHECKPOINT}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        save_file(_unshared(model_sd), str(tmp / "model.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        optim_meta = _flatten(optim_sd, "optim", tensors)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(optim_meta))
        (tmp / "config.json").write_text(config_json + "\n")
        (tmp / "rng.json").write_text(json.dumps(rng))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint is untouched
        raise
    if old.exists():
        if final.exists():
            shutil.rmtree(old)  # left over from an earlier save; `final` is complete
        else:
            old.rename(final)  # a save was cut off between its two renames: `old` is the last good one
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_path(run_dir)
    if old.exists():
        shutil.rmtree(old)


def _remove_stale_staging(run_dir: Path) -> None:
    """Delete staging directories of saves that can no longer finish: this process's own
    (an earlier failed save) and those of processes that no longer exist (killed mid-save)."""
    for d in run_dir.glob(f".{CHECKPOINT}.tmp-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
        except ValueError:
            continue  # not a name this module writes
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _unshared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies; tensors sharing storage (tied embeddings) become separate,
    which safetensors requires (loading ties them again through load_state_dict)."""
    out, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().to("cpu").contiguous()
        if v.data_ptr() in seen:
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    return out


def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested state dict by a reference into ``tensors`` (saved
    as safetensors); the rest becomes JSON (dict keys keep their types)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _rng_state(data: TaskMixture) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "data": data.state_dict(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict[str, Any], data: TaskMixture) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(
            torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8)
        )
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    data.load_state_dict(state["data"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _resumed_configs(
    run_dir: Path, model_config: ModelConfig | None, train_config: TrainConfig | None
) -> tuple[ModelConfig, TrainConfig]:
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise FileNotFoundError(f"resume: {run_dir} is not an attnlab run directory (no run.json)")
    find_checkpoint(run_dir)  # a clear error if nothing was saved yet
    run = json.loads(run_file.read_text())
    stored_model = ModelConfig.from_dict(run["model_config"])
    stored_train = TrainConfig.from_dict(run["train_config"])
    if model_config is not None and model_config.to_dict() != stored_model.to_dict():
        diff = [k for k, v in model_config.to_dict().items() if run["model_config"].get(k) != v]
        raise ValueError(f"model_config: differs from the run being resumed in {', '.join(diff)}")
    if train_config is not None:
        new, old = train_config.to_dict(), stored_train.to_dict()
        diff = [k for k in new if new[k] != old.get(k) and k not in _RESUMABLE_CHANGES]
        if diff:
            raise ValueError(
                f"train_config: cannot change {', '.join(diff)} when resuming "
                f"(only {', '.join(sorted(_RESUMABLE_CHANGES))})"
            )
        stored_train = train_config
    return stored_model, stored_train


def _labels(specs: list[str]) -> list[str]:
    labels: list[str] = []
    for spec in specs:
        label = spec.strip()
        while label in labels:
            label += "'"
        labels.append(label)
    return labels


class _Progress:
    """Progress to stderr: one rewritten line on a terminal, plain lines otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = enabled and sys.stderr.isatty()

    def update(self, step: int, loss: float, rate: float, elapsed: float) -> None:
        if not self.enabled:
            return
        line = f"step {step}/{self.total}  loss {loss:.4f}  {rate:,.0f} tok/s  {elapsed:.0f} s"
        if self.tty:
            print("\r" + line.ljust(70), end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def note(self, step: int, results: dict[str, dict[str, float]]) -> None:
        if not self.enabled:
            return
        parts = [f"{name} acc {r['accuracy']:.3f}" for name, r in results.items()]
        prefix = "\n" if self.tty else ""
        print(f"{prefix}eval @ step {step}: " + ", ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- CLI
_MODEL_FLAGS = {"pattern": str, "d_model": int, "n_layers": int, "n_heads": int, "vocab_size": int}


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a small model on recall tasks",
        description="Train a HybridLM on recall tasks; checkpoints and metrics go to RUN_DIR. "
        "Run under torchrun for several processes (DDP, or --fsdp).",
    )
    p.add_argument("run_dir", help="directory for run.json, metrics.jsonl and checkpoint/")
    m = p.add_argument_group("model")
    m.add_argument(
        "--preset", help="a ModelConfig preset name (see `attnlab presets`); flags below override it"
    )
    m.add_argument("--pattern", help="layer pattern, e.g. S, GGGS (without --preset)")
    m.add_argument("--d-model", type=int)
    m.add_argument("--n-layers", type=int)
    m.add_argument("--n-heads", type=int)
    m.add_argument("--vocab-size", type=int, help="default 256 (fits every task)")
    m.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other ModelConfig field, e.g. --set window=32 (repeatable)",
    )
    t = p.add_argument_group("training")
    d = TrainConfig()
    t.add_argument(
        "--task",
        action="append",
        metavar="SPEC",
        help="task spec, repeatable for a mixture: mqar:num_pairs=4,weight=2 (default mqar:num_pairs=4)",
    )
    t.add_argument("--seq-len", type=int, help=f"default {d.seq_len}")
    t.add_argument("--batch-size", type=int, help=f"global batch, default {d.batch_size}")
    t.add_argument("--steps", type=int, help=f"default {d.steps}")
    t.add_argument("--lr", type=float, help=f"default {d.lr}")
    t.add_argument("--warmup-steps", type=int, help=f"default {d.warmup_steps}")
    t.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    t.add_argument("--grad-clip", type=float, help=f"default {d.grad_clip}")
    t.add_argument("--eval-every", type=int, help=f"default {d.eval_every}")
    t.add_argument("--eval-samples", type=int, help=f"default {d.eval_samples}")
    t.add_argument("--save-every", type=int, help=f"default {d.save_every}")
    t.add_argument("--log-every", type=int, help=f"default {d.log_every}")
    t.add_argument("--seed", type=int, help=f"default {d.seed}")
    t.add_argument("--stop-at", type=float, help="stop once every task's eval accuracy reaches this")
    t.add_argument("--device", help="auto (default), cpu, cuda")
    t.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    t.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    t.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    r = p.add_argument_group("run directory")
    r.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its checkpoint")
    r.add_argument("--force", action="store_true", help="delete an existing attnlab run in RUN_DIR first")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cli_train)


def _cli_train(args: argparse.Namespace) -> int:
    train_overrides = {
        "tasks": args.task,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "grad_clip": args.grad_clip,
        "eval_every": args.eval_every,
        "eval_samples": args.eval_samples,
        "save_every": args.save_every,
        "log_every": args.log_every,
        "seed": args.seed,
        "stop_at": args.stop_at,
        "device": args.device,
        "threads": args.threads,
    }
    train_overrides = {k: v for k, v in train_overrides.items() if v is not None}
    if args.no_amp:
        train_overrides["amp"] = False
    if args.fsdp:
        train_overrides["parallel"] = "fsdp"
    if args.resume:
        stored = (
            TrainConfig.from_dict(json.loads((Path(args.run_dir) / "run.json").read_text())["train_config"])
            if (Path(args.run_dir) / "run.json").is_file()
            else None
        )
        train_cfg = dataclasses.replace(stored, **train_overrides) if stored is not None else None
        trainer = Trainer(None, train_cfg, args.run_dir, resume=True, progress=not args.quiet)
    else:
        trainer = Trainer(
            _model_config_from_args(args),
            TrainConfig(**train_overrides),
            args.run_dir,
            force=args.force,
            progress=not args.quiet,
        )
    distributed = dist.is_initialized()
    try:
        summary = trainer.fit()
        if trainer.rank == 0:
            print(json.dumps({"run_dir": str(trainer.run_dir), **summary}))
        if distributed:
            dist.barrier()  # no rank tears the group down while another still uses it
        code = 0
    except TrainingDiverged as e:
        print(f"attnlab train: {e}", file=sys.stderr)
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if distributed:
        _exit_rank(code)
    return code


def _exit_rank(code: int) -> None:
    """End a torchrun rank now, skipping the interpreter's teardown. On CPU (gloo, FSDP2), about one
    run in 40 had a rank abort there with 'terminate called without an active exception' after
    everything was written and the process group destroyed (C++ teardown of a thread still
    joinable; Python showed no frame), so torchrun reported a finished run as failed. Everything
    the run wrote is closed by now (files are written atomically, attnlab._io); output is flushed."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    from .tasks.registry import _parse_value

    overrides: dict[str, Any] = {}
    for name in _MODEL_FLAGS:
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set: expected FIELD=VALUE, got {item!r}")
        overrides[key.strip().replace("-", "_")] = _parse_value(value.strip())
    overrides.setdefault("vocab_size", 256)
    if args.preset:
        return ModelConfig.preset(args.preset, **overrides)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"--set: unknown ModelConfig field(s) {', '.join(unknown)}")
    return ModelConfig(**overrides).validate()
