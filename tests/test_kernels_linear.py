"""Triton linear-attention kernels (attnlab.kernels.linear) against a float64 token loop.

Two ways to run:
- on a CUDA machine, the tests marked ``gpu`` (awkward shapes, bf16, extreme gates, gradients);
- on the CPU, tiny sizes under ``TRITON_INTERPRET=1``. That variable must be set before triton is
  imported, so ``test_interpreter_suite`` re-runs this file's ``interp`` tests in a subprocess
  with it set (or run ``TRITON_INTERPRET=1 pytest tests/test_kernels_linear.py`` directly).

Error metric: rms(ref − out) / rms(ref) (DESIGN.md).
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


def oracle(q, k, v, g, beta, scale, h0, delta: bool):
    """float64 token loop. q, k [B,T,H_k,K]; v [B,T,H,V]; g [B,T,H,K] log-gate (broadcast already);
    beta [B,T,H] or None. S_t = diag(e^g) S; delta: S += β k (v − Sᵀk)ᵀ else S += k vᵀ; o = Sᵀ(scale q)."""
    b, t, h, d_v = v.shape
    rep = h // q.shape[2]
    q, k = (x.double().cpu().repeat_interleave(rep, dim=2) for x in (q, k))
    v, g = v.double().cpu(), g.double().cpu()
    S = torch.zeros(b, h, q.shape[-1], d_v, dtype=torch.float64) if h0 is None else h0.double().cpu().clone()
    o = torch.zeros(b, t, h, d_v, dtype=torch.float64)
    for i in range(t):
        S = S * g[:, i].exp()[..., None]  # (B, H, K, V)
        vi = v[:, i]
        if delta:
            vi = beta[:, i].double().cpu()[..., None] * (vi - torch.einsum("bhk,bhkv->bhv", k[:, i], S))
        S = S + k[:, i][..., None] * vi[..., None, :]
        o[:, i] = torch.einsum("bhk,bhkv->bhv", q[:, i] * scale, S)
    return o, S


def make_inputs(op, b, t, h, hk, d_k, d_v, dtype=torch.float32, device="cpu", gate_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    q, k, v = r(b, t, hk, d_k), r(b, t, hk, d_k), r(b, t, h, d_v)
    k = torch.nn.functional.normalize(k, dim=-1)  # the delta rule is stable for |k| = 1, β ≤ 1
    beta = torch.rand(b, t, h, generator=gen)
    if op == "gdn":
        g = -torch.rand(b, t, h, generator=gen) * gate_scale
    elif op == "kda":
        g = -torch.rand(b, t, h, d_k, generator=gen) * gate_scale
    else:
        g = torch.rand(h, generator=gen) * 0.5 * gate_scale + 0.01  # Lightning slope
    h0 = r(b, h, d_k, d_v)
    to = lambda x: x.to(device)
    return to(q.to(dtype)), to(k.to(dtype)), to(v.to(dtype)), to(g), to(beta), to(h0)


def run_kernel(op, q, k, v, g, beta, h0, **kw):
    from attnlab.kernels import linear

    if op == "gdn":
        return linear.gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)
    if op == "kda":
        return linear.kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)
    return linear.lightning_attention(q, k, v, g, initial_state=h0, output_final_state=True, **kw)


def run_oracle(op, q, k, v, g, beta, h0, scale=None, l2=False):
    d_k = q.shape[-1]
    if l2:
        q, k = (torch.nn.functional.normalize(x.double(), dim=-1) for x in (q, k))  # eps differs by ~1e-6
    if op == "lightning":
        b, t, h = v.shape[:3]
        gf = (-g.double())[None, None, :, None].expand(b, t, h, d_k)
        return oracle(q, k, v, gf, None, 1.0 if scale is None else scale, h0, delta=False)
    gf = g[..., None].expand(*g.shape, d_k) if op == "gdn" else g
    return oracle(q, k, v, gf, beta, d_k**-0.5 if scale is None else scale, h0, delta=True)


# ------------------------------------------------------------------------------------------------
# CPU, under the Triton interpreter (tiny sizes: the interpreter runs every program in Python)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETED, reason="already inside the interpreter run")
def test_interpreter_suite():
    run_interpreter_suite(__file__)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from attnlab.kernels import linear as _linear

    @triton.jit
    def _inverse_kernel(a_ptr, x_ptr):
        """X = (I + A)⁻¹ of one strictly lower [16, 16] fp32 tile per program (linear._inv_unit_lower)."""
        rr = tl.arange(0, 16)
        offs = tl.program_id(0) * 256 + rr[:, None] * 16 + rr[None, :]
        tl.store(x_ptr + offs, _linear._inv_unit_lower(tl.load(a_ptr + offs), 16))


@interp
def test_interp_block_inverse_on_correlated_keys():
    """The prepare's 16×16 triangular inverse (4×4-block products) against float64 on the A the delta
    rule makes from unit keys that are random, correlated or nearly parallel, β up to 2 (negative
    eigenvalues), with and without decay: no more error than forward substitution has (~1e-5 of the
    largest entry in fp32). A full doubling (I − A)(I + A²)(I + A⁴)(I + A⁸) fails here (9e-5; up to
    8e-2 on nearly parallel keys with β = 2 on every row)."""
    gen = torch.Generator().manual_seed(0)
    mats = []
    for spread in (1.0, 0.3, 0.1, 1e-3):  # key = shared direction + spread · noise
        for beta_max in (1.0, 2.0):
            for decay in (0.0, 0.2):
                k = torch.randn(1, 128, generator=gen) + spread * torch.randn(16, 128, generator=gen)
                k = torch.nn.functional.normalize(k, dim=-1)
                beta = beta_max * torch.rand(16, 1, generator=gen)
                g = -decay * torch.arange(16.0)
                a = (beta * (k @ k.T) * (g[:, None] - g[None, :]).clamp(max=0).exp()).tril(-1)
                mats.append(a)
    a = torch.stack(mats).contiguous()  # (N, 16, 16)
    x = torch.empty_like(a)
    _inverse_kernel[(a.shape[0],)](a, x)
    ref = torch.linalg.inv(torch.eye(16, dtype=torch.float64) + a.double())
    err = (x.double() - ref).abs().amax((1, 2)) / ref.abs().amax((1, 2))
    assert err.max().item() < 3e-5, err


@interp
@pytest.mark.parametrize("op", ["gdn", "kda", "lightning"])
@pytest.mark.parametrize("t", [1, 70])
def test_interp_forward_matches_loop(op, t):
    q, k, v, g, beta, h0 = make_inputs(op, 1, t, 2, 2, 32, 16, seed=t)
    o, ht = run_kernel(op, q, k, v, g, beta, h0)
    ro, rs = run_oracle(op, q, k, v, g, beta, h0)
    assert o.shape == ro.shape and ht.shape == rs.shape
    assert rel_err(o, ro) < 1e-5
    assert rel_err(ht, rs) < 1e-5


@interp
@pytest.mark.parametrize("op", ["gdn", "kda"])
def test_interp_odd_dims_gqa_l2norm_extreme_gates(op):
    """D_k = 24, D_v = 20 (not powers of two), 2 value heads per key head, L2-normed q/k,
    log-gates down to −40 per token (decay underflows; nothing may overflow)."""
    q, k, v, g, beta, h0 = make_inputs(op, 2, 40, 4, 2, 24, 20, gate_scale=40.0, seed=3)
    o, ht = run_kernel(op, q, k, v, g, beta, h0, use_qk_l2norm=True)
    ro, rs = run_oracle(op, q, k, v, g, beta, h0, l2=True)
    assert rel_err(o, ro) < 1e-5
    assert rel_err(ht, rs) < 1e-5


@interp
def test_interp_lightning_steep_decay_partial_chunk():
    """Slopes up to 15 with a partial last chunk: padded rows must not produce exp overflow
    (this was NaN on the GPU once: 0 · inf in the state update)."""
    q, k, v, g, beta, h0 = make_inputs("lightning", 1, 70, 4, 4, 16, 16, gate_scale=30.0, seed=9)
    o, ht = run_kernel("lightning", q, k, v, g, beta, h0)
    ro, rs = run_oracle("lightning", q, k, v, g, beta, h0)
    assert rel_err(o, ro) < 1e-5 and rel_err(ht, rs) < 1e-5


@interp
def test_interp_varlen_equals_separate_sequences():
    check_varlen("cpu", ("gdn", "lightning"))


def check_varlen(device, ops):
    from attnlab.kernels import linear

    lens = [5, 64, 23]
    for op in ops:
        parts = [make_inputs(op, 1, n, 2, 2, 16, 16, device=device, seed=i) for i, n in enumerate(lens)]
        q, k, v, beta = (torch.cat([p[j] for p in parts], dim=1) for j in (0, 1, 2, 4))
        g = parts[0][3] if op == "lightning" else torch.cat([p[3] for p in parts], dim=1)
        h0 = torch.cat([p[5] for p in parts], dim=0)  # (N, H, K, V)
        cu = torch.tensor([0, 5, 69, 92], device=device)
        if op == "kda":
            o, ht = linear.kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        elif op == "gdn":
            o, ht = linear.gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                            output_final_state=True, cu_seqlens=cu)
        else:
            o, ht = linear.lightning_attention(q, k, v, g, initial_state=h0,
                                               output_final_state=True, cu_seqlens=cu)
        for i, p in enumerate(parts):
            gi = g if op == "lightning" else p[3]
            ro, rs = run_oracle(op, p[0], p[1], p[2], gi, p[4], p[5])
            assert rel_err(o[:, cu[i]:cu[i + 1]], ro) < 1e-5
            assert rel_err(ht[i], rs[0]) < 1e-5


@interp
@pytest.mark.parametrize("op", ["gdn", "kda", "lightning"])
def test_interp_decode_steps_continue_the_prefill(op):
    check_decode_steps(op, "cpu", 16, 24)


def check_decode_steps(op, device, d_k, d_v):
    """Prefill T0 tokens with the chunk kernel, then decode with the in-place step kernel:
    same outputs and state as the loop over all tokens."""
    from attnlab.kernels import linear

    t0, t = 9, 12
    q, k, v, g, beta, h0 = make_inputs(op, 2, t, 4, 2, d_k, d_v, device=device, seed=7)
    ro, rs = run_oracle(op, q, k, v, g, beta, h0)
    _, state = run_kernel(op, q[:, :t0], k[:, :t0], v[:, :t0], g if op == "lightning" else g[:, :t0],
                          beta[:, :t0], h0)
    for i in range(t0, t):
        if op == "gdn":
            o = linear.gated_delta_rule_step(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], state)
        elif op == "kda":
            o = linear.kda_step(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], state)
        else:
            o = linear.lightning_attention_step(q[:, i], k[:, i], v[:, i], g, state)
        assert rel_err(o, ro[:, i]) < 1e-5
    assert rel_err(state, rs) < 1e-5


def check_gradients(op, device, t, hk, tol, slope_grad=False):
    """Gradients of (o·dO + S_T·dS) w.r.t. q, k, v, g, beta, h0 against autograd through the float64
    loop. Lightning's slope is a fixed buffer (no gradient), which takes the Triton backward; with
    slope_grad it needs one too, which takes the chunked-PyTorch fallback."""
    q, k, v, g, beta, h0 = make_inputs(op, 1, t, 2, hk, 32 if device == "cuda" else 16, 16, device=device,
                                       seed=5)
    wants = [True, True, True, op != "lightning" or slope_grad, op != "lightning", True]
    xs = (q, k, v, g, beta, h0)
    leaves = [x.clone().double().cpu().requires_grad_(w) for x, w in zip(xs, wants, strict=True)]
    ro, rs = run_oracle(op, *leaves)
    gen = torch.Generator().manual_seed(1)
    do, dS = torch.randn(ro.shape, generator=gen, dtype=torch.float64), torch.randn(rs.shape, generator=gen,
                                                                                     dtype=torch.float64)
    want = [x for x in leaves if x.requires_grad]
    ref = torch.autograd.grad((ro * do).sum() + (rs * dS).sum(), want)
    ins = [x.clone().requires_grad_(w) for x, w in zip(xs, wants, strict=True)]
    o, ht = run_kernel(op, *ins)
    loss = (o * do.to(device, o.dtype)).sum() + (ht * dS.to(device, ht.dtype)).sum()
    got = torch.autograd.grad(loss, [x for x in ins if x.requires_grad])
    names = [n for n, w in zip(["q", "k", "v", "g", "beta", "h0"], wants, strict=True) if w]
    for name, a, r in zip(names, got, ref, strict=True):
        assert a.shape == r.shape, name
        assert rel_err(a, r) < tol, name


@interp
@pytest.mark.parametrize("op", ["gdn", "kda", "lightning"])
def test_interp_gradients_match_loop(op):
    from attnlab import ops

    if not hasattr(ops, {"gdn": "gated_delta_rule", "kda": "kda", "lightning": "lightning_attention"}[op]):
        pytest.skip("the chunked torch op used by the backward has not landed in attnlab.ops")
    check_gradients(op, "cpu", 70, 1 if op == "lightning" else 2, 1e-5)


@interp
def test_interp_lightning_slope_gradient_fallback():
    """A Lightning slope that needs a gradient: the backward recomputes through the chunked torch op
    (which takes as many key heads as value heads: no GQA here)."""
    check_gradients("lightning", "cpu", 70, 2, 1e-5, slope_grad=True)


@interp
def test_interp_lightning_varlen_backward_equals_separate_sequences():
    from attnlab.kernels import linear

    lens, cu = [5, 70], torch.tensor([0, 5, 75])
    parts = [make_inputs("lightning", 1, n, 2, 2, 16, 16, seed=i) for i, n in enumerate(lens)]
    slope = parts[0][3]
    gen = torch.Generator().manual_seed(2)
    dos = [torch.randn(1, n, 2, 16, generator=gen) for n in lens]
    packed = [torch.cat([p[j] for p in parts], dim=1).requires_grad_() for j in range(3)]
    o, _ = linear.lightning_attention(*packed, slope, cu_seqlens=cu)
    got = torch.autograd.grad((o * torch.cat(dos, dim=1)).sum(), packed)
    for i, p in enumerate(parts):
        xs = [x.clone().requires_grad_() for x in p[:3]]
        oi, _ = linear.lightning_attention(*xs, slope)
        ref = torch.autograd.grad((oi * dos[i]).sum(), xs)
        for a, r in zip(got, ref, strict=True):
            assert rel_err(a[:, cu[i]:cu[i + 1]], r) < 1e-5


@interp
def test_interp_bad_input_raises_value_error():
    from attnlab.kernels import linear

    q, k, v, g, beta, h0 = make_inputs("gdn", 1, 4, 2, 2, 16, 16)
    with pytest.raises(ValueError, match="g"):
        linear.gated_delta_rule(q, k, v, g[..., None], beta)
    with pytest.raises(ValueError, match="initial_state"):
        linear.gated_delta_rule(q, k, v, g, beta, initial_state=h0[:, :1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        linear.gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([[0, 4]]))


def run_prepare(split, op, q, k, v, g, beta, cu=None, fused=False, sparse_g=False):
    """The prepare stage alone (linear._prepare: the split kernels, w, u, kd in the first one with
    `fused`, or the single kernel; `sparse_g` as the inference forward asks) into NaN-filled
    buffers: (w, u, kd, gcum[, aqk with its unused part above the diagonal zeroed])."""
    from attnlab.kernels import linear

    gate = 2 if op == "kda" else 1
    kind = "vector" if gate == 2 else "scalar"
    b, t, hk, d_k = q.shape
    h, d_v = v.shape[2], v.shape[3]
    nan = lambda *s: torch.full(s, float("nan"), device=q.device)  # noqa: E731
    w, kd, u, gcum = nan(b, t, h, d_k), nan(b, t, h, d_k), nan(b, t, h, d_v), nan(*g.shape)
    aqk = nan(b, t, h, linear.CHUNK) if gate == 2 else w
    idx = linear._chunk_tables(cu, linear.CHUNK)[0] if cu is not None else q
    old = linear.PREP_SPLIT[kind], linear.PREP_FUSED[kind]
    linear.PREP_SPLIT[kind], linear.PREP_FUSED[kind] = split, fused
    try:
        linear._prepare(q, k, v, g, beta, w, u, kd, gcum, aqk, 0.3, q if cu is None else cu, idx,
                        cu is not None, gate, sparse_g=sparse_g)
    finally:
        linear.PREP_SPLIT[kind], linear.PREP_FUSED[kind] = old
    if gate == 1:
        return w, u, kd, gcum
    pos = torch.arange(t, device=q.device)  # token position inside its chunk, per packed row
    starts = torch.zeros(t, dtype=torch.long, device=q.device)
    bounds = cu.tolist() if cu is not None else [0, t]
    for s0, e0 in zip(bounds[:-1], bounds[1:], strict=True):
        starts[s0:e0] = s0
    col = torch.arange(linear.CHUNK, device=q.device)
    causal = col[None, :] <= ((pos - starts) % linear.CHUNK)[:, None]  # (T, CHUNK)
    return w, u, kd, gcum, torch.where(causal[None, :, None, :], aqk, torch.zeros((), device=q.device))


@interp
@pytest.mark.parametrize("op, gate_scale, packed, fused", [
    ("gdn", 4.0, False, False), ("gdn", 40.0, True, True),
    ("kda", 0.1, False, False), ("kda", 6.0, True, True), ("kda", 300.0, False, False),
])
def test_interp_split_prepare_equals_single_kernel(op, gate_scale, packed, fused):
    """_kkt_inv_kernel (+ _wu_kernel, or fused) writes what _prepare_kernel writes (w, u, kd, gcum,
    the causal part of aqk), every element, finite. KDA log-gates from ~−0.05 per token (the whole
    chunk in one product) through ~−3 (segments of 32 and 16) to ~−150 (every segment size, then
    pairs inside 4-token segments elementwise), there in the second channel block only (D_k = 40:
    blocks of 32 and 8 channels; the first ~−0.15); partial chunks, GQA with odd dims, or packed
    sequences."""
    if packed:
        cu = torch.tensor([0, 5, 69, 92])
        xs = make_inputs(op, 1, 92, 2, 2, 16, 16, gate_scale=gate_scale, seed=5)[:5]
    elif gate_scale > 100:
        cu = None
        xs = make_inputs(op, 1, 70, 4, 2, 40, 20, gate_scale=gate_scale, seed=4)[:5]
        xs[3][..., :32] *= 1e-3  # gentle in the first channel block, steep in the second
    else:
        cu = None
        xs = make_inputs(op, 1, 70, 4, 2, 24, 20, gate_scale=gate_scale, seed=4)[:5]
    got, ref = run_prepare(True, op, *xs, cu, fused), run_prepare(False, op, *xs, cu)
    for name, a, r in zip(("w", "u", "kd", "gcum", "aqk"), got, ref, strict=False):
        assert rel_err(a, r) < 2e-5, name


@interp
@pytest.mark.parametrize("gate_scale, packed", [(0.1, False), (6.0, True), (300.0, False)])
def test_interp_sparse_gcum_prepare(gate_scale, packed):
    """KDA's fused prepare as the inference forward runs it (sparse_g: linear.SPARSE_GCUM) writes
    the w, u, kd, aqk of the single kernel, with w's operand and kd made in the channel loop, and
    gcum where the later passes read it: every 4th row of a chunk and its last row (of a sequence's
    last, partial chunk too), equal there; most other rows left unwritten at gentle gates. Gates
    and shapes as test_interp_split_prepare_equals_single_kernel (the steep case takes
    _seg_pairs, which reads its channel block's gcum whole)."""
    from attnlab.kernels.linear import CHUNK

    if packed:
        cu = torch.tensor([0, 5, 69, 92])
        xs = make_inputs("kda", 1, 92, 2, 2, 16, 16, gate_scale=gate_scale, seed=5)[:5]
    else:
        cu = None
        xs = make_inputs("kda", 1, 70, 4, 2, 40, 20, gate_scale=gate_scale, seed=4)[:5]
        if gate_scale > 100:
            xs[3][..., :32] *= 1e-3  # gentle in the first channel block, steep in the second
    got, ref = run_prepare(True, "kda", *xs, cu, True, sparse_g=True), run_prepare(False, "kda", *xs, cu)
    for name, a, r in zip(("w", "u", "kd", "aqk"), got[:3] + got[4:], ref[:3] + ref[4:], strict=True):
        assert rel_err(a, r) < 2e-5, name
    t = xs[0].shape[1]
    bounds = cu.tolist() if cu is not None else [0, t]
    pos = torch.cat([torch.arange(e - s) for s, e in zip(bounds[:-1], bounds[1:], strict=True)])
    ends = torch.zeros(t, dtype=torch.bool)
    ends[torch.tensor(bounds[1:]) - 1] = True
    read = (pos % 4 == 3) | (pos % CHUNK == CHUNK - 1) | ends  # rows the passes read
    gcum, gref = got[3][0], ref[3][0]  # [T, H, D_k]
    assert bool(gcum[read].isfinite().all())
    assert rel_err(gcum[read], gref[read]) < 2e-5
    written = gcum.isfinite()
    assert rel_err(gcum[written], gref[written]) < 2e-5  # the same cumulative sums wherever written
    if gate_scale < 1:
        assert float(written.float().mean()) < 0.5  # sparse: the rows no pass reads are not written


@needs_sm90_toolchain
@pytest.mark.parametrize("op,config", [("gdn", "scalar"), ("gdn", "scalar_train"), ("kda", "vector")])
@pytest.mark.parametrize("fused", [False, True])
def test_prepare_compiles_for_sm90(op, config, fused):
    """The split prepare kernels as an H100 runs them (H = 16, D_k = D_v = 128, bf16, the launch's
    PREP_TUNING entry, pointers and T 16-divisible as triton specialises them), w, u, kd in a second
    launch or fused into the first: at most half an SM's registers per program (two or more programs
    share an SM) and a bounded stack: as launched by default (PREP_FUSED) GDN's training launch none,
    its inference launch (4 warps capped at 168 registers: 96 bytes parked a thread, measured faster
    than the spill-free launches, see PREP_SPLIT) at most 128, KDA's fused launch (8 warps capped at
    128: 56 bytes, measured faster than the two launches, see PREP_FUSED) at most 64, and as its
    inference forward launches it (SPARSE_G, linear.SPARSE_GCUM: 144 bytes, measured faster than
    without) at most 144; the other form at most 32 bytes (KDA's two launches: 24). (The single
    _prepare_kernel they replace spilled 1-2 KB per thread here: see PREP_TUNING.)"""
    import triton.language as tl

    from attnlab.kernels import linear

    kind = "vector" if op == "kda" else "scalar"
    cfg = linear.PREP_TUNING[config]
    train = config == "scalar_train"  # the backward keeps X in float32
    common = dict(H=16, HK=16, K=128, V=128, BT=linear.CHUNK, GATE_VEC=op == "kda", IS_VARLEN=False,
                  DT=tl.bfloat16, PREC="tf32")
    ptr_types = dict(q="*bf16", k="*bf16", v="*bf16", w="*bf16", u="*bf16", kd="*bf16", beta="*bf16",
                     g="*fp32", gcum="*fp32", aqk="*bf16", xa="*fp32" if train else "*bf16", qg="*bf16",
                     cu_seqlens="*i32", chunk_indices="*i32")
    # as a forward launches it: X and aqk in bf16 for inference, and KDA's q ⊙ e^G stored (STORE_QG)
    default = fused == linear.PREP_FUSED[kind]
    allowed = {"scalar": 128, "scalar_train": 0, "vector": 64}[config] if default else 32
    kkt = dict(common, BC=linear.SUB, BK=cfg["BK"], BKW=64, BV=64, SPAN=linear._span(torch.bfloat16),
               FUSE_WU=fused, STORE_QG=op == "kda", SPARSE_G=False,
               SOLVE_PREC="tf32" if linear.SOLVE_TF32[kind] and not train else "ieee")
    options = dict(num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])
    launches = [(linear._kkt_inv_kernel, kkt, options, allowed)]
    if not fused:
        launches.append((linear._wu_kernel, dict(common, BK=64, BV=64),
                         dict(num_warps=cfg["wu_num_warps"], num_stages=cfg["wu_num_stages"]), allowed))
    elif op == "kda" and linear.SPARSE_GCUM:  # the inference forward's launch
        launches.append((linear._kkt_inv_kernel, dict(kkt, SPARSE_G=True), options, 144 if default else 32))
    for fn, const, options, allowed in launches:
        ptr = {a: t for a, t in ptr_types.items() if a in fn.arg_names}
        div = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in ptr or a == "T"}
        kernel = compile_sm90(fn, const, ptr, floats=("scale",), attrs=div, **options)
        regs, stack, usage = sm90_usage(kernel)
        assert stack <= allowed, (fn.__name__, const.get("SPARSE_G"), usage)
        assert regs * 32 * options["num_warps"] * 2 <= 65536, (fn.__name__, usage)
        assert "wgmma" in kernel.asm["ptx"], fn.__name__  # the 64-row products run on Hopper's tensor cores


