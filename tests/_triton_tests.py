"""Shared scaffolding of the Triton kernel tests (tests/test_kernels_*.py).

Kernels run two ways: on a CUDA machine (tests marked ``gpu``) and, at tiny sizes, on CPU tensors
under ``TRITON_INTERPRET=1``. That variable must be set before triton is imported, so each file's
``test_interpreter_suite`` re-runs the file's ``interp_`` tests in a subprocess with it set
(:func:`run_interpreter_suite`); ``@interp`` marks those tests. Those subprocesses are most of the
CPU suite's time, so tests/conftest.py starts every selected file's suite in the background once
collection is done (:func:`start_interpreter_suites`, two at a time, in collection order) and
each ``test_interpreter_suite`` then only waits for its result, while the other tests run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(
    not (HAVE_TRITON and INTERPRETED), reason="runs under TRITON_INTERPRET=1 (see test_interpreter_suite)"
)
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


SUITE_TIMEOUT_S = 900
_SUITES: dict[str, Future] = {}  # started in the background, by absolute path
_PROCS: list[subprocess.Popen] = []
_POOL: ThreadPoolExecutor | None = None


def _run_suite(test_file: str) -> tuple[int, str, str]:
    """(return code, stdout, stderr) of ``test_file``'s ``interp_`` tests under TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file, "-k", "interp_"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _PROCS.append(proc)
    try:
        out, err = proc.communicate(timeout=SUITE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return -9, out, err + f"\n(killed after {SUITE_TIMEOUT_S} s)"
    return proc.returncode, out, err


def start_interpreter_suites(test_files: list[str], workers: int = 2) -> None:
    """Start the interpreter suites of ``test_files`` in the background, ``workers`` at a time, in
    the given order; :func:`run_interpreter_suite` then collects each one's result. Nothing to do
    inside an interpreter run or without triton."""
    global _POOL
    if INTERPRETED or not HAVE_TRITON or not test_files:
        return
    _POOL = ThreadPoolExecutor(max_workers=workers)
    for f in test_files:
        _SUITES[os.path.abspath(f)] = _POOL.submit(_run_suite, f)


def stop_interpreter_suites() -> None:
    """Kill the suites still running (an interrupted or -x session) and drop the pool."""
    for proc in _PROCS:
        if proc.poll() is None:
            proc.kill()
    if _POOL is not None:
        _POOL.shutdown(wait=False, cancel_futures=True)


def run_interpreter_suite(test_file: str) -> None:
    """``test_file``'s ``interp_`` tests under TRITON_INTERPRET=1 in a subprocess (the one started in
    the background, else one now); fail with its output unless they ran and all passed."""
    started = _SUITES.pop(os.path.abspath(test_file), None)
    code, out, err = started.result() if started is not None else _run_suite(test_file)
    assert code == 0, out[-4000:] + err[-2000:]
    assert " passed" in out and " failed" not in out, out[-2000:]


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
    # constexpr parameters left out take their defaults (as a launch that does not pass them)
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}

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


def capture_graph(fn):
    """(graph, output): ``fn`` warmed up on a side stream, then captured in a CUDA graph
    (:func:`attnlab.generate.capture_cuda_graph`); replay the graph to re-run it on the inputs' new
    contents."""
    from attnlab.generate import capture_cuda_graph

    return capture_cuda_graph(fn)


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
