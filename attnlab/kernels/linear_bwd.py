"""Backward of the chunked gated delta rule (Gated DeltaNet, KDA) for :mod:`attnlab.kernels.linear`.

Notation as in that module's docstring (chunk C = 64; per chunk c: G the within-chunk cumulative
log-gate, Γ = e^G, Γ_C = e^{G at the last token}, S_c the state entering the chunk):

    A   = strict_tril(β_i Σ_d k_id k_jd Γ_id/Γ_jd),  Aq = scale · tril(Σ_d q_id k_jd Γ_id/Γ_jd)
    w   = (I + A)⁻¹ (β K ⊙ Γ),  u = (I + A)⁻¹ (β V),  v' = u − w S_c
    o   = (scale Q ⊙ Γ) S_c + Aq v'
    S_{c+1} = Diag(Γ_C) S_c + Kdᵀ v',  Kd = K ⊙ Γ_C/Γ

Backpropagation through time splits in two (Yang et al. 2024, "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length"; "Gated Delta Networks" 2025; fla's chunk backward has
the same split into a state-gradient sweep and per-chunk gradients):

1. the sequential part. dS'_c, the gradient of the state leaving chunk c, obeys (dS'_last = the
   final state's gradient)

       dv'_c       = Aqᵀ dO_c + Kd dS'_c                   (the gradient of v')
       dS'_{c−1}   = Diag(Γ_C) dS'_c + (scale Q ⊙ Γ)ᵀ dO_c − wᵀ dv'_c

   and dS'_{−1} is the initial state's gradient. ``_dstate_tok_kernel`` runs it (after
   ``_dv_local_kernel`` has made Aqᵀ dO): one program per (sequence, head, D_v block) walking the
   chunks from the last, like the forward's state kernel, on the forward's intermediates.
2. the parallel part. With S_c and dS'_c known for every chunk, the chunks decouple: the input
   gradients of chunk c are those of  L_c = ⟨o_c, dO_c⟩ + ⟨S_{c+1}, dS'_c⟩  with S_c held fixed.
   The batched backward writes L_c once, batched over all chunks ([N_chunks, H, C, ·] tensors; bmm
   and a batched triangular solve), and differentiated by autograd, so no gradient formula is written by hand
   twice and none can drift from the forward.

Both backwards run part 1 so, after the forward kernels have recomputed the states and kept their
intermediates (w, u, kd, v', the cumulative gate, Aq for KDA, X = (I + A)⁻¹). With ``BACKWARD =
"triton"`` (the default) part 2 is Triton kernels on the forward's token layout too (no
[N_chunks, H, C, ·] copies, no autograd graph): its formulas are written out by hand in
:mod:`.delta_bwd_local` (every gradient of a chunk but the gated q·k / k·k pair products: through o's
inter-chunk term, Kd, the state decay, w = X R_w and u = X R_u, giving dv, and the gradients of Aq and
A) and :mod:`.delta_bwd_pairs` (the gated pair products, factored without overflow as the forward's
prepare does, and the gate's cumsum reversed), as fla's chunk backward (chunk_bwd_dqkwg,
prepare_wy_repr_bwd) splits them. ``BACKWARD = "batched"`` is the first backward
described next, kept as a second, independently written implementation.

For the batched backward the forward keeps nothing but its inputs: the states S_c are recomputed by
the forward kernels. That backward is a fixed sequence of launches whatever T is: those, the two of part 1,
and the batched PyTorch ops with their autograd backward (no loop over
chunks in Python; ~160 ops besides views in eager mode, counted in the tests). On CUDA the batched expression
(``_chunk_terms``) goes through ``torch.compile`` (``COMPILE``), which fuses its elementwise chains
in the forward and the backward; a compiler failure warns once and falls back to eager. Packed
sequences (cu_seqlens) use the same code: the chunks are gathered per sequence by an index table,
and the sequential kernel walks each sequence's own chunk range.

Per-channel gates: Σ_d k_id k_jd e^{G_id − G_jd} is factored through the chunk's first token,
e^{G_i − G_0} · e^{G_0 − G_j}, when no channel's gate falls by more than DIAG_SPAN over any chunk
(the second factor is then ≤ e^{DIAG_SPAN}, finite; one matmul per chunk). Otherwise through the
first token r of row i's 16-token sub-chunk, as the forward does: both factors are ≤ 1 for j < r,
inside the sub-chunk the second is ≤ e^{DIAG_SPAN}, and a sub-chunk whose gate falls further than
that is recomputed elementwise (the exponent masked before exp), so no factor overflows.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import launch_fitting
from .linear import (
    CHUNK,
    SUB,
    _chunk_tables,
    _cstore,
    _ctile,
    _empty,
    _forward,
    _mm,
    _prep_chunk,
    _seq_chunks,
    _store_tile,
    _tile,
    _tl_dtype,
    _vec,
)

DIAG_SPAN = 60.0  # as attnlab.kernels.linear.DIAG_SPAN: e^60 is finite in fp32
# The state-gradient sweep's launch parameters: D_v columns per program, warps, pipeline depth. For
# _dstate_tok_kernel on an H100 (B=1, H=16, D=128, bf16, 2026-11-26): (16, 4, 3) 0.676 / 0.819 ms (GDN /
# KDA at 16K), 2.65 / 3.18 at 64K, the best of (16, 4, 2), (32, 4, 3), (16, 8, 3), (32, 8, 2), (8, 4, 3)
# (up to 2.3x slower); 146 registers, no spills.
DSTATE_TUNING: dict[str, int] = {"BV": 16, "num_warps": 4, "num_stages": 3}


@triton.jit
def _dv_local_kernel(
    q, k, gcum, aqk, do, dvi, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATE_VEC: tl.constexpr, IS_VARLEN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk and head: dvi = Aqᵀ dO (float32 [B, T, H, V]), the part of dv' inside the chunk.
    Aq is the forward's aqk (per-channel gate) or made here from q, k and the scalar gate."""
    i_h, i_hk, i_t, bos, n = _prep_chunk(chunk_indices, cu_seqlens, T, H, HK, IS_VARLEN)
    t0 = i_t * BT
    rr = tl.arange(0, BT)
    if GATE_VEC:
        aq = _ctile(aqk + (bos * H + i_h) * BT, t0, n, H * BT, 0, BT, BT, BT)  # zero above the diagonal
    else:
        G = _vec(gcum + bos * H + i_h, t0, n, H, BT)
        aq = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            qb = _ctile(q + (bos * HK + i_hk) * K, t0, n, HK * K, i_k * BK, K, BT, BK)
            kb = _ctile(k + (bos * HK + i_hk) * K, t0, n, HK * K, i_k * BK, K, BT, BK)
            aq += _mm(qb, tl.trans(kb), DT, PREC)
        causal = (rr[:, None] >= rr[None, :]) & (t0 + rr < n)[:, None]  # padding rows: G = 0, exponent > 0
        aq = tl.where(causal, aq * tl.exp(tl.where(causal, G[:, None] - G[None, :], 0.0)), 0.0) * scale
    aqt = tl.trans(aq)
    for i_v in range(0, tl.cdiv(V, BV)):
        dob = _ctile(do + (bos * H + i_h) * V, t0, n, H * V, i_v * BV, V, BT, BV)
        _cstore(dvi + (bos * H + i_h) * V, _mm(aqt, dob, DT, PREC), t0, n, H * V, i_v * BV, V, BT, BV)


