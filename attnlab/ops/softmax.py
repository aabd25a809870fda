"""Softmax attention: full, causal, sliding window with sink tokens; GQA/MQA; the decode step.

Fast paths call ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), which picks a
fused kernel for the device. ``_reference_softmax_attention`` is the float32 oracle tests use.

Position convention: keys are positions ``0..S-1``; the T queries are the LAST T positions,
``S - T + t`` (bottom-right alignment), so a chunk of prefill continuing a cache of S - T
tokens is just ``softmax_attention(q_chunk, k_all, v_all)``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .._checks import check_heads_divide, check_mode, check_same_device, check_tensor
from ._dispatch import lazy_kernel

# Windowed attention runs in blocks of this many queries, each against only the keys its
# window can reach (plus sinks), so cost and memory are O(T * (window + block)), not O(T * S).
# 1024 was fastest of 512..8192 on an H200 (T = 32k, windows 512 and 4096).
_WINDOW_BLOCK = 1024


def _check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Ranks, batch and head dims, dtypes, device, GQA divisibility of q [B, T, H_q, D],
    k [B, S, H_kv, D], v [B, S, H_kv, D_v]."""
    check_tensor("q", q, 4, "[B, T, H_q, D]")
    check_tensor("k", k, 4, "[B, S, H_kv, D]", shape=(q.shape[0], None, None, q.shape[-1]))
    check_tensor("v", v, 4, "[B, S, H_kv, D_v]", shape=(q.shape[0], k.shape[1], k.shape[2], None))
    _check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v)
    check_heads_divide("q", q.shape[-2], "k", k.shape[2])


def _check_same_dtype(**tensors: torch.Tensor) -> None:
    """All given tensors share the first one's dtype (SDPA and the matmuls need it)."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.dtype != first.dtype:
            got, want = str(t.dtype).removeprefix("torch."), str(first.dtype).removeprefix("torch.")
            raise ValueError(f"{name}: dtype {got} differs from {first_name}'s {want}")


def _triton_kernel(mode: str, module: str, attr: str, op_name: str, q: torch.Tensor, needs_grad: bool):
    """``mode`` of a softmax/sparse op: "torch" -> None (the op's torch code); "triton" -> the kernel
    ``attnlab.kernels.<module>.<attr>`` (needs CUDA, or TRITON_INTERPRET=1 for CPU tests); "auto" ->
    the kernel when q is a CUDA bf16/fp16 tensor outside torch.compile, no gradient is needed that
    the kernel lacks, and the kernels import; else None. (float32 runs on the kernels only when
    asked: exact float32 products there use no tensor cores and are slow.)"""
    check_mode(mode, ("auto", "torch", "triton"))
    if mode == "torch":
        return None
    device_ok = q.is_cuda or (mode == "triton" and os.environ.get("TRITON_INTERPRET") == "1")
    usable = device_ok and q.dtype in (torch.bfloat16, torch.float16, torch.float32) and not needs_grad
    if mode == "auto" and (not usable or q.dtype == torch.float32 or torch.compiler.is_compiling()):
        return None
    if not usable:
        why = "no autograd" if needs_grad else f"CUDA bf16/fp16/fp32 tensors, got {q.dtype} on {q.device}"
        raise ValueError(f"mode: 'triton' for {op_name} needs {why}; use mode='torch'")
    return lazy_kernel(module, attr, mode, op_name)


def _sparse_kernel(mode: str, name: str, q: torch.Tensor, needs_grad: bool = False):
    """:func:`_triton_kernel` for ``attnlab.kernels.sparse.<name>`` (the op of the same name)."""
    return _triton_kernel(mode, "sparse", name, name, q, needs_grad)


def _decode_kernel(mode: str, q: torch.Tensor, needs_grad: bool):
    """``mode`` of softmax_decode for H_kv > 1: the kernel ``attnlab.kernels.decode.gqa_decode`` or
    None (torch); while torch.compile traces, "auto" gets it as an opaque custom op (see
    :func:`_compiled_decode_kernel`)."""
    if mode == "auto" and torch.compiler.is_compiling():
        return _compiled_decode_kernel("gqa_decode", q, needs_grad)
    return _triton_kernel(mode, "decode", "gqa_decode", "softmax_decode", q, needs_grad)


def prepare_decode_kernels(device: torch.device | str) -> bool:
    """Import the decode kernels (attnlab.kernels.decode) and cache the device's SM count, so that a
    decode step compiled afterwards calls them as custom ops with nothing to import or query while
    torch.compile traces. Returns False (the torch paths get traced) when triton does not import."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    try:
        from ..kernels import decode
    except Exception:  # ImportError, or triton failing at import
        return False
    decode.num_splits(1, 1, 1, device)  # caches the SM count
    return True


def _compiled_decode_kernel(attr: str, q: torch.Tensor, needs_grad: bool):
    """While torch.compile traces, "auto": ``attnlab.kernels.decode.<attr>`` (``gqa_decode``, or
    ``latent_decode`` for one kv head), opaque custom ops, for CUDA bf16/fp16 without gradient, if
    that module is already imported (DecodeStep imports it before compiling: an import inside the
    trace would break the graph); else None (torch)."""
    module = sys.modules.get("attnlab.kernels.decode")
    if module is None or needs_grad or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return None
    return getattr(module, attr)


def _check_window(causal: bool, window: int | None, sink_tokens: int) -> None:
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected a positive int or None, got {window!r}")
        if not causal:
            raise ValueError(
                "window: a sliding window needs causal=True (query at p sees keys (p - window, p])"
            )
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens: expected an int >= 0, got {sink_tokens!r}")


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    sink_tokens: int = 0,
) -> torch.Tensor:
    """Scaled dot-product attention with GQA/MQA, causal masking, and a sliding window.

    Args:
        q: [B, T, H_q, D] queries, the last T of S positions.
        k: [B, S, H_kv, D] keys; H_q a multiple of H_kv (query head h uses kv head h // (H_q // H_kv)).
        v: [B, S, H_kv, D_v] values (D_v may differ from D). q, k, v share dtype and device.
        causal: query at position p = S - T + t sees keys s <= p (needs S >= T). False: every key.
        window: w >= 1: query at p sees only keys in (p - w, p] (needs causal=True).
        scale: logit scale; None = D ** -0.5.
        sink_tokens: n >= 0: with a window, keys 0..n-1 stay visible to every later query.

    Returns:
        o: [B, T, H_q, D_v] in q's dtype (SDPA accumulates in float32 internally).
    """
    _check_attention_inputs(q, k, v)
    _check_window(causal, window, sink_tokens)
    T, S = q.shape[1], k.shape[1]
    if causal and S < T:
        raise ValueError(f"k: causal attention needs S >= T (queries are the last T of S), got S={S}, T={T}")
    if S == 0:
        raise ValueError("k: expected at least one key position, got S=0")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    gqa = q.shape[2] != k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T|S, D)

    if window is not None and S > window:
        o = _windowed_sdpa(qh, kh, vh, window, sink_tokens, scale, gqa)  # (B, H_q, T, D_v)
    else:  # a window at least S long masks nothing beyond causality
        if not causal or T == 1:
            mask, is_causal = None, False  # one causal query at the last position sees every key
        elif S == T:
            mask, is_causal = None, True
        else:
            mask, is_causal = causal_lower_right(T, S), False
        o = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
    return o.transpose(1, 2).contiguous()  # (B, T, H_q, D_v)


