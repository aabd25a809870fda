"""What each mechanism and model costs as context grows: analytic, measured, and in dollars.

Analytic cost is counted per layer from two sources that cannot drift from the model:

* the weights: every matrix multiply of a projection costs ``2 * weight.numel()`` FLOPs per
  token and reads the weight once per decode step, counted from the built modules;
* the mechanism's context-dependent work (scores and value sums over the keys it sees, or a
  recurrent state update), from the layer's shapes in :class:`ModelConfig`, and its cache
  bytes from the layer's own :class:`attnlab.cache.CacheSpec` declaration.

Window- and top-k-aware: a ``W`` query sees at most ``window + sink_tokens`` keys, a ``D``
query scores every earlier key with the indexer (linear in context) but attends to at most
``index_topk`` of them.

Measured cost times prefill (the layer / model over T tokens with a cache) and per-token
decode at context L (a cache filled to length L with random contents — decode time depends
on how much is cached, not on its values), and reads the allocated cache bytes back from the
tensors. Two exponents per curve, both log-log slopes: the least-squares fit over every
context measured, which lower-order terms (projections, fixed per-step overheads) bias towards
them, and the slope between the two largest contexts, where the leading term dominates most
(:func:`asymptotic_exponent`); beside them the marginal cost of one more context token. The
``S`` op and the ``D`` indexer are also timed alone, beside their layers.

On the CPU, timings are the process's CPU time with one torch thread (a busy neighbour does
not inflate them), prefill runs in chunks (temporaries stay cache-sized), and decode contexts
reach past the last-level cache (a cache that fits in L3 reads about twice as fast per token).

On CUDA, one decode step is a chain of small kernels whose launches, timed eagerly, cost more
than their work (a single layer took ~0.6 ms per token at every context on an H200): decode is
timed by replaying the step captured as a CUDA graph (``CostSettings.decode_graph``; a failed
capture falls back to eager timing and says why). Prefill is timed eagerly (large kernels).

A CUDA error other than out-of-memory (an illegal memory access, a device-side assert) is
sticky: every later CUDA call in the process fails with it. :func:`measure` then raises
:class:`CurveFailed` with the points measured before it, and :func:`run_cost_lab` records the
error as that curve's limit and returns with ``result["poisoned"]`` set; the caller goes on in a
fresh process with ``run_cost_lab(..., resume=result)``, which skips the finished curves (with
``budget_s`` = what is left of the budget; ``benchmarks/cost_gpu.py`` does all this by itself).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ._io import atomic_write_json, save_figure
from .cache import LayerCache
from .config import LAYER_NAMES, ModelConfig
from .layers import build_layer

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LINEAR_LETTERS = "LGK"


# ----------------------------------------------------------------------------- analytic
def weight_flops_per_token(module: nn.Module) -> int:
    """FLOPs per token of the module's projections: 2 * (dense weights + depthwise conv taps).
    Works on meta-device modules (only shapes are read)."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += 2 * m.weight.numel()
        elif isinstance(m, nn.Conv1d):
            total += 2 * m.weight.numel()  # depthwise: channels * kernel taps per token
    return total


def keys_seen(letter: str, cfg: ModelConfig, position: int) -> int:
    """Keys a query at 0-based ``position`` attends to (softmax-family letters)."""
    n = position + 1
    if letter == "W":
        local = min(n, cfg.window)
        return local + min(cfg.sink_tokens, n - local)
    if letter == "D":
        return min(n, cfg.index_topk)
    return n


def _sum_keys_seen(letter: str, cfg: ModelConfig, start: int, stop: int) -> int:
    """sum of keys_seen over positions start..stop-1 (one sequence)."""
    n = torch.arange(start + 1, stop + 1, dtype=torch.float64)  # keys visible before any cap
    if letter == "W":
        local = n.clamp(max=cfg.window)
        n = local + (n - local).clamp(max=cfg.sink_tokens)
    elif letter == "D":
        n = n.clamp(max=cfg.index_topk)
    return int(n.sum().item())


