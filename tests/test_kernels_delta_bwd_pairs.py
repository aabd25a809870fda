"""The backward's pair-product kernel (attnlab.kernels.delta_bwd_pairs.bwd_pairs) against float64 autograd.

Reference: per chunk, autograd of ⟨A(q, k, G, β), dA⟩ + ⟨Aq(q, k, G), dAq⟩ (A = strict_tril(β_i Σ_d
k_id k_jd e^{G_id − G_jd}), Aq = scale · tril(Σ_d q_id k_jd e^{G_id − G_jd})) in float64, added to random
partials, then dG's reverse cumsum over the chunk. On the CPU the kernel runs under TRITON_INTERPRET=1
(``test_interpreter_suite``); the ``gpu`` test at real sizes; the sm_90 build is checked without a GPU.
Error metric: rms(ref − out) / rms(ref).
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
    needs_triton,
    rel_err,
    run_interpreter_suite,
    sm90_usage,
)

C = 64  # chunk rows (linear.CHUNK)
# log-gate per token: KDA takes one level / down to 8-row segments / the elementwise pairs
GENTLE, MEDIUM, STEEP = (-1.0, 0.0), (-5.5, -5.0), (-45.0, -40.0)


def sequences(b, t, cu_seqlens):
    """(batch row, first token, length) of every sequence."""
    if cu_seqlens is None:
        return [(i, 0, t) for i in range(b)]
    cu = cu_seqlens.tolist()
    return [(0, cu[i], cu[i + 1] - cu[i]) for i in range(len(cu) - 1)]


def chunks(b, t, cu_seqlens):
    """(batch row, first token, rows) of every chunk."""
    return [(i, s + c0, min(C, n - c0)) for i, s, n in sequences(b, t, cu_seqlens) for c0 in range(0, n, C)]


def make_case(gate, b, t, h, hk, d_k, dtype=torch.float32, g_range=GENTLE, cu_seqlens=None, seed=0,
              g_scale=None):
    """Kernel inputs: q, k [B,T,HK,K] and beta [B,T,H] in dtype; gcum float32 (the within-chunk cumsum of
    a log-gate uniform in g_range, times g_scale [K] per channel if given); dAq, dA float32 [B,T,H,64]
    (random everywhere, NaN above the diagonal: the kernel must not read it); float32 partials."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    q = r(b, t, hk, d_k).to(dtype)
    k = torch.nn.functional.normalize(r(b, t, hk, d_k), dim=-1).to(dtype)
    beta = torch.rand(b, t, h, generator=gen).to(dtype)
    g_shape = (b, t, h) if gate == 1 else (b, t, h, d_k)
    lo, hi = g_range
    g = lo + (hi - lo) * torch.rand(*g_shape, generator=gen, dtype=torch.float64)
    if g_scale is not None:
        g = g * g_scale
    gcum = torch.zeros_like(g)
    for i, t0, n in chunks(b, t, cu_seqlens):
        gcum[i, t0:t0 + n] = g[i, t0:t0 + n].cumsum(0)
    above = torch.ones(C, C, dtype=torch.bool).triu(1)  # column j > row i of the chunk
    dAq, dA = r(b, t, h, C), r(b, t, h, C)
    for i, t0, n in chunks(b, t, cu_seqlens):
        dAq[i, t0:t0 + n].masked_fill_(above[:n, None, :], float("nan"))
        dA[i, t0:t0 + n].masked_fill_(above[:n, None, :], float("nan"))
    # the partials are zero on the last batch row (everywhere when B = 1): there an output is the pair
    # terms alone, which steep gates make tiny, below the float32 rounding of output = partial + terms
    partial = dict(dq=r(b, t, h, d_k), dk=r(b, t, h, d_k), dG=r(*g_shape), dbeta=r(b, t, h))
    for v in partial.values():
        v[-1] = 0.0
    return dict(q=q, k=k, beta=beta, gcum=gcum.float(), dAq=dAq, dA=dA, **partial)


