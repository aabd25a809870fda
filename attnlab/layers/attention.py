"""Softmax attention layers: ``S`` (full causal, GQA) and ``W`` (sliding window + sinks).

One module, :class:`SoftmaxAttention`, covers Llama-style GQA, MiniMax-01's full-attention
layers and Qwen3-Next's gated attention (per-head q/k RMSNorm before partial RoPE, and a
sigmoid output gate, Qiu et al. 2025 "Gated Attention for LLMs", arXiv:2505.06708).

Caches: ``S`` keeps every token's K and V ([B, max_len, H_kv, D] each); ``W`` keeps a ring
buffer of ``window`` slots plus ``sink_tokens`` fixed slots, so it never holds more than
``window + sink_tokens`` tokens whatever ``max_len`` is. Decode reads either with
``ops.softmax_decode`` (slot order does not matter to softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._checks import check_tensor, in_graph
from ..cache import CacheSpec, LayerCache
from ..config import ModelConfig
from .common import FusedLinears, Residual, RMSNorm, RotaryEmbedding, project_out


@dataclass
class KVCache(LayerCache):
    """Full KV cache of an ``S`` layer: k, v [B, max_len, H_kv, D]; token p of row b in slot p."""

    k: torch.Tensor
    v: torch.Tensor

    def capacity(self) -> int:
        """Tokens a row can hold (max_len)."""
        return self.k.shape[1]


@dataclass
class SlidingKVCache(LayerCache):
    """Ring-buffer KV cache of a ``W`` layer: k, v [B, slots, H_kv, D] with
    slots = min(max_len, sink_tokens + window). Token p lives in slot p if p < sink_tokens,
    else in slot ``sink_tokens + (p - sink_tokens) % window``."""

    k: torch.Tensor
    v: torch.Tensor
    window: int = 0
    sink_tokens: int = 0
    max_len: int = 0

    def capacity(self) -> int | None:
        """Tokens a row can hold: unbounded once the ring can wrap, else max_len."""
        return None if self.k.shape[1] >= self.window + self.sink_tokens else self.max_len


def _ring_slot(p: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """Slot of absolute position(s) p (int64) in a sliding-window ring buffer."""
    return torch.where(p < sinks, p, sinks + (p - sinks) % window)


def _write_slot(cache: KVCache | SlidingKVCache, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Decode write: row b's new k, v [B, 1, H_kv, D] into slot[b] (int64 [B]) of the preallocated
    cache, one scatter each (no host sync, no index tensor built)."""
    index = slot[:, None, None, None].expand(k.shape)  # (B, 1, H_kv, D)
    cache.k.scatter_(1, index, k.to(cache.k.dtype))
    cache.v.scatter_(1, index, v.to(cache.v.dtype))


def _check_room(cache: LayerCache, T: int, max_len: int) -> None:
    """The cache must have room for T more tokens in every row (skipped inside a graph: a
    :class:`attnlab.generate.DecodeStep` checks room on the host, outside the step)."""
    if in_graph():
        return
    most = int(cache.lengths.max()) if cache.lengths.numel() else 0
    if most + T > max_len:
        raise ValueError(
            f"cache: a row holds {most} tokens and {T} more do not fit its max_len={max_len}; "
            f"allocate the cache with a larger max_len"
        )


def _prefill_start(cache: LayerCache) -> int:
    """Common length of all rows (T > 1 appends need equal lengths)."""
    lengths = cache.lengths
    start = int(lengths[0]) if lengths.numel() else 0
    if lengths.numel() and bool((lengths != start).any()):
        raise ValueError(
            f"cache: rows hold different lengths {lengths.tolist()}; a multi-token append needs equal "
            f"lengths (prefill mixed-length prompts one row at a time through cache.rows(b, b + 1))"
        )
    return start


