"""Multi-head Latent Attention (M) and DeepSeek Sparse Attention (D).

MLA (DeepSeek-V2 §2.1, DeepSeek-V3): keys and values are decompressed from a per-token latent
``c_kv`` (``kv_lora_rank``) plus one RoPE key ``k_pe`` (``qk_rope_head_dim``) shared by all
heads, so the cache keeps only ``kv_lora_rank + qk_rope_head_dim`` numbers per token::

    c_q          = RMSNorm(W_DQ x)                                  (q LoRA; or q = W_Q x)
    [q_nope|q_pe] = W_UQ c_q                      per head: qk_nope_head_dim | qk_rope_head_dim
    [c_kv|k_pe]   = W_DKV x ;  c_kv = RMSNorm(c_kv)
    [k_nope|v]    = W_UKV c_kv                    per head: qk_nope_head_dim | v_head_dim
    q_pe, k_pe    = RoPE(q_pe), RoPE(k_pe)        (interleaved pairs; none for Kimi's NoPE MLA)
    o             = W_O softmax(scale * [q_nope|q_pe]·[k_nope|k_pe]) v

Decode uses weight absorption (DeepSeek-V2 §2.1.3): ``q_nope·k_nope = (W_UK^T q_nope)·c_kv``,
so each head scores the cached latents directly (MQA with one 576-dim "key head" in the
full-size model), and ``W_UV`` is applied after the weighted sum of latents.

DSA (DeepSeek-V3.2): MLA in that absorbed MQA form, attending only to the ``index_topk``
tokens chosen by the lightning indexer ``I[t,s] = sum_j w[t,j] relu(q_I[t,j]·k_I[s])``, whose
query comes from the q latent, whose single key head is LayerNorm'd, and which uses its own
NON-interleaved RoPE on the first ``qk_rope_head_dim`` dims (``[rope | nope]``), while MLA
rotates the last dims of ``[nope | rope]`` in interleaved pairs.

The Hugging Face ``deepseek_v3`` / ``deepseek_v32`` / ``kimi_linear`` modules are the numeric
reference (:meth:`MultiHeadLatentAttention.load_from_hf`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._checks import check_tensor, in_graph
from ..cache import CacheSpec, LayerCache
from .common import (
    FusedLinears,
    Residual,
    RMSNorm,
    RotaryEmbedding,
    apply_rope,
    cast_out,
    project_out,
    rope_inv_freq,
    yarn_get_mscale,
    yarn_inv_freq,
)

# DeepSeek hard-codes eps=1e-6 for the q/kv latent norms and the indexer key LayerNorm,
# independent of the model's rms_norm_eps.
_LATENT_EPS = 1e-6


@dataclass
class MLACache(LayerCache):
    """Latent cache of an ``M`` layer.

    latent: ``[B, S_max, 1, kv_lora_rank + qk_rope_head_dim]`` — the normalised ``c_kv``
    followed by ``k_pe`` after RoPE. Dims ``:kv_lora_rank`` double as the value in absorbed
    decode, so one buffer serves as both key and value.
    """

    latent: torch.Tensor

    def capacity(self) -> int:
        """Tokens a row can hold (max_len)."""
        return self.latent.shape[1]


@dataclass
class DSACache(MLACache):
    """Latent cache plus the indexer keys (after RoPE and LayerNorm) of a ``D`` layer.

    index_keys: ``[B, S_max, index_head_dim]``.
    """

    index_keys: torch.Tensor


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _rope_columns(
    inv_freq: torch.Tensor, segments: list[tuple[int, int, int, bool]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column RoPE tables for a row of heads laid out one segment after another.

    segments: (n_heads, head_dim, rope_start, interleaved): each head rotates dims
    rope_start .. rope_start + 2 * len(inv_freq) in adjacent pairs (interleaved) or rotate-half
    pairs; its other dims pass through. Returns (freq float32 [N], partner int64 [N]) with
    ``rot(x) = x * cos(p * freq) + x[..., partner] * sin(p * freq)``: the first of a pair gets
    -f (sin(-a) = -sin(a) gives the minus), passed-through dims f = 0 and themselves as partner."""
    half = inv_freq.shape[0]
    cpu = inv_freq.device  # the CPU (rope_inv_freq), even under a torch.device("cuda") context
    freqs, partners, offset = [], [], 0
    for n_heads, head_dim, start, interleaved in segments:
        f = torch.zeros(head_dim, device=cpu)
        p = torch.arange(head_dim, device=cpu)
        i = torch.arange(half, device=cpu)
        first, second = (start + 2 * i, start + 2 * i + 1) if interleaved else (start + i, start + half + i)
        f[first], f[second] = -inv_freq, inv_freq
        p[first], p[second] = second, first
        freqs.append(f.repeat(n_heads))  # (n_heads * head_dim,)
        partners.append((p[None] + offset + head_dim * torch.arange(n_heads, device=cpu)[:, None]).flatten())
        offset += n_heads * head_dim
    return torch.cat(freqs), torch.cat(partners)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """x [B, T, N] (any float dtype) rotated by per-column tables cos, sin float32 [B, T, N] and
    partner int64 [N] (see _rope_columns): float32 inside, rounded once into x.dtype."""
    partnered = x.index_select(-1, partner)  # (B, T, N)
    return cast_out(torch.addcmul, x * cos, partnered, sin, dtype=x.dtype)


