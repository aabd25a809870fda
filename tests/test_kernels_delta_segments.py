"""The segment-parallel delta-rule state pass (attnlab.kernels.delta_segments) against a float64
chunk recurrence, the single-pass ``linear._state_kernel`` it replaces, and, through the whole
forward, the float64 token loop (attnlab.ops gated_delta_rule / kda, mode="recurrent").

CPU: tiny sizes under ``TRITON_INTERPRET=1`` (``test_interpreter_suite`` re-runs the ``interp_``
tests in a subprocess), segments forced short (64 or 128 tokens) so that every test with more
than one chunk crosses several. The state-pass tests feed the pass synthetic prepare outputs
(w, u, kd, the cumulative gate) so that they need not run the prepare kernel, which is most of
the interpreter's time; the end-to-end tests run the real forward. GPU tests are marked ``gpu``.
Error metric: rms(ref − out) / rms(ref).
"""

from __future__ import annotations

import pytest
import torch
from _triton_tests import (
    HAVE_TRITON,
    INTERPRETED,
    compile_sm90,
    interp,
    needs_sm90_toolchain,
    rel_err,
    run_interpreter_suite,
    sm90_usage,
)

C = 64  # the kernels' chunk




@pytest.fixture
def segmented():
    """The segmented pass on, kernel outputs poisoned with NaN, segments of 64 tokens (tests may
    change SEGMENT_LEN); everything restored afterwards."""
    from attnlab.kernels import delta_segments, linear

    saved = linear.DELTA_SEGMENTED, linear.POISON_OUTPUTS, delta_segments.SEGMENT_LEN
    linear.DELTA_SEGMENTED, linear.POISON_OUTPUTS, delta_segments.SEGMENT_LEN = True, True, 64
    yield delta_segments
    linear.DELTA_SEGMENTED, linear.POISON_OUTPUTS, delta_segments.SEGMENT_LEN = saved


# ------------------------------------------------------------------------------------------------
# the state pass alone, on synthetic prepare outputs


