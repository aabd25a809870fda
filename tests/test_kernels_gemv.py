"""Fused GEMV (attnlab.kernels.gemv) against its torch oracle and the layers' own math.

Three ways to run (as tests/test_kernels_decode.py):
- CPU, no interpreter: the oracle ``gemv_reference`` against the modules it replaces (RMSNorm,
  SwiGLU, Residual from attnlab.layers.common) -- tested first, everything else leans on it --
  and the ValueErrors;
- CPU tensors under ``TRITON_INTERPRET=1`` at tiny sizes (the ``interp_`` tests, re-run in a
  subprocess by ``test_interpreter_suite``): every prologue x residual x output dtype, fp32 and bf16;
- a CUDA machine (``gpu``): the decode shapes of a d_model 2048 model in bf16.

New outputs are poisoned with NaN (``POISON_OUTPUTS``) so an unwritten element fails; the residual
runs use keep != 1 so an element left unwritten keeps a value that differs from the expected one.
Error metric: rms(ref - out) / rms(ref) (DESIGN.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _triton_tests import (
    INTERPRETED,
    compile_sm90,
    interp,
    needs_sm90_toolchain,
    needs_triton,
    poison_outputs,
    rel_err,
    run_interpreter_suite,
    sm90_usage,
)

from attnlab.layers.common import Residual, RMSNorm, SwiGLU

pytestmark = needs_triton  # attnlab.kernels.gemv imports triton

PROLOGUES = (None, "rmsnorm", "silu_mul", "sigmoid_gate", "rmsnorm_sigmoid_gate")


_poison = poison_outputs("gemv")

def make(m, n, k, prologue, dtype=torch.float32, device="cpu", seed=0, row_pad=0, zero_centered=False):
    """Inputs of one gemv call: (x, weight, kwargs). ``row_pad`` > 0 makes x (and gate) views with a
    row stride past their width. The norm weight is float32, centred on 0 or 1 as its norm's."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k_in = 2 * k if prologue == "silu_mul" else k
    x = torch.randn(m, k_in + row_pad, generator=gen).to(device=device, dtype=dtype)[:, :k_in]  # (M, K_in)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(device=device, dtype=dtype)  # (N, K)
    kwargs = {}
    if prologue in ("rmsnorm", "rmsnorm_sigmoid_gate"):
        w = 0.3 * torch.randn(k, generator=gen) + (0.0 if zero_centered else 1.0)
        kwargs.update(norm_weight=w.to(device), norm_zero_centered=zero_centered, norm_eps=1e-5)
    if prologue in ("sigmoid_gate", "rmsnorm_sigmoid_gate"):
        g = torch.randn(m, k + row_pad, generator=gen).to(device=device, dtype=dtype)[:, :k]  # (M, K)
        kwargs["gate"] = g
    return x, weight, kwargs


def module_math(x, weight, prologue, residual=None, keep=1.0, scale=1.0, norm_weight=None, norm_eps=1e-6,
                norm_zero_centered=False, gate=None, out_dtype=None):
    """What the unfused layers compute, with the modules of attnlab.layers.common where one exists:
    RMSNorm then the projection; SwiGLU's silu(gate) * up; o * sigmoid(g); Lightning's
    RMSNorm(o) * sigmoid(g) (its own ops); Residual.project (addmm_)."""
    K = weight.shape[1]
    if prologue in ("rmsnorm", "rmsnorm_sigmoid_gate"):
        norm = RMSNorm(K, eps=norm_eps, zero_centered=norm_zero_centered).to(x.device)
        with torch.no_grad():
            norm.weight.copy_(norm_weight)
        x = norm(x)
        if prologue == "rmsnorm_sigmoid_gate":
            x = x * torch.sigmoid(gate)  # LightningAttention.forward's output gate
    elif prologue == "silu_mul":
        x = F.silu(x[:, :K]) * x[:, K:]
    elif prologue == "sigmoid_gate":
        x = (x.float() * torch.sigmoid(gate.float())).to(x.dtype)
    if residual is not None:
        return Residual(residual, keep=keep, scale=scale).project(x, weight)
    y = F.linear(x.float(), weight.float()) if out_dtype == torch.float32 else F.linear(x, weight)
    return y * scale if scale != 1.0 else y


# ---------------------------------------------------------------------------------------------
# CPU: the oracle against the modules, the checks, the launch shapes


@needs_triton
def test_interpreter_suite():
    run_interpreter_suite(__file__)


@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_reference_matches_module_math(prologue, dtype, with_residual):
    """gemv_reference == the unfused modules: float32 to rounding, bf16 within the 16-bit rounding of
    the layers' own intermediate steps (SwiGLU rounds silu(gate) before the product, we do not)."""
    from attnlab.kernels.gemv import gemv_reference

    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for zero_centered in (False, True) if prologue == "rmsnorm" else (False,):
        x, w, kw = make(3, 33, 96, prologue, dtype, seed=7, row_pad=5, zero_centered=zero_centered)
        if with_residual:
            r0 = torch.randn(3, 33).to(dtype)
            r_ref, r_mod = r0.clone(), r0.clone()
            out = gemv_reference(x, w, prologue=prologue, residual=r_ref, keep=0.75, scale=1.5, **kw)
            assert out is r_ref  # in place, returned
            with torch.no_grad():
                ref = module_math(x, w, prologue, residual=r_mod, keep=0.75, scale=1.5, **kw)
            assert not torch.equal(r_ref, r0)
        else:
            out = gemv_reference(x, w, prologue=prologue, **kw)
            with torch.no_grad():
                ref = module_math(x, w, prologue, **kw)
            assert out.dtype == dtype and out.shape == (3, 33)
        assert rel_err(out, ref) <= tol, (prologue, zero_centered)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_silu_mul_epilogue_is_the_two_step_mlp(dtype):
    """The oracle's silu_mul epilogue is the plain gate|up output fed to the silu_mul prologue's x̂:
    the same bits (both round gate and up to the output dtype, then silu(g) * u once); and SwiGLU's
    module math to the bf16 rounding of its own intermediate steps."""
    from attnlab.kernels.gemv import gemv_reference

    x, w, kw = make(3, 2 * 40, 96, "rmsnorm", dtype, seed=2, row_pad=3)
    norm = dict(prologue="rmsnorm", **kw)
    act = gemv_reference(x, w, epilogue="silu_mul", **norm)  # (M, 40)
    gu = gemv_reference(x, w, **norm)  # (M, 80) [gate | up]
    assert act.shape == (3, 40) and act.dtype == dtype
    eye = torch.eye(40, dtype=dtype)  # the identity weight returns the prologue's x̂ itself
    assert torch.equal(act, gemv_reference(gu, eye, prologue="silu_mul"))
    mlp = SwiGLU(96, 40).to(dtype)
    with torch.no_grad():
        mlp.gate_up.weight().copy_(w)
        h = RMSNorm(96, eps=kw["norm_eps"]).to(dtype)
        h.weight.copy_(kw["norm_weight"])
        x_hat = h(x)
        ref = F.silu(F.linear(x_hat, w[:40])) * F.linear(x_hat, w[40:])
    assert rel_err(act, ref) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_reference_rmsnorm_is_the_module_bitwise_in_float32():
    """The oracle's x̂ for the plain norm is RMSNorm.forward's own F.rms_norm call: same bits."""
    from attnlab.kernels.gemv import gemv_reference

    x, w, kw = make(2, 8, 64, "rmsnorm", torch.float32)
    eye = torch.eye(64)  # the identity weight returns x̂ itself
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(kw["norm_weight"])
        assert torch.equal(gemv_reference(x, eye, **kw, prologue="rmsnorm"), norm(x))
    del w


