"""Tasks by name, task specs as strings, and mixed-task batches.

A spec is ``name`` or ``name:key=value,key=value`` — e.g. ``mqar:num_pairs=4``,
``needle:variant=multi-key,depth=0.25``. The key ``weight`` (default 1) is the task's share
of a mixture. Values are parsed as int, float, bool (true/false), none, or else string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import Task, train_rngs
from .copying import Copying
from .corpus import TextLM
from .mqar import MQAR
from .mrcr import MRCR
from .needle import Needle
from .passkey import Passkey

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (MQAR, Needle, Passkey, Copying, MRCR, TextLM)}


def register_task(cls: type[Task]) -> type[Task]:
    """Add a Task subclass to ``TASKS`` under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"cls: expected a Task subclass, got {cls!r}")
    TASKS[cls.name] = cls
    return cls


def parse_task_spec(spec: str) -> tuple[str, dict[str, Any], float]:
    """``"mqar:num_pairs=4,weight=2"`` -> ``("mqar", {"num_pairs": 4}, 2.0)``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"task spec: expected 'name' or 'name:key=value,...', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"task spec {spec!r}: expected key=value, got {item!r}")
        options[key.strip().replace("-", "_")] = _parse_value(value.strip())
    raw = options.pop("weight", 1.0)
    try:
        weight = float(raw)
    except (TypeError, ValueError):
        weight = float("nan")
    if not 0 < weight < float("inf"):
        raise ValueError(f"task spec {spec!r}: weight must be a finite number > 0, got {raw!r}")
    return name, options, weight


def make_task(spec: str | dict[str, Any], seq_len: int, vocab_size: int) -> Task:
    """Build a task from a spec string or an ``options()`` dict (its ``seq_len`` /
    ``vocab_size`` entries, if any, are replaced by the arguments)."""
    if isinstance(spec, dict):
        options = dict(spec)
        name = options.pop("task", None)
        options.pop("seq_len", None)
        options.pop("vocab_size", None)
    else:
        name, options, _ = parse_task_spec(spec)
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"seq_len", "vocab_size"}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(
            f"task {name}: unknown option(s) {', '.join(sorted(unknown))}; "
            f"its options are {', '.join(sorted(fields))}"
        )
    return cls(seq_len=seq_len, vocab_size=vocab_size, **options)


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


class TaskMixture:
    """Batches mixed across tasks: each row's task is drawn by weight, then sampled from that
    task's own random stream. All tasks must share ``seq_len``. Deterministic by ``seed``;
    ``state_dict()`` / ``load_state_dict()`` save and restore every stream exactly."""

    def __init__(self, tasks: Sequence[Task], weights: Sequence[float] | None = None, seed: int = 0):
        if not tasks:
            raise ValueError("tasks: expected at least one task")
        lengths = {t.seq_len for t in tasks}
        if len(lengths) != 1:
            raise ValueError(f"tasks: a mixture needs one seq_len, got {sorted(lengths)}")
        weights = [1.0] * len(tasks) if weights is None else [float(w) for w in weights]
        if len(weights) != len(tasks) or any(not w > 0 for w in weights):
            raise ValueError(f"weights: expected {len(tasks)} positive weights, got {weights}")
        self.tasks = list(tasks)
        self.probs = np.array(weights) / sum(weights)
        self.seed = int(seed)
        self._choice_rng, *self._task_rngs = train_rngs(self.seed, len(tasks) + 1)

    @property
    def seq_len(self) -> int:
        return self.tasks[0].seq_len

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens, targets, task_ids)``: int64 ``[B, T]``, ``[B, T]``, ``[B]`` (index into ``tasks``)."""
        if len(self.tasks) == 1:
            ids = np.zeros(batch_size, dtype=np.int64)
        else:
            ids = self._choice_rng.choice(len(self.tasks), size=batch_size, p=self.probs)
        pairs = [self.tasks[i].sample(self._task_rngs[i]) for i in ids]
        tokens = torch.stack([p[0] for p in pairs])  # (B, T)
        targets = torch.stack([p[1] for p in pairs])  # (B, T)
        return tokens, targets, torch.from_numpy(ids.astype(np.int64))

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready states of the choice stream and every task stream."""
        return {
            "seed": self.seed,
            "choice": self._choice_rng.bit_generator.state,
            "tasks": [r.bit_generator.state for r in self._task_rngs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["tasks"]) != len(self._task_rngs):
            n_have = len(self._task_rngs)
            raise ValueError(f"state: {len(state['tasks'])} task streams, this mixture has {n_have}")
        self._choice_rng.bit_generator.state = state["choice"]
        for rng, s in zip(self._task_rngs, state["tasks"], strict=True):
            rng.bit_generator.state = s
