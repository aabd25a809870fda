"""Gated DeltaNet (G, Qwen3-Next) and Kimi Delta Attention (K, Kimi Linear).

Both are the gated delta rule (``attnlab.ops.gated_delta_rule`` / ``kda``) wrapped the same
way, so they share one body, :class:`DeltaRuleMixer`::

    q, k, v  = silu(ShortConv(W_qkv x))          depthwise causal conv, kernel 4, over [q|k|v]
    q, k     = q / |q|, k / |k|                   (inside the op), q also scaled by D_k^-1/2
    beta     = sigmoid(W_b x)                     [B, T, H]
    g        = -exp(A_log) * softplus(a(x) + dt_bias)        log-decay, ≤ 0
    S_t      = Diag(e^{g_t}) S_{t-1} + beta_t k_t (v_t − S_{t-1}'ᵀ k_t)ᵀ ,  o_t = S_tᵀ q_t
    y        = W_o( GatedRMSNorm_{D_v}(o, gate(x)) )          norm per head, one weight

They differ only where the papers differ:

=============  ==========================================  ===========================================
               G: Gated DeltaNet (Yang et al. 2025)         K: Kimi Delta Attention (Kimi Linear 2025)
=============  ==========================================  ===========================================
decay a(x)     one per head: ``a`` (d → H)                  one per key channel, low rank:
                                                            ``f_b_proj(f)``, ``f`` (d → D_v → H·D_k)
dt_bias        [H]                                          [H·D_k]
output gate    ``z`` (d → H·D_v), silu                      ``g_b_proj(g)``, ``g`` (d → D_v → H·D_v),
                                                            sigmoid
key heads      may be fewer than value heads (each q/k      as many as value heads in Kimi Linear
               head serves H/H_k consecutive value heads)
=============  ==========================================  ===========================================

Everything read from x goes through ONE matmul, ``in_proj``, whose rows are the named parts of
``in_sizes`` in order (``q k v beta`` then ``z a`` for G, ``f g`` for K): fewer, larger matmuls,
which matters most in decode. The Hugging Face ``Qwen3NextGatedDeltaNet`` and
``KimiLinearDeltaAttention`` are the numeric references (:meth:`load_from_hf`); Qwen3-Next's
per-key-head interleave of ``in_proj_qkvz`` / ``in_proj_ba`` is undone once, at load time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._checks import check_heads_divide, check_tensor
from ..cache import CacheSpec, LayerCache
from .common import FusedLinears, GatedRMSNorm, Residual, ShortConv, project_out
from .lightning import _check_cache


@dataclass
class DeltaRuleCache(LayerCache):
    """State of a ``G`` / ``K`` layer, constant in context length.

    state:      float32 [B, H, D_k, D_v], the delta-rule memory.
    conv_state: [B, 2·H_k·D_k + H·D_v, K − 1] (cache dtype), the last K − 1 inputs of the short conv.
    """

    state: torch.Tensor
    conv_state: torch.Tensor


class DeltaRuleMixer(nn.Module):
    """Shared body of ``G`` and ``K``: forward(x [B, T, d_model], cache=None) -> [B, T, d_model].

    Subclasses name their extra ``in_proj`` parts, turn them into the decay and output gate,
    and pick the op and the gate activation. ``in_proj`` rows start ``[q | k | v | beta]``
    (H_k·D_k, H_k·D_k, H·D_v, H), head-major inside; the conv reads the ``q | k | v`` part.
    """

    output_activation: str  # of the gated output norm
    a_init_range: tuple[float, float]  # A = exp(A_log) drawn uniform in this range

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_key_heads: int,
        key_head_dim: int,
        value_head_dim: int,
        conv_kernel: int = 4,
        norm_eps: float = 1e-6,
        n_decay: int | None = None,
        extra_in: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        check_heads_divide("linear_n_heads (value heads)", n_heads, "linear_n_key_heads", n_key_heads)
        self.d_model, self.n_heads, self.n_key_heads = d_model, n_heads, n_key_heads
        self.key_head_dim, self.value_head_dim = key_head_dim, value_head_dim
        self.key_dim = n_key_heads * key_head_dim
        self.value_dim = n_heads * value_head_dim
        self.in_sizes = {"q": self.key_dim, "k": self.key_dim, "v": self.value_dim, "beta": n_heads,
                         **(extra_in or {})}
        self.in_proj = nn.Linear(d_model, sum(self.in_sizes.values()), bias=False)
        self.conv = ShortConv(2 * self.key_dim + self.value_dim, conv_kernel)
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads if n_decay is None else n_decay))
        self.o_norm = GatedRMSNorm(value_head_dim, eps=norm_eps, activation=self.output_activation)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self.reset_gate_parameters()

    def _apply(self, fn, recurse: bool = True):
        # A_log and dt_bias stay float32 when the model is cast to 16 bits, as Lightning's decay rates
        # do: a decay compounded over thousands of tokens wants its float32 value (a 16-bit checkpoint's
        # values convert exactly), and the decode step then casts neither (two kernels per layer)
        kept = {name: getattr(self, name).data for name in ("A_log", "dt_bias")}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            p = getattr(self, name)
            if before.dtype == torch.float32 and p.dtype in (torch.float16, torch.bfloat16):
                p.data = before.to(device=p.device)
        return self

    @torch.no_grad()
    def reset_gate_parameters(self) -> None:
        """Mamba-2 / fla initialisation: A uniform in ``a_init_range``; dt = softplus(dt_bias)
        log-uniform in [1e-3, 1e-1] (dt_bias is its inverse softplus)."""
        lo, hi = self.a_init_range
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(lo, hi).log())
        dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp_min(1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    # ---- what G and K define
    def log_decay(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``in_proj`` parts ([B, T, size] each) -> float32 g, [B, T, H] (G) or [B, T, H, D_k] (K)."""
        raise NotImplementedError

    def output_gate(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``in_proj`` parts -> gate pre-activation [B, T, H·D_v]."""
        raise NotImplementedError

    def recurrence(self, q, k, v, g, beta, initial_state=None, output_final_state=False):
        """The chunked op: ``ops.gated_delta_rule`` or ``ops.kda``."""
        raise NotImplementedError

    def recurrence_step(self, q, k, v, g, beta, state):
        """The one-token op: ``ops.gated_delta_rule_step`` or ``ops.kda_step`` (mode "auto": on CUDA
        outside torch.compile, the fused Triton step)."""
        raise NotImplementedError

    # ---- shared
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x [B, T, d_model] -> (``in_proj(x)`` [B, T, sum(in_sizes)], its parts by name)."""
        proj = self.in_proj(x)  # (B, T, sum(in_sizes))
        return proj, dict(zip(self.in_sizes, proj.split(list(self.in_sizes.values()), dim=-1), strict=True))

    def log_decay_of(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token log-decay g this layer applies for inputs x [B, T, d_model] (float32,
        [B, T, H] for G, [B, T, H, D_k] for K): the memory horizon diagnostics read."""
        return self.log_decay(self.project(x)[1])

    def forward(
        self, x: torch.Tensor, cache: DeltaRuleCache | None = None, residual: Residual | None = None
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model], x's dtype (added into ``residual`` by the output
        projection if given, :class:`attnlab.layers.common.Residual`).

        cache None: the sequence starts at position 0. Otherwise the T tokens continue each
        row's conv and recurrent state (T == 1 uses the single-step recurrence) and
        ``cache.lengths += T``.
        """
        check_tensor("x", x, 3, "[B, T, d_model]", shape=(None, None, self.d_model))
        B, T, _ = x.shape
        if cache is not None:
            _check_cache(cache, DeltaRuleCache, B)
        proj, parts = self.project(x)
        conv_dim = self.conv.channels
        qkv = self.conv(proj[..., :conv_dim], None if cache is None else cache.conv_state)  # (B, T, conv_dim)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(B, T, self.n_key_heads, self.key_head_dim)  # (B, T, H_k, D_k)
        k = k.reshape(B, T, self.n_key_heads, self.key_head_dim)  # (B, T, H_k, D_k)
        v = v.reshape(B, T, self.n_heads, self.value_head_dim)  # (B, T, H, D_v)
        g = self.log_decay(parts)  # (B, T, H) or (B, T, H, D_k), float32
        beta = torch.sigmoid(parts["beta"].float())  # (B, T, H)
        if cache is None:
            o, _ = self.recurrence(q, k, v, g, beta)  # (B, T, H, D_v)
        elif T == 1:
            o = self.recurrence_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache.state)
            o = o.unsqueeze(1)  # (B, 1, H, D_v)
        else:
            o, state = self.recurrence(q, k, v, g, beta, initial_state=cache.state, output_final_state=True)
            cache.state.copy_(state)
        if cache is not None:
            cache.lengths += T
        gate = self.output_gate(parts).reshape(B, T, self.n_heads, self.value_head_dim)  # (B, T, H, D_v)
        o = self.o_norm(o, gate).reshape(B, T, self.value_dim)  # (B, T, H*D_v)
        return project_out(self.o_proj, o, residual)

    def cache_spec(self, dtype: torch.dtype = torch.bfloat16) -> CacheSpec:
        """Constant bytes only: float32 state H·D_k·D_v·4 plus the conv history in ``dtype``."""
        state = self.n_heads * self.key_head_dim * self.value_head_dim * 4
        conv = self.conv.channels * (self.conv.kernel_size - 1) * torch.empty((), dtype=dtype).element_size()
        return CacheSpec(bytes_per_token=0, constant_bytes=state + conv)

    def new_cache(
        self, batch: int, max_len: int, device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> DeltaRuleCache:
        """A zeroed cache for ``batch`` sequences (``max_len`` does not change its size)."""
        return DeltaRuleCache(
            lengths=torch.zeros(batch, dtype=torch.int64, device=device),
            state=torch.zeros(batch, self.n_heads, self.key_head_dim, self.value_head_dim,
                              dtype=torch.float32, device=device),
            conv_state=self.conv.new_state(batch, device=device, dtype=dtype),
        )

    def _load_in_proj(self, **weights: torch.Tensor) -> None:
        """Stack HF weights [size, d_model] into ``in_proj`` in ``in_sizes`` order."""
        for name, size in self.in_sizes.items():
            if tuple(weights[name].shape) != (size, self.d_model):
                raise ValueError(f"hf_module: {name} weight has shape {tuple(weights[name].shape)}, "
                                 f"expected {(size, self.d_model)}")
        self.in_proj.weight.copy_(torch.cat([weights[name] for name in self.in_sizes]))

    def _check_hf_common(self, hf, n_heads, n_key_heads, key_head_dim, value_head_dim, norm) -> None:
        got = (n_heads, n_key_heads, key_head_dim, value_head_dim, hf.conv_kernel_size)
        want = (self.n_heads, self.n_key_heads, self.key_head_dim, self.value_head_dim, self.conv.kernel_size)
        if got != want:
            raise ValueError(
                f"hf_module: (value heads, key heads, key head dim, value head dim, conv kernel) = {got}, "
                f"but this layer was built with {want}; set linear_n_heads, linear_n_key_heads, "
                f"linear_key_head_dim, linear_value_head_dim, conv_kernel to match"
            )
        if hf.activation != "silu":
            raise ValueError(f"hf_module: conv activation {hf.activation!r}; only hidden_act='silu' works")
        if hf.conv1d.bias is not None:
            raise ValueError("hf_module: a short conv with bias is not supported")
        if norm.variance_epsilon != self.o_norm.eps:
            raise ValueError(
                f"hf_module: output norm eps {norm.variance_epsilon} != {self.o_norm.eps}; "
                f"set norm_eps to match"
            )


class GatedDeltaNet(DeltaRuleMixer):
    """``G``: Gated DeltaNet as in Qwen3-Next (scalar decay per head, silu output gate)."""

    output_activation = "silu"
    a_init_range = (0.01, 16.0)  # Qwen3-Next keeps A away from 0

    def __init__(self, d_model: int, n_heads: int, n_key_heads: int, key_head_dim: int, value_head_dim: int,
                 conv_kernel: int = 4, norm_eps: float = 1e-6) -> None:
        super().__init__(d_model, n_heads, n_key_heads, key_head_dim, value_head_dim, conv_kernel, norm_eps,
                         extra_in={"z": n_heads * value_head_dim, "a": n_heads})

    def log_decay(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        # a 16-bit `a` plus the float32 bias computes in float32 (no separate cast of a)
        return -self.A_log.float().exp() * F.softplus(parts["a"] + self.dt_bias.float())  # (B, T, H)

    def output_gate(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["z"]

    def recurrence(self, q, k, v, g, beta, initial_state=None, output_final_state=False):
        return ops.gated_delta_rule(q, k, v, g, beta, initial_state=initial_state,
                                    output_final_state=output_final_state, use_qk_l2norm=True)

    def recurrence_step(self, q, k, v, g, beta, state):
        return ops.gated_delta_rule_step(q, k, v, g, beta, state, use_qk_l2norm=True)

    @torch.no_grad()
    def load_from_hf(self, hf_module: nn.Module) -> None:
        """Copy weights from a ``transformers`` ``Qwen3NextGatedDeltaNet`` (a layer's ``linear_attn``)."""
        hf = hf_module
        if type(hf).__name__ != "Qwen3NextGatedDeltaNet":
            raise ValueError(f"hf_module: expected a Qwen3NextGatedDeltaNet, got {type(hf).__name__}")
        self._check_hf_common(hf, hf.num_v_heads, hf.num_k_heads, hf.head_k_dim, hf.head_v_dim, hf.norm)
        d, Hk, Dk, Dv = self.d_model, self.n_key_heads, self.key_head_dim, self.value_head_dim
        r = self.n_heads // Hk  # value heads per key head
        # in_proj_qkvz rows: per key head group [q (D_k) | k (D_k) | v (r·D_v) | z (r·D_v)]
        w = hf.in_proj_qkvz.weight.reshape(Hk, 2 * Dk + 2 * r * Dv, d)
        wq, wk, wv, wz = w.split([Dk, Dk, r * Dv, r * Dv], dim=1)  # (H_k, ·, d) each
        # in_proj_ba rows: per key head group [b (r) | a (r)]
        wb, wa = hf.in_proj_ba.weight.reshape(Hk, 2 * r, d).split([r, r], dim=1)
        # flattening (group, j) gives value head group·r + j, as HF's reshape does
        q, k, v, z, b, a = (t.reshape(-1, d) for t in (wq, wk, wv, wz, wb, wa))
        self._load_in_proj(q=q, k=k, v=v, beta=b, z=z, a=a)
        self.conv.weight.copy_(hf.conv1d.weight)  # channels [q | k | v], same order as ours
        self.A_log.copy_(hf.A_log)
        self.dt_bias.copy_(hf.dt_bias)
        self.o_norm.weight.copy_(hf.norm.weight)
        self.o_proj.weight.copy_(hf.out_proj.weight)


class KimiDeltaAttention(DeltaRuleMixer):
    """``K``: Kimi Delta Attention (per-channel decay from a low-rank projection, sigmoid output gate)."""

    output_activation = "sigmoid"
    a_init_range = (1.0, 16.0)  # Kimi Linear / fla

    def __init__(self, d_model: int, n_heads: int, n_key_heads: int, key_head_dim: int, value_head_dim: int,
                 conv_kernel: int = 4, norm_eps: float = 1e-6) -> None:
        rank = value_head_dim  # low-rank width of both gates (fla's KDA; Kimi Linear has D_k == D_v)
        super().__init__(d_model, n_heads, n_key_heads, key_head_dim, value_head_dim, conv_kernel, norm_eps,
                         n_decay=n_heads * key_head_dim, extra_in={"f": rank, "g": rank})
        self.f_b_proj = nn.Linear(rank, n_heads * key_head_dim, bias=False)
        self.g_b_proj = nn.Linear(rank, self.value_dim, bias=False)
        # both up-projections in one batched matmul when their widths match (D_k == D_v)
        self.gates_up = FusedLinears(self.f_b_proj, self.g_b_proj)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.gates_up.refuse()  # .to() / .half() gave each weight new storage
        return self

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As :meth:`DeltaRuleMixer.project`, plus the gates' up-projections ``f_up`` [B, T, H·D_k]
        and ``g_up`` [B, T, H·D_v] from one batched matmul when the weights are fused (inference)."""
        proj, parts = super().project(x)
        fused = self.gates_up.weight()
        rank, width = self.f_b_proj.in_features, self.f_b_proj.out_features
        if fused is not None and self.g_b_proj.out_features == width:
            B, T, _ = x.shape
            fg = proj[..., -2 * rank :].reshape(B * T, 2, rank).transpose(0, 1)  # (2, B*T, rank): f, g
            up = torch.bmm(fg, fused.view(2, width, rank).transpose(1, 2))  # (2, B*T, width)
            parts["f_up"], parts["g_up"] = up[0].view(B, T, width), up[1].view(B, T, width)
        return proj, parts

    def log_decay(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        f = parts["f_up"] if "f_up" in parts else self.f_b_proj(parts["f"])  # (B, T, H*D_k)
        f = f + self.dt_bias.float()  # float32 (a 16-bit f is promoted)
        f = f.unflatten(-1, (self.n_heads, self.key_head_dim))  # (B, T, H, D_k)
        return -self.A_log.float().exp()[:, None] * F.softplus(f)

    def output_gate(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["g_up"] if "g_up" in parts else self.g_b_proj(parts["g"])  # (B, T, H*D_v)

    def recurrence(self, q, k, v, g, beta, initial_state=None, output_final_state=False):
        return ops.kda(q, k, v, g, beta, initial_state=initial_state,
                       output_final_state=output_final_state, use_qk_l2norm=True)

    def recurrence_step(self, q, k, v, g, beta, state):
        return ops.kda_step(q, k, v, g, beta, state, use_qk_l2norm=True)

    @torch.no_grad()
    def load_from_hf(self, hf_module: nn.Module) -> None:
        """Copy weights from a ``transformers`` ``KimiLinearDeltaAttention`` (a KDA layer's ``self_attn``)."""
        hf = hf_module
        if type(hf).__name__ != "KimiLinearDeltaAttention":
            raise ValueError(f"hf_module: expected a KimiLinearDeltaAttention, got {type(hf).__name__}")
        self._check_hf_common(hf, hf.num_heads, hf.num_heads, hf.head_dim, hf.head_dim, hf.o_norm)
        if hf.o_norm.activation != "sigmoid":
            raise ValueError(f"hf_module: output gate activation {hf.o_norm.activation!r}, not 'sigmoid'")
        fg = hf.forget_gate
        self._load_in_proj(q=hf.q_proj.weight, k=hf.k_proj.weight, v=hf.v_proj.weight, beta=hf.b_proj.weight,
                           f=fg.f_a_proj.weight, g=hf.g_a_proj.weight)
        self.conv.weight.copy_(hf.conv1d.weight)
        self.f_b_proj.weight.copy_(fg.f_b_proj.weight)
        self.A_log.copy_(fg.A_log.reshape(-1))  # HF keeps it [1, 1, H, 1]
        self.dt_bias.copy_(fg.dt_bias)
        self.g_b_proj.weight.copy_(hf.g_b_proj.weight)
        self.o_norm.weight.copy_(hf.o_norm.weight)
        self.o_proj.weight.copy_(hf.o_proj.weight)


def _linear_args(cfg) -> tuple:
    return (cfg.d_model, cfg.linear_heads, cfg.linear_key_heads, cfg.linear_key_head_dim,
            cfg.linear_value_head_dim, cfg.conv_kernel, cfg.norm_eps)


def build_gated_deltanet(cfg, layer_idx: int) -> GatedDeltaNet:
    """The ``G`` layer of ``cfg`` (linear_n_heads, linear_n_key_heads, linear_*_head_dim, conv_kernel)."""
    return GatedDeltaNet(*_linear_args(cfg))


def build_kda(cfg, layer_idx: int) -> KimiDeltaAttention:
    """The ``K`` layer of ``cfg`` (same fields as ``G``)."""
    return KimiDeltaAttention(*_linear_args(cfg))
