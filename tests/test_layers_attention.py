"""S and W softmax attention layers: reference forward, caches (prefill, decode, chunked,
ragged rows, ring buffer wrap), declared bytes == allocated bytes, errors."""

import pytest
import torch

from attnlab.config import ModelConfig
from attnlab.layers import build_layer
from attnlab.layers.attention import KVCache, SlidingKVCache, build_sliding, build_softmax


def rms_rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=4, n_kv_heads=2, window=5, sink_tokens=2)
    base.update(kw)
    return ModelConfig(**base).validate()


def naive_attention(layer, x: torch.Tensor, window: int | None, sinks: int) -> torch.Tensor:
    """Written-out masked softmax over the layer's own q/k/v projections (float64)."""
    B, T, _ = x.shape
    q, k, v, gate = layer._qkv(x, torch.arange(T))
    rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2).double()
    v = v.repeat_interleave(rep, dim=2).double()
    s = torch.einsum("bthd,bshd->bhts", q.double(), k) * q.shape[-1] ** -0.5
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & ((i - j < window) | (j < sinks))
    s = s.masked_fill(~allowed, float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v).to(x.dtype)
    return layer._out(o, gate)


@pytest.mark.parametrize(
    "letter,kw",
    [
        ("S", dict()),
        ("S", dict(attn_output_gate=True, qk_norm=True, norm_zero_centered=True, rope_fraction=0.25)),
        ("S", dict(n_kv_heads=1, rope_fraction=0.0)),
        ("W", dict(window=5, sink_tokens=0)),
        ("W", dict(window=4, sink_tokens=3, attn_output_gate=True)),
    ],
)
def test_forward_matches_written_out_attention(letter, kw):
    layer = build_layer(letter, cfg(**kw), 0)
    if layer.q_norm is not None:  # make the zero-initialised (1 + w) norms non-trivial
        with torch.no_grad():
            layer.q_norm.weight.normal_(0, 0.3)
            layer.k_norm.weight.normal_(0, 0.3)
    x = torch.randn(2, 19, 32)
    ref = naive_attention(layer, x, layer.window, layer.sink_tokens)
    assert rms_rel(ref, layer(x)) < 1e-5


def test_window_at_least_sequence_equals_full_attention():
    c = cfg(window=64, sink_tokens=0)
    s, w = build_softmax(c, 0), build_sliding(c, 0)
    w.load_state_dict(s.state_dict())
    x = torch.randn(1, 20, 32)
    assert rms_rel(s(x), w(x)) < 1e-6


CASES = [
    ("S", dict(attn_output_gate=True, qk_norm=True, rope_fraction=0.5)),
    ("W", dict(window=5, sink_tokens=0)),
    ("W", dict(window=4, sink_tokens=2)),
    ("W", dict(window=1, sink_tokens=1)),
]


@pytest.mark.parametrize("letter,kw", CASES)
def test_prefill_then_decode_equals_full_forward(letter, kw):
    layer = build_layer(letter, cfg(**kw), 0)
    x = torch.randn(2, 23, 32)
    ref = layer(x)
    cache = layer.new_cache(2, 30)
    outs = [layer(x[:, :9], cache)] + [layer(x[:, t : t + 1], cache) for t in range(9, 23)]
    assert rms_rel(ref, torch.cat(outs, 1)) <= 1e-4
    assert cache.lengths.tolist() == [23, 23]


@pytest.mark.parametrize("letter,kw", CASES)
def test_chunked_prefill_equals_one_shot(letter, kw):
    layer = build_layer(letter, cfg(**kw), 0)
    x = torch.randn(2, 29, 32)
    c1, c2 = layer.new_cache(2, 40), layer.new_cache(2, 40)
    one = layer(x, c1)
    # chunks shorter and longer than the window, so the ring buffer wraps inside a chunk
    bounds = [0, 3, 4, 11, 12, 29]
    chunked = torch.cat([layer(x[:, a:b], c2) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], 1)
    assert rms_rel(one, chunked) <= 1e-4
    # both caches continue identically
    y = torch.randn(2, 1, 32)
    assert rms_rel(layer(y, c1), layer(y, c2)) <= 1e-4


