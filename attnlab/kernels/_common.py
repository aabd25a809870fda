"""Pieces the Triton kernels share: output buffers that tests can poison, buffers kept zeroed across
launches, a launch that drops pipeline stages when its tiles do not fit, the RMSNorm weight step, and
the L1 / shared-memory carveout hint of the compiled kernels."""

from __future__ import annotations

import ctypes
import sys
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

_CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9  # CUfunction_attribute (cuda.h)
# Kernels with at most this much shared memory get the L1 hint; bigger users keep the driver's choice,
# which fits several of their programs on an SM (llama's split decode kernel, 70 KB, hinted too: 1M
# context 14.50 vs 13.33 ms a token). -1: no kernel is hinted (an A/B knob for decode_ab.py)
CARVEOUT_HINT_MAX_SHARED = 16 * 1024
_LIBCUDA: list = []  # [the driver library] once loaded, [None] when it cannot be


def prefer_l1() -> int:
    """Hint the driver to give every attnlab Triton kernel launched so far (on CUDA) that uses little
    shared memory (<= CARVEOUT_HINT_MAX_SHARED: the GEMVs, cache writes, combines, top-k) the smallest
    shared-memory carveout, the rest of each SM's unified L1 / shared memory staying L1
    (``cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 0)``); the others get
    the driver's default (-1) back. Without it the ~1B decode steps ran 3-5% slower on an H100 at
    4K-128K (benchmarks/RESULTS.md, twenty-second session). Call it after the kernels ran once and
    before a CUDA graph captures them (DecodeStep does). Returns the number of kernels hinted; 0
    without a CUDA driver (a warning says so once)."""
    if not _LIBCUDA:
        try:
            _LIBCUDA.append(ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll"))
        except OSError as e:
            _LIBCUDA.append(None)
            warnings.warn(f"attnlab.kernels: no CUDA driver library to set the L1 carveout hint ({e})",
                          stacklevel=2)
    lib = _LIBCUDA[0]
    if lib is None:
        return 0
    count = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("attnlab.kernels.") or module is None:
            continue
        for fn in list(vars(module).values()):
            if not isinstance(fn, triton.runtime.jit.JITFunction):
                continue
            for cache in list(getattr(fn, "device_caches", {}).values()):
                for kernel in list(cache[0].values()):  # the compiled kernels of one device
                    handle = getattr(kernel, "function", None)  # None until launched (loaded) once
                    if handle is None or getattr(kernel, "module", None) is None:
                        continue
                    hint = 0 if kernel.metadata.shared <= CARVEOUT_HINT_MAX_SHARED else -1
                    err = lib.cuFuncSetAttribute(ctypes.c_void_p(handle),
                                                 _CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                                                 ctypes.c_int(hint))
                    if err:
                        warnings.warn(f"attnlab.kernels: cuFuncSetAttribute(carveout) failed for "
                                      f"{fn.__name__} (CUresult {err})", stacklevel=2)
                    count += hint == 0 and not err
    return count


def output_buffer(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, poison: bool
) -> torch.Tensor:
    """An uninitialised output buffer, or with ``poison`` (a module's POISON_OUTPUTS, set by the tests)
    one filled with NaN — for integer buffers a value no kernel writes — so an element a kernel fails
    to write fails the test."""
    if poison:
        fill = float("nan") if dtype.is_floating_point else -(2**40)
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def reused_zeros(buffers: dict, key: tuple, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled buffer of n elements kept in ``buffers`` under ``key``: created once, then reused by
    every later launch, so none is allocated inside a CUDA-graph capture after the first call. For
    kernels that leave it zeroed again (last-arriver tickets) or overwrite what they read (scratch)."""
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = torch.zeros(n, dtype=dtype, device=device)
    return buf


def launch_fitting(kernel, grid, *args, num_stages: int, **kwargs) -> None:
    """``kernel[grid](*args, num_stages=..., **kwargs)``, retried with one pipeline stage fewer while the
    compiled kernel needs more shared memory than the device has (float32 or wide tiles: the stages
    tuned for bf16 at D = 128 can ask for 2-3x what fits). Triton raises OutOfResources before the
    launch, so nothing was written by a failed try."""
    for stages in range(num_stages, 0, -1):
        try:
            kernel[grid](*args, num_stages=stages, **kwargs)
            return
        except OutOfResources:
            if stages == 1:
                raise


@triton.jit
def norm_weight(h, w, ZERO_CENTERED: tl.constexpr):
    """The weight step of attnlab's RMSNorm on normalised float32 ``h``: ``h * w``, or ``h + h * w``
    (``h * (1 + w)`` as the layer's addcmul) when zero-centered."""
    if ZERO_CENTERED:
        out = h + h * w
    else:
        out = h * w
    return out


@triton.jit
def l2_prefetch(ptr, nbytes, pred):
    """Ask L2 for the ``nbytes`` bytes at ``ptr`` if ``pred`` (scalars): one
    ``cp.async.bulk.prefetch.L2`` (sm_90, PTX 8.0) from thread 0, no registers held, nothing waited
    for. ``ptr`` must be 16-byte aligned and ``nbytes`` a multiple of 16 (the launchers check); a
    prefetch never changes what a later load returns (L2 is where global memory is coherent). GPU
    only: the interpreter has no inline assembly."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 tid; mov.u32 tid, %tid.x; setp.eq.u32 p, tid, 0; "
        "setp.ne.and.s32 p, $2, 0, p; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
        "=r,l,r,r", [ptr, pred.to(tl.int32), (nbytes + tl.zeros([], dtype=tl.int32)).to(tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def zero_share(ZERO, n, me, n_prog, BLOCK: tl.constexpr):
    """Program ``me`` of ``n_prog`` sets its BLOCK-element pieces of the int32 buffer ZERO[0:n] to zero
    (a later kernel's scratch, cleared by a launch that runs anyway; call it after the PDL wait: the
    buffer may be memory a kernel before used)."""
    for z in range(me * BLOCK, n, n_prog * BLOCK):
        zs = z + tl.arange(0, BLOCK)
        tl.store(ZERO + zs, tl.zeros([BLOCK], dtype=tl.int32), mask=zs < n)