def mixing_flops(letter: str, cfg: ModelConfig, start: int, stop: int, decode: bool) -> int:
    """Context-dependent FLOPs of one layer for the tokens at positions start..stop-1 (one
    sequence): attention scores and value sums, the DSA indexer, or the recurrent update."""
    n_tokens = stop - start
    if letter in "SW":
        h, d = cfg.n_heads, cfg.attn_head_dim
        return 2 * h * (d + d) * _sum_keys_seen(letter, cfg, start, stop)
    if letter in "MD":
        h, r, lat = cfg.n_heads, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        if decode:  # absorbed: scores over [latent | rope] keys, values are the latent
            per_key = 2 * h * (lat + r + lat)
            absorb = 2 * h * cfg.qk_nope_head_dim * lat + 2 * h * lat * cfg.v_head_dim
        else:  # expanded: per-head keys and values
            per_key = 2 * h * (cfg.qk_nope_head_dim + r + cfg.v_head_dim)
            absorb = 0
        flops = per_key * _sum_keys_seen(letter, cfg, start, stop) + absorb * n_tokens
        if letter == "D":  # indexer scores every visible key: H_I dot products + weighted ReLU sum
            flops += (2 * cfg.index_n_heads * cfg.index_head_dim + 2 * cfg.index_n_heads) * _sum_keys_seen(
                "S", cfg, start, stop
            )
        return flops
    if letter in LINEAR_LETTERS:
        if letter == "L":
            h, dk, dv = cfg.n_heads, cfg.attn_head_dim, cfg.attn_head_dim
            state_ops = 5  # decay, k v^T outer product, q^T S: ~5 flops per state entry
            chunk = cfg.block_size
        else:
            h, dk, dv = cfg.linear_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
            state_ops = 9 if letter == "G" else 10  # + k^T S and the delta correction; K decays per channel
            chunk = 64
        flops = state_ops * h * dk * dv * n_tokens
        if not decode:  # chunked form: intra-chunk scores and sums, ~chunk/2 keys per token
            flops += 2 * h * (dk + dv) * (chunk // 2) * n_tokens
        return flops
    raise ValueError(f"letter: unknown {letter!r}")


@dataclasses.dataclass
class LayerCost:
    """Analytic cost of one layer for one sequence."""

    letter: str
    weight_flops_per_token: int
    weight_bytes: int

    def prefill_flops(self, cfg: ModelConfig, tokens: int) -> int:
        return self.weight_flops_per_token * tokens + mixing_flops(self.letter, cfg, 0, tokens, decode=False)

    def decode_flops(self, cfg: ModelConfig, context: int) -> int:
        """FLOPs to decode the token at position ``context`` (``context`` tokens already cached)."""
        return self.weight_flops_per_token + mixing_flops(self.letter, cfg, context, context + 1, decode=True)


def cache_read_bytes(letter: str, cfg: ModelConfig, spec, context: int) -> int:
    """Cache bytes one decode step reads at ``context`` (recurrent states are read and written)."""
    if letter in LINEAR_LETTERS:
        return 2 * spec.constant_bytes
    if letter == "D":  # indexer keys of every token + the selected latents
        dtype_bytes = spec.bytes_per_token // (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim)
        index_bytes = cfg.index_head_dim * dtype_bytes * (context + 1)
        latent_bytes = (
            (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes * min(context + 1, cfg.index_topk)
        )
        return index_bytes + latent_bytes
    return spec.bytes_at(context + 1)


class ModelCost:
    """Analytic cost of a :class:`HybridLM` (built on the meta device: no memory is used).

    Every figure is for one sequence; ``dtype`` is the weights' and cache's storage type.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> None:
        from .model import HybridLM

        self.cfg = cfg.validate()
        self.dtype = dtype
        with torch.device("meta"):
            model = HybridLM(cfg)
        self.num_params = model.num_params()
        nbytes = DTYPE_BYTES[dtype]
        self.specs = model.cache_specs(dtype)
        self.layers = [
            LayerCost(b.letter, weight_flops_per_token(b), sum(p.numel() for p in b.parameters()) * nbytes)
            for b in model.blocks
        ]
        self.head_flops_per_token = 2 * model.lm_head.weight.numel()
        # a decode step reads every weight once, but only one row of the embedding table
        embed = model.embed.weight
        self.weight_bytes = (self.num_params - embed.numel() + embed.shape[1]) * nbytes
        if cfg.tie_embeddings:
            self.weight_bytes += embed.numel() * nbytes - embed.shape[1] * nbytes

    def prefill_flops(self, tokens: int) -> int:
        return (
            sum(lc.prefill_flops(self.cfg, tokens) for lc in self.layers) + self.head_flops_per_token * tokens
        )

    def decode_flops(self, context: int) -> int:
        return sum(lc.decode_flops(self.cfg, context) for lc in self.layers) + self.head_flops_per_token

    def decode_bytes(self, context: int) -> int:
        """Bytes one decode step must read at ``context``: weights + the cache it looks at."""
        cache = sum(
            cache_read_bytes(lc.letter, self.cfg, s, context)
            for lc, s in zip(self.layers, self.specs, strict=False)
        )
        return self.weight_bytes + cache

    def cache_bytes(self, context: int) -> int:
        return sum(s.bytes_at(context) for s in self.specs)


# ----------------------------------------------------------------------------- measured
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# A call longer than this is timed once after its warm-up (a 1M-token prefill takes seconds).
_LONG_CALL_S = 1.0
# Random cache contents are drawn in slices of this many elements, on the cache's device, so that
# filling a 1M-token cache needs no second copy of it (on the host or the device).
_FILL_SLICE = 1 << 24
# Prefill runs in chunks for the layers that materialise [chunk, L] scores: D's indexer (by
# design) and, on the CPU, M's expanded attention (SDPA has no fused CPU kernel for its unequal
# q/v head dims, so it builds [H, chunk, L] logits). The chunk keeps chunk * L under this many
# elements: unchunked at 16K tokens, M took 29 s and D 36 s on the CPU, page-faulting through
# GBs of temporaries; in 2048-token chunks 6.6 s and 11 s. The work stays O(L^2), as the
# mechanism's is. Long prompts are served in chunks anyway (chunked prefill). M is not chunked
# on CUDA: each chunk would decompress the whole latent cache again.
_SCORES_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 28}
# On the CPU every prefill runs in chunks of at most this many tokens (chunked prefill, as servers
# do): in one 16K-token call the temporaries (16 MB+ per tensor) outgrow the last-level cache and
# the linear mechanisms' time per token rose from 8K to 16K (slopes L 1.42, K 1.54); in 2048-token
# chunks they stay linear (0.995, 1.01) while S keeps its quadratic term (1.94).
_CPU_PREFILL_CHUNK = 2048
_REPEATS = {"prefill": 3, "decode": 5}
_MIN_TIME_S = 0.2


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int = 3,
    min_time: float = _MIN_TIME_S,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds of the fastest timed call of ``fn()``, after one warm-up call (which also
    compiles and autotunes kernels). Times ``repeats`` calls and more while their total is under
    ``min_time`` (at most 50); a single one when the warm-up took over 1 s. The device is
    synchronised before and after every call, so all of its GPU work lies inside the interval.
    The minimum, not the median: on a shared machine other processes only ever add time.
    ``clock``: :func:`cpu_clock` picks the process's CPU time for single-threaded CPU runs."""
    _sync(device)
    t0 = clock()
    fn()
    _sync(device)
    n = 1 if clock() - t0 > _LONG_CALL_S else repeats
    times: list[float] = []
    while len(times) < n or (sum(times) < min_time and len(times) < 50):
        t0 = clock()
        fn()
        _sync(device)
        times.append(clock() - t0)
    return min(times)


def cpu_clock(device: torch.device) -> tuple[Callable[[], float], str]:
    """The clock the lab times calls with: on the CPU with one torch thread, the process's CPU
    time (user + system, so page faults count), which a neighbour that takes the core away does
    not inflate (on an idle machine it equals wall time); else wall time."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time, "process_time (CPU seconds, one thread)"
    return time.perf_counter, "perf_counter (wall seconds)"


def _calls_s(seconds: float, repeats: int, min_time: float = _MIN_TIME_S) -> float:
    """Wall seconds :func:`time_call` spends on a call that takes ``seconds`` (warm-up included)."""
    if seconds > _LONG_CALL_S:
        return 2 * seconds
    return seconds + min(max(repeats * seconds, min_time), 50 * seconds)


def allocated_cache_bytes(caches) -> int:
    """Bytes of the storages actually allocated by the cache tensors (each storage once)."""
    seen: dict[int, int] = {}
    for c in caches:
        for t in c.state_tensors().values():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _fill_random(caches, length: int, generator: torch.Generator) -> None:
    """Pretend ``length`` tokens were processed: cache contents 0.1 * N(0, 1), drawn on the
    cache's device (``generator`` is that device's) a slice at a time; lengths = length."""
    for c in caches:
        for t in c.state_tensors().values():
            if not t.is_floating_point():
                continue
            flat = t.view(-1) if t.is_contiguous() else None
            if flat is None:  # not expected (caches are allocated contiguous): one full-size draw
                t.copy_(torch.randn(t.shape, generator=generator, device=t.device) * 0.1)
                continue
            for i in range(0, flat.numel(), _FILL_SLICE):
                part = flat[i : i + _FILL_SLICE]
                part.copy_(torch.randn(part.shape, generator=generator, device=t.device).mul_(0.1))
        c.lengths.fill_(length)


def _is_oom(e: BaseException) -> bool:
    return (
        isinstance(e, torch.OutOfMemoryError)
        or "out of memory" in str(e).lower()
        or isinstance(e, MemoryError)
    )


# Words of the CUDA errors that leave the process's context unusable: after an illegal memory
# access or a device-side assert every later CUDA call fails with the same error (CUDA's "sticky"
# errors), so the rest of a run has to go on in a fresh process.
_STICKY_MARKERS = (
    "cuda error",
    "illegal memory access",
    "illegal address",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "cublas_status_execution_failed",
)


def is_sticky_device_error(e: BaseException) -> bool:
    """True for a device error after which this process's CUDA context is unusable (an
    ``AcceleratorError``, or a RuntimeError naming a CUDA error / illegal memory access /
    device-side assert); False for out of memory (recoverable: the curve's limit) and for
    everything else (a bug in one curve, recorded, the run goes on in the same process)."""
    if _is_oom(e):
        return False
    if isinstance(e, GraphCaptureError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(m in text for m in _STICKY_MARKERS)


class CurveFailed(RuntimeError):
    """The point at ``context`` of a curve raised something other than out of memory.
    ``points`` holds the measurements before it, ``error`` the exception, ``sticky`` whether the
    CUDA context is poisoned (:func:`is_sticky_device_error`)."""

    def __init__(self, points: list[Measurement], error: BaseException, context: int) -> None:
        super().__init__(f"context {context}: {type(error).__name__}: {error}")
        self.points, self.error, self.context = points, error, context
        self.sticky = is_sticky_device_error(error)


# Test hook (no GPU needed): ATTNLAB_COST_FAULT="<curve>@<context>", e.g. "prefill L@128", makes
# that point raise a fake illegal-memory-access error, and, like a real one, every later point of
# the same process too; "<curve>@<context>!" kills the process there instead (exit status 134, as
# an abort would), as a crash inside a kernel would.
FAULT_ENV = "ATTNLAB_COST_FAULT"
_INJECTED: list[str] = []  # the injected error once it fired in this process


def _injected_fault(curve: str) -> int | None:
    """The context at which ``curve`` ("decode S", "preset llama", ...) must fail, from FAULT_ENV."""
    spec = os.environ.get(FAULT_ENV, "")
    name, _, context = spec.rpartition("@")
    context = context.removesuffix("!")
    return int(context) if name == curve and context.isdigit() else None


def _maybe_fail(L: int, fault_at: int | None) -> None:
    if fault_at is not None and L == fault_at and os.environ.get(FAULT_ENV, "").endswith("!"):
        os._exit(134)
    if _INJECTED or (fault_at is not None and L == fault_at):
        if not _INJECTED:
            _INJECTED.append(
                f"RuntimeError: CUDA error: an illegal memory access was encountered ({FAULT_ENV})"
            )
        raise RuntimeError(f"CUDA error: an illegal memory access was encountered (injected by {FAULT_ENV})")


@dataclasses.dataclass
class Measurement:
    what: str  # "prefill" | "decode"
    context: int
    seconds: float | None  # per call (prefill of `context` tokens; one decode step at `context`)
    cache_bytes: int | None  # allocated cache bytes (per sequence)
    peak_bytes: int | None  # peak device memory (CUDA only)
    error: str | None = None  # why the curve ends here: out of memory, time budget, or an error
    setup_s: float | None = None  # wall seconds to allocate and fill the cache and inputs
    wall_s: float | None = None  # wall seconds of the whole point (setup, warm-up, timed calls)
    chunk: int | None = None  # prefill: tokens per call
    mode: str | None = None  # decode: "eager", "cuda_graph" (replays), "simulated_graph" (the protocol, CPU)
    note: str | None = None  # decode: why a CUDA graph was asked for but not used
    cache_len: int | None = None  # tokens the cache was allocated for (decode: context + 1 + replays)


def _impl_name(letter: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Which implementation the layer's ops pick for ``letter`` on this device and dtype
    (the layers call every op with mode='auto'; this asks the same dispatch)."""
    probe = torch.empty(0, device=device, dtype=dtype)
    if letter in LINEAR_LETTERS:
        from .ops._dispatch import resolve_mode

        op = {"L": "lightning_attention", "G": "gated_delta_rule", "K": "kda"}[letter]
        return resolve_mode("auto", probe, op)[0]
    from .ops import softmax as softmax_ops

    def kernel(name: str) -> str:
        return "triton" if softmax_ops._sparse_kernel("auto", name, probe) is not None else "torch"

    if letter in "SW":  # prefill: SDPA (W in window blocks); decode: a GQA decode kernel where dispatched
        triton_decode = softmax_ops._decode_kernel("auto", probe, False) is not None  # H_kv > 1
        return ("sdpa" if letter == "S" else "sdpa-window-blocks") + (
            "+triton-decode" if triton_decode else ""
        )
    if letter == "M":  # prefill: expanded SDPA; decode: absorbed MQA over the latents
        return f"sdpa+{kernel('softmax_decode')}-decode"
    return f"{kernel('dsa_index_scores')}-indexer+{kernel('sparse_attention')}-sparse"


class _Runner:
    """Wraps a single mixer layer or a whole model for timing (same call shape for both)."""

    def __init__(self, module: nn.Module, cfg: ModelConfig, is_model: bool, device, dtype) -> None:
        self.module, self.cfg, self.is_model = module.to(device=device, dtype=dtype).eval(), cfg, is_model
        self.device, self.dtype = device, dtype
        self.graph_failed: str | None = None  # why capture failed (then the curve's decode is eager)

    def caches(self, batch: int, max_len: int):
        if self.is_model:
            return self.module.new_caches(batch, max_len, device=self.device, dtype=self.dtype)
        return [self.module.new_cache(batch, max_len, device=self.device, dtype=self.dtype)]

    def inputs(self, batch: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
        if self.is_model:
            return torch.randint(0, self.cfg.vocab_size, (batch, tokens), generator=gen, device=self.device)
        x = torch.randn(batch, tokens, self.cfg.d_model, generator=gen, device=self.device)  # (B, T, d)
        return x.mul_(0.5).to(self.dtype)

    def prefill_chunk(self, tokens: int) -> int:
        """Tokens per prefill call: all of them on a GPU, at most _CPU_PREFILL_CHUNK on the CPU,
        and fewer for D (and M on the CPU) so [chunk, tokens] scores stay under _SCORES_ELEMENTS."""
        cpu = self.device.type == "cpu"
        chunk = min(tokens, _CPU_PREFILL_CHUNK) if cpu else tokens
        letters = set(self.cfg.layer_pattern)
        if "D" in letters or ("M" in letters and cpu):
            budget = _SCORES_ELEMENTS["cpu" if cpu else "cuda"]
            chunk = min(chunk, max(128, budget // tokens))
        return chunk

    def __call__(self, x, caches):
        if self.is_model:
            return self.module(x, caches)
        return self.module(x, caches[0])


class _SoftmaxOpRunner(_Runner):
    """The ``S`` layer's mixing op alone, at its shapes: prefill is ``ops.softmax_attention``
    (causal, q = k = v [B, T, H, D]), decode ``ops.softmax_decode`` over a KV cache. Timed
    beside the layer, it shows the context term without the projections' per-token cost."""

    def __init__(self, cfg: ModelConfig, device, dtype) -> None:
        self.module, self.cfg, self.is_model = None, cfg, False
        self.device, self.dtype = device, dtype
        self.graph_failed: str | None = None
        self.heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim

    def caches(self, batch: int, max_len: int):
        from .layers.attention import KVCache

        shape = (batch, max_len, self.kv_heads, self.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)  # (B, L, H_kv, D)
        lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        return [KVCache(lengths=lengths, k=k, v=torch.zeros_like(k))]

    def inputs(self, batch: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
        shape = (batch, tokens, self.heads, self.head_dim)
        return torch.randn(shape, generator=gen, device=self.device).to(self.dtype)  # (B, T, H, D)

    def prefill_chunk(self, tokens: int) -> int:
        return tokens

    def __call__(self, x, caches):
        from . import ops

        if x.shape[1] > 1:
            return ops.softmax_attention(x, x, x, causal=True)
        c = caches[0]
        return ops.softmax_decode(x[:, 0], c.k, c.v, c.lengths + 1)  # (B, H, D)


@dataclasses.dataclass
class _IndexKeyCache(LayerCache):
    """The DSA indexer's key cache alone: keys [B, max_len, D_I]."""

    keys: torch.Tensor


class _IndexerOpRunner(_Runner):
    """The ``D`` layer's context-dependent decode work apart from its fixed top-k attention: the
    lightning indexer's scores over every cached key (``ops.dsa_index_scores``), the per-row
    length mask and ``ops.dsa_topk``, as the layer runs them. Decode only."""

    def __init__(self, cfg: ModelConfig, device, dtype) -> None:
        self.module, self.cfg, self.is_model = None, cfg, False
        self.device, self.dtype = device, dtype
        self.graph_failed: str | None = None
        self.weights = torch.rand(
            1, 1, cfg.index_n_heads, device=device
        )  # (1, 1, H_I) float32, as the layer's w

    def caches(self, batch: int, max_len: int):
        keys = torch.zeros(batch, max_len, self.cfg.index_head_dim, device=self.device, dtype=self.dtype)
        return [_IndexKeyCache(lengths=torch.zeros(batch, dtype=torch.long, device=self.device), keys=keys)]

    def inputs(self, batch: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
        shape = (batch, tokens, self.cfg.index_n_heads, self.cfg.index_head_dim)
        return torch.randn(shape, generator=gen, device=self.device).to(self.dtype)  # (B, T, H_I, D_I)

    def __call__(self, x, caches):
        from . import ops

        c = caches[0]
        n_valid = c.lengths + 1  # (B,)
        # every allocated key, masked past each row's length, as the D layer scores inside a CUDA
        # graph (no host sync); the decode caches hold context + 1 keys (+ the graph's replays)
        S = c.keys.shape[1]
        w = self.weights.expand(x.shape[0], 1, -1)  # (B, 1, H_I)
        scores = ops.dsa_index_scores(x, c.keys[:, :S], w)  # (B, 1, S)
        invalid = torch.arange(S, device=x.device)[None, None] >= n_valid[:, None, None]  # (B, 1, S)
        scores = scores.masked_fill(invalid, float("-inf"))
        return ops.dsa_topk(scores, min(self.cfg.index_topk, S), causal=True)  # (B, 1, k)


def _time_prefill(runner: _Runner, L: int, batch: int, chunk: int, gen: torch.Generator):
    t0 = time.perf_counter()
    caches = runner.caches(batch, L)
    x = runner.inputs(batch, L, gen)
    _sync(runner.device)
    setup = time.perf_counter() - t0

    def step() -> None:
        for c in caches:
            c.lengths.zero_()
        for s in range(0, L, chunk):
            runner(x[:, s : s + chunk], caches)

    clock = cpu_clock(runner.device)[0]
    return time_call(step, runner.device, repeats=_REPEATS["prefill"], clock=clock), caches, setup


# CUDA-graph decode timing: replays per timed batch (each appends a token: the cache has room
# for them, and the lengths go back to the context before every batch), at least this many
# batches and more while their total is under _MIN_TIME_S (at most _GRAPH_MAX_BATCHES); the
# fastest batch's mean is the point's time.
_GRAPH_REPLAYS = 20
_GRAPH_BATCHES = 3
_GRAPH_MAX_BATCHES = 10
_GRAPH_WARMUP = 2  # eager warm-up calls before capture (compile and autotune the kernels)
DECODE_GRAPH_MODES = ("auto", "eager", "cuda_graph", "simulate")


class _GraphDecode:
    """One decode step of ``runner`` (a layer, an op alone, or a whole model) over ``caches``,
    captured as a CUDA graph; ``replay()`` runs it once more.

    Build it on fresh caches (lengths 0) BEFORE filling them: the warm-up calls write into the
    caches, and the caches are ``reset()`` after capture. The input ``x`` and the cache tensors
    stay at fixed addresses, so every replay reads the caches' current contents and lengths.
    A model goes through :class:`attnlab.generate.DecodeStep` (how generation runs it); a layer
    or op is captured here the same way: warm-up on a side stream, then capture (PyTorch's
    CUDA-graph recipe). ``simulate=True`` follows the protocol without a GPU (warm-up, reset,
    each replay a plain call) so that it can be tested on the CPU."""

    def __init__(self, runner: _Runner, caches, x: torch.Tensor, simulate: bool = False) -> None:
        self.mode = "simulated_graph" if simulate else "cuda_graph"
        if runner.is_model:
            from .generate import DecodeStep

            tokens = x[:, 0].contiguous()  # (B,) static token ids
            step = DecodeStep(
                runner.module, caches, mode="cuda_graph", simulate=simulate, warmup=_GRAPH_WARMUP
            )
            self.replay: Callable[[], object] = lambda: step(tokens)
            self._keep = (step, tokens)
            return
        for c in caches:
            if bool((c.lengths != 0).any()):
                raise ValueError("caches: capture needs fresh caches (lengths 0); fill them after capture")
        if simulate:
            for _ in range(_GRAPH_WARMUP):
                runner(x, caches)
            self.replay = lambda: runner(x, caches)
        else:
            from .generate import capture_cuda_graph, prefer_l1

            with torch.cuda.device(runner.device):  # streams of the tensors' device
                graph, out = capture_cuda_graph(lambda: runner(x, caches), _GRAPH_WARMUP, prefer_l1)
            self.replay = graph.replay
            self._keep = (graph, out)  # the output lives in the graph's memory pool
        for c in caches:  # warm-up (and, for a model, its capture) wrote into the caches
            c.reset()


def _time_replays(
    replay: Callable[[], object], rewind: Callable[[], None], device: torch.device, clock: Callable[[], float]
) -> float:
    """Seconds per step: the fastest batch's mean of ``_GRAPH_REPLAYS`` replays; ``rewind()``
    (the caches back to the context) before each batch, outside the timed interval. The device
    is synchronised before and after each batch; one untimed replay first."""
    rewind()
    replay()
    _sync(device)
    times: list[float] = []
    while len(times) < _GRAPH_BATCHES or (
        sum(times) * _GRAPH_REPLAYS < _MIN_TIME_S and len(times) < _GRAPH_MAX_BATCHES
    ):
        rewind()
        _sync(device)
        t0 = clock()
        for _ in range(_GRAPH_REPLAYS):
            replay()
        _sync(device)
        times.append((clock() - t0) / _GRAPH_REPLAYS)
    return min(times)


class GraphCaptureError(RuntimeError):
    """Capturing a decode step as a CUDA graph failed with a sticky device error (the message is
    the original's). A curve whose first point fails so is measured again eagerly by the fresh
    process (see :func:`run_cost_lab`)."""


def _capture_error_is_local(e: BaseException) -> bool:
    """A capture that failed on something capture forbids (a host sync, an unsupported op) leaves
    the context usable; any other sticky device error does not."""
    return not is_sticky_device_error(e) or "captur" in str(e).lower()


def _time_decode(runner: _Runner, L: int, batch: int, gen: torch.Generator, graph: str = "eager"):
    """One decode step at context L: -> (seconds, caches, setup_s, mode, note, cache_len).

    ``graph``: "eager" (:func:`time_call` of a plain call; lengths back to L before each),
    "cuda_graph" / "simulate" (:class:`_GraphDecode` replays, :func:`_time_replays`; a capture
    that fails, e.g. on an op that syncs with the host, is timed eagerly instead, ``note`` says
    why, and the runner's later points skip capture)."""
    t0 = time.perf_counter()
    use_graph = graph in ("cuda_graph", "simulate") and runner.graph_failed is None
    cache_len = L + 1 + (_GRAPH_REPLAYS + 1 if use_graph else 0)
    caches = runner.caches(batch, cache_len)
    x = runner.inputs(batch, 1, gen)  # (B, 1, d) or (B, 1) token ids: a fixed address for the graph
    step, note = None, runner.graph_failed
    if use_graph:
        try:
            step = _GraphDecode(runner, caches, x, simulate=graph == "simulate")
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager timing
            if _is_oom(e):
                raise
            if not _capture_error_is_local(e):
                raise GraphCaptureError(f"{type(e).__name__}: {e}") from e
            note = runner.graph_failed = f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]})"
            step = None
            _sync(runner.device)  # a failure that did poison the context surfaces here, as sticky
            for c in caches:
                c.reset()
    _fill_random(caches, L, gen)
    _sync(runner.device)
    setup = time.perf_counter() - t0
    clock = cpu_clock(runner.device)[0]

    def rewind() -> None:
        for c in caches:
            c.lengths.fill_(L)

    if step is not None:
        seconds = _time_replays(step.replay, rewind, runner.device, clock)
        return seconds, caches, setup, step.mode, None, cache_len

    def call() -> None:
        rewind()
        runner(x, caches)

    seconds = time_call(call, runner.device, repeats=_REPEATS["decode"], clock=clock)
    return seconds, caches, setup, "eager", note, cache_len


def estimate_point_s(prev: Measurement, context: int, first: bool = False) -> float:
    """Predicted wall seconds of measuring ``context`` from the previous point of the same
    curve: its setup grows like the context (cache allocation and fill), its calls like
    context^2 for prefill and context^1 for decode (the steepest any mechanism here grows).
    ``first``: ``prev`` is the curve's first point, whose setup also paid one-off costs (kernel
    compilation, graph capture; 11 s of DSA's 4K decode setup on an H200, which stopped the
    curve at 8K), so its setup is not extrapolated."""
    r = context / prev.context
    if first:
        prev = dataclasses.replace(prev, setup_s=0.0)
    seconds = (prev.seconds or 0.0) * r ** (2 if prev.what == "prefill" else 1)
    if prev.mode in ("cuda_graph", "simulated_graph"):  # warm-up + capture, one untimed + timed batches
        replays = max(
            _GRAPH_BATCHES * _GRAPH_REPLAYS * seconds,
            min(_MIN_TIME_S, _GRAPH_MAX_BATCHES * _GRAPH_REPLAYS * seconds),
        )
        return (prev.setup_s or 0.0) * r + (_GRAPH_WARMUP + 2) * seconds + replays
    return (prev.setup_s or 0.0) * r + _calls_s(seconds, _REPEATS[prev.what])


def measure(
    runner: _Runner,
    contexts: Sequence[int],
    what: str,
    batch: int = 1,
    prefill_chunk: int | None = None,
    seed: int = 0,
    deadline: float | None = None,
    on_point: Callable[[Measurement], None] | None = None,
    decode_graph: str = "eager",
    fault_at: int | None = None,
) -> list[Measurement]:
    """Time prefill (``what='prefill'``: T = context tokens into an empty cache, in chunks of
    ``prefill_chunk``, default :meth:`_Runner.prefill_chunk`) or one decode step at each
    context, in increasing order. The curve ends at the first context that runs out of memory,
    or, with a ``deadline`` (a ``time.monotonic()`` value), at the first one whose estimated
    time (:func:`estimate_point_s`) exceeds what is left; that context is appended with
    ``seconds=None`` and the reason in ``error``. ``on_point`` sees every appended Measurement.

    ``decode_graph``: how decode is timed, "eager", "cuda_graph" or "simulate" (see
    :func:`_time_decode`). Any other exception at a point raises :class:`CurveFailed` holding the
    points measured before it (its ``sticky``: the CUDA context is poisoned). ``fault_at``: a
    context at which to raise a fake sticky CUDA error (the FAULT_ENV test hook)."""
    if what not in ("prefill", "decode"):
        raise ValueError(f"what: expected 'prefill' or 'decode', got {what!r}")
    if decode_graph not in ("eager", "cuda_graph", "simulate"):
        raise ValueError(f"decode_graph: expected 'eager', 'cuda_graph' or 'simulate', got {decode_graph!r}")
    out: list[Measurement] = []
    gen = torch.Generator(device=runner.device).manual_seed(seed)
    device = runner.device

    def add(m: Measurement) -> None:
        out.append(m)
        if on_point is not None:
            on_point(m)

    for L in sorted(contexts):
        if deadline is not None:
            left = deadline - time.monotonic()
            est = estimate_point_s(out[-1], L, first=len(out) == 1) if out else 0.0
            if left <= 0 or est > left:
                add(Measurement(what, L, None, None, None, error=(
                    f"stopped: time budget (context {L} estimated {est:.1f} s, {max(left, 0):.1f} s left)"
                )))  # fmt: skip
                break
        t0 = time.perf_counter()
        oom, failure, chunk = False, None, None
        mode = note = cache_len = None
        try:
            _maybe_fail(L, fault_at)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad():
                if what == "prefill":
                    chunk = prefill_chunk or runner.prefill_chunk(L)
                    seconds, caches, setup = _time_prefill(runner, L, batch, chunk, gen)
                    cache_len = L
                else:
                    seconds, caches, setup, mode, note, cache_len = _time_decode(
                        runner, L, batch, gen, decode_graph
                    )
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            cache_bytes = allocated_cache_bytes(caches) // batch
            del caches
        except Exception as e:  # noqa: BLE001 - out of memory ends the curve; anything else is CurveFailed
            if _is_oom(e):
                oom = True  # handled outside the except block, so the traceback's tensors are freed
            else:
                failure = CurveFailed(list(out), e, L)
        if failure is not None:
            raise failure from failure.error
        if oom:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            add(Measurement(what, L, None, None, None, error=f"out of memory at context {L}",
                            wall_s=time.perf_counter() - t0))  # fmt: skip
            break
        wall = time.perf_counter() - t0
        add(Measurement(what, L, seconds, cache_bytes, peak, setup_s=setup, wall_s=wall,
                        chunk=chunk if what == "prefill" else None, mode=mode, note=note,
                        cache_len=cache_len))  # fmt: skip
    return out


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): ~2 quadratic, ~1 linear, ~0 flat."""
    pts = [
        (math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=False) if x > 0 and y is not None and y > 0
    ]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def asymptotic_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Log-log slope between the two largest x with a positive y: the local exponent where the
    leading term dominates most. Lower-order terms (projections, fixed overheads) bias a fit
    over the whole range towards them; here they fade as x grows: for y = a x^2 + b x the
    slope between x and 2x is 1 + log2((2ax + b) / (ax + b)), which tends to 2."""
    pts = sorted((x, y) for x, y in zip(xs, ys, strict=False) if x > 0 and y is not None and y > 0)
    return fit_exponent(*zip(*pts[-2:], strict=False)) if len(pts) >= 2 else None


def marginal_cost(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """(y_last - y_prev) / (x_last - x_prev) over the two largest x: the cost one more token of
    context adds there (for decode, seconds per cached token; constant terms cancel)."""
    pts = sorted((x, y) for x, y in zip(xs, ys, strict=False) if y is not None)
    if len(pts) < 2 or pts[-1][0] == pts[-2][0]:
        return None
    (x0, y0), (x1, y1) = pts[-2:]
    return (y1 - y0) / (x1 - x0)


def dollars_per_mtok(seconds_per_token: float, price_per_hour: float) -> float:
    """$ per million tokens at ``price_per_hour`` for the device that ran at this speed."""
    return price_per_hour / 3600.0 * seconds_per_token * 1e6


# ----------------------------------------------------------------------------- the lab
@dataclasses.dataclass
class CostSettings:
    """What the cost lab measures. The CPU defaults finish in a few minutes on 2 cores.

    Decode contexts reach past the last-level cache: the CPU default starts where an ``S``
    layer's KV cache (2 KiB per token at d_model 256, float32) outgrows a shared L3 and its
    reads come from DRAM, so the per-token cost is the same at every point of the upper range
    (below ~64K the cache fits in L3 and each token costs about half as much, which bent the
    old 4K..128K fit to 1.35). ``threads``: torch threads while timing on the CPU (None = torch's
    default); one thread, because on a shared 2-core machine a second thread that loses its core
    stalls every op at its join (a 0.6 ms decode step took 30 ms)."""

    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 8  # for whole presets (every preset pattern tiles 8)
    vocab_size: int = 512
    mechanisms: str = "SWMDLGK"
    presets: tuple[str, ...] = (
        "llama",
        "swa",
        "deepseek-v3",
        "deepseek-v32",
        "minimax-01",
        "qwen3-next",
        "kimi-linear",
        "lightning",
        "gdn",
        "kda",
    )
    prefill_contexts: tuple[int, ...] = (2048, 4096, 8192, 16384)  # long enough for T^2 to show
    decode_contexts: tuple[int, ...] = (4096, 16384, 65536, 262144, 524288)
    preset_decode_contexts: tuple[int, ...] = (4096, 65536)
    analytic_contexts: tuple[int, ...] = tuple(2**i for i in range(10, 21))  # 1K .. 1M
    batch: int = 1
    window: int = 512
    index_topk: int = 256
    index_n_heads: int | None = None  # None = ModelConfig's default
    index_head_dim: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    price_per_hour: float = 2.0  # $ per device-hour used for $/Mtok
    measure_presets: bool = True
    threads: int | None = 1  # torch threads on the CPU while timing; None = leave torch's setting
    budget_s: float | None = None  # time budget for all measured curves; None = measure every context
    keep_going: bool = False  # record an unexpected error in a curve and go on (a long unattended run)
    # how decode is timed: "auto" = replays of a CUDA graph of the step on CUDA, plain calls on the
    # CPU; "eager"; "cuda_graph"; "simulate" = the graph protocol without a GPU (tests, smoke runs)
    decode_graph: str = "auto"


def mechanism_config(letter: str, s: CostSettings) -> ModelConfig:
    """A one-layer config of one mechanism at the lab's width (shapes shared across letters)."""
    base = dict(
        pattern=letter,
        d_model=s.d_model,
        n_layers=1,
        vocab_size=s.vocab_size,
        n_heads=s.n_heads,
        window=s.window,
        index_topk=s.index_topk,
        kv_lora_rank=s.d_model // 2,
        qk_nope_head_dim=s.d_model // s.n_heads // 2 or 16,
        qk_rope_head_dim=16,
        v_head_dim=s.d_model // s.n_heads,
        linear_n_heads=s.n_heads,
        linear_n_key_heads=s.n_heads,
        linear_key_head_dim=s.d_model // s.n_heads,
        linear_value_head_dim=s.d_model // s.n_heads,
    )
    if s.index_n_heads is not None:
        base["index_n_heads"] = s.index_n_heads
    if s.index_head_dim is not None:
        base["index_head_dim"] = s.index_head_dim
    return ModelConfig(**base).validate()


@contextlib.contextmanager
def _torch_threads(device: torch.device, n: int | None):
    """torch.set_num_threads(n) for the block on the CPU; restored afterwards."""
    if device.type != "cpu" or n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_cost_lab(
    s: CostSettings,
    progress: Callable[[str], None] | None = None,
    on_update: Callable[[dict], None] | None = None,
    log: Callable[[str], None] | None = None,
    resume: dict | None = None,
) -> dict:
    """Analytic and measured cost per mechanism (one layer) and per preset; returns a JSON-able dict.

    Every analytic figure is filled in first; then the measured curves run one at a time:
    decode per mechanism, decode per preset, then prefill per mechanism from the cheapest to the
    dearest (analytic FLOPs at the longest context), so that with ``s.budget_s`` the dearest
    curves get the time the cheap ones left. Each curve gets an equal share of the budget still
    left (recomputed as curves finish). ``on_update(result)`` is called before the first curve
    and after every curve with ``result["status"] == "partial"`` (``result["running"]`` names the
    curve that runs next), and once more at the end with ``"complete"`` (the caller writes it, so
    a run killed midway keeps what it measured). ``progress`` gets one line as each curve starts;
    ``log`` one per measured point (its time) and per finished curve.

    With ``s.keep_going`` an error in a curve is recorded as its limit (the points before it are
    kept) and the run goes on; a sticky CUDA error (:func:`is_sticky_device_error`) poisons this
    process, so the run stops there with ``result["poisoned"]`` set (status "partial", unless it
    was the last curve): call again
    in a fresh process with ``resume=result`` (the same settings but ``budget_s``: pass what is
    left of it), which skips the curves in ``result["curves_finished"]``. A decode curve whose CUDA
    graph capture broke the context at its first point is not finished: the fresh process times it
    eagerly (``result["eager_decode"]`` holds why)."""
    say = progress or (lambda msg: None)
    detail = log or (lambda msg: None)
    if s.decode_graph not in DECODE_GRAPH_MODES:
        raise ValueError(
            f"decode_graph: expected one of {', '.join(DECODE_GRAPH_MODES)}, got {s.decode_graph!r}"
        )
    device, dtype = torch.device(s.device), DTYPES[s.dtype]
    if s.decode_graph == "cuda_graph" and device.type != "cuda":
        raise ValueError(
            f"decode_graph: 'cuda_graph' needs a CUDA device, got {s.device!r} ('simulate' on a CPU)"
        )
    graph = s.decode_graph
    if graph == "auto":
        graph = "cuda_graph" if device.type == "cuda" else "eager"
    t_start = time.monotonic()
    with _torch_threads(device, s.threads):
        cfgs = {letter: mechanism_config(letter, s) for letter in s.mechanisms}
        preset_cfgs = {
            name: ModelConfig.preset(name, d_model=s.d_model, n_layers=s.n_layers, vocab_size=s.vocab_size)
            for name in s.presets
        }
        if resume is None:
            result: dict = {
                "settings": dataclasses.asdict(s),
                "device": _device_name(device),
                "clock": cpu_clock(device)[1],
                "status": "partial",
                "mechanisms": {},
                "presets": {},
                "started_unix": time.time(),
                "curves_finished": [],
                "processes": [],
            }
            for letter in s.mechanisms:
                result["mechanisms"][letter] = _mechanism_entry(letter, cfgs[letter], s, device, dtype)
            for name in s.presets:
                result["presets"][name] = _preset_entry(preset_cfgs[name], s, dtype)
        else:
            result = _resumable(resume, s)
        by_cost = sorted(s.mechanisms, key=lambda c: result["mechanisms"][c]["analytic"]["prefill_flops"][-1])
        curves = [("decode", c) for c in s.mechanisms]
        curves += [("preset", n) for n in s.presets] if s.measure_presets else []
        curves += [("prefill", c) for c in by_cost]
        if resume is None:
            result["ops"] = {}  # the ops alone, beside their layers
            if "D" in s.mechanisms:
                result["ops"]["D"] = _op_entry(
                    s, "indexer scores + top-k alone (decode)", _impl_name("D", device, dtype)
                )
            if "S" in s.mechanisms:
                result["ops"]["S"] = _op_entry(s, "softmax_attention / softmax_decode alone", "sdpa")
        curves += [("op-decode", "D")] if "D" in s.mechanisms else []
        curves += [("op-decode", "S"), ("op-prefill", "S")] if "S" in s.mechanisms else []
        finished = result["curves_finished"]
        todo = [(kind, key) for kind, key in curves if f"{kind} {key}" not in finished]
        this_process = {"pid": os.getpid(), "curves": []}
        result["processes"].append(this_process)
        # a resumed run's s.budget_s is what the caller has left for it (the settings keep the first one)
        end = None if s.budget_s is None else t_start + s.budget_s

        def update(running: str | None) -> None:
            result["running"] = running
            result["wall_s"] = time.time() - result["started_unix"]
            result["curves_done"] = len(finished)
            result["curves_total"] = len(curves)
            if on_update is not None:
                on_update(result)

        update(f"{todo[0][0]} {todo[0][1]}" if todo else None)
        for i, (kind, key) in enumerate(todo):
            curve = f"{kind} {key}"
            deadline = None if end is None else time.monotonic() + (end - time.monotonic()) / (len(todo) - i)
            label = f"{kind} {key}" if kind == "preset" else f"{kind} {key} ({LAYER_NAMES[key]})"
            label = label.replace("op-", "") + " op alone" if kind.startswith("op-") else label
            say(
                f"cost: {label}"
                + ("" if deadline is None else f", {deadline - time.monotonic():.0f} s share")
            )
            t0 = time.monotonic()

            def on_point(m: Measurement, label=label) -> None:
                if m.seconds is None:
                    detail(f"  {label} @ {m.context}: {m.error}")
                else:
                    run_s = time.monotonic() - t_start
                    how = "" if m.mode in (None, "eager") else f", {m.mode}"
                    detail(f"  {label} @ {m.context}: {m.seconds * 1e3:.3f} ms per call (setup "
                        f"{m.setup_s:.1f} s, point {m.wall_s:.1f} s, run {run_s:.0f} s{how})")  # fmt: skip

            group, what = _curve_slot(kind)
            retry_eager = result.get("eager_decode", {}).get(curve)  # capture broke an earlier process
            kw = dict(
                deadline=deadline, on_point=on_point, decode_graph=graph, fault_at=_injected_fault(curve)
            )
            poisoned, retry = None, False
            try:
                if kind == "preset":
                    from .model import HybridLM

                    torch.manual_seed(0)
                    with torch.device(device):  # initialise on the device (a 16-layer model is slow on a CPU)
                        runner = _Runner(HybridLM(preset_cfgs[key]), preset_cfgs[key], True, device, dtype)
                    runner.graph_failed = retry_eager
                    ms = measure(runner, s.preset_decode_contexts, "decode", s.batch, **kw)
                    _store_preset(result["presets"][key], preset_cfgs[key], dtype, ms)
                elif kind.startswith("op-"):
                    runner = (_SoftmaxOpRunner if key == "S" else _IndexerOpRunner)(cfgs[key], device, dtype)
                    runner.graph_failed = retry_eager
                    contexts = s.prefill_contexts if what == "prefill" else s.decode_contexts
                    ms = measure(runner, contexts, what, s.batch, **kw)
                    _store_curve(result["ops"][key], what, ms, s)
                else:
                    torch.manual_seed(0)
                    with torch.device(device):
                        runner = _Runner(build_layer(key, cfgs[key], 0), cfgs[key], False, device, dtype)
                    runner.graph_failed = retry_eager
                    contexts = s.prefill_contexts if kind == "prefill" else s.decode_contexts
                    ms = measure(runner, contexts, kind, s.batch, **kw)
                    _store_curve(result["mechanisms"][key], kind, ms, s)
            except CurveFailed as e:
                if not s.keep_going:
                    raise
                msg = f"error at context {e.context}: {type(e.error).__name__}: {str(e.error)[:300]}"
                detail(f"  {label}: {msg}")
                poisoned = msg if e.sticky else None
                # a capture that broke the context before any point: the fresh process times it eagerly
                retry = isinstance(e.error, GraphCaptureError) and not e.points and not retry_eager
                if retry:
                    note = f"CUDA graph capture failed in an earlier process, timed eagerly ({msg[:200]})"
                    result.setdefault("eager_decode", {})[curve] = note
                else:  # the points before the failure stay; the failed context ends the curve
                    ms = [*e.points, Measurement(what, e.context, None, None, None, error=msg)]
                    if kind == "preset":
                        _store_preset(result["presets"][key], preset_cfgs[key], dtype, ms)
                    else:
                        _store_curve(result[group][key], what, ms, s)
            except Exception as e:  # noqa: BLE001 - recorded only with keep_going (an unattended GPU run)
                if not s.keep_going:
                    raise
                msg = f"error: {type(e).__name__}: {str(e)[:300]}"
                detail(f"  {label}: {msg}")
                result[group][key].setdefault("limit", {})[what] = msg
                poisoned = msg if is_sticky_device_error(e) else None
            runner = None
            detail(f"cost: {label} done in {time.monotonic() - t0:.1f} s")
            if not retry:
                finished.append(curve)
                this_process["curves"].append(curve)
            if poisoned is not None and (retry or i + 1 < len(todo)):
                result["poisoned"] = {"curve": curve, "error": poisoned}
                left = len(todo) - i - (0 if retry else 1)
                detail(f"cost: the CUDA context of this process is poisoned ({curve}); "
                       f"{left} curves left for a fresh process")  # fmt: skip
                nxt = todo[i] if retry else todo[i + 1]
                update(f"{nxt[0]} {nxt[1]}")
                return result
            update(f"{todo[i + 1][0]} {todo[i + 1][1]}" if i + 1 < len(todo) else None)
        result["status"] = "complete"
        update(None)
    return result


def _curve_slot(kind: str) -> tuple[str, str]:
    """Where a curve's results live: (result group, "prefill" | "decode")."""
    group = {"preset": "presets", "op-decode": "ops", "op-prefill": "ops"}.get(kind, "mechanisms")
    return group, "decode" if kind == "preset" else kind.removeprefix("op-")


def _resumable(previous: dict, s: CostSettings) -> dict:
    """A copy of an earlier (partial) result to go on from, after checking it was run with the
    same settings (the time budget aside)."""
    import copy

    if previous.get("status") == "complete":
        raise ValueError("resume: this result is complete; nothing is left to measure")
    if "curves_finished" not in previous or "started_unix" not in previous:
        raise ValueError(
            "resume: expected a cost.json written by run_cost_lab (curves_finished, started_unix)"
        )
    old = {k: v for k, v in json.loads(json.dumps(previous["settings"])).items() if k != "budget_s"}
    new = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(s))).items() if k != "budget_s"}
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(f"resume: settings differ from the run being resumed: {', '.join(diff)}")
    result = copy.deepcopy(previous)
    if "poisoned" in result:
        result.setdefault("restarts", []).append(result.pop("poisoned"))
    return result


