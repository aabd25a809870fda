"""Triton GEMV for the batch-1 decode step, with the elementwise work around it fused in.

At batch 1 a projection is a matrix-vector product: the weight is the only HBM traffic that
matters, and the norms, activations and residual adds around it are separate launches that each
cost more time than their bytes (a Llama-style 0.84B step: ~250 such tiny kernels took 0.73 ms
beside 0.55 ms of GEMVs). :func:`gemv` folds them into the GEMV:

- prologue (computed per program from x; written to memory only on request): ``"rmsnorm"``
  (RMSNorm, plain or zero-centered), ``"silu_mul"`` (SwiGLU's ``silu(gate) * up`` of the fused
  gate|up output), ``"sigmoid_gate"`` (Qwen3-Next's gated attention output ``o * sigmoid(gate)``),
  ``"rmsnorm_sigmoid_gate"`` (Lightning's output norm over all heads, then its gate); each rounded
  to x's dtype before the product, exactly where the unfused layer rounds its output. With a norm
  prologue, ``x_hat_out`` has one program also write x̂ (a postnorm block's normed residual stream:
  its own custom op, ``attnlab::gemv_x_hat_``);
- epilogue: ``residual <- residual * keep + scale * (x̂ @ W.T)`` in place (``Residual.project``),
  or a new output in any float dtype (the LM head's float32 logits).

Kernel: program p owns output columns [p * BLOCK_N, +BLOCK_N) for ALL M rows of x (M <= MAX_ROWS,
padded to a power of 2), so each weight tile is read from HBM once. The product is accumulated
elementwise in a float32 [M, BLOCK_N, BLOCK_K] register tile over the K loop and reduced once at
the end (one cross-thread reduction per program instead of one per K step). A second form (DOT,
chosen per shape by TUNING) multiplies on the tensor cores, W_tile @ x̂ᵀ with the rows padded to 16,
so that the weight tiles are pipelined through shared memory (cp.async) rather than held in
registers. The rmsnorm prologue takes a first pass over x for the sum of squares; x (a few KB) is
re-read by every program from L2.
A third form (PERSIST > 0 in TUNING, _gemv_persistent_kernel) attacks the per-launch overhead (a
DRAM round trip before the first bytes; a last wave of programs partly empty): min(tiles, PERSIST x
SMs) programs each stream a contiguous equal share of the BLOCK_N-column tiles, with the next
weight tile always loaded before the current one is reduced (register double-buffering), and the
prologue's per-row work once per program. It is chosen per shape by the chain sweep
(benchmarks/gemv_gpu.py --chain-only); 0, the tiled form, is the default.
No split-K: a K split needs a float32 partial buffer and a last-arriver pass to round the residual
update once, and pays only where the column tiles are fewer than the SMs -- the tall down projection
(N 2048, K 5472) has 512 four-column tiles, ~4 per SM, so it was not built (reasoned, not measured).
The default launch shape (:func:`launch_config`) picks BLOCK_N small enough for >= 2 programs per SM
at d_model 2048.

Under ``torch.compile`` the launcher is an opaque custom op (``attnlab::gemv``; the residual form
``attnlab::gemv_residual_`` mutates its residual), so a compiled or graphed decode step keeps it.
:func:`gemv_reference` is the same computation in torch ops: the CPU fallback and the test oracle.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._checks import check_same_device, check_tensor
from ._common import l2_prefetch, norm_weight, output_buffer
from ._pdl import launch_options, use_pdl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = 8
# The fused decode step's MLP (attnlab.layers.fused.block_step): gate|up with the silu_mul epilogue,
# then down on its [M, F] output (True); or gate|up's [M, 2F] output, then down with the silu_mul
# prologue (False). Bit-identical; an A/B knob for benchmarks/decode_ab.py.
MLP_SWIGLU_EPILOGUE = True
POISON_OUTPUTS = False  # tests: fill every new output buffer with NaN first, so an unwritten element fails
PROLOGUES = (None, "rmsnorm", "silu_mul", "sigmoid_gate", "rmsnorm_sigmoid_gate")
EPILOGUES = (None, "silu_mul")
_PROLOGUE_ID = {None: 0, "rmsnorm": 1, "silu_mul": 2, "sigmoid_gate": 3, "rmsnorm_sigmoid_gate": 4}
_NORM_PROLOGUES = ("rmsnorm", "rmsnorm_sigmoid_gate")
_GATE_PROLOGUES = ("sigmoid_gate", "rmsnorm_sigmoid_gate")
_IO_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE_NAME = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# (rows padded to a power of 2, N, K) -> (BLOCK_N, BLOCK_K, num_warps, num_stages[, DOT[, PERSIST[,
# L2_AHEAD]]]), K the weight's; DOT (default False) selects the tensor-core form of the kernel (BLOCK_N
# >= 16); PERSIST (default 0) > 0 selects the persistent elementwise form with PERSIST programs per SM
# (_gemv_persistent_kernel; DOT must be False); L2_AHEAD (default 0, persistent form only) > 0 has it
# also prefetch into L2 the weight tile L2_AHEAD + 1 ahead of the one it reduces. The sweeps
# (benchmarks/gemv_gpu.py --sweep / --chain-only) print snippets for it; shapes not listed get
# launch_config's reasoned default.
Config = tuple[int, int, int, int, bool, int, int]
TUNING: dict[tuple[int, int, int], tuple] = {
    # H100 80GB HBM3, 2026-11-26: the ~1B presets' GEMVs at M = 1 as the decode step runs them, 32
    # launches back to back in a CUDA graph with PDL over distinct weights (192 MB: not L2-resident),
    # benchmarks/gemv_gpu.py --chain-only. Per launch: LM head 44.7 us (100% of the weight bytes over
    # the copy bandwidth), gate/up 16.4 (91%), GDN / KDA in_proj 10.4-10.5 (82%), qkv 5.7 (74%),
    # the K = 5472 down projection 10.2 (73%), o_proj 4.1 (69%), MLA's 1024-wide o_proj 2.5 (55%).
    # A K loop that issued the next tile's load first measured slower (down: 13.4 us) and was removed.
    # Fifth session, same card: the persistent form (PERSIST > 0) beside the tiled one per shape in the
    # same chain benchmark (benchmarks/results/gemv_gpu_h100_persistent.json) won for in_proj (GDN 6208
    # / KDA 6304 x 2048) 10.39 -> 9.68 / 10.50 -> 9.81 us, gated qkv 8.59 -> 8.16, MLA x_proj 4.39 ->
    # 4.01, gated o_proj 4.74 -> 4.03; but inside the whole decode step (interleaved A/B, CUDA graph, 64
    # steps, twice) those entries made it SLOWER: llama 0.841 -> 0.851 ms at 4K and 1.181 -> 1.212 at
    # 32K, qwen3-next 1.091 -> 1.089 / 1.101 -> 1.115, kimi-linear 0.914 -> 0.924 / 0.964 -> 0.971 (its
    # early-launched programs, waiting under PDL, take SM slots from the kernel before them, which a
    # chain of GEMVs alone does not show). So every shape keeps the tiled form.
    (1, 2048, 1024): (8, 1024, 4, 1, False, 0),
    (1, 2048, 2048): (4, 2048, 4, 1, False, 0),
    (1, 2064, 2048): (4, 2048, 4, 1, False, 0),
    (1, 3072, 2048): (8, 1024, 4, 1, False, 0),
    (1, 4608, 2048): (4, 2048, 4, 1, False, 0),
    (1, 6208, 2048): (16, 512, 4, 1, False, 0),
    (1, 6304, 2048): (16, 512, 4, 1, False, 0),
    (1, 10944, 2048): (8, 1024, 4, 1, False, 0),
    (1, 32768, 2048): (8, 1024, 4, 1, False, 0),
    # Seventeenth session, same card and sweep with a wider tiled grid and no persistent form
    # (benchmarks/gemv_gpu.py --chain-only --tiled-only --shapes ...; JSON
    # benchmarks/results/gemv_gpu_h100_presets_chain.json): the presets' shapes no sweep had covered,
    # us per launch (floor): Qwen3-Next / GDN in_proj 12352 x 2048 18.15 (16.86; the reasoned default
    # (32, 256) 20.74), its o_proj 2048 x 4096 6.30 (5.59; default 6.73), KDA in_proj 6416 10.66 (8.76),
    # Kimi MLA x_proj 3648 6.36 (4.98), DeepSeek-V3 x_proj 1600 3.26 (2.18) / q_up 3072 x 1024 3.19
    # (2.10), V3.2 x_proj 1792 3.70 (2.45) / q_up 11264 x 1024 10.05 (7.69), Lightning in_proj 8192
    # 12.57 (11.18), MiniMax-01 qkv 2560 5.31 (3.49). Inside the CUDA-graph decode step (interleaved,
    # best of 2, ms at 4K / 32K): qwen3-next 1.091 / 1.100 -> 1.039 / 1.070, kimi-linear 0.903 /
    # 0.941 -> 0.865 / 0.903, deepseek-v32 1.293 / 1.352 -> 1.244 / 1.308, minimax-01 0.848 / 0.888
    # -> 0.825 / 0.855, deepseek-v3 unchanged (0.934 / 1.144: its defaults were already these).
    (1, 12352, 2048): (8, 1024, 4, 1, False, 0),
    (1, 2048, 4096): (8, 2048, 8, 1, False, 0),
    (1, 6416, 2048): (8, 1024, 4, 1, False, 0),
    (1, 3648, 2048): (8, 1024, 4, 1, False, 0),
    (1, 1600, 2048): (4, 2048, 4, 1, False, 0),
    (1, 3072, 1024): (8, 1024, 4, 1, False, 0),
    (1, 1792, 2048): (4, 2048, 4, 1, False, 0),
    (1, 11264, 1024): (8, 1024, 4, 1, False, 0),
    (1, 8192, 2048): (8, 1024, 4, 1, False, 0),
    (1, 2560, 2048): (8, 1024, 4, 1, False, 0),
    # Twenty-second session, same card: with gate|up's silu_mul epilogue the down projection reads its
    # [M, F] input with no prologue, and its best tiled shape moved. Chain sweep (gemv_gpu.py --chain-only
    # --tiled-only --shapes down,down_plain,gate_up): down as it was, with the prologue, (4, 2048, 4) 10.04
    # us (74% of the floor); without it (8, 2048, 8) 8.77 us (85%). In the step (decode_ab.py, best of 3,
    # ms at 4K): deepseek-v3 0.8682 -> 0.8527, llama (best of 2) 0.7867 -> 0.7812; (4, 2048, 8) 0.8830 /
    # 0.7880, (8, 1024, 4) 0.8900 / 0.8351 (benchmarks/results/decode_ab_h100_down_shapes.json,
    # ..._gemv_shapes_run22.json; there 8 x 2048 at 8 warps lost for o_proj, x_proj, q_up, gate|up, LM head).
    (1, 2048, 5472): (8, 2048, 8, 1, False, 0),
    # Then with the L1 carveout hint (kernels._common.prefer_l1), the same in-step A/B over the presets'
    # other big shapes (decode_ab_h100_gemv_shapes_l1.json, deepseek-v3 / llama at 4K, best of 2, base
    # 0.8230 / 0.7490 ms) found none better: gate|up as 4 x 2048 / 16 x 512 / 4 x 1024 0.8339 / 1.0343 /
    # 0.8263 (deepseek-v3), down as 4 x 2048 / 8 x 1024 / 16 x 1024 at 8 warps 0.8402 / 0.8598 / 0.8708,
    # o_proj as 2 x 2048 / 8 x 1024 0.8451 / 0.8445, the LM head as 4 x 2048 / 16 x 512 0.8231 / 0.8512,
    # x_proj 8 x 1024 0.8497, q_up 4 x 1024 0.8320; llama's qkv as 4 x 2048 0.7448 there, but against
    # the kept 8 x 1024 over three rounds (decode_ab_h100_qkv_shape.json) llama 4K 0.7479 vs 0.7494, 32K
    # 1.0836 vs 1.0796, swa 4K 0.7448 vs 0.7354, 32K 0.8306 vs 0.8183.
}


@triton.jit
def _round(v, DT: tl.constexpr, INTERP: tl.constexpr):
    """float32 ``v`` rounded to ``DT`` (to nearest even), returned as float32. The interpreter
    truncates float32 -> bfloat16 casts (triton 3.9), so there the rounding is done on the bits."""
    if INTERP and DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(DT).to(tl.float32)


@triton.jit
def _mm(a, b, PREC: tl.constexpr, INTERP: tl.constexpr):
    """a @ b, float32 accumulation; under the interpreter in float32 (tl.dot on bf16 misbehaves there)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _silu_mul(g, u):
    """SwiGLU's silu(g) * u in float32: the silu_mul prologue's and epilogue's one formula (so the two
    give the same bits)."""
    return g * tl.sigmoid(g) * u