def _windowed_sdpa(
    qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, window: int, sinks: int, scale: float, gqa: bool
) -> torch.Tensor:
    """Sliding-window attention in query blocks; qh [B, H_q, T, D], kh/vh [B, H_kv, S, D|D_v]."""
    T, S = qh.shape[2], kh.shape[2]
    offset = S - T  # position of query 0
    outs = []
    for t0 in range(0, T, _WINDOW_BLOCK):
        t1 = min(T, t0 + _WINDOW_BLOCK)
        lo = max(0, offset + t0 - window + 1)  # first key the block's earliest query sees through its window
        hi = offset + t1  # one past the block's last query position
        n_sink = min(sinks, lo)  # sinks not already inside [lo, hi)
        q_pos = torch.arange(offset + t0, hi, device=qh.device)  # (Tb,)
        k_pos = torch.arange(lo, hi, device=qh.device)  # (Sb,)
        kb, vb = kh[:, :, lo:hi], vh[:, :, lo:hi]
        if n_sink:
            k_pos = torch.cat([torch.arange(n_sink, device=qh.device), k_pos])  # (n_sink + Sb,)
            kb = torch.cat([kh[:, :, :n_sink], kb], dim=2)  # (B, H_kv, n_sink + Sb, D)
            vb = torch.cat([vh[:, :, :n_sink], vb], dim=2)
        rel = q_pos[:, None] - k_pos[None, :]  # (Tb, Sb')  distance back from query to key
        mask = (rel >= 0) & ((rel < window) | (k_pos[None, :] < sinks))  # (Tb, Sb')  True = attend
        outs.append(
            F.scaled_dot_product_attention(
                qh[:, :, t0:t1], kb, vb, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        )
    return torch.cat(outs, dim=2)  # (B, H_q, T, D_v)


def _reference_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    sink_tokens: int = 0,
) -> torch.Tensor:
    """Float32 oracle for ``softmax_attention`` (float64 stays float64): expand kv heads, build the
    full [T, S] mask from positions, plain softmax. Same arguments; returns [B, T, H_q, D_v] in q's dtype."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, D = q.shape
    S, H_kv = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    kx = k.to(acc).repeat_interleave(H // H_kv, dim=2)  # (B, S, H, D)
    vx = v.to(acc).repeat_interleave(H // H_kv, dim=2)  # (B, S, H, D_v)
    logits = torch.einsum("bthd,bshd->bhts", q.to(acc), kx) * scale  # (B, H, T, S)
    q_pos = torch.arange(S - T, S)[:, None]  # (T, 1)
    k_pos = torch.arange(S)[None, :]  # (1, S)
    visible = torch.ones(T, S, dtype=torch.bool)
    if causal:
        visible &= k_pos <= q_pos
    if window is not None:
        visible &= (k_pos > q_pos - window) | (k_pos < sink_tokens)
    logits = logits.masked_fill(~visible.to(q.device), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, vx).to(q.dtype)  # (B, T, H, D_v)


def softmax_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_valid: torch.Tensor,
    scale: float | None = None,
    mode: str = "auto",
) -> torch.Tensor:
    """One query token per row against a preallocated KV cache.

    Args:
        q: [B, H_q, D] the new token's queries.
        k_cache: [B, S_max, H_kv, D]; v_cache: [B, S_max, H_kv, D_v]; same dtype/device as q.
        n_valid: int64 [B]: row b attends to slots 0..n_valid[b]-1 (values are clamped to [0, S_max];
            no host sync, so the step can be CUDA-graphed). Slot order does not matter, so a
            ring buffer works. A row with n_valid = 0 outputs zeros. Slots past n_valid must hold
            finite values (a zero-initialised cache): their weight is 0, but 0 * NaN is NaN, so a NaN
            left there would leak into the output.
        scale: logit scale; None = D ** -0.5.
        mode: "torch"; "triton" (split-K kernels, no autograd: attnlab.kernels.decode for H_kv > 1,
            attnlab.kernels.sparse for one kv head / MLA absorbed decode); "auto" = triton for CUDA
            bf16/fp16 tensors and no gradient, else torch. Under torch.compile "auto" keeps both
            kernels (as opaque custom ops) once attnlab.kernels.decode is imported.

    Returns:
        o: [B, H_q, D_v] in q's dtype.

    MLA's absorbed decode is this with H_kv = 1, D = 576 (latent + rope key), D_v = 512.
    The cache is never expanded to H_q heads: with one kv head it is two matmuls; otherwise query
    heads are folded into SDPA's query-length axis ([B, H_kv, G, D], G = H_q // H_kv).
    """
    check_tensor("q", q, 3, "[B, H_q, D]")
    check_tensor("k_cache", k_cache, 4, "[B, S_max, H_kv, D]", shape=(q.shape[0], None, None, q.shape[-1]))
    check_tensor(
        "v_cache",
        v_cache,
        4,
        "[B, S_max, H_kv, D_v]",
        shape=(q.shape[0], k_cache.shape[1], k_cache.shape[2], None),
    )
    _check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    check_tensor("n_valid", n_valid, 1, "[B]", shape=(q.shape[0],), dtypes=(torch.int64, torch.int32))
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, n_valid=n_valid)
    check_heads_divide("q", q.shape[1], "k_cache", k_cache.shape[2])
    B, H_q, D = q.shape
    S_max, H_kv = k_cache.shape[1], k_cache.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache))
    if H_kv > 1:  # GQA / MHA: the split-K kernel of attnlab.kernels.decode
        kernel = _decode_kernel(mode, q, grad)
        if kernel is not None:
            return kernel(q, k_cache, v_cache, n_valid, scale=scale)
    else:  # MQA / MLA absorbed: the latent kernel of attnlab.kernels.sparse
        kernel = _sparse_kernel(mode, "softmax_decode", q, grad)
        if kernel is None and mode == "auto" and torch.compiler.is_compiling():
            kernel = _compiled_decode_kernel("latent_decode", q, grad)
        if kernel is not None:
            return kernel(q, k_cache, v_cache, n_valid, scale=scale)

    valid = torch.arange(S_max, device=q.device)[None, :] < n_valid[:, None]  # (B, S_max)
    if H_kv == 1:
        # MQA / MLA absorbed: two plain matmuls over the cache. SDPA's fused kernels parallelise over
        # (B, H_kv, query tiles) only, so one kv head leaves most SMs idle (10x slower on an H200 at
        # S=32k, H_q=128, D=576). Products in the input dtype (float32 accumulation), softmax in float32.
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        logits = (q @ k_cache[:, :, 0].transpose(1, 2)).to(acc) * scale  # (B, H_q, S_max)
        probs = logits.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1)
        o = probs.to(v_cache.dtype) @ v_cache[:, :, 0]  # (B, H_q, D_v)
    else:
        qg = q.reshape(B, H_kv, H_q // H_kv, D)  # (B, H_kv, G, D)  heads of one group share a kv head
        mask = valid[:, None, None, :]  # (B, 1, 1, S_max)
        k, v = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # (B, H_kv, S_max, D|D_v)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # (B, H_kv, G, D_v)
        o = o.reshape(B, H_q, v_cache.shape[-1])  # (B, H_q, D_v)
    return torch.where((n_valid > 0)[:, None, None], o, 0.0)  # an empty row is all-masked (NaN) -> 0