def mark_curve_failed(result: dict, curve: str, message: str) -> None:
    """Record ``curve`` ("prefill L", "preset llama", ...) as finished with ``message`` as its
    limit, keeping any points already stored: for a supervisor whose worker process died in it
    (``result["running"]``), so that a resumed run does not run it again."""
    kind, _, key = curve.partition(" ")
    group, what = _curve_slot(kind)
    entry = result[group][key]
    entry.setdefault("limit", {})[what] = message
    if curve not in result["curves_finished"]:
        result["curves_finished"].append(curve)
    result.setdefault("restarts", []).append({"curve": curve, "error": message})
    result["curves_done"] = len(result["curves_finished"])
    result["running"] = None
    if result["curves_done"] >= result.get("curves_total", math.inf):
        result["status"] = "complete"


def _mechanism_entry(letter: str, cfg: ModelConfig, s: CostSettings, device, dtype) -> dict:
    """The analytic part of one mechanism's entry; its measured curves start empty."""
    lc = ModelCost(cfg, dtype)
    layer_cost = lc.layers[0]
    ctx = s.analytic_contexts
    analytic = {
        "context": list(ctx),
        "prefill_flops": [layer_cost.prefill_flops(cfg, L) for L in ctx],
        "decode_flops": [layer_cost.decode_flops(cfg, L) for L in ctx],
        "cache_bytes": [lc.specs[0].bytes_at(L) for L in ctx],
    }
    entry = {
        "name": LAYER_NAMES[letter],
        "impl": _impl_name(letter, device, dtype),
        "analytic": analytic,
        "measured": {"prefill": [], "decode": []},
        "limit": {"prefill": "not measured yet", "decode": "not measured yet"},
    }
    entry["exponents"] = _exponents([], [])
    entry["exponents"]["analytic_decode_flops"] = fit_exponent(ctx[-4:], analytic["decode_flops"][-4:])
    entry["exponents"]["analytic_prefill_flops"] = fit_exponent(ctx[-4:], analytic["prefill_flops"][-4:])
    entry["dollars_per_mtok"] = _pricing([], [], s)
    return entry


