"""An absorbed MLA layer's whole decode-step attention in ONE Triton launch (batch-1 decode's chain).

Between its projections (GEMVs) and its output projection, the fused decode step of an ``M`` layer
(:class:`attnlab.layers.mla.MultiHeadLatentAttention`, absorbed form: DeepSeek-V2 §2.1.3) ran four
launches: :func:`attnlab.kernels.latent_cache.latent_write` (latent norm, RoPE, cache write, absorbed
query ``[W_UK^T q_nope | rope(q_pe)]``), the split attention over the latent cache and its combine
(:func:`attnlab.kernels.sparse.softmax_decode`), and ``W_UV o_lat``
(:func:`attnlab.kernels.absorb.unabsorb_o`). At batch 1 each costs ~2-4 µs of launch, DRAM round trip
and drain for well under a microsecond of work (an ncu report of the 4K split kernel: its programs
active ~3.4 of its 8.2 µs); benchmarks/decode_timeline.py put the chain at 15.6 µs a layer.

Here the ``B · NS`` programs of one launch (NS programs per batch row, all resident: the launcher keeps
the grid within the SMs) do the same work in three phases that meet at row barriers (atomics on a
per-row counter, as the fused top-k's ``_row_sync``) instead of kernel boundaries:

1. latent_write's programs as work items, spread over the row's programs (``_latent_write_program``:
   the same code, so the same numerics): the norm, RoPE and cache store of the new latent row, the
   q_pe RoPE and the absorbed query per head, into a [B, H, R + dr] scratch;
2. the split attention: program s attends over its slots (``per_split`` of them, the new token
   included) for all H heads and stores float32 partials (normalised o and base-2 log-sum-exp), as
   ``_latent_attn_fwd`` with SPLIT_OUT does, with the same online softmax;
3. (a) the combine as items (head, BC latent columns) into o_lat (rounded to the query's dtype, as the
   combine writes it), then (b) ``W_UV o_lat`` as items (head, BV value rows), float32 sums rounded
   once (as unabsorb_o).

So three barriers replace three kernel boundaries. Before its PDL wait each program asks L2 for its
share of W_UK / W_UV and for its first latent blocks (``cp.async.bulk.prefetch.L2``), so the weight
tiles of phases 1 and 3 and the first key rows come from L2.

The per-row counter only grows (3·NS arrivals a launch; no reset, so no departure atomic): a barrier's
target is computed from the row's first arrival. It is one int64 per row per (device, B, NS), shared by
the layers' launches, which run one after another on a stream (as latent_write's tickets: not for
concurrent launches of the same shape on two streams). The token is counted (``lengths += 1``) in
phase 3 by the row's first program, after every program has read the old length.

Measured (H100 80GB HBM3, 2026-11-27, the ~1B deepseek-v3 step in a CUDA graph at 4K, interleaved,
best of 2; benchmarks/RESULTS.md, "Twenty-first session"): correct (GPU tests with 5-128 programs a row
at real barriers, CUDA-graph replays), but SLOWER, so ``ENABLED`` is off: 1.078 ms a token against
0.882 with the four launches (kimi-linear 0.897 vs 0.854). The timeline has the launch at 27.8 µs
exposed a layer against the four's 15.6; ncu (alone, 33 programs at 4,104 slots) 31.9 µs with every
program active throughout: each program's work items run one after another, every one a dependent
L2 / DRAM round trip, where the four launches run each item in its own program at once. 132
programs a row (MIN_PROGRAMS; one item each) gave 0.976 ms; without PDL, with 8 warps or without the
weights' L2 requests it was slower still. What would have to change: items loaded before the waits
(as the separate kernels' weight tiles are), and barriers cheaper than the ~2 µs each that this
suggests (not measured alone).

Under ``TRITON_INTERPRET=1`` programs run one after another, so a row is one program (a barrier
there is its own arrival); ``phases`` (tests) runs the phases as separate launches instead, so the
work items' distribution over NS > 1 programs is checked there too.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..layers.mla import MLACache, MultiHeadLatentAttention
from ._common import l2_prefetch, launch_fitting, output_buffer, reused_zeros
from ._pdl import launch_options, use_pdl
from .absorb import _round
from .latent_cache import _check, _latent_write_program, _rope_args, _w_uk
from .latent_cache import num_warps as _write_warps
from .sparse import _dot_lowp, _mm, _n_splits, _num_sms, _online_softmax, _precision, _row_sync

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# True (or ``ATTNLAB_MLA_ONE_LAUNCH=1``): the fused decode step takes this kernel for its M layers
# (usable()). Off by default: SLOWER than the four launches it replaces on the H100 (module docstring).
ENABLED = os.environ.get("ATTNLAB_MLA_ONE_LAUNCH", "0") == "1"
POISON_OUTPUTS = False  # tests: fill every output buffer with NaN first, so an unwritten element fails
LOG2E = 1.4426950408889634
# The attention phase's launch shape: sparse.TUNING["decode_row"]'s (64-slot blocks, 3 stages, 4
# warps, up to 128 splits, the first 4 blocks asked of L2 before the wait).
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3
MAX_SPLITS = 128
PF_BLOCKS = 4
MAX_HEADS = 32  # usable(): more heads per latent (DeepSeek-V3's 128 on one GPU) take the four launches
# Experiment knobs (benchmarks/decode_ab.py): at least this many programs per row (those past the
# attention's splits attend to nothing and only take work items); launch with PDL (early, beside the
# kernel before) or not; ask L2 for W_UK / W_UV before the wait
MIN_PROGRAMS = 0
PDL_EARLY = True
PREFETCH_WEIGHTS = True
BC = 64  # latent columns per combine item
BV = 16  # value rows per W_UV item
ALL_PHASES = 7  # the kernel's PHASES for the production launch (bits 1, 2, 4: the three phases)


@triton.jit
def _first_barrier(CTR, N_SPLIT):
    """The row's first barrier of this launch: arrive (after a CTA barrier, acq_rel), then wait for the
    row's other programs. Returns the launch's base count (the counter before any arrival of this
    launch: the counter grows by 3·N_SPLIT a launch and no arrival of the next launch can come before
    this one has ended)."""
    tl.debug_barrier()  # every thread's stores are issued before the arrival
    old = tl.atomic_add(CTR, 1, sem="acq_rel", scope="gpu")
    base = old - old % (3 * N_SPLIT)
    seen = old + 1
    while seen < base + N_SPLIT:
        seen = tl.atomic_add(CTR, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    return base


@triton.jit
def _attend_split(QABS, LATENT, OP, LP, b, s, nv, per_split, N_SPLIT, sm_scale, stride_cache_b,
                  stride_cache_s, H: tl.constexpr, R: tl.constexpr, DR: tl.constexpr, BR: tl.constexpr,
                  BDR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                  INTERP: tl.constexpr):
    """Phase 2: row b's slots [s·per_split, +per_split) below nv, all H heads (in BLOCK_H blocks): the
    absorbed query [q_lat | q_pe] against the latent rows [c_kv | k_pe], values c_kv; float32 partials
    OP[(b·H + h)·N_SPLIT + s] (o normalised, R columns) and LP (base-2 log-sum-exp, -inf when empty)."""
    lo = s * per_split
    hi = tl.minimum(lo + per_split, nv)
    r = tl.arange(0, BR)
    j = tl.arange(0, BDR)
    k_base = LATENT + b * stride_cache_b
    for h0 in tl.static_range(0, H, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        h_ok = heads < H
        q_rows = QABS + (b * H + heads[:, None]) * (R + DR)
        q1 = tl.load(q_rows + r[None, :], mask=h_ok[:, None] & (r < R)[None, :], other=0.0)
        if DR > 0:
            q2 = tl.load(q_rows + R + j[None, :], mask=h_ok[:, None] & (j < DR)[None, :], other=0.0)
        m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BR], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            slots = start + tl.arange(0, BLOCK_N)
            valid = slots < hi
            k_rows = k_base + slots[:, None].to(tl.int64) * stride_cache_s
            k1 = tl.load(k_rows + r[None, :], mask=valid[:, None] & (r < R)[None, :], other=0.0)
            s1 = _mm(q1, tl.trans(k1), PREC, INTERP)  # (BLOCK_H, BLOCK_N)
            s2 = s1  # unused without a rope part
            if DR > 0:
                k2 = tl.load(k_rows + R + j[None, :], mask=valid[:, None] & (j < DR)[None, :], other=0.0)
                s2 = _mm(q2, tl.trans(k2), PREC, INTERP)
            p, m_i, l_i, acc = _online_softmax(s1, s2, DR > 0, valid, sm_scale, m_i, l_i, acc, k1.dtype)
            acc += _dot_lowp(p, k1, PREC, INTERP)  # the value is the key's first R columns
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        row = (b * H + heads) * N_SPLIT + s
        tl.store(OP + row[:, None] * R + r[None, :], o, mask=h_ok[:, None] & (r < R)[None, :])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(LP + row, lse, mask=h_ok)


@triton.jit
def _combine_item(OP, LP, OLAT, b, j, N_SPLIT, H: tl.constexpr, R: tl.constexpr, BNS: tl.constexpr,
                  BC: tl.constexpr):
    """Phase 3a, item j = (head h, column block c): o_lat[b, h, c·BC + ...] = Σ_i 2^(lse_i − lse) o_i over
    the row's N_SPLIT partials (empty splits weigh 0 and are not read), in OLAT's dtype."""
    n_cb: tl.constexpr = (R + BC - 1) // BC
    h = j // n_cb
    cols = (j % n_cb) * BC + tl.arange(0, BC)
    sp = tl.arange(0, BNS)
    rows = (b * H + h) * N_SPLIT + sp
    lse_i = tl.load(LP + rows, mask=sp < N_SPLIT, other=float("-inf"))
    m = tl.max(lse_i, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse_i - m)
    total = tl.sum(w, 0)
    part = tl.load(OP + rows[:, None] * R + cols[None, :], mask=(w > 0)[:, None] & (cols < R)[None, :],
                   other=0.0)
    o = tl.sum(w[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
    tl.store(OLAT + (b * H + h) * R + cols, o.to(OLAT.dtype.element_ty), mask=cols < R)


@triton.jit
def _unabsorb_item(OLAT, W_UV, O, b, j, stride_uvh, stride_uvv, H: tl.constexpr, R: tl.constexpr,
                   DV: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, INTERP: tl.constexpr):
    """Phase 3b, item j = (head h, value block): O[b, h, v] = Σ_r o_lat[b, h, r] · W_UV[h, v, r], float32
    sums, one rounding (as attnlab.kernels.absorb.unabsorb_o)."""
    n_vb: tl.constexpr = (DV + BV - 1) // BV
    h = j // n_vb
    v = (j % n_vb) * BV + tl.arange(0, BV)
    r = tl.arange(0, BR)
    w = tl.load(W_UV + h.to(tl.int64) * stride_uvh + v[:, None] * stride_uvv + r[None, :],
                mask=(v < DV)[:, None] & (r < R)[None, :], other=0.0)
    x = tl.load(OLAT + (b * H + h) * R + r, mask=r < R, other=0.0)
    o = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(O + (b * H + h) * DV + v, _round(o, O.dtype.element_ty, INTERP), mask=v < DV)


@triton.jit
def _mla_step_kernel(
    Q, KV, LENGTHS, COS, SIN, FREQ, PARTNER_Q, PARTNER_K, NORM_W, QABS, LATENT, W_UK,
    OP, LP, OLAT, W_UV, O, CTR,
    stride_qb, stride_wh, stride_wd, stride_kvb, stride_cb, stride_cache_b, stride_cache_s,
    stride_uvh, stride_uvv, S, eps, factor, sm_scale, per_split, N_SPLIT,
    H: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, R: tl.constexpr, DV: tl.constexpr,
    BR: tl.constexpr, BDR: tl.constexpr, NQ: tl.constexpr, BD: tl.constexpr, BLOCK_R: tl.constexpr,
    N_ABSORB: tl.constexpr, ROPE: tl.constexpr, TABLES: tl.constexpr, ZERO_CENTERED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BNS: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr,
    PHASES: tl.constexpr, COUNT: tl.constexpr, PF_SLOTS: tl.constexpr, PF_WEIGHTS: tl.constexpr,
    PREC: tl.constexpr, PDL: tl.constexpr, INTERP: tl.constexpr,
):
    """Program p = (row b, split s) of B · N_SPLIT: the phases in PHASES (bits 1, 2, 4; 7 in one
    launch, with row barriers between them). Work items j of a phase go to programs j mod N_SPLIT."""
    if PDL:  # the next kernel may launch once every program has started (all are resident then)
        gdc_launch_dependents()
    pid = tl.program_id(0)
    b = (pid // N_SPLIT).to(tl.int64)
    s = pid % N_SPLIT
    if PDL:
        if PF_WEIGHTS:  # W_UK[h] and W_UV[h] (dn and dv contiguous rows of R) for phases 1 and 3
            elt: tl.constexpr = W_UK.dtype.element_ty.primitive_bitwidth // 8
            for i in range(s, 2 * H, N_SPLIT):
                if i < H:
                    l2_prefetch(W_UK + i.to(tl.int64) * stride_wh, DN * R * elt, i < H)
                else:
                    l2_prefetch(W_UV + (i - H).to(tl.int64) * stride_uvh, DV * R * elt, i >= H)
        if PF_SLOTS > 0:  # this split's first latent rows (those that exist before the new one)
            pf_lo = s * per_split
            pf_nv = tl.minimum(tl.load(LENGTHS + b).to(tl.int32), S)
            pf_hi = tl.minimum(tl.minimum(pf_lo + per_split, pf_lo + PF_SLOTS), pf_nv)
            row_bytes = stride_cache_s * (LATENT.dtype.element_ty.primitive_bitwidth // 8)
            l2_prefetch(LATENT + b * stride_cache_b + pf_lo.to(tl.int64) * stride_cache_s,
                        tl.maximum(pf_hi - pf_lo, 0) * row_bytes, pf_hi > pf_lo)
        gdc_wait()
    pos = tl.load(LENGTHS + b).to(tl.int64)  # the old length: every program reads it before barrier 1
    ctr = CTR + b
    base = tl.zeros([], dtype=tl.int64)
    if PHASES & 1:  # latent_write's H + 1 programs and its absorb programs, as items
        for j in range(s, H + 1 + N_ABSORB, N_SPLIT):
            _latent_write_program(
                b, tl.cast(j, tl.int32), Q, KV, Q, LENGTHS, COS, SIN, FREQ, PARTNER_Q, PARTNER_K, NORM_W,
                QABS, LATENT, Q, Q, Q, Q, Q, LENGTHS, W_UK,
                stride_qb, stride_wh, stride_wd, stride_kvb, 0, 0, stride_cb,
                stride_cache_b, stride_cache_s, 0, 0, S, eps, factor, 0.0, 1.0,
                H, DN, DR, R, BR, BDR, NQ, False, 0, 0, 1, 1, ROPE, TABLES, ZERO_CENTERED, False, False,
                H + 1, True, BD, BLOCK_R, INTERP)
    if PHASES == 7:  # all three: meet at the row's barriers
        base = _first_barrier(ctr, N_SPLIT)
    if PHASES & 2:
        nv = tl.minimum(tl.maximum(pos + 1, 0), S).to(tl.int32)  # the new token counted
        _attend_split(QABS, LATENT, OP, LP, b, s, nv, per_split, N_SPLIT, sm_scale, stride_cache_b,
                      stride_cache_s, H, R, DR, BR, BDR, BLOCK_H, BLOCK_N, PREC, INTERP)
    if PHASES == 7:  # all three: meet at the row's barriers
        _row_sync(ctr, base + 2 * N_SPLIT)
    if PHASES & 4:
        for j in range(s, H * ((R + BC - 1) // BC), N_SPLIT):
            _combine_item(OP, LP, OLAT, b, tl.cast(j, tl.int32), N_SPLIT, H, R, BNS, BC)
    if PHASES == 7:  # all three: meet at the row's barriers
        _row_sync(ctr, base + 3 * N_SPLIT)
    if PHASES & 4:
        for j in range(s, H * ((DV + BV - 1) // BV), N_SPLIT):
            _unabsorb_item(OLAT, W_UV, O, b, tl.cast(j, tl.int32), stride_uvh, stride_uvv, H, R, DV, BR, BV,
                           INTERP)
        if COUNT:
            if s == 0:  # every program of the row read the old length before barrier 1
                tl.store(LENGTHS + b, (pos + 1).to(LENGTHS.dtype.element_ty))


_COUNTERS: dict[tuple, torch.Tensor] = {}  # (device, B, NS) -> int64 [B], growing barrier counters


def n_splits(batch: int, n_slots: int, device: torch.device) -> int:
    """Programs per row (NS): the split attention's count for a batch-1 row (sparse's decode_row
    policy: up to MAX_SPLITS splits of at least one block), at most SMs // batch so that the whole
    grid is resident (the barriers need it); 1 under the interpreter."""
    if _INTERPRET and device.type != "cuda":
        return 1
    sms = _num_sms(device)
    splits = min(_n_splits(batch, n_slots, BLOCK_N, device, min_steps=1), MAX_SPLITS, max(1, sms // batch))
    per_split = triton.cdiv(triton.cdiv(max(1, n_slots), splits), BLOCK_N) * BLOCK_N
    return triton.cdiv(max(1, n_slots), per_split)


def usable(mla, q: torch.Tensor, cache) -> bool:
    """Whether the fused decode step gives this M layer's step to :func:`mla_step`: ENABLED, a dense
    MLA cache in q's dtype, W_UK / W_UV in q's dtype, at most MAX_HEADS heads (one [heads, R] float32
    accumulator per program), a batch of at most one row per SM, on a CUDA device in bf16 / fp16 (or
    CPU tensors under the interpreter)."""
    if not ENABLED or type(cache) is not MLACache or not isinstance(mla, MultiHeadLatentAttention):
        return False
    if cache.latent.dtype != q.dtype or mla.kv_b_proj.weight.dtype != q.dtype or mla.n_heads > MAX_HEADS:
        return False
    if not cache.lengths.is_contiguous():
        return False
    if q.device.type == "cuda":  # float32: tiles twice the bytes, past the shared memory at this shape
        return q.dtype != torch.float32 and q.shape[0] <= _num_sms(q.device)
    return _INTERPRET


def _launch(q, kv, lengths, latent, cos, sin, freq, partner_q, partner_k, norm_weight, w_uk, w_uv,
            n_heads: int, nope_dim: int, rope_dim: int, eps: float, factor: float, zero_centered: bool,
            sm_scale: float, phases: tuple[int, ...] = (ALL_PHASES,),
            splits: int | None = None) -> torch.Tensor:
    """Launch the kernel once per entry of ``phases`` (the production step: one launch of all three;
    the tests: (1, 2, 4), the same buffers across the launches) with ``splits`` programs per row
    (default :func:`n_splits`); returns o [B, H, dv]."""
    dr, H, dn = rope_dim, n_heads, nope_dim
    B, S, R = q.shape[0], latent.shape[1], latent.shape[-1] - dr
    dv = w_uv.shape[1]
    dev = q.device
    NS = splits or n_splits(B, S, dev)
    per_split = triton.cdiv(triton.cdiv(max(1, S), NS), BLOCK_N) * BLOCK_N
    if not splits and dev.type == "cuda":
        NS = max(NS, min(MIN_PROGRAMS, _num_sms(dev) // B))
    empty = lambda *shape, dtype: output_buffer(shape, dtype, dev, POISON_OUTPUTS)  # noqa: E731
    q_abs = empty(B, H, R + dr, dtype=q.dtype)
    op = empty(B * H, NS, R, dtype=torch.float32)
    lp = empty(B * H, NS, dtype=torch.float32)
    o_lat = empty(B, H, R, dtype=q.dtype)
    o = empty(B, H, dv, dtype=q.dtype)
    ctr = reused_zeros(_COUNTERS, (dev, B, NS), B, torch.int64, dev)
    tables = cos is not None
    rope = partner_q is not None
    stride_cb = cos.stride(0) if tables and cos.shape[0] > 1 else 0
    BR = triton.next_power_of_2(R)
    BD = triton.next_power_of_2(dn)
    block_r = max(16, min(64, 8192 // BD, BR))  # latent_write's absorb tile
    pdl = use_pdl(dev)
    elt = q.element_size()
    pf_weights = (pdl and PREFETCH_WEIGHTS and (dn * R * elt) % 16 == 0 and (dv * R * elt) % 16 == 0
                  and w_uk.stride(1) == R and w_uv.stride(1) == R and (w_uk.stride(0) * elt) % 16 == 0
                  and w_uk.data_ptr() % 16 == 0 and w_uv.data_ptr() % 16 == 0)
    pf_slots = PF_BLOCKS * BLOCK_N if (pdl and latent.data_ptr() % 16 == 0
                                       and (latent.stride(1) * elt) % 16 == 0) else 0
    for phase in phases:
        launch_fitting(  # fewer pipeline stages where the shared memory does not hold three
            _mla_step_kernel, (B * NS,), q, kv, lengths, cos if tables else q, sin if tables else q,
            freq if freq is not None else q,
            partner_q if rope else q, partner_k if rope else q, norm_weight, q_abs, latent, w_uk,
            op, lp, o_lat, w_uv, o, ctr,
            q.stride(0), w_uk.stride(0), w_uk.stride(1), kv.stride(0), stride_cb, latent.stride(0),
            latent.stride(1),
            w_uv.stride(0), w_uv.stride(1), S, eps, factor, sm_scale * LOG2E, per_split, NS,
            H=H, DN=dn, DR=dr, R=R, DV=dv, BR=BR, BDR=max(16, triton.next_power_of_2(max(dr, 1))),
            NQ=H * (dn + dr), BD=BD, BLOCK_R=block_r, N_ABSORB=H * triton.cdiv(R, block_r), ROPE=rope,
            TABLES=tables, ZERO_CENTERED=zero_centered, BLOCK_H=min(64, max(16, triton.next_power_of_2(H))),
            BLOCK_N=BLOCK_N, BNS=max(2, triton.next_power_of_2(NS)), BC=min(BC, BR), BV=BV, PHASES=phase,
            COUNT=True, PF_SLOTS=pf_slots, PF_WEIGHTS=pf_weights, PREC=_precision(q.dtype), PDL=pdl,
            INTERP=_INTERPRET, num_warps=max(NUM_WARPS, _write_warps(BR)), num_stages=NUM_STAGES,
            **launch_options(pdl and PDL_EARLY),
        )
    return o


@torch.library.custom_op("attnlab::mla_step", mutates_args=("latent", "lengths"))
def _mla_step_op(
    q: torch.Tensor, kv: torch.Tensor, lengths: torch.Tensor, latent: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, freq: torch.Tensor | None,
    partner_q: torch.Tensor | None, partner_k: torch.Tensor | None, norm_weight: torch.Tensor,
    w_uk: torch.Tensor, w_uv: torch.Tensor, n_heads: int, nope_dim: int, rope_dim: int, eps: float,
    factor: float, zero_centered: bool, sm_scale: float,
) -> torch.Tensor:
    return _launch(q, kv, lengths, latent, cos, sin, freq, partner_q, partner_k, norm_weight, w_uk, w_uv,
                   n_heads, nope_dim, rope_dim, eps, factor, zero_centered, sm_scale)


@_mla_step_op.register_fake
def _(q, kv, lengths, latent, cos, sin, freq, partner_q, partner_k, norm_weight, w_uk, w_uv, n_heads,
      nope_dim, rope_dim, eps, factor, zero_centered, sm_scale):
    return q.new_empty(q.shape[0], n_heads, w_uv.shape[1])


def _w_uv(mla: MultiHeadLatentAttention) -> torch.Tensor:
    """W_UV [H, dv, R]: a view of kv_b_proj.weight (R contiguous)."""
    H, dn, R = mla.n_heads, mla.nope_dim, mla.kv_lora_rank
    return mla.kv_b_proj.weight.detach().view(H, dn + mla.v_head_dim, R)[:, dn:]


def _arguments(mla: MultiHeadLatentAttention, q: torch.Tensor, kv: torch.Tensor, cache: MLACache,
               rotation) -> tuple:
    """The kernel's tensors and sizes after the checks (ValueError naming what is wrong)."""
    _check(mla, q, kv, None, cache, rotation)
    if type(cache) is not MLACache:
        raise ValueError(f"cache: mla_step takes a dense MLACache, got {type(cache).__name__}")
    for name, t in (("q", q), ("kv", kv), ("cache.latent", cache.latent)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got strides {t.stride()}")
    if cache.latent.dtype != q.dtype:
        raise ValueError(f"cache.latent: dtype {cache.latent.dtype} differs from q's {q.dtype}")
    if not cache.lengths.is_contiguous():
        raise ValueError(f"cache.lengths: must be contiguous, got strides {cache.lengths.stride()}")
    w_uk, w_uv = _w_uk(mla), _w_uv(mla)
    if w_uk.dtype != q.dtype or w_uk.device != q.device:
        raise ValueError(f"mla: kv_b_proj.weight is {w_uk.dtype} on {w_uk.device}; mla_step needs q's dtype "
                         f"and device ({q.dtype} on {q.device})")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"q: mla_step runs a Triton kernel on CUDA tensors (or CPU ones under "
                         f"TRITON_INTERPRET=1), got device {q.device}")
    cos, sin, freq, partner_q, partner_k, factor = _rope_args(mla, q, rotation)
    norm = mla.kv_a_norm.weight.detach()
    return (q, kv, cache.lengths, cache.latent, cos, sin, freq, partner_q, partner_k, norm.contiguous(), w_uk,
            w_uv, mla.n_heads, mla.nope_dim, mla.rope_dim, float(mla.kv_a_norm.eps), factor,
            bool(mla.kv_a_norm.zero_centered), float(mla.scale))


