"""Per-token decode latency and memory against context length, ours vs ``transformers``.

For each preset at about 1B parameters (bf16, batch 1) and each context length (4K .. 1M):

- **ours**: the decode step (:class:`attnlab.generate.DecodeStep`) in each of ``--modes``:
  ``cuda_graph`` (captured once per context, on caches sized for it) and ``compile``
  (``torch.compile`` reduce-overhead, fullgraph; compiled ONCE per preset over caches sized for the
  longest context, so a preset costs one compile, not one per context: the softmax/MLA decode
  kernels read only up to each row's length, so the bigger buffer does not change the bytes read;
  presets with DSA layers, whose indexer scores every slot of the buffer inside a graph, are
  compiled per context instead). Each is replayed ``--steps`` times after the caches were filled
  to the context length (random cache contents and ``lengths = context``: decode reads the same
  bytes whatever they hold, and a real 1M-token prefill of the softmax presets would take most of
  the time budget). A token is the step and its greedy choice (``DecodeStep(greedy=True)``: the
  argmax inside the graph), as :func:`attnlab.generate.generate` decodes greedily. ``ours`` is the
  best mode (named in the row); the same step is also run eagerly.
- **transformers**: ``generate()`` on the same model (the HF model is built first and converted
  with :func:`attnlab.hf.from_hf`, so both run identical weights), with a real prompt of the
  context length; per-token time = the median interval between successive new tokens inside one
  ``generate(max_new_tokens=1 + steps)`` call, stamped by a streamer (prefill excluded).
  Contexts above ``--hf-max-context`` or that run out of memory are reported as skipped.
- **floor**: (weight bytes + cache bytes each token must read) / measured copy bandwidth.
  Weights exclude the embedding table unless tied (one row of it is read); DSA layers read
  all indexer keys but only ``index_topk`` latents; sliding windows read at most their window.

Usage (on an H100)::

    python benchmarks/decode_gpu.py                       # all presets, 4K..1M, results -> RESULTS.md
    python benchmarks/decode_gpu.py --presets qwen3-next --contexts 4096,32768 --no-hf
    python benchmarks/decode_gpu.py --tiny --device cpu   # a smoke run of the code on a CPU
    python benchmarks/decode_gpu.py --presets llama --contexts 4096 --profile   # + top kernels of a step

Each row is printed as soon as it is measured and the JSON (``--json``) is rewritten atomically
after every row, so a run cut short keeps what it measured; the Markdown table is appended to
``--out`` at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

from attnlab._io import atomic_write_json, atomic_write_text
from attnlab.config import ModelConfig
from attnlab.generate import DecodeStep, cache_nbytes, decode_one_token
from attnlab.layers import fused
from attnlab.model import HybridLM

PRESETS = ["llama", "swa", "deepseek-v3", "deepseek-v32", "minimax-01", "qwen3-next", "kimi-linear",
           "lightning", "gdn", "kda"]
CONTEXTS = [4096, 32768, 131072, 262144, 1048576]
# ~1B parameters: d_model 2048, 16 layers (every preset pattern tiles 16), 32K vocabulary.
SIZE_1B = dict(d_model=2048, n_layers=16, vocab_size=32768)
# published-scale knobs the small-model presets scale down
EXTRA_1B = {
    "swa": dict(window=4096),
    "deepseek-v3": dict(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_heads=16),
    "deepseek-v32": dict(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_heads=16,
                         index_n_heads=64, index_head_dim=128, index_topk=2048),
    "kimi-linear": dict(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_heads=16,
                        linear_key_head_dim=128, linear_value_head_dim=128, linear_n_heads=16,
                        linear_n_key_heads=16),
    "kda": dict(linear_key_head_dim=128, linear_value_head_dim=128, linear_n_heads=16, linear_n_key_heads=16),
    "qwen3-next": dict(linear_key_head_dim=128, linear_value_head_dim=128, linear_n_heads=32,
                       linear_n_key_heads=16),
    "gdn": dict(linear_key_head_dim=128, linear_value_head_dim=128, linear_n_heads=32, linear_n_key_heads=16),
}
SIZE_TINY = dict(d_model=64, n_layers=8, vocab_size=256)
EXTRA_TINY = {"swa": dict(window=16), "deepseek-v32": dict(index_topk=16), "minimax-01": dict(block_size=16),
              "lightning": dict(block_size=16)}


# ----------------------------------------------------------------------------- models
def our_config(preset: str, tiny: bool) -> ModelConfig:
    size, extra = (SIZE_TINY, EXTRA_TINY) if tiny else (SIZE_1B, EXTRA_1B)
    return ModelConfig.preset(preset, **size, **extra.get(preset, {}))


def hf_config(cfg: ModelConfig, preset: str):
    """A transformers config of the family a preset belongs to, with dense MLPs and the same
    sizes (None where transformers has no such family). The model is converted to ours with
    ``from_hf``, so this only needs to be a valid, similar-sized HF model."""
    import transformers as tf

    n, d, v, ff = cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.ff_dim
    common = dict(vocab_size=v, hidden_size=d, intermediate_size=ff, num_hidden_layers=n,
                  num_attention_heads=cfg.n_heads, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    pattern = cfg.layer_pattern
    if preset in ("qwen3-next", "gdn"):
        return tf.Qwen3NextConfig(
            **common, num_key_value_heads=cfg.kv_heads, head_dim=cfg.attn_head_dim,
            linear_num_value_heads=cfg.linear_heads, linear_num_key_heads=cfg.linear_key_heads,
            linear_key_head_dim=cfg.linear_key_head_dim, linear_value_head_dim=cfg.linear_value_head_dim,
            linear_conv_kernel_dim=cfg.conv_kernel, mlp_only_layers=list(range(n)),
            layer_types=["linear_attention" if c == "G" else "full_attention" for c in pattern],
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                             "partial_rotary_factor": cfg.rope_fraction},
        )
    if preset in ("minimax-01", "lightning"):
        return tf.MiniMaxConfig(
            **common, num_key_value_heads=cfg.kv_heads, head_dim=cfg.attn_head_dim, num_local_experts=1,
            num_experts_per_tok=1, block_size=cfg.block_size,
            layer_types=["linear_attention" if c == "L" else "full_attention" for c in pattern],
        )
    mla = dict(kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank,
               qk_rope_head_dim=cfg.qk_rope_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
               v_head_dim=cfg.v_head_dim, num_key_value_heads=cfg.n_heads)
    if preset in ("kimi-linear", "kda"):
        return tf.KimiLinearConfig(
            **common, **mla, mlp_layer_types=["dense"] * n, linear_num_heads=cfg.linear_heads,
            linear_head_dim=cfg.linear_key_head_dim, linear_conv_kernel_dim=cfg.conv_kernel,
            layer_types=["linear_attention" if c == "K" else "full_attention" for c in pattern],
        )
    if preset == "deepseek-v3":
        return tf.DeepseekV3Config(**common, **mla, first_k_dense_replace=n, n_routed_experts=1,
                                   num_experts_per_tok=1, n_group=1, topk_group=1)
    if preset == "deepseek-v32":
        return tf.DeepseekV32Config(**common, **mla, mlp_layer_types=["dense"] * n, n_routed_experts=1,
                                    num_experts_per_tok=1, n_group=1, topk_group=1, index_topk=cfg.index_topk,
                                    index_head_dim=cfg.index_head_dim, index_n_heads=cfg.index_n_heads)
    if preset == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=cfg.kv_heads, head_dim=cfg.attn_head_dim,
                              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    return None


def llama_from_hf(hf, cfg: ModelConfig) -> HybridLM:
    """Ours with the weights of a transformers Llama (attnlab.hf converts the five hybrid
    families only; a Llama maps one to one onto the ``S`` preset)."""
    ours = HybridLM(cfg)
    with torch.no_grad():
        ours.embed.weight.copy_(hf.model.embed_tokens.weight)
        for block, layer in zip(ours.blocks, hf.model.layers, strict=True):
            block.mixer_norm.weight.copy_(layer.input_layernorm.weight)
            block.mixer.load_from_hf(layer.self_attn)
            block.mlp_norm.weight.copy_(layer.post_attention_layernorm.weight)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(block.mlp, name).weight.copy_(getattr(layer.mlp, name).weight)
        ours.norm.weight.copy_(hf.model.norm.weight)
        ours.lm_head.weight.copy_(hf.lm_head.weight)
    return ours


def build_models(preset: str, tiny: bool, device: str, dtype: torch.dtype, with_hf: bool):
    """(ours, hf or None, note): ours converted from the HF model where a family exists."""
    cfg = our_config(preset, tiny)
    hf, note = None, "ours only (no transformers family)" if with_hf else "ours only (--no-hf)"
    if with_hf and hf_config(cfg, preset) is not None:
        import transformers as tf

        from attnlab.hf import from_hf

        torch.manual_seed(0)
        with torch.device(device):  # initialise on the device: a 1B model is slow to init on a CPU
            # built and converted in float32, then cast: a bf16 HF model holds rounded buffers (MiniMax's
            # decay slopes) that from_hf rightly refuses as not matching the layer
            hf = tf.AutoModelForCausalLM.from_config(hf_config(cfg, preset), dtype=torch.float32).eval()
            ours = llama_from_hf(hf, cfg) if preset == "llama" else from_hf(hf)
            hf = hf.to(dtype=dtype)
            ours = ours.to(device=device, dtype=dtype).eval()
        x = torch.randint(0, cfg.vocab_size, (1, 64), device=device)
        with torch.no_grad():
            ref, out = hf(x, use_cache=False).logits.float(), ours(x)
        err = float((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
        note = f"converted from transformers (logits rms-rel {err:.1e})"
    else:
        torch.manual_seed(0)
        with torch.device(device):
            ours = HybridLM(cfg).to(dtype=dtype).eval()
    return ours, hf, note


# ----------------------------------------------------------------------------- measurements
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Device memory bandwidth in bytes/s from a large copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    dt = (time.perf_counter() - t) / reps
    del src, dst
    return 2 * nbytes / dt


def fill_caches(caches, context: int | None = None) -> None:
    """Random float state; with ``context``, pretend every row holds that many tokens."""
    for c in caches:
        for t in c.state_tensors().values():
            if t.is_floating_point():
                t.normal_(0, 0.02)
        if context is not None:
            c.lengths.fill_(context)


def set_lengths(caches, context: int) -> None:
    for c in caches:
        c.lengths.fill_(context)


def bytes_read_per_token(model: HybridLM, context: int, dtype: torch.dtype) -> tuple[int, int]:
    """(weight bytes, cache bytes) one decode token must read at ``context``."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.cfg.tie_embeddings:
        weights -= model.embed.weight.numel() * model.embed.weight.element_size()  # one row is read
    cache = 0
    for block, spec in zip(model.blocks, model.cache_specs(dtype), strict=True):
        one = block.mixer.new_cache(1, 1, dtype=dtype)  # a 1-token cache: per-token bytes
        if hasattr(one, "index_keys"):
            # DSA: indexer keys of every token, then only the top-k selected latents (+ rope keys)
            index_per_token = one.index_keys.numel() * one.index_keys.element_size()
            latent_per_token = spec.bytes_per_token - index_per_token
            cache += index_per_token * context + latent_per_token * min(context, model.cfg.index_topk)
            cache += spec.constant_bytes
        else:
            cache += spec.bytes_at(context)
    return weights, cache


