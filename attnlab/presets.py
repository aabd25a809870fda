"""Presets: Python functions that build a :class:`ModelConfig` shaped like a published model,
sized by ``d_model``, ``n_layers`` and ``vocab_size`` (torchtitan style: a function per
family, variants by changing a few fields).

Shapes keep the published model's *ratios* (GQA groups, head dims, partial RoPE, key:value
heads, layer pattern) at any size; absolute sizes scale with ``d_model``. Any field can be
overridden: ``ModelConfig.preset("qwen3-next", d_model=512, window=64)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .config import ModelConfig


def _head_dim(d_model: int) -> int:
    """64 (the usual head size) for d_model >= 128; smaller models get 4 heads."""
    return 64 if d_model >= 128 else max(8, d_model // 4)


def _heads(d_model: int) -> int:
    return max(1, d_model // _head_dim(d_model))


def llama(d_model: int = 256, n_layers: int = 4, vocab_size: int = 512) -> ModelConfig:
    """All ``S``: GQA softmax attention with 4 query heads per KV head (Llama 3 ratio)."""
    h = _heads(d_model)
    return ModelConfig(
        pattern="S", d_model=d_model, n_layers=n_layers, vocab_size=vocab_size,
        n_heads=h, n_kv_heads=max(1, h // 4), rope_theta=500000.0,
    )


def swa(d_model: int = 256, n_layers: int = 4, vocab_size: int = 512) -> ModelConfig:
    """Local:global 3:1 (``WWWS``; Gemma 2/3, Mistral-style sliding windows), window 128
    (scaled down from the published 4096 so that small-context tasks reach past it)."""
    return dataclasses.replace(llama(d_model, n_layers, vocab_size), pattern="WWWS", window=128)


def deepseek_v3(d_model: int = 256, n_layers: int = 4, vocab_size: int = 512) -> ModelConfig:
    """All ``M``: MLA with q LoRA, decoupled RoPE key (interleaved), kv_lora_rank = d_model / 4
    (V3: 512 / 7168 is smaller, but tiny models need room), rope 16 / nope 32 / v 32 per head
    (V3: 64 / 128 / 128, the same 1:2:2)."""
    h = _heads(d_model)
    return ModelConfig(
        pattern="M", d_model=d_model, n_layers=n_layers, vocab_size=vocab_size, n_heads=h,
        q_lora_rank=d_model // 2, kv_lora_rank=max(16, d_model // 4),
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, mla_use_rope=True, rope_interleave=True,
    )


def deepseek_v32(d_model: int = 256, n_layers: int = 4, vocab_size: int = 512) -> ModelConfig:
    """All ``D``: V3's MLA plus the lightning indexer (V3.2: 64 heads x 128, top-2048; here
    4 x 32 and top-128 so that selection is sparse at the contexts small models see)."""
    return dataclasses.replace(
        deepseek_v3(d_model, n_layers, vocab_size),
        pattern="D", index_n_heads=4, index_head_dim=32, index_topk=128,
    )


def minimax_01(d_model: int = 256, n_layers: int = 8, vocab_size: int = 512) -> ModelConfig:
    """``LLLLLLLS``: seven lightning layers per softmax layer (MiniMax-Text-01). Its residual
    is post-norm with DeepNorm scaling alpha = (2 * n_layers) ** 0.25 (Text-01: 80 layers,
    alpha 3.5566, beta 1), GQA 8:1, RoPE on half of each head (rotary_dim 64 of 128),
    theta 1e7, lightning block size 256."""
    h = _heads(d_model)
    alpha = (2 * n_layers) ** 0.25
    return ModelConfig(
        pattern="LLLLLLLS", d_model=d_model, n_layers=n_layers, vocab_size=vocab_size,
        n_heads=h, n_kv_heads=max(1, h // 8), rope_fraction=0.5, rope_theta=1e7, block_size=256,
        postnorm=True, attn_alpha=alpha, attn_beta=1.0, linear_alpha=alpha, linear_beta=1.0,
        mlp_alpha=alpha, mlp_beta=1.0, norm_eps=1e-5,
    )


def qwen3_next(d_model: int = 256, n_layers: int = 4, vocab_size: int = 512) -> ModelConfig:
    """``GGGS``: three gated-DeltaNet layers per gated softmax layer (Qwen3-Next). Zero-centered
    (1 + w) RMSNorm; attention with sigmoid output gate, q/k norm, RoPE on a quarter of each
    head, theta 1e7, GQA 8:1; DeltaNet with twice as many value heads as key heads."""
    h, hd = _heads(d_model), _head_dim(d_model)
    return ModelConfig(
        pattern="GGGS", d_model=d_model, n_layers=n_layers, vocab_size=vocab_size,
        norm_zero_centered=True, n_heads=h, n_kv_heads=max(1, h // 8), rope_fraction=0.25,
        rope_theta=1e7, attn_output_gate=True, qk_norm=True,
        linear_n_heads=h, linear_n_key_heads=max(1, h // 2),
        linear_key_head_dim=hd, linear_value_head_dim=hd, conv_kernel=4,
    )


def kimi_linear(d_model: int = 256, n_layers: int = 4, vocab_size: int = 512) -> ModelConfig:
    """``KKKM``: three Kimi-delta-attention layers per MLA layer (Kimi Linear). Its MLA has no
    q LoRA and applies no rotary embedding (NoPE: the "rope" key dims exist but are not
    rotated); KDA has as many key heads as value heads."""
    h, hd = _heads(d_model), _head_dim(d_model)
    return dataclasses.replace(
        deepseek_v3(d_model, n_layers, vocab_size), pattern="KKKM", q_lora_rank=None, mla_use_rope=False,
        linear_n_heads=h, linear_n_key_heads=h, linear_key_head_dim=hd, linear_value_head_dim=hd,
        conv_kernel=4,
    )


def lightning(d_model: int = 256, n_layers: int = 4, vocab_size: int = 512) -> ModelConfig:
    """All ``L``: the pure lightning-attention model MiniMax-01's softmax layers repair."""
    return ModelConfig(pattern="L", d_model=d_model, n_layers=n_layers, vocab_size=vocab_size,
                       n_heads=_heads(d_model), block_size=256)