@triton.jit
def _x_hat(x_rows, k, x_ok, k_ok, NW, gate_rows, rstd, K, PROLOGUE: tl.constexpr,
           ZERO_CENTERED: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr):
    """The prologue at columns k of the rows x_rows (any broadcast shape): float32 x̂, rounded to DT."""
    xv = tl.load(x_rows + k, mask=x_ok, other=0.0).to(tl.float32)
    if PROLOGUE == 1:
        nw = tl.load(NW + k, mask=k_ok, other=0.0).to(tl.float32)
        xv = norm_weight(xv * rstd, nw, ZERO_CENTERED)
    elif PROLOGUE == 4:  # the norm's output, then the gate's sigmoid, each rounded as the layer does
        nw = tl.load(NW + k, mask=k_ok, other=0.0).to(tl.float32)
        g = tl.load(gate_rows + k, mask=x_ok, other=0.0).to(tl.float32)
        xv = _round(norm_weight(xv * rstd, nw, ZERO_CENTERED), DT, INTERP) * _round(tl.sigmoid(g), DT, INTERP)
    elif PROLOGUE == 2:
        up = tl.load(x_rows + K + k, mask=x_ok, other=0.0).to(tl.float32)
        xv = _silu_mul(xv, up)
    elif PROLOGUE == 3:
        g = tl.load(gate_rows + k, mask=x_ok, other=0.0).to(tl.float32)
        xv = xv * tl.sigmoid(g)
    return _round(xv, DT, INTERP)  # the unfused layer's output rounding