# ------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gdn", "kda", "lightning"])
@pytest.mark.parametrize("t,d_k,d_v", [(1, 64, 64), (63, 60, 100), (65, 128, 128), (500, 100, 60)])
def test_gpu_forward_fp32(op, t, d_k, d_v, poisoned):
    q, k, v, g, beta, h0 = make_inputs(op, 2, t, 4, 2, d_k, d_v, device="cuda", seed=t)
    o, ht = run_kernel(op, q, k, v, g, beta, h0)
    ro, rs = run_oracle(op, q, k, v, g, beta, h0)
    assert rel_err(o, ro) < 2e-5 and rel_err(ht, rs) < 2e-5


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gdn", "kda"])
def test_gpu_solve_tf32_error_not_worse(op, monkeypatch):
    """The split prepare's triangular solve at tf32 (linear.SOLVE_TF32, X stored in bf16; on by
    default for GDN only, forced on here for both) against the same forward with it in fp32 ("ieee"):
    bf16 inputs, 2000 tokens, keys correlated (cosine ~0.8 between any two: I + A far from the
    identity), β up to 1, gentle gates; the error of outputs and final state against the float32
    forward (ieee solve) is no worse than the fp32 solve's."""
    from attnlab.kernels import linear

    q, k, v, g, beta, h0 = make_inputs(op, 1, 2000, 4, 4, 128, 128, gate_scale=0.05, seed=8)
    common = torch.randn(1, 1, 1, 128, generator=torch.Generator().manual_seed(1))
    k = torch.nn.functional.normalize(k + 0.2 * common, dim=-1)
    cos = (k[0, :-1] * k[0, 1:]).sum(-1).mean()
    assert cos > 0.7, cos
    q, k, v, g, beta, h0 = (x.cuda() for x in (q, k, v, g, beta, h0))
    ref = run_kernel(op, q, k, v, g, beta, h0)
    outs = {}
    for on in (True, False):
        monkeypatch.setattr(linear, "SOLVE_TF32", {"scalar": on, "vector": on})
        outs[on] = run_kernel(op, q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta.bfloat16(), h0)
    for i in range(2):  # o, final state
        err, err_ieee = (rel_err(outs[on][i], ref[i]) for on in (True, False))
        assert err < 2e-2 and err <= 1.1 * err_ieee + 1e-4, (i, err, err_ieee)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gdn", "kda", "lightning"])
