"""Triton kernels for chunked linear attention: Gated DeltaNet, Kimi Delta Attention, Lightning.

The ops in :mod:`attnlab.ops` call these through ``mode="triton"`` (and ``"auto"`` on CUDA);
each public function here has the op's signature minus ``mode``, plus ``cu_seqlens`` for packed
variable-length batches. Conventions as in the ops: tensors [B, T, H, D], log-space gates,
float32 states [B, H, D_k, D_v], ``o_t = S_tᵀ (scale · q_t)`` after the token's update.

Forward (chunk C = 64, the UT/WY form of Yang et al. 2024 "Parallelizing Linear Transformers with
the Delta Rule over Sequence Length" and "Gated Delta Networks" 2025, as in fla's chunk kernels).
With G the within-chunk cumulative log-gate, Γ = exp(G), S₀ the state entering the chunk:

    A     = strict_tril(β_i Σ_d k_id k_jd Γ_id/Γ_jd)          [C, C]
    X     = (I + A)⁻¹                    (16-row blocks in 4×4-block products, then block merge)
    w     = X (β K ⊙ Γ),   u = X (β V)                         [C, D_k], [C, D_v]
    v'    = u − w S₀                                            (the delta-rule corrected values)
    o     = scale (Q ⊙ Γ) S₀ + (scale · tril(Σ_d q_id k_jd Γ_id/Γ_jd)) v'
    S_C   = Diag(Γ_C) S₀ + (K ⊙ Γ_C/Γ)ᵀ v'

Three launches: ``_prepare_kernel`` (parallel over chunks: gate cumsum, A, X, w, u, k decayed to
the chunk end, and for the per-channel gate the masked gated q·k matrix), ``_state_kernel`` (one
program per (sequence, head, D_v block) walking the chunks in order; it writes the state entering
each chunk and the corrected values v', and does nothing else, since its loop is the critical path)
and ``_output_kernel`` (parallel over chunks). Lightning attention has no delta rule (v' = v) and a
constant decay, so it skips the first launch. (A first version fused the output into the
sequential loop; on an H200 that was ~2x slower than fla at 64K tokens, so the output moved out. It
came back into the segment-parallel pass below, FUSED_OUTPUT, once that pass had the programs to
carry it: ~2 per SM of 64 value columns each.)
With ``PREP_SPLIT`` (the default for both gates) the first launch is instead ``_kkt_inv_kernel`` (gate
cumsum, A and the q·k matrix as 64-row tensor-core products, X into a scratch, as fla's
chunk_scaled_dot_kkt + solve_tril do) and ``_wu_kernel`` (w, u, kd: 64-row products with X), or, by
default (``PREP_FUSED``), the first alone with w, u, kd fused: far fewer register spills than the
single kernel.
With ``LIGHTNING_SEGMENTED`` (the default) Lightning's forward is instead the segment-parallel one
in :mod:`.lightning_fwd`, which writes per-chunk states only when an input needs a gradient.
With ``DELTA_SEGMENTED`` (the default) the delta rule's state pass is instead the segment-parallel
one in :mod:`.delta_segments` (same outputs: per-chunk states, v', final state); with ``FUSED_OUTPUT``
(the default) a forward that makes outputs has that pass make them too, so the per-chunk states and v'
never reach memory and ``_output_kernel`` is not launched (the backward's recomputing forward, which
makes no outputs, still writes the states).

Decay ratios never overflow: for the scalar gate the [C, C] exponent is masked before exp; for
the per-channel gate, pairs in different 16-token sub-chunks factor through the first token r of
the row's sub-chunk, exp(G_i − G_r)·exp(G_r − G_j), both ≤ 1. Pairs inside one sub-chunk use the
same factoring on the tensor cores when the gate falls by less than DIAG_SPAN = 60 over the
sub-chunk (the second factor is then ≤ e^60, finite), and an elementwise loop otherwise (as fla's
chunk_kda does), so a log-gate of −40 per token is exact too (tested).
The split kernel instead halves segments from the whole chunk down (_gated_kkt): a segment whose
gate falls by less than DIAG_SPAN factors all its pairs through its middle token (factors ≤ e^30),
else only the pairs across the middle (factors ≤ 1) and its halves go on (one product per segment
size, the pairs across segments masked off); pairs left inside 4-token segments go elementwise
(_seg_pairs), so no gate overflows either.

Backward: Lightning has a Triton backward (q, k, v, initial state; the slope is a fixed buffer
in the layers, and asking for its gradient falls back to recomputing through the chunked PyTorch
op under autograd). Gated DeltaNet and KDA: :mod:`attnlab.kernels.linear_bwd` (the forward keeps
X, aqk and the cumulative gate, the backward's forward kernels recompute w, u, kd and the states, a
Triton sweep carries the state gradient back over the chunks, and Triton kernels make the per-chunk
gradients: :mod:`.delta_bwd_local`, :mod:`.delta_bwd_pairs`; cu_seqlens supported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_heads_divide, check_same_device, check_tensor
from ._common import launch_fitting, output_buffer

CHUNK = 64  # tokens per chunk
SUB = 16  # rows per block of the triangular solve (and per-channel-gate sub-chunk)
DIAG_SPAN: tl.constexpr = tl.constexpr(60.0)  # see _diag_block
L2NORM_EPS = 1e-6  # q, k ← x / sqrt(Σx² + eps), as the ops (fla / HF Qwen3-Next) do
POISON_OUTPUTS = False  # tests set this: buffers the kernels must fill start as NaN, not garbage
LIGHTNING_SEGMENTED = True  # Lightning forward: kernels/lightning_fwd.py (False: the kernels below)
DELTA_SEGMENTED = True  # GDN/KDA state pass: kernels/delta_segments.py (False: _state_kernel)
# with DELTA_SEGMENTED, by gate kind: a forward that makes outputs has the segment pass make them while
# each chunk's state and v' are in registers (no per-chunk states or v' through memory, no
# _output_kernel launch; launch shapes: delta_segments.TUNING["output_*"]). H100, 16K / 64K, bf16,
# whole forward, CUDA graphs, interleaved, best of 3 (RESULTS.md, eleventh session): GDN 0.709 /
# 2.692 ms -> 0.671 / 2.427, KDA 1.092 / 4.202 -> 1.025 / 3.926; outputs bit-identical
FUSED_OUTPUT: dict[str, bool] = {"scalar": True, "vector": True}
# GDN/KDA prepare by gate kind: _kkt_inv_kernel (+ _wu_kernel) (False: the single _prepare_kernel).
# H100, B = 1, H = 16, D = 128, bf16, whole forward, interleaved, best of 3 (benchmarks/RESULTS.md):
# KDA 16K 2.054 ms (single) -> 1.265 (split, two launches), 64K 8.155 -> 4.841; steep gates (x 30) 16K
# 1.997 -> 1.779. GDN 16K 0.758 (single) vs 0.830 (split, fused) / 0.893 (two launches), 64K 2.857 vs
# 3.163 / 3.468: GDN kept the single kernel then. Tenth session, after X went to the input dtype and A's
# blocks into registers (H100, CUDA graphs, interleaved, best of 3, whole forward, two calls): single
# 0.744 / 2.735 ms at 16K / 64K; split + fused w, u, kd at 8 warps capped at 128 registers 0.740 /
# 2.839, 4 warps uncapped 0.727 / 2.798, capped at 128 / 144 / 168 / 192: 0.755 / 2.930, 0.725 /
# 2.771, 0.710 / 2.691, 0.727 / 2.801. So GDN's inference forward takes the split form at 4 warps and
# 168 registers (three programs per SM; it parks 96 bytes a thread, which costs less than the fourth
# program it would take to avoid). The training path and float32 inputs keep the 8-warp launch
# ("scalar_train"). Confirmed in the eleventh session (same card, interleaved with fla): single 0.744 /
# 2.739, split 0.711 / 2.691, fla 0.693 / 2.684; GPU tests passed on it.
PREP_SPLIT: dict[str, bool] = {"scalar": True, "vector": True}
# with PREP_SPLIT, by gate kind: w, u, kd inside _kkt_inv_kernel (False: a second launch, _wu_kernel).
# KDA, twelfth session (H100, whole forward, CUDA graphs, interleaved, best of 3, ms at 16K / 64K):
# gentle gates (0.1 · logsigmoid) 0.989 / 3.801 two launches, 0.962 / 3.661 fused; log-gates x 30
# 1.241 / 4.748 vs 1.195 / 4.610 (fla in the same runs 1.312 / 5.149 and 1.312 / 5.159). It parks 56
# bytes a thread under the 128-register cap (PREP_TUNING), which costs less than the launch and the
# DRAM round trip of X, k and gcum it saves; more registers would leave one program per SM.
PREP_FUSED: dict[str, bool] = {"scalar": True, "vector": True}
# GDN's inference forward (segmented pass, split prepare): the prepare writes only X and gcum; the
# segment passes make what it would write from the K tile they load (pass 3 loads it for the
# outputs anyway), X, v and β: kdᵀ y as Kᵀ (e^{G_last − G} ⊙ y), and v' = u − w S as
# X (β ⊙ (V − e^G ⊙ (K S))) (one 64 x 64 x BV product more a chunk). The prepare writes 24 KB a
# token less at H = 16, D = 128, bf16, and does two 64 x 64 x 128 products less a chunk; the same
# sums, rounded in other places. H100, whole forward, CUDA graphs, interleaved, best of 3 (RESULTS.md,
# thirteenth session), 16K / 64K: off 0.644 / 2.312 ms; kd alone made so 0.576 / 2.061 (0.578 /
# 2.116 in a second call); kd, w, u 0.517 / 1.884 (fla 0.683-0.694 / 2.688-2.699); its prepare at 8
# warps capped at 128 registers 0.556 / 2.071, so PREP_TUNING["scalar"] stays. With 7 segments
# (delta_segments' transition_per_sm): 0.486 / 1.795 at PREP_TUNING["scalar"] (164 registers, 3
# programs an SM), 2 warps uncapped (222, 4 an SM) 0.492 / 1.808, 4 warps capped at 128 (parks 200
# bytes, 4 an SM) 0.492 / 1.832, BK 32 0.493 / 1.842. (KDA's u made so alone, w still read, did not
# pay: 0.970 / 3.738 ms vs 0.971 / 3.658; removed, see RESULTS.md.) Off: the prepare writes w, u, kd.
WUKD_FROM_INPUTS = True
# KDA's inference forward (split, fused prepare): gcum, float32 [B, T, H, D_k], stored only at the
# rows read later (every 4th row of a chunk, its last row, and the channel blocks of steep gates
# whole), a quarter of its bytes; w's operand and kd are made from G in registers in the prepare's
# channel loop. Off: gcum is stored whole and the w step re-reads it with k. H100, whole forward,
# CUDA graphs, interleaved, best of 3 (RESULTS.md, fourteenth session), 16K / 64K: off 0.957 / 3.649
# ms, on 0.911 / 3.485 (fla 1.312 / 5.156); it parks 136 bytes a thread under the 128-register cap
# (56 off), which costs less than the 12 KB a token at H = 16 it keeps from DRAM. Fifteenth session:
# on this launch the channel loop loads each block's k and q tiles beside its g tile, before the
# cumulative sum and the barrier, not after them (one DRAM wait a block instead of two; 144 bytes
# parked): KDA 16K / 64K 0.889 -> 0.858 ms, 3.441 -> 3.263 (interleaved in one call, OVERLAP_PREPARE
# on; fla 1.310 / 5.149). Also tried there: the chunk's middle and last rows of G taken from
# registers (no store-barrier-load round trip; 200 bytes parked) 0.970 / 3.697 ms, and the next
# block's g, k, q prefetched a block ahead (256 bytes) 1.007 / 3.818: slower, not kept.
SPARSE_GCUM = True
# By gate kind: the split prepare's triangular solve, X = (I + A)⁻¹ from A's 16 x 16 blocks, with its
# fp32 products at tf32 on the tensor cores (mma.sync; fla's solve_tril merges its blocks so) where X
# is stored in a 16-bit dtype (inference: its rounding there, 2^-9, is above tf32's 2^-11); off, or X
# in float32 (the backward keeps it, float32 inputs): "ieee" (FMA). H100, whole forward, CUDA graphs,
# interleaved, best of 3 (RESULTS.md, fourteenth session): GDN's prepare 126.8 -> 102.7 us at 16K
# (torch.profiler), the forward at 64K 1.810 -> 1.700 ms (fla 2.707); KDA's prepare parks 272 bytes
# a thread instead of 136 under its 128-register cap and got slower (16K / 64K 0.906 / 3.491 ms ->
# 0.938 / 3.635), so off there. Also tried (sixteenth session): X from whole 64 x 64 tiles, the
# 16 x 16 form nested one level further (ten dependent 64 x 64 tf32 products, 26 barriers instead of
# 64, sm_90: 16 bytes parked): GDN's prepare 113.9 -> 126.4 us at 16K, the forward 0.4531 -> 0.4684
# ms (16K), 1.6793 -> 1.7252 (64K); not kept.
SOLVE_TF32: dict[str, bool] = {"scalar": True, "vector": False}
# By gate kind, segmented state pass (DELTA_SEGMENTED), no cu_seqlens: the prepare runs in two
# launches, the chunks of the segments but the last, then the last segment's, which only pass 3 reads
# and so runs beside earlier passes, which go on a second stream (CUDA; the interpreter runs them in
# order). The value is the first pass it runs beside: 1, passes 1 and 2; 2, pass 2 only (the scan:
# one program per head and 16-column block); 0, off (one prepare launch). H100, whole forward, CUDA
# graphs, interleaved, best of 3 (RESULTS.md), 16K / 64K, ms:
# - KDA, whose pass 1 fits 2 programs an SM and fills ~96 of the 132 SMs (3 segments x 16 heads x 4
#   column blocks), so the prepare takes the rest: fifteenth session, 0 0.877 / 3.343, 1 0.862-0.868 /
#   3.254-3.317 (fla 1.309 / 5.133-5.154; outputs bit-identical), eager calls 0.910 off, 0.908 on;
#   sixteenth, 1 0.8600 / 3.2703, 2 0.8896 / 3.3747, 0 0.8812 / 3.3624.
# - GDN, whose pass 1 fills the GPU (6 x 16 x 4 programs, 3 an SM): fifteenth session, 1 0.461 / 1.652,
#   0.461 / 1.653, 0.466 / 1.648 against 0 0.460 / 1.686, 0.460 / 1.687, 0.463 / 1.685 in three
#   calls; sixteenth, 2 0.4552 / 1.6863, 0 0.4572 / 1.6942, 1 0.4609 / 1.6725 (fla 0.6918 / 2.7112),
#   and in a second call (another change in all three) 2 0.4684 / 1.7252, 0 0.4710 / 1.7286.
OVERLAP_PREPARE: dict[str, int] = {"scalar": 2, "vector": 1}

# Kernel launch parameters, by gate kind; the benchmark may override them. From sweeps on an H200
# at T = 16K, B = 1, H = 16, D = 128, bf16 (benchmarks/linear_gpu.py --sweep; see RESULTS.md).
# Sequential state kernel: BV = D_v columns per program (more programs, each with less work),
# warps, software-pipeline depth (prefetching the next chunk's tiles is what pays here).
TUNING: dict[str, dict[str, int]] = {
    "scalar": {"BV": 16, "num_warps": 4, "num_stages": 3},
    "vector": {"BV": 16, "num_warps": 4, "num_stages": 4},
    "lightning": {"BV": 16, "num_warps": 4, "num_stages": 4},
}
# Output kernel (parallel over chunks).
OUT_TUNING: dict[str, dict[str, int]] = {
    "scalar": {"BV": 128, "num_warps": 4, "num_stages": 2},
    "vector": {"BV": 128, "num_warps": 4, "num_stages": 2},
    "lightning": {"BV": 128, "num_warps": 4, "num_stages": 2},
}
# Prepare (parallel over chunks). With PREP_SPLIT: "num_warps", "BK" (channels per step of A) and
# "maxnreg" (ptxas register cap) of _kkt_inv_kernel, "wu_num_warps" / "wu_num_stages" of _wu_kernel
# (where PREP_FUSED is off); a key a sweep leaves out falls back to the defaults in _prepare.
# Without PREP_SPLIT: PREP_SINGLE_WARPS.
# sm_90 (registers, stack bytes per thread) at H = HK = 16, D_k = D_v = 128, bf16, pointers and T
# 16-divisible as at a real launch (tests/test_kernels_linear.py::test_prepare_compiles_for_sm90):
# (Triton 3.9; the numbers in [] are from before the 4x4-block inverse, the ninth session's; the
# single kernel's are with w, u as 64-row products, the tenth session's: before it, KDA 2 warps
# (255, 1928), GDN 2 warps (255, 288), 4 warps (255, 0))
#   single _prepare_kernel     KDA 2 warps (255, 1832), 4 warps (255, 1024)
#                              GDN 2 warps (255, 0),  4 warps (219, 0)
#     [without the 16-divisibility: KDA 2 warps (168, 5224), 4 (255, 2296); GDN 2 (255, 1784)]
#   _kkt_inv_kernel            KDA 8 warps BK 32, maxnreg 128: (128, 0)  [uncapped (162, 0); 4 warps
#                                (250, 0); BK 64 at 8 warps (250, 0)]; since A's blocks are split off
#                                in registers (tenth session) uncapped (171, 0)
#                              GDN 8 warps BK 64: (114, 0)  [4 warps (168, 0)]; fused, 4 warps capped
#                                at 168 (the inference default): (168, 96) with X in bf16
#   _kkt_inv_kernel + w, u, kd KDA 8 warps, maxnreg 128: (128, 24), uncapped (172, 0); one product per
#                                segment size (twelfth session) (128, 56), and (128, 24) unfused
#     (FUSE_WU)                GDN 8 warps, maxnreg 128: (121, 0), uncapped (121, 0)  [4 warps (240, 0)]
#   _wu_kernel                 KDA 8 warps 1 stage (71, 0), 3 stages (102, 0); 4 warps (128 / 168, 0)
#                              GDN 8 warps 1 stage (70, 0), 3 stages (80, 0);  4 warps (104 / 144, 0)
# 8 warps and at most 128 registers: two 8-warp programs share an SM (16 warps resident; the
# spilling single kernel ran 8 per SM at 2 warps). The cap costs KDA's kernel nothing (ptxas just
# spreads out when allowed); the fused KDA form spills under it, which until the twelfth session
# kept PREP_FUSED off for KDA (X, k and gcum through DRAM once more; see PREP_FUSED). _wu_kernel's K
# and V loops have two steps, whose loads one stage already issues together; more stages only cost
# registers.
# float32 inputs (products on FMA units, not tensor cores) go uncapped: (255, 160) KDA, (255, 280) GDN.
PREP_TUNING: dict[str, dict[str, int]] = {
    "scalar": {"num_warps": 4, "BK": 64, "maxnreg": 168, "wu_num_warps": 8, "wu_num_stages": 1},
    "vector": {"num_warps": 8, "BK": 32, "maxnreg": 128, "wu_num_warps": 8, "wu_num_stages": 1},
    # GDN's split prepare when the backward keeps X (float32), and for float32 inputs: the launch
    # timed for training
    "scalar_train": {"num_warps": 8, "BK": 64, "maxnreg": 128, "wu_num_warps": 8, "wu_num_stages": 1},
}
PREP_SINGLE_WARPS = {"scalar": 2, "vector": 2}  # num_warps of _prepare_kernel (PREP_SPLIT = False)


# ---------------------------------------------------------------------------------------------
# small device helpers


@triton.jit
def _tile(ptr, row0, n_rows, row_stride, col0, n_cols, BR: tl.constexpr, BCOL: tl.constexpr):
    """Load a [BR, BCOL] tile at (row0, col0) of a row-major view, zero outside [n_rows, n_cols]."""
    r = row0 + tl.arange(0, BR)
    c = col0 + tl.arange(0, BCOL)
    m = (r < n_rows)[:, None] & (c < n_cols)[None, :]
    return tl.load(ptr + r[:, None].to(tl.int64) * row_stride + c[None, :], mask=m, other=0.0)


@triton.jit
def _store_tile(ptr, x, row0, n_rows, row_stride, col0, n_cols, BR: tl.constexpr, BCOL: tl.constexpr):
    r = row0 + tl.arange(0, BR)
    c = col0 + tl.arange(0, BCOL)
    m = (r < n_rows)[:, None] & (c < n_cols)[None, :]
    tl.store(ptr + r[:, None].to(tl.int64) * row_stride + c[None, :], x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _vec(ptr, row0, n_rows, row_stride, BR: tl.constexpr):
    """Load BR scalars spaced row_stride apart (a per-token gate or beta), zero past n_rows."""
    r = row0 + tl.arange(0, BR)
    return tl.load(ptr + r.to(tl.int64) * row_stride, mask=r < n_rows, other=0.0).to(tl.float32)


@triton.jit
def _row(x, i, BR: tl.constexpr):
    """Row i of a [BR, N] register tile, as [N]."""
    sel = (tl.arange(0, BR) == i)[:, None]
    return tl.sum(tl.where(sel, x, 0.0), 0)


@triton.jit
def _mm(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """a @ b on the tensor cores in the input dtype DT, fp32 accumulation."""
    return tl.dot(a.to(DT), b.to(DT), input_precision=PREC)


@triton.jit
def _mm32(a, b, P: tl.constexpr = "ieee"):
    """a @ b in full fp32 (the small blocks of the triangular solve), or fp32 tiles at precision P."""
    return tl.dot(a, b, input_precision=P)


@triton.jit
def _cat_cols(a, b):
    """[R, C], [R, C] register tiles side by side: [R, 2C]."""
    R: tl.constexpr = a.shape[0]
    C: tl.constexpr = a.shape[1]
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [R, 2 * C])


@triton.jit
def _cat_rows(a, b):
    """[R, C], [R, C] register tiles one above the other: [2R, C]."""
    R: tl.constexpr = a.shape[0]
    C: tl.constexpr = a.shape[1]
    return tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), [2 * R, C])


@triton.jit
def _split_rows(x):
    """[2R, C] register tile -> its top and bottom [R, C] halves."""
    R2: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    return tl.split(tl.permute(tl.reshape(x, [2, R2 // 2, C]), (1, 2, 0)))


@triton.jit
def _split_cols(x):
    """[R, 2C] register tile -> its left and right [R, C] halves."""
    R: tl.constexpr = x.shape[0]
    C2: tl.constexpr = x.shape[1]
    return tl.split(tl.permute(tl.reshape(x, [R, 2, C2 // 2]), (0, 2, 1)))


@triton.jit
def _quarters(x):
    """[2R, 2C] register tile -> its [R, C] blocks: top-left, top-right, bottom-left, bottom-right."""
    top, bot = _split_rows(x)
    a, b = _split_cols(top)
    c, d = _split_cols(bot)
    return a, b, c, d


@triton.jit
def _inv_unit_lower(a, BC: tl.constexpr, P: tl.constexpr = "ieee"):
    """(I + a)⁻¹ for a strictly lower-triangular [16, 16] fp32 tile, in straight-line products (no
    sequential row loop): with b = a's 4×4 diagonal blocks and o = a − b (strictly block-lower),
    (I + b)⁻¹ = (I − b)(I + b²) because b⁴ = 0, and with m = (I + b)⁻¹ o (m⁴ = 0: four block rows),
    (I + a)⁻¹ = (I + m)⁻¹ (I + b)⁻¹ = (I − m)(I + m²)(I + b)⁻¹. Powers above the third never appear,
    so there is none of the cancellation a full doubling (I − a)(I + a²)(I + a⁴)(I + a⁸) suffers on
    correlated keys; its error matches forward substitution's (fp32, β up to 2, near-parallel keys:
    relative 7e-6 against 7e-6)."""
    tl.static_assert(BC == 16, "the 4x4-block inverse is written for 16x16 tiles")
    rr = tl.arange(0, BC)
    eye = (rr[:, None] == rr[None, :]).to(tl.float32)
    b = tl.where((rr[:, None] // 4) == (rr[None, :] // 4), a, 0.0)
    dinv = _mm32(eye - b, eye + _mm32(b, b, P), P)
    m = _mm32(dinv, a - b, P)
    return _mm32(_mm32(eye - m, eye + _mm32(m, m, P), P), dinv, P)


@triton.jit
def _diag_block_vec(kc, qc, Gc, k_p, G_p, row0, n, k_stride, G_stride, col0, K: tl.constexpr,
                    BC: tl.constexpr, BK: tl.constexpr):
    """Inside one sub-chunk, per-channel gate: Σ_d k_id k_jd e^{G_id−G_jd} (j < i) and the same
    with q_i (j ≤ i), elementwise over d, one column j at a time (row j re-read from memory, an
    L1 hit, instead of a cross-thread extraction). kc, qc, Gc [BC, BK] fp32 tiles of rows row0..."""
    rr = tl.arange(0, BC)
    cols = col0 + tl.arange(0, BK)
    akk = tl.zeros([BC, BC], dtype=tl.float32)
    aqk = tl.zeros([BC, BC], dtype=tl.float32)
    for j in range(0, BC):
        m = (cols < K) & (cols * 0 + row0 + j < n)
        kj = tl.load(k_p + (row0 + j).to(tl.int64) * k_stride + cols, mask=m, other=0.0).to(tl.float32)
        gj = tl.load(G_p + (row0 + j).to(tl.int64) * G_stride + cols, mask=m, other=0.0)
        e = tl.exp(tl.where((rr >= j)[:, None], Gc - gj[None, :], 0.0))  # [BC, BK], exponent ≤ 0
        kje = kj[None, :] * e
        ck = tl.sum(kc * kje, 1)
        cq = tl.sum(qc * kje, 1)
        col = (rr == j)[None, :]
        akk = tl.where(col & (rr > j)[:, None], ck[:, None], akk)
        aqk = tl.where(col & (rr >= j)[:, None], cq[:, None], aqk)
    return akk, aqk


@triton.jit
def _diag_block(kc, qc, Gc, k_p, G_p, row0, n, k_stride, G_stride, col0, K: tl.constexpr,
                BC: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """The diagonal sub-chunk block of the per-channel-gate products (see _diag_block_vec).
    When the gate falls by at most DIAG_SPAN over the sub-chunk (every channel), factor through
    its first row r as two tensor-core products, e^{G_i−G_r} · e^{G_r−G_j}: the second factor
    is ≤ e^{DIAG_SPAN}, finite in fp32 and bf16, and the product is exact up to rounding.
    Steeper gates take the elementwise loop, where no factor exceeds 1."""
    R = _row(Gc, 0, BC)[None, :]
    span = tl.max(tl.max(R - Gc, 1), 0)
    if span < DIAG_SPAN:
        rr = tl.arange(0, BC)
        f = tl.exp(Gc - R)
        kt = tl.trans(kc * tl.exp(R - Gc))
        akk = tl.where(rr[:, None] > rr[None, :], _mm(kc * f, kt, DT, PREC), 0.0)
        aqk = tl.where(rr[:, None] >= rr[None, :], _mm(qc * f, kt, DT, PREC), 0.0)
    else:
        akk, aqk = _diag_block_vec(kc, qc, Gc, k_p, G_p, row0, n, k_stride, G_stride, col0, K, BC, BK)
    return akk, aqk


@triton.jit
def _seq_bounds(i_b, T, cu_seqlens, IS_VARLEN: tl.constexpr):
    """(bos, length) of sequence i_b: rows bos .. bos+length-1 of the flattened [B*T] token axis."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        eos = tl.load(cu_seqlens + i_b + 1).to(tl.int64)
        return bos, (eos - bos).to(tl.int32)
    else:
        return i_b.to(tl.int64) * T, T


