"""Pieces the Triton kernels share: output buffers that tests can poison, buffers kept zeroed across
launches, the RMSNorm weight step and the L2 prefetch of bytes a later kernel will read."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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


@triton.jit
def norm_weight(h, w, ZERO_CENTERED: tl.constexpr):
    """The weight step of attnlab's RMSNorm on normalised float32 ``h``: ``h * w``, or ``h + h * w``
    (``h * (1 + w)`` as the layer's addcmul) when zero-centered."""
    if ZERO_CENTERED:
        out = h + h * w
    else:
        out = h * w
    return out


# the most bytes one cp.async.bulk.prefetch.L2 asks for (the PTX ISA sets no bound; kept moderate)
L2_PREFETCH_STEP = 1 << 16


@triton.jit
def l2_prefetch(ptr, nbytes, ok):
    """Ask L2 for the ``nbytes`` (a multiple of 16) at ``ptr`` (16-byte aligned) if ``ok``: one
    ``cp.async.bulk.prefetch.L2`` (sm_90, PTX 8.0) issued by thread 0 of the program. A hint: no
    registers held, nothing waits for it, the program may exit before the bytes arrive. GPU only
    (inline PTX; callers skip it under the interpreter)."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 tid; mov.u32 tid, %tid.x; setp.eq.u32 p, tid, 0; "
        "setp.ne.and.s32 p, $2, 0, p; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
        "=r,l,r,r", [ptr, ok.to(tl.int32), nbytes.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def l2_prefetch_share(PF, pf_bytes, pf_share, STEPS: tl.constexpr, STEP: tl.constexpr):
    """This program's part of prefetching the first ``pf_bytes`` of the byte buffer PF into L2:
    program p asks for [p * pf_share, (p + 1) * pf_share) (cut at pf_bytes) in STEPS requests of
    at most STEP bytes (see :func:`l2_prefetch_args`)."""
    start = tl.program_id(0).to(tl.int64) * pf_share
    for s in tl.static_range(STEPS):
        off = start + s * STEP
        size = tl.minimum(tl.minimum(pf_share - s * STEP, pf_bytes - off), STEP)
        l2_prefetch(PF + off, tl.maximum(size, 0), size > 0)


def l2_prefetch_args(
    prefetch: torch.Tensor | None, programs: int
) -> tuple[torch.Tensor | None, int, int, int]:
    """(uint8 view, bytes, bytes per program, requests per program) for a kernel of ``programs``
    programs that prefetches ``prefetch`` (contiguous; its first bytes down to a multiple of 16)
    with :func:`l2_prefetch_share`; (None, 0, 0, 0) for none. The shares are multiples of 16 bytes,
    so every request stays 16-byte aligned."""
    if prefetch is None or prefetch.numel() == 0 or programs < 1:
        return None, 0, 0, 0
    flat = prefetch.reshape(-1).view(torch.uint8)
    nbytes = flat.numel() // 16 * 16
    if nbytes == 0:
        return None, 0, 0, 0
    share = triton.cdiv(triton.cdiv(nbytes, programs), 16) * 16
    return flat, nbytes, share, triton.cdiv(share, L2_PREFETCH_STEP)
