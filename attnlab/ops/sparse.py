"""DeepSeek Sparse Attention (DeepSeek-V3.2) ops: lightning-indexer scores, causal top-k
selection, and attention over the selected positions.

The indexer (DeepSeek-V3.2 tech report, eq. 1; transformers ``DeepseekV32Indexer``) scores
    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])
with one key head shared by all H_I index heads. HF computes ``ReLU(q.k * d_I**-0.5)`` and
multiplies by ``weights_proj(x) * H_I**-0.5``; both scales are positive, so they fold into w
(ReLU(c x) = c ReLU(x) for c > 0) — the layer passes ``w = weights_proj(x) * H_I**-0.5 * d_I**-0.5``.

Each query then attends only to its top-k positions (``dsa_topk`` -> ``sparse_attention``).
In MLA's absorbed (MQA) form all query heads share one latent key head of 576 dims
(kv_lora_rank 512 + rope 64) and its first 512 dims are the value; ``sparse_attention``
gathers that head once per query, never once per query head.
"""

from __future__ import annotations

import os

import torch
from torch.utils.checkpoint import checkpoint

from .._checks import check_mode, check_same_device, check_tensor
from ._dispatch import lazy_kernel
from .softmax import _check_attention_inputs, _check_same_dtype, _sparse_kernel

# Work is split into query blocks so that the per-block temporaries (gathered keys/values,
# [B, T_blk, H, S] indexer logits) hold at most about this many elements. On an H200, MLA-shaped
# sparse prefill (T=4096, top-2048, 128 heads) took 199 ms at 2**25 (launch-bound), 71 ms at 2**27
# (peak 1.6 GiB), 65 ms at 2**29 (2.6 GiB).
_BLOCK_ELEMENTS = 1 << 27