def _op_entry(s: CostSettings, name: str, impl: str) -> dict:
    """An entry for a layer's op alone (measured only; the analytic cost is the layer's)."""
    return {
        "name": name,
        "impl": impl,
        "measured": {"prefill": [], "decode": []},
        "limit": {"prefill": "not measured yet", "decode": "not measured yet"},
        "exponents": _exponents([], []),
        "dollars_per_mtok": _pricing([], [], s),
    }


def _decode_mode(ms: list[Measurement]) -> tuple[str | None, str | None]:
    """How a decode curve was timed: ("cuda_graph" | "simulated_graph" | "eager" | "mixed", why a
    requested graph was not used)."""
    modes = {m.mode for m in ms if m.seconds is not None}
    notes = [m.note for m in ms if m.note]
    return (modes.pop() if len(modes) == 1 else "mixed" if modes else None), (notes[0] if notes else None)


_IMPL_SUFFIX = {"cuda_graph": "+cuda-graph", "simulated_graph": "+simulated-graph"}


def _store_curve(entry: dict, what: str, ms: list[Measurement], s: CostSettings) -> None:
    entry["measured"][what] = [dataclasses.asdict(m) for m in ms]
    entry["limit"][what] = _limit(ms)
    if what == "decode":
        mode, note = _decode_mode(ms)
        entry["decode_mode"] = mode
        if note:
            entry["decode_mode_note"] = note
        suffix = _IMPL_SUFFIX.get(mode or "")
        if suffix and not entry["impl"].endswith(suffix):  # decode replayed as a graph (prefill: eager)
            entry["impl"] += suffix
    pre = [Measurement(**m) for m in entry["measured"]["prefill"]]
    dec = [Measurement(**m) for m in entry["measured"]["decode"]]
    entry["exponents"].update(_exponents(pre, dec))
    entry["dollars_per_mtok"] = _pricing(pre, dec, s)


