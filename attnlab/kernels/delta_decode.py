"""One Triton launch for a Gated DeltaNet (``G``) / Kimi Delta Attention (``K``) decode step,
between the layer's input projection and its output projection.

What :class:`attnlab.layers.deltanet.DeltaRuleMixer` does for one token with a cache (T == 1) is
~15 small kernels: the short-conv step and its state shift, SiLU, the q/k/v split, the q/k L2
norm, the decay, beta, the delta-rule step, the gated RMSNorm. :func:`delta_decode` does all of
it in ONE launch; :func:`delta_decode_reference` is the same from the layer's own torch pieces
(the oracle, and the fallback off CUDA).

Why the layout changed. The kernel used to run one program per (batch row, KEY head), looping over
its value heads' whole [D_k, D_v] float32 state tiles: at the ~1B presets' shapes (D_k = D_v = 128,
one decode token) that is 16 programs on an H100's 132 SMs, and the time is each program's chain of
dependent memory round trips over a 64 KB tile, not bytes. Measured before this change (H100, bf16,
warm L2 / L2 flushed): Qwen3-Next-style (H = 32 value heads, H_k = 16) 8.4 / 10.3 us at 4 warps,
16.1 / 17.6 us at 16 (the default then); Kimi-style (H = H_k = 16, gates' up-projections in the
kernel) 8.4 / 11.0 us at 4 warps, 11.3 / 12.2 at 16 — against 3.35 / 2.71 us for a cold in-place
torch ``mul_`` over the same 2.1 / 1.05 MB of state. (No timing of this layout is quoted here yet.)

Kernel layout now: one program per (batch row, value head, block of V_BLOCK value columns), the
blocks of a value head and the value heads of a key head adjacent in the grid; B·H·ceil(D_v /
V_BLOCK) programs (128 for the Qwen3-Next-style step at V_BLOCK 32). The delta rule is column-wise
in the value dim (S ← S·decay + k uᵀ, u = β (v − Sᵀk), o = Sᵀq: column j needs only S[:, j], v_j),
so a program owns the state tile [D_k, BV] of its value head and its v channels (conv, shift) and
computes, redundantly, what the whole head needs: q and k (conv, SiLU, L2 norm; tiny) and K's per
key channel decay (with in-kernel gates: W_f's D_k rows; W_g only for its BV rows). Two things cross
programs:
- the q/k short-conv history is shared by every program of a key head (all its value heads and
  blocks) and shifted IN PLACE: it may only be overwritten once all of them have read it. Each
  program, after its loads (and a barrier, so all its threads are done), takes a ticket for its
  (batch row, key head): ``tl.atomic_add(tickets + ..., 1, sem="acq_rel")`` (GPU scope, one thread;
  Triton broadcasts the result through shared memory behind a barrier). The program that draws the
  last ticket (REP · NVB − 1) writes the shifted q/k history and sets the ticket back to 0, so the
  [B, H_k] int32 ticket buffer is all zeros between launches (CUDA-graph replays);
- the gated RMSNorm needs a value head's whole row: with NVB > 1 each program stores its block of o
  (rounded to proj's dtype, as before) and of the gate's activation to a [B, H, 2, D_v] float32
  scratch BEFORE its ticket, and the same last arriver reads the key head's REP rows back (``.cg``
  loads: from L2, past a possibly stale L1) and stores the normed, gated output. With V_BLOCK >= D_v
  (NVB = 1) a program has its row and stores the output itself; with REP = NVB = 1 (H == H_k at
  V_BLOCK >= D_v) there is no ticket at all.
Memory ordering: every program's scratch stores and conv-history loads come before its release
(a CTA barrier, then thread 0's acq_rel atomic: the barrier orders the other threads' accesses before
thread 0's, the release is cumulative); the tickets' acq_rel read-modify-writes chain, so the last
arriver's acquire follows every earlier release; its reads and stores come after (the result's
broadcast barrier). The tickets and scratch are allocated once per (device, size), zeroed, and shared
by every layer and call: that is safe on one stream (launches run in order; with PDL each of our
kernels gdc_waits for its predecessor before touching memory, so a launch never overlaps the
previous delta_decode's) but NOT for concurrent launches of the same B·H_k on two streams. The
token count (count_token) is incremented by one fixed program per row (value head 0, block 0).

Loads: a program issues ALL its global loads first (the state tile first; the q / k / v conv
histories, inputs and weights, beta, A_log, dt_bias, a or f_up, the gate, the norm weight: none
depends on another) and then passes a barrier before computing (EARLY_STATE, see launch_constants):
without it ptxas scheduled the first conv sums, which wait for their loads, ahead of the state
tile's loads — a round trip more. Each conv's new input x stays a vector and is not broadcast into
the [channels, K_conv] window: that was a shared-memory layout conversion at the load, which
waited for x and held back every later load (in the old kernel's sm_90 SASS the q, k and v conv
loads sat between such conversions: chained round trips). Exceptions: K computing its gates'
up-projections loads its state tile after applying them (the 128 x 64 W_f tile and an early state
tile would spill), and tiles over 128 x 64 (V_BLOCK 128 at D = 128) load the tile last, without the
barrier (it spilled there).
After the compute: scratch stores, the barrier and the ticket; then the program's own stores (v
history shift, its state columns, the token count, its output when NVB = 1; after the ticket, so
its release waits for the scratch stores only); then the last arriver's work.

K's gates: given f_up / g_up (the gates' up-projections, [B, H·D_k] / [B, H·D_v]) the kernel reads
them; without (the fused decode step, attnlab.layers.fused) each program applies its value head's
rows of ``f_b_proj`` / ``g_b_proj`` (W_f [D_k, rank] whole, W_g's BV rows) to proj's f / g columns
itself, saving the separate bmm launch (~3 us a layer on an H100).

Knobs (module globals, read at each call): V_BLOCK (value columns per program, a power of two;
default 32; >= D_v: one program per value head) and NUM_WARPS (None: num_warps's choice from the
[D_k, BV] tile, 4 at 128 x 32). Registers for sm_90 (Triton 3.9, compiled on the CPU:
test_compiles_for_sm90_at_real_shapes), D = 128, V_BLOCK 32, 4 warps, as the fused step launches it:
G (H 32 / H_k 16) 168 registers, no stack; K with its gates' up-projections in the kernel 255
registers and 32 bytes of stack (8 warps: 250, none); V_BLOCK 16: 95 / 255, no stack.

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
from ._common import l2_prefetch, reused_zeros
from ._pdl import launch_options, use_pdl

POISON_OUTPUTS = False  # tests set this: the output buffer starts as NaN, so an unwritten element fails
V_BLOCK = 32  # value columns per program (a power of two); >= D_v: one program per value head
# Under PDL, block 0 of each value head asks L2 for the head's whole float32 state before it waits
# (nothing else writes the state between steps; the loads after the wait find it there). H100,
# 2026-11-27, ~1B decode steps in a CUDA graph at 4K (interleaved A/B, best of 2, ms): kda 0.839 ->
# 0.823, kimi-linear 0.869 -> 0.860, gdn 1.068 -> 1.066, qwen3-next 1.033 -> 1.032. (The same request
# in the Lightning step, attnlab.kernels.lightning_decode, made it slower: lightning 0.790 -> 0.825.)
# Not for whole-row programs (NVB = 1, 16 warps: 128 registers a thread), where the request made the
# K kernel spill 40 bytes (Triton 3.9, sm_90) and was not timed.
PREFETCH_STATE = True
NUM_WARPS: int | None = None  # None: chosen from the program's state tile (num_warps); a benchmark may set it
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_IO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_CONSTANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # mixer -> (conv, has bias, constants)
_BUFFERS: dict[tuple, torch.Tensor] = {}  # (purpose, device, numel) -> zeroed tickets / scratch (_zeroed)


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
    """The loads of one short-conv step for channels c (masked by mc), all independent: the history
    float32 [len(c), BJ] (the KC - 1 inputs of the conv state, oldest first, zero from column KC - 1
    on), the new input x float32 [len(c)], the weight float32 [len(c), BJ] (its first KC - 1 columns,
    zero after), the weight's last column (x's) and the bias float32 [len(c)] (zeros without one).

    x stays a vector, not a column of the [len(c), BJ] window: broadcast into the window it is a
    layout conversion through shared memory, placed at the load, which waits for x to arrive and holds
    back every load after it (three chained DRAM round trips for q, k, v instead of one).

    x_row: this row of proj (the conv input is its first C columns); cs_row: this row of the conv
    state [C, KC - 1] with strides (s_cc, s_ck); w: conv weight [C, KC] contiguous; rj: arange over
    a power of two >= KC."""
    past = mc[:, None] & (rj[None, :] < KC - 1)
    hist = tl.load(cs_row + c[:, None] * s_cc + rj[None, :] * s_ck, mask=past, other=0.0).to(tl.float32)
    wt = tl.load(w + c[:, None] * KC + rj[None, :], mask=past, other=0.0).to(tl.float32)
    x = tl.load(x_row + c, mask=mc, other=0.0).to(tl.float32)
    w_x = tl.load(w + c * KC + KC - 1, mask=mc, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias + c, mask=mc, other=0.0).to(tl.float32)
    else:
        b = tl.zeros_like(x)
    return hist, wt, x, w_x, b


@triton.jit
def _conv_silu(hist, wt, x, w_x, b, io_ty: tl.constexpr):
    """The conv output of loaded inputs (_conv_load), SiLU, rounded to io_ty (as the layer),
    returned as float32 [channels]."""
    y = tl.sum(hist * wt, 1) + x * w_x + b
    return (y * tl.sigmoid(y)).to(io_ty).to(tl.float32)


@triton.jit
def _conv_shift(cs_row, c, mc, rj, s_cc, s_ck, hist, x, KC: tl.constexpr):
    """Shifts channels c's conv state in place: history j <- history j + 1, the newest <- x. Only
    after a barrier that follows every thread's _conv_load of these channels (a thread may store an
    element another thread loaded)."""
    hist_ptr = cs_row + c[:, None] * s_cc + rj[None, :] * s_ck
    moved = mc[:, None] & (rj[None, :] >= 1) & (rj[None, :] < KC - 1)
    tl.store(hist_ptr - s_ck, hist.to(cs_row.dtype.element_ty), mask=moved)
    tl.store(cs_row + c * s_cc + (KC - 2) * s_ck, x.to(cs_row.dtype.element_ty), mask=mc)


@triton.jit
def _gate_up(w, x, io_ty: tl.constexpr):
    """A gate's up-projection for one head: its weight rows w [rows, BR] times proj's columns x [BR]
    (float32), summed in float32 and rounded to io_ty as the layer's Linear / bmm returns it;
    float32 [rows]."""
    return tl.sum(w.to(tl.float32) * x[None, :], 1).to(io_ty).to(tl.float32)


@triton.jit
def _delta_decode_kernel(
    proj, s_proj, dec, s_dec, gate, s_gate, conv_w, conv_b, conv_state, s_cb, s_cc, s_ck,
    a_log, dt_bias, norm_w, state, o, scale, eps, lengths, w_f, w_g, s_wf, s_wg, tickets, scratch,
    H: tl.constexpr, HK: tl.constexpr, REP: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    KC: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr,
    BREP: tl.constexpr, BJ: tl.constexpr,
    OFF_K: tl.constexpr, OFF_V: tl.constexpr, OFF_BETA: tl.constexpr, OFF_DEC: tl.constexpr,
    OFF_GATE: tl.constexpr, PER_CHANNEL: tl.constexpr, SIGMOID_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    COUNT: tl.constexpr, PDL: tl.constexpr, UP: tl.constexpr, BR: tl.constexpr,
    RANK: tl.constexpr, OFF_F: tl.constexpr, OFF_G: tl.constexpr, EARLY_STATE: tl.constexpr,
    PF_STATE: tl.constexpr = False,
):
    if PDL:  # attnlab.kernels._pdl: the next kernel may launch; wait for the previous one
        gdc_launch_dependents()
        if PF_STATE:  # block 0 of a value head asks L2 for the head's whole state before the wait
            p0 = tl.program_id(0)
            l2_prefetch(state + (p0 // NVB).to(tl.int64) * (K * V), K * V * 4, p0 % NVB == 0)
        gdc_wait()
    # program (b, value head, value block), the blocks of a value head and the value heads of a key
    # head adjacent: i = ((b · H + h) · NVB + block)
    pid = tl.program_id(0)
    i_vb = pid % NVB
    i_bh = pid // NVB  # b · H + h
    i_h = i_bh % H
    i_b = (i_bh // H).to(tl.int64)
    i_hk = i_h // REP
    io_ty: tl.constexpr = proj.dtype.element_ty
    ARRIVALS: tl.constexpr = REP * NVB  # programs sharing the key head's q/k conv history
    p_row = proj + i_b * s_proj
    cs_row = conv_state + i_b * s_cb
    rk, rj, rr = tl.arange(0, BK), tl.arange(0, BJ), tl.arange(0, BR)
    rv = i_vb * BV + tl.arange(0, BV)  # this program's value columns
    mk, mv, mr = rk < K, rv < V, rr < RANK
    c_q = i_hk * K + rk
    c_k = OFF_K + i_hk * K + rk
    c_v = OFF_V + i_h * V + rv
    ticket = tickets + i_b * HK + i_hk

    # 1. every load, issued together (none depends on another): one DRAM round trip for the program.
    # EARLY_STATE (small tiles, no UP): the state tile first and a barrier after the last load, else
    # ptxas schedules the first conv sums (which wait for their loads) before the tile's loads: a
    # round trip more. Otherwise last (that order and barrier would spill: launch_constants)
    s_ptr = state + i_bh.to(tl.int64) * (K * V) + rk[:, None] * V + rv[None, :]
    s_mask = mk[:, None] & mv[None, :]
    if EARLY_STATE:
        S = tl.load(s_ptr, mask=s_mask, other=0.0)  # (BK, BV) float32
    if COUNT:  # the row's token counted by one program of the row (no other reads lengths)
        count_it = (i_h == 0) & (i_vb == 0)
        n_tok = tl.load(lengths + i_b, mask=count_it, other=0)
    if UP:  # proj's f and g columns, the gates' up-projections' inputs
        x_f = tl.load(p_row + OFF_F + rr, mask=mr, other=0.0).to(tl.float32)
        x_g = tl.load(p_row + OFF_G + rr, mask=mr, other=0.0).to(tl.float32)
    # each conv's loads: (history, its weights, x, x's weight, bias), see _conv_load
    q_conv = _conv_load(p_row, cs_row, conv_w, conv_b, c_q, mk, rj, s_cc, s_ck, KC, HAS_BIAS)
    k_conv = _conv_load(p_row, cs_row, conv_w, conv_b, c_k, mk, rj, s_cc, s_ck, KC, HAS_BIAS)
    v_conv = _conv_load(p_row, cs_row, conv_w, conv_b, c_v, mv, rj, s_cc, s_ck, KC, HAS_BIAS)
    beta = tl.load(p_row + OFF_BETA + i_h).to(tl.float32)
    a = tl.load(a_log + i_h).to(tl.float32)
    if PER_CHANNEL:  # K: the decay per key channel, the whole D_k of the head in every program
        if UP:
            f = tl.load(w_f + (i_h * K + rk)[:, None] * s_wf + rr[None, :], mask=mk[:, None] & mr[None, :],
                        other=0.0)  # (BK, BR)
        else:
            f = tl.load(dec + i_b * s_dec + OFF_DEC + i_h * K + rk, mask=mk, other=0.0).to(tl.float32)
        dtb = tl.load(dt_bias + i_h * K + rk, mask=mk, other=0.0).to(tl.float32)
    else:
        f = tl.load(dec + i_b * s_dec + OFF_DEC + i_h).to(tl.float32)
        dtb = tl.load(dt_bias + i_h).to(tl.float32)
    if UP:  # the gate: only this program's BV columns
        z = tl.load(w_g + (i_h * V + rv)[:, None] * s_wg + rr[None, :], mask=mv[:, None] & mr[None, :],
                    other=0.0)  # (BV, BR)
    else:
        z = tl.load(gate + i_b * s_gate + OFF_GATE + i_h * V + rv, mask=mv, other=0.0).to(tl.float32)
    if NVB == 1:
        w_norm = tl.load(norm_w + rv, mask=mv, other=0.0).to(tl.float32)
    if UP:  # applied as soon as the weights arrive, before the state tile is loaded (both would spill)
        f, z = _gate_up(f, x_f, io_ty), _gate_up(z, x_g, io_ty)
    if EARLY_STATE:
        tl.debug_barrier()  # for ptxas's scheduler: no compute hoisted above a load
    else:
        S = tl.load(s_ptr, mask=s_mask, other=0.0)  # (BK, BV) float32
    # 2. compute: q, k of the key head (conv, SiLU, rounded to proj's dtype as the layer, L2 norm in
    # float32, eps as ops.delta_rule._prepare_qk), every program its own copy; v's block; the step
    b_q = _conv_silu(*q_conv, io_ty)
    b_k = _conv_silu(*k_conv, io_ty)
    b_q = b_q * (scale / tl.sqrt(tl.sum(b_q * b_q) + 1e-6))
    b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
    b_v = _conv_silu(*v_conv, io_ty)
    b_beta = tl.sigmoid(beta)
    # log-decay: -exp(A_log) · softplus(a + dt_bias), one per head (G) or per key channel (K)
    decay = tl.exp(-tl.exp(a) * _softplus(f + dtb))
    # the delta rule on the float32 state tile (as attnlab.kernels.linear._step_kernel); each value
    # column is independent, so a block of columns needs only its own state columns
    if PER_CHANNEL:
        S = S * decay[:, None]
    else:
        S = S * decay
    u = b_beta * (b_v - tl.sum(S * b_k[:, None], 0))  # (BV,)
    S += b_k[:, None] * u[None, :]
    b_o = tl.sum(S * b_q[:, None], 0)  # (BV,)
    b_o = tl.where(mv, b_o.to(io_ty).to(tl.float32), 0.0)  # rounded as the layer's step returns it
    if SIGMOID_GATE:
        act = tl.sigmoid(z)
    else:
        act = z * tl.sigmoid(z)
    if NVB > 1:  # the gated RMSNorm needs the whole row: o and the gate's activation to the scratch
        row = scratch + i_bh.to(tl.int64) * (2 * V)
        tl.store(row + rv, b_o, mask=mv)
        tl.store(row + V + rv, act, mask=mv)

    # 3. every thread of the program has loaded (the conv histories) and stored (the scratch) before
    # the ticket; the last of the key head's ARRIVALS programs to take one knows that all the others
    # have read the old q/k history and written their scratch (release / acquire at GPU scope)
    tl.debug_barrier()
    if ARRIVALS > 1:
        last = tl.atomic_add(ticket, 1, sem="acq_rel") == ARRIVALS - 1
    # this program's own memory: its v channels' history, its state columns, the token count
    _conv_shift(cs_row, c_v, mv, rj, s_cc, s_ck, v_conv[0], v_conv[2], KC)
    tl.store(s_ptr, S, mask=s_mask)
    if COUNT:
        tl.store(lengths + i_b, n_tok + 1, mask=count_it)
    if NVB == 1:  # the whole row here: the gated RMSNorm rmsnorm(o) · w · act(gate) directly
        b_o = b_o / tl.sqrt(tl.sum(b_o * b_o) / V + eps) * w_norm * act
        tl.store(o + i_bh.to(tl.int64) * V + rv, b_o.to(o.dtype.element_ty), mask=mv)
    if ARRIVALS == 1:
        _conv_shift(cs_row, c_q, mk, rj, s_cc, s_ck, q_conv[0], q_conv[2], KC)
        _conv_shift(cs_row, c_k, mk, rj, s_cc, s_ck, k_conv[0], k_conv[2], KC)
    else:
        if last:  # the key head's last arriver
            tl.store(ticket, 0)  # all zeros again between launches (CUDA-graph replays)
            _conv_shift(cs_row, c_q, mk, rj, s_cc, s_ck, q_conv[0], q_conv[2], KC)
            _conv_shift(cs_row, c_k, mk, rj, s_cc, s_ck, k_conv[0], k_conv[2], KC)
            if NVB > 1:  # the gated RMSNorm of the key head's REP value heads' rows
                r_h = tl.arange(0, BREP)
                c = tl.arange(0, BVF)
                m = (r_h < REP)[:, None] & (c < V)[None, :]
                i_row = i_b * H + i_hk * REP + r_h  # (BREP,) rows b · H + h
                rows = scratch + i_row[:, None] * (2 * V) + c[None, :]
                # .cg: from L2, where the other programs' stores are; L1 may hold stale lines
                o_rows = tl.load(rows, mask=m, other=0.0, cache_modifier=".cg")  # (BREP, BVF)
                a_rows = tl.load(rows + V, mask=m, other=0.0, cache_modifier=".cg")  # (BREP, BVF)
                w_row = tl.load(norm_w + c, mask=c < V, other=0.0).to(tl.float32)
                rms = tl.sqrt(tl.sum(o_rows * o_rows, 1) / V + eps)  # (BREP,)
                out = o_rows / rms[:, None] * w_row[None, :] * a_rows
                tl.store(o + i_row[:, None] * V + c[None, :], out.to(o.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# host side


def kernel_constants(mixer) -> dict:
    """The kernel's compile-time arguments fixed by this mixer (sizes, proj column offsets, variant);
    remembered per mixer (sizes are fixed at construction; a replaced conv is noticed). The value
    blocking (BV, NVB: :func:`value_blocks`) follows V_BLOCK at each call and is not in here."""
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
        BVF=max(16, triton.next_power_of_2(Dv)), BREP=triton.next_power_of_2(H // Hk),
        BJ=triton.next_power_of_2(KC),
        OFF_K=off["k"], OFF_V=off["v"], OFF_BETA=off["beta"],
        OFF_DEC=0 if per_channel else off["a"],  # K reads f_up, G proj's `a` columns
        OFF_GATE=0 if per_channel else off["z"],  # K reads g_up, G proj's `z` columns
        PER_CHANNEL=per_channel, SIGMOID_GATE=mixer.o_norm.activation == "sigmoid",
        HAS_BIAS=mixer.conv.bias is not None,
        RANK=rank, BR=max(16, triton.next_power_of_2(rank)),
        OFF_F=off["f"] if per_channel else 0, OFF_G=off["g"] if per_channel else 0,  # UP reads them
    )
    _CONSTANTS[mixer] = (mixer.conv, const["HAS_BIAS"], const)
    return const


def value_blocks(dv: int) -> tuple[int, int]:
    """(BV, NVB): the value columns per program and the programs per value head for D_v = dv under
    V_BLOCK: (V_BLOCK, ceil(dv / V_BLOCK)), or one block of the whole (padded) row when V_BLOCK >= dv."""
    if not (isinstance(V_BLOCK, int) and V_BLOCK >= 1 and V_BLOCK & (V_BLOCK - 1) == 0):
        raise ValueError(f"V_BLOCK: expected a power of two >= 1, got {V_BLOCK!r}")
    if V_BLOCK >= dv:
        return max(16, triton.next_power_of_2(dv)), 1
    return V_BLOCK, triton.cdiv(dv, V_BLOCK)


def launch_constants(mixer, up: bool) -> dict:
    """Every compile-time argument of the launch but COUNT and PDL: :func:`kernel_constants`, the
    value blocking under V_BLOCK (BV, NVB), UP (K's gates' up-projections in the kernel) and
    EARLY_STATE: the state tile loaded first, a barrier after the loads, where that does not spill
    (no UP, tiles up to 128 x 64; compiled for sm_90 at D = 128: the 128 x 128 tile at 16 warps
    spilled ~300 bytes that way, the up-projection weights and an early tile ~1 KB)."""
    const = kernel_constants(mixer)
    BV, NVB = value_blocks(const["V"])
    return dict(const, BV=BV, NVB=NVB, UP=up, EARLY_STATE=not up and const["BK"] * BV <= 128 * 64)


def prefetches_state(const: dict) -> bool:
    """Whether a launch with :func:`launch_constants` ``const`` asks L2 for the state before its PDL wait
    (PREFETCH_STATE, and not for whole-row programs)."""
    return PREFETCH_STATE and const["NVB"] > 1


def num_warps(bk: int, bv: int) -> int:
    """Warps for a program's [bk, bv] state tile: NUM_WARPS if set, else one warp per 1024 float32
    elements (32 per thread), in [4, 16]: 4 at 128 x 32 and 64 x 64, 8 at 128 x 64, 16 at 128 x 128.

    Before this layout (one program per key head, its value heads' whole 128 x 128 tiles) an H100
    gave 8.4 us at 4 warps vs 16.1 at 16 for the Qwen3-Next-style step (warm L2) and 8.4 vs 11.3 for
    the Kimi-style one, so 16 warps at 128 x 128 is a register-pressure choice, not a timed one.
    Compiled for sm_90 (Triton 3.9, on the CPU; test_compiles_for_sm90_at_real_shapes), D = 128,
    V_BLOCK 32, 4 warps: see the module docstring.

    This layout on the H100 (2026-11-26, fifth session; one call in a CUDA graph, warm = back to back,
    cold = a 256 MB memset between calls), D = 128, us warm / cold at V_BLOCK 16, 32, 64, 128 with 4
    warps: Qwen3-Next-style (H 32 / H_k 16) 6.4 / 7.5, 7.5 / 7.8, 7.9 / 9.5, 5.2 / 7.9; Kimi-style
    (16 / 16, gates in the kernel) 6.0 / 8.1, 5.1 / 7.8, 5.6 / 8.8, 7.8 / 10.7; 8 warps at V_BLOCK 32:
    7.0 / 7.8 and 6.1 / 7.2. The old layout's default (16 warps at 128 x 128): 16.1 / 17.6 and 11.3 /
    12.2. Inside the ~1B decode steps: qwen3-next 1.18 -> 1.09 ms at 4K, kimi-linear 0.99 -> 0.94."""
    if NUM_WARPS is not None:
        return NUM_WARPS
    return max(4, min(16, bk * bv // 1024))


def _zeroed(purpose: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The buffer of n elements for `purpose` (tickets / scratch), one per (purpose, device, n)."""
    return reused_zeros(_BUFFERS, (purpose, device, n), n, dtype, device)


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
    const = launch_constants(mixer, up)
    NVB = const["NVB"]
    # the key heads' tickets (int32 [B, H_k], all zero between launches) and, with a value head split
    # over programs, the [B, H, 2, D_v] float32 scratch of o and the gate's activation
    tickets = _zeroed("tickets", B * Hk, torch.int32, proj.device)
    scratch = _zeroed("scratch", B * H * 2 * Dv, torch.float32, proj.device) if NVB > 1 else cache.state
    pdl = use_pdl(proj.device)
    _delta_decode_kernel[(B * H * NVB,)](
        proj, proj.stride(0), dec, s_dec, gate, s_gate, w, w if conv.bias is None else conv.bias,
        cs, cs.stride(0), cs.stride(1), cs.stride(2),
        mixer.A_log, mixer.dt_bias, mixer.o_norm.weight, cache.state, o, Dk ** -0.5, float(mixer.o_norm.eps),
        cache.lengths, w_f, w_g, w_f.stride(0), w_g.stride(0), tickets, scratch, **const,
        COUNT=bool(count_token), PDL=pdl, num_warps=num_warps(const["BK"], const["BV"]),
        PF_STATE=prefetches_state(const) and pdl and cache.state.data_ptr() % 16 == 0, **launch_options(pdl),
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