# ---------------------------------------------------------------------------------------------
# kernel 1: per chunk, gate cumsum + A + X = (I + A)⁻¹ + w, u (+ gated q·k for per-channel gates)


@triton.jit
def _prep_chunk(chunk_indices, cu_seqlens, T, H: tl.constexpr, HK: tl.constexpr, IS_VARLEN: tl.constexpr,
                chunk0=0):
    """A prepare-style program's chunk (grid: chunks, B·H; varlen: chunks from the chunk table, H):
    (value head, key head, chunk within its sequence, the sequence's first row, its length). chunk0
    (not varlen): the grid's first chunk within each sequence."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    if IS_VARLEN:
        i_h = i_bh
        i_b = tl.load(chunk_indices + 2 * i_c)
        i_t = tl.load(chunk_indices + 2 * i_c + 1)
    else:
        i_b, i_h = i_bh // H, i_bh % H
        i_t = i_c + chunk0
    bos, n = _seq_bounds(i_b, T, cu_seqlens, IS_VARLEN)
    return i_h, i_h // (H // HK), i_t, bos, n


@triton.jit
def _seq_chunks(cu_seqlens, chunk_offsets, T, H: tl.constexpr, HK: tl.constexpr, BT, IS_VARLEN: tl.constexpr):
    """A sequential program's sequence (grid: column blocks, sequences · H): (sequence, value head, key
    head, its first row, its length, its count of BT-token units, the global index of its first unit).
    The units are chunks (BT = CHUNK, chunk_offsets from _chunk_tables) or the segment scans' segments
    (BT = the segment length, chunk_offsets each sequence's first segment slot)."""
    i_bh = tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, n = _seq_bounds(i_b, T, cu_seqlens, IS_VARLEN)
    n_chunks = tl.cdiv(n, BT)
    if IS_VARLEN:
        boh = tl.load(chunk_offsets + i_b).to(tl.int64)
    else:
        boh = i_b.to(tl.int64) * n_chunks
    return i_b, i_h, i_h // (H // HK), bos, n, n_chunks, boh


@triton.jit
def _prepare_kernel(
    q, k, v, g, beta, w, u, kd, gcum, aqk, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE_VEC: tl.constexpr, IS_VARLEN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    i_h, i_hk, i_t, bos, n = _prep_chunk(chunk_indices, cu_seqlens, T, H, HK, IS_VARLEN)
    if GATE_VEC:
        g_p = g + (bos * H + i_h) * K
        G_p = gcum + (bos * H + i_h) * K
    else:
        g_p = g + bos * H + i_h
        G_p = gcum + bos * H + i_h
    _prepare_chunk(q + (bos * HK + i_hk) * K, k + (bos * HK + i_hk) * K, v + (bos * H + i_h) * V, g_p,
                   beta + bos * H + i_h, w + (bos * H + i_h) * K, u + (bos * H + i_h) * V,
                   kd + (bos * H + i_h) * K, G_p, aqk + (bos * H + i_h) * BT, i_t * BT, n, scale,
                   H, HK, K, V, BT, BC, BK, BV, GATE_VEC, DT, PREC)


@triton.jit
def _prepare_chunk(
    q_p, k_p, v_p, g_p, b_p, w_p, u_p, kd_p, G_p, a_p, t0, n, scale,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE_VEC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """_prepare_kernel's work on the chunk of rows t0 .. t0 + BT − 1 (n rows in the sequence), every
    pointer at its sequence's row 0 and its head: q_p, k_p, v_p, the log-gate g_p, β b_p; out w_p,
    u_p, kd_p, the cumulative gate G_p (also read back) and, for the per-channel gate, a_p (aqk).
    benchmarks/prepare_latency_gpu.py loops it over a segment's chunks in one program."""
    r1, r2, r3 = t0 + BC, t0 + 2 * BC, t0 + 3 * BC
    rr = tl.arange(0, BC)
    last = (t0 + tl.minimum(n - t0, BT) - 1).to(tl.int64)  # last token of this chunk

    b0 = _vec(b_p, t0, n, H, BC)
    b1 = _vec(b_p, r1, n, H, BC)
    b2 = _vec(b_p, r2, n, H, BC)
    b3 = _vec(b_p, r3, n, H, BC)

    a10 = tl.zeros([BC, BC], dtype=tl.float32)
    a20 = tl.zeros([BC, BC], dtype=tl.float32)
    a21 = tl.zeros([BC, BC], dtype=tl.float32)
    a30 = tl.zeros([BC, BC], dtype=tl.float32)
    a31 = tl.zeros([BC, BC], dtype=tl.float32)
    a32 = tl.zeros([BC, BC], dtype=tl.float32)
    d0 = tl.zeros([BC, BC], dtype=tl.float32)
    d1 = tl.zeros([BC, BC], dtype=tl.float32)
    d2 = tl.zeros([BC, BC], dtype=tl.float32)
    d3 = tl.zeros([BC, BC], dtype=tl.float32)

    if GATE_VEC:
        s10 = tl.zeros([BC, BC], dtype=tl.float32)
        s20 = tl.zeros([BC, BC], dtype=tl.float32)
        s21 = tl.zeros([BC, BC], dtype=tl.float32)
        s30 = tl.zeros([BC, BC], dtype=tl.float32)
        s31 = tl.zeros([BC, BC], dtype=tl.float32)
        s32 = tl.zeros([BC, BC], dtype=tl.float32)
        e0 = tl.zeros([BC, BC], dtype=tl.float32)
        e1 = tl.zeros([BC, BC], dtype=tl.float32)
        e2 = tl.zeros([BC, BC], dtype=tl.float32)
        e3 = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            c0 = i_k * BK
            G0 = tl.cumsum(_tile(g_p, t0, n, H * K, c0, K, BC, BK).to(tl.float32), 0)
            G1 = tl.cumsum(_tile(g_p, r1, n, H * K, c0, K, BC, BK).to(tl.float32), 0)
            G1 += _row(G0, BC - 1, BC)[None, :]
            G2 = tl.cumsum(_tile(g_p, r2, n, H * K, c0, K, BC, BK).to(tl.float32), 0)
            G2 += _row(G1, BC - 1, BC)[None, :]
            G3 = tl.cumsum(_tile(g_p, r3, n, H * K, c0, K, BC, BK).to(tl.float32), 0)
            G3 += _row(G2, BC - 1, BC)[None, :]
            _store_tile(G_p, G0, t0, n, H * K, c0, K, BC, BK)
            _store_tile(G_p, G1, r1, n, H * K, c0, K, BC, BK)
            _store_tile(G_p, G2, r2, n, H * K, c0, K, BC, BK)
            _store_tile(G_p, G3, r3, n, H * K, c0, K, BC, BK)
            tl.debug_barrier()  # the diagonal blocks re-read single rows of G from memory
            k0 = _tile(k_p, t0, n, HK * K, c0, K, BC, BK).to(tl.float32)
            k1 = _tile(k_p, r1, n, HK * K, c0, K, BC, BK).to(tl.float32)
            k2 = _tile(k_p, r2, n, HK * K, c0, K, BC, BK).to(tl.float32)
            k3 = _tile(k_p, r3, n, HK * K, c0, K, BC, BK).to(tl.float32)
            q1 = _tile(q_p, r1, n, HK * K, c0, K, BC, BK).to(tl.float32)
            q2 = _tile(q_p, r2, n, HK * K, c0, K, BC, BK).to(tl.float32)
            q3 = _tile(q_p, r3, n, HK * K, c0, K, BC, BK).to(tl.float32)
            # reference = first token of the row sub-chunk: both factors are exp(≤ 0)
            R1 = _row(G1, 0, BC)[None, :]
            R2 = _row(G2, 0, BC)[None, :]
            R3 = _row(G3, 0, BC)[None, :]
            f1 = tl.exp(G1 - R1)
            f2 = tl.exp(G2 - R2)
            f3 = tl.exp(G3 - R3)
            kt01 = tl.trans(k0 * tl.exp(R1 - G0))
            kt02 = tl.trans(k0 * tl.exp(R2 - G0))
            kt12 = tl.trans(k1 * tl.exp(R2 - G1))
            kt03 = tl.trans(k0 * tl.exp(R3 - G0))
            kt13 = tl.trans(k1 * tl.exp(R3 - G1))
            kt23 = tl.trans(k2 * tl.exp(R3 - G2))
            a10 += _mm(k1 * f1, kt01, DT, PREC)
            s10 += _mm(q1 * f1, kt01, DT, PREC)
            a20 += _mm(k2 * f2, kt02, DT, PREC)
            s20 += _mm(q2 * f2, kt02, DT, PREC)
            a21 += _mm(k2 * f2, kt12, DT, PREC)
            s21 += _mm(q2 * f2, kt12, DT, PREC)
            a30 += _mm(k3 * f3, kt03, DT, PREC)
            s30 += _mm(q3 * f3, kt03, DT, PREC)
            a31 += _mm(k3 * f3, kt13, DT, PREC)
            s31 += _mm(q3 * f3, kt13, DT, PREC)
            a32 += _mm(k3 * f3, kt23, DT, PREC)
            s32 += _mm(q3 * f3, kt23, DT, PREC)
            q0 = _tile(q_p, t0, n, HK * K, c0, K, BC, BK).to(tl.float32)
            x, y = _diag_block(k0, q0, G0, k_p, G_p, t0, n, HK * K, H * K, c0, K, BC, BK, DT, PREC)
            d0 += x
            e0 += y
            x, y = _diag_block(k1, q1, G1, k_p, G_p, r1, n, HK * K, H * K, c0, K, BC, BK, DT, PREC)
            d1 += x
            e1 += y
            x, y = _diag_block(k2, q2, G2, k_p, G_p, r2, n, HK * K, H * K, c0, K, BC, BK, DT, PREC)
            d2 += x
            e2 += y
            x, y = _diag_block(k3, q3, G3, k_p, G_p, r3, n, HK * K, H * K, c0, K, BC, BK, DT, PREC)
            d3 += x
            e3 += y
        # the gated, scaled q·k matrix for the output, rows of this chunk, columns 0..BT-1
        _store_tile(a_p, e0 * scale, t0, n, H * BT, 0, BT, BC, BC)
        _store_tile(a_p, s10 * scale, r1, n, H * BT, 0, BT, BC, BC)
        _store_tile(a_p, e1 * scale, r1, n, H * BT, BC, BT, BC, BC)
        _store_tile(a_p, s20 * scale, r2, n, H * BT, 0, BT, BC, BC)
        _store_tile(a_p, s21 * scale, r2, n, H * BT, BC, BT, BC, BC)
        _store_tile(a_p, e2 * scale, r2, n, H * BT, 2 * BC, BT, BC, BC)
        _store_tile(a_p, s30 * scale, r3, n, H * BT, 0, BT, BC, BC)
        _store_tile(a_p, s31 * scale, r3, n, H * BT, BC, BT, BC, BC)
        _store_tile(a_p, s32 * scale, r3, n, H * BT, 2 * BC, BT, BC, BC)
        _store_tile(a_p, e3 * scale, r3, n, H * BT, 3 * BC, BT, BC, BC)
    else:
        gs0 = tl.cumsum(_vec(g_p, t0, n, H, BC), 0)
        gs1 = tl.cumsum(_vec(g_p, r1, n, H, BC), 0) + tl.sum(tl.where(rr == BC - 1, gs0, 0.0), 0)
        gs2 = tl.cumsum(_vec(g_p, r2, n, H, BC), 0) + tl.sum(tl.where(rr == BC - 1, gs1, 0.0), 0)
        gs3 = tl.cumsum(_vec(g_p, r3, n, H, BC), 0) + tl.sum(tl.where(rr == BC - 1, gs2, 0.0), 0)
        tl.store(G_p + (t0 + rr).to(tl.int64) * H, gs0, mask=t0 + rr < n)
        tl.store(G_p + (r1 + rr).to(tl.int64) * H, gs1, mask=r1 + rr < n)
        tl.store(G_p + (r2 + rr).to(tl.int64) * H, gs2, mask=r2 + rr < n)
        tl.store(G_p + (r3 + rr).to(tl.int64) * H, gs3, mask=r3 + rr < n)
        tl.debug_barrier()
        G_last = tl.load(G_p + last * H)
        for i_k in range(0, tl.cdiv(K, BK)):
            c0 = i_k * BK
            k0 = _tile(k_p, t0, n, HK * K, c0, K, BC, BK)
            k1 = _tile(k_p, r1, n, HK * K, c0, K, BC, BK)
            k2 = _tile(k_p, r2, n, HK * K, c0, K, BC, BK)
            k3 = _tile(k_p, r3, n, HK * K, c0, K, BC, BK)
            a10 += _mm(k1, tl.trans(k0), DT, PREC)
            a20 += _mm(k2, tl.trans(k0), DT, PREC)
            a21 += _mm(k2, tl.trans(k1), DT, PREC)
            a30 += _mm(k3, tl.trans(k0), DT, PREC)
            a31 += _mm(k3, tl.trans(k1), DT, PREC)
            a32 += _mm(k3, tl.trans(k2), DT, PREC)
            d0 += _mm(k0, tl.trans(k0), DT, PREC)
            d1 += _mm(k1, tl.trans(k1), DT, PREC)
            d2 += _mm(k2, tl.trans(k2), DT, PREC)
            d3 += _mm(k3, tl.trans(k3), DT, PREC)
        # gates: across sub-chunks the exponent is ≤ 0 already; inside, mask before exp
        a10 *= tl.exp(gs1[:, None] - gs0[None, :])
        a20 *= tl.exp(gs2[:, None] - gs0[None, :])
        a21 *= tl.exp(gs2[:, None] - gs1[None, :])
        a30 *= tl.exp(gs3[:, None] - gs0[None, :])
        a31 *= tl.exp(gs3[:, None] - gs1[None, :])
        a32 *= tl.exp(gs3[:, None] - gs2[None, :])
        low = rr[:, None] > rr[None, :]
        d0 = tl.where(low, d0 * tl.exp(tl.where(low, gs0[:, None] - gs0[None, :], 0.0)), 0.0)
        d1 = tl.where(low, d1 * tl.exp(tl.where(low, gs1[:, None] - gs1[None, :], 0.0)), 0.0)
        d2 = tl.where(low, d2 * tl.exp(tl.where(low, gs2[:, None] - gs2[None, :], 0.0)), 0.0)
        d3 = tl.where(low, d3 * tl.exp(tl.where(low, gs3[:, None] - gs3[None, :], 0.0)), 0.0)

    # A's rows carry β_i
    a10 *= b1[:, None]
    a20 *= b2[:, None]
    a21 *= b2[:, None]
    a30 *= b3[:, None]
    a31 *= b3[:, None]
    a32 *= b3[:, None]
    i0 = _inv_unit_lower(d0 * b0[:, None], BC)
    i1 = _inv_unit_lower(d1 * b1[:, None], BC)
    i2 = _inv_unit_lower(d2 * b2[:, None], BC)
    i3 = _inv_unit_lower(d3 * b3[:, None], BC)
    # block merge: X_ij = −X_ii Σ_{j≤m<i} A_im X_mj
    x10 = -_mm32(i1, _mm32(a10, i0))
    x21 = -_mm32(i2, _mm32(a21, i1))
    x20 = -_mm32(i2, _mm32(a20, i0) + _mm32(a21, x10))
    x32 = -_mm32(i3, _mm32(a32, i2))
    x31 = -_mm32(i3, _mm32(a31, i1) + _mm32(a32, x21))
    x30 = -_mm32(i3, _mm32(a30, i0) + _mm32(a31, x10) + _mm32(a32, x20))

    # X as one [BT, BT] tile, so that w = X (β K ⊙ Γ) and u = X (β V) are one BT-row product per
    # channel block (sixteen-row products, ten per block, took 4% longer at 16K on an H100 and
    # spilled 288 bytes a thread); kd = K ⊙ Γ_C/Γ, k decayed to the chunk end, for the state update
    z = tl.zeros([BC, BC], dtype=tl.float32)
    xt = _cat_rows(_cat_rows(_cat_cols(_cat_cols(i0, z), _cat_cols(z, z)),
                             _cat_cols(_cat_cols(x10, i1), _cat_cols(z, z))),
                   _cat_rows(_cat_cols(_cat_cols(x20, x21), _cat_cols(i2, z)),
                             _cat_cols(_cat_cols(x30, x31), _cat_cols(x32, i3)))).to(DT)
    bb = _vec(b_p, t0, n, H, BT)[:, None]
    if not GATE_VEC:
        Gv = _vec(G_p, t0, n, H, BT)[:, None]
    for i_k in range(0, tl.cdiv(K, BK)):
        c0 = i_k * BK
        kt = _tile(k_p, t0, n, HK * K, c0, K, BT, BK).to(tl.float32)
        if GATE_VEC:
            G = _tile(G_p, t0, n, H * K, c0, K, BT, BK)
            cols = c0 + tl.arange(0, BK)
            Gl = tl.load(G_p + last * H * K + cols, mask=cols < K, other=0.0)[None, :]
        else:
            G = Gv
            Gl = G_last
        _store_tile(kd_p, kt * tl.exp(Gl - G), t0, n, H * K, c0, K, BT, BK)
        _store_tile(w_p, _mm(xt, kt * tl.exp(G) * bb, DT, PREC), t0, n, H * K, c0, K, BT, BK)
    for i_v in range(0, tl.cdiv(V, BV)):
        c0 = i_v * BV
        y = _tile(v_p, t0, n, H * V, c0, V, BT, BV).to(tl.float32) * bb
        _store_tile(u_p, _mm(xt, y, DT, PREC), t0, n, H * V, c0, V, BT, BV)


# ---------------------------------------------------------------------------------------------
# kernel 1, split form (PREP_SPLIT): 1a gate cumsum + A (+ gated q·k) + X = (I + A)⁻¹, 1b w, u, kd.
# 1a keeps two [BT, BT] fp32 accumulators and [BT, BK] input tiles (64-row tensor-core products),
# stores A into the X buffer, and solves in 16×16 blocks read back from there (a layout change:
# registers cannot be re-sliced); 1b multiplies the stored X into β K ⊙ Γ and β V with 64-row dots.


@triton.jit
def _ctile(ptr, row0, n_rows, row_stride, col0, n_cols, BR: tl.constexpr, BCOL: tl.constexpr):
    """_tile with 32-bit offsets from a 64-bit row-row0 base (fewer registers: one per element
    instead of two); row_stride · BR must fit in int32."""
    r = tl.arange(0, BR)
    c = col0 + tl.arange(0, BCOL)
    m = (row0 + r < n_rows)[:, None] & (c < n_cols)[None, :]
    return tl.load(ptr + row0.to(tl.int64) * row_stride + (r[:, None] * row_stride + c[None, :]), mask=m,
                   other=0.0)


@triton.jit
def _cstore(ptr, x, row0, n_rows, row_stride, col0, n_cols, BR: tl.constexpr, BCOL: tl.constexpr,
            rows=None):
    """_store_tile with 32-bit offsets, as _ctile; rows ([BR, 1] booleans): only those rows."""
    r = tl.arange(0, BR)
    c = col0 + tl.arange(0, BCOL)
    m = (row0 + r < n_rows)[:, None] & (c < n_cols)[None, :]
    if rows is not None:
        m = m & rows
    tl.store(ptr + row0.to(tl.int64) * row_stride + (r[:, None] * row_stride + c[None, :]),
             x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _gated_kkt(a_acc, q_acc, kb, qb, G, G_p, G_stride, t0, n_in, col0, K: tl.constexpr, BT: tl.constexpr,
               BK: tl.constexpr, MIN_SEG: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
               SPAN: tl.constexpr):
    """Adds to a_acc, q_acc [BT, BT] one BK-channel block of Σ_d k_id k_jd e^{G_id−G_jd} and
    Σ_d q_id k_jd e^{G_id−G_jd}, per-channel gate, right for j ≤ i (above the diagonal: finite garbage
    the caller masks), no factor ever above e^{SPAN/2}. kb, qb [BT, BK] (DT), G [BT, BK] fp32 (rows
    ≥ n_in constant, as their g is 0), the same G in memory at G_p (rows < n_in). Returns the two
    tiles and 1, or 0 when pairs inside segments of MIN_SEG rows are left for _seg_pairs.

    Segments of S = BT, BT/2, ..., 2·MIN_SEG rows, starting with the whole chunk: when |G − G_m| <
    SPAN / 2 over every segment, m its middle row, each pair in one segment factors through m,
    e^{G_i−G_m} · e^{G_m−G_j} (every factor ≤ e^{SPAN/2}, products ≤ e^SPAN even above the
    diagonal: finite; exact up to rounding), one product per segment, and this is the last size.
    Otherwise only the pairs across the middle (i after m, j up to m: both factors ≤ 1, always
    safe) take that product, and the halves go on to the next size. The pairs inside segments of
    MIN_SEG rows that are left (a gate falling by more than SPAN / 2 within 2·MIN_SEG tokens) go to
    _seg_pairs. A gentle gate (the usual case) takes one product of the whole chunk, accumulated in
    place; a smaller size takes one product for all its segments (two tensor-core dots, for A and
    Aq), whose pairs across segments are masked off before the add: those are finite too (factors
    ≤ e^{SPAN/2} each, or ≤ 1 across the middle). The steepest gates take 4 sizes (BT = 64,
    MIN_SEG = 4) and _seg_pairs. (One dot per segment with the other rows zeroed, the form before,
    took 15 sizes' worth of dots there: KDA with log-gates x 30 ran 1.54 ms at 16K on an H100, 1.24
    with this form, both with the two-launch prepare.)"""
    rr = tl.arange(0, BT)
    cols = col0 + tl.arange(0, BK)
    cmask = (cols < K)[None, :]
    G0 = G_p + t0.to(tl.int64) * G_stride  # this chunk's first row: 32-bit offsets from here
    done = n_in * 0  # 1 once every pair is covered
    for lvl in range(0, 6):  # BT = 64 = 2^6: segment sizes 64 ... 2 (the loop ends at 2·MIN_SEG)
        S = BT >> lvl
        if (done == 0) & (S > MIN_SEG):
            hb = S // 2
            seg = rr // S
            mid = tl.minimum(seg * S + hb - 1, n_in - 1)  # the segment's middle row (padding: the last)
            R = tl.load(G0 + (mid[:, None] * G_stride + cols[None, :]), mask=cmask, other=0.0)
            d = G - R  # [BT, BK], ≤ 0 after the middle, ≥ 0 up to it
            if tl.max(tl.max(tl.abs(d), 1), 0) < SPAN / 2:  # whole segments
                f = tl.exp(d)
                rk = (kb * tl.exp(-d)).to(DT)
                lk = (kb * f).to(DT)
                lq = (qb * f).to(DT)
                done = done + 1
            else:  # across the middle only: rows after it × rows up to it, factors ≤ 1
                after = (rr % S >= hb)[:, None]
                e = tl.exp(tl.where(after, d, -d))
                rk = tl.where(after, 0.0, kb * e).to(DT)
                lk = tl.where(after, kb * e, 0.0).to(DT)
                lq = tl.where(after, qb * e, 0.0).to(DT)
            if S == BT:  # one segment: accumulated in place
                a_acc = tl.dot(lk, tl.trans(rk), a_acc, input_precision=PREC)
                q_acc = tl.dot(lq, tl.trans(rk), q_acc, input_precision=PREC)
            else:  # every segment in one product; the pairs across segments (finite) are dropped
                same = seg[:, None] == seg[None, :]
                a_acc += tl.where(same, tl.dot(lk, tl.trans(rk), input_precision=PREC), 0.0)
                q_acc += tl.where(same, tl.dot(lq, tl.trans(rk), input_precision=PREC), 0.0)
    return a_acc, q_acc, done


@triton.jit
def _seg_pairs(a_seg, q_seg, kb, qb, G, k_p, k_stride, G_p, G_stride, t0, n_in, col0, K: tl.constexpr,
               BT: tl.constexpr, BK: tl.constexpr, MIN_SEG: tl.constexpr):
    """What _gated_kkt leaves of one channel block: the pairs inside segments of MIN_SEG rows, pair by
    pair, elementwise over the channels, every factor e^{G_i−G_j} ≤ 1 (as fla's chunk_kda does
    inside its sub-chunks), added to a_seg, q_seg [BT, MIN_SEG] (column j: the pair of row i with row
    j of its segment). G [BT, BK] as stored: rows ≥ n_in hold 0 and take no pairs."""
    rr = tl.arange(0, BT)
    cols = col0 + tl.arange(0, BK)
    cmask = (cols < K)[None, :]
    k0 = k_p + t0.to(tl.int64) * k_stride  # this chunk's first row: 32-bit offsets from here
    G0 = G_p + t0.to(tl.int64) * G_stride
    js = tl.arange(0, MIN_SEG)[None, :]
    for j in range(0, MIN_SEG):
        p = (rr // MIN_SEG) * MIN_SEG + j  # [BT] the partner row j of each row's segment
        pc = tl.minimum(p, n_in - 1)[:, None]  # (a padded partner: a padded row)
        kp = tl.load(k0 + (pc * k_stride + cols[None, :]), mask=cmask, other=0.0).to(tl.float32)
        Gp = tl.load(G0 + (pc * G_stride + cols[None, :]), mask=cmask, other=0.0)
        kpe = kp * tl.exp(tl.where(((rr >= p) & (rr < n_in))[:, None], G - Gp, float("-inf")))  # ≤ 1
        a_seg += tl.where(js == j, tl.sum(kb * kpe, 1)[:, None], 0.0)
        q_seg += tl.where(js == j, tl.sum(qb * kpe, 1)[:, None], 0.0)
    return a_seg, q_seg


@triton.jit
def _place_seg(acc, seg, BT: tl.constexpr, MIN_SEG: tl.constexpr):
    """acc [BT, BT] plus _seg_pairs' seg [BT, MIN_SEG] at (i, row j of i's segment)."""
    rr = tl.arange(0, BT)
    js = tl.arange(0, MIN_SEG)[None, :]
    for j in range(0, MIN_SEG):
        col = tl.sum(tl.where(js == j, seg, 0.0), 1)  # [BT]
        acc += tl.where(rr[None, :] == ((rr // MIN_SEG) * MIN_SEG + j)[:, None], col[:, None], 0.0)
    return acc


@triton.jit
def _kkt_inv_kernel(
    q, k, v, g, beta, gcum, aqk, xa, w, u, kd, qg, cu_seqlens, chunk_indices, scale, T, chunk0,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BC: tl.constexpr, BK: tl.constexpr, BKW: tl.constexpr, BV: tl.constexpr, GATE_VEC: tl.constexpr,
    IS_VARLEN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, SPAN: tl.constexpr,
    FUSE_WU: tl.constexpr, STORE_QG: tl.constexpr, SPARSE_G: tl.constexpr = False,
    SOLVE_PREC: tl.constexpr = "ieee",
):
    """Per chunk and head: gcum, A (β-scaled, strictly lower), aqk (per-channel gate: scale · gated
    q·k, j ≤ i, zero above) and X = (I + A)⁻¹ into xa ([.., BT] per token row, as aqk; both float32, or
    the input dtype where only this forward reads them: they enter products in that dtype); with
    FUSE_WU also w, u, kd (_wu_chunk, BKW channels per step), which then re-reads X, k and gcum
    from this program's own recent writes and loads (cache hits) instead of DRAM. STORE_QG
    (per-channel gate): also q ⊙ e^G into qg, for the output kernel. SPARSE_G (per-channel gate,
    FUSE_WU; SPARSE_GCUM): gcum only at the rows read later, every 4th (_gated_kkt's segment middles)
    and the chunk's last (the state passes' decay), and whole for a channel block with pairs left to
    _seg_pairs; w's operand β K ⊙ e^G (parked in w) and kd are then made in the channel loop from G
    in registers, and the w step reads that back instead of k and gcum. SOLVE_PREC: the precision
    of the triangular solve's fp32 16 x 16 products ("ieee", or "tf32" where X is stored in a 16-bit
    dtype: SOLVE_TF32). chunk0 (not varlen): the grid's first chunk within each sequence
    (_forward's OVERLAP_PREPARE launches the chunks in two ranges)."""
    i_h, i_hk, i_t, bos, n = _prep_chunk(chunk_indices, cu_seqlens, T, H, HK, IS_VARLEN, chunk0)
    t0 = i_t * BT
    n_in = tl.minimum(n - t0, BT)
    rr = tl.arange(0, BT)
    q_p = q + (bos * HK + i_hk) * K
    k_p = k + (bos * HK + i_hk) * K
    x_p = xa + (bos * H + i_h) * BT

    if GATE_VEC:
        g_p = g + (bos * H + i_h) * K
        G_p = gcum + (bos * H + i_h) * K
        A = tl.zeros([BT, BT], dtype=tl.float32)
        Aq = tl.zeros([BT, BT], dtype=tl.float32)
        steep = n_in * 0  # bit i_k: channel block i_k has pairs left inside 4-token segments
        if SPARSE_G:
            b_s = _vec(beta + bos * H + i_h, t0, n, H, BT)[:, None]
            last = (t0 + n_in - 1).to(tl.int64)
            read_later = ((rr % 4 == 3) | (rr == n_in - 1))[:, None]  # the rows of G read after the loop
        for i_k in range(0, tl.cdiv(K, BK)):
            c0 = i_k * BK
            gt = _ctile(g_p, t0, n, H * K, c0, K, BT, BK)
            if SPARSE_G:  # k and q loaded beside g, not after the barrier below (one DRAM wait a block)
                kb = _ctile(k_p, t0, n, HK * K, c0, K, BT, BK)
                qb = _ctile(q_p, t0, n, HK * K, c0, K, BT, BK)
            G = tl.cumsum(gt.to(tl.float32), 0)
            if SPARSE_G:
                _cstore(G_p, G, t0, n, H * K, c0, K, BT, BK, read_later)
            else:
                _cstore(G_p, G, t0, n, H * K, c0, K, BT, BK)
            tl.debug_barrier()  # _gated_kkt reads the segments' middle rows of G back
            if not SPARSE_G:
                kb = _ctile(k_p, t0, n, HK * K, c0, K, BT, BK)
                qb = _ctile(q_p, t0, n, HK * K, c0, K, BT, BK)
            eG = tl.exp(G)
            if STORE_QG:  # q ⊙ e^G for the output kernel, which would read G (float32) for it
                _cstore(qg + (bos * H + i_h) * K, qb.to(tl.float32) * eG, t0, n, H * K, c0, K, BT, BK)
            if SPARSE_G:  # kd = K ⊙ e^{G_last − G}, and β K ⊙ e^G parked in w for w = X (that)
                cols = c0 + tl.arange(0, BK)
                Gl = tl.load(G_p + last * H * K + cols, mask=cols < K, other=0.0)[None, :]
                kf = kb.to(tl.float32)
                _cstore(kd + (bos * H + i_h) * K, kf * tl.exp(Gl - G), t0, n, H * K, c0, K, BT, BK)
                _cstore(w + (bos * H + i_h) * K, kf * eG * b_s, t0, n, H * K, c0, K, BT, BK)
            A, Aq, done = _gated_kkt(A, Aq, kb, qb, G, G_p, H * K, t0, n_in, c0, K, BT, BK, 4, DT, PREC, SPAN)
            steep = steep | ((1 - done) << i_k)
            if SPARSE_G:
                if done == 0:  # _seg_pairs reads this block's G whole
                    _cstore(G_p, G, t0, n, H * K, c0, K, BT, BK)
        if steep != 0:  # a log-gate below ~−7 per token: elementwise inside 4-token segments
            tl.debug_barrier()  # (SPARSE_G: G's blocks stored whole just above are read back)
            A4 = tl.zeros([BT, 4], dtype=tl.float32)
            Aq4 = tl.zeros([BT, 4], dtype=tl.float32)
            for i_k in range(0, tl.cdiv(K, BK)):
                if (steep >> i_k) & 1:
                    c0 = i_k * BK
                    kb = _ctile(k_p, t0, n, HK * K, c0, K, BT, BK).to(tl.float32)
                    qb = _ctile(q_p, t0, n, HK * K, c0, K, BT, BK).to(tl.float32)
                    G = _ctile(G_p, t0, n, H * K, c0, K, BT, BK)
                    A4, Aq4 = _seg_pairs(A4, Aq4, kb, qb, G, k_p, HK * K, G_p, H * K, t0, n_in, c0, K, BT, BK,
                                         4)
            A = _place_seg(A, A4, BT, 4)
            Aq = _place_seg(Aq, Aq4, BT, 4)
        Aq = tl.where(rr[:, None] >= rr[None, :], Aq * scale, 0.0)
        _cstore(aqk + (bos * H + i_h) * BT, Aq, t0, n, H * BT, 0, BT, BT, BT)
    else:
        gs = tl.cumsum(_vec(g + bos * H + i_h, t0, n, H, BT), 0)  # [BT]
        tl.store(gcum + bos * H + i_h + (t0 + rr).to(tl.int64) * H, gs, mask=rr < n_in)
        A = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            kb = _ctile(k_p, t0, n, HK * K, i_k * BK, K, BT, BK)
            A += _mm(kb, tl.trans(kb), DT, PREC)
        low = rr[:, None] > rr[None, :]
        A *= tl.exp(tl.where(low, gs[:, None] - gs[None, :], 0.0))  # exponent masked before exp
    b = _vec(beta + bos * H + i_h, t0, n, H, BT)
    A = tl.where((rr[:, None] > rr[None, :]) & (rr < n_in)[:, None], A * b[:, None], 0.0)  # rows past n: 0
    # A's 16×16 blocks, split off in registers (A went through xa and back before: a float32 round
    # trip that also kept xa float32 where X itself is only needed in the input dtype)
    q00, _q01, q10, q11 = _quarters(A)
    d0, _u0, a10, d1 = _quarters(q00)
    a20, a21, a30, a31 = _quarters(q10)
    d2, _u1, a32, d3 = _quarters(q11)

    r1, r2, r3 = t0 + BC, t0 + 2 * BC, t0 + 3 * BC
    # X's zero blocks above the diagonal (its readers load whole rows)
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    for bi in tl.static_range(0, 3):
        for bj in tl.static_range(bi + 1, 4):
            _cstore(x_p, zero, t0 + bi * BC, n, H * BT, bj * BC, BT, BC, BC)
    # _prepare_kernel's block merge, each block stored as soon as it is made and each diagonal inverse
    # made where it is first needed: computing all of them first spilled 16-40 bytes per thread
    # under the 128-register cap (sm_90)
    P: tl.constexpr = SOLVE_PREC
    i0 = _inv_unit_lower(d0, BC, P)
    _cstore(x_p, i0, t0, n, H * BT, 0, BT, BC, BC)
    i1 = _inv_unit_lower(d1, BC, P)
    _cstore(x_p, i1, r1, n, H * BT, BC, BT, BC, BC)
    x10 = -_mm32(i1, _mm32(a10, i0, P), P)
    _cstore(x_p, x10, r1, n, H * BT, 0, BT, BC, BC)
    i2 = _inv_unit_lower(d2, BC, P)
    _cstore(x_p, i2, r2, n, H * BT, 2 * BC, BT, BC, BC)
    x21 = -_mm32(i2, _mm32(a21, i1, P), P)
    _cstore(x_p, x21, r2, n, H * BT, BC, BT, BC, BC)
    x20 = -_mm32(i2, _mm32(a20, i0, P) + _mm32(a21, x10, P), P)
    _cstore(x_p, x20, r2, n, H * BT, 0, BT, BC, BC)
    i3 = _inv_unit_lower(d3, BC, P)
    _cstore(x_p, i3, r3, n, H * BT, 3 * BC, BT, BC, BC)
    x32 = -_mm32(i3, _mm32(a32, i2, P), P)
    _cstore(x_p, x32, r3, n, H * BT, 2 * BC, BT, BC, BC)
    x31 = -_mm32(i3, _mm32(a31, i1, P) + _mm32(a32, x21, P), P)
    _cstore(x_p, x31, r3, n, H * BT, BC, BT, BC, BC)
    x30 = -_mm32(i3, _mm32(a30, i0, P) + _mm32(a31, x10, P) + _mm32(a32, x20, P), P)
    _cstore(x_p, x30, r3, n, H * BT, 0, BT, BC, BC)
    if FUSE_WU:
        tl.debug_barrier()  # X is read back whole
        G_p = gcum + (bos * H + i_h) * K if GATE_VEC else gcum + bos * H + i_h
        _wu_chunk(k_p, v + (bos * H + i_h) * V, beta + bos * H + i_h, G_p, x_p, w + (bos * H + i_h) * K,
                  u + (bos * H + i_h) * V, kd + (bos * H + i_h) * K, t0, n, H, HK, K, V, BT, BKW, BV,
                  GATE_VEC, DT, PREC, SPARSE_G)


@triton.jit
def _wu_chunk(k_p, v_p, b_p, G_p, x_p, w_p, u_p, kd_p, t0, n, H: tl.constexpr, HK: tl.constexpr,
              K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              GATE_VEC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, Y_IN_W: tl.constexpr = False):
    """One chunk and head: w = X (β K ⊙ Γ), u = X (β V), kd = K ⊙ Γ_C/Γ, with X [BT, BT] read from
    x_p (row stride H·BT) and G from G_p (gcum); pointers at this sequence's row 0 and head. Y_IN_W:
    kd is made already and w holds β K ⊙ Γ (_kkt_inv_kernel's SPARSE_G), read for w = X (that)."""
    last = (t0 + tl.minimum(n - t0, BT) - 1).to(tl.int64)  # last token of this chunk
    X = _ctile(x_p, t0, n, H * BT, 0, BT, BT, BT).to(DT)  # [BT, BT]
    b = _vec(b_p, t0, n, H, BT)[:, None]
    if not GATE_VEC:
        Gs = _vec(G_p, t0, n, H, BT)[:, None]
        Gl_s = tl.load(G_p + last * H)
    for i_k in range(0, tl.cdiv(K, BK)):
        c0 = i_k * BK
        if Y_IN_W:
            y = _ctile(w_p, t0, n, H * K, c0, K, BT, BK)
        else:
            kb = _ctile(k_p, t0, n, HK * K, c0, K, BT, BK).to(tl.float32)
            if GATE_VEC:
                G = _ctile(G_p, t0, n, H * K, c0, K, BT, BK)
                cols = c0 + tl.arange(0, BK)
                Gl = tl.load(G_p + last * H * K + cols, mask=cols < K, other=0.0)[None, :]
            else:
                G = Gs
                Gl = Gl_s
            _cstore(kd_p, kb * tl.exp(Gl - G), t0, n, H * K, c0, K, BT, BK)
            y = (kb * (tl.exp(G) * b)).to(DT)
        _cstore(w_p, tl.dot(X, y, input_precision=PREC), t0, n, H * K, c0, K, BT, BK)
    for i_v in range(0, tl.cdiv(V, BV)):
        c0 = i_v * BV
        y = (_ctile(v_p, t0, n, H * V, c0, V, BT, BV).to(tl.float32) * b).to(DT)
        _cstore(u_p, tl.dot(X, y, input_precision=PREC), t0, n, H * V, c0, V, BT, BV)


@triton.jit
def _wu_kernel(
    k, v, beta, gcum, xa, w, u, kd, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE_VEC: tl.constexpr, IS_VARLEN: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk and head: _wu_chunk, X from _kkt_inv_kernel (PREP_FUSED = False)."""
    i_h, i_hk, i_t, bos, n = _prep_chunk(chunk_indices, cu_seqlens, T, H, HK, IS_VARLEN)
    G_p = gcum + (bos * H + i_h) * K if GATE_VEC else gcum + bos * H + i_h
    _wu_chunk(k + (bos * HK + i_hk) * K, v + (bos * H + i_h) * V, beta + bos * H + i_h, G_p,
              xa + (bos * H + i_h) * BT, w + (bos * H + i_h) * K, u + (bos * H + i_h) * V,
              kd + (bos * H + i_h) * K, i_t * BT, n, H, HK, K, V, BT, BK, BV, GATE_VEC, DT, PREC)


# ---------------------------------------------------------------------------------------------
# kernel 2: the chunk-to-chunk recurrence (sequential over chunks; parallel over heads, D_v blocks)


@triton.jit
def _state_kernel(
    k, v, kd, u, w, gcum, slope, h, vn, h0, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr,  # 0: constant decay exp(−slope_h) (Lightning), 1: scalar per token, 2: per channel
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
):
    """Writes h[c] = the state entering chunk c ([n_chunks, H, K, V]) and, for the delta rule,
    the corrected values v' = u − w h[c]; the loop body is all that is sequential."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h, i_hk, bos, n, n_chunks, boh = _seq_chunks(cu_seqlens, chunk_offsets, T, H, HK, BT, IS_VARLEN)
    c0 = i_v * BV
    rk = tl.arange(0, BK)
    rv = c0 + tl.arange(0, BV)
    rt = tl.arange(0, BT)
    mkv = (rk < K)[:, None] & (rv < V)[None, :]
    kv = rk[:, None] * V + rv[None, :]

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + i_bh.to(tl.int64) * K * V + kv, mask=mkv, other=0.0)
    h_p = h + (boh * H + i_h) * K * V
    if GATE == 0:
        s_h = tl.load(slope + i_h).to(tl.float32)
        k_p = k + (bos * HK + i_hk) * K
        v_p = v + (bos * H + i_h) * V
    else:
        kd_p = kd + (bos * H + i_h) * K
        w_p = w + (bos * H + i_h) * K
        u_p = u + (bos * H + i_h) * V
        vn_p = vn + (bos * H + i_h) * V
    if GATE == 1:
        G_p = gcum + bos * H + i_h
    if GATE == 2:
        G_p = gcum + (bos * H + i_h) * K

    for i_t in range(0, n_chunks):
        t0 = i_t * BT
        n_in = tl.minimum(n - t0, BT)
        tl.store(h_p + kv, S.to(h.dtype.element_ty), mask=mkv)
        h_p += H * K * V  # a 64-bit pointer step: chunk offsets pass 2^31 elements at ~1M tokens
        if GATE == 0:
            b_vn = _tile(v_p, t0, n, H * V, c0, V, BT, BV)
            b_k = _tile(k_p, t0, n, HK * K, 0, K, BT, BK).to(tl.float32)
            # k_j e^{−s (n_in − 1 − j)}; padded rows masked before exp (their exponent is positive)
            e = tl.where(rt < n_in, -s_h * (n_in - 1 - rt).to(tl.float32), 0.0)
            b_kd = b_k * tl.exp(e)[:, None]
            S = S * tl.exp(-s_h * n_in.to(tl.float32))
        else:
            b_w = _tile(w_p, t0, n, H * K, 0, K, BT, BK)
            b_u = _tile(u_p, t0, n, H * V, c0, V, BT, BV).to(tl.float32)
            b_vn = b_u - _mm(b_w, S, DT, PREC)  # corrected values v' = u − w S
            _store_tile(vn_p, b_vn, t0, n, H * V, c0, V, BT, BV)
            b_kd = _tile(kd_p, t0, n, H * K, 0, K, BT, BK)
            last = (t0 + n_in - 1).to(tl.int64)
            if GATE == 1:
                S = S * tl.exp(tl.load(G_p + last * H))
            else:
                S = S * tl.exp(tl.load(G_p + last * H * K + rk, mask=rk < K, other=0.0))[:, None]
        S += _mm(tl.trans(b_kd), b_vn, DT, PREC)

    if STORE_HT:
        tl.store(ht + i_bh.to(tl.int64) * K * V + kv, S, mask=mkv)


# ---------------------------------------------------------------------------------------------
# kernel 3: outputs, parallel over chunks


@triton.jit
def _chunk_output(q_p, k_p, b_k, qg_p, aqk_p, gcum, slope, S, b_vn, bos, i_h, t0, n, scale,
                  H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  GATE: tl.constexpr, QG: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                  K_GIVEN: tl.constexpr = False):
    """One chunk's o = scale (Q ⊙ Γ) S + (scale · masked gated Q Kᵀ) v' for the D_v block of S
    [BK, BV] (the state entering the chunk) and b_vn [BT, BV] (v'). q_p, k_p: this sequence's row 0
    at its key head (K_GIVEN: the caller loaded the chunk's K tile, b_k [BT, BK], and k_p is not
    read; otherwise b_k is not); qg_p, aqk_p: at its head (QG, per-channel gate: Q ⊙ Γ read from qg
    as the split prepare stored it in the input dtype, the dtype the product takes it in; otherwise
    made from q and gcum). Both operands of each product are rounded to DT, as a stored state and v'
    are."""
    rt = tl.arange(0, BT)
    valid = t0 + rt < n
    causal = (rt[:, None] >= rt[None, :]) & valid[:, None]
    if GATE == 2:
        if QG:
            b_o = _mm(_tile(qg_p, t0, n, H * K, 0, K, BT, BK), S, DT, PREC) * scale
        else:
            b_q = _tile(q_p, t0, n, HK * K, 0, K, BT, BK)
            b_G = _tile(gcum + (bos * H + i_h) * K, t0, n, H * K, 0, K, BT, BK)
            b_o = _mm(b_q.to(tl.float32) * tl.exp(b_G), S, DT, PREC) * scale
        b_a = _tile(aqk_p, t0, n, H * BT, 0, BT, BT, BT)
        b_a = tl.where(causal, b_a, 0.0)
    else:
        b_q = _tile(q_p, t0, n, HK * K, 0, K, BT, BK)
        if GATE == 0:
            b_G = -tl.load(slope + i_h).to(tl.float32) * (rt + 1).to(tl.float32)
        else:
            b_G = tl.load(gcum + bos * H + i_h + (t0 + rt).to(tl.int64) * H, mask=valid, other=0.0)
        b_o = _mm(b_q, S, DT, PREC) * (tl.exp(b_G) * scale)[:, None]
        if not K_GIVEN:
            b_k = _tile(k_p, t0, n, HK * K, 0, K, BT, BK)
        b_a = _mm(b_q, tl.trans(b_k), DT, PREC)
        b_a = tl.where(causal, b_a * tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], 0.0)), 0.0) * scale
    return b_o + _mm(b_a, b_vn, DT, PREC)


@triton.jit
def _output_kernel(
    q, k, vn, gcum, aqk, qg, slope, h, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    QG: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """_chunk_output for one chunk c and D_v block, from the stored state h[c] and v'."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if IS_VARLEN:
        i_b = tl.load(chunk_indices + 2 * i_c)
        i_t = tl.load(chunk_indices + 2 * i_c + 1)
    else:
        n_chunks = tl.cdiv(T, BT)
        i_b, i_t = i_c // n_chunks, i_c % n_chunks
    i_hk = i_h // (H // HK)
    bos, n = _seq_bounds(i_b, T, cu_seqlens, IS_VARLEN)
    t0 = i_t * BT
    c0 = i_v * BV
    rk = tl.arange(0, BK)
    rv = c0 + tl.arange(0, BV)
    b_vn = _tile(vn + (bos * H + i_h) * V, t0, n, H * V, c0, V, BT, BV)
    b_h = tl.load(h + (i_c.to(tl.int64) * H + i_h) * K * V + rk[:, None] * V + rv[None, :],
                  mask=(rk < K)[:, None] & (rv < V)[None, :], other=0.0)
    b_o = _chunk_output(q + (bos * HK + i_hk) * K, k + (bos * HK + i_hk) * K, b_vn, qg + (bos * H + i_h) * K,
                        aqk + (bos * H + i_h) * BT, gcum, slope, b_h, b_vn, bos, i_h, t0, n, scale,
                        H, HK, K, BT, BK, GATE, QG, DT, PREC)
    _store_tile(o + (bos * H + i_h) * V, b_o, t0, n, H * V, c0, V, BT, BV)


# ---------------------------------------------------------------------------------------------
# Lightning backward (constant decay, no delta rule): dS sweep backwards, then parallel dq, dk, dv.
# With Γ_i = γ^{i+1}, e_j = γ^{n−1−j} (decay to the chunk end), D_ij = γ^{i−j} (i ≥ j),
# h_c the state entering chunk c and dS_c the gradient of the state leaving it:
#   dS_{c−1} = γ^{n_c} dS_c + scale (Q ⊙ Γ)ᵀ dO                      (dS_{last} = d final state)
#   dq = scale [(dO h_cᵀ) ⊙ Γ + ((dO Vᵀ) ⊙ D) K]
#   dk = scale ((dO Vᵀ) ⊙ D)ᵀ Q + (V dS_cᵀ) ⊙ e
#   dv = scale ((Q Kᵀ) ⊙ D)ᵀ dO + (K dS_c) ⊙ e


@triton.jit
def _lightning_dstate_kernel(
    q, do, slope, dstates, dht, dh0, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h, i_hk, bos, n, n_chunks, boh = _seq_chunks(cu_seqlens, chunk_offsets, T, H, HK, BT, IS_VARLEN)
    c0 = i_v * BV
    rk = tl.arange(0, BK)
    rv = c0 + tl.arange(0, BV)
    rt = tl.arange(0, BT)
    mkv = (rk < K)[:, None] & (rv < V)[None, :]
    kv = rk[:, None] * V + rv[None, :]
    s_h = tl.load(slope + i_h).to(tl.float32)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + i_bh.to(tl.int64) * K * V + kv, mask=mkv, other=0.0)
    q_p = q + (bos * HK + i_hk) * K
    do_p = do + (bos * H + i_h) * V
    d_p = dstates + ((boh + n_chunks - 1) * H + i_h) * K * V  # the last chunk's (boh is int64)
    for j in range(0, n_chunks):
        i_t = n_chunks - 1 - j
        t0 = i_t * BT
        n_in = tl.minimum(n - t0, BT)
        tl.store(d_p + kv, dS.to(dstates.dtype.element_ty), mask=mkv)
        d_p -= H * K * V  # 64-bit pointer steps, as in the forward state kernel
        b_q = _tile(q_p, t0, n, HK * K, 0, K, BT, BK).to(tl.float32)
        b_do = _tile(do_p, t0, n, H * V, c0, V, BT, BV)
        b_q = b_q * (tl.exp(-s_h * (rt + 1).to(tl.float32)) * scale)[:, None]
        dS = dS * tl.exp(-s_h * n_in.to(tl.float32)) + _mm(tl.trans(b_q), b_do, DT, PREC)
    if STORE_DH0:
        tl.store(dh0 + i_bh.to(tl.int64) * K * V + kv, dS, mask=mkv)


@triton.jit
def _lightning_dqkv_kernel(
    q, k, v, do, slope, states, dstates, dq, dk, dv, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
):
    """dq, dk (per value head; the host sums heads that share a key head) and dv of one chunk."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    if IS_VARLEN:
        i_b = tl.load(chunk_indices + 2 * i_c)
        i_t = tl.load(chunk_indices + 2 * i_c + 1)
    else:
        n_chunks = tl.cdiv(T, BT)
        i_b, i_t = i_c // n_chunks, i_c % n_chunks
    i_hk = i_h // (H // HK)
    bos, n = _seq_bounds(i_b, T, cu_seqlens, IS_VARLEN)
    t0 = i_t * BT
    rk = tl.arange(0, BK)
    rt = tl.arange(0, BT)
    n_in = tl.minimum(n - t0, BT)
    valid = rt < n_in
    s_h = tl.load(slope + i_h).to(tl.float32)
    pos = rt.to(tl.float32)
    gam = tl.exp(-s_h * (pos + 1)) * scale  # scale Γ_i
    e = tl.exp(tl.where(valid, -s_h * (n_in - 1 - rt).to(tl.float32), 0.0))  # decay to chunk end
    causal = (rt[:, None] >= rt[None, :]) & valid[:, None]
    D = tl.where(causal, tl.exp(tl.where(causal, -s_h * (pos[:, None] - pos[None, :]), 0.0)), 0.0) * scale

    b_q = _tile(q + (bos * HK + i_hk) * K, t0, n, HK * K, 0, K, BT, BK)
    b_k = _tile(k + (bos * HK + i_hk) * K, t0, n, HK * K, 0, K, BT, BK)
    b_A = _mm(b_q, tl.trans(b_k), DT, PREC) * D  # scale (Q Kᵀ) ⊙ D
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    st = (i_c.to(tl.int64) * H + i_h) * K * V
    for i_v in range(0, tl.cdiv(V, BV)):
        c0 = i_v * BV
        rv = c0 + tl.arange(0, BV)
        mkv = (rk < K)[:, None] & (rv < V)[None, :]
        b_v = _tile(v + (bos * H + i_h) * V, t0, n, H * V, c0, V, BT, BV)
        b_do = _tile(do + (bos * H + i_h) * V, t0, n, H * V, c0, V, BT, BV)
        b_h = tl.load(states + st + rk[:, None] * V + rv[None, :], mask=mkv, other=0.0)
        b_dh = tl.load(dstates + st + rk[:, None] * V + rv[None, :], mask=mkv, other=0.0)
        b_dA = _mm(b_do, tl.trans(b_v), DT, PREC) * D  # scale (dO Vᵀ) ⊙ D
        b_dq += _mm(b_do, tl.trans(b_h), DT, PREC) * gam[:, None] + _mm(b_dA, b_k, DT, PREC)
        b_dk += _mm(tl.trans(b_dA), b_q, DT, PREC) + _mm(b_v, tl.trans(b_dh), DT, PREC) * e[:, None]
        b_dv = _mm(tl.trans(b_A), b_do, DT, PREC) + _mm(b_k, b_dh, DT, PREC) * e[:, None]
        _store_tile(dv + (bos * H + i_h) * V, b_dv, t0, n, H * V, c0, V, BT, BV)
    _store_tile(dq + (bos * H + i_h) * K, b_dq, t0, n, H * K, 0, K, BT, BK)
    _store_tile(dk + (bos * H + i_h) * K, b_dk, t0, n, H * K, 0, K, BT, BK)


# ---------------------------------------------------------------------------------------------
# decode: one token, state updated in place


@triton.jit
def _step_kernel(
    q, k, v, g, beta, slope, state, o, scale,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, L2NORM: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HK)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    off = i_bh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :]
    m = mk[:, None] & mv[None, :]
    S = tl.load(state + off, mask=m, other=0.0)
    b_q = tl.load(q + (i_b * HK + i_hk) * K + rk, mask=mk, other=0.0).to(tl.float32)
    b_k = tl.load(k + (i_b * HK + i_hk) * K + rk, mask=mk, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_bh * V + rv, mask=mv, other=0.0).to(tl.float32)
    if L2NORM:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
    if GATE == 0:
        S = S * tl.exp(-tl.load(slope + i_h).to(tl.float32))
    if GATE == 1:
        S = S * tl.exp(tl.load(g + i_bh).to(tl.float32))
    if GATE == 2:
        S = S * tl.exp(tl.load(g + i_bh * K + rk, mask=mk, other=0.0).to(tl.float32))[:, None]
    if DELTA:
        b_b = tl.load(beta + i_bh).to(tl.float32)
        b_v = b_b * (b_v - tl.sum(S * b_k[:, None], 0))
    S += b_k[:, None] * b_v[None, :]
    b_o = tl.sum(S * (b_q * scale)[:, None], 0)
    tl.store(state + off, S, mask=m)
    tl.store(o + i_bh * V + rv, b_o.to(o.dtype.element_ty), mask=mv)


# ---------------------------------------------------------------------------------------------
# host side


def _tl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return output_buffer(shape, dtype, device, POISON_OUTPUTS)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + L2NORM_EPS)).to(x.dtype)


def _chunk_tables(cu_seqlens: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a packed batch: int32 [n_chunks, 2] (sequence, chunk within it) of every chunk, and
    int32 [N] the index of each sequence's first chunk."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    counts = [-(-n // chunk) for n in lens]
    pairs = [(i, j) for i, c in enumerate(counts) for j in range(c)]
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    dev = cu_seqlens.device
    idx = torch.tensor(pairs or [(0, 0)], dtype=torch.int32, device=dev).reshape(-1, 2)
    return idx, torch.tensor(offsets, dtype=torch.int32, device=dev)


def _prepare(q, k, v, g, beta, w, u, kd, gcum, aqk, scale, cu, idx, varlen, gate, split=None, xa=None,
             x_dtype=torch.float32, qg=None, make_wu=True, sparse_g=False, chunks=None, x_out=None):
    """The per-chunk preparation of the delta rule into w, u, kd, gcum (and aqk for gate 2): the split
    kernels (`split`, by default PREP_SPLIT) or the single _prepare_kernel. cu / idx: cu_seqlens and
    the chunk table (any tensor when not varlen). Returns the split kernels' X = (I + A)⁻¹ (x_dtype
    [B, T, H, CHUNK], row t0 + i holding row i of its chunk's X), or None from the single kernel.
    Given xa (X from an earlier call, with its gcum and aqk), only w, u, kd are made (_wu_kernel).
    qg (per-channel gate, split kernels): also q ⊙ e^{gcum} there, [B, T, H, D_k] in q's dtype.
    make_wu=False (split prepare): only gcum, A and X (and aqk, qg); w, u, kd are not made
    (placeholders). sparse_g (per-channel gate, fused split prepare): gcum is written only at the
    rows the state passes and the prepare itself read (_kkt_inv_kernel's SPARSE_G), the rest
    is left unwritten. chunks = (lo, hi) (split prepare making w, u, kd in its one launch or not at
    all, not varlen): only chunks lo .. hi−1 of each sequence, X into x_out (made by the caller)."""
    b, t, hk, d_k = q.shape
    h, d_v = v.shape[2], v.shape[3]
    dt, prec = _tl_dtype(q.dtype), ("ieee" if q.dtype == torch.float32 else "tf32")
    bk = min(64, max(16, triton.next_power_of_2(d_k)))
    bv = min(64, max(16, triton.next_power_of_2(d_v)))
    grid = (idx.shape[0], h) if varlen else (triton.cdiv(t, CHUNK), b * h)
    kind = "vector" if gate == 2 else "scalar"
    chunk0 = 0
    if chunks is not None:
        if varlen or xa is not None or not _split_prepare(kind, split) or (make_wu and not PREP_FUSED[kind]):
            raise ValueError("_prepare: a chunk range needs the one-launch split prepare and no cu_seqlens")
        chunk0, grid = chunks[0], (chunks[1] - chunks[0], b * h)
        if grid[0] <= 0:
            return x_out
    # GDN's split launch for training (X kept in float32) and for float32 inputs (FMA products: at 4
    # warps an sm_90 build parks ~5.7 KB a thread) is the 8-warp one
    train_shape = kind == "scalar" and (bool(split) or q.dtype == torch.float32)
    cfg = PREP_TUNING["scalar_train" if train_shape else kind]
    if xa is not None:
        _wu_kernel[grid](
            k, v, beta, gcum, xa, w, u, kd, cu, idx, t,
            H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BK=bk, BV=bv, GATE_VEC=gate == 2, IS_VARLEN=varlen,
            DT=dt, PREC=prec, num_warps=cfg.get("wu_num_warps", 8), num_stages=cfg.get("wu_num_stages", 1),
        )
        return xa
    if not _split_prepare(kind, split):
        _prepare_kernel[grid](
            q, k, v, g, beta, w, u, kd, gcum, aqk, cu, idx, scale, t,
            H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BC=SUB, BK=bk, BV=bv,
            GATE_VEC=gate == 2, IS_VARLEN=varlen, DT=dt, PREC=prec, num_warps=PREP_SINGLE_WARPS[kind],
        )
        return None
    # X = (I + A)⁻¹, per row
    xa = x_out if x_out is not None else _empty(b, t, h, CHUNK, dtype=x_dtype, device=q.device)
    fuse_wu = PREP_FUSED[kind] and make_wu
    _kkt_inv_kernel[grid](
        q, k, v, g, beta, gcum, aqk, xa, w, u, kd, w if qg is None else qg, cu, idx, scale, t, chunk0,
        H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BC=SUB, BK=min(cfg.get("BK", 32 if gate == 2 else 64), bk),
        BKW=bk, BV=bv, GATE_VEC=gate == 2, IS_VARLEN=varlen, DT=dt, PREC=prec, SPAN=_span(q.dtype),
        FUSE_WU=fuse_wu, STORE_QG=qg is not None, SPARSE_G=sparse_g and fuse_wu and gate == 2,
        SOLVE_PREC="tf32" if SOLVE_TF32[kind] and x_dtype != torch.float32 else "ieee",
        num_warps=cfg["num_warps"],
        maxnreg=cfg.get("maxnreg") if q.dtype != torch.float32 else None,  # fp32's FMA products need more
    )
    if make_wu and not PREP_FUSED[kind]:
        _prepare(q, k, v, g, beta, w, u, kd, gcum, aqk, scale, cu, idx, varlen, gate, xa=xa)
    return xa


def _fuse_output(gate: int, q: torch.Tensor, d_k: int, output: bool) -> bool:
    """Whether the segmented delta-rule pass makes the outputs (FUSED_OUTPUT). On CUDA only for
    16-bit inputs and D_k <= 128, the shapes its launches were tuned for: float32 products run on
    the FMA units and wider keys need wider tiles, and either would spill those launches' registers
    (the stored-states path is the one timed there). The interpreter (CPU) takes it at any shape."""
    if gate == 0 or not (DELTA_SEGMENTED and output and FUSED_OUTPUT["vector" if gate == 2 else "scalar"]):
        return False
    return not q.is_cuda or (q.dtype != torch.float32 and d_k <= 128)


def _overlap_prepare(gate: int, varlen: bool, saved: dict | None, split: bool | None,
                     from_inputs: bool) -> bool:
    """Whether the delta-rule forward hands its prepare to the segmented state pass in two chunk
    ranges (OVERLAP_PREPARE): the split prepare in one launch (w, u, kd fused, or not made), no
    cu_seqlens, no saved X."""
    kind = "vector" if gate == 2 else "scalar"
    return (gate != 0 and OVERLAP_PREPARE[kind] and DELTA_SEGMENTED and not varlen and saved is None
            and _split_prepare(kind, split) and (PREP_FUSED[kind] or from_inputs))


def _split_prepare(kind: str, split: bool | None) -> bool:
    """Whether _prepare runs the split kernels for this gate kind: `split`, or by default PREP_SPLIT."""
    return PREP_SPLIT[kind] if split is None else bool(split)


def _span(dtype: torch.dtype) -> float:
    """_gated_kkt's bound on the gate fall over a segment (its operands carry factors up to e^{span/2},
    their products up to e^span): DIAG_SPAN (e^60 is finite in fp32; bf16 has its range), 16 for fp16
    (largest value ~e^11: factors ≤ e^8 leave room for |k| up to ~20)."""
    return 16.0 if dtype == torch.float16 else float(DIAG_SPAN.value)


def _forward(q, k, v, g, beta, slope, scale, initial_state, output_final_state, cu_seqlens, gate: int,
             keep: dict | None = None, output: bool = True, saved: dict | None = None):
    """Launch the kernels. gate 0: Lightning (slope [H]); 1: GDN (g [B,T,H]); 2: KDA (g [B,T,H,K]).
    All tensors contiguous; q, k [B, T, HK, K]; v [B, T, H, V]. Returns (o, final state | None,
    states: the state entering each chunk [N_chunks, H, K, V] in the input dtype, or None where the
    segmented pass made the outputs itself: FUSED_OUTPUT).
    keep (the delta rule's backward): a dict that receives the intermediates w, u, kd, vn, gcum, aqk
    (gate 2) and xa (X = (I + A)⁻¹, by the split prepare whatever PREP_SPLIT says). output=False: o is
    not computed (None). saved: gcum, aqk, xa from an earlier call with keep on the same inputs; the
    prepare then only makes w, u, kd from them."""
    if gate == 0 and LIGHTNING_SEGMENTED:  # per-chunk states only when a gradient will read them
        from .lightning_fwd import forward

        grad = any(x is not None and x.requires_grad for x in (q, k, v, initial_state))
        return forward(q, k, v, slope, scale, initial_state, output_final_state, cu_seqlens, grad)
    b, t, hk, d_k = q.shape
    h, d_v = v.shape[2], v.shape[3]
    dev = q.device
    dt, prec = _tl_dtype(q.dtype), ("ieee" if q.dtype == torch.float32 else "tf32")
    bk = max(16, triton.next_power_of_2(d_k))
    varlen = cu_seqlens is not None
    if varlen:
        n_seq = cu_seqlens.numel() - 1
        idx, offsets = _chunk_tables(cu_seqlens, CHUNK)
        n_chunks = idx.shape[0] if t > 0 else 0
        cu = cu_seqlens
    else:
        n_seq, n_chunks = b, b * triton.cdiv(t, CHUNK)
        idx = offsets = cu = q  # any pointer; unused when not varlen
    o = _empty(b, t, h, d_v, dtype=q.dtype, device=dev)
    ht = _empty(n_seq, h, d_k, d_v, dtype=torch.float32, device=dev) if output_final_state else o
    h0 = initial_state.float().contiguous() if initial_state is not None else o
    # the segmented delta-rule pass makes the outputs itself: no per-chunk states, no v'
    fused = _fuse_output(gate, q, d_k, output)
    states = None if fused else _empty(max(n_chunks, 1), h, d_k, d_v, dtype=q.dtype, device=dev)
    w = u = kd = gcum = aqk = vn = o  # placeholders for arguments a kernel does not read
    prepare = None  # OVERLAP_PREPARE: the prepare of a chunk range, launched by the state pass
    qg = None  # q ⊙ e^{gcum} from the split prepare (per-channel gate), read by the output kernel
    # GDN: w, u, kd made inside the segmented pass (WUKD_FROM_INPUTS) where only this forward reads them
    from_inputs = (gate == 1 and WUKD_FROM_INPUTS and DELTA_SEGMENTED and keep is None and saved is None
                   and _split_prepare("scalar", None))
    if gate != 0:
        if not from_inputs:
            w = _empty(b, t, h, d_k, dtype=q.dtype, device=dev)
            u = _empty(b, t, h, d_v, dtype=q.dtype, device=dev)
            kd = _empty(b, t, h, d_k, dtype=q.dtype, device=dev)
        vn = o if fused else _empty(b, t, h, d_v, dtype=q.dtype, device=dev)
        # X and aqk enter their products in the input dtype: stored so, unless the backward (keep)
        # reads them in float32
        inter_dt = q.dtype if keep is None else torch.float32
        if saved is not None:
            gcum, aqk, xa = saved["gcum"], saved["aqk"] if gate == 2 else o, saved["xa"]
        else:
            gcum = _empty(*g.shape, dtype=torch.float32, device=dev)
            if gate == 2:
                aqk = _empty(b, t, h, CHUNK, dtype=inter_dt, device=dev)
            xa = None
        split = True if keep is not None else None
        if output and gate == 2 and saved is None and _split_prepare("vector", split):
            qg = _empty(b, t, h, d_k, dtype=q.dtype, device=dev)
        if n_chunks > 0:
            args = (q, k, v, g, beta, w, u, kd, gcum, aqk, scale, cu, idx, varlen, gate)
            opts = dict(split=split, x_dtype=inter_dt, qg=qg, make_wu=not from_inputs,
                        sparse_g=SPARSE_GCUM and keep is None and saved is None)
            if _overlap_prepare(gate, varlen, saved, split, from_inputs):
                xa = _empty(b, t, h, CHUNK, dtype=inter_dt, device=dev)

                def prepare(lo: int, hi: int) -> None:
                    _prepare(*args, **opts, chunks=(lo, hi), x_out=xa)
            else:
                xa = _prepare(*args, xa=xa, **opts)
        if keep is not None:
            keep.update(w=w, u=u, kd=kd, vn=None if fused else vn, gcum=gcum, aqk=aqk if gate == 2 else None,
                        xa=xa)
    kind = ("lightning", "scalar", "vector")[gate]
    if gate != 0 and DELTA_SEGMENTED:  # the same outputs from segment-parallel launches
        from .delta_segments import state_pass

        state_pass(w, u, kd, gcum, gate, h0 if initial_state is not None else None, cu_seqlens, states, vn,
                   ht if output_final_state else None,
                   out=(q, k, qg, aqk if gate == 2 else None, o, scale) if fused else None,
                   from_inputs=(k, xa, v, beta) if from_inputs else None, prepare=prepare,
                   beside=OVERLAP_PREPARE[kind])
        if fused:
            return o, (ht if output_final_state else None), None
    else:
        cfg = TUNING[kind]
        bv = min(cfg["BV"], max(16, triton.next_power_of_2(d_v)))
        launch_fitting(  # float32 at D = 256: 4 stages would need 412 KB of shared memory
            _state_kernel, (triton.cdiv(d_v, bv), n_seq * h),
            k, v, kd, u, w, gcum, slope if slope is not None else o, states, vn, h0, ht, cu, offsets, t,
            H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BK=bk, BV=bv, GATE=gate,
            USE_H0=initial_state is not None, STORE_HT=output_final_state, IS_VARLEN=varlen,
            DT=dt, PREC=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    if not output:
        return None, (ht if output_final_state else None), states
    cfg = OUT_TUNING[kind]
    bv = min(cfg["BV"], max(16, triton.next_power_of_2(d_v)))
    if n_chunks > 0:
        launch_fitting(
            _output_kernel, (triton.cdiv(d_v, bv), n_chunks, h),
            q, k, v if gate == 0 else vn, gcum, aqk, o if qg is None else qg,
            slope if slope is not None else o, states, o, cu, idx, scale, t,
            H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BK=bk, BV=bv, GATE=gate, IS_VARLEN=varlen, QG=qg is not None,
            DT=dt, PREC=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return o, (ht if output_final_state else None), states


def _lightning_backward(q, k, v, slope, scale, states, do, dht, need_dh0, cu_seqlens):
    """Triton backward of Lightning attention: (dq, dk, dv, dh0 | None); no slope gradient."""
    b, t, hk, d_k = q.shape
    h, d_v = v.shape[2], v.shape[3]
    dev = q.device
    dt, prec = _tl_dtype(q.dtype), ("ieee" if q.dtype == torch.float32 else "tf32")
    bk = max(16, triton.next_power_of_2(d_k))
    varlen = cu_seqlens is not None
    if varlen:
        n_seq = cu_seqlens.numel() - 1
        idx, offsets = _chunk_tables(cu_seqlens, CHUNK)
        n_chunks = idx.shape[0] if t > 0 else 0
        cu = cu_seqlens
    else:
        n_seq, n_chunks = b, b * triton.cdiv(t, CHUNK)
        idx = offsets = cu = q
    do = do.contiguous().to(q.dtype)
    dstates = _empty(*states.shape, dtype=q.dtype, device=dev)
    dh0 = _empty(n_seq, h, d_k, d_v, dtype=torch.float32, device=dev) if need_dh0 else q
    dht_ = dht.float().contiguous() if dht is not None else q
    cfg = TUNING["lightning"]
    bv = min(cfg["BV"], max(16, triton.next_power_of_2(d_v)))
    _lightning_dstate_kernel[(triton.cdiv(d_v, bv), n_seq * h)](
        q, do, slope, dstates, dht_, dh0, cu, offsets, scale, t,
        H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BK=bk, BV=bv, USE_DHT=dht is not None, STORE_DH0=need_dh0,
        IS_VARLEN=varlen, DT=dt, PREC=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    dq = _empty(b, t, h, d_k, dtype=torch.float32, device=dev)
    dk = _empty(b, t, h, d_k, dtype=torch.float32, device=dev)
    dv = _empty(b, t, h, d_v, dtype=torch.float32, device=dev)
    if n_chunks > 0:
        _lightning_dqkv_kernel[(n_chunks, h)](
            q, k, v, do, slope, states, dstates, dq, dk, dv, cu, idx, scale, t,
            H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BK=bk, BV=min(64, max(16, triton.next_power_of_2(d_v))),
            IS_VARLEN=varlen, DT=dt, PREC=prec, num_warps=8 if bk >= 128 else 4,
        )
    if hk != h:  # key heads shared by h // hk value heads: sum their gradients
        dq = dq.reshape(b, t, hk, h // hk, d_k).sum(3)  # (B, T, H_k, D_k)
        dk = dk.reshape(b, t, hk, h // hk, d_k).sum(3)  # (B, T, H_k, D_k)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), (dh0 if need_dh0 else None)


def _delta_bwd_keeps() -> bool:
    from . import linear_bwd  # lazy: it imports this module

    return linear_bwd.BACKWARD == "triton"


class _ChunkFunction(torch.autograd.Function):
    """Triton forward. Backward: Triton for Lightning (q, k, v, initial state), linear_bwd for the
    delta rule; a Lightning slope that needs a gradient recomputes the chunked PyTorch op under autograd."""

    @staticmethod
    def forward(ctx, gate, q, k, v, g, beta, slope, scale, initial_state, output_final_state, cu_seqlens):
        # the delta rule's Triton backward re-uses the prepare's X, aqk and gcum (as fla keeps its A
        # matrices): ~T·H·(2·64 + D_k) float32 values kept per call instead of recomputed
        keep = {} if gate != 0 and any(ctx.needs_input_grad[1:9]) and _delta_bwd_keeps() else None
        o, ht, states = _forward(q, k, v, g, beta, slope, scale, initial_state, output_final_state,
                                 cu_seqlens, gate, keep=keep)
        kept = (keep["xa"], keep["aqk"], keep["gcum"]) if keep else (None, None, None)
        ctx.save_for_backward(q, k, v, g, beta, slope, initial_state, states if gate == 0 else None, *kept)
        ctx.gate, ctx.scale, ctx.cu_seqlens = gate, scale, cu_seqlens
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, slope, h0, states, xa, aqk, gcum = ctx.saved_tensors
        need = ctx.needs_input_grad  # (gate, q, k, v, g, beta, slope, scale, h0, ...)
        if ctx.gate == 0 and not need[6]:
            if states is None:  # the segmented forward keeps them only if an input needed a gradient
                from .lightning_fwd import chunk_states

                states = chunk_states(q, k, v, slope, h0, ctx.cu_seqlens)
            dq, dk, dv, dh0 = _lightning_backward(q, k, v, slope, ctx.scale, states, do, dht,
                                                  h0 is not None and need[8], ctx.cu_seqlens)
            return None, dq, dk, dv, None, None, None, None, dh0, None, None
        if ctx.gate != 0:  # the delta rule: linear_bwd (BACKWARD picks the per-chunk gradients' form)
            from .linear_bwd import delta_rule_backward  # lazy: it imports this module

            kept = dict(xa=xa, aqk=aqk, gcum=gcum) if xa is not None else None
            *dx, dh0 = delta_rule_backward(ctx.gate, q, k, v, g, beta, ctx.scale, h0, do, dht, ctx.cu_seqlens,
                                           h0 is not None and need[8], saved=kept)
            return None, *dx, None, None, dh0, None, None
        # Lightning with a slope that needs a gradient: autograd through the chunked PyTorch op
        if ctx.cu_seqlens is not None:
            raise NotImplementedError("attnlab.kernels.linear: backward with cu_seqlens is implemented only "
                                      "for Lightning with a fixed slope")
        from .. import ops  # lazy: ops imports this module in its triton mode

        # q, k, v always carry a gradient (so that o has a graph); the slope as asked (need[6])
        inputs = [x.detach().requires_grad_(bool(need[i]) or i < 4)
                  for i, x in zip((1, 2, 3, 6), (q, k, v, slope), strict=True)]
        inputs.append(h0.detach().requires_grad_(bool(need[8])) if h0 is not None else None)
        q_, k_, v_, s_, h0_ = inputs
        with torch.enable_grad():
            o, ht = ops.lightning_attention(q_, k_, v_, s_, scale=ctx.scale, initial_state=h0_,
                                            output_final_state=dht is not None, mode="chunk")
            outs, grads = [o], [do]
            if dht is not None:
                outs.append(ht)
                grads.append(dht)
            wrt = [x for x in inputs if x is not None and x.requires_grad]
            got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True))
        dq, dk, dv, ds, dh0 = [next(got) if x is not None and x.requires_grad else None for x in inputs]
        return None, dq, dk, dv, None, None, ds, None, dh0, None, None


def _as_io(x: torch.Tensor) -> torch.Tensor:
    """Kernels read fp16/bf16/fp32; float64 is computed in float32."""
    return (x.float() if x.dtype == torch.float64 else x).contiguous()


def _check(q, k, v, initial_state, cu_seqlens):
    check_tensor("q", q, 4, "[B, T, H_k, D_k]")
    b, t, hk, d_k = q.shape
    check_tensor("k", k, 4, "[B, T, H_k, D_k]", shape=(b, t, hk, d_k), dtypes=(q.dtype,))
    check_tensor("v", v, 4, "[B, T, H, D_v]", shape=(b, t, None, None), dtypes=(q.dtype,))
    check_heads_divide("v", v.shape[2], "q", hk)
    if d_k > 256 or v.shape[3] > 256:
        raise ValueError(f"q, v: head dims up to 256 are supported, got D_k={d_k}, D_v={v.shape[3]}")
    n_seq = b
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, 1, "[N + 1]", dtypes=(torch.int32, torch.int64))
        if b != 1:
            raise ValueError(f"q: with cu_seqlens the batch must be packed into B = 1, got B = {b}")
        n_seq = cu_seqlens.numel() - 1
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 4, "[N, H, D_k, D_v]",
                     shape=(n_seq, v.shape[2], d_k, v.shape[3]), dtypes=(torch.float32, torch.float64))
    check_same_device(q=q, k=k, v=v, initial_state=initial_state, cu_seqlens=cu_seqlens)


def _run(gate, q, k, v, g, beta, slope, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens):
    out_dtype = v.dtype
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    args = [None if x is None else _as_io(x) for x in (q, k, v, g, beta, slope, initial_state)]
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    o, ht = _ChunkFunction.apply(gate, *args[:6], float(scale), args[6], bool(output_final_state), cu_seqlens)
    return o.to(out_dtype), ht


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning attention (MiniMax): S_t = e^{−s_h} S_{t−1} + k_t v_tᵀ, o_t = S_tᵀ (scale · q_t).

    q, k: [B, T, H_k, D_k]; v: [B, T, H, D_v] (H a multiple of H_k); slope: [H] float, s_h > 0;
    scale: None = 1.0. initial_state: float32 [N, H, D_k, D_v] (N = B, or the number of packed
    sequences with cu_seqlens int [N + 1] and B = 1). Returns (o [B, T, H, D_v] in v's dtype,
    final state float32 [N, H, D_k, D_v] or None)."""
    _check(q, k, v, initial_state, cu_seqlens)
    check_tensor("slope", slope, 1, "[H]", shape=(v.shape[2],))
    check_same_device(q=q, slope=slope)
    scale = 1.0 if scale is None else scale
    return _run(0, q, k, v, None, None, slope.float(), scale, initial_state, output_final_state, False,
                cu_seqlens)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet: S_t = e^{g_t}(I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, o_t = S_tᵀ (scale · q_t).

    q, k: [B, T, H_k, D_k]; v: [B, T, H, D_v]; g, beta: [B, T, H] (g log-decay ≤ 0, any float
    dtype). scale: None = D_k ** −0.5. use_qk_l2norm: q, k ← x / sqrt(Σx² + 1e-6) first.
    initial_state / cu_seqlens / returns: as :func:`lightning_attention`."""
    _check(q, k, v, initial_state, cu_seqlens)
    b, t, h = v.shape[:3]
    check_tensor("g", g, 3, "[B, T, H]", shape=(b, t, h))
    check_tensor("beta", beta, 3, "[B, T, H]", shape=(b, t, h))
    check_same_device(q=q, g=g, beta=beta)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _run(1, q, k, v, g, beta, None, scale, initial_state, output_final_state, use_qk_l2norm,
                cu_seqlens)


def kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention: as :func:`gated_delta_rule` with a per-channel gate g [B, T, H, D_k]."""
    _check(q, k, v, initial_state, cu_seqlens)
    b, t, h = v.shape[:3]
    check_tensor("g", g, 4, "[B, T, H, D_k]", shape=(b, t, h, q.shape[3]))
    check_tensor("beta", beta, 3, "[B, T, H]", shape=(b, t, h))
    check_same_device(q=q, g=g, beta=beta)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _run(2, q, k, v, g, beta, None, scale, initial_state, output_final_state, use_qk_l2norm,
                cu_seqlens)


# ---------------------------------------------------------------------------------------------
# decode steps


def _step(gate, q, k, v, g, beta, slope, state, scale, use_qk_l2norm):
    check_tensor("q", q, 3, "[B, H_k, D_k]")
    b, hk, d_k = q.shape
    check_tensor("k", k, 3, "[B, H_k, D_k]", shape=(b, hk, d_k), dtypes=(q.dtype,))
    check_tensor("v", v, 3, "[B, H, D_v]", shape=(b, None, None), dtypes=(q.dtype,))
    h, d_v = v.shape[1], v.shape[2]
    check_heads_divide("v", h, "q", hk)
    check_tensor("state", state, 4, "[B, H, D_k, D_v]", shape=(b, h, d_k, d_v), dtypes=(torch.float32,))
    if not state.is_contiguous():
        raise ValueError("state: must be contiguous (it is updated in place)")
    if gate == 1:
        check_tensor("g", g, 2, "[B, H]", shape=(b, h))
    if gate == 2:
        check_tensor("g", g, 3, "[B, H, D_k]", shape=(b, h, d_k))
    if gate != 0:
        check_tensor("beta", beta, 2, "[B, H]", shape=(b, h))
    check_same_device(q=q, k=k, v=v, g=g, beta=beta, slope=slope, state=state)
    q, k, v = (_as_io(x) for x in (q, k, v))
    o = _empty(b, h, d_v, dtype=q.dtype, device=q.device)
    bk = max(16, triton.next_power_of_2(d_k))
    bv = min(32, max(16, triton.next_power_of_2(d_v)))
    dummy = o
    _step_kernel[(triton.cdiv(d_v, bv), b * h)](
        q, k, v, dummy if g is None else g.contiguous(), dummy if beta is None else beta.contiguous(),
        dummy if slope is None else slope.float().contiguous(), state, o, float(scale),
        H=h, HK=hk, K=d_k, V=d_v, BK=bk, BV=bv, GATE=gate, DELTA=gate != 0, L2NORM=use_qk_l2norm,
        num_warps=4,
    )
    return o


def lightning_attention_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, state: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode token of Lightning attention; updates `state` (float32 [B, H, D_k, D_v]) in place.
    q, k: [B, H_k, D_k]; v: [B, H, D_v]; slope: [H]. Returns o [B, H, D_v] in q's dtype."""
    check_tensor("slope", slope, 1, "[H]", shape=(v.shape[1] if v.dim() == 3 else None,))
    return _step(0, q, k, v, None, None, slope, state, 1.0 if scale is None else scale, False)


def gated_delta_rule_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor, scale: float | None = None, use_qk_l2norm: bool = False,
) -> torch.Tensor:
    """One decode token of Gated DeltaNet; updates `state` in place. g, beta: [B, H]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _step(1, q, k, v, g, beta, None, state, scale, use_qk_l2norm)


def kda_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor, scale: float | None = None, use_qk_l2norm: bool = False,
) -> torch.Tensor:
    """One decode token of KDA; updates `state` in place. g: [B, H, D_k]; beta: [B, H]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _step(2, q, k, v, g, beta, None, state, scale, use_qk_l2norm)


__all__ = [
    "gated_delta_rule",
    "gated_delta_rule_step",
    "kda",
    "kda_step",
    "lightning_attention",
    "lightning_attention_step",
]
