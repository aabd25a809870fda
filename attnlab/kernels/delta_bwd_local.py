"""Backward of the chunked gated delta rule, part 1: every per-chunk gradient but the gated pair products.

Notation of :mod:`attnlab.kernels.linear` and :mod:`attnlab.kernels.linear_bwd`, per chunk (C = 64 rows)
and value head: G the within-chunk cumulative log-gate (GDN: one per row; KDA: per channel), Γ = e^G,
GL = G at the chunk's last valid row, γ = e^GL, X = (I + A)⁻¹, R_w = β K ⊙ Γ, R_u = β V, w = X R_w,
u = X R_u, v' = u − w S (S the state entering the chunk), Kd = K ⊙ e^{GL − G},

    o = (scale Q ⊙ Γ) S + Aq v',    S_next = Diag(γ) S + Kdᵀ v'.

Given dO, dS' (the gradient of the state leaving the chunk) and dv' (the total gradient of v', from the
state-gradient sweep), the gradients of L = ⟨o, dO⟩ + ⟨S_next, dS'⟩ with S, A and Aq held fixed are

    dq   = scale Γ ⊙ (dO Sᵀ)                   dk  = (v' dS'ᵀ) ⊙ e^{GL−G} + β Γ ⊙ dR_w
    dR_w = −Xᵀ dv' Sᵀ,  dR_u = Xᵀ dv'           dv  = β dR_u
    dβ   = Σ_v dR_u ⊙ v + Σ_d dR_w ⊙ K ⊙ Γ     dA  = −strict_tril(dR_w wᵀ + dR_u uᵀ)
    dAq  = tril(dO v'ᵀ)
    dG   = Q ⊙ dq − K ⊙ (v' dS'ᵀ) ⊙ e^{GL−G} + dR_w ⊙ β K ⊙ Γ,  and on the last valid row
           + Σ_rows K ⊙ (v' dS'ᵀ) ⊙ e^{GL−G} + γ ⊙ Σ_v S ⊙ dS'     (GDN: each summed over the channels)

(the gradient of X = (I + A)⁻¹ is −Xᵀ (·) Xᵀ, so ⟨dw, X R_w⟩ gives dA = −dR_w wᵀ; Yang et al. 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length", and fla's
chunk_bwd_dqkwg / prepare_wy_repr_bwd compute the same terms in two launches). The gated pair
products through A and Aq (dA, dAq back to q, k, G, β) are :mod:`.delta_bwd_pairs`.

One program per (chunk, value head), the forward prepare kernels' grid. It walks the D_k blocks (BK
channels); inside each, the D_v blocks (BV columns) accumulate dO Sᵀ, v' dS'ᵀ and dv' Sᵀ as 64-row
tensor-core products into three [64, BK] fp32 tiles, and on the first D_k block also dR_u, dv, dβ's
value part, dv' uᵀ and dAq (so S and dS' are read once, dO, v' and dv' once per D_k block, and two
[64, 64] accumulators are the only other live tiles). Each D_k block then finishes its dq, dk, dG and
(dv' Sᵀ) wᵀ from q, k, G and w read once; dA = −strict_tril(Xᵀ (dv' uᵀ − (dv' Sᵀ) wᵀ)) at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear import CHUNK, _chunk_tables, _cstore, _ctile, _empty, _mm, _prep_chunk, _tl_dtype, _vec

# Launch parameters by gate kind ("scalar" GDN, "vector" KDA): BK channels per D_k block, BV value
# columns per step, warps, pipeline depth, and the ptxas register cap (ignored for float32 inputs,
# whose products run on FMA units and need more). sm_90 (registers, stack bytes
# per thread) at H = 16, D_k = D_v = 128, bf16, 16-divisible pointers and T
# (tests/test_kernels_delta_bwd_local.py::test_bwd_local_compiles_for_sm90; 8 warps unless said):
#   BK 32, BV 64           KDA (244, 0)   GDN (248, 0)     <- the defaults: one 8-warp program per SM
#   BK 32, BV 32           KDA (231, 0)   GDN (239, 0)
#   BK 32, BV 32, 2 stages KDA (252, 0)   GDN (225, 0)     (prefetches the next D_v block: worth a sweep)
#   BK 32, BV 64, 2 stages KDA (255, 0)   GDN (255, 24)
#   BK 16, BV 64           KDA (248, 0)
#   BK 64, BV 64           KDA (255, 24)  GDN (255, 72)    4 warps: KDA (255, 968)
#   BK 32, BV 64, maxnreg 128: KDA spills 488 bytes (two programs per SM would need ≤ 128)
# Where they go (KDA, BK 32): the D_v loop's three products ~115, the value side inside it ~100 (its
# two [64, 64] accumulators, dR_u, the X operand), the per-block epilogue the rest. BK 16 saves
# nothing, so BK = 32: D_k in 4 blocks, dO, v', dv' read once per block (cache hits after the first).
# H100, whole GDN / KDA fwd + bwd at T = 16K, B = 1, H = 16, D = 128, bf16 (do_bench, benchmarks/RESULTS.md):
# the defaults 3.52 / 5.05-5.10 ms, BV 32 with 2 stages 3.76 / 5.26, BK 16 3.95 / 5.62.
TUNING: dict[str, dict[str, int | None]] = {
    "scalar": {"BK": 32, "BV": 64, "num_warps": 8, "num_stages": 1, "maxnreg": None},
    "vector": {"BK": 32, "BV": 64, "num_warps": 8, "num_stages": 1, "maxnreg": None},
}


@triton.jit
def _bwd_local_kernel(
    q, k, v, beta, gcum, xa, w, u, vn, states, do, dstates, dvn,
    dq, dk, dv, dbeta, dg, daq, da,
    cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE_VEC: tl.constexpr, IS_VARLEN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """One chunk and value head (see the module docstring). Per-token tensors [B, T, H(K), ·] with
    this program's rows t0 .. t0 + n_in − 1 of its sequence; states / dstates [N_chunks, H, K, V]."""
    i_h, i_hk, i_t, bos, n = _prep_chunk(chunk_indices, cu_seqlens, T, H, HK, IS_VARLEN)
    if IS_VARLEN:
        i_g = tl.program_id(0).to(tl.int64)  # the chunk's global index
    else:
        i_g = (tl.program_id(1) // H).to(tl.int64) * tl.cdiv(T, BT) + i_t
    t0 = i_t * BT
    n_in = tl.minimum(n - t0, BT)
    last = (t0 + n_in - 1).to(tl.int64)  # the chunk's last valid row
    rr = tl.arange(0, BT)
    is_last = rr == n_in - 1

    q_p = q + (bos * HK + i_hk) * K
    k_p = k + (bos * HK + i_hk) * K
    w_p = w + (bos * H + i_h) * K
    dq_p = dq + (bos * H + i_h) * K
    dk_p = dk + (bos * H + i_h) * K
    v_p = v + (bos * H + i_h) * V
    u_p = u + (bos * H + i_h) * V
    vn_p = vn + (bos * H + i_h) * V
    do_p = do + (bos * H + i_h) * V
    dvn_p = dvn + (bos * H + i_h) * V
    dv_p = dv + (bos * H + i_h) * V
    s_p = states + (i_g * H + i_h) * K * V
    ds_p = dstates + (i_g * H + i_h) * K * V

    X = _ctile(xa + (bos * H + i_h) * BT, t0, n, H * BT, 0, BT, BT, BT)  # [BT, BT] fp32
    Xt = tl.trans(tl.where(rr[:, None] >= rr[None, :], X, 0.0).to(DT))  # Xᵀ, in the products' dtype
    b = _vec(beta + bos * H + i_h, t0, n, H, BT)  # [BT]
    if GATE_VEC:
        G_p = gcum + (bos * H + i_h) * K
        dg_p = dg + (bos * H + i_h) * K
    else:
        G_p = gcum + bos * H + i_h
        gs = _vec(G_p, t0, n, H, BT)  # [BT] (padding rows 0)
        GLs = tl.load(G_p + last * H)
        dg_row = tl.zeros([BT], dtype=tl.float32)

    # dR_w wᵀ + dR_u uᵀ = Xᵀ (dw wᵀ + dv' uᵀ): accumulate P = dv' uᵀ − (dv' Sᵀ) wᵀ and multiply by Xᵀ once
    # at the end (a product feeding another product would force a 64-row tile onto 8 warps' rows)
    P = tl.zeros([BT, BT], dtype=tl.float32)
    dAq = tl.zeros([BT, BT], dtype=tl.float32)  # dO v'ᵀ
    db = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        c0 = i_k * BK
        rk = c0 + tl.arange(0, BK)
        acc_q = tl.zeros([BT, BK], dtype=tl.float32)  # dO Sᵀ
        acc_kd = tl.zeros([BT, BK], dtype=tl.float32)  # v' dS'ᵀ
        acc_w = tl.zeros([BT, BK], dtype=tl.float32)  # dv' Sᵀ = −dw
        sds = tl.zeros([BK], dtype=tl.float32)  # Σ_v S ⊙ dS'
        for i_v in range(0, tl.cdiv(V, BV)):
            v0 = i_v * BV
            rv = v0 + tl.arange(0, BV)
            mkv = (rk < K)[:, None] & (rv < V)[None, :]
            kv = rk[:, None] * V + rv[None, :]
            b_s = tl.load(s_p + kv, mask=mkv, other=0.0)  # [BK, BV]
            b_ds = tl.load(ds_p + kv, mask=mkv, other=0.0)  # [BK, BV] fp32
            b_do = _ctile(do_p, t0, n, H * V, v0, V, BT, BV)
            b_vn = _ctile(vn_p, t0, n, H * V, v0, V, BT, BV)
            b_dvn = _ctile(dvn_p, t0, n, H * V, v0, V, BT, BV).to(DT)  # fp32 in memory; products only
            acc_q += _mm(b_do, tl.trans(b_s), DT, PREC)
            acc_w += _mm(b_dvn, tl.trans(b_s), DT, PREC)
            acc_kd += _mm(b_vn, tl.trans(b_ds), DT, PREC)
            sds += tl.sum(b_s.to(tl.float32) * b_ds, 1)
            if i_k == 0:  # the value side, once: dR_u = Xᵀ dv', dv, dβ's v part, P's u part, dAq
                dru = _mm(Xt, b_dvn, DT, PREC)  # [BT, BV]
                _cstore(dv_p, dru * b[:, None], t0, n, H * V, v0, V, BT, BV)
                db += tl.sum(dru * _ctile(v_p, t0, n, H * V, v0, V, BT, BV).to(tl.float32), 1)
                P += _mm(b_dvn, tl.trans(_ctile(u_p, t0, n, H * V, v0, V, BT, BV)), DT, PREC)
                dAq += _mm(b_do, tl.trans(b_vn), DT, PREC)

        b_q = _ctile(q_p, t0, n, HK * K, c0, K, BT, BK).to(tl.float32)
        b_k = _ctile(k_p, t0, n, HK * K, c0, K, BT, BK).to(tl.float32)
        if GATE_VEC:
            b_G = _ctile(G_p, t0, n, H * K, c0, K, BT, BK)  # [BT, BK]
            GL = tl.load(G_p + last * H * K + rk, mask=rk < K, other=0.0)  # [BK]
            ed = tl.exp(GL[None, :] - b_G)  # e^{GL − G} (padding rows: e^{GL} ≤ 1)
            eGL = tl.exp(GL)
        else:
            b_G = gs[:, None]
            ed = tl.exp(GLs - b_G)
            eGL = tl.exp(GLs)
        gam = tl.exp(b_G)
        b_dq = acc_q * (gam * scale)
        _cstore(dq_p, b_dq, t0, n, H * K, c0, K, BT, BK)
        dkd = acc_kd * ed  # the gradient of k through Kd
        drw = -_mm(Xt, acc_w, DT, PREC)  # dR_w = Xᵀ dw, [BT, BK]
        kg = b_k * gam
        _cstore(dk_p, dkd + drw * (gam * b[:, None]), t0, n, H * K, c0, K, BT, BK)
        db += tl.sum(drw * kg, 1)
        P -= _mm(acc_w, tl.trans(_ctile(w_p, t0, n, H * K, c0, K, BT, BK)), DT, PREC)
        # −K ⊙ dk_Kd on every row and its sum over the rows on the last (through GL): on the last row
        # the two cancel exactly, so that row's term is left out of both (no float32 cancellation)
        kdk = tl.where(is_last[:, None], 0.0, b_k * dkd)
        b_dG = b_q * b_dq - kdk + drw * kg * b[:, None]  # [BT, BK]
        to_last = tl.sum(kdk, 0) + eGL * sds  # [BK], the rest of the gradient of GL
        if GATE_VEC:
            b_dG += tl.where(is_last[:, None], to_last[None, :], 0.0)
            _cstore(dg_p, b_dG, t0, n, H * K, c0, K, BT, BK)
        else:
            dg_row += tl.sum(b_dG, 1) + tl.where(is_last, tl.sum(to_last, 0), 0.0)

    dAq = tl.where(rr[:, None] >= rr[None, :], dAq, 0.0)
    _cstore(daq + (bos * H + i_h) * BT, dAq, t0, n, H * BT, 0, BT, BT, BT)
    dA = tl.where(rr[:, None] > rr[None, :], -_mm(Xt, P, DT, PREC), 0.0)
    _cstore(da + (bos * H + i_h) * BT, dA, t0, n, H * BT, 0, BT, BT, BT)
    rows = (t0 + rr).to(tl.int64) * H
    tl.store(dbeta + bos * H + i_h + rows, db, mask=rr < n_in)
    if not GATE_VEC:
        tl.store(dg + bos * H + i_h + rows, dg_row, mask=rr < n_in)


# ---------------------------------------------------------------------------------------------
# host side


def _expect(name: str, x: torch.Tensor, shape: tuple[int, ...], layout: str) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} {layout}, got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def bwd_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gcum: torch.Tensor,
    xa: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    vn: torch.Tensor,
    states: torch.Tensor,
    do: torch.Tensor,
    dstates: torch.Tensor,
    dvn: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    gate: int,
    *,
    chunk_indices: torch.Tensor | None = None,
    dv_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ...]:
    """Per-chunk gradients of the gated delta rule except the gated pair products (module docstring).

    q, k [B, T, HK, K] and v, w, u, vn (= v'), do [B, T, H, V] (w [B, T, H, K]) in one dtype DT
    (bf16 / fp16 / fp32); beta [B, T, H] (any float dtype); gcum float32 [B, T, H] (gate 1, GDN) or
    [B, T, H, K] (gate 2, KDA), the within-chunk cumulative log-gate; xa float32 [B, T, H, 64],
    X = (I + A)⁻¹ row by token row; states DT [N_chunks, H, K, V], the state entering each chunk;
    dstates [N_chunks, H, K, V], the gradient of the state leaving it, and dvn [B, T, H, V], the
    total gradient of v', in DT or float32. cu_seqlens: None or int32 [N + 1] with B = 1 (chunks
    then numbered as linear._chunk_tables; chunk_indices: that table, if the caller has it).
    Returns float32 (dq, dk [B, T, H, K] per value head, dv [B, T, H, V] (in dv_dtype), dbeta [B, T, H],
    dG like gcum, dAq, dA [B, T, H, 64]); rows past each sequence's end are not written."""
    if gate not in (1, 2):
        raise ValueError(f"gate: expected 1 (GDN) or 2 (KDA), got {gate}")
    if q.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, v: expected 4 dims [B, T, H, D], got {tuple(q.shape)}, {tuple(v.shape)}")
    b, t, hk, d_k = q.shape
    h, d_v = v.shape[2], v.shape[3]
    if h % hk != 0:
        raise ValueError(f"v has {h} heads, not a multiple of q's {hk}")
    _expect("k", k, (b, t, hk, d_k), "[B, T, HK, K]")
    _expect("q", q, (b, t, hk, d_k), "[B, T, HK, K]")
    for name, x in (("v", v), ("u", u), ("vn", vn), ("do", do), ("dvn", dvn)):
        _expect(name, x, (b, t, h, d_v), "[B, T, H, V]")
    _expect("w", w, (b, t, h, d_k), "[B, T, H, K]")
    _expect("beta", beta, (b, t, h), "[B, T, H]")
    if gate == 1:
        _expect("gcum", gcum, (b, t, h), "[B, T, H] (GDN)")
    else:
        _expect("gcum", gcum, (b, t, h, d_k), "[B, T, H, K] (KDA)")
    _expect("xa", xa, (b, t, h, CHUNK), f"[B, T, H, {CHUNK}]")
    for name, x in (("gcum", gcum), ("xa", xa)):
        if x.dtype != torch.float32:
            raise ValueError(f"{name}: expected float32, got {x.dtype}")
    for name, x in (("dstates", dstates), ("dvn", dvn)):
        if x.dtype not in (torch.float32, q.dtype):
            raise ValueError(f"{name}: expected float32 or q's dtype {q.dtype}, got {x.dtype}")
    varlen = cu_seqlens is not None
    if varlen:
        if b != 1:
            raise ValueError(f"q: with cu_seqlens the batch must be packed into B = 1, got B = {b}")
        if chunk_indices is None:
            chunk_indices, _ = _chunk_tables(cu_seqlens, CHUNK)
        n_chunks = chunk_indices.shape[0] if t > 0 else 0
        grid = (n_chunks, h)
    else:
        n_chunks = b * triton.cdiv(t, CHUNK)
        grid = (triton.cdiv(t, CHUNK), b * h)
    for name, x in (("states", states), ("dstates", dstates)):
        if x.dim() != 4 or tuple(x.shape[1:]) != (h, d_k, d_v) or x.shape[0] < n_chunks:
            raise ValueError(f"{name}: expected shape ({n_chunks}, {h}, {d_k}, {d_v}) [N_chunks, H, K, V], "
                             f"got {tuple(x.shape)}")

    dev = q.device
    f32 = torch.float32
    dq = _empty(b, t, h, d_k, dtype=f32, device=dev)
    dk = _empty(b, t, h, d_k, dtype=f32, device=dev)
    dv = _empty(b, t, h, d_v, dtype=dv_dtype, device=dev)
    dbeta = _empty(b, t, h, dtype=f32, device=dev)
    dg = _empty(*gcum.shape, dtype=f32, device=dev)
    daq = _empty(b, t, h, CHUNK, dtype=f32, device=dev)
    da = _empty(b, t, h, CHUNK, dtype=f32, device=dev)
    if n_chunks == 0:
        return dq, dk, dv, dbeta, dg, daq, da
    cfg = TUNING["vector" if gate == 2 else "scalar"]
    bk = min(int(cfg["BK"]), max(16, triton.next_power_of_2(d_k)))
    bv = min(int(cfg["BV"]), max(16, triton.next_power_of_2(d_v)))
    _bwd_local_kernel[grid](
        q, k, v, beta, gcum, xa, w, u, vn, states, do, dstates, dvn,
        dq, dk, dv, dbeta, dg, daq, da,
        cu_seqlens if varlen else q, chunk_indices if varlen else q, float(scale), t,
        H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BK=bk, BV=bv, GATE_VEC=gate == 2, IS_VARLEN=varlen,
        DT=_tl_dtype(q.dtype), PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        maxnreg=cfg.get("maxnreg") if q.dtype != torch.float32 else None,
    )
    return dq, dk, dv, dbeta, dg, daq, da


__all__ = ["bwd_local"]