@pytest.mark.parametrize("gate_scale", [1e-4, 1.0, 30.0])
def test_gpu_forward_bf16_gates(op, gate_scale, poisoned):
    q, k, v, g, beta, h0 = make_inputs(op, 1, 300, 4, 4, 128, 128, dtype=torch.bfloat16, device="cuda",
                                       gate_scale=gate_scale, seed=11)
    o, ht = run_kernel(op, q, k, v, g, beta, h0)
    ro, rs = run_oracle(op, q, k, v, g, beta, h0)
    assert o.dtype == torch.bfloat16
    assert rel_err(o, ro) < 2e-2 and rel_err(ht, rs) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gdn", "kda", "lightning"])
def test_gpu_state_carried_across_split(op, poisoned):
    q, k, v, g, beta, h0 = make_inputs(op, 2, 200, 4, 4, 64, 64, device="cuda", seed=2)
    full_o, full_s = run_kernel(op, q, k, v, g, beta, h0)
    cut = 77
    gl = (lambda a, b: g) if op == "lightning" else (lambda a, b: g[:, a:b])
    o1, s1 = run_kernel(op, q[:, :cut], k[:, :cut], v[:, :cut], gl(0, cut), beta[:, :cut], h0)
    o2, s2 = run_kernel(op, q[:, cut:], k[:, cut:], v[:, cut:], gl(cut, None), beta[:, cut:], s1)
    assert rel_err(torch.cat([o1, o2], 1), full_o) < 1e-5 and rel_err(s2, full_s) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gdn", "kda", "lightning"])