@triton.jit
def _k_step(acc, w, x_rows, k, m_ok, NW, gate_rows, rstd, K, PROLOGUE: tl.constexpr,
            ZERO_CENTERED: tl.constexpr, XDT: tl.constexpr, WDT: tl.constexpr, DOT: tl.constexpr,
            PREC: tl.constexpr, INTERP: tl.constexpr, xh_rows, xh_ok, WRITE_XH: tl.constexpr):
    """acc + the weight tile w (at columns k) times x̂ there. WRITE_XH: x̂ is also stored at xh_rows + k
    where xh_ok (one program does it: x̂ is the same in every program)."""
    k_ok = k < K
    x_hat = _x_hat(x_rows, k, m_ok & k_ok, k_ok, NW, gate_rows, rstd, K, PROLOGUE, ZERO_CENTERED,
                   XDT, INTERP)  # float32, (ROWS, BLOCK_K) or (ROWS, 1, BLOCK_K)
    if WRITE_XH:
        if xh_ok:
            tl.store(xh_rows + k, x_hat.to(XDT), mask=m_ok & k_ok)
    if DOT:
        acc += _mm(w, tl.trans(x_hat.to(WDT)), PREC, INTERP)  # (BLOCK_N, ROWS)
    else:
        acc += x_hat * w.to(tl.float32)  # (ROWS, BLOCK_N, BLOCK_K)
    return acc


@triton.jit
def _epilogue(out, tile, R, O, N, keep, scale, M: tl.constexpr, ROWS: tl.constexpr, HAS_RES: tl.constexpr,
              BLOCK_N: tl.constexpr, INTERP: tl.constexpr):
    """Write the float32 products ``out`` (ROWS, BLOCK_N) of output columns [tile * BLOCK_N, +BLOCK_N):
    HAS_RES: R <- R * keep + scale * out (rounded once); else O <- scale * out."""
    m2 = tl.arange(0, ROWS)[:, None]
    n2 = tile * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    offs = m2.to(tl.int64) * N + n2  # (ROWS, BLOCK_N)
    ok = (m2 < M) & (n2 < N)
    if HAS_RES:
        r = tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
        out = _round(r * keep + scale * out, R.dtype.element_ty, INTERP)
        tl.store(R + offs, out.to(R.dtype.element_ty), mask=ok)
    else:
        out = _round(scale * out, O.dtype.element_ty, INTERP)
        tl.store(O + offs, out.to(O.dtype.element_ty), mask=ok)


