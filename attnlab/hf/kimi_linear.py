"""Kimi Linear (``model_type="kimi_linear"``) -> HybridLM.

Layers: ``linear_attention`` -> ``K`` (Kimi delta attention, ``KimiDeltaAttention.load_from_hf``),
``full_attention`` -> ``M`` (MLA without any RoPE: Kimi Linear's MLA is NoPE, its
``qk_rope_head_dim`` part of the key is shared across heads but never rotated). Norms are
plain ``x_hat * w`` RMSNorms with ``rms_norm_eps``; the KDA output norm uses the same eps.
Only dense-MLP layers convert: ``mlp_layer_types`` must be all ``"dense"`` (HF derives it from
``first_k_dense_replace`` when not given).
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
    unsupported,
)

MODEL_TYPE = "kimi_linear"
LAYER_LETTERS = {"linear_attention": "K", "full_attention": "M"}


def config_from_hf(c: Any) -> ModelConfig:
    """ModelConfig for a transformers ``KimiLinearConfig``; ValueError on what we don't convert."""
    n = int(c.num_hidden_layers)
    mlp_types = list(getattr(c, "mlp_layer_types", None) or ["dense"] * n)
    moe = [i for i, t in enumerate(mlp_types) if t != "dense"]
    if moe:
        raise unsupported(
            MODEL_TYPE, f"layers {moe} are sparse MoE blocks and attnlab has dense MLPs only",
            f'set mlp_layer_types=["dense"] * {n} (or first_k_dense_replace={n})',
        )
    check_silu_mlp(c, MODEL_TYPE)
    if getattr(c, "attention_bias", False):
        raise unsupported(MODEL_TYPE, "attention_bias=True", "use attention_bias=False (no bias in attnlab)")
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    if kv_heads != c.num_attention_heads:
        raise unsupported(
            MODEL_TYPE, f"num_key_value_heads={kv_heads} != num_attention_heads={c.num_attention_heads}",
            "MLA decompresses one key/value per query head; set num_key_value_heads=num_attention_heads",
        )
    pattern = pattern_from_layer_types(MODEL_TYPE, c.layer_types, LAYER_LETTERS, n)
    # KimiLinearForCausalLM declares no tied weights (_tied_weights_keys = {}): its lm_head is
    # its own matrix even when the config says tie_word_embeddings=True.
    fields = {**base_fields(c), "tie_embeddings": False}
    cfg = ModelConfig(
        pattern=pattern,
        **fields,
        n_heads=int(c.num_attention_heads),
        # M: Kimi's NoPE MLA
        q_lora_rank=None if c.q_lora_rank is None else int(c.q_lora_rank),
        kv_lora_rank=int(c.kv_lora_rank),
        qk_nope_head_dim=int(c.qk_nope_head_dim),
        qk_rope_head_dim=int(c.qk_rope_head_dim),
        v_head_dim=int(c.v_head_dim),
        mla_use_rope=False,
        # K: one head count and one head dim for q, k and v
        linear_n_heads=int(c.linear_num_heads),
        linear_n_key_heads=int(c.linear_num_heads),
        linear_key_head_dim=int(c.linear_head_dim),
        linear_value_head_dim=int(c.linear_head_dim),
        conv_kernel=int(c.linear_conv_kernel_dim),
    )
    return cfg.validate()


def convert(hf_model: nn.Module) -> HybridLM:
    """KimiLinearForCausalLM -> HybridLM with the same weights and logits."""
    cfg = config_from_hf(hf_model.config)
    ours = new_model(cfg, hf_model)
    fix = f'set mlp_layer_types=["dense"] * {cfg.n_layers}'

    def mlp_loader(mlp: nn.Module, layer: nn.Module, i: int) -> None:
        load_dense_mlp(mlp, layer.mlp, f"layers.{i}.mlp", MODEL_TYPE, fix)

    load_shared_parts(ours, hf_model, mlp_loader)
    for block, layer in zip(ours.blocks, hf_model.model.layers, strict=True):
        block.mixer.load_from_hf(layer.self_attn)  # KDA and MLA both sit at self_attn
    return ours