class SoftmaxAttention(nn.Module):
    """Causal softmax attention with GQA, RoPE (partial), optional q/k norm, output gate and
    sliding window.

    Parameters (names follow Hugging Face so weights copy one to one):
      q_proj [H * D * (2 if output_gate else 1), d_model]: with the gate, each head's rows are
        ``[query (D) | gate (D)]``, as Qwen3-Next lays them out;
      k_proj, v_proj [H_kv * D, d_model]; o_proj [d_model, H * D];
      q_norm, k_norm: RMSNorm over D (``qk_norm``), zero-centered if ``norm_zero_centered``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        rope_dim: int,
        rope_theta: float = 10000.0,
        output_gate: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        norm_zero_centered: bool = False,
        window: int | None = None,
        sink_tokens: int = 0,
    ) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        if rope_dim % 2 or rope_dim > head_dim:
            raise ValueError(f"rope_dim: expected an even number <= head_dim={head_dim}, got {rope_dim}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.output_gate, self.window, self.sink_tokens = output_gate, window, sink_tokens
        self.q_proj = nn.Linear(d_model, n_heads * head_dim * (2 if output_gate else 1), bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps, norm_zero_centered) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps, norm_zero_centered) if qk_norm else None
        self.rotary = RotaryEmbedding(rope_dim, rope_theta, head_dim=head_dim) if rope_dim > 0 else None
        self.qkv = FusedLinears(self.q_proj, self.k_proj, self.v_proj)  # one matmul reads x

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.qkv.refuse()  # .to() / .half() gave each weight new storage
        return self

    # ------------------------------------------------------------------ projections
    def _qkv(self, x: torch.Tensor, positions: torch.Tensor, rotation=None):
        """x [B, T, d] and positions int64 [B, T] or [T] -> q [B,T,H,D], k, v [B,T,H_kv,D], gate
        [B,T,H,D] or None. ``rotation``: ``self.rotary.rotation(positions)`` if already computed."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        fused = self.qkv.weight()
        if fused is not None and not self.output_gate and self.q_norm is None:
            # one matmul whose q and k heads are adjacent: RoPE reads them as one tensor, no copy
            qk, v = F.linear(x, fused).view(B, T, H + 2 * Hkv, D).split((H + Hkv, Hkv), dim=2)
            if self.rotary is not None:
                qk = self._rotate(qk, positions, rotation)  # (B, T, H + H_kv, D)
            q, k = qk.split((H, Hkv), dim=2)  # (B, T, H|H_kv, D)
            return q, k, v, None
        q, k, v = self.qkv(x)  # (B, T, H*D or H*2D), (B, T, H_kv*D) twice
        gate = None
        if self.output_gate:
            q, gate = q.view(B, T, H, 2 * D).chunk(2, dim=-1)  # (B, T, H, D) each
        else:
            q = q.view(B, T, H, D)
        k = k.view(B, T, Hkv, D)
        v = v.view(B, T, Hkv, D)
        if self.q_norm is None and self.rotary is None:
            return q, k, v, gate
        # q and k heads normed and rotated together: one set of ops per layer (decode runs each once)
        qk = torch.cat((q, k), dim=2)  # (B, T, H + H_kv, D)
        if self.q_norm is not None:
            qk = self._qk_norm(qk)  # float32 until after RoPE: one rounding at the end
        if self.rotary is not None:
            qk = self._rotate(qk, positions, rotation, v.dtype)
        q, k = qk.to(v.dtype).split((H, Hkv), dim=2)  # (B, T, H|H_kv, D)
        return q, k, v, gate

    def _qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        """q_norm over the first H heads of qk [B, T, H + H_kv, D], k_norm over the rest, as one
        float32 rms_norm and one weight product -> float32 [B, T, H + H_kv, D]."""
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qn, kn = self.q_norm, self.k_norm
        h = F.rms_norm(qk.float(), (D,), None, qn.eps)  # (B, T, H + H_kv, D)
        w = torch.cat((qn.weight.expand(H, D), kn.weight.expand(Hkv, D)))  # (H + H_kv, D)
        return torch.addcmul(h, h, w) if qn.zero_centered else h * w  # (1 + w) as in RMSNorm

    def _rotate(self, qk: torch.Tensor, positions: torch.Tensor, rotation, dtype=None) -> torch.Tensor:
        if rotation is None:
            return self.rotary.rotate(qk, positions, dtype=dtype)
        return self.rotary.rotate(qk, rotation=rotation, dtype=dtype)

    def _out(
        self, o: torch.Tensor, gate: torch.Tensor | None, residual: Residual | None = None
    ) -> torch.Tensor:
        """o [B, T, H, D] -> [B, T, d_model] (added into ``residual`` if given)."""
        if gate is not None:
            o = o * torch.sigmoid(gate)  # (B, T, H, D)
        return project_out(self.o_proj, o.reshape(o.shape[0], o.shape[1], -1), residual)  # (B, T, d_model)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache | None = None,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
        residual: Residual | None = None,
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]; see the layer contract for ``cache``. With
        ``residual`` the output projection adds into it (:class:`attnlab.layers.common.Residual`).

        ``rotation``: for a decode step (T == 1 with a cache) the RoPE factors
        ``self.rotary.rotation(cache.lengths[:, None])`` computed once per step for every layer of
        the model (:class:`attnlab.model.HybridLM` does); None = computed here. Ignored otherwise."""
        check_tensor("x", x, 3, "[B, T, d_model]", shape=(None, None, self.d_model))
        B, T, _ = x.shape
        if cache is None:
            positions = torch.arange(T, device=x.device)
            q, k, v, gate = self._qkv(x, positions)
            o = ops.softmax_attention(q, k, v, causal=True, window=self.window, sink_tokens=self.sink_tokens)
            return self._out(o, gate, residual)
        if self.window is None:
            if not isinstance(cache, KVCache):
                got = type(cache).__name__
                raise ValueError(f"cache: expected a KVCache from this layer's new_cache, got {got}")
            return self._forward_kv(x, cache, rotation, residual)
        if not isinstance(cache, SlidingKVCache):
            raise ValueError(
                f"cache: expected a SlidingKVCache from this layer's new_cache, got {type(cache).__name__}"
            )
        return self._forward_ring(x, cache, rotation, residual)

    def _forward_kv(self, x: torch.Tensor, cache: KVCache, rotation=None, residual=None) -> torch.Tensor:
        B, T, _ = x.shape
        max_len = cache.k.shape[1]
        _check_room(cache, T, max_len)
        if T == 1:
            pos = cache.lengths  # (B,)
            q, k, v, gate = self._qkv(x, pos[:, None], rotation)
            _write_slot(cache, pos, k, v)
            cache.lengths += 1  # pos is cache.lengths: now each row's token count, the keys to read
            k_all, v_all = cache.k.to(q.dtype), cache.v.to(q.dtype)
            o = ops.softmax_decode(q[:, 0], k_all, v_all, cache.lengths)  # (B, H, D)
            return self._out(o[:, None], gate, residual)
        start = _prefill_start(cache)
        q, k, v, gate = self._qkv(x, torch.arange(start, start + T, device=x.device))
        cache.k[:, start : start + T] = k.to(cache.k.dtype)
        cache.v[:, start : start + T] = v.to(cache.v.dtype)
        k_all = cache.k[:, : start + T].to(q.dtype)  # (B, start + T, H_kv, D)
        v_all = cache.v[:, : start + T].to(q.dtype)
        o = ops.softmax_attention(q, k_all, v_all, causal=True)
        cache.lengths += T
        return self._out(o, gate, residual)

    def _forward_ring(
        self, x: torch.Tensor, cache: SlidingKVCache, rotation=None, residual=None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        w, n = cache.window, cache.sink_tokens
        slots = cache.k.shape[1]
        if slots < w + n:  # a short cache cannot wrap: it must not outgrow max_len
            _check_room(cache, T, cache.max_len)
        if T == 1:
            pos = cache.lengths  # (B,)
            q, k, v, gate = self._qkv(x, pos[:, None], rotation)
            _write_slot(cache, _ring_slot(pos, w, n), k, v)
            cache.lengths += 1  # pos is cache.lengths: now each row's token count
            n_valid = torch.clamp(cache.lengths, max=w + n)
            o = ops.softmax_decode(q[:, 0], cache.k.to(q.dtype), cache.v.to(q.dtype), n_valid)  # (B, H, D)
            return self._out(o[:, None], gate, residual)
        start = _prefill_start(cache)
        q, k, v, gate = self._qkv(x, torch.arange(start, start + T, device=x.device))
        # keys the new queries may need, in position order: the sinks held, then the ring's
        # last `window` non-sink positions. The gap between them (if any) is invisible to every
        # query, and ring + new keys are contiguous, so window masking by index stays exact.
        held = list(range(min(start, n))) + list(range(max(n, start - w), start))
        idx = _ring_slot(torch.tensor(held, dtype=torch.long, device=x.device), w, n)
        k_all = torch.cat((cache.k[:, idx].to(q.dtype), k), dim=1)  # (B, len(held) + T, H_kv, D)
        v_all = torch.cat((cache.v[:, idx].to(q.dtype), v), dim=1)
        o = ops.softmax_attention(q, k_all, v_all, causal=True, window=w, sink_tokens=min(n, len(held) + T))
        # write the new tokens that stay: sinks, then the last `window` non-sink positions
        # (earlier ones would be overwritten in the same ring slot anyway)
        keep = [p for p in range(start, start + T) if p < n or p >= max(n, start + T - w)]
        if keep:
            src = torch.tensor([p - start for p in keep], dtype=torch.long, device=x.device)
            dst = _ring_slot(torch.tensor(keep, dtype=torch.long, device=x.device), w, n)
            cache.k[:, dst] = k[:, src].to(cache.k.dtype)
            cache.v[:, dst] = v[:, src].to(cache.v.dtype)
        cache.lengths += T
        return self._out(o, gate, residual)

    # ------------------------------------------------------------------ cache
    def cache_spec(self, dtype: torch.dtype = torch.bfloat16) -> CacheSpec:
        """K and V per token: 2 * H_kv * D elements; ``W`` keeps at most window + sink_tokens."""
        per_token = 2 * self.n_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()
        max_tokens = None if self.window is None else self.window + self.sink_tokens
        return CacheSpec(bytes_per_token=per_token, constant_bytes=0, max_tokens=max_tokens)

    def new_cache(
        self,
        batch: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LayerCache:
        """Preallocated, zeroed cache for ``batch`` sequences of up to ``max_len`` tokens."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"batch, max_len: expected positive ints, got batch={batch}, max_len={max_len}")
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        Hkv, D = self.n_kv_heads, self.head_dim
        if self.window is None:
            k = torch.zeros(batch, max_len, Hkv, D, device=device, dtype=dtype)
            return KVCache(lengths=lengths, k=k, v=torch.zeros_like(k))
        slots = min(max_len, self.window + self.sink_tokens)
        k = torch.zeros(batch, slots, Hkv, D, device=device, dtype=dtype)
        return SlidingKVCache(
            lengths=lengths, k=k, v=torch.zeros_like(k), window=self.window, sink_tokens=self.sink_tokens,
            max_len=max_len,
        )

    # ------------------------------------------------------------------ Hugging Face
    def load_from_hf(self, hf_module: nn.Module) -> None:
        """Copy weights from a transformers ``self_attn`` (Qwen3-Next gated attention,
        MiniMax full attention, or any Llama-style q/k/v/o attention without biases)."""
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            src = getattr(hf_module, name, None)
            if src is None:
                got = type(hf_module).__name__
                raise ValueError(f"hf_module: {got} has no {name}; expected a q/k/v/o attention")
            if src.bias is not None:
                raise ValueError(
                    f"hf_module: {name} has a bias; attnlab's attention has none (set attention_bias=False)"
                )
            _copy(getattr(self, name).weight, src.weight, name)
        has_norm = getattr(hf_module, "q_norm", None) is not None
        if has_norm != (self.q_norm is not None):
            raise ValueError(
                f"hf_module: q/k norm present={has_norm} but this layer has qk_norm={self.q_norm is not None}"
            )
        if has_norm:
            _copy(self.q_norm.weight, hf_module.q_norm.weight, "q_norm")
            _copy(self.k_norm.weight, hf_module.k_norm.weight, "k_norm")

    def extra_repr(self) -> str:
        extra = f", window={self.window}, sinks={self.sink_tokens}" if self.window is not None else ""
        return (
            f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
            f"rope_dim={0 if self.rotary is None else self.rotary.dim}, gate={self.output_gate}{extra}"
        )


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(
            f"{name}: Hugging Face weight has shape {tuple(src.shape)}, attnlab expects {tuple(dst.shape)}"
        )
    with torch.no_grad():
        dst.copy_(src)


def _from_config(cfg: ModelConfig, window: int | None, sink_tokens: int) -> SoftmaxAttention:
    return SoftmaxAttention(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.kv_heads,
        head_dim=cfg.attn_head_dim,
        rope_dim=cfg.rope_dim,
        rope_theta=cfg.rope_theta,
        output_gate=cfg.attn_output_gate,
        qk_norm=cfg.qk_norm,
        norm_eps=cfg.norm_eps,
        norm_zero_centered=cfg.norm_zero_centered,
        window=window,
        sink_tokens=sink_tokens,
    )


def build_softmax(cfg: ModelConfig, layer_idx: int) -> SoftmaxAttention:
    """``S``: full causal softmax attention (GQA, optional gate / q-k norm / partial RoPE)."""
    return _from_config(cfg, None, 0)


def build_sliding(cfg: ModelConfig, layer_idx: int) -> SoftmaxAttention:
    """``W``: sliding-window softmax attention over the last ``cfg.window`` keys plus
    ``cfg.sink_tokens`` first keys."""
    return _from_config(cfg, cfg.window, cfg.sink_tokens)


__all__ = ["KVCache", "SlidingKVCache", "SoftmaxAttention", "build_softmax", "build_sliding"]
