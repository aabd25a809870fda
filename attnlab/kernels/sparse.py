"""Triton kernels for DeepSeek Sparse Attention and MLA absorbed decode.

The ops in :mod:`attnlab.ops` call these through ``mode="triton"`` (and ``"auto"`` on CUDA);
each public function has the op's signature minus ``mode``:

- :func:`sparse_attention` — attention over selected key rows (``indices`` [B, T, topk], -1 = empty),
  forward and backward, prefill (T queries) and decode (T = 1).
- :func:`softmax_decode` — one query token per row over a dense cache with per-row ``n_valid``
  (MLA absorbed decode: H_kv = 1, D = 576, D_v = 512), split-K over the sequence with a second
  reduction launch (flash-decoding); :func:`paged_decode` is the same over a paged cache with a
  block table; :func:`latent_causal_attention` is its T-query causal form (dense absorbed-MLA
  prefill over the cache, the baseline DSA is measured against).
- :func:`dsa_index_scores` — the lightning indexer ``I[b,t,s] = Σ_j w[b,t,j] relu(q[b,t,j]·k[b,s])``,
  bf16 operands, or FP8 e4m3 operands with per-row scales (:func:`quantize_fp8_rows`).
- :func:`dsa_topk` — ``attnlab.ops.dsa_topk`` (exact, ties to the earlier position) as a radix
  select over many programs per row, for decode at 1M (the torch paths sort or top-k whole rows).

One kernel, ``_latent_attn_fwd``, serves all three attention entry points; a constexpr picks how a
slot becomes a cache row (dense position, index list, or block table). Design (FlashMLA and the
tilelang ``sparse_mla_fwd`` example, DeepSeek 2025, do the same): a program owns one query token
and a block of up to ``BLOCK_H`` query heads of one kv head, so every gathered latent row is
loaded ONCE and multiplied against all of those heads on the tensor cores. With MLA's absorbed
form (v = k[..., :D_v]) the value tile is the first D_v columns of the key tile already in
shared memory: one load per row, 1152 bytes at bf16. The key dims are split into a power-of-two main
part (the D_v value columns) and a tail (the 64 RoPE columns). Softmax is online (base 2, running
max and sum), with a finite initial max so an all-empty block never makes 0 * inf. When there are
too few (query, head-block) programs to fill the GPU (decode), slots are split across programs
that write float32 partial outputs and log-sum-exps, and ``_combine`` merges them.

Backward (:func:`sparse_attention` under autograd) is a Triton kernel too: a program per (query,
head block) recomputes p from the saved log-sum-exp, accumulates dq in registers and adds the
row gradients into a float32 buffer of the full key size with atomics (rows are shared between
queries); for MLA (v = k[..., :D_v]) the value gradient is added to the key gradient of the same
columns first, so there is one atomic per latent element. Correct; deterministic only up to
float32 addition order. The indexer has no backward here (the op's torch path has one).

How the forward spends its time (MLA: 64 heads x 576 dims per program). Every wgmma reads its
[64, 16] q operand from shared memory (128 B/clk per SM); with few slots per block those reads,
not the tensor cores, bound q·k. Triton also lays the q·k dot out for a FlashAttention-style chain
(all warps along M), so with 64 heads and 2 warpgroups both compute the same logits. The default
shape is 64 slots per block with q·k hidden from that chain analysis (SHARE_QK, see the kernel),
each warpgroup computing half the columns once; lazy rescaling skips most accumulator rescales.
At 128 heads absorbed MLA decode sits at the H100's ridge point (~242 FLOP per latent byte), so
its bandwidth is bounded by the tensor cores; at 16 heads (8-way tensor parallel) it is memory bound.

Other exact top-k paths in torch: ``attnlab.ops.dsa_topk(mode="torch")`` sorts int64 keys;
:func:`dsa_topk_threshold` (one float32 topk for the k-th score, then elementwise tie filling) and
:func:`dsa_topk_chunked` (two exact stages) return the same indices.

The kernels are tested under ``TRITON_INTERPRET=1`` on the CPU (tests/test_kernels_sparse.py) and
compiled for sm_90 here (``benchmarks/sparse_mla_gpu.py --compile-report``: registers, spills,
wgmma); GPU tests are marked ``gpu`` and timings come from ``benchmarks/sparse_mla_gpu.py``
(benchmarks/RESULTS.md has the last H100 run, made before the 64-slot / SHARE_QK / radix top-k
changes).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._checks import check_same_device, check_tensor
from ._common import l2_prefetch, output_buffer, zero_share
from ._pdl import launch_options, use_pdl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
POISON_OUTPUTS = False  # tests set this: buffers the kernels must fill start as NaN, not garbage
LOG2E = 1.4426950408889634
RESCALE_SLACK: tl.constexpr = tl.constexpr(8.0)  # log2 units: the running max may lag by 2^8

# Launch parameters; the benchmark may override them (benchmarks/sparse_mla_gpu.py --sweep).
# Forward ("sparse", "decode") launch shapes: the winners of `benchmarks/sparse_mla_gpu.py
# --decode-only --sweep` on an H200 with Triton 3.6 (2026-11-26; decode B=32, 32K latents, 128
# heads: 1.37 ms vs 2.24 ms for the earlier 16-slot shape; sparse prefill T=4096 over 64K latents:
# 12.8 ms vs 23.6 ms). The SHARE_QK=1 variants (q·k computed once per warpgroup pair through an
# always-true runtime branch, see _latent_attn_fwd) were designed from the sm_90 compile report of
# Triton 3.9 but do not build with Triton 3.6 ("PassManager::run failed" in TritonGPUPipeline),
# so they are not the default; the sweep still tries them. float32 inputs take exact float32
# products (no tensor cores), so the ops' "auto" mode keeps float32 on the torch path.
TUNING: dict[str, dict[str, int]] = {
    "sparse": {"BLOCK_H": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "DVB": 1, "SHARE_QK": 0},
    "decode": {"BLOCK_H": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3, "DVB": 1, "SHARE_QK": 0},
    "sparse_bwd": {"BLOCK_H": 32, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2},
    # float32 inputs (mode="triton" only; exact products, no tensor cores) on a GPU: tiles twice the
    # bytes, so a small shape (74 KB of shared memory at MLA dims; the bf16 one would need 311 KB)
    "fp32": {"BLOCK_H": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1, "DVB": 1, "SHARE_QK": 0},
    # the indexer over a prefill chunk (H200 sweep)
    "index": {"BLOCK_T": 4, "BLOCK_S": 64, "S_CHUNK": 8192, "num_warps": 8, "num_stages": 2},
    # the indexer for one query row per batch row (decode): more, lighter programs. H200, 1M keys,
    # 64 heads of 128: 0.082 ms (3.3 TB/s of keys read) vs 0.174 ms with the prefill shape
    "index_decode": {"BLOCK_T": 1, "BLOCK_S": 64, "S_CHUNK": 4096, "num_warps": 4, "num_stages": 4},
    # dense decode with few query heads per latent (G <= 32, e.g. DeepSeek-V3's 128 heads over
    # 8- or 4-way tensor parallelism): memory-bound, so narrow head blocks and 4 warps. H200, B = 32,
    # 32K latents: 16 heads 95-96% of copy bandwidth (101% at 128K), 32 heads 73%; the 64-head
    # shape gave 70% and 40%
    # MIN_STEPS / MAX_SPLITS (optional keys; defaults 4 and no cap): a batch-1 row splits into up to
    # 128 splits of as little as one block. H100, 2026-11-26, B = 1, 16 heads, 576-dim latents, bf16
    # (split + combine in a CUDA graph): 4K slots 13.7 us (16 splits, the old policy) -> 12.2 (128);
    # 32K 33.8 -> 25.4 (128); 128K 77.2 (256) -> 67.4 (128)
    "decode_narrow": {"BLOCK_H": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "DVB": 1, "SHARE_QK": 0,
                      "MIN_STEPS": 1, "MAX_SPLITS": 128},
    # decode_narrow's case for a single query row (B * T = 1: batch-1 decode), with PDL (optional
    # keys, default 0: "PDL" 1 launches it and its combine with PDL; "PF_BLOCKS" n > 0 has each
    # split ask L2 for its first n blocks of key rows before it waits, _latent_attn_fwd). H100,
    # 2026-11-27, the ~1B deepseek-v3 decode step in a CUDA graph (interleaved, best of 2-3, ms at
    # 4K / 32K / 128K): decode_narrow's shape 0.925 / 1.130 / 1.759; with PDL and PF_BLOCKS 1 0.907
    # at 4K but 1.147 at 32K; BLOCK_N 64 alone 1.129 at 32K (0.963 at 4K, a session earlier); BLOCK_N
    # 64, PDL and PF_BLOCKS 4 0.899 / 1.063 / 1.697 (PF_BLOCKS 0 1.074 / 1.730; 8 warps or 256 splits
    # slower); kimi-linear (4 M layers) 0.866 / 0.904 -> 0.866 / 0.897
    "decode_row": {"BLOCK_H": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "DVB": 1, "SHARE_QK": 0,
                   "MIN_STEPS": 1, "MAX_SPLITS": 128, "PDL": 1, "PF_BLOCKS": 4},
}
# Tried in order after TUNING[...] when a launch shape does not compile (out of shared memory or
# registers on another GPU or Triton version): the previous default (16 slots, 3 stages, 131 KB).
FALLBACK: list[dict[str, int]] = [
    {"BLOCK_H": 64, "BLOCK_N": 16, "num_warps": 8, "num_stages": 3, "DVB": 1, "SHARE_QK": 0},
]
_FAILED_CONFIGS: set = set()
FORCE_ROW64 = False  # tests: int64 row offsets even for small caches
ALLOW_FALLBACK = True  # the benchmark's sweep turns it off, so a failing shape is not timed as another
# A decode step's sparse attention asks L2 for the first this many bytes of the weights the step reads
# next (``sparse_attention``'s ``prefetch``: the MLP's gate|up), while its latency-bound stretch (top-k,
# attention, combine, W_UV) leaves DRAM idle, in pieces of PREFETCH_NEXT_CHUNK bytes; 0: off.
# Only over caches of at most PREFETCH_NEXT_MAX_ROWS rows. H100, 2026-11-28, the ~1B deepseek-v32
# step, best of 2, ms, off / 12 / 24 / 40 MB (decode_ab_h100_prefetch_mlp.json): 4K 1.0771 / 1.0662 /
# 1.0804 / 1.1136, 32K 1.1796 / 1.1695 / 1.1797 / 1.2020, 128K 1.3671 / 1.3804 / 1.4209 / 1.4538.
PREFETCH_NEXT_BYTES = 12 << 20
PREFETCH_NEXT_CHUNK = 64 << 10
PREFETCH_NEXT_MAX_ROWS = 64 << 10
# dsa_topk's ``prefetch``: the first multi-program pass asks L2 for this many bytes (0: off), over rows
# longer than PREFETCH_NEXT_MAX_ROWS (there the attention asks for none) and at most
# TOPK_PREFETCH_MAX_ROWS. H100, 2026-11-28, the ~1B deepseek-v32 step, best of 2, ms, the attention's 12
# MB (base) vs the top-k's 12 / 24 / 36 MB (decode_ab_h100_prefetch_topk.json): 128K 1.3661 vs 1.3480 /
# 1.3499 / 1.3725; 32K 1.1615 vs 1.2057 / 1.2913 / 1.3847 (there the pass launches while the index
# scores stream their keys from DRAM).
TOPK_PREFETCH_BYTES = 12 << 20
TOPK_PREFETCH_MAX_ROWS = 256 << 10
# Split slots across programs until there are about this many programs per SM.
PROGRAMS_PER_SM = 2
# The split combine's launch (combine_shape): value columns cut for about this many programs per SM
# (0: the earlier fixed shape), each load up to COMBINE_TILE partial elements.
COMBINE_PROGRAMS_PER_SM = 2
COMBINE_TILE = 4096
# The combine loads its splits' lse and partials together when one tile holds them all (_combine's
# ONE_LOAD: one round trip to L2 after the PDL wait instead of two); False: the partials after the lse.
# H100, 2026-11-28, the ~1B step, best of 2, ms, with / without (decode_ab_h100_combine_one_load.json):
# deepseek-v32 4K 1.0789 / 1.0860, 32K 1.1840 / 1.1917, 128K 1.3700 / 1.3786; deepseek-v3 4K 0.8174 /
# 0.8250, 32K 0.9978 / 1.0077, 128K 1.6301 / 1.6388.
COMBINE_ONE_LOAD = True
FP8_MAX = 448.0  # largest finite float8 e4m3fn

_GATHER_DENSE, _GATHER_INDEX, _GATHER_PAGED = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _mm(a, b, PREC: tl.constexpr, INTERP: tl.constexpr):
    """a @ b on the tensor cores in the operands' dtype, fp32 accumulation. Under TRITON_INTERPRET
    (triton 3.9) tl.dot returns garbage for bf16 operands, so there the (already rounded) operands
    are multiplied in float32: same values, the same products, exact in float32."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _dot_lowp(a, b, PREC: tl.constexpr, INTERP: tl.constexpr):
    """a (float32: probabilities or their gradient) rounded to b's dtype, times b (FlashAttention's
    bf16 P·V), fp32 accumulation."""
    return _mm(a.to(b.dtype), b, PREC, INTERP)


@triton.jit
def _online_softmax(s1, s2, HAS_S2: tl.constexpr, valid, sm_scale, m_i, l_i, acc, P_DTYPE: tl.constexpr):
    """One block of base-2 online softmax over logits (s1 + s2) * sm_scale [BLOCK_H, BLOCK_N]
    (valid [BLOCK_N] marks real slots), running max m_i and sum l_i [BLOCK_H], accumulator acc
    [BLOCK_H, BDV] -> (p in P_DTYPE, m_i, l_i, acc); p is rounded to the value dtype for P·V
    (FlashAttention's bf16 P·V). Lazy rescaling (FlashAttention-4): the running max is kept stale
    until some row's max has grown by more than 2^RESCALE_SLACK, so p <= 2^8 (well inside bf16's
    range) and the accumulator is rescaled a few times per row instead of once per block."""
    s = s1 * sm_scale
    if HAS_S2:
        s += s2 * sm_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if tl.max(m_new - m_i, 0) > RESCALE_SLACK:
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    p = tl.exp2(s - m_i[:, None])
    return p.to(P_DTYPE), m_i, l_i + tl.sum(p, 1), acc


@triton.jit
def _prefetch_share(PTR, nbytes, me, n_prog, CHUNK: tl.constexpr):
    """Program ``me`` of ``n_prog`` asks L2 for its CHUNK-byte pieces of the first ``nbytes`` bytes at
    PTR (a bulk prefetch each, from thread 0: l2_prefetch); nbytes and CHUNK multiples of 16."""
    base = PTR.to(tl.pointer_type(tl.int8))
    for off in range(me.to(tl.int64) * CHUNK, nbytes, n_prog.to(tl.int64) * CHUNK):
        l2_prefetch(base + off, tl.minimum(nbytes - off, CHUNK), off >= 0)


