"""The gated delta rule: Gated DeltaNet (Qwen3-Next) and Kimi Delta Attention (Kimi Linear).

Per head, with a float32 state S [D_k, D_v] and α_t = exp(g_t):

    S_t = Diag(α_t) S_{t-1}
    S_t = S_t + β_t k_t (v_t − S_tᵀ k_t)ᵀ          (the delta rule: write only the correction)
    o_t = S_tᵀ (scale · q_t)

GDN has one gate per head (g [B, T, H]); KDA one per key channel (g [B, T, H, D_k]). GDN is
KDA with its scalar gate broadcast over D_k (a trailing dim of 1), so both share one
implementation; only the strong-gate route below has a scalar special case ([C, C] decays
instead of D_k of them).

Chunked form (Yang et al., "Parallelizing Linear Transformers with the Delta Rule", 2024, and
"Gated Delta Networks", 2025; the UT/WY transform). Inside a chunk of C tokens, with Γ_i the
per-channel cumulative decay from the chunk start and S₀ the incoming state, the pseudo-values
u_i = β_i (v_i − S_{i-1}'ᵀ k_i) solve a unit lower-triangular system

    (I + A) U = β V − (β K ⊙ Γ) S₀,      A_ij = β_i Σ_d k_id k_jd Γ_id/Γ_jd   (j < i)

so U = W − K_c S₀ with W = T βV, K_c = T (βK ⊙ Γ), T = (I + A)⁻¹ (T from one batched triangular
solve against the identity, then two matmuls: on the CPU that is cheaper than solving for the
two right-hand sides), and

    o_i  = (q_i ⊙ Γ_i)ᵀ S₀ + Σ_{j≤i} (Σ_d q_id k_jd Γ_id/Γ_jd) u_j
    S_C  = Diag(Γ_C) S₀ + Σ_j (k_j ⊙ Γ_C/Γ_j) u_jᵀ.

Decay ratios Γ_i/Γ_j = exp(G_i − G_j), G the within-chunk cumulative log-gate, take one of two
routes, chosen from the data for each segment (below):
- mild gates (every chunk decays by at most e^-60, the usual case): Γ_i · (1/Γ_j), both factors
  within e^±60, so all pair products are plain matmuls (and reuse q ⊙ Γ, βk ⊙ Γ). Decays are
  measured from the start of a span of chunks that decays by at most e^-60 in all (not from
  each chunk start), and inside a span the state is kept divided by its decay since the span
  start: the chunk loop then needs no decay per chunk, only one per span (see _decay_spans);
- strong gates (down to −30 per token): exp(G_i − G_j) formed only for j ≤ i and clamped to
  [−40, 0] before exp (see decay_exp): no overflow, no slow denormals. For a per-channel gate
  the [C, C, D_k] ratios are not materialised for the whole chunk: chunks are cut into
  sub-chunks; pairs in different sub-chunks factor through a reference point of the later
  sub-chunk (as in fla's chunk_kda), pairs inside one are factored when their span allows,
  else computed elementwise over D_k. This route is exact but slow (T = 4096 on the CPU: about
  3x the token loop's speed at gates of −10 per token, against ~10x on mild gates).
The sequence is processed in segments of _SEGMENT tokens with the state carried between them,
which keeps a segment's intermediates in cache on the CPU; within a segment all that does not
depend on the incoming state is batched, and only the state recurrence runs chunk by chunk.
"""

from __future__ import annotations

import torch

from .._checks import check_heads_divide, check_same_device, check_tensor
from ._dispatch import resolve_mode, resolve_step

# Tokens per chunk of the chunked form. fla and Qwen3-Next use 64; on the CPU 32 measured faster
# (T = 4096, H = 4, D = 64: the intra-chunk products and the inverse cost half; the sequential
# chunk loop runs twice as many, half-size steps, the same flops). 16 measured slower again.
CHUNK_SIZE = 32
_SEGMENT = 512  # tokens processed together before carrying the state on (cache locality)
_STRONG_PIECE = 128  # tokens whose per-channel intra-chunk decays are formed at once (strong gates)
_MIN_SUB = 8  # smallest sub-chunk of the per-channel (KDA) intra-chunk decay; see _pick_sub_chunk
_MAX_SPAN = 60.0  # largest log-decay span that is factored as exp(+x)·exp(−x); see _decay_spans
_STATE_DTYPES = (torch.float32, torch.float64)
_LOG_FLOOR = -40.0  # log-decays are clamped here before exp (e^-40 ≈ 4e-18); see decay_exp


