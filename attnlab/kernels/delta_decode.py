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
programs; with H_k = H / 2, half as many, each doing two heads.

K's gates: given f_up / g_up (the gates' up-projections, [B, H·D_k] / [B, H·D_v]) the kernel reads
them; without (the fused decode step, attnlab.layers.fused) each program applies its value head's
rows of ``f_b_proj`` / ``g_b_proj`` (W_f [D_k, rank], W_g [D_v, rank]: 2 x 64 x 64 bf16 = 16 KB at
the ~1B Kimi preset) to proj's f / g columns itself, saving the separate bmm launch (~3 us a layer
on an H100).

At the ~1B presets' sizes the launch is only 16-32 programs, so its time is each program's chain of
DEPENDENT memory round trips, not its bytes. A program therefore issues ALL its global loads first
(the q / k / v conv histories, inputs and weights, beta, A_log, dt_bias, a or f_up, the gate, or K's
up-projection weights and proj's f / g columns, the state tiles, the norm weight: none depends on
another), computes, passes ONE barrier (every thread
has read the old conv history before any thread overwrites it: a thread may store an element another
thread loaded) and then stores everything (shifted conv histories, state, o, the token count). Two
value heads per key head (Qwen3-Next) are loaded together; at tiles over 64 x 64 (SPLIT) the second
head's state tile is loaded only after the first's is stored (two 128 x 128 float32 tiles would
spill), and K's up-projections are applied as soon as their weights arrive, before the state tile
is loaded (weight and state tiles at once would spill more); heads beyond two (no preset) follow one
by one, each with its own barrier.

