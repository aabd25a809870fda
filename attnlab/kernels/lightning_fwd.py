"""Segment-parallel Triton forward of Lightning attention (issue #8).

Lightning (MiniMax) keeps one decay per head, γ = e^{−s_h}: S_t = γ S_{t−1} + k_t v_tᵀ,
o_t = S_tᵀ (scale · q_t). The forward in :mod:`.linear` walks all chunks of a sequence in one
program and writes the state entering every 64-token chunk (~0.5-1 GB at 64K tokens); the output
kernel reads them back. Here the sequence is cut into segments of L tokens (a multiple of the
chunk) and nothing per chunk goes to memory:

1. ``_segment_state_kernel`` (parallel over sequence, head, segment, D_v block): each segment but
   a sequence's last computes its local end state from zero, Σ_j γ^{end−j} k_j v_jᵀ, chunk by
   chunk in registers, and writes it once (into the slot of the next segment).
2. ``_segment_scan_kernel`` (sequential over segments, parallel over sequence, head, state tiles):
   S_in[s+1] = γ^L S_in[s] + local[s] from S_in[0] = the initial state, in place in those slots.
3. ``_segment_output_kernel`` (parallel as pass 1): from S_in[s], per chunk
   o = scale (Q ⊙ γ^{i+1}) S + (scale · Q Kᵀ ⊙ D) V with D_ij = γ^{i−j} (i ≥ j), then
   S ← γ^n S + (K ⊙ γ^{n−1−j})ᵀ V (n valid rows); the last segment writes the final state.
   When a gradient is needed it also writes the per-chunk states that Lightning's backward reads
   (as the old forward did, but from parallel programs).

Traffic ≈ q once, k and v twice, o once (the same algebra as fla's chunk forward with
``chunk_fwd_h`` split over segments; the two-level scan is the usual parallel-prefix form of a
linear recurrence, e.g. Blelloch 1990). Every exponent is ≤ 0; the only positive one, on the
padded rows of a partial last chunk, is masked before exp (0 · inf was a NaN once).

Packed batches (``cu_seqlens``) are supported: segments never cross a sequence (a segment table
built on the host, as ``linear._chunk_tables`` does for chunks).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import launch_fitting
from .linear import CHUNK, _chunk_tables, _empty, _mm, _seq_bounds, _seq_chunks, _store_tile, _tile, _tl_dtype

# Launch parameters; the benchmark (benchmarks/linear_gpu.py --sweep segmented) may override them.
# "state" is pass 1, "output" pass 3 (BV = D_v columns per program, the state [D_k, BV] float32 in
# registers), "scan" pass 2 (BLOCK state elements per program). A segment is chosen so that pass 3
# has at most programs_per_sm programs per SM (one wave: segments rounded down, at least one), and
# is never shorter than min_segment tokens (each segment costs a state written, scanned and read:
# ~4 x 64 KB per head at D = 128).
# Launch shapes from `benchmarks/linear_gpu.py --sweep segmented` on an H200 (Triton 3.6, B=1, H=16,
# D=128, bf16, 2026-11-26). The segment count from an H100 A/B timed as CUDA-graph replays (eager
# timings at 16K measure the host's launch path, ~0.29 ms, not these kernels): pass 3 at 3 stages
# takes 128 KB of shared memory, so ONE program fits an SM, and any program past one wave waits for a
# whole chain. Forward ms at B=1, D=128, bf16, by segment count (fla's chunk_lightning_attn beside):
#   H=16 16K: 2 segments 0.287, 4 (128 programs) 0.163, 6 0.197, 8 0.168, 12 0.184, 13 (the old
#             rule: 3 per SM rounded up, 416 programs) 0.201; fla 0.282
#   H=16 64K: 4 0.588, 8 0.585, 12 0.618, 13 0.699; fla 1.086
#   H=64 16K: 1 (128 programs) 0.404, 2 0.522, 4 0.581; fla 1.113.  H=32 16K: 1 0.385, 2 0.294,
#             4 0.294; fla 0.514.  So: one wave, as full as it gets (programs_per_sm 1, rounded down).
TUNING: dict[str, dict[str, int]] = {
    "state": {"BV": 64, "num_warps": 4, "num_stages": 3},
    "output": {"BV": 64, "num_warps": 4, "num_stages": 3},
    "scan": {"BLOCK": 1024, "num_warps": 4},
    "segments": {"programs_per_sm": 1, "min_segment": 256},
}
SEGMENT_LEN: int | None = None  # tests force a segment length (a multiple of CHUNK) here
CPU_SEGMENT_LEN = 2 * CHUNK  # under the interpreter: short segments, so several are exercised


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _segment_of(pid, n_seg, seg_table, IS_VARLEN: tl.constexpr):
    """(sequence, segment within it) of global segment slot pid (slots are sequence-major)."""
    if IS_VARLEN:
        return tl.load(seg_table + 2 * pid), tl.load(seg_table + 2 * pid + 1)
    else:
        return pid // n_seg, pid % n_seg


@triton.jit
def _segment_state_kernel(
    k, v, slope, seg_states, cu_seqlens, seg_table, nonlast, T, L, n_seg,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
):
    """Pass 1: the local end state of one non-last segment (from zero), into the next slot."""
    i_v, i_p, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if IS_VARLEN:
        slot = tl.load(nonlast + i_p)
    else:
        slot = (i_p // (n_seg - 1)) * n_seg + i_p % (n_seg - 1)
    i_b, i_s = _segment_of(slot, n_seg, seg_table, IS_VARLEN)
    i_hk = i_h // (H // HK)
    bos, n = _seq_bounds(i_b, T, cu_seqlens, IS_VARLEN)
    c0 = i_v * BV
    rk = tl.arange(0, BK)
    rv = c0 + tl.arange(0, BV)
    rt = tl.arange(0, BT)
    s_h = tl.load(slope + i_h).to(tl.float32)
    k_p = k + (bos * HK + i_hk) * K
    v_p = v + (bos * H + i_h) * V
    t_beg = i_s * L
    n_ch = tl.cdiv(tl.minimum(n - t_beg, L), BT)  # a non-last segment is full: L // BT chunks
    S = tl.zeros([BK, BV], dtype=tl.float32)
    for i_t in range(0, n_ch):
        t0 = t_beg + i_t * BT
        n_in = tl.minimum(n - t0, BT)
        b_k = _tile(k_p, t0, n, HK * K, 0, K, BT, BK)
        b_v = _tile(v_p, t0, n, H * V, c0, V, BT, BV)
        # decay to the chunk end on v's rows ([BT, BV], smaller than k's [BT, D_k] in registers)
        e = tl.where(rt < n_in, -s_h * (n_in - 1 - rt).to(tl.float32), 0.0)  # padded rows masked
        b_vd = b_v.to(tl.float32) * tl.exp(e)[:, None]
        S = S * tl.exp(-s_h * n_in.to(tl.float32)) + _mm(tl.trans(b_k), b_vd, DT, PREC)
    dst = seg_states + ((slot + 1).to(tl.int64) * H + i_h) * K * V
    tl.store(dst + rk[:, None] * V + rv[None, :], S, mask=(rk < K)[:, None] & (rv < V)[None, :])


@triton.jit
def _segment_scan_kernel(
    slope, seg_states, h0, ht, cu_seqlens, seg_offsets, T, L,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Pass 2: slot s ← the state entering segment s (slot 0 the initial state; slot s > 0 held
    the local end state of segment s − 1). A sequence without tokens writes its final state here."""
    i_x, i_bh = tl.program_id(0), tl.program_id(1)
    _, i_h, _, _, n, ns, first = _seq_chunks(cu_seqlens, seg_offsets, T, H, H, L, IS_VARLEN)
    r = i_x * BLOCK + tl.arange(0, BLOCK)
    m = r < K * V
    S = tl.zeros([BLOCK], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + i_bh.to(tl.int64) * K * V + r, mask=m, other=0.0)
    decay = tl.exp(-tl.load(slope + i_h).to(tl.float32) * L)
    p = seg_states + (first * H + i_h) * K * V + r
    if ns > 0:
        tl.store(p, S, mask=m)
    for _i_s in range(1, ns):
        p += H * K * V
        S = S * decay + tl.load(p, mask=m, other=0.0)
        tl.store(p, S, mask=m)
    if STORE_HT:
        if ns == 0:
            tl.store(ht + i_bh.to(tl.int64) * K * V + r, S, mask=m)