def test_gpu_gradients(op):
    check_gradients(op, "cuda", 130, 1 if op == "lightning" else 2, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gdn", "kda", "lightning"])
def test_gpu_decode_steps(op, poisoned):
    check_decode_steps(op, "cuda", 100, 128)


@pytest.mark.gpu
def test_gpu_varlen(poisoned):
    check_varlen("cuda", ("gdn", "kda", "lightning"))


@pytest.mark.gpu
@pytest.mark.bigmem
def test_gpu_lightning_states_past_2_31_elements():
    """The per-chunk states of a 576K-token, 16-head, 128×128 sequence hold 4.7e9 elements: their
    offsets need 64 bits (an int32 chunk offset crashed lightning at 1M tokens in the H200 cost
    run). Forward and backward over the whole sequence equal the second half run alone from the
    first half's final state (each half's states stay below 2^31 elements)."""
    from attnlab.kernels import linear

    t, h, d = 9000 * 64, 16, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, t, h, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    k = k / d**0.5
    slope = torch.linspace(0.01, 0.5, h, device="cuda")
    half = t // 2
    q2, k2, v2 = (x[:, half:].detach().clone().requires_grad_() for x in (q, k, v))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, ht = linear.lightning_attention(q, k, v, slope, output_final_state=True)
    with torch.no_grad():
        first = (x[:, :half] for x in (q, k, v))
        _, s1 = linear.lightning_attention(*first, slope, output_final_state=True)
    o2, ht2 = linear.lightning_attention(q2, k2, v2, slope, initial_state=s1, output_final_state=True)
    assert rel_err(o[:, half:], o2) < 1e-2 and rel_err(ht, ht2) < 1e-2
    do = torch.randn(o.shape, device="cuda", generator=gen, dtype=o.dtype)
    o.backward(do)
    o2.backward(do[:, half:])
    for full, part in ((q, q2), (k, k2), (v, v2)):
        assert torch.isfinite(full.grad).all()
        assert rel_err(full.grad[:, half:], part.grad) < 1e-2


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_launch_fitting_drops_stages_until_the_kernel_fits():
    """_common.launch_fitting retries a launch that Triton refuses for shared memory with one pipeline
    stage fewer (the tiles tuned for bf16 at D = 128 do not fit at float32 / D = 256: e.g. Lightning's
    pass 3 asks 320 KB), passes everything else through, and re-raises at one stage."""
    from triton.runtime.errors import OutOfResources

    from attnlab.kernels._common import launch_fitting

    class Kernel:  # stands in for a triton.jit function: kernel[grid](*args, **kwargs)
        def __init__(self, fits_at):
            self.fits_at, self.calls = fits_at, []

        def __getitem__(self, grid):
            def launch(*args, num_stages, **kwargs):
                self.calls.append((grid, args, num_stages, kwargs))
                if num_stages > self.fits_at:
                    raise OutOfResources(num_stages * 100_000, 232_448, "shared memory")
            return launch

    k = Kernel(fits_at=2)
    launch_fitting(k, (3, 1), "x", 7, num_stages=4, num_warps=8, BV=64)
    assert [c[2] for c in k.calls] == [4, 3, 2]
    assert all(c[0] == (3, 1) and c[1] == ("x", 7) and c[3] == {"num_warps": 8, "BV": 64} for c in k.calls)
    k = Kernel(fits_at=0)
    with pytest.raises(OutOfResources):
        launch_fitting(k, (1,), num_stages=2)
    assert [c[2] for c in k.calls] == [2, 1]
