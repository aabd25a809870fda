"""from_hf on tiny random DeepSeek-V3 / V3.2 models: same logits as transformers (float32)."""

from __future__ import annotations

import pytest
import torch

from attnlab.hf import config_from_hf, from_hf

T = 37
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}


def rms_rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def common_kwargs(n_layers: int = 2, **kw) -> dict:
    base = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=n_layers,
        num_attention_heads=3,
        num_key_value_heads=3,
        q_lora_rank=12,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        first_k_dense_replace=n_layers,
        max_position_embeddings=64,
        initializer_range=0.15,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    base.update(kw)
    return base


def make(model_type: str, seed: int = 0, **kw):
    from transformers import (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        DeepseekV32Config,
        DeepseekV32ForCausalLM,
    )

    torch.manual_seed(seed)
    if model_type == "deepseek_v3":
        m = DeepseekV3ForCausalLM(DeepseekV3Config(**common_kwargs(**kw)))
    else:
        # 8 index heads: an all-zero ReLU score (a top-k tie that HF and attnlab break differently) is rare
        kw = {"index_n_heads": 8, "index_head_dim": 8, **kw}
        m = DeepseekV32ForCausalLM(DeepseekV32Config(**common_kwargs(**kw)))
    with torch.no_grad():  # norms away from 1 so a swapped or missing norm shows
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p) + (0.0 if name.endswith("bias") else 1.0))
    return m.eval()


def check_logits(m, batch: int = 2) -> None:
    tokens = torch.randint(0, m.config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(1))
    ours = from_hf(m)
    with torch.no_grad():
        ref = m(tokens).logits
        out = ours(tokens)
    assert out.shape == ref.shape
    assert rms_rel(ref, out) <= 1e-4


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"q_lora_rank": None},
        {"rope_parameters": YARN},
        {"q_lora_rank": None, "rope_parameters": YARN, "rope_interleave": False},
        {"tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    ],
    ids=["qlora", "no-qlora", "yarn", "no-qlora-yarn-halfsplit", "tied"],
)
def test_deepseek_v3_logits_match(kw):
    m = make("deepseek_v3", **kw)
    assert config_from_hf(m.config).layer_pattern == "MM"
    check_logits(m)


@pytest.mark.parametrize(
    "kw",
    [{"index_topk": 9}, {"index_topk": 64}, {"index_topk": 12, "rope_parameters": YARN}],
    ids=["topk9<T", "topk>=T", "topk12-yarn"],
)
def test_deepseek_v32_logits_match(kw):
    m = make("deepseek_v32", seed=2, **kw)
    cfg = config_from_hf(m.config)
    assert cfg.layer_pattern == "DD" and cfg.index_topk == kw["index_topk"]
    check_logits(m)


def test_deepseek_v32_converted_prefill_and_decode_match_full_forward():
    m = make("deepseek_v32", seed=3, index_topk=9)
    ours = from_hf(m)
    tokens = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(tokens)
        caches = ours.new_caches(2, T)
        steps = [ours(tokens[:, :30], caches)] + [ours(tokens[:, t : t + 1], caches) for t in range(30, T)]
        ref = m(tokens).logits
    assert rms_rel(full, torch.cat(steps, 1)) <= 1e-4
    assert rms_rel(ref[:, 30:], torch.cat(steps[1:], 1)) <= 1e-4


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v32"])
def test_moe_config_raises_with_the_fix(model_type):
    m = make(
        model_type,
        n_layers=2,
        first_k_dense_replace=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=8,
    )
    with pytest.raises(
        ValueError, match=r"layers \[1\] are MoE.*first_k_dense_replace = num_hidden_layers = 2"
    ):
        from_hf(m)


def test_unsupported_options_raise():
    m = make("deepseek_v3", attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        from_hf(m)
    m = make("deepseek_v3", rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type='linear'"):
        from_hf(m)
