"""attnlab.kernels.delta_bwd_local (per-chunk gradients of the gated delta rule, all but the gated pair
products) against float64 autograd of each chunk's loss.

Reference: for every chunk and value head, L = ⟨o, dO⟩ + ⟨S_next, dS'⟩ with o = (scale Q ⊙ Γ) S + Aq v',
S_next = Diag(γ) S + Kdᵀ v', v' = u − w S, w, u = (I + A)⁻¹ (β K ⊙ Γ, β V), where A and Aq are detached
leaves (their own gradients are outputs; the pair products behind them are kernel 2's), S is fixed
and G (the within-chunk cumulative log-gate) is a leaf. The kernel gets the forward quantities
(X, w, u, v') and dv' = dL/dv' from the same float64 computation. Runs under TRITON_INTERPRET=1 on
the CPU (test_interpreter_suite) and, marked gpu, at real sizes.
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
    rel_err,
    run_interpreter_suite,
    sm90_usage,
)

C = 64  # chunk rows (attnlab.kernels.linear.CHUNK)


def chunk_reference(q, k, v, beta, G, S, dO, dS, scale):
    """float64 autograd of one chunk's loss, batched over value heads. q, k [H, n, K] (already per
    value head); v, dO [H, n, V]; beta [H, n]; G [H, n] (GDN) or [H, n, K] (KDA); S, dS [H, K, V].
    Returns the forward quantities the kernel reads and the gradients it must produce."""
    q, k, v, beta, G = (x.detach().double().clone().requires_grad_() for x in (q, k, v, beta, G))
    n = q.shape[1]
    Gk = G[..., None] if G.dim() == 2 else G  # (H, n, 1 | K)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        diff = (Gk[:, :, None] - Gk[:, None]).masked_fill(~causal[..., None], float("-inf"))  # (H, n, n, 1|K)
        E = diff.exp()
        M = (k[:, :, None] * k[:, None] * E).sum(-1)  # (H, n, n): Σ_d k_id k_jd e^{G_id − G_jd}
        Mq = (q[:, :, None] * k[:, None] * E).sum(-1)  # (H, n, n)
    A = (beta[..., None] * M).detach().tril(-1).requires_grad_()
    Aq = (scale * Mq).tril().detach().requires_grad_()
    X = torch.linalg.inv(torch.eye(n, dtype=torch.float64) + A)  # (H, n, n)
    gam = Gk.exp()
    GL = Gk[:, -1:]  # (H, 1, 1 | K)
    w = X @ (beta[..., None] * k * gam)  # (H, n, K)
    u = X @ (beta[..., None] * v)  # (H, n, V)
    vn = u - w @ S
    vn.retain_grad()
    o = (scale * q * gam) @ S + Aq @ vn
    s_next = GL.exp().transpose(1, 2) * S + (k * (GL - Gk).exp()).transpose(1, 2) @ vn  # (H, K, V)
    ((o * dO).sum() + (s_next * dS).sum()).backward()
    return dict(X=X.detach(), w=w.detach(), u=u.detach(), vn=vn.detach(), dvn=vn.grad, dq=q.grad, dk=k.grad,
                dv=v.grad, dbeta=beta.grad, dG=G.grad, dA=A.grad.tril(-1), dAq=Aq.grad.tril())


def chunks_of(b, t, lens):
    """(batch row, first token, rows) of every chunk in the kernel's global chunk order."""
    if lens is None:
        nc = -(-t // C)
        return [(i, j * C, min(C, t - j * C)) for i in range(b) for j in range(nc)]
    out, bos = [], 0
    for n in lens:
        out += [(0, bos + j * C, min(C, n - j * C)) for j in range(-(-n // C))]
        bos += n
    return out


def make_case(gate, b, t, h, hk, d_k, d_v, lens=None, dtype=torch.float32, gate_scale=1.0, seed=0):
    """Random inputs of bwd_local for a dense batch (lens None) or sequences of lengths `lens` packed
    into B = 1, and the expected outputs [B, T, H, ·] (float64)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    rnd = lambda x: x.to(dtype).double()  # what the kernel will read
    if lens is not None:
        b, t = 1, sum(lens)
    q, v = rnd(r(b, t, hk, d_k)), rnd(r(b, t, h, d_v))
    k = rnd(torch.nn.functional.normalize(r(b, t, hk, d_k), dim=-1))
    beta = rnd(torch.rand(b, t, h, generator=gen, dtype=torch.float64))
    g_shape = (b, t, h) if gate == 1 else (b, t, h, d_k)
    g = -torch.rand(*g_shape, generator=gen, dtype=torch.float64) * gate_scale
    dO = rnd(r(b, t, h, d_v))
    chunks = chunks_of(b, t, lens)
    S = rnd(r(len(chunks), h, d_k, d_v))
    dS = r(len(chunks), h, d_k, d_v).float().double()
    scale = d_k**-0.5
    rep = h // hk
    gcum = torch.zeros_like(g)
    xa = torch.zeros(b, t, h, C, dtype=torch.float64)
    fwd = {n: torch.zeros(b, t, h, d) for n, d in (("w", d_k), ("u", d_v), ("vn", d_v), ("dvn", d_v))}
    fwd = {n: x.double() for n, x in fwd.items()}
    exp = {n: torch.zeros(b, t, h, d, dtype=torch.float64) for n, d in
           (("dq", d_k), ("dk", d_k), ("dv", d_v), ("dAq", C), ("dA", C))}
    exp["dbeta"] = torch.zeros(b, t, h, dtype=torch.float64)
    exp["dG"] = torch.zeros_like(g)
    for c, (i_b, r0, n) in enumerate(chunks):
        rows = slice(r0, r0 + n)
        gcum[i_b, rows] = g[i_b, rows].cumsum(0).float().double()  # as the kernel reads it
        hf = [x[i_b, rows].transpose(0, 1) for x in (q, k, v, beta, gcum, dO)]  # (H(K), n, ...)
        qc, kc = (x.repeat_interleave(rep, 0) for x in hf[:2])  # key heads → value heads
        ref = chunk_reference(qc, kc, hf[2], hf[3], hf[4], S[c], hf[5], dS[c], scale)
        back = lambda x: x.transpose(0, 1)  # (n, H, ...)
        xa[i_b, rows, :, :n] = back(ref["X"])
        for name in fwd:
            fwd[name][i_b, rows] = back(ref[name])
        for name in ("dq", "dk", "dv", "dbeta", "dG"):
            exp[name][i_b, rows] = back(ref[name])
        exp["dAq"][i_b, rows, :, :n] = back(ref["dAq"])
        exp["dA"][i_b, rows, :, :n] = back(ref["dA"])
    args = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), beta=beta.to(dtype), gcum=gcum.float(),
                xa=xa.float(), w=fwd["w"].to(dtype), u=fwd["u"].to(dtype), vn=fwd["vn"].to(dtype),
                states=S.to(dtype), do=dO.to(dtype), dstates=dS.float(), dvn=fwd["dvn"].float(), scale=scale,
                cu_seqlens=None if lens is None else torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()],
                                                                  dtype=torch.int32),
                gate=gate)
    return args, exp


NAMES = ("dq", "dk", "dv", "dbeta", "dG", "dAq", "dA")


def run_and_compare(args, exp, device="cpu"):
    from attnlab.kernels.delta_bwd_local import bwd_local

    moved = {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in args.items()}
    out = bwd_local(**moved)
    assert len(out) == len(NAMES)
    errs = {}
    for name, o in zip(NAMES, out, strict=True):
        assert o.dtype == torch.float32 and o.shape == exp[name].shape, (name, o.dtype, o.shape)
        errs[name] = rel_err(o, exp[name])
    return errs


# ------------------------------------------------------------------------------------------------
# CPU, under the Triton interpreter


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETED, reason="already inside the interpreter run")
def test_interpreter_suite():
    run_interpreter_suite(__file__)


@pytest.fixture
def blocks(request):
    """Small BK / BV so that D_k and D_v take several blocks (the last one partial)."""
    from attnlab.kernels import delta_bwd_local

    saved = {kind: dict(cfg) for kind, cfg in delta_bwd_local.TUNING.items()}
    for cfg in delta_bwd_local.TUNING.values():
        cfg.update(BK=16, BV=16)
    yield
    for kind, cfg in saved.items():
        delta_bwd_local.TUNING[kind] = cfg


@interp
@pytest.mark.parametrize("gate", [1, 2])
def test_interp_gqa_odd_dims_partial_chunk(gate, poisoned):
    """H = 4 value heads on 2 key heads, D_k = 40, D_v = 24 (padded tiles), T = 70 (a 6-row last chunk)."""
    args, exp = make_case(gate, 2, 70, 4, 2, 40, 24, seed=gate)
    errs = run_and_compare(args, exp)
    assert max(errs.values()) < 1e-5, errs


@interp
@pytest.mark.parametrize("gate", [1, 2])
def test_interp_several_k_and_v_blocks(gate, blocks, poisoned):
    """BK = BV = 16: D_k = 40 in three blocks, D_v = 24 in two (both last blocks partial)."""
    args, exp = make_case(gate, 1, 100, 2, 1, 40, 24, seed=10 + gate, gate_scale=3.0)
    errs = run_and_compare(args, exp)
    assert max(errs.values()) < 1e-5, errs


@interp
@pytest.mark.parametrize("gate", [1, 2])
def test_interp_packed_sequences(gate, poisoned):
    """Four sequences packed into one row (cu_seqlens): partial chunks, a 5-token sequence, one exactly
    a chunk long; each chunk must read its own state and rows."""
    from attnlab.kernels.delta_bwd_local import bwd_local
    from attnlab.kernels.linear import CHUNK, _chunk_tables

    args, exp = make_case(gate, 1, 0, 2, 2, 32, 16, lens=[70, 5, 64, 30], seed=20 + gate)
    errs = run_and_compare(args, exp)
    assert max(errs.values()) < 1e-5, errs
    # the caller's own chunk table gives the same result
    table, _ = _chunk_tables(args["cu_seqlens"], CHUNK)
    for a, b in zip(bwd_local(**args), bwd_local(**args, chunk_indices=table), strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def bf16_dots(monkeypatch):
    """The Triton 3.9 interpreter's tl.dot multiplies bf16 operands as their raw uint16 bit patterns
    (InterpreterBuilder.create_dot has no bf16 case: 1e10-sized results); widen them to fp32 first,
    exactly, as the tensor cores do. Changes the interpreter's emulation only, not the kernel."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def patched(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", patched)


@interp
@pytest.mark.parametrize("gate", [1, 2])
def test_interp_bf16_inputs(gate, bf16_dots, poisoned):
    args, exp = make_case(gate, 1, 80, 2, 2, 32, 32, dtype=torch.bfloat16, seed=30 + gate)
    errs = run_and_compare(args, exp)
    assert max(errs.values()) < 2e-2, errs


@interp
@pytest.mark.parametrize("gate", [1, 2])
def test_interp_steep_gates(gate, poisoned):
    """Log-gates down to −40 per token: e^G underflows to 0, e^{GL − G} ≤ 1, nothing overflows, and the
    last row's gate gradient (a sum of the other rows' terms) keeps its precision."""
    args, exp = make_case(gate, 1, 64, 2, 2, 16, 16, seed=40, gate_scale=40.0)
    errs = run_and_compare(args, exp)
    assert max(errs.values()) < 1e-5, errs


@interp
def test_interp_bad_input_raises_value_error():
    from attnlab.kernels.delta_bwd_local import bwd_local

    args, _ = make_case(1, 1, 10, 2, 2, 16, 16)
    with pytest.raises(ValueError, match="gcum"):
        bwd_local(**dict(args, gcum=args["gcum"][..., None].expand(1, 10, 2, 16).contiguous()))
    with pytest.raises(ValueError, match="gate"):
        bwd_local(**dict(args, gate=0))
    with pytest.raises(ValueError, match="states"):
        bwd_local(**dict(args, states=args["states"][..., :8].contiguous()))
    with pytest.raises(ValueError, match="xa"):
        bwd_local(**dict(args, xa=args["xa"].double()))
    with pytest.raises(ValueError, match="cu_seqlens|B = 1"):
        two, _ = make_case(1, 2, 10, 2, 2, 16, 16)
        bwd_local(**dict(two, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32)))


# ------------------------------------------------------------------------------------------------
# the H100 build, without a GPU


@needs_sm90_toolchain
@pytest.mark.parametrize("gate", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_bwd_local_compiles_for_sm90(gate, packed):
    """The kernel as an H100 runs it (H = 16, D_k = D_v = 128, bf16, the launch's TUNING, pointers
    16-divisible as triton specialises them, and T too for a dense batch; a packed batch's T is
    arbitrary): no stack (no spills), the registers of the configured warps fit an SM, and the 64-row
    products are wgmma."""
    import triton.language as tl

    from attnlab.kernels import delta_bwd_local as m

    cfg = m.TUNING["vector" if gate == 2 else "scalar"]
    fn = m._bwd_local_kernel
    const = dict(H=16, HK=16, K=128, V=128, BT=C, BK=cfg["BK"], BV=cfg["BV"], GATE_VEC=gate == 2,
                 IS_VARLEN=packed, DT=tl.bfloat16, PREC="tf32")
    # dstates, dvn and dv in the inputs' dtype, as linear_bwd launches it
    bf16 = ("q", "k", "v", "beta", "w", "u", "vn", "states", "do", "dstates", "dvn", "dv")
    ptr = {a: "*bf16" if a in bf16 else "*fp32" for a in fn.arg_names
           if a not in const and a not in ("scale", "T")}
    ptr.update(cu_seqlens="*i32", chunk_indices="*i32")
    div = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
           if a in ptr or (a == "T" and not packed)}
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg"):
        options["maxnreg"] = cfg["maxnreg"]
    kernel = compile_sm90(fn, const, ptr, floats=("scale",), attrs=div, **options)
    regs, stack, usage = sm90_usage(kernel)
    print(f"gate {gate} packed {packed}: {usage.strip()}")
    assert stack == 0, usage
    assert regs * 32 * cfg["num_warps"] <= 65536, usage
    assert "wgmma" in kernel.asm["ptx"]


# ------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("gate", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_sizes(gate, dtype, poisoned):
    args, exp = make_case(gate, 1, 1000, 4, 4, 128, 128, dtype=dtype, seed=50 + gate)
    errs = run_and_compare(args, exp, device="cuda")
    assert max(errs.values()) < (2e-2 if dtype == torch.bfloat16 else 1e-4), errs


@pytest.mark.gpu
@pytest.mark.parametrize("gate", [1, 2])
def test_gpu_packed_gqa(gate, poisoned):
    args, exp = make_case(gate, 1, 0, 4, 2, 100, 60, lens=[300, 1, 64, 129], dtype=torch.bfloat16,
                          seed=60 + gate)
    errs = run_and_compare(args, exp, device="cuda")
    assert max(errs.values()) < 2e-2, errs