Rounding (the layer's eager path rounds in more places; the results differ only by that):
- the conv is computed in float32 from the stored history, the new input and the weight, then
  SiLU, and rounded ONCE to proj's dtype (the layer rounds its bmm to the conv weight's dtype,
  then SiLU, then to proj's dtype: the same for a model in one dtype, one rounding fewer);
- K's f_up / g_up, when computed here: float32 sums rounded to proj's dtype (= the weights' dtype,
  checked), as the layer's Linear / bmm returns them; only the accumulation order differs;
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
from ._pdl import launch_options, use_pdl

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
def _conv_load(x_row, cs_row, w, bias, c, mc, rj, s_cc, s_ck, KC: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The loads of one short-conv step for channels c (masked by mc), all independent: returns the
    window float32 [len(c), BJ] (the KC - 1 history inputs of the conv state, oldest first, then x,
    zero past KC), the weight float32 [len(c), BJ] and the bias float32 [len(c)] (zeros without one).

    x_row: this row of proj (the conv input is its first C columns); cs_row: this row of the conv
    state [C, KC - 1] with strides (s_cc, s_ck); w: conv weight [C, KC] contiguous; rj: arange over
    a power of two >= KC."""
    in_hist = mc[:, None] & (rj[None, :] < KC - 1)
    hist = tl.load(cs_row + c[:, None] * s_cc + rj[None, :] * s_ck, mask=in_hist, other=0.0).to(tl.float32)
    x = tl.load(x_row + c, mask=mc, other=0.0).to(tl.float32)
    wt = tl.load(w + c[:, None] * KC + rj[None, :], mask=mc[:, None] & (rj[None, :] < KC), other=0.0)
    if HAS_BIAS:
        b = tl.load(bias + c, mask=mc, other=0.0).to(tl.float32)
    else:
        b = tl.zeros_like(x)
    window = tl.where(rj[None, :] == KC - 1, x[:, None], hist)  # (channels, BJ)
    return window, wt.to(tl.float32), b


@triton.jit
def _conv_silu(window, wt, b, io_ty: tl.constexpr):
    """The conv output of a loaded window (_conv_load), SiLU, rounded to io_ty (as the layer),
    returned as float32 [channels]."""
    y = tl.sum(window * wt, 1) + b
    return (y * tl.sigmoid(y)).to(io_ty).to(tl.float32)


@triton.jit
def _conv_shift(cs_row, c, mc, rj, s_cc, s_ck, window, KC: tl.constexpr):
    """Shifts channels c's conv state in place: history j <- window j + 1 (the newest <- x). Only
    after a barrier that follows every thread's _conv_load of these channels (a thread may store an
    element another thread loaded)."""
    hist_ptr = cs_row + c[:, None] * s_cc + rj[None, :] * s_ck
    shifted = mc[:, None] & (rj[None, :] >= 1) & (rj[None, :] < KC)
    tl.store(hist_ptr - s_ck, window.to(cs_row.dtype.element_ty), mask=shifted)


@triton.jit
def _head_load(p_row, cs_row, conv_w, conv_b, dec_row, gate_row, a_log, dt_bias, w_f, w_g, s_wf, s_wg, i_h,
               rk, rv, rj, rr, mk, mv, mr, s_cc, s_ck, K: tl.constexpr, V: tl.constexpr,
               KC: tl.constexpr, OFF_V: tl.constexpr, OFF_BETA: tl.constexpr, OFF_DEC: tl.constexpr,
               OFF_GATE: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, UP: tl.constexpr):
    """Every global load of value head i_h but its state tile (_state_load), none depending on
    another: its v conv (_conv_load), beta, A_log, the decay input a (G, scalar) or f_up (K, [BK])
    and dt_bias, the gate z / g_up [BV] (all float32). UP (K without f_up / g_up): instead of f_up
    and g_up, this head's rows of the up-projection weights, W_f [BK, BR] and W_g [BV, BR] (their
    dtype; rows with row strides s_wf / s_wg, columns rr < rank), which _head_step applies."""
    v_win, v_wt, v_b = _conv_load(p_row, cs_row, conv_w, conv_b, OFF_V + i_h * V + rv, mv, rj, s_cc, s_ck,
                                  KC, HAS_BIAS)
    beta = tl.load(p_row + OFF_BETA + i_h).to(tl.float32)
    a = tl.load(a_log + i_h).to(tl.float32)
    if PER_CHANNEL:
        if UP:
            f = tl.load(w_f + (i_h * K + rk)[:, None] * s_wf + rr[None, :], mask=mk[:, None] & mr[None, :],
                        other=0.0)  # (BK, BR)
        else:
            f = tl.load(dec_row + OFF_DEC + i_h * K + rk, mask=mk, other=0.0).to(tl.float32)
        dtb = tl.load(dt_bias + i_h * K + rk, mask=mk, other=0.0).to(tl.float32)
    else:
        f = tl.load(dec_row + OFF_DEC + i_h).to(tl.float32)
        dtb = tl.load(dt_bias + i_h).to(tl.float32)
    if UP:
        z = tl.load(w_g + (i_h * V + rv)[:, None] * s_wg + rr[None, :], mask=mv[:, None] & mr[None, :],
                    other=0.0)  # (BV, BR)
    else:
        z = tl.load(gate_row + OFF_GATE + i_h * V + rv, mask=mv, other=0.0).to(tl.float32)
    return v_win, v_wt, v_b, beta, a, f, dtb, z


@triton.jit
def _state_load(state, i_b, i_h, rk, rv, mk, mv, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Value head i_h's float32 state tile [BK, BV] (zero outside [K, V])."""
    s_off = (i_b * H + i_h) * (K * V) + rk[:, None] * V + rv[None, :]
    return tl.load(state + s_off, mask=mk[:, None] & mv[None, :], other=0.0)


@triton.jit
def _gate_up(w, x, io_ty: tl.constexpr):
    """A gate's up-projection for one head: its weight rows w [rows, BR] times proj's columns x [BR]
    (float32), summed in float32 and rounded to io_ty as the layer's Linear / bmm returns it;
    float32 [rows]."""
    return tl.sum(w.to(tl.float32) * x[None, :], 1).to(io_ty).to(tl.float32)