@triton.jit
def _dstate_tok_kernel(
    q, gcum, w, kd, do, dvn, dht, dstates, dh0, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATE_VEC: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    IS_VARLEN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Part 1's sweep (module docstring) on the forward's token layout: one program per (sequence, head,
    D_v block) walking its chunks from the last. dvn holds Aqᵀ dO (_dv_local_kernel) on entry and the whole
    dv' = Aqᵀ dO + Kd dS' on exit; dstates[c] = the gradient of the state leaving chunk c (chunks ordered
    as the forward's states, in dstates' dtype); dh0 = that of the state entering the first chunk
    (float32)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h, i_hk, bos, n, n_chunks, boh = _seq_chunks(cu_seqlens, chunk_offsets, T, H, HK, BT, IS_VARLEN)
    c0 = i_v * BV
    rk = tl.arange(0, BK)
    rv = c0 + tl.arange(0, BV)
    mkv = (rk < K)[:, None] & (rv < V)[None, :]
    kv = rk[:, None] * V + rv[None, :]
    q_p = q + (bos * HK + i_hk) * K
    w_p = w + (bos * H + i_h) * K
    kd_p = kd + (bos * H + i_h) * K
    do_p = do + (bos * H + i_h) * V
    dv_p = dvn + (bos * H + i_h) * V
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + i_bh.to(tl.int64) * K * V + kv, mask=mkv, other=0.0)
    for j in range(0, n_chunks):
        i_t = n_chunks - 1 - j
        t0 = i_t * BT
        last = (t0 + tl.minimum(n - t0, BT) - 1).to(tl.int64)
        tl.store(dstates + ((boh + i_t) * H + i_h) * K * V + kv, dS.to(dstates.dtype.element_ty), mask=mkv)
        b_q = _tile(q_p, t0, n, HK * K, 0, K, BT, BK).to(tl.float32)
        if GATE_VEC:
            G_p = gcum + (bos * H + i_h) * K
            b_qg = b_q * tl.exp(_tile(G_p, t0, n, H * K, 0, K, BT, BK)) * scale
            gl = tl.exp(tl.load(G_p + last * H * K + rk, mask=rk < K, other=0.0))[:, None]
        else:
            G_p = gcum + bos * H + i_h
            b_qg = b_q * (tl.exp(_vec(G_p, t0, n, H, BT)) * scale)[:, None]
            gl = tl.exp(tl.load(G_p + last * H))
        b_w = _tile(w_p, t0, n, H * K, 0, K, BT, BK)
        b_kd = _tile(kd_p, t0, n, H * K, 0, K, BT, BK)
        b_do = _tile(do_p, t0, n, H * V, c0, V, BT, BV)
        b_dv = _tile(dv_p, t0, n, H * V, c0, V, BT, BV) + _mm(b_kd, dS, DT, PREC)  # dv' = Aqᵀ dO + Kd dS'
        _store_tile(dv_p, b_dv, t0, n, H * V, c0, V, BT, BV)
        dS = dS * gl + _mm(tl.trans(b_qg), b_do, DT, PREC) - _mm(tl.trans(b_w), b_dv, DT, PREC)
    if STORE_DH0:
        tl.store(dh0 + i_bh.to(tl.int64) * K * V + kv, dS, mask=mkv)


