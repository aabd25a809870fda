"""One Triton launch for a Gated DeltaNet (``G``) / Kimi Delta Attention (``K``) decode step,
between the layer's input projection and its output projection.

What :class:`attnlab.layers.deltanet.DeltaRuleMixer` does for one token with a cache (T == 1) is
~15 small kernels: the short-conv step and its state shift, SiLU, the q/k/v split, the q/k L2
norm, the decay, beta, the delta-rule step, the gated RMSNorm. :func:`delta_decode` does all of
it in ONE launch; :func:`delta_decode_reference` is the same from the layer's own torch pieces
(the oracle, and the fallback off CUDA).

Kernel layout: one program per (batch row, KEY head). A key head's q/k conv channels are shared
by the H / H_k value heads that use it, and the conv state is shifted in place: if each value
head had its own program, the one that writes the shifted q/k history could run before a sibling
has read the old one (programs have no order). So a program owns its key head's q/k channels
(conv, state shift, L2 norm once) and loops over its H / H_k value heads; for each: the v conv
and shift, the decay and beta, the [D_k, D_v] float32 state tile (64 KB at 128 x 128: 16 warps,
see num_warps), and the gated RMSNorm over all of D_v. With H == H_k (Kimi Linear) that is B·H
programs; with H_k = H / 2, half as many, each doing two heads one after the other.

Rounding (the layer's eager path rounds in more places; the results differ only by that):
- the conv is computed in float32 from the stored history, the new input and the weight, then
  SiLU, and rounded ONCE to proj's dtype (the layer rounds its bmm to the conv weight's dtype,
  then SiLU, then to proj's dtype: the same for a model in one dtype, one rounding fewer);
- q, k, v are those proj-dtype values (as in the layer), then float32: L2 norm (eps 1e-6, q also
  times D_k^-1/2), decay, beta, the recurrence and the norm are float32;
- o is rounded to proj's dtype before the gated norm (as the layer's step returns it), the norm
  output once, on store;
- the conv state keeps its dtype: its old entries move unchanged, the new input is stored cast
  from proj's dtype (the layer casts it through the conv weight's dtype first: the same unless
  that dtype is narrower than proj's).
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._checks import check_same_device, check_tensor
from ..layers.deltanet import DeltaRuleCache, GatedDeltaNet, KimiDeltaAttention
from ._pdl import use_pdl

POISON_OUTPUTS = False  # tests set this: the output buffer starts as NaN, so an unwritten element fails
NUM_WARPS: int | None = None  # None: chosen from the state tile (num_warps); a benchmark may set it
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_IO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_CONSTANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # mixer -> (conv, has bias, constants)


# ---------------------------------------------------------------------------------------------
# kernel


@triton.jit
def _softplus(x):
    """torch's F.softplus (beta 1, threshold 20): x above 20, else log(1 + e^x) = max(x, 0) +
    log(1 + e^-|x|) (no overflow). Where 1 + e^-|x| rounds to 1 (x < -17), the decay e^{-A·softplus}
    rounds to 1 in float32 anyway."""
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))


@triton.jit
def _conv_step(x_row, cs_row, w, bias, c, mc, rj, s_cc, s_ck, KC: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Short conv of channels c (masked by mc) for one token, SiLU, float32 [len(c)]; shifts
    these channels' conv state in place (history j <- input j + 1, the newest <- x).

    x_row: this row of proj (the conv input is its first C columns); cs_row: this row of the conv
    state [C, KC - 1] with strides (s_cc, s_ck); w: conv weight [C, KC] contiguous; rj: arange over
    a power of two >= KC (the window: KC - 1 history inputs, oldest first, then x)."""
    hist_ptr = cs_row + c[:, None] * s_cc + rj[None, :] * s_ck
    in_hist = mc[:, None] & (rj[None, :] < KC - 1)
    hist = tl.load(hist_ptr, mask=in_hist, other=0.0).to(tl.float32)
    x = tl.load(x_row + c, mask=mc, other=0.0).to(tl.float32)
    window = tl.where(rj[None, :] == KC - 1, x[:, None], hist)  # (channels, BJ)
    in_window = mc[:, None] & (rj[None, :] < KC)
    wt = tl.load(w + c[:, None] * KC + rj[None, :], mask=in_window, other=0.0).to(tl.float32)
    y = tl.sum(window * wt, 1)
    if HAS_BIAS:
        y += tl.load(bias + c, mask=mc, other=0.0).to(tl.float32)
    # every thread of the program has read the old history before any overwrites it (a thread may
    # store an element another thread loaded)
    tl.debug_barrier()
    tl.store(hist_ptr - s_ck, window.to(cs_row.dtype.element_ty), mask=in_window & (rj[None, :] >= 1))
    return y * tl.sigmoid(y)