@triton.jit
def _segment_output_kernel(
    q, k, v, slope, seg_states, states, o, ht, cu_seqlens, seg_table, chunk_offsets, scale, T, L, n_seg,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
    STORE_STATES: tl.constexpr, STORE_HT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Pass 3: the outputs of one segment and D_v block, walking its chunks from S_in."""
    i_v, i_p, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_s = _segment_of(i_p, n_seg, seg_table, IS_VARLEN)
    i_hk = i_h // (H // HK)
    bos, n = _seq_bounds(i_b, T, cu_seqlens, IS_VARLEN)
    c0 = i_v * BV
    rk = tl.arange(0, BK)
    rv = c0 + tl.arange(0, BV)
    rt = tl.arange(0, BT)
    mkv = (rk < K)[:, None] & (rv < V)[None, :]
    kv = rk[:, None] * V + rv[None, :]
    s_h = tl.load(slope + i_h).to(tl.float32)
    pos = rt.to(tl.float32)
    # loop invariants: γ^{i+1} for the carried state, scale · γ^{i−j} on the causal triangle
    # (rows past the sequence end have q = 0, so their decays need no mask: all exponents ≤ 0)
    gq = tl.exp(-s_h * (pos + 1)) * scale
    causal = rt[:, None] >= rt[None, :]
    dmask = tl.where(causal, tl.exp(tl.where(causal, -s_h * (pos[:, None] - pos[None, :]), 0.0)) * scale, 0.0)

    S = tl.load(seg_states + (i_p.to(tl.int64) * H + i_h) * K * V + kv, mask=mkv, other=0.0)
    q_p = q + (bos * HK + i_hk) * K
    k_p = k + (bos * HK + i_hk) * K
    v_p = v + (bos * H + i_h) * V
    o_p = o + (bos * H + i_h) * V
    t_beg = i_s * L
    n_ch = tl.cdiv(tl.minimum(n - t_beg, L), BT)
    if STORE_STATES:  # the state entering each chunk, for the backward
        if IS_VARLEN:
            c_first = tl.load(chunk_offsets + i_b).to(tl.int64)
        else:
            c_first = i_b.to(tl.int64) * tl.cdiv(T, BT)
        st_p = states + ((c_first + i_s * (L // BT)) * H + i_h) * K * V + kv
    for i_t in range(0, n_ch):
        t0 = t_beg + i_t * BT
        n_in = tl.minimum(n - t0, BT)
        if STORE_STATES:
            tl.store(st_p, S.to(states.dtype.element_ty), mask=mkv)
            st_p += H * K * V  # 64-bit pointer steps (states pass 2^31 elements at ~512K tokens)
        b_q = _tile(q_p, t0, n, HK * K, 0, K, BT, BK)
        b_k = _tile(k_p, t0, n, HK * K, 0, K, BT, BK)
        b_v = _tile(v_p, t0, n, H * V, c0, V, BT, BV)
        b_a = _mm(b_q, tl.trans(b_k), DT, PREC) * dmask
        b_o = _mm(b_q, S, DT, PREC) * gq[:, None] + _mm(b_a, b_v, DT, PREC)
        _store_tile(o_p, b_o, t0, n, H * V, c0, V, BT, BV)
        e = tl.where(rt < n_in, -s_h * (n_in - 1 - rt).to(tl.float32), 0.0)  # padded rows masked
        b_vd = b_v.to(tl.float32) * tl.exp(e)[:, None]  # decayed to the chunk end
        S = S * tl.exp(-s_h * n_in.to(tl.float32)) + _mm(tl.trans(b_k), b_vd, DT, PREC)
    if STORE_HT:
        if t_beg + L >= n:  # the sequence's last segment
            tl.store(ht + (i_b.to(tl.int64) * H + i_h) * K * V + kv, S, mask=mkv)


# ---------------------------------------------------------------------------------------------
# host side


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def segment_length(n_tokens: int, h: int, d_k: int, d_v: int, device: torch.device) -> int:
    """Tokens per segment (a multiple of CHUNK) for n_tokens in all sequences, h value heads:
    as many segments as keep pass 3 within TUNING["segments"]["programs_per_sm"] programs per SM (at
    least one), each at least min_segment tokens long. SEGMENT_LEN overrides; off CUDA, CPU_SEGMENT_LEN."""
    if SEGMENT_LEN is not None:
        if SEGMENT_LEN <= 0 or SEGMENT_LEN % CHUNK:
            raise ValueError(f"SEGMENT_LEN: expected a positive multiple of {CHUNK}, got {SEGMENT_LEN}")
        return SEGMENT_LEN
    if device.type != "cuda":
        return CPU_SEGMENT_LEN
    seg = TUNING["segments"]
    per_segment = h * triton.cdiv(d_v, _block_v(TUNING["output"]["BV"], d_v, d_k))
    want = max(1, seg["programs_per_sm"] * _sm_count(device.index or 0) // per_segment)  # one wave
    length = triton.cdiv(triton.cdiv(max(n_tokens, 1), want), CHUNK) * CHUNK
    return max(length, triton.cdiv(seg["min_segment"], CHUNK) * CHUNK)


def _block_v(bv: int, d_v: int, d_k: int = 0) -> int:
    """D_v columns per program: the tuned BV, at most 32 when D_k > 128 (the [D_k, BV] float32
    state and the [64, D_k] q, k tiles must fit registers and shared memory), at least 16."""
    bv = bv if d_k <= 128 else min(bv, 32)
    return min(bv, max(16, triton.next_power_of_2(d_v)))


def _segment_tables(cu_seqlens: torch.Tensor, length: int):
    """For a packed batch: int32 [S, 2] (sequence, segment within it) of every segment in slot
    order, int32 [N] each sequence's first slot, int32 [P] the slots of segments that are not
    their sequence's last (pass 1), and S, P."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    counts = [-(-n // length) for n in lens]
    pairs = [(i, j) for i, c in enumerate(counts) for j in range(c)]
    firsts = [sum(counts[:i]) for i in range(len(counts))]
    nonlast = [f + j for f, c in zip(firsts, counts, strict=True) for j in range(c - 1)]
    dev = cu_seqlens.device
    table = torch.tensor(pairs or [(0, 0)], dtype=torch.int32, device=dev).reshape(-1, 2)
    return (table, torch.tensor(firsts, dtype=torch.int32, device=dev),
            torch.tensor(nonlast or [0], dtype=torch.int32, device=dev), len(pairs), len(nonlast))


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    store_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Segment-parallel Lightning forward (inputs already checked, contiguous, fp32/bf16/fp16).

    q, k: [B, T, H_k, D_k]; v: [B, T, H, D_v]; slope: float32 [H]; initial_state: float32
    [N, H, D_k, D_v] or None; cu_seqlens: int32 [N + 1] with B = 1, or None (N = B).
    Returns (o [B, T, H, D_v] in q's dtype, final state float32 [N, H, D_k, D_v] or None,
    and with store_states the state entering every chunk, [n_chunks, H, D_k, D_v] in q's dtype,
    laid out as :func:`attnlab.kernels.linear._forward` returns it for the backward; else None)."""
    b, t, hk, d_k = q.shape
    h, d_v = v.shape[2], v.shape[3]
    dev = q.device
    dt, prec = _tl_dtype(q.dtype), ("ieee" if q.dtype == torch.float32 else "tf32")
    bk = max(16, triton.next_power_of_2(d_k))
    varlen = cu_seqlens is not None
    length = segment_length(b * t, h, d_k, d_v, dev)
    if varlen:
        n_seq = cu_seqlens.numel() - 1
        table, firsts, nonlast, n_slots, n_nonlast = _segment_tables(cu_seqlens, length)
        cu = cu_seqlens
        n_seg = 1  # unused: the kernels read the tables
        if store_states:
            chunk_idx, chunk_offsets = _chunk_tables(cu_seqlens, CHUNK)
            n_chunks = chunk_idx.shape[0]
        else:
            chunk_offsets, n_chunks = q, 0
    else:
        n_seq = b
        n_seg = triton.cdiv(t, length)
        n_slots, n_nonlast = b * n_seg, b * max(n_seg - 1, 0)
        table = firsts = nonlast = chunk_offsets = cu = q  # any pointer; unused when not varlen
        n_chunks = b * triton.cdiv(t, CHUNK)
    o = _empty(b, t, h, d_v, dtype=q.dtype, device=dev)
    ht = _empty(n_seq, h, d_k, d_v, dtype=torch.float32, device=dev) if output_final_state else o
    h0 = initial_state if initial_state is not None else o
    seg_states = _empty(max(n_slots, 1), h, d_k, d_v, dtype=torch.float32, device=dev)
    states = _empty(max(n_chunks, 1), h, d_k, d_v, dtype=q.dtype, device=dev) if store_states else o

    cfg = TUNING["state"]
    bv = _block_v(cfg["BV"], d_v, d_k)
    if n_nonlast > 0:
        launch_fitting(
            _segment_state_kernel, (triton.cdiv(d_v, bv), n_nonlast, h),
            k, v, slope, seg_states, cu, table, nonlast, t, length, n_seg,
            H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BK=bk, BV=bv, IS_VARLEN=varlen, DT=dt, PREC=prec,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    cfg = TUNING["scan"]
    block = min(cfg["BLOCK"], triton.next_power_of_2(d_k * d_v))
    _segment_scan_kernel[(triton.cdiv(d_k * d_v, block), n_seq * h)](
        slope, seg_states, h0, ht, cu, firsts, t, length,
        H=h, K=d_k, V=d_v, BLOCK=block, USE_H0=initial_state is not None, STORE_HT=output_final_state,
        IS_VARLEN=varlen, num_warps=cfg["num_warps"],
    )
    cfg = TUNING["output"]
    bv = _block_v(cfg["BV"], d_v, d_k)
    if n_slots > 0:
        launch_fitting(  # float32 at D = 256: 3 stages would need 320 KB of shared memory
            _segment_output_kernel, (triton.cdiv(d_v, bv), n_slots, h),
            q, k, v, slope, seg_states, states, o, ht, cu, table, chunk_offsets, scale, t, length, n_seg,
            H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BK=bk, BV=bv, IS_VARLEN=varlen,
            STORE_STATES=store_states, STORE_HT=output_final_state, DT=dt, PREC=prec,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return o, (ht if output_final_state else None), (states if store_states else None)


def chunk_states(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> torch.Tensor:
    """The state entering every chunk, [n_chunks, H, D_k, D_v] in q's dtype, for Lightning's
    backward when the forward did not keep them (recomputed by the segment-parallel passes)."""
    return forward(q, k, v, slope, 1.0, initial_state, False, cu_seqlens, store_states=True)[2]


__all__ = ["TUNING", "chunk_states", "forward", "segment_length"]