def test_reference_out_dtype_and_scale():
    from attnlab.kernels.gemv import gemv_reference

    x, w, _ = make(2, 16, 32, None, torch.bfloat16)
    logits = gemv_reference(x, w, out_dtype=torch.float32, scale=0.5)
    assert logits.dtype == torch.float32
    assert rel_err(logits, 0.5 * (x.float() @ w.float().t())) <= 1e-6


def test_bad_inputs_raise_value_errors_naming_the_argument():
    from attnlab.kernels.gemv import gemv, gemv_reference

    x, w, kw = make(2, 16, 32, "rmsnorm", torch.float32)
    for fn in (gemv, gemv_reference):
        cases = [
            (dict(x=x[0]), "x: expected 2 dims"),
            (dict(x=x[:, :31]), "x: expected shape"),
            (dict(weight=w.to(torch.float64)), "weight: expected dtype"),
            (dict(x=x.to(torch.bfloat16)), "x: expected dtype"),
            (dict(weight=w.t().contiguous().t()), "weight: expected a contiguous"),
            (dict(x=torch.randn(32, 2).t()), "x: the last dim must be contiguous"),
            (dict(prologue="gelu"), "prologue: expected one of"),
            (dict(norm_weight=None), "norm_weight: prologue='rmsnorm' needs"),
            (dict(x_hat_out=torch.empty(2, 31)), "x_hat_out: expected shape"),
            (dict(x_hat_out=torch.empty(2, 32, dtype=torch.bfloat16)), "x_hat_out: expected dtype"),
            (dict(x_hat_out=x), "x_hat_out: must not share memory with x"),
            (dict(x_hat_out=torch.empty(2, 32), prologue="silu_mul", norm_weight=None, x=torch.randn(2, 64)),
             "x_hat_out: only written with prologue in"),
            (dict(norm_weight=torch.ones(31)), "norm_weight: expected shape"),
            (dict(prologue=None), "norm_weight: only used with"),
            (dict(gate=torch.randn(2, 32)), "gate: only used with"),
            (dict(residual=torch.randn(2, 15)), "residual: expected shape"),
            (dict(residual=torch.randn(16, 2).t()), "residual: expected a contiguous"),
            (dict(residual=torch.randn(2, 16), out_dtype=torch.bfloat16), "out_dtype: with residual"),
            (dict(keep=0.5), "keep: only applies with residual"),
            (dict(out_dtype=torch.int32), "out_dtype: expected one of"),
            (dict(epilogue="gelu"), "epilogue: expected one of"),
            (dict(epilogue="silu_mul", weight=w[:15]), r"weight: epilogue='silu_mul' needs \[gate \| up\]"),
            (dict(epilogue="silu_mul", residual=torch.randn(2, 8)), "residual: epilogue='silu_mul' writes"),
        ]
        for change, message in cases:
            args = dict(x=x, weight=w, prologue="rmsnorm", **kw)
            args.update(change)
            with pytest.raises(ValueError, match=message):
                fn(args.pop("x"), args.pop("weight"), **args)
        g = make(2, 16, 32, "sigmoid_gate")[2]["gate"]
        with pytest.raises(ValueError, match="gate: prologue='sigmoid_gate' needs"):
            fn(x, w, prologue="sigmoid_gate")
        with pytest.raises(ValueError, match="gate: prologue='rmsnorm_sigmoid_gate' needs"):
            fn(x, w, prologue="rmsnorm_sigmoid_gate", norm_weight=kw["norm_weight"])
        with pytest.raises(ValueError, match="gate: expected shape"):
            fn(x, w, prologue="sigmoid_gate", gate=g[:1])
        with pytest.raises(ValueError, match=r"x: expected shape \(\?, 64\) \[M, 2K\]"):
            fn(x, w, prologue="silu_mul")


def test_gemv_on_cpu_needs_the_interpreter():
    if INTERPRETED:
        pytest.skip("the interpreter makes CPU tensors usable")
    from attnlab.kernels.gemv import gemv

    x, w, _ = make(1, 8, 16, None)
    with pytest.raises(ValueError, match="x: gemv runs on CUDA tensors.*gemv_reference"):
        gemv(x, w)


