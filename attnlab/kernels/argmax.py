"""Greedy decoding's token choice, ``logits.argmax(-1)``, as one short Triton launch.

At batch 1 torch's argmax over a 32K-vocabulary row of float32 logits is a 12 µs reduction kernel
on an H100 (NVIDIA H100 80GB HBM3, torch 2.11; benchmarks/RESULTS.md, "Twentieth session"): longer
than any one kernel of a layer's attention. Here one program per row loads the whole row at once (up to
ONE_PASS_MAX values; longer rows in passes of that many) and reduces it in registers, launched with
PDL (:mod:`attnlab.kernels._pdl`) so that inside the CUDA-graph decode step it starts while the LM
head's GEMV is finishing.

Same result as ``torch.argmax``: the first index of the largest value, where NaN counts as larger
than everything (the first NaN's index). :func:`argmax_rows_reference` is that call (the oracle and
the path off the GPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._checks import check_tensor
from ._common import output_buffer
from ._pdl import launch_options, use_pdl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# False: greedy decoding (attnlab.generate.greedy_tokens) takes torch's argmax (to compare on a GPU)
ENABLED = os.environ.get("ATTNLAB_ARGMAX_KERNEL", "1") != "0"
POISON_OUTPUTS = False  # tests: start the output as a value no kernel writes, so an unwritten row fails
# values a program holds at once: 16 a thread at 32 warps (sm_90: 48 registers; 32768 at 32 warps
# spills), so a 32K vocabulary takes two passes
ONE_PASS_MAX = 16384
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _argmax_kernel(X, OUT, V, stride_x, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program b: OUT[b] = the first index of row b's largest value (its first NaN if any)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # the logits come from the previous kernel
    b = tl.program_id(0).to(tl.int64)
    row = X + b * stride_x
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    nan_i = tl.full([], 2147483647, tl.int32)  # first NaN so far (none: int32 max)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < V
        x = tl.load(row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        is_nan = ok & (x != x)
        nan_i = tl.minimum(nan_i, tl.min(tl.where(is_nan, cols, 2147483647), 0))
        x = tl.where(is_nan, float("-inf"), x)
        m = tl.max(x, 0)
        i = tl.min(tl.where(ok & (x == m), cols, 2147483647), 0)  # first index of the block's max
        take = m > best  # strictly larger: an earlier block keeps a tie (an all -inf row: index 0)
        best_i = tl.where(take, i, best_i)
        best = tl.where(take, m, best)
    tl.store(OUT + b, tl.where(nan_i < 2147483647, nan_i, best_i).to(tl.int64))


def _warps(block: int) -> int:
    return 32 if block >= 16384 else (16 if block >= 4096 else 4)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token of every row: ``logits.argmax(-1)`` in one Triton launch.

    Args:
        logits: [B, V] float32 / bf16 / fp16 on CUDA (or the CPU under TRITON_INTERPRET=1), the last
            dim contiguous.

    Returns:
        int64 [B]: the first index of each row's largest value; a row holding NaN gives its first
        NaN's index (torch.argmax's rule).
    """
    check_tensor("logits", logits, 2, "[B, V]", dtypes=_DTYPES)
    if logits.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"logits: argmax_rows runs a Triton kernel on CUDA tensors (or CPU ones under "
                         f"TRITON_INTERPRET=1), got device {logits.device}; call argmax_rows_reference")
    B, V = logits.shape
    if V == 0:
        raise ValueError("logits: an empty vocabulary (V = 0) has no argmax")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = output_buffer((B,), torch.long, logits.device, POISON_OUTPUTS)
    if B == 0:
        return out
    block = min(ONE_PASS_MAX, triton.next_power_of_2(V))
    pdl = use_pdl(logits.device)
    _argmax_kernel[(B,)](logits, out, V, logits.stride(0), BLOCK=block, PDL=pdl,
                         num_warps=_warps(block), **launch_options(pdl))
    return out


def argmax_rows_reference(logits: torch.Tensor) -> torch.Tensor:
    """:func:`argmax_rows` as ``torch.argmax`` (the oracle and the path off the GPU)."""
    check_tensor("logits", logits, 2, "[B, V]", dtypes=_DTYPES)
    return logits.argmax(dim=-1)


__all__ = ["ENABLED", "ONE_PASS_MAX", "argmax_rows", "argmax_rows_reference"]
