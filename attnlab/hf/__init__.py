"""Import Hugging Face ``transformers`` (5.23.0) causal LMs as :class:`attnlab.HybridLM`.

``from_hf(model)`` dispatches on ``model.config.model_type`` to one module per family, each
defining ``config_from_hf(hf_config) -> ModelConfig`` and ``convert(hf_model) -> HybridLM``:

    qwen3_next            -> attnlab.hf.qwen3_next
    minimax               -> attnlab.hf.minimax
    deepseek_v3, _v32     -> attnlab.hf.deepseek
    kimi_linear           -> attnlab.hf.kimi_linear

This file also holds the model-level mapping they share: embeddings, final norm, LM head,
the two per-layer norms, dense SwiGLU MLPs, and the errors for what we do not convert (MoE
layers, unknown model types, unsupported options), each saying what to change.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..model import HybridLM

FAMILY_MODULES: dict[str, str] = {
    "qwen3_next": "qwen3_next",
    "minimax": "minimax",
    "deepseek_v3": "deepseek",
    "deepseek_v32": "deepseek",
    "kimi_linear": "kimi_linear",
}


def from_hf(hf_model: nn.Module) -> HybridLM:
    """Convert a transformers ``*ForCausalLM`` of a supported family into a HybridLM with the
    same weights (same dtype and device) that gives the same logits. Raises ValueError on
    unknown model types, MoE layers and options attnlab does not implement."""
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILY_MODULES:
        raise ValueError(
            f"model: model_type {model_type!r} is not supported; attnlab converts {', '.join(FAMILY_MODULES)}"
        )
    if not hasattr(hf_model, "lm_head") or not hasattr(hf_model, "model"):
        raise ValueError(
            f"model: expected a {model_type} *ForCausalLM (.model, .lm_head), got {type(hf_model).__name__}"
        )
    module = importlib.import_module(f"{__name__}.{FAMILY_MODULES[model_type]}")
    return module.convert(hf_model)


def config_from_hf(hf_config: Any) -> ModelConfig:
    """The ModelConfig a transformers config converts to (same dispatch as :func:`from_hf`)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILY_MODULES:
        raise ValueError(
            f"config: model_type {model_type!r} unsupported; attnlab converts {', '.join(FAMILY_MODULES)}"
        )
    module = importlib.import_module(f"{__name__}.{FAMILY_MODULES[model_type]}")
    return module.config_from_hf(hf_config)


# ----------------------------------------------------------------------------- helpers


def unsupported(model_type: str, problem: str, fix: str) -> ValueError:
    """A ValueError for an option we do not convert: ``<type>: <problem>; <fix>``."""
    return ValueError(f"{model_type}: {problem}; {fix}")


def check_silu_mlp(hf_config: Any, model_type: str) -> None:
    """Our MLPs are SwiGLU: refuse any other ``hidden_act``."""
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise unsupported(model_type, f"hidden_act={hf_config.hidden_act!r}", "use hidden_act='silu'")


def rope_params(hf_config: Any) -> dict:
    """transformers 5 keeps RoPE settings in ``config.rope_parameters`` (theta, type, ...)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if not isinstance(params, dict):
        params = dict(params)
    return params


def rope_theta(hf_config: Any, default: float = 10000.0) -> float:
    p = rope_params(hf_config)
    return float(p.get("rope_theta", getattr(hf_config, "rope_theta", default)))


def base_fields(hf_config: Any) -> dict[str, Any]:
    """ModelConfig fields every family shares: sizes, norm eps, tied embeddings, MLP width."""
    return dict(
        d_model=int(hf_config.hidden_size),
        n_layers=int(hf_config.num_hidden_layers),
        vocab_size=int(hf_config.vocab_size),
        d_ff=int(hf_config.intermediate_size),
        norm_eps=float(hf_config.rms_norm_eps),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )


def pattern_from_layer_types(
    model_type: str, layer_types: Sequence[str], letters: dict[str, str], n_layers: int
) -> str:
    """Full-length pattern from ``config.layer_types`` (e.g. {"linear_attention": "G",
    "full_attention": "S"})."""
    if layer_types is None or len(layer_types) != n_layers:
        got = None if layer_types is None else len(layer_types)
        raise unsupported(model_type, f"layer_types has {got} entries for {n_layers} layers",
                          "give one layer type per layer")
    out = []
    for i, t in enumerate(layer_types):
        if t not in letters:
            raise unsupported(model_type, f"layer {i} has layer type {t!r}",
                              f"attnlab converts layer types {', '.join(letters)}")
        out.append(letters[t])
    return "".join(out)


def copy_weight(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """dst.copy_(src) after checking shapes (ValueError naming the weight)."""
    if tuple(dst.shape) != tuple(src.shape):
        want = tuple(dst.shape)
        raise ValueError(f"{name}: Hugging Face weight has shape {tuple(src.shape)}, attnlab expects {want}")
    with torch.no_grad():
        dst.copy_(src)


def new_model(cfg: ModelConfig, hf_model: nn.Module) -> HybridLM:
    """A HybridLM for ``cfg`` on the HF model's device and dtype."""
    p = next(hf_model.parameters())
    return HybridLM(cfg).to(device=p.device, dtype=p.dtype)


