"""Segment-parallel state pass of the chunked delta-rule forward (Gated DeltaNet and KDA; issue #8).

:func:`attnlab.kernels.linear._forward` runs the delta rule in three launches; the middle one,
``_state_kernel``, walks all chunks of a sequence in one program per (sequence, head, 16-column
D_v block), a chain of T / 64 dependent steps on ~H · D_v / 16 programs (≈ 1 per SM at H = 16).
This module replaces that launch (``linear.DELTA_SEGMENTED``) with three that cut the sequence
into segments of L tokens (a multiple of the chunk), using that the chunk step is affine in the
state. With γ_c the decay over chunk c (GDN: the scalar e^{G_last}; KDA: the vector e^{G_last}
over key channels), w, u, kd the prepare kernel's outputs (kd = k decayed to the chunk end), and
the state kernel's exact order (store h, v' = u − w S, S ← Diag(γ) S, S += kdᵀ v'):

    S_c = Diag(γ_c) S_{c−1} + kd_cᵀ (u_c − w_c S_{c−1}) = M_c S_{c−1} + B_c,
    M_c = Diag(γ_c) − kd_cᵀ w_c   [D_k, D_k],        B_c = kd_cᵀ u_c   [D_k, D_v].

1. ``_transition_kernel`` (parallel over sequence, head, non-last segment, BX-column block of
   [M | B]): composes the segment's transition, X ← M_c X chunk by chunk from X = [I | 0] (for B's
   columns the update is X ← Diag(γ) X + kdᵀ(u − w X), i.e. the state pass from a zero state).
   Columns evolve independently, so they split like the state kernel's D_v blocks. Written float32,
   M_seg into [slots, H, D_k, D_k], B_seg into [slots, H, D_k, D_v], at the next segment's slot.
2. ``_scan_kernel`` (sequential over segments, parallel over sequence, head, D_v block):
   S_in[s+1] = M_seg[s] S_in[s] + B_seg[s] from S_in[0] = the initial state, in place in the B
   slots; a sequence without tokens writes its final state here.
3. ``_segment_state_kernel`` (parallel over sequence, head, segment, D_v block): the state
   kernel's loop over one segment's chunks, from S_in: writes the state entering every chunk and
   v' (the output kernel reads both, unchanged), and the last segment the final state. With
   ``out`` (linear.FUSED_OUTPUT, a forward that makes outputs) it writes each chunk's output
   instead, made while the chunk's state and v' are in registers (linear._chunk_output), so that
   neither reaches memory and the output launch goes away; its launch shape (TUNING["output_*"])
   then sets the segment count.

The two-level scan is the usual parallel-prefix form of a linear recurrence (Blelloch 1990); the
same split of fla's ``chunk_gated_delta_rule_fwd_h`` over segments. Pass 1 does (D_k + D_v) / D_v
= 2x the state kernel's matrix work (at D_k = D_v), pass 3 1x, but both on ~L/64-step chains:
the point is to trade work for parallelism. Nothing overflows: the decays are products of gates
≤ 1, and M_c is a contraction for |k| = 1, β ∈ [0, 1]. Products take the input dtype on the tensor
cores with float32 accumulation, exactly as the state kernel (which rounds S for w S likewise);
pass 2's [D_k, D_k] x [D_k, BV] products take TUNING["scan"]["precision"] (float32 inputs: "ieee").

Packed batches (``cu_seqlens``) are supported: segments never cross a sequence (the host-built
segment tables of :mod:`.lightning_fwd`).

GDN's inference forward hands passes 1 and 3 its k, X = (I + A)⁻¹, v and β instead of kd, w and u
(``state_pass``'s ``from_inputs``; linear.WUKD_FROM_INPUTS): with a scalar gate,
kdᵀ y = Kᵀ (e^{G_last − G} ⊙ y) and u − w S = X (β ⊙ (V − e^G ⊙ (K S))), so the prepare writes only
X and the gate's cumulative sum, and the passes read X (128 bytes a token and head) where they read
w, u, kd (768 at D = 128, bf16), for one more 64 x 64 x BV product a chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._common import launch_fitting
from .lightning_fwd import _segment_of, _segment_tables, _sm_count
from .linear import (
    CHUNK,
    _chunk_output,
    _chunk_tables,
    _ctile,
    _empty,
    _mm,
    _seq_bounds,
    _seq_chunks,
    _store_tile,
    _tile,
    _tl_dtype,
    _vec,
)

# Launch parameters; `benchmarks/linear_gpu.py --sweep delta_segmented` may override them.
# "transition": pass 1 (BX columns of [M | B] per program); "scan": pass 2 (BV state columns per
# program, BKK rows of S_in per product step, precision of those float32 products on 16-bit
# inputs: "ieee" | "tf32x3" | "tf32"); "state": pass 3 (BV columns, as linear.TUNING's state kernel).
# A segment is chosen so that pass 3 has about programs_per_sm programs per SM and is never shorter
# than min_segment tokens (each segment costs a [D_k, D_k + D_v] float32 transition written, read
# by pass 2, and a pass-1 chain of L / 64 steps). First guesses except pass 1's num_stages, sized
# by an sm_90 compile (Triton 3.9, bf16, D = 128, no spills): pass 3 at BV = 16 with 2 stages
# takes 72 KB of shared memory and 72 registers a thread (3 programs fit an SM; 3 stages: 106 KB,
# 2 fit), pass 1 at BX = 32 with 2 stages 76 KB and 92 registers, pass 2 at BV = BKK = 32 126.
# The chains are latency-bound (the single-pass kernel takes ~1.2 us a chunk at 64K on an H200,
# ~10x its tensor-core time), so several programs per SM is what pays.
TUNING: dict[str, dict] = {
    # --sweep delta_segmented (H200, 2026-11-26), GDN fwd 16K/64K: 3 stages 0.711/2.708 ms, 2: 0.736/2.801.
    # H100, eleventh session, with the fused output pass's segment counts (whole forward, CUDA graphs,
    # interleaved, best of 3; GDN / KDA at 16K / 64K, ms): BX 32 / 4 warps / 3 stages 0.682 / 2.430,
    # 1.026 / 3.931; BX 64 / 4 / 2 (166 registers, 88 KB shared: 2 per SM) 0.652 / 2.305, 0.995 / 3.800;
    # BX 64 / 8 / 2 0.780 / 2.803, 1.127 / 4.323; BX 128 / 8 / 2 0.689 / 2.454, 1.029 / 3.932; BX 16 /
    # 4 / 3 0.774 / 2.812, 1.081 / 4.153. At BX 64 / 4: 1 stage 0.662 / 2.366, 1.005 / 3.847; 3 stages
    # 0.682 / 2.438, 1.040 / 3.984
    "transition": {"BX": 64, "num_warps": 4, "num_stages": 2},
    # same A/B, 16-bit inputs: BV 32, "ieee" 0.651 / 2.318, 0.999 / 3.824; BV 16, "tf32x3" 0.638 / 2.307,
    # 0.994 / 3.817 (bf16 outputs identical; 8 segments of GDN at 16K made this pass ~45 us); BV 16
    # "ieee" 0.648 / 2.317; BV 32 "tf32x3" 0.646 / 2.317; BKK 64 0.661 / 2.334
    "scan": {"BV": 16, "BKK": 32, "num_warps": 4, "precision": "tf32x3"},
    "state": {"BV": 16, "num_warps": 4, "num_stages": 2},
    # pass 3 making the outputs too (linear.FUSED_OUTPUT), by gate: GDN ("output_scalar"), KDA
    # ("output_vector"); programs_per_sm overrides "segments"' (it sets the segment count). H100, 16K /
    # 64K, bf16, whole forward, CUDA graphs, interleaved, best of 3 (RESULTS.md, eleventh session;
    # sm_90 registers / stack bytes / shared memory from an sm_90 compile):
    #   GDN BV 64, 4 warps, 1 stage, 2 per SM: 0.671 / 2.427 ms (255 regs, parks 112 bytes, 32 KB);
    #       BV 32: 0.751 / 2.853; BV 128 at 8 warps: 0.767 / 2.750; BV 16 (3 per SM, 2 stages) 1.107 /
    #       4.284; stored states and v' (no fusion) 0.709 / 2.692. BV 32 at 8 warps, 1 stage hits an
    #       illegal shared-memory read in a tensor-core product (compute-sanitizer: "Invalid __shared__
    #       read of size 512 bytes" in _mm) with Triton 3.6: a code-generation fault, so not launched.
    #       Twelfth session, same A/B: default 0.629 / 2.293; 2 stages at 1 per SM 0.666 / 2.476, at 2 per
    #       SM 0.690 / 2.512; 8 warps, 2 stages, 1 per SM 0.704 / 2.663. Thirteenth session, kd alone
    #       made from k (parks 160 bytes): 0.576 / 2.061; 2 stages 0.625 / 2.241; the transition at 1
    #       stage 0.580 / 2.096. With w, u, kd made from the inputs (linear.WUKD_FROM_INPUTS; parks
    #       96): 0.517 / 1.884; the transition at 1 stage 0.528 / 1.922.
    #   KDA BV 64, 4 warps, 2 stages, 1 per SM: 1.025 / 3.926 ms (246 regs, no stack, 128 KB);
    #       1 stage, 2 per SM: 1.058 / 3.956; BV 32, 3 per SM: 1.089 / 4.131; BV 128 at 8 warps 1.080 /
    #       4.054; no fusion 1.092 / 4.202.
    # programs_per_sm must be what fits (registers, shared memory): one more starts a second wave of
    # long chains, one fewer leaves SMs idle (tests/test_kernels_delta_segments.py checks the fit).
    # transition_per_sm: what pass 1 fits an SM as launched for that gate (an sm_90 compile: GDN with
    # w, u, kd made from the inputs (linear.WUKD_FROM_INPUTS) 160 registers and 74 KB, 3 fit; KDA 166
    # and 90 KB, 2); with it the segment count also keeps pass 1 one wave. GDN at H = 16: 7 segments,
    # not 8 (pass 1's 448 programs were 1.13 waves of 396 slots), 16K / 64K 0.523 / 1.884 ms -> 0.488 /
    # 1.794; 6 segments 0.518 / 2.005 (H100, same A/B as above, thirteenth session). KDA: 4 either way.
    "output_scalar": {"BV": 64, "num_warps": 4, "num_stages": 1, "programs_per_sm": 2,
                      "transition_per_sm": 3},
    "output_vector": {"BV": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 1,
                      "transition_per_sm": 2},
    "segments": {"programs_per_sm": 3, "min_segment": 512},
}
SEGMENT_LEN: int | None = None  # tests force a segment length (a multiple of CHUNK) here
CPU_SEGMENT_LEN = 2 * CHUNK  # under the interpreter: short segments, so several are exercised


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _decay_rows(X, G_p, last, rk, K: tl.constexpr, GATE: tl.constexpr, H: tl.constexpr):
    """Diag(γ) X with γ = e^{G} at token `last` (GATE 1: one scalar; 2: one per key channel)."""
    if GATE == 1:
        return X * tl.exp(tl.load(G_p + last * H))
    else:
        return X * tl.exp(tl.load(G_p + last * H * K + rk, mask=rk < K, other=0.0))[:, None]


@triton.jit
def _to_chunk_end(y, G_p, t0, n, last, H: tl.constexpr, BT: tl.constexpr):
    """y [BT, N] with row t scaled by e^{G_last − G_t} (GDN's scalar gcum at G_p: this sequence's
    row 0 and head), so that Kᵀ (that) = kdᵀ y with kd = K ⊙ e^{G_last − G}, the decayed keys the
    prepare would otherwise write (FROM_INPUTS)."""
    G = _vec(G_p, t0, n, H, BT)[:, None]
    return y * tl.exp(tl.load(G_p + last * H) - G)


@triton.jit
def _v_prime(w_p, u_p, x_p, v_p, b_p, G_p, b_k, S, t0, n, n_u, col0, H: tl.constexpr, K: tl.constexpr,
             V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BX: tl.constexpr, FROM_INPUTS: tl.constexpr,
             DT: tl.constexpr, PREC: tl.constexpr):
    """One chunk's v' = u − w S [BT, BX] for the BX columns of S [BK, BX] from col0 (rows of u, or
    of v, at or past n_u read as 0). FROM_INPUTS (GDN, scalar gate): not from w and u but as
    X (β ⊙ (V − e^G ⊙ (K S))), which equals it for u = X (β V), w = X (β e^G ⊙ K), from the prepare's
    X = (I + A)⁻¹ (x_p), v, β, the scalar gcum and b_k, the chunk's K tile; the prepare then need make
    neither. Pointers at this sequence's row 0 and value head."""
    if FROM_INPUTS:
        y = _tile(v_p, t0, n_u, H * V, col0, V, BT, BX).to(tl.float32)
        y -= tl.exp(_vec(G_p, t0, n, H, BT))[:, None] * _mm(b_k, S, DT, PREC)
        y *= _vec(b_p, t0, n, H, BT)[:, None]
        return _mm(_ctile(x_p, t0, n, H * BT, 0, BT, BT, BT), y, DT, PREC)
    else:
        b_w = _tile(w_p, t0, n, H * K, 0, K, BT, BK)
        return _tile(u_p, t0, n_u, H * V, col0, V, BT, BX).to(tl.float32) - _mm(b_w, S, DT, PREC)


