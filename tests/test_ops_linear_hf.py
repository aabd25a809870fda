"""The linear-attention ops agree with the reference code of transformers 5.23.0, run here:
Qwen3-Next's torch_chunk_gated_delta_rule / torch_recurrent_gated_delta_rule, Kimi Linear's
chunk_kimi_delta_attention / recurrent_kimi_delta_attention, and MiniMax's lightning block loop
(MiniMaxLightningAttention.forward, with its own decay buffers), to rms-relative error ≤ 1e-5.

Conventions bridged: HF takes [B, T, H, D] like us; it always scales q by D_k^-0.5 (our default),
L2-normalises q/k inside when use_qk_l2norm_in_kernel (ours: use_qk_l2norm), and takes log-gates
(state multiplied by exp(g)). MiniMax's slope_rate buffer [H, 1, 1] is our `slope`; it does not
scale q (our lightning default scale=1).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from attnlab import ops

transformers = pytest.importorskip("transformers")
from transformers import MiniMaxConfig  # noqa: E402
from transformers.models.kimi_linear import modeling_kimi_linear as kimi  # noqa: E402
from transformers.models.minimax.modeling_minimax import MiniMaxCache, MiniMaxLightningAttention  # noqa: E402
from transformers.models.qwen3_next import modeling_qwen3_next as qwen  # noqa: E402

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def test_hf_uses_its_torch_reference_code():
    """With fla (or the hub `kernels` package) installed, HF would silently run fla's kernels instead."""
    assert importlib.util.find_spec("fla") is None
    assert importlib.util.find_spec("kernels") is None
    assert qwen.torch_chunk_gated_delta_rule.__module__ == qwen.__name__


# ------------------------------------------------------------------------------------------
# Gated DeltaNet vs Qwen3-Next


@pytest.mark.parametrize("use_l2", [True, False])
@pytest.mark.parametrize("t", [1, 64, 100])
def test_gated_delta_rule_vs_qwen3_next(t, use_l2):
    b, h_k, h_v, d_k, d_v = 2, 2, 4, 32, 24  # grouped values as in Qwen3-Next (H_v = 2 H_k)
    q, k = torch.randn(b, t, h_k, d_k), torch.randn(b, t, h_k, d_k)
    if not use_l2:  # without the in-kernel norm, keep keys at unit scale so the delta rule is stable
        q, k = q / d_k**0.5, k / d_k**0.5
    v = torch.randn(b, t, h_v, d_v)
    g = torch.nn.functional.logsigmoid(torch.randn(b, t, h_v) + 2)  # log-decay in (-inf, 0)
    beta = torch.rand(b, t, h_v)
    s0 = torch.randn(b, h_v, d_k, d_v)

    hf_chunk = qwen.torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                                  use_qk_l2norm_in_kernel=use_l2)
    hf_rec = qwen.torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0,
                                                    output_final_state=True, use_qk_l2norm_in_kernel=use_l2)
    assert rel_err(hf_chunk[0], hf_rec[0]) < TOL  # HF's two references agree with each other
    for mode in ("chunk", "recurrent"):
        o, s = ops.gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                    use_qk_l2norm=use_l2, mode=mode)
        for hf_o, hf_s in (hf_chunk, hf_rec):
            assert rel_err(o, hf_o) <= TOL, mode
            assert rel_err(s, hf_s) <= TOL, mode


def test_gated_delta_rule_bf16_vs_qwen3_next():
    b, t, h, d = 1, 70, 2, 32
    q, k, v = (torch.randn(b, t, h, d).bfloat16() for _ in range(3))
    g = -torch.rand(b, t, h)
    beta = torch.rand(b, t, h)
    hf_o, hf_s = qwen.torch_chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
                                                   use_qk_l2norm_in_kernel=True)
    o, s = ops.gated_delta_rule(q, k, v, g, beta, output_final_state=True, use_qk_l2norm=True)
    assert o.dtype == hf_o.dtype == torch.bfloat16
    assert rel_err(s, hf_s) <= TOL  # both keep the state in float32
    assert rel_err(o, hf_o) < 1e-2  # the outputs differ only by bf16 rounding


# ------------------------------------------------------------------------------------------
# KDA vs Kimi Linear


