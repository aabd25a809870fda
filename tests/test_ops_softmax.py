"""softmax_attention / softmax_decode against the float32 oracle and against their contract."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import ops
from attnlab.ops import softmax as softmax_mod
from attnlab.ops.softmax import _reference_softmax_attention as reference


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def qkv(B, T, S, H, H_kv, D, D_v=None, dtype=torch.float32):
    q = torch.randn(B, T, H, D, dtype=dtype)
    k = torch.randn(B, S, H_kv, D, dtype=dtype)
    v = torch.randn(B, S, H_kv, D_v or D, dtype=dtype)
    return q, k, v


def loop_attention(q, k, v, visible, scale):
    """Per-query, per-head float64 loop: the contract written out, to check the oracle itself.
    visible(p, s) says whether query position p sees key s."""
    B, T, H, D = q.shape
    S, H_kv = k.shape[1], k.shape[2]
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            p = S - T + t
            keys = [s for s in range(S) if visible(p, s)]
            for h in range(H):
                hk = h // (H // H_kv)
                logits = torch.stack([q[b, t, h].double() @ k[b, s, hk].double() for s in keys]) * scale
                w = torch.softmax(logits, 0)
                out[b, t, h] = sum(wi * v[b, s, hk].double() for wi, s in zip(w, keys, strict=True))
    return out


def test_oracle_matches_the_written_out_contract():
    q, k, v = qkv(1, 6, 9, 4, 2, 8, 5)
    w, n = 3, 2
    got = reference(q, k, v, window=w, sink_tokens=n, scale=0.7)
    want = loop_attention(q, k, v, lambda p, s: s <= p and (s > p - w or s < n), 0.7)
    assert rel_err(got, want) < 1e-6
    got = reference(q, k, v, causal=False)
    want = loop_attention(q, k, v, lambda p, s: True, 8**-0.5)
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("D", [16, 60, 64])
def test_causal_matches_reference(T, D):
    q, k, v = qkv(2, T, T, 4, 4, D)
    out = ops.softmax_attention(q, k, v)
    assert out.shape == (2, T, 4, D) and out.dtype == torch.float32
    assert rel_err(out, reference(q, k, v)) < 1e-5


@pytest.mark.parametrize("H, H_kv", [(8, 2), (8, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_gqa_mqa_and_value_dim(H, H_kv, causal):
    q, k, v = qkv(2, 65, 65, H, H_kv, 60, 24)
    out = ops.softmax_attention(q, k, v, causal=causal, scale=0.3)
    assert out.shape == (2, 65, H, 24)
    assert rel_err(out, reference(q, k, v, causal=causal, scale=0.3)) < 1e-5
    # GQA is the same as repeating each kv head for its query-head group
    k_rep, v_rep = k.repeat_interleave(H // H_kv, 2), v.repeat_interleave(H // H_kv, 2)
    assert rel_err(out, ops.softmax_attention(q, k_rep, v_rep, causal=causal, scale=0.3)) < 1e-6


def test_explicit_scale_changes_the_result():
    q, k, v = qkv(1, 20, 20, 2, 2, 16)
    a, b = ops.softmax_attention(q, k, v), ops.softmax_attention(q, k, v, scale=1.0)
    assert rel_err(a, reference(q, k, v, scale=16**-0.5)) < 1e-5
    assert rel_err(b, reference(q, k, v, scale=1.0)) < 1e-5
    assert rel_err(a, b) > 1e-2


@pytest.mark.parametrize("window", [1, 7, 64, 500])
@pytest.mark.parametrize("sinks", [0, 3])
def test_window_and_sinks_match_reference(window, sinks, monkeypatch):
    monkeypatch.setattr(softmax_mod, "_WINDOW_BLOCK", 32)  # several query blocks on a small T
    q, k, v = qkv(2, 200, 200, 4, 2, 16, 12)
    out = ops.softmax_attention(q, k, v, window=window, sink_tokens=sinks)
    assert rel_err(out, reference(q, k, v, window=window, sink_tokens=sinks)) < 1e-5


def test_window_over_default_blocks():
    q, k, v = qkv(1, 1100, 1100, 2, 1, 16)  # > 2 blocks of _WINDOW_BLOCK
    out = ops.softmax_attention(q, k, v, window=100, sink_tokens=4)
    assert rel_err(out, reference(q, k, v, window=100, sink_tokens=4)) < 1e-5


def test_window_differs_from_full_causal():
    q, k, v = qkv(1, 64, 64, 2, 2, 16)
    assert rel_err(ops.softmax_attention(q, k, v, window=8), ops.softmax_attention(q, k, v)) > 1e-2


@pytest.mark.parametrize("window, sinks", [(None, 0), (16, 0), (16, 4)])
@pytest.mark.parametrize("T", [1, 5, 64])
def test_continuation_equals_tail_of_full(window, sinks, T, monkeypatch):
    monkeypatch.setattr(softmax_mod, "_WINDOW_BLOCK", 24)
    q, k, v = qkv(2, 100, 100, 4, 2, 16)
    full = ops.softmax_attention(q, k, v, window=window, sink_tokens=sinks)
    tail = ops.softmax_attention(q[:, -T:], k, v, window=window, sink_tokens=sinks)  # S = 100 > T
    assert rel_err(tail, full[:, -T:]) < 1e-5
    assert rel_err(tail, reference(q[:, -T:], k, v, window=window, sink_tokens=sinks)) < 1e-5


def test_bf16_inputs():
    q, k, v = qkv(2, 65, 80, 4, 2, 64, dtype=torch.bfloat16)
    for kw in ({}, {"window": 9, "sink_tokens": 2}):
        out = ops.softmax_attention(q, k, v, **kw)
        assert out.dtype == torch.bfloat16
        assert rel_err(out, reference(q.float(), k.float(), v.float(), **kw)) < 2e-2


def test_gradients_match_reference():
    q, k, v = (t.double().requires_grad_() for t in qkv(1, 40, 50, 4, 2, 8, 6))
    for kw in ({}, {"window": 5, "sink_tokens": 2}):
        grads = torch.autograd.grad(ops.softmax_attention(q, k, v, **kw).square().sum(), (q, k, v))
        want = torch.autograd.grad(reference(q, k, v, **kw).square().sum(), (q, k, v))
        for g, w in zip(grads, want, strict=True):
            assert rel_err(g, w) < 1e-8


@settings(deadline=None, max_examples=12)
@given(
    T=st.integers(1, 40),
    extra=st.integers(0, 30),
    groups=st.sampled_from([(2, 1), (4, 2), (3, 3)]),
    D=st.integers(1, 20),
    window=st.one_of(st.none(), st.integers(1, 50)),
    sinks=st.integers(0, 5),
)
def test_property_matches_reference(T, extra, groups, D, window, sinks):
    H, H_kv = groups
    q, k, v = qkv(1, T, T + extra, H, H_kv, D)
    out = ops.softmax_attention(q, k, v, window=window, sink_tokens=sinks)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(q, k, v, window=window, sink_tokens=sinks)) < 1e-5


# ---------------------------------------------------------------- decode


def decode_vs_full(q, k_cache, v_cache, n_valid, out):
    for b, n in enumerate(n_valid.tolist()):
        full = reference(q[b : b + 1, None], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n])  # (1, 1, H, D_v)
        assert rel_err(out[b], full[0, 0]) < 1e-5


@pytest.mark.parametrize("H, H_kv", [(4, 4), (8, 2), (8, 1)])
def test_decode_partially_filled_cache(H, H_kv):
    B, S_max = 3, 70
    q = torch.randn(B, H, 60)
    k_cache, v_cache = torch.randn(B, S_max, H_kv, 60), torch.randn(B, S_max, H_kv, 20)
    n_valid = torch.tensor([70, 1, 33])
    k_cache[2, 33:] = 1e4  # stale slots past n_valid must not matter
    v_cache[2, 33:] = -1e4
    out = ops.softmax_decode(q, k_cache, v_cache, n_valid)
    assert out.shape == (B, H, 20)
    decode_vs_full(q, k_cache, v_cache, n_valid, out)


def test_decode_is_the_last_row_of_full_attention():
    q, k, v = qkv(2, 30, 30, 4, 2, 16)
    full = ops.softmax_attention(q, k, v)
    out = ops.softmax_decode(q[:, -1], k, v, torch.tensor([30, 30]))
    assert rel_err(out, full[:, -1]) < 1e-5


def test_decode_ring_buffer_slot_order_is_irrelevant():
    B, S_max, H, H_kv, D = 2, 40, 4, 2, 16
    q = torch.randn(B, H, D)
    k_cache, v_cache = torch.randn(B, S_max, H_kv, D), torch.randn(B, S_max, H_kv, D)
    n_valid = torch.tensor([40, 25])
    ref = ops.softmax_decode(q, k_cache, v_cache, n_valid)
    k_ring, v_ring = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(n_valid.tolist()):
        perm = torch.randperm(n)
        k_ring[b, :n], v_ring[b, :n] = k_cache[b, perm], v_cache[b, perm]
    assert rel_err(ops.softmax_decode(q, k_ring, v_ring, n_valid), ref) < 1e-6


def test_decode_empty_row_is_zero_and_n_valid_clamps():
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    out = ops.softmax_decode(q, k, v, torch.tensor([0, 99]))
    assert torch.equal(out[0], torch.zeros(4, 8))
    assert rel_err(out[1], ops.softmax_decode(q, k, v, torch.tensor([10, 10]))[1]) < 1e-7


def test_decode_mla_absorbed_shapes():
    B, S_max, H = 2, 48, 16
    q = torch.randn(B, H, 576)
    latent = torch.randn(B, S_max, 1, 576)
    n_valid = torch.tensor([48, 19])
    out = ops.softmax_decode(q, latent, latent[..., :512], n_valid, scale=0.05)
    assert out.shape == (B, H, 512)
    for b, n in enumerate(n_valid.tolist()):
        lat = latent[b : b + 1, :n]
        full = reference(q[b : b + 1, None], lat, lat[..., :512], scale=0.05)
        assert rel_err(out[b], full[0, 0]) < 1e-5


@pytest.mark.parametrize("H_kv", [1, 2])  # the matmul path (one kv head) and the SDPA path
def test_decode_bf16(H_kv):
    q = torch.randn(2, 8, 64).bfloat16()
    k, v = torch.randn(2, 30, H_kv, 64).bfloat16(), torch.randn(2, 30, H_kv, 64).bfloat16()
    n_valid = torch.tensor([30, 11])
    out = ops.softmax_decode(q, k, v, n_valid)
    assert out.dtype == torch.bfloat16
    want = ops.softmax_decode(q.float(), k.float(), v.float(), n_valid)
    assert rel_err(out, want) < 2e-2


# ---------------------------------------------------------------- bad input


def _good():
    return qkv(1, 4, 6, 4, 2, 8)


@pytest.mark.parametrize(
    "mutate, name",
    [
        (lambda q, k, v: (q[0], k, v), "q"),
        (lambda q, k, v: (q, k[0], v), "k"),
        (lambda q, k, v: (q, k, v[..., 0]), "v"),
        (lambda q, k, v: (q[:, :, :3], k, v), "q"),  # 3 heads over 2 kv heads
        (lambda q, k, v: (q, k[..., :7], v), "k"),  # head dim mismatch
        (lambda q, k, v: (q, k[:, :5], v), "v"),  # S mismatch
        (lambda q, k, v: (q, k, v[:, :, :1]), "v"),  # kv head mismatch
        (lambda q, k, v: (q.expand(2, -1, -1, -1), k, v), "k"),  # batch mismatch
        (lambda q, k, v: (q, k.double(), v), "k"),
        (lambda q, k, v: (q, k, v.half()), "v"),
        (lambda q, k, v: (q.long(), k, v), "q"),
        (lambda q, k, v: (q, k, v.to("meta")), "v"),  # device mismatch
        (lambda q, k, v: (torch.cat([q, q], 1), k, v), "k"),  # causal needs S >= T
    ],
)
def test_bad_input_names_the_argument(mutate, name):
    q, k, v = mutate(*_good())
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.softmax_attention(q, k, v)


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"window": 4, "causal": False}, "window"),
        ({"sink_tokens": -1}, "sink_tokens"),
    ],
)
def test_bad_options(kw, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.softmax_attention(*_good(), **kw)


@pytest.mark.parametrize(
    "mutate, name",
    [
        (lambda q, k, v, n: (q[None], k, v, n), "q"),
        (lambda q, k, v, n: (q, k[0], v, n), "k_cache"),
        (lambda q, k, v, n: (q[:, :3], k, v, n), "q"),
        (lambda q, k, v, n: (q, k, v[:, :5], n), "v_cache"),
        (lambda q, k, v, n: (q, k, v.double(), n), "v_cache"),
        (lambda q, k, v, n: (q, k, v, n.float()), "n_valid"),
        (lambda q, k, v, n: (q, k, v, n[:1]), "n_valid"),
        (lambda q, k, v, n: (q, k, v, n.to("meta")), "n_valid"),
    ],
)
def test_decode_bad_input(mutate, name):
    args = (torch.randn(2, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8), torch.tensor([3, 6]))
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.softmax_decode(*mutate(*args))
