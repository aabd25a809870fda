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
