"""Synthetic recall tasks and a byte-level text corpus, deterministic by seed.

Every sample is ``(tokens, targets)``, int64 ``[seq_len]`` each, with ``targets`` = -100
where there is no loss (see ``base.py``). Tasks by name: ``TASKS``; from a spec string:
``make_task("mqar:num_pairs=4", seq_len=64, vocab_size=64)``; mixed batches: ``TaskMixture``.
"""

from .base import IGNORE, Task, eval_rng, train_rngs
from .copying import Copying
from .corpus import TextLM, corpus_bytes, corpus_fingerprint
from .mqar import MQAR
from .mrcr import MRCR, mrcr_score
from .needle import Needle
from .passkey import Passkey
from .registry import TASKS, TaskMixture, make_task, parse_task_spec, register_task

__all__ = [
    "IGNORE", "Task", "eval_rng", "train_rngs", "Copying", "TextLM", "corpus_bytes", "corpus_fingerprint",
    "MQAR", "MRCR", "mrcr_score", "Needle", "Passkey", "TASKS", "TaskMixture", "make_task",
    "parse_task_spec", "register_task",
]  # fmt: skip