# ---------------------------------------------------------------------------------------------
# host side


def _chunk_layout(t: int, cu_seqlens: torch.Tensor | None, idx: torch.Tensor | None):
    """Which tokens fill the chunk rows: None for a dense batch (chunk rows are tokens in order,
    zero-padded at each sequence's end); for a packed batch (idx: its chunk table, linear._chunk_tables)
    int64 [N_chunks · C], an index into the flattened [T] token axis, or T for padding rows."""
    if cu_seqlens is None:
        return None
    device = cu_seqlens.device
    idx = idx.long()  # (N_chunks, 2): sequence, chunk within it
    bos, eos = cu_seqlens[idx[:, 0]].long(), cu_seqlens[idx[:, 0] + 1].long()
    tok = bos[:, None] + idx[:, 1:] * CHUNK + torch.arange(CHUNK, device=device)  # (N_chunks, C)
    tok = torch.where(tok < eos[:, None], tok, t)
    return tok.reshape(-1)


def _to_chunks(x: torch.Tensor, tok: torch.Tensor | None) -> torch.Tensor:
    """[B, T, H, ...] -> float32 [N_chunks, H, C, ...], padding rows zero (see _chunk_layout)."""
    b, t = x.shape[:2]
    if tok is None:
        pad = triton.cdiv(t, CHUNK) * CHUNK - t
        y = F.pad(x, [0, 0] * (x.dim() - 2) + [0, pad])  # (B, N·C, H, ...)
    else:
        y = F.pad(x.reshape(t, *x.shape[2:]), [0, 0] * (x.dim() - 2) + [0, 1])[tok]  # (N_chunks·C, H, ...)
    y = y.reshape(-1, CHUNK, *x.shape[2:]).float()  # (N_chunks, C, H, ...)
    return y.transpose(1, 2)  # (N_chunks, H, C, ...)


def _gated_products_scalar(q, k, G):
    """Σ_d q_id k_jd e^{G_i − G_j} (j ≤ i) and the same with k_i, for a per-head gate G [N, H, C]."""
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))  # (N, H, C, C)
    decay = diff.exp()
    kt = k.transpose(-1, -2)  # (N, H, K, C)
    return (q @ kt) * decay, (k @ kt) * decay


