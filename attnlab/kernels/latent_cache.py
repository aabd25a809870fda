"""One Triton launch for an MLA layer's decode-step latent and query post-processing.

Between the projections and the attention kernel, an absorbed decode step of
:class:`attnlab.layers.mla.MultiHeadLatentAttention` RMS-norms the new latent ``c_kv``, rotates
``k_pe`` and the heads' ``q_pe`` (RoPE, DeepSeek's interleaved pairs or rotate-half, YaRN's
attention factor), scatters ``[c_kv | k_pe]`` into the latent cache and concatenates each head's
absorbed query ``[W_UK^T q_nope | q_pe]`` (DeepSeek-V2 §2.1.3): about ten small torch kernels per
layer. :func:`latent_write` does it in one launch, grid (B, H + 1): programs 0 .. H-1 assemble head
h of the absorbed query, program H norms, rotates and stores row b's latent.
:func:`latent_write_reference` is the same from the layer's own torch pieces (the oracle, and the
CPU path).

Numerics are those of ``MultiHeadLatentAttention._project_fused`` + ``_write``: the norm in float32
(``x / rms(x) * w``, or ``h + h·w`` zero-centered), rounded to the projection's dtype; RoPE in
float32 as ``x·cos + x[partner]·sin`` with the per-column signed-sin tables of
:meth:`MultiHeadLatentAttention.rotation`, rounded once to the projection's dtype; the latent row
then cast to the cache's dtype as ``_write`` does (a second rounding only where the cache is
narrower than the projection).

CUDA-graph safe: row b's position is ``cache.lengths[b]``, read on the device; nothing on the host
reads a tensor value. Under ``torch.compile`` the launcher is an opaque custom op
(``attnlab::latent_write``, mutating the cache) as :mod:`attnlab.kernels.rope_cache` does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._checks import check_same_device, check_tensor
from ..layers.mla import DeepSeekSparseAttention, MLACache, MultiHeadLatentAttention, _rotate
from ._common import norm_weight, output_buffer
from ._pdl import launch_options, use_pdl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
POISON_OUTPUTS = False  # tests: fill every output buffer with NaN first, so an unwritten element fails
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _rope_cols(ROW, PARTNER, COS, SIN, FREQ, cols, ok, pos, factor,
               ROPE: tl.constexpr, TABLES: tl.constexpr):
    """Columns ``cols`` of one projection row rotated in float32: x·cos + x[partner]·sin, the
    partner column and the tables (or the angle pos·freq, with YaRN's factor) per column; the
    columns unrotated without ROPE."""
    x = tl.load(ROW + cols, mask=ok, other=0.0).to(tl.float32)
    if ROPE:
        partner = tl.load(PARTNER + cols, mask=ok, other=0)
        xp = tl.load(ROW + partner, mask=ok, other=0.0).to(tl.float32)  # x[partner]
        if TABLES:
            c = tl.load(COS + cols, mask=ok, other=1.0)
            s = tl.load(SIN + cols, mask=ok, other=0.0)
        else:  # MultiHeadLatentAttention.rotation: float32(p) * signed freq; cos, sin times the factor
            angle = pos.to(tl.float32) * tl.load(FREQ + cols, mask=ok, other=0.0)
            c = tl.cos(angle) * factor
            s = tl.sin(angle) * factor
        x = x * c + xp * s
    return x


@triton.jit
def _latent_write_kernel(
    Q, KV, Q_LAT, LENGTHS, COS, SIN, FREQ, PARTNER_Q, PARTNER_K, NORM_W, OUT, LATENT,
    stride_qb, stride_kvb, stride_lb, stride_lh, stride_cb,
    stride_cache_b, stride_cache_s, S, eps, factor,
    H: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, R: tl.constexpr,
    BR: tl.constexpr, BDR: tl.constexpr, NQ: tl.constexpr,
    ROPE: tl.constexpr, TABLES: tl.constexpr, ZERO_CENTERED: tl.constexpr, PDL: tl.constexpr,
):
    """Program (row b, h): h < H writes OUT[b, h] = [Q_LAT[b, h] | rope(q_pe of head h)];
    h == H writes LATENT[b, lengths[b]] = [rmsnorm(c_kv) | rope(k_pe)], skipped if the slot is
    outside [0, S)."""
    if PDL:  # attnlab.kernels._pdl: the next kernel may launch; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    r = tl.arange(0, BR)
    r_ok = r < R
    j = tl.arange(0, BDR)
    j_ok = j < DR
    pos = tl.load(LENGTHS + b).to(tl.int64)
    cos_row = COS + b * stride_cb
    sin_row = SIN + b * stride_cb
    if h < H:  # head h of the absorbed query
        out_row = OUT + (b * H + h) * (R + DR)
        lat = tl.load(Q_LAT + b * stride_lb + h * stride_lh + r, mask=r_ok)
        tl.store(out_row + r, lat.to(OUT.dtype.element_ty), mask=r_ok)
        cols = h * (DN + DR) + DN + j  # q_pe's columns in the query row
        q_pe = _rope_cols(Q + b * stride_qb, PARTNER_Q, cos_row, sin_row, FREQ, cols, j_ok, pos, factor,
                          ROPE, TABLES)
        tl.store(out_row + R + j, q_pe.to(OUT.dtype.element_ty), mask=j_ok)  # OUT has q's dtype: one rounding
    else:  # the latent row: norm, rope, cache store
        kv_row = KV + b * stride_kvb
        x = tl.load(kv_row + r, mask=r_ok, other=0.0).to(tl.float32)  # (BR,) c_kv
        inv = tl.rsqrt(tl.sum(x * x, 0) / R + eps)
        w = tl.load(NORM_W + r, mask=r_ok, other=0.0).to(tl.float32)
        x = x * inv
        c_kv = norm_weight(x, w, ZERO_CENTERED)
        c_kv = c_kv.to(KV.dtype.element_ty)  # kv_a_norm's rounding
        cols = R + j  # k_pe's columns in the key row [c_kv | k_pe]
        k_pe = _rope_cols(kv_row, PARTNER_K, cos_row + NQ, sin_row + NQ, FREQ + NQ, cols, j_ok, pos, factor,
                          ROPE, TABLES)
        k_pe = k_pe.to(KV.dtype.element_ty)  # _rotate's rounding
        # (a scalar & a block mask trips the interpreter: fold the slot test into the bounds)
        room = (pos >= 0) & (pos < S)
        dst = LATENT + b * stride_cache_b + pos * stride_cache_s  # 64-bit: B·S·(R+dr) may pass 2^31
        tl.store(dst + r, c_kv.to(LATENT.dtype.element_ty), mask=r < tl.where(room, R, 0))
        tl.store(dst + R + j, k_pe.to(LATENT.dtype.element_ty), mask=j < tl.where(room, DR, 0))


# ---------------------------------------------------------------------------------------------
# host side


def num_warps(block_r: int) -> int:
    """Warps per program for the latent's padded width block_r (the norm program reduces it)."""
    return 4 if block_r >= 512 else (2 if block_r >= 128 else 1)


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return output_buffer(shape, dtype, device, POISON_OUTPUTS)


def _launch(
    q: torch.Tensor, kv: torch.Tensor, q_lat: torch.Tensor, lengths: torch.Tensor, latent: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, freq: torch.Tensor | None,
    partner_q: torch.Tensor | None, partner_k: torch.Tensor | None, norm_weight: torch.Tensor,
    n_heads: int, nope_dim: int, rope_dim: int, eps: float, factor: float, zero_centered: bool,
) -> torch.Tensor:
    B, H, R = q_lat.shape
    dr = rope_dim
    out = _empty(B, H, R + dr, dtype=q.dtype, device=q.device)
    rope = partner_q is not None
    tables = cos is not None
    stride_cb = cos.stride(0) if tables and cos.shape[0] > 1 else 0  # one row of tables: broadcast
    BR = triton.next_power_of_2(R)
    dummy = q  # never read: an argument its constexpr switch leaves unused
    pdl = use_pdl(q.device)
    _latent_write_kernel[(B, H + 1)](
        q, kv, q_lat, lengths, cos if tables else dummy, sin if tables else dummy,
        freq if freq is not None else dummy, partner_q if rope else dummy, partner_k if rope else dummy,
        norm_weight, out, latent,
        q.stride(0), kv.stride(0), q_lat.stride(0), q_lat.stride(1), stride_cb,
        latent.stride(0), latent.stride(1), latent.shape[1], eps, factor,
        H=H, DN=nope_dim, DR=dr, R=R, BR=BR, BDR=triton.next_power_of_2(max(dr, 1)),
        NQ=H * (nope_dim + dr), ROPE=rope, TABLES=tables, ZERO_CENTERED=zero_centered,
        PDL=pdl, num_warps=num_warps(BR), **launch_options(pdl),
    )
    return out


# The launcher as a custom op mutating the cache: torch.compile keeps it as one opaque call.
@torch.library.custom_op("attnlab::latent_write", mutates_args=("latent",))
def _latent_write_op(
    q: torch.Tensor, kv: torch.Tensor, q_lat: torch.Tensor, lengths: torch.Tensor, latent: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, freq: torch.Tensor | None,
    partner_q: torch.Tensor | None, partner_k: torch.Tensor | None, norm_weight: torch.Tensor,
    n_heads: int, nope_dim: int, rope_dim: int, eps: float, factor: float, zero_centered: bool,
) -> torch.Tensor:
    return _launch(q, kv, q_lat, lengths, latent, cos, sin, freq, partner_q, partner_k, norm_weight,
                   n_heads, nope_dim, rope_dim, eps, factor, zero_centered)


@_latent_write_op.register_fake
def _(q, kv, q_lat, lengths, latent, cos, sin, freq, partner_q, partner_k, norm_weight,
      n_heads, nope_dim, rope_dim, eps, factor, zero_centered):
    B, H, R = q_lat.shape
    return q.new_empty(B, H, R + rope_dim)


def _check(mla, q, kv, q_lat, cache, rotation) -> None:
    """ValueError naming the argument for anything latent_write / latent_write_reference cannot take."""
    if isinstance(mla, DeepSeekSparseAttention) or not isinstance(mla, MultiHeadLatentAttention):
        raise ValueError(f"mla: expected a MultiHeadLatentAttention (not its DSA subclass, whose cache "
                         f"also holds indexer keys), got {type(mla).__name__}")
    H, dn, dr, R = mla.n_heads, mla.nope_dim, mla.rope_dim, mla.kv_lora_rank
    n_q = H * (dn + dr)
    check_tensor("q", q, 2, "[B, H*(qk_nope_head_dim + qk_rope_head_dim)]", shape=(None, n_q), dtypes=_DTYPES)
    B = q.shape[0]
    check_tensor("kv", kv, 2, "[B, kv_lora_rank + qk_rope_head_dim]", shape=(B, R + dr), dtypes=_DTYPES)
    check_tensor("q_lat", q_lat, 3, "[B, H, kv_lora_rank]", shape=(B, H, R), dtypes=(q.dtype,))
    if not isinstance(cache, MLACache):
        raise ValueError(
            f"cache: expected an MLACache from this layer's new_cache, got {type(cache).__name__}"
        )
    check_tensor("cache.latent", cache.latent, 4, "[B, S_max, 1, kv_lora_rank + qk_rope_head_dim]",
                 shape=(B, None, 1, R + dr), dtypes=_DTYPES)
    check_tensor("cache.lengths", cache.lengths, 1, "[B]", shape=(B,), dtypes=(torch.int64, torch.int32))
    cos = sin = None
    if rotation is not None:
        if mla.rotary is None:
            raise ValueError(
                "rotation: this layer has no RoPE (NoPE MLA); pass None (mla.rotation returns None)"
            )
        if not isinstance(rotation, (tuple, list)) or len(rotation) != 2:
            raise ValueError("rotation: expected (cos, sin) = mla.rotation(cache.lengths[:, None])")
        cos, sin = rotation
        n = n_q + R + dr
        for name, t in (("rotation[0] (cos)", cos), ("rotation[1] (sin)", sin)):
            check_tensor(name, t, 3, "[B, 1, N_q + N_k]", shape=(None, 1, n), dtypes=(torch.float32,))
            if t.shape[0] not in (1, B):
                raise ValueError(
                    f"{name}: expected shape ({B}, 1, {n}) [B, 1, N_q + N_k], got {tuple(t.shape)}"
                )
    check_same_device(q=q, kv=kv, q_lat=q_lat, cache_latent=cache.latent, cache_lengths=cache.lengths,
                      cos=cos, sin=sin)


def latent_write(
    mla: MultiHeadLatentAttention,
    q: torch.Tensor,
    kv: torch.Tensor,
    q_lat: torch.Tensor,
    cache: MLACache,
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """An MLA layer's decode-step latent norm, both RoPEs, latent cache write and absorbed-query
    assembly in one Triton launch.

    Args:
        mla: the :class:`MultiHeadLatentAttention` (not DSA) whose sizes, kv_a_norm and RoPE apply.
        q: [B, H·(dn + dr)] the query row of one token per row (``q_up`` on the normed q latent, or
            ``q_proj``), unrotated, per head [nope | rope]; bf16 / fp16 / fp32, last dim contiguous
            (a slice of a wider row is fine).
        kv: [B, R + dr] the row's [c_kv | k_pe] (kv_a_proj's part of ``x_proj``), unnormed and
            unrotated, last dim contiguous.
        q_lat: [B, H, R] W_UK^T q_nope per head, q's dtype, last dim contiguous.
        cache: the layer's MLACache. Row b's token has position p = cache.lengths[b] (read on the
            device); ``[kv_a_norm(c_kv) | rope(k_pe)]`` goes to cache.latent[b, p, 0] in the
            cache's dtype. ``cache.lengths`` is NOT changed. A slot outside the cache (no room) is
            not written: the layer checks room on the host.
        rotation: ``mla.rotation(cache.lengths[:, None])`` (cos, sin float32 [B, 1, N_q + N_k]), or
            None: computed in the kernel from ``mla.rope_freq``. Must be None for a NoPE layer.

    Returns:
        q_abs [B, H, R + dr] in q's dtype, contiguous: [q_lat | rope(q_pe)], the absorbed query of
        the layer's decode (``mla._absorb_q(q_nope, q_pe)[:, 0]``). Inference only.
    """
    _check(mla, q, kv, q_lat, cache, rotation)
    B = q.shape[0]
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"q: latent_write runs a Triton kernel on CUDA tensors (or CPU ones under "
                         f"TRITON_INTERPRET=1), got device {q.device}; call latent_write_reference there")
    for name, t in (("q", q), ("kv", kv), ("q_lat", q_lat), ("cache.latent", cache.latent)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got strides {t.stride()}")
    cos = sin = freq = partner_q = partner_k = None
    factor = 1.0
    if mla.rotary is not None:
        partner_q, partner_k = mla.rope_partner_q, mla.rope_partner_k
        if rotation is None:
            freq = mla.rope_freq
            if freq.device != q.device or freq.dtype != torch.float32:
                raise ValueError(f"mla: rope_freq is {freq.dtype} on {freq.device}; expected float32 on "
                                 f"{q.device} (move the layer with .to(device))")
            if mla.rope_cos_scale is not None:  # YaRN: cos and sin of the rotated columns times it
                factor = float(mla.rotary.attention_factor)
        else:
            cos, sin = rotation
            n = cos.shape[-1]
            if cos.shape[0] != sin.shape[0] or cos.stride(0) != sin.stride(0) or cos.stride(-1) != 1 \
                    or sin.stride(-1) != 1:
                cos, sin = (t.expand(B, 1, n).contiguous() for t in (cos, sin))  # (B, 1, N_q + N_k)
        check_same_device(q=q, rope_partner_q=partner_q)
    weight = mla.kv_a_norm.weight.detach()
    check_same_device(q=q, kv_a_norm_weight=weight)
    return _latent_write_op(
        q, kv, q_lat, cache.lengths, cache.latent, cos, sin, freq, partner_q, partner_k, weight.contiguous(),
        mla.n_heads, mla.nope_dim, mla.rope_dim, float(mla.kv_a_norm.eps), factor,
        bool(mla.kv_a_norm.zero_centered),
    )


def latent_write_reference(
    mla: MultiHeadLatentAttention,
    q: torch.Tensor,
    kv: torch.Tensor,
    q_lat: torch.Tensor,
    cache: MLACache,
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`latent_write` in torch ops, from the layer's own ``kv_a_norm``, :meth:`rotation`,
    ``_rotate`` with ``rope_partner_q`` / ``rope_partner_k``, ``_check_cache`` and ``_write`` (as
    ``_project_fused`` and ``forward``'s decode branch use them): the oracle and the CPU path. Same
    arguments and return; writes the cache, leaves its lengths (a full cache raises ValueError)."""
    _check(mla, q, kv, q_lat, cache, rotation)
    B = q.shape[0]
    H, dn, dr, R = mla.n_heads, mla.nope_dim, mla.rope_dim, mla.kv_lora_rank
    n_q = H * (dn + dr)
    mla._check_cache(cache, B, 1)
    c_kv = mla.kv_a_norm(kv[:, None, :R])  # (B, 1, R)
    k = torch.cat([c_kv, kv[:, None, R:]], dim=-1)  # (B, 1, R + dr)
    qr = q[:, None]  # (B, 1, N_q)
    tables = mla.rotation(cache.lengths[:, None]) if rotation is None else rotation
    if tables is not None:
        cos, sin = tables
        qr = _rotate(qr, cos[..., :n_q], sin[..., :n_q], mla.rope_partner_q)
        k = _rotate(k, cos[..., n_q:], sin[..., n_q:], mla.rope_partner_k)
    mla._write(cache.latent[:, :, 0], k, cache, None)
    q_pe = qr.reshape(B, H, dn + dr)[..., dn:]  # (B, H, dr)
    return torch.cat([q_lat, q_pe], dim=-1)  # (B, H, R + dr)


__all__ = ["latent_write", "latent_write_reference"]
