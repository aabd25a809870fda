"""Triton split-K ("flash-decoding") GQA decode: one query token per row over a dense KV cache.

:func:`gqa_decode` is ``attnlab.ops.softmax_decode`` for softmax layers with H_kv > 1 (``S``, and
``W`` over its ring buffer, whose slot order does not matter); MLA's absorbed decode (H_kv = 1,
D = 576) has its own kernel in :mod:`attnlab.kernels.sparse`.

Why a split: at batch 1 there are only B * H_kv (query token, kv head) pairs, 8 for a Llama-style
1B model, so a kernel that walks the whole cache per pair runs on 8 of 132 SMs (SDPA measured 7% of
the copy bandwidth over a 131K cache on an H100). Here the cache's ``S_max`` slots are cut into
``n_splits`` ranges (Dao et al. 2023, "Flash-Decoding for long-context inference"); a program owns
one (split, kv head, row) and ALL G = H_q / H_kv query heads of that kv head, so each K/V row is
loaded once and multiplied against the G heads with ``tl.dot`` (padded to 16 rows). Programs write
float32 partial outputs and base-2 log-sum-exps; ``_combine`` merges them (o = Σ 2^(lse_i - lse) o_i).

CUDA-graph safe: the split count comes from ``S_max`` (a shape), never from the lengths; a program
whose range starts past its row's ``n_valid`` stops at once and writes an empty partial. Under
``torch.compile`` the launcher is an opaque custom op (``attnlab::gqa_decode``), so a compiled
decode step keeps the kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._checks import check_heads_divide, check_same_device, check_tensor
from ._common import output_buffer
from ._pdl import launch_options, use_pdl
from .sparse import combine_shape

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634

# Launch shape: BLOCK_N cache rows per step (half that for heads wider than 128: a 256-wide K and V
# tile of 128 rows, pipelined 3 deep, would not fit shared memory), 4 warps; enough splits for about
# WAVES programs per SM, each split at least MIN_SPLIT_SLOTS slots so its loop amortises the partial
# write. Swept on an H100 inside the fused llama-style 0.84B decode step (2026-11-26, ms per token at
# 4K / 32K context; BLOCK_N x MIN_SPLIT_SLOTS x warps): 128 x 128 x 4 0.840 / 1.182, 128 x 256 x 4
# 0.838 / 1.182, 64 x 128 x 4 0.860 / 1.246 (the previous default), 64 x 256 x 4 0.902 / 1.248,
# 32 x 64 x 8 0.824 / 1.293. Compiled for sm_90 on a CPU machine (triton 3.9, at BLOCK_N 64,
# benchmarks/sparse_mla_gpu.py's _compile_sm90): bf16 G 4-16 x D 64: 59-64 registers, 36 KB shared
# memory; D 128: 80 registers, 70 KB; no spills, cp.async pipelined (3 stages); the combine 40 registers.
BLOCK_N = 128
NUM_WARPS = 4
WAVES = 3
MIN_SPLIT_SLOTS = 128
POISON_OUTPUTS = False  # tests: fill every output buffer with NaN first, so an unwritten element fails


@triton.jit
def _mm(a, b, PREC: tl.constexpr, INTERP: tl.constexpr):
    """a @ b, fp32 accumulation; under the interpreter in float32 (tl.dot on bf16 misbehaves there)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _split_kernel(
    Q, K, V, NVALID, OP, LP,
    qk_scale, S_MAX, per_split,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    D_V: tl.constexpr, BDV: tl.constexpr, BLOCK_N: tl.constexpr, N_SPLIT: tl.constexpr,
    PREC: tl.constexpr, INTERP: tl.constexpr, NV_ADD: tl.constexpr, PDL: tl.constexpr,
):
    """Program (split, kv head hk, row b): query heads hk*G .. hk*G+G-1 over slots
    [split*per_split, +per_split) ∩ [0, n_valid[b] + NV_ADD). Writes OP [B, H_q, N_SPLIT, D_V] float32
    (normalised within the split, 0 if empty) and LP [B, H_q, N_SPLIT] (base-2 lse, -inf if empty)."""
    if PDL:  # attnlab.kernels._pdl: the next kernel may launch; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    split = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    H = tl.num_programs(1) * G

    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    heads = hk * G + g
    d = tl.arange(0, BD)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & (d < D)[None, :], other=0.0)  # (BLOCK_G, BD)
    dv = tl.arange(0, BDV)

    nv = tl.load(NVALID + b).to(tl.int32) + NV_ADD
    nv = tl.minimum(tl.maximum(nv, 0), S_MAX)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, nv)

    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)  # finite: an empty block never gives 0 * inf
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BDV], dtype=tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for start in range(lo, hi, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        valid = slots < hi
        rows = slots.to(tl.int64)
        k = tl.load(k_base + rows[:, None] * stride_ks + d[None, :],
                    mask=valid[:, None] & (d < D)[None, :], other=0.0)  # (BLOCK_N, BD)
        s = _mm(q, tl.trans(k), PREC, INTERP) * qk_scale  # (BLOCK_G, BLOCK_N), base-2 logits
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows[:, None] * stride_vs + dv[None, :],
                    mask=valid[:, None] & (dv < D_V)[None, :], other=0.0)  # (BLOCK_N, BDV)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PREC, INTERP)
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    row = (b * H + heads) * N_SPLIT + split  # (BLOCK_G,)
    tl.store(OP + row[:, None] * D_V + dv[None, :], o, mask=g_ok[:, None] & (dv < D_V)[None, :])
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(LP + row, lse, mask=g_ok)