def _gated_products_channel(q, k, G):
    """As :func:`_gated_products_scalar` for a per-channel gate G [N, H, C, K], factored through
    each chunk's first row, e^{G_i−G_0}·e^{G_0−G_j}: valid while no channel's gate falls by more
    than DIAG_SPAN over a chunk (the caller checks). Entries above the diagonal are arbitrary."""
    G0 = G[:, :, :1]  # (N, H, 1, K): the gate at each chunk's first row
    k_cols = (k * (G0 - G).exp()).transpose(-1, -2)  # (N, H, K, C)
    f = (G - G0).exp()  # (N, H, C, K), ≤ 1
    return (q * f) @ k_cols, (k * f) @ k_cols


def _gated_products_subchunk(q, k, G):
    """As :func:`_gated_products_channel` for steeper gates: factored through the first row of each
    16-token sub-chunk, and sub-chunks whose gate falls by more than DIAG_SPAN elementwise."""
    n, h, c, d = k.shape
    nb = c // SUB
    Gb = G.view(n, h, nb, SUB, d)
    Gr = Gb[:, :, :, :1]  # (N, H, nb, 1, K): the gate at each sub-chunk's first row
    f = (Gb - Gr).exp()  # (N, H, nb, SUB, K), ≤ 1
    q_rows = q.view(n, h, nb, SUB, d) * f
    k_rows = k.view(n, h, nb, SUB, d) * f
    # columns for row block I: k_j e^{G_r(I) − G_j}, j < (I + 1)·SUB (0 past it; at most e^DIAG_SPAN)
    past = torch.arange(c, device=k.device)[None, :] >= (torch.arange(nb, device=k.device)[:, None] + 1) * SUB
    e = (Gr - G[:, :, None]).clamp(max=DIAG_SPAN).masked_fill(past[:, :, None], float("-inf"))  # (N,H,nb,C,K)
    k_cols = (k[:, :, None] * e.exp()).transpose(-1, -2)  # (N, H, nb, K, C)
    aq = (q_rows @ k_cols).reshape(n, h, c, c)  # (N, H, C, C)
    ak = (k_rows @ k_cols).reshape(n, h, c, c)  # (N, H, C, C)
    steep = (Gr - Gb).detach().amax((-2, -1)) > DIAG_SPAN  # (N, H, nb)
    if bool(steep.any()):
        i_n, i_h, i_b = steep.nonzero(as_tuple=True)
        gs = Gb[i_n, i_h, i_b]  # (n_steep, SUB, K)
        qs = q.view(n, h, nb, SUB, d)[i_n, i_h, i_b]
        ks = k.view(n, h, nb, SUB, d)[i_n, i_h, i_b]
        causal = torch.ones(SUB, SUB, dtype=torch.bool, device=k.device).tril()
        ex = (gs[:, :, None] - gs[:, None]).masked_fill(~causal[..., None], float("-inf"))
        ex = ex.exp()  # (n_steep, SUB, SUB, K): e^{G_i − G_j}, j ≤ i
        kj = ks[:, None] * ex  # (n_steep, SUB, SUB, K)
        aq = _put_diag(aq, (i_n, i_h, i_b), (qs[:, :, None] * kj).sum(-1), nb)  # (N, H, C, C)
        ak = _put_diag(ak, (i_n, i_h, i_b), (ks[:, :, None] * kj).sum(-1), nb)
    return aq, ak


def _put_diag(a: torch.Tensor, where, blocks: torch.Tensor, nb: int) -> torch.Tensor:
    """a [N, H, C, C] with its diagonal SUB-blocks at (n, h, I) replaced by blocks [n_sel, SUB, SUB]."""
    n, h, c, _ = a.shape
    i_n, i_h, i_b = where
    a6 = a.reshape(n, h, nb, SUB, nb, SUB).clone()  # (N, H, I, i, J, j)
    a6[i_n, i_h, i_b, :, i_b, :] = blocks
    return a6.reshape(n, h, c, c)


