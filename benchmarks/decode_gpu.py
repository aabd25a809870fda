"""Per-token decode latency and memory against context length, ours vs ``transformers``.

For each preset at about 1B parameters (bf16, batch 1) and each context length (4K .. 1M):

- **ours**: the decode step captured as a CUDA graph (:class:`attnlab.generate.DecodeStep`),
  replayed ``--steps`` times after the caches were filled to the context length (random cache
  contents and ``lengths = context``: decode reads the same bytes whatever they hold, and a
  real 1M-token prefill of the softmax presets would take most of the time budget); also the
  same step run eagerly.
- **transformers**: ``generate()`` on the same model (the HF model is built first and converted
  with :func:`attnlab.hf.from_hf`, so both run identical weights), with a real prompt of the
  context length; per-token time = (time of 1 + steps new tokens - time of 1) / steps.
  Contexts above ``--hf-max-context`` or that run out of memory are reported as skipped.
- **floor**: (weight bytes + cache bytes each token must read) / measured copy bandwidth.
  Weights exclude the embedding table unless tied (one row of it is read); DSA layers read
  all indexer keys but only ``index_topk`` latents; sliding windows read at most their window.

Usage (on an H100)::

    python benchmarks/decode_gpu.py                       # all presets, 4K..1M, results -> RESULTS.md
    python benchmarks/decode_gpu.py --presets qwen3-next --contexts 4096,32768 --no-hf
    python benchmarks/decode_gpu.py --tiny --device cpu   # a smoke run of the code on a CPU
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

from attnlab.config import ModelConfig
from attnlab.generate import DecodeStep, cache_nbytes
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
            hf = tf.AutoModelForCausalLM.from_config(hf_config(cfg, preset), dtype=dtype).eval()
            ours = llama_from_hf(hf, cfg) if preset == "llama" else from_hf(hf)
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


def fill_caches(caches, context: int) -> None:
    """Pretend every row holds ``context`` tokens: random float state, lengths = context."""
    for c in caches:
        for t in c.state_tensors().values():
            if t.is_floating_point():
                t.normal_(0, 0.02)
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


def time_ours(model: HybridLM, context: int, steps: int, device: str, dtype: torch.dtype, mode: str) -> dict:
    caches = model.new_caches(1, context + steps + 8, device=device, dtype=dtype)
    step = DecodeStep(model, caches, mode=mode)  # graph capture on fresh caches, then reset
    fill_caches(caches, context)
    tok = torch.zeros(1, dtype=torch.long, device=device)
    for _ in range(3):
        tok = step(tok).argmax(-1)
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        tok = step(tok).argmax(-1)
    sync(device)
    dt = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else float("nan")
    out = dict(ms=dt * 1e3, cache_bytes=cache_nbytes(caches), peak_bytes=peak)
    del step, caches
    return out


def time_hf(hf, context: int, steps: int, device: str) -> dict:
    prompt = torch.randint(0, hf.config.vocab_size, (1, context), device=device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        return time.perf_counter() - t

    run(2)  # warm-up
    t1 = run(1)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    tn = run(1 + steps)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else float("nan")
    return dict(ms=(tn - t1) / steps * 1e3, peak_bytes=peak)


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--contexts", default=",".join(str(c) for c in CONTEXTS))
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per measurement")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--mode", default=None, choices=("eager", "cuda_graph", "compile"),
                    help="our decode step (default: cuda_graph on CUDA, eager on CPU)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers generate()")
    ap.add_argument("--hf-max-context", type=int, default=131072)
    ap.add_argument("--eager-max-context", type=int, default=131072, help="time eager too, up to here")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a CPU smoke run of this script)")
    ap.add_argument("--bandwidth-bytes", type=int, default=4 << 30)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    ap.add_argument("--json", default=str(Path(__file__).with_name("decode_gpu.json")))
    args = ap.parse_args(argv)
    args.command = "python benchmarks/decode_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    dtype = getattr(torch, args.dtype)
    device = args.device
    mode = args.mode or ("cuda_graph" if device.startswith("cuda") else "eager")
    contexts = [int(c) for c in args.contexts.split(",")]
    bw = copy_bandwidth(device, args.bandwidth_bytes if not args.tiny else 1 << 24)
    card = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"{card}: copy bandwidth {bw / 1e12:.3f} TB/s; our decode mode {mode}")
    rows: list[dict] = []
    for preset in args.presets.split(","):
        ours, hf, note = build_models(preset, args.tiny, device, dtype, not args.no_hf)
        params = ours.num_params()
        for ctx in contexts:
            row = dict(preset=preset, params=params, context=ctx, note=note, card=card, mode=mode)
            w, c = bytes_read_per_token(ours, ctx, dtype)
            row.update(weight_bytes=w, cache_read_bytes=c, floor_ms=(w + c) / bw * 1e3)
            try:
                timed = time_ours(ours, ctx, args.steps, device, dtype, mode)
                row.update({f"ours_{k}": v for k, v in timed.items()})
                free(device)
                if mode != "eager" and ctx <= args.eager_max_context:
                    eager = time_ours(ours, ctx, max(4, args.steps // 8), device, dtype, "eager")
                    row["ours_eager_ms"] = eager["ms"]
            except torch.OutOfMemoryError:
                row["ours_ms"] = float("nan")
                row["ours_skip"] = "OOM"
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
            rows.append(row)
            print(json.dumps(row))
        del ours, hf
        free(device)
    write_results(rows, bw, card, args)
    return rows


def _fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write_results(rows: list[dict], bw: float, card: str, args) -> None:
    Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        f"## Decode latency vs context ({card}, {args.dtype}, batch 1, {time.strftime('%Y-%m-%d')})",
        "",
        f"`{args.command}` — copy bandwidth {bw / 1e12:.3f} TB/s; ours = decode step as "
        f"`{rows[0]['mode'] if rows else ''}`; floor = (weights + cache bytes read) / bandwidth.",
        "",
        "| preset | params | context | ours ms/tok | eager ms/tok | floor ms | ours/floor | HF ms/tok "
        "| HF/ours | cache MiB | peak MiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours, hfms = r.get("ours_ms"), r.get("hf_ms")
        ratio = ours / r["floor_ms"] if ours and not math.isnan(ours) else None
        speedup = hfms / ours if hfms and ours and not math.isnan(ours) else None
        hf_cell = _fmt(hfms) if hfms is not None else r.get("hf_skip", "—")[:48]
        cache_mib = r.get("ours_cache_bytes", float("nan")) / 2**20
        peak_mib = r.get("ours_peak_bytes", float("nan")) / 2**20
        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:,.1f}M | {r['context']:,} | {_fmt(ours)} | "
            f"{_fmt(r.get('ours_eager_ms'))} | {_fmt(r['floor_ms'], '.3f')} | {_fmt(ratio)}× | {hf_cell} | "
            f"{_fmt(speedup, '.1f')}{'×' if speedup else ''} | {_fmt(cache_mib, '.1f')} | "
            f"{_fmt(peak_mib, '.0f')} | {r['note']} |"
        )
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    prev = out.read_text() if out.exists() else "# Benchmark results\n"
    out.write_text(prev.rstrip("\n") + "\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
