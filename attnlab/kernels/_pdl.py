"""Programmatic dependent launch (PDL, Hopper and later) for the fused decode step's kernels.

A batch-1 decode step is ~100 short kernels back to back (attnlab.layers.fused); each one's start
(launch, first DRAM round trip) costs ~2-3 µs that nothing overlaps. With PDL a kernel launched with
``launch_pdl=True`` may start while the kernel before it is still finishing, once every program of
that one has called ``gdc_launch_dependents`` (ours do at their start): its programs then do what does
not depend on the previous kernel (a GEMV issues its first weight loads) and ``gdc_wait`` — which
returns when the previous kernel has completed and its writes are visible — before reading anything
an earlier kernel wrote. A kernel before which no PDL-aware kernel ran simply starts when its
predecessor ends, so the chain stays correct when torch ops sit between (NVIDIA, "CUDA C++
Programming Guide", Programmatic Dependent Launch and Synchronization; PTX ``griddepcontrol``).
Stream capture keeps the dependency in a CUDA graph (CUDA >= 12.3).

``ATTNLAB_PDL=0`` (or ``attnlab.kernels._pdl.ENABLED = False``) launches them the ordinary way.
"""

from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("ATTNLAB_PDL", "1") != "0"
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CAPABLE: dict[int, bool] = {}


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: a CUDA device of compute capability >= 9.0."""
    if not ENABLED or _INTERPRET or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _CAPABLE[index]


def launch_options(pdl: bool) -> dict:
    """The launch keywords of a kernel launched with (``pdl``) or without PDL."""
    return {"launch_pdl": True} if pdl else {}


__all__ = ["ENABLED", "launch_options", "use_pdl"]