def _chunk_terms(q, k, v, g, beta, S, scale: float, products: str):
    """The forward of every chunk at once, given the states S entering them.

    q, k [N, H, C, K]; v [N, H, C, V]; g [N, H, C] (products "scalar") or [N, H, C, K] ("channel",
    "subchunk"); beta [N, H, C]; S [N, H, K, V]; all float32. Returns (o, v', w, Kd, scale Q ⊙ Γ,
    Aq, G_last [N, H, 1, 1 | K])."""
    d_k = k.shape[-1]
    G = g.cumsum(2)  # (N, H, C) or (N, H, C, K)
    Gk = G[..., None] if products == "scalar" else G  # (N, H, C, 1 | K)
    G_last = Gk[:, :, -1:]  # (N, H, 1, 1 | K); padding rows have g = 0
    if products == "scalar":
        aq, ak = _gated_products_scalar(q, k, G)
    elif products == "channel":
        aq, ak = _gated_products_channel(q, k, G)
    else:
        aq, ak = _gated_products_subchunk(q, k, G)
    aq = aq.tril() * scale  # (N, H, C, C)
    ak = ak.tril(-1) * beta[..., None]  # (N, H, C, C), row i carries β_i
    kd = k * (G_last - Gk).exp()  # (N, H, C, K)
    gam = Gk.exp()  # (N, H, C, 1 | K)
    qg = q * (gam * scale)  # (N, H, C, K)
    bcol = beta[..., None]  # (N, H, C, 1)
    rhs = torch.cat([k * (gam * bcol), v * bcol], -1)  # (N, H, C, K + V)
    wu = torch.linalg.solve_triangular(ak, rhs, upper=False, unitriangular=True)  # (I + A)⁻¹ rhs
    w, u = wu[..., :d_k], wu[..., d_k:]
    vn = u - w @ S  # (N, H, C, V)
    o = qg @ S + aq @ vn  # (N, H, C, V)
    return o, vn, w, kd, qg, aq, G_last


# "triton": the per-chunk gradients by Triton kernels (delta_bwd_local, delta_bwd_pairs) on the forward's
# token layout; "batched": autograd through _chunk_terms batched over chunks (the first backward)
BACKWARD = "triton"
COMPILE = True  # on CUDA, torch.compile _chunk_terms (fuses its elementwise chains, forward and backward)
_compiled = None


def _terms_fn(compile_it: bool):
    global _compiled
    if not (compile_it and COMPILE):
        return _chunk_terms
    if _compiled is None:
        _compiled = torch.compile(_chunk_terms, dynamic=True, fullgraph=True)
    return _compiled


