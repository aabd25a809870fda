"""Linear-attention mixers L (lightning), G (gated DeltaNet), K (Kimi delta attention).

Each layer is checked against its Hugging Face module (loaded with ``load_from_hf``) on
lengths that are not multiples of any chunk size, and its cache against the full forward:
prefill + decode, chunked prefill, mixed-length rows, declared bytes == allocated bytes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import KimiLinearConfig, MiniMaxConfig, Qwen3NextConfig
from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention
from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

from attnlab.config import ModelConfig
from attnlab.layers.deltanet import (
    DeltaRuleCache,
    GatedDeltaNet,
    KimiDeltaAttention,
    build_gated_deltanet,
    build_kda,
)
from attnlab.layers.lightning import LightningAttention, LightningCache, build_lightning, lightning_slopes

D_MODEL = 32


def rms_rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


# ----------------------------------------------------------------------------- HF modules


def hf_lightning(layer_idx: int = 2, n_layers: int = 5, block_size: int = 16) -> MiniMaxLightningAttention:
    cfg = MiniMaxConfig(hidden_size=D_MODEL, num_hidden_layers=n_layers, num_attention_heads=4, head_dim=8,
                        block_size=block_size)
    m = MiniMaxLightningAttention(cfg, layer_idx)
    with torch.no_grad():
        m.norm.weight.normal_(1.0, 0.3)  # default ones would hide a transposed/mis-sized norm weight
    return m


def hf_gdn(n_k_heads: int = 2, n_v_heads: int = 4) -> Qwen3NextGatedDeltaNet:
    cfg = Qwen3NextConfig(hidden_size=D_MODEL, num_hidden_layers=4, linear_num_key_heads=n_k_heads,
                          linear_num_value_heads=n_v_heads, linear_key_head_dim=8, linear_value_head_dim=12,
                          rms_norm_eps=1e-6)
    m = Qwen3NextGatedDeltaNet(cfg, 0)
    with torch.no_grad():
        m.norm.weight.normal_(1.0, 0.3)
        m.dt_bias.normal_(0.0, 1.0)
    return m


def hf_kda() -> KimiLinearDeltaAttention:
    cfg = KimiLinearConfig(hidden_size=D_MODEL, num_hidden_layers=4, rms_norm_eps=1e-5,
                           linear_attn_config={"head_dim": 8, "num_heads": 4, "short_conv_kernel_size": 4},
                           mlp_layer_types=["dense"] * 4)
    m = KimiLinearDeltaAttention(cfg, 0)
    with torch.no_grad():  # HF leaves the forget-gate parameters uninitialised (torch.empty)
        m.forget_gate.A_log.uniform_(1.0, 16.0).log_()
        m.forget_gate.dt_bias.normal_(0.0, 1.0)
        m.o_norm.weight.normal_(1.0, 0.3)
    return m


def ours_for(hf: torch.nn.Module) -> torch.nn.Module:
    if isinstance(hf, MiniMaxLightningAttention):
        layer = LightningAttention(D_MODEL, hf.num_attention_heads, hf.head_dim, hf.layer_idx,
                                   hf.num_hidden_layers)
    elif isinstance(hf, Qwen3NextGatedDeltaNet):
        layer = GatedDeltaNet(D_MODEL, hf.num_v_heads, hf.num_k_heads, hf.head_k_dim, hf.head_v_dim,
                              hf.conv_kernel_size, hf.layer_norm_epsilon)
    else:
        layer = KimiDeltaAttention(D_MODEL, hf.num_heads, hf.num_heads, hf.head_dim, hf.head_dim,
                                   hf.conv_kernel_size, hf.layer_norm_epsilon)
    layer.load_from_hf(hf)
    return layer


def hf_forward(hf: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(hf, MiniMaxLightningAttention):
        return hf(x, position_embeddings=None, attention_mask=None)[0]
    return hf(x)


@pytest.mark.parametrize("T", [37, 70, 300])
@pytest.mark.parametrize("make", [hf_lightning, hf_gdn, hf_kda], ids=["L", "G", "K"])
def test_matches_hf_module(make, T):
    hf = make()
    layer = ours_for(hf)
    x = torch.randn(2, T, D_MODEL)
    with torch.no_grad():
        ref, out = hf_forward(hf, x), layer(x)
    assert out.shape == ref.shape
    assert rms_rel(ref, out) <= 1e-4


def test_gdn_grouped_value_heads_match_hf():
    # 3 value heads per key head: q/k head i serves value heads 3i..3i+2 (repeat_interleave, not repeat)
    hf = hf_gdn(n_k_heads=2, n_v_heads=6)
    layer = ours_for(hf)
    x = torch.randn(1, 45, D_MODEL)
    with torch.no_grad():
        assert rms_rel(hf(x), layer(x)) <= 1e-4


@pytest.mark.parametrize("layer_idx,n_layers", [(0, 1), (0, 8), (3, 8), (7, 8)])
def test_lightning_slopes_match_minimax(layer_idx, n_layers):
    hf = hf_lightning(layer_idx, n_layers)
    ours = lightning_slopes(4, layer_idx, n_layers)
    torch.testing.assert_close(ours, hf.slope_rate.reshape(-1), rtol=0, atol=0)  # bit for bit


def test_lightning_slopes_shrink_with_depth():
    s = torch.stack([lightning_slopes(8, i, 8) for i in range(8)])  # (layers, H)
    assert (s[1:] < s[:-1]).all() and (s[:, 1:] < s[:, :-1]).all()


# ----------------------------------------------------------------------------- caches


def small_cfg(**kw) -> ModelConfig:
    base = dict(pattern="LGK", d_model=D_MODEL, n_layers=3, n_heads=4, linear_n_heads=4, linear_n_key_heads=2,
                linear_key_head_dim=8, linear_value_head_dim=8)
    base.update(kw)
    return ModelConfig(**base)


BUILDERS = {"L": build_lightning, "G": build_gated_deltanet, "K": build_kda}


def make_layer(letter: str) -> torch.nn.Module:
    cfg = small_cfg(linear_n_key_heads=4) if letter == "K" else small_cfg()
    layer = BUILDERS[letter](cfg, 1)
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm layout shows
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
    return layer.eval()


@pytest.mark.parametrize("letter", "LGK")
def test_prefill_then_decode_equals_full_forward(letter):
    layer = make_layer(letter)
    B, T, n = 2, 21, 6
    x = torch.randn(B, T + n, D_MODEL)
    with torch.no_grad():
        ref = layer(x)
        cache = layer.new_cache(B, T + n)
        outs = [layer(x[:, :T], cache)]
        for t in range(T, T + n):
            outs.append(layer(x[:, t : t + 1], cache))
    assert cache.lengths.tolist() == [T + n] * B
    assert rms_rel(ref, torch.cat(outs, dim=1)) <= 1e-4
    # the decoded tokens alone (a wrong step would hide in the prefill's share of the error)
    assert rms_rel(ref[:, T:], torch.cat(outs[1:], dim=1)) <= 1e-4


@pytest.mark.parametrize("letter", "LGK")
def test_chunked_prefill_equals_one_shot(letter):
    layer = make_layer(letter)
    x = torch.randn(2, 37, D_MODEL)
    with torch.no_grad():
        one = layer.new_cache(2, 64)
        ref = layer(x, one)
        chunked = layer.new_cache(2, 64)
        # 2 tokens is shorter than the conv history (K - 1 = 3): the conv state must carry across it
        outs = [layer(x[:, a:b], chunked) for a, b in [(0, 13), (13, 15), (15, 37)]]
    assert rms_rel(ref, torch.cat(outs, dim=1)) <= 1e-4
    for name, t in one.state_tensors().items():
        assert rms_rel(t, chunked.state_tensors()[name]) <= 1e-4, name


@pytest.mark.parametrize("letter", "LGK")
def test_mixed_length_rows_decode_like_each_alone(letter):
    layer = make_layer(letter)
    lens, n = [9, 4], 3
    xs = [torch.randn(1, L + n, D_MODEL) for L in lens]
    with torch.no_grad():
        refs = [layer(x) for x in xs]
        cache = layer.new_cache(2, 16)
        for b, (x, L) in enumerate(zip(xs, lens, strict=True)):
            layer(x[:, :L], cache.rows(b, b + 1))  # prefill one row at a time
        assert cache.lengths.tolist() == lens
        for i in range(n):
            step = torch.cat([x[:, L + i : L + i + 1] for x, L in zip(xs, lens, strict=True)])  # (2, 1, d)
            y = layer(step, cache)
            for b, L in enumerate(lens):
                assert rms_rel(refs[b][:, L + i], y[b : b + 1, 0]) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("letter", "LGK")
def test_cache_bytes_declared_equal_allocated(letter, dtype):
    layer = make_layer(letter)
    spec = layer.cache_spec(dtype)
    assert spec.bytes_per_token == 0 and spec.constant_bytes > 0
    for batch, max_len in [(1, 10), (3, 1000)]:
        cache = layer.new_cache(batch, max_len, dtype=dtype)
        assert cache.nbytes() == batch * spec.allocated_bytes(max_len)
        assert cache.state.dtype == torch.float32  # recurrent state stays float32 whatever dtype
    if letter != "L":
        # conv history [C, K - 1] in the cache dtype on top of the float32 state
        c = layer.conv.channels * (layer.conv.kernel_size - 1)
        s = layer.n_heads * layer.key_head_dim * layer.value_head_dim * 4
        assert spec.constant_bytes == s + c * torch.empty((), dtype=dtype).element_size()
        assert isinstance(layer.new_cache(1, 1), DeltaRuleCache)
    else:
        assert spec.constant_bytes == 4 * 8 * 8 * 4
        assert isinstance(layer.new_cache(1, 1), LightningCache)


# ----------------------------------------------------------------------------- training / dtypes


@pytest.mark.parametrize("letter", "LGK")
def test_backward_reaches_every_parameter(letter):
    layer = make_layer(letter).train()
    x = torch.randn(2, 19, D_MODEL, requires_grad=True)
    layer(x).pow(2).mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("letter", "LGK")
def test_bf16_forward_close_to_float32(letter):
    layer = make_layer(letter)
    x = torch.randn(1, 40, D_MODEL)
    with torch.no_grad():
        ref = layer(x)
        out = layer.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rms_rel(ref, out.float()) < 5e-2
    if letter == "L":  # the decay rates survive the cast exactly, not rounded to bf16
        assert layer.slope.dtype == torch.float32
        assert torch.equal(layer.slope, lightning_slopes(4, 1, 3))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("letter", "LGK")
def test_bad_inputs_raise_value_error(letter):
    layer = make_layer(letter)
    with pytest.raises(ValueError, match=r"x: expected 3 dims"):
        layer(torch.randn(2, 5, 4, D_MODEL))
    with pytest.raises(ValueError, match=r"x: expected shape"):
        layer(torch.randn(2, 5, D_MODEL + 1))
    other = make_layer("K" if letter == "L" else "L")
    with pytest.raises(ValueError, match=r"cache: expected a"):
        layer(torch.randn(1, 3, D_MODEL), other.new_cache(1, 8))
    with pytest.raises(ValueError, match=r"cache: holds 2 rows"):
        layer(torch.randn(1, 3, D_MODEL), layer.new_cache(2, 8))
    with pytest.raises(ValueError, match=r"hf_module: expected a"):
        layer.load_from_hf(torch.nn.Linear(2, 2))


def test_load_from_hf_rejects_mismatched_shapes_and_depth():
    hf = hf_lightning(layer_idx=2, n_layers=5)
    with pytest.raises(ValueError, match=r"layer_idx=2 and n_layers=5"):
        LightningAttention(D_MODEL, 4, 8, 1, 5).load_from_hf(hf)
    with pytest.raises(ValueError, match=r"n_heads=4, head_dim=8"):
        LightningAttention(D_MODEL, 2, 8, 2, 5).load_from_hf(hf)
    with pytest.raises(ValueError, match=r"linear_n_heads"):
        GatedDeltaNet(D_MODEL, 4, 4, 8, 12).load_from_hf(hf_gdn(n_k_heads=2, n_v_heads=4))
    with pytest.raises(ValueError, match=r"norm_eps"):
        KimiDeltaAttention(D_MODEL, 4, 4, 8, 8, norm_eps=1e-6).load_from_hf(hf_kda())


@pytest.mark.parametrize("letter", "GK")
def test_log_decay_of_matches_hf_gate(letter):
    # the gate the layer applies, exposed for diagnostics, equals the HF module's
    x = torch.randn(2, 7, D_MODEL)
    if letter == "G":
        hf = hf_gdn()
        b, a = hf.fix_query_key_value_ordering(hf.in_proj_qkvz(x), hf.in_proj_ba(x))[4:]
        ref = -hf.A_log.float().exp() * torch.nn.functional.softplus(a.float() + hf.dt_bias)
    else:
        hf = hf_kda()
        ref = hf.forget_gate(x)
    with torch.no_grad():
        g = ours_for(hf).log_decay_of(x)
    assert g.shape == ref.shape and g.dtype == torch.float32
    torch.testing.assert_close(g, ref.detach(), rtol=1e-5, atol=1e-6)


def test_value_heads_must_be_multiple_of_key_heads():
    with pytest.raises(ValueError, match=r"linear_n_heads"):
        GatedDeltaNet(D_MODEL, 5, 2, 8, 8)


# ----------------------------------------------------------------------------- GPU (device machine)


@pytest.mark.gpu
@pytest.mark.parametrize("letter", "LGK")
def test_gpu_layer_matches_cpu_and_decodes(letter):
    layer = make_layer(letter)
    B, T, n = 2, 150, 5
    x = torch.randn(B, T + n, D_MODEL)
    with torch.no_grad():
        ref = layer(x)  # CPU chunked path
        gpu = layer.to("cuda")
        xg = x.cuda()
        full = gpu(xg)  # CUDA: ops pick the triton kernels ("auto")
        cache = gpu.new_cache(B, T + n, device="cuda")
        outs = [gpu(xg[:, :T], cache)] + [gpu(xg[:, t : t + 1], cache) for t in range(T, T + n)]
    assert rms_rel(ref, full.cpu()) <= 1e-3  # kernels may use TF32 dot products
    assert rms_rel(full, torch.cat(outs, dim=1)) <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("letter", "LGK")
def test_gpu_decode_step_captures_in_a_cuda_graph(letter):
    # the decode step must be free of host syncs and host-to-device copies
    layer = make_layer(letter).to("cuda", torch.bfloat16)
    B = 3
    prompt = torch.randn(B, 9, D_MODEL, device="cuda", dtype=torch.bfloat16)
    steps = torch.randn(4, B, 1, D_MODEL, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager_cache = layer.new_cache(B, 16, "cuda", torch.bfloat16)
        layer(prompt, eager_cache)
        eager = [layer(s, eager_cache) for s in steps]

        graph_cache = layer.new_cache(B, 16, "cuda", torch.bfloat16)
        layer(prompt, graph_cache)
        saved = {k: v.clone() for k, v in graph_cache.state_tensors().items()}
        lengths = graph_cache.lengths.clone()
        static_x = steps[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (triton compiles) outside the capture
            layer(static_x, graph_cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x, graph_cache)
        for k, v in graph_cache.state_tensors().items():  # undo warm-up and capture
            v.copy_(saved[k])
        graph_cache.lengths.copy_(lengths)
        replayed = []
        for s in steps:
            static_x.copy_(s)
            graph.replay()
            replayed.append(static_y.clone())
    for e, r in zip(eager, replayed, strict=True):
        assert rms_rel(e.float(), r.float()) <= 1e-2
    assert graph_cache.lengths.tolist() == eager_cache.lengths.tolist()
