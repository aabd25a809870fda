"""Qwen3-Next (``model_type="qwen3_next"``) -> HybridLM.

Layers: ``linear_attention`` -> ``G`` (gated DeltaNet, its weights unpacked by
``GatedDeltaNet.load_from_hf``), ``full_attention`` -> ``S`` with the sigmoid output gate,
per-head q/k RMSNorm and partial RoPE. Every RMSNorm outside the DeltaNet output norm is
zero-centered, ``x_hat * (1 + w)``. Only dense-MLP layers convert: a layer is dense when it
is in ``mlp_only_layers``, or ``num_experts == 0``, or ``(i + 1) % decoder_sparse_step != 0``
(the rule of ``Qwen3NextDecoderLayer``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import ModelConfig
from ..model import HybridLM
from . import (
    base_fields,
    check_silu_mlp,
    load_dense_mlp,
    load_shared_parts,
    new_model,
    pattern_from_layer_types,
    rope_params,
    rope_theta,
    unsupported,
)

MODEL_TYPE = "qwen3_next"
LAYER_LETTERS = {"linear_attention": "G", "full_attention": "S"}


def _moe_layers(c: Any) -> list[int]:
    only = set(getattr(c, "mlp_only_layers", None) or [])
    n_exp = getattr(c, "num_experts", 0) or 0
    step = getattr(c, "decoder_sparse_step", 1) or 1
    return [i for i in range(c.num_hidden_layers) if i not in only and n_exp > 0 and (i + 1) % step == 0]


def config_from_hf(c: Any) -> ModelConfig:
    """ModelConfig for a transformers ``Qwen3NextConfig``; ValueError on what we don't convert."""
    moe = _moe_layers(c)
    if moe:
        raise unsupported(
            MODEL_TYPE, f"layers {moe} are sparse MoE blocks and attnlab has dense MLPs only",
            f"set mlp_only_layers=list(range({c.num_hidden_layers})) (or num_experts=0)",
        )
    check_silu_mlp(c, MODEL_TYPE)
    if getattr(c, "attention_bias", False):
        raise unsupported(MODEL_TYPE, "attention_bias=True", "use attention_bias=False (no bias in attnlab)")
    rp = rope_params(c)
    if rp.get("rope_type", "default") != "default":
        raise unsupported(MODEL_TYPE, f"rope_type={rp.get('rope_type')!r}", "use the default RoPE")
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    frac = float(rp.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)))
    if int(head_dim * frac) % 2:
        raise unsupported(
            MODEL_TYPE, f"head_dim * partial_rotary_factor = {head_dim * frac} rotated dims is odd",
            "choose an even number of rotated dims",
        )
    pattern = pattern_from_layer_types(MODEL_TYPE, c.layer_types, LAYER_LETTERS, c.num_hidden_layers)
    cfg = ModelConfig(
        pattern=pattern,
        **base_fields(c),
        norm_zero_centered=True,
        n_heads=int(c.num_attention_heads),
        n_kv_heads=int(c.num_key_value_heads),
        head_dim=head_dim,
        rope_theta=rope_theta(c),
        rope_fraction=frac,
        attn_output_gate=True,
        qk_norm=True,
        linear_n_heads=int(c.linear_num_value_heads),
        linear_n_key_heads=int(c.linear_num_key_heads),
        linear_key_head_dim=int(c.linear_key_head_dim),
        linear_value_head_dim=int(c.linear_value_head_dim),
        conv_kernel=int(c.linear_conv_kernel_dim),
    )
    if cfg.rope_dim != int(head_dim * frac):
        raise unsupported(
            MODEL_TYPE, f"RoPE would rotate {cfg.rope_dim} dims, HF rotates {int(head_dim * frac)}",
            "choose head_dim * partial_rotary_factor as an even integer",
        )
    return cfg.validate()


def convert(hf_model: nn.Module) -> HybridLM:
    """Qwen3NextForCausalLM -> HybridLM with the same weights and logits."""
    cfg = config_from_hf(hf_model.config)
    ours = new_model(cfg, hf_model)
    fix = f"set mlp_only_layers=list(range({cfg.n_layers}))"

    def mlp_loader(mlp: nn.Module, layer: nn.Module, i: int) -> None:
        load_dense_mlp(mlp, layer.mlp, f"layers.{i}.mlp", MODEL_TYPE, fix)

    load_shared_parts(ours, hf_model, mlp_loader)
    for block, layer in zip(ours.blocks, hf_model.model.layers, strict=True):
        hf_mixer = layer.linear_attn if block.letter == "G" else layer.self_attn
        block.mixer.load_from_hf(hf_mixer)
    return ours