class MultiHeadLatentAttention(nn.Module):
    """The ``M`` mixer: forward(x [B, T, d_model], cache=None) -> [B, T, d_model]."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.d_model = cfg.d_model
        self.n_heads = cfg.n_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.use_rope = cfg.mla_use_rope
        self.rope_interleave = cfg.rope_interleave
        qk_head_dim = self.nope_dim + self.rope_dim
        H = self.n_heads

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.d_model, H * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.d_model, self.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(self.q_lora_rank, eps=_LATENT_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * qk_head_dim, bias=False)
        self.kv_a_proj = nn.Linear(cfg.d_model, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(self.kv_lora_rank, eps=_LATENT_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, cfg.d_model, bias=False)

        # YaRN (rope_scaling type "yarn") changes the frequencies, scales cos/sin by its
        # attention factor (inside RotaryEmbedding), and multiplies the softmax scale by
        # mscale(factor, mscale_all_dim)^2 (DeepSeek-V3 modeling code, `yarn_get_mscale`).
        self.scale = qk_head_dim**-0.5
        rs = cfg.rope_scaling
        if rs is not None and rs.get("type", rs.get("rope_type")) == "yarn" and rs.get("mscale_all_dim"):
            self.scale *= yarn_get_mscale(float(rs["factor"]), float(rs["mscale_all_dim"])) ** 2
        self.rotary = (
            RotaryEmbedding(self.rope_dim, cfg.rope_theta, rs) if self.use_rope and self.rope_dim else None
        )
        self._rope_scaling = rs
        self._rope_theta = cfg.rope_theta
        self._build_fused()

    # ------------------------------------------------------------------ fused projections and RoPE
    def _x_linears(self) -> list[nn.Linear]:
        """The Linears reading x, in the order of their fused output: the q projection first, then kv_a."""
        return [self.q_proj if self.q_lora_rank is None else self.q_a_proj, self.kv_a_proj]

    def _q_linears(self) -> list[nn.Linear]:
        """The Linears reading the q latent (q LoRA only)."""
        return [self.q_b_proj] if self.q_lora_rank is not None else []


    def _q_segments(self) -> list[tuple[int, int, int, bool]]:
        """RoPE layout of the query row: per head [nope | rope], the rope part in MLA's pairs."""
        return [(self.n_heads, self.nope_dim + self.rope_dim, self.nope_dim, self.rope_interleave)]

    def _k_segments(self) -> list[tuple[int, int, int, bool]]:
        """RoPE layout of the key row [c_kv | k_pe]: only k_pe rotates."""
        return [(1, self.kv_lora_rank + self.rope_dim, self.kv_lora_rank, self.rope_interleave)]

    def _build_fused(self) -> None:
        """One matmul per input at inference (FusedLinears), and the RoPE tables of the query and
        key rows, so a decode step rotates each row in three ops (RotaryEmbedding.rotate's scheme,
        for MLA's interleaved pairs, the indexer's rotate-half and YaRN's attention factor)."""
        self.x_proj = FusedLinears(*self._x_linears())
        q_linears = self._q_linears()
        self.q_up = FusedLinears(*q_linears) if q_linears else None
        self._rope_master = None
        if self.rotary is None:
            return
        rs, theta = self._rope_scaling, self._rope_theta
        yarn = rs is not None and rs.get("type", rs.get("rope_type")) == "yarn"
        inv_freq = yarn_inv_freq(self.rope_dim, theta, rs)[0] if yarn else rope_inv_freq(self.rope_dim, theta)
        freq_q, partner_q = _rope_columns(inv_freq, self._q_segments())
        freq_k, partner_k = _rope_columns(inv_freq, self._k_segments())
        freq = torch.cat((freq_q, freq_k))  # (N_q + N_k,)
        factor = self.rotary.attention_factor  # YaRN scales cos and sin of the rotated dims
        cos_scale = torch.where(freq != 0, factor, 1.0) if factor != 1.0 else None
        self._rope_master = (freq, cos_scale)
        self._n_q = freq_q.shape[0]
        device = torch.empty(0).device  # built on the CPU, placed as RotaryEmbedding places its own
        self.register_buffer("rope_freq", freq.to(device), persistent=False)
        self.register_buffer("rope_partner_q", partner_q.to(device), persistent=False)
        self.register_buffer("rope_partner_k", partner_k.to(device), persistent=False)
        self.register_buffer("rope_cos_scale", None if cos_scale is None else cos_scale.to(device),
                             persistent=False)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.x_proj.refuse()  # .to() / .half() gave each weight new storage
        if self.q_up is not None:
            self.q_up.refuse()
        if self._rope_master is not None:  # the angles stay float32 (RotaryEmbedding._apply)
            freq, cos_scale = self._rope_master
            self.rope_freq = freq.to(device=self.rope_freq.device)
            if cos_scale is not None:
                self.rope_cos_scale = cos_scale.to(device=self.rope_freq.device)
        return self

    @staticmethod
    def _linear_row(fused: FusedLinears, x: torch.Tensor) -> torch.Tensor:
        """The fused Linears' outputs side by side, [..., sum(out)] (inference only): one matmul,
        or the Linears one by one and concatenated when the weights are no longer one tensor."""
        w = fused.weight()
        if w is not None:
            return F.linear(x, w)
        outs = [lin(x) for lin in fused.linears]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The RoPE tables forward applies at int64 positions [B, T]: (cos, sin) float32
        [B, T, N_q + N_k] over the query row then the key row (see :meth:`_project_fused`), or None
        (NoPE). Layers of one class built from one config can share a decode step's (three ops)."""
        if self.rotary is None:
            return None
        angles = positions[..., None] * self.rope_freq  # (B, T, N_q + N_k) float32
        cos, sin = angles.cos(), angles.sin()
        if self.rope_cos_scale is not None:
            cos, sin = cos * self.rope_cos_scale, sin * self.rotary.attention_factor
        return cos, sin

    def _project_all(self, x: torch.Tensor, positions: torch.Tensor, rotation=None):
        """Every per-token projection of the new tokens (``rotation``: :meth:`rotation` at
        ``positions`` if already computed).

        Returns q_nope [B, T, H, dn], q_pe [B, T, H, dr] (rotated), latent [B, T, R + dr]
        (normalised c_kv | rotated k_pe) and, for ``D``, the indexer's (q [B, T, H_I, D_I],
        k [B, T, D_I], w float32 [B, T, H_I]; its input detached), else None.
        Under autograd: :meth:`_project` and ``_index_qkw``, one projection at a time, so that each
        part's gradient comes from its own loss only (the indexer's from the KL loss); without:
        :meth:`_project_fused`, the same values in few ops (a decode step)."""
        if not torch.is_grad_enabled():
            return self._project_fused(x, positions, rotation)
        q_nope, q_pe, latent, q_latent, cos_sin = self._project(x, positions)
        if not isinstance(self, DeepSeekSparseAttention):
            return q_nope, q_pe, latent, None
        q_in = None if q_latent is None else q_latent.detach()
        return q_nope, q_pe, latent, self._index_qkw(x.detach(), q_in, cos_sin)

    def _project_fused(self, x: torch.Tensor, positions: torch.Tensor, rotation=None):
        """:meth:`_project_all` without autograd: one matmul per input (x; the q latent), the
        three norms, and one RoPE table for both rows ([MLA q heads | indexer q heads] and
        [c_kv | k_pe | indexer key]), each rotated in one pass."""
        B, T, _ = x.shape
        H, dn, dr, R = self.n_heads, self.nope_dim, self.rope_dim, self.kv_lora_rank
        n_q = H * (dn + dr)
        index = isinstance(self, DeepSeekSparseAttention)
        n_iq = self.index_n_heads * self.index_head_dim if index else 0
        row = self._linear_row(self.x_proj, x)  # (B, T, sum of x-projection widths)
        if self.q_lora_rank is None:
            q, rest = row[..., : n_q + n_iq], row[..., n_q + n_iq :]
        else:
            q_latent = self.q_a_norm(row[..., : self.q_lora_rank])  # (B, T, q_lora_rank)
            q = self._linear_row(self.q_up, q_latent)  # (B, T, n_q + n_iq)
            rest = row[..., self.q_lora_rank :]
        c_kv = self.kv_a_norm(rest[..., :R])  # (B, T, R)
        k_parts = [c_kv, rest[..., R : R + dr]]
        if index:
            k_parts.append(self.k_norm(rest[..., R + dr : R + dr + self.index_head_dim]))  # (B, T, D_I)
        k = torch.cat(k_parts, dim=-1)  # (B, T, R + dr [+ D_I])
        tables = self.rotation(positions) if rotation is None else rotation
        if tables is not None:
            cos, sin = tables
            q = _rotate(q, cos[..., : self._n_q], sin[..., : self._n_q], self.rope_partner_q)
            k = _rotate(k, cos[..., self._n_q :], sin[..., self._n_q :], self.rope_partner_k)
        q_main = q[..., :n_q].view(B, T, H, dn + dr)  # (B, T, H, dn + dr)
        q_nope, q_pe = q_main.split([dn, dr], dim=-1)
        latent = k[..., : R + dr]  # (B, T, R + dr)
        if not index:
            return q_nope, q_pe, latent, None
        q_idx = q[..., n_q:].view(B, T, self.index_n_heads, self.index_head_dim)  # (B, T, H_I, D_I)
        w = rest[..., R + dr + self.index_head_dim :].float() * (
            self.index_head_dim**-0.5 * self.index_n_heads**-0.5
        )  # (B, T, H_I)
        return q_nope, q_pe, latent, (q_idx, k[..., R + dr :], w)

    # ------------------------------------------------------------------ pieces
    def _project_q(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, d] -> q [B, T, H, nope + rope], and the q latent [B, T, q_lora_rank] (or None)."""
        B, T, _ = x.shape
        if self.q_lora_rank is None:
            return self.q_proj(x).view(B, T, self.n_heads, -1), None  # (B, T, H, dn + dr)
        q_latent = self.q_a_norm(self.q_a_proj(x))  # (B, T, q_lora_rank)
        return self.q_b_proj(q_latent).view(B, T, self.n_heads, -1), q_latent  # (B, T, H, dn + dr)

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """Per-token projections of the new tokens.

        Returns q_nope [B, T, H, dn], q_pe [B, T, H, dr] (rotated), latent [B, T, R + dr]
        (normalised c_kv | rotated k_pe), the q latent (or None) and (cos, sin) (or None).
        """
        q, q_latent = self._project_q(x)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_norm(c_kv)  # (B, T, R)
        cos_sin = None
        if self.rotary is not None:
            cos_sin = self.rotary(positions)  # each (B, T, dr / 2)
            q_pe = apply_rope(q_pe, *cos_sin, interleaved=self.rope_interleave)
            k_pe = apply_rope(k_pe[:, :, None], *cos_sin, interleaved=self.rope_interleave)[:, :, 0]
        latent = torch.cat([c_kv, k_pe], dim=-1)  # (B, T, R + dr)
        return q_nope, q_pe, latent, q_latent, cos_sin

    def _absorb_q(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """[q_nope | q_pe] -> [W_UK^T q_nope | q_pe]: [B, T, H, R + dr] (DeepSeek-V2 §2.1.3)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w[:, : self.nope_dim])  # (B, T, H, R)
        return torch.cat([q_lat, q_pe], dim=-1)  # (B, T, H, R + dr)

    def _unabsorb_o(self, o_lat: torch.Tensor, residual: Residual | None = None) -> torch.Tensor:
        """Weighted latents o_lat [B, T, H, R] -> output [B, T, d_model] through W_UV and W_O
        (added into ``residual`` when given)."""
        B, T = o_lat.shape[:2]
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
        o = torch.einsum("bthr,hvr->bthv", o_lat, w[:, self.nope_dim :])  # (B, T, H, dv)
        return project_out(self.o_proj, o.reshape(B, T, -1), residual)  # (B, T, d_model)

    def _expanded_attention(self, q_nope, q_pe, latent, residual: Residual | None = None) -> torch.Tensor:
        """Non-absorbed MLA: decompress every latent into per-head keys/values.

        q_* [B, T, H, *] are the last T of the S tokens in latent [B, S, R + dr]; -> [B, T, d_model]
        (added into ``residual`` when given).
        """
        B, T, H, _ = q_nope.shape
        S = latent.shape[1]
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope_dim + self.v_head_dim)  # (B, S, H, dn + dv)
        k_nope, v = kv.split([self.nope_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, H, self.rope_dim)], dim=-1)  # (B, S, H, dn + dr)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, dn + dr)
        o = ops.softmax_attention(q, k, v, causal=True, scale=self.scale)  # (B, T, H, dv)
        return project_out(self.o_proj, o.reshape(B, T, -1), residual)  # (B, T, d_model)

    # ------------------------------------------------------------------ cache plumbing
    def _positions(self, x: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        """Absolute positions of the new tokens, [B, T] int64."""
        B, T, _ = x.shape
        if cache is not None and T == 1:  # decode: a view (read before the lengths advance)
            return cache.lengths.to(x.device)[:, None]  # (B, 1)
        steps = torch.arange(T, device=x.device)
        if cache is None:
            return steps[None].expand(B, T)
        return cache.lengths.to(x.device)[:, None] + steps  # (B, T)

    @staticmethod
    def _check_cache(cache: MLACache, B: int, T: int) -> int | None:
        """Validate room in the cache; for T > 1 return the common row length."""
        if cache.lengths.shape != (B,):
            raise ValueError(
                f"cache: expected lengths of shape ({B},) for this batch, got {tuple(cache.lengths.shape)}"
            )
        s_max = cache.latent.shape[1]
        if T > 1:
            lo, hi = int(cache.lengths.min()), int(cache.lengths.max())
            if lo != hi:
                raise ValueError(
                    f"cache: prefill of T={T} tokens needs equal row lengths, got {lo}..{hi}; "
                    "prefill rows of different lengths one at a time with cache.rows(b, b + 1)"
                )
            if hi + T > s_max:
                raise ValueError(f"cache: {hi} + {T} tokens exceed its max_len {s_max}")
            return hi
        if not in_graph() and int(cache.lengths.max()) >= s_max:
            raise ValueError(f"cache: full (max_len {s_max}); allocate a longer cache")
        return None

    @staticmethod
    def _write(buf: torch.Tensor, new: torch.Tensor, cache: LayerCache, start: int | None) -> None:
        """Write new [B, T, ...] tokens into buf [B, S_max, ...] at each row's length."""
        if start is not None:
            buf[:, start : start + new.shape[1]] = new.to(buf.dtype)
        else:  # T == 1, rows at different lengths: one scatter at each row's length
            B = buf.shape[0]
            at = cache.lengths.to(buf.device).view(B, 1, *([1] * (buf.dim() - 2)))
            buf.scatter_(1, at.expand(B, 1, *buf.shape[2:]), new.to(buf.dtype))

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, cache: MLACache | None = None, residual: Residual | None = None,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]; with a cache, appends the T tokens to it.
        ``residual``: the output projection adds its result into it (see :class:`Residual`).
        ``rotation``: :meth:`rotation` at the new tokens' positions, when the caller computed it
        once for several layers (HybridLM's decode step)."""
        check_tensor("x", x, 3, "[B, T, d_model]", shape=(None, None, self.d_model))
        B, T, _ = x.shape
        q_nope, q_pe, latent, _ = self._project_all(x, self._positions(x, cache), rotation)
        if cache is None:
            return self._expanded_attention(q_nope, q_pe, latent, residual)

        start = self._check_cache(cache, B, T)
        lat_buf = cache.latent[:, :, 0]  # (B, S_max, R + dr)
        self._write(lat_buf, latent, cache, start)
        cache.lengths += T  # the rows now include the new tokens
        if T > 1:  # prefill (possibly continuing): non-absorbed over everything cached so far
            ctx = lat_buf[:, : start + T].to(x.dtype)  # (B, S, R + dr)
            return self._expanded_attention(q_nope, q_pe, ctx, residual)
        # absorbed decode: MQA over the latent cache, key = latent, value = c_kv
        q = self._absorb_q(q_nope, q_pe)[:, 0]  # (B, H, R + dr)
        k_cache = cache.latent.to(x.dtype)  # (B, S_max, 1, R + dr)
        o_lat = ops.softmax_decode(
            q, k_cache, k_cache[..., : self.kv_lora_rank], cache.lengths, scale=self.scale
        )  # (B, H, R)
        return self._unabsorb_o(o_lat[:, None], residual)

    # ------------------------------------------------------------------ cache API
    def cache_spec(self, dtype: torch.dtype = torch.bfloat16) -> CacheSpec:
        """Per sequence: (kv_lora_rank + qk_rope_head_dim) cached numbers per token."""
        return CacheSpec(bytes_per_token=(self.kv_lora_rank + self.rope_dim) * _dtype_bytes(dtype))

    def new_cache(
        self, batch: int, max_len: int, device=None, dtype: torch.dtype = torch.float32
    ) -> MLACache:
        return MLACache(
            lengths=torch.zeros(batch, dtype=torch.int64, device=device),
            latent=torch.zeros(
                batch, max_len, 1, self.kv_lora_rank + self.rope_dim, dtype=dtype, device=device
            ),
        )

    # ------------------------------------------------------------------ Hugging Face
    def load_from_hf(self, hf_module: nn.Module) -> None:
        """Copy weights from a ``DeepseekV3Attention`` / ``KimiLinearAttention`` (its ``self_attn``)."""
        _load_mla_weights(self, hf_module)


class DeepSeekSparseAttention(MultiHeadLatentAttention):
    """The ``D`` mixer: MLA in absorbed (MQA) form over the indexer's top-k tokens per query."""

    def __init__(self, cfg, layer_idx: int = 0) -> None:
        self._indexer_built = False  # MLA's __init__ leaves the fusing to the end of this one
        super().__init__(cfg, layer_idx)
        if self.use_rope and cfg.index_head_dim < self.rope_dim:
            raise ValueError(
                f"index_head_dim: {cfg.index_head_dim} is smaller than qk_rope_head_dim={self.rope_dim}; "
                "the indexer rotates its first qk_rope_head_dim dims"
            )
        self.index_n_heads = cfg.index_n_heads
        self.index_head_dim = cfg.index_head_dim
        self.index_topk = cfg.index_topk
        # The indexer query reads the q latent (q LoRA); without q LoRA it reads x itself.
        q_in = cfg.d_model if self.q_lora_rank is None else self.q_lora_rank
        self.wq_b = nn.Linear(q_in, self.index_n_heads * self.index_head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.index_head_dim, eps=_LATENT_EPS)
        self.weights_proj = nn.Linear(cfg.d_model, self.index_n_heads, bias=False)
        self.index_loss_weight = cfg.index_loss_weight
        self.last_indexer_loss: torch.Tensor | None = None
        self._indexer_built = True
        self._build_fused()

    def _build_fused(self) -> None:
        if self._indexer_built:
            super()._build_fused()

    def _x_linears(self) -> list[nn.Linear]:
        """MLA's, with the indexer's query right after MLA's (without q LoRA) so that the query row
        is one slice, then the indexer's key and head weights."""
        index_q = [self.wq_b] if self.q_lora_rank is None else []
        q, kv_a = super()._x_linears()
        return [q, *index_q, kv_a, self.wk, self.weights_proj]

    def _q_linears(self) -> list[nn.Linear]:
        return [self.q_b_proj, self.wq_b] if self.q_lora_rank is not None else []

    def _q_segments(self) -> list[tuple[int, int, int, bool]]:
        """MLA's query heads, then the indexer's: NON-interleaved RoPE on their first rope dims."""
        return [*super()._q_segments(), (self.index_n_heads, self.index_head_dim, 0, False)]

    def _k_segments(self) -> list[tuple[int, int, int, bool]]:
        """[c_kv | k_pe], then the indexer key (rotated after its LayerNorm)."""
        return [*super()._k_segments(), (1, self.index_head_dim, 0, False)]

    def _index_qkw(self, x, q_latent, cos_sin):
        """Indexer query [B, T, H_I, D_I], key [B, T, D_I] (rotated) and head weights [B, T, H_I] float32.

        The scales head_dim^-0.5 (inside the ReLU, positive so it commutes) and n_heads^-0.5 are
        folded into the weights, as ops.dsa_index_scores expects (DeepSeek-V3.2 indexer)."""
        B, T, _ = x.shape
        q = self.wq_b(x if q_latent is None else q_latent).view(B, T, self.index_n_heads, self.index_head_dim)
        k = self.k_norm(self.wk(x))  # (B, T, D_I)
        if cos_sin is not None:  # non-interleaved RoPE on the FIRST rope_dim dims: [rope | nope]
            q = apply_rope(q, *cos_sin, interleaved=False)
            k = apply_rope(k[:, :, None], *cos_sin, interleaved=False)[:, :, 0]
        w = self.weights_proj(x).float() * (
            self.index_head_dim**-0.5 * self.index_n_heads**-0.5
        )  # (B, T, H_I)
        return q, k, w

    def _sparse_latent_attention(self, q_nope, q_pe, scores, latent, residual: Residual | None = None):
        """Absorbed MLA over the top-k latents the indexer picks -> [B, T, d_model] (added into
        ``residual`` when given).

        q_* are the last T of S positions; scores [B, T, S] float32 (indexer; -inf = unusable, e.g.
        past a decode row's length); latent [B, S, R + dr]."""
        S = latent.shape[1]
        # -inf positions are never chosen; slots beyond the visible count come back as -1. The
        # attention sums over the set, so only the indexer's loss (training) asks for the sorted order.
        idx = ops.dsa_topk(scores.detach(), min(self.index_topk, S), causal=True,
                           sort=scores.requires_grad)  # (B, T, k)
        q = self._absorb_q(q_nope, q_pe)  # (B, T, H, R + dr)
        kv = latent[:, :, None]  # (B, S, 1, R + dr)
        o_lat = ops.sparse_attention(
            q, kv, kv[..., : self.kv_lora_rank], idx, scale=self.scale
        )  # (B, T, H, R)
        y = self._unabsorb_o(o_lat, residual)
        if scores.requires_grad:  # training: the indexer learns from its own loss
            loss = self._indexer_kl(q.detach(), latent.detach(), scores, idx)
            self.last_indexer_loss = loss.detach()
            y = _AddAuxLoss.apply(y, loss * self.index_loss_weight)
        return y

    def _indexer_kl(self, q, latent, scores, idx) -> torch.Tensor:
        """DeepSeek-V3.2's indexer loss (sparse stage): mean over queries of
        KL(p_t || softmax(I_t)) on the selected set, where p_t is the main attention over the
        selected latents summed over heads and L1-normalised (the target carries no gradient).

        q [B, T, H, R + dr] absorbed queries, latent [B, S, R + dr], scores [B, T, S] with grad,
        idx [B, T, k] (-1 = empty) -> scalar."""
        B, T, H, _ = q.shape
        S = latent.shape[1]
        valid = idx >= 0  # (B, T, k)
        safe = idx.clamp(min=0)
        p = torch.empty(idx.shape, dtype=torch.float32, device=q.device)  # (B, T, k)
        block = max(1, (1 << 24) // max(1, B * H * S))  # bound the [B, Tb, H, S] logits
        with torch.no_grad():
            for t0 in range(0, T, block):
                t1 = min(T, t0 + block)
                logits = torch.einsum("bthd,bsd->bths", q[:, t0:t1].float(), latent.float())  # (B, Tb, H, S)
                sel = logits.gather(-1, safe[:, t0:t1, None].expand(-1, -1, H, -1))  # (B, Tb, H, k)
                sel = sel.masked_fill(~valid[:, t0:t1, None], float("-inf")) * self.scale
                p[:, t0:t1] = sel.softmax(-1).mean(2)  # (B, Tb, k); each head sums to 1, so /H normalises
        log_q = scores.gather(-1, safe).masked_fill(~valid, float("-inf")).log_softmax(-1)  # (B, T, k)
        log_q = torch.where(valid, log_q, 0.0)
        kl = torch.where(valid, p * (p.clamp_min(1e-30).log() - log_q), 0.0).sum(-1)  # (B, T)
        return kl.mean()

    @torch.no_grad()
    def topk_indices(self, x: torch.Tensor) -> torch.Tensor:
        """The positions the indexer selects for each query of a whole sequence x [B, T, d_model]
        (as forward without a cache does) -> int64 [B, T, min(index_topk, T)], -1 = empty slot."""
        check_tensor("x", x, 3, "[B, T, d_model]", shape=(None, None, self.d_model))
        _, _, _, index_qkw = self._project_all(x, self._positions(x, None))
        scores = ops.dsa_index_scores(*index_qkw)  # (B, T, T)
        return ops.dsa_topk(scores, min(self.index_topk, x.shape[1]), causal=True)

    def forward(
        self, x: torch.Tensor, cache: DSACache | None = None, residual: Residual | None = None,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]; with a cache, appends the T tokens to it.
        ``residual``, ``rotation``: as :meth:`MultiHeadLatentAttention.forward`.

        In training (``self.training`` and grad enabled, no cache) the indexer, whose input is
        detached from the main graph, gets its gradient from the KL loss of :meth:`_indexer_kl`
        times ``index_loss_weight``, injected in backward (``last_indexer_loss`` keeps its value);
        the main attention gets none from it, as in DeepSeek-V3.2 §2.1."""
        check_tensor("x", x, 3, "[B, T, d_model]", shape=(None, None, self.d_model))
        B, T, _ = x.shape
        q_nope, q_pe, latent, (q_idx, k_idx, w) = self._project_all(x, self._positions(x, cache), rotation)
        if cache is None:
            train = self.training and torch.is_grad_enabled() and self.index_loss_weight > 0
            with torch.set_grad_enabled(train):
                scores = ops.dsa_index_scores(q_idx, k_idx, w)  # (B, T, T)
            return self._sparse_latent_attention(q_nope, q_pe, scores, latent, residual)

        start = self._check_cache(cache, B, T)
        lat_buf = cache.latent[:, :, 0]  # (B, S_max, R + dr)
        self._write(lat_buf, latent, cache, start)
        self._write(cache.index_keys, k_idx, cache, start)
        cache.lengths += T  # the rows now include the new tokens
        if T > 1:
            S, n_valid = start + T, None
        else:  # rows may differ: score up to the longest row; keys past a row's length score -inf
            n_valid = cache.lengths
            S = lat_buf.shape[1] if in_graph() else int(n_valid.max())
        with torch.no_grad():
            keys = cache.index_keys[:, :S].to(x.dtype)
            scores = ops.dsa_index_scores(q_idx.detach(), keys, w.detach(), n_valid=n_valid)  # (B, T, S)
        return self._sparse_latent_attention(q_nope, q_pe, scores, lat_buf[:, :S].to(x.dtype), residual)

    def cache_spec(self, dtype: torch.dtype = torch.bfloat16) -> CacheSpec:
        """Per sequence: latent (kv_lora_rank + qk_rope_head_dim) + indexer key (index_head_dim) per token."""
        n = self.kv_lora_rank + self.rope_dim + self.index_head_dim
        return CacheSpec(bytes_per_token=n * _dtype_bytes(dtype))

    def new_cache(
        self, batch: int, max_len: int, device=None, dtype: torch.dtype = torch.float32
    ) -> DSACache:
        return DSACache(
            lengths=torch.zeros(batch, dtype=torch.int64, device=device),
            latent=torch.zeros(
                batch, max_len, 1, self.kv_lora_rank + self.rope_dim, dtype=dtype, device=device
            ),
            index_keys=torch.zeros(batch, max_len, self.index_head_dim, dtype=dtype, device=device),
        )

    def load_from_hf(self, hf_module: nn.Module) -> None:
        """Copy weights from a ``DeepseekV32Attention`` (MLA + ``indexer``)."""
        indexer = getattr(hf_module, "indexer", None)
        if indexer is None:
            raise ValueError(
                f"hf_module: expected a DeepseekV32Attention (with `indexer`), got {type(hf_module).__name__}"
            )
        _load_mla_weights(self, hf_module)
        for name in ("wq_b", "wk", "weights_proj"):
            _copy(f"indexer.{name}.weight", getattr(self, name).weight, getattr(indexer, name).weight)
        _copy("indexer.k_norm.weight", self.k_norm.weight, indexer.k_norm.weight)
        _copy("indexer.k_norm.bias", self.k_norm.bias, indexer.k_norm.bias)
        if indexer.k_norm.eps != self.k_norm.eps:
            raise ValueError(
                f"indexer.k_norm: eps {indexer.k_norm.eps} unsupported; expected {self.k_norm.eps}"
            )


# ---------------------------------------------------------------------------- helpers
class _AddAuxLoss(torch.autograd.Function):
    """Identity on ``y`` whose backward also feeds gradient 1 into the scalar ``loss``, so an
    auxiliary loss trains its parameters without the trainer knowing about it (the
    ``AddAuxiliaryLoss`` trick of DeepSeek-V2's MoE code)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_dtype, ctx.loss_device = loss.dtype, loss.device
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=ctx.loss_dtype, device=ctx.loss_device)


def _copy(name: str, dst: torch.Tensor, src: torch.Tensor | None) -> None:
    if src is None:
        raise ValueError(
            f"hf_module.{name}: missing, but this layer has a parameter of shape {tuple(dst.shape)}"
        )
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(
            f"hf_module.{name}: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}; check the config"
        )
    with torch.no_grad():
        dst.copy_(src.detach().to(dst.dtype))


def _load_mla_weights(layer: MultiHeadLatentAttention, hf) -> None:
    """Copy the MLA projections and latent norms from a transformers MLA attention module."""
    for lin in ("q_proj", "q_a_proj", "kv_a_proj_with_mqa", "o_proj"):
        mod = getattr(hf, lin, None)
        if mod is not None and mod.bias is not None:
            raise ValueError(
                f"hf_module.{lin}: has a bias (attention_bias=True), which attnlab's MLA does not support"
            )
    if getattr(hf, "num_key_value_groups", 1) != 1:
        raise ValueError("hf_module: MLA expects num_key_value_heads == num_attention_heads")
    if (getattr(hf, "q_lora_rank", None) is None) != (layer.q_lora_rank is None):
        raise ValueError(
            f"hf_module: q_lora_rank {getattr(hf, 'q_lora_rank', None)} != layer's {layer.q_lora_rank}"
        )
    if layer.q_lora_rank is None:
        _copy("q_proj.weight", layer.q_proj.weight, hf.q_proj.weight)
    else:
        _copy("q_a_proj.weight", layer.q_a_proj.weight, hf.q_a_proj.weight)
        _copy("q_a_layernorm.weight", layer.q_a_norm.weight, hf.q_a_layernorm.weight)
        _check_eps("q_a_layernorm", hf.q_a_layernorm)
        _copy("q_b_proj.weight", layer.q_b_proj.weight, hf.q_b_proj.weight)
    _copy("kv_a_proj_with_mqa.weight", layer.kv_a_proj.weight, hf.kv_a_proj_with_mqa.weight)
    _copy("kv_a_layernorm.weight", layer.kv_a_norm.weight, hf.kv_a_layernorm.weight)
    _check_eps("kv_a_layernorm", hf.kv_a_layernorm)
    _copy("kv_b_proj.weight", layer.kv_b_proj.weight, hf.kv_b_proj.weight)
    _copy("o_proj.weight", layer.o_proj.weight, hf.o_proj.weight)
    if not math.isclose(float(hf.scaling), layer.scale, rel_tol=1e-6):
        raise ValueError(
            f"hf_module.scaling: {hf.scaling} differs from this layer's softmax scale {layer.scale}; "
            "check qk dims and rope_scaling (YaRN mscale_all_dim)"
        )


def _check_eps(name: str, norm: nn.Module) -> None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", _LATENT_EPS))
    if eps != _LATENT_EPS:
        raise ValueError(
            f"hf_module.{name}: eps {eps} unsupported; DeepSeek's latent norms use {_LATENT_EPS}"
        )


def build_mla(cfg, layer_idx: int) -> MultiHeadLatentAttention:
    """The ``M`` layer for ``cfg`` (a :class:`attnlab.config.ModelConfig`)."""
    return MultiHeadLatentAttention(cfg, layer_idx)


def build_dsa(cfg, layer_idx: int) -> DeepSeekSparseAttention:
    """The ``D`` layer for ``cfg`` (a :class:`attnlab.config.ModelConfig`)."""
    return DeepSeekSparseAttention(cfg, layer_idx)


__all__ = [
    "DSACache",
    "DeepSeekSparseAttention",
    "MLACache",
    "MultiHeadLatentAttention",
    "build_dsa",
    "build_mla",
]