@triton.jit
def _head_step(b_q, b_k, w_norm, v_win, v_wt, v_b, beta, a, f, dtb, z, x_f, x_g, S, mv, eps,
               io_ty: tl.constexpr, V: tl.constexpr, PER_CHANNEL: tl.constexpr, SIGMOID_GATE: tl.constexpr,
               UP: tl.constexpr):
    """One value head's step from its loads (_head_load), no memory access: returns the new state
    tile [BK, BV] and the gated-normed output [BV] (float32; stored by the caller). UP: f and z are
    the head's W_f / W_g rows, applied here to proj's f / g columns x_f, x_g [BR] (float32)."""
    if UP:
        f = _gate_up(f, x_f, io_ty)  # (BK,)
        z = _gate_up(z, x_g, io_ty)  # (BV,)
    b_v = _conv_silu(v_win, v_wt, v_b, io_ty)
    b_beta = tl.sigmoid(beta)
    # log-decay: -exp(A_log) · softplus(a + dt_bias), one per head (G) or per key channel (K)
    decay = tl.exp(-tl.exp(a) * _softplus(f + dtb))
    # the delta rule on the float32 state tile (as attnlab.kernels.linear._step_kernel)
    if PER_CHANNEL:
        S = S * decay[:, None]
    else:
        S = S * decay
    u = b_beta * (b_v - tl.sum(S * b_k[:, None], 0))  # (BV,)
    S += b_k[:, None] * u[None, :]
    b_o = tl.sum(S * b_q[:, None], 0)  # (BV,)
    # gated RMSNorm over D_v: rmsnorm(o) · w · act(gate); o rounded as the layer's step returns it
    b_o = tl.where(mv, b_o.to(io_ty).to(tl.float32), 0.0)
    b_o = b_o / tl.sqrt(tl.sum(b_o * b_o) / V + eps) * w_norm
    if SIGMOID_GATE:
        b_o = b_o * tl.sigmoid(z)
    else:
        b_o = b_o * (z * tl.sigmoid(z))
    return S, b_o


@triton.jit
def _head_store(state, o, i_b, i_h, S, b_o, rk, rv, mk, mv, H: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr):
    """Value head i_h's state tile and output."""
    i_bh = i_b * H + i_h
    tl.store(state + i_bh * (K * V) + rk[:, None] * V + rv[None, :], S, mask=mk[:, None] & mv[None, :])
    tl.store(o + i_bh * V + rv, b_o.to(o.dtype.element_ty), mask=mv)