def reference(case, scale, gate, cu_seqlens=None):
    """float64 (dq, dk, dg, dbeta): the partials plus the pair terms' autograd gradients, dG's reverse
    cumsum per chunk."""
    x = {n: v.double() for n, v in case.items()}
    b, t, hk, _ = x["q"].shape
    h = x["beta"].shape[2]
    dq, dk, dbeta = x["dq"].clone(), x["dk"].clone(), x["dbeta"].clone()
    dg = torch.zeros_like(x["dG"])
    for i, t0, n in chunks(b, t, cu_seqlens):
        rows = slice(t0, t0 + n)
        qc = x["q"][i, rows].repeat_interleave(h // hk, 1).requires_grad_()  # (n, H, K) per value head
        kc = x["k"][i, rows].repeat_interleave(h // hk, 1).requires_grad_()  # (n, H, K)
        bc = x["beta"][i, rows].clone().requires_grad_()  # (n, H)
        Gc = x["gcum"][i, rows].clone().requires_grad_()  # (n, H) or (n, H, K)
        Gd = (Gc[..., None] if gate == 1 else Gc).expand(n, h, qc.shape[2])  # (n, H, K)
        tri = torch.ones(n, n, dtype=torch.bool).tril()
        # E strictly below the diagonal through G (masked before exp), 1 on it with no G in it: the
        # diagonal's dG terms cancel, and float64 rounding of that would swamp steep gates' tiny dG
        m4 = tri.tril(-1)[:, :, None, None]
        expo = Gd[:, None] - Gd[None, :]  # (n, n, H, K): row i, column j
        E = torch.where(m4, torch.exp(torch.where(m4, expo, 0.0)), 0.0)
        E = E + torch.eye(n, dtype=E.dtype)[:, :, None, None]
        M = torch.einsum("ihd,jhd,ijhd->hij", kc, kc, E)  # (H, n, n)
        Mq = torch.einsum("ihd,jhd,ijhd->hij", qc, kc, E)  # (H, n, n)
        A = bc.T[:, :, None] * M * tri.tril(-1)
        Aq = scale * Mq * tri
        loss = (A * x["dA"][i, rows, :, :n].nan_to_num().permute(1, 0, 2)).sum() \
            + (Aq * x["dAq"][i, rows, :, :n].nan_to_num().permute(1, 0, 2)).sum()
        gq, gk, gb, gG = torch.autograd.grad(loss, [qc, kc, bc, Gc])
        dq[i, rows] += gq
        dk[i, rows] += gk
        dbeta[i, rows] += gb
        dG = x["dG"][i, rows] + gG
        dg[i, rows] = dG.flip(0).cumsum(0).flip(0)
    return dq, dk, dg, dbeta


def run_kernel(case, scale, gate, cu_seqlens=None, device="cpu"):
    from attnlab.kernels.delta_bwd_pairs import bwd_pairs

    x = {n: v.to(device).clone() for n, v in case.items()}
    cu = None if cu_seqlens is None else cu_seqlens.to(device)
    return bwd_pairs(x["q"], x["k"], x["beta"], x["gcum"], x["dAq"], x["dA"], x["dq"], x["dk"], x["dG"],
                     x["dbeta"], scale, cu, gate)


def check(case, scale, gate, tol, cu_seqlens=None, device="cpu", rows=None, dg_tol=None):
    """Each output vs the reference, on the whole tensor and on the pair terms alone (output − partial:
    on the batch rows without partials: float32 rounding of partial + terms would swamp tiny terms).
    rows: the token rows compared; dg_tol: dg's bound (default tol)."""
    out = run_kernel(case, scale, gate, cu_seqlens, device)
    ref = reference(case, scale, gate, cu_seqlens)
    b, t = case["q"].shape[:2]
    rows = slice(None) if rows is None else rows
    bare = [i for i in range(b) if not case["dq"][i, rows].any()]
    assert bare, "no batch row without partials"
    for name, o, r in zip(("dq", "dk", "dg", "dbeta"), out, ref, strict=True):
        o, r = o[:, rows].cpu().double(), r[:, rows]
        err, err_pairs = rel_err(o, r), rel_err(o[bare], r[bare])
        limit = dg_tol if name == "dg" and dg_tol is not None else tol
        assert err < limit and err_pairs < limit, (name, err, err_pairs)
    return out


# ---------------------------------------------------------------------------------------------
# CPU: the interpreter


@pytest.fixture(autouse=True)
def _interpreter_bf16_dot():
    """Triton 3.9's interpreter multiplies bf16 dot operands as their raw uint16 bits (create_dot: a
    plain np.matmul of the storage); widen them to float32 first (exact), as the tensor cores do."""
    if not INTERPRETED:
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    orig = builder.create_dot

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    builder.create_dot = lambda self, a, b, d, *rest: orig(self, widen(a), widen(b), d, *rest)
    yield
    builder.create_dot = orig


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETED, reason="already inside the interpreter run")
def test_interpreter_suite():
    run_interpreter_suite(__file__)


@interp
@pytest.mark.parametrize("gate", [1, 2])
@pytest.mark.parametrize("g_range", [GENTLE, MEDIUM, STEEP], ids=["gentle", "medium", "steep"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_interp_pairs_match_autograd(gate, g_range, dtype):
    """GQA (2 value heads on 1 key head), odd K = 40, T = 130 (a 2-row last chunk), B = 2; gentle gates
    take one level, medium ones (−5 per token) 8-row segments, steep ones (−40) the elementwise pairs,
    all exact and finite (the partial chunk's padded rows included)."""
    case = make_case(gate, 2, 130, 2, 1, 40, dtype, g_range)
    if dtype == torch.float32:
        check(case, 0.3, gate, 1e-5)
    else:  # dg's reverse cumsum adds terms that cancel (each pair's ±); bf16 operands: 1.4-1.8e-2 seen
        check(case, 0.3, gate, 1.5e-2, dg_tol=3e-2)


@interp
@pytest.mark.parametrize("gate", [1, 2])
@pytest.mark.parametrize("t", [1, 64])
def test_interp_one_row_and_full_chunk(gate, t):
    check(make_case(gate, 1, t, 1, 1, 16, g_range=MEDIUM, seed=3), 0.5, gate, 1e-5)


@interp
def test_interp_kda_fp16_medium_gate():
    """fp16's SPAN is 16 (linear._span): medium gates split down to the elementwise pairs there."""
    check(make_case(2, 1, 70, 2, 2, 24, torch.float16, MEDIUM, seed=5), 0.25, 2, 1e-2, dg_tol=3e-2)


@interp
def test_interp_kda_channel_blocks_take_their_own_path():
    """K = 80: two channel blocks of 64; the first mixes gentle and steep channels in one block (it takes
    the steep path), the second is all gentle (one level) — each block decides for itself."""
    scale_d = torch.ones(80, dtype=torch.float64)
    scale_d[:64] = torch.logspace(-4, 1.6, 64, dtype=torch.float64)  # per-token falls 1e-4 ... 40
    case = make_case(2, 1, 100, 2, 1, 80, g_range=GENTLE, g_scale=scale_d, seed=7)
    check(case, 0.3, 2, 1e-5)


@interp
@pytest.mark.parametrize("gate", [1, 2])
def test_interp_varlen_packed_sequences(gate):
    """Packed: sequences of 5, 0, 65, 130 and 1 rows, then 3 rows past cu_seqlens[-1] that hold NaN in every
    input and partial: they are neither read (the rest stays finite and exact) nor written (stay NaN)."""
    cu = torch.tensor([0, 5, 5, 70, 200, 201], dtype=torch.int32)
    t = 204
    case = make_case(gate, 1, t, 2, 1, 24, g_range=MEDIUM, cu_seqlens=cu, seed=11)
    for v in case.values():
        v[:, 201:] = float("nan")
    out = check(case, 0.4, gate, 1e-5, cu_seqlens=cu, rows=slice(0, 201))
    for o in out:
        assert bool(o[:, 201:].isnan().all())


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="no kernel launch; runs once, outside the interpreter run")
def test_bad_inputs_raise_value_error_naming_the_argument():
    from attnlab.kernels.delta_bwd_pairs import bwd_pairs

    x = make_case(2, 1, 8, 2, 1, 16)
    args = lambda **o: [o.get(n, x[n]) for n in ("q", "k", "beta", "gcum", "dAq", "dA", "dq", "dk", "dG",
                                                   "dbeta")]
    with pytest.raises(ValueError, match="gcum"):
        bwd_pairs(*args(gcum=x["gcum"][..., 0]), 1.0, None, 2)  # GDN-shaped gate for KDA
    with pytest.raises(ValueError, match="dA"):
        bwd_pairs(*args(dA=x["dA"][..., :32].contiguous()), 1.0, None, 2)
    with pytest.raises(ValueError, match="dq"):
        bwd_pairs(*args(dq=x["dq"].half()), 1.0, None, 2)
    with pytest.raises(ValueError, match="gate"):
        bwd_pairs(*args(), 1.0, None, 0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        bwd_pairs(*args(), 1.0, torch.tensor([0, 8], dtype=torch.int64), 2)


# ---------------------------------------------------------------------------------------------
# sm_90 build (no GPU needed) and the GPU


@needs_sm90_toolchain
@pytest.mark.parametrize("gate", [1, 2])
def test_pairs_compiles_for_sm90(gate):
    """_bwd_pairs_kernel as an H100 runs it (H = HK = 16, K = 128, bf16, TUNING's launch, pointers and
    T 16-divisible as triton specialises them): no stack (no spills), at most 255 registers, and the
    64-row products on Hopper's tensor cores (wgmma)."""
    import triton.language as tl

    from attnlab.kernels import delta_bwd_pairs as pairs
    from attnlab.kernels.linear import _span

    cfg = pairs.TUNING["vector" if gate == 2 else "scalar"]
    fn = pairs._bwd_pairs_kernel
    const = dict(H=16, HK=16, K=128, BT=C, BK=cfg["BK"], GATE_VEC=gate == 2, IS_VARLEN=False, DT=tl.bfloat16,
                 PREC="tf32", SPAN=_span(torch.bfloat16), MIN_SEG=pairs.MIN_SEG)
    # oq, ok: dq, dk written in the inputs' dtype, as linear_bwd launches it without shared key heads
    ptr = dict(q="*bf16", k="*bf16", beta="*bf16", gcum="*fp32", daq="*fp32", da="*fp32", dq="*fp32",
               dk="*fp32", dG="*fp32", dbeta="*fp32", oq="*bf16", ok="*bf16", cu_seqlens="*i32",
               chunk_indices="*i32")
    div = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in ptr or a == "T"}
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg") is not None:
        opts["maxnreg"] = cfg["maxnreg"]
    kernel = compile_sm90(fn, const, ptr, floats=("scale",), attrs=div, **opts)
    regs, stack, usage = sm90_usage(kernel)
    assert stack == 0, usage
    assert regs <= (cfg.get("maxnreg") or 255), usage
    assert "wgmma" in kernel.asm["ptx"]


@needs_sm90_toolchain
@pytest.mark.parametrize("gate", [1, 2])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_pairs_other_forms_compile_for_sm90(gate, dtype):
    """The forms the interpreter tests but the GPU test does not run build for sm_90 too: packed
    sequences (IS_VARLEN), float32 (FMA products, "ieee") and float16 inputs, odd K = 40."""
    import triton.language as tl

    from attnlab.kernels import delta_bwd_pairs as pairs
    from attnlab.kernels.linear import _span

    cfg = pairs.TUNING["vector" if gate == 2 else "scalar"]
    fn = pairs._bwd_pairs_kernel
    torch_dt = torch.float32 if dtype == "fp32" else torch.float16
    const = dict(H=4, HK=2, K=40, BT=C, BK=cfg["BK"], GATE_VEC=gate == 2, IS_VARLEN=True,
                 DT=tl.float32 if dtype == "fp32" else tl.float16, PREC="ieee" if dtype == "fp32" else "tf32",
                 SPAN=_span(torch_dt), MIN_SEG=pairs.MIN_SEG)
    ptr = dict(q=f"*{dtype}", k=f"*{dtype}", beta=f"*{dtype}", gcum="*fp32", daq="*fp32", da="*fp32",
               oq="*fp32", ok="*fp32",
               dq="*fp32", dk="*fp32", dG="*fp32", dbeta="*fp32", cu_seqlens="*i32", chunk_indices="*i32")
    kernel = compile_sm90(fn, const, ptr, floats=("scale",), num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"])
    assert kernel.asm["cubin"]


@pytest.mark.gpu
@pytest.mark.parametrize("gate", [1, 2])
@pytest.mark.parametrize("g_range", [GENTLE, STEEP], ids=["gentle", "steep"])
def test_gpu_pairs_bf16_real_size(gate, g_range):
    """K = 128, bf16, T = 1000, H = 4 (GQA on 2 key heads) on the GPU, dense and packed."""
    case = make_case(gate, 2, 1000, 4, 2, 128, torch.bfloat16, g_range, seed=13)
    check(case, 128 ** -0.5, gate, 1.5e-2, device="cuda", dg_tol=3e-2)
    cu = torch.tensor([0, 300, 301, 1000], dtype=torch.int32)
    check(make_case(gate, 1, 1000, 4, 2, 128, torch.bfloat16, g_range, cu_seqlens=cu, seed=14), 128 ** -0.5,
          gate, 1.5e-2, cu_seqlens=cu, device="cuda", dg_tol=3e-2)
