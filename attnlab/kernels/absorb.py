"""Triton kernels for the two weight-absorption products of an MLA decode step (DeepSeek-V2 §2.1.3).

An absorbed MLA decode step multiplies twice by slices of ``kv_b_proj.weight`` viewed as
``[H, dn + dv, R]`` (R = kv_lora_rank contiguous):

- :func:`absorb_q`: ``q_lat[b, h, r] = Σ_d q_nope[b, h, d] · W_UK[h, d, r]`` with W_UK = view[:, :dn]
  (``einsum("bhd,hdr->bhr")``): the reduction runs over the NON-contiguous dim, so a program owns
  head h and BLOCK_R contiguous columns r for all rows, holds its whole [dn, BLOCK_R] weight tile
  (coalesced along r) and reduces over d in registers — 16 heads x 8 blocks of 64 = 128 programs
  at H = 16, R = 512;
- :func:`unabsorb_o`: ``o[b, h, v] = Σ_r o_lat[b, h, r] · W_UV[h, v, r]`` with W_UV = view[:, dn:]
  (``einsum("bhr,hvr->bhv")``): a GEMV per head over the contiguous R; a program owns head h and
  BLOCK_V rows v for all rows.

At batch 1 each is 2 MB of weights (H = 16, dn = dv = 128, R = 512, bf16), a cuBLAS launch of
~3.5 µs on an H100 against a ~0.7 µs memory floor. Both launch with PDL
(:mod:`attnlab.kernels._pdl`): the weight tile is loaded before ``gdc_wait`` (the step never writes
weights), the activations after. Numerics are the einsum's on 16-bit inputs: float32 products and
accumulation, one rounding to the input dtype at the end (the summation order differs, so bf16
outputs may differ from cuBLAS's by a rounding flip).

The fused decode step folds the first into :func:`attnlab.kernels.latent_cache.latent_write`
(``q_lat=None``: the same tile per program, one launch fewer); :func:`absorb_q` stays the standalone
form (``attnlab.layers.fused.FOLD_ABSORB_Q = False`` takes it, to compare on a GPU).

Under ``torch.compile`` the launchers are opaque custom ops (``attnlab::absorb_q``,
``attnlab::unabsorb_o``), so a compiled or graphed decode step keeps them. :func:`absorb_q_reference`
and :func:`unabsorb_o_reference` are the einsums (the oracle and the CPU path).
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

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
POISON_OUTPUTS = False  # tests: fill every output buffer with NaN first, so an unwritten element fails
MAX_ROWS = 8  # rows per program (more rows: another program along grid dim 2)
TILE = 8192  # weight elements a program holds (bf16: 16 KB; 64 float32 registers a thread at 4 warps)
MAX_BK = 512  # unabsorb_o: R columns per step of its loop (R <= MAX_BK: one step, all loaded before the wait)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _round(v, DT: tl.constexpr, INTERP: tl.constexpr):
    """float32 ``v`` rounded to ``DT`` (to nearest even) as DT. The interpreter truncates float32 ->
    bfloat16 casts (triton 3.9), so there the rounding is done on the bits first."""
    if INTERP and DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        v = bits.to(tl.float32, bitcast=True)
    return v.to(DT)


@triton.jit
def _absorb_q_kernel(
    Q, W, O, B, DN, R,
    stride_qb, stride_qh, stride_qd, stride_wh, stride_wd,
    ROWS: tl.constexpr, BD: tl.constexpr, BLOCK_R: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr,
):
    """Program (h, j, g): O[b, h, j·BLOCK_R + r] = Σ_d Q[b, h, d] · W[h, d, j·BLOCK_R + r] for rows
    b in [g·ROWS, +ROWS); the [BD, BLOCK_R] weight tile (all of dn, padded) loaded before the wait."""
    if PDL:
        gdc_launch_dependents()
    h = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    d = tl.arange(0, BD)  # (BD,)
    r_ok = r < R
    d_ok = d < DN
    w = tl.load(W + h * stride_wh + d[:, None] * stride_wd + r[None, :], mask=d_ok[:, None] & r_ok[None, :],
                other=0.0, eviction_policy="evict_first").to(tl.float32)  # (BD, BLOCK_R)
    if PDL:
        gdc_wait()  # q comes from the previous kernel
    b0 = tl.program_id(2) * ROWS
    for m in tl.static_range(ROWS):
        b = (b0 + m).to(tl.int64)
        q = tl.load(Q + b * stride_qb + h * stride_qh + d * stride_qd, mask=d < tl.where(b < B, DN, 0),
                    other=0.0).to(tl.float32)  # (BD,)
        o = tl.sum(q[:, None] * w, axis=0)  # (BLOCK_R,)
        tl.store(O + (b * tl.num_programs(0) + h) * R + r, _round(o, O.dtype.element_ty, INTERP),
                 mask=r < tl.where(b < B, R, 0))


@triton.jit
def _unabsorb_o_kernel(
    X, W, O, B, DV, R,
    stride_xb, stride_xh, stride_wh, stride_wv,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, BK: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr,
):
    """Program (h, j, g): O[b, h, j·BLOCK_V + v] = Σ_r X[b, h, r] · W[h, j·BLOCK_V + v, r] for rows b in
    [g·ROWS, +ROWS); the first [BLOCK_V, BK] weight tile (all of R when R <= BK) loaded before the
    wait, the rows' products accumulated in a [ROWS, BLOCK_V] float32 tile."""
    if PDL:
        gdc_launch_dependents()
    h = tl.program_id(0).to(tl.int64)
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
    k = tl.arange(0, BK)  # (BK,)
    rows = tl.arange(0, ROWS)  # (ROWS,)
    v_ok = v < DV
    w_rows = W + h * stride_wh + v[:, None].to(tl.int64) * stride_wv  # (BLOCK_V, 1)
    w = tl.load(w_rows + k[None, :], mask=v_ok[:, None] & (k[None, :] < R), other=0.0,
                eviction_policy="evict_first")  # (BLOCK_V, BK)
    if PDL:
        gdc_wait()  # o_lat comes from the previous kernel
    b0 = tl.program_id(2) * ROWS
    acc = tl.zeros([ROWS, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, R, BK):
        kk = k0 + k
        if k0 > 0:
            w = tl.load(w_rows + kk[None, :], mask=v_ok[:, None] & (kk[None, :] < R), other=0.0,
                        eviction_policy="evict_first")
        wf = w.to(tl.float32)
        for m in tl.static_range(ROWS):
            b = (b0 + m).to(tl.int64)
            x = tl.load(X + b * stride_xb + h * stride_xh + kk, mask=kk < tl.where(b < B, R, 0), other=0.0)
            part = tl.sum(wf * x.to(tl.float32)[None, :], axis=1)  # (BLOCK_V,)
            acc = tl.where(rows[:, None] == m, acc + part[None, :], acc)
    b = b0 + rows  # (ROWS,)
    dst = O + (b[:, None].to(tl.int64) * tl.num_programs(0) + h) * DV + v[None, :]
    tl.store(dst, _round(acc, O.dtype.element_ty, INTERP), mask=(b[:, None] < B) & v_ok[None, :])


# ---------------------------------------------------------------------------------------------
# host side


def _rows(B: int) -> int:
    return min(MAX_ROWS, triton.next_power_of_2(max(B, 1)))


def _absorb_q_launch(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    B, H, dn = q_nope.shape
    R = w_uk.shape[2]
    out = output_buffer((B, H, R), q_nope.dtype, q_nope.device, POISON_OUTPUTS)
    BD = triton.next_power_of_2(dn)
    block_r = max(16, min(64, TILE // BD, triton.next_power_of_2(R)))
    ROWS = _rows(B)
    pdl = use_pdl(q_nope.device)
    _absorb_q_kernel[(H, triton.cdiv(R, block_r), triton.cdiv(B, ROWS))](
        q_nope, w_uk, out, B, dn, R,
        q_nope.stride(0), q_nope.stride(1), q_nope.stride(2), w_uk.stride(0), w_uk.stride(1),
        ROWS=ROWS, BD=BD, BLOCK_R=block_r, INTERP=_INTERPRET, PDL=pdl,
        num_warps=4, **launch_options(pdl),
    )
    return out


def _unabsorb_o_launch(o_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    B, H, R = o_lat.shape
    dv = w_uv.shape[1]
    out = output_buffer((B, H, dv), o_lat.dtype, o_lat.device, POISON_OUTPUTS)
    BK = min(MAX_BK, triton.next_power_of_2(R))
    block_v = max(1, min(16, TILE // BK, triton.next_power_of_2(dv)))
    ROWS = _rows(B)
    pdl = use_pdl(o_lat.device)
    _unabsorb_o_kernel[(H, triton.cdiv(dv, block_v), triton.cdiv(B, ROWS))](
        o_lat, w_uv, out, B, dv, R,
        o_lat.stride(0), o_lat.stride(1), w_uv.stride(0), w_uv.stride(1),
        ROWS=ROWS, BLOCK_V=block_v, BK=BK, INTERP=_INTERPRET, PDL=pdl,
        num_warps=4, **launch_options(pdl),
    )
    return out


# The launchers as custom ops: torch.compile keeps each as one opaque call (with a shape-only fake).
@torch.library.custom_op("attnlab::absorb_q", mutates_args=())
def _absorb_q_op(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    return _absorb_q_launch(q_nope, w_uk)


@_absorb_q_op.register_fake
def _(q_nope, w_uk):
    return q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_uk.shape[2])


@torch.library.custom_op("attnlab::unabsorb_o", mutates_args=())
def _unabsorb_o_op(o_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    return _unabsorb_o_launch(o_lat, w_uv)


@_unabsorb_o_op.register_fake
def _(o_lat, w_uv):
    return o_lat.new_empty(o_lat.shape[0], o_lat.shape[1], w_uv.shape[1])


def _check_absorb_q(q_nope: torch.Tensor, w_uk: torch.Tensor) -> None:
    check_tensor("w_uk", w_uk, 3, "[H, qk_nope_head_dim, kv_lora_rank]", dtypes=_DTYPES)
    H, dn, _ = w_uk.shape
    check_tensor("q_nope", q_nope, 3, "[B, H, qk_nope_head_dim]", shape=(None, H, dn), dtypes=(w_uk.dtype,))
    check_same_device(q_nope=q_nope, w_uk=w_uk)


def _check_unabsorb_o(o_lat: torch.Tensor, w_uv: torch.Tensor) -> None:
    check_tensor("w_uv", w_uv, 3, "[H, v_head_dim, kv_lora_rank]", dtypes=_DTYPES)
    H, _, R = w_uv.shape
    check_tensor("o_lat", o_lat, 3, "[B, H, kv_lora_rank]", shape=(None, H, R), dtypes=(w_uv.dtype,))
    check_same_device(o_lat=o_lat, w_uv=w_uv)


def _check_runs_here(name: str, t: torch.Tensor, fn: str) -> None:
    if t.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"{name}: {fn} runs a Triton kernel on CUDA tensors (or CPU ones under "
                         f"TRITON_INTERPRET=1), got device {t.device}; call {fn}_reference there")


def absorb_q(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """The absorbed query ``W_UK^T q_nope`` per head in one Triton launch.

    Args:
        q_nope: [B, H, dn] the heads' no-RoPE query parts, bf16 / fp16 / fp32; any strides (the fused
            step passes a strided view of the query row).
        w_uk: [H, dn, R] W_UK, q_nope's dtype, last dim contiguous (``kv_b_proj.weight.view(H, dn + dv,
            R)[:, :dn]`` is fine).

    Returns:
        q_lat [B, H, R] in q_nope's dtype, contiguous: ``einsum("bhd,hdr->bhr", q_nope, w_uk)``
        (float32 accumulation, one rounding). Inference only.
    """
    _check_absorb_q(q_nope, w_uk)
    _check_runs_here("q_nope", q_nope, "absorb_q")
    if w_uk.stride(-1) != 1:
        raise ValueError(f"w_uk: the last dim (kv_lora_rank) must be contiguous, got strides {w_uk.stride()}")
    return _absorb_q_op(q_nope, w_uk)


def absorb_q_reference(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """:func:`absorb_q` as the einsum (the oracle and the CPU path); same arguments and return."""
    _check_absorb_q(q_nope, w_uk)
    return torch.einsum("bhd,hdr->bhr", q_nope, w_uk)  # (B, H, R)


def unabsorb_o(o_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """The heads' outputs ``W_UV o_lat`` from their attention-weighted latents in one Triton launch.

    Args:
        o_lat: [B, H, R] the attention's weighted latents, bf16 / fp16 / fp32, last dim contiguous.
        w_uv: [H, dv, R] W_UV, o_lat's dtype, last dim contiguous (``kv_b_proj.weight.view(H, dn + dv,
            R)[:, dn:]`` is fine).

    Returns:
        o [B, H, dv] in o_lat's dtype, contiguous: ``einsum("bhr,hvr->bhv", o_lat, w_uv)`` (float32
        accumulation, one rounding). Inference only.
    """
    _check_unabsorb_o(o_lat, w_uv)
    _check_runs_here("o_lat", o_lat, "unabsorb_o")
    for name, t in (("o_lat", o_lat), ("w_uv", w_uv)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dim (kv_lora_rank) must be contiguous, got strides "
                             f"{t.stride()}")
    return _unabsorb_o_op(o_lat, w_uv)


def unabsorb_o_reference(o_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """:func:`unabsorb_o` as the einsum (the oracle and the CPU path); same arguments and return."""
    _check_unabsorb_o(o_lat, w_uv)
    return torch.einsum("bhr,hvr->bhv", o_lat, w_uv)  # (B, H, dv)


__all__ = ["absorb_q", "absorb_q_reference", "unabsorb_o", "unabsorb_o_reference"]