@triton.jit
def _delta_decode_kernel(
    proj, s_proj, dec, s_dec, gate, s_gate, conv_w, conv_b, conv_state, s_cb, s_cc, s_ck,
    a_log, dt_bias, norm_w, state, o, scale, eps, lengths,
    H: tl.constexpr, HK: tl.constexpr, REP: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    KC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BJ: tl.constexpr,
    OFF_K: tl.constexpr, OFF_V: tl.constexpr, OFF_BETA: tl.constexpr, OFF_DEC: tl.constexpr,
    OFF_GATE: tl.constexpr, PER_CHANNEL: tl.constexpr, SIGMOID_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    COUNT: tl.constexpr, PDL: tl.constexpr, PRELOAD: tl.constexpr,
):
    if PDL:  # attnlab.kernels._pdl: the next kernel may launch; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    i_bk = tl.program_id(0)
    i_b = (i_bk // HK).to(tl.int64)
    i_hk = i_bk % HK
    if COUNT:  # the row's token counted here (no other program of the launch reads lengths)
        if i_hk == 0:
            tl.store(lengths + i_b, tl.load(lengths + i_b) + 1)
    io_ty = proj.dtype.element_ty
    p_row = proj + i_b * s_proj
    cs_row = conv_state + i_b * s_cb
    rk, rv, rj = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BJ)
    mk, mv = rk < K, rv < V
    # PRELOAD (tiles up to 64 x 64, as at the ~1B presets' sizes): the first value head's state tile
    # is loaded first, so its latency overlaps the convolutions instead of following them (a launch
    # of B·H_k programs is a chain of dependent loads); a 128 x 128 tile held that long would spill
    m_s = mk[:, None] & mv[None, :]
    if PRELOAD:
        s_first = (i_b * H + i_hk * REP) * (K * V) + rk[:, None] * V + rv[None, :]
        S_first = tl.load(state + s_first, mask=m_s, other=0.0)

    # q, k of this key head: conv + SiLU, rounded to proj's dtype (as the layer), L2 norm in float32
    b_q = _conv_step(p_row, cs_row, conv_w, conv_b, i_hk * K + rk, mk, rj, s_cc, s_ck, KC, HAS_BIAS)
    b_k = _conv_step(p_row, cs_row, conv_w, conv_b, OFF_K + i_hk * K + rk, mk, rj, s_cc, s_ck, KC, HAS_BIAS)
    b_q = b_q.to(io_ty).to(tl.float32)
    b_k = b_k.to(io_ty).to(tl.float32)
    b_q = b_q * (scale / tl.sqrt(tl.sum(b_q * b_q) + 1e-6))  # eps as ops.delta_rule._prepare_qk
    b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
    w_norm = tl.load(norm_w + rv, mask=mv, other=0.0).to(tl.float32)

    for r in tl.static_range(REP):  # the value heads this key head serves: i_hk·REP .. i_hk·REP + REP - 1
        i_h = i_hk * REP + r
        i_bh = i_b * H + i_h
        c_v = OFF_V + i_h * V + rv
        b_v = _conv_step(p_row, cs_row, conv_w, conv_b, c_v, mv, rj, s_cc, s_ck, KC, HAS_BIAS).to(io_ty)
        b_v = b_v.to(tl.float32)
        b_beta = tl.sigmoid(tl.load(p_row + OFF_BETA + i_h).to(tl.float32))
        # log-decay: -exp(A_log) · softplus(a + dt_bias), one per head (G) or per key channel (K)
        neg_a = -tl.exp(tl.load(a_log + i_h).to(tl.float32))
        if PER_CHANNEL:
            f = tl.load(dec + i_b * s_dec + OFF_DEC + i_h * K + rk, mask=mk, other=0.0).to(tl.float32)
            f += tl.load(dt_bias + i_h * K + rk, mask=mk, other=0.0).to(tl.float32)
        else:
            f = tl.load(dec + i_b * s_dec + OFF_DEC + i_h).to(tl.float32)
            f += tl.load(dt_bias + i_h).to(tl.float32)
        decay = tl.exp(neg_a * _softplus(f))

        # the delta rule on the float32 state tile (as attnlab.kernels.linear._step_kernel)
        s_off = i_bh * (K * V) + rk[:, None] * V + rv[None, :]
        if PRELOAD and r == 0:
            S = S_first
        else:
            S = tl.load(state + s_off, mask=m_s, other=0.0)
        if PER_CHANNEL:
            S = S * decay[:, None]
        else:
            S = S * decay
        u = b_beta * (b_v - tl.sum(S * b_k[:, None], 0))  # (BV,)
        S += b_k[:, None] * u[None, :]
        b_o = tl.sum(S * b_q[:, None], 0)  # (BV,)
        tl.store(state + s_off, S, mask=m_s)

        # gated RMSNorm over D_v: rmsnorm(o) · w · act(gate); o rounded as the layer's step returns it
        b_o = tl.where(mv, b_o.to(io_ty).to(tl.float32), 0.0)
        b_o = b_o / tl.sqrt(tl.sum(b_o * b_o) / V + eps) * w_norm
        z = tl.load(gate + i_b * s_gate + OFF_GATE + i_h * V + rv, mask=mv, other=0.0).to(tl.float32)
        if SIGMOID_GATE:
            b_o = b_o * tl.sigmoid(z)
        else:
            b_o = b_o * (z * tl.sigmoid(z))
        tl.store(o + i_bh * V + rv, b_o.to(o.dtype.element_ty), mask=mv)