def greedy_step(step, tok: torch.Tensor) -> torch.Tensor:
    """One greedy decode token as generation runs it (:func:`attnlab.generate.decode_one_token`): the
    step, then its argmax (the step's own with greedy=True, inside the CUDA graph in that mode)."""
    return decode_one_token(step.model, tok, step.caches, step=step)[0]


def time_step(step, caches, context: int, steps: int, device: str) -> dict:
    """Per-token time of ``step`` with the caches' lengths set to ``context`` (3 warm-up steps,
    which also compile a fresh compiled step); lengths are restored after, so a shared step can be
    timed again at another context."""
    set_lengths(caches, context)
    tok = torch.zeros(caches[0].lengths.shape[0], dtype=torch.long, device=device)
    t0 = time.perf_counter()
    for _ in range(3):
        tok = greedy_step(step, tok)
    sync(device)
    warm_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        tok = greedy_step(step, tok)
    sync(device)
    dt = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else float("nan")
    set_lengths(caches, context)
    return dict(ms=dt * 1e3, warmup_s=warm_s, cache_bytes=cache_nbytes(caches), peak_bytes=peak)


def time_ours(model: HybridLM, context: int, steps: int, device: str, dtype: torch.dtype, mode: str) -> dict:
    """A step of ``mode`` over fresh caches sized for ``context`` (eager / cuda_graph / compile, or
    cuda_graph_plain: the CUDA graph of the step without the fused decode kernels,
    attnlab.layers.fused, for a side-by-side of what they gain)."""
    if mode == "compile":
        reset_compile()
    plain = mode == "cuda_graph_plain"
    before = fused.ENABLED
    fused.ENABLED = before and not plain
    try:
        caches = model.new_caches(1, context + steps + 8, device=device, dtype=dtype)
        # graph capture on fresh caches, then reset
        step = DecodeStep(model, caches, mode="cuda_graph" if plain else mode, greedy=True)
        fill_caches(caches)
        out = time_step(step, caches, context, steps, device)
    finally:
        fused.ENABLED = before
    del step, caches
    return out


