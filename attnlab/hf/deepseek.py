"""DeepSeek-V3 (``deepseek_v3``) and DeepSeek-V3.2 (``deepseek_v32``) -> HybridLM.

Every layer of ``deepseek_v3`` is MLA (``M``); every layer of ``deepseek_v32`` is DeepSeek
sparse attention (``D``: MLA + lightning indexer + top-k). Both wrap the mixer in the usual
pre-norm block with a SwiGLU MLP. Only dense-MLP layers convert: in ``deepseek_v3`` layer i is
MoE when ``i >= first_k_dense_replace``; in ``deepseek_v32`` when ``mlp_layer_types[i] ==
"sparse"`` (derived from ``first_k_dense_replace`` unless given).

RoPE: ``rope_parameters`` of type ``default`` or ``yarn`` (YaRN frequencies, its attention factor
on cos/sin, and ``mscale(factor, mscale_all_dim)^2`` in the softmax scale). V3.2's MLA always
rotates interleaved pairs; V3 follows ``rope_interleave``.
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
    rope_params,
    rope_theta,
    unsupported,
)

MODEL_TYPES = ("deepseek_v3", "deepseek_v32")
_YARN_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "truncate",
)


def _moe_layers(c: Any) -> list[int]:
    n = int(c.num_hidden_layers)
    if c.model_type == "deepseek_v32":
        types = getattr(c, "mlp_layer_types", None) or ["dense"] * n
        return [i for i, t in enumerate(types) if t != "dense"]
    k = getattr(c, "first_k_dense_replace", None)
    k = n if k is None else int(k)
    return list(range(k, n))


def _rope_scaling(c: Any, model_type: str) -> dict | None:
    rp = rope_params(c)
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise unsupported(model_type, f"rope_type={kind!r}", "use the default RoPE or 'yarn'")
    scaling = {"type": "yarn"}
    scaling.update({k: rp[k] for k in _YARN_KEYS if rp.get(k) is not None})
    if "original_max_position_embeddings" not in scaling:
        raise unsupported(model_type, "yarn rope_parameters lack original_max_position_embeddings", "set it")
    if "factor" not in scaling:  # transformers' rule: the context extension ratio
        scaling["factor"] = c.max_position_embeddings / scaling["original_max_position_embeddings"]
    return scaling


def config_from_hf(c: Any) -> ModelConfig:
    """ModelConfig for a transformers ``DeepseekV3Config`` / ``DeepseekV32Config``; ValueError on
    MoE layers and options attnlab does not implement."""
    model_type = c.model_type
    if model_type not in MODEL_TYPES:
        raise unsupported(
            str(model_type), "not a DeepSeek-V3/V3.2 config", "pass a deepseek_v3 or deepseek_v32 model"
        )
    n = int(c.num_hidden_layers)
    moe = _moe_layers(c)
    if moe:
        fix = f"set first_k_dense_replace = num_hidden_layers = {n}"
        if model_type == "deepseek_v32":
            fix += f" (or mlp_layer_types=['dense'] * {n})"
        raise unsupported(model_type, f"layers {moe} are MoE blocks and attnlab has dense MLPs only", fix)
    check_silu_mlp(c, model_type)
    if getattr(c, "attention_bias", False):
        raise unsupported(
            model_type, "attention_bias=True", "use attention_bias=False (no bias in attnlab's MLA)"
        )
    if getattr(c, "mlp_bias", False):
        raise unsupported(model_type, "mlp_bias=True", "use mlp_bias=False")
    if c.num_key_value_heads != c.num_attention_heads:
        raise unsupported(
            model_type,
            f"num_key_value_heads={c.num_key_value_heads} != num_attention_heads={c.num_attention_heads}",
            "MLA has one latent per token; set num_key_value_heads = num_attention_heads",
        )
    if float(rope_params(c).get("partial_rotary_factor", 1.0)) != 1.0:
        raise unsupported(model_type, "partial_rotary_factor != 1", "MLA rotates all qk_rope_head_dim dims")
    fields = dict(
        **base_fields(c),
        n_heads=int(c.num_attention_heads),
        rope_theta=rope_theta(c),
        q_lora_rank=None if c.q_lora_rank is None else int(c.q_lora_rank),
        kv_lora_rank=int(c.kv_lora_rank),
        qk_nope_head_dim=int(c.qk_nope_head_dim),
        qk_rope_head_dim=int(c.qk_rope_head_dim),
        v_head_dim=int(c.v_head_dim),
        mla_use_rope=True,
        rope_scaling=_rope_scaling(c, model_type),
    )
    if model_type == "deepseek_v3":
        cfg = ModelConfig(pattern="M", rope_interleave=bool(c.rope_interleave), **fields)
    else:
        if c.q_lora_rank is None:
            raise unsupported(
                model_type, "q_lora_rank=None", "DeepSeek-V3.2's indexer reads the q latent; set it"
            )
        cfg = ModelConfig(
            pattern="D",
            rope_interleave=True,  # DeepseekV32Attention always uses interleaved RoPE
            index_n_heads=int(c.index_n_heads),
            index_head_dim=int(c.index_head_dim),
            index_topk=int(c.index_topk),
            **fields,
        )
    return cfg.validate()


def convert(hf_model: nn.Module) -> HybridLM:
    """DeepseekV3ForCausalLM / DeepseekV32ForCausalLM -> HybridLM with the same weights and logits."""
    cfg = config_from_hf(hf_model.config)
    ours = new_model(cfg, hf_model)
    model_type = hf_model.config.model_type
    fix = f"set first_k_dense_replace = num_hidden_layers = {cfg.n_layers}"

    def mlp_loader(mlp: nn.Module, layer: nn.Module, i: int) -> None:
        load_dense_mlp(mlp, layer.mlp, f"layers.{i}.mlp", model_type, fix)

    load_shared_parts(ours, hf_model, mlp_loader)
    for block, layer in zip(ours.blocks, hf_model.model.layers, strict=True):
        block.mixer.load_from_hf(layer.self_attn)
    return ours


__all__ = ["config_from_hf", "convert"]