def mla_step(
    mla: MultiHeadLatentAttention,
    q: torch.Tensor,
    kv: torch.Tensor,
    cache: MLACache,
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """An absorbed MLA layer's decode-step attention, from its projections to W_UV's output, in one launch.

    Args:
        mla: the :class:`MultiHeadLatentAttention` (not DSA) whose sizes, kv_a_norm, RoPE, scale and
            ``kv_b_proj`` (W_UK, W_UV) apply.
        q: [B, H·(dn + dr)] the query row (unrotated, per head [nope | rope]); kv: [B, R + dr] the
            row's [c_kv | k_pe], unnormed and unrotated (as
            :func:`attnlab.kernels.latent_cache.latent_write` takes them).
        cache: the layer's MLACache in q's dtype. Row b's new latent goes to slot ``cache.lengths[b]``
            (not written where that is outside the cache, as latent_write), the attention covers the
            slots below lengths[b] + 1 (the new token included), and ``cache.lengths`` is incremented.
        rotation: as latent_write's (``mla.rotation(cache.lengths[:, None])``), or None.

    Returns:
        o [B, H, dv] in q's dtype: ``W_UV o_lat`` per head, the input of ``o_proj``: what
        latent_write + softmax_decode + unabsorb_o return, with the same roundings (the absorbed query
        and o_lat in q's dtype, float32 softmax and sums). Inference only.
    """
    return _mla_step_op(*_arguments(mla, q, kv, cache, rotation))


def mla_step_phases(mla, q, kv, cache, rotation=None, splits: int = 1) -> torch.Tensor:
    """:func:`mla_step` as three launches (one phase each, no barriers) with ``splits`` programs per row:
    for the tests, where the interpreter runs programs one after another (a barrier among several
    programs would wait forever there)."""
    return _launch(*_arguments(mla, q, kv, cache, rotation), phases=(1, 2, 4), splits=splits)


__all__ = ["mla_step", "mla_step_phases", "n_splits", "usable"]
