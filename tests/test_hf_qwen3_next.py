"""from_hf on transformers' Qwen3-Next: same logits (rms-rel <= 1e-4, float32) on tiny random
dense-MLP configs, and clear errors for what is not converted."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402

from attnlab.hf import config_from_hf, from_hf  # noqa: E402


def rms_rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def hf_config(**kw) -> Qwen3NextConfig:
    n = kw.pop("num_hidden_layers", 4)
    base = dict(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        mlp_only_layers=list(range(n)), max_position_embeddings=512, rope_parameters={"rope_theta": 10000.0,
        "partial_rotary_factor": 0.25, "rope_type": "default"},
    )
    base.update(kw)
    return Qwen3NextConfig(**base)


def hf_model(**kw) -> Qwen3NextForCausalLM:
    torch.manual_seed(0)
    m = Qwen3NextForCausalLM(hf_config(**kw)).float().eval()
    with torch.no_grad():  # HF initialises the (1 + w) norms to w = 0; make every norm matter
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return m


def check_logits(m, T: int = 37) -> float:
    ours = from_hf(m).eval()
    tokens = torch.randint(0, m.config.vocab_size, (2, T))
    with torch.no_grad():
        ref = m(tokens).logits
        out = ours(tokens)
    assert ref.std() > 0
    err = rms_rel(ref, out)
    assert err <= 1e-4, err
    return err


def test_gated_attention_only():
    m = hf_model(num_hidden_layers=2, layer_types=["full_attention"] * 2)
    check_logits(m)
    cfg = from_hf(m).cfg
    assert cfg.pattern == "SS" and cfg.attn_output_gate and cfg.qk_norm and cfg.norm_zero_centered
    assert cfg.rope_dim == 4  # partial_rotary_factor 0.25 of head_dim 16


@pytest.mark.parametrize("T", [37, 70])
def test_hybrid_gdn_and_gated_attention(T):
    m = hf_model()  # default layer_types: three linear_attention then one full_attention
    assert from_hf(m).cfg.layer_pattern == "GGGS"
    check_logits(m, T)


def test_irregular_layout_and_tied_embeddings():
    types = ["full_attention", "linear_attention", "linear_attention"]
    m = hf_model(num_hidden_layers=3, layer_types=types, tie_word_embeddings=True)
    ours = from_hf(m)
    assert ours.cfg.layer_pattern == "SGG" and ours.cfg.tie_embeddings
    check_logits(m)


def test_converted_model_decodes_like_hf_full_forward():
    m = hf_model()
    ours = from_hf(m).eval()
    tokens = torch.randint(0, 96, (1, 21))
    with torch.no_grad():
        ref = m(tokens).logits
        caches = ours.new_caches(1, 21)
        out = [ours(tokens[:, :15], caches)] + [ours(tokens[:, t : t + 1], caches) for t in range(15, 21)]
    assert rms_rel(ref, torch.cat(out, 1)) <= 1e-4


def test_sparse_step_decides_which_layers_are_moe():
    c = hf_config(decoder_sparse_step=2, mlp_only_layers=[])
    with pytest.raises(ValueError, match=r"layers \[1, 3\] are sparse MoE.*mlp_only_layers"):
        config_from_hf(c)
    check_logits(hf_model(decoder_sparse_step=2, mlp_only_layers=[1, 3]))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(mlp_only_layers=[0]), r"qwen3_next: layers \[1, 2, 3\] are sparse MoE.*set mlp_only_layers"),
        (dict(attention_bias=True), "attention_bias=True; use attention_bias=False"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (
            dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
            "rope_type='linear'",
        ),
        (
            dict(layer_types=["linear_attention"] * 3 + ["sliding_attention"]),
            "layer 3 has layer type 'sliding_attention'",
        ),
    ],
)
def test_unsupported_configs_fail_clearly(kw, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf_config(**kw))


def test_moe_model_is_rejected_not_converted():
    c = hf_config(num_hidden_layers=1, mlp_only_layers=[], layer_types=["full_attention"])
    m = Qwen3NextForCausalLM(c)
    with pytest.raises(ValueError, match="sparse MoE"):
        from_hf(m)


def test_unknown_model_type():
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2)
    with pytest.raises(ValueError, match="model_type 'llama' is not supported.*qwen3_next"):
        from_hf(transformers.LlamaForCausalLM(cfg))