# ---------------------------------------------------------------------------------------------
# host side


def kernel_constants(mixer) -> dict:
    """The kernel's compile-time arguments for this mixer (sizes, proj column offsets, variant);
    remembered per mixer (sizes are fixed at construction; a replaced conv is noticed)."""
    known = _CONSTANTS.get(mixer)
    if known is not None and known[0] is mixer.conv and known[1] == (mixer.conv.bias is not None):
        return known[2]
    per_channel = isinstance(mixer, KimiDeltaAttention)
    off, start = {}, 0
    for name, size in mixer.in_sizes.items():
        off[name] = start
        start += size
    H, Hk, Dk, Dv = mixer.n_heads, mixer.n_key_heads, mixer.key_head_dim, mixer.value_head_dim
    KC = mixer.conv.kernel_size
    const = dict(
        H=H, HK=Hk, REP=H // Hk, K=Dk, V=Dv, KC=KC, BK=max(16, triton.next_power_of_2(Dk)),
        BV=max(16, triton.next_power_of_2(Dv)), BJ=triton.next_power_of_2(KC),
        OFF_K=off["k"], OFF_V=off["v"], OFF_BETA=off["beta"],
        OFF_DEC=0 if per_channel else off["a"],  # K reads f_up, G proj's `a` columns
        OFF_GATE=0 if per_channel else off["z"],  # K reads g_up, G proj's `z` columns
        PER_CHANNEL=per_channel, SIGMOID_GATE=mixer.o_norm.activation == "sigmoid",
        HAS_BIAS=mixer.conv.bias is not None,
        PRELOAD=max(16, triton.next_power_of_2(Dk)) * max(16, triton.next_power_of_2(Dv)) <= 64 * 64,
    )
    _CONSTANTS[mixer] = (mixer.conv, const["HAS_BIAS"], const)
    return const