@triton.jit
def _latent_attn_fwd(
    Q, K, V, IDX, NVALID, TABLE, O, LSE, OP, LP,
    sm_scale, T, G, N_HBLK, N_SPLIT, n_slots, slots_per_split, n_rows,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ib, stride_it,
    stride_tb,
    stride_ob, stride_ot, stride_oh,
    GATHER: tl.constexpr, PAGE: tl.constexpr,
    DK1: tl.constexpr, BD1: tl.constexpr, DK2: tl.constexpr, BD2: tl.constexpr,
    D_V: tl.constexpr, BDV: tl.constexpr, NUM_DVB: tl.constexpr, V_IS_K: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_OUT: tl.constexpr, PREC: tl.constexpr,
    ROW64: tl.constexpr, SHARE_QK: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr = False,
    PF_SLOTS: tl.constexpr = 0, PF_NEXT=None, pf_next_bytes=0, PF_NEXT_CHUNK: tl.constexpr = 0,
):
    """One program: query token (b, t), kv head hk, query heads hk*G + [hb*BLOCK_H, +BLOCK_H),
    value columns [dvb*BDV, +BDV), slots [split*slots_per_split, +slots_per_split). Writes o
    (normalised, O's dtype) and the base-2 log-sum-exp (+inf for a row with no valid slot), or with
    SPLIT_OUT float32 partials. NUM_DVB > 1 splits the value columns across programs (each recomputes
    q·k): a smaller accumulator for fewer registers, at the price of more tensor-core work.
    PDL (attnlab.kernels._pdl, decode-shaped launches): the next kernel may launch now; everything
    this one reads may come from the previous kernel, so it waits first. PF_SLOTS > 0 (dense decode
    under PDL, GPU only): before waiting, one program per (row, split) asks L2 for the key rows of
    its first PF_SLOTS slots below the row's length (read before the wait, so the count before or
    after the new token: either way the rows exist; a slot the previous kernel is writing is read
    again after the wait like every other), so the loads after the wait find them there.
    PF_NEXT_CHUNK > 0 (under PDL, GPU only): before waiting, the programs also ask L2 for the first
    pf_next_bytes bytes at PF_NEXT in PF_NEXT_CHUNK-byte pieces, spread over them: weights a later
    kernel of the step reads (the MLP's), fetched while this latency-bound stretch leaves DRAM idle."""
    pid = tl.program_id(0)
    hb = pid % N_HBLK  # head blocks fastest: programs reading the same rows run side by side (L2)
    rest = pid // N_HBLK
    dvb = rest % NUM_DVB
    rest = rest // NUM_DVB
    split = rest % N_SPLIT
    rest = rest // N_SPLIT
    n_kv = tl.num_programs(1)
    hk = tl.program_id(1)
    bt = rest
    b = (bt // T).to(tl.int64)
    t = (bt % T).to(tl.int64)  # int64: t * stride_qt overflows int32 at 128K tokens x 128 heads
    if PDL:
        gdc_launch_dependents()
        if PF_SLOTS > 0:
            pf_lo = split * slots_per_split
            pf_nv = tl.minimum(tl.load(NVALID + b).to(tl.int32) + 1, n_slots)
            pf_hi = tl.minimum(tl.minimum(pf_lo + slots_per_split, pf_lo + PF_SLOTS), pf_nv)
            row_bytes = stride_ks * (K.dtype.element_ty.primitive_bitwidth // 8)
            pf_bytes = tl.maximum(pf_hi - pf_lo, 0) * row_bytes
            l2_prefetch(K + b * stride_kb + pf_lo.to(tl.int64) * stride_ks, pf_bytes,
                        (pf_hi > pf_lo) & (hb == 0) & (dvb == 0) & (hk == 0))
        if PF_NEXT_CHUNK > 0:
            _prefetch_share(PF_NEXT, pf_next_bytes, pid * n_kv + hk, tl.num_programs(0) * n_kv, PF_NEXT_CHUNK)
        gdc_wait()

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < G
    heads = (hk * G + offs_h).to(tl.int64)
    d1 = tl.arange(0, BD1)
    q_base = Q + b * stride_qb + t * stride_qt + heads[:, None] * stride_qh
    q1 = tl.load(q_base + d1[None, :], mask=h_ok[:, None] & (d1 < DK1)[None, :], other=0.0)
    if DK2 > 0:
        d2 = tl.arange(0, BD2)
        q2 = tl.load(q_base + DK1 + d2[None, :], mask=h_ok[:, None] & (d2 < DK2)[None, :], other=0.0)
    dv = dvb * BDV + tl.arange(0, BDV)  # this program's value columns
    lse_writer = (offs_h * 0 + dvb) == 0  # one program per head block writes the log-sum-exp

    lo = split * slots_per_split
    hi = tl.minimum(lo + slots_per_split, n_slots)
    if GATHER != 1:  # dense / paged: slots are positions; the T queries are the last T of n_valid[b]
        nv = tl.load(NVALID + b).to(tl.int32)
        nv = tl.minimum(tl.maximum(nv, 0), n_slots)
        hi = tl.minimum(hi, tl.maximum(nv - (T - 1 - t), 0).to(tl.int32))  # query t: positions <= nv-T+t

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BDV], dtype=tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for start in range(lo, hi, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        in_range = slots < hi
        # Row offsets in int32 unless ROW64 (caches past 2^31 elements); a block inside one page
        # reads the block table once (a scalar page base), not once per slot.
        if GATHER == 1:
            idx = tl.load(IDX + b * stride_ib + t * stride_it + slots, mask=in_range, other=-1)
            valid = in_range & (idx >= 0) & (idx < n_rows)
            rows = tl.where(valid, idx, 0).to(tl.int64 if ROW64 else tl.int32)
            first = tl.zeros([], dtype=tl.int64)
        elif GATHER == 2 and PAGE % BLOCK_N == 0:  # the block lies inside one page: one table read
            valid = in_range
            first = tl.load(TABLE + b * stride_tb + start // PAGE).to(tl.int64) * PAGE - start // PAGE * PAGE
            rows = slots.to(tl.int64 if ROW64 else tl.int32)  # + first: page * PAGE + slot % PAGE
        elif GATHER == 2:
            valid = in_range
            page = tl.load(TABLE + b * stride_tb + slots // PAGE, mask=in_range, other=0)
            rows = page.to(tl.int64 if ROW64 else tl.int32) * PAGE + slots % PAGE
            first = tl.zeros([], dtype=tl.int64)
        else:
            valid = in_range
            first = tl.zeros([], dtype=tl.int64)
            rows = slots.to(tl.int64 if ROW64 else tl.int32)
        k_rows = k_base + first * stride_ks + rows[:, None] * stride_ks
        if BD1 == DK1:
            k1 = tl.load(k_rows + d1[None, :], mask=valid[:, None], other=0.0)
        else:
            k1 = tl.load(k_rows + d1[None, :], mask=valid[:, None] & (d1 < DK1)[None, :], other=0.0)
        s1 = _mm(q1, tl.trans(k1), PREC, INTERP)  # (BLOCK_H, BLOCK_N)
        s2 = s1  # unused without a tail
        if DK2 > 0:
            k2 = tl.load(k_rows + DK1 + d2[None, :], mask=valid[:, None] & (d2 < DK2)[None, :], other=0.0)
            s2 = _mm(q2, tl.trans(k2), PREC, INTERP)  # (BLOCK_H, BLOCK_N)
        if SHARE_QK:
            # Triton lays a dot out with all warps along M when its result reaches another dot
            # through SSA values (FlashAttention's layout: softmax rows stay inside a warp). For q·k
            # of 64 heads with 8 warps (2 warpgroups) that makes BOTH warpgroups compute the same
            # [64, BLOCK_N] logits; at MLA's 576 dims q·k is most of the work, so that costs ~1.5x
            # the tensor-core time and twice the shared-memory reads of the q tile (the tiles'
            # limit at small BLOCK_N). The search does not follow values out of an `if`, so under
            # this always-true runtime condition the q·k dots get the split layout (each warpgroup
            # half of the columns, computed once); the softmax rows are then reduced across the
            # warpgroups through shared memory and p crosses once, in bf16, to the P·V layout.
            if n_rows >= 0:
                p, m_i, l_i, acc = _online_softmax(s1, s2, DK2 > 0, valid, sm_scale, m_i, l_i, acc, k1.dtype)
            else:  # never taken; not a constant, which would get its own shared-memory buffer
                p = (s1 * 0.0).to(k1.dtype)
        else:
            p, m_i, l_i, acc = _online_softmax(s1, s2, DK2 > 0, valid, sm_scale, m_i, l_i, acc, k1.dtype)
        if V_IS_K and NUM_DVB == 1:
            v = k1  # MLA absorbed: the value is the first D_v dims of the key row, already loaded
        else:
            v = tl.load(v_base + first * stride_vs + rows[:, None] * stride_vs + dv[None, :],
                        mask=valid[:, None] & (dv < D_V)[None, :], other=0.0)
        acc += _dot_lowp(p, v, PREC, INTERP)

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if SPLIT_OUT:  # partials [B*T*H, N_SPLIT, D_V] float32 and [B*T*H, N_SPLIT]
        row = (bt * n_kv * G + heads) * N_SPLIT + split
        tl.store(OP + row[:, None] * D_V + dv[None, :], o, mask=h_ok[:, None] & (dv < D_V)[None, :])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(LP + row, lse, mask=h_ok & lse_writer)
    else:
        o_ptr = O + b * stride_ob + t * stride_ot + heads[:, None] * stride_oh + dv[None, :]
        tl.store(o_ptr, o.to(O.dtype.element_ty), mask=h_ok[:, None] & (dv < D_V)[None, :])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("inf"))
        tl.store(LSE + bt * n_kv * G + heads, lse, mask=h_ok & lse_writer)


@triton.jit
def _combine(OP, LP, O, LSE, T, H, N_SPLIT, stride_ob, stride_ot, stride_oh,
             D_V: tl.constexpr, BDV: tl.constexpr, BSPLIT: tl.constexpr, SPLIT_STEP: tl.constexpr,
             PDL: tl.constexpr = False, ONE_LOAD: tl.constexpr = False):
    """Merge N_SPLIT partial (o_i, lse_i) of one (query token, head) and value columns
    [pid1*BDV, +BDV): o = Σ 2^(lse_i − lse) o_i. The partials are read SPLIT_STEP splits at a time
    as one [SPLIT_STEP, BDV] tile (a serial loop over 100+ splits at batch 1 was latency-bound).
    ONE_LOAD (BSPLIT <= SPLIT_STEP): the lse_i and the partials are loaded together, one round trip
    (every split wrote its partial, 0 when empty), instead of the partials after the lse_i they were
    masked by. PDL: as _latent_attn_fwd."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0).to(tl.int64)  # = (b*T + t)*H + h
    h = pid % H
    bt = pid // H
    b = bt // T
    t = bt % T
    sp = tl.arange(0, BSPLIT)
    dv = tl.program_id(1) * BDV + tl.arange(0, BDV)
    lse_i = tl.load(LP + pid * N_SPLIT + sp, mask=sp < N_SPLIT, other=float("-inf"))
    if ONE_LOAD:
        first = tl.load(OP + (pid * N_SPLIT + sp[:, None]) * D_V + dv[None, :],
                        mask=(sp < N_SPLIT)[:, None] & (dv < D_V)[None, :], other=0.0)
    m = tl.max(lse_i, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse_i - m), 0)  # empty splits: 0
    acc = tl.zeros([BDV], dtype=tl.float32)
    if ONE_LOAD:
        w = tl.exp2(lse_i - m)
        acc += tl.sum(w[:, None] * first, 0)
    for s0 in range(0, N_SPLIT if not ONE_LOAD else 0, SPLIT_STEP):
        si = s0 + tl.arange(0, SPLIT_STEP)
        w = tl.exp2(tl.load(LP + pid * N_SPLIT + si, mask=si < N_SPLIT, other=float("-inf")) - m)
        part = tl.load(OP + (pid * N_SPLIT + si[:, None]) * D_V + dv[None, :],
                       mask=(w > 0)[:, None] & (dv < D_V)[None, :], other=0.0)  # empty splits: not read
        acc += tl.sum(w[:, None] * part, 0)
    has = total > 0
    o = acc / tl.where(has, total, 1.0)
    tl.store(O + b * stride_ob + t * stride_ot + h * stride_oh + dv, o.to(O.dtype.element_ty), mask=dv < D_V)
    if tl.program_id(1) == 0:
        tl.store(LSE + pid, tl.where(has, m + tl.log2(tl.where(has, total, 1.0)), float("inf")))


@triton.jit
def _sparse_bwd(
    Q, K, V, IDX, DO, LSE, DELTA, DQ, DK, DV,
    sm_scale, T, G, N_HBLK, n_slots, n_rows,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ib, stride_it,
    stride_ob, stride_ot, stride_oh,
    DK1: tl.constexpr, BD1: tl.constexpr, DK2: tl.constexpr, BD2: tl.constexpr,
    D_V: tl.constexpr, BDV: tl.constexpr, V_IS_K: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    """One program per (query token, kv head, head block): p = 2^(s − lse), dp = do vᵀ,
    ds = p (dp − Δ); dq += ds k (registers); dk[row] += dsᵀ q, dv[row] += pᵀ do (float32 atomics).
    DQ is float32 [B, T, H, D] contiguous; DK / DV are float32 buffers shaped like K / V but
    contiguous ([B, S, H_kv, D|D_v]). sm_scale is the natural scale times log2(e)."""
    pid = tl.program_id(0)
    hb = pid % N_HBLK
    bt = pid // N_HBLK
    hk = tl.program_id(1)
    n_kv = tl.num_programs(1)
    b = (bt // T).to(tl.int64)
    t = (bt % T).to(tl.int64)  # int64: t * stride_qt overflows int32 at 128K tokens x 128 heads
    H = n_kv * G
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < G
    heads = (hk * G + offs_h).to(tl.int64)
    d1 = tl.arange(0, BD1)
    dv = tl.arange(0, BDV)
    q_base = Q + b * stride_qb + t * stride_qt + heads[:, None] * stride_qh
    q1 = tl.load(q_base + d1[None, :], mask=h_ok[:, None] & (d1 < DK1)[None, :], other=0.0)
    if DK2 > 0:
        d2 = tl.arange(0, BD2)
        q2 = tl.load(q_base + DK1 + d2[None, :], mask=h_ok[:, None] & (d2 < DK2)[None, :], other=0.0)
        dq2 = tl.zeros([BLOCK_H, BD2], dtype=tl.float32)
    do = tl.load(DO + b * stride_ob + t * stride_ot + heads[:, None] * stride_oh + dv[None, :],
                 mask=h_ok[:, None] & (dv < D_V)[None, :], other=0.0)
    lse = tl.load(LSE + bt * H + heads, mask=h_ok, other=float("inf"))  # +inf: p = 0
    delta = tl.load(DELTA + bt * H + heads, mask=h_ok, other=0.0)
    dq1 = tl.zeros([BLOCK_H, BD1], dtype=tl.float32)
    scale = sm_scale / 1.4426950408889634  # the natural logit scale
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    D_TOT: tl.constexpr = DK1 + DK2
    dk_base = DK + (b * n_rows * n_kv + hk) * D_TOT
    dv_base = DV + (b * n_rows * n_kv + hk) * D_V
    for start in range(0, n_slots, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        idx = tl.load(IDX + b * stride_ib + t * stride_it + slots, mask=slots < n_slots, other=-1)
        idx = idx.to(tl.int64)
        valid = (idx >= 0) & (idx < n_rows)
        rows = tl.where(valid, idx, 0)
        k_rows = k_base + rows[:, None] * stride_ks
        k1 = tl.load(k_rows + d1[None, :], mask=valid[:, None] & (d1 < DK1)[None, :], other=0.0)
        s = _mm(q1, tl.trans(k1), PREC, INTERP)
        if DK2 > 0:
            k2 = tl.load(k_rows + DK1 + d2[None, :], mask=valid[:, None] & (d2 < DK2)[None, :], other=0.0)
            s += _mm(q2, tl.trans(k2), PREC, INTERP)
        s = tl.where(valid[None, :], s * sm_scale, float("-inf"))
        p = tl.exp2(s - lse[:, None])  # (BLOCK_H, BLOCK_N); 0 for empty slots, padded heads, empty rows
        if V_IS_K:
            v = k1  # MLA: the value is the key's first D_v (= DK1) dims
        else:
            v = tl.load(v_base + rows[:, None] * stride_vs + dv[None, :],
                        mask=valid[:, None] & (dv < D_V)[None, :], other=0.0)
        dp = _mm(do, tl.trans(v), PREC, INTERP)
        ds = p * (dp - delta[:, None])  # dL/d(logit), natural units
        dq1 += _dot_lowp(ds, k1, PREC, INTERP)
        dk1 = _dot_lowp(tl.trans(ds), q1, PREC, INTERP) * scale  # (BLOCK_N, BD1)
        dvr = _dot_lowp(tl.trans(p), do, PREC, INTERP)  # (BLOCK_N, BDV)
        if V_IS_K:  # one atomic per latent element: the key and value gradients of the same columns
            dk1 += dvr
        row_off = rows[:, None] * n_kv
        tl.atomic_add(dk_base + row_off * D_TOT + d1[None, :], dk1,
                      mask=valid[:, None] & (d1 < DK1)[None, :])
        if DK2 > 0:
            dq2 += _dot_lowp(ds, k2, PREC, INTERP)
            dk2 = _dot_lowp(tl.trans(ds), q2, PREC, INTERP)
            tl.atomic_add(dk_base + row_off * D_TOT + DK1 + d2[None, :], dk2 * scale,
                          mask=valid[:, None] & (d2 < DK2)[None, :])
        if not V_IS_K:
            tl.atomic_add(dv_base + row_off * D_V + dv[None, :], dvr,
                          mask=valid[:, None] & (dv < D_V)[None, :])
    dq_base = DQ + (bt * H + heads[:, None]) * D_TOT
    tl.store(dq_base + d1[None, :], dq1 * scale, mask=h_ok[:, None] & (d1 < DK1)[None, :])
    if DK2 > 0:
        tl.store(dq_base + DK1 + d2[None, :], dq2 * scale, mask=h_ok[:, None] & (d2 < DK2)[None, :])


@triton.jit
def _index_scores_kernel(
    Q, K, W, KS, NV, OUT, T, S, H, N_TBLK, N_SCHUNK, s_chunk,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks,
    stride_wb, stride_wt,
    stride_sb,
    stride_ob, stride_ot,
    D: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
    FP8: tl.constexpr, CAUSAL: tl.constexpr, HAS_NV: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
    PDL: tl.constexpr = False, ZERO=None, N_ZERO=0, ZERO_BLOCK: tl.constexpr = 0,
    KEY_ROWS: tl.constexpr = False, HIST=None, H16=None, PRE: tl.constexpr = 0,
):
    """One program: BLOCK_T queries x all H index heads (one [BLOCK_T*BH, D] tile, kept in
    registers) against keys [chunk*s_chunk, +s_chunk) in BLOCK_S steps: relu(q kᵀ) weighted by w
    and summed over heads in registers; only the [BLOCK_T, BLOCK_S] result is written. FP8: q and k
    are e4m3, the q scales are folded into W (relu(c x) = c relu(x) for c > 0), the k scale KS[b, s]
    multiplies the column. CAUSAL: keys after the query (queries are the last T of S) get -inf.
    HAS_NV: keys at or past NV[b] (the row's valid length) get -inf and are never read.
    PDL: as _latent_attn_fwd (decode). ZERO_BLOCK > 0: the programs also zero ZERO[0:N_ZERO] (int32,
    ZERO_BLOCK elements a store, after the wait: the buffer may be memory a kernel before used), the
    buffers of the top-k launched next (dsa_topk's ``scratch``). KEY_ROWS: the product as keys x
    heads (k qᵀ) instead of heads x keys, so that the sum over heads runs along the accumulator's rows
    (inside a warp) rather than across its warps. PRE > 0 (decode, T = 1: row b's scores): the
    programs also add the top-k's first histogram level of the keys they write (every position of
    the chunk, -inf ones in bin 0) into HIST[b] (int32 [256] a row, 1024 apart: dsa_topk's level-0
    histograms, zeroed by an earlier launch), and with PRE = 2 the 16-bit histogram of the keys
    outside level 0's bin 0 into H16[b] (int32 [65536] a row, one atomic per key): the top-k then
    starts past its first level (dsa_topk's ``prefilled``)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    if ZERO_BLOCK > 0:
        zero_share(ZERO, N_ZERO, pid, tl.num_programs(0), ZERO_BLOCK)
    chunk = pid % N_SCHUNK
    rest = pid // N_SCHUNK
    tb = rest % N_TBLK
    b = (rest // N_TBLK).to(tl.int64)
    r = tl.arange(0, BLOCK_T * BH)
    tq = tb * BLOCK_T + r // BH  # query of each tile row
    hq = r % BH
    r_ok = (tq < T) & (hq < H)
    d = tl.arange(0, BD)
    q_rows = Q + b * stride_qb + tq[:, None].to(tl.int64) * stride_qt + hq[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=r_ok[:, None] & (d < D)[None, :], other=0.0)
    w = tl.load(W + b * stride_wb + tq.to(tl.int64) * stride_wt + hq, mask=r_ok, other=0.0).to(tl.float32)
    ts = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = ts < T
    lo = chunk * s_chunk
    hi = tl.minimum(lo + s_chunk, S)
    top = hi
    if CAUSAL:  # the block's last query sees keys up to S - T + t_last
        top = tl.maximum(tl.minimum(hi, S - T + tl.minimum(tb * BLOCK_T + BLOCK_T, T)), lo)
    n_ok = hi
    if HAS_NV:
        n_ok = tl.minimum(tl.maximum(tl.load(NV + b).to(tl.int32), 0), hi)
        top = tl.maximum(tl.minimum(top, n_ok), lo)
    # two branch-free loops (so the first can be software-pipelined): computed blocks, then the
    # blocks wholly after the block's last query, filled with -inf (CAUSAL only)
    top = lo + tl.cdiv(top - lo, BLOCK_S) * BLOCK_S
    hist0 = tl.zeros([_TOPK_BINS], dtype=tl.int32)  # PRE: level 0's counts of this chunk's keys
    for s0 in range(lo, top, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        c_ok = cols < hi
        k = tl.load(K + b * stride_kb + cols[:, None].to(tl.int64) * stride_ks + d[None, :],
                    mask=(c_ok & (cols < n_ok))[:, None] & (d < D)[None, :], other=0.0)
        if KEY_ROWS:  # keys x heads: each key's sum over heads stays inside its rows' threads
            logits = _mm(k, tl.trans(q), PREC, INTERP)  # (BLOCK_S, BLOCK_T*BH)
            part = tl.maximum(logits, 0.0) * w[None, :]
            score = tl.sum(tl.reshape(part, (BLOCK_S, BLOCK_T, BH)), 2)  # (BLOCK_S, BLOCK_T)
            c2, t2 = cols[:, None], ts[None, :]  # the score's key and query axes
        else:
            logits = _mm(q, tl.trans(k), PREC, INTERP)  # (BLOCK_T*BH, BLOCK_S)
            part = tl.maximum(logits, 0.0) * w[:, None]
            score = tl.sum(tl.reshape(part, (BLOCK_T, BH, BLOCK_S)), 1)  # (BLOCK_T, BLOCK_S)
            c2, t2 = cols[None, :], ts[:, None]
        if FP8:
            score = score * tl.load(KS + b * stride_sb + c2, mask=c2 < hi, other=0.0)
        if CAUSAL:
            score = tl.where(c2 <= S - T + t2, score, float("-inf"))
        if HAS_NV:
            score = tl.where(c2 < n_ok, score, float("-inf"))
        tl.store(OUT + b * stride_ob + t2.to(tl.int64) * stride_ot + c2, score, mask=(t2 < T) & (c2 < hi))
        if PRE > 0:  # (T = 1: every written score is row b's)
            key = _score_keys(tl.reshape(score, (BLOCK_S * BLOCK_T,)))
            written = tl.reshape((t2 < T) & (c2 < hi), (BLOCK_S * BLOCK_T,))
            hist0 += _topk_block_counts(key, written, 0, 0)
            if PRE > 1:
                _topk_block_fine_counts(key, written, H16 + b * 65536)
    for s0 in range(top, hi, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        out_ptr = OUT + b * stride_ob + ts[:, None].to(tl.int64) * stride_ot + cols[None, :]
        tl.store(out_ptr, tl.full([BLOCK_T, BLOCK_S], float("-inf"), tl.float32),
                 mask=t_ok[:, None] & (cols < hi)[None, :])
    if PRE > 0:  # the -inf blocks above (level 0's bin 0), then the chunk's counts into the row's histogram
        bins = tl.arange(0, _TOPK_BINS)
        hist0 += tl.where(bins == 0, tl.maximum(hi - top, 0), 0)
        tl.atomic_add(HIST + b * 1024 + bins, hist0, mask=hist0 > 0, sem="relaxed", scope="gpu")


# Exact causal top-k (attnlab.ops.dsa_topk) as a radix select on the scores' bits. Each score maps
# to an int32 key that orders like the float (ops.sparse._ordered_keys' high word: -0.0 -> +0.0, IEEE
# sign-magnitude -> two's complement); the k-th largest key is found 8 bits at a time (four levels)
# from 256-bin histograms that many programs (chunks of a row) add up with atomics, then every key above it
# and the earliest `need` keys equal to it are taken (the tie rule), written in position order,
# and sorted by (key descending, position ascending) by ranking.
_KEY_NEG_INF: tl.constexpr = tl.constexpr(-2139095041)  # key of -inf: 0xFF800000 ^ 0x7FFFFFFF as int32


@triton.jit
def _score_keys(x):
    """The int32 keys of float32 scores x, ordered as the floats (-0.0 ties with +0.0)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 ties with +0.0
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _topk_keys(SC, row_off, cols, ok, qpos, CAUSAL: tl.constexpr):
    x = tl.load(SC + row_off + cols, mask=ok, other=float("-inf"))
    if CAUSAL:
        x = tl.where(cols > qpos, float("-inf"), x)
    return _score_keys(x)


@triton.jit
def _topk_sort_key(key, cols, S):
    """int64 sort keys (key << 32) | (S - 1 - position): a bigger one is a higher score, then an
    earlier position (all distinct)."""
    return (key.to(tl.int64) << 32) | (S - 1 - cols).to(tl.int64)


@triton.jit
def _topk_store(DST, slot, take, key, cols, S, POSITIONS: tl.constexpr):
    """Store the taken keys of one block in position order from DST[slot] on, as sort keys or with
    POSITIONS the positions (-1 for a -inf score); returns the next free slot."""
    take_i = take.to(tl.int32)
    dst = slot + tl.cumsum(take_i, 0) - 1
    if POSITIONS:
        val = tl.where(key == _KEY_NEG_INF, -1, cols).to(tl.int64)
    else:
        val = _topk_sort_key(key, cols, S)
    tl.store(DST + dst, val, mask=take)
    return slot + tl.sum(take_i, 0)


_TOPK_BINS: tl.constexpr = tl.constexpr(256)  # 8 bits per level: tl.histogram's cost grows with the bins
# (2048-bin levels, 11 + 11 + 10 bits, took 69 us per level over a 1M-score decode row on an H200)


@triton.jit
def _topk_pick(h, k_rem):
    """The bin of a 256-bin histogram h (int32 [256], in registers) holding the k_rem-th largest
    key, and k_rem minus the keys in the bins above it."""
    bins = tl.arange(0, _TOPK_BINS)
    at_or_above = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # keys in bins >= b
    b = tl.max(tl.where(at_or_above >= k_rem, bins, -1), 0)
    return b, k_rem - tl.sum(tl.where(bins > b, h, 0), 0)


@triton.jit
def _topk_descend(h, k_rem, prefix, LEVEL: tl.constexpr):
    """One radix level: the bin of histogram h (int32 [256]) holding the k_rem-th largest key appended
    to ``prefix`` (level 0: the signed top byte, key >> 24; then prefix * 256 + bin, the floor division
    holding for negative keys too), k_rem minus the keys in the bins above it, and the keys in the
    bin (those whose top 8 (LEVEL + 1) bits are the new prefix)."""
    b, k_rem = _topk_pick(h, k_rem)
    if LEVEL == 0:
        prefix = b - 128
    else:
        prefix = prefix * 256 + b
    return prefix, k_rem, tl.sum(tl.where(tl.arange(0, _TOPK_BINS) == b, h, 0), 0)


@triton.jit
def _topk_threshold(HIST, k_eff, LEVELS: tl.constexpr):
    """(key prefix, keys still to take at it, keys of the row sharing it) after LEVELS histogram levels
    (0..4) of a row: the prefix is key >> (32 - 8 LEVELS) (arithmetic shift); LEVELS = 4 gives the full
    k-th largest key and how many of the keys equal to it are taken. (LEVELS = 0: the third is 0.)"""
    prefix = tl.zeros([], dtype=tl.int32)
    k_rem = k_eff
    n_match = tl.zeros([], dtype=tl.int32)
    for LEVEL in tl.static_range(LEVELS):
        prefix, k_rem, n_match = _topk_descend(tl.load(HIST + LEVEL * 256 + tl.arange(0, _TOPK_BINS)), k_rem,
                                               prefix, LEVEL)
    return prefix, k_rem, n_match


_TOPK_STATE: tl.constexpr = tl.constexpr(5 * 4)  # int32s of a row's carried states: after 0..4 levels, 4 each


@triton.jit
def _topk_pass_state(HIST, ST, r, c, k_eff, LEVELS: tl.constexpr, CARRY: tl.constexpr,
                     STORED: tl.constexpr = False):
    """_topk_threshold(row r's histograms, k_eff, LEVELS) in a multi-program pass. CARRY: the pass
    before stored the row's (prefix, k_rem, n_match) after LEVELS - 1 levels in ST[r, LEVELS - 1]
    (int32 [R, 5, 4]: _TOPK_STATE a row), so only level LEVELS - 1 is descended here, and chunk 0's
    program stores the result in ST[r, LEVELS] for the pass after; STORED: the pass before already
    stored ST[r, LEVELS] (the write pass, after the count pass): it is loaded, nothing descended."""
    hist = HIST + r.to(tl.int64) * (4 * 256)
    st = ST + r.to(tl.int64) * _TOPK_STATE
    if CARRY and STORED:
        return tl.load(st + LEVELS * 4), tl.load(st + LEVELS * 4 + 1), tl.load(st + LEVELS * 4 + 2)
    if CARRY and LEVELS >= 2:
        h = tl.load(hist + (LEVELS - 1) * 256 + tl.arange(0, _TOPK_BINS))
        prefix, k_rem, n_match = _topk_descend(h, tl.load(st + (LEVELS - 1) * 4 + 1),
                                               tl.load(st + (LEVELS - 1) * 4), LEVELS - 1)
    else:
        prefix, k_rem, n_match = _topk_threshold(hist, k_eff, LEVELS)
    if CARRY and LEVELS >= 1:
        if c == 0:
            tl.store(st + LEVELS * 4, prefix)
            tl.store(st + LEVELS * 4 + 1, k_rem)
            tl.store(st + LEVELS * 4 + 2, n_match)
    return prefix, k_rem, n_match


@triton.jit
def _topk_block_counts(key, ok, prefix, LEVEL: tl.constexpr):
    """Level LEVEL's 256-bin histogram (int32, in registers) of one block of keys (ok: in the range)
    whose higher bits match ``prefix`` (the earlier levels' choice; ignored at level 0)."""
    if LEVEL == 0:
        digit = (key >> 24) + 128
    else:
        ok = ok & ((key >> (32 - 8 * LEVEL)) == prefix)
        digit = (key >> (24 - 8 * LEVEL)) & 0xFF
    counts = tl.histogram(tl.where(ok, digit, 0), _TOPK_BINS)
    n_out = tl.sum((~ok).to(tl.int32), 0)
    return counts - tl.where(tl.arange(0, _TOPK_BINS) == 0, n_out, 0)  # those went to bin 0


@triton.jit
def _topk_level_counts(SC, row_off, lo, hi, qpos, prefix, LEVEL: tl.constexpr, CAUSAL: tl.constexpr,
                       BLOCK: tl.constexpr):
    """_topk_block_counts over the keys at positions [lo, hi) of a row."""
    counts = tl.zeros([_TOPK_BINS], dtype=tl.int32)
    for j in range(lo, hi, BLOCK):
        cols = j + tl.arange(0, BLOCK)
        ok = cols < hi
        counts += _topk_block_counts(_topk_keys(SC, row_off, cols, ok, qpos, CAUSAL), ok, prefix, LEVEL)
    return counts


@triton.jit
def _topk_block_match_adds(key, ok, prefix, H, LEVEL: tl.constexpr):
    """Level LEVEL's (>= 1) counts of one block of keys added into the level's histogram H (int32
    [256]) with one relaxed atomic per key whose higher bits match ``prefix``: when few keys of the row
    do, cheaper than tl.histogram over every key (whose cost grows with the keys, matching or not)."""
    match = ok & ((key >> (32 - 8 * LEVEL)) == prefix)
    tl.atomic_add(H + ((key >> (24 - 8 * LEVEL)) & 0xFF), 1, mask=match, sem="relaxed", scope="gpu")


@triton.jit
def _topk_level_adds(SC, H, row_off, lo, hi, qpos, key, ok, prefix, n_match, LEVEL: tl.constexpr,
                     CAUSAL: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, MATCH_MAX: tl.constexpr,
                     RELAXED: tl.constexpr = True):
    """Add level LEVEL's counts of a chunk's keys (positions [lo, hi) of a row; with CHUNK > 0 already
    in registers: key, ok) whose higher bits match ``prefix`` into the level's histogram H (int32
    [256]): one atomic per matching key when the row has at most MATCH_MAX of them (``n_match``, from
    the level before), else a tl.histogram and one atomic per bin (acq_rel unless RELAXED)."""
    few = n_match <= MATCH_MAX
    if LEVEL == 0:
        few = False
    if MATCH_MAX == 0:
        few = False
    if few:
        if CHUNK > 0:
            _topk_block_match_adds(key, ok, prefix, H, LEVEL)
        else:
            for j in range(lo, hi, BLOCK):
                cols = j + tl.arange(0, BLOCK)
                c_ok = cols < hi
                keys = _topk_keys(SC, row_off, cols, c_ok, qpos, CAUSAL)
                _topk_block_match_adds(keys, c_ok, prefix, H, LEVEL)
    else:
        if CHUNK > 0:
            counts = _topk_block_counts(key, ok, prefix, LEVEL)
        else:
            counts = _topk_level_counts(SC, row_off, lo, hi, qpos, prefix, LEVEL, CAUSAL, BLOCK)
        bins = tl.arange(0, _TOPK_BINS)
        if RELAXED:  # a kernel's end or the row barrier orders them before the histogram is read
            tl.atomic_add(H + bins, counts, mask=counts > 0, sem="relaxed", scope="gpu")
        else:
            tl.atomic_add(H + bins, counts, mask=counts > 0)


@triton.jit
def _topk_block_ties(key, ok, thr):
    """(keys of a block above the k-th largest key ``thr``, keys equal to it)."""
    return tl.sum((ok & (key > thr)).to(tl.int32), 0), tl.sum((ok & (key == thr)).to(tl.int32), 0)


@triton.jit
def _topk_tie_counts(SC, row_off, lo, hi, qpos, thr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    """(keys above the k-th largest key ``thr``, keys equal to it) at positions [lo, hi) of a row."""
    n_gt = 0
    n_eq = 0
    for j in range(lo, hi, BLOCK):
        cols = j + tl.arange(0, BLOCK)
        ok = cols < hi
        gt, eq = _topk_block_ties(_topk_keys(SC, row_off, cols, ok, qpos, CAUSAL), ok, thr)
        n_gt += gt
        n_eq += eq
    return n_gt, n_eq


@triton.jit
def _topk_block_take(key, cols, ok, thr, need, slot, eq_seen, DST, S, POSITIONS: tl.constexpr):
    """_topk_take for one block of keys at positions ``cols``; returns (next slot, ties seen)."""
    eq = (ok & (key == thr)).to(tl.int32)
    tie_rank = eq_seen + tl.cumsum(eq, 0) - 1  # ties at earlier positions of the row
    take = (ok & (key > thr)) | ((eq > 0) & (tie_rank < need))
    return _topk_store(DST, slot, take, key, cols, S, POSITIONS), eq_seen + tl.sum(eq, 0)


@triton.jit
def _topk_take(SC, row_off, lo, hi, qpos, thr, need, slot, eq_seen, DST, S, CAUSAL: tl.constexpr,
               BLOCK: tl.constexpr, POSITIONS: tl.constexpr):
    """Store the taken keys at positions [lo, hi) of a row, in position order, from DST[slot] on:
    every key above ``thr`` and, of the keys equal to it, those whose rank among the row's ties
    (``eq_seen`` of them before lo) is below ``need``. Stored as int64 sort keys (key << 32) |
    (S - 1 - position) (a bigger one: a higher score, then an earlier position), or with POSITIONS
    the positions themselves (-1 for a -inf score)."""
    for j in range(lo, hi, BLOCK):
        cols = j + tl.arange(0, BLOCK)
        ok = cols < hi
        key = _topk_keys(SC, row_off, cols, ok, qpos, CAUSAL)
        slot, eq_seen = _topk_block_take(key, cols, ok, thr, need, slot, eq_seen, DST, S, POSITIONS)


@triton.jit
def _topk_chunk_keys(SC, S, T, chunk, stride_r, N_CHUNK, CHUNK: tl.constexpr, CAUSAL: tl.constexpr,
                     PDL: tl.constexpr, EARLY: tl.constexpr = True):
    """The start of a multi-program pass or of _topk_fused (CHUNK > 0: the whole chunk in one register
    tile): program pid's row r, chunk c, its positions [lo, hi), and with CHUNK its keys (positions
    cols, ok inside [lo, hi)) loaded BEFORE the PDL wait — the scores were written before the zero fill
    launched just before _topk_fused or the first pass, which start only when that plain launch has
    completed — so a pass's load overlaps the previous pass's end. CHUNK = 0: the keys are left to the
    loops over the chunk (key / cols / ok zero). EARLY False: the kernel just before wrote the scores
    (no zero fill between: the index scores zeroed the buffers), so they are read after the wait, and
    the next kernel may launch only then (its early loads of the scores must find them written)."""
    if PDL:
        if EARLY:
            gdc_launch_dependents()
        else:
            gdc_wait()
            gdc_launch_dependents()
    pid = tl.program_id(0)
    r = pid // N_CHUNK
    c = pid % N_CHUNK
    lo = c * chunk
    hi = tl.minimum(lo + chunk, S)
    if CHUNK > 0:
        cols = lo + tl.arange(0, CHUNK)
        ok = cols < hi
        key = _topk_keys(SC, r.to(tl.int64) * stride_r, cols, ok, S - T + r % T, CAUSAL)
    else:
        cols = tl.zeros([], dtype=tl.int32)
        ok = cols == 0
        key = cols
    if PDL:
        if EARLY:
            gdc_wait()
    return r, c, lo, hi, key, cols, ok


@triton.jit
def _topk_hist(SC, HIST, S, T, chunk, stride_r, k_eff, N_CHUNK,
               LEVEL: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr = 0,
               PDL: tl.constexpr = False, RELAXED: tl.constexpr = False, MATCH_MAX: tl.constexpr = 0,
               EARLY: tl.constexpr = True, ST=None, CARRY: tl.constexpr = False, PF=None, pf_bytes=0,
               PF_CHUNK: tl.constexpr = 0):
    """Level LEVEL's histogram of the keys of chunk c of row r whose higher bits match the prefix
    the earlier levels chose (recomputed here from their histograms: no extra launch; with CARRY from
    the pass before's, _topk_pass_state). CHUNK, PDL: _topk_chunk_keys (and EARLY); MATCH_MAX,
    RELAXED: _topk_level_adds. PF_CHUNK > 0 (PDL): first the programs ask L2 for the first pf_bytes
    bytes at PF (_prefetch_share: weights a later kernel of the step reads)."""
    if PDL and PF_CHUNK > 0:
        _prefetch_share(PF, pf_bytes, tl.program_id(0), tl.num_programs(0), PF_CHUNK)
    r, c, lo, hi, key, cols, ok = _topk_chunk_keys(SC, S, T, chunk, stride_r, N_CHUNK, CHUNK, CAUSAL, PDL,
                                                   EARLY)
    hist = HIST + r.to(tl.int64) * (4 * 256)
    prefix, k_rem, n_match = _topk_pass_state(HIST, ST, r, c, k_eff, LEVEL, CARRY)
    _topk_level_adds(SC, hist + LEVEL * 256, r.to(tl.int64) * stride_r, lo, hi, S - T + r % T, key, ok,
                     prefix, n_match, LEVEL, CAUSAL, BLOCK, CHUNK, MATCH_MAX, RELAXED)


@triton.jit
def _topk_count(SC, HIST, CNT, S, T, chunk, stride_r, k_eff, N_CHUNK,
                CAUSAL: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr = 0,
                PDL: tl.constexpr = False, ST=None, CARRY: tl.constexpr = False):
    """Per chunk: keys above the k-th largest, and keys equal to it -> CNT[r, c, 0:2]. CHUNK, PDL:
    _topk_chunk_keys; CARRY: _topk_pass_state."""
    r, c, lo, hi, key, cols, ok = _topk_chunk_keys(SC, S, T, chunk, stride_r, N_CHUNK, CHUNK, CAUSAL, PDL)
    thr, need, _ = _topk_pass_state(HIST, ST, r, c, k_eff, 4, CARRY)
    if CHUNK > 0:
        n_gt, n_eq = _topk_block_ties(key, ok, thr)
    else:
        n_gt, n_eq = _topk_tie_counts(SC, r.to(tl.int64) * stride_r, lo, hi, S - T + r % T, thr, CAUSAL,
                                      BLOCK)
    pid = r * N_CHUNK + c
    tl.store(CNT + pid * 2, n_gt)
    tl.store(CNT + pid * 2 + 1, n_eq)


@triton.jit
def _topk_write(SC, HIST, CNT, SEL, S, T, chunk, stride_r, k_eff, topk, N_CHUNK, stride_sel,
                CAUSAL: tl.constexpr, BLOCK: tl.constexpr, BCH: tl.constexpr, POSITIONS: tl.constexpr,
                CHUNK: tl.constexpr = 0, PDL: tl.constexpr = False, ST=None, CARRY: tl.constexpr = False):
    """The taken keys of chunk c of row r, in position order, into SEL[r, slot] as int64 sort keys
    (key << 32) | (S - 1 - position): a bigger one is a higher score, then an earlier position; with
    POSITIONS the positions themselves (-1 for a -inf score): the unsorted result, the row's last
    chunk also filling slots k_eff..topk with -1. A chunk's first slot counts the keys taken in the
    chunks before it (from CNT). CHUNK, PDL: _topk_chunk_keys; CARRY: the k-th key and the ties to
    take as the count pass stored them (_topk_pass_state)."""
    r, c, lo, hi, key, cols, ok = _topk_chunk_keys(SC, S, T, chunk, stride_r, N_CHUNK, CHUNK, CAUSAL, PDL)
    thr, need, _ = _topk_pass_state(HIST, ST, r, c, k_eff, 4, CARRY, True)
    ch = tl.arange(0, BCH)
    before = ch < c
    cnt = CNT + (r * N_CHUNK).to(tl.int64) * 2
    gt_before = tl.sum(tl.load(cnt + ch * 2, mask=before, other=0), 0)
    eq_seen = tl.sum(tl.load(cnt + ch * 2 + 1, mask=before, other=0), 0)
    slot = gt_before + tl.minimum(eq_seen, need)
    sel = SEL + r.to(tl.int64) * stride_sel
    if CHUNK > 0:
        _topk_block_take(key, cols, ok, thr, need, slot, eq_seen, sel, S, POSITIONS)
    else:
        _topk_take(SC, r.to(tl.int64) * stride_r, lo, hi, S - T + r % T, thr, need, slot, eq_seen, sel, S,
                   CAUSAL, BLOCK, POSITIONS)
    if POSITIONS:
        if c == N_CHUNK - 1:
            for j in range(k_eff, topk, BLOCK):
                fill = j + tl.arange(0, BLOCK)
                tl.store(sel + fill, tl.full([BLOCK], -1, tl.int64), mask=fill < topk)


@triton.jit
def _row_sync(CTR, target):
    """Wait until the row's counter CTR (int32, zero at launch) reaches ``target``, after adding this
    program's arrival: a barrier among the programs of one row (all resident: the launcher keeps
    the grid within the SMs). Cooperative-groups style: CTA barrier, one acq_rel arrival, an acquire
    spin, CTA barrier."""
    tl.debug_barrier()  # every thread's atomics / stores are issued before the arrival
    seen = tl.atomic_add(CTR, 1, sem="acq_rel", scope="gpu") + 1
    while seen < target:
        seen = tl.atomic_add(CTR, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _topk_fine_counts(SC, H16, row_off, lo, hi, qpos, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    """Add the keys at positions [lo, hi) of a row into the row's 65536-bin histogram of their top 16
    bits, H16[(key >> 16) + 32768], one atomic per key; keys in level 0's bin 0 (-inf, NaN and
    negatives beyond -2^127: often thousands of -inf past a row's length) are left out."""
    for j in range(lo, hi, BLOCK):
        cols = j + tl.arange(0, BLOCK)
        ok = cols < hi
        _topk_block_fine_counts(_topk_keys(SC, row_off, cols, ok, qpos, CAUSAL), ok, H16)


@triton.jit
def _topk_block_fine_counts(key, ok, H16):
    """_topk_fine_counts for one block of keys."""
    fine = (key >> 16) + 32768
    tl.atomic_add(H16 + fine, 1, mask=ok & (fine >= 256), sem="relaxed", scope="gpu")


@triton.jit
def _topk_candidates(SC, CAND, NC, row_off, lo, hi, qpos, S, prefix, CAUSAL: tl.constexpr,
                     BLOCK: tl.constexpr):
    """The keys at positions [lo, hi) of a row whose top 16 bits equal ``prefix`` (the candidates for
    the k-th largest) appended to the row's list CAND as int64 sort keys (key << 32) | (S - 1 -
    position), at slots reserved with one atomic on the row's count NC; returns how many keys there
    are above the candidates (all taken)."""
    n_gt = 0
    n_c = 0
    for j in range(lo, hi, BLOCK):
        cols = j + tl.arange(0, BLOCK)
        ok = cols < hi
        gt, c = _topk_block_ties(_topk_keys(SC, row_off, cols, ok, qpos, CAUSAL) >> 16, ok, prefix)
        n_gt += gt
        n_c += c
    slot = tl.atomic_add(NC, n_c, sem="relaxed", scope="gpu")
    for j in range(lo, hi, BLOCK):
        cols = j + tl.arange(0, BLOCK)
        ok = cols < hi
        key = _topk_keys(SC, row_off, cols, ok, qpos, CAUSAL)
        slot = _topk_store(CAND, slot, ok & ((key >> 16) == prefix), key, cols, S, False)
    return n_gt


@triton.jit
def _topk_candidate_threshold(CAND, n_cand, k_rem, lo, S, CB: tl.constexpr):
    """(the k_rem-th largest of the row's n_cand candidate sort keys, how many of the k_rem largest sit
    at positions before lo): each candidate's rank counted against all of them (n_cand^2 comparisons;
    the sort keys are distinct, so exactly one has rank k_rem - 1)."""
    thr = tl.full([], -9223372036854775808, tl.int64)
    taken_before = 0
    for i0 in range(0, n_cand, CB):
        i = i0 + tl.arange(0, CB)
        xi = tl.load(CAND + i, mask=i < n_cand, other=0, volatile=True)
        rank = tl.zeros([CB], dtype=tl.int32)
        for j0 in range(0, n_cand, CB):
            j = j0 + tl.arange(0, CB)
            xj = tl.load(CAND + j, mask=j < n_cand, other=0, volatile=True)
            rank += tl.sum(((xj[None, :] > xi[:, None]) & (j < n_cand)[None, :]).to(tl.int32), 1)
        valid = i < n_cand
        thr = tl.maximum(thr, tl.max(tl.where(valid & (rank == k_rem - 1), xi, thr), 0))
        taken = valid & (rank < k_rem) & ((S - 1 - (xi & 0xFFFFFFFF)) < lo)
        taken_before += tl.sum(taken.to(tl.int32), 0)
    return thr, taken_before


@triton.jit
def _topk_take_sorted_from(SC, row_off, lo, hi, qpos, S, thr, slot, DST, CAUSAL: tl.constexpr,
                           BLOCK: tl.constexpr, POSITIONS: tl.constexpr):
    """_topk_take for the candidate path: every key at positions [lo, hi) whose sort key is at least
    ``thr`` (the k-th largest sort key: every key above the candidates, and the taken candidates),
    stored in position order from DST[slot] on."""
    for j in range(lo, hi, BLOCK):
        cols = j + tl.arange(0, BLOCK)
        ok = cols < hi
        key = _topk_keys(SC, row_off, cols, ok, qpos, CAUSAL)
        slot = _topk_store(DST, slot, ok & (_topk_sort_key(key, cols, S) >= thr), key, cols, S, POSITIONS)


@triton.jit
def _topk_fused(SC, HIST, CTR, CNT, H16, CAND, OUT, S, T, chunk, stride_r, stride_out, k_eff, topk, N_CHUNK,
                CAUSAL: tl.constexpr, BLOCK: tl.constexpr, BCH: tl.constexpr, POSITIONS: tl.constexpr,
                CAND_MAX: tl.constexpr = 0, CB: tl.constexpr = 64, PDL: tl.constexpr = False,
                CHUNK: tl.constexpr = 0, MATCH_MAX: tl.constexpr = 0, EARLY: tl.constexpr = True,
                PRE: tl.constexpr = False):
    """The multi-program radix select of _topk_hist x 4, _topk_count and _topk_write in ONE launch:
    the programs of a row (one per chunk) meet at a row barrier (_row_sync) after each histogram
    level and after the count, instead of at kernel boundaries (a decode row: ~4 us a launch). HIST
    [R, 4, 256] and CTR [R, 2] start at zero. Writes SEL-style int64 sort keys into OUT's row (for
    _topk_rank) or, with POSITIONS, the positions (-1 for a -inf score) in position order; the last
    chunk fills slots k_eff..topk with -1. PDL: the next kernel may launch once every program has
    started (so all of them are resident before any later kernel takes SM slots); wait for the previous.

    CAND_MAX > 0: two barriers instead of five when they suffice. Level 0's pass also fills the row's
    65536-bin histogram of the keys' top 16 bits (H16 [R, 65536], zero at launch), so its barrier
    settles levels 0 and 1 together; if the keys sharing the chosen 16 bits (the candidates) are at
    most CAND_MAX, each program appends its own to the row's list CAND [R, CAND_MAX] and counts the
    keys above them, and after ONE more barrier every program finds the k-th largest among the
    candidates by ranking them (ties broken by position, as everywhere here) and writes its taken keys
    at once. Otherwise (more candidates; or the k-th key in level 0's bin 0, e.g. a row with fewer
    finite scores than k) the remaining levels run as above, every program taking the same branch
    (each decides from the same row totals). CHUNK > 0 (a power of two >= chunk): each program reads its
    chunk's scores once into registers (_topk_chunk_keys) and every pass works on them; else each
    pass reads them again in BLOCK steps. MATCH_MAX: _topk_level_adds (levels 1-3). EARLY:
    _topk_chunk_keys. PRE: the launch before (dsa_index_scores' ``topk_scratch``) already added level
    0's histogram and (CAND_MAX > 0) the 16-bit one: no pass, no barrier before the first descent."""
    r, c, lo, hi, key, cols, ok = _topk_chunk_keys(SC, S, T, chunk, stride_r, N_CHUNK, CHUNK, CAUSAL, PDL,
                                                   EARLY)
    pid = r * N_CHUNK + c
    hist = HIST + r.to(tl.int64) * (4 * 256)
    ctr = CTR + r * 2  # the row's barrier counter, then its candidate count
    row_off = r.to(tl.int64) * stride_r
    qpos = S - T + r % T
    bins = tl.arange(0, _TOPK_BINS)
    prefix = tl.zeros([], dtype=tl.int32)
    k_rem = k_eff
    if not PRE:
        _topk_level_adds(SC, hist, row_off, lo, hi, qpos, key, ok, prefix, k_rem, 0, CAUSAL, BLOCK, CHUNK, 0)
        if CAND_MAX > 0:
            if CHUNK > 0:
                _topk_block_fine_counts(key, ok, H16 + r.to(tl.int64) * 65536)
            else:
                _topk_fine_counts(SC, H16 + r.to(tl.int64) * 65536, row_off, lo, hi, qpos, CAUSAL, BLOCK)
        _row_sync(ctr, N_CHUNK)
    base: tl.constexpr = 0 if PRE else 1  # row barriers passed so far
    prefix, k_rem, n_match = _topk_descend(tl.load(hist + bins, volatile=True), k_rem, prefix, 0)
    levels = tl.full([], 1, tl.int32)  # levels settled
    n_cand = tl.full([], CAND_MAX + 1, tl.int32)  # not the candidate path unless set below
    if CAND_MAX > 0:
        if prefix != -128:  # H16 holds the chosen level-0 bin's keys
            h1 = tl.load(H16 + r.to(tl.int64) * 65536 + (prefix + 128) * 256 + bins, volatile=True)
            b, k_rem = _topk_pick(h1, k_rem)
            n_cand = tl.sum(tl.where(bins == b, h1, 0), 0)
            n_match = n_cand
            prefix = prefix * 256 + b
            levels = tl.full([], 2, tl.int32)
    syncs = tl.full([], base, tl.int32)
    out = OUT + r.to(tl.int64) * stride_out
    done = tl.full([], 0, tl.int32)
    if CAND_MAX > 0:  # (a compile-time branch: no trace of the path in the kernel without it)
        if n_cand <= CAND_MAX:
            cand = CAND + r.to(tl.int64) * CAND_MAX
            if CHUNK > 0:
                n_gt, n_c = _topk_block_ties(key >> 16, ok, prefix)
                slot = tl.atomic_add(ctr + 1, n_c, sem="relaxed", scope="gpu")
                _topk_store(cand, slot, ok & ((key >> 16) == prefix), key, cols, S, False)
            else:
                n_gt = _topk_candidates(SC, cand, ctr + 1, row_off, lo, hi, qpos, S, prefix, CAUSAL, BLOCK)
            tl.store(CNT + pid * 2, n_gt)
            _row_sync(ctr, (base + 1) * N_CHUNK)
            thr_sk, taken_before = _topk_candidate_threshold(cand, n_cand, k_rem, lo, S, CB)
            ch = tl.arange(0, BCH)
            cnt = CNT + (r * N_CHUNK).to(tl.int64) * 2
            slot = tl.sum(tl.load(cnt + ch * 2, mask=ch < c, other=0, volatile=True), 0) + taken_before
            if CHUNK > 0:
                _topk_store(out, slot, ok & (_topk_sort_key(key, cols, S) >= thr_sk), key, cols, S, POSITIONS)
            else:
                _topk_take_sorted_from(SC, row_off, lo, hi, qpos, S, thr_sk, slot, out, CAUSAL, BLOCK,
                                       POSITIONS)
            done = tl.full([], 1, tl.int32)
    if done == 0:
        for LEVEL in tl.static_range(1, 4):
            if LEVEL >= levels:
                _topk_level_adds(SC, hist + LEVEL * 256, row_off, lo, hi, qpos, key, ok, prefix, n_match,
                                 LEVEL, CAUSAL, BLOCK, CHUNK, MATCH_MAX)
                syncs += 1
                _row_sync(ctr, syncs * N_CHUNK)
                h = tl.load(hist + LEVEL * 256 + bins, volatile=True)  # the row's whole level histogram
                prefix, k_rem, n_match = _topk_descend(h, k_rem, prefix, LEVEL)
        thr = prefix  # the k-th largest key; k_rem of the keys equal to it are taken
        if CHUNK > 0:
            n_gt, n_eq = _topk_block_ties(key, ok, thr)
        else:
            n_gt, n_eq = _topk_tie_counts(SC, row_off, lo, hi, qpos, thr, CAUSAL, BLOCK)
        tl.store(CNT + pid * 2, n_gt)
        tl.store(CNT + pid * 2 + 1, n_eq)
        _row_sync(ctr, (syncs + 1) * N_CHUNK)
        ch = tl.arange(0, BCH)
        before = ch < c
        cnt = CNT + (r * N_CHUNK).to(tl.int64) * 2
        gt_before = tl.sum(tl.load(cnt + ch * 2, mask=before, other=0, volatile=True), 0)
        eq_seen = tl.sum(tl.load(cnt + ch * 2 + 1, mask=before, other=0, volatile=True), 0)
        slot = gt_before + tl.minimum(eq_seen, k_rem)
        if CHUNK > 0:
            _topk_block_take(key, cols, ok, thr, k_rem, slot, eq_seen, out, S, POSITIONS)
        else:
            _topk_take(SC, row_off, lo, hi, qpos, thr, k_rem, slot, eq_seen, out, S, CAUSAL, BLOCK, POSITIONS)
    if c == N_CHUNK - 1:
        for j in range(k_eff, topk, BLOCK):
            fill = j + tl.arange(0, BLOCK)
            tl.store(out + fill, tl.full([BLOCK], -1, tl.int64), mask=fill < topk)


@triton.jit
def _topk_rank(SEL, OUT, S, k_eff, stride_sel, stride_out, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Sort a row's k_eff taken keys by ranking: each of BLOCK_I keys counts the keys bigger than
    it (all distinct: they carry the position) and lands at that slot as a position, -1 for a -inf
    score. k_eff^2 comparisons spread over k_eff / BLOCK_I programs per row."""
    r = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok_i = i < k_eff
    sel = SEL + r * stride_sel
    xi = tl.load(sel + i, mask=ok_i, other=0)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, k_eff, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        xj = tl.load(sel + j, mask=j < k_eff, other=0)
        bigger = (xj[None, :] > xi[:, None]) & (j < k_eff)[None, :]
        rank += tl.sum(bigger.to(tl.int32), 1)
    pos = (S - 1 - (xi & 0xFFFFFFFF)).to(tl.int64)
    pos = tl.where((xi >> 32).to(tl.int32) == _KEY_NEG_INF, -1, pos)
    tl.store(OUT + r * stride_out + rank, pos, mask=ok_i)

@triton.jit
def _topk_row(SC, OUT, SEL, S, T, stride_r, stride_out, stride_sel, k_eff, topk,
              CAUSAL: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr, SORT: tl.constexpr,
              POSITIONS: tl.constexpr):
    """The whole top-k of one short row per program (decode and short prefill rows): the four
    histogram levels of _topk_hist with the histograms in registers (no atomics, no zero fill),
    then the earliest `need` ties and every key above the k-th written in position order as the
    int64 sort keys of _topk_write, and -1 in OUT's slots k_eff..topk. SORT: the keys go into OUT's
    own row (topk >= k_eff slots: no scratch buffer), are read back, sorted descending (bitonic,
    KP = next power of two >= k_eff) and stored as positions (-1 for a -inf score): one launch.
    Else they go to SEL's row for _topk_rank (a second launch). POSITIONS (not SORT): the positions
    themselves go into OUT in position order (-1 for a -inf score): the unsorted result, one launch."""
    r = tl.program_id(0)
    row_off = r.to(tl.int64) * stride_r
    out = OUT + r.to(tl.int64) * stride_out
    sel = out if (SORT or POSITIONS) else SEL + r.to(tl.int64) * stride_sel
    qpos = S - T + r % T
    prefix = tl.zeros([], dtype=tl.int32)
    k_rem = k_eff
    for LEVEL in tl.static_range(4):
        counts = _topk_level_counts(SC, row_off, 0, S, qpos, prefix, LEVEL, CAUSAL, BLOCK)
        prefix, k_rem, _ = _topk_descend(counts, k_rem, prefix, LEVEL)
    thr = prefix  # the k-th largest key; k_rem of the keys equal to it are taken
    zero = tl.zeros([], dtype=tl.int32)
    _topk_take(SC, row_off, 0, S, qpos, thr, k_rem, zero, zero, sel, S, CAUSAL, BLOCK, POSITIONS)
    if SORT:
        tl.debug_barrier()  # the row's sort keys, stored by all threads, are read back by all
        i = tl.arange(0, KP)
        xi = tl.load(out + i, mask=i < k_eff, other=0)
        xi = tl.where(i < k_eff, xi, -9223372036854775808)  # padding sorts last
        tl.debug_barrier()  # every key is read before any slot is overwritten
        xi = tl.sort(xi, descending=True)
        pos = (S - 1 - (xi & 0xFFFFFFFF)).to(tl.int64)
        pos = tl.where((xi >> 32).to(tl.int32) == _KEY_NEG_INF, -1, pos)
        tl.store(out + i, pos, mask=i < k_eff)
    for j in range(k_eff, topk, BLOCK):
        cols = j + tl.arange(0, BLOCK)
        tl.store(out + cols, tl.full([BLOCK], -1, tl.int64), mask=cols < topk)

# ---------------------------------------------------------------------------------------------
# host side


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return output_buffer(shape, dtype, device, POISON_OUTPUTS)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def _precision(dtype: torch.dtype) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "tf32"  # ignored for 16-bit operands
    if dtype == torch.float32:
        return "ieee"  # float32 inputs get float32 products (tf32 would cost ~3e-4 relative error)
    raise ValueError(f"q: the Triton kernels take bfloat16, float16 or float32, got {dtype}")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, so the tests exercise the combine path


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _value_is_key_prefix(k: torch.Tensor, v: torch.Tensor) -> bool:
    """v is k[..., :D_v] (same storage, strides): MLA's absorbed value, loaded with the key."""
    return (
        v.shape[-1] <= k.shape[-1]
        and v.data_ptr() == k.data_ptr()
        and v.stride() == k.stride()
        and v.shape[:-1] == k.shape[:-1]
    )


def _key_split(D: int, D_v: int, v_is_k: bool) -> tuple[int, int, int, int]:
    """Key dims as a main part (the value columns when v is a prefix of k) and a tail: DK1, BD1, DK2, BD2."""
    dk1 = D_v if v_is_k else D
    dk2 = D - dk1
    return dk1, _pow2(dk1), dk2, (_pow2(dk2) if dk2 else 16)


def _n_splits(programs: int, n_slots: int, block_n: int, device: torch.device, min_steps: int = 4) -> int:
    """How many programs share one (query, head block)'s slots. 1 when the programs alone give
    PROGRAMS_PER_SM per SM (prefill). Otherwise the split count, up to twice what reaches that
    target, whose total fills its waves best (a quarter-full last wave costs a whole wave: 32 rows
    x 2 head blocks x 5 splits = 320 programs is 2.4 waves on 132 SMs, 4 splits fill 2), nearest
    the target on ties; each split keeps at least min_steps steps of block_n slots."""
    sms = _num_sms(device)
    want = PROGRAMS_PER_SM * sms
    if programs >= want:
        return 1
    most = max(1, min(2 * triton.cdiv(want, programs), n_slots // (min_steps * block_n)))

    def score(s: int) -> tuple[float, int]:
        total = programs * s
        fill = total / (triton.cdiv(total, sms) * sms)  # busy fraction of the SM-waves it occupies
        return round(min(fill, total / want), 2), -abs(total - want)

    return max(range(1, most + 1), key=score)


def _config_key(tuning: str, cfg: dict) -> tuple:
    return (tuning, *sorted(cfg.items()))


def _launch_configs(tuning: str) -> list[dict]:
    """TUNING[tuning] (for "decode_row" then "decode_narrow"'s: its 64-slot blocks in 3 stages take
    ~220 KB of shared memory, which an H100 has and smaller GPUs do not), then FALLBACK, minus the
    shapes that already failed to compile here."""
    out = []
    first = [TUNING[tuning], TUNING["decode_narrow"]] if tuning == "decode_row" else [TUNING[tuning]]
    for cfg in [*first, *FALLBACK]:
        if _config_key(tuning, cfg) not in _FAILED_CONFIGS and cfg not in out:
            out.append(cfg)
    return out or [TUNING[tuning]]


def _launch_errors() -> tuple:
    errs: list = [RuntimeError]  # MLIR pass failures surface as RuntimeError
    try:
        from triton.runtime.errors import OutOfResources
        errs.append(OutOfResources)
    except ImportError:
        pass
    try:
        from triton.compiler.errors import CompilationError
        errs.append(CompilationError)
    except ImportError:
        pass
    return tuple(errs)


_LAUNCH_ERRORS = _launch_errors()


def _is_compile_failure(e: BaseException) -> bool:
    """A launch shape this GPU / Triton version cannot build (not a CUDA fault or an OOM)."""
    if isinstance(e, torch.OutOfMemoryError):
        return False
    if type(e).__name__ in ("OutOfResources", "CompilationError"):
        return True
    msg = str(e)
    return any(word in msg for word in ("PassManager", "out of resource", "ptxas", "MLIR"))


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    gather: int,
    n_slots: int,
    idx: torch.Tensor | None = None,
    n_valid: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    page: int = 1,
    tuning: str = "sparse",
    n_splits: int | None = None,
    prefetch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared launcher. q [B, T, H, D]; k [B|1, rows, H_kv, D] (paged: [1, pages*page, H_kv, D]);
    v likewise with D_v. Returns o [B, T, H, D_v] in q's dtype and lse float32 [B, T, H] (base 2,
    +inf for rows with no valid slot)."""
    D, D_v, n_rows = q.shape[3], v.shape[3], k.shape[1]
    prec = _precision(q.dtype)
    v_is_k = _value_is_key_prefix(k, v)
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    dk1, bd1, dk2, bd2 = _key_split(D, D_v, v_is_k)
    # int64 row offsets only when a row offset can pass int32 (caches of > 2^31 elements)
    row64 = FORCE_ROW64 or max(n_rows * k.stride(1), v.shape[1] * v.stride(1)) + D >= 2**31
    if q.dtype == torch.float32 and q.is_cuda and not _INTERPRET:
        tuning = "fp32"
    elif tuning == "decode" and q.shape[2] // k.shape[2] <= 32:
        tuning = "decode_row" if q.shape[0] * q.shape[1] == 1 else "decode_narrow"
    last_error = None
    for cfg in _launch_configs(tuning):
        try:
            return _attend_with(q, k, v, idx, n_valid, table, scale, gather, n_slots, page, n_splits, cfg,
                                dk1, bd1, dk2, bd2, v_is_k, prec, row64, prefetch)
        except _LAUNCH_ERRORS as e:  # shared memory / registers of a launch shape on this GPU/Triton
            if _INTERPRET or not q.is_cuda or not ALLOW_FALLBACK or not _is_compile_failure(e):
                raise
            last_error = e
            _FAILED_CONFIGS.add(_config_key(tuning, cfg))
            warnings.warn(f"attnlab.kernels.sparse: launch shape {cfg} for {tuning!r} failed "
                          f"({type(e).__name__}: {str(e)[:160]}); trying the next", stacklevel=2)
    raise RuntimeError(f"no launch shape for {tuning!r} compiled") from last_error


def _prefetch_bytes(t: torch.Tensor | None, limit: int) -> int:
    """How many of tensor t's first bytes a kernel may ask L2 for (_prefetch_share): at most ``limit``,
    a multiple of 16 from a 16-byte aligned start; 0 for none (no tensor, a misaligned one, limit 0)."""
    if t is None or limit <= 0 or t.data_ptr() % 16:
        return 0
    return min(limit, t.numel() * t.element_size()) // 16 * 16


def _attend_with(q, k, v, idx, n_valid, table, scale, gather, n_slots, page, n_splits, cfg,
                 dk1, bd1, dk2, bd2, v_is_k, prec, row64, prefetch=None):
    B, T, H, D = q.shape
    H_kv, D_v, n_rows = k.shape[2], v.shape[3], k.shape[1]
    G = H // H_kv
    block_h = min(cfg["BLOCK_H"], _pow2(G))
    n_hblk = triton.cdiv(G, block_h)
    bdv = _pow2(triton.cdiv(D_v, cfg.get("DVB", 1)))  # value columns per program
    n_dvb = triton.cdiv(D_v, bdv)
    # a top-k row (2048 slots) is short: let each split take a single block (H200, 128 heads, decode:
    # 32 splits of 64 slots 0.025 ms vs 8 splits 0.039 ms)
    min_steps = 1 if gather == _GATHER_INDEX else cfg.get("MIN_STEPS", 4)
    programs = B * T * H_kv * n_hblk * n_dvb
    splits = n_splits or min(_n_splits(programs, n_slots, cfg["BLOCK_N"], q.device, min_steps),
                             cfg.get("MAX_SPLITS", max(1, n_slots)))
    per_split = triton.cdiv(max(1, n_slots), splits)
    per_split = triton.cdiv(per_split, cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    splits = triton.cdiv(max(1, n_slots), per_split)
    o = _empty(B, T, H, D_v, dtype=q.dtype, device=q.device)
    lse = _empty(B, T, H, dtype=torch.float32, device=q.device)
    dummy = idx if idx is not None else (n_valid if n_valid is not None else q)
    if splits > 1:
        op = _empty(B * T * H, splits, D_v, dtype=torch.float32, device=q.device)
        lp = _empty(B * T * H, splits, dtype=torch.float32, device=q.device)
    else:
        op, lp = o, lse
    sb = lambda x, i: x.stride(i) if x.shape[i] > 1 else 0  # noqa: E731  (paged caches: one "batch")
    grid = (B * T * splits * n_dvb * n_hblk, H_kv)
    # A decode row over its top-k (DSA) chains with PDL (attnlab.kernels._pdl): H100, interleaved A/B
    # inside the ~1B decode steps (CUDA graph, twice each): deepseek-v32 (index + top-k + sparse
    # attention with PDL) 1.354 -> 1.297 ms at 4K, 1.431 -> 1.367 at 32K. The dense decode only where
    # its launch shape says so ("PDL" in TUNING["decode_row"]): with decode_narrow's 32-slot blocks it
    # made kimi-linear slower (its 4 M layers: 0.912 -> 0.920 ms at 4K, 0.959 -> 0.982 at 32K), and
    # deepseek-v3 at 32K (1.130 -> 1.147 with PF_BLOCKS 1); with 64-slot blocks and the early L2
    # requests (PF_SLOTS: whole key rows from a 16-byte aligned base) it is faster at every context.
    pdl = (T == 1 and (gather == _GATHER_INDEX or (gather == _GATHER_DENSE and cfg.get("PDL", 0)))
           and use_pdl(q.device))
    pf_ok = (pdl and gather == _GATHER_DENSE and v_is_k and n_valid is not None and k.data_ptr() % 16 == 0
             and (k.stride(1) * k.element_size()) % 16 == 0)
    pf_slots = cfg.get("PF_BLOCKS", 0) * cfg["BLOCK_N"] if pf_ok else 0
    nbytes = (_prefetch_bytes(prefetch, PREFETCH_NEXT_BYTES)
              if pdl and n_rows <= PREFETCH_NEXT_MAX_ROWS else 0)
    pf_next = {}
    if nbytes:  # the MLP's weights asked of L2 before the wait
        pf_next = dict(PF_NEXT=prefetch, pf_next_bytes=nbytes, PF_NEXT_CHUNK=PREFETCH_NEXT_CHUNK)
    _latent_attn_fwd[grid](
        q, k, v,
        idx if idx is not None else dummy,
        n_valid if n_valid is not None else dummy,
        table if table is not None else dummy,
        o, lse, op, lp,
        scale * LOG2E, T, G, n_hblk, splits, n_slots, per_split, n_rows,
        q.stride(0), q.stride(1), q.stride(2),
        sb(k, 0), k.stride(1), k.stride(2),
        sb(v, 0), v.stride(1), v.stride(2),
        idx.stride(0) if idx is not None else 0, idx.stride(1) if idx is not None else 0,
        table.stride(0) if table is not None else 0,
        o.stride(0), o.stride(1), o.stride(2),
        GATHER=gather, PAGE=page, DK1=dk1, BD1=bd1, DK2=dk2, BD2=bd2, D_V=D_v, BDV=bdv, NUM_DVB=n_dvb,
        V_IS_K=v_is_k, BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], SPLIT_OUT=splits > 1, PREC=prec,
        ROW64=row64, SHARE_QK=bool(cfg.get("SHARE_QK", 0)) and block_h >= 64, INTERP=_INTERPRET,
        PDL=pdl, PF_SLOTS=pf_slots, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pf_next,
        **launch_options(pdl),
    )
    if splits > 1:
        bdv_c, step = combine_shape(B * T * H, D_v, splits, q.device)
        _combine[(B * T * H, triton.cdiv(D_v, bdv_c))](
            op, lp, o, lse, T, H, splits, o.stride(0), o.stride(1), o.stride(2),
            D_V=D_v, BDV=bdv_c, BSPLIT=_pow2(splits, 2), SPLIT_STEP=step, PDL=pdl,
            ONE_LOAD=COMBINE_ONE_LOAD and _pow2(splits, 2) <= step, num_warps=4, **launch_options(pdl),
        )
    return o, lse


def combine_shape(rows: int, d_v: int, splits: int, device: torch.device) -> tuple[int, int]:
    """(BDV, SPLIT_STEP) of the combine over ``rows`` (query token, head) rows of ``splits`` partials
    (this module's, and attnlab.kernels.decode's GQA combine, whose CHUNK it gives).
    COMBINE_PROGRAMS_PER_SM 0: 128 value columns a program, 16 splits a load (the earlier shape: 64
    programs for a batch-1 MLA row, each 8 dependent loads). Otherwise the value columns are cut until
    there are about COMBINE_PROGRAMS_PER_SM programs per SM (at least 16 columns), and a load takes up
    to COMBINE_TILE partial elements (all 128 splits of 32 columns in one)."""
    if COMBINE_PROGRAMS_PER_SM <= 0:
        return min(128, _pow2(d_v)), min(16, _pow2(splits, 2))
    blocks = triton.cdiv(COMBINE_PROGRAMS_PER_SM * _num_sms(device), max(1, rows))
    bdv = max(16, min(128, _pow2(triton.cdiv(d_v, blocks))))
    return bdv, min(_pow2(splits, 2), max(16, COMBINE_TILE // bdv))


def _check_indices(indices: torch.Tensor, B: int, T: int, q: torch.Tensor) -> torch.Tensor:
    check_tensor("indices", indices, 3, "[B, T, topk]", shape=(B, T, None), dtypes=(torch.int64, torch.int32))
    check_same_device(q=q, indices=indices)
    return _last_contiguous(indices)


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_tensor("q", q, 4, "[B, T, H, D]")
    check_tensor("k", k, 4, "[B, S, H_kv, D]", shape=(q.shape[0], None, None, q.shape[3]))
    check_tensor("v", v, 4, "[B, S, H_kv, D_v]", shape=(q.shape[0], k.shape[1], k.shape[2], None))
    check_same_device(q=q, k=k, v=v)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {x.dtype} differs from q's {q.dtype}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"q has {q.shape[2]} heads, not a multiple of k's {k.shape[2]} heads")
    _precision(q.dtype)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, scale, n_splits):
        o, lse = _attend(q, k, v, scale, _GATHER_INDEX, indices.shape[2], idx=indices, n_splits=n_splits)
        ctx.save_for_backward(q, k, v, indices, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, indices, o, lse = ctx.saved_tensors
        combine = ctx.needs_input_grad[1] and ctx.needs_input_grad[2] and _value_is_key_prefix(k, v)
        dq, dk, dv = _sparse_backward(q, k, v, indices, o, lse, do, ctx.scale, combine)
        return dq, dk, dv, None, None, None


def _sparse_backward(q, k, v, indices, o, lse, do, scale, combine_kv: bool):
    """dq, dk, dv (dv None when combine_kv: v is k[..., :D_v] and both need a gradient, so the value
    gradient is added into dk's first D_v columns, one atomic per latent element)."""
    B, T, H, D = q.shape
    S, H_kv, D_v = k.shape[1], k.shape[2], v.shape[3]
    G = H // H_kv
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    do = _last_contiguous(do.to(q.dtype))
    delta = (o.float() * do.float()).sum(-1).contiguous()  # (B, T, H)  Σ_d o do, as FlashAttention-2
    dq = torch.zeros(B, T, H, D, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B, S, H_kv, D, dtype=torch.float32, device=q.device)
    dv = dk if combine_kv else torch.zeros(B, S, H_kv, D_v, dtype=torch.float32, device=q.device)
    if combine_kv or (D > 128 and D_v < D):  # key dims split at the value width (smaller dq tiles)
        dk1, bd1, dk2, bd2 = _key_split(D, D_v, True)
    else:
        dk1, bd1, dk2, bd2 = _key_split(D, D_v, False)
    cfg = TUNING["sparse_bwd"]
    block_h = min(cfg["BLOCK_H"], _pow2(G))
    n_hblk = triton.cdiv(G, block_h)
    _sparse_bwd[(B * T * n_hblk, H_kv)](
        q, k, v, indices, do, lse, delta, dq, dk, dv,
        scale * LOG2E, T, G, n_hblk, indices.shape[2], S,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        indices.stride(0), indices.stride(1),
        do.stride(0), do.stride(1), do.stride(2),
        DK1=dk1, BD1=bd1, DK2=dk2, BD2=bd2, D_V=D_v, BDV=_pow2(D_v), V_IS_K=combine_kv,
        BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], PREC=_precision(q.dtype), INTERP=_INTERPRET,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dq.to(q.dtype), dk.to(k.dtype), (None if combine_kv else dv.to(v.dtype))


# ---------------------------------------------------------------------------------------------
# public functions


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    n_splits: int | None = None,
    prefetch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of each query over its selected key rows (``attnlab.ops.sparse_attention``).

    Args:
        q: [B, T, H, D] bf16 / fp16 / fp32. k: [B, S, H_kv, D]; v: [B, S, H_kv, D_v] (MLA absorbed:
            H_kv = 1, D = 576 and v = k[..., :512], a view, which is then read once with the key).
        indices: int64/int32 [B, T, topk] shared across heads; negative or >= S = empty slot.
        scale: logit scale; None = D ** -0.5.
        n_splits: programs per (query, head block) over the slots; None = enough to fill the GPU
            (decode), 1 for prefill. Tests set it to exercise the split-and-combine path.
        prefetch: a decode launch under PDL (one query row, Hopper) also asks L2 for the first
            ``PREFETCH_NEXT_BYTES`` of this tensor's bytes (a hint: weights a later kernel reads; the
            result never depends on it). Ignored elsewhere.

    Returns:
        o: [B, T, H, D_v] in q's dtype, float32 softmax; 0 for a query with no valid slot.
        Differentiable in q, k, v (Triton backward with float32 atomics on the selected rows).
    """
    _check_attention(q, k, v)
    B, T, H, D = q.shape
    indices = _check_indices(indices, B, T, q)
    scale = D**-0.5 if scale is None else float(scale)
    if indices.shape[2] == 0 or T == 0:
        return torch.zeros(B, T, H, v.shape[3], dtype=q.dtype, device=q.device)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _SparseAttention.apply(q, k, v, indices, scale, n_splits)
    return _attend(q, k, v, scale, _GATHER_INDEX, indices.shape[2], idx=indices, n_splits=n_splits,
                   prefetch=prefetch)[0]


def softmax_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_valid: torch.Tensor,
    scale: float | None = None,
    n_splits: int | None = None,
) -> torch.Tensor:
    """One query token per row over a dense cache (``attnlab.ops.softmax_decode``), split-K.

    Args:
        q: [B, H_q, D]; k_cache [B, S_max, H_kv, D]; v_cache [B, S_max, H_kv, D_v]; same dtype.
            MLA absorbed decode: H_kv = 1, D = 576, v_cache = k_cache[..., :512] (read once).
        n_valid: int64/int32 [B]; row b attends to slots 0..n_valid[b]-1 (clamped to [0, S_max]).
            Slots past n_valid are never read (NaN there is harmless). No host sync.
        scale: logit scale; None = D ** -0.5.
        n_splits: programs per (row, head block) over the sequence; None = enough to fill the GPU.

    Returns:
        o: [B, H_q, D_v] in q's dtype; 0 for a row with n_valid = 0. Inference only (no autograd).
    """
    check_tensor("q", q, 3, "[B, H_q, D]")
    check_tensor("n_valid", n_valid, 1, "[B]", shape=(q.shape[0],), dtypes=(torch.int64, torch.int32))
    _check_attention(q[:, None], k_cache, v_cache)
    check_same_device(q=q, n_valid=n_valid)
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else float(scale)
    o, _ = _attend(q[:, None], k_cache, v_cache, scale, _GATHER_DENSE, k_cache.shape[1],
                   n_valid=n_valid, tuning="decode", n_splits=n_splits)
    return o[:, 0]  # (B, H_q, D_v)


def latent_causal_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_valid: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense causal attention of T queries over a cache, with the decode kernel (no top-k): the
    queries of row b are the LAST T of its n_valid[b] positions, so query t sees positions
    0..n_valid[b]-T+t. MLA absorbed prefill over the latent cache (H_kv = 1, D = 576,
    v_cache = k_cache[..., :512]) — the dense baseline DSA is compared with, and chunked prefill.

    Args:
        q: [B, T, H_q, D]; k_cache [B, S_max, H_kv, D]; v_cache [B, S_max, H_kv, D_v]; same dtype.
        n_valid: int64/int32 [B] (clamped to [0, S_max]); a query with no visible position outputs 0.
        scale: logit scale; None = D ** -0.5.

    Returns:
        o: [B, T, H_q, D_v] in q's dtype. Inference only (no autograd).
    """
    check_tensor("n_valid", n_valid, 1, "[B]", shape=(q.shape[0],), dtypes=(torch.int64, torch.int32))
    _check_attention(q, k_cache, v_cache)
    check_same_device(q=q, n_valid=n_valid)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    S_max = k_cache.shape[1]
    o, _ = _attend(q, k_cache, v_cache, scale, _GATHER_DENSE, S_max, n_valid=n_valid, tuning="decode")
    return o


def paged_decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    n_valid: torch.Tensor,
    scale: float | None = None,
    n_splits: int | None = None,
) -> torch.Tensor:
    """``softmax_decode`` over a paged cache (vLLM / FlashMLA layout).

    Args:
        q: [B, H_q, D]. k_pages: [N_pages, page_size, H_kv, D]; v_pages: [N_pages, page_size, H_kv, D_v]
            (MLA: v_pages = k_pages[..., :512]).
        block_table: int32/int64 [B, max_pages]; position p of row b lives in page
            block_table[b, p // page_size] at offset p % page_size.
        n_valid: int64/int32 [B], positions 0..n_valid[b]-1 (clamped to max_pages * page_size).
        scale, n_splits: as in :func:`softmax_decode`.

    Returns:
        o: [B, H_q, D_v] in q's dtype.
    """
    check_tensor("q", q, 3, "[B, H_q, D]")
    check_tensor("k_pages", k_pages, 4, "[N_pages, page_size, H_kv, D]",
                 shape=(None, None, None, q.shape[-1]))
    check_tensor("v_pages", v_pages, 4, "[N_pages, page_size, H_kv, D_v]", shape=(*k_pages.shape[:3], None))
    check_tensor("block_table", block_table, 2, "[B, max_pages]", shape=(q.shape[0], None),
                 dtypes=(torch.int32, torch.int64))
    check_tensor("n_valid", n_valid, 1, "[B]", shape=(q.shape[0],), dtypes=(torch.int64, torch.int32))
    check_same_device(q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table, n_valid=n_valid)
    P = k_pages.shape[1]
    k_flat = k_pages.view(1, -1, *k_pages.shape[2:])  # (1, N_pages * P, H_kv, D)
    v_flat = (k_flat[..., : v_pages.shape[-1]] if _value_is_key_prefix(k_pages, v_pages)
              else v_pages.reshape(1, -1, *v_pages.shape[2:]))  # (1, N_pages * P, H_kv, D_v)
    _check_attention(q[:1, None], k_flat, v_flat)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, _ = _attend(q[:, None], k_flat, v_flat, scale, _GATHER_PAGED, block_table.shape[1] * P,
                   n_valid=n_valid, table=_last_contiguous(block_table), page=P, tuning="decode",
                   n_splits=n_splits)
    return o[:, 0]  # (B, H_q, D_v)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric float8 e4m3 quantisation over the last dim (DeepSeek-V3.2 keeps its index
    keys this way). x [..., D] -> (x8 float8_e4m3fn [..., D], scale float32 [...]), x ≈ x8 * scale."""
    amax = x.detach().abs().amax(-1).float().clamp_min(1e-12)  # (...)
    scale = amax / FP8_MAX
    x8 = (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x8, scale


def dsa_index_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    causal: bool = False,
    n_valid: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    topk_scratch: torch.Tensor | None = None,
    topk: int | None = None,
) -> torch.Tensor:
    """Lightning-indexer scores ``I[b,t,s] = Σ_j w[b,t,j] relu(q[b,t,j]·k[b,s])`` (the op's kernel).

    Args:
        q: [B, T, H_I, D_I] bf16 / fp16 / fp32 (fp32 runs in full float32 products).
        k: [B, S, D_I], q's dtype; or float8_e4m3fn with ``k_scale`` float32 [B, S] (from
            :func:`quantize_fp8_rows`): then q is quantised per (token, head) row and the products
            run in FP8 on the tensor cores (Hopper / Ada), accumulating in float32.
        w: [B, T, H_I] head weights, every scale folded in.
        causal: False (the op's contract): every score. True: queries are the last T of S; scores of
            keys after the query are -inf and never computed (what ``dsa_topk`` would mask anyway).
        n_valid: int64/int32 [B] or None: keys s >= n_valid[b] score -inf and are never read (decode
            over a preallocated cache: the work follows the rows' lengths, not the buffer's).
        zero: None, or a contiguous int32 buffer the same launch sets to zero: the top-k's ``scratch``
            (``dsa_topk``), so that no fill launch sits between the two.
        topk_scratch, topk: decode rows (T = 1) only, instead of ``zero``: the scratch of the
            ``dsa_topk(scores, topk, causal=False, scratch=topk_scratch, prefilled=True)`` that
            follows (``topk_scratch_numel(B, 1, S, topk)`` int32s, > 0, ALREADY zero: an earlier
            launch cleared it, e.g. ``latent_write(..., zero=...)``). The same launch adds the top-k's
            first histogram level (and on its candidate path the 16-bit histogram) of the scores it
            writes into it, so the top-k skips that pass: one launch (multi-program path) or one row
            barrier (fused path) fewer.

    Returns:
        I: float32 [B, T, S]. Inference only (no autograd; the op's torch path has the gradient).
    """
    check_tensor("q", q, 4, "[B, T, H_I, D_I]")
    fp8 = k_scale is not None
    k_dtypes = (torch.float8_e4m3fn,) if fp8 else None
    check_tensor("k", k, 3, "[B, S, D_I]", shape=(q.shape[0], None, q.shape[3]), dtypes=k_dtypes)
    check_tensor("w", w, 3, "[B, T, H_I]", shape=q.shape[:3])
    check_same_device(q=q, k=k, w=w, k_scale=k_scale, n_valid=n_valid)
    B, T, H, D = q.shape
    S = k.shape[1]
    if n_valid is not None:
        check_tensor("n_valid", n_valid, 1, "[B]", shape=(B,), dtypes=(torch.int64, torch.int32))
    if zero is not None:
        _check_scratch("zero", zero, q.device)
    pre, fine_at = _prefill_layout(topk_scratch, topk, zero, B, T, S, q.device)
    if fp8:
        check_tensor("k_scale", k_scale, 2, "[B, S]", shape=(B, S), dtypes=(torch.float32,))
        q, q_scale = quantize_fp8_rows(q)  # (B, T, H, D) e4m3, (B, T, H)
        w = w.float() * q_scale
        prec = "tf32"
    else:
        if k.dtype != q.dtype:
            raise ValueError(f"k: dtype {k.dtype} differs from q's {q.dtype} (pass k_scale for float8 keys)")
        prec = _precision(q.dtype)
    if causal and S < T:
        raise ValueError(f"k: causal scores need S >= T (queries are the last T of S), got S={S}, T={T}")
    q, k, w = _last_contiguous(q), _last_contiguous(k), _last_contiguous(w)
    out = _empty(B, T, S, dtype=torch.float32, device=q.device)
    if T == 0 or S == 0:
        if zero is not None:
            zero.zero_()
        return out
    cfg = TUNING["index_decode" if T == 1 else "index"]
    bh = _pow2(H, 1)
    block_t = max(1, min(cfg["BLOCK_T"], 128 // bh)) if bh < 128 else 1
    block_t = min(block_t, _pow2(T, 1))  # decode (T = 1): no tile rows of absent queries
    block_t = max(block_t, triton.cdiv(16, bh))  # the dot needs >= 16 rows
    n_tblk = triton.cdiv(T, block_t)
    s_chunk = cfg["S_CHUNK"]
    if T == 1:  # decode: chunks small enough for ~INDEX_DECODE_PROGRAMS_PER_SM programs per SM
        sms = _num_sms(q.device)
        chunk = _pow2(triton.cdiv(B * S, INDEX_DECODE_PROGRAMS_PER_SM * sms), 1)
        if chunk < INDEX_DECODE_MIN_CHUNK:  # short rows: down to one program per SM, chunks up to that
            chunk = min(INDEX_DECODE_MIN_CHUNK, _pow2(triton.cdiv(B * S, sms), 1))
        s_chunk = min(s_chunk, max(cfg["BLOCK_S"], chunk))
    s_chunk = triton.cdiv(s_chunk, cfg["BLOCK_S"]) * cfg["BLOCK_S"]
    n_schunk = triton.cdiv(S, s_chunk)
    ks = k_scale if fp8 else out
    pdl = T == 1 and use_pdl(q.device)  # decode: chained with PDL (attnlab.kernels._pdl)
    _index_scores_kernel[(B * n_tblk * n_schunk,)](
        q, k, w, ks, n_valid if n_valid is not None else out, out, T, S, H, n_tblk, n_schunk, s_chunk,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1),
        w.stride(0), w.stride(1),
        ks.stride(0),
        out.stride(0), out.stride(1),
        D=D, BD=_pow2(D), BH=bh, BLOCK_T=block_t, BLOCK_S=cfg["BLOCK_S"],
        FP8=fp8, CAUSAL=causal, HAS_NV=n_valid is not None, PREC=prec, INTERP=_INTERPRET, PDL=pdl,
        ZERO=zero, N_ZERO=zero.numel() if zero is not None else 0, ZERO_BLOCK=1024 if zero is not None else 0,
        KEY_ROWS=INDEX_KEY_ROWS and T == 1,
        HIST=topk_scratch, H16=topk_scratch[fine_at:] if pre > 1 else None, PRE=pre,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_options(pdl),
    )
    return out


def _prefill_layout(scratch: torch.Tensor | None, topk: int | None, zero: torch.Tensor | None, B: int, T: int,
                    S: int, device: torch.device) -> tuple[int, int]:
    """dsa_index_scores' (PRE, offset of the 16-bit histograms in ``scratch``) for its ``topk_scratch``
    and ``topk`` (PRE 0: none given), after checking them."""
    if scratch is None and topk is None:
        return 0, 0
    if scratch is None or topk is None:
        raise ValueError("topk_scratch, topk: give both (the scratch of the top-k that follows, and its k) "
                         "or neither")
    if zero is not None:
        raise ValueError("zero: not with topk_scratch (an earlier launch zeroes that; this one adds to it)")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected an int >= 1, got {topk!r}")
    if T != 1:
        raise ValueError(f"topk_scratch: decode rows only (q with T = 1), got T = {T}")
    _check_scratch("topk_scratch", scratch, device)
    need = topk_scratch_numel(B, 1, S, topk, device)
    if need == 0:
        raise ValueError(f"topk_scratch: the top-k of {topk} over {B} row(s) of {S} scores takes no scratch "
                         f"(topk_scratch_numel is 0): pass neither")
    if scratch.numel() < need:
        raise ValueError(f"topk_scratch: {scratch.numel()} int32 elements, this top-k needs {need} "
                         f"(topk_scratch_numel)")
    path, _ = _topk_plan(B, S, min(topk, S), device)
    if path == "fused" and _topk_candidates_max(B, S):
        return 2, _topk_fused_fine_at(B)
    return 1, 0


def _check_scratch(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous 1-D int32 buffer, got {t.dtype} of shape "
                         f"{tuple(t.shape)} and strides {t.stride()}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, the other tensors on {device}")


# Decode (T = 1) index scores: a row's keys are cut into chunks (at most TUNING["index_decode"]
# ["S_CHUNK"]) so that there are about this many programs per SM. H100, 2026-11-26, one decode row,
# 64 heads x 128, bf16 (kernel time in a CUDA graph): S = 4K: 47.6 us at 4096-key chunks (one program),
# 13.2 at 1024, 4.8 at 256, 2.9 at 64; 32K: 47.8 / 13.6 / 5.4 (256) / 5.1 (128) / 6.3 (64); 128K: 48.1 /
# 13.9 (1024) / 13.7 (256) / 16.1 (128); at 1M 4096 was best (the third session's sweep).
INDEX_DECODE_PROGRAMS_PER_SM = 2
# ... except where that leaves chunks shorter than this many keys: then fewer programs (down to one per
# SM) with chunks of up to INDEX_DECODE_MIN_CHUNK keys, the query tile each program loads shared by more
# keys; 0: off. H100, 2026-11-28, the ~1B deepseek-v32 step, ms (benchmarks/results/
# decode_ab_h100_index_decode_shapes.json, _2.json): one program per SM vs two at 4K 1.0656 / 1.0659 (both
# 64-key chunks), 32K 1.1482 / 1.1689 and 1.1456 / 1.1589 (256 vs 128 keys), 64K 1.2393 / 1.2281 (512 vs
# 256), 128K 1.4039 / 1.3493 (1024 vs 512). Hence chunks of 256 keys where two programs per SM give fewer,
# but never longer than 256 through this rule (at 64K, 512-key chunks lost).
INDEX_DECODE_MIN_CHUNK = 256
# Decode (T = 1) index scores: the product as keys x heads (k qᵀ: the sum over heads inside each key's
# threads) or, False, heads x keys (q kᵀ: the sum across the accumulator's warps; prefill keeps it, not
# measured the other way). H100, 2026-11-28, the ~1B deepseek-v32 step, best of 2, ms, True / False
# (benchmarks/results/decode_ab_h100_index_key_rows.json): 4K 1.0860 / 1.0937, 32K 1.2074 / 1.2201,
# 128K 1.4464 / 1.4636, 1M 3.0473 / 3.1022.
INDEX_KEY_ROWS = True

# Programs per SM the top-k passes aim for: chunks of a row are split across programs until the
# rows x chunks reach this (a decode row of 1M scores: 4 x 132 chunks of 2048).
TOPK_PROGRAMS_PER_SM = 4
TOPK_BLOCK = 1024  # scores per step of a top-k program
TOPK_MAX_CHUNKS = 1024  # a row's chunk counts are read as one vector by _topk_write
# The multi-program passes (_topk_hist x 4, _topk_count, _topk_write) launched with PDL, chained as the
# decode step's other kernels (attnlab.kernels._pdl); False: plain launches, to compare on a GPU.
TOPK_PASSES_PDL = True
# ... each holding its whole chunk in registers (one tile, loaded before the PDL wait: the load overlaps
# the pass before) when the chunk has at most this many scores (32 a thread at 8 warps); 0: every pass
# loops over its chunk after the wait.
TOPK_REG_CHUNK_MAX = 8192
# _topk_hist's histogram atomics relaxed (the kernel boundary orders them before the next pass) or, False,
# acq_rel. H100, 2026-11-28, deepseek-v32 step at 1M, best of 2: 3.2641 vs 3.2913 ms (rounds 3.2835 /
# 3.2641 vs 3.3013 / 3.2913; benchmarks/results/decode_ab_h100_1m_knobs.json).
TOPK_HIST_RELAXED = True
# Histogram levels 1-3 (multi-program passes and _topk_fused) count a row's keys matching the levels
# before with one atomic per matching key, instead of a tl.histogram over every key, when the row has
# at most this many of them (known from the level before); 0: always tl.histogram. tl.histogram's cost
# grows with every key of the chunk (a warp ballot per bit, a popcount per bin a lane owns), matching or
# not: over a 1M-score row, ~7 us a level. H100, 2026-11-28, the ~1B deepseek-v32 step (best of 2, ms;
# decode_ab_h100_match_atomics.json): 0 / 4096 / 32768 / 262144: 32K 1.2225 / 1.2204 / 1.2251 / 1.2253;
# 128K 1.4643 / 1.4320 / 1.4930 / 1.4761; 1M 3.2530 / 3.1153 / 3.1491 / 3.4654.
TOPK_MATCH_ATOMICS_MAX = 4096
# Each multi-program pass descends only the level before it: the pass before stored the row's (prefix,
# keys still to take) in a small state (_topk_pass_state), and the write pass loads the count pass's k-th
# key; False: every pass descends all the levels before it from the histograms (a descent is a 256-bin
# load and a few reductions across the program's warps). H100, 2026-11-28, the ~1B deepseek-v32 step at
# 1M, best of 2: 2.9090 vs 3.0445 ms (benchmarks/results/decode_ab_h100_topk_carry.json).
TOPK_PASSES_CARRY = True
# Rows of at most this many scores (and k <= TOPK_ONE_PROGRAM_MAX_K) take the one-launch path:
# _topk_row, one program per row, histograms in registers, sorted in the program (decode at 4K-32K:
# one launch instead of ~10). Longer rows keep the multi-program radix select (decode at 1M).
# benchmarks/sparse_mla_gpu.py may sweep it; 0 turns the one-launch path off. 16K from an H100 run
# (2026-11-26, one decode row, k = 2048): one program 0.060 ms vs multi-program 0.145 ms at 4K, but
# 0.207 vs 0.161 ms at 32K (a single program streams the whole row six times).
TOPK_ONE_PROGRAM_MAX = 16384
# ... and only when there are at least this many rows per SM: a few long rows (decode) take the
# multi-program passes. H100, 2026-11-26, ONE decode row, k = 2048, kernels in a CUDA graph: S = 4K
# one program (sorted) 64.2 us, one program + rank 36.7, multi-program 34.1 (torch.topk unsorted 28.6);
# 32K: 215.7 / 175.3 / 35.0 (44.7); 128K: 771.9 / 714.1 / 36.0 (54.5). (The 16K limit above came from
# a run whose 4K and 32K figures these contradict; it stays for many short rows, e.g. prefill.)
TOPK_ONE_PROGRAM_MIN_ROWS_PER_SM = 0.5
# Rows of at most this many scores, when the rows times their chunks fit the SMs (one program each,
# all resident), take _topk_fused: the multi-program passes in ONE launch, the chunks of a row meeting
# at barriers (atomics) instead of kernel boundaries. 0 turns it off. Under the interpreter (programs
# run one after another) a row is one chunk, so no program waits for one that has not run.
# H100, 2026-11-26, one decode row, k = 2048, CUDA graph (sorted / unsorted): 4K fused 21.3 / 12.9 us vs
# multi-launch 34.2 / 25.5; 32K 22.9 / 14.0 vs 34.7 / 26.0; 128K 32.8 / 23.8 vs 35.9 / 27.1; 256K 46.0 /
# 37.0 vs 39.1 / 30.3 (a row's ~132 programs each stream 2K scores per pass there): so up to 160K,
# between those two (a 128K context's cache holds a few slots more than 2^17). H100, 2026-11-27, the
# ~1B deepseek-v32 decode step in a CUDA graph at 128K (cache 131,144 slots; interleaved, best of 2):
# 1 << 17 (multi-launch there) 1.687 ms, 160K (fused) 1.628. With the chunks in registers
# (TOPK_FUSED_REG_CHUNK_MAX, TOPK_REG_CHUNK_MAX), H100, 2026-11-28, the step at 256K (262,144 + a few
# slots; best of 2): fused 1.7725 ms vs multi-launch 1.8172 (decode_ab_h100_topk_reg_shapes.json): so
# up to 264K, where a row's chunks on 132 SMs stay within 2048 scores (the register tile the GPU tests
# ran; 300K, whose 4096-score tiles no GPU test has run yet, was the A/B's limit). Since then the
# passes got cheaper (match atomics, carried state, chunks in registers) and the fused kernel's rows
# past the candidate path lost: H100, 2026-11-28, the ~1B deepseek-v32 step, best of 2, ms, fused up to
# 264K vs 2048 (decode_ab_h100_topk_fused_vs_multi.json): 4K 1.0858 vs 1.1017, 32K 1.2033 vs 1.1909,
# 128K 1.4161 vs 1.3794. Its 132 programs, resident with the sparse attention launched early beside
# them, left the attention 13.5 us exposed a layer at 128K, against 7.6 after the last pass
# (decode_timeline_h100_run26b_128k.json). So only rows the candidate path may take (<=
# TOPK_CANDIDATES_MAX_S) stay fused; 8K-16K were not measured.
TOPK_FUSED_MAX = 12 * 1024
TOPK_FUSED_BLOCK = 256  # scores per step of a _topk_fused program (and the smallest chunk)
# Rows whose chunks hold at least this many scores take TOPK_FUSED_WIDE_BLOCK-score steps at 8 warps
# (two scores a thread, as 256 at 4 warps): one program an SM issued an instruction every ~10 cycles
# there (ncu, 128K: 26.8 us; benchmarks/results/ncu_h100_v32_topk_128k.txt). H100, 2026-11-27, the
# ~1B deepseek-v32 step (best of 2, ms; decode_ab_h100_topk_warps.json, ..._topk_wide.json): 128K
# (chunks of 994 scores) 1.5693 -> 1.4890 (16 warps x 1024: 1.4796 / 1.5157), 64K (497) 1.3589 ->
# 1.3123, but 32K (249) 1.2467 -> 1.2515.
# Chunks of at most this many scores are read once into a program's registers (_topk_fused's CHUNK);
# 0: every pass reads them again (from L2).
TOPK_FUSED_REG_CHUNK_MAX = 4096
TOPK_FUSED_WIDE_MIN_CHUNK = 384
TOPK_FUSED_WIDE_BLOCK = 512
# The fused path's candidate shortcut (_topk_fused's CAND_MAX): when at most this many keys share the
# k-th largest key's top 16 bits, a row takes two barriers instead of five. Each program ranks all of
# them (CAND_MAX^2 comparisons at most). 0 turns it off; rows past TOPK_CANDIDATES_MAX_ROWS never take
# it (each needs a 256 KB zeroed histogram), nor rows longer than TOPK_CANDIDATES_MAX_S: its one atomic
# per score (the 16-bit histogram) costs more than the three barriers it saves on long rows. H100,
# 2026-11-27, one decode row, k = 2048, distinct scores, CUDA graph (unsorted, us): 4168 scores 10.4 vs
# 13.3 with five barriers, 32840: 17.4 vs 15.9, 131144: 40.2 vs 24.7. The ~1B deepseek-v32 step
# (interleaved, best of 2, ms): 4K 1.193 vs 1.224, 8K 1.214 vs 1.239, 16K 1.274 vs 1.270, 32K 1.356 vs
# 1.304, 128K 1.980 vs 1.630 (benchmarks/results/decode_ab_h100_topk_candidates*.json).
TOPK_CANDIDATES_MAX = 256
TOPK_CANDIDATES_MAX_ROWS = 8
TOPK_CANDIDATES_MAX_S = 12 * 1024
# TOPK_FUSED_BLOCK for the rows that may take the candidate path (scores per step, smallest chunk):
# more, smaller chunks there. H100, 2026-11-27, deepseek-v32 step (interleaved, best / median of 3, ms):
# 4K 256 1.191 / 1.195, 128 1.174 / 1.186, 64 1.195 / 1.196; 8K 1.221 / 1.221, 1.222 / 1.222, 1.217 /
# 1.218 (benchmarks/results/decode_ab_h100_topk_candidates_block.json)
TOPK_CANDIDATES_BLOCK = 128
TOPK_ONE_PROGRAM_MAX_K = 4096  # the in-program bitonic sort holds next_power_of_2(k) int64 keys
# True: _topk_row also sorts the k taken (tl.sort, one launch); False: it leaves them to _topk_rank
# (two launches: k^2 comparisons over many programs). Also False after the sorting variant failed
# to build on this GPU / Triton (a warning says so).
TOPK_ONE_PROGRAM_SORT = True


# A decode step's index scores zero the top-k's buffers (dsa_index_scores' ``zero``, dsa_topk's
# ``scratch``: no fill launch between them, and the top-k launched early with PDL). H100, 2026-11-28,
# the ~1B deepseek-v32 step, best of 2, ms, with / without (decode_ab_h100_index_topk_scratch.json):
# 4K 1.0921 / 1.1102, 32K 1.2182 / 1.2192, 1M 3.0925 / 3.1200, but 128K 1.4698 / 1.4333: there the
# fused top-k's 132 wide programs, resident early, slow the index scores. So fused rows past the
# candidate path (TOPK_CANDIDATES_MAX_S) keep their fill unless this is True.
TOPK_SCRATCH_LONG_FUSED = False


def _topk_plan(R: int, S: int, k_eff: int, device: torch.device) -> tuple[str, int]:
    """(path, int32 zeros it needs) of dsa_topk over R rows of S scores: "one_program" (none),
    "fused" (a row's histograms, barrier / candidate counters and, on the candidate path, its 16-bit
    histogram) or "multi" (a row's histograms)."""
    if (0 < S <= TOPK_ONE_PROGRAM_MAX and k_eff <= TOPK_ONE_PROGRAM_MAX_K
            and R >= TOPK_ONE_PROGRAM_MIN_ROWS_PER_SM * _num_sms(device)):
        return "one_program", 0
    if 0 < S <= TOPK_FUSED_MAX and 0 < R <= _num_sms(device):
        return "fused", _topk_fused_sync_numel(R, S)
    return "multi", R * (4 * 256 + (_TOPK_STATE.value if TOPK_PASSES_CARRY else 0))


def _topk_candidates_max(R: int, S: int) -> int:
    return TOPK_CANDIDATES_MAX if R <= TOPK_CANDIDATES_MAX_ROWS and S <= TOPK_CANDIDATES_MAX_S else 0


def _topk_fused_sync_numel(R: int, S: int) -> int:
    """_topk_fused's zeroed int32s: a row's histograms [4, 256], its counters (barrier, candidates)
    and, on the candidate path, its 16-bit histogram [65536] (from _topk_fused_fine_at(R) on)."""
    return _topk_fused_fine_at(R) + (R * 65536 if _topk_candidates_max(R, S) else 0)


def _topk_fused_fine_at(R: int) -> int:
    """Where _topk_fused's 16-bit histograms start in its scratch: after R rows' histograms [4, 256]
    (from 0) and their two counters (from R * 1024)."""
    return R * (4 * 256 + 2)


def topk_scratch_numel(B: int, T: int, S: int, topk: int, device: torch.device) -> int:
    """How many int32 zeros to give ``dsa_topk`` over [B, T, S] scores as its ``scratch``; 0: none (the
    one-program path needs none; fused rows past the candidate path keep their own fill launch unless
    TOPK_SCRATCH_LONG_FUSED)."""
    path, n = _topk_plan(B * T, S, min(topk, S), device)
    if path == "fused" and not _topk_candidates_max(B * T, S) and not TOPK_SCRATCH_LONG_FUSED:
        return 0
    return n


def dsa_topk(scores: torch.Tensor, topk: int, causal: bool = True, sort: bool = True,
             scratch: torch.Tensor | None = None, prefetch: torch.Tensor | None = None,
             prefilled: bool = False) -> torch.Tensor:
    """``attnlab.ops.dsa_topk`` in Triton: the same indices, ties to the earlier position.

    A radix select on the scores' order-preserving int32 keys: four 256-bin histogram passes (8
    bits each) find the k-th largest key of each row, with each row split into chunks over many programs
    (decode: one row of 1M scores over ~500 programs); a count pass and a write pass take every key
    above it and the earliest ties, in position order; a rank pass sorts the k taken (each counts
    the bigger ones: k^2 comparisons over k / 64 programs per row).
    Six passes over the scores (L2-resident for a decode row), no host sync, CUDA-graph safe.
    Rows of S <= ``TOPK_ONE_PROGRAM_MAX`` (k <= ``TOPK_ONE_PROGRAM_MAX_K``) do all of it in ONE
    launch, a program per row (``_topk_row``: same passes, histograms in registers, a bitonic sort).
    Fewer rows (decode) of S <= ``TOPK_FUSED_MAX`` run the passes in one launch with a row's chunks
    meeting at barriers (``_topk_fused``); up to ``TOPK_CANDIDATES_MAX_S`` scores two barriers do:
    one pass settles the top 16 bits, and the few keys sharing the k-th key's are ranked directly.
    Levels 1-3 count the keys still matching with one atomic each when at most
    ``TOPK_MATCH_ATOMICS_MAX`` of the row's keys do (a tl.histogram costs the same for every key).

    Args:
        scores: float32 [B, T, S] (other float dtypes are compared at float32); the T queries are the
            last T of S positions. -inf marks an unusable position.
        topk: k >= 1; may exceed S.
        causal: True: positions s > S - T + t are invisible to query t (needs S >= T).
        sort: True: by score descending. False: the same set in POSITION order, without the rank
            pass (a decode step's sparse attention does not care about the order): one launch fewer.
        scratch: None (a zero fill launch precedes the top-k), or a contiguous int32 buffer of at
            least ``topk_scratch_numel`` elements that the kernel launched just before this call
            set to zero (``dsa_index_scores(..., zero=scratch)``, which also wrote ``scores``): the
            top-k then launches right after it and reads the scores after its PDL wait.
        prefetch: the multi-program passes under PDL (long decode rows, Hopper) also ask L2 for the
            first ``TOPK_PREFETCH_BYTES`` of this tensor's bytes (a hint: weights a later kernel of
            the step reads, fetched while the passes work on L2-resident scores). Ignored elsewhere.
        prefilled: ``scratch`` came zeroed from an earlier launch and ``dsa_index_scores(...,
            topk_scratch=scratch, topk=topk)`` (the launch just before, which wrote ``scores``) added
            the first histogram level (and the fused path's 16-bit histogram) into it: the
            multi-program path starts at level 1 (one launch fewer), the fused path at its first
            descent (one row barrier fewer). Needs ``scratch``; decode rows, ``causal=False``.

    Returns:
        int64 [B, T, topk], by score descending (sort) or position (not sort), ties to the earlier
        position; -1 for -inf scores and past S (sorted: last; unsorted: where the -inf positions are).
    """
    check_tensor("scores", scores, 3, "[B, T, S]")
    B, T, S = scores.shape
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected an int >= 1, got {topk!r}")
    if causal and S < T:
        raise ValueError(f"scores: causal top-k needs S >= T (queries are the last T of S), got {(B, T, S)}")
    if S >= 2**31 - 1:
        raise ValueError(f"scores: S={S} positions do not fit the kernel's int32 positions")
    k_eff = min(topk, S)
    R = B * T
    path, n_zero = _topk_plan(R, S, k_eff, scores.device)
    one_program, fused = path == "one_program", path == "fused"
    if scratch is not None:
        _check_scratch("scratch", scratch, scores.device)
        if scratch.numel() < n_zero:
            raise ValueError(f"scratch: {scratch.numel()} int32 elements, this top-k needs {n_zero} "
                             f"(topk_scratch_numel)")
    if prefilled:
        if scratch is None or topk_scratch_numel(B, T, S, topk, scores.device) == 0:
            raise ValueError("prefilled: needs the scratch that dsa_index_scores(..., topk_scratch=, topk=) "
                             "filled (topk_scratch_numel > 0)")
        if T != 1 or causal:
            raise ValueError(f"prefilled: decode rows with causal=False only, got T={T}, causal={causal}")
    if R > 0 and S > 0 and (one_program or fused or not sort):  # every slot written: no -1 fill launch
        out = _empty(B, T, topk, dtype=torch.int64, device=scores.device)
    else:
        out = torch.full((B, T, topk), -1, dtype=torch.int64, device=scores.device)
    if R == 0 or S == 0:
        return out
    sc = scores.reshape(R, S)  # (R, S)
    if sc.dtype != torch.float32 or sc.stride(-1) != 1:
        sc = sc.to(torch.float32).contiguous()
    if one_program:
        _topk_one_program(sc, out.view(R, topk), S, T, k_eff, topk, causal, sort)  # (R, topk)
        return out
    if fused:
        _topk_fused_launch(sc, out.view(R, topk), S, T, k_eff, topk, causal, sort, scratch, prefilled)
        return out
    target = TOPK_PROGRAMS_PER_SM * _num_sms(scores.device)
    n_chunks = max(1, min(TOPK_MAX_CHUNKS, triton.cdiv(target, R), triton.cdiv(S, TOPK_BLOCK)))
    chunk = triton.cdiv(triton.cdiv(S, n_chunks), TOPK_BLOCK) * TOPK_BLOCK
    n_chunks = triton.cdiv(S, chunk)
    buf = torch.zeros(n_zero, dtype=torch.int32, device=scores.device) if scratch is None else scratch
    hist, state = buf[: R * 4 * 256], buf[R * 4 * 256 : n_zero]  # histograms, the passes' carried states
    cnt = torch.empty(R, n_chunks, 2, dtype=torch.int32, device=scores.device)
    res = out.view(R, topk)  # (R, topk)
    sel = torch.empty(R, k_eff, dtype=torch.int64, device=scores.device) if sort else res
    grid = (R * n_chunks,)
    args = (sc, hist, S, T, chunk, sc.stride(0), k_eff, n_chunks)
    pdl = TOPK_PASSES_PDL and use_pdl(scores.device)
    reg = _pow2(chunk) if chunk <= TOPK_REG_CHUNK_MAX else 0
    opts = dict(CAUSAL=causal, BLOCK=TOPK_BLOCK, CHUNK=reg, PDL=pdl, ST=state if TOPK_PASSES_CARRY else hist,
                CARRY=TOPK_PASSES_CARRY, num_warps=8, **launch_options(pdl))
    nbytes = (_prefetch_bytes(prefetch, TOPK_PREFETCH_BYTES)
              if pdl and PREFETCH_NEXT_MAX_ROWS < S <= TOPK_PREFETCH_MAX_ROWS else 0)
    pf = dict(PF=prefetch, pf_bytes=nbytes, PF_CHUNK=PREFETCH_NEXT_CHUNK) if nbytes else {}
    first = 1 if prefilled else 0  # prefilled: the index scores added level 0
    for level in range(first, 4):  # (with scratch given, the index scores were written by the kernel before)
        _topk_hist[grid](*args, LEVEL=level, RELAXED=TOPK_HIST_RELAXED, MATCH_MAX=TOPK_MATCH_ATOMICS_MAX,
                         EARLY=level > first or scratch is None, **(pf if level == first else {}), **opts)
    _topk_count[grid](sc, hist, cnt, *args[2:], **opts)
    _topk_write[grid](sc, hist, cnt, sel, S, T, chunk, sc.stride(0), k_eff, topk if not sort else k_eff,
                      n_chunks, sel.stride(0), BCH=_pow2(n_chunks, 2), POSITIONS=not sort, **opts)
    if not sort:  # _topk_write stored the positions themselves, in position order
        return out
    block_i = 64 if R * triton.cdiv(k_eff, 64) >= _num_sms(scores.device) else 16  # decode: more programs
    _topk_rank[(R, triton.cdiv(k_eff, block_i))](sel, res, S, k_eff, sel.stride(0), res.stride(0),
                                                BLOCK_I=block_i, BLOCK_J=128, num_warps=4)
    return out


def _topk_one_program(sc: torch.Tensor, res: torch.Tensor, S: int, T: int, k_eff: int, topk: int,
                      causal: bool, sort: bool = True) -> None:
    """_topk_row over the R rows of sc [R, S] into res [R, topk]: sorted in the program
    (TOPK_ONE_PROGRAM_SORT), else by _topk_rank in a second launch; falls back to the latter if the
    sorting variant does not build here. Not ``sort``: positions in position order, one launch."""
    global TOPK_ONE_PROGRAM_SORT
    R = sc.shape[0]
    if not sort:
        _topk_row[(R,)](sc, res, res, S, T, sc.stride(0), res.stride(0), res.stride(0), k_eff, topk,
                        CAUSAL=causal, BLOCK=TOPK_BLOCK, KP=_pow2(k_eff), SORT=False, POSITIONS=True,
                        num_warps=8)
        return
    while True:
        sort = TOPK_ONE_PROGRAM_SORT
        sel = res if sort else torch.empty(R, k_eff, dtype=torch.int64, device=sc.device)
        try:
            _topk_row[(R,)](sc, res, sel, S, T, sc.stride(0), res.stride(0), sel.stride(0), k_eff, topk,
                            CAUSAL=causal, BLOCK=TOPK_BLOCK, KP=_pow2(k_eff), SORT=sort, POSITIONS=False,
                            num_warps=8)
            break
        except _LAUNCH_ERRORS as e:
            if not sort or _INTERPRET or not sc.is_cuda or not ALLOW_FALLBACK or not _is_compile_failure(e):
                raise
            TOPK_ONE_PROGRAM_SORT = False
            _FAILED_CONFIGS.add(("topk_row", ("SORT", 1)))
            warnings.warn(f"attnlab.kernels.sparse: the sorting one-program top-k failed to build "
                          f"({type(e).__name__}: {str(e)[:160]}); sorting in a second launch", stacklevel=3)
    if not sort:
        block_i = 64 if R * triton.cdiv(k_eff, 64) >= _num_sms(sc.device) else 16  # decode: more programs
        _topk_rank[(R, triton.cdiv(k_eff, block_i))](sel, res, S, k_eff, sel.stride(0), res.stride(0),
                                                    BLOCK_I=block_i, BLOCK_J=128, num_warps=4)


def _topk_fused_launch(sc: torch.Tensor, res: torch.Tensor, S: int, T: int, k_eff: int, topk: int,
                       causal: bool, sort: bool, scratch: torch.Tensor | None = None,
                       prefilled: bool = False) -> torch.Tensor:
    """_topk_fused over the R rows of sc [R, S] into res [R, topk] (then _topk_rank if ``sort``): a
    row's chunks, at most SMs // R of them, are one program each, so every program is resident.
    ``scratch``, ``prefilled``: dsa_topk's. Returns each row's count of candidates (int32 [R]; 0 where
    the row took the five-barrier path)."""
    R = sc.shape[0]
    cand_max = _topk_candidates_max(R, S)
    block = TOPK_CANDIDATES_BLOCK if cand_max else TOPK_FUSED_BLOCK
    n_chunks = 1 if _INTERPRET else max(1, min(_num_sms(sc.device) // R, triton.cdiv(S, block)))
    warps = 4
    if not cand_max and triton.cdiv(S, n_chunks) >= TOPK_FUSED_WIDE_MIN_CHUNK:  # long chunks: wider steps
        block, warps = TOPK_FUSED_WIDE_BLOCK, 8
    chunk = triton.cdiv(triton.cdiv(S, n_chunks), block) * block
    n_chunks = triton.cdiv(S, chunk)
    # histograms, counters (barrier, candidates) and the 16-bit histograms: zero at launch, one fill
    # (or the scratch the index scores zeroed)
    n_sync = _topk_fused_sync_numel(R, S)
    sync = torch.zeros(n_sync, dtype=torch.int32, device=sc.device) if scratch is None else scratch[:n_sync]
    fine_at = _topk_fused_fine_at(R)
    hist, ctr = sync[: R * 4 * 256], sync[R * 4 * 256 : fine_at]
    fine = sync[fine_at:] if cand_max else sync
    cand = torch.empty(R, max(cand_max, 1), dtype=torch.int64, device=sc.device)  # one unused slot for 0
    cnt = torch.empty(R, n_chunks, 2, dtype=torch.int32, device=sc.device)
    sel = torch.empty(R, k_eff, dtype=torch.int64, device=sc.device) if sort else res
    pdl = use_pdl(sc.device)
    reg = _pow2(chunk) if chunk <= TOPK_FUSED_REG_CHUNK_MAX else 0
    _topk_fused[(R * n_chunks,)](sc, hist, ctr, cnt, fine, cand, sel, S, T, chunk, sc.stride(0),
                                 sel.stride(0), k_eff, topk if not sort else k_eff, n_chunks, CAUSAL=causal,
                                 BLOCK=block, BCH=_pow2(n_chunks, 2), POSITIONS=not sort, CAND_MAX=cand_max,
                                 PDL=pdl, CHUNK=reg, MATCH_MAX=TOPK_MATCH_ATOMICS_MAX, EARLY=scratch is None,
                                 PRE=prefilled, num_warps=warps, **launch_options(pdl))
    n_cand = ctr.view(R, 2)[:, 1]
    if sort:
        if topk > k_eff:
            res[:, k_eff:] = -1
        block_i = 64 if R * triton.cdiv(k_eff, 64) >= _num_sms(sc.device) else 16  # decode: more programs
        _topk_rank[(R, triton.cdiv(k_eff, block_i))](sel, res, S, k_eff, sel.stride(0), res.stride(0),
                                                    BLOCK_I=block_i, BLOCK_J=128, num_warps=4)
    return n_cand


def _kth_largest(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """The k-th largest value along the last dim, [..., 1]; in two exact stages for long rows."""
    S = x.shape[-1]
    if S > 2 * chunk and chunk >= k:
        n = math.ceil(S / chunk)
        padded = torch.nn.functional.pad(x, (0, n * chunk - S), value=float("-inf"))
        best = padded.view(*x.shape[:-1], n, chunk).topk(k, dim=-1, sorted=False).values  # (..., n, k)
        x = best.flatten(-2)  # (..., n * k) survivors
    return x.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)


def dsa_topk_threshold(
    scores: torch.Tensor, topk: int, causal: bool = True, chunk: int = 32768
) -> torch.Tensor:
    """``attnlab.ops.dsa_topk`` (same result, ties to the earlier position) from one float32
    ``torch.topk`` for the k-th largest score t, then elementwise passes: every score > t is taken,
    and of the scores == t the earliest ones fill the remaining slots; the k taken positions are
    then sorted by (score descending, position ascending). The oracle sorts int64 keys over the
    whole row instead. Rows longer than 2 * ``chunk`` find the k-th score in two stages (top-k
    values of each chunk, then of the survivors: exact), because PyTorch sorts whole rows for a
    top-k over few long rows (decode at 1M) but radix-selects over many short ones. Torch, not
    Triton; no host sync. Returns int64 [B, T, topk], -1 for empty slots (after the visible ones)."""
    check_tensor("scores", scores, 3, "[B, T, S]")
    B, T, S = scores.shape
    if causal and S < T:
        raise ValueError(f"scores: causal top-k needs S >= T (queries are the last T of S), got {(B, T, S)}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected an int >= 1, got {topk!r}")
    k_eff = min(topk, S)
    out = torch.full((B, T, topk), -1, dtype=torch.int64, device=scores.device)
    pos = torch.arange(S, device=scores.device)  # (S,)
    block = max(1, (1 << 27) // max(1, B * S))  # bound the [B, Tb, S] temporaries
    neg_inf = float("-inf")
    with torch.no_grad():
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            blk = scores[:, t0:t1].to(torch.float32)  # (B, Tb, S)
            if causal:
                q_pos = torch.arange(S - T + t0, S - T + t1, device=scores.device)  # (Tb,)
                blk = blk.masked_fill(pos[None, :] > q_pos[:, None], neg_inf)
            thr = _kth_largest(blk, k_eff, chunk)  # (B, Tb, 1)
            above = blk > thr
            tied = blk == thr
            need = k_eff - above.sum(-1, keepdim=True, dtype=torch.int32)  # (B, Tb, 1) slots left for ties
            take = above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= need))  # exactly k_eff per row
            slot = torch.where(take, take.cumsum(-1, dtype=torch.int32) - 1, k_eff).long()  # (B, Tb, S)
            sel = torch.zeros(B, t1 - t0, k_eff + 1, dtype=torch.int64, device=scores.device)
            sel.scatter_(-1, slot, pos.expand_as(slot))  # taken positions in ascending order; col k_eff junk
            sel = sel[..., :k_eff]  # (B, Tb, k_eff)
            vals = blk.gather(-1, sel)
            order = vals.sort(dim=-1, descending=True, stable=True).indices  # stable: earlier position first
            idx = sel.gather(-1, order)
            out[:, t0:t1, :k_eff] = idx.masked_fill(vals.gather(-1, order) == neg_inf, -1)
    return out


def dsa_topk_chunked(
    scores: torch.Tensor, topk: int, causal: bool = True, chunk: int = 16384
) -> torch.Tensor:
    """``attnlab.ops.dsa_topk`` in two exact stages for long rows (decode at 1M): top-k inside each
    chunk of ``chunk`` positions, then top-k of the survivors. Exact, same tie rule (the sort key
    carries the position), because every global top-k member is in its chunk's top-k. Returns
    int64 [B, T, topk], -1 for empty slots. Torch, not Triton."""
    from ..ops.sparse import _ordered_keys, dsa_topk

    B, T, S = scores.shape
    if S <= 2 * chunk or topk >= chunk:
        return dsa_topk(scores, topk, causal=causal)
    blk = scores.to(torch.float32)
    if causal:
        pos = torch.arange(S, device=scores.device)
        q_pos = torch.arange(S - T, S, device=scores.device)
        blk = blk.masked_fill(pos[None, :] > q_pos[:, None], float("-inf"))  # (B, T, S)
    keys = _ordered_keys(blk)  # (B, T, S) int64, unique per position
    n_chunks = math.ceil(S / chunk)
    pad = n_chunks * chunk - S
    if pad:
        keys = torch.nn.functional.pad(keys, (0, pad), value=torch.iinfo(torch.int64).min)
    k1 = min(topk, chunk)
    cand = keys.view(B, T, n_chunks, chunk).topk(k1, dim=-1)  # (B, T, C, k1)
    cand_pos = cand.indices + torch.arange(n_chunks, device=scores.device)[:, None] * chunk  # (B, T, C, k1)
    k_eff = min(topk, S)
    best = cand.values.flatten(2).topk(k_eff, dim=-1)  # (B, T, k_eff)
    idx = cand_pos.flatten(2).gather(-1, best.indices)  # (B, T, k_eff)
    chosen = blk.gather(-1, idx)
    out = torch.full((B, T, topk), -1, dtype=torch.int64, device=scores.device)
    out[..., :k_eff] = idx.masked_fill(chosen == float("-inf"), -1)
    return out