@pytest.mark.parametrize("letter,kw", CASES)
def test_ragged_rows_decode_like_each_row_alone(letter, kw):
    layer = build_layer(letter, cfg(**kw), 0)
    lens = [7, 13]
    x = torch.randn(2, 20, 32)
    cache = layer.new_cache(2, 24)
    for b, n in enumerate(lens):  # prefill each row alone through a view of the batch cache
        layer(x[b : b + 1, :n], cache.rows(b, b + 1))
    assert cache.lengths.tolist() == lens
    steps = 5
    outs = []
    for s in range(steps):
        tok = torch.stack([x[b, n + s] for b, n in enumerate(lens)])[:, None]  # (2, 1, d)
        outs.append(layer(tok, cache))
    for b, n in enumerate(lens):
        ref = layer(x[b : b + 1, : n + steps])[:, n:]
        got = torch.cat([o[b : b + 1] for o in outs], 1)
        assert rms_rel(ref, got) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_len", [3, 6, 50])
@pytest.mark.parametrize("letter", ["S", "W"])
def test_nbytes_equals_declared(letter, max_len, dtype):
    layer = build_layer(letter, cfg(window=4, sink_tokens=2), 0)
    cache = layer.new_cache(3, max_len, dtype=dtype)
    spec = layer.cache_spec(dtype)
    assert cache.nbytes() == 3 * spec.allocated_bytes(max_len)
    elt = torch.empty((), dtype=dtype).element_size()
    assert spec.bytes_per_token == 2 * 2 * 8 * elt  # K and V, 2 kv heads of dim 8
    if letter == "W":
        assert isinstance(cache, SlidingKVCache) and spec.max_tokens == 6
        assert cache.k.shape[1] == min(max_len, 6)  # never more than window + sinks
    else:
        assert isinstance(cache, KVCache) and spec.max_tokens is None and cache.k.shape[1] == max_len


def test_window_cache_runs_past_max_len_slots_but_full_cache_does_not():
    c = cfg(window=3, sink_tokens=1)
    w, s = build_sliding(c, 0), build_softmax(c, 0)
    x = torch.randn(1, 12, 32)
    wc = w.new_cache(1, 100)
    assert wc.k.shape[1] == 4
    for t in range(12):
        w(x[:, t : t + 1], wc)
    assert wc.lengths.item() == 12
    sc = s.new_cache(1, 4)
    s(x[:, :4], sc)
    with pytest.raises(ValueError, match="max_len"):
        s(x[:, 4:5], sc)


def test_bf16_cache_close_to_float32():
    layer = build_layer("W", cfg(window=4, sink_tokens=1), 0)
    x = torch.randn(1, 10, 32)
    ref = layer(x)
    cache = layer.new_cache(1, 10, dtype=torch.bfloat16)
    out = torch.cat([layer(x[:, :6], cache)] + [layer(x[:, t : t + 1], cache) for t in range(6, 10)], 1)
    assert rms_rel(ref, out) < 2e-2


def test_errors():
    layer = build_layer("S", cfg(), 0)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(2, 5, 31))
    cache = layer.new_cache(2, 10)
    layer(torch.randn(1, 3, 32), cache.rows(0, 1))
    with pytest.raises(ValueError, match="different lengths"):
        layer(torch.randn(2, 2, 32), cache)
    with pytest.raises(ValueError, match="KVCache"):
        layer(torch.randn(2, 1, 32), build_layer("W", cfg(), 0).new_cache(2, 10))
    with pytest.raises(ValueError, match="n_kv_heads"):
        build_softmax(ModelConfig(d_model=32, n_heads=4, n_kv_heads=3), 0)


def test_backward_reaches_every_parameter():
    layer = build_layer("S", cfg(attn_output_gate=True, qk_norm=True), 0)
    layer(torch.randn(2, 9, 32)).pow(2).mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------ shared parts (layers/common.py)