def _limit(ms: list[Measurement]) -> str:
    """How a curve ended: "complete", or the last point's reason (out of memory, time budget)."""
    return ms[-1].error if ms and ms[-1].error else "complete"


def _preset_entry(cfg: ModelConfig, s: CostSettings, dtype: torch.dtype) -> dict:
    mc = ModelCost(cfg, dtype)
    ctx = s.analytic_contexts
    entry = {
        "pattern": cfg.layer_pattern,
        "params": mc.num_params,
        "analytic": {
            "context": list(ctx),
            "cache_bytes": [mc.cache_bytes(L) for L in ctx],
            "decode_bytes": [mc.decode_bytes(L) for L in ctx],
            "decode_flops": [mc.decode_flops(L) for L in ctx],
            "prefill_flops": [mc.prefill_flops(L) for L in ctx],
        },
    }
    if s.measure_presets:
        entry["measured"] = {"decode": []}
        entry["memory_check"] = []
        entry["limit"] = {"decode": "not measured yet"}
    return entry


def _store_preset(entry: dict, cfg: ModelConfig, dtype: torch.dtype, ms: list[Measurement]) -> None:
    mc = ModelCost(cfg, dtype)
    entry["measured"] = {"decode": [dataclasses.asdict(m) for m in ms]}
    entry["limit"] = {"decode": _limit(ms)}
    mode, note = _decode_mode(ms)
    entry["decode_mode"] = mode
    if note:
        entry["decode_mode_note"] = note
    # decode caches hold context + 1 tokens (+ room for a graph's replays): compare the
    # declaration at the allocated length with what was allocated
    entry["memory_check"] = [
        {
            "context": m.context,
            "cache_len": m.cache_len or m.context + 1,
            "analytic_bytes": mc.cache_bytes(m.cache_len or m.context + 1),
            "allocated_bytes": m.cache_bytes,
        }
        for m in ms
        if m.cache_bytes is not None
    ]


