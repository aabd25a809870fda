"""Lightning attention (MiniMax-Text-01): linear attention with a fixed per-head decay.

Per head h, with a float32 state S [D_k, D_v] and decay rate s_h ≥ 0:

    S_t = e^{-s_h} S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ (scale · q_t)

The block form (MiniMax-Text-01, "Scaling Foundation Models with Lightning Attention", 2025;
the Lightning Attention-2 tiling) splits the sequence into blocks of C tokens. Inside a block,
with i, j the positions in it and S₀ the state entering it:

    o_i = e^{-s(i+1)} q_iᵀ S₀ + Σ_{j≤i} e^{-s(i-j)} (q_i·k_j) v_j          (inter + intra-block)
    S_C = e^{-sC} S₀ + Σ_j e^{-s(C-1-j)} k_j v_jᵀ

The intra-block terms of all blocks are batched; only the inter-block state is a loop. The last
block may be partial: its decays use its true length, so the final state is exact.
"""

from __future__ import annotations

import torch

from .._checks import check_same_device, check_tensor
from ._dispatch import resolve_mode, resolve_step
from .delta_rule import _to_chunks, decay_exp

BLOCK_SIZE = 64  # tokens per block; the math is block-size independent (MiniMax uses 256)
_STATE_DTYPES = (torch.float32, torch.float64)


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MiniMax lightning attention over a sequence.

    q, k: [B, T, H, D_k]; v: [B, T, H, D_v]; slope: [H] decay rates s_h ≥ 0 (per-step decay
    e^{-s_h}); scale: None = 1.0 (MiniMax does not scale q); initial_state: float32 (or float64)
    [B, H, D_k, D_v]. mode: "auto" | "chunk" | "recurrent" | "triton".

    Returns (o [B, T, H, D_v] in q's dtype, final state float32 [B, H, D_k, D_v] or None).
    """
    _check_inputs(q, k, v, slope, initial_state)
    impl, kernel = resolve_mode(mode, q, "lightning_attention")
    if impl == "triton":
        return kernel(q, k, v, slope, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state)
    dtype = torch.float64 if torch.float64 in (q.dtype, slope.dtype) else torch.float32
    if initial_state is not None and initial_state.dtype == torch.float64:
        dtype = torch.float64
    slope_c = slope.to(dtype)
    state = None if initial_state is None else initial_state.to(dtype)
    if impl == "recurrent" or q.shape[1] == 0:
        q = q.to(dtype) if scale is None else q.to(dtype) * scale
        o, state = _lightning_recurrent(q, k.to(dtype), v.to(dtype), slope_c, state)
    else:
        qc, kc, vc = (_to_chunks(x, BLOCK_SIZE, dtype) for x in (q, k, v))  # (B, H, N, C, ·)
        qc = qc if scale is None else qc * scale
        o, state = _lightning_chunk(qc, kc, vc, slope_c, state, q.shape[1])
    return o.to(v.dtype), (state if output_final_state else None)


def lightning_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    mode: str = "auto",
) -> torch.Tensor:
    """One decode token; updates `state` in place.

    q, k: [B, H, D_k]; v: [B, H, D_v]; slope: [H]; state: float32 [B, H, D_k, D_v].
    Returns o [B, H, D_v] in q's dtype. ``mode``: "auto" (the fused Triton step on CUDA outside
    torch.compile, else torch), "triton", or "recurrent" / "chunk" (the torch step).
    """
    check_tensor("q", q, 3, "[B, H, D_k]")
    b, h, d_k = q.shape
    check_tensor("k", k, 3, "[B, H, D_k]", shape=(b, h, d_k), dtypes=(q.dtype,))
    check_tensor("v", v, 3, "[B, H, D_v]", shape=(b, h, None), dtypes=(q.dtype,))
    check_tensor("slope", slope, 1, "[H]", shape=(h,))
    check_tensor("state", state, 4, "[B, H, D_k, D_v]", shape=(b, h, d_k, v.shape[2]), dtypes=_STATE_DTYPES)
    check_same_device(q=q, k=k, v=v, slope=slope, state=state)
    kernel = resolve_step(mode, q, "lightning_attention_step")
    if kernel is not None:
        return kernel(q, k, v, slope, state, scale=scale)
    dtype = state.dtype
    qc = q.to(dtype) if scale is None else q.to(dtype) * scale
    o, new_state = _lightning_step(qc, k.to(dtype), v.to(dtype), (-slope.to(dtype)).exp(), state)
    state.copy_(new_state)
    return o.to(v.dtype)


def _check_inputs(q, k, v, slope, initial_state) -> None:
    check_tensor("q", q, 4, "[B, T, H, D_k]")
    b, t, h, d_k = q.shape
    check_tensor("k", k, 4, "[B, T, H, D_k]", shape=(b, t, h, d_k), dtypes=(q.dtype,))
    check_tensor("v", v, 4, "[B, T, H, D_v]", shape=(b, t, h, None), dtypes=(q.dtype,))
    check_tensor("slope", slope, 1, "[H]", shape=(h,))
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 4, "[B, H, D_k, D_v]", shape=(b, h, d_k, v.shape[3]),
                     dtypes=_STATE_DTYPES)
    check_same_device(q=q, k=k, v=v, slope=slope, initial_state=initial_state)


def _lightning_step(q, k, v, decay, state):
    """q (scaled), k [B, H, D_k]; v [B, H, D_v]; decay [H] = e^{-s}; state [B, H, D_k, D_v]."""
    state = state * decay[:, None, None] + k.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, D_k, D_v)
    return (state * q.unsqueeze(-1)).sum(-2), state  # (B, H, D_v)  (broadcast-sum: see _delta_step)


def _lightning_recurrent(q, k, v, slope, state):
    """The oracle: a token loop. q (scaled), k [B, T, H, D_k]; v [B, T, H, D_v]; slope [H]."""
    b, t, h, d_k = k.shape
    if state is None:
        state = q.new_zeros(b, h, d_k, v.shape[-1])
    decay = (-slope).exp()
    outs = []
    for i in range(t):
        o, state = _lightning_step(q[:, i], k[:, i], v[:, i], decay, state)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)  # (B, T, H, D_v)
    return o, state


def _lightning_chunk(q, k, v, slope, state, t: int):
    """Block form. q (scaled), k [B, H, N, C, D_k]; v [B, H, N, C, D_v]; slope [H]; state
    [B, H, D_k, D_v] or None; t the true length. Returns (o [B, T, H, D_v], final state)."""
    b, h, n, block, d_k = k.shape
    d_v = v.shape[-1]
    # Log-decay from the block start through token i, G_i = -s·(i+1), stopping at the sequence end
    # so that the padded tail of the last block does not decay the final state.
    pos = torch.arange(1, block + 1, device=q.device)  # (C,)
    valid = (t - block * torch.arange(n, device=q.device)).clamp(max=block)  # (N,) tokens in each block
    steps = torch.minimum(pos, valid[:, None]).to(q.dtype)  # (N, C)
    G = -slope[:, None, None] * steps  # (H, N, C)

    # Inside a block the decay between tokens i ≥ j is e^{-s(i-j)}, the same in every block (in the
    # padded tail of the last block rows are dropped and k = v = 0, so one [C, C] mask serves all).
    future = torch.ones(block, block, dtype=torch.bool, device=q.device).triu(1)
    G0 = G[:, :1]  # (H, 1, C)  a full block's log-decays
    decay = decay_exp(G0.unsqueeze(-1) - G0.unsqueeze(-2), ~future)  # (H, 1, C, C)
    intra = ((q @ k.transpose(-1, -2)) * decay) @ v  # (B, H, N, C, D_v)
    q_decayed = q * decay_exp(G).unsqueeze(-1)  # (B, H, N, C, D_k)
    k_decayed = k * decay_exp(G[..., -1:] - G).unsqueeze(-1)  # (B, H, N, C, D_k)
    block_kv = k_decayed.transpose(-1, -2) @ v  # (B, H, N, D_k, D_v)
    block_decay = decay_exp(G[..., -1])[..., None, None]  # (H, N, 1, 1)

    state = q.new_zeros(b, h, d_k, d_v) if state is None else state
    entering = []  # the state entering each block; only this recurrence is sequential
    for i in range(n):
        entering.append(state)
        state = torch.addcmul(block_kv[:, :, i], state, block_decay[:, i])  # (B, H, D_k, D_v)
    entering = torch.stack(entering, dim=2)  # (B, H, N, D_k, D_v)
    flat = lambda x: x.reshape(b * h * n, *x.shape[-2:])  # (B·H·N, ·, ·) views for baddbmm
    o = torch.baddbmm(flat(intra), flat(q_decayed), flat(entering))  # (B·H·N, C, D_v)
    o = o.reshape(b, h, n * block, d_v)[:, :, :t]  # (B, H, T, D_v)
    return o.transpose(1, 2), state  # (B, T, H, D_v)

__all__ = ["BLOCK_SIZE", "lightning_attention", "lightning_attention_step"]