@triton.jit
def _gemv_kernel(
    X, W, NW, GATE, R, O, XH,
    N, K, stride_xm, stride_gm,
    eps, keep, scale,
    M: tl.constexpr, ROWS: tl.constexpr, PROLOGUE: tl.constexpr, ZERO_CENTERED: tl.constexpr,
    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr, WRITE_XH: tl.constexpr = False,
    SWIGLU: tl.constexpr = False,
):
    """Program p: out[m, n] for all m < M and n in [p * BLOCK_N, +BLOCK_N); rows padded to ROWS.
    SWIGLU (elementwise form, no residual): W is [gate | up] (N = 2F rows) and program p owns the
    F-wide output's columns [p * BLOCK_N / 2, +BLOCK_N / 2): its tile interleaves their gate rows (even
    tile rows) and up rows (odd), and O [M, F] <- silu(g) * u, g and u each rounded to O's dtype first.
    PROLOGUE 0 none, 1 rmsnorm (NW [K]), 2 silu_mul (X [M, 2K]), 3 sigmoid_gate (GATE [M, K]),
    4 rmsnorm then sigmoid_gate.
    HAS_RES: R [M, N] <- R * keep + scale * acc; else O [M, N] <- scale * acc.
    WRITE_XH: program 0 also writes x̂ (the prologue's output, x's dtype) to XH [M, K] (contiguous).
    DOT False: elementwise float32 products in a [ROWS, BLOCK_N, BLOCK_K] tile, reduced at the end.
    DOT True: acc [BLOCK_N, ROWS] += W_tile @ x̂_tileᵀ on the tensor cores (ROWS >= 16, BLOCK_N >= 16),
    the weight tile a dot operand, so triton's pipeliner can keep num_stages tiles in flight (cp.async)
    without the register cost of the elementwise accumulator.
    PDL (attnlab.kernels._pdl): the elementwise form loads its first weight tile before waiting for
    the previous kernel (weights are never written by the step), everything else after."""
    pid = tl.program_id(0)
    if PDL:
        gdc_launch_dependents()
    if DOT:
        m = tl.arange(0, ROWS)[:, None]  # (ROWS, 1)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]  # (BLOCK_N, 1)
        kk = tl.arange(0, BLOCK_K)[None, :]  # (1, BLOCK_K)
    else:
        m = tl.arange(0, ROWS)[:, None, None]  # (ROWS, 1, 1)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None]  # (1, BLOCK_N, 1)
        kk = tl.arange(0, BLOCK_K)[None, None, :]  # (1, 1, BLOCK_K)
    n_ok = n < N
    if SWIGLU:  # tile row j: output column pid * BLOCK_N / 2 + j // 2, its gate row (j even) or up row
        j = tl.arange(0, BLOCK_N)[None, :, None]  # (1, BLOCK_N, 1)
        col = pid * (BLOCK_N // 2) + j // 2
        n = (j % 2) * (N // 2) + col
        n_ok = col < N // 2
    m_ok = m < M
    x_rows = X + m.to(tl.int64) * stride_xm
    gate_rows = GATE + m.to(tl.int64) * stride_gm
    xh_rows = XH + m.to(tl.int64) * K
    xh_ok = pid == 0
    w_rows = W + n.to(tl.int64) * K
    if PDL:
        if not DOT:  # (the DOT form's pipelined loads would spill with a tile held across the wait)
            w_first = tl.load(w_rows + kk, mask=n_ok & (kk < K), other=0.0, eviction_policy="evict_first")
        gdc_wait()  # x, the gate and the residual come from earlier kernels

    rstd = 0.0
    if PROLOGUE == 1 or PROLOGUE == 4:  # first pass: each row's mean square (float32, as F.rms_norm)
        if DOT:
            ss = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        else:
            ss = tl.zeros([ROWS, 1, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            xv = tl.load(x_rows + k, mask=m_ok & (k < K), other=0.0).to(tl.float32)
            ss += xv * xv
        if DOT:
            rstd = tl.math.rsqrt(tl.sum(ss, axis=1, keep_dims=True) / K + eps)  # (ROWS, 1)
        else:
            rstd = tl.math.rsqrt(tl.sum(ss, axis=2, keep_dims=True) / K + eps)  # (ROWS, 1, 1)

    if DOT:
        acc = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
    else:
        acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_start = 0
    if PDL:
        if not DOT:  # the first K step with the tile loaded before the wait
            acc = _k_step(acc, w_first, x_rows, kk, m_ok, NW, gate_rows, rstd, K, PROLOGUE, ZERO_CENTERED,
                          X.dtype.element_ty, W.dtype.element_ty, DOT, PREC, INTERP, xh_rows, xh_ok, WRITE_XH)
            k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):
        k = k0 + kk
        w = tl.load(w_rows + k, mask=n_ok & (k < K), other=0.0, eviction_policy="evict_first")
        acc = _k_step(acc, w, x_rows, k, m_ok, NW, gate_rows, rstd, K, PROLOGUE, ZERO_CENTERED,
                      X.dtype.element_ty, W.dtype.element_ty, DOT, PREC, INTERP, xh_rows, xh_ok, WRITE_XH)
    if DOT:
        out = tl.trans(acc)  # (ROWS, BLOCK_N)
    else:
        out = tl.sum(acc, axis=2)  # (ROWS, BLOCK_N)

    if SWIGLU:  # g and u rounded as the plain GEMV's output, then silu(g) * u stored (rounded once)
        g, u = tl.split(tl.reshape(out, (ROWS, BLOCK_N // 2, 2)))  # (ROWS, BLOCK_N / 2) each
        DT = O.dtype.element_ty
        h = _silu_mul(_round(scale * g, DT, INTERP), _round(scale * u, DT, INTERP))
        _epilogue(h, pid, R, O, N // 2, keep, 1.0, M, ROWS, False, BLOCK_N // 2, INTERP)
    else:
        _epilogue(out, pid, R, O, N, keep, scale, M, ROWS, HAS_RES, BLOCK_N, INTERP)


@triton.jit
def _prefetch_tile_l2(W, tile, t_end, N, K, BLOCK_N: tl.constexpr):
    """Ask L2 for the weight rows of ``tile`` (contiguous: BLOCK_N rows of K) if tile < t_end: one
    ``cp.async.bulk.prefetch.L2`` (sm_90, PTX 8.0) from thread 0, no registers held. K * the element
    size must be a multiple of 16 bytes (the launcher checks)."""
    n0 = tile * BLOCK_N
    nbytes = tl.minimum(N - n0, BLOCK_N) * K * (W.dtype.element_ty.primitive_bitwidth // 8)
    l2_prefetch(W + n0.to(tl.int64) * K, nbytes, tile < t_end)


@triton.jit
def _gemv_persistent_kernel(
    X, W, NW, GATE, R, O,
    N, K, stride_xm, stride_gm, n_tiles,
    eps, keep, scale,
    M: tl.constexpr, ROWS: tl.constexpr, PROLOGUE: tl.constexpr, ZERO_CENTERED: tl.constexpr,
    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
    L2_AHEAD: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr,
):
    """The persistent form (PERSIST > 0): a grid of G <= n_tiles programs, program p owns the
    contiguous tiles [p * n_tiles // G, (p + 1) * n_tiles // G) -- shares differ by at most one tile,
    and each program streams one contiguous stretch of W. A tile is BLOCK_N output columns over all
    K, in K_STEPS = cdiv(K, BLOCK_K) steps (unrolled). The weights are register double-buffered
    across K steps and tiles: each step first issues the load of the NEXT step's tile (the next K
    step, or the next tile's first), then reduces the current one, so a program always has a load in
    flight; the first is issued before gdc_wait (PDL). The prologue's per-row work is done once per
    program: rmsnorm's sum of squares, and x̂ itself when one K step covers K (K_STEPS == 1); with
    K_STEPS > 1 x̂ is recomputed per K step from x (L1/L2). Arguments and epilogue as _gemv_kernel's
    elementwise form. sm_90 SASS (o_proj, BLOCK_N 4, BLOCK_K 2048): ptxas issues the next tile's loads
    after the current tile's FMAs (it unpacks the bf16 weights lazily, in the registers the loads
    reuse) but before the cross-thread reduction, the residual load and the store, so the load is in
    flight across the epilogue, not the FMAs; carrying the tile as float32 did not change that.
    L2_AHEAD > 0 (GPU only) therefore also asks L2 for the tile L2_AHEAD + 1 ahead of the current one
    (a bulk prefetch, no registers), so the register loads of the next tile find it in L2."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    if PDL:
        gdc_launch_dependents()
    t_start = pid * n_tiles // grid
    t_end = (pid + 1) * n_tiles // grid
    m = tl.arange(0, ROWS)[:, None, None]  # (ROWS, 1, 1)
    nn = tl.arange(0, BLOCK_N)[None, :, None]  # (1, BLOCK_N, 1)
    kk = tl.arange(0, BLOCK_K)[None, None, :]  # (1, 1, BLOCK_K)
    m_ok = m < M
    x_rows = X + m.to(tl.int64) * stride_xm
    gate_rows = GATE + m.to(tl.int64) * stride_gm
    n_end = tl.minimum(t_end * BLOCK_N, N)  # this program's columns end here
    n = t_start * BLOCK_N + nn
    w_cur = tl.load(W + n.to(tl.int64) * K + kk, mask=(n < N) & (kk < K), other=0.0,
                    eviction_policy="evict_first")  # (1, BLOCK_N, BLOCK_K): weights are never written
    if L2_AHEAD > 0 and not INTERP:
        for a in tl.static_range(1, L2_AHEAD + 1):
            _prefetch_tile_l2(W, t_start + a, t_end, N, K, BLOCK_N)
    if PDL:
        gdc_wait()  # x, the gate and the residual come from earlier kernels

    rstd = 0.0
    if PROLOGUE == 1 or PROLOGUE == 4:  # each row's mean square (float32, as F.rms_norm), once per program
        ss = tl.zeros([ROWS, 1, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            xv = tl.load(x_rows + k, mask=m_ok & (k < K), other=0.0).to(tl.float32)
            ss += xv * xv
        rstd = tl.math.rsqrt(tl.sum(ss, axis=2, keep_dims=True) / K + eps)  # (ROWS, 1, 1)
    x_hat = tl.zeros([ROWS, 1, BLOCK_K], dtype=tl.float32)
    if K_STEPS == 1:  # x̂ whole, once per program
        x_hat = _x_hat(x_rows, kk, m_ok & (kk < K), kk < K, NW, gate_rows, rstd, K, PROLOGUE, ZERO_CENTERED,
                       X.dtype.element_ty, INTERP)  # (ROWS, 1, BLOCK_K)

    for t in range(t_start, t_end):
        if L2_AHEAD > 0 and not INTERP:
            _prefetch_tile_l2(W, t + 1 + L2_AHEAD, t_end, N, K, BLOCK_N)
        acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for ks in tl.static_range(K_STEPS):
            # the next tile in this program's stream, issued before the current one is reduced
            if ks + 1 < K_STEPS:
                n_next = t * BLOCK_N + nn
                k_next = (ks + 1) * BLOCK_K + kk
                ok_next = (n_next < N) & (k_next < K)
            else:
                n_next = (t + 1) * BLOCK_N + nn
                k_next = kk
                ok_next = (n_next < n_end) & (k_next < K)  # nothing past this program's share
            w_next = tl.load(W + n_next.to(tl.int64) * K + k_next, mask=ok_next, other=0.0,
                             eviction_policy="evict_first")
            if K_STEPS == 1:
                acc += x_hat * w_cur.to(tl.float32)  # (ROWS, BLOCK_N, BLOCK_K)
            else:
                k = ks * BLOCK_K + kk
                acc = _k_step(acc, w_cur, x_rows, k, m_ok, NW, gate_rows, rstd, K, PROLOGUE, ZERO_CENTERED,
                              X.dtype.element_ty, W.dtype.element_ty, False, "ieee", INTERP, x_rows, False,
                              False)
            w_cur = w_next
        _epilogue(tl.sum(acc, axis=2), t, R, O, N, keep, scale, M, ROWS, HAS_RES, BLOCK_N, INTERP)


# ---------------------------------------------------------------------------------------------
# launch shape

_SMS: dict[int, int] = {}
_MAX_K_STEPS = 16  # the persistent form's K loop is unrolled


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def rows_padded(m: int) -> int:
    return triton.next_power_of_2(max(1, m))


def launch_config(m: int, n: int, k: int, device: torch.device) -> Config:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, DOT, PERSIST, L2_AHEAD) for x [m, .] times weight
    [n, k]: TUNING's entry (missing DOT / PERSIST / L2_AHEAD read False / 0 / 0), else a default, the
    tiled elementwise form (DOT False, PERSIST 0):
    - BLOCK_N 8 if that gives >= 2 programs per SM, else 4 (d_model 2048 on 132 SMs: o_proj BLOCK_N 4
      = 512 programs, the LM head 8): every SM gets weight rows, without a split-K. The H100 chain
      sweeps' winners (TUNING) are this shape on 15 of their 20 shapes; the rule it replaced (the
      largest of 32..4) lost 10-25% where it chose 16 or 32 (GDN in_proj 20.74 vs 18.15 us);
    - BLOCK_K so that a K step loads 8192 / M_PAD weights (16 KB in bf16 at M = 1): the loads
      are not software-pipelined (these loop-carried register loads get no cp.async; checked in
      the sm_90 SASS), so the bytes in flight per SM are (programs per SM) x (one K step's tile),
      and ~16 KB per SM is what ~3 TB/s at ~0.7 us latency needs; o_proj's K = 2048 is then one
      step. The float32 accumulator is M_PAD * BLOCK_N * BLOCK_K: bounded as M grows;
    - 4 warps: 64 accumulator floats per thread (sm_90 compile: 110-140 registers, no spills);
    - num_stages 1: nothing for the pipeliner to do (kept in the tuple for the sweep).
    The register file bounds that form's bytes in flight by M_PAD (four float32 accumulators per
    weight element at M = 4); the DOT form (swept, not a default) has no such bound.
    On the interpreter: small blocks, so the tests run several K steps and ragged N blocks."""
    m_pad = rows_padded(m)
    hit = TUNING.get((m_pad, n, k))
    if hit is not None:
        persist, l2_ahead = (*hit[5:7], 0, 0)[:2]
        return (*hit[:4], bool(hit[4]) if len(hit) > 4 else False, int(persist), int(l2_ahead))
    return _default_config(m, n, k, device)


def _default_config(m: int, n: int, k: int, device: torch.device) -> Config:
    """launch_config's reasoned default (the tiled elementwise form), whatever TUNING says."""
    m_pad = rows_padded(m)
    if device.type != "cuda":
        return (8, 32, 4, 1, False, 0, 0)
    block_n = 8 if triton.cdiv(n, 8) >= 2 * _num_sms(device) else 4
    block_k = max(64, 8192 // (m_pad * block_n))
    block_k = min(block_k, max(64, triton.next_power_of_2(k)))
    return (block_n, block_k, 4, 1, False, 0, 0)


def persistent_grid(n: int, block_n: int, persist: int, device: torch.device) -> int:
    """Programs of the persistent form: min(tiles, PERSIST x SMs); each owns a contiguous equal share."""
    return min(triton.cdiv(n, block_n), persist * _num_sms(device))


# ---------------------------------------------------------------------------------------------
# host side


def _launch(x: torch.Tensor, weight: torch.Tensor, prologue: str | None, norm_weight: torch.Tensor | None,
            norm_eps: float, norm_zero_centered: bool, gate: torch.Tensor | None,
            residual: torch.Tensor | None, keep: float, scale: float, out: torch.Tensor | None,
            config: Config, x_hat_out: torch.Tensor | None = None, epilogue: str | None = None) -> None:
    """Run the kernel: into ``residual`` in place if given, else into ``out`` [M, N] ([M, N / 2] with
    the silu_mul epilogue); x̂ into ``x_hat_out`` [M, K] too if given (the tiled form only)."""
    M = x.shape[0]
    N, K = weight.shape
    if M == 0 or N == 0:
        return
    block_n, block_k, num_warps, num_stages, dot = config[:5]
    persist = int(config[5]) if len(config) > 5 else 0
    l2_ahead = int(config[6]) if len(config) > 6 else 0
    if dot and (block_n < 16 or block_k < 16):
        raise ValueError(f"config: the DOT form needs BLOCK_N and BLOCK_K >= 16, got {config}")
    if persist < 0 or (persist and dot):
        raise ValueError(f"config: PERSIST must be >= 0, and 0 with the DOT form, got {config}")
    if persist and x_hat_out is not None:
        raise ValueError(f"config: x_hat_out is written by the tiled form only (PERSIST 0), got {config}")
    swiglu = epilogue == "silu_mul"
    if swiglu and (dot or persist or block_n % 2):
        raise ValueError(f"config: the silu_mul epilogue runs in the tiled elementwise form (DOT False, "
                         f"PERSIST 0) with an even BLOCK_N, got {config}")
    if l2_ahead < 0 or (l2_ahead and (not persist or K * weight.element_size() % 16)):
        raise ValueError(f"config: L2_AHEAD must be >= 0, and 0 unless PERSIST > 0 and K x the element size "
                         f"is a multiple of 16 bytes, got {config} for K={K}")
    k_steps = triton.cdiv(K, block_k)
    if persist and k_steps > _MAX_K_STEPS:
        raise ValueError(f"config: the persistent form unrolls its K loop: needs cdiv(K, BLOCK_K) <= "
                         f"{_MAX_K_STEPS}, got {k_steps} for K={K}, config {config}")
    rows = max(16, rows_padded(M)) if dot else rows_padded(M)
    dummy = weight  # a pointer for the unused arguments (never read: their branch is compiled out)
    pdl = use_pdl(x.device)
    if persist:
        n_tiles = triton.cdiv(N, block_n)
        _gemv_persistent_kernel[(persistent_grid(N, block_n, persist, x.device),)](
            x, weight,
            dummy if norm_weight is None else norm_weight,
            dummy if gate is None else gate,
            dummy if residual is None else residual,
            dummy if out is None else out,
            N, K, x.stride(0), 0 if gate is None else gate.stride(0), n_tiles,
            float(norm_eps), float(keep), float(scale),
            M=M, ROWS=rows, PROLOGUE=_PROLOGUE_ID[prologue], ZERO_CENTERED=bool(norm_zero_centered),
            HAS_RES=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k, K_STEPS=k_steps,
            L2_AHEAD=l2_ahead, INTERP=_INTERPRET, PDL=pdl, num_warps=num_warps, num_stages=num_stages,
            **launch_options(pdl),
        )
        return
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight,
        dummy if norm_weight is None else norm_weight,
        dummy if gate is None else gate,
        dummy if residual is None else residual,
        dummy if out is None else out,
        x if x_hat_out is None else x_hat_out,
        N, K, x.stride(0), 0 if gate is None else gate.stride(0),
        float(norm_eps), float(keep), float(scale),
        M=M, ROWS=rows, PROLOGUE=_PROLOGUE_ID[prologue], ZERO_CENTERED=bool(norm_zero_centered),
        HAS_RES=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k, DOT=bool(dot),
        PREC="ieee" if x.dtype == torch.float32 else "tf32", INTERP=_INTERPRET, PDL=pdl,
        WRITE_XH=x_hat_out is not None, SWIGLU=swiglu, num_warps=num_warps, num_stages=num_stages,
        **launch_options(pdl),
    )


def _dtype_of(name: str) -> torch.dtype:
    return {v: k for k, v in _DTYPE_NAME.items()}[name]


@torch.library.custom_op("attnlab::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, prologue: str, norm_weight: torch.Tensor | None,
             norm_eps: float, norm_zero_centered: bool, gate: torch.Tensor | None, scale: float,
             out_dtype: str, block_n: int, block_k: int, num_warps: int, num_stages: int,
             dot: bool, persist: int = 0, l2_ahead: int = 0, epilogue: str = "") -> torch.Tensor:
    dt = _dtype_of(out_dtype)
    shape = (x.shape[0], _out_columns(weight, epilogue))
    if POISON_OUTPUTS:
        out = torch.full(shape, float("nan"), dtype=dt, device=x.device)
    else:
        out = torch.empty(shape, dtype=dt, device=x.device)
    _launch(x, weight, prologue or None, norm_weight, norm_eps, norm_zero_centered, gate, None, 1.0, scale,
            out, (block_n, block_k, num_warps, num_stages, dot, persist, l2_ahead), epilogue=epilogue or None)
    return out


@_gemv_op.register_fake
def _(x, weight, prologue, norm_weight, norm_eps, norm_zero_centered, gate, scale, out_dtype,
      block_n, block_k, num_warps, num_stages, dot, persist=0, l2_ahead=0, epilogue=""):
    return x.new_empty(x.shape[0], _out_columns(weight, epilogue), dtype=_dtype_of(out_dtype))


def _out_columns(weight: torch.Tensor, epilogue: str | None) -> int:
    """The output's width: N, or F = N / 2 with the silu_mul epilogue (weight [gate | up])."""
    return weight.shape[0] // 2 if epilogue == "silu_mul" else weight.shape[0]


@torch.library.custom_op("attnlab::gemv_residual_", mutates_args=("residual",))
def _gemv_residual_op(x: torch.Tensor, weight: torch.Tensor, prologue: str, norm_weight: torch.Tensor | None,
                      norm_eps: float, norm_zero_centered: bool, gate: torch.Tensor | None,
                      residual: torch.Tensor, keep: float, scale: float, block_n: int, block_k: int,
                      num_warps: int, num_stages: int, dot: bool, persist: int = 0,
                      l2_ahead: int = 0) -> None:
    _launch(x, weight, prologue or None, norm_weight, norm_eps, norm_zero_centered, gate, residual, keep,
            scale, None, (block_n, block_k, num_warps, num_stages, dot, persist, l2_ahead))


@_gemv_residual_op.register_fake
def _(x, weight, prologue, norm_weight, norm_eps, norm_zero_centered, gate, residual, keep, scale,
      block_n, block_k, num_warps, num_stages, dot, persist=0, l2_ahead=0):
    return None


# The form that also writes x̂ is its own op with no optional mutated argument and no return value:
# torch 2.11 (the H100 image) drops a trailing None argument before indexing a mutated one, and its
# inductor could not lower attnlab::gemv once that op both mutated an argument and returned a tensor.
@torch.library.custom_op("attnlab::gemv_x_hat_", mutates_args=("x_hat_out", "dst"))
def _gemv_x_hat_op(x: torch.Tensor, weight: torch.Tensor, prologue: str, norm_weight: torch.Tensor | None,
                   norm_eps: float, norm_zero_centered: bool, gate: torch.Tensor | None,
                   x_hat_out: torch.Tensor, dst: torch.Tensor, is_residual: bool, keep: float, scale: float,
                   block_n: int, block_k: int, num_warps: int, num_stages: int, dot: bool,
                   epilogue: str = "") -> None:
    """dst <- dst * keep + scale * x̂ @ Wᵀ (is_residual) or scale * x̂ @ Wᵀ (through the epilogue);
    x̂ into x_hat_out."""
    _launch(x, weight, prologue or None, norm_weight, norm_eps, norm_zero_centered, gate,
            dst if is_residual else None, keep, scale, None if is_residual else dst,
            (block_n, block_k, num_warps, num_stages, dot, 0, 0), x_hat_out, epilogue or None)


@_gemv_x_hat_op.register_fake
def _(x, weight, prologue, norm_weight, norm_eps, norm_zero_centered, gate, x_hat_out, dst, is_residual, keep,
      scale, block_n, block_k, num_warps, num_stages, dot, epilogue=""):
    return None


def _check(x, weight, prologue, norm_weight, gate, residual, keep, out_dtype, x_hat_out=None,
           epilogue=None) -> None:
    """Shared by gemv and gemv_reference: every argument's shape, dtype and device."""
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue: expected one of {PROLOGUES}, got {prologue!r}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue: expected one of {EPILOGUES}, got {epilogue!r}")
    check_tensor("weight", weight, 2, "[N, K]", dtypes=_IO_DTYPES)
    N, K = weight.shape
    if epilogue == "silu_mul":
        if N % 2:
            raise ValueError(f"weight: epilogue='silu_mul' needs [gate | up] rows (an even N), got N={N}")
        if residual is not None:
            raise ValueError("residual: epilogue='silu_mul' writes a new output [M, N / 2], not into a "
                             "residual")
    k_in = 2 * K if prologue == "silu_mul" else K
    layout = "[M, 2K] = [gate | up]" if prologue == "silu_mul" else "[M, K]"
    check_tensor("x", x, 2, layout, shape=(None, k_in), dtypes=(weight.dtype,))
    if x.stride(-1) != 1:
        raise ValueError(f"x: the last dim must be contiguous (stride 1), got strides {x.stride()}")
    if not weight.is_contiguous():
        raise ValueError(f"weight: expected a contiguous [N, K] tensor, got strides {weight.stride()}")
    M = x.shape[0]
    if prologue in _NORM_PROLOGUES:
        if norm_weight is None:
            raise ValueError(f"norm_weight: prologue={prologue!r} needs the norm's weight [K]")
        check_tensor("norm_weight", norm_weight, 1, "[K]", shape=(K,))
        if not norm_weight.is_contiguous():
            raise ValueError("norm_weight: expected a contiguous [K] tensor")
    elif norm_weight is not None:
        raise ValueError(f"norm_weight: only used with prologue in {_NORM_PROLOGUES}, "
                         f"got prologue={prologue!r}")
    if prologue in _GATE_PROLOGUES:
        if gate is None:
            raise ValueError(f"gate: prologue={prologue!r} needs gate [M, K]")
        check_tensor("gate", gate, 2, "[M, K]", shape=(M, K), dtypes=(x.dtype,))
        if gate.stride(-1) != 1:
            raise ValueError(f"gate: the last dim must be contiguous (stride 1), got strides {gate.stride()}")
    elif gate is not None:
        raise ValueError(f"gate: only used with prologue in {_GATE_PROLOGUES}, got prologue={prologue!r}")
    if x_hat_out is not None:
        if prologue not in _NORM_PROLOGUES:
            raise ValueError(f"x_hat_out: only written with prologue in {_NORM_PROLOGUES}, "
                             f"got prologue={prologue!r}")
        check_tensor("x_hat_out", x_hat_out, 2, "[M, K]", shape=(M, K), dtypes=(x.dtype,))
        if not x_hat_out.is_contiguous():
            raise ValueError("x_hat_out: expected a contiguous [M, K] tensor")
        for name, t in (("x", x), ("gate", gate), ("residual", residual)):
            if t is None or torch.compiler.is_compiling():  # (dynamo cannot trace storage pointers)
                continue
            if t.untyped_storage().data_ptr() == x_hat_out.untyped_storage().data_ptr():
                raise ValueError(f"x_hat_out: must not share memory with {name} (the kernel reads {name} "
                                 "while one program writes x_hat_out)")
    if residual is not None:
        check_tensor("residual", residual, 2, "[M, N]", shape=(M, N), dtypes=(x.dtype,))
        if not residual.is_contiguous():
            raise ValueError("residual: expected a contiguous [M, N] tensor (it is updated in place)")
        if out_dtype is not None and out_dtype != x.dtype:
            raise ValueError(f"out_dtype: with residual the output is the residual ({x.dtype}), "
                             f"got {out_dtype}")
    elif keep != 1.0:
        raise ValueError(f"keep: only applies with residual, got keep={keep}")
    if out_dtype is not None and out_dtype not in _IO_DTYPES:
        raise ValueError(f"out_dtype: expected one of bfloat16, float16, float32, got {out_dtype}")
    check_same_device(x=x, weight=weight, norm_weight=norm_weight, gate=gate, residual=residual,
                      x_hat_out=x_hat_out)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    prologue: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    norm_zero_centered: bool = False,
    gate: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    keep: float = 1.0,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
    x_hat_out: torch.Tensor | None = None,
    epilogue: str | None = None,
) -> torch.Tensor:
    """``epilogue(prologue(x) @ weight.T)`` in one Triton kernel, for M <= MAX_ROWS rows.

    Args:
        x: [M, K_in] bf16 / fp16 / fp32, last dim contiguous (any row stride); K_in = K, or 2K for
            ``"silu_mul"``. M <= MAX_ROWS.
        weight: [N, K] contiguous, x's dtype.
        prologue: what multiplies the weight, x̂ (rounded to x's dtype, computed in float32):
            None: x. ``"rmsnorm"``: ``RMSNorm(x)`` with weight ``norm_weight`` [K] (any float dtype),
            ``norm_eps``, ``norm_zero_centered`` (``h + h * w``), as
            :class:`attnlab.layers.common.RMSNorm`. ``"silu_mul"``: x = [gate | up],
            x̂ = silu(gate) * up. ``"sigmoid_gate"``: x̂ = x * sigmoid(gate), gate [M, K] (x's dtype,
            last dim contiguous). ``"rmsnorm_sigmoid_gate"``: x̂ = RMSNorm(x) * sigmoid(gate), the
            norm's output and the sigmoid each rounded to x's dtype (Lightning's output norm and gate).
        residual: [M, N] contiguous, x's dtype: updated IN PLACE to
            ``residual * keep + scale * (x̂ @ weight.T)`` (rounded once) and returned.
        keep, scale: see residual; without a residual the output is ``scale * (x̂ @ weight.T)``.
        out_dtype: dtype of the new output when no residual is given (default x's dtype).
        x_hat_out: [M, K] contiguous, x's dtype, sharing no memory with x, gate or residual; with a
            norm prologue, x̂ is also written here (a postnorm block's normed residual stream, which
            the GEMV computes anyway).
        epilogue: None, or ``"silu_mul"``: weight is SwiGLU's [gate | up] ([2F, K]) and the output
            is ``silu(g) * u`` [M, F] with g, u = scale * (x̂ @ weight.T) halves, each rounded to the
            output dtype first: what the down projection's ``"silu_mul"`` prologue would compute from
            this GEMV's plain output, without writing or re-reading [gate | up]. No residual.

    Returns:
        [M, N] ([M, N / 2] with the silu_mul epilogue): ``residual``, or a new tensor of ``out_dtype``.
        Float32 accumulation. CUDA tensors (CPU tensors only under TRITON_INTERPRET=1; else call
        :func:`gemv_reference`). No autograd.
    """
    _check(x, weight, prologue, norm_weight, gate, residual, keep, out_dtype, x_hat_out, epilogue)
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"x: gemv runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got device {x.device}; "
            "use gemv_reference"
        )
    M = x.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"x: gemv takes at most MAX_ROWS={MAX_ROWS} rows, got {M}; use gemv_reference")
    config = launch_config(M, weight.shape[0], weight.shape[1], x.device)
    name, epi = prologue or "", epilogue or ""
    # x̂ and the epilogue are written by the tiled elementwise form only: else its default for the shape
    if (x_hat_out is not None and config[5]) or (epilogue and (config[4] or config[5] or config[0] % 2)):
        config = _default_config(M, weight.shape[0], weight.shape[1], x.device)
    if x_hat_out is not None:
        dst = residual
        if dst is None:
            shape = (M, _out_columns(weight, epilogue))
            dst = output_buffer(shape, out_dtype or x.dtype, x.device, POISON_OUTPUTS)
        _gemv_x_hat_op(x, weight, name, norm_weight, float(norm_eps), bool(norm_zero_centered), gate,
                       x_hat_out, dst, residual is not None, float(keep), float(scale), *config[:5], epi)
        return dst
    if residual is not None:
        _gemv_residual_op(x, weight, name, norm_weight, float(norm_eps), bool(norm_zero_centered), gate,
                          residual, float(keep), float(scale), *config)
        return residual
    dt = _DTYPE_NAME[out_dtype or x.dtype]
    return _gemv_op(x, weight, name, norm_weight, float(norm_eps), bool(norm_zero_centered), gate,
                    float(scale), dt, *config, epi)


def gemv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    prologue: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    norm_zero_centered: bool = False,
    gate: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    keep: float = 1.0,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
    x_hat_out: torch.Tensor | None = None,
    epilogue: str | None = None,
) -> torch.Tensor:
    """:func:`gemv` in torch ops (any device, any M): the CPU fallback and the tests' oracle.
    The product is float32 (16-bit weights are upcast: a float32 copy of the weight per call)."""
    _check(x, weight, prologue, norm_weight, gate, residual, keep, out_dtype, x_hat_out, epilogue)
    K = weight.shape[1]
    xf = x.float()
    if prologue in _NORM_PROLOGUES:  # RMSNorm.forward's float32 math
        if norm_zero_centered:
            h = F.rms_norm(xf, (K,), None, norm_eps)  # (M, K)
            xf = torch.addcmul(h, h, norm_weight.float())
        else:
            xf = F.rms_norm(xf, (K,), norm_weight.float(), norm_eps)
        if prologue == "rmsnorm_sigmoid_gate":  # the norm's output and the sigmoid rounded, as the layer
            xf = xf.to(x.dtype).float() * torch.sigmoid(gate.float()).to(x.dtype).float()
    elif prologue == "silu_mul":
        xf = F.silu(xf[:, :K]) * xf[:, K:]  # (M, K)
    elif prologue == "sigmoid_gate":
        xf = xf * torch.sigmoid(gate.float())
    x_hat = xf.to(x.dtype).float()  # rounded where the unfused layer rounds its output
    if x_hat_out is not None:
        x_hat_out.copy_(x_hat)
    acc = x_hat @ weight.float().t()  # (M, N) float32
    if epilogue == "silu_mul":  # SwiGLU on [gate | up], each half rounded as a plain output first
        dt = out_dtype or x.dtype
        g, u = (acc * scale).to(dt).float().chunk(2, dim=1)  # (M, N / 2) each
        return (F.silu(g) * u).to(dt)
    if residual is None:
        return (acc * scale if scale != 1.0 else acc).to(out_dtype or x.dtype)
    residual.copy_(torch.add(residual.float() * keep, acc, alpha=scale))
    return residual


__all__ = ["EPILOGUES", "MAX_ROWS", "TUNING", "gemv", "gemv_reference", "launch_config"]