@triton.jit
def _combine(OP, LP, O, LENGTHS, stride_ob, stride_oh, H,
             N_SPLIT: tl.constexpr, CHUNK: tl.constexpr, D_V: tl.constexpr, BDV: tl.constexpr,
             ADVANCE: tl.constexpr, PDL: tl.constexpr):
    """Program (row b, head h, value columns [pid1 * BDV, +BDV)): o = Σ_i 2^(lse_i - lse) o_i over the
    splits, CHUNK at a time; 0 if every split is empty. ADVANCE: the (head 0, first columns) program also
    counts the row's new token, LENGTHS[b] += 1 (the split kernel, which read it, has finished: same
    stream)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0).to(tl.int64)  # b * H + h
    b = pid // H
    h = pid % H
    if ADVANCE:
        if h == 0 and tl.program_id(1) == 0:
            tl.store(LENGTHS + b, tl.load(LENGTHS + b) + 1)
    dv = tl.program_id(1) * BDV + tl.arange(0, BDV)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    for c in range(0, N_SPLIT, CHUNK):
        sp = c + tl.arange(0, CHUNK)
        m = tl.maximum(m, tl.max(tl.load(LP + pid * N_SPLIT + sp, mask=sp < N_SPLIT, other=float("-inf")), 0))
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BDV], dtype=tl.float32)
    for c in range(0, N_SPLIT, CHUNK):
        sp = c + tl.arange(0, CHUNK)
        w = tl.exp2(tl.load(LP + pid * N_SPLIT + sp, mask=sp < N_SPLIT, other=float("-inf")) - m)  # (CHUNK,)
        part = tl.load(OP + (pid * N_SPLIT + sp)[:, None] * D_V + dv[None, :],
                       mask=(sp < N_SPLIT)[:, None] & (dv < D_V)[None, :], other=0.0)  # (CHUNK, BDV)
        part = tl.where((w > 0)[:, None], part, 0.0)
        acc += tl.sum(w[:, None] * part, 0)
        total += tl.sum(w, 0)
    o = acc / tl.where(total > 0, total, 1.0)
    tl.store(O + b * stride_ob + h * stride_oh + dv, o.to(O.dtype.element_ty), mask=dv < D_V)


# ---------------------------------------------------------------------------------------------
# host side


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return output_buffer(shape, dtype, device, POISON_OUTPUTS)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few splits, so the tests exercise the combine
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def num_splits(batch: int, kv_heads: int, s_max: int, device: torch.device) -> int:
    """Splits of the S_max slots: about WAVES programs per SM over batch * kv_heads * splits
    programs, each split at least MIN_SPLIT_SLOTS slots (fewer on the interpreter's tiny caches)."""
    min_slots = MIN_SPLIT_SLOTS if device.type == "cuda" else BLOCK_N
    want = WAVES * _num_sms(device)
    by_fill = triton.cdiv(want, batch * kv_heads)
    by_size = max(1, s_max // min_slots)
    return max(1, min(by_fill, by_size))


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_valid: torch.Tensor, scale: float,
            n_splits: int, advance: bool = False) -> torch.Tensor:
    """The split-K kernel and its combine. ``advance``: n_valid is the rows' lengths BEFORE the new
    token, whose k, v already sit in slot n_valid[b]: read n_valid[b] + 1 slots (capped at S_max),
    then n_valid += 1 in place (inside the combine: no extra launch)."""
    B, H, D = q.shape
    S_max, H_kv, D_v = k.shape[1], k.shape[2], v.shape[3]
    G = H // H_kv
    n_splits = max(1, min(n_splits, triton.cdiv(max(1, S_max), 16)))
    per_split = triton.cdiv(max(1, S_max), n_splits)
    block_n = BLOCK_N if max(D, D_v) <= 128 else BLOCK_N // 2
    if _INTERPRET:
        block_n = 32  # the interpreter's tiny caches: several blocks per split, several splits
    per_split = triton.cdiv(per_split, block_n) * block_n  # whole blocks per split
    n_splits = triton.cdiv(max(1, S_max), per_split)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands
    op = _empty(B, H, n_splits, D_v, dtype=torch.float32, device=q.device)
    lp = _empty(B, H, n_splits, dtype=torch.float32, device=q.device)
    o = _empty(B, H, D_v, dtype=q.dtype, device=q.device)
    # PDL only for the fused decode step's launch (advance): the other callers run beside torch ops
    pdl = advance and use_pdl(q.device)
    launch = launch_options(pdl)
    _split_kernel[(n_splits, H_kv, B)](
        q, k, v, n_valid, op, lp,
        scale * LOG2E, S_max, per_split,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        G=G, BLOCK_G=_pow2(G), D=D, BD=_pow2(D), D_V=D_v, BDV=_pow2(D_v), BLOCK_N=block_n,
        N_SPLIT=n_splits, PREC=prec, INTERP=_INTERPRET, NV_ADD=int(advance), PDL=pdl, num_warps=NUM_WARPS,
        **launch,
    )
    bdv, chunk = combine_shape(B * H, D_v, n_splits, q.device)  # (the MLA / DSA combine's choice)
    _combine[(B * H, triton.cdiv(D_v, bdv))](
        op, lp, o, n_valid, o.stride(0), o.stride(1), H,
        N_SPLIT=n_splits, CHUNK=chunk, D_V=D_v, BDV=bdv, ADVANCE=advance,
        PDL=pdl, num_warps=4, **launch,
    )
    return o


# The launcher as a custom op: torch.compile keeps it as one opaque call (with a shape-only fake),
# so a compiled decode step runs the kernel instead of tracing into triton's launcher.
@torch.library.custom_op("attnlab::gqa_decode", mutates_args=())
def _gqa_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_valid: torch.Tensor, scale: float,
                   n_splits: int) -> torch.Tensor:
    return _launch(q, k, v, n_valid, scale, n_splits)


