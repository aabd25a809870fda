"""from_hf on transformers' MiniMax: same logits (rms-rel <= 1e-4, float32) on tiny random
single-expert configs with the 7:1 layout, and clear errors for what is not converted."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import MiniMaxConfig, MiniMaxForCausalLM  # noqa: E402

from attnlab.hf import config_from_hf, from_hf  # noqa: E402
from attnlab.hf.minimax import load_single_expert  # noqa: E402
from attnlab.layers.common import SwiGLU  # noqa: E402

SEVEN_TO_ONE = ["linear_attention"] * 7 + ["full_attention"]
FACTORS = dict(
    full_attn_alpha_factor=1.7, full_attn_beta_factor=0.6, linear_attn_alpha_factor=2.2,
    linear_attn_beta_factor=0.9, mlp_alpha_factor=1.3, mlp_beta_factor=0.8,
)


def rms_rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def hf_config(**kw) -> MiniMaxConfig:
    base = dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=1, num_experts_per_tok=1, block_size=16,
        max_position_embeddings=512, layer_types=SEVEN_TO_ONE, **FACTORS,
    )
    base.update(kw)
    return MiniMaxConfig(**base)


def hf_model(**kw) -> MiniMaxForCausalLM:
    torch.manual_seed(0)
    m = MiniMaxForCausalLM(hf_config(**kw)).float().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return m


def check_logits(m, T: int = 37) -> None:
    ours = from_hf(m).eval()
    tokens = torch.randint(0, m.config.vocab_size, (2, T))
    with torch.no_grad():
        ref = m(tokens).logits
        out = ours(tokens)
    assert ref.std() > 0
    err = rms_rel(ref, out)
    assert err <= 1e-4, err


@pytest.mark.parametrize("T", [37, 70])
def test_seven_to_one_layout(T):
    m = hf_model()
    cfg = from_hf(m).cfg
    assert cfg.layer_pattern == "LLLLLLLS" and cfg.postnorm and cfg.block_size == 16
    factors = (cfg.attn_alpha, cfg.attn_beta, cfg.linear_alpha, cfg.linear_beta, cfg.mlp_alpha, cfg.mlp_beta)
    assert factors == (1.7, 0.6, 2.2, 0.9, 1.3, 0.8)
    check_logits(m, T)


def test_hf_default_layer_types_are_read_not_assumed():
    c = hf_config(num_hidden_layers=4, layer_types=None)  # HF's default alternates full/linear
    assert config_from_hf(c).layer_pattern == "SLSL"
    check_logits(hf_model(num_hidden_layers=4, layer_types=None))


def test_full_attention_only_and_sliding_window():
    check_logits(hf_model(num_hidden_layers=2, layer_types=["full_attention"] * 2))
    m = hf_model(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"], sliding_window=6)
    cfg = from_hf(m).cfg
    assert cfg.layer_pattern == "WL" and cfg.window == 6
    check_logits(m)


def test_rope_is_full_head_as_hf_computes_it():
    cfg = config_from_hf(hf_config())
    assert cfg.rope_fraction == 1.0 and cfg.rope_dim == 8


def test_single_expert_moe_is_exactly_a_dense_swiglu():
    # the router's softmax over one logit is 1 and top-1 renormalisation divides 1 by 1
    m = hf_model(num_hidden_layers=1, layer_types=["full_attention"])
    moe = m.model.layers[0].mlp
    with torch.no_grad():
        moe.gate.weight.normal_(0, 5.0)  # the router weight must not matter
        mlp = SwiGLU(32, 48)
        load_single_expert(mlp, moe, "mlp")
        x = torch.randn(2, 9, 32)
        assert rms_rel(moe(x), mlp(x)) < 1e-6


def test_converted_model_decodes_like_hf_full_forward():
    m = hf_model()
    ours = from_hf(m).eval()
    tokens = torch.randint(0, 96, (1, 40))
    with torch.no_grad():
        ref = m(tokens).logits
        caches = ours.new_caches(1, 40)
        out = [ours(tokens[:, :19], caches), ours(tokens[:, 19:35], caches)]
        out += [ours(tokens[:, t : t + 1], caches) for t in range(35, 40)]
    assert rms_rel(ref, torch.cat(out, 1)) <= 1e-4


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_local_experts=2, num_experts_per_tok=1), "num_local_experts=2.*use num_local_experts=1"),
        (dict(num_local_experts=1, num_experts_per_tok=2), "num_experts_per_tok=2.*mixture of experts"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
                               "original_max_position_embeddings": 128}), "rope_type='yarn'"),
        (dict(layer_types=["linear_attention"] * 7 + ["conv"]), "layer 7 has layer type 'conv'"),
    ],
)
def test_unsupported_configs_fail_clearly(kw, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf_config(**kw))


def test_moe_model_is_rejected_not_converted():
    c = hf_config(num_hidden_layers=1, layer_types=["full_attention"], num_local_experts=2)
    m = MiniMaxForCausalLM(c)
    with pytest.raises(ValueError, match="minimax: num_local_experts=2"):
        from_hf(m)