def test_launch_config_from_shapes():
    """The reasoned defaults on an H100 (132 SMs), without touching a GPU, and TUNING's override."""
    from attnlab.kernels import gemv as kg

    cuda = torch.device("cuda", 0)
    kg._SMS[0] = 132
    try:
        # shapes TUNING does not list (those it lists come from it: the H100 sweep's winners)
        assert kg.launch_config(1, 2000, 2048, cuda) == (4, 2048, 4, 1, False, 0, 0)  # 500 programs
        assert kg.launch_config(1, 3000, 2048, cuda) == (8, 1024, 4, 1, False, 0, 0)  # 375 programs
        assert kg.launch_config(1, 32000, 2048, cuda) == (8, 1024, 4, 1, False, 0, 0)  # 4000 programs
        tuned = kg.TUNING[(1, 32768, 2048)]
        assert kg.launch_config(1, 32768, 2048, cuda) == (*tuned[:4], False, *(*tuned, 0, 0)[5:7])
        assert kg.launch_config(4, 2048, 5504, cuda) == (4, 512, 4, 1, False, 0, 0)  # accumulator bounded
        assert kg.launch_config(1, 37, 100, cuda) == (4, 128, 4, 1, False, 0, 0)  # BLOCK_K no wider than K
        assert kg.MAX_ROWS >= 8
        kg.TUNING[(4, 2048, 5504)] = (16, 256, 8, 2)  # a 4-tuple: the elementwise form
        assert kg.launch_config(3, 2048, 5504, cuda) == (16, 256, 8, 2, False, 0, 0)  # rows padded to 4
        kg.TUNING[(4, 2048, 5504)] = (16, 256, 4, 3, True)
        assert kg.launch_config(4, 2048, 5504, cuda) == (16, 256, 4, 3, True, 0, 0)
        kg.TUNING[(4, 2048, 5504)] = (8, 1024, 8, 1, False, 2)  # the persistent form, 2 programs per SM
        assert kg.launch_config(4, 2048, 5504, cuda) == (8, 1024, 8, 1, False, 2, 0)
        kg.TUNING[(4, 2048, 5504)] = (8, 1024, 8, 1, False, 2, 1)  # + the L2 prefetch one tile further
        assert kg.launch_config(4, 2048, 5504, cuda) == (8, 1024, 8, 1, False, 2, 1)
        assert kg.persistent_grid(2048, 8, 2, cuda) == 256  # every tile its own program: 256 < 264
        assert kg.persistent_grid(32768, 8, 2, cuda) == 264
    finally:
        kg._SMS.pop(0)
        kg.TUNING.pop((4, 2048, 5504), None)


# ---------------------------------------------------------------------------------------------
# interpreter (CPU tensors, TRITON_INTERPRET=1)


def _check_against_reference(x, w, kw, prologue, with_residual, out_dtype, dtype, config=None):
    from attnlab.kernels import gemv as kg

    m, n = x.shape[0], w.shape[0]
    if with_residual:
        r0 = torch.randn(m, n).to(device=x.device, dtype=dtype)
        r_out, r_ref = r0.clone(), r0.clone()
        if config is None:
            out = kg.gemv(x, w, prologue=prologue, residual=r_out, keep=0.5, scale=-1.25, **kw)
            assert out is r_out
        else:
            kg._launch(x, w, prologue, kw.get("norm_weight"), kw.get("norm_eps", 1e-6),
                       kw.get("norm_zero_centered", False), kw.get("gate"), r_out, 0.5, -1.25, None, config)
            out = r_out
        ref = kg.gemv_reference(x, w, prologue=prologue, residual=r_ref, keep=0.5, scale=-1.25, **kw)
    else:
        if config is None:
            out = kg.gemv(x, w, prologue=prologue, out_dtype=out_dtype, **kw)
        else:
            out = torch.full((m, n), float("nan"), dtype=out_dtype or dtype, device=x.device)
            kg._launch(x, w, prologue, kw.get("norm_weight"), kw.get("norm_eps", 1e-6),
                       kw.get("norm_zero_centered", False), kw.get("gate"), None, 1.0, 1.0, out, config)
        ref = kg.gemv_reference(x, w, prologue=prologue, out_dtype=out_dtype, **kw)
        assert out.dtype == (out_dtype or dtype)
    assert out.shape == (m, n) and not out.isnan().any()
    # float32 throughout: rounding of a different summation order. bf16: x̂ and the output are each
    # rounded to 8 bits; where both sides round the same float32 value to nearly the same place
    # a one-ulp flip of an output element is ~4e-3 relative
    tol = {torch.float32: 1e-5, torch.float16: 1e-3}.get(dtype, 2e-3 if out.dtype == torch.float32 else 8e-3)
    assert rel_err(out, ref) <= tol, (prologue, with_residual, out_dtype, tuple(x.shape), tuple(w.shape))
    return out


FORMS = ["tiled", "persistent"]


@pytest.fixture
def form(request, monkeypatch):
    """The kernel form gemv() launches: "tiled" (launch_config's default) or "persistent" (the same
    blocks with PERSIST 1: on the interpreter's 4 "SMs" N 17 is 3 programs of one tile, N 64 is 4
    programs of two 8-column tiles, the last K step ragged)."""
    if request.param == "persistent":
        from attnlab.kernels import gemv as kg

        real = kg.launch_config
        monkeypatch.setattr(kg, "launch_config", lambda *a: (*real(*a)[:5], 1, 0))
    return request.param


@interp
@pytest.mark.parametrize("form", FORMS, indirect=True)
@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_gemv_matches_reference(prologue, with_residual, dtype, form):
    """M 1 and 3 (padded to 4), N 17 and 64, K 40 / 64 / 100 (ragged last K step of 32), a strided x
    (and gate), both output dtypes, the zero-centered norm; both forms of the kernel."""
    shapes = [(1, 17, 40, 0), (3, 64, 100, 7), (3, 17, 64, 0)]
    for i, (m, n, k, pad) in enumerate(shapes):
        zero_centered = prologue == "rmsnorm" and i == 1
        x, w, kw = make(m, n, k, prologue, dtype, seed=i, row_pad=pad, zero_centered=zero_centered)
        for out_dtype in (None,) if with_residual else (None, torch.float32):
            _check_against_reference(x, w, kw, prologue, with_residual, out_dtype, dtype)


