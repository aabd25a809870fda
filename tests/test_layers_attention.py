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