@triton.jit
def _delta_decode_kernel(
    proj, s_proj, dec, s_dec, gate, s_gate, conv_w, conv_b, conv_state, s_cb, s_cc, s_ck,
    a_log, dt_bias, norm_w, state, o, scale, eps, lengths, w_f, w_g, s_wf, s_wg,
    H: tl.constexpr, HK: tl.constexpr, REP: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    KC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BJ: tl.constexpr,
    OFF_K: tl.constexpr, OFF_V: tl.constexpr, OFF_BETA: tl.constexpr, OFF_DEC: tl.constexpr,
    OFF_GATE: tl.constexpr, PER_CHANNEL: tl.constexpr, SIGMOID_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    COUNT: tl.constexpr, PDL: tl.constexpr, SPLIT: tl.constexpr, UP: tl.constexpr, BR: tl.constexpr,
    RANK: tl.constexpr, OFF_F: tl.constexpr, OFF_G: tl.constexpr,
):
    if PDL:  # attnlab.kernels._pdl: the next kernel may launch; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    i_bk = tl.program_id(0)
    i_b = (i_bk // HK).to(tl.int64)
    i_hk = i_bk % HK
    io_ty: tl.constexpr = proj.dtype.element_ty
    # K without f_up / g_up: the gates' up-projections here, in _head_step (UP_LATE) or, at tiles over
    # 64 x 64 (SPLIT), as soon as the weights arrive (their tiles and the state's at once would spill)
    UP_LATE: tl.constexpr = UP and not SPLIT
    p_row = proj + i_b * s_proj
    dec_row = dec + i_b * s_dec
    gate_row = gate + i_b * s_gate
    cs_row = conv_state + i_b * s_cb
    rk, rv, rj, rr = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BJ), tl.arange(0, BR)
    mk, mv, mr = rk < K, rv < V, rr < RANK
    c_q = i_hk * K + rk
    c_k = OFF_K + i_hk * K + rk
    i_h0 = i_hk * REP  # the value heads this key head serves: i_h0 .. i_h0 + REP - 1

    # 1. every load of the key head and its first two value heads, issued together: one DRAM round
    # trip for the program (each conv's load -> barrier -> store, the state tile, the gate came one
    # after another before); with two value heads at tiles over 64 x 64 (SPLIT) head 1's tile waits
    if COUNT:  # the row's token counted here (one program per row; no other reads lengths)
        count_it = i_hk == 0
        n_tok = tl.load(lengths + i_b, mask=count_it, other=0)
    args = (p_row, cs_row, conv_w, conv_b, dec_row, gate_row, a_log, dt_bias, w_f, w_g, s_wf, s_wg)
    if UP:  # proj's f and g columns, the up-projections' inputs (shared by the value heads)
        x_f = tl.load(p_row + OFF_F + rr, mask=mr, other=0.0).to(tl.float32)
        x_g = tl.load(p_row + OFF_G + rr, mask=mr, other=0.0).to(tl.float32)
    else:
        x_f = tl.zeros([BR], dtype=tl.float32)  # unused
        x_g = x_f
    q_win, q_wt, q_b = _conv_load(p_row, cs_row, conv_w, conv_b, c_q, mk, rj, s_cc, s_ck, KC, HAS_BIAS)
    k_win, k_wt, k_b = _conv_load(p_row, cs_row, conv_w, conv_b, c_k, mk, rj, s_cc, s_ck, KC, HAS_BIAS)
    w_norm = tl.load(norm_w + rv, mask=mv, other=0.0).to(tl.float32)
    v0_win, v0_wt, v0_b, beta0, a0, f0, dtb0, z0 = _head_load(
        *args, i_h0, rk, rv, rj, rr, mk, mv, mr, s_cc, s_ck, K, V, KC, OFF_V, OFF_BETA, OFF_DEC, OFF_GATE,
        PER_CHANNEL, HAS_BIAS, UP)
    if UP and SPLIT:  # tiles over 64 x 64: head 0's gates applied before its state tile is loaded
        f0, z0 = _gate_up(f0, x_f, io_ty), _gate_up(z0, x_g, io_ty)
    S0 = _state_load(state, i_b, i_h0, rk, rv, mk, mv, H, K, V)
    if REP >= 2:
        v1_win, v1_wt, v1_b, beta1, a1, f1, dtb1, z1 = _head_load(
            *args, i_h0 + 1, rk, rv, rj, rr, mk, mv, mr, s_cc, s_ck, K, V, KC, OFF_V, OFF_BETA, OFF_DEC,
            OFF_GATE, PER_CHANNEL, HAS_BIAS, UP)
        if UP and SPLIT:
            f1, z1 = _gate_up(f1, x_f, io_ty), _gate_up(z1, x_g, io_ty)
        if not SPLIT:
            S1 = _state_load(state, i_b, i_h0 + 1, rk, rv, mk, mv, H, K, V)

    # 2. compute: q, k of this key head (conv, SiLU, rounded to proj's dtype as the layer, L2 norm in
    # float32, eps as ops.delta_rule._prepare_qk), then the value heads
    b_q = _conv_silu(q_win, q_wt, q_b, io_ty)
    b_k = _conv_silu(k_win, k_wt, k_b, io_ty)
    b_q = b_q * (scale / tl.sqrt(tl.sum(b_q * b_q) + 1e-6))
    b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
    S0, o0 = _head_step(b_q, b_k, w_norm, v0_win, v0_wt, v0_b, beta0, a0, f0, dtb0, z0, x_f, x_g, S0, mv, eps,
                        io_ty, V, PER_CHANNEL, SIGMOID_GATE, UP_LATE)
    if REP >= 2:
        if SPLIT:  # two tiles of 128 x 128 would spill: head 0's is stored (no barrier needed: only the
            # conv history is shared between threads' loads and stores) before head 1's is loaded
            _head_store(state, o, i_b, i_h0, S0, o0, rk, rv, mk, mv, H, K, V)
            S1 = _state_load(state, i_b, i_h0 + 1, rk, rv, mk, mv, H, K, V)
        S1, o1 = _head_step(b_q, b_k, w_norm, v1_win, v1_wt, v1_b, beta1, a1, f1, dtb1, z1, x_f, x_g, S1, mv,
                            eps, io_ty, V, PER_CHANNEL, SIGMOID_GATE, UP_LATE)

    # 3. every thread of the program has read the old conv history before any overwrites it (a
    # thread may store an element another thread loaded); then every store
    tl.debug_barrier()
    _conv_shift(cs_row, c_q, mk, rj, s_cc, s_ck, q_win, KC)
    _conv_shift(cs_row, c_k, mk, rj, s_cc, s_ck, k_win, KC)
    _conv_shift(cs_row, OFF_V + i_h0 * V + rv, mv, rj, s_cc, s_ck, v0_win, KC)
    if not (SPLIT and REP >= 2):
        _head_store(state, o, i_b, i_h0, S0, o0, rk, rv, mk, mv, H, K, V)
    if REP >= 2:
        _conv_shift(cs_row, OFF_V + (i_h0 + 1) * V + rv, mv, rj, s_cc, s_ck, v1_win, KC)
        _head_store(state, o, i_b, i_h0 + 1, S1, o1, rk, rv, mk, mv, H, K, V)
    if COUNT:
        tl.store(lengths + i_b, n_tok + 1, mask=count_it)

    # more than two value heads per key head (no preset has them): the rest one after another, each
    # its own loads -> compute -> barrier -> stores (its v channels are its own)
    for r in tl.static_range(2, REP):
        i_h = i_h0 + r
        v_win, v_wt, v_b, beta, a, f, dtb, z = _head_load(
            *args, i_h, rk, rv, rj, rr, mk, mv, mr, s_cc, s_ck, K, V, KC, OFF_V, OFF_BETA, OFF_DEC, OFF_GATE,
            PER_CHANNEL, HAS_BIAS, UP)
        if UP and SPLIT:
            f, z = _gate_up(f, x_f, io_ty), _gate_up(z, x_g, io_ty)
        S = _state_load(state, i_b, i_h, rk, rv, mk, mv, H, K, V)
        S, b_o = _head_step(b_q, b_k, w_norm, v_win, v_wt, v_b, beta, a, f, dtb, z, x_f, x_g, S, mv, eps,
                            io_ty, V, PER_CHANNEL, SIGMOID_GATE, UP_LATE)
        tl.debug_barrier()
        _conv_shift(cs_row, OFF_V + i_h * V + rv, mv, rj, s_cc, s_ck, v_win, KC)
        _head_store(state, o, i_b, i_h, S, b_o, rk, rv, mk, mv, H, K, V)


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
    rank = mixer.f_b_proj.in_features if per_channel else 1  # K's gates' low-rank width (f, g columns)
    const = dict(
        H=H, HK=Hk, REP=H // Hk, K=Dk, V=Dv, KC=KC, BK=max(16, triton.next_power_of_2(Dk)),
        BV=max(16, triton.next_power_of_2(Dv)), BJ=triton.next_power_of_2(KC),
        OFF_K=off["k"], OFF_V=off["v"], OFF_BETA=off["beta"],
        OFF_DEC=0 if per_channel else off["a"],  # K reads f_up, G proj's `a` columns
        OFF_GATE=0 if per_channel else off["z"],  # K reads g_up, G proj's `z` columns
        PER_CHANNEL=per_channel, SIGMOID_GATE=mixer.o_norm.activation == "sigmoid",
        HAS_BIAS=mixer.conv.bias is not None,
        RANK=rank, BR=max(16, triton.next_power_of_2(rank)),
        OFF_F=off["f"] if per_channel else 0, OFF_G=off["g"] if per_channel else 0,  # UP reads them
        # two value heads per program at tiles over 64 x 64: the second state tile loaded after the
        # first is stored (both held at once would spill at 128 x 128)
        SPLIT=max(16, triton.next_power_of_2(Dk)) * max(16, triton.next_power_of_2(Dv)) > 64 * 64,
    )
    _CONSTANTS[mixer] = (mixer.conv, const["HAS_BIAS"], const)
    return const