@interp
@pytest.mark.parametrize("form", FORMS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_gemv_matches_the_modules(dtype, form):
    """The kernel against the layers' math directly (not only the oracle): RMSNorm -> qkv, SwiGLU's
    down projection into the residual (the module's own forward), gated attention output into the
    residual, the zero-centered norm -> LM head in float32."""
    from attnlab.kernels.gemv import gemv

    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    d, d_ff, n_qkv, vocab = 48, 80, 40, 33
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, d, generator=gen).to(dtype)  # (M, d)

    x, w, kw = make(2, n_qkv, d, "rmsnorm", dtype, seed=1)
    with torch.no_grad():
        assert rel_err(gemv(x, w, prologue="rmsnorm", **kw), module_math(x, w, "rmsnorm", **kw)) <= tol

    mlp = SwiGLU(d, d_ff).to(dtype)
    r_ours = torch.randn(2, d, generator=gen).to(dtype)
    r_mod = r_ours.clone()
    with torch.no_grad():
        gate_up = F.linear(h, mlp.gate_up.weight())  # (M, 2 * d_ff) = [gate | up]
        mlp(h, residual=Residual(r_mod))
        gemv(gate_up, mlp.down_proj.weight, prologue="silu_mul", residual=r_ours)
    assert rel_err(r_ours, r_mod) <= tol

    o, w_o, kw = make(2, d, 64, "sigmoid_gate", dtype, seed=2)
    r_ours = torch.randn(2, d, generator=gen).to(dtype)
    r_mod = r_ours.clone()
    with torch.no_grad():
        module_math(o, w_o, "sigmoid_gate", residual=r_mod, **kw)
    gemv(o, w_o, prologue="sigmoid_gate", residual=r_ours, **kw)
    assert rel_err(r_ours, r_mod) <= tol

    x, w, kw = make(2, vocab, d, "rmsnorm", dtype, seed=4, zero_centered=True)
    logits = gemv(x, w, prologue="rmsnorm", out_dtype=torch.float32, **kw)
    with torch.no_grad():
        ref = module_math(x, w, "rmsnorm", out_dtype=torch.float32, **kw)
    assert logits.dtype == torch.float32 and rel_err(logits, ref) <= tol


@interp
def test_interp_launch_shapes_and_row_counts():
    """Both forms of the kernel: elementwise blocks of 4..64 outputs and 16..128 K (one step wider
    than K, many narrow ones), tensor-core (DOT) blocks of 16 / 32 outputs; M 1, 5 (padded to 8) and
    MAX_ROWS; the persistent form: 2 programs of 5 tiles x 7 K steps each (PERSIST 2 x 4 "SMs" = 8
    programs, 10 tiles), one K step (x̂ computed once), a grid capped at the tile count; fp16; more
    than MAX_ROWS rows is refused, and a bad PERSIST too."""
    from attnlab.kernels.gemv import MAX_ROWS, gemv

    for config in [(4, 16, 1, 1, False), (16, 128, 2, 1, False), (64, 64, 4, 2, False), (16, 32, 4, 2, True),
                   (32, 128, 4, 3, True), (4, 16, 1, 1, False, 2), (16, 128, 4, 1, False, 1),
                   (8, 32, 2, 1, False, 4)]:
        for m in (1, 5, MAX_ROWS):
            x, w, kw = make(m, 37, 100, "rmsnorm", torch.float32, seed=m)
            _check_against_reference(x, w, kw, "rmsnorm", False, None, torch.float32, config)
            x, w, kw = make(m, 37, 100, "silu_mul", torch.bfloat16, seed=m)
            _check_against_reference(x, w, kw, "silu_mul", True, None, torch.bfloat16, config)
    for prologue in PROLOGUES:
        x, w, kw = make(2, 24, 48, prologue, torch.float16, seed=9)
        _check_against_reference(x, w, kw, prologue, prologue != "rmsnorm", None, torch.float16)
    x, w, _ = make(MAX_ROWS + 1, 8, 16, None)
    with pytest.raises(ValueError, match="x: gemv takes at most MAX_ROWS"):
        gemv(x, w)
    x, w, kw = make(1, 8, 16, None)
    with pytest.raises(ValueError, match="config: the DOT form needs BLOCK_N"):
        _check_against_reference(x, w, kw, None, False, None, torch.float32, (8, 16, 4, 1, True))
    for bad in [(16, 16, 4, 1, True, 1), (8, 16, 4, 1, False, -1)]:
        with pytest.raises(ValueError, match="config: PERSIST must be >= 0, and 0 with the DOT form"):
            _check_against_reference(x, w, kw, None, False, None, torch.float32, bad)
    # L2_AHEAD (its prefetch is GPU-only: on the interpreter the same loop without it), rows of 192 bytes
    x, w, kw = make(3, 37, 96, "silu_mul", torch.bfloat16, seed=3)
    _check_against_reference(x, w, kw, "silu_mul", True, None, torch.bfloat16, (4, 16, 1, 1, False, 2, 1))
    x, w, kw = make(1, 8, 100, None, torch.bfloat16)  # rows of 200 bytes: no 16-byte bulk prefetch
    for bad in [(8, 32, 4, 1, False, 1, 1), (8, 32, 4, 1, False, 0, 1), (8, 32, 4, 1, False, 1, -1)]:
        with pytest.raises(ValueError, match="config: L2_AHEAD must be >= 0, and 0 unless PERSIST > 0"):
            _check_against_reference(x, w, kw, None, False, None, torch.bfloat16, bad)
    x, w, kw = make(1, 8, 17 * 16, None)
    with pytest.raises(ValueError, match=r"config: the persistent form unrolls its K loop.*got 17"):
        _check_against_reference(x, w, kw, None, False, None, torch.float32, (8, 16, 4, 1, False, 1))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_silu_mul_epilogue(dtype):
    """gate|up with the silu_mul epilogue: bitwise the plain gate|up GEMV followed by the silu_mul
    prologue's x̂ (read back through an identity weight), and the oracle to rounding; M 1, 3 and
    MAX_ROWS, F 37 (a ragged last tile) and 64, K 100 (ragged K steps), tiles of 2..16 rows, x̂ written
    too (a postnorm block), a scale. Forms that cannot run it are refused by _launch and replaced by the
    tiled default in gemv()."""
    from attnlab.kernels import gemv as kg

    tol = 1e-5 if dtype == torch.float32 else 8e-3

    def inputs(m, f, seed, row_pad=0):  # x, [gate | up] weight, the rmsnorm prologue's keywords
        x, w, kw = make(m, 2 * f, 100, "rmsnorm", dtype, seed=seed, row_pad=row_pad)
        return x, w, dict(prologue="rmsnorm", **kw)

    shapes = ((1, 37, None), (3, 64, (2, 32, 1, 1, False)), (kg.MAX_ROWS, 37, (16, 64, 4, 1, False)))
    for m, f, config in shapes:
        x, w, kw = inputs(m, f, m + f, row_pad=3)
        if config is None:
            act, gu = kg.gemv(x, w, epilogue="silu_mul", **kw), kg.gemv(x, w, **kw)
        else:  # the plain GEMV in the same launch shape: the same summation order
            act, gu = torch.full((m, f), float("nan"), dtype=dtype), torch.empty(m, 2 * f, dtype=dtype)
            for out, epilogue in ((act, "silu_mul"), (gu, None)):
                kg._launch(x, w, "rmsnorm", kw["norm_weight"], kw["norm_eps"], False, None, None, 1.0, 1.0,
                           out, config, epilogue=epilogue)
        assert act.shape == (m, f) and not act.isnan().any()
        two_step = kg.gemv(gu, torch.eye(f, dtype=dtype), prologue="silu_mul")
        assert torch.equal(act, two_step), (m, f, config)
        assert rel_err(act, kg.gemv_reference(x, w, epilogue="silu_mul", **kw)) <= tol, (m, f, config)
    x, w, kw = inputs(2, 37, 4)
    xh, ref_xh = torch.full((2, 100), float("nan"), dtype=dtype), torch.empty(2, 100, dtype=dtype)
    act = kg.gemv(x, w, epilogue="silu_mul", x_hat_out=xh, scale=0.5, out_dtype=torch.float32, **kw)
    ref = kg.gemv_reference(x, w, epilogue="silu_mul", x_hat_out=ref_xh, scale=0.5, out_dtype=torch.float32,
                            **kw)
    assert act.dtype == torch.float32 and rel_err(act, ref) <= tol
    assert not xh.isnan().any() and rel_err(xh, ref_xh) <= tol
    for bad in [(3, 32, 4, 1, False), (16, 32, 4, 1, True), (8, 32, 4, 1, False, 1)]:
        with pytest.raises(ValueError, match="config: the silu_mul epilogue runs in the tiled elementwise"):
            kg._launch(x, w, "rmsnorm", kw["norm_weight"], 1e-5, False, None, None, 1.0, 1.0,
                       torch.empty(2, 37, dtype=dtype), bad, epilogue="silu_mul")
    key = (2, 74, 100)
    for entry in [(16, 32, 4, 1, True), (8, 32, 4, 1, False, 1), (5, 32, 4, 1, False)]:
        kg.TUNING[key] = entry  # a form without the epilogue: gemv takes the tiled default instead
        try:
            act = kg.gemv(x, w, epilogue="silu_mul", **kw)
            assert rel_err(act, kg.gemv_reference(x, w, epilogue="silu_mul", **kw)) <= tol, entry
        finally:
            del kg.TUNING[key]