def _exponents(pre: list[Measurement], dec: list[Measurement]) -> dict:
    """Time vs context exponents of the measured curves: ``prefill``/``decode`` = least-squares
    fit over every context measured (the whole range); ``*_asymptotic`` = slope between the two
    largest contexts; ``decode_marginal_ns_per_token`` = the time one more cached token adds to a
    decode step there."""
    out: dict = {}
    for what, ms in (("prefill", pre), ("decode", dec)):
        ok = [m for m in ms if m.seconds]
        xs, ys = [m.context for m in ok], [m.seconds for m in ok]
        out[what] = fit_exponent(xs, ys)
        out[f"{what}_asymptotic"] = asymptotic_exponent(xs, ys)
        marginal = marginal_cost(xs, ys)
        out[f"{what}_marginal_ns_per_token"] = None if marginal is None else marginal * 1e9
    return out


def _pricing(pre: list[Measurement], dec: list[Measurement], s: CostSettings) -> dict:
    return {
        "price_per_hour": s.price_per_hour,
        "prefill": [
            {
                "context": m.context,
                "dollars": dollars_per_mtok(m.seconds / (m.context * s.batch), s.price_per_hour),
            }
            for m in pre
            if m.seconds
        ],
        "decode": [
            {"context": m.context, "dollars": dollars_per_mtok(m.seconds / s.batch, s.price_per_hour)}
            for m in dec
            if m.seconds
        ],
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ----------------------------------------------------------------------------- output
def summary_rows(result: dict) -> list[dict]:
    rows = []
    for letter, e in result["mechanisms"].items():
        ex = e["exponents"]
        rows.append(
            {
                "mechanism": f"{letter} {e['name']}",
                "impl": e["impl"],
                "prefill_exp": ex["prefill"],
                "prefill_exp_asymptotic": ex.get("prefill_asymptotic"),
                "decode_exp": ex["decode"],
                "decode_exp_asymptotic": ex.get("decode_asymptotic"),
                "decode_ns_per_token": ex.get("decode_marginal_ns_per_token"),
                "analytic_decode_exp": ex["analytic_decode_flops"],
                "limit": e.get("limit", {}),
            }
        )
    return rows


def format_table(result: dict) -> str:
    def f(x):
        return "  n/a" if x is None else f"{x:5.2f}"

    def ns(x):
        return "n/a" if x is None else f"{x:.3g}"

    s = result["settings"]
    impls = [e["impl"] for e in (*result["mechanisms"].values(), *result.get("ops", {}).values())]
    iw = max([30, *(len(i) + 2 for i in impls)])  # impl column width
    lines = [
        f"cost lab on {result['device']}: time vs context exponents (2 quadratic, 1 linear, 0 flat)",
        f"  whole = least-squares fit over every context (prefill {_span(s['prefill_contexts'])}, decode "
        f"{_span(s['decode_contexts'])}); asym = slope between the two largest contexts reached",
        "  decode ns/tok = time one more cached token adds to a decode step there (constant terms cancel)",
        f"  timed with {result.get('clock', 'wall seconds')}; fastest of the repeats",
        *(
            [
                f"  decode: the step captured as a CUDA graph, fastest mean of {_GRAPH_REPLAYS} replays "
                f"({modes})"
            ]
            if (modes := _graph_modes(result))
            else []
        ),
        f"{'mechanism':<31}{'impl':<{iw}}{'prefill':>7}{'asym':>7}{'decode':>8}{'asym':>7}"
        f"{'ns/tok':>10}{'FLOPs exp':>11}",
    ]
    for r in summary_rows(result):
        lines.append(
            f"{r['mechanism']:<31}{r['impl']:<{iw}}{f(r['prefill_exp']):>7}{f(r['prefill_exp_asymptotic']):>7}"
            f"{f(r['decode_exp']):>8}{f(r['decode_exp_asymptotic']):>7}{ns(r['decode_ns_per_token']):>10}"
            f"{f(r['analytic_decode_exp']):>11}"
        )
        for what, why in r["limit"].items():
            if why != "complete":
                lines.append(f"    {what}: {why}")
    for letter, e in result.get("ops", {}).items():
        ex = e["exponents"]
        what = "  S op alone (no projections)" if letter == "S" else "  D indexer + top-k alone"
        lines.append(
            f"{what:<31}{e['impl']:<{iw}}{f(ex['prefill']):>7}"
            f"{f(ex['prefill_asymptotic']):>7}{f(ex['decode']):>8}{f(ex['decode_asymptotic']):>7}"
            f"{ns(ex['decode_marginal_ns_per_token']):>10}"
        )
    lines.append("  FLOPs exp = analytic decode FLOPs exponent over 128K..1M")
    for r in result.get("restarts", []):
        lines.append(f"  went on in a fresh process after {r['curve']}: {r['error'][:160]}")
    if result.get("status") != "complete":
        lines.append(f"  PARTIAL: {result.get('curves_done', 0)} of {result.get('curves_total', '?')} curves")
    return "\n".join(lines)


def _graph_modes(result: dict) -> str:
    """Which decode curves were replayed as a graph ("" = none): for the table's header."""
    entries = [*result["mechanisms"].values(), *result.get("ops", {}).values(), *result["presets"].values()]
    modes = sorted({e.get("decode_mode") for e in entries} - {None, "eager"})
    return ", ".join(modes) if any(m in ("cuda_graph", "simulated_graph", "mixed") for m in modes) else ""


def _span(contexts) -> str:
    return f"{min(contexts)}..{max(contexts)}" if contexts else "none"


def _exp_label(exponents: dict, what: str) -> str:
    def f(x):
        return "n/a" if x is None else f"{x:.2f}"

    return f"{f(exponents.get(what))} / {f(exponents.get(what + '_asymptotic'))}"


def write_plots(result: dict, out_dir: Path) -> list[Path]:
    """cost_vs_context.png, memory_vs_context.png, dollars_vs_context.png into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for letter, e in result["mechanisms"].items():
        for ax, what in zip(axes, ("prefill", "decode"), strict=False):
            ms = [m for m in e["measured"][what] if m["seconds"]]
            if ms:
                ax.loglog(
                    [m["context"] for m in ms],
                    [m["seconds"] * 1e3 for m in ms],
                    "o-",
                    label=f"{letter} {e['name']} ({_exp_label(e['exponents'], what)})",
                )
    for ax, what in zip(axes, ("prefill (whole context)", "decode (one token)"), strict=False):
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(f"measured {what}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"one layer per mechanism on {result['device']} (exponent: whole-range fit / between the two largest "
        f"contexts){'' if result.get('status', 'complete') == 'complete' else ' - PARTIAL'}",
        fontsize=9,
    )
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "cost_vs_context.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, e in result["presets"].items():
        a = e["analytic"]
        ax.loglog(
            a["context"], [b / 2**20 for b in a["cache_bytes"]], "-", label=f"{name} ({e['pattern'][:8]})"
        )
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("cache per sequence (MiB)")
    ax.set_title("cache memory vs context (declared = allocated; see memory_check)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "memory_vs_context.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for letter, e in result["mechanisms"].items():
        d = e["dollars_per_mtok"]["decode"]
        if d:
            ax.loglog([p["context"] for p in d], [p["dollars"] for p in d], "o-", label=f"{letter} decode")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("$ / million tokens")
    ax.set_title(f"decode price at ${result['settings']['price_per_hour']}/device-hour")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "dollars_vs_context.png"))
    plt.close("all")
    return paths


def write_json_atomic(obj: dict, path: Path) -> None:
    """JSON to ``path`` atomically (see :mod:`attnlab._io`)."""
    atomic_write_json(path, obj)


# ----------------------------------------------------------------------------- CLI
def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _cmd_cost(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out: {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"--out: {out} is not empty; pass --force to write into it")
    bad = sorted(set(args.mechanisms) - set(LAYER_NAMES))
    if bad:
        raise ValueError(f"--mechanisms: unknown letter(s) {''.join(bad)}; valid: {''.join(LAYER_NAMES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device: CUDA was asked for but torch.cuda.is_available() is False")
    s = CostSettings(
        d_model=args.d_model,
        n_heads=args.n_heads,
        mechanisms=args.mechanisms,
        prefill_contexts=args.prefill_contexts,
        decode_contexts=args.decode_contexts,
        preset_decode_contexts=args.preset_decode_contexts,
        batch=args.batch,
        threads=args.threads or None,
        budget_s=args.budget_s,
        device=args.device,
        dtype=args.dtype,
        price_per_hour=args.price_per_hour,
        presets=tuple(args.presets.split(",")) if args.presets else (),
        measure_presets=not args.no_preset_timing,
    )
    out.mkdir(parents=True, exist_ok=True)
    # cost.json after every curve (status "partial" until the end): an interrupted run keeps its curves
    result = run_cost_lab(
        s,
        progress=lambda m: print(m, flush=True),
        on_update=lambda r: write_json_atomic(r, out / "cost.json"),
        log=lambda m: print(m, flush=True),  # each point's time
    )
    write_plots(result, out)
    print(format_table(result))
    print(f"wrote {out / 'cost.json'} and plots to {out}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cost", help="analytic + measured cost vs context, $/Mtok, scaling exponents")
    p.add_argument("--out", default="cost-out", help="output directory (cost.json and PNG plots)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--mechanisms", default="SWMDLGK", help="letters to measure as single layers")
    p.add_argument(
        "--presets", default=",".join(CostSettings.presets), help="comma-separated presets ('' = none)"
    )
    p.add_argument("--no-preset-timing", action="store_true", help="presets: analytic only")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill-contexts", type=_ints, default=CostSettings.prefill_contexts)
    p.add_argument("--decode-contexts", type=_ints, default=CostSettings.decode_contexts)
    p.add_argument(
        "--preset-decode-contexts",
        type=_ints,
        default=CostSettings.preset_decode_contexts,
        help="decode contexts for whole presets",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads on the CPU while timing (0 = torch's default)"
    )
    p.add_argument(
        "--budget-s", type=float, default=None, help="time budget for the measured curves (seconds)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--price-per-hour", type=float, default=2.0, help="$ per device-hour for $/Mtok")
    p.set_defaults(func=_cmd_cost)
