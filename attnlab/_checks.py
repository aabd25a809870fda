"""Input validation shared by every op and layer: one place, precise messages.

Every check raises ``ValueError`` naming the argument and what was expected, so a user
sees ``q: expected 4 dims [B, T, H, D], got shape (2, 3, 4)`` instead of a broadcast
error three calls deep.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    x: object,
    ndim: int | None = None,
    layout: str | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
) -> torch.Tensor:
    """Check that ``x`` is a tensor of rank ``ndim`` (``layout`` names its dims, e.g.
    ``"[B, T, H, D]"``), whose sizes match ``shape`` where not None, with a dtype in ``dtypes``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        want = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected {ndim} dims{want}, got shape {tuple(x.shape)}")
    if shape is not None:
        for i, (got, exp) in enumerate(zip(x.shape, shape, strict=False)):
            if exp is not None and got != exp:
                want = f" {layout}" if layout else ""
                raise ValueError(
                    f"{name}: expected shape {_fmt(shape)}{want}, got {tuple(x.shape)} "
                    f"(dim {i} is {got}, not {exp})"
                )
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: expected dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    return x


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors (None skipped) must live on one device."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name}: on device {t.device}, but {first_name} is on {first.device}; move them together"
            )


def check_heads_divide(name_q: str, h_q: int, name_kv: str, h_kv: int) -> None:
    """GQA needs the query head count to be a multiple of the key/value head count."""
    if h_kv <= 0 or h_q % h_kv != 0:
        raise ValueError(
            f"{name_q} has {h_q} heads, which is not a multiple of {name_kv}'s {h_kv} heads "
            "(GQA needs H_q % H_kv == 0)"
        )


def check_mode(mode: str, allowed: Sequence[str]) -> str:
    if mode not in allowed:
        raise ValueError(f"mode: expected one of {', '.join(repr(m) for m in allowed)}, got {mode!r}")
    return mode


def in_graph() -> bool:
    """True while torch.compile traces or a CUDA graph captures: no host reads of tensor values
    (``.item()``, ``int(t.max())``) are allowed then, so host-side checks are skipped."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _fmt(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
