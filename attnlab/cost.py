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
tensors. Scaling exponents are least-squares slopes in log-log space.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ._io import atomic_write_json, save_figure
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


def time_call(
    fn: Callable[[], object], device: torch.device, repeats: int = 3, min_time: float = 0.05
) -> float:
    """Median seconds of ``fn()`` after one warm-up; repeats until ``min_time`` total."""
    fn()
    _sync(device)
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_time and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def allocated_cache_bytes(caches) -> int:
    """Bytes of the storages actually allocated by the cache tensors (each storage once)."""
    seen: dict[int, int] = {}
    for c in caches:
        for t in c.state_tensors().values():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _fill_random(caches, length: int, generator: torch.Generator) -> None:
    """Pretend ``length`` tokens were processed: random cache contents, lengths = length."""
    for c in caches:
        for t in c.state_tensors().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype) * 0.1)
        c.lengths.fill_(length)


def _is_oom(e: BaseException) -> bool:
    return (
        isinstance(e, torch.OutOfMemoryError)
        or "out of memory" in str(e).lower()
        or isinstance(e, MemoryError)
    )


@dataclasses.dataclass
class Measurement:
    what: str  # "prefill" | "decode"
    context: int
    seconds: float | None  # per call (prefill of `context` tokens; one decode step at `context`)
    cache_bytes: int | None  # allocated cache bytes (per sequence)
    peak_bytes: int | None  # peak device memory (CUDA only)
    error: str | None = None


def _impl_name(letter: str, device: torch.device) -> str:
    """Which implementation the layer's ops pick on this device (mode='auto')."""
    if letter in LINEAR_LETTERS:
        from .ops._dispatch import resolve_mode

        op = {"L": "lightning_attention", "G": "gated_delta_rule", "K": "kda"}[letter]
        return resolve_mode("auto", torch.empty(0, device=device), op)[0]
    if letter in "SW":
        return "sdpa"
    return "absorbed-latent" if letter == "M" else "indexer+sparse-latent"