def synthetic(gate, lens, h, d_k, d_v, use_h0, seed):
    """Prepare-kernel-shaped inputs for sequences of the given lengths, packed (B = 1) when there
    is more than one: w, kd [1, T, H, K], u [1, T, H, V], gcum (the within-chunk cumulative log-gate,
    [1, T, H] or [1, T, H, K]), h0 [N, H, K, V] or None. Strong gates (−5 per token) on the first
    head / half of the channels, weak (−1e-3) elsewhere; kd, w small enough that M_c = Diag(γ) −
    kdᵀw stays a contraction, as the real ones are."""
    gen = torch.Generator().manual_seed(seed)
    t = sum(lens)
    w = torch.randn(1, t, h, d_k, generator=gen) / (d_k * C) ** 0.5
    kd = torch.randn(1, t, h, d_k, generator=gen)
    u = torch.randn(1, t, h, d_v, generator=gen)
    shape = (1, t, h) if gate == 1 else (1, t, h, d_k)
    rate = torch.full(shape, 1e-3)
    if gate == 1:
        rate[:, :, 0] = 5.0
    else:
        rate[..., : d_k // 2] = 5.0
    g = -rate * (0.5 + torch.rand(shape, generator=gen))
    gcum = torch.empty(shape)
    for a, n in zip([0, *torch.tensor(lens).cumsum(0).tolist()], lens, strict=False):
        for c0 in range(a, a + n, C):
            gcum[:, c0:min(c0 + C, a + n)] = g[:, c0:min(c0 + C, a + n)].cumsum(1)
    h0 = torch.randn(len(lens), h, d_k, d_v, generator=gen) if use_h0 else None
    return w, u, kd, gcum, h0


def chunk_recurrence(w, u, kd, gcum, h0, lens):
    """float64: per sequence and chunk, h = S; v' = u − w S; S ← Diag(e^{G_last}) S + kdᵀ v'.
    Returns (states [n_chunks, H, K, V], vn [1, T, H, V], final [N, H, K, V])."""
    w, u, kd, gcum = (x.double() for x in (w, u, kd, gcum))
    h, d_k, d_v = w.shape[2], w.shape[3], u.shape[3]
    states, finals = [], []
    vn = torch.zeros_like(u)
    a = 0
    for i, n in enumerate(lens):
        S = torch.zeros(h, d_k, d_v, dtype=torch.float64) if h0 is None else h0[i].double().clone()
        for c0 in range(a, a + n, C):
            c1 = min(c0 + C, a + n)
            states.append(S.clone())
            v_ = u[0, c0:c1] - torch.einsum("thk,hkv->thv", w[0, c0:c1], S)  # (t, H, V)
            vn[0, c0:c1] = v_
            gam = gcum[0, c1 - 1].exp()  # (H,) or (H, K)
            S = S * (gam[:, None, None] if gam.dim() == 1 else gam[:, :, None])
            S = S + torch.einsum("thk,thv->hkv", kd[0, c0:c1], v_)
        finals.append(S)
        a += n
    n_chunks = len(states)
    return (torch.stack(states) if n_chunks else torch.zeros(0, h, d_k, d_v, dtype=torch.float64),
            vn, torch.stack(finals))


def run_state_pass(gate, w, u, kd, gcum, h0, lens, segmented_on, dense=False):
    """The state pass as linear._forward runs it: segmented, or the single-pass _state_kernel
    (launched here as _forward launches it). Several sequences go in packed with cu_seqlens, or
    with dense=True (equal lengths) as a batch [N, T/N, ...]. Returns (states, vn [1, T, H, V],
    final state)."""
    import triton

    from attnlab.kernels import delta_segments, linear

    t, h, d_k, d_v = w.shape[1], w.shape[2], w.shape[3], u.shape[3]
    n_seq = len(lens)
    cu = None
    if dense:
        w, u, kd, gcum = (x.reshape(n_seq, t // n_seq, *x.shape[2:]) for x in (w, u, kd, gcum))  # (N, T/N, .)
    elif n_seq > 1:
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    n_chunks = sum(-(-n // C) for n in lens)
    states = linear._empty(max(n_chunks, 1), h, d_k, d_v, dtype=w.dtype, device=w.device)
    vn = linear._empty(*u.shape, dtype=w.dtype, device=w.device)
    ht = linear._empty(n_seq, h, d_k, d_v, dtype=torch.float32, device=w.device)
    if segmented_on:
        delta_segments.state_pass(w, u, kd, gcum, gate, h0, cu, states, vn, ht)
    else:
        offsets = linear._chunk_tables(cu, C)[1] if cu is not None else w
        cfg = linear.TUNING["scalar"]
        bv = min(cfg["BV"], max(16, triton.next_power_of_2(d_v)))
        dt = linear._tl_dtype(w.dtype)
        linear._state_kernel[(triton.cdiv(d_v, bv), n_seq * h)](
            w, u, kd, u, w, gcum, w, states, vn, h0 if h0 is not None else ht, ht,
            cu if cu is not None else w, offsets, w.shape[1],
            H=h, HK=h, K=d_k, V=d_v, BT=C, BK=max(16, triton.next_power_of_2(d_k)), BV=bv, GATE=gate,
            USE_H0=h0 is not None, STORE_HT=True, IS_VARLEN=cu is not None, DT=dt,
            PREC="ieee" if w.dtype == torch.float32 else "tf32",
        )
    return states[:n_chunks], vn.reshape(1, t, h, d_v), ht


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETED, reason="already inside the interpreter run")
def test_interpreter_suite():
    run_interpreter_suite(__file__)


@interp
@pytest.mark.parametrize("t", [1, 63, 64, 65, 200, 257])
@pytest.mark.parametrize("dims", [(24, 40), (64, 64)])
@pytest.mark.parametrize("gate", [1, 2])
def test_interp_state_pass_matches_recurrence_and_single_pass(segmented, t, dims, gate):
    """Per-chunk states, v' and final state of the segmented pass (segments of 64 or 128 tokens,
    so up to 5 segments, the last partial) equal the float64 chunk recurrence and the single-pass
    kernel's; the initial state is on for odd T. Both gate strengths run in every case."""
    d_k, d_v = dims
    segmented.SEGMENT_LEN = 64 if t < 200 else 128
    w, u, kd, gcum, h0 = synthetic(gate, [t], 2, d_k, d_v, use_h0=t % 2 == 1, seed=t + d_k)
    got = run_state_pass(gate, w, u, kd, gcum, h0, [t], True)
    old = run_state_pass(gate, w, u, kd, gcum, h0, [t], False)
    ref = chunk_recurrence(w, u, kd, gcum, h0, [t])
    for name, a, o, r in zip(("states", "vn", "final"), got, old, ref, strict=True):
        assert a.shape == r.shape, name
        assert rel_err(a, r) < 1e-5, name
        assert rel_err(a, o) < 1e-5, name


@interp
@pytest.mark.parametrize("gate", [1, 2])
def test_interp_state_pass_packed_sequences(segmented, gate):
    """cu_seqlens: sequences of 130, 1, 0, 257 and 64 tokens (segments never cross a sequence;
    the empty one's final state is its initial state), against the recurrence and the single pass."""
    lens = [130, 1, 0, 257, 64]
    w, u, kd, gcum, h0 = synthetic(gate, lens, 2, 24, 40, use_h0=True, seed=gate)
    got = run_state_pass(gate, w, u, kd, gcum, h0, lens, True)
    old = run_state_pass(gate, w, u, kd, gcum, h0, lens, False)
    ref = chunk_recurrence(w, u, kd, gcum, h0, lens)
    assert rel_err(got[2][2], h0[2]) == 0.0  # the empty sequence
    for name, a, o, r in zip(("states", "vn", "final"), got, old, ref, strict=True):
        assert a.shape == r.shape, name
        assert rel_err(a, r) < 1e-5 and rel_err(a, o) < 1e-5, name


@interp
@pytest.mark.parametrize("gate", [1, 2])
def test_interp_state_pass_dense_batch(segmented, gate):
    """A dense batch of 3 sequences of 200 tokens (slots of non-last segments computed from the
    batch index), against the recurrence and the single pass."""
    lens = [200] * 3
    w, u, kd, gcum, h0 = synthetic(gate, lens, 2, 24, 40, use_h0=True, seed=10 + gate)
    got = run_state_pass(gate, w, u, kd, gcum, h0, lens, True, dense=True)
    old = run_state_pass(gate, w, u, kd, gcum, h0, lens, False, dense=True)
    ref = chunk_recurrence(w, u, kd, gcum, h0, lens)
    for name, a, o, r in zip(("states", "vn", "final"), got, old, ref, strict=True):
        assert a.shape == r.shape, name
        assert rel_err(a, r) < 1e-5 and rel_err(a, o) < 1e-5, name


@interp
@pytest.mark.parametrize("gate", [1, 2])
def test_interp_state_pass_wide_key_head(segmented, gate):
    """D_k = 200 > 128 (column blocks capped at 32: pass 1 has 7 blocks of M, 3 of B), D_v = 72."""
    w, u, kd, gcum, h0 = synthetic(gate, [257], 1, 200, 72, use_h0=True, seed=20 + gate)
    got = run_state_pass(gate, w, u, kd, gcum, h0, [257], True)
    ref = chunk_recurrence(w, u, kd, gcum, h0, [257])
    for name, a, r in zip(("states", "vn", "final"), got, ref, strict=True):
        assert rel_err(a, r) < 1e-5, name


@interp
def test_interp_state_pass_fp16_equals_single_pass(segmented):
    """16-bit inputs: the products round the state (and M's columns) to fp16 as the single pass
    rounds S, so the two agree to fp16 rounding, and both stay near the float64 recurrence."""
    lens = [257]
    w, u, kd, gcum, h0 = synthetic(1, lens, 2, 32, 48, use_h0=True, seed=5)
    w16, u16, kd16 = (x.half() for x in (w, u, kd))
    got = run_state_pass(1, w16, u16, kd16, gcum, h0, lens, True)
    old = run_state_pass(1, w16, u16, kd16, gcum, h0, lens, False)
    ref = chunk_recurrence(w16, u16, kd16, gcum, h0, lens)
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float16
    for name, a, o, r in zip(("states", "vn", "final"), got, old, ref, strict=True):
        assert rel_err(a, o) < 3e-3 and rel_err(a, r) < 3e-3, name


@interp
def test_interp_bad_gate_and_segment_length(segmented, monkeypatch):
    """state_pass refuses Lightning's gate 0, kd, w, u from the inputs for KDA, and an overlapped
    prepare beside a pass other than 1 or 2; forced lengths
    are checked; on CUDA the length keeps pass 3 within programs_per_sm programs per SM (one wave),
    uses most of them, and respects min_segment, and where the pass-3 shape has transition_per_sm
    keeps pass 1 within that too (SM count faked: the rule is host arithmetic)."""
    w, u, kd, gcum, _ = synthetic(1, [10], 1, 16, 16, False, 0)
    with pytest.raises(ValueError, match="gate"):
        segmented.state_pass(w, u, kd, gcum, 0, None, None, w, u, None)
    kw, ku, kkd, kgcum, _ = synthetic(2, [10], 1, 16, 16, False, 0)
    with pytest.raises(ValueError, match="from_inputs"):  # GDN's scalar gate only
        segmented.state_pass(kw, ku, kkd, kgcum, 2, None, None, kw, ku, None, from_inputs=(kw, kw, ku, kgcum))
    with pytest.raises(ValueError, match="beside"):  # the overlapped prepare runs beside pass 1 or 2
        segmented.state_pass(kw, ku, kkd, kgcum, 2, None, None, kw, ku, None, prepare=lambda lo, hi: None,
                             beside=3)
    segmented.SEGMENT_LEN = 100
    with pytest.raises(ValueError, match="SEGMENT_LEN"):
        segmented.segment_length(1000, 4, 64, 64, torch.device("cpu"))
    segmented.SEGMENT_LEN = None
    assert segmented.segment_length(1000, 4, 64, 64, torch.device("cpu")) == segmented.CPU_SEGMENT_LEN
    monkeypatch.setattr(segmented, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    cfg = segmented.TUNING
    per_seg = 16 * -(-128 // min(cfg["state"]["BV"], 128))  # pass-3 programs per segment, 16 heads
    for pps in (1, 3, 8):
        monkeypatch.setitem(cfg, "segments", {"programs_per_sm": pps, "min_segment": 512})
        for t in (65536, 262144, 1 << 20):
            length = segmented.segment_length(t, 16, 128, 128, cuda)
            n_seg = -(-t // length)
            assert length % C == 0 and length >= 512
            assert n_seg * per_seg <= max(pps * 132, per_seg)
            assert (n_seg + 1) * per_seg > pps * 132
        assert segmented.segment_length(300, 16, 128, 128, cuda) == 512
    # a pass-3 shape with transition_per_sm: pass 1 (a transition per segment but the last, 16 heads
    # x 4 column blocks of 64) one wave too, as well as pass 3 (16 heads x 2 blocks of 64 columns)
    monkeypatch.setitem(cfg, "transition", {"BX": 64, "num_warps": 4, "num_stages": 2})
    for pps, tps, expect in ((2, 3, 7), (2, 2, 5), (2, 8, 8), (1, 3, 4)):
        monkeypatch.setitem(cfg, "output_scalar", {"BV": 64, "num_warps": 4, "num_stages": 1,
                                                   "programs_per_sm": pps, "transition_per_sm": tps})
        for t in (65536, 262144, 1 << 20):
            length = segmented.segment_length(t, 16, 128, 128, cuda, "output_scalar")
            n_seg = -(-t // length)
            assert n_seg == expect, (pps, tps, t, n_seg)
            assert n_seg * 32 <= pps * 132 and (n_seg - 1) * 64 <= tps * 132


# ------------------------------------------------------------------------------------------------
# the whole forward (and backward) with the segmented pass


def make_inputs(op, b, t, h, hk, d_k, d_v, log_gate, seed=0):
    """q, k (unit norm) [B,T,H_k,D_k]; v [B,T,H,D_v]; g [B,T,H] (GDN) or [B,T,H,D_k] (KDA) around
    log_gate per token; beta [B,T,H] in (0, 1); h0 float32 [B,H,D_k,D_v]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hk, d_k, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(b, t, hk, d_k, generator=gen), dim=-1)
    v = torch.randn(b, t, h, d_v, generator=gen)
    shape = (b, t, h) if op == "gdn" else (b, t, h, d_k)
    g = log_gate * (0.5 + torch.rand(shape, generator=gen))
    beta = torch.rand(b, t, h, generator=gen)
    h0 = torch.randn(b, h, d_k, d_v, generator=gen)
    return q, k, v, g, beta, h0


def kernel(op):
    from attnlab.kernels import linear

    return linear.gated_delta_rule if op == "gdn" else linear.kda


def oracle(op, q, k, v, g, beta, h0):
    """float64 token loop of attnlab.ops; key heads repeated for GQA."""
    from attnlab import ops

    rep = v.shape[2] // q.shape[2]
    q, k = (x.double().repeat_interleave(rep, dim=2) for x in (q, k))
    fn = ops.gated_delta_rule if op == "gdn" else ops.kda
    return fn(q, k, v.double(), g.double(), beta.double(), initial_state=None if h0 is None else h0.double(),
              output_final_state=True, mode="recurrent")


@interp
@pytest.mark.parametrize(("op", "log_gate"), [("gdn", -1e-3), ("gdn", -5.0), ("kda", -1e-3)])
def test_interp_forward_matches_loop_and_single_pass(segmented, op, log_gate):
    """o and the final state through linear.gated_delta_rule / kda, GQA (4 value heads on 2 key
    heads), 150 tokens in segments of 64 with the last chunk partial: equal to the float64 loop
    and to the forward with the single-pass state kernel. (KDA at −5 per token per channel takes
    the prepare kernel's elementwise loop, slow under the interpreter; the state-pass tests above
    run strong per-channel gates.)"""
    from attnlab.kernels import linear

    q, k, v, g, beta, h0 = make_inputs(op, 1, 150, 4, 2, 24, 40, log_gate, seed=3)
    o, ht = kernel(op)(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    linear.DELTA_SEGMENTED = False
    o_old, ht_old = kernel(op)(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    ro, rs = oracle(op, q, k, v, g, beta, h0)
    assert rel_err(o, ro) < 1e-5 and rel_err(ht, rs) < 1e-5
    assert rel_err(o, o_old) < 1e-5 and rel_err(ht, ht_old) < 1e-5


def with_and_without_overlap(monkeypatch, op, xs, call=None):
    """(o, final state) of linear._forward with OVERLAP_PREPARE beside passes 1 and 2 (1), beside
    pass 2 (2), then off (0), for op's gate, and the chunk ranges _prepare was called with each
    time; call(fn) runs the forward (default: once)."""
    from attnlab.kernels import linear

    gate, kind = (1, "scalar") if op == "gdn" else (2, "vector")
    ranges, prepare = [], linear._prepare

    def spy(*args, **kwargs):
        ranges[-1].append(kwargs.get("chunks"))
        return prepare(*args, **kwargs)

    monkeypatch.setattr(linear, "_prepare", spy)
    q, k, v, g, beta, h0 = xs
    outs = []
    for mode in (1, 2, 0):
        monkeypatch.setitem(linear.OVERLAP_PREPARE, kind, mode)
        ranges.append([])

        def fn():
            return linear._forward(q, k, v, g, beta, None, q.shape[-1] ** -0.5, h0, True, None, gate)[:2]

        outs.append(call(fn) if call is not None else fn())
    return outs, ranges


@interp
@pytest.mark.parametrize("op", ["gdn", "kda"])
def test_interp_overlapped_prepare_equals_one_launch(segmented, monkeypatch, op):
    """linear.OVERLAP_PREPARE: the prepare in two chunk ranges (the segments but the last, then the
    last segment's, after passes 1 and 2 are queued, or after pass 1 is launched and pass 2 queued)
    gives the outputs and final states of the one prepare launch, bit for bit: a batch of two
    sequences of 300 tokens (segments of 128: the last of three is partial, so is its last chunk),
    bf16, GQA."""
    q, k, v, g, beta, h0 = make_inputs(op, 2, 300, 4, 2, 24, 40, -0.05, seed=11)
    segmented.SEGMENT_LEN = 128
    xs = (*(x.to(torch.bfloat16) for x in (q, k, v)), g, beta.to(torch.bfloat16), h0)
    (*ons, off), ranges = with_and_without_overlap(monkeypatch, op, xs)
    # 5 chunks a sequence; the last segment's is the 5th
    assert ranges == [[(0, 4), (4, 5)], [(0, 4), (4, 5)], [None]]
    for on in ons:
        for a, b in zip(on, off, strict=True):
            assert a.isfinite().all() and torch.equal(a, b)


def fused_and_stored(monkeypatch, op, q, k, v, g, beta, h0, cu):
    """linear._forward's (o, final states, per-chunk states) with the outputs made in the segmented
    pass (FUSED_OUTPUT on), then by the output kernel from the stored states (off); scale D_k^-1/2."""
    from attnlab.kernels import linear

    outs = []
    for fused in (True, False):
        monkeypatch.setattr(linear, "FUSED_OUTPUT", {"scalar": fused, "vector": fused})
        outs.append(linear._forward(q, k, v, g, beta, None, q.shape[-1] ** -0.5, h0, True, cu,
                                    1 if op == "gdn" else 2))
    return outs


@interp
@pytest.mark.parametrize(("op", "qg"), [("gdn", False), ("kda", True), ("kda", False)])
def test_interp_fused_output_equals_stored_states(segmented, monkeypatch, op, qg):
    """The outputs made inside the segmented pass (linear.FUSED_OUTPUT: no per-chunk states or v'
    stored, no output launch) equal the ones the output kernel makes from the stored states and
    v': packed sequences of 150, 1 and 70 tokens (partial chunks, one sequence of a single token),
    GQA (4 value heads on 2 key heads), D_k = 24, D_v = 40, initial states, segments of 64. KDA with
    the split prepare's q ⊙ e^G (qg) and without it (the single prepare kernel). The fused run
    returns no states: proof that it took the fused path."""
    from attnlab.kernels import linear

    lens = [150, 1, 70]
    parts = [make_inputs(op, 1, n, 4, 2, 24, 40, -0.05, seed=10 + i) for i, n in enumerate(lens)]
    q, k, v, g, beta = (torch.cat([p[j] for p in parts], dim=1) for j in range(5))
    h0 = torch.cat([p[5] for p in parts], dim=0)
    cu = torch.tensor([0, 150, 151, 221])
    if op == "kda":
        monkeypatch.setitem(linear.PREP_SPLIT, "vector", qg)
    (o, ht, states), (o_ref, ht_ref, states_ref) = fused_and_stored(monkeypatch, op, q, k, v, g, beta, h0, cu)
    assert states is None and states_ref is not None
    assert rel_err(o, o_ref) < 1e-6 and rel_err(ht, ht_ref) < 1e-6
    assert rel_err(o[:, :150], oracle(op, *parts[0])[0]) < 1e-5


def from_inputs_and_stored(monkeypatch, q, k, v, g, beta, h0, cu):
    """GDN's linear._forward (o, final states, per-chunk states) with the segmented pass making kd,
    w, u from k, X, v, β (linear.WUKD_FROM_INPUTS), then with the prepare writing them and the pass
    reading them back (off). Checks from the arguments each run handed delta_segments.state_pass that
    it took the path asked for."""
    from attnlab.kernels import delta_segments, linear

    seen, state_pass = [], delta_segments.state_pass

    def spy(*args, **kwargs):
        seen.append(kwargs.get("from_inputs"))
        return state_pass(*args, **kwargs)

    monkeypatch.setattr(delta_segments, "state_pass", spy)
    outs = []
    for on in (True, False):
        monkeypatch.setattr(linear, "WUKD_FROM_INPUTS", on)
        outs.append(linear._forward(q, k, v, g, beta, None, q.shape[-1] ** -0.5, h0, True, cu, 1))
    assert seen[0] is not None and seen[0][0] is k and seen[1] is None
    return outs


@interp
@pytest.mark.parametrize("fused", [True, False])
def test_interp_from_inputs_equals_stored(segmented, monkeypatch, fused):
    """GDN's segmented pass making from the forward's inputs what the prepare would write
    (linear.WUKD_FROM_INPUTS): the passes add Kᵀ (v' ⊙ e^{G_last − G}) for kdᵀ v' and make v' as
    X (β ⊙ (V − e^G ⊙ (K S))). Equal to the forward with w, u, kd written by the
    prepare and read back, and to the float64 loop: packed sequences of 150, 1 and 70 tokens, GQA (4
    value heads on 2 key heads), D_k = 24, D_v = 40, initial states, segments of 64, with the outputs
    made in pass 3 (fused) and from stored states and v' (not fused)."""
    from attnlab.kernels import linear

    monkeypatch.setattr(linear, "FUSED_OUTPUT", {"scalar": fused, "vector": fused})
    lens = [150, 1, 70]
    parts = [make_inputs("gdn", 1, n, 4, 2, 24, 40, -0.05, seed=20 + i) for i, n in enumerate(lens)]
    q, k, v, g, beta = (torch.cat([p[j] for p in parts], dim=1) for j in range(5))
    h0 = torch.cat([p[5] for p in parts], dim=0)
    cu = torch.tensor([0, 150, 151, 221])
    outs = from_inputs_and_stored(monkeypatch, q, k, v, g, beta, h0, cu)
    (o, ht, states), (o_ref, ht_ref, states_ref) = outs
    assert rel_err(o, o_ref) < 1e-6 and rel_err(ht, ht_ref) < 1e-6
    if not fused:
        assert rel_err(states, states_ref) < 1e-6
    ro, rs = oracle("gdn", *parts[2])
    assert rel_err(o[:, 151:], ro) < 1e-5 and rel_err(ht[2], rs[0]) < 1e-5


@needs_sm90_toolchain
@pytest.mark.parametrize("gate", [1, 2])
@pytest.mark.parametrize("store_ht", [False, True])
def test_fused_output_launch_fits_its_programs_per_sm(gate, store_ht):
    """The fused output pass as an H100 runs it (H = 16, D_k = D_v = 128, bf16, TUNING["output_*"],
    pointers and T 16-divisible as triton specialises them): its programs_per_sm (which sets the
    segment count, so that pass 3 is one wave) fit an SM by registers and by shared memory; its
    products run on wgmma. Its registers are at the 255 limit, so it parks a little (Triton 3.9):
    GDN 96 bytes a thread with v' and kd made from X, v, β, k (176 with the final state stored; 120 /
    216 reading w, u, kd), timed faster than the spill-free shapes all the same; KDA none (16 with
    the final state): allowed 256 and 32."""
    import triton.language as tl

    from attnlab.kernels import delta_segments, linear

    cfg = delta_segments.TUNING[("output_scalar", "output_vector")[gate - 1]]
    fn = delta_segments._segment_state_kernel
    ptr = {a: "*bf16" for a in ("w", "u", "kd", "h", "vn", "q", "k", "qg", "aqk", "o", "xa", "v", "beta")}
    ptr.update(gcum="*fp32", seg_b="*fp32", ht="*fp32", cu_seqlens="*i32", seg_table="*i32",
               chunk_offsets="*i32")
    const = dict(H=16, HK=16, K=128, V=128, BT=C, BK=128, BV=cfg["BV"], GATE=gate, STORE_HT=store_ht,
                 IS_VARLEN=False, OUTPUT=True, QG=gate == 2,
                 FROM_INPUTS=gate == 1 and linear.WUKD_FROM_INPUTS, DT=tl.bfloat16, PREC="tf32")
    div = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in ptr or a == "T"}
    kernel = compile_sm90(fn, const, ptr, floats=("scale",), attrs=div, num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"])
    regs, stack, usage = sm90_usage(kernel)
    threads = 32 * cfg["num_warps"]
    by_regs = 65536 // (-(-regs // 8) * 8 * threads)
    by_smem = (228 * 1024) // (kernel.metadata.shared + 1024)  # 1 KB reserved per block
    assert min(by_regs, by_smem) >= cfg["programs_per_sm"], (regs, kernel.metadata.shared)
    assert stack <= (256 if gate == 1 else 32), (regs, stack)
    assert "wgmma" in kernel.asm["ptx"]
    # pass 1 as this gate's forward launches it fits the transition_per_sm that sets the segment count
    tcfg = delta_segments.TUNING["transition"]
    fn = delta_segments._transition_kernel
    ptr = {a: "*bf16" for a in ("w", "u", "kd", "k", "xa", "v", "beta")}
    ptr.update(gcum="*fp32", seg_m="*fp32", seg_b="*fp32", cu_seqlens="*i32", seg_table="*i32",
               nonlast="*i32")
    const = dict(H=16, HK=16, K=128, V=128, BT=C, BK=128, BX=tcfg["BX"], NXK=128 // tcfg["BX"], GATE=gate,
                 IS_VARLEN=False, FROM_INPUTS=const["FROM_INPUTS"], DT=tl.bfloat16, PREC="tf32")
    div = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in ptr or a == "T"}
    kernel = compile_sm90(fn, const, ptr, attrs=div, num_warps=tcfg["num_warps"],
                          num_stages=tcfg["num_stages"])
    regs, stack, usage = sm90_usage(kernel)
    threads = 32 * tcfg["num_warps"]
    by_regs = 65536 // (-(-regs // 8) * 8 * threads)
    by_smem = (228 * 1024) // (kernel.metadata.shared + 1024)
    assert min(by_regs, by_smem) >= cfg["transition_per_sm"] and stack == 0, usage


@interp
def test_interp_forward_packed_equals_separate_sequences(segmented):
    """GDN with cu_seqlens (70, 0 and 150 tokens): each sequence's outputs and final state equal
    the float64 loop's on that sequence alone."""
    lens = [70, 0, 150]
    parts = [make_inputs("gdn", 1, n, 2, 2, 24, 40, -0.05, seed=i) for i, n in enumerate(lens)]
    q, k, v, g, beta = (torch.cat([p[j] for p in parts], dim=1) for j in range(5))
    h0 = torch.cat([p[5] for p in parts], dim=0)  # (N, H, K, V)
    cu = torch.tensor([0, 70, 70, 220])
    o, ht = kernel("gdn")(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for i, p in enumerate(parts):
        ro, rs = oracle("gdn", *p)
        if lens[i]:
            assert rel_err(o[:, cu[i]:cu[i + 1]], ro) < 1e-5
        assert rel_err(ht[i], rs[0]) < 1e-5


@interp
@pytest.mark.parametrize("op", ["gdn", "kda"])
def test_interp_gradients_through_segmented_forward(segmented, op):
    """dq, dk, dv, dg, dβ, dh0 of (o·dO + S_T·dS) with the segmented pass (the backward recomputes
    the states with the forward kernels, so it runs there too), 150 tokens in segments of 64,
    against autograd through the float64 loop."""
    t = 150
    xs = make_inputs(op, 1, t, 2, 2, 16, 16, -0.02, seed=7)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(1, t, 2, 16, generator=gen)
    dS = torch.randn(1, 2, 16, 16, generator=gen)
    ins = [x.clone().requires_grad_() for x in xs]
    o, ht = kernel(op)(*ins[:5], initial_state=ins[5], output_final_state=True)
    got = torch.autograd.grad((o * do).sum() + (ht * dS).sum(), ins)
    leaves = [x.double().requires_grad_() for x in xs]
    ro, rs = oracle(op, *leaves)
    ref = torch.autograd.grad((ro * do.double()).sum() + (rs * dS.double()).sum(), leaves)
    for name, a, r in zip(("q", "k", "v", "g", "beta", "h0"), got, ref, strict=True):
        assert a.shape == r.shape, name
        assert rel_err(a, r) < 1e-5, name


# ------------------------------------------------------------------------------------------------
# GPU (the lead runs these on the device machine)


def _gpu_run(op, t, segmented_on, h=16, d=128, seed=0, cu=None):
    from attnlab.kernels import linear

    q, k, v, g, beta, h0 = make_inputs(op, 1, t, h, h, d, d, -0.05, seed=seed)
    q, k, v = (x.to("cuda", torch.bfloat16) for x in (q, k, v))
    g, beta = g.cuda(), beta.to("cuda", torch.bfloat16)
    h0 = h0.cuda() if cu is None else h0.cuda().expand(cu.numel() - 1, -1, -1, -1).contiguous()
    saved = linear.DELTA_SEGMENTED, linear.POISON_OUTPUTS
    try:
        linear.DELTA_SEGMENTED, linear.POISON_OUTPUTS = segmented_on, True
        o, ht = kernel(op)(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    finally:
        linear.DELTA_SEGMENTED, linear.POISON_OUTPUTS = saved
    return (q, k, v, g, beta, h0), o, ht


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gdn", "kda"])
@pytest.mark.parametrize("t", [4096, 70000])
def test_gpu_bf16_matches_single_pass(op, t):
    """bf16, B=1, H=16, D=128, device-chosen segments: o and the final state equal the single-pass
    forward's to bf16 rounding; at 4096 tokens also the float64 loop's."""
    xs, o, ht = _gpu_run(op, t, True)
    _, o_old, ht_old = _gpu_run(op, t, False)
    assert o.dtype == torch.bfloat16
    assert rel_err(o, o_old) < 1e-2 and rel_err(ht, ht_old) < 1e-2
    if t <= 4096:
        ro, rs = oracle(op, *(x.cpu() for x in xs))
        assert rel_err(o, ro) < 2e-2 and rel_err(ht, rs) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gdn", "kda"])
def test_gpu_overlapped_prepare_equals_one_launch(monkeypatch, op):
    """linear.OVERLAP_PREPARE on the GPU (the last segment's prepare on the caller's stream beside
    passes 1 and 2, or pass 2 alone, on a second one): bf16, B = 2, 20000 tokens (device-chosen
    segments, a partial last chunk), poisoned buffers; outputs and final states equal to the one
    prepare launch's, bit for bit, called eagerly and replayed from a CUDA graph (the second stream
    forks from and joins the captured one)."""
    from attnlab.kernels import linear

    monkeypatch.setattr(linear, "POISON_OUTPUTS", True)
    q, k, v, g, beta, h0 = make_inputs(op, 2, 20000, 16, 16, 128, 128, -0.05, seed=7)
    xs = (*(x.to("cuda", torch.bfloat16) for x in (q, k, v)), g.cuda(), beta.to("cuda", torch.bfloat16),
          h0.cuda())

    def replayed(fn):
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        for x in out:
            x.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        return out

    for call in (None, replayed):
        (*ons, off), ranges = with_and_without_overlap(monkeypatch, op, xs, call)
        for on, r in zip(ons, ranges, strict=False):
            assert len(r) >= 2 and r[0][0] == 0 and r[-1][1] == 313
            for a, b in zip(on, off, strict=True):
                assert a.isfinite().all() and torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gdn", "kda"])
@pytest.mark.parametrize(("shape", "seg_len"),
                         [((2, 1000, 4, 2, 100, 60), 128), ((1, 1300, 2, 2, 256, 256), 512)],
                         ids=["awkward", "head_dim_256"])
def test_gpu_fp32_shapes(segmented, op, shape, seg_len):
    """fp32 against the float64 loop. "awkward": D_k = 100, D_v = 60, GQA, 1000 tokens in segments of 128
    (last one partial). "head_dim_256": D_k = D_v = 256 (the largest accepted), 1300 tokens in segments
    of 512: the launches whose tiles need more shared memory than an SM has at their tuned pipeline depth
    (pass 1: 304 KB at 3 stages) drop stages (_common.launch_fitting) instead of failing. Slow: compiling
    the float32 D = 256 kernels took over 230 s on the H100 (its first GPU run hit the time limit)."""
    q, k, v, g, beta, h0 = make_inputs(op, *shape, -0.02, seed=3)
    xs = [x.cuda() for x in (q, k, v, g, beta, h0)]
    segmented.SEGMENT_LEN = seg_len
    o, ht = kernel(op)(*xs[:5], initial_state=xs[5], output_final_state=True)
    ro, rs = oracle(op, q, k, v, g, beta, h0)
    assert rel_err(o, ro) < 2e-5 and rel_err(ht, rs) < 2e-5


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gdn", "kda"])
def test_gpu_fused_output_bf16_gqa_packed(segmented, monkeypatch, op):
    """The fused output pass as a bf16 GPU forward launches it (its tuned shapes, device-chosen
    segments) with GQA (8 value heads on 4 key heads) and packed sequences of 3000, 1, 5000 and 70
    tokens: o and the final states equal the stored-states path's (the output kernel), and the fused
    run returns no per-chunk states (it took the fused path)."""
    segmented.SEGMENT_LEN = None
    lens = [3000, 1, 5000, 70]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda")
    q, k, v, g, beta, _ = make_inputs(op, 1, sum(lens), 8, 4, 128, 128, -0.05, seed=5)
    q, k, v, beta = (x.to("cuda", torch.bfloat16) for x in (q, k, v, beta))
    g = g.cuda()
    h0 = torch.randn(len(lens), 8, 128, 128, device="cuda")
    (o, ht, states), (o_ref, ht_ref, _) = fused_and_stored(monkeypatch, op, q, k, v, g, beta, h0, cu)
    assert states is None and o.dtype == torch.bfloat16
    assert rel_err(o, o_ref) < 1e-3 and rel_err(ht, ht_ref) < 1e-5


@pytest.mark.gpu
def test_gpu_from_inputs_bf16_gqa_packed(segmented, monkeypatch):
    """GDN's segmented pass making kd, w, u from the forward's inputs (linear.WUKD_FROM_INPUTS)
    as a bf16 GPU forward runs it (tuned shapes, device-chosen segments, fused outputs), GQA (8 value
    heads on 4 key heads), packed sequences of 3000, 1, 5000 and 70 tokens: its error against the
    float32 forward (same inputs, ieee products) is no worse than that of the bf16 forward reading
    them from the prepare (the two round in different places)."""
    from attnlab.kernels import linear

    segmented.SEGMENT_LEN = None
    lens = [3000, 1, 5000, 70]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda")
    q, k, v, g, beta, _ = make_inputs("gdn", 1, sum(lens), 8, 4, 128, 128, -0.05, seed=6)
    q, k, v, beta = (x.to("cuda", torch.bfloat16) for x in (q, k, v, beta))
    g = g.cuda()
    h0 = torch.randn(len(lens), 8, 128, 128, device="cuda")
    (o, ht, _), (o_st, ht_st, _) = from_inputs_and_stored(monkeypatch, q, k, v, g, beta, h0, cu)
    o32, ht32, _ = linear._forward(*(x.float() for x in (q, k, v, g, beta)), None, 128**-0.5, h0, True, cu, 1)
    assert o.dtype == torch.bfloat16
    err, err_st = (rel_err(x, o32) for x in (o, o_st))
    assert err < 1e-2 and err <= 1.1 * err_st + 1e-5, (err, err_st)
    err, err_st = (rel_err(x, ht32) for x in (ht, ht_st))
    assert err < 1e-2 and err <= 1.1 * err_st + 1e-5, (err, err_st)


@pytest.mark.gpu
def test_gpu_packed_bf16_and_gradients(segmented):
    """Packed bf16 GDN sequences, default segments: outputs, final states and gradients equal the
    single-pass forward's."""
    from attnlab.kernels import linear

    segmented.SEGMENT_LEN = None
    lens = [5000, 1, 3000, 70]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda")
    xs, _, _ = _gpu_run("gdn", sum(lens), True, cu=cu)
    do = torch.randn_like(xs[2])

    def run():
        ins = [x.clone().requires_grad_() for x in xs[:5]]
        o, ht = kernel("gdn")(*ins, initial_state=xs[5], output_final_state=True, cu_seqlens=cu)
        return (o, ht, *torch.autograd.grad((o.float() * do.float()).sum(), ins))

    new = run()
    linear.DELTA_SEGMENTED = False
    old = run()
    for a, r in zip(new, old, strict=True):
        assert rel_err(a, r) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gdn", "kda"])
def test_gpu_bf16_weak_gates_error_not_worse(op):
    """Weak gates (−1e-3 per token: a chunk keeps 94% of the state), 16K tokens, bf16: M_seg is a
    product of ~80 bf16-rounded steps, so check that the segmented pass's error against the float32
    single-pass forward on the same (upcast) inputs is no worse than the bf16 single pass's."""
    from attnlab.kernels import linear

    q, k, v, g, beta, h0 = make_inputs(op, 1, 16384, 16, 16, 128, 128, -1e-3, seed=4)
    q, k, v, beta = (x.to("cuda", torch.bfloat16) for x in (q, k, v, beta))
    g, h0 = g.cuda(), h0.cuda()
    saved = linear.DELTA_SEGMENTED
    try:
        outs = {}
        for name, seg, dt in (("seg", True, torch.bfloat16), ("old", False, torch.bfloat16),
                              ("ref", False, torch.float32)):
            linear.DELTA_SEGMENTED = seg
            outs[name] = kernel(op)(*(x.to(dt) for x in (q, k, v)), g, beta.to(dt), initial_state=h0,
                                    output_final_state=True)
    finally:
        linear.DELTA_SEGMENTED = saved
    for i in range(2):  # o, final state
        err_seg, err_old = rel_err(outs["seg"][i], outs["ref"][i]), rel_err(outs["old"][i], outs["ref"][i])
        assert err_seg < 1.5 * err_old + 1e-3, (i, err_seg, err_old)


@pytest.mark.gpu
@pytest.mark.bigmem
def test_gpu_states_past_2_31_elements():
    """576K tokens, 16 heads, 128x128: the per-chunk states hold 4.7e9 elements (64-bit offsets);
    the segmented forward equals the single pass."""
    from attnlab.kernels import linear

    t, h, d = 9000 * 64, 16, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, v = (torch.randn(1, t, h, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    k = torch.nn.functional.normalize(torch.randn(1, t, h, d, device="cuda", generator=gen), dim=-1)
    k = k.to(torch.bfloat16)
    g = -0.05 * torch.rand(1, t, h, device="cuda", generator=gen)
    beta = torch.rand(1, t, h, device="cuda", generator=gen).to(torch.bfloat16)
    saved = linear.DELTA_SEGMENTED
    try:
        linear.DELTA_SEGMENTED = True
        o, ht = linear.gated_delta_rule(q, k, v, g, beta, output_final_state=True)
        linear.DELTA_SEGMENTED = False
        o_old, ht_old = linear.gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    finally:
        linear.DELTA_SEGMENTED = saved

    def err(a, r):  # on the GPU: rel_err's float64 CPU copies of 1.2e9 elements would take minutes
        a, r = a.float(), r.float()
        assert torch.isfinite(a).all()
        return ((a - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt()).item()

    assert err(o, o_old) < 1e-2 and err(ht, ht_old) < 1e-2