def num_warps(bk: int, bv: int) -> int:
    """Warps for a [bk, bv] state tile: NUM_WARPS if set, else one per 1024 elements in [4, 16]: 4 at
    64 x 64, 16 at 128 x 128. H100, one call back to back in a CUDA graph (warm L2), all loads issued
    up front: Qwen3-Next-style (H 32 / H_k 16, D 64) 4.28 us at 4 warps vs 6.12 at 8; Kimi-style
    (32 / 32, D 64) 3.66 vs 4.16 (before the loads were issued up front: 8.6 and 6.7 us at 4 warps;
    the recurrence-only step kernel of attnlab.kernels.linear 2.3 us). Compiled for sm_90 (Triton
    3.9, on the CPU): D = 128 at 16 warps, G (H_k = H) 115 registers and no spill, G with two value
    heads per key head 128 and 8 bytes of stack (its second state tile is loaded after the first is
    stored: SPLIT), K 128 and 120 bytes (its per-channel decay). K computing its gates'
    up-projections (f_up / g_up None, the fused step): D = 64 at 4 warps 255 registers and no spill
    (136 at 8 warps: worth timing), D = 128 at 16 warps 176 bytes of stack."""
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
    if per_channel and (f_up is None) != (g_up is None):
        name, size = ("f_up", H * Dk) if f_up is None else ("g_up", H * Dv)
        raise ValueError(f"{name}: pass f_up and g_up together ([B, {size}], KimiDeltaAttention.project's "
                         f"parts['{name}'][:, 0]) or neither (computed from proj's f / g columns)")
    if per_channel and f_up is None:  # the up-projections are applied here: the layer's Linears' dtype
        for lin in (mixer.f_b_proj, mixer.g_b_proj):
            if lin.weight.dtype != proj.dtype:
                raise ValueError(f"proj: dtype {proj.dtype} differs from the gates' up-projection weights' "
                                 f"{lin.weight.dtype}; pass f_up and g_up, or proj in the weights' dtype")
    elif per_channel:
        for name, t, size in (("f_up", f_up, H * Dk), ("g_up", g_up, H * Dv)):
            check_tensor(name, t, 2, f"[B, {size}]", shape=(B, size), dtypes=_IO_DTYPES)
            if t.stride(-1) != 1:
                raise ValueError(f"{name}: the last dim must be contiguous, got strides {t.stride()}")
    else:
        for name, t in (("f_up", f_up), ("g_up", g_up)):
            if t is not None:
                raise ValueError(f"{name}: only for KimiDeltaAttention; pass None for GatedDeltaNet")
    check_same_device(proj=proj, cache_state=cache.state, cache_conv_state=cache.conv_state, f_up=f_up,
                      g_up=g_up, mixer_weights=mixer.conv.weight, mixer_A_log=mixer.A_log,
                      mixer_f_b_proj=mixer.f_b_proj.weight if per_channel else None,
                      mixer_g_b_proj=mixer.g_b_proj.weight if per_channel else None)
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
    f_up, g_up: K only, [B, H·D_k] and [B, H·D_v], the gates' up-projections
        (``KimiDeltaAttention.project``'s parts["f_up"], parts["g_up"] at the token); None for G.
        Both None for K (the fused decode step): each program computes its value heads' rows from
        proj's f / g columns and ``f_b_proj`` / ``g_b_proj``'s weights (which must be in proj's
        dtype) — float32 sums rounded to proj's dtype, as the layer's Linear / bmm returns them.

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
    up = per_channel and f_up is None  # K: the gates' up-projections in the kernel
    dec, s_dec = (f_up, f_up.stride(0)) if per_channel and not up else (proj, proj.stride(0))
    gate, s_gate = (g_up, g_up.stride(0)) if per_channel and not up else (proj, proj.stride(0))
    w_f = w_g = proj  # unused unless up
    if up:
        w_f, w_g = mixer.f_b_proj.weight, mixer.g_b_proj.weight  # (H*D_k, rank), (H*D_v, rank)
        w_f, w_g = (w if w.stride(-1) == 1 else w.contiguous() for w in (w_f, w_g))
    const = kernel_constants(mixer)
    pdl = use_pdl(proj.device)
    _delta_decode_kernel[(B * Hk,)](
        proj, proj.stride(0), dec, s_dec, gate, s_gate, w, w if conv.bias is None else conv.bias,
        cs, cs.stride(0), cs.stride(1), cs.stride(2),
        mixer.A_log, mixer.dt_bias, mixer.o_norm.weight, cache.state, o, Dk ** -0.5, float(mixer.o_norm.eps),
        cache.lengths, w_f, w_g, w_f.stride(0), w_g.stride(0), **const, COUNT=bool(count_token), PDL=pdl,
        UP=up,
        num_warps=num_warps(const["BK"], const["BV"]), **launch_options(pdl),
    )
    return o


@torch.no_grad()
def delta_decode_reference(mixer, proj: torch.Tensor, cache, f_up: torch.Tensor | None = None,
                           g_up: torch.Tensor | None = None, count_token: bool = False) -> torch.Tensor:
    """:func:`delta_decode` from the mixer's own torch pieces (conv, log_decay, recurrence_step,
    output_gate, o_norm) in the order of ``DeltaRuleMixer.forward``'s T == 1 branch: the oracle and
    the fallback off CUDA. Same arguments, same in-place cache update (lengths untouched), same
    return: o [B, H·D_v] in proj's dtype. K with f_up / g_up None: log_decay / output_gate apply
    the mixer's ``f_b_proj`` / ``g_b_proj`` to proj's f / g columns (the layer's unfused path)."""
    per_channel = _check(mixer, proj, cache, f_up, g_up)
    B = proj.shape[0]
    x = proj.unsqueeze(1)  # (B, 1, P)
    parts = dict(zip(mixer.in_sizes, x.split(list(mixer.in_sizes.values()), dim=-1), strict=True))
    if per_channel and f_up is not None:
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