def gdn(d_model: int = 256, n_layers: int = 4, vocab_size: int = 512) -> ModelConfig:
    """All ``G``: the pure gated-DeltaNet model (Qwen3-Next's linear layers alone)."""
    return dataclasses.replace(qwen3_next(d_model, n_layers, vocab_size), pattern="G")


def kda(d_model: int = 256, n_layers: int = 4, vocab_size: int = 512) -> ModelConfig:
    """All ``K``: the pure Kimi-delta-attention model (Kimi Linear's linear layers alone)."""
    return dataclasses.replace(kimi_linear(d_model, n_layers, vocab_size), pattern="K")


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "llama": llama,
    "swa": swa,
    "deepseek-v3": deepseek_v3,
    "deepseek-v32": deepseek_v32,
    "minimax-01": minimax_01,
    "qwen3-next": qwen3_next,
    "kimi-linear": kimi_linear,
    "lightning": lightning,
    "gdn": gdn,
    "kda": kda,
}

_SIZE_ARGS = ("d_model", "n_layers", "vocab_size")


def preset_names() -> list[str]:
    return list(PRESETS)


def build_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset ``name`` sized by ``d_model`` / ``n_layers`` / ``vocab_size`` (head counts and
    widths follow ``d_model``), then any other ModelConfig field overridden; validated."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"preset {name!r}: unknown field(s) {', '.join(unknown)} (not ModelConfig fields)")
    sizes = {k: overrides.pop(k) for k in _SIZE_ARGS if k in overrides}
    cfg = PRESETS[name](**sizes)
    return dataclasses.replace(cfg, **overrides).validate()