@_gqa_decode_op.register_fake
def _(q, k, v, n_valid, scale, n_splits):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[3])


# MLA's absorbed decode (one kv head) runs attnlab.kernels.sparse.softmax_decode; wrapped the same
# way so a compiled decode step keeps that kernel too (the latent cache is then read only up to each
# row's length, as in the eager and CUDA-graph steps, instead of over all of S_max).
@torch.library.custom_op("attnlab::latent_decode", mutates_args=())
def _latent_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_valid: torch.Tensor,
                      scale: float) -> torch.Tensor:
    from . import sparse

    return sparse.softmax_decode(q, k, v, n_valid, scale=scale).contiguous().clone()


@_latent_decode_op.register_fake
def _(q, k, v, n_valid, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[3])


def latent_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_valid: torch.Tensor,
                  scale: float | None = None) -> torch.Tensor:
    """:func:`attnlab.kernels.sparse.softmax_decode` (one kv head, MLA absorbed) as a custom op that
    torch.compile keeps opaque. Same arguments (no n_splits); returns [B, H_q, D_v] in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _latent_decode_op(q, k_cache, v_cache, n_valid, scale)


def gqa_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_valid: torch.Tensor,
    scale: float | None = None,
    n_splits: int | None = None,
) -> torch.Tensor:
    """One query token per row against a preallocated KV cache, split-K over the cache.

    Args:
        q: [B, H_q, D]; k_cache: [B, S_max, H_kv, D]; v_cache: [B, S_max, H_kv, D_v]; one dtype
            (bf16/fp16; float32 works with exact float32 products, slowly); the last dim contiguous.
            H_q a multiple of H_kv (query head h reads kv head h // (H_q // H_kv)).
        n_valid: int64/int32 [B]: row b attends to slots 0..n_valid[b]-1 (clamped to [0, S_max]);
            slots past it are never read. No host sync.
        scale: logit scale; None = D ** -0.5.
        n_splits: ranges the S_max slots are cut into; None = :func:`num_splits` (from shapes only).

    Returns:
        o: [B, H_q, D_v] in q's dtype; 0 for a row with n_valid = 0. Inference only (no autograd).
    """
    check_tensor("q", q, 3, "[B, H_q, D]")
    B, H, D = q.shape
    check_tensor("k_cache", k_cache, 4, "[B, S_max, H_kv, D]", shape=(B, None, None, D), dtypes=(q.dtype,))
    check_tensor("v_cache", v_cache, 4, "[B, S_max, H_kv, D_v]",
                 shape=(B, k_cache.shape[1], k_cache.shape[2], None), dtypes=(q.dtype,))
    check_tensor("n_valid", n_valid, 1, "[B]", shape=(B,), dtypes=(torch.int64, torch.int32))
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, n_valid=n_valid)
    check_heads_divide("q", H, "k_cache", k_cache.shape[2])
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q: gqa_decode takes bfloat16, float16 or float32, got {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got strides {t.stride()}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    scale = D**-0.5 if scale is None else float(scale)
    if n_splits is None:
        n_splits = num_splits(B, k_cache.shape[2], k_cache.shape[1], q.device)
    return _gqa_decode_op(q, k_cache, v_cache, n_valid, scale, int(n_splits))


def gqa_decode_advance(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       lengths: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """:func:`gqa_decode` for a decode step whose new k, v were just written to slot ``lengths[b]``
    (the fused decode step, attnlab.layers.fused): attends to slots 0..lengths[b] (at most S_max:
    a full ring buffer) and then counts the token, ``lengths += 1`` IN PLACE, in the same launches.
    q [B, H_q, D], caches [B, S_max, H_kv, D(_v)] as in :func:`gqa_decode`; lengths int64 [B],
    contiguous. Not a custom op: eager and CUDA-graph steps only (torch.compile traces the plain step)."""
    check_tensor("q", q, 3, "[B, H_q, D]")
    B, H, D = q.shape
    check_tensor("k_cache", k_cache, 4, "[B, S_max, H_kv, D]", shape=(B, None, None, D), dtypes=(q.dtype,))
    check_tensor("v_cache", v_cache, 4, "[B, S_max, H_kv, D_v]",
                 shape=(B, k_cache.shape[1], k_cache.shape[2], None), dtypes=(q.dtype,))
    check_tensor("lengths", lengths, 1, "[B]", shape=(B,), dtypes=(torch.int64, torch.int32))
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, lengths=lengths)
    check_heads_divide("q", H, "k_cache", k_cache.shape[2])
    if not lengths.is_contiguous() or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("lengths, k_cache, v_cache: lengths must be contiguous and the caches' last dim too")
    q = q if q.stride(-1) == 1 else q.contiguous()
    scale = D**-0.5 if scale is None else float(scale)
    n_splits = num_splits(B, k_cache.shape[2], k_cache.shape[1], q.device)
    return _launch(q, k_cache, v_cache, lengths, scale, n_splits, advance=True)


__all__ = ["gqa_decode", "gqa_decode_advance", "latent_decode", "num_splits"]