def delta_rule_backward(
    gate: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    need_dh0: bool,
    saved: dict | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of the chunked gated delta rule (gate 1: GDN, g [B, T, H]; 2: KDA, g [B, T, H, K]).

    q, k [B, T, H_k, K]; v [B, T, H, V]; beta [B, T, H]; initial_state float32 [N, H, K, V] or None;
    do [B, T, H, V]; dht float32 [N, H, K, V] or None (N sequences: B, or cu_seqlens int32 [N + 1]
    with B = 1). The inputs as the forward got them (contiguous, fp16/bf16/fp32).
    saved: the forward's gcum, aqk and xa (linear._forward's keep) when it kept them; BACKWARD
    "triton" then skips recomputing them.
    Returns (dq, dk, dv, dg, dbeta, dh0 float32 [N, H, K, V] or None), each in its input's dtype."""
    b, t = q.shape[:2]
    n_seq = b if cu_seqlens is None else cu_seqlens.numel() - 1
    if cu_seqlens is None:
        n_chunks = b * triton.cdiv(t, CHUNK)
    else:
        n_chunks = sum(-(-n // CHUNK) for n in (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()) if t > 0 else 0
    if n_chunks == 0:
        zeros = [torch.zeros_like(x) for x in (q, k, v, g, beta)]
        dh0 = None
        if need_dh0:
            dh0 = dht.float().clone() if dht is not None else torch.zeros_like(initial_state)
        return (*zeros, dh0)

    if BACKWARD == "triton":
        return _triton_backward(gate, q, k, v, g, beta, scale, initial_state, do, dht, cu_seqlens, need_dh0,
                                n_seq, n_chunks, saved)

    layout = _layout(q, v, cu_seqlens)
    tok = _chunk_layout(t, cu_seqlens, layout[1] if cu_seqlens is not None else None)
    # 1. the states entering the chunks (the forward kernels) and the state gradients (part 1)
    inter: dict = {}
    with torch.no_grad():
        _, _, states = _forward(q, k, v, g, beta, None, scale, initial_state, False, cu_seqlens, gate,
                                keep=inter, output=False)
    S = states[:n_chunks].float()  # (N_chunks, H, K, V)
    del states
    dstates, _, dh0 = _state_grads(q, k, do, dht, scale, inter, cu_seqlens, layout, gate, n_seq, n_chunks,
                                   need_dh0, torch.float32)
    del inter
    products = "scalar"
    if gate == 2:
        with torch.no_grad():
            G = _to_chunks(g, tok).cumsum(2)  # (N_chunks, H, C, K)
            steep = float((G[:, :, :1] - G).amax()) > DIAG_SPAN
            del G
        products = "subchunk" if steep else "channel"
    args = (q, k, v, g, beta, S, scale, do, dstates, tok, products)
    terms = _terms_fn(q.is_cuda and products != "subchunk")
    if terms is _chunk_terms:
        return (*_chunk_grads(_chunk_terms, *args), dh0)
    try:
        return (*_chunk_grads(terms, *args), dh0)
    except Exception as e:  # noqa: BLE001 - a compiler failure must not cost the gradient; say so once
        global COMPILE
        COMPILE = False
        warnings.warn(f"attnlab.kernels.linear_bwd: torch.compile of the per-chunk terms failed "
                      f"({type(e).__name__}: {str(e)[:200]}); using eager PyTorch from now on", stacklevel=2)
        return (*_chunk_grads(_chunk_terms, *args), dh0)


def _chunk_grads(terms, q, k, v, g, beta, S, scale, do, dstates, tok, products):
    """Part 2 of the batched backward (module docstring) with `terms` = _chunk_terms, compiled or not:
    the gradients (dq, dk, dv, dg, dbeta) given the states S and state gradients dstates
    [N_chunks, H, K, V] (float32)."""
    hk = q.shape[2]
    h = v.shape[2]
    # the per-chunk quantities, batched over chunks, on an autograd graph
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    with torch.enable_grad():
        q_, k_, v_, g_, beta_ = (_to_chunks(x, tok) for x in leaves)  # (N_chunks, H_(k), C, ...)
        if hk != h:  # each key head serves h // hk consecutive value heads
            q_ = q_.repeat_interleave(h // hk, dim=1)  # (N_chunks, H, C, K)
            k_ = k_.repeat_interleave(h // hk, dim=1)  # (N_chunks, H, C, K)
        o, vn, w, kd, qg, aq, G_last = terms(q_, k_, v_, g_, beta_, S, scale, products)
    do_ = _to_chunks(do, tok)  # (N_chunks, H, C, V)
    # L = Σ_c ⟨o_c, dO_c⟩ + ⟨S_{c+1}, dS'_c⟩ with every S_c held fixed, where
    # ⟨S_{c+1}, dS'⟩ = Σ_d Γ_C,d (S dS'ᵀ)_dd + ⟨v', Kd dS'⟩
    with torch.no_grad():
        s_ds = (S * dstates).sum(-1)[:, :, None]  # (N_chunks, H, 1, K)
    with torch.enable_grad():
        loss = (o * do_).sum() + (G_last.exp() * s_ds).sum() + (vn * (kd @ dstates)).sum()
        return torch.autograd.grad(loss, leaves)


def _layout(q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """The per-chunk kernels' grid and tables: (cu, chunk table, chunk offsets, grid), the tensors any
    pointer when the batch is dense (the kernels do not read them then)."""
    if cu_seqlens is None:
        return q, q, q, (triton.cdiv(q.shape[1], CHUNK), q.shape[0] * v.shape[2])
    idx, offsets = _chunk_tables(cu_seqlens, CHUNK)
    return cu_seqlens, idx, offsets, (idx.shape[0], v.shape[2])


def _state_grads(q, k, do, dht, scale, inter, cu_seqlens, layout, gate, n_seq, n_chunks, need_dh0, ds_dtype):
    """Part 1 (module docstring), both backwards: _dv_local_kernel (Aqᵀ dO) then the sweep over the
    forward's kept intermediates `inter`. Returns (dstates [N_chunks, H, K, V] in ds_dtype, dv'
    [B, T, H, V] in q's dtype, dh0 float32 [N, H, K, V] or None)."""
    b, t, hk, d_k = q.shape
    h, d_v = do.shape[2:]
    dt, prec = _tl_dtype(q.dtype), ("ieee" if q.dtype == torch.float32 else "tf32")
    cu, idx, offsets, grid = layout
    varlen = cu_seqlens is not None
    gcum, vec = inter["gcum"], gate == 2
    do = do.contiguous().to(q.dtype)
    dvn = _empty(b, t, h, d_v, dtype=q.dtype, device=q.device)  # Aqᵀ dO, then dv'
    bk = max(16, triton.next_power_of_2(d_k))
    _dv_local_kernel[grid](
        q, k, gcum, inter["aqk"] if vec else gcum, do, dvn, cu, idx, scale, t,
        H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BK=min(64, bk), BV=min(64, max(16, triton.next_power_of_2(d_v))),
        GATE_VEC=vec, IS_VARLEN=varlen, DT=dt, PREC=prec, num_warps=4,
    )
    dstates = _empty(n_chunks, h, d_k, d_v, dtype=ds_dtype, device=q.device)
    dh0 = _empty(n_seq, h, d_k, d_v, dtype=torch.float32, device=q.device) if need_dh0 else None
    bv = min(DSTATE_TUNING["BV"], max(16, triton.next_power_of_2(d_v)))
    dht_ = dht.float().contiguous() if dht is not None else dstates
    launch_fitting(  # float32 at D = 128: 3 stages would need 246 KB of shared memory
        _dstate_tok_kernel, (triton.cdiv(d_v, bv), n_seq * h),
        q, gcum, inter["w"], inter["kd"], do, dvn, dht_, dstates, dh0 if need_dh0 else dstates, cu,
        offsets, scale, t,
        H=h, HK=hk, K=d_k, V=d_v, BT=CHUNK, BK=bk, BV=bv, GATE_VEC=vec, USE_DHT=dht is not None,
        STORE_DH0=need_dh0, IS_VARLEN=varlen, DT=dt, PREC=prec,
        num_warps=DSTATE_TUNING["num_warps"], num_stages=DSTATE_TUNING["num_stages"],
    )
    return dstates, dvn, dh0


def _triton_backward(gate, q, k, v, g, beta, scale, initial_state, do, dht, cu_seqlens, need_dh0, n_seq,
                     n_chunks, saved):
    """delta_rule_backward with every step a Triton kernel: the forward kernels recompute the states and
    keep their intermediates (w, u, kd, v', gcum, aqk, X), _dv_local_kernel and _dstate_tok_kernel give
    dv' and the state gradients, delta_bwd_local everything of a chunk but the gated pair products,
    delta_bwd_pairs those and the gate's cumsum reversal."""
    from .delta_bwd_local import bwd_local
    from .delta_bwd_pairs import bwd_pairs

    b, t, hk, d_k = q.shape
    h = v.shape[2]
    varlen = cu_seqlens is not None
    layout = _layout(q, v, cu_seqlens)
    inter: dict = {}
    with torch.no_grad():
        _, _, states = _forward(q, k, v, g, beta, None, scale, initial_state, False, cu_seqlens, gate,
                                keep=inter, output=False, saved=saved)
    do = do.contiguous().to(q.dtype)  # once: _state_grads' own conversion is then a no-op
    # dS' and dv' in the inputs' dtype, as the states: their consumers' tensor-core products round to it
    dstates, dvn, dh0 = _state_grads(q, k, do, dht, scale, inter, cu_seqlens, layout, gate, n_seq, n_chunks,
                                     need_dh0, q.dtype)
    gcum, idx = inter["gcum"], layout[1]
    dq, dk, dv, dbeta, dG, dAq, dA = bwd_local(q, k, v, beta, gcum, inter["xa"], inter["w"], inter["u"],
                                               inter["vn"], states, do, dstates, dvn, scale, cu_seqlens, gate,
                                               chunk_indices=idx if varlen else None, dv_dtype=v.dtype)
    del dstates, dvn, states, inter
    # dq, dk written in the inputs' dtype unless key heads are shared (then summed in float32 first)
    dq, dk, dg, dbeta = bwd_pairs(q, k, beta, gcum, dAq, dA, dq, dk, dG, dbeta, scale, cu_seqlens, gate,
                                  out_dtype=q.dtype if hk == h else torch.float32,
                                  chunk_indices=idx if varlen else None)
    if hk != h:  # key heads shared by h // hk value heads: sum their gradients
        dq = dq.reshape(b, t, hk, h // hk, d_k).sum(3)  # (B, T, H_k, D_k)
        dk = dk.reshape(b, t, hk, h // hk, d_k).sum(3)  # (B, T, H_k, D_k)
    out = [dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(g.dtype), dbeta.to(beta.dtype)]
    end = int(cu_seqlens[-1]) if varlen else t
    if end < t:  # rows past the last sequence: no kernel wrote them; nothing depends on them
        for x in out:
            x[:, end:] = 0
    return (*out, dh0)
