"""Backward of the chunked gated delta rule, part 2: the gated pair products and the gate's cumsum.

Kernel 2 of /work/notes/bwd_spec.md (GDN, KDA). Per chunk (C = 64 rows) and value head, with G the
within-chunk cumulative log-gate, E_ij = e^{G_i − G_j} (per channel for KDA, per row for GDN), the
forward's pair matrices are  A = strict_tril(β_i M_ij),  M_ij = Σ_d k_id k_jd E_ijd,  and
Aq = scale · tril(Σ_d q_id k_jd E_ijd).  Given their gradients dA, dAq (kernel 1: ``bwd_local``), with
P = scale · tril(dAq) and dM_ij = β_i dA_ij, three [C, D_k] products carry every pair term:

    LQ_i = Σ_j P_ij  k_j ⊙ E_ij        LK_i = Σ_j dA_ij k_j ⊙ E_ij        (row side: j ≤ i)
    R_j  = Σ_i (P_ij q_i + dM_ij k_i) ⊙ E_ij                              (column side)

    dq += LQ,   dk += β LK + R,   dβ += Σ_d k ⊙ LK,   dG += q ⊙ LQ + k ⊙ (β LK − R)

(dβ_i = Σ_j dA_ij M_ij; q and k enter the row and column side of a pair once each, the gate as
e^{G_i} / e^{−G_j}), then dg = the reverse cumsum of dG over the chunk's rows (G = cumsum g in it).

Per-channel gates factor E through a reference row m, e^{G_i − G_m} · e^{G_m − G_j}: the second factor
scales the dot's right operand, the first the dot's output rows. The segments are the forward's
(linear._gated_kkt): halving from the whole chunk, a segment whose gate moves by less than SPAN / 2
from its middle row m takes all its pairs through m (factors ≤ e^{SPAN/2}, finite, exact up to
rounding) and ends the halving, else only the pairs across m (i after m, j up to m: both factors
≤ 1) and its halves go on; the pairs left inside 4-row segments go elementwise, every factor ≤ 1
(as fla's chunk_kda does inside its sub-chunks). Unlike the forward, whose products contract over
the channels, these contract over the chunk's rows, so one 64-row tensor-core dot per level covers
every segment (the pair mask zeroes the pairs across segments). A gentle gate takes one level: four
dots per channel block. GDN's scalar gate needs no factoring: E masked before exp, [C, C] directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_heads_divide, check_same_device, check_tensor
from .linear import CHUNK, _chunk_tables, _cstore, _ctile, _mm, _prep_chunk, _span, _tl_dtype, _vec

MIN_SEG = 4  # rows of the segments whose pairs go elementwise (as _kkt_inv_kernel's _gated_kkt)

# Launch parameters by gate kind ("scalar" GDN, "vector" KDA): BK channels per step, warps, pipeline
# stages, ptxas register cap (None: uncapped; applied to 16-bit inputs only).
# sm_90 (registers, stack bytes per thread) at H = HK = 16, K = 128, bf16, pointers and T 16-divisible
# (tests/test_kernels_delta_bwd_pairs.py::test_pairs_compiles_for_sm90):
#   GDN  BK 32, 8 warps (116, 0)   [BK 64: 8 warps (193, 0), capped 168 (166, 0), capped 128 (128, 176);
#                                   4 warps (255, 0); BK 32 at 4 warps (160, 0)]
#   KDA  BK 32, 8 warps (252, 0)   [BK 16: 8 warps (206, 0), capped 168 (168, 56); BK 64: 8 warps (255, 320);
#                                   4 warps spill at every BK]
# KDA fills the register file: one 8-warp program per SM. Not the [C, C] masks nor the number of live
# products (tried: both sides in two passes, 244; the matrices re-read per level, 226); BK 16 is the
# fallback should a change make BK 32 spill. H100, whole GDN / KDA fwd + bwd at T = 16K, B = 1, H = 16,
# D = 128, bf16 (do_bench, benchmarks/RESULTS.md): BK 32 3.52 / 5.05-5.10 ms, BK 16 3.70 / 5.65, BK 64
# 3.58 / 4.93 (KDA's BK 64 spills; one timing, not re-tested, so not adopted).
TUNING: dict[str, dict[str, int | None]] = {
    "scalar": {"BK": 32, "num_warps": 8, "num_stages": 1, "maxnreg": None},
    "vector": {"BK": 32, "num_warps": 8, "num_stages": 1, "maxnreg": None},
}


@triton.jit
def _pair_levels(P, Ad, Md, kb, qb, G_p, G_stride, t0, n_in, col0, K: tl.constexpr, BT: tl.constexpr,
                 BK: tl.constexpr, MIN_SEG: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                 SPAN: tl.constexpr):
    """One BK-channel block of LQ, LK, R (module docstring), per-channel gate, by halving segments.
    P, Ad, Md [BT, BT] (DT; zero outside j < i), kb, qb [BT, BK] (DT), G in memory at G_p (row stride
    G_stride, rows < n_in; re-read per level, an L1 hit, rather than held in registers).
    Returns (LQ, LK, R, done): done is 0 when the pairs inside MIN_SEG-row segments are left (_seg_pairs_bwd).

    Per level, e_l = e^{G_i − G_m} scales the column side's left operands and the row side's output
    rows, e_r = e^{G_m − G_j} the row side's right operand and the column side's output rows; whole
    segments take both everywhere, a split one e_l only after its middle and e_r only up to it (both
    ≤ 1 there, zero elsewhere), so one branch-free body serves both."""
    rr = tl.arange(0, BT)
    cols = col0 + tl.arange(0, BK)
    cmask = (cols < K)[None, :]
    valid = (rr < n_in)[:, None]
    G0 = G_p + t0.to(tl.int64) * G_stride  # this chunk's first row: 32-bit offsets from here
    lq = tl.zeros([BT, BK], dtype=tl.float32)
    lk = tl.zeros([BT, BK], dtype=tl.float32)
    r = tl.zeros([BT, BK], dtype=tl.float32)
    done = n_in * 0
    for lvl in range(0, 6):  # BT = 64 = 2^6: segment sizes 64 ... 2 (the loop ends at 2·MIN_SEG)
        S = BT >> lvl
        if (done == 0) & (S > MIN_SEG):
            hb = S // 2
            seg = rr // S
            mid = tl.minimum(seg * S + hb - 1, n_in - 1)  # the segment's middle row (padding: the last)
            R = tl.load(G0 + (mid[:, None] * G_stride + cols[None, :]), mask=cmask, other=0.0)
            G = tl.load(G0 + (rr[:, None] * G_stride + cols[None, :]), mask=valid & cmask, other=0.0)
            d = tl.where(valid, G - R, 0.0)  # [BT, BK], ≤ 0 after the middle, ≥ 0 up to it
            whole = (tl.max(tl.max(tl.abs(d), 1), 0) < SPAN / 2).to(tl.int32)  # all pairs through m
            done = done + whole
            after = (rr % S >= hb).to(tl.int32)  # [BT] 1 after the middle
            use_l = (after | whole) != 0  # rows whose e_l is kept: all (whole), after the middle (split)
            use_r = ((1 - after) | whole) != 0
            e_l = tl.exp(tl.where(use_l[:, None], d, float("-inf")))  # masked before exp: no inf
            e_r = tl.exp(tl.where(use_r[:, None], -d, float("-inf")))
            pairs = (seg[:, None] == seg[None, :]) & use_l[:, None] & use_r[None, :]
            right = (kb.to(tl.float32) * e_r).to(DT)
            Pl = tl.where(pairs, P, 0.0).to(DT)
            lq += e_l * tl.dot(Pl, right, input_precision=PREC)
            lk += e_l * tl.dot(tl.where(pairs, Ad, 0.0).to(DT), right, input_precision=PREC)
            rc = tl.dot(tl.trans(Pl), (qb.to(tl.float32) * e_l).to(DT), input_precision=PREC)
            rc = tl.dot(tl.trans(tl.where(pairs, Md, 0.0).to(DT)), (kb.to(tl.float32) * e_l).to(DT), rc,
                        input_precision=PREC)
            r += e_r * rc
    return lq, lk, r, done


@triton.jit
def _seg_pairs_bwd(lq, lk, r, G, k_p, q_p, k_stride, G_p, G_stride, daq_p, da_p, b_p, m_stride,
                   b_stride, scale, t0, n_in, col0, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   MIN_SEG: tl.constexpr):
    """What _pair_levels leaves of one channel block: the pairs inside MIN_SEG-row segments, partner by
    partner, elementwise over the channels, every factor e^{G_i−G_j} ≤ 1. For partner p of row i
    (row j of i's segment): the row side takes pair (i, p) when p ≤ i, the column side pair (p, i)
    when p ≥ i. Matrix entries are read from memory (daq_p, da_p: row stride m_stride)."""
    rr = tl.arange(0, BT)
    cols = col0 + tl.arange(0, BK)
    cmask = (cols < K)[None, :]
    valid = rr < n_in
    k0 = k_p + t0.to(tl.int64) * k_stride  # this chunk's first row: 32-bit offsets from here
    q0 = q_p + t0.to(tl.int64) * k_stride
    G0 = G_p + t0.to(tl.int64) * G_stride
    a0 = daq_p + t0.to(tl.int64) * m_stride
    d0 = da_p + t0.to(tl.int64) * m_stride
    for j in range(0, MIN_SEG):
        p = (rr // MIN_SEG) * MIN_SEG + j  # [BT] the partner row j of each row's segment
        ok = valid & (p < n_in)
        pc = tl.minimum(p, n_in - 1)  # (a padded partner: a padded row, no pair)
        kp = tl.load(k0 + (pc[:, None] * k_stride + cols[None, :]), mask=cmask, other=0.0).to(tl.float32)
        qp = tl.load(q0 + (pc[:, None] * k_stride + cols[None, :]), mask=cmask, other=0.0).to(tl.float32)
        Gp = tl.load(G0 + (pc[:, None] * G_stride + cols[None, :]), mask=cmask, other=0.0)
        low = (rr >= p)[:, None]
        e = tl.exp(tl.where(ok[:, None], tl.where(low, G - Gp, Gp - G), float("-inf")))  # ≤ 1
        a_ip = tl.load(a0 + rr * m_stride + p, mask=ok & (rr > p), other=0.0) * scale  # P_{i,p}
        b_ip = tl.load(d0 + rr * m_stride + p, mask=ok & (rr > p), other=0.0)  # dA_{i,p}
        c_pi = tl.load(a0 + pc * m_stride + rr, mask=ok & (p > rr), other=0.0) * scale  # P_{p,i}
        beta_p = tl.load(b_p + (t0 + pc).to(tl.int64) * b_stride, mask=ok, other=0.0).to(tl.float32)
        m_pi = tl.load(d0 + pc * m_stride + rr, mask=ok & (p > rr), other=0.0) * beta_p  # dM_{p,i}
        ke = kp * e
        lq += a_ip[:, None] * ke
        lk += b_ip[:, None] * ke
        r += (c_pi[:, None] * qp + m_pi[:, None] * kp) * e
    return lq, lk, r


@triton.jit
def _bwd_pairs_kernel(
    q, k, beta, gcum, daq, da, dq, dk, dG, dbeta, oq, ok, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    GATE_VEC: tl.constexpr, IS_VARLEN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    SPAN: tl.constexpr, MIN_SEG: tl.constexpr,
):
    """Per chunk and value head: adds the pair terms to dq, dk (into oq, ok: in place or a copy in
    another dtype), dbeta and dG (float32, in place), then overwrites dG's rows with the reverse cumsum
    over the chunk (dg)."""
    i_h, i_hk, i_t, bos, n = _prep_chunk(chunk_indices, cu_seqlens, T, H, HK, IS_VARLEN)
    t0 = i_t * BT
    n_in = tl.minimum(n - t0, BT)
    rr = tl.arange(0, BT)
    q_p = q + (bos * HK + i_hk) * K
    k_p = k + (bos * HK + i_hk) * K
    dq_p = dq + (bos * H + i_h) * K
    dk_p = dk + (bos * H + i_h) * K
    oq_p = oq + (bos * H + i_h) * K
    ok_p = ok + (bos * H + i_h) * K
    b_p = beta + bos * H + i_h
    daq_p = daq + (bos * H + i_h) * BT
    da_p = da + (bos * H + i_h) * BT
    b = _vec(b_p, t0, n, H, BT)  # [BT]
    # kernel 1's matrices, strictly lower (rows ≥ n_in are zero; whatever lies above is dropped). Aq's
    # diagonal pairs go apart, exactly: their gate factor is 1, so they add P_ii k_i to dq and P_ii q_i to
    # dk and nothing to dG (in the products, q_i ⊙ P_ii k_i and k_i ⊙ P_ii q_i would cancel only up to
    # their operands' rounding, swamping dG's true pair terms under steep gates)
    P = tl.where(rr[:, None] > rr[None, :], _ctile(daq_p, t0, n, H * BT, 0, BT, BT, BT) * scale, 0.0)
    p_diag = tl.load(daq_p + t0.to(tl.int64) * (H * BT) + rr * (H * BT + 1), mask=rr < n_in, other=0.0)
    p_diag = (p_diag * scale)[:, None]
    Ad = tl.where(rr[:, None] > rr[None, :], _ctile(da_p, t0, n, H * BT, 0, BT, BT, BT), 0.0)
    db = tl.zeros([BT], dtype=tl.float32)
    if GATE_VEC:
        G_p = gcum + (bos * H + i_h) * K
        dG_p = dG + (bos * H + i_h) * K
        Pd = P.to(DT)
        Ad_d = Ad.to(DT)
        Md = (Ad * b[:, None]).to(DT)
        for i_k in range(0, tl.cdiv(K, BK)):
            c0 = i_k * BK
            kb = _ctile(k_p, t0, n, HK * K, c0, K, BT, BK)
            qb = _ctile(q_p, t0, n, HK * K, c0, K, BT, BK)
            lq, lk, r, done = _pair_levels(Pd, Ad_d, Md, kb, qb, G_p, H * K, t0, n_in, c0, K, BT, BK, MIN_SEG,
                                           DT, PREC, SPAN)
            if done == 0:  # a log-gate below ~−7 per token: elementwise inside MIN_SEG-row segments
                G = _ctile(G_p, t0, n, H * K, c0, K, BT, BK)
                lq, lk, r = _seg_pairs_bwd(lq, lk, r, G, k_p, q_p, HK * K, G_p, H * K, daq_p, da_p,
                                           b_p, H * BT, H, scale, t0, n_in, c0, K, BT, BK, MIN_SEG)
            kf = kb.to(tl.float32)
            qf = qb.to(tl.float32)
            db += tl.sum(kf * lk, 1)
            blk = b[:, None] * lk
            dGb = _ctile(dG_p, t0, n, H * K, c0, K, BT, BK) + qf * lq + kf * (blk - r)
            lq += p_diag * kf
            r += p_diag * qf
            _cstore(oq_p, _ctile(dq_p, t0, n, H * K, c0, K, BT, BK) + lq, t0, n, H * K, c0, K, BT, BK)
            _cstore(ok_p, _ctile(dk_p, t0, n, H * K, c0, K, BT, BK) + blk + r, t0, n, H * K, c0, K, BT, BK)
            _cstore(dG_p, tl.cumsum(dGb, 0, reverse=True), t0, n, H * K, c0, K, BT, BK)  # rows ≥ n_in: 0
    else:
        gs = _vec(gcum + bos * H + i_h, t0, n, H, BT)  # [BT]
        low = (rr[:, None] > rr[None, :]) & (rr < n_in)[:, None]
        E = tl.exp(tl.where(low, gs[:, None] - gs[None, :], 0.0))  # exponent masked before exp: ≤ 0
        Pe = (P * E).to(DT)
        Ae = Ad * E
        Ae_d = Ae.to(DT)
        Me = (Ae * b[:, None]).to(DT)
        dGs = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            c0 = i_k * BK
            kb = _ctile(k_p, t0, n, HK * K, c0, K, BT, BK)
            qb = _ctile(q_p, t0, n, HK * K, c0, K, BT, BK)
            lq = _mm(Pe, kb, DT, PREC)
            lk = _mm(Ae_d, kb, DT, PREC)
            r = _mm(tl.trans(Me), kb, DT, PREC)
            r = tl.dot(tl.trans(Pe), qb.to(DT), r, input_precision=PREC)
            kf = kb.to(tl.float32)
            qf = qb.to(tl.float32)
            db += tl.sum(kf * lk, 1)
            blk = b[:, None] * lk
            dGs += tl.sum(qf * lq + kf * (blk - r), 1)
            lq += p_diag * kf
            r += p_diag * qf
            _cstore(oq_p, _ctile(dq_p, t0, n, H * K, c0, K, BT, BK) + lq, t0, n, H * K, c0, K, BT, BK)
            _cstore(ok_p, _ctile(dk_p, t0, n, H * K, c0, K, BT, BK) + blk + r, t0, n, H * K, c0, K, BT, BK)
        dG_p = dG + bos * H + i_h
        dGs += _vec(dG_p, t0, n, H, BT)
        tl.store(dG_p + (t0 + rr).to(tl.int64) * H, tl.cumsum(dGs, 0, reverse=True), mask=rr < n_in)
    db_p = dbeta + bos * H + i_h
    tl.store(db_p + (t0 + rr).to(tl.int64) * H, _vec(db_p, t0, n, H, BT) + db, mask=rr < n_in)


def bwd_pairs(q: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, gcum: torch.Tensor, dAq: torch.Tensor,
              dA: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dG: torch.Tensor, dbeta: torch.Tensor,
              scale: float, cu_seqlens: torch.Tensor | None, gate: int,
              out_dtype: torch.dtype = torch.float32, chunk_indices: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adds the gated pair products' gradients to kernel 1's partials and reverses the gate's cumsum.

    q, k [B, T, HK, K] (bf16, fp16 or fp32), beta [B, T, H] (any of those), gcum float32 [B, T, H]
    (gate 1, GDN) or [B, T, H, K] (gate 2, KDA): the within-chunk cumulative log-gate; dAq, dA float32
    [B, T, H, 64]: the gradients of Aq (incl. its scale) and A (incl. β), row t0 + i of a chunk holding
    its row i. dq, dk float32 [B, T, H, K] (per value head), dG float32 shaped as gcum, dbeta float32
    [B, T, H]: kernel 1's partials, updated in place. cu_seqlens: None or int32 [N + 1] (then B = 1;
    chunk_indices: its chunk table, linear._chunk_tables, if the caller has it).
    Returns (dq, dk, dg, dbeta): dq, dk per value head (the caller sums GQA groups) in out_dtype (float32:
    the partials' storage; another dtype: new tensors, the partials left as they were), dg the float32
    gradient of the per-token log-gate (in dG's storage) and dbeta (float32, in place)."""
    check_tensor("q", q, 4, "[B, T, HK, K]")
    b, t, hk, d_k = q.shape
    check_tensor("k", k, 4, "[B, T, HK, K]", shape=(b, t, hk, d_k), dtypes=(q.dtype,))
    check_tensor("beta", beta, 3, "[B, T, H]", shape=(b, t, None),
                 dtypes=(torch.float32, torch.bfloat16, torch.float16))
    h = beta.shape[2]
    check_heads_divide("beta", h, "q", hk)
    if gate not in (1, 2):
        raise ValueError(f"gate: expected 1 (GDN, gcum [B, T, H]) or 2 (KDA, gcum [B, T, H, K]), got {gate}")
    g_shape, g_layout = ((b, t, h), "[B, T, H]") if gate == 1 else ((b, t, h, d_k), "[B, T, H, K]")
    f32 = (torch.float32,)
    check_tensor("gcum", gcum, len(g_shape), g_layout, shape=g_shape, dtypes=f32)
    check_tensor("dAq", dAq, 4, "[B, T, H, 64]", shape=(b, t, h, CHUNK), dtypes=f32)
    check_tensor("dA", dA, 4, "[B, T, H, 64]", shape=(b, t, h, CHUNK), dtypes=f32)
    check_tensor("dq", dq, 4, "[B, T, H, K]", shape=(b, t, h, d_k), dtypes=f32)
    check_tensor("dk", dk, 4, "[B, T, H, K]", shape=(b, t, h, d_k), dtypes=f32)
    check_tensor("dG", dG, len(g_shape), g_layout, shape=g_shape, dtypes=f32)
    check_tensor("dbeta", dbeta, 3, "[B, T, H]", shape=(b, t, h), dtypes=f32)
    check_same_device(q=q, k=k, beta=beta, gcum=gcum, dAq=dAq, dA=dA, dq=dq, dk=dk, dG=dG, dbeta=dbeta,
                      cu_seqlens=cu_seqlens)
    tensors = dict(q=q, k=k, beta=beta, gcum=gcum, dAq=dAq, dA=dA, dq=dq, dk=dk, dG=dG, dbeta=dbeta)
    for name, x in tensors.items():
        if not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")
    varlen = cu_seqlens is not None
    if varlen:
        check_tensor("cu_seqlens", cu_seqlens, 1, "[N + 1]", dtypes=(torch.int32,))
        if b != 1:
            raise ValueError(f"q: expected batch size 1 with cu_seqlens, got {b}")
        idx = _chunk_tables(cu_seqlens, CHUNK)[0] if chunk_indices is None else chunk_indices
        n_chunks = idx.shape[0] if t > 0 and int(cu_seqlens[-1]) > 0 else 0
        grid = (n_chunks, h)
        cu = cu_seqlens
    else:
        n_chunks = triton.cdiv(t, CHUNK) * b
        grid = (triton.cdiv(t, CHUNK), b * h)
        idx = cu = q  # any pointer; unused when not varlen
    oq, ok = dq, dk
    if out_dtype != torch.float32:
        oq, ok = torch.empty_like(dq, dtype=out_dtype), torch.empty_like(dk, dtype=out_dtype)
        if n_chunks == 0:
            oq.copy_(dq)
            ok.copy_(dk)
    if n_chunks == 0:
        return oq, ok, dG, dbeta
    cfg = TUNING["vector" if gate == 2 else "scalar"]
    bk = min(cfg["BK"], max(16, triton.next_power_of_2(d_k)))
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg") is not None and q.dtype != torch.float32:
        opts["maxnreg"] = cfg["maxnreg"]
    _bwd_pairs_kernel[grid](
        q, k, beta, gcum, dAq, dA, dq, dk, dG, dbeta, oq, ok, cu, idx, scale, t,
        H=h, HK=hk, K=d_k, BT=CHUNK, BK=bk, GATE_VEC=gate == 2, IS_VARLEN=varlen, DT=_tl_dtype(q.dtype),
        PREC="ieee" if q.dtype == torch.float32 else "tf32", SPAN=_span(q.dtype), MIN_SEG=MIN_SEG, **opts,
    )
    return oq, ok, dG, dbeta