@triton.jit
def _transition_kernel(
    w, u, kd, k, xa, v, beta, gcum, seg_m, seg_b, cu_seqlens, seg_table, nonlast, T, L, n_seg,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BX: tl.constexpr, NXK: tl.constexpr, GATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    FROM_INPUTS: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Pass 1: BX columns of [M_seg | B_seg] of one non-last segment, into the next slot.
    Column blocks 0 .. NXK−1 are M's (from the identity), the rest B's (from zero). FROM_INPUTS
    (GDN): kd, w, u not read but made from k, X, v, β (_to_chunk_end, _v_prime)."""
    i_x, i_p, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if IS_VARLEN:
        slot = tl.load(nonlast + i_p)
    else:
        slot = (i_p // (n_seg - 1)) * n_seg + i_p % (n_seg - 1)
    i_b, i_s = _segment_of(slot, n_seg, seg_table, IS_VARLEN)
    bos, n = _seq_bounds(i_b, T, cu_seqlens, IS_VARLEN)
    is_m = i_x < NXK
    c0 = tl.where(is_m, i_x, i_x - NXK) * BX
    n_u = tl.where(is_m, 0, n)  # M's columns see u = 0: every row of the u tile masked
    rk = tl.arange(0, BK)
    cols = c0 + tl.arange(0, BX)
    X = tl.where(is_m & (rk[:, None] == cols[None, :]), 1.0, 0.0)  # [BK, BX] float32
    w_p = w + (bos * H + i_h) * K
    kd_p = kd + (bos * H + i_h) * K
    k_p = k + (bos * HK + i_h // (H // HK)) * K
    u_p = u + (bos * H + i_h) * V
    x_p, v_p, b_p = xa + (bos * H + i_h) * BT, v + (bos * H + i_h) * V, beta + bos * H + i_h
    if GATE == 1:
        G_p = gcum + bos * H + i_h
    else:
        G_p = gcum + (bos * H + i_h) * K
    t_beg = i_s * L
    n_ch = tl.cdiv(tl.minimum(n - t_beg, L), BT)  # a non-last segment is full: L // BT chunks
    for i_t in range(0, n_ch):
        t0 = t_beg + i_t * BT
        n_in = tl.minimum(n - t0, BT)
        if FROM_INPUTS:
            b_k = _tile(k_p, t0, n, HK * K, 0, K, BT, BK)
        else:
            b_k = X  # not read
        b_y = _v_prime(w_p, u_p, x_p, v_p, b_p, G_p, b_k, X, t0, n, n_u, c0, H, K, V, BT, BK, BX, FROM_INPUTS,
                       DT, PREC)  # [BT, BX]
        last = (t0 + n_in - 1).to(tl.int64)
        X = _decay_rows(X, G_p, last, rk, K, GATE, H)
        if FROM_INPUTS:
            X += _mm(tl.trans(b_k), _to_chunk_end(b_y, G_p, t0, n, last, H, BT), DT, PREC)
        else:
            X += _mm(tl.trans(_tile(kd_p, t0, n, H * K, 0, K, BT, BK)), b_y, DT, PREC)
    dst = (slot + 1).to(tl.int64) * H + i_h
    if is_m:
        tl.store(seg_m + dst * K * K + rk[:, None] * K + cols[None, :], X,
                 mask=(rk < K)[:, None] & (cols < K)[None, :])
    else:
        tl.store(seg_b + dst * K * V + rk[:, None] * V + cols[None, :], X,
                 mask=(rk < K)[:, None] & (cols < V)[None, :])


@triton.jit
def _scan_kernel(
    seg_m, seg_b, h0, ht, cu_seqlens, seg_offsets, T, L,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BKK: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
    SPREC: tl.constexpr,
):
    """Pass 2: B slot s ← S_in[s] (slot 0 the initial state; slot s > 0 held B_seg[s − 1], and
    the M slot s M_seg[s − 1]). S_in[s] is re-read from memory BKK rows at a time for the product
    (a register tile cannot be sliced by rows); the barrier orders this program's store and loads."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    _, i_h, _, _, n, ns, first = _seq_chunks(cu_seqlens, seg_offsets, T, H, H, L, IS_VARLEN)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    rkk = tl.arange(0, BKK)
    mkv = (rk < K)[:, None] & (rv < V)[None, :]
    kv = rk[:, None] * V + rv[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + i_bh.to(tl.int64) * K * V + kv, mask=mkv, other=0.0)
    b_p = seg_b + (first * H + i_h) * K * V
    m_p = seg_m + (first * H + i_h) * K * K
    if ns > 0:
        tl.store(b_p + kv, S, mask=mkv)
    for _i_s in range(1, ns):
        tl.debug_barrier()  # the rows of S_in[s − 1] stored above are read back below
        prev = b_p
        b_p += H * K * V  # 64-bit pointer steps
        m_p += H * K * K
        S = tl.load(b_p + kv, mask=mkv, other=0.0)  # B_seg[s − 1]
        for i_k in range(0, tl.cdiv(K, BKK)):
            r = i_k * BKK + rkk
            b_m = tl.load(m_p + rk[:, None] * K + r[None, :], mask=(rk < K)[:, None] & (r < K)[None, :],
                          other=0.0)  # [BK, BKK]
            b_s = tl.load(prev + r[:, None] * V + rv[None, :], mask=(r < K)[:, None] & (rv < V)[None, :],
                          other=0.0, cache_modifier=".cg")  # [BKK, BV]
            S += tl.dot(b_m, b_s, input_precision=SPREC)
        tl.store(b_p + kv, S, mask=mkv)
    if STORE_HT:
        if ns == 0:
            tl.store(ht + i_bh.to(tl.int64) * K * V + kv, S, mask=mkv)


@triton.jit
def _segment_state_kernel(
    w, u, kd, gcum, seg_b, h, vn, ht, q, k, qg, aqk, o, xa, v, beta, cu_seqlens, seg_table, chunk_offsets,
    scale, T, L, n_seg, H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
    OUTPUT: tl.constexpr, QG: tl.constexpr, FROM_INPUTS: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Pass 3: linear._state_kernel's loop (GATE 1, 2) over one segment's chunks, from S_in. OUTPUT:
    instead of the states and v', each chunk's output (linear._chunk_output, as the output kernel
    would make it from them), while the state and v' are in registers. FROM_INPUTS (GDN): kd, w, u
    not read but made from the chunk's K tile, which the outputs read too, X, v and β
    (_to_chunk_end, _v_prime)."""
    i_v, i_p, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_s = _segment_of(i_p, n_seg, seg_table, IS_VARLEN)
    bos, n = _seq_bounds(i_b, T, cu_seqlens, IS_VARLEN)
    c0 = i_v * BV
    rk = tl.arange(0, BK)
    rv = c0 + tl.arange(0, BV)
    mkv = (rk < K)[:, None] & (rv < V)[None, :]
    kv = rk[:, None] * V + rv[None, :]
    S = tl.load(seg_b + (i_p.to(tl.int64) * H + i_h) * K * V + kv, mask=mkv, other=0.0)
    if IS_VARLEN:
        c_first = tl.load(chunk_offsets + i_b).to(tl.int64)
    else:
        c_first = i_b.to(tl.int64) * tl.cdiv(T, BT)
    h_p = h + ((c_first + i_s * (L // BT)) * H + i_h) * K * V
    w_p = w + (bos * H + i_h) * K
    kd_p = kd + (bos * H + i_h) * K
    u_p = u + (bos * H + i_h) * V
    vn_p = vn + (bos * H + i_h) * V
    x_p, v_p, b_p = xa + (bos * H + i_h) * BT, v + (bos * H + i_h) * V, beta + bos * H + i_h
    i_hk = i_h // (H // HK)
    if GATE == 1:
        G_p = gcum + bos * H + i_h
    else:
        G_p = gcum + (bos * H + i_h) * K
    t_beg = i_s * L
    n_ch = tl.cdiv(tl.minimum(n - t_beg, L), BT)
    for i_t in range(0, n_ch):
        t0 = t_beg + i_t * BT
        n_in = tl.minimum(n - t0, BT)
        if not OUTPUT:
            tl.store(h_p + kv, S.to(h.dtype.element_ty), mask=mkv)
            h_p += H * K * V  # 64-bit pointer steps (states pass 2^31 elements at ~1M tokens)
        last = (t0 + n_in - 1).to(tl.int64)
        if FROM_INPUTS:
            b_k = _tile(k + (bos * HK + i_hk) * K, t0, n, HK * K, 0, K, BT, BK)
        else:
            b_k = S  # not read
        b_vn = _v_prime(w_p, u_p, x_p, v_p, b_p, G_p, b_k, S, t0, n, n, c0, H, K, V, BT, BK, BV, FROM_INPUTS,
                        DT, PREC)
        if OUTPUT:
            b_o = _chunk_output(q + (bos * HK + i_hk) * K, k + (bos * HK + i_hk) * K, b_k,
                                qg + (bos * H + i_h) * K, aqk + (bos * H + i_h) * BT, gcum, gcum, S, b_vn,
                                bos, i_h, t0, n, scale, H, HK, K, BT, BK, GATE, QG, DT, PREC, FROM_INPUTS)
            _store_tile(o + (bos * H + i_h) * V, b_o, t0, n, H * V, c0, V, BT, BV)
        else:
            _store_tile(vn_p, b_vn, t0, n, H * V, c0, V, BT, BV)
        S = _decay_rows(S, G_p, last, rk, K, GATE, H)
        if FROM_INPUTS:
            S += _mm(tl.trans(b_k), _to_chunk_end(b_vn, G_p, t0, n, last, H, BT), DT, PREC)
        else:
            S += _mm(tl.trans(_tile(kd_p, t0, n, H * K, 0, K, BT, BK)), b_vn, DT, PREC)
    if STORE_HT:
        if t_beg + L >= n:  # the sequence's last segment
            tl.store(ht + (i_b.to(tl.int64) * H + i_h) * K * V + kv, S, mask=mkv)


# ---------------------------------------------------------------------------------------------
# host side


def _block(b: int, d: int, d_k: int) -> int:
    """Columns per program: the tuned width, at most 32 when D_k > 128 (a [D_k, b] float32 tile
    and the [64, D_k] w, kd tiles must fit registers), at least 16, at most D rounded up."""
    b = b if d_k <= 128 else min(b, 32)
    return min(b, max(16, triton.next_power_of_2(d)))


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The second stream the passes beside the overlapped prepare run on (one per device), at the
    default priority: a high-priority one (which would dispatch their programs before the prepare's)
    timed the same or slower on an H100 (KDA 16K / 64K: 0.889 / 3.441 ms high, 0.884 / 3.368 default;
    a second call 0.867 / 3.259 and 0.862 / 3.254; RESULTS.md, fifteenth session)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def segment_length(n_tokens: int, h: int, d_k: int, d_v: int, device: torch.device,
                   pass3: str = "state") -> int:
    """Tokens per segment (a multiple of CHUNK) for n_tokens in all sequences and h value heads:
    as many segments as keep pass 3 (launched as TUNING[pass3]: "state", "output_scalar" or
    "output_vector") within programs_per_sm programs per SM (TUNING[pass3]'s, else
    TUNING["segments"]'s; at least one segment), and, where TUNING[pass3] has transition_per_sm,
    pass 1 (one transition per segment but the last) within that many programs per SM; each segment
    at least min_segment tokens. SEGMENT_LEN overrides; off CUDA, CPU_SEGMENT_LEN."""
    if SEGMENT_LEN is not None:
        if SEGMENT_LEN <= 0 or SEGMENT_LEN % CHUNK:
            raise ValueError(f"SEGMENT_LEN: expected a positive multiple of {CHUNK}, got {SEGMENT_LEN}")
        return SEGMENT_LEN
    if device.type != "cuda":
        return CPU_SEGMENT_LEN
    seg = TUNING["segments"]
    per_segment = h * triton.cdiv(d_v, _block(TUNING[pass3]["BV"], d_v, d_k))
    per_sm = TUNING[pass3].get("programs_per_sm", seg["programs_per_sm"])
    # rounded down: one wave (a segment is ~H · D_v / 16 programs, about one per SM at H = 16, so
    # rounding up could start a second wave of long chains)
    sms = _sm_count(device.index or 0)
    want = max(1, per_sm * sms // per_segment)
    per_sm_1 = TUNING[pass3].get("transition_per_sm")
    if per_sm_1:  # pass 1 in one wave too: a second wave of its chains costs more than a longer pass 3
        bx = _block(TUNING["transition"]["BX"], max(d_k, d_v), d_k)
        want = min(want, 1 + per_sm_1 * sms // (h * (triton.cdiv(d_k, bx) + triton.cdiv(d_v, bx))))
    length = triton.cdiv(triton.cdiv(max(n_tokens, 1), want), CHUNK) * CHUNK
    return max(length, triton.cdiv(seg["min_segment"], CHUNK) * CHUNK)


def state_pass(
    w: torch.Tensor,
    u: torch.Tensor,
    kd: torch.Tensor,
    gcum: torch.Tensor,
    gate: int,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    states: torch.Tensor | None,
    vn: torch.Tensor,
    ht: torch.Tensor | None,
    out: tuple | None = None,
    from_inputs: tuple | None = None,
    prepare: Callable[[int, int], None] | None = None,
    beside: int = 1,
) -> None:
    """The delta rule's chunk-to-chunk pass, segment-parallel; fills what linear._state_kernel does.

    w, kd: [B, T, H, D_k] and u: [B, T, H, D_v] in the input dtype (bf16 / fp16 / fp32), gcum: the
    float32 within-chunk cumulative log-gate [B, T, H] (gate 1, GDN) or [B, T, H, D_k] (gate 2,
    KDA), all from linear._prepare_kernel; initial_state: float32 [N, H, D_k, D_v] or None;
    cu_seqlens: int32 [N + 1] with B = 1, or None (N = B). Writes, in place: states
    [n_chunks, H, D_k, D_v] (the state entering each chunk, in the input dtype, chunks ordered as
    linear._forward orders them), vn [B, T, H, D_v] (v' = u − w S), and ht float32
    [N, H, D_k, D_v] (the final state) unless None.

    out = (q, k, qg, aqk, o, scale): pass 3 writes the outputs o [B, T, H, D_v] instead of states
    and vn (both unused, may be placeholders): q, k [B, T, H_k, D_k] the forward's inputs, qg
    (KDA: q ⊙ e^G from the split prepare, or None), aqk (KDA: the prepare's scale · gated q·k, or
    None for GDN, which makes it here), as linear._output_kernel takes them.

    from_inputs = (k, xa, v, beta) (GDN only): the forward's k [B, T, H_k, D_k], the prepare's X =
    (I + A)⁻¹ (xa [B, T, H, CHUNK], row t0 + i holding row i of its chunk's X), v [B, T, H, D_v] and
    beta [B, T, H]. kd, w, u are then made from them and gcum where they are read (Kᵀ (v' ⊙
    e^{G_last − G}) for kdᵀ v', X (β ⊙ (V − e^G ⊙ (K S))) for u − w S), and the w, u, kd arguments
    are not read (any tensors).

    prepare (no cu_seqlens; linear.OVERLAP_PREPARE): launches the prepare that makes what the passes
    read for chunks lo .. hi−1 of each sequence, prepare(lo, hi); called here for the chunks of
    every segment but the last before pass 1, and for the last segment's after the passes from
    ``beside`` on (1: passes 1 and 2; 2: pass 2 only) have been queued on a second stream (CUDA),
    so that it runs beside them on the SMs they leave; pass 3 waits for both."""
    if gate not in (1, 2):
        raise ValueError(f"gate: expected 1 (GDN) or 2 (KDA), got {gate}")
    if from_inputs is not None and gate != 1:
        raise ValueError("from_inputs: kd, w, u are made from the inputs only for GDN's scalar gate "
                         "(gate 1); KDA reads them")
    b, t, h, d_k = w.shape
    d_v = u.shape[3]
    if from_inputs is not None:  # w, u, kd: placeholders
        d_k, d_v = from_inputs[0].shape[3], from_inputs[2].shape[3]
    dev = w.device
    dt, prec = _tl_dtype(w.dtype), ("ieee" if w.dtype == torch.float32 else "tf32")
    bk = max(16, triton.next_power_of_2(d_k))
    varlen = cu_seqlens is not None
    pass3 = "state" if out is None else ("output_scalar", "output_vector")[gate - 1]
    length = segment_length(b * t, h, d_k, d_v, dev, pass3)
    if varlen:
        n_seq = cu_seqlens.numel() - 1
        table, firsts, nonlast, n_slots, n_nonlast = _segment_tables(cu_seqlens, length)
        _, chunk_offsets = _chunk_tables(cu_seqlens, CHUNK)
        n_seg, cu = 1, cu_seqlens  # n_seg unused: the kernels read the tables
    else:
        n_seq = b
        n_seg = triton.cdiv(t, length)
        n_slots, n_nonlast = b * n_seg, b * max(n_seg - 1, 0)
        table = firsts = nonlast = chunk_offsets = cu = w  # any pointer; unused when not varlen
    seg_m = _empty(max(n_slots, 1), h, d_k, d_k, dtype=torch.float32, device=dev)
    seg_b = _empty(max(n_slots, 1), h, d_k, d_v, dtype=torch.float32, device=dev)
    h0 = initial_state if initial_state is not None else seg_b
    # k, X, v, β (any pointers where not read; k is read for the outputs too)
    k_in, xa, v_in, beta = from_inputs or ((out[1] if out is not None else w), w, u, w)
    hk = k_in.shape[2]
    ht_ = ht if ht is not None else seg_b
    if prepare is not None and varlen:
        raise ValueError("state_pass: prepare (the overlapped prepare) takes no cu_seqlens")
    if prepare is not None and beside not in (1, 2):
        raise ValueError(f"state_pass: beside: expected 1 (passes 1 and 2) or 2 (pass 2), got {beside}")
    split = (n_seg - 1) * length // CHUNK  # the last segment's first chunk
    if prepare is not None:
        prepare(0, split)
    side = _side_stream(dev) if prepare is not None and split > 0 and dev.type == "cuda" else None
    main = torch.cuda.current_stream(dev) if side is not None else None

    def on_side(first: int):  # passes from `first` on go to the second stream, after what is queued
        if side is None or first != beside:
            return contextlib.nullcontext()
        side.wait_stream(main)
        return torch.cuda.stream(side)

    with on_side(1):
        cfg = TUNING["transition"]
        bx = _block(cfg["BX"], max(d_k, d_v), d_k)
        nxk = triton.cdiv(d_k, bx)
        if n_nonlast > 0:
            launch_fitting(  # float32 at D = 256: 3 stages would need 304 KB of shared memory
                _transition_kernel, (nxk + triton.cdiv(d_v, bx), n_nonlast, h),
                w, u, kd, k_in, xa, v_in, beta, gcum, seg_m, seg_b, cu, table, nonlast, t, length, n_seg,
                H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BK=bk, BX=bx, NXK=nxk, GATE=gate, IS_VARLEN=varlen,
                FROM_INPUTS=from_inputs is not None, DT=dt, PREC=prec,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
        with on_side(2):
            cfg = TUNING["scan"]
            bv = _block(cfg["BV"], d_v, d_k)
            sprec = "ieee" if w.dtype == torch.float32 else cfg["precision"]
            _scan_kernel[(triton.cdiv(d_v, bv), n_seq * h)](
                seg_m, seg_b, h0, ht_, cu, firsts, t, length,
                H=h, K=d_k, V=d_v, BK=bk, BV=bv, BKK=min(cfg["BKK"], bk), USE_H0=initial_state is not None,
                STORE_HT=ht is not None, IS_VARLEN=varlen, SPREC=sprec, num_warps=cfg["num_warps"],
            )
    if prepare is not None:
        prepare(split, triton.cdiv(t, CHUNK))
    if side is not None:
        main.wait_stream(side)
    cfg = TUNING[pass3]
    bv = _block(cfg["BV"], d_v, d_k)
    if out is None:
        q = qg = aqk = o = w  # any pointer: not read
        k = k_in
        scale = 1.0
    else:
        q, k, qg, aqk, o, scale = out
        states = o  # not written
    if n_slots > 0:
        launch_fitting(
            _segment_state_kernel, (triton.cdiv(d_v, bv), n_slots, h),
            w, u, kd, gcum, seg_b, states, vn, ht_, q, k, qg if qg is not None else o,
            aqk if aqk is not None else o, o, xa, v_in, beta, cu, table, chunk_offsets, scale, t, length,
            n_seg,
            H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BK=bk, BV=bv, GATE=gate, STORE_HT=ht is not None,
            IS_VARLEN=varlen, OUTPUT=out is not None, QG=qg is not None, FROM_INPUTS=from_inputs is not None,
            DT=dt, PREC=prec,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )


__all__ = ["TUNING", "segment_length", "state_pass"]