class _Runner:
    """Wraps a single mixer layer or a whole model for timing (same call shape for both)."""

    def __init__(self, module: nn.Module, cfg: ModelConfig, is_model: bool, device, dtype) -> None:
        self.module, self.cfg, self.is_model = module.to(device=device, dtype=dtype).eval(), cfg, is_model
        self.device, self.dtype = device, dtype

    def caches(self, batch: int, max_len: int):
        if self.is_model:
            return self.module.new_caches(batch, max_len, device=self.device, dtype=self.dtype)
        return [self.module.new_cache(batch, max_len, device=self.device, dtype=self.dtype)]

    def inputs(self, batch: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
        if self.is_model:
            return torch.randint(0, self.cfg.vocab_size, (batch, tokens), generator=gen).to(self.device)
        return (torch.randn(batch, tokens, self.cfg.d_model, generator=gen) * 0.5).to(self.device, self.dtype)

    def __call__(self, x, caches):
        if self.is_model:
            return self.module(x, caches)
        return self.module(x, caches[0])


def _time_prefill(runner: _Runner, L: int, batch: int, chunk: int, gen: torch.Generator):
    caches = runner.caches(batch, L)
    x = runner.inputs(batch, L, gen)

    def step() -> None:
        for c in caches:
            c.lengths.zero_()
        for s in range(0, L, chunk):
            runner(x[:, s : s + chunk], caches)

    return time_call(step, runner.device, repeats=2 if L >= 4096 else 3), caches


def _time_decode(runner: _Runner, L: int, batch: int, gen: torch.Generator):
    caches = runner.caches(batch, L + 1)
    _fill_random(caches, L, gen)
    x = runner.inputs(batch, 1, gen)

    def step() -> None:
        for c in caches:
            c.lengths.fill_(L)
        runner(x, caches)

    return time_call(step, runner.device, repeats=5), caches


def measure(
    runner: _Runner,
    contexts: Sequence[int],
    what: str,
    batch: int = 1,
    prefill_chunk: int | None = None,
    seed: int = 0,
) -> list[Measurement]:
    """Time prefill (``what='prefill'``: T = context tokens into an empty cache, in chunks of
    ``prefill_chunk``) or one decode step at each context. Out-of-memory is recorded as the
    limit reached (and longer contexts skipped), never raised."""
    if what not in ("prefill", "decode"):
        raise ValueError(f"what: expected 'prefill' or 'decode', got {what!r}")
    out: list[Measurement] = []
    gen = torch.Generator().manual_seed(seed)
    device = runner.device
    for L in contexts:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.no_grad():
                if what == "prefill":
                    seconds, caches = _time_prefill(runner, L, batch, prefill_chunk or L, gen)
                else:
                    seconds, caches = _time_decode(runner, L, batch, gen)
        except (RuntimeError, MemoryError) as e:
            if not _is_oom(e):
                raise
            out.append(Measurement(what, L, None, None, None, error=f"out of memory at context {L}"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        out.append(Measurement(what, L, seconds, allocated_cache_bytes(caches) // batch, peak))
        del caches
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


def dollars_per_mtok(seconds_per_token: float, price_per_hour: float) -> float:
    """$ per million tokens at ``price_per_hour`` for the device that ran at this speed."""
    return price_per_hour / 3600.0 * seconds_per_token * 1e6


# ----------------------------------------------------------------------------- the lab
@dataclasses.dataclass
class CostSettings:
    """What the cost lab measures. The CPU defaults finish in minutes on 2 cores."""

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
    decode_contexts: tuple[int, ...] = (4096, 16384, 65536, 131072)
    analytic_contexts: tuple[int, ...] = tuple(2**i for i in range(10, 21))  # 1K .. 1M
    batch: int = 1
    window: int = 512
    index_topk: int = 256
    device: str = "cpu"
    dtype: str = "float32"
    price_per_hour: float = 2.0  # $ per device-hour used for $/Mtok
    measure_presets: bool = True


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
    return ModelConfig(**base).validate()


def run_cost_lab(s: CostSettings, progress: Callable[[str], None] | None = None) -> dict:
    """Analytic and measured cost per mechanism (one layer) and per preset; returns a JSON-able dict."""
    say = progress or (lambda msg: None)
    device, dtype = torch.device(s.device), DTYPES[s.dtype]
    result: dict = {
        "settings": dataclasses.asdict(s),
        "device": _device_name(device),
        "mechanisms": {},
        "presets": {},
    }
    for letter in s.mechanisms:
        cfg = mechanism_config(letter, s)
        lc = ModelCost(cfg, dtype)
        entry: dict = {"name": LAYER_NAMES[letter], "impl": _impl_name(letter, device)}
        layer_cost = lc.layers[0]
        entry["analytic"] = {
            "context": list(s.analytic_contexts),
            "prefill_flops": [layer_cost.prefill_flops(cfg, L) for L in s.analytic_contexts],
            "decode_flops": [layer_cost.decode_flops(cfg, L) for L in s.analytic_contexts],
            "cache_bytes": [lc.specs[0].bytes_at(L) for L in s.analytic_contexts],
        }
        torch.manual_seed(0)
        runner = _Runner(build_layer(letter, cfg, 0), cfg, False, device, dtype)
        say(f"cost: {letter} ({LAYER_NAMES[letter]}) prefill")
        pre = measure(runner, s.prefill_contexts, "prefill", s.batch)
        say(f"cost: {letter} ({LAYER_NAMES[letter]}) decode")
        dec = measure(runner, s.decode_contexts, "decode", s.batch)
        entry["measured"] = {
            "prefill": [dataclasses.asdict(m) for m in pre],
            "decode": [dataclasses.asdict(m) for m in dec],
        }
        entry["exponents"] = _exponents(pre, dec)
        entry["exponents"]["analytic_decode_flops"] = fit_exponent(
            s.analytic_contexts[-4:], entry["analytic"]["decode_flops"][-4:]
        )
        entry["exponents"]["analytic_prefill_flops"] = fit_exponent(
            s.analytic_contexts[-4:], entry["analytic"]["prefill_flops"][-4:]
        )
        entry["dollars_per_mtok"] = _pricing(pre, dec, s)
        result["mechanisms"][letter] = entry
    for name in s.presets:
        cfg = ModelConfig.preset(name, d_model=s.d_model, n_layers=s.n_layers, vocab_size=s.vocab_size)
        mc = ModelCost(cfg, dtype)
        entry = {
            "pattern": cfg.layer_pattern,
            "params": mc.num_params,
            "analytic": {
                "context": list(s.analytic_contexts),
                "cache_bytes": [mc.cache_bytes(L) for L in s.analytic_contexts],
                "decode_bytes": [mc.decode_bytes(L) for L in s.analytic_contexts],
                "decode_flops": [mc.decode_flops(L) for L in s.analytic_contexts],
                "prefill_flops": [mc.prefill_flops(L) for L in s.analytic_contexts],
            },
        }
        if s.measure_presets:
            from .model import HybridLM

            torch.manual_seed(0)
            say(f"cost: preset {name}")
            runner = _Runner(HybridLM(cfg), cfg, True, device, dtype)
            ctx = s.decode_contexts[::2]
            dec = measure(runner, ctx, "decode", s.batch)
            entry["measured"] = {"decode": [dataclasses.asdict(m) for m in dec]}
            # decode caches hold context + 1 tokens: compare the declaration with what was allocated
            entry["memory_check"] = [
                {
                    "context": m.context,
                    "analytic_bytes": mc.cache_bytes(m.context + 1),
                    "allocated_bytes": m.cache_bytes,
                }
                for m in dec
                if m.cache_bytes is not None
            ]
        result["presets"][name] = entry
    return result


def _exponents(pre: list[Measurement], dec: list[Measurement]) -> dict:
    def fit(ms: list[Measurement]) -> float | None:
        ok = [m for m in ms if m.seconds]
        ok = ok[len(ok) // 3 :]  # the upper part of the range: fixed overheads fade there
        return fit_exponent([m.context for m in ok], [m.seconds for m in ok])

    return {"prefill": fit(pre), "decode": fit(dec)}


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
                "decode_exp": ex["decode"],
                "analytic_decode_exp": ex["analytic_decode_flops"],
            }
        )
    return rows


def format_table(result: dict) -> str:
    def f(x):
        return "  n/a" if x is None else f"{x:5.2f}"

    lines = [
        f"cost lab on {result['device']}: time vs context exponents (2 quadratic, 1 linear, 0 flat)",
        f"{'mechanism':<32}{'impl':<22}{'prefill':>8}{'decode':>8}{'decode (analytic)':>19}",
    ]
    for r in summary_rows(result):
        lines.append(
            f"{r['mechanism']:<32}{r['impl']:<22}{f(r['prefill_exp']):>8}{f(r['decode_exp']):>8}"
            f"{f(r['analytic_decode_exp']):>19}"
        )
    return "\n".join(lines)


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
                    label=f"{letter} {e['name']} ({e['exponents'][what] or 0:.2f})",
                )
    for ax, what in zip(axes, ("prefill (whole context)", "decode (one token)"), strict=False):
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(f"measured {what}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"one layer per mechanism on {result['device']} (fitted exponent in brackets)", fontsize=9)
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
        batch=args.batch,
        device=args.device,
        dtype=args.dtype,
        price_per_hour=args.price_per_hour,
        presets=tuple(args.presets.split(",")) if args.presets else (),
        measure_presets=not args.no_preset_timing,
    )
    out.mkdir(parents=True, exist_ok=True)
    result = run_cost_lab(s, progress=lambda m: print(m, flush=True))
    write_json_atomic(result, out / "cost.json")
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
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--price-per-hour", type=float, default=2.0, help="$ per device-hour for $/Mtok")
    p.set_defaults(func=_cmd_cost)
