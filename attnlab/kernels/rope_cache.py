"""One Triton launch for a softmax layer's decode-step q/k/v post-processing.

Between its fused q|k|v projection and the attention kernel, a decode step of
:class:`attnlab.layers.attention.SoftmaxAttention` splits the projection (and the output gate),
RMS-norms q and k per head, rotates them (RoPE, rotate-half, partial) and scatters the new k, v into
the cache: about ten small torch kernels per layer. :func:`rope_write` does all of it in one launch,
one program per (row, head) of the H + 2·H_kv heads; :func:`rope_write_reference` is the same with
the layer's own torch methods (the oracle, and the CPU path).

Numerics are those of ``SoftmaxAttention._qkv``: float32 rms-norm with weight (zero-centered:
h + h·w), then RoPE in float32 as ``x·cos + x[partner]·sin`` with the signed-sin tables of
:meth:`attnlab.layers.common.RotaryEmbedding.rotation`, one rounding to the projection's dtype (k
then a second one to the cache's dtype, as ``_write_slot`` casts it); v is copied with one cast.

Launch: grid (B, H + 2·H_kv), one or two warps, a head's D values (and, for RoPE, the same values
again in rotate-half partner order) per program; not tuned on a GPU — the work is a few KB. Cache
offsets are int64 (B·S·H_kv·D passes 2^31 at long context). Compiled for sm_90 on a CPU machine
(tests/test_kernels_rope_cache.py): cos / sin lower to libdevice's precise ``__nv_cosf`` /
``__nv_sinf``, as torch's CUDA tables use, so the in-kernel angles match them at ~1M positions.

CUDA-graph safe: row b's position is ``cache.lengths[b]``, read on the device; nothing on the host
reads a tensor value. Under ``torch.compile`` the launcher is an opaque custom op
(``attnlab::rope_write``, mutating the cache) as :mod:`attnlab.kernels.decode` does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._checks import check_same_device, check_tensor
from ..layers.attention import KVCache, SlidingKVCache, SoftmaxAttention, _ring_slot, _write_slot
from ._common import norm_weight, output_buffer
from ._pdl import launch_options, use_pdl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
POISON_OUTPUTS = False  # tests: fill every output buffer with NaN first, so an unwritten element fails
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _rope_write_kernel(
    QKV, LENGTHS, COS, SIN, FREQ, QW, KW, Q_OUT, G_OUT, K_CACHE, V_CACHE,
    stride_xb, stride_cb, stride_ob, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    S, WINDOW, SINKS, eps,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, QHEAD: tl.constexpr,
    HALF: tl.constexpr, GATE: tl.constexpr, NORM: tl.constexpr, ZERO_CENTERED: tl.constexpr,
    ROPE: tl.constexpr, TABLES: tl.constexpr, RING: tl.constexpr, PDL: tl.constexpr,
):
    """Program (row b, head h) of the H q heads, then H_kv k heads, then H_kv v heads of qkv row b:
    q head -> Q_OUT[b, h] (and its gate half -> G_OUT[b, h]); k / v head j -> cache[b, slot, j],
    slot = lengths[b] (ring slot with RING), skipped if outside [0, S)."""
    if PDL:  # attnlab.kernels._pdl: the next kernel may launch; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BD)
    d_ok = d < D
    row = QKV + b * stride_xb
    pos = tl.load(LENGTHS + b).to(tl.int64)
    if RING:
        slot = tl.where(pos < SINKS, pos, SINKS + (pos - SINKS) % WINDOW)
    else:
        slot = pos
    write_ok = d < tl.where((slot >= 0) & (slot < S), D, 0)  # (a scalar & a block mask trips the interpreter)

    if h >= H + HKV:  # a v head: a cast into the cache
        j = h - H - HKV
        v = tl.load(row + H * QHEAD + HKV * D + j * D + d, mask=d_ok)
        dst = V_CACHE + b * stride_vb + slot * stride_vs + j * stride_vh + d
        tl.store(dst, v.to(V_CACHE.dtype.element_ty), mask=write_ok)
    else:
        is_q = h < H
        if is_q:
            src = row + h * QHEAD
        else:
            src = row + H * QHEAD + (h - H) * D
        # rotate-half partner over the whole head: (i, i + HALF) for i < HALF, itself past 2 * HALF
        # (its sin is 0 there), as RotaryEmbedding.rot_partner
        if ROPE:
            partner = tl.where(d < HALF, d + HALF, tl.where(d < 2 * HALF, d - HALF, d))
        else:
            partner = d
        x = tl.load(src + d, mask=d_ok, other=0.0).to(tl.float32)  # (BD,)
        if NORM:
            inv = tl.rsqrt(tl.sum(x * x, 0) / D + eps)
            if is_q:
                w = tl.load(QW + d, mask=d_ok, other=0.0).to(tl.float32)
            else:
                w = tl.load(KW + d, mask=d_ok, other=0.0).to(tl.float32)
            x = x * inv
            x = norm_weight(x, w, ZERO_CENTERED)  # as _qk_norm
        if ROPE:
            xp = tl.load(src + partner, mask=d_ok, other=0.0).to(tl.float32)  # (BD,) x[partner]
            if NORM:
                if is_q:
                    wp = tl.load(QW + partner, mask=d_ok, other=0.0).to(tl.float32)
                else:
                    wp = tl.load(KW + partner, mask=d_ok, other=0.0).to(tl.float32)
                xp = norm_weight(xp * inv, wp, ZERO_CENTERED)
            if TABLES:
                c = tl.load(COS + b * stride_cb + d, mask=d_ok, other=1.0)
                s = tl.load(SIN + b * stride_cb + d, mask=d_ok, other=0.0)
            else:  # RotaryEmbedding.rotation: float32(p) * signed freq, then cos / sin in float32
                angle = pos.to(tl.float32) * tl.load(FREQ + d, mask=d_ok, other=0.0)
                c = tl.cos(angle)
                s = tl.sin(angle)
            x = x * c + xp * s
        out = x.to(QKV.dtype.element_ty)  # the one rounding of _qkv
        if is_q:
            tl.store(Q_OUT + b * stride_ob + h * stride_oh + d, out, mask=d_ok)
            if GATE:
                g = tl.load(src + D + d, mask=d_ok)
                tl.store(G_OUT + b * stride_ob + h * stride_oh + d, g, mask=d_ok)
        else:
            dst = K_CACHE + b * stride_kb + slot * stride_ks + (h - H) * stride_kh + d
            tl.store(dst, out.to(K_CACHE.dtype.element_ty), mask=write_ok)


# ---------------------------------------------------------------------------------------------
# host side


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return output_buffer(shape, dtype, device, POISON_OUTPUTS)


def _launch(
    qkv: torch.Tensor, lengths: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, rot_freq: torch.Tensor | None,
    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
    n_heads: int, gate: bool, rope_dim: int, eps: float, zero_centered: bool, window: int, sinks: int,
    ring: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    B = qkv.shape[0]
    H, Hkv, D = n_heads, k_cache.shape[2], k_cache.shape[3]
    q = _empty(B, H, D, dtype=qkv.dtype, device=qkv.device)
    g = _empty(B, H, D, dtype=qkv.dtype, device=qkv.device) if gate else q
    tables = cos is not None
    BD = triton.next_power_of_2(D)
    pdl = use_pdl(qkv.device)
    _rope_write_kernel[(B, H + 2 * Hkv)](
        qkv, lengths, cos if tables else qkv, sin if tables else qkv,
        rot_freq if rot_freq is not None else qkv,
        q_weight if q_weight is not None else qkv, k_weight if k_weight is not None else qkv,
        q, g, k_cache, v_cache,
        qkv.stride(0), cos.stride(0) if tables else 0, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], max(window, 1), sinks, eps,
        H=H, HKV=Hkv, D=D, BD=BD, QHEAD=D * (2 if gate else 1), HALF=rope_dim // 2, GATE=gate,
        NORM=q_weight is not None, ZERO_CENTERED=zero_centered, ROPE=rope_dim > 0, TABLES=tables,
        RING=ring, PDL=pdl, num_warps=1 if BD <= 128 else 2, **launch_options(pdl),
    )
    return q, g


# The launcher as a custom op mutating the cache: torch.compile keeps it as one opaque call.
@torch.library.custom_op("attnlab::rope_write", mutates_args=("k_cache", "v_cache"))
def _rope_write_op(
    qkv: torch.Tensor, lengths: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, rot_freq: torch.Tensor | None,
    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
    n_heads: int, gate: bool, rope_dim: int, eps: float, zero_centered: bool, window: int, sinks: int,
    ring: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, g = _launch(qkv, lengths, k_cache, v_cache, cos, sin, rot_freq, q_weight, k_weight,
                   n_heads, gate, rope_dim, eps, zero_centered, window, sinks, ring)
    return q, (g if gate else q.new_empty(0))  # a custom op may not return one tensor twice


@_rope_write_op.register_fake
def _(qkv, lengths, k_cache, v_cache, cos, sin, rot_freq, q_weight, k_weight,
      n_heads, gate, rope_dim, eps, zero_centered, window, sinks, ring):
    B, D = qkv.shape[0], k_cache.shape[3]
    q = qkv.new_empty(B, n_heads, D)
    return q, (qkv.new_empty(B, n_heads, D) if gate else qkv.new_empty(0))


def _check(attn, qkv, cache, rotation) -> None:
    """ValueError naming the argument for anything rope_write / rope_write_reference cannot take."""
    if not isinstance(attn, SoftmaxAttention):
        raise ValueError(f"attn: expected a SoftmaxAttention, got {type(attn).__name__}")
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    width = H * D * (2 if attn.output_gate else 1) + 2 * Hkv * D
    check_tensor("qkv", qkv, 2, "[B, H*D*(2 if output_gate else 1) + 2*H_kv*D]", shape=(None, width),
                 dtypes=_DTYPES)
    B = qkv.shape[0]
    want = KVCache if attn.window is None else SlidingKVCache
    if not isinstance(cache, want):
        raise ValueError(f"cache: expected a {want.__name__} from this layer's new_cache, got "
                         f"{type(cache).__name__}")
    check_tensor("cache.k", cache.k, 4, "[B, S, H_kv, D]", shape=(B, None, Hkv, D), dtypes=_DTYPES)
    check_tensor("cache.v", cache.v, 4, "[B, S, H_kv, D]", shape=tuple(cache.k.shape), dtypes=_DTYPES)
    check_tensor("cache.lengths", cache.lengths, 1, "[B]", shape=(B,), dtypes=(torch.int64,))
    if isinstance(cache, SlidingKVCache) and cache.window < 1:
        raise ValueError(f"cache: a SlidingKVCache needs window >= 1, got {cache.window}")
    cos = sin = None
    if rotation is not None and attn.rotary is not None:
        if not isinstance(rotation, (tuple, list)) or len(rotation) != 2:
            raise ValueError("rotation: expected (cos, sin) = attn.rotary.rotation(cache.lengths[:, None])")
        cos, sin = rotation
        for name, t in (("rotation[0] (cos)", cos), ("rotation[1] (sin)", sin)):
            check_tensor(name, t, 4, "[B, 1, 1, D]", shape=(None, 1, 1, D), dtypes=(torch.float32,))
            if t.shape[0] not in (1, B):
                raise ValueError(
                    f"{name}: expected shape ({B}, 1, 1, {D}) [B, 1, 1, D], got {tuple(t.shape)}"
                )
    check_same_device(qkv=qkv, cache_k=cache.k, cache_v=cache.v, cache_lengths=cache.lengths,
                      cos=cos, sin=sin)


def rope_write(
    attn: SoftmaxAttention,
    qkv: torch.Tensor,
    cache: KVCache | SlidingKVCache,
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A softmax layer's decode-step q/k/v post-processing in one Triton launch.

    Args:
        attn: the :class:`SoftmaxAttention` whose sizes, q/k norms, rotary and window apply.
        qkv: [B, W] the fused q|k|v projection of one token per row (bf16 / fp16 / fp32, last dim
            contiguous), W = H·D·(2 if output_gate else 1) + 2·H_kv·D laid out as ``_qkv`` splits it
            (q heads first, each [query D | gate D] with the output gate; then k heads; then v heads).
        cache: the layer's KVCache (window None) or SlidingKVCache. Row b's token has position
            p = cache.lengths[b] (read on the device); its normed, rotated k and its v go to slot p
            (ring slot with a SlidingKVCache) in the cache's dtype. ``cache.lengths`` is NOT changed.
            A slot outside the cache (no room) is not written: the layer checks room on the host.
        rotation: ``attn.rotary.rotation(cache.lengths[:, None])`` (cos, sin float32 [B, 1, 1, D]),
            or None: computed in the kernel from ``attn.rotary.rot_freq``. Ignored without rotary.

    Returns:
        q [B, H, D] (qkv's dtype, contiguous; normed and rotated, = ``_qkv``'s q[:, 0]) and gate
        [B, H, D] (qkv's dtype, contiguous) or None without output gate. Inference only.
    """
    _check(attn, qkv, cache, rotation)
    B = qkv.shape[0]
    if qkv.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"qkv: rope_write runs a Triton kernel on CUDA tensors (or CPU ones under "
                         f"TRITON_INTERPRET=1), got device {qkv.device}; call rope_write_reference there")
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv: the last dim must be contiguous (stride 1), got strides {qkv.stride()}")
    for name, t in (("cache.k", cache.k), ("cache.v", cache.v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got strides {t.stride()}")
    rotary, qn, kn = attn.rotary, attn.q_norm, attn.k_norm
    cos = sin = rot_freq = None
    if rotary is not None:
        if rotation is None:
            rot_freq = rotary.rot_freq
            if rot_freq.device != qkv.device or rot_freq.dtype != torch.float32:
                raise ValueError(f"attn: rotary.rot_freq is {rot_freq.dtype} on {rot_freq.device}; expected "
                                 f"float32 on {qkv.device} (move the layer with .to(device))")
        else:
            cos, sin = rotation
            if cos.shape[0] != B or sin.shape[0] != B or cos.stride() != sin.stride() or cos.stride(-1) != 1:
                cos, sin = (t.expand(B, 1, 1, attn.head_dim).contiguous() for t in (cos, sin))  # (B, 1, 1, D)
    q_weight = k_weight = None
    if qn is not None:
        q_weight, k_weight = qn.weight.detach().contiguous(), kn.weight.detach().contiguous()
        check_same_device(qkv=qkv, q_norm_weight=q_weight, k_norm_weight=k_weight)
    ring = isinstance(cache, SlidingKVCache)
    args = (
        qkv, cache.lengths, cache.k, cache.v, cos, sin, rot_freq, q_weight, k_weight,
        attn.n_heads, attn.output_gate, 0 if rotary is None else rotary.dim,
        float(qn.eps) if qn is not None else 0.0, bool(qn is not None and qn.zero_centered),
        cache.window if ring else 0, cache.sink_tokens if ring else 0, ring,
    )
    # the custom op only where torch.compile traces: its dispatch costs ~50 µs of host time per call
    # (measured on this CPU), which an eager decode step at batch 1 would pay per layer
    q, g = _rope_write_op(*args) if torch.compiler.is_compiling() else _launch(*args)
    return q, (g if attn.output_gate else None)


def rope_write_reference(
    attn: SoftmaxAttention,
    qkv: torch.Tensor,
    cache: KVCache | SlidingKVCache,
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`rope_write` in torch ops, from the layer's own ``_qk_norm``, ``_rotate``,
    ``_ring_slot`` and ``_write_slot`` (the split as ``_qkv`` does it): the oracle and the CPU path.
    Same arguments and returns (gate here is a view of qkv); writes the cache, leaves its lengths."""
    _check(attn, qkv, cache, rotation)
    B = qkv.shape[0]
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = qkv.split((H * D * (2 if attn.output_gate else 1), Hkv * D, Hkv * D), dim=-1)
    gate = None
    if attn.output_gate:
        q, gate = q.view(B, H, 2 * D).chunk(2, dim=-1)  # (B, H, D) each
    else:
        q = q.reshape(B, H, D)
    k, v = k.reshape(B, 1, Hkv, D), v.reshape(B, 1, Hkv, D)
    pos = cache.lengths
    if attn.q_norm is not None or attn.rotary is not None:
        qk = torch.cat((q[:, None], k), dim=2)  # (B, 1, H + H_kv, D)
        if attn.q_norm is not None:
            qk = attn._qk_norm(qk)  # float32
        if attn.rotary is not None:
            qk = attn._rotate(qk, pos[:, None], rotation, qkv.dtype)
        q, k = qk.to(qkv.dtype).split((H, Hkv), dim=2)  # (B, 1, H|H_kv, D)
        q = q[:, 0]  # (B, H, D)
    slot = _ring_slot(pos, cache.window, cache.sink_tokens) if isinstance(cache, SlidingKVCache) else pos
    _write_slot(cache, slot, k, v)
    return q.contiguous(), gate


__all__ = ["rope_write", "rope_write_reference"]
