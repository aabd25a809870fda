"""One Triton launch for a Lightning attention (``L``) decode step, between the layer's input
projection and its output projection.

What :class:`attnlab.layers.lightning.LightningAttention` does for one token with a cache (T == 1)
between ``in_proj`` and ``out_proj`` is SiLU over q|k|v, the q/k/v split, the recurrence step
``S <- e^{-s_h} S + k vᵀ``, ``o = Sᵀ q``, then the output RMSNorm over all H·D channels and the
sigmoid gate. :func:`lightning_decode` does the first part in ONE launch and leaves the norm and the
gate to the output projection's GEMV prologue (``attnlab.kernels.gemv``, prologue
``"rmsnorm_sigmoid_gate"``): the norm spans every head, so inside this kernel it would need the
heads' programs to meet, while the GEMV computes a row's sum of squares in every program anyway.

Layout: one program per (batch row, head, block of BV value columns); the recurrence is column-wise
in the value dim (column j needs only S[:, j] and v_j), so a program owns the float32 state tile
[D, BV] of its head, and loads q and k whole (D values each, tiny). At the ~1B presets' shapes (16
heads of 128) that is 64 programs of a 16 KB tile each.

Rounding: q, k, v are SiLU'd in float32 from proj's values and rounded to proj's dtype, as the
layer's ``F.silu`` on a 16-bit tensor returns them; the recurrence is float32 (the state's dtype);
o is rounded to proj's dtype once, as :func:`attnlab.ops.lightning_attention_step` returns it.

PDL (attnlab.kernels._pdl): the kernel lets the next one launch at its start and waits for the
previous one before touching memory (the state too: a chain of early launches may run ahead of
the layer's previous step only if every kernel waited, which is what each one does here first).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._checks import check_same_device, check_tensor
from ._common import output_buffer
from ._pdl import launch_options, use_pdl
from .absorb import _round

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
POISON_OUTPUTS = False  # tests: fill every new output buffer with NaN first, so an unwritten element fails
BLOCK_V = 32  # value columns per program
_MAX_HEAD_DIM = 256
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _silu_rounded(x, DT: tl.constexpr, INTERP: tl.constexpr):
    """silu of float32 x, rounded to DT (the layer's F.silu output), returned as float32."""
    return _round(x * tl.sigmoid(x), DT, INTERP).to(tl.float32)


@triton.jit
def _lightning_decode_kernel(
    P, stride_p, SLOPE, STATE, O, LEN,
    H: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr,
    COUNT: tl.constexpr, PDL: tl.constexpr, INTERP: tl.constexpr,
):
    """Program (b, h, value block), i = (b·H + h)·NVB + block. P [B, ≥ 3·H·D] rows [q | k | v | ...]
    (head-major inside each); SLOPE float32 [H]; STATE float32 [B, H, D, D] updated in place; O [B, H·D]
    (P's dtype). COUNT: LEN[b] += 1 by the row's program (head 0, block 0)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    blk = pid % NVB
    bh = pid // NVB
    h = bh % H
    b = bh // H
    rk = tl.arange(0, BK)
    rv = blk * BV + tl.arange(0, BV)
    mk = rk < D
    mv = rv < D
    off = bh.to(tl.int64) * D * D + rk[:, None] * D + rv[None, :]  # (BK, BV)
    m = mk[:, None] & mv[None, :]
    S = tl.load(STATE + off, mask=m, other=0.0)  # (BK, BV) float32
    row = P + b.to(tl.int64) * stride_p + h * D
    DT = O.dtype.element_ty
    q = _silu_rounded(tl.load(row + rk, mask=mk, other=0.0).to(tl.float32), DT, INTERP)  # (BK,)
    k = _silu_rounded(tl.load(row + H * D + rk, mask=mk, other=0.0).to(tl.float32), DT, INTERP)  # (BK,)
    v = _silu_rounded(tl.load(row + 2 * H * D + rv, mask=mv, other=0.0).to(tl.float32), DT, INTERP)  # (BV,)
    decay = tl.exp(-tl.load(SLOPE + h).to(tl.float32))
    S = S * decay + k[:, None] * v[None, :]
    o = tl.sum(S * q[:, None], 0)  # (BV,)
    tl.store(STATE + off, S, mask=m)
    tl.store(O + bh.to(tl.int64) * D + rv, _round(o, DT, INTERP), mask=mv)
    if COUNT:
        if h == 0 and blk == 0:
            tl.store(LEN + b, tl.load(LEN + b) + 1)


def _check(mixer, proj, cache) -> None:
    from ..layers.lightning import LightningAttention, LightningCache

    if not isinstance(mixer, LightningAttention):
        raise ValueError(f"mixer: expected a LightningAttention, got {type(mixer).__name__}")
    H, D = mixer.n_heads, mixer.head_dim
    width = 4 * H * D
    check_tensor("proj", proj, 2, f"[B, {width}] (mixer.in_proj(x)[:, 0]: [q | k | v | gate])",
                 shape=(None, width), dtypes=_DTYPES)
    if proj.stride(-1) != 1:
        raise ValueError(f"proj: the last dim must be contiguous, got strides {proj.stride()}")
    if not isinstance(cache, LightningCache):
        raise ValueError(f"cache: expected a LightningCache (mixer.new_cache), got {type(cache).__name__}")
    B = proj.shape[0]
    check_tensor("cache.state", cache.state, 4, "[B, H, D, D]", shape=(B, H, D, D), dtypes=(torch.float32,))
    if not cache.state.is_contiguous():
        raise ValueError("cache.state: must be contiguous (it is updated in place)")
    check_tensor("cache.lengths", cache.lengths, 1, "[B]", shape=(B,), dtypes=(torch.int64,))
    check_same_device(proj=proj, cache_state=cache.state, cache_lengths=cache.lengths,
                      mixer_slope=mixer.slope)


@torch.no_grad()
def lightning_decode(mixer, proj: torch.Tensor, cache, count_token: bool = False) -> torch.Tensor:
    """An ``L`` layer's decode step between ``in_proj`` and the output norm, in one Triton launch.

    mixer: the :class:`attnlab.layers.lightning.LightningAttention` (n_heads, head_dim, slope).
    proj: [B, 4·H·D] fp16 / bf16 / fp32, ``mixer.in_proj(x)[:, 0]`` for one token per row (columns
        [q | k | v | gate]; the gate is not read here), last dim contiguous (rows may be strided).
    cache: the layer's ``LightningCache``; ``state`` float32 [B, H, D, D] (contiguous) is updated IN
        PLACE; ``lengths`` is NOT changed unless ``count_token`` (then ``lengths += 1`` in the same
        launch, as the fused decode step wants).

    Returns o [B, H·D] in proj's dtype: ``S_tᵀ q_t`` per head, before the output norm and gate (the
    output projection's GEMV applies them: prologue ``"rmsnorm_sigmoid_gate"`` with ``mixer.norm``
    and proj's gate columns). CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    _check(mixer, proj, cache)
    if not (proj.is_cuda or _INTERPRET):
        raise ValueError(f"proj: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests), "
                         f"got {proj.device}; use lightning_decode_reference")
    H, D = mixer.n_heads, mixer.head_dim
    if D > _MAX_HEAD_DIM:
        raise ValueError(f"mixer: head dims up to {_MAX_HEAD_DIM} are supported, got {D}")
    B = proj.shape[0]
    o = output_buffer((B, H * D), proj.dtype, proj.device, POISON_OUTPUTS)  # (B, H*D)
    if B == 0:
        return o
    bk = triton.next_power_of_2(D)
    bv = min(BLOCK_V, bk)
    nvb = triton.cdiv(D, bv)
    pdl = use_pdl(proj.device)
    _lightning_decode_kernel[(B * H * nvb,)](
        proj, proj.stride(0), mixer.slope, cache.state, o, cache.lengths,
        H=H, D=D, BK=bk, BV=bv, NVB=nvb, COUNT=bool(count_token), PDL=pdl, INTERP=_INTERPRET,
        num_warps=4, **launch_options(pdl),
    )
    return o


@torch.no_grad()
def lightning_decode_reference(mixer, proj: torch.Tensor, cache, count_token: bool = False) -> torch.Tensor:
    """:func:`lightning_decode` in the layer's own torch ops (``LightningAttention.forward``'s T == 1
    branch up to the norm): the oracle and the fallback off CUDA. Same arguments, same in-place cache
    update, same return."""
    from ..ops.lightning import lightning_attention_step

    _check(mixer, proj, cache)
    B = proj.shape[0]
    H, D = mixer.n_heads, mixer.head_dim
    qkv = torch.nn.functional.silu(proj[:, : 3 * H * D]).unflatten(-1, (3, H, D))  # (B, 3, H, D)
    q, k, v = qkv.unbind(1)  # each (B, H, D)
    o = lightning_attention_step(q, k, v, mixer.slope, cache.state, mode="recurrent")  # (B, H, D)
    if count_token:
        cache.lengths += 1
    return o.reshape(B, H * D)


__all__ = ["BLOCK_V", "lightning_decode", "lightning_decode_reference"]