def decay_exp(x: torch.Tensor, keep: torch.Tensor | None = None, floor: float = _LOG_FLOOR) -> torch.Tensor:
    """exp(x) of a log-decay x ≤ 0, and exactly 0 where the bool mask `keep` is False.

    x is clamped to [floor, 0] before exp: masked entries (which may be large and positive) never
    reach exp(+large), their gradient is 0 (no inf·0 in backward), and a factor below e^floor is
    held there instead of reaching the denormal range, which costs the CPU 10-100× per element
    (exp(−95) took 34 ms per million values here, against 0.3 ms). The default e^-40 ≈ 4e-18 is
    far below float32 resolution next to each output's own-token term (factor 1); a factor that
    is multiplied by a partner up to e^P needs floor ≤ −40 − P."""
    y = x.clamp(floor, 0.0).exp()
    return y if keep is None else y * keep


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    mode: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet (Qwen3-Next): the gated delta rule with one gate per head.

    q, k: [B, T, H_k, D_k]; v: [B, T, H, D_v] with H a multiple of H_k (each q/k head serves
    H // H_k consecutive value heads, as in Qwen3-Next); g: [B, T, H] log-decay (≤ 0);
    beta: [B, T, H] write strength in [0, 1]. scale: None = D_k ** -0.5.
    initial_state: float32 (or float64) [B, H, D_k, D_v]. use_qk_l2norm: L2-normalise q and k
    (eps 1e-6, in float32) before scaling. mode: "auto" | "chunk" | "recurrent" | "triton".

    Returns (o [B, T, H, D_v] in q's dtype, final state float32 [B, H, D_k, D_v] or None).
    Computation is in float32 (float64 if the inputs are float64) whatever the input dtype.
    """
    _check_inputs(q, k, v, g, beta, initial_state, per_channel=False)
    impl, kernel = resolve_mode(mode, q, "gated_delta_rule")
    if impl == "triton":
        return kernel(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm)
    g = g.unsqueeze(-1)  # (B, T, H, 1): the per-channel code path with one broadcast channel
    return _delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, impl)


def kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    mode: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention: the gated delta rule with one gate per key channel.

    As :func:`gated_delta_rule` except g: [B, T, H, D_k] (log-decay per key channel, ≤ 0).
    Returns (o [B, T, H, D_v] in q's dtype, final state float32 [B, H, D_k, D_v] or None).
    """
    _check_inputs(q, k, v, g, beta, initial_state, per_channel=True)
    impl, kernel = resolve_mode(mode, q, "kda")
    if impl == "triton":
        return kernel(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm)
    return _delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, impl)


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    mode: str = "auto",
) -> torch.Tensor:
    """One decode token of Gated DeltaNet; updates `state` in place.

    q, k: [B, H_k, D_k]; v: [B, H, D_v]; g, beta: [B, H]; state: float32 [B, H, D_k, D_v].
    Returns o [B, H, D_v] in q's dtype. ``mode``: "auto" (the fused Triton step on CUDA outside
    torch.compile, else torch), "triton", or "recurrent" / "chunk" (the torch step).
    """
    _check_step_inputs(q, k, v, g, beta, state, per_channel=False)
    kernel = resolve_step(mode, q, "gated_delta_rule_step")
    if kernel is not None:
        return kernel(q, k, v, g, beta, state, scale=scale, use_qk_l2norm=use_qk_l2norm)
    return _step_in_place(q, k, v, g.unsqueeze(-1), beta, state, scale, use_qk_l2norm)


def kda_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    mode: str = "auto",
) -> torch.Tensor:
    """One decode token of Kimi Delta Attention; updates `state` in place.

    q, k: [B, H_k, D_k]; v: [B, H, D_v]; g: [B, H, D_k]; beta: [B, H];
    state: float32 [B, H, D_k, D_v]. Returns o [B, H, D_v] in q's dtype. ``mode`` as in
    :func:`gated_delta_rule_step`.
    """
    _check_step_inputs(q, k, v, g, beta, state, per_channel=True)
    kernel = resolve_step(mode, q, "kda_step")
    if kernel is not None:
        return kernel(q, k, v, g, beta, state, scale=scale, use_qk_l2norm=use_qk_l2norm)
    return _step_in_place(q, k, v, g, beta, state, scale, use_qk_l2norm)


# --------------------------------------------------------------------------------------------
# validation


def _check_inputs(q, k, v, g, beta, initial_state, per_channel: bool) -> None:
    check_tensor("q", q, 4, "[B, T, H_k, D_k]")
    b, t, h_k, d_k = q.shape
    check_tensor("k", k, 4, "[B, T, H_k, D_k]", shape=(b, t, h_k, d_k), dtypes=(q.dtype,))
    check_tensor("v", v, 4, "[B, T, H, D_v]", shape=(b, t, None, None), dtypes=(q.dtype,))
    h, d_v = v.shape[2], v.shape[3]
    check_heads_divide("v", h, "q", h_k)
    if per_channel:
        check_tensor("g", g, 4, "[B, T, H, D_k]", shape=(b, t, h, d_k))
    else:
        check_tensor("g", g, 3, "[B, T, H]", shape=(b, t, h))
    check_tensor("beta", beta, 3, "[B, T, H]", shape=(b, t, h))
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 4, "[B, H, D_k, D_v]", shape=(b, h, d_k, d_v),
                     dtypes=_STATE_DTYPES)
    check_same_device(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)


def _check_step_inputs(q, k, v, g, beta, state, per_channel: bool) -> None:
    check_tensor("q", q, 3, "[B, H_k, D_k]")
    b, h_k, d_k = q.shape
    check_tensor("k", k, 3, "[B, H_k, D_k]", shape=(b, h_k, d_k), dtypes=(q.dtype,))
    check_tensor("v", v, 3, "[B, H, D_v]", shape=(b, None, None), dtypes=(q.dtype,))
    h, d_v = v.shape[1], v.shape[2]
    check_heads_divide("v", h, "q", h_k)
    if per_channel:
        check_tensor("g", g, 3, "[B, H, D_k]", shape=(b, h, d_k))
    else:
        check_tensor("g", g, 2, "[B, H]", shape=(b, h))
    check_tensor("beta", beta, 2, "[B, H]", shape=(b, h))
    check_tensor("state", state, 4, "[B, H, D_k, D_v]", shape=(b, h, d_k, d_v), dtypes=_STATE_DTYPES)
    check_same_device(q=q, k=k, v=v, g=g, beta=beta, state=state)


