"""Kimi Linear (kimi_linear) -> HybridLM: same logits as transformers, clear errors otherwise."""

from __future__ import annotations

import pytest
import torch
from transformers import KimiLinearConfig, KimiLinearForCausalLM

from attnlab import HybridLM
from attnlab.hf import config_from_hf, from_hf

VOCAB = 64


def rms_rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def tiny_config(n_layers: int = 4, **kw) -> KimiLinearConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, rms_norm_eps=1e-5,
        layer_types=["linear_attention"] * (n_layers - 1) + ["full_attention"],
        mlp_layer_types=["dense"] * n_layers,
        linear_attn_config={"head_dim": 8, "num_heads": 4, "short_conv_kernel_size": 4},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    base.update(kw)
    return KimiLinearConfig(**base)


def hf_model(config: KimiLinearConfig) -> KimiLinearForCausalLM:
    torch.manual_seed(0)
    m = KimiLinearForCausalLM(config).eval()
    with torch.no_grad():  # all-ones norms would hide a norm copied to the wrong place
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    return m


@pytest.mark.parametrize(
    "kw,T",
    [
        (dict(), 37),
        (dict(q_lora_rank=16), 70),  # q LoRA; T > the delta-rule chunk of 64
        (dict(tie_word_embeddings=True), 70),  # HF Kimi never ties: lm_head stays its own matrix
    ],
    ids=["plain-37", "q_lora-70", "tied-70"],
)
def test_logits_match_transformers(kw, T):
    hf = hf_model(tiny_config(**kw))
    ours = from_hf(hf).eval()
    assert isinstance(ours, HybridLM) and ours.cfg.layer_pattern == "KKKM"
    tokens = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        ref, out = hf(tokens).logits, ours(tokens)
    assert out.shape == ref.shape
    assert rms_rel(ref, out) <= 1e-4


def test_checkpoint_layer_layout_is_one_indexed():
    # real checkpoints give 1-indexed layer lists in linear_attn_config; layer 4 is the MLA one
    lac = {"head_dim": 8, "num_heads": 4, "short_conv_kernel_size": 4,
           "kda_layers": [1, 2, 3, 5], "full_attn_layers": [4]}
    c = tiny_config(n_layers=5, layer_types=None, linear_attn_config=lac)
    assert config_from_hf(c).layer_pattern == "KKKMK"


def test_cached_decode_matches_full_forward():
    ours = from_hf(hf_model(tiny_config())).eval()
    tokens = torch.randint(0, VOCAB, (2, 25))
    T = 19
    with torch.no_grad():
        ref = ours(tokens)
        caches = ours.new_caches(2, 25)
        outs = [ours(tokens[:, :T], caches)]
        outs += [ours(tokens[:, t : t + 1], caches) for t in range(T, 25)]
    assert rms_rel(ref, torch.cat(outs, dim=1)) <= 1e-4


def test_moe_layers_raise_with_the_fix():
    c = tiny_config(mlp_layer_types=["dense", "sparse", "sparse", "sparse"], num_local_experts=4,
                    moe_intermediate_size=16, num_experts_per_tok=2)
    with pytest.raises(ValueError, match=r"layers \[1, 2, 3\] are sparse MoE.*mlp_layer_types"):
        from_hf(KimiLinearForCausalLM(c))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(hidden_act="gelu"), r"hidden_act='gelu'.*silu"),
        (dict(attention_bias=True), r"attention_bias"),
        (dict(num_key_value_heads=2), r"num_key_value_heads=2"),
        (dict(layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"]),
         r"layer 1 has layer type 'sliding_attention'"),
    ],
)
def test_unsupported_configs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(tiny_config(**kw))