class SharedCompiledStep:
    """One compiled DecodeStep per preset over caches sized for the longest context, timed at
    every context by setting the lengths (one compile per preset instead of one per context)."""

    def __init__(self, model: HybridLM, max_context: int, steps: int, device: str, dtype: torch.dtype):
        reset_compile()
        self.caches = model.new_caches(1, max_context + steps + 8, device=device, dtype=dtype)
        fill_caches(self.caches)
        self.step = DecodeStep(model, self.caches, mode="compile", greedy=True)

    def time(self, context: int, steps: int, device: str) -> dict:
        return time_step(self.step, self.caches, context, steps, device)


def reset_compile() -> None:
    """A fresh start for the next compiled step: dynamo's caches (it caps recompiles of one code
    object) and its counters (so compile_counters() reports this step's)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def compile_counters() -> dict:
    """Inductor's cudagraph skips and dynamo's graph breaks so far (a skipped cudagraph means the
    compiled step launched its kernels one by one)."""
    from torch._dynamo.utils import counters

    out = {}
    skips = counters.get("inductor", {}).get("cudagraph_skips", 0)
    if skips:
        out["compile_cudagraph_skips"] = skips
    breaks = sum(counters.get("graph_break", {}).values())
    if breaks:
        out["compile_graph_breaks"] = breaks
    return out


def profile_step(model: HybridLM, context: int, device: str, dtype: torch.dtype, top: int = 15) -> None:
    """Print the kernel count and the top kernels of ONE eager decode step (the kernels a CUDA graph
    of the step replays; on the CPU: aten ops) at ``context``."""
    from torch.profiler import ProfilerActivity, profile

    caches = model.new_caches(1, context + 16, device=device, dtype=dtype)
    fill_caches(caches, context)
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        for _ in range(2):
            model(tok, caches)
        sync(device)
        cuda = device.startswith("cuda")
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            model(tok, caches)
            sync(device)
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(e.time_range.elapsed_us() for e in kernels)
        print(f"profile: one eager decode step at context {context}: {len(kernels)} GPU kernels "
              f"({len(kernels) / model.cfg.n_layers:.1f} per layer), {total_us / 1e3:.3f} ms of kernel time")
        sorts = ("self_device_time_total", "self_cuda_time_total")
    else:
        ops = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
        print(f"profile: one eager decode step at context {context}: {len(ops)} top-level aten ops (CPU)")
        sorts = ("self_cpu_time_total",)
    for sort_by in sorts:
        try:
            print(prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=70))
            break
        except Exception as e:  # an older/newer profiler without this sort key
            print(f"(profile table sorted by {sort_by} failed: {type(e).__name__}: {e})")
    del caches


def time_hf(hf, context: int, steps: int, device: str) -> dict:
    """transformers ``generate()`` on a real prompt of ``context`` tokens: per-token decode time =
    the median interval between successive new tokens, stamped by a streamer inside ONE generate
    call (the prefill is excluded, so its run-to-run variance cannot swamp the decode steps, as the
    earlier difference of two generate calls did at 131K: it came out negative)."""
    from transformers.generation.streamers import BaseStreamer

    prompt = torch.randint(0, hf.config.vocab_size, (1, context), device=device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:  # called with the prompt, then with each new token
            sync(device)
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(n: int) -> list[float]:
        stamps = Stamps()
        with torch.no_grad():
            hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, streamer=stamps, **kw)
        return stamps.times

    run(2)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = run(1 + steps)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else float("nan")
    # times[0]: the prompt; times[1]: the first new token (after prefill); then one per decode step
    gaps = sorted(b - a for a, b in zip(times[1:], times[2:], strict=False))
    if not gaps:
        raise RuntimeError(f"transformers generate() streamed {len(times)} stamps for {1 + steps} tokens")
    return dict(ms=gaps[len(gaps) // 2] * 1e3, peak_bytes=peak, decode_steps_timed=len(gaps))


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--contexts", default=None, help="default: 4K..1M (--tiny: 64,256)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per measurement")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--modes", default=None,
                    help="our decode step modes to time, comma-separated from eager, cuda_graph, compile, "
                         "cuda_graph_plain (no fused kernels) (default: cuda_graph,compile on CUDA, "
                         "eager on the CPU); the best is reported")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers generate()")
    ap.add_argument("--hf-max-context", type=int, default=131072)
    ap.add_argument("--eager-max-context", type=int, default=131072, help="time eager too, up to here")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a CPU smoke run of this script)")
    ap.add_argument("--profile", action="store_true",
                    help="print the kernel count and top kernels of one eager step (first preset, context)")
    ap.add_argument("--bandwidth-bytes", type=int, default=4 << 30)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    ap.add_argument("--json", default=str(Path(__file__).with_name("decode_gpu.json")))
    args = ap.parse_args(argv)
    args.command = "python benchmarks/decode_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    dtype = getattr(torch, args.dtype)
    device = args.device
    cuda = device.startswith("cuda")
    modes = (args.modes or ("cuda_graph,compile" if cuda else "eager")).split(",")
    for m in modes:
        if m not in ("eager", "cuda_graph", "compile", "cuda_graph_plain"):
            ap.error(f"--modes: unknown mode {m!r} (eager, cuda_graph, compile, cuda_graph_plain)")
    default_contexts = "64,256" if args.tiny else ",".join(map(str, CONTEXTS))
    contexts = [int(c) for c in (args.contexts or default_contexts).split(",")]
    bw = copy_bandwidth(device, args.bandwidth_bytes if not args.tiny else 1 << 24)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{card}: copy bandwidth {bw / 1e12:.3f} TB/s; our decode modes {', '.join(modes)}", flush=True)
    args.modes_list = modes
    rows: list[dict] = []
    t_start = time.perf_counter()
    for p_i, preset in enumerate(args.presets.split(",")):
        ours, hf, note = build_models(preset, args.tiny, device, dtype, not args.no_hf)
        params = ours.num_params()
        if args.profile and p_i == 0:
            profile_step(ours, contexts[0], device, dtype)
            free(device)
        shared = None  # one compiled step for all contexts (not for DSA: its indexer reads the whole buffer)
        share_compile = "compile" in modes and "D" not in ours.cfg.layer_pattern
        for ctx in contexts:
            row = dict(preset=preset, params=params, context=ctx, note=note, card=card)
            w, c = bytes_read_per_token(ours, ctx, dtype)
            row.update(weight_bytes=w, cache_read_bytes=c, floor_ms=(w + c) / bw * 1e3)
            for mode in modes:
                try:
                    if mode == "compile" and share_compile:
                        if shared is None:
                            t0 = time.perf_counter()
                            shared = SharedCompiledStep(ours, max(contexts), args.steps, device, dtype)
                            row["compile_build_s"] = time.perf_counter() - t0
                        timed = shared.time(ctx, args.steps, device)
                        timed["cache_bytes"] = None  # sized for the longest context: not this row's
                    else:
                        timed = time_ours(ours, ctx, args.steps, device, dtype, mode)
                    row[f"ours_{mode}_ms"] = timed["ms"]
                    row[f"ours_{mode}_warmup_s"] = timed["warmup_s"]
                    if timed["cache_bytes"] is not None:
                        row.setdefault("ours_cache_bytes", timed["cache_bytes"])
                    row[f"ours_{mode}_peak_bytes"] = timed["peak_bytes"]
                    if mode == "compile":
                        row.update(compile_counters())
                except torch.OutOfMemoryError:
                    row[f"ours_{mode}_skip"] = "OOM"
                except Exception as e:  # one mode failing (e.g. compile) must not lose the others
                    row[f"ours_{mode}_skip"] = f"fails: {type(e).__name__}: {str(e)[:200]}"
                    if mode == "compile":
                        shared, share_compile = None, False
                free(device)
            timed_modes = [m for m in modes if f"ours_{m}_ms" in row]
            if timed_modes:
                best = min(timed_modes, key=lambda m: row[f"ours_{m}_ms"])
                row.update(ours_ms=row[f"ours_{best}_ms"], ours_mode=best,
                           ours_peak_bytes=row[f"ours_{best}_peak_bytes"])
            else:
                row.update(ours_ms=float("nan"), ours_mode=None)
            if "eager" not in modes and ctx <= args.eager_max_context:
                try:
                    eager = time_ours(ours, ctx, max(4, args.steps // 8), device, dtype, "eager")
                    row["ours_eager_ms"] = eager["ms"]
                except torch.OutOfMemoryError:
                    row["ours_eager_skip"] = "OOM"
                free(device)
            if hf is not None and ctx <= args.hf_max_context:
                try:
                    timed = time_hf(hf, ctx, max(4, args.steps // 4), device)
                    row.update({f"hf_{k}": v for k, v in timed.items()})
                except torch.OutOfMemoryError:
                    row["hf_skip"] = "OOM"
                except Exception as e:  # e.g. transformers' cache API rejects an all-linear Qwen3-Next
                    row["hf_skip"] = f"fails: {type(e).__name__}: {str(e)[:80]}"
                free(device)
            elif hf is not None:
                row["hf_skip"] = f"> --hf-max-context {args.hf_max_context}"
            row["elapsed_s"] = time.perf_counter() - t_start
            rows.append(row)
            print(json.dumps(row), flush=True)
            atomic_write_json(args.json, rows)  # after every row: a run cut short keeps what it measured
        del ours, hf, shared
        free(device)
    write_results(rows, bw, card, args)
    return rows


def _fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _mode_cell(r: dict, mode: str) -> str:
    if f"ours_{mode}_ms" in r:
        return _fmt(r[f"ours_{mode}_ms"])
    return r.get(f"ours_{mode}_skip", "—")[:40]


def write_results(rows: list[dict], bw: float, card: str, args) -> None:
    atomic_write_json(args.json, rows)
    modes = getattr(args, "modes_list", ["cuda_graph"])
    lines = [
        f"## Decode latency vs context ({card}, {args.dtype}, batch 1, {time.strftime('%Y-%m-%d')})",
        "",
        f"`{args.command}` — copy bandwidth {bw / 1e12:.3f} TB/s; ours = the best of the decode step's "
        f"modes ({', '.join(modes)}); floor = (weights + cache bytes read) / bandwidth.",
        "",
        "| preset | params | context | ours ms/tok | best mode | "
        + " | ".join(f"{m} ms" for m in modes)
        + " | eager ms/tok | floor ms | ours/floor | HF ms/tok | HF/ours | cache MiB | peak MiB | note |",
        "|" + "---|" * (14 + len(modes) - 1),
    ]
    for r in rows:
        ours, hfms = r.get("ours_ms"), r.get("hf_ms")
        ratio = ours / r["floor_ms"] if ours and not math.isnan(ours) else None
        speedup = hfms / ours if hfms and ours and not math.isnan(ours) else None
        hf_cell = _fmt(hfms) if hfms is not None else r.get("hf_skip", "—")[:48]
        cache_mib = (r.get("ours_cache_bytes") or float("nan")) / 2**20
        peak_mib = (r.get("ours_peak_bytes") or float("nan")) / 2**20
        mode_cells = " | ".join(_mode_cell(r, m) for m in modes)
        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:,.1f}M | {r['context']:,} | {_fmt(ours)} | "
            f"{r.get('ours_mode') or '—'} | {mode_cells} | "
            f"{_fmt(r.get('ours_eager_ms'))} | {_fmt(r['floor_ms'], '.3f')} | {_fmt(ratio)}× | {hf_cell} | "
            f"{_fmt(speedup, '.1f')}{'×' if speedup else ''} | {_fmt(cache_mib, '.1f')} | "
            f"{_fmt(peak_mib, '.0f')} | {r['note']} |"
        )
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    prev = out.read_text() if out.exists() else "# Benchmark results\n"
    atomic_write_text(out, prev.rstrip("\n") + "\n\n" + text)  # RESULTS.md is never left half-written
    print(text)


if __name__ == "__main__":
    main()
