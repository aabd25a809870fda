"""Mode selection for the linear-attention ops.

``mode="triton"`` runs the GPU kernel of the same name in :mod:`attnlab.kernels.linear`;
``"auto"`` takes it when the tensors are on CUDA and the kernels import, else the chunked
torch path. Kernels are imported lazily so that a CPU-only install never touches triton.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from .._checks import check_mode

LINEAR_MODES = ("auto", "recurrent", "chunk", "triton")


def _import_kernel(op_name: str) -> tuple[Callable | None, str]:
    """The kernel ``attnlab.kernels.linear.<op_name>``, or None and the reason it is unavailable."""
    try:
        module = importlib.import_module("attnlab.kernels.linear")
    except Exception as e:  # ImportError, or triton failing at import on a machine without a GPU
        return None, f"attnlab.kernels.linear does not import ({type(e).__name__}: {e})"
    fn = getattr(module, op_name, None)
    if fn is None:
        return None, f"attnlab.kernels.linear has no function {op_name!r}"
    return fn, ""


def resolve_mode(mode: str, q: torch.Tensor, op_name: str) -> tuple[str, Callable | None]:
    """Pick the implementation: returns ("recurrent" | "chunk" | "triton", kernel or None).

    Raises ValueError for an unknown mode, or for "triton" when the tensors are not on CUDA or
    the kernel does not import."""
    check_mode(mode, LINEAR_MODES)
    if mode in ("recurrent", "chunk"):
        return mode, None
    if mode == "auto":
        if not q.is_cuda:
            return "chunk", None
        fn, _ = _import_kernel(op_name)
        return ("triton", fn) if fn is not None else ("chunk", None)
    if not q.is_cuda:
        raise ValueError(f"mode: 'triton' needs CUDA tensors, but q is on {q.device}; use 'chunk' on the CPU")
    fn, why = _import_kernel(op_name)
    if fn is None:
        raise ValueError(f"mode: 'triton' is unavailable for {op_name}: {why}")
    return "triton", fn


def resolve_step(mode: str, q: torch.Tensor, op_name: str) -> Callable | None:
    """The fused Triton decode step ``attnlab.kernels.linear.<op_name>`` to run, or None for the
    torch step. ``"auto"`` takes the kernel for CUDA tensors except while torch.compile traces (there
    the torch step is traced and fused by inductor instead); ``"triton"`` requires it; ``"recurrent"``
    and ``"chunk"`` (the same thing for one token) take the torch step."""
    if mode == "auto" and torch.compiler.is_compiling():
        return None
    impl, kernel = resolve_mode(mode, q, op_name)
    return kernel if impl == "triton" else None


def lazy_kernel(module: str, attr: str, mode: str, op_name: str) -> Callable | None:
    """``attnlab.kernels.<module>.<attr>``, imported on first use. If the module does not import
    (no triton, or triton failing on a machine without a GPU): None under ``mode="auto"`` (take the
    torch path), a ValueError naming ``op_name`` under ``mode="triton"``."""
    try:
        return getattr(importlib.import_module(f"attnlab.kernels.{module}"), attr)
    except Exception as e:  # ImportError, or triton failing at import
        if mode == "auto":
            return None
        raise ValueError(f"mode: 'triton' is unavailable for {op_name} ({type(e).__name__}: {e})") from e
