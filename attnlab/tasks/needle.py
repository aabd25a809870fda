"""Needle in a haystack, RULER-style (Hsieh et al. 2024, "RULER: What's the Real Context Size
of Your Long-Context Language Models?", its niah_* tasks), byte-level (vocabulary 256).

A needle is ``The magic number for <key> is <value>.`` with a random lowercase key and a
random ``value_digits``-digit value. The haystack is either RULER's noise sentences
("The grass is green. The sky is blue. ...") or real text (a random window of the stdlib
corpus, see ``corpus.py``); needles go in at sentence (noise) or line (text) boundaries.
After the haystack come the questions, each followed by its answer, which carries the loss::

    <haystack with needles>\\nWhat is the magic number for <key>? <value>[, <value>...].

Variants (RULER's names):
- ``single``: one needle, one question;
- ``multi-key``: ``num_keys`` needles with different keys (distractors), one is asked;
- ``multi-value``: one key with ``num_values`` values; the answer lists all, in text order;
- ``multi-query``: ``num_keys`` needles, ``num_queries`` of them asked.

``depth`` (0 = start of the haystack, 1 = end) places the first asked needle at the boundary
nearest ``depth * haystack_len``; other needles go to random boundaries.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np
import torch

from .base import BYTE_VOCAB, Task, _fraction, _positive, finish
from .corpus import SPLITS, corpus_array

NOISE = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
HAYSTACKS = ("noise", "text")
VARIANTS = ("single", "multi-key", "multi-value", "multi-query")
# (num_keys, num_values, num_queries) per variant
_DEFAULT_COUNTS = {
    "single": (1, 1, 1), "multi-key": (4, 1, 1), "multi-value": (1, 4, 1), "multi-query": (4, 1, 2),
}  # fmt: skip
_LETTERS = np.frombuffer(string.ascii_lowercase.encode(), dtype=np.uint8)


@dataclasses.dataclass
class HaystackSample:
    """A built sample before tokenization, with where things landed (for tests and diagnostics)."""

    text: bytes  # the whole sample, seq_len bytes or fewer
    answer_spans: list[tuple[int, int]]  # [start, end) byte ranges of ``text`` that carry the loss
    needle_offsets: list[int]  # where each needle starts in ``text``, in the order given
    needle_depths: list[float]  # realized depth of each needle: haystack bytes before it / haystack length
    haystack_len: int


def build_haystack_sample(
    rng: np.random.Generator,
    seq_len: int,
    haystack: str,
    split: str,
    needles: list[bytes],
    depths: list[float | None],
    prefix: bytes,
    questions: list[tuple[bytes, bytes]],
) -> HaystackSample:
    """Fill ``seq_len`` bytes: ``prefix``, a haystack holding ``needles`` (at ``depths``; None =
    a random boundary), then each ``(question, answer)``; the answers carry the loss."""
    fixed = len(prefix) + sum(len(n) for n in needles) + sum(len(q) + len(a) for q, a in questions)
    hay_len = seq_len - fixed
    hay, bounds = _haystack(rng, haystack, split, hay_len)
    if hay_len < 1 or len(bounds) < len(needles):
        raise ValueError(
            f"seq_len: {seq_len} bytes leave {hay_len} for the haystack, too few for {len(needles)} "
            f"needle(s) plus questions taking {fixed} bytes; use a longer seq_len"
        )
    chosen = [-1] * len(needles)
    for i in sorted(range(len(depths)), key=lambda i: depths[i] is None):  # requested depths first
        free = bounds[~np.isin(bounds, chosen)]
        if depths[i] is not None:
            chosen[i] = int(free[np.argmin(np.abs(free - depths[i] * hay_len))])
        else:
            chosen[i] = int(free[rng.integers(len(free))])
    order = sorted(range(len(needles)), key=lambda i: chosen[i])
    pieces, offsets, pos, start = [prefix], [0] * len(needles), len(prefix), 0
    for i in order:
        pieces.append(hay[start : chosen[i]])
        pos += chosen[i] - start
        offsets[i] = pos
        pieces.append(needles[i])
        pos += len(needles[i])
        start = chosen[i]
    pieces.append(hay[start:])
    pos += hay_len - start
    spans = []
    for question, answer in questions:
        pieces += [question, answer]
        pos += len(question)
        spans.append((pos, pos + len(answer)))
        pos += len(answer)
    text = b"".join(pieces)
    return HaystackSample(text, spans, offsets, [c / hay_len for c in chosen], hay_len)


def _haystack(rng: np.random.Generator, kind: str, split: str, length: int) -> tuple[bytes, np.ndarray]:
    """``length`` bytes of haystack and the sorted boundaries (0 and ``length`` included)
    where a needle may go: sentence starts for noise, line starts for text."""
    if length < 1:
        return b"", np.zeros(0, dtype=np.int64)
    if kind == "noise":
        hay = (NOISE * (length // len(NOISE) + 1))[:length]
        arr = np.frombuffer(hay, dtype=np.uint8)
        inner = np.flatnonzero((arr[1:-1] == ord(" ")) & (arr[:-2] == ord("."))) + 2  # after ". "
    else:
        data = corpus_array(split)
        if length >= data.shape[0] - 1:
            raise ValueError(
                f"seq_len: a {length}-byte text haystack is longer than the {split} corpus "
                f"({data.shape[0]} bytes); use haystack=noise or split=train"
            )
        start = int(rng.integers(0, data.shape[0] - length - 1))
        while start > 0 and data[start - 1] != ord("\n"):  # start at a line start
            start -= 1
        arr = data[start : start + length]
        hay = arr.tobytes()
        inner = np.flatnonzero(arr[:-1] == ord("\n")) + 1  # after each newline
    return hay, np.unique(np.concatenate([[0], inner, [length]])).astype(np.int64)


def random_word(rng: np.random.Generator, length: int) -> bytes:
    return _LETTERS[rng.integers(0, 26, size=length)].tobytes()


def random_number(rng: np.random.Generator, digits: int) -> bytes:
    first = str(int(rng.integers(1, 10)))
    rest = "".join(str(d) for d in rng.integers(0, 10, size=digits - 1))
    return (first + rest).encode()


@dataclasses.dataclass
class Needle(Task):
    """RULER-style needle retrieval; see the module docstring. ``None`` counts take the
    variant's defaults (multi-key: 4 keys; multi-value: 4 values; multi-query: 4 keys, 2 asked)."""

    variant: str = "single"
    depth: float = 0.5
    haystack: str = "noise"
    split: str = "train"  # corpus split used by haystack="text"
    num_keys: int | None = None
    num_values: int | None = None
    num_queries: int | None = None
    key_len: int = 6
    value_digits: int = 7

    name = "needle"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"haystack: expected 'noise' or 'text', got {self.haystack!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split: expected 'train' or 'validation', got {self.split!r}")
        _fraction("depth", self.depth)
        k, v, q = _DEFAULT_COUNTS[self.variant]
        self.num_keys = k if self.num_keys is None else self.num_keys
        self.num_values = v if self.num_values is None else self.num_values
        self.num_queries = q if self.num_queries is None else self.num_queries
        for name in ("num_keys", "num_values", "num_queries", "key_len", "value_digits"):
            _positive(name, getattr(self, name))
        if self.num_queries > self.num_keys:
            raise ValueError(f"num_queries: {self.num_queries} asked, but only num_keys={self.num_keys} keys")
        super().__post_init__()
        self.build(np.random.default_rng(0))  # fail now, not at the first batch, if seq_len is too short

    def min_vocab(self) -> int:
        return BYTE_VOCAB

    def build(self, rng: np.random.Generator) -> HaystackSample:
        """One sample as text, with needle positions (``sample`` tokenizes this)."""
        keys: list[bytes] = []
        while len(keys) < self.num_keys:
            word = random_word(rng, self.key_len)
            if word not in keys:
                keys.append(word)
        values = {k: [random_number(rng, self.value_digits) for _ in range(self.num_values)] for k in keys}
        sep = b" " if self.haystack == "noise" else b"\n"
        needles, depths, owner = [], [], []
        for i, key in enumerate(keys):
            for j, value in enumerate(values[key]):
                needles.append(b"The magic number for " + key + b" is " + value + b"." + sep)
                depths.append(self.depth if i == 0 and j == 0 else None)
                owner.append((key, j))
        asked = keys[: self.num_queries]  # keys[0] holds the needle at `depth`
        # placement first (needs only lengths), then answers list the values in text order
        dummy = [(b"\nWhat is the magic number for " + k + b"? ", b"x" * self._answer_len()) for k in asked]
        built = build_haystack_sample(
            rng, self.seq_len, self.haystack, self.split, needles, depths, b"", dummy
        )
        text = bytearray(built.text)
        for (start, end), key in zip(built.answer_spans, asked, strict=True):
            ids = [i for i, o in enumerate(owner) if o[0] == key]
            ids.sort(key=lambda i: built.needle_offsets[i])
            text[start:end] = b", ".join(values[key][owner[i][1]] for i in ids)
        built.text = bytes(text)
        return built

    def _answer_len(self) -> int:
        return self.num_values * self.value_digits + 2 * (self.num_values - 1)

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        built = self.build(rng)
        return finish(np.frombuffer(built.text, dtype=np.uint8), built.answer_spans, self.seq_len)
