"""MiniMax-01 (``model_type="minimax"``) -> HybridLM.

What Hugging Face's ``MiniMaxDecoderLayer`` computes, and how it maps:

* the residual branch carries the *normalized* stream (MiniMax-Text-01's ``postnorm``):
  ``x = norm(h); h = alpha * x + beta * f(x)`` -> ``postnorm=True``, with alpha/beta from
  ``{full,linear}_attn_{alpha,beta}_factor`` (by layer kind) and ``mlp_{alpha,beta}_factor``;
* ``layer_types``: ``linear_attention`` -> ``L``, ``full_attention`` -> ``S`` (``W`` when
  ``sliding_window`` is set). HF's *default* layer_types alternate full/linear, not the
  published 7:1 layout, so the pattern is read from the config, never assumed;
* full attention is GQA with RoPE on the *whole* head: HF's MiniMax rotary embedding ignores
  any partial factor (MiniMax-Text-01's own code rotates 64 of 128 dims), so
  ``rope_fraction=1.0`` reproduces the HF numbers;
* the MLP is a sparse MoE block. With one expert and top-1 routing, the router's softmax
  over a single logit is exactly 1 and the top-k renormalisation divides 1 by 1, so the
  block *is* that expert's SwiGLU: ``down(silu(gate(x)) * up(x))`` with ``gate`` and ``up``
  the two halves of ``experts.gate_up_proj[0]``. The router weight plays no part.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import ModelConfig
from ..model import HybridLM
from . import (
    base_fields,
    check_silu_mlp,
    copy_weight,
    load_shared_parts,
    new_model,
    pattern_from_layer_types,
    rope_params,
    rope_theta,
    unsupported,
)

MODEL_TYPE = "minimax"


def config_from_hf(c: Any) -> ModelConfig:
    """ModelConfig for a transformers ``MiniMaxConfig``; ValueError on what we don't convert."""
    n_exp = int(getattr(c, "num_local_experts", 1))
    top_k = int(getattr(c, "num_experts_per_tok", 1))
    if n_exp != 1 or top_k != 1:
        raise unsupported(
            MODEL_TYPE,
            f"num_local_experts={n_exp}, num_experts_per_tok={top_k}: the MLP is a mixture of experts "
            "and attnlab has dense MLPs only",
            "use num_local_experts=1 and num_experts_per_tok=1 (a single expert is a dense SwiGLU MLP)",
        )
    check_silu_mlp(c, MODEL_TYPE)
    if getattr(c, "postnorm", True) is False:
        raise unsupported(MODEL_TYPE, "postnorm=False", "HF MiniMax always uses the postnorm residual")
    rp = rope_params(c)
    if rp.get("rope_type", "default") != "default":
        raise unsupported(MODEL_TYPE, f"rope_type={rp.get('rope_type')!r}", "use the default RoPE")
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    window = getattr(c, "sliding_window", None)
    letters = {"linear_attention": "L", "full_attention": "S" if window is None else "W"}
    pattern = pattern_from_layer_types(MODEL_TYPE, c.layer_types, letters, c.num_hidden_layers)
    extra = {} if window is None else {"window": int(window), "sink_tokens": 0}
    cfg = ModelConfig(
        pattern=pattern,
        **base_fields(c),
        n_heads=int(c.num_attention_heads),
        n_kv_heads=int(c.num_key_value_heads),
        head_dim=head_dim,
        rope_theta=rope_theta(c),
        rope_fraction=1.0,  # HF MiniMax rotates the whole head (see the module docstring)
        block_size=int(getattr(c, "block_size", 256)),
        postnorm=True,
        attn_alpha=float(c.full_attn_alpha_factor),
        attn_beta=float(c.full_attn_beta_factor),
        linear_alpha=float(c.linear_attn_alpha_factor),
        linear_beta=float(c.linear_attn_beta_factor),
        mlp_alpha=float(c.mlp_alpha_factor),
        mlp_beta=float(c.mlp_beta_factor),
        **extra,
    )
    return cfg.validate()


def load_single_expert(mlp: nn.Module, hf_moe: nn.Module, where: str) -> None:
    """Copy a one-expert MiniMaxSparseMoeBlock into our SwiGLU (see the module docstring)."""
    experts = getattr(hf_moe, "experts", None)
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if gate_up is None or down is None or gate_up.dim() != 3 or gate_up.shape[0] != 1:
        raise unsupported(MODEL_TYPE, f"{where} is not a single-expert MoE block with fused gate_up_proj",
                          "use num_local_experts=1")
    d_ff = gate_up.shape[1] // 2
    copy_weight(mlp.gate_proj.weight, gate_up[0, :d_ff], f"{where}.experts.gate_up_proj[0] (gate half)")
    copy_weight(mlp.up_proj.weight, gate_up[0, d_ff:], f"{where}.experts.gate_up_proj[0] (up half)")
    copy_weight(mlp.down_proj.weight, down[0], f"{where}.experts.down_proj[0]")


def convert(hf_model: nn.Module) -> HybridLM:
    """MiniMaxForCausalLM -> HybridLM with the same weights and logits."""
    cfg = config_from_hf(hf_model.config)
    ours = new_model(cfg, hf_model)

    def mlp_loader(mlp: nn.Module, layer: nn.Module, i: int) -> None:
        load_single_expert(mlp, layer.mlp, f"layers.{i}.mlp")

    load_shared_parts(ours, hf_model, mlp_loader)
    for block, layer in zip(ours.blocks, hf_model.model.layers, strict=True):
        block.mixer.load_from_hf(layer.self_attn)  # HF keeps both kinds under self_attn
    return ours