def load_dense_mlp(mlp: nn.Module, hf_mlp: nn.Module, where: str, model_type: str, fix: str) -> None:
    """Copy a dense SwiGLU (``gate_proj``/``up_proj``/``down_proj`` Linears, no bias)."""
    parts = [getattr(hf_mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in parts):
        raise unsupported(model_type, f"{where} is a {type(hf_mlp).__name__}, not a dense SwiGLU MLP "
                          "(attnlab has no MoE layers)", fix)
    act = getattr(hf_mlp, "act_fn", None)
    if act is not None and type(act).__name__ not in ("SiLU", "SiLUActivation"):
        raise unsupported(model_type, f"{where} uses activation {type(act).__name__}", "use silu")
    names = ("gate_proj", "up_proj", "down_proj")
    for ours, theirs, n in zip((mlp.gate_proj, mlp.up_proj, mlp.down_proj), parts, names, strict=True):
        if theirs.bias is not None:
            raise unsupported(model_type, f"{where}.{n} has a bias", "use an MLP without biases")
        copy_weight(ours.weight, theirs.weight, f"{where}.{n}")


def load_shared_parts(
    ours: HybridLM,
    hf_model: nn.Module,
    mlp_loader: Callable[[nn.Module, nn.Module, int], None],
    input_norm: str = "input_layernorm",
    post_norm: str = "post_attention_layernorm",
) -> None:
    """Embeddings, final norm, LM head, each layer's two norms, and each layer's MLP through
    ``mlp_loader(our_mlp, hf_layer, layer_idx)``. Mixers are the family module's job."""
    base = hf_model.model
    copy_weight(ours.embed.weight, base.embed_tokens.weight, "model.embed_tokens.weight")
    copy_weight(ours.norm.weight, base.norm.weight, "model.norm.weight")
    if not ours.cfg.tie_embeddings:
        copy_weight(ours.lm_head.weight, hf_model.lm_head.weight, "lm_head.weight")
    elif hf_model.lm_head.weight.data_ptr() != base.embed_tokens.weight.data_ptr():
        if not torch.equal(hf_model.lm_head.weight, base.embed_tokens.weight):
            raise ValueError("lm_head.weight: config ties it to the embeddings but the weights differ")
    if len(base.layers) != len(ours.blocks):
        raise ValueError(f"model.layers: {len(base.layers)} layers, config says {len(ours.blocks)}")
    for i, (block, layer) in enumerate(zip(ours.blocks, base.layers, strict=True)):
        copy_weight(block.mixer_norm.weight, getattr(layer, input_norm).weight, f"layers.{i}.{input_norm}")
        copy_weight(block.mlp_norm.weight, getattr(layer, post_norm).weight, f"layers.{i}.{post_norm}")
        mlp_loader(block.mlp, layer, i)


__all__ = [
    "FAMILY_MODULES", "from_hf", "config_from_hf", "unsupported", "rope_params", "rope_theta",
    "base_fields", "pattern_from_layer_types", "copy_weight", "new_model", "load_dense_mlp",
    "load_shared_parts",
]