# --------------------------------------------------------------------------------------------
# shared math


def _compute_dtype(*xs: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _prepare_qk(q, k, n_rep: int, use_qk_l2norm: bool, scale: float | None, head_dim: int):
    """Optionally L2-normalise (fla / HF: x / sqrt(Σx² + 1e-6)), scale q, expand key heads to value heads."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_qk_l2norm:
        q = q * (torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * scale)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    else:
        q = q * scale
    if n_rep > 1:  # grouped values: q/k head i serves value heads i*n_rep .. i*n_rep + n_rep - 1
        q = q.repeat_interleave(n_rep, dim=head_dim)  # (..., H, ..., D_k)
        k = k.repeat_interleave(n_rep, dim=head_dim)  # (..., H, ..., D_k)
    return q, k


def _delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, impl):
    """g here is [B, T, H, 1] (GDN) or [B, T, H, D_k] (KDA)."""
    dtype = _compute_dtype(q, g, beta, initial_state)
    n_rep = v.shape[2] // q.shape[2]
    t = q.shape[1]
    state = None if initial_state is None else initial_state.to(dtype)
    if impl == "recurrent" or t == 0:
        q, k = _prepare_qk(q.to(dtype), k.to(dtype), n_rep, use_qk_l2norm, scale, head_dim=2)
        o, state = _delta_recurrent(q, k, v.to(dtype), g.to(dtype), beta.to(dtype), state)
    else:
        o, state = _delta_chunked(q, k, v, g, beta, scale, state, use_qk_l2norm, n_rep, dtype)
    return o.to(v.dtype), (state if output_final_state else None)


def _delta_step(q, k, v, g, beta, state):
    """One token, out of place. q, k [B, H, D_k] (q scaled); v [B, H, D_v]; g [B, H, 1|D_k];
    beta [B, H]; state [B, H, D_k, D_v]. Returns (o [B, H, D_v], new state).

    Products are broadcast-and-sum rather than matmul: for one token they are tiny, and a
    threaded BLAS call costs more than the arithmetic (and far more on a loaded machine)."""
    state = state * g.exp().unsqueeze(-1)  # (B, H, D_k, D_v)
    predicted = (state * k.unsqueeze(-1)).sum(-2)  # (B, H, D_v)  Sᵀk
    u = beta.unsqueeze(-1) * (v - predicted)  # (B, H, D_v)
    state = state + k.unsqueeze(-1) * u.unsqueeze(-2)  # (B, H, D_k, D_v)
    o = (state * q.unsqueeze(-1)).sum(-2)  # (B, H, D_v)
    return o, state


def _delta_recurrent(q, k, v, g, beta, state):
    """The oracle: a token loop. q (scaled), k [B, T, H, D_k]; v [B, T, H, D_v]; g [B, T, H, 1|D_k];
    beta [B, T, H]; state [B, H, D_k, D_v] or None. Returns (o [B, T, H, D_v], final state)."""
    b, t, h, d_k = k.shape
    if state is None:
        state = q.new_zeros(b, h, d_k, v.shape[-1])
    outs = []
    for i in range(t):
        o, state = _delta_step(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], state)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)  # (B, T, H, D_v)
    return o, state


def _to_chunks(x: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, X] -> [B, H, N, C, X] in `dtype`, zero-padded at the end of the sequence.

    Always a fresh tensor (one copy), so callers may scale it in place."""
    b, t, h, d = x.shape
    n = -(-t // chunk)
    out = x.new_empty((b, h, n * chunk, d), dtype=dtype)  # (B, H, N·C, X)
    out[:, :, t:] = 0
    out[:, :, :t] = x.transpose(1, 2)
    return out.view(b, h, n, chunk, d)  # (B, H, N, C, X)


def _chunk_view(x: torch.Tensor, chunk: int, n_heads_k: int, rep: int) -> torch.Tensor:
    """[B, T, H', X] (T a multiple of `chunk`; H' = H_k for q/k, H_k·rep for value-head tensors)
    -> a view [N, B, H_k, rep, C, X], no copy (q/k heads broadcast over their rep value heads).

    A product whose first operand is a contiguous [N, B, H_k, rep, C, ·] factor comes out
    contiguous in this chunk-major layout: that product is the layout copy."""
    b, t, h, d = x.shape
    x = x.unflatten(1, (t // chunk, chunk))  # (B, N, C, H', X)
    x = x.unflatten(3, (n_heads_k, h // n_heads_k))  # (B, N, C, H_k, 1|rep, X)
    return x.expand(-1, -1, -1, -1, rep, -1).permute(1, 0, 3, 4, 2, 5)  # (N, B, H_k, rep, C, X)


def _inv_norm(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / sqrt(Σx² + 1e-6) over the last dim (fla / HF's L2 norm), in `dtype`: [..., D] -> [..., 1]."""
    return (torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype).square() + 1e-6).rsqrt()


def _delta_chunked(q, k, v, g, beta, scale, state, use_qk_l2norm: bool, n_rep: int, dtype):
    """The chunked form over a whole sequence. q, k [B, T, H_k, D_k]; v [B, T, H, D_v];
    g [B, T, H, 1|D_k]; beta [B, T, H]; state [B, H, D_k, D_v] or None.
    Returns (o [B, T, H, D_v] in `dtype`, final state [B, H, D_k, D_v]).

    Inputs are read in place through chunk-major views ([N, B, H_k, rep, C, ·]); the L2 norms, the
    scale, β and the decays are applied as one factor per tensor, and that product is the layout
    copy. Everything that does not depend on the incoming state is batched over a segment of
    _SEGMENT tokens; only the state recurrence runs chunk by chunk. Segments bound the
    intermediates (the stacked entering states alone are D_v/C times the size of q); whole-sequence
    tensors are only the output, G (the size of g) and the inverse norms."""
    b, t, h, d_v = v.shape
    h_k, d_k = q.shape[2], q.shape[3]
    c = CHUNK_SIZE
    scale = d_k**-0.5 if scale is None else scale
    n = -(-t // c)
    if n * c != t:  # zero-padded to whole chunks: k = 0, β = 0, g = 0 leave the state untouched
        pad = n * c - t
        q, k, v, g = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))  # (B, N·C, ·)
        beta = torch.nn.functional.pad(beta, (0, 0, 0, pad))  # (B, N·C, H)
    # Without autograd, intermediates may be written in place / through out= (fewer passes).
    fused = not (torch.is_grad_enabled()
                 and any(x is not None and x.requires_grad for x in (q, k, v, g, beta, state)))
    view = lambda x: _chunk_view(x, c, h_k, n_rep)  # (N, B, H_k, rep, C, ·), no copy
    # q's row factor (scale · its inverse norm) is applied to the output rows, as the output is
    # written (o is linear in each row of q): one pass over q's per-channel factor product fewer
    q_row, k_row = scale, None
    if use_qk_l2norm:
        q_row = (_inv_norm(q, dtype) * scale).view(b, n, c, h_k, 1, 1)  # (B, N, C, H_k, 1, 1)
        q_row = q_row.expand(-1, -1, -1, -1, n_rep, -1).reshape(b, n, c, h, 1)  # (B, N, C, H, 1)
        k_row = view(_inv_norm(k, dtype))  # (N, B, H_k, rep, C, 1)
    state = q.new_zeros(b * h, d_k, d_v, dtype=dtype) if state is None else state.reshape(b * h, d_k, d_v)
    inputs = [view(q), view(k), view(v), view(beta.unsqueeze(-1))]
    # G, the log of Γ_i (decay from the chunk start through token i), for the whole sequence at once,
    # as a product with a lower-triangular ones matrix in the input layout: the same sums as a cumsum
    # along C, 1.9x faster for KDA's per-channel gates on the CPU (and 1.7-4x faster than the same
    # product in the chunk-major view).
    ones_lower = torch.ones(c, c, dtype=dtype, device=q.device).tril()
    G = ones_lower @ g.to(dtype).reshape(b * n, c, -1)  # (B·N, C, H·(1|D_k))
    G = view(G.view(b, n * c, h, -1))  # (N, B, H_k, rep, C, 1|D_k), a view
    per_segment = max(1, _SEGMENT // c)
    mild, span_offset, span_ends = _decay_spans(G, per_segment)
    lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # j ≤ i
    o = q.new_empty((b, n, c, h, d_v), dtype=dtype)  # (B, N, C, H, D_v)
    for segment, first in enumerate(range(0, n, per_segment)):
        chunks = slice(first, first + per_segment)
        q6, k6, v6, beta6 = (x[chunks] for x in inputs)  # (n, B, H_k, rep, C, ·)
        if mild[segment]:
            spans = (span_offset[chunks], span_ends[chunks])  # see _decay_spans
        o_seg, state = _delta_segment(q6, k6, v6, G[chunks], beta6, None if k_row is None else k_row[chunks],
                                      state, spans if mild[segment] else None, lower, fused)
        o_seg = o_seg.view(-1, b, h, c, d_v).permute(1, 0, 3, 2, 4)  # (B, n, C, H, D_v) from (n, B·H, C, D_v)
        row = q_row if isinstance(q_row, float) else q_row[:, chunks]  # (B, n, C, H, 1) or a float
        if fused:
            torch.mul(o_seg, row, out=o[:, chunks])
        else:
            o[:, chunks] = o_seg * row
        del o_seg  # freed before the next segment allocates (a lower peak: fewer page faults)
    return o.view(b, -1, h, d_v)[:, :t], state.view(b, h, d_k, d_v)  # (B, T, H, D_v)


def _delta_segment(q, k, v, G, beta, k_row, state, spans, lower, fused: bool):
    """One segment of chunks (see the module docstring). q, k [n, B, H_k, rep, C, D_k] as read;
    v [n, B, H_k, rep, C, D_v]; G [n, B, H_k, rep, C, 1|D_k] the cumulative log-gate within each
    chunk; beta [.., C, 1] (views, any strides); k_row None or k's inverse norm [n, B, H_k, rep, C, 1];
    state [B·H, D_k, D_v]; spans: None (strong gates) or (offset [n, B, H_k, rep, 1, 1|D_k], ends:
    list of n bools), see _decay_spans; lower [C, C] bool, j ≤ i; fused: no autograd (intermediates
    may be overwritten). q is used as read: its row factor (scale, norm) is the caller's.
    Padded tokens have k = 0, β = 0, g = 0, so they leave the state untouched.
    Returns (o [n, B·H, C, D_v] without q's row factor, state after the last chunk)."""
    n, chunk, d_v = q.shape[0], q.shape[-2], v.shape[-1]
    flat = lambda x: x.reshape(n, -1, *x.shape[-2:])  # (n, B·H, C, ·): a view of a contiguous product
    beta = beta.to(state.dtype).contiguous()  # (n, B, H_k, rep, C, 1)
    v_beta = flat(beta * v)  # (n, B·H, C, D_v)

    if spans is not None:
        # Mild gates, decays measured from the start of a span of chunks (see _decay_spans) that
        # decays by at most e^-60 in every channel: Γ_i/Γ_j factors as Γ_i · (1/Γ_j) with both
        # factors within e^±60, so all pair products are plain matmuls, and q ⊙ Γ and β k ⊙ Γ are
        # the very tensors the inter-chunk terms need. Inside a span the state is kept divided by
        # its decay since the span start (S/D): it then takes k ⊙ (1/Γ) u without a decay per chunk,
        # and is multiplied by the span's decay once, at its end. The norms, the scale, β and the
        # decays are applied as one factor per tensor (one pass each, which is also the layout
        # copy: the factor comes first so the product is contiguous chunk-major).
        offset, ends = spans
        if fused:  # G + offset written chunk-major in one pass; 1/Γ as one division
            G = torch.add(G, offset, out=G.new_empty(G.shape))  # (n, B, H_k, rep, C, 1|D_k)
            decay_in = G.exp_()  # (n, B, H_k, rep, C, 1|D_k)   Γ_i ∈ [e^-60, 1]
            decay_out = G.new_empty(G.shape)  # (n, B, H_k, rep, C, 1|D_k)   1/Γ_j (times k's norm)
            torch.div(1.0 if k_row is None else k_row, decay_in, out=decay_out)
        else:
            G = G.contiguous() + offset  # (n, B, H_k, rep, C, 1|D_k)   log-decay from the span start
            decay_in = G.exp()  # (n, B, H_k, rep, C, 1|D_k)   Γ_i ∈ [e^-60, 1]
            # k ⊙ e^-G, not k / Γ: the quotient's gradient divides by Γ² (e^-120 is 0 in float32: NaN)
            decay_out = (-G).exp() if k_row is None else (-G).exp() * k_row  # (…, C, 1|D_k)   1/Γ_j
        q_in = flat(decay_in * q)  # (n, B·H, C, D_k)   q_i ⊙ Γ_i
        k_beta_row = beta if k_row is None else beta * k_row  # (n, B, H_k, rep, C, 1)
        kb_in = flat((decay_in * k_beta_row) * k)  # (n, B·H, C, D_k)   β_i k_i ⊙ Γ_i
        k_out = flat(decay_out * k)  # (n, B·H, C, D_k)   k_j ⊘ Γ_j
        k_state_t = k_out.transpose(-1, -2)  # (n, B·H, D_k, C)
        qk = (q_in @ k_state_t).mul_(lower)  # (n, B·H, C, C)
        kk = kb_in @ k_state_t  # (n, B·H, C, C); only its strict lower triangle is read by the solve
        # the state's decay at each span end, from the span start: (n, B·H, 1|D_k, 1)
        span_decay = flat(decay_in)[..., -1, :].unsqueeze(-1)
        before, after = None, [span_decay[i] if end else None for i, end in enumerate(ends)]
    else:
        # Strong gates: decay ratios formed as exp(G_i − G_j) only for j ≤ i, clamped (decay_exp).
        dtype = state.dtype
        q = flat(q.to(dtype)).contiguous()  # (n, B·H, C, D_k)
        k = flat(k.to(dtype) if k_row is None else k_row * k).contiguous()  # (n, B·H, C, D_k)
        G = flat(G)  # (n, B·H, C, 1|D_k)
        k_beta = k * flat(beta)  # (n, B·H, C, D_k)
        # (n, B·H, C, C) each, zero above the diagonal. KDA's [s, s, D_k] decays are formed a few chunks
        # at a time (_STRONG_PIECE tokens): 1.2x faster than a whole segment's at once (cache-resident).
        intra = _intra_scalar_gate if G.shape[-1] == 1 else _intra_channel_gate
        piece = n if G.shape[-1] == 1 else max(1, _STRONG_PIECE // chunk)
        parts = [intra(q[i:i + piece], k_beta[i:i + piece], k[i:i + piece], G[i:i + piece])
                 for i in range(0, n, piece)]
        qk, kk = (torch.cat(x) if len(x) > 1 else x[0] for x in zip(*parts, strict=True))
        decay_in = decay_exp(G)  # (n, B·H, C, 1|D_k)   Γ_i
        q_in, kb_in = q * decay_in, k_beta * decay_in  # (n, B·H, C, D_k)
        k_state_t = (k * decay_exp(G[..., -1:, :] - G)).transpose(-1, -2)  # (n, B·H, D_k, C)  K̃ᵀ
        before, after = decay_in[..., -1, :].unsqueeze(-1), None  # (n, B·H, 1|D_k, 1)   Γ_C

    # UT transform: T = (I + A)⁻¹ by one unit-lower-triangular solve against the identity (only the
    # strict lower triangle of kk is read), then W and K_c by matmuls (1.8x faster than two solves
    # at C = 32). Solved as Tᵀ (I + A)ᵀ = I: 1.4x faster than T from (I + A) T = I on this CPU.
    eye = torch.eye(chunk, dtype=kk.dtype, device=kk.device)
    t_inv = torch.linalg.solve_triangular(kk.mT, eye, upper=True, left=False, unitriangular=True)  # Tᵀ
    t_inv = t_inv.mT  # (n, B·H, C, C)
    w = t_inv @ v_beta  # (n, B·H, C, D_v)
    k_cum = t_inv @ kb_in  # (n, B·H, C, D_k)
    del kk, t_inv, v_beta, kb_in  # freed here, not at return: see the del in _delta_chunked
    u, entering, state = _state_scan(w, k_cum, k_state_t, state, before, after)
    del w, k_cum, k_state_t
    fold = lambda x: x.view(-1, *x.shape[-2:])  # (n·B·H, ·, ·) views for baddbmm
    o = torch.bmm(fold(q_in), fold(entering)).baddbmm_(fold(qk), fold(u))  # (n·B·H, C, D_v)
    return o.view(n, -1, chunk, d_v), state


def _state_scan(w, k_cum, k_state_t, state, before, after):
    """The sequential part: per chunk i, u_i = W_i − K_c,i S_i and S_{i+1} = Γ_C,i S_i + K̃_iᵀ u_i,
    with the decay Γ_C either applied per chunk (`before`: strong gates) or folded into the factors
    and applied at span ends only (`after`: mild gates, S kept divided by its decay in a span).
    w [n, B·H, C, D_v]; k_cum [n, B·H, C, D_k]; k_state_t [n, B·H, D_k, C] (K̃ᵀ, or (k ⊘ Γ)ᵀ in
    a span); state [B·H, D_k, D_v]; before [n, B·H, 1|D_k, 1] or None; after None or a list of n
    [B·H, 1|D_k, 1] tensors or None.
    Returns (u [n, B·H, C, D_v], the state entering each chunk [n, B·H, D_k, D_v], final state).

    Without autograd u_i is computed in place in W_i (w is a fresh product, not read again) and
    each state written into a preallocated stack: two ops per chunk inside a span (three with a
    decay per chunk), no list, no stack copy. Measured slower on the CPU: folding it into
    S' = (Γ_C − K̃ᵀK_c) S + K̃ᵀW (one op per chunk but two more [D_k, C] @ [C, D] products per
    chunk); one [K_c; q ⊙ Γ] @ S product per chunk instead of stacking the entering states (+4%:
    the concatenations cost more than it saved)."""
    n = w.shape[0]
    before = [None] * n if before is None else before
    after = [None] * n if after is None else after
    if torch.is_grad_enabled() and any(x.requires_grad for x in (w, k_cum, k_state_t, state)):
        entering, us = [], []
        for w_i, k_cum_i, kt_i, b_i, a_i in zip(w, k_cum, k_state_t, before, after, strict=True):
            entering.append(state)
            u_i = torch.baddbmm(w_i, k_cum_i, state, alpha=-1.0)  # (B·H, C, D_v)
            us.append(u_i)
            state = torch.baddbmm(state if b_i is None else state * b_i, kt_i, u_i)  # (B·H, D_k, D_v)
            state = state if a_i is None else state * a_i
        return torch.stack(us), torch.stack(entering), state  # (n, B·H, C, D_v), (n, B·H, D_k, D_v)
    states = state.new_empty((n + 1, *state.shape))  # (n + 1, B·H, D_k, D_v)
    states[0] = state
    u = w  # (n, B·H, C, D_v)
    s = states.unbind(0)
    for u_i, k_cum_i, kt_i, b_i, a_i, s_i, s_next in zip(u, k_cum, k_state_t, before, after, s[:-1], s[1:],
                                                         strict=True):
        u_i.baddbmm_(k_cum_i, s_i, alpha=-1.0)
        if b_i is None:
            torch.baddbmm(s_i, kt_i, u_i, out=s_next)
        else:
            torch.mul(s_i, b_i, out=s_next).baddbmm_(kt_i, u_i)
        if a_i is not None:
            s_next.mul_(a_i)
    return u, states[:-1], states[-1].clone()


def _decay_spans(G: torch.Tensor, per_segment: int) -> tuple[list[bool], torch.Tensor, list[bool]]:
    """Group the chunks of each segment into spans whose total decay stays within e^-_MAX_SPAN in
    every channel (greedy, from the per-chunk worst channel: conservative), so that decays measured
    from a span start factor as Γ_i · (1/Γ_j) with both factors within e^±_MAX_SPAN.
    G [N, B, H_k, rep, C, 1|D_k], the within-chunk cumulative log-gate.
    Returns (mild: one bool per segment, whether every chunk in it fits a span, i.e. decays by at
    most e^-_MAX_SPAN itself; offset [N, B, H_k, rep, 1, 1|D_k], each chunk's log-decay from its
    span start to the chunk start (0 in segments that are not mild); ends: per chunk, whether it
    ends a span). Spans never cross a segment boundary.

    Log-decays within a span reach −_MAX_SPAN (within a chunk they are usually far smaller), so
    the factors exp(±G) carry up to _MAX_SPAN · 2⁻²⁴ relative rounding: about 2x the error of
    per-chunk factors against the float64 loop on well-conditioned inputs (~5e-7 rms)."""
    n = G.shape[0]
    total = G[..., -1:, :]  # (N, B, H_k, rep, 1, 1|D_k)   each chunk's log-decay
    worst = total.detach().reshape(n, -1).amin(1).tolist()  # (N,) on the host
    mild, span_id, ends = [], [], []
    for first in range(0, n, per_segment):
        seg = worst[first:first + per_segment]
        mild.append(min(seg) >= -_MAX_SPAN)
        acc = -float("inf")
        for w in seg:
            if not mild[-1] or acc + w < -_MAX_SPAN:  # start a new span (every chunk alone if not mild)
                acc = 0.0
                if span_id:
                    ends[-1] = True
                span_id.append(len(span_id) and span_id[-1] + 1)
            else:
                span_id.append(span_id[-1])
            acc += w
            ends.append(False)
        ends[-1] = True
    # Each chunk's log-decay from its span start: an exclusive cumulative sum that restarts at each
    # span start, as one [P, P] product per segment of P chunks (exact per-span sums, no cancellation
    # as in differences of a whole-sequence cumsum; memory linear in N).
    pad = -n % per_segment
    ids = torch.tensor(span_id + [-1] * pad, device=G.device).view(-1, per_segment)  # (segments, P)
    order = torch.arange(per_segment, device=G.device)
    earlier = (ids[:, :, None] == ids[:, None, :]) & (order[None, :] < order[:, None])  # (segments, P, P)
    totals = torch.nn.functional.pad(total.reshape(n, -1), (0, 0, 0, pad))  # (segments·P, rest)
    offset = earlier.to(G.dtype) @ totals.view(ids.shape[0], per_segment, -1)  # (segments, P, rest)
    offset = offset.view(-1, totals.shape[-1])[:n].view(total.shape)  # (N, B, H_k, rep, 1, 1|D_k)
    return mild, offset, ends


def _chunk_factorable(G: torch.Tensor) -> bool:
    """Whether every chunk's total log-decay (in every channel) is within _MAX_SPAN, so that
    Γ_i/Γ_j = Γ_i · (1/Γ_j) keeps both factors within e^±60, far from float32's e^±87 limits
    (the per-segment form of this test is in _decay_spans). G [..., C, 1|D_k]."""
    return float(G.detach()[..., -1, :].amin()) >= -_MAX_SPAN


def _intra_scalar_gate(q, k_beta, k, G):
    """Decayed pair products for a scalar gate: (q_i·k_j, β_i k_i·k_j) · exp(G_i − G_j), j ≤ i.
    q, k_beta, k [B, H, N, C, D_k]; G [B, H, N, C, 1]. Returns two [B, H, N, C, C]."""
    c = G.shape[-2]
    future = torch.ones(c, c, dtype=torch.bool, device=G.device).triu(1)
    diff = G - G.transpose(-1, -2)  # (B, H, N, C, C)  G_i − G_j
    decay = decay_exp(diff, ~future)  # (B, H, N, C, C)
    k_t = k.transpose(-1, -2)  # (B, H, N, D_k, C)
    return (q @ k_t) * decay, (k_beta @ k_t) * decay


def _pick_sub_chunk(G: torch.Tensor) -> tuple[int, bool]:
    """Sub-chunk size for the per-channel decay when a whole chunk spans more than _MAX_SPAN, and
    whether pairs inside a sub-chunk may be factored.

    Factoring exp(G_i − G_j) = exp(G_i − R) · exp(R − G_j) around R, the midpoint of the sub-chunk's
    log-decay range, is exact in floating point while neither factor under/overflows, i.e. while the
    span G_first − G_last of every sub-chunk (over all channels) stays within _MAX_SPAN (factors
    within e^±30). Take the largest such sub-chunk (fewest cross-sub-chunk bridges); if even
    _MIN_SUB tokens span more (gates near −30), use _MIN_SUB and the elementwise form inside."""
    c = G.shape[-2]
    sub = c
    while sub >= _MIN_SUB and c % sub == 0:
        Gr = G.detach().reshape(*G.shape[:-2], c // sub, sub, G.shape[-1])  # (..., m, s, D_k)
        if float((Gr[..., 0, :] - Gr[..., -1, :]).amax()) <= _MAX_SPAN:
            return sub, True
        sub //= 2
    return (_MIN_SUB if c % _MIN_SUB == 0 else c), False


def _intra_channel_gate(q, k_beta, k, G):
    """As :func:`_intra_scalar_gate` with G [B, H, N, C, D_k]: Σ_d a_id k_jd exp(G_id − G_jd).

    Each sub-chunk I has a reference log-decay R_I (the midpoint of its range when factored, else
    its first token's) and rows carry exp(G_i − R_I). Columns j of earlier sub-chunks carry
    exp(R_I − G_j) ≤ 1 (one [C, D_k] copy of k per row block). Pairs inside one sub-chunk are
    exp(G_i − R_I) · exp(R_I − G_j) when factored (see :func:`_pick_sub_chunk`), else computed
    elementwise over D_k with the decay clamped before exp (see decay_exp)."""
    *lead, c, d = G.shape
    sub, factored = _pick_sub_chunk(G)
    m = c // sub
    a = torch.stack([q, k_beta]).reshape(2, *lead, m, sub, d)  # (2, B, H, N, m, s, D_k)
    kr = k.reshape(*lead, m, sub, d)  # (B, H, N, m, s, D_k)
    Gr = G.reshape(*lead, m, sub, d)  # (B, H, N, m, s, D_k)
    first, last = Gr[..., :1, :], Gr[..., -1:, :]  # (B, H, N, m, 1, D_k)
    ref = (first + last) / 2 if factored else first  # (B, H, N, m, 1, D_k)
    # exp(G_i − R): within e^±_MAX_SPAN/2 when factored, else ≤ 1 (R is the first token's)
    to_ref = (Gr - ref).exp() if factored else decay_exp(Gr - ref)  # (B, H, N, m, s, D_k)
    a_rel = a * to_ref  # (2, B, H, N, m, s, D_k)

    future = torch.ones(sub, sub, dtype=torch.bool, device=G.device).triu(1)
    if factored:
        k_rel = kr / to_ref  # (B, H, N, m, s, D_k)   exp(R − G_j), within e^±_MAX_SPAN/2
        within = (a_rel @ k_rel.transpose(-1, -2)).masked_fill(future, 0.0)  # (2, B, H, N, m, s, s)
    else:
        diff = Gr.unsqueeze(-2) - Gr.unsqueeze(-3)  # (B, H, N, m, s, s, D_k)  G_i − G_j
        # j > i has G_i − G_j ≥ 0, clamped to 0 (a finite 1): masked below on the s x s result, which
        # is D_k times smaller than this decay tensor
        k_decay = kr.unsqueeze(-3) * decay_exp(diff)  # (B, H, N, m, s, s, D_k)
        # row i of both products (q_i and β_i k_i) against its own [s, D_k] block of decayed keys: one
        # [2, D_k] @ [D_k, s] product per row (a [1, D_k] row per product broadcast k_decay over the
        # pair, a copy that took ~20% of this route's time)
        rows = a.movedim(0, -2)  # (B, H, N, m, s, 2, D_k)
        within = (rows @ k_decay.transpose(-1, -2)).movedim(-2, 0)  # (2, B, H, N, m, s, s)
        within = within.masked_fill(future, 0.0)
    if m == 1:
        full = within.reshape(2, *lead, c, c)  # (2, B, H, N, C, C)
        return full[0], full[1]

    # Across sub-chunks: row block I is [s, D_k] @ [D_k, C] with the columns j of earlier sub-chunks
    # carrying exp(R_I − G_j) ≤ 1, so that a_rel_i · k_bridged_j = a_i k_j exp(G_i − G_j).
    earlier = torch.ones(m, m, dtype=torch.bool, device=G.device).tril(-1)  # J < I
    keep = earlier.repeat_interleave(sub, dim=1).unsqueeze(-1)  # (m, C, 1)
    to_row = ref - G.unsqueeze(-3)  # (B, H, N, m, C, D_k)   R_I − G_j
    # rows carry up to e^(_MAX_SPAN/2) when factored around the midpoint: floor this factor lower to match
    floor = _LOG_FLOOR - (_MAX_SPAN / 2 if factored else 0.0)
    k_bridged = k.unsqueeze(-3) * decay_exp(to_row, keep, floor)  # (B, H, N, m, C, D_k)
    # both products' rows of a sub-chunk against its bridged keys as one [2s, D_k] @ [D_k, C] product
    # (with the pair as a leading dim, matmul broadcast k_bridged over it: a copy twice its size)
    rows = a_rel.movedim(0, -3).flatten(-3, -2)  # (B, H, N, m, 2s, D_k)
    across = (rows @ k_bridged.transpose(-1, -2)).unflatten(-2, (2, sub))  # (B, H, N, m, 2, s, C)
    across = across.movedim(-3, 0)  # (2, B, H, N, m, s, C)

    eye = torch.eye(m, dtype=G.dtype, device=G.device).reshape(m, 1, m, 1)
    blocks = within.unsqueeze(-2) * eye  # (2, B, H, N, m, s, m, s)  diagonal blocks in place
    full = (across + blocks.reshape(2, *lead, m, sub, c)).reshape(2, *lead, c, c)  # (2, B, H, N, C, C)
    return full[0], full[1]


def _step_in_place(q, k, v, g, beta, state, scale, use_qk_l2norm) -> torch.Tensor:
    dtype = state.dtype
    q, k = _prepare_qk(q.to(dtype), k.to(dtype), v.shape[1] // q.shape[1], use_qk_l2norm, scale, head_dim=1)
    o, new_state = _delta_step(q, k, v.to(dtype), g.to(dtype), beta.to(dtype), state)
    state.copy_(new_state)
    return o.to(v.dtype)


__all__ = ["CHUNK_SIZE", "gated_delta_rule", "gated_delta_rule_step", "kda", "kda_step"]