def _query_block(batch: int, per_query: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, batch * per_query))


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def dsa_index_scores(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, mode: str = "auto", n_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Lightning-indexer scores ``I[b,t,s] = sum_j w[b,t,j] * relu(q[b,t,j] . k[b,s])``.

    Args:
        q: [B, T, H_I, D_I] index queries (any float dtype; computed in float32).
        k: [B, S, D_I] index keys, one head shared by all index heads; same dtype as q.
        w: [B, T, H_I] per-head weights with every scale already folded in.
        mode: "torch"; "triton" (attnlab.kernels.sparse, fused ReLU/weighted sum, no autograd);
            "auto" = triton for CUDA bf16/fp16 tensors when no gradient is needed, else torch.
        n_valid: None, or int64/int32 [B]: keys s >= n_valid[b] score -inf (decode over a
            preallocated cache; the kernel never reads them, so its work follows the rows' lengths).

    Returns:
        I: float32 [B, T, S], causally unmasked (``dsa_topk`` applies causality). Computed in query blocks so
        the [B, T_blk, H_I, S] intermediate stays bounded; under autograd each block is
        checkpointed, so backward is bounded too.
    """
    check_tensor("q", q, 4, "[B, T, H_I, D_I]")
    check_tensor("k", k, 3, "[B, S, D_I]", shape=(q.shape[0], None, q.shape[3]))
    check_tensor("w", w, 3, "[B, T, H_I]", shape=q.shape[:3])
    _check_same_dtype(q=q, k=k)
    check_same_device(q=q, k=k, w=w, n_valid=n_valid)
    B, T, H, _ = q.shape
    S = k.shape[1]
    if n_valid is not None:
        check_tensor("n_valid", n_valid, 1, "[B]", shape=(B,), dtypes=(torch.int64, torch.int32))
    grad = _needs_grad(q, k, w)
    kernel = _sparse_kernel(mode, "dsa_index_scores", q, grad)
    if kernel is not None:
        return kernel(q, k, w, n_valid=n_valid)
    acc = torch.float32
    kt = k.to(acc).transpose(1, 2).unsqueeze(1)  # (B, 1, D_I, S)
    out = torch.empty(B, T, S, dtype=acc, device=q.device)
    block = _query_block(B, H * S)
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        args = (q[:, t0:t1].to(acc), kt, w[:, t0:t1].to(acc))
        out[:, t0:t1] = checkpoint(_index_block, *args, use_reentrant=False) if grad else _index_block(*args)
    if n_valid is not None:
        past = torch.arange(S, device=q.device) >= n_valid[:, None]  # (B, S)
        out = out.masked_fill(past[:, None], float("-inf"))
    return out


def _index_block(q: torch.Tensor, kt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = torch.relu(q @ kt)  # (B, Tb, H_I, S)
    return (w.unsqueeze(-2) @ logits).squeeze(-2)  # (B, Tb, S)


def _ordered_keys(scores: torch.Tensor) -> torch.Tensor:
    """Exact int64 sort keys: float32 score in the high 32 bits (order-preserving bit pattern),
    (S - 1 - s) in the low 32 bits, so a bigger key means a higher score, then an earlier position."""
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0 so they tie
    # IEEE floats order as sign-magnitude ints: flip negatives' magnitude bits for two's-complement order.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    S = scores.shape[-1]
    tiebreak = torch.arange(S - 1, -1, -1, device=scores.device, dtype=torch.int64)  # (S,)
    return (bits.to(torch.int64) << 32) + tiebreak  # (..., S)


def dsa_topk(
    scores: torch.Tensor, topk: int, causal: bool = True, mode: str = "auto", sort: bool = True
) -> torch.Tensor:
    """Top-k positions per query, causal.

    Args:
        scores: [B, T, S] float (float64 is compared at float32 precision); the T queries are the last
            T of S positions (query t is at S - T + t). A score of -inf marks a position as unusable
            (e.g. past a row's cache length in decode, with causal=False).
        topk: k >= 1; may exceed S.
        causal: True: positions s > S - T + t are invisible to query t (needs S >= T).
        mode: "torch" (one int64 top-k over sort keys); "triton" (attnlab.kernels.sparse.dsa_topk, a
            radix select over many programs per row: the decode path at 1M); "auto" = triton for
            CUDA tensors outside torch.compile, else torch. Every mode returns the same indices.
        sort: True: ordered as below. False: the same set of positions in an unspecified order (the
            Triton kernel: position order, one pass fewer; the torch path still sorts) — for a consumer
            that does not care, such as a decode step's sparse attention.

    Returns:
        indices: int64 [B, T, topk], ordered by score descending. Ties are broken deterministically
        in favour of the EARLIER position (lower s), on every device. Slots beyond the number of
        visible (finite-score) positions are -1, and come last. No host sync.
    """
    check_tensor("scores", scores, 3, "[B, T, S]")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected an int >= 1, got {topk!r}")
    B, T, S = scores.shape
    if causal and S < T:
        raise ValueError(
            f"scores: causal top-k needs S >= T (queries are the last T of S), got {tuple(scores.shape)}"
        )
    kernel = _topk_kernel(mode, scores)
    if kernel is not None:
        return kernel(scores, topk, causal=causal, sort=sort)
    k_eff = min(topk, S)
    out = torch.full((B, T, topk), -1, dtype=torch.int64, device=scores.device)
    pos = torch.arange(S, device=scores.device)  # (S,)
    block = _query_block(B, 3 * S)  # float32 copy + int64 keys
    with torch.no_grad():
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            blk = scores[:, t0:t1].to(torch.float32)  # (B, Tb, S)
            if causal:
                q_pos = torch.arange(S - T + t0, S - T + t1, device=scores.device)  # (Tb,)
                blk = blk.masked_fill(pos[None, :] > q_pos[:, None], float("-inf"))
            idx = _ordered_keys(blk).topk(k_eff, dim=-1).indices  # (B, Tb, k_eff), sorted
            chosen = blk.gather(-1, idx)  # (B, Tb, k_eff)
            out[:, t0:t1, :k_eff] = idx.masked_fill(chosen == float("-inf"), -1)
    return out


def _topk_kernel(mode: str, scores: torch.Tensor):
    """The Triton top-k for ``mode`` (see dsa_topk), or None for the torch path."""
    check_mode(mode, ("auto", "torch", "triton"))
    if mode == "torch" or (mode == "auto" and (not scores.is_cuda or torch.compiler.is_compiling())):
        return None
    if not (scores.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"mode: 'triton' for dsa_topk needs a CUDA tensor, got one on {scores.device}; "
                         "use mode='torch'")
    if not scores.is_floating_point():
        raise ValueError(f"scores: expected a float dtype, got {scores.dtype}")
    return lazy_kernel("sparse", "dsa_topk", mode, "dsa_topk")


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    mode: str = "auto",
) -> torch.Tensor:
    """Softmax attention of each query over its selected key positions only.

    Args:
        q: [B, T, H, D] queries.
        k: [B, S, H_kv, D] keys; H must be a multiple of H_kv (MQA: H_kv = 1, as in MLA's absorbed form,
            D = 576). Same dtype/device as q.
        v: [B, S, H_kv, D_v] values (MLA absorbed: the first 512 dims of the latent key). When v is a
            prefix view of k and no gradient is needed, the gather of k is reused for v.
        indices: int64 or int32 [B, T, topk], shared across heads; entries in [0, S) select positions,
            negative entries are empty slots. Positions in a row should be distinct (a repeat counts twice).
            On the CPU an entry >= S raises ValueError; on GPU it is the caller's contract.
        scale: logit scale; None = D ** -0.5.
        mode: "torch"; "triton" (attnlab.kernels.sparse, with a Triton backward); "auto" = triton for
            CUDA bf16/fp16 tensors, else torch.

    Returns:
        o: [B, T, H, D_v] in q's dtype, computed in float32 (float64 for float64 inputs). A query whose
        slots are all empty outputs 0. Runs in query blocks so the gathered [B, T_blk, topk, H_kv, D]
        stays bounded; under autograd each block is checkpointed, so backward is bounded too.
    """
    _check_attention_inputs(q, k, v)
    B, T, H, D = q.shape
    S, H_kv, D_v = k.shape[1], k.shape[2], v.shape[3]
    check_tensor("indices", indices, 3, "[B, T, topk]", shape=(B, T, None), dtypes=(torch.int64, torch.int32))
    check_same_device(q=q, indices=indices)
    # a host read: skipped while torch.compile traces (a compiled decode step must not sync)
    if indices.device.type == "cpu" and not torch.compiler.is_compiling() and indices.numel() \
            and int(indices.max()) >= S:
        got = int(indices.max())
        raise ValueError(f"indices: entries must be < S={S} (or negative for an empty slot), got max {got}")
    scale = D**-0.5 if scale is None else float(scale)
    kernel = _sparse_kernel(mode, "sparse_attention", q)
    if kernel is not None:
        return kernel(q, k, v, indices, scale=scale)
    K = indices.shape[2]
    grad = _needs_grad(q, k, v)
    # MLA absorbed: v = k[..., :D_v] is a view of the same storage; gather once and slice.
    # data_ptr() cannot be traced by torch.compile; compiled code just gathers v separately
    v_is_k_prefix = (
        not grad
        and not torch.compiler.is_compiling()
        and D_v <= D
        and v.data_ptr() == k.data_ptr()
        and v.stride() == k.stride()
    )
    o = torch.empty(B, T, H, D_v, dtype=q.dtype, device=q.device)
    if K == 0:  # no slots at all: every row is empty
        return o.zero_()
    block = _query_block(B, K * (H_kv * (D + D_v) + 3 * H))
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        args = (q[:, t0:t1], k, v, indices[:, t0:t1], scale, v_is_k_prefix)
        o[:, t0:t1] = checkpoint(_sparse_block, *args, use_reentrant=False) if grad else _sparse_block(*args)
    return o


def _sparse_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float, v_is_k_prefix: bool
) -> torch.Tensor:
    """q [B, Tb, H, D], k/v full [B, S, H_kv, D|D_v], idx [B, Tb, K] -> o [B, Tb, H, D_v] in q's dtype."""
    B, Tb, H, D = q.shape
    H_kv, D_v = k.shape[2], v.shape[3]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    valid = idx >= 0  # (B, Tb, K)
    rows = torch.arange(B, device=q.device)[:, None, None]  # (B, 1, 1)
    safe = idx.clamp(min=0).long()  # (B, Tb, K)  empty slots read position 0, then get masked
    k_sel = k[rows, safe]  # (B, Tb, K, H_kv, D)  one gather per query, shared by its G query heads
    v_sel = k_sel[..., :D_v] if v_is_k_prefix else v[rows, safe]  # (B, Tb, K, H_kv, D_v)
    qg = q.reshape(B, Tb, H_kv, H // H_kv, D)  # (B, Tb, H_kv, G, D)
    # Products run in the input dtype with float32 accumulation inside the matmul (as HF's eager
    # attention does); the softmax runs in `acc`. Upcasting the gathered keys instead cost ~2x on GPU.
    logits = torch.einsum("bthgd,btkhd->bthgk", qg, k_sel).to(acc) * scale  # (B, Tb, H_kv, G, K)
    logits = logits.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    # Softmax written out so an all-empty row gives 0 (not NaN) in forward and backward.
    m = logits.detach().amax(dim=-1, keepdim=True)  # (B, Tb, H_kv, G, 1)
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(logits - m)  # empty slots -> 0
    p = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    v_sel = torch.where(valid[..., None, None], v_sel, 0)  # empty slots read position 0: keep NaN out
    o = torch.einsum("bthgk,btkhd->bthgd", p.to(q.dtype), v_sel)  # (B, Tb, H_kv, G, D_v)
    return o.reshape(B, Tb, H, D_v)