@interp
@pytest.mark.parametrize("prologue", ["rmsnorm", "rmsnorm_sigmoid_gate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_interp_gemv_writes_x_hat(prologue, dtype, with_residual):
    """x_hat_out (a postnorm block's normed stream): every element of x̂ written once, by one of the
    several programs, equal to the modules' norm (and gate) output; the product is unchanged (bitwise
    the call without it). M 3 (padded to 4), N 64 (8 programs), K 100 (ragged K steps); M 1, K 40.
    A TUNING entry of the persistent form for the shape is replaced by the tiled default."""
    from attnlab.kernels import gemv as kg

    for m, n, k in ((3, 64, 100), (1, 17, 40)):
        x, w, kw = make(m, n, k, prologue, dtype, seed=m + k, row_pad=3)
        xh = torch.full((m, k), float("nan"), dtype=dtype)
        plain_r = torch.randn(m, n).to(dtype) if with_residual else None
        args = dict(prologue=prologue, **kw)
        if with_residual:
            r = plain_r.clone()
            out = kg.gemv(x, w, residual=r, x_hat_out=xh, **args)
            plain = kg.gemv(x, w, residual=plain_r, **args)
        else:
            out = kg.gemv(x, w, x_hat_out=xh, **args)
            plain = kg.gemv(x, w, **args)
        assert torch.equal(out, plain)
        with torch.no_grad():
            expect = module_math(x, torch.eye(k, dtype=dtype), prologue, **kw)  # the identity: x̂ itself
        assert not xh.isnan().any()
        assert rel_err(xh, expect) <= (1e-6 if dtype == torch.float32 else 8e-3), (m, k)
    key = (1, 17, 40)
    kg.TUNING[key] = (4, 32, 4, 1, False, 1)  # persistent: does not write x̂, so gemv takes the tiled form
    try:
        xh = torch.full((1, 40), float("nan"), dtype=dtype)
        x, w, kw = make(1, 17, 40, prologue, dtype, seed=5)
        kg.gemv(x, w, prologue=prologue, x_hat_out=xh, **kw)
        assert not xh.isnan().any()
        with pytest.raises(ValueError, match="x_hat_out is written by the tiled form only"):
            kg._launch(x, w, prologue, kw["norm_weight"], 1e-5, False, kw.get("gate"), None, 1.0, 1.0,
                       torch.empty(1, 17, dtype=dtype), kg.TUNING[key], xh)
    finally:
        del kg.TUNING[key]


@interp
def test_interp_empty_rows_and_custom_ops():
    """M = 0 returns an empty result; both custom ops pass torch.library.opcheck (schema, fake
    tensor shapes, the residual op's in-place mutation)."""
    from attnlab.kernels import gemv as kg

    x, w, _ = make(0, 8, 16, None)
    assert kg.gemv(x, w).shape == (0, 8)
    x, w, kw = make(2, 9, 16, "rmsnorm")
    cfg = kg.launch_config(2, 9, 16, x.device)
    kg.POISON_OUTPUTS = False  # opcheck compares repeated calls; NaN never equals itself
    torch.library.opcheck(kg._gemv_op, (x, w, "rmsnorm", kw["norm_weight"], 1e-5, False, None, 1.0,
                                        "float32", *cfg))
    w2 = torch.cat([w, w[:7]])  # 16 rows: [gate | up] of 8 outputs for the silu_mul epilogue
    torch.library.opcheck(kg._gemv_op, (x, w2, "rmsnorm", kw["norm_weight"], 1e-5, False, None, 1.0,
                                        "float32", *cfg, "silu_mul"))
    r = torch.randn(2, 9)
    torch.library.opcheck(kg._gemv_residual_op, (x, w, "rmsnorm", kw["norm_weight"], 1e-5, False, None, r,
                                                 1.0, 1.0, *cfg))
    persistent = (4, 16, 4, 1, False, 1)  # 3 tiles on the interpreter's 4 "SMs"
    torch.library.opcheck(kg._gemv_residual_op, (x, w, "rmsnorm", kw["norm_weight"], 1e-5, False, None, r,
                                                 1.0, 1.0, *persistent))
    xh = torch.empty(2, 16)  # the x̂-writing op: into a residual, and into a new output
    for dst, is_res in ((r, True), (torch.empty(2, 9), False)):
        torch.library.opcheck(kg._gemv_x_hat_op, (x, w, "rmsnorm", kw["norm_weight"], 1e-5, False, None, xh,
                                                  dst, is_res, 1.0, 1.0, *cfg[:5]))
    torch.library.opcheck(kg._gemv_x_hat_op, (x, w2, "rmsnorm", kw["norm_weight"], 1e-5, False, None, xh,
                                              torch.empty(2, 8), False, 1.0, 1.0, *cfg[:5], "silu_mul"))

    def step(h, nw, wq, res, xh):  # what a decode layer calls: dynamo must trace gemv's checks whole
        logits = kg.gemv(h, wq, prologue="rmsnorm", norm_weight=nw, out_dtype=torch.float32)
        kg.gemv(h, wq, prologue="rmsnorm", norm_weight=nw, residual=res, keep=0.5)
        kg.gemv(h, wq, prologue="rmsnorm", norm_weight=nw, x_hat_out=xh)
        return logits

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    r1, r2 = r.clone(), r.clone()
    xh1, xh2 = torch.zeros(2, 16), torch.ones(2, 16)
    assert torch.equal(compiled(x, kw["norm_weight"], w, r1, xh1), step(x, kw["norm_weight"], w, r2, xh2))
    assert torch.equal(r1, r2) and torch.equal(xh1, xh2)


# ---------------------------------------------------------------------------------------------
# CPU: the GPU build (sm_90 compile at the real shapes' default launch; no GPU needed)


@needs_sm90_toolchain
@pytest.mark.parametrize("pdl", [False, True])  # attnlab.kernels._pdl: on the H100 it is True
@pytest.mark.parametrize("m, prologue, residual, out, k, n, config", [
    (1, "rmsnorm", False, "*fp32", 2048, 32768, None),  # the LM head (zero-centered norm, float32 logits)
    (1, "silu_mul", True, "*bf16", 5504, 2048, None),  # down into the residual
    (1, "sigmoid_gate", True, "*bf16", 2048, 2048, None),  # gated o_proj
    (4, "rmsnorm", False, "*bf16", 2048, 3072, None),  # qkv at M = 4
    (4, "silu_mul", True, "*bf16", 5504, 2048, (16, 512, 4, 3, True)),  # the DOT form, 3 stages
    # the persistent form (PERSIST > 0) at the sweep's grid (sm_90 registers per thread, PDL on, M = 1:
    # o_proj BN 4/8/16 x BK 2048 x 4 warps 72/124/208, 8 warps 57/78/126; down K = 5472 BN 4 178 (4
    # warps) / 128 (8); BN 8 spills at 4 warps, 174-180 at 8; BN 16 spills at both)
    (1, None, True, "*bf16", 2048, 2048, (4, 2048, 4, 1, False, 2)),  # o_proj, one K step: x̂ held
    (1, "rmsnorm", False, "*fp32", 2048, 32768, (8, 1024, 4, 1, False, 1)),  # LM head, 2 K steps
    (1, "silu_mul", True, "*bf16", 5472, 2048, (4, 2048, 4, 1, False, 1)),  # down, 3 K steps (ragged)
    (1, "rmsnorm", False, "*bf16", 2048, 3072, (16, 2048, 8, 1, False, 1)),  # qkv, 16 columns, 8 warps
    (1, "silu_mul", True, "*bf16", 5472, 2048, (4, 2048, 4, 1, False, 2, 2)),  # + L2 prefetch 3 tiles ahead
    (1, "rmsnorm_sigmoid_gate", True, "*bf16", 2048, 2048, None),  # Lightning's out_proj (norm, gate)
    (1, "rmsnorm", False, "*bf16", 2048, 8192, "x_hat"),  # a postnorm block's in_proj, writing x̂
    (1, "rmsnorm", False, "*bf16", 2048, 10944, "silu_mul"),  # gate|up with the silu_mul epilogue
    (1, None, True, "*bf16", 5472, 2048, None),  # down after it: TUNING's 8 columns x 2048 at 8 warps
])
def test_kernel_compiles_for_sm90(m, prologue, residual, out, k, n, config, pdl):
    """The kernel as an H100 runs it (not the interpreter), at launch_config's default for the shape
    (or the given config), with the 16-divisibility triton specialises on: the elementwise forms'
    weight loads are 16-byte evict-first vector loads; the DOT form's go through cp.async (16 bytes)
    to shared memory; nothing spills to local memory."""
    import re

    import triton

    from attnlab.kernels import gemv as kg

    write_xh, swiglu = config == "x_hat", config == "silu_mul"
    config = None if write_xh or swiglu else config
    kg._SMS[0] = 132
    try:
        config = config or kg.launch_config(m, n, k, torch.device("cuda", 0))
        bn, bk, warps, stages, dot, persist, l2_ahead = (*config, 0, 0)[:7]
    finally:
        kg._SMS.pop(0)
    rows = max(16, kg.rows_padded(m)) if dot else kg.rows_padded(m)
    const = dict(M=m, ROWS=rows, PROLOGUE=kg._PROLOGUE_ID[prologue], ZERO_CENTERED=out == "*fp32",
                 HAS_RES=residual, BLOCK_N=bn, BLOCK_K=bk, INTERP=False, PDL=pdl)
    if persist:
        fn = kg._gemv_persistent_kernel
        const.update(K_STEPS=triton.cdiv(k, bk), L2_AHEAD=l2_ahead)
    else:
        fn = kg._gemv_kernel
        const.update(DOT=dot, PREC="tf32", WRITE_XH=write_xh, SWIGLU=swiglu)
    ptr = dict(X="*bf16", W="*bf16", NW="*bf16", GATE="*bf16", R="*bf16", O=out, XH="*bf16")
    div = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
           if a in ptr or a in ("N", "K", "stride_xm", "stride_gm")}
    kernel = compile_sm90(fn, const, ptr, floats=("eps", "keep", "scale"), attrs=div, num_warps=warps,
                          num_stages=stages)
    ptx = kernel.asm["ptx"]
    assert ptx.count("cp.async.bulk.prefetch.L2.global") == (l2_ahead + 1 if l2_ahead else 0)
    if dot:
        assert set(re.findall(r"cp\.async\.c[ag]\.shared\.global[^\n]*, 0x10", ptx)), "no 16-byte cp.async"
        assert "mma" in ptx
    else:
        weight_loads = re.findall(r"ld\.global\.L1::evict_first[\.\w:]*", ptx)
        assert weight_loads and set(weight_loads) == {"ld.global.L1::evict_first.L2::cache_hint.v4.b32"}
    regs, stack, usage = sm90_usage(kernel)
    assert stack == 0 and regs <= (184 if persist else 168), usage


# ---------------------------------------------------------------------------------------------
# GPU (a d_model 2048 model's decode projections, bf16)

GPU_SHAPES = [  # (name, K, N, prologue, residual, out_dtype)
    ("qkv", 2048, 3072, "rmsnorm", False, None),
    ("o_proj", 2048, 2048, None, True, None),
    ("o_proj_gated", 2048, 2048, "sigmoid_gate", True, None),
    ("gate_up", 2048, 11008, "rmsnorm", False, None),
    ("down", 5504, 2048, "silu_mul", True, None),
    ("lm_head", 2048, 32768, "rmsnorm", False, torch.float32),
    ("gdn_in_proj", 2048, 8256, "rmsnorm", False, None),
    ("lightning_out", 2048, 2048, "rmsnorm_sigmoid_gate", True, None),
    ("kda_in_proj", 2048, 6400, "rmsnorm", False, None),
    ("odd", 5504, 37, "silu_mul", True, None),
    ("odd_k", 100, 37, "rmsnorm", False, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[s[0] for s in GPU_SHAPES])
@pytest.mark.parametrize("m", [1, 4, 8])
def test_gpu_gemv_matches_float32_reference(shape, m):
    from attnlab.kernels.gemv import gemv, gemv_reference

    _, k, n, prologue, with_residual, out_dtype = shape
    x, w, kw = make(m, n, k, prologue, torch.bfloat16, device="cuda", seed=k + n, row_pad=8,
                    zero_centered=(n == 6400))
    # the float32 oracle: the same (bf16) inputs, float32 output, no residual rounding
    ref = gemv_reference(x, w, prologue=prologue, out_dtype=torch.float32, **kw)
    if with_residual:
        r0 = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        r = r0.clone()
        out = gemv(x, w, prologue=prologue, residual=r, keep=0.5, scale=2.0, **kw)
        assert out is r and out.data_ptr() == r.data_ptr()  # in place
        assert rel_err(r, r0.float() * 0.5 + 2.0 * ref) <= 1e-2
    else:
        out = gemv(x, w, prologue=prologue, out_dtype=out_dtype, **kw)
        assert out.dtype == (out_dtype or torch.bfloat16)
        # float32 logits: both sides accumulate in float32 from the same rounded x̂ (up to a one-ulp
        # flip of an x̂ element where the norm's float32 math differs in the last bit)
        assert rel_err(out, ref) <= (2e-3 if out_dtype == torch.float32 else 1e-2)
    if prologue in ("rmsnorm", "rmsnorm_sigmoid_gate"):  # x̂ written too: the same product, x̂ the oracle's
        xh = torch.full((m, k), float("nan"), device="cuda", dtype=torch.bfloat16)
        xh_ref = torch.empty_like(xh)
        gemv_reference(x, w, prologue=prologue, x_hat_out=xh_ref, **kw)
        again = gemv(x, w, prologue=prologue, out_dtype=out_dtype, x_hat_out=xh, **kw)
        # (the compiled kernel with the store may round the products differently from the one without)
        assert rel_err(again, ref) <= (2e-3 if out_dtype == torch.float32 else 1e-2)
        assert rel_err(xh, xh_ref) <= 4e-3


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("f", [5472, 5504, 37])
def test_gpu_silu_mul_epilogue(m, f):
    """gate|up with the silu_mul epilogue at the presets' d_ff (and a ragged one): the float32 oracle
    to bf16 rounding, and the two-step form (plain GEMV, then the prologue's x̂) to the last bit
    outside a few one-ulp flips (the two kernels may contract multiply-adds differently)."""
    from attnlab.kernels.gemv import gemv, gemv_reference

    x, w, kw = make(m, 2 * f, 2048, "rmsnorm", torch.bfloat16, device="cuda", seed=f + m)
    kw["prologue"] = "rmsnorm"
    act = gemv(x, w, epilogue="silu_mul", **kw)  # (m, f)
    assert act.shape == (m, f) and act.dtype == torch.bfloat16
    ref = gemv_reference(x, w, epilogue="silu_mul", out_dtype=torch.float32, **kw)
    assert rel_err(act, ref) <= 1e-2
    two_step = gemv(gemv(x, w, **kw), torch.eye(f, device="cuda", dtype=torch.bfloat16), prologue="silu_mul")
    assert (act != two_step).float().mean() <= 1e-3 and rel_err(act, two_step) <= 1e-3


@pytest.mark.gpu
def test_gpu_prefer_l1_sets_the_carveout_hint(monkeypatch):
    """attnlab.kernels._common.prefer_l1: every launched attnlab kernel with little shared memory (here
    the GEMV's variants) reads back a preferred carveout of 0; with CARVEOUT_HINT_MAX_SHARED below
    their shared memory they get the driver's default (-1) back."""
    import ctypes

    from attnlab.kernels import _common
    from attnlab.kernels import gemv as kg

    def carveouts():
        out = []
        for c in kg._gemv_kernel.device_caches.values():
            for k in c[0].values():
                if k.module is not None:
                    value = ctypes.c_int(-2)
                    assert _common._LIBCUDA[0].cuFuncGetAttribute(
                        ctypes.byref(value), 9, ctypes.c_void_p(k.function)) == 0
                    out.append(value.value)
        return out

    x, w, _ = make(1, 64, 128, None, torch.bfloat16, device="cuda")
    kg.gemv(x, w)
    kg.gemv(x, w, out_dtype=torch.float32)
    assert _common.prefer_l1() >= 2
    assert carveouts() and set(carveouts()) == {0}
    monkeypatch.setattr(_common, "CARVEOUT_HINT_MAX_SHARED", -1)  # every kernel is "big" now
    _common.prefer_l1()
    assert set(carveouts()) == {-1}
    monkeypatch.undo()
    _common.prefer_l1()
    assert set(carveouts()) == {0}


def test_prefer_l1_without_a_cuda_driver(monkeypatch):
    """No driver library (a CPU machine): nothing to hint, no error."""
    from attnlab.kernels import _common

    monkeypatch.setattr(_common, "_LIBCUDA", [None])
    assert _common.prefer_l1() == 0


@pytest.mark.gpu
def test_gpu_gemv_in_cuda_graph_and_compile():
    """Captured in a CUDA graph the residual update replays on the new inputs; under torch.compile
    the custom ops run the kernel (same result as eager)."""
    from attnlab.kernels.gemv import gemv

    x, w, kw = make(1, 2048, 5504, "silu_mul", torch.bfloat16, device="cuda")
    r = torch.zeros(1, 2048, device="cuda", dtype=torch.bfloat16)
    gemv(x, w, prologue="silu_mul", residual=r)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemv(x, w, prologue="silu_mul", residual=r)
    r.zero_()
    x.copy_(torch.randn_like(x))
    graph.replay()
    expect = gemv(x, w, prologue="silu_mul", residual=torch.zeros_like(r))
    assert torch.equal(r, expect)

    def step(h, nw, wq):
        return gemv(h, wq, prologue="rmsnorm", norm_weight=nw, out_dtype=torch.float32)

    h, wq, kw = make(1, 3072, 2048, "rmsnorm", torch.bfloat16, device="cuda")
    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(h, kw["norm_weight"], wq), step(h, kw["norm_weight"], wq))

    def step_x_hat(h, nw, wq, xh):  # the op that also writes x̂ (mutates two arguments) under inductor
        return gemv(h, wq, prologue="rmsnorm", norm_weight=nw, x_hat_out=xh)

    xh1, xh2 = torch.zeros_like(h), torch.ones_like(h)
    compiled = torch.compile(step_x_hat, fullgraph=True)
    assert torch.equal(compiled(h, kw["norm_weight"], wq, xh1), step_x_hat(h, kw["norm_weight"], wq, xh2))
    assert torch.equal(xh1, xh2)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[s[0] for s in GPU_SHAPES])
