"""One Triton launch for an MLA layer's decode-step latent and query post-processing.

Between the projections and the attention kernel, an absorbed decode step of
:class:`attnlab.layers.mla.MultiHeadLatentAttention` RMS-norms the new latent ``c_kv``, rotates
``k_pe`` and the heads' ``q_pe`` (RoPE, DeepSeek's interleaved pairs or rotate-half, YaRN's
attention factor), scatters ``[c_kv | k_pe]`` into the latent cache and concatenates each head's
absorbed query ``[W_UK^T q_nope | q_pe]`` (DeepSeek-V2 §2.1.3): about ten small torch kernels per
layer. :func:`latent_write` does it in one launch, grid (B, H + 1): programs 0 .. H-1 assemble head
h of the absorbed query, program H norms, rotates and stores row b's latent. For a
:class:`~attnlab.layers.mla.DeepSeekSparseAttention` layer the same launch also does its lightning
indexer's part (another ~10 torch kernels): grid (B, H + 2 + H_I), program H + 1 LayerNorms (weight and
bias) the indexer key, rotates its first dims (NON-interleaved, the layer's positions and YaRN) and
stores it in ``cache.index_keys``, and scales the head weights (float32, index_head_dim^-0.5 ·
index_n_heads^-0.5); programs H + 2 + i rotate indexer query head i.
:func:`latent_write_reference` is the same from the layer's own torch pieces (the oracle, and the
CPU path).

Two options the fused decode step (attnlab.layers.fused) takes: ``q_lat=None`` — the launch computes
the absorbed query's ``W_UK^T q_nope`` itself, H·R/64 more programs per row, each a [dn, 64] tile of
``kv_b_proj.weight`` loaded before its PDL wait (as :func:`attnlab.kernels.absorb.absorb_q`), saving
that separate launch; ``count_token=True`` — the token is counted (``lengths += 1``) in the same
launch by the last of the row's programs to take a ticket (an acq_rel atomic, after a barrier: all
of them have read the old length), saving the separate increment.

Numerics are those of ``MultiHeadLatentAttention._project_fused`` + ``_write``: the norm in float32
(``x / rms(x) * w``, or ``h + h·w`` zero-centered), rounded to the projection's dtype; RoPE in
float32 as ``x·cos + x[partner]·sin`` with the per-column signed-sin tables of
:meth:`MultiHeadLatentAttention.rotation`, rounded once to the projection's dtype; the latent row
then cast to the cache's dtype as ``_write`` does (a second rounding only where the cache is
narrower than the projection). The indexer key: ``nn.LayerNorm`` in float32 rounded to the projection's
dtype, then RoPE as above (the partner column normalised from its own load).

CUDA-graph safe: row b's position is ``cache.lengths[b]``, read on the device; nothing on the host
reads a tensor value. Under ``torch.compile`` the launcher is an opaque custom op
(``attnlab::latent_write``, ``attnlab::dsa_latent_write``, mutating the cache) as
:mod:`attnlab.kernels.rope_cache` does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._checks import check_same_device, check_tensor
from ..layers.mla import DeepSeekSparseAttention, DSACache, MLACache, MultiHeadLatentAttention, _rotate
from ._common import norm_weight, output_buffer, reused_zeros, zero_share
from ._pdl import launch_options, use_pdl
from .absorb import _round

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
POISON_OUTPUTS = False  # tests: fill every output buffer with NaN first, so an unwritten element fails
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Each program loads its RoPE partner columns (a constant table) before the PDL wait, so that after it
# the row and its partner columns are one round trip, not two; False: after the wait, to compare.
# H100, 2026-11-28, the ~1B step, best of 2, ms, with / without (decode_ab_h100_early_partners_nv.json):
# deepseek-v32 4K 1.0769 / 1.0826, 32K 1.1798 / 1.1853, 128K 1.3681 / 1.3712; deepseek-v3 4K 0.8182 /
# 0.8191, 32K 0.9934 / 0.9972, 128K 1.6292 / 1.6302.
EARLY_PARTNERS = True


@triton.jit
def _cos_sin(COS, SIN, FREQ, cols, ok, pos, factor, TABLES: tl.constexpr):
    """cos and sin of columns ``cols`` from the tables, or from the angle pos·freq with YaRN's
    factor on the rotated columns (MultiHeadLatentAttention.rotation: cos of a passed-through column,
    freq 0, stays 1; its sin is 0 either way)."""
    if TABLES:
        c = tl.load(COS + cols, mask=ok, other=1.0)
        s = tl.load(SIN + cols, mask=ok, other=0.0)
    else:  # float32(p) * signed freq
        f = tl.load(FREQ + cols, mask=ok, other=0.0)
        angle = pos.to(tl.float32) * f
        c = tl.where(f != 0.0, tl.cos(angle) * factor, 1.0)
        s = tl.sin(angle) * factor
    return c, s


@triton.jit
def _rope_cols(ROW, PARTNER, COS, SIN, FREQ, cols, ok, pos, factor,
               ROPE: tl.constexpr, TABLES: tl.constexpr, partner=None):
    """Columns ``cols`` of one projection row rotated in float32: x·cos + x[partner]·sin, the
    partner column and the tables (or the angle pos·freq, with YaRN's factor) per column; the
    columns unrotated without ROPE. ``partner``: the partner columns already loaded from PARTNER
    (before the PDL wait: the table is constant), else loaded here."""
    x = tl.load(ROW + cols, mask=ok, other=0.0).to(tl.float32)
    if ROPE:
        if partner is None:
            partner = tl.load(PARTNER + cols, mask=ok, other=0)
        xp = tl.load(ROW + partner, mask=ok, other=0.0).to(tl.float32)  # x[partner]
        c, s = _cos_sin(COS, SIN, FREQ, cols, ok, pos, factor, TABLES)
        x = x * c + xp * s
    return x


@triton.jit
def _layer_norm_cols(ROW, W, B_, cols, ok, mean, rstd):
    """nn.LayerNorm of columns ``cols`` of ROW given the row's float32 mean and rstd: float32,
    rounded to ROW's dtype as the module's output is."""
    x = tl.load(ROW + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    bias = tl.load(B_ + cols, mask=ok, other=0.0).to(tl.float32)
    return ((x - mean) * rstd * w + bias).to(ROW.dtype.element_ty)


@triton.jit
def _absorb_program(Q, W_UK, OUT, b, i, stride_qb, stride_wh, stride_wd,
                    H: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, R: tl.constexpr, BD: tl.constexpr,
                    BLOCK_R: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr):
    """OUT[b, h, r] = Σ_d q_nope[b, h, d] · W_UK[h, d, r] for head h = i // (R / BLOCK_R) and BLOCK_R
    columns r (as attnlab.kernels.absorb.absorb_q, one row): the [dn, BLOCK_R] weight tile loaded
    before waiting for the previous kernel, float32 sums, one rounding to OUT's dtype."""
    n_blocks: tl.constexpr = (R + BLOCK_R - 1) // BLOCK_R
    h = (i // n_blocks).to(tl.int64)
    r = (i % n_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    d = tl.arange(0, BD)  # (BD,)
    r_ok = r < R
    d_ok = d < DN
    w = tl.load(W_UK + h * stride_wh + d[:, None] * stride_wd + r[None, :],
                mask=d_ok[:, None] & r_ok[None, :], other=0.0, eviction_policy="evict_first")  # (BD, BLOCK_R)
    if PDL:
        gdc_wait()  # q comes from the previous kernel
    q = tl.load(Q + b * stride_qb + h * (DN + DR) + d, mask=d_ok, other=0.0).to(tl.float32)  # (BD,) q_nope
    o = tl.sum(q[:, None] * w.to(tl.float32), axis=0)  # (BLOCK_R,)
    tl.store(OUT + (b * H + h) * (R + DR) + r, _round(o, OUT.dtype.element_ty, INTERP), mask=r_ok)


@triton.jit
def _latent_write_kernel(
    Q, KV, Q_LAT, LENGTHS, COS, SIN, FREQ, PARTNER_Q, PARTNER_K, NORM_W, OUT, LATENT,
    QI, W_OUT, INDEX_KEYS, K_NORM_W, K_NORM_B, TICKETS, W_UK,
    stride_qb, stride_wh, stride_wd, stride_kvb, stride_lb, stride_lh, stride_cb,
    stride_cache_b, stride_cache_s, stride_ik_b, stride_ik_s, S, eps, factor, k_eps, w_scale,
    H: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, R: tl.constexpr,
    BR: tl.constexpr, BDR: tl.constexpr, NQ: tl.constexpr,
    INDEX: tl.constexpr, HI: tl.constexpr, DI: tl.constexpr, BHI: tl.constexpr, BDI: tl.constexpr,
    ROPE: tl.constexpr, TABLES: tl.constexpr, ZERO_CENTERED: tl.constexpr, PDL: tl.constexpr,
    COUNT: tl.constexpr, NPROG: tl.constexpr, FOLD: tl.constexpr, BD: tl.constexpr, BLOCK_R: tl.constexpr,
    INTERP: tl.constexpr, EARLY_PARTNERS: tl.constexpr = False, ZERO=None, N_ZERO=0,
    ZERO_BLOCK: tl.constexpr = 0,
):
    """Program (row b, h): h < H writes OUT[b, h] = [Q_LAT[b, h] | rope(q_pe of head h)];
    h == H writes LATENT[b, lengths[b]] = [rmsnorm(c_kv) | rope(k_pe)], skipped if the slot is
    outside [0, S). With INDEX (a DSA layer): h == H + 1 writes INDEX_KEYS[b, lengths[b]] =
    rope(layernorm(k_I)) (same slot rule) and W_OUT[b] = float32(w_I) * w_scale; h = H + 2 + i writes
    QI[b, i] = rope(q_I head i). COUNT: LENGTHS[b] += 1 by the last of the row's NPROG programs to
    take a ticket (TICKETS[b], int32, zero between launches), once all have read the old value.
    FOLD: programs h >= NPROG compute q_lat themselves (:func:`_absorb_program`) instead of the
    h < H programs copying Q_LAT; they neither read LENGTHS nor take a ticket. EARLY_PARTNERS: each
    program loads its RoPE partner columns (constant tables) before the PDL wait. ZERO_BLOCK > 0: the
    programs also zero ZERO[0:N_ZERO] (int32, after the wait: the buffer may be memory a kernel
    before used): the top-k's scratch, which the index scores launched next add their histograms
    into (latent_write's ``zero``)."""
    if PDL:  # attnlab.kernels._pdl: the next kernel may launch
        gdc_launch_dependents()
    p = tl.program_id(1)
    if FOLD and p >= NPROG:  # W_UK^T q_nope: head h, columns [j·BLOCK_R, +BLOCK_R) of row b
        _absorb_program(Q, W_UK, OUT, tl.program_id(0).to(tl.int64), p - NPROG, stride_qb, stride_wh,
                        stride_wd, H, DN, DR, R, BD, BLOCK_R, INTERP, PDL)
    else:
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        r = tl.arange(0, BR)
        r_ok = r < R
        j = tl.arange(0, BDR)
        j_ok = j < DR
        if ROPE and EARLY_PARTNERS:  # the constant partner tables before the wait: one round trip less
            q_cols = tl.where(h < H, h * (DN + DR) + DN, 0) + j
            pj_q = tl.load(PARTNER_Q + q_cols, mask=j < tl.where(h < H, DR, 0), other=0)
            pj_k = tl.load(PARTNER_K + R + j, mask=j < tl.where(h == H, DR, 0), other=0)
            pj = tl.where(h < H, pj_q, pj_k)
            if INDEX:
                d = tl.arange(0, BDI)
                i_cols = tl.where(h >= H + 2, H * (DN + DR) + (h - H - 2) * DI, 0) + d
                pd_q = tl.load(PARTNER_Q + i_cols, mask=d < tl.where(h >= H + 2, DI, 0), other=0)
                pd_k = tl.load(PARTNER_K + R + DR + d, mask=d < tl.where(h == H + 1, DI, 0), other=R + DR)
                pd = tl.where(h >= H + 2, pd_q, pd_k - (R + DR))
            else:
                pd = None
        else:
            pj = None
            pd = None
        if PDL:  # wait for the previous kernel
            gdc_wait()
        pos = tl.load(LENGTHS + b).to(tl.int64)
        if COUNT:  # every thread has read pos before the ticket's release; the result is used at the end
            tl.debug_barrier()
            last = tl.atomic_add(TICKETS + b, 1, sem="acq_rel") == NPROG - 1
        # (a scalar & a block mask trips the interpreter: fold the slot test into the bounds)
        room = (pos >= 0) & (pos < S)
        cos_row = COS + b * stride_cb
        sin_row = SIN + b * stride_cb
        kv_row = KV + b * stride_kvb
        if h < H:  # head h of the absorbed query
            out_row = OUT + (b * H + h) * (R + DR)
            if not FOLD:  # q_lat given: copied (FOLD: the absorb programs write it)
                lat = tl.load(Q_LAT + b * stride_lb + h * stride_lh + r, mask=r_ok)
                tl.store(out_row + r, lat.to(OUT.dtype.element_ty), mask=r_ok)
            cols = h * (DN + DR) + DN + j  # q_pe's columns in the query row
            q_pe = _rope_cols(Q + b * stride_qb, PARTNER_Q, cos_row, sin_row, FREQ, cols, j_ok, pos, factor,
                              ROPE, TABLES, pj)
            # OUT has q's dtype: one rounding
            tl.store(out_row + R + j, q_pe.to(OUT.dtype.element_ty), mask=j_ok)
        elif h == H:  # the latent row: norm, rope, cache store
            x = tl.load(kv_row + r, mask=r_ok, other=0.0).to(tl.float32)  # (BR,) c_kv
            inv = tl.rsqrt(tl.sum(x * x, 0) / R + eps)
            w = tl.load(NORM_W + r, mask=r_ok, other=0.0).to(tl.float32)
            x = x * inv
            c_kv = norm_weight(x, w, ZERO_CENTERED)
            c_kv = c_kv.to(KV.dtype.element_ty)  # kv_a_norm's rounding
            cols = R + j  # k_pe's columns in the key row [c_kv | k_pe]
            k_pe = _rope_cols(kv_row, PARTNER_K, cos_row + NQ, sin_row + NQ, FREQ + NQ, cols, j_ok, pos,
                              factor, ROPE, TABLES, pj)
            k_pe = k_pe.to(KV.dtype.element_ty)  # _rotate's rounding
            dst = LATENT + b * stride_cache_b + pos * stride_cache_s  # 64-bit: B·S·(R+dr) may pass 2^31
            tl.store(dst + r, c_kv.to(LATENT.dtype.element_ty), mask=r < tl.where(room, R, 0))
            tl.store(dst + R + j, k_pe.to(LATENT.dtype.element_ty), mask=j < tl.where(room, DR, 0))
        elif INDEX:
            d = tl.arange(0, BDI)
            d_ok = d < DI
            # the indexer key: LayerNorm, rope on its first dims, cache store; the head weights
            if h == H + 1:
                k_row = kv_row + R + DR  # the key row is [c_kv | k_pe | k_I]: k_I's columns start at R + dr
                x = tl.load(k_row + d, mask=d_ok, other=0.0).to(tl.float32)
                mean = tl.sum(x, 0) / DI
                xc = tl.where(d_ok, x - mean, 0.0)
                rstd = tl.rsqrt(tl.sum(xc * xc, 0) / DI + k_eps)
                k = _layer_norm_cols(k_row, K_NORM_W, K_NORM_B, d, d_ok, mean, rstd).to(tl.float32)
                # x[partner] is the partner column's LayerNorm output: normalised again from its load
                if ROPE:
                    if pd is None:
                        partner = tl.load(PARTNER_K + R + DR + d, mask=d_ok, other=R + DR) - (R + DR)
                    else:
                        partner = pd
                    kp = _layer_norm_cols(k_row, K_NORM_W, K_NORM_B, partner, d_ok, mean, rstd).to(tl.float32)
                    c, s = _cos_sin(cos_row + NQ + R + DR, sin_row + NQ + R + DR, FREQ + NQ + R + DR, d, d_ok,
                                    pos, factor, TABLES)
                    k = k * c + kp * s
                k = k.to(KV.dtype.element_ty)  # _rotate's rounding
                dst = INDEX_KEYS + b * stride_ik_b + pos * stride_ik_s
                tl.store(dst + d, k.to(INDEX_KEYS.dtype.element_ty), mask=d < tl.where(room, DI, 0))
                e = tl.arange(0, BHI)
                e_ok = e < HI
                w_i = tl.load(k_row + DI + e, mask=e_ok, other=0.0).to(tl.float32) * w_scale
                tl.store(W_OUT + b * HI + e, w_i, mask=e_ok)
            else:  # indexer query head i: rope on its first dims
                i = h - H - 2
                cols = H * (DN + DR) + i * DI + d  # its columns in the query row [q heads | indexer q heads]
                q_i = _rope_cols(Q + b * stride_qb, PARTNER_Q, cos_row, sin_row, FREQ, cols, d_ok, pos,
                                 factor, ROPE, TABLES, pd)
                tl.store(QI + (b * HI + i) * DI + d, q_i.to(QI.dtype.element_ty), mask=d_ok)
        if COUNT:
            if last:  # every program of the row has read the old length: count the token
                tl.store(TICKETS + b, 0)  # all zeros again between launches (CUDA-graph replays)
                tl.store(LENGTHS + b, (pos + 1).to(LENGTHS.dtype.element_ty))
    if ZERO_BLOCK > 0:  # every program has waited above
        zero_share(ZERO, N_ZERO, tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
                   tl.num_programs(0) * tl.num_programs(1), ZERO_BLOCK)


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
    index_keys: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
    k_norm_bias: torch.Tensor | None = None, index_n_heads: int = 0, index_head_dim: int = 0,
    k_eps: float = 0.0, w_scale: float = 1.0, tickets: torch.Tensor | None = None,
    w_uk: torch.Tensor | None = None, zero: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One launch; with ``index_keys`` (a DSA layer) also the indexer's part -> (q_abs, q_idx, w)
    (the last two None without it); with ``tickets`` (int32 [B], zeros) it counts the token; with
    ``w_uk`` [H, dn, R] (q_lat None) it computes q_lat = W_UK^T q_nope itself (FOLD); with ``zero``
    (int32, contiguous) it also sets that buffer to zero."""
    dr = rope_dim
    B, H, R = q.shape[0], n_heads, latent.shape[-1] - dr
    fold = w_uk is not None
    index = index_keys is not None
    HI, DI = (index_n_heads, index_head_dim) if index else (0, 0)
    out = _empty(B, H, R + dr, dtype=q.dtype, device=q.device)
    q_idx = _empty(B, HI, DI, dtype=q.dtype, device=q.device) if index else None
    w = _empty(B, HI, dtype=torch.float32, device=q.device) if index else None
    rope = partner_q is not None
    tables = cos is not None
    stride_cb = cos.stride(0) if tables and cos.shape[0] > 1 else 0  # one row of tables: broadcast
    BR = triton.next_power_of_2(R)
    dummy = q  # never read: an argument its constexpr switch leaves unused
    pdl = use_pdl(q.device)
    n_prog = H + 1 + (1 + HI if index else 0)
    count = tickets is not None
    BD = triton.next_power_of_2(nope_dim)
    block_r = max(16, min(64, 8192 // BD, triton.next_power_of_2(R)))  # absorb.absorb_q's tile
    n_absorb = H * triton.cdiv(R, block_r) if fold else 0
    _latent_write_kernel[(B, n_prog + n_absorb)](
        q, kv, dummy if fold else q_lat, lengths, cos if tables else dummy, sin if tables else dummy,
        freq if freq is not None else dummy, partner_q if rope else dummy, partner_k if rope else dummy,
        norm_weight, out, latent,
        q_idx if index else dummy, w if index else dummy, index_keys if index else dummy,
        k_norm_weight if index else dummy, k_norm_bias if index else dummy, tickets if count else lengths,
        w_uk if fold else dummy, q.stride(0), w_uk.stride(0) if fold else 0, w_uk.stride(1) if fold else 0,
        kv.stride(0), 0 if fold else q_lat.stride(0), 0 if fold else q_lat.stride(1), stride_cb,
        latent.stride(0), latent.stride(1), index_keys.stride(0) if index else 0,
        index_keys.stride(1) if index else 0, latent.shape[1], eps, factor, k_eps, w_scale,
        H=H, DN=nope_dim, DR=dr, R=R, BR=BR, BDR=triton.next_power_of_2(max(dr, 1)),
        NQ=H * (nope_dim + dr) + HI * DI, INDEX=index, HI=HI, DI=DI,
        BHI=triton.next_power_of_2(max(HI, 1)), BDI=triton.next_power_of_2(max(DI, 1)),
        ROPE=rope, TABLES=tables, ZERO_CENTERED=zero_centered,
        PDL=pdl, COUNT=count, NPROG=n_prog, FOLD=fold, BD=BD, BLOCK_R=block_r, INTERP=_INTERPRET,
        EARLY_PARTNERS=EARLY_PARTNERS, ZERO=zero, N_ZERO=zero.numel() if zero is not None else 0,
        ZERO_BLOCK=1024 if zero is not None else 0, num_warps=num_warps(BR), **launch_options(pdl),
    )
    return out, q_idx, w


# The launchers as custom ops mutating the cache: torch.compile keeps each as one opaque call.
# ``tickets`` is always a tensor (empty: no token count) and has no default: torch 2.11's dispatcher
# drops trailing arguments equal to their defaults before its in-place bookkeeping indexes the mutated
# ones (IndexError on the H100 image with ``tickets=None`` last).
@torch.library.custom_op("attnlab::latent_write", mutates_args=("latent", "lengths", "tickets"))
def _latent_write_op(
    q: torch.Tensor, kv: torch.Tensor, q_lat: torch.Tensor | None, lengths: torch.Tensor,
    latent: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, freq: torch.Tensor | None,
    partner_q: torch.Tensor | None, partner_k: torch.Tensor | None, norm_weight: torch.Tensor,
    n_heads: int, nope_dim: int, rope_dim: int, eps: float, factor: float, zero_centered: bool,
    tickets: torch.Tensor, w_uk: torch.Tensor | None,
) -> torch.Tensor:
    return _launch(q, kv, q_lat, lengths, latent, cos, sin, freq, partner_q, partner_k, norm_weight,
                   n_heads, nope_dim, rope_dim, eps, factor, zero_centered,
                   tickets=tickets if tickets.numel() else None, w_uk=w_uk)[0]


@_latent_write_op.register_fake
def _(q, kv, q_lat, lengths, latent, cos, sin, freq, partner_q, partner_k, norm_weight,
      n_heads, nope_dim, rope_dim, eps, factor, zero_centered, tickets, w_uk):
    return q.new_empty(q.shape[0], n_heads, latent.shape[-1])


@torch.library.custom_op("attnlab::dsa_latent_write",
                         mutates_args=("latent", "index_keys", "lengths", "tickets", "zero"))
def _dsa_latent_write_op(
    q: torch.Tensor, kv: torch.Tensor, q_lat: torch.Tensor | None, lengths: torch.Tensor,
    latent: torch.Tensor,
    index_keys: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, freq: torch.Tensor | None,
    partner_q: torch.Tensor | None, partner_k: torch.Tensor | None, norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor, k_norm_bias: torch.Tensor,
    n_heads: int, nope_dim: int, rope_dim: int, eps: float, factor: float, zero_centered: bool,
    index_n_heads: int, index_head_dim: int, k_eps: float, w_scale: float,
    tickets: torch.Tensor, w_uk: torch.Tensor | None, zero: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(q, kv, q_lat, lengths, latent, cos, sin, freq, partner_q, partner_k, norm_weight,
                   n_heads, nope_dim, rope_dim, eps, factor, zero_centered, index_keys, k_norm_weight,
                   k_norm_bias, index_n_heads, index_head_dim, k_eps, w_scale,
                   tickets if tickets.numel() else None, w_uk, zero if zero.numel() else None)


@_dsa_latent_write_op.register_fake
def _(q, kv, q_lat, lengths, latent, index_keys, cos, sin, freq, partner_q, partner_k, norm_weight,
      k_norm_weight, k_norm_bias, n_heads, nope_dim, rope_dim, eps, factor, zero_centered,
      index_n_heads, index_head_dim, k_eps, w_scale, tickets, w_uk, zero):
    B = q.shape[0]
    return (q.new_empty(B, n_heads, latent.shape[-1]), q.new_empty(B, index_n_heads, index_head_dim),
            q.new_empty(B, index_n_heads, dtype=torch.float32))


def _widths(mla: MultiHeadLatentAttention) -> tuple[int, int]:
    """(query-row width, key-input width) latent_write takes: [q heads (| indexer q heads)] and
    [c_kv | k_pe (| indexer key | indexer head weights)]."""
    H, dn, dr, R = mla.n_heads, mla.nope_dim, mla.rope_dim, mla.kv_lora_rank
    if isinstance(mla, DeepSeekSparseAttention):
        HI, DI = mla.index_n_heads, mla.index_head_dim
        return H * (dn + dr) + HI * DI, R + dr + DI + HI
    return H * (dn + dr), R + dr


def _check(mla, q, kv, q_lat, cache, rotation) -> None:
    """ValueError naming the argument for anything latent_write / latent_write_reference cannot take."""
    if not isinstance(mla, MultiHeadLatentAttention):
        raise ValueError(f"mla: expected a MultiHeadLatentAttention (or its DSA subclass), got "
                         f"{type(mla).__name__}")
    index = isinstance(mla, DeepSeekSparseAttention)
    H, dr, R = mla.n_heads, mla.rope_dim, mla.kv_lora_rank
    n_q, n_kv = _widths(mla)
    q_layout = "[B, H*(qk_nope_head_dim + qk_rope_head_dim)"
    q_layout += " + index_n_heads*index_head_dim]" if index else "]"
    kv_layout = ("[B, kv_lora_rank + qk_rope_head_dim + index_head_dim + index_n_heads]" if index
                 else "[B, kv_lora_rank + qk_rope_head_dim]")
    check_tensor("q", q, 2, q_layout, shape=(None, n_q), dtypes=_DTYPES)
    B = q.shape[0]
    check_tensor("kv", kv, 2, kv_layout, shape=(B, n_kv), dtypes=_DTYPES)
    if q_lat is not None:
        check_tensor("q_lat", q_lat, 3, "[B, H, kv_lora_rank]", shape=(B, H, R), dtypes=(q.dtype,))
    want = DSACache if index else MLACache
    if not isinstance(cache, want):
        raise ValueError(
            f"cache: expected a {want.__name__} from this layer's new_cache, got {type(cache).__name__}"
        )
    check_tensor("cache.latent", cache.latent, 4, "[B, S_max, 1, kv_lora_rank + qk_rope_head_dim]",
                 shape=(B, None, 1, R + dr), dtypes=_DTYPES)
    if index:
        check_tensor("cache.index_keys", cache.index_keys, 3, "[B, S_max, index_head_dim]",
                     shape=(B, cache.latent.shape[1], mla.index_head_dim), dtypes=_DTYPES)
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
        n = n_q + R + dr + (mla.index_head_dim if index else 0)
        for name, t in (("rotation[0] (cos)", cos), ("rotation[1] (sin)", sin)):
            check_tensor(name, t, 3, "[B, 1, N_q + N_k]", shape=(None, 1, n), dtypes=(torch.float32,))
            if t.shape[0] not in (1, B):
                raise ValueError(
                    f"{name}: expected shape ({B}, 1, {n}) [B, 1, N_q + N_k], got {tuple(t.shape)}"
                )
    check_same_device(q=q, kv=kv, q_lat=q_lat, cache_latent=cache.latent, cache_lengths=cache.lengths,
                      cache_index_keys=cache.index_keys if index else None, cos=cos, sin=sin)


def latent_write(
    mla: MultiHeadLatentAttention,
    q: torch.Tensor,
    kv: torch.Tensor,
    q_lat: torch.Tensor | None,
    cache: MLACache,
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    count_token: bool = False,
    zero: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An MLA layer's decode-step latent norm, both RoPEs, latent cache write and absorbed-query
    assembly in one Triton launch; for a DSA layer also its indexer's key LayerNorm, RoPE and cache
    write, its query RoPE and its head weights, in the same launch.

    Args:
        mla: the :class:`MultiHeadLatentAttention` (or :class:`DeepSeekSparseAttention`) whose sizes,
            kv_a_norm, k_norm and RoPE apply.
        q: [B, N_q] the query row of one token per row (``q_up`` on the normed q latent, or the
            query part of ``x_proj``), unrotated: per MLA head [nope | rope] (H·(dn + dr)), then for
            DSA the indexer's query heads (H_I·D_I, rotated on their first dr dims, rotate-half);
            bf16 / fp16 / fp32, last dim contiguous (a slice of a wider row is fine).
        kv: [B, N_kv] the row's [c_kv | k_pe] (R + dr, kv_a_proj's part of ``x_proj``), then for DSA
            the indexer's [key | head weights] (D_I + H_I, wk's and weights_proj's parts), unnormed
            and unrotated, last dim contiguous.
        q_lat: [B, H, R] W_UK^T q_nope per head, q's dtype, last dim contiguous; or None: computed
            in the same launch from q's nope parts and W_UK (``kv_b_proj.weight``, q's dtype), by
            H·R/64 more programs (as :func:`attnlab.kernels.absorb.absorb_q`, per row).
        cache: the layer's MLACache (DSACache for DSA). Row b's token has position p =
            cache.lengths[b] (read on the device); ``[kv_a_norm(c_kv) | rope(k_pe)]`` goes to
            cache.latent[b, p, 0] and (DSA) ``rope(k_norm(k_I))`` to cache.index_keys[b, p], in the
            cache's dtype. ``cache.lengths`` is NOT changed unless ``count_token``. A slot outside
            the cache (no room) is not written: the layer checks room on the host.
        rotation: ``mla.rotation(cache.lengths[:, None])`` (cos, sin float32 [B, 1, N_q + N_k]), or
            None: computed in the kernel from ``mla.rope_freq``. Must be None for a NoPE layer.
        count_token: also count the token, ``cache.lengths += 1`` in place, in the same launch:
            the last of a row's programs to take a ticket (an int32 [B] buffer per device, zero
            between launches) increments it once every program has read the old value (as
            delta_decode's count_token; the tickets are shared, so not for concurrent launches of
            the same B on two streams). ``cache.lengths`` must then be contiguous.
        zero: DSA layers only: None, or a contiguous 1-D int32 buffer on q's device that the same
            launch sets to zero (the scratch of the decode step's top-k, which the index scores
            launched next add their histograms into: ``dsa_index_scores(..., topk_scratch=)``).

    Returns:
        q_abs [B, H, R + dr] in q's dtype, contiguous: [q_lat | rope(q_pe)], the absorbed query of
        the layer's decode (``mla._absorb_q(q_nope, q_pe)[:, 0]``). For DSA the tuple (q_abs,
        q_idx [B, H_I, D_I] in q's dtype, contiguous: the rotated indexer query, w float32 [B, H_I]:
        the head weights times index_head_dim^-0.5 · index_n_heads^-0.5), as ``_project_fused``
        returns them. Inference only.
    """
    _check(mla, q, kv, q_lat, cache, rotation)
    B = q.shape[0]
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"q: latent_write runs a Triton kernel on CUDA tensors (or CPU ones under "
                         f"TRITON_INTERPRET=1), got device {q.device}; call latent_write_reference there")
    index = isinstance(mla, DeepSeekSparseAttention)
    tensors = [("q", q), ("kv", kv), ("cache.latent", cache.latent)]
    if q_lat is not None:
        tensors.append(("q_lat", q_lat))
    if index:
        tensors.append(("cache.index_keys", cache.index_keys))
    for name, t in tensors:
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
    args = (mla.n_heads, mla.nope_dim, mla.rope_dim, float(mla.kv_a_norm.eps), factor,
            bool(mla.kv_a_norm.zero_centered))
    w_uk = None
    if q_lat is None:
        w_uk = _w_uk(mla)
        if w_uk.dtype != q.dtype or w_uk.device != q.device:
            raise ValueError(f"mla: kv_b_proj.weight is {w_uk.dtype} on {w_uk.device}; q_lat=None needs q's "
                             f"dtype and device ({q.dtype} on {q.device})")
    _check_zero(mla, q, zero)
    tickets = cache.lengths.new_empty(0, dtype=torch.int32)  # empty: no token count
    if count_token:
        if not cache.lengths.is_contiguous():
            raise ValueError(f"cache.lengths: count_token needs it contiguous, got strides "
                             f"{cache.lengths.stride()}")
        tickets = _tickets(B, q.device)
    if not index:
        return _latent_write_op(q, kv, q_lat, cache.lengths, cache.latent, cos, sin, freq, partner_q,
                                partner_k, weight.contiguous(), *args, tickets, w_uk)
    k_w, k_b = mla.k_norm.weight, mla.k_norm.bias
    if k_w is None or k_b is None:
        raise ValueError("mla: k_norm must have a weight and a bias (nn.LayerNorm, elementwise_affine)")
    check_same_device(q=q, k_norm_weight=k_w, k_norm_bias=k_b)
    return _dsa_latent_write_op(
        q, kv, q_lat, cache.lengths, cache.latent, cache.index_keys, cos, sin, freq, partner_q, partner_k,
        weight.contiguous(), k_w.detach().contiguous(), k_b.detach().contiguous(), *args,
        mla.index_n_heads, mla.index_head_dim, float(mla.k_norm.eps), _index_weight_scale(mla), tickets, w_uk,
        zero if zero is not None else tickets.new_empty(0),
    )


def _check_zero(mla: MultiHeadLatentAttention, q: torch.Tensor, zero: torch.Tensor | None) -> None:
    """ValueError naming ``zero`` unless it is None or a DSA layer's contiguous 1-D int32 buffer on q's
    device (latent_write / latent_write_reference's ``zero``)."""
    if zero is None:
        return
    if not isinstance(mla, DeepSeekSparseAttention):
        raise ValueError("zero: only a DSA layer's latent_write clears the top-k's scratch")
    if zero.dtype != torch.int32 or zero.dim() != 1 or not zero.is_contiguous():
        raise ValueError(f"zero: expected a contiguous 1-D int32 buffer, got {zero.dtype} of shape "
                         f"{tuple(zero.shape)} and strides {zero.stride()}")
    check_same_device(q=q, zero=zero)


def _w_uk(mla: MultiHeadLatentAttention) -> torch.Tensor:
    """W_UK [H, dn, R]: a view of kv_b_proj.weight (R contiguous)."""
    H, dn, R = mla.n_heads, mla.nope_dim, mla.kv_lora_rank
    return mla.kv_b_proj.weight.detach().view(H, dn + mla.v_head_dim, R)[:, :dn]


_TICKETS: dict[tuple, torch.Tensor] = {}  # (device, B) -> int32 [B] zeros between launches


def _tickets(B: int, device: torch.device) -> torch.Tensor:
    """The count_token tickets for B rows on ``device``: created zeroed once and reused by every later
    launch (so none is allocated inside a CUDA-graph capture after the first call)."""
    return reused_zeros(_TICKETS, (device, B), B, torch.int32, device)


def _index_weight_scale(dsa: DeepSeekSparseAttention) -> float:
    """The indexer's scales folded into its head weights (as DeepSeekSparseAttention._project_fused)."""
    return dsa.index_head_dim**-0.5 * dsa.index_n_heads**-0.5


def latent_write_reference(
    mla: MultiHeadLatentAttention,
    q: torch.Tensor,
    kv: torch.Tensor,
    q_lat: torch.Tensor | None,
    cache: MLACache,
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    count_token: bool = False,
    zero: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`latent_write` in torch ops, from the layer's own ``kv_a_norm`` (and DSA's ``k_norm``),
    :meth:`rotation`, ``_rotate`` with ``rope_partner_q`` / ``rope_partner_k``, ``_check_cache`` and
    ``_write`` (as ``_project_fused`` and ``forward``'s decode branch use them): the oracle and the
    CPU path. Same arguments and return; writes the cache, leaves its lengths unless ``count_token``
    (then ``cache.lengths += 1`` last; a full cache raises ValueError); sets ``zero`` to zero."""
    _check(mla, q, kv, q_lat, cache, rotation)
    _check_zero(mla, q, zero)
    if zero is not None:
        zero.zero_()
    B = q.shape[0]
    H, dn, dr, R = mla.n_heads, mla.nope_dim, mla.rope_dim, mla.kv_lora_rank
    index = isinstance(mla, DeepSeekSparseAttention)
    n_q = H * (dn + dr)
    mla._check_cache(cache, B, 1)
    c_kv = mla.kv_a_norm(kv[:, None, :R])  # (B, 1, R)
    parts = [c_kv, kv[:, None, R : R + dr]]
    if index:
        parts.append(mla.k_norm(kv[:, None, R + dr : R + dr + mla.index_head_dim]))  # (B, 1, D_I)
    k = torch.cat(parts, dim=-1)  # (B, 1, R + dr [+ D_I])
    qr = q[:, None]  # (B, 1, N_q)
    tables = mla.rotation(cache.lengths[:, None]) if rotation is None else rotation
    if tables is not None:
        cos, sin = tables
        n_rows = q.shape[1]
        qr = _rotate(qr, cos[..., :n_rows], sin[..., :n_rows], mla.rope_partner_q)
        k = _rotate(k, cos[..., n_rows:], sin[..., n_rows:], mla.rope_partner_k)
    mla._write(cache.latent[:, :, 0], k[..., : R + dr], cache, None)
    q_pe = qr[..., :n_q].reshape(B, H, dn + dr)[..., dn:]  # (B, H, dr)
    if q_lat is None:  # as absorb_q_reference (the einsum)
        q_nope = q[:, :n_q].view(B, H, dn + dr)[..., :dn]  # (B, H, dn)
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope, _w_uk(mla))  # (B, H, R)
    q_abs = torch.cat([q_lat, q_pe], dim=-1)  # (B, H, R + dr)
    if index:
        mla._write(cache.index_keys, k[..., R + dr :], cache, None)
    if count_token:  # after every use of the old lengths (the tables above, both writes)
        cache.lengths += 1
    if not index:
        return q_abs
    q_idx = qr[:, 0, n_q:].reshape(B, mla.index_n_heads, mla.index_head_dim)  # (B, H_I, D_I)
    w = kv[:, R + dr + mla.index_head_dim :].float() * _index_weight_scale(mla)  # (B, H_I)
    return q_abs, q_idx.contiguous(), w


__all__ = ["latent_write", "latent_write_reference"]