def test_rope_matches_transformers_rotate_half_and_interleaved():
    hf_q3 = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    hf_ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from attnlab.layers.common import RotaryEmbedding, apply_rope

    q, k = torch.randn(2, 7, 3, 16), torch.randn(2, 7, 3, 16)
    cos, sin = RotaryEmbedding(8, 500.0)(torch.arange(7)[None].expand(2, 7) + 5)  # partial: 8 of 16 dims
    c2, s2 = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    ref_q, ref_k = hf_q3.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), c2, s2)
    assert torch.allclose(apply_rope(q, cos, sin).transpose(1, 2), ref_q, atol=1e-6)
    assert torch.allclose(apply_rope(k, cos, sin).transpose(1, 2), ref_k, atol=1e-6)
    # interleaved pairs: HF de-interleaves q and k; scores q.k are what must agree
    qi, ki = q[..., :8].contiguous(), k[..., :8].contiguous()
    hq, hk = hf_ds.apply_rotary_pos_emb_interleave(qi.transpose(1, 2), ki.transpose(1, 2), c2, s2)
    ours = torch.einsum("bthd,bshd->bhts", apply_rope(qi, cos, sin, True), apply_rope(ki, cos, sin, True))
    assert torch.allclose(ours, hq @ hk.transpose(-1, -2), atol=1e-5)


def test_yarn_matches_transformers():
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import DeepseekV3Config

    from attnlab.layers.common import yarn_inv_freq

    scaling = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
               "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
    c = DeepseekV3Config(qk_rope_head_dim=64, rope_scaling=scaling, max_position_embeddings=163840)
    ref, ref_factor = rope_utils.ROPE_INIT_FUNCTIONS["yarn"](c)
    ours, factor = yarn_inv_freq(64, c.rope_parameters["rope_theta"], c.rope_parameters)
    assert torch.allclose(ours, ref, rtol=1e-6) and abs(factor - ref_factor) < 1e-9


def test_bf16_model_keeps_float32_rope_frequencies():
    layer = build_softmax(cfg(), 0)
    ref = layer.rotary.inv_freq.clone()
    layer = layer.to(torch.bfloat16)
    assert layer.rotary.inv_freq.dtype == torch.float32 and torch.equal(layer.rotary.inv_freq, ref)
    with torch.device("meta"):
        meta = build_softmax(cfg(), 0)
    # built under a device context the frequencies live on that device (under a CUDA context a CPU
    # buffer needed a host copy in every forward, which CUDA-graph capture refuses)
    assert meta.rotary.inv_freq.device.type == "meta"
    assert torch.equal(meta.to_empty(device="cpu").rotary.inv_freq, ref)  # materialised later: still right


def test_norms():
    from attnlab.layers.common import GatedRMSNorm, RMSNorm

    x, g = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    n = RMSNorm(16, 1e-6, zero_centered=True)
    assert torch.equal(n.weight, torch.zeros(16))
    with torch.no_grad():
        n.weight.normal_()
    x_hat = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    assert torch.allclose(n(x), x_hat * (1 + n.weight), atol=1e-6)
    gn = GatedRMSNorm(16, 1e-6, "sigmoid")
    assert torch.allclose(gn(x, g), x_hat * torch.sigmoid(g), atol=1e-6)
    assert torch.allclose(GatedRMSNorm(16)(x, g), x_hat * torch.nn.functional.silu(g), atol=1e-6)


def test_short_conv_state_continues_across_chunks():
    from attnlab.layers.common import ShortConv

    conv = ShortConv(6, 4)
    x = torch.randn(2, 11, 6)
    padded = torch.nn.functional.pad(x.transpose(1, 2), (3, 0))
    ref = torch.nn.functional.silu(torch.nn.functional.conv1d(padded, conv.weight, groups=6)).transpose(1, 2)
    assert torch.allclose(conv(x), ref, atol=1e-6)
    state = conv.new_state(2)
    out = torch.cat([conv(x[:, :2], state), conv(x[:, 2:3], state), conv(x[:, 3:], state)], 1)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(state, x[:, -3:].transpose(1, 2))
