"""Shared scaffolding of the Triton kernel tests (tests/test_kernels_*.py).

Kernels run two ways: on a CUDA machine (tests marked ``gpu``) and, at tiny sizes, on CPU tensors
under ``TRITON_INTERPRET=1``. That variable must be set before triton is imported, so each file's
``test_interpreter_suite`` re-runs the file's ``interp_`` tests in a subprocess with it set
(:func:`run_interpreter_suite`); ``@interp`` marks those tests.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(
    not (HAVE_TRITON and INTERPRETED), reason="runs under TRITON_INTERPRET=1 (see test_interpreter_suite)"
)
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def run_interpreter_suite(test_file: str) -> None:
    """Run ``test_file``'s ``interp_`` tests under TRITON_INTERPRET=1 in a subprocess; fail with
    its output unless they ran and all passed."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file, "-k", "interp_"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# the GPU build without a GPU: compile a kernel for an H100 (sm_90) with triton's bundled toolchain


def sm90_toolchain() -> bool:
    """Whether triton's nvidia backend and its bundled ptxas / cuobjdump are here (no GPU needed)."""
    if not HAVE_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None:
        return False
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(tools, t)) for t in ("ptxas", "cuobjdump"))


needs_sm90_toolchain = pytest.mark.skipif(
    INTERPRETED or not sm90_toolchain(), reason="compiles the real kernel for sm_90: needs triton's ptxas"
)


def compile_sm90(fn, constexprs: dict, pointers: dict, floats: tuple = (), ints: dict | None = None,
                 attrs: dict | None = None, **options):
    """``fn`` (a ``triton.jit`` kernel) compiled for sm_90: arguments in ``constexprs`` are compile-time
    constants, ``pointers`` maps pointer arguments to their type ("*bf16", ...), ``floats`` names fp32
    scalars, ``ints`` overrides integer types (default i32); ``options``: num_warps, num_stages."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints = ints or {}

    def kind(a: str) -> str:
        if a in constexprs:
            return "constexpr"
        return pointers.get(a, "fp32" if a in floats else ints.get(a, "i32"))

    sig = {a: kind(a) for a in fn.arg_names}
    source = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def sm90_usage(kernel) -> tuple[int, int, str]:
    """(registers per thread, stack bytes, cuobjdump's resource line) of a :func:`compile_sm90` kernel."""
    import re
    import subprocess
    import tempfile

    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True).stdout
    regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return regs, stack, usage


# ---------------------------------------------------------------------------------------------
# shared checks


def rel_err(out, ref) -> float:
    """rms(out - ref) / rms(ref) in float64 on the CPU; the output must be finite (an unwritten,
    NaN-poisoned element fails here)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert bool(out.isfinite().all()), "output has NaN/inf"
    return float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))


def poison_outputs(module: str):
    """An autouse fixture turning ``attnlab.kernels.<module>.POISON_OUTPUTS`` on around each test: the
    kernel's wrappers fill every output buffer with NaN first, so an element a kernel fails to write
    fails the test. Assign it in a test file: ``_poison = poison_outputs("gemv")``."""

    @pytest.fixture(autouse=True)
    def _poison():
        if not HAVE_TRITON:
            yield
            return
        kernels = importlib.import_module(f"attnlab.kernels.{module}")
        kernels.POISON_OUTPUTS = True
        yield
        kernels.POISON_OUTPUTS = False

    return _poison
