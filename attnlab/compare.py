"""The study: ``attnlab compare`` — which attention to use, measured.

Trains a small model of every mechanism (``S W M D L G K``) and the hybrid presets
(``minimax-01``, ``qwen3-next``, ``kimi-linear``) at one parameter budget (each model's
SwiGLU width ``d_ff`` is solved so its parameter count matches the budget), on one recall
task mix (MQAR, needle in a haystack, MRCR), scores recall at every context length (the
training length and longer ones), runs the cost lab, and writes ``report.md`` /
``report.html`` with the summary table it also prints.

An output directory holds::

    study.json              the study's settings (its identity)
    models/<name>/checkpoint/   the trained model (save_pretrained; written atomically)
    models/<name>/result.json   training figures + every evaluation record (written last, atomically)
    models/seed-<s>/<name>/     the same for seed s, only when several seeds are asked for
                                (the first seed's models stay in models/<name>/)
    cost.json, cost plots   the cost lab
    summary.json            the numbers of the summary table and the report
    report.md, report.html  the report (the HTML embeds its plots)

With several seeds (``seeds``), every model is trained and scored once per seed and the
tables show the mean recall with the min-max across seeds; the cost lab and the diagnostics
run once (the diagnostics on the first seed's models).

A model whose ``result.json`` exists is never trained again, so an interrupted study
resumes where it stopped. A directory holding a different study is refused unless
``force``. On the CPU, models train in parallel worker processes (one torch thread each:
tiny models use two cores better that way than with two threads in one process).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue as queue_mod
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._format import human_bytes
from .config import LAYER_LETTERS, ModelConfig

# the single-mechanism models, each built from the preset that carries its published shapes
SINGLE_MECHANISMS: dict[str, tuple[str, dict[str, Any]]] = {
    "S": ("llama", {}),
    "W": ("llama", {"pattern": "W"}),
    "M": ("deepseek-v3", {}),
    "D": ("deepseek-v32", {}),
    "L": ("lightning", {}),
    "G": ("gdn", {}),
    "K": ("kda", {}),
}
HYBRIDS = ("minimax-01", "qwen3-next", "kimi-linear")
DEFAULT_MODELS = tuple(SINGLE_MECHANISMS) + HYBRIDS
# Relative training cost per step (measured on a 2-core CPU at the default size); used only to
# order the work (longest first) and to weigh the progress bar's ETA, never in results.
_STEP_COST = {"S": 1.0, "W": 1.0, "M": 1.7, "D": 9.0, "L": 1.0, "G": 2.0, "K": 3.0,
              "minimax-01": 3.0, "qwen3-next": 3.2, "kimi-linear": 5.0}  # fmt: skip
# fields that do not change the study's results: a directory may be resumed with them changed
_NOT_IDENTITY = {"workers", "skip_cost"}
CACHE_CONTEXTS = (1024, 32768, 1048576)  # summary table: cache memory at 1K / 32K / 1M tokens


@dataclasses.dataclass
class StudySettings:
    """Everything that defines a study. The defaults are the CPU study (minutes on 2 cores).

    ``tasks`` are task specs (see :mod:`attnlab.tasks`), trained as one mixture at
    ``train_len`` and each scored at every length in ``lengths`` (needle tasks also at every
    depth in ``depths``). ``param_budget`` None = see :func:`default_budget`; every model's
    ``d_ff`` is then solved to match it.
    ``overrides`` maps a model name to ModelConfig fields set on that model only.
    ``cost`` holds :class:`attnlab.cost.CostSettings` fields (the cost lab's reduced CPU
    setting by default).
    ``seeds`` (two or more) trains and scores every model once per seed (each run exactly as
    ``seed`` would); empty = the single ``seed``. Use one or the other.
    """

    models: tuple[str, ...] = DEFAULT_MODELS
    d_model: int = 32
    n_layers: int = 2  # hybrids take the smallest multiple of their pattern (4; minimax-01: 8)
    vocab_size: int = 256
    param_budget: int | None = None
    window: int = 32  # W layers: shorter than most needle-to-query distances at the eval lengths
    index_topk: int = 32  # D layers: sparse at every eval length
    tasks: tuple[str, ...] = (
        "mqar:num_pairs=4",
        "needle:key_len=2,value_digits=2,weight=2",
        "mrcr:num_topics=4",
    )
    train_len: int = 128
    lengths: tuple[int, ...] = (128, 256, 512)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    steps: int = 550
    batch_size: int = 24
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    eval_samples: int = 32
    seed: int = 0
    seeds: tuple[int, ...] = ()
    device: str = "cpu"
    workers: int | None = None  # None = one per CPU core (max 2) on the CPU, 1 on CUDA
    skip_cost: bool = False
    cost: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {
            "d_model": 64,
            "n_heads": 4,
            "prefill_contexts": [256, 512, 1024, 2048],
            "decode_contexts": [1024, 2048, 4096, 8192, 16384],
            "measure_presets": False,
        }
    )
    overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def validate(self) -> StudySettings:
        from .tasks import make_task

        if not self.models:
            raise ValueError("models: expected at least one model name")
        for name in self.models:
            model_base_config(name, self)  # raises on an unknown name
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models: each model once, got {list(self.models)}")
        for name in ("d_model", "n_layers", "vocab_size", "window", "index_topk", "train_len", "steps",
                     "batch_size", "eval_samples"):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if self.param_budget is not None and (
            not isinstance(self.param_budget, int) or self.param_budget < 1
        ):
            raise ValueError(f"param_budget: expected None or a positive integer, got {self.param_budget!r}")
        if not self.lengths or any(not isinstance(x, int) or x < 1 for x in self.lengths):
            raise ValueError(f"lengths: expected positive integers, got {list(self.lengths)}")
        if any(not 0.0 <= float(d) <= 1.0 for d in self.depths) or not self.depths:
            raise ValueError(f"depths: expected fractions in [0, 1], got {list(self.depths)}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers: expected a positive integer, got {self.workers}")
        if not self.tasks:
            raise ValueError("tasks: expected at least one task spec")
        for spec in self.tasks:  # every task must fit the vocabulary and every length
            for length in sorted({self.train_len, *self.lengths}):
                make_task(spec, length, self.vocab_size)
        if any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in self.seeds):
            raise ValueError(f"seeds (--seeds): expected non-negative integers, got {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds (--seeds): each seed once, got {list(self.seeds)}")
        if self.seeds and self.seed != 0:
            raise ValueError(
                f"seed and seeds: give one or the other, got seed={self.seed} and seeds={list(self.seeds)}"
            )
        if len(self.seeds) == 1:  # one seed is the single-seed study
            self.seed, self.seeds = self.seeds[0], ()
        unknown = sorted(set(self.overrides) - set(self.models))
        if unknown:
            raise ValueError(f"overrides: for model(s) {', '.join(unknown)} not in models")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def identity(self) -> dict[str, Any]:
        """The settings that define the results (what a resumed directory must match). The
        seed list is part of it when several seeds are asked for (absent for a single seed, so
        single-seed directories written before ``seeds`` existed still resume)."""
        return {
            k: v for k, v in self.to_dict().items() if k not in _NOT_IDENTITY and not (k == "seeds" and not v)
        }

    @property
    def run_seeds(self) -> tuple[int, ...]:
        """The seeds the study trains: ``seeds``, or the single ``seed``."""
        return self.seeds or (self.seed,)

    def for_seed(self, seed: int) -> StudySettings:
        """These settings as the single-seed study of ``seed`` (what one run trains with)."""
        return dataclasses.replace(self, seed=seed, seeds=())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudySettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"study config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        d = dict(d)
        if "seed" in d and d.get("seeds"):
            raise ValueError(
                "seed and seeds: give one or the other (--seed for one run, --seeds for several)"
            )
        for k in ("models", "tasks", "lengths", "depths", "seeds"):
            if k in d:
                if isinstance(d[k], str):
                    d[k] = [x.strip() for x in d[k].split(",") if x.strip()]
                d[k] = tuple(d[k])
        if "lengths" in d:
            d["lengths"] = tuple(int(x) for x in d["lengths"])
        if "depths" in d:
            d["depths"] = tuple(float(x) for x in d["depths"])
        if "seeds" in d:
            try:
                d["seeds"] = tuple(int(x) for x in d["seeds"])
            except (TypeError, ValueError):
                raise ValueError(f"seeds (--seeds): expected integers, got {d['seeds']!r}") from None
        if "cost" in d:
            d["cost"] = {**cls().cost, **d["cost"]}
        return cls(**d)


def load_study_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a study config file: JSON (``.json``) or TOML (anything else), holding
    StudySettings fields (``[overrides.<model>]`` and ``[cost]`` tables for the dict fields)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config: {path} is not valid JSON ({e})") from None
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise ValueError(
                    "--config: TOML needs Python >= 3.11 (or `pip install tomli`); use JSON"
                ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config: {path} is not valid TOML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a table/object of StudySettings fields")
    return data


# ----------------------------------------------------------------------------- models
def model_base_config(name: str, s: StudySettings, d_ff: int | None = None) -> ModelConfig:
    """The ModelConfig of study model ``name`` (a mechanism letter or a preset name) at the
    study's width, before its ``d_ff`` is fitted to the budget. A preset whose pattern does
    not tile ``n_layers`` (minimax-01's 8-letter layout) gets the next multiple of its length."""
    from .presets import PRESETS

    if name in SINGLE_MECHANISMS:
        preset, fields = SINGLE_MECHANISMS[name]
    elif name in PRESETS:
        preset, fields = name, {}
    else:
        raise ValueError(
            f"models: unknown model {name!r}; use a mechanism letter ({', '.join(LAYER_LETTERS)}) "
            f"or a preset ({', '.join(PRESETS)})"
        )
    pattern_len = len(fields.get("pattern") or PRESETS[preset]().pattern)
    n_layers = (
        s.n_layers if s.n_layers % pattern_len == 0 else math.ceil(s.n_layers / pattern_len) * pattern_len
    )
    overrides = {
        "d_model": s.d_model,
        "n_layers": n_layers,
        "vocab_size": s.vocab_size,
        "window": s.window,
        "index_topk": s.index_topk,
        **fields,
        **s.overrides.get(name, {}),
    }
    if d_ff is not None:
        overrides["d_ff"] = d_ff
    return ModelConfig.preset(preset, **overrides)


def count_params(cfg: ModelConfig) -> int:
    """Parameters of ``HybridLM(cfg)``, built on the meta device (no memory, no init)."""
    from .model import HybridLM

    with torch.device("meta"):
        return HybridLM(cfg).num_params()


def default_budget(s: StudySettings) -> int:
    """The larger of: the ``S`` model's parameters at the default SwiGLU width (8/3 d_model),
    and the largest model's parameters at ``d_ff = d_model / 2`` (so every model keeps an MLP)."""
    floor = max(count_params(model_base_config(name, s, max(8, s.d_model // 2))) for name in s.models)
    return max(count_params(model_base_config("S", s)), floor)


def fit_to_budget(name: str, s: StudySettings, budget: int) -> ModelConfig:
    """``name``'s config with ``d_ff`` chosen so its parameter count is nearest ``budget``
    (params are linear in ``d_ff``: two meta builds give the slope)."""
    if "d_ff" in s.overrides.get(name, {}):
        return model_base_config(name, s)
    lo, hi = 8, 64
    p_lo = count_params(model_base_config(name, s, lo))
    p_hi = count_params(model_base_config(name, s, hi))
    slope = (p_hi - p_lo) / (hi - lo)
    d_ff = round(lo + (budget - p_lo) / slope)
    if d_ff < lo:
        raise ValueError(
            f"param_budget: {budget:,} parameters is too few for {name} (it has {p_lo:,} with d_ff={lo}); "
            f"raise --param-budget or lower --d-model / --n-layers"
        )
    return model_base_config(name, s, d_ff)


def study_configs(s: StudySettings) -> tuple[int, dict[str, ModelConfig]]:
    """(parameter budget, {model name: ModelConfig with d_ff fitted to it})."""
    budget = s.param_budget or default_budget(s)
    return budget, {name: fit_to_budget(name, s, budget) for name in s.models}


# ----------------------------------------------------------------------------- one model (a worker job)
_PROGRESS_QUEUE: Any = None  # set in worker processes; None = report through the in-process callback


def _init_worker(q: Any, threads: int) -> None:
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = q
    torch.set_num_threads(threads)


def _eval_units(s: StudySettings) -> int:
    """Evaluation calls per model: one per (task, length), and per depth for needle tasks."""
    from .tasks import make_task

    n = 0
    for spec in s.tasks:
        has_depth = hasattr(make_task(spec, s.train_len, s.vocab_size), "depth")
        n += len(s.lengths) * (len(s.depths) if has_depth else 1)
    return n


def train_and_evaluate(
    name: str,
    cfg: ModelConfig,
    s: StudySettings,
    model_dir: str | os.PathLike,
    report: Callable[[str, str, int], None] | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Train model ``name`` on the study's task mix with seed ``s.seed`` (model init, data
    and evaluation sampling), score it at every length (and depth), save
    ``model_dir/checkpoint`` then ``model_dir/result.json`` (both atomically; the result is
    written last, so its presence means the model is finished). ``report(label, kind, n)``
    is told of progress (``label`` defaults to ``name``): ``kind`` "step" (n steps done) or
    "eval" (n evaluations done)."""
    label = label or name
    from .cost import write_json_atomic
    from .evaluate import evaluate
    from .train import TrainConfig, Trainer, TrainingDiverged

    def tell(kind: str, n: int) -> None:
        if _PROGRESS_QUEUE is not None:
            _PROGRESS_QUEUE.put((label, kind, n))
        elif report is not None:
            report(label, kind, n)

    model_dir = Path(model_dir)
    if model_dir.exists():  # an unfinished earlier attempt (no result.json): start it over
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    tc = TrainConfig(
        tasks=list(s.tasks),
        seq_len=s.train_len,
        batch_size=s.batch_size,
        steps=s.steps,
        lr=s.lr,
        weight_decay=s.weight_decay,
        warmup_steps=min(s.warmup_steps, s.steps // 4),
        eval_every=0,
        eval_samples=min(16, s.eval_samples),
        save_every=0,
        log_every=s.steps,
        seed=s.seed,
        device=s.device,
    )
    trainer = Trainer(cfg, tc, run_dir=None, progress=False)
    chunk = max(1, s.steps // 50)
    diverged = None
    try:
        for until in range(chunk, s.steps + chunk, chunk):
            trainer.fit(until_step=min(until, s.steps))
            tell("step", trainer.step)
    except TrainingDiverged as e:  # scored as it stands (the last good weights), and reported
        diverged = str(e)
        tell("step", s.steps)
    train_wall, train_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    model = trainer.model
    records: list[dict[str, Any]] = []
    done = 0
    for spec in s.tasks:
        for length in s.lengths:
            got = evaluate(
                model, [spec], [length], list(s.depths), n_samples=s.eval_samples, seed=s.seed,
                batch_size=min(32, s.eval_samples), device=trainer.device, amp=trainer.amp,
            )  # fmt: skip
            records += got
            done += len(got)
            tell("eval", done)
    model.save_pretrained(model_dir / "checkpoint")
    result = {
        "name": name,
        "seed": s.seed,
        "model_config": cfg.to_dict(),
        "pattern": cfg.layer_pattern,
        "params": model.num_params(),
        "d_ff": cfg.ff_dim,
        "train": {
            "steps": trainer.step,
            "diverged": diverged,
            "final_loss": trainer.losses[-1] if trainer.losses else None,
            "loss_curve": trainer.losses[:: max(1, len(trainer.losses) // 100)],
            "wall_s": train_wall,
            "cpu_s": train_cpu,
        },
        "eval_wall_s": time.perf_counter() - wall0 - train_wall,
        "cpu_s": time.process_time() - cpu0,
        "results": records,
    }
    write_json_atomic(result, model_dir / "result.json")
    return result


def _job(args: tuple[str, dict, dict, str, str]) -> dict[str, Any]:
    name, cfg_dict, settings_dict, model_dir, label = args
    s = StudySettings.from_dict(settings_dict)
    return train_and_evaluate(name, ModelConfig.from_dict(cfg_dict), s, model_dir, label=label)


@dataclasses.dataclass(frozen=True)
class _Run:
    """One training run of the study: model ``name`` at ``seed``, saved in ``model_dir``."""

    name: str
    seed: int
    label: str  # the progress / reuse label: the model name, with its seed when there are several
    model_dir: Path


def study_runs(s: StudySettings, out: str | os.PathLike) -> list[_Run]:
    """Every (model, seed) run of the study with its directory: ``out/models/<name>`` for the
    first seed, ``out/models/seed-<s>/<name>`` for the others (only with several seeds)."""
    out = Path(out)
    runs = []
    for i, seed in enumerate(s.run_seeds):
        for name in s.models:
            if len(s.run_seeds) == 1:
                runs.append(_Run(name, seed, name, out / "models" / name))
            else:
                model_dir = out / "models" / name if i == 0 else out / "models" / f"seed-{seed}" / name
                runs.append(_Run(name, seed, f"{name} seed {seed}", model_dir))
    return runs


# ----------------------------------------------------------------------------- progress
class StudyProgress:
    """One progress line for the whole study: a bar on a terminal (rewritten in place),
    plain lines otherwise (at most every few seconds), with elapsed time and an ETA from
    the work done so far in this run (reused models count as done but not toward the rate)."""

    def __init__(self, weights: dict[str, float], stream=None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.weights = dict(weights)  # work unit -> weight
        self.done = {k: 0.0 for k in weights}  # work unit -> fraction done
        self.reused = 0.0
        self.t0 = time.perf_counter()
        self.last_print = 0.0
        self.label = ""

    @property
    def total(self) -> float:
        return sum(self.weights.values())

    def mark_reused(self, unit: str) -> None:
        self.done[unit] = 1.0
        self.reused += self.weights[unit]

    def set(self, unit: str, fraction: float, label: str = "") -> None:
        self.done[unit] = min(1.0, max(self.done[unit], fraction))
        self.label = label or self.label
        self.show()

    def show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and not force and now - self.last_print < 5.0:
            return
        self.last_print = now
        done = sum(self.weights[u] * f for u, f in self.done.items())
        frac = done / self.total if self.total else 1.0
        elapsed = now - self.t0
        rate_done = done - self.reused
        eta = elapsed / rate_done * (self.total - done) if rate_done > 0 else None
        bar = "#" * int(frac * 30)
        eta_s = _clock(eta) if eta is not None else "?"
        line = f"[{bar:<30}] {100 * frac:5.1f}%  elapsed {_clock(elapsed)}  ETA {eta_s}  {self.label}"
        if self.tty:
            print("\r" + line[:120].ljust(120), end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        print(("\r" + " " * 120 + "\r" if self.tty else "") + message, file=self.stream, flush=True)
        self.show(force=True)

    def close(self) -> None:
        if self.enabled:
            self.show(force=True)
            if self.tty:
                print(file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- the study
def _prepare_out(out: Path, s: StudySettings, force: bool) -> None:
    """Create ``out`` for this study, resume it if it holds the same study, refuse otherwise."""
    study_file = out / "study.json"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if study_file.is_file():
            try:
                stored = json.loads(study_file.read_text()).get("settings")
            except json.JSONDecodeError:
                stored = None
            if stored == s.identity():
                return  # the same study: resume
            if not force:
                diff = sorted(
                    k for k in set(s.identity()) | set(stored or {})
                    if (stored or {}).get(k) != s.identity().get(k)
                )  # fmt: skip
                raise FileExistsError(
                    f"--out: {out} holds a different study "
                    f"(settings differ in: {', '.join(diff) or 'format'}); "
                    f"choose another --out, or pass --force to delete it and start over"
                )
            shutil.rmtree(out)
        else:  # never deleted, even with --force: it may be anything
            raise FileExistsError(
                f"--out: {out} exists and is not an attnlab study (no study.json); refusing to write into "
                f"or delete it, even with --force; choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    from .cost import write_json_atomic

    write_json_atomic({"format": 1, "settings": s.identity()}, study_file)


def _load_finished(model_dir: Path, cfg: ModelConfig, seed: int) -> dict[str, Any] | None:
    path = model_dir / "result.json"
    if not path.is_file() or not (model_dir / "checkpoint" / "model.safetensors").is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    # results written before the seed was recorded are single-seed runs of the study's seed
    if result.get("model_config") != cfg.to_dict() or result.get("seed", seed) != seed:
        return None
    return result


def _resolve_workers(s: StudySettings, n_jobs: int) -> int:
    if s.workers is not None:
        return max(1, min(s.workers, n_jobs))
    if s.device != "cpu":
        return 1
    return max(1, min(2, os.cpu_count() or 1, n_jobs))


def run_study(
    s: StudySettings,
    out: str | os.PathLike = "compare-out",
    force: bool = False,
    progress: bool = True,
    stream=None,
) -> dict[str, Any]:
    """Run (or resume) the study into ``out``; returns the summary (also ``summary.json``)
    after writing the report. See the module docstring for the directory layout."""
    from .cost import CostSettings, format_table, run_cost_lab, write_json_atomic, write_plots
    from .report import write_report

    s.validate()
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device: CUDA was asked for but torch.cuda.is_available() is False")
    cost_fields = {f.name for f in dataclasses.fields(CostSettings)}
    bad = sorted(set(s.cost) - cost_fields)
    if bad:
        raise ValueError(f"cost: unknown CostSettings field(s) {', '.join(bad)}")
    out = Path(out)
    budget, configs = study_configs(s)
    _prepare_out(out, s, force)
    wall0, cpu0 = time.perf_counter(), time.process_time()

    n_eval = _eval_units(s)
    runs = study_runs(s, out)
    weights = {r.label: _STEP_COST.get(r.name, 2.0) * s.steps * 1.25 for r in runs}
    cost_file = out / "cost.json"
    if not s.skip_cost:
        weights["cost lab"] = 0.06 * sum(weights.values()) / len(s.run_seeds)
    bar = StudyProgress(weights, stream=stream, enabled=progress)

    done: dict[str, dict[str, Any]] = {}  # run label -> result
    todo: list[_Run] = []
    for r in runs:
        finished = _load_finished(r.model_dir, configs[r.name], r.seed)
        if finished is not None:
            done[r.label] = finished
            bar.mark_reused(r.label)
            bar.note(f"{r.label}: finished earlier, reused ({r.model_dir})")
        else:
            todo.append(r)
    if "cost lab" in weights and cost_file.is_file():
        bar.mark_reused("cost lab")

    def on_progress(label: str, kind: str, n: int) -> None:
        frac = 0.8 * n / s.steps if kind == "step" else 0.8 + 0.2 * n / n_eval
        bar.set(label, frac, f"{label}: {'step ' + str(n) if kind == 'step' else 'eval'}")

    todo.sort(key=lambda r: -_STEP_COST.get(r.name, 2.0))
    workers = _resolve_workers(s, len(todo))
    seeds_note = f" x {len(s.run_seeds)} seeds ({', '.join(map(str, s.run_seeds))})" if s.seeds else ""
    bar.note(
        f"study: {len(s.models)} models{seeds_note} at {budget:,} parameters each, {len(todo)} to train "
        f"({workers} worker{'s' if workers > 1 else ''}), {s.steps} steps at length {s.train_len}, "
        f"recall at lengths {', '.join(map(str, s.lengths))} -> {out}"
    )
    if workers == 1:
        for r in todo:
            done[r.label] = train_and_evaluate(
                r.name, configs[r.name], s.for_seed(r.seed), r.model_dir, on_progress, label=r.label
            )
            bar.note(_done_line(done[r.label], r.label))
    elif todo:
        done.update(_run_pool(todo, configs, s, workers, on_progress, bar))
    results = {seed: {r.name: done[r.label] for r in runs if r.seed == seed} for seed in s.run_seeds}

    cost_result = None
    if not s.skip_cost:
        if cost_file.is_file():
            cost_result = json.loads(cost_file.read_text())
        else:
            cost_settings = CostSettings(
                **{
                    **_cost_defaults(s),
                    **{k: tuple(v) if isinstance(v, list) else v for k, v in s.cost.items()},
                }
            )
            steps_total = (
                2 * len(cost_settings.mechanisms) + len(cost_settings.presets) * cost_settings.measure_presets
            )
            seen = [0]

            def cost_progress(msg: str) -> None:
                seen[0] += 1
                bar.set("cost lab", seen[0] / max(1, steps_total), msg)

            cost_result = run_cost_lab(cost_settings, progress=cost_progress)
            with warnings.catch_warnings():  # its memory plot is empty when no preset is studied
                warnings.simplefilter("ignore", UserWarning)
                write_plots(cost_result, out)
            write_json_atomic(cost_result, cost_file)
        bar.set("cost lab", 1.0, "cost lab done")
    bar.close()

    summary = summarize(s, budget, configs, results, cost_result)
    todo_labels = {r.label for r in todo}
    summary["run"] = {
        "wall_s": time.perf_counter() - wall0,
        "main_process_cpu_s": time.process_time() - cpu0,
        "models_cpu_s": {r.label: done[r.label].get("cpu_s") for r in runs},
        "reused": [r.label for r in runs if r.label not in todo_labels],
        "workers": workers,
        "device": s.device,
        "torch": torch.__version__,
    }
    write_json_atomic(summary, out / "summary.json")
    from .diagnostics.study import study_diagnostics  # the report's Diagnostics section (attnlab.diagnostics)

    md, html = write_report(summary, out, cost_result, study_diagnostics(out, s.models, s.tasks, s.train_len))
    print(format_summary_table(summary))
    if cost_result is not None:
        print()
        print(format_table(cost_result))
    print(f"\nreport: {html} (and {md.name}); numbers in {out / 'summary.json'}")
    return summary


def _cost_defaults(s: StudySettings) -> dict[str, Any]:
    """The cost lab at the study's scale: its mechanisms and hybrid presets only, on its device."""
    from .presets import PRESETS

    letters = "".join(sorted({c for n in s.models for c in model_base_config(n, s).layer_pattern},
                             key=LAYER_LETTERS.index))  # fmt: skip
    presets = tuple(n for n in s.models if n in PRESETS)
    return {"mechanisms": letters, "presets": presets, "device": s.device, "window": s.window,
            "index_topk": s.index_topk}  # fmt: skip


def _run_pool(todo, configs, s, workers, on_progress, bar) -> dict[str, dict[str, Any]]:
    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    results: dict[str, dict[str, Any]] = {}
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(q, 1)) as pool:
        futures = {
            pool.submit(
                _job,
                (r.name, configs[r.name].to_dict(), s.for_seed(r.seed).to_dict(), str(r.model_dir), r.label),
            ): r.label
            for r in todo
        }
        pending = set(futures)
        try:
            while pending:
                _drain(q, on_progress)
                done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    result = f.result()  # re-raises a worker's error here
                    results[futures[f]] = result
                    _drain(q, on_progress)
                    bar.note(_done_line(result, futures[f]))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # finished models stay saved for a resume
            raise
    _drain(q, on_progress)
    return results


def _drain(q, on_progress) -> None:
    while True:
        try:
            name, kind, n = q.get_nowait()
        except queue_mod.Empty:
            return
        on_progress(name, kind, n)


def _done_line(r: dict[str, Any], label: str) -> str:
    t = r["train"]
    return (
        f"{label}: trained {t['steps']} steps (loss {t['final_loss']:.3f}) in {t['wall_s']:.0f} s "
        f"({t['cpu_s']:.0f} s CPU), evaluated in {r['eval_wall_s']:.0f} s"
    )


# ----------------------------------------------------------------------------- summary
def task_score(record: dict[str, Any]) -> float:
    """A record's recall figure: MRCR's SequenceMatcher score where present, else the
    teacher-forced accuracy at the answer positions."""
    return float(record["score"]) if "score" in record else float(record["accuracy"])


def summarize(
    s: StudySettings,
    budget: int,
    configs: dict[str, ModelConfig],
    results: dict[int, dict[str, dict[str, Any]]],
    cost_result: dict | None,
) -> dict[str, Any]:
    """The study's numbers, one entry per model: recall per task and length (needle averaged
    over depths, and its depth x length grid), mean recall per length, parameters, analytic
    cache bytes at 1K/32K/1M and at each eval length, fitted cost exponents.

    ``results`` maps each seed of ``s.run_seeds`` to {model name: its result.json}. With
    several seeds, ``recall``, ``mean_recall``, ``tasks`` and ``needle_grid`` are the means
    over the seeds, ``recall_min`` / ``recall_max`` / ``tasks_min`` / ``tasks_max`` their
    ranges, ``by_seed`` every seed's own numbers (and training figures), and the summary's
    ``seeds`` lists the seeds; a single-seed summary has none of these extra keys."""
    from .cost import ModelCost, fit_exponent

    analytic_ctx = [2**i for i in range(10, 21)]
    seeds = s.run_seeds
    models = []
    for name in s.models:
        per_seed = {seed: _recall_numbers(s, results[seed][name]) for seed in seeds}
        r, cfg = results[seeds[0]][name], configs[name]
        mc = ModelCost(cfg, torch.bfloat16)
        if len(seeds) == 1:
            numbers = per_seed[seeds[0]]
            spread: dict[str, Any] = {}
        else:
            numbers, spread = _across_seeds(s, per_seed, {seed: results[seed][name] for seed in seeds})
        decode_flops = [mc.decode_flops(L) for L in analytic_ctx]
        prefill_flops = [mc.prefill_flops(L) for L in analytic_ctx]
        measured = _measured_exponents(name, cfg, cost_result)
        models.append({
            "name": name,
            "pattern": cfg.layer_pattern,
            "n_layers": cfg.n_layers,
            "d_ff": cfg.ff_dim,
            "params": r["params"],
            "params_vs_budget": r["params"] / budget - 1.0,
            **numbers,
            "cache_bytes": {str(L): mc.cache_bytes(L) for L in CACHE_CONTEXTS},
            "cache_bytes_at_lengths": {str(L): mc.cache_bytes(L) for L in s.lengths},
            "cache_curve": {"context": analytic_ctx, "bytes": [mc.cache_bytes(L) for L in analytic_ctx]},
            "exponents": {
                "decode_flops": fit_exponent(analytic_ctx[-4:], decode_flops[-4:]),
                "prefill_flops": fit_exponent(analytic_ctx[-4:], prefill_flops[-4:]),
                **measured,
            },
            "train": r["train"],
            "diverged": r["train"].get("diverged"),
            **spread,
        })  # fmt: skip
    summary = {
        "settings": s.to_dict(),
        "param_budget": budget,
        "cache_dtype": "bfloat16",
        "cache_contexts": list(CACHE_CONTEXTS),
        "lengths": list(s.lengths),
        "train_len": s.train_len,
        "tasks": list(s.tasks),
        "depths": list(s.depths),
        "models": models,
    }
    if len(seeds) > 1:
        summary["seeds"] = list(seeds)
    return summary


def _recall_numbers(s: StudySettings, r: dict[str, Any]) -> dict[str, Any]:
    """One run's recall figures from its evaluation records: ``tasks`` (per task and length;
    needle averaged over depths), ``needle_grid`` (per needle task, "length@depth"),
    ``recall`` (mean over tasks per length) and ``mean_recall`` (mean over lengths)."""
    tasks: dict[str, dict[str, float]] = {}
    needle: dict[str, dict[str, float]] = {}
    for spec in s.tasks:
        per_len = {}
        for length in s.lengths:
            recs = [x for x in r["results"] if x["spec"] == spec and x["length"] == length]
            per_len[str(length)] = sum(task_score(x) for x in recs) / len(recs)
            if recs and recs[0]["depth"] is not None:
                grid = needle.setdefault(spec, {})
                for x in recs:
                    grid[f"{length}@{x['depth']}"] = task_score(x)
        tasks[spec] = per_len
    recall = {str(L): sum(tasks[t][str(L)] for t in s.tasks) / len(s.tasks) for L in s.lengths}
    return {"recall": recall, "mean_recall": sum(recall.values()) / len(recall), "tasks": tasks,
            "needle_grid": needle}  # fmt: skip


def _across_seeds(
    s: StudySettings, per_seed: dict[int, dict[str, Any]], results: dict[int, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the means over seeds of :func:`_recall_numbers`' figures, the min / max and per-seed
    entries of a several-seed summary)."""
    runs = list(per_seed.values())

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    def per_len(get: Callable[[dict[str, Any]], dict[str, float]], f: Callable) -> dict[str, float]:
        return {k: f([get(n)[k] for n in runs]) for k in get(runs[0])}

    numbers = {
        "recall": per_len(lambda n: n["recall"], mean),
        "mean_recall": mean([n["mean_recall"] for n in runs]),
        "tasks": {t: per_len(lambda n, t=t: n["tasks"][t], mean) for t in s.tasks},
        "needle_grid": {t: per_len(lambda n, t=t: n["needle_grid"][t], mean) for t in runs[0]["needle_grid"]},
    }
    diverged = [
        f"seed {seed}: {r['train']['diverged']}" for seed, r in results.items() if r["train"].get("diverged")
    ]
    spread = {
        "recall_min": per_len(lambda n: n["recall"], min),
        "recall_max": per_len(lambda n: n["recall"], max),
        "tasks_min": {t: per_len(lambda n, t=t: n["tasks"][t], min) for t in s.tasks},
        "tasks_max": {t: per_len(lambda n, t=t: n["tasks"][t], max) for t in s.tasks},
        "diverged": "; ".join(diverged) or None,
        "by_seed": {
            str(seed): {
                **n,
                "train": results[seed]["train"],
                "diverged": results[seed]["train"].get("diverged"),
            }
            for seed, n in per_seed.items()
        },
    }
    return numbers, spread


def _measured_exponents(name: str, cfg: ModelConfig, cost_result: dict | None) -> dict[str, float | None]:
    """The cost lab's measured time exponents for a single-mechanism model's letter (one layer
    at the lab's width); hybrids get them only when the lab timed presets."""
    out: dict[str, float | None] = {"measured_decode": None, "measured_prefill": None}
    if cost_result is None:
        return out
    letters = set(cfg.layer_pattern)
    if len(letters) == 1 and (letter := letters.pop()) in cost_result.get("mechanisms", {}):
        ex = cost_result["mechanisms"][letter]["exponents"]
        out["measured_decode"], out["measured_prefill"] = ex.get("decode"), ex.get("prefill")
    elif name in cost_result.get("presets", {}) and "measured" in cost_result["presets"][name]:
        from .cost import fit_exponent

        ms = [m for m in cost_result["presets"][name]["measured"]["decode"] if m["seconds"]]
        out["measured_decode"] = fit_exponent([m["context"] for m in ms], [m["seconds"] for m in ms])
    return out


def _exp(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def summary_table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (the printed table, report.md and report.html
    all use these strings, formatted from ``summary`` alone)."""
    lengths = summary["lengths"]
    header = (
        ["model", "pattern", "params"]
        + [f"recall@{L}" + ("*" if L > summary["train_len"] else "") for L in lengths]
        + [f"cache@{_ctx(c)}" for c in summary["cache_contexts"]]
        + ["decode exp", "prefill exp"]
    )
    rows = []
    for m in summary["models"]:
        rows.append(
            [m["name"], m["pattern"], f"{m['params']:,}"]
            + [recall_cell(m, L) for L in lengths]
            + [human_bytes(m["cache_bytes"][str(c)]) for c in summary["cache_contexts"]]
            + [_exp(m["exponents"]["decode_flops"]), _exp(m["exponents"]["prefill_flops"])]
        )
    return header, rows


def recall_cell(m: dict[str, Any], length: int, task: str | None = None) -> str:
    """Model entry ``m``'s recall at ``length`` (of ``task``, or the mean over tasks) as the
    tables show it: "54.7%", or with several seeds the mean and the min-max across them,
    "54.7% (33–83)"."""
    key = "recall" if task is None else "tasks"

    def get(k: str) -> float:
        d = m[k] if task is None else m[k][task]
        return d[str(length)]

    text = f"{100 * get(key):.1f}%"
    if f"{key}_min" in m:
        text += f" ({100 * get(f'{key}_min'):.0f}–{100 * get(f'{key}_max'):.0f})"
    return text


def _ctx(n: int) -> str:
    return f"{n // 1048576}M" if n >= 1048576 else f"{n // 1024}K" if n >= 1024 else str(n)


def format_summary_table(summary: dict[str, Any]) -> str:
    header, rows = summary_table_rows(summary)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(
        c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    seeds = summary.get("seeds")
    out = [
        f"recall (mean of {', '.join(summary['tasks'])}) by context length; * = longer than training "
        f"({summary['train_len']}); every model has {summary['param_budget']:,} parameters (± a few %); "
        f"cache per sequence in {summary['cache_dtype']}; "
        "exponents of analytic decode / prefill FLOPs vs context"
        + (
            f"\nrecall: mean over {len(seeds)} training seeds ({', '.join(map(str, seeds))}), "
            "(min–max) across them; single-seed differences smaller than that spread are not meaningful"
            if seeds
            else ""
        ),
        line(header),
        line(["-" * w for w in widths]),
    ]
    out += [line(r) for r in rows]
    out += [f"note: {m['name']} {m['diverged']}" for m in summary["models"] if m.get("diverged")]
    return "\n".join(out)


# ----------------------------------------------------------------------------- CLI
def _csv(kind: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            vals = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        return vals

    return parse


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    d = StudySettings()
    p = subparsers.add_parser(
        "compare",
        help="the study: train every mechanism and hybrid at equal size, recall vs length, cost; report",
        description="Train small models of every mechanism (S W M D L G K) and the hybrid presets at one "
        "parameter budget on a recall mix (MQAR, needle in a haystack, MRCR), score recall against context "
        "length (beyond training too), run the cost lab, and write report.html / report.md. "
        "An interrupted study resumes (finished models are reused).",
    )
    p.add_argument("--out", default="compare-out", help="output directory (default compare-out)")
    p.add_argument("--force", action="store_true", help="delete an --out holding a different study")
    p.add_argument("--config", help="study settings file (JSON or TOML; fields of StudySettings)")
    p.add_argument("--models", type=_csv(str), help=f"comma-separated subset (default {','.join(d.models)})")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument(
        "--lengths", type=_csv(int), help=f"eval context lengths (default {','.join(map(str, d.lengths))})"
    )
    p.add_argument("--train-len", type=int, help=f"training length (default {d.train_len})")
    p.add_argument("--d-model", type=int, help=f"model width (default {d.d_model})")
    p.add_argument(
        "--n-layers", type=int, help=f"layers (default {d.n_layers}; minimax-01 uses a multiple of 8)"
    )
    p.add_argument("--param-budget", type=int, help="parameters per model (default: derived)")
    p.add_argument("--steps", type=int, help=f"training steps per model (default {d.steps})")
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, help=f"default {d.lr}")
    p.add_argument(
        "--eval-samples", type=int, help=f"samples per (task, length, depth) (default {d.eval_samples})"
    )
    p.add_argument(
        "--task", action="append", metavar="SPEC", help="task spec, repeatable (replaces the default mix)"
    )
    p.add_argument(
        "--seed", type=int, help=f"training / evaluation seed of a one-seed study (default {d.seed})"
    )
    p.add_argument(
        "--seeds",
        type=_csv(int),
        help="train and score every model once per seed, e.g. 0,1,2: the tables show the mean recall and "
        "the min-max across seeds (not with --seed)",
    )
    p.add_argument("--workers", type=int, help="parallel training processes (default: 2 on a CPU, 1 on CUDA)")
    p.add_argument("--skip-cost", action="store_true", help="no cost lab")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cli_compare)


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    if args.seed is not None and args.seeds is not None:
        raise ValueError("--seeds: give either --seed (one training seed) or --seeds (several), not both")
    data = load_study_config(args.config) if args.config else {}
    if args.seed is not None:
        data.pop("seeds", None)  # a flag replaces the config file's seed choice
    if args.seeds is not None:
        data.pop("seed", None)
    flags = {
        "models": args.models, "device": args.device, "lengths": args.lengths, "train_len": args.train_len,
        "d_model": args.d_model, "n_layers": args.n_layers, "param_budget": args.param_budget,
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "eval_samples": args.eval_samples,
        "tasks": tuple(args.task) if args.task else None, "seed": args.seed, "seeds": args.seeds,
        "workers": args.workers,
    }  # fmt: skip
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.skip_cost:
        data["skip_cost"] = True
    return StudySettings.from_dict(data).validate()


def _cli_compare(args: argparse.Namespace) -> int:
    s = settings_from_args(args)
    run_study(s, args.out, force=args.force, progress=not args.quiet)
    return 0