@pytest.mark.parametrize("gate", ["mild", "strong"])
@pytest.mark.parametrize("t", [1, 64, 100])
def test_kda_vs_kimi_linear(t, gate):
    b, h, d_k, d_v = 2, 2, 32, 24
    q, k, v = torch.randn(b, t, h, d_k), torch.randn(b, t, h, d_k), torch.randn(b, t, h, d_v)
    # Kimi's gate: -exp(A_log) * softplus(f) per channel; "strong" reaches ≈ −10 per token.
    a = torch.tensor([1.0, 8.0] if gate == "strong" else [0.1, 0.5]).view(1, 1, h, 1)
    g = -a * torch.nn.functional.softplus(torch.randn(b, t, h, d_k))
    beta = torch.rand(b, t, h)
    s0 = torch.randn(b, h, d_k, d_v)

    hf_chunk = kimi.chunk_kimi_delta_attention(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                               use_qk_l2norm_in_kernel=True)
    hf_rec = kimi.recurrent_kimi_delta_attention(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                                 use_qk_l2norm_in_kernel=True)
    assert rel_err(hf_chunk[0], hf_rec[0]) < TOL
    for mode in ("chunk", "recurrent"):
        o, s = ops.kda(q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm=True,
                       mode=mode)
        for hf_o, hf_s in (hf_chunk, hf_rec):
            assert rel_err(o, hf_o) <= TOL, mode
            assert rel_err(s, hf_s) <= TOL, mode


# ------------------------------------------------------------------------------------------
# Lightning vs MiniMax


def _minimax_core(h: int, d: int, block_size: int, layer_idx: int = 1, n_layers: int = 4):
    """A MiniMaxLightningAttention whose q, k, v are the input itself (identity activation and an
    identity qkv_proj on hidden = 3·H·D laid out per head as [q | k | v]), with a hook that catches
    the core output (the block loop's result, before the output norm and gate)."""
    cfg = MiniMaxConfig(hidden_size=3 * h * d, num_attention_heads=h, num_key_value_heads=h, head_dim=d,
                        block_size=block_size, num_hidden_layers=n_layers, hidden_act="linear")
    module = MiniMaxLightningAttention(cfg, layer_idx).eval()
    with torch.no_grad():
        module.qkv_proj.weight.copy_(torch.eye(3 * h * d))
    caught = {}
    module.norm.register_forward_pre_hook(lambda mod, args: caught.__setitem__("core", args[0]))
    return module, caught


def _pack(q, k, v):
    """[B, T, H, D] × 3 -> hidden [B, T, H·3D] in MiniMax's per-head [q | k | v] layout."""
    b, t, h, d = q.shape
    return torch.cat([q, k, v], dim=-1).reshape(b, t, h * 3 * d)


@pytest.mark.parametrize("t", [1, 31, 32, 100])
def test_lightning_vs_minimax_block_loop(t):
    b, h, d = 2, 4, 16
    module, caught = _minimax_core(h, d, block_size=32)
    q, k, v = (torch.randn(b, t, h, d) for _ in range(3))
    with torch.no_grad():
        _, hf_state = module(_pack(q, k, v), position_embeddings=None, attention_mask=None)
    hf_o = caught["core"].reshape(b, t, h, d)
    slope = module.slope_rate.flatten()  # [H], the module's own ALiBi-style decay rates
    for mode in ("chunk", "recurrent"):
        o, s = ops.lightning_attention(q, k, v, slope, output_final_state=True, mode=mode)
        assert rel_err(o, hf_o) <= TOL, mode
        assert rel_err(s, hf_state) <= TOL, mode


def test_lightning_decode_vs_minimax_cached_loop():
    """MiniMax's decode branch (a linear cache present) vs our step and our op from a state."""
    b, h, d, t = 2, 3, 16, 5
    module, caught = _minimax_core(h, d, block_size=32, layer_idx=2)
    q, k, v = (torch.randn(b, t, h, d) for _ in range(3))
    s0 = torch.randn(b, h, d, d)
    cache = MiniMaxCache()
    cache.set_linear_cache(module.layer_idx, s0.clone())
    with torch.no_grad():
        _, hf_state = module(_pack(q, k, v), position_embeddings=None, attention_mask=None,
                             past_key_values=cache)
    hf_o = caught["core"].reshape(b, t, h, d)
    slope = module.slope_rate.flatten()

    state = s0.clone()
    o_steps = torch.stack([ops.lightning_attention_step(q[:, i], k[:, i], v[:, i], slope, state)
                           for i in range(t)], dim=1)
    assert rel_err(o_steps, hf_o) <= TOL and rel_err(state, hf_state) <= TOL
    o, s = ops.lightning_attention(q, k, v, slope, initial_state=s0, output_final_state=True, mode="chunk")
    assert rel_err(o, hf_o) <= TOL and rel_err(s, hf_state) <= TOL
