"""The segment-parallel Lightning forward (attnlab.kernels.lightning_fwd) against the float64 token
loop (attnlab.ops.lightning_attention, mode="recurrent") and the per-chunk forward it replaces.

CPU: tiny sizes under ``TRITON_INTERPRET=1`` (``test_interpreter_suite`` re-runs the ``interp_``
tests in a subprocess), with segments forced short (64 or 128 tokens) so that every test crosses
several. bf16 runs only on the GPU: the interpreter's bf16 conversions are wrong for the old
kernels too. GPU tests are marked ``gpu``. Error metric: rms(ref − out) / rms(ref).
"""

from __future__ import annotations

import pytest
import torch
from _triton_tests import HAVE_TRITON, INTERPRETED, interp, rel_err, run_interpreter_suite


def make(b, t, h, hk, d_k, d_v, slopes, dtype=torch.float32, device="cpu", seed=0):
    """q, k [B,T,H_k,D_k]; v [B,T,H,D_v]; slope [H]; h0 float32 [B,H,D_k,D_v]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hk, d_k, generator=gen)
    k = torch.randn(b, t, hk, d_k, generator=gen) / d_k**0.5
    v = torch.randn(b, t, h, d_v, generator=gen)
    h0 = torch.randn(b, h, d_k, d_v, generator=gen)
    slope = torch.tensor(slopes, dtype=torch.float32)
    return *(x.to(device, dtype) for x in (q, k, v)), slope.to(device), h0.to(device)


def oracle(q, k, v, slope, h0, scale):
    """float64 token loop; key heads repeated for GQA. Returns (o [B,T,H,D_v], S [B,H,D_k,D_v])."""
    from attnlab import ops

    rep = v.shape[2] // q.shape[2]
    q, k = (x.double().repeat_interleave(rep, dim=2) for x in (q, k))
    return ops.lightning_attention(q, k, v.double(), slope.double(), scale=scale,
                                   initial_state=None if h0 is None else h0.double(),
                                   output_final_state=True, mode="recurrent")


@pytest.fixture
def segmented():
    """The segmented forward on, outputs poisoned with NaN, segments of 64 tokens (tests may change
    SEGMENT_LEN); everything restored afterwards."""
    from attnlab.kernels import lightning_fwd, linear

    saved = linear.LIGHTNING_SEGMENTED, linear.POISON_OUTPUTS, lightning_fwd.SEGMENT_LEN
    linear.LIGHTNING_SEGMENTED, linear.POISON_OUTPUTS, lightning_fwd.SEGMENT_LEN = True, True, 64
    yield lightning_fwd
    linear.LIGHTNING_SEGMENTED, linear.POISON_OUTPUTS, lightning_fwd.SEGMENT_LEN = saved


# ------------------------------------------------------------------------------------------------
# CPU, under the Triton interpreter


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETED, reason="already inside the interpreter run")
def test_interpreter_suite():
    run_interpreter_suite(__file__)


SLOPES = [1e-3, 0.1, 2.0, 15.0]  # 15: γ^64 = e^-960 underflows within a chunk; nothing may overflow


@interp
@pytest.mark.parametrize("t", [1, 63, 64, 65, 200, 257])
@pytest.mark.parametrize("dims", [(24, 40, 2), (64, 64, 1)])  # (D_k, D_v, value heads per key head)
@pytest.mark.parametrize("use_h0", [True, False])
def test_interp_forward_matches_loop(segmented, t, dims, use_h0):
    from attnlab.kernels import linear

    d_k, d_v, rep = dims
    segmented.SEGMENT_LEN = 64 if t < 200 else 128
    q, k, v, slope, h0 = make(2, t, 4, 4 // rep, d_k, d_v, SLOPES, seed=t)
    h0 = h0 if use_h0 else None
    o, ht = linear.lightning_attention(q, k, v, slope, scale=0.5, initial_state=h0, output_final_state=True)
    ro, rs = oracle(q, k, v, slope, h0, 0.5)
    assert o.shape == ro.shape and ht.shape == rs.shape
    assert rel_err(o, ro) < 1e-5
    assert rel_err(ht, rs) < 1e-5


@interp
def test_interp_wide_key_head(segmented):
    """D_k = 200 > 128 (the programs take at most 32 value columns), D_v = 72: three blocks."""
    from attnlab.kernels import linear

    q, k, v, slope, h0 = make(1, 150, 2, 1, 200, 72, [0.01, 4.0], seed=12)
    o, ht = linear.lightning_attention(q, k, v, slope, initial_state=h0, output_final_state=True)
    ro, rs = oracle(q, k, v, slope, h0, 1.0)
    assert rel_err(o, ro) < 1e-5 and rel_err(ht, rs) < 1e-5


@interp
def test_interp_equals_per_chunk_forward_fp16(segmented):
    """fp16 in, fp16 out: the same numbers as the per-chunk forward (both round the state to the
    input dtype for the tensor-core products, so they agree to fp16 rounding), near the loop."""
    from attnlab.kernels import linear

    q, k, v, slope, h0 = make(1, 190, 2, 2, 32, 48, [0.05, 0.7], dtype=torch.float16, seed=4)
    o, ht = linear.lightning_attention(q, k, v, slope, initial_state=h0, output_final_state=True)
    linear.LIGHTNING_SEGMENTED = False
    o_old, ht_old = linear.lightning_attention(q, k, v, slope, initial_state=h0, output_final_state=True)
    ro, rs = oracle(q, k, v, slope, h0, 1.0)
    assert o.dtype == torch.float16
    assert rel_err(o, o_old) < 2e-3 and rel_err(ht, ht_old) < 2e-3
    assert rel_err(o, ro) < 2e-3 and rel_err(ht, rs) < 2e-3


@interp
def test_interp_varlen_equals_separate_sequences(segmented):
    """Packed sequences of 130, 1, 0 and 257 tokens (segments of 64 never cross a sequence; the
    empty one's final state is its initial state)."""
    from attnlab.kernels import linear

    lens = [130, 1, 0, 257]
    parts = [make(1, n, 4, 2, 24, 40, SLOPES, seed=i) for i, n in enumerate(lens)]
    slope = parts[0][3]
    q, k, v = (torch.cat([p[j] for p in parts], dim=1) for j in range(3))
    h0 = torch.cat([p[4] for p in parts], dim=0)  # (N, H, K, V)
    cu = torch.tensor([0, 130, 131, 131, 388])
    o, ht = linear.lightning_attention(q, k, v, slope, initial_state=h0, output_final_state=True,
                                       cu_seqlens=cu)
    for i, p in enumerate(parts):
        ro, rs = oracle(p[0], p[1], p[2], slope, p[4], 1.0)
        if lens[i]:
            assert rel_err(o[:, cu[i]:cu[i + 1]], ro) < 1e-5
        assert rel_err(ht[i], rs[0]) < 1e-5


@interp
@pytest.mark.parametrize("varlen", [False, True])
def test_interp_chunk_states_equal_per_chunk_forward(segmented, varlen):
    """The per-chunk states (written by the output pass when a gradient is needed, and by
    chunk_states for a backward that lacks them) are the per-chunk forward's, in the same layout."""
    from attnlab.kernels import linear

    q, k, v, slope, h0 = make(1 if varlen else 2, 200, 4, 2, 24, 40, SLOPES, seed=6)
    cu = torch.tensor([0, 70, 200], dtype=torch.int32) if varlen else None
    h0 = torch.cat([h0, -h0]) if varlen else h0  # one per sequence: (N, H, K, V)
    linear.LIGHTNING_SEGMENTED = False
    _, _, old = linear._forward(q, k, v, None, None, slope, 1.0, h0, False, cu, 0)
    new = segmented.chunk_states(q, k, v, slope, h0, cu)
    assert new.shape == old.shape == (5 if varlen else 8, 4, 24, 40)
    assert rel_err(new, old) < 1e-6


@interp
@pytest.mark.parametrize("varlen", [False, True])
def test_interp_gradients_through_segmented_forward(segmented, varlen):
    """dq, dk, dv, dh0 of (o·dO + S_T·dS), with GQA, through the segmented forward (which keeps the
    per-chunk states because inputs need gradients) and Lightning's Triton backward, against
    autograd through the float64 loop."""
    from attnlab.kernels import linear

    t = 150
    q, k, v, slope, h0 = make(1, t, 4, 2, 24, 40, SLOPES, seed=8)
    cu = torch.tensor([0, 65, t]) if varlen else None
    bounds = [(0, 65), (65, t)] if varlen else [(0, t)]
    h0 = h0.expand(len(bounds), -1, -1, -1).contiguous()
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(1, t, 4, 40, generator=gen)
    dS = torch.randn(h0.shape, generator=gen)
    xs = [x.clone().requires_grad_() for x in (q, k, v, h0)]
    o, ht = linear.lightning_attention(*xs[:3], slope, initial_state=xs[3], output_final_state=True,
                                       cu_seqlens=cu)
    got = torch.autograd.grad((o * do).sum() + (ht * dS).sum(), xs)
    leaves = [x.double().requires_grad_() for x in (q, k, v, h0)]
    loss = 0
    for i, (a, b) in enumerate(bounds):
        qi, ki, vi = (x[:, a:b] for x in leaves[:3])
        ro, rs = oracle(qi, ki, vi, slope, leaves[3][i:i + 1], 1.0)
        loss = loss + (ro * do[:, a:b].double()).sum() + (rs * dS[i:i + 1].double()).sum()
    ref = torch.autograd.grad(loss, leaves)
    for name, a, r in zip(("q", "k", "v", "h0"), got, ref, strict=True):
        assert a.shape == r.shape, name
        assert rel_err(a, r) < 1e-5, name


@interp
def test_interp_backward_recomputes_missing_states(segmented, monkeypatch):
    """A backward whose forward kept no per-chunk states recomputes them (chunk_states): force that
    by making the forward drop them, and compare with the gradients when they were kept."""
    from attnlab.kernels import linear

    q, k, v, slope, h0 = make(1, 140, 2, 2, 24, 40, [0.05, 3.0], seed=9)
    do = torch.randn(1, 140, 2, 40)

    def grads():
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o, _ = linear.lightning_attention(*xs, slope, initial_state=h0)
        return torch.autograd.grad((o * do).sum(), xs)

    kept = grads()
    real_forward = segmented.forward

    def drop(*args, store_states=False):
        return real_forward(*args[:8], store_states)

    # linear._forward passes store_states 9th (dropped here); chunk_states passes it by keyword
    monkeypatch.setattr(segmented, "forward", drop)
    dropped = grads()
    for a, r in zip(dropped, kept, strict=True):
        assert rel_err(a, r) < 1e-6


@interp
def test_interp_segment_length(segmented, monkeypatch):
    """Forced lengths are checked; on CUDA the length keeps pass 3 within one wave of programs_per_sm
    programs per SM, uses most of it, and respects min_segment (the SM count faked: the rule is host
    arithmetic). At H = 16 (32 programs a segment) and the default one program per SM: 4 segments;
    at H = 64 (128 a segment): 1."""
    segmented.SEGMENT_LEN = 100
    with pytest.raises(ValueError, match="SEGMENT_LEN"):
        segmented.segment_length(1000, 4, 64, 64, torch.device("cpu"))
    segmented.SEGMENT_LEN = None
    assert segmented.segment_length(1000, 4, 64, 64, torch.device("cpu")) == segmented.CPU_SEGMENT_LEN
    monkeypatch.setattr(segmented, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    cfg = segmented.TUNING
    for h in (16, 64, 256):
        per_seg = h * -(-128 // min(cfg["output"]["BV"], 128))  # programs per segment
        for pps in (1, 2, 3):
            monkeypatch.setitem(cfg, "segments", {"programs_per_sm": pps, "min_segment": 256})
            for t in (16384, 65536, 262144):
                length = segmented.segment_length(t, h, 128, 128, cuda)
                n_seg = -(-t // length)
                assert length % 64 == 0 and length >= 256
                assert n_seg * per_seg <= max(pps * 132, per_seg)  # one wave (or one segment)
                assert (n_seg + 1) * per_seg > pps * 132  # and most of it
    monkeypatch.setitem(cfg, "segments", {"programs_per_sm": 1, "min_segment": 256})
    assert -(-16384 // segmented.segment_length(16384, 16, 128, 128, cuda)) == 4
    assert segmented.segment_length(65536, 64, 128, 128, cuda) == 65536
    assert segmented.segment_length(300, 16, 128, 128, cuda) == 256


# ------------------------------------------------------------------------------------------------
# GPU (the lead runs these on the device machine)


def _gpu_case(t, h=16, d=128, seed=0):
    slopes = torch.linspace(0.01, 1.0, h).tolist()
    return make(1, t, h, h, d, d, slopes, dtype=torch.bfloat16, device="cuda", seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [4096, 70000])
def test_gpu_bf16_matches_per_chunk_forward(t):
    """bf16, default (device-chosen) segments: outputs and final state equal the per-chunk
    forward's to bf16 rounding; at 4096 tokens also the float64 loop's."""
    from attnlab.kernels import linear

    q, k, v, slope, h0 = _gpu_case(t)
    saved = linear.LIGHTNING_SEGMENTED, linear.POISON_OUTPUTS
    try:
        linear.POISON_OUTPUTS = True
        linear.LIGHTNING_SEGMENTED = True
        o, ht = linear.lightning_attention(q, k, v, slope, initial_state=h0, output_final_state=True)
        linear.LIGHTNING_SEGMENTED = False
        o_old, ht_old = linear.lightning_attention(q, k, v, slope, initial_state=h0, output_final_state=True)
    finally:
        linear.LIGHTNING_SEGMENTED, linear.POISON_OUTPUTS = saved
    assert o.dtype == torch.bfloat16
    assert rel_err(o, o_old) < 1e-2 and rel_err(ht, ht_old) < 1e-2
    if t <= 4096:
        ro, rs = oracle(q, k, v, slope, h0, 1.0)
        assert rel_err(o, ro) < 2e-2 and rel_err(ht, rs) < 2e-2


@pytest.mark.gpu
def test_gpu_awkward_shapes_fp32(segmented):
    """fp32, D_k = 100, D_v = 60, GQA, a partial last segment and chunk, segments of 128."""
    from attnlab.kernels import linear

    segmented.SEGMENT_LEN = 128
    q, k, v, slope, h0 = make(2, 1000, 4, 2, 100, 60, SLOPES, device="cuda", seed=3)
    o, ht = linear.lightning_attention(q, k, v, slope, initial_state=h0, output_final_state=True)
    ro, rs = oracle(q, k, v, slope, h0, 1.0)
    assert rel_err(o, ro) < 2e-5 and rel_err(ht, rs) < 2e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_head_dim_256(segmented, dtype):
    """D_k = D_v = 256 (the largest the kernels accept; BV drops to 32), default segments."""
    from attnlab.kernels import linear

    segmented.SEGMENT_LEN = None
    q, k, v, slope, h0 = make(1, 3000, 2, 2, 256, 256, [0.02, 0.5], dtype=dtype, device="cuda", seed=5)
    o, ht = linear.lightning_attention(q, k, v, slope, initial_state=h0, output_final_state=True)
    ro, rs = oracle(q, k, v, slope, h0, 1.0)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(o, ro) < tol and rel_err(ht, rs) < tol


@pytest.mark.gpu
def test_gpu_varlen_and_gradients(segmented):
    """Packed bf16 sequences, default segments: forward and gradients equal the per-chunk path's."""
    from attnlab.kernels import linear

    segmented.SEGMENT_LEN = None
    lens = [5000, 1, 3000, 70]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda")
    q, k, v, slope, _ = _gpu_case(sum(lens), seed=2)
    do = torch.randn_like(v)

    def run():
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o, ht = linear.lightning_attention(*xs, slope, output_final_state=True, cu_seqlens=cu)
        return (o, ht, *torch.autograd.grad((o.float() * do.float()).sum(), xs))

    new = run()
    linear.LIGHTNING_SEGMENTED = False
    old = run()
    for a, r in zip(new, old, strict=True):
        assert rel_err(a, r) < 1e-2