def num_warps(bk: int, bv: int) -> int:
    """Warps for a [bk, bv] state tile: NUM_WARPS if set, else one per 1024 elements in [4, 16]. At
    128 x 128 that is 16: compiled for sm_90 (Triton 3.9, on the CPU) the GDN kernel then needs 96
    registers (128 with two value heads per key head) and does not spill; at 8 warps it took 199-255
    and the KDA variant spilled 88 bytes (it spills those at 16 too: its per-channel decay)."""
    if NUM_WARPS is not None:
        return NUM_WARPS
    return max(4, min(16, bk * bv // 1024))


def _check(mixer, proj, cache, f_up, g_up) -> bool:
    """Validate the arguments; returns whether the decay is per channel (K)."""
    if not isinstance(mixer, (GatedDeltaNet, KimiDeltaAttention)):
        raise ValueError(f"mixer: expected a GatedDeltaNet or KimiDeltaAttention, got {type(mixer).__name__}")
    per_channel = isinstance(mixer, KimiDeltaAttention)
    H, Dk, Dv = mixer.n_heads, mixer.key_head_dim, mixer.value_head_dim
    width = sum(mixer.in_sizes.values())
    check_tensor("proj", proj, 2, f"[B, P = {width}] (mixer.in_proj(x)[:, 0])", shape=(None, width),
                 dtypes=_IO_DTYPES)
    B = proj.shape[0]
    if proj.stride(-1) != 1:
        raise ValueError(f"proj: the last dim must be contiguous, got strides {proj.stride()}")
    if not isinstance(cache, DeltaRuleCache):
        raise ValueError(f"cache: expected a DeltaRuleCache (mixer.new_cache), got {type(cache).__name__}")
    check_tensor("cache.state", cache.state, 4, "[B, H, D_k, D_v]", shape=(B, H, Dk, Dv),
                 dtypes=(torch.float32,))
    if not cache.state.is_contiguous():
        raise ValueError("cache.state: must be contiguous (it is updated in place)")
    C, KC = mixer.conv.channels, mixer.conv.kernel_size
    check_tensor("cache.conv_state", cache.conv_state, 3, "[B, C, K_conv - 1]", shape=(B, C, KC - 1),
                 dtypes=_IO_DTYPES)
    if not mixer.conv.activation:
        raise ValueError("mixer: its ShortConv has activation=False; the fused step applies SiLU")
    if per_channel:
        for name, t, size in (("f_up", f_up, H * Dk), ("g_up", g_up, H * Dv)):
            if t is None:
                raise ValueError(f"{name}: required for KimiDeltaAttention, [B, {size}] "
                                 f"(KimiDeltaAttention.project's parts['{name}'][:, 0])")
            check_tensor(name, t, 2, f"[B, {size}]", shape=(B, size), dtypes=_IO_DTYPES)
            if t.stride(-1) != 1:
                raise ValueError(f"{name}: the last dim must be contiguous, got strides {t.stride()}")
    else:
        for name, t in (("f_up", f_up), ("g_up", g_up)):
            if t is not None:
                raise ValueError(f"{name}: only for KimiDeltaAttention; pass None for GatedDeltaNet")
    check_same_device(proj=proj, cache_state=cache.state, cache_conv_state=cache.conv_state, f_up=f_up,
                      g_up=g_up, mixer_weights=mixer.conv.weight, mixer_A_log=mixer.A_log)
    return per_channel


@torch.no_grad()
def delta_decode(mixer, proj: torch.Tensor, cache, f_up: torch.Tensor | None = None,
                 g_up: torch.Tensor | None = None, count_token: bool = False) -> torch.Tensor:
    """A ``G`` / ``K`` layer's decode step between ``in_proj`` and ``o_proj``, in one Triton launch.

    mixer: the :class:`GatedDeltaNet` or :class:`KimiDeltaAttention` (its conv weight, A_log,
        dt_bias, o_norm weight / eps; sizes and ``in_sizes``).
    proj: [B, P] fp16 / bf16 / fp32, ``mixer.in_proj(x)[:, 0]`` for one token per row, columns in
        ``in_sizes`` order ([q | k | v | beta | z | a] for G, [q | k | v | beta | f | g] for K);
        the last dim contiguous (rows may be strided).
    cache: the layer's ``DeltaRuleCache``: state float32 [B, H, D_k, D_v] (contiguous) and
        conv_state [B, C, K_conv - 1] (fp16 / bf16 / fp32) are updated IN PLACE; ``cache.lengths``
        is NOT changed (the layer increments it) unless ``count_token``: then ``lengths += 1`` in
        the same launch (the fused decode step, attnlab.layers.fused).
    f_up, g_up: K only (required), [B, H·D_k] and [B, H·D_v], the gates' up-projections
        (``KimiDeltaAttention.project``'s parts["f_up"], parts["g_up"] at the token); None for G.

    Returns o [B, H·D_v] in proj's dtype: the layer's ``o_norm(o, gate)`` flattened, o_proj's input.
    Where it rounds differently from the layer: the module docstring. Inference only (no autograd).
    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    per_channel = _check(mixer, proj, cache, f_up, g_up)
    if not (proj.is_cuda or _INTERPRET):
        raise ValueError(f"proj: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests), "
                         f"got {proj.device}; use delta_decode_reference")
    H, Hk, Dk, Dv = mixer.n_heads, mixer.n_key_heads, mixer.key_head_dim, mixer.value_head_dim
    if Dk > _MAX_HEAD_DIM or Dv > _MAX_HEAD_DIM:
        raise ValueError(f"mixer: head dims up to {_MAX_HEAD_DIM} are supported, got D_k={Dk}, D_v={Dv}")
    B = proj.shape[0]
    conv, cs = mixer.conv, cache.conv_state
    KC = conv.kernel_size
    w = conv.weight.reshape(conv.channels, KC)  # (C, K_conv): a view of the [C, 1, K_conv] weight
    if not w.is_contiguous():
        w = w.contiguous()
    o = torch.empty(B, H * Dv, dtype=proj.dtype, device=proj.device)  # (B, H*D_v)
    if POISON_OUTPUTS:
        o.fill_(float("nan"))
    if B == 0:
        return o
    dec, s_dec = (f_up, f_up.stride(0)) if per_channel else (proj, proj.stride(0))
    gate, s_gate = (g_up, g_up.stride(0)) if per_channel else (proj, proj.stride(0))
    const = kernel_constants(mixer)
    pdl = use_pdl(proj.device)
    _delta_decode_kernel[(B * Hk,)](
        proj, proj.stride(0), dec, s_dec, gate, s_gate, w, w if conv.bias is None else conv.bias,
        cs, cs.stride(0), cs.stride(1), cs.stride(2),
        mixer.A_log, mixer.dt_bias, mixer.o_norm.weight, cache.state, o, Dk ** -0.5, float(mixer.o_norm.eps),
        cache.lengths, **const, COUNT=bool(count_token), PDL=pdl,
        num_warps=num_warps(const["BK"], const["BV"]), **({"launch_pdl": True} if pdl else {}),
    )
    return o


@torch.no_grad()
def delta_decode_reference(mixer, proj: torch.Tensor, cache, f_up: torch.Tensor | None = None,
                           g_up: torch.Tensor | None = None, count_token: bool = False) -> torch.Tensor:
    """:func:`delta_decode` from the mixer's own torch pieces (conv, log_decay, recurrence_step,
    output_gate, o_norm) in the order of ``DeltaRuleMixer.forward``'s T == 1 branch: the oracle and
    the fallback off CUDA. Same arguments, same in-place cache update (lengths untouched), same
    return: o [B, H·D_v] in proj's dtype."""
    per_channel = _check(mixer, proj, cache, f_up, g_up)
    B = proj.shape[0]
    x = proj.unsqueeze(1)  # (B, 1, P)
    parts = dict(zip(mixer.in_sizes, x.split(list(mixer.in_sizes.values()), dim=-1), strict=True))
    if per_channel:
        parts["f_up"], parts["g_up"] = f_up.unsqueeze(1), g_up.unsqueeze(1)  # (B, 1, H*D_k), (B, 1, H*D_v)
    qkv = mixer.conv(x[..., : mixer.conv.channels], cache.conv_state)[:, 0]  # (B, C)
    q, k, v = qkv.split([mixer.key_dim, mixer.key_dim, mixer.value_dim], dim=-1)
    q = q.reshape(B, mixer.n_key_heads, mixer.key_head_dim)  # (B, H_k, D_k)
    k = k.reshape(B, mixer.n_key_heads, mixer.key_head_dim)  # (B, H_k, D_k)
    v = v.reshape(B, mixer.n_heads, mixer.value_head_dim)  # (B, H, D_v)
    g = mixer.log_decay(parts)[:, 0]  # (B, H) or (B, H, D_k), float32
    beta = torch.sigmoid(parts["beta"].float())[:, 0]  # (B, H)
    o = mixer.recurrence_step(q, k, v, g, beta, cache.state)  # (B, H, D_v)
    gate = mixer.output_gate(parts).reshape(B, mixer.n_heads, mixer.value_head_dim)  # (B, H, D_v)
    if count_token:
        cache.lengths += 1
    return mixer.o_norm(o, gate).reshape(B, mixer.value_dim)  # (B, H*D_v)


__all__ = ["delta_decode", "delta_decode_reference"]
