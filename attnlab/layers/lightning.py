"""Lightning attention (L): MiniMax-Text-01's linear attention layer.

Per head h, with a float32 state S [D, D] and a fixed decay e^{-s_h} (MiniMax-01 report,
arXiv:2501.08313 §2.2; Hugging Face ``MiniMaxLightningAttention`` is the numeric reference)::

    q, k, v = silu(W_qkv x)                      no q scaling, no positional encoding
    S_t     = e^{-s_h} S_{t-1} + k_t v_tᵀ
    o_t     = S_tᵀ q_t
    y       = W_out( RMSNorm_{H·D}(o) * sigmoid(W_gate x) )

The output RMSNorm spans all heads (one weight of size H·D), and the slopes s_h are ALiBi's
geometric sequence 2^{-8h/H}, h = 1..H, shrunk linearly with depth so deeper layers forget
more slowly: s_h · (1 − layer_idx / (n_layers − 1) + 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._checks import check_tensor
from ..cache import CacheSpec, LayerCache
from .common import Residual, RMSNorm, project_out

# MiniMax builds the output norm with its RMSNorm's default eps, not the model's rms_norm_eps.
_OUTPUT_NORM_EPS = 1e-6


def lightning_slopes(n_heads: int, layer_idx: int, n_layers: int) -> torch.Tensor:
    """Per-head decay rates of layer ``layer_idx`` -> float32 [n_heads].

    ALiBi slopes base^h (base = 2^{-8/H}, h = 1..H) times the depth factor of MiniMax-Text-01
    (``get_slope_rate`` in its modeling code), computed in float32 in the same order so the
    rates match the published model bit for bit.
    """
    base = 1 / (2 ** (8 / n_heads))
    exponent = torch.arange(n_heads) + 1
    factor = 1 - layer_idx / (n_layers - 1 + 1e-5) + 1e-5
    return (base**exponent) * factor  # (H,) float32


@dataclass
class LightningCache(LayerCache):
    """Recurrent state of an ``L`` layer: ``state`` float32 [B, H, D, D] (k ⊗ v sums)."""

    state: torch.Tensor


class LightningAttention(nn.Module):
    """The ``L`` mixer: forward(x [B, T, d_model], cache=None) -> [B, T, d_model].

    One matmul reads x: ``in_proj`` rows are ``[q | k | v | gate]``, each H·D wide (head-major
    inside); :meth:`load_from_hf` permutes MiniMax's per-head ``[q_h k_h v_h]`` interleave into it.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, layer_idx: int, n_layers: int) -> None:
        super().__init__()
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.layer_idx, self.n_layers = layer_idx, n_layers
        inner = n_heads * head_dim
        self.in_proj = nn.Linear(d_model, 4 * inner, bias=False)
        self.norm = RMSNorm(inner, eps=_OUTPUT_NORM_EPS)
        self.out_proj = nn.Linear(inner, d_model, bias=False)
        self.register_buffer("slope", lightning_slopes(n_heads, layer_idx, n_layers), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # .to(bfloat16) / .half() cast buffers too, but the decay rates must stay exact float32
        # (e^{-s} over thousands of steps); restore them here, outside forward, so the decode
        # step stays free of host-to-device copies (CUDA graphs).
        super()._apply(fn, recurse)
        if self.slope.dtype != torch.float32:
            exact = lightning_slopes(self.n_heads, self.layer_idx, self.n_layers)
            self.slope = exact.to(self.slope.device)
        return self

    def forward(
        self, x: torch.Tensor, cache: LightningCache | None = None, residual: Residual | None = None
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model], x's dtype (added into ``residual`` by the output
        projection if given, :class:`attnlab.layers.common.Residual`).

        cache None: the sequence starts at position 0. Otherwise the T tokens continue each
        row's state (T == 1 decodes with the single-step recurrence) and ``cache.lengths += T``.
        """
        check_tensor("x", x, 3, "[B, T, d_model]", shape=(None, None, self.d_model))
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        proj = self.in_proj(x)  # (B, T, 4*H*D)
        qkv = F.silu(proj[..., : 3 * H * D]).unflatten(-1, (3, H, D))  # (B, T, 3, H, D)
        q, k, v = qkv.unbind(2)  # each (B, T, H, D)
        slope = self.slope
        if cache is None:
            o, _ = ops.lightning_attention(q, k, v, slope)  # (B, T, H, D)
        else:
            _check_cache(cache, LightningCache, B)
            if T == 1:
                o = ops.lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], slope, cache.state)  # (B, H, D)
                o = o.unsqueeze(1)  # (B, 1, H, D)
            else:
                o, state = ops.lightning_attention(
                    q, k, v, slope, initial_state=cache.state, output_final_state=True
                )  # (B, T, H, D), (B, H, D, D)
                cache.state.copy_(state)
            cache.lengths += T
        o = self.norm(o.reshape(B, T, H * D))  # (B, T, H*D): one norm over all heads
        o = o * torch.sigmoid(proj[..., 3 * H * D :])
        return project_out(self.out_proj, o, residual)

    # ------------------------------------------------------------------ cache
    def cache_spec(self, dtype: torch.dtype = torch.bfloat16) -> CacheSpec:
        """Constant bytes only: the float32 state (H·D·D·4), whatever ``dtype``."""
        return CacheSpec(bytes_per_token=0, constant_bytes=self.n_heads * self.head_dim * self.head_dim * 4)

    def new_cache(
        self, batch: int, max_len: int, device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LightningCache:
        """A zeroed cache for ``batch`` sequences; ``max_len`` and ``dtype`` do not change its size."""
        H, D = self.n_heads, self.head_dim
        return LightningCache(
            lengths=torch.zeros(batch, dtype=torch.int64, device=device),
            state=torch.zeros(batch, H, D, D, dtype=torch.float32, device=device),
        )

    # ------------------------------------------------------------------ Hugging Face
    @torch.no_grad()
    def load_from_hf(self, hf_module: nn.Module) -> None:
        """Copy weights from a ``transformers`` ``MiniMaxLightningAttention`` (a MiniMax
        decoder layer's ``self_attn`` where ``layer_types[i] == "linear_attention"``)."""
        hf = hf_module
        if type(hf).__name__ != "MiniMaxLightningAttention":
            raise ValueError(f"hf_module: expected a MiniMaxLightningAttention, got {type(hf).__name__}")
        H, D = self.n_heads, self.head_dim
        if (hf.num_attention_heads, hf.head_dim) != (H, D):
            raise ValueError(
                f"hf_module: has {hf.num_attention_heads} heads of dim {hf.head_dim}, this layer {H} of "
                f"dim {D}; build it with n_heads={hf.num_attention_heads}, head_dim={hf.head_dim}"
            )
        if not isinstance(hf.act_fn, nn.SiLU) and type(hf.act_fn).__name__ != "SiLUActivation":
            raise ValueError(
                f"hf_module: q/k/v activation is {type(hf.act_fn).__name__}; only silu (MiniMax's "
                f"hidden_act='silu') is supported"
            )
        slope = lightning_slopes(H, self.layer_idx, self.n_layers).cpu()  # (built on a default device if set)
        if not torch.allclose(hf.slope_rate.reshape(-1).float().cpu(), slope, rtol=1e-6, atol=0):
            raise ValueError(
                f"hf_module: its decay slopes belong to layer {hf.layer_idx} of {hf.num_hidden_layers}, "
                f"but this layer was built as layer {self.layer_idx} of {self.n_layers}; build it with "
                f"layer_idx={hf.layer_idx} and n_layers={hf.num_hidden_layers}"
            )
        if hf.norm.variance_epsilon != self.norm.eps:
            raise ValueError(f"hf_module: output norm eps {hf.norm.variance_epsilon} != {self.norm.eps}")
        # MiniMax rows are [head][q | k | v][D]; ours are [q | k | v][head][D], then the gate
        w = hf.qkv_proj.weight.reshape(H, 3, D, self.d_model).transpose(0, 1)  # (3, H, D, d_model)
        self.in_proj.weight.copy_(torch.cat([w.reshape(3 * H * D, self.d_model), hf.output_gate.weight]))
        self.norm.weight.copy_(hf.norm.weight)
        self.out_proj.weight.copy_(hf.out_proj.weight)


def _check_cache(cache: LayerCache, cls: type, batch: int) -> None:
    if not isinstance(cache, cls):
        got = type(cache).__name__
        raise ValueError(f"cache: expected a {cls.__name__} from this layer's new_cache, got {got}")
    if cache.lengths.shape[0] != batch:
        n = cache.lengths.shape[0]
        raise ValueError(f"cache: holds {n} rows but x has batch {batch}; pass cache.rows(start, stop)")


def build_lightning(cfg, layer_idx: int) -> LightningAttention:
    """The ``L`` layer of ``cfg`` (uses n_heads, head_dim, n_layers; layer_idx sets the slopes)."""
    return LightningAttention(cfg.d_model, cfg.n_heads, cfg.attn_head_dim, layer_idx, cfg.n_layers)