def test_gpu_dot_form_matches_float32_reference(shape):
    """The tensor-core form (a TUNING choice the sweep may make) at M = 1 and 4, 3 and 4 stages."""
    from attnlab.kernels import gemv as kg

    _, k, n, prologue, with_residual, out_dtype = shape
    for m, config in ((1, (16, 256, 4, 3, True)), (4, (32, 128, 4, 4, True))):
        x, w, kw = make(m, n, k, prologue, torch.bfloat16, device="cuda", seed=k + n + m)
        ref = kg.gemv_reference(x, w, prologue=prologue, out_dtype=torch.float32, **kw)
        _check_against_reference(x, w, kw, prologue, with_residual, out_dtype, torch.bfloat16, config)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float32)
        kg._launch(x, w, prologue, kw.get("norm_weight"), kw.get("norm_eps", 1e-6),
                   kw.get("norm_zero_centered", False), kw.get("gate"), None, 1.0, 1.0, out, config)
        assert rel_err(out, ref) <= 2e-3, (m, config)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[s[0] for s in GPU_SHAPES])
def test_gpu_persistent_form_matches_float32_reference(shape):
    """The persistent form (a TUNING choice the chain sweep may make) at M = 1, 4 and 8: 1 and 4
    programs per SM, one K step (x̂ held) and several, 4 and 8 warps, with the L2 prefetch 2 and 3
    tiles ahead."""
    _, k, n, prologue, with_residual, out_dtype = shape
    for m, config in ((1, (4, 2048, 4, 1, False, 2)), (1, (8, 1024, 8, 1, False, 4)),
                      (4, (4, 1024, 4, 1, False, 1)), (8, (4, 512, 8, 1, False, 1)),
                      (1, (4, 2048, 4, 1, False, 2, 1)), (4, (8, 1024, 8, 1, False, 1, 2))):
        if -(-k // config[1]) > 16 or (len(config) > 6 and k * 2 % 16):  # unrolled K loop; bulk prefetch
            continue
        x, w, kw = make(m, n, k, prologue, torch.bfloat16, device="cuda", seed=k + n + m)
        _check_against_reference(x, w, kw, prologue, with_residual, out_dtype, torch.bfloat16, config)
