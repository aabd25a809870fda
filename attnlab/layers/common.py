"""Parts every mixer shares, written once: RMSNorm variants, RoPE (rotate-half and
interleaved, partial, YaRN), the SwiGLU MLP and the short causal convolution, and the pieces
that keep a decode step to few kernels: projections fused into one matmul (:class:`FusedLinears`),
output projections that add into the residual stream (:class:`Residual`), elementwise ops that
round once as they store (:func:`cast_out`).

Numerics follow the published model code (Hugging Face ``transformers`` 5.23.0 is the
reference): norms compute in float32 and cast back; RoPE angles are float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_tensor

# ----------------------------------------------------------------------------- rounding on store


def cast_out(op, *args: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``op(*args).to(dtype)`` in one kernel: the elementwise torch ``op`` (one taking ``out=``)
    computes in its usual (float32) dtype and rounds once as it stores into a new ``dtype`` tensor.
    Autograd does not take ``out=``: with gradients on it is the op and then the cast (same values)."""
    if torch.is_grad_enabled():
        return op(*args).to(dtype)
    shape = torch.broadcast_shapes(*(a.shape for a in args))
    return op(*args, out=torch.empty(shape, dtype=dtype, device=args[0].device))


# ----------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """RMSNorm over the last dim: ``x / rms(x) * w`` (Llama, DeepSeek, MiniMax, Kimi), or
    ``x / rms(x) * (1 + w)`` with ``zero_centered=True`` (Qwen3-Next; ``w`` starts at 0 so
    weight decay pulls the scale to 1). Computed in float32, returned in ``x.dtype``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim], same dtype."""
        # F.rms_norm: the same float32 math in fewer ops (one fused kernel where torch has one); it
        # upcasts 16-bit inputs and weights itself (bitwise the same as casting first), so only the
        # zero-centered 1 + w, which must not be rounded to 16 bits, is formed in float32 here
        if not self.zero_centered and self.weight.dtype == x.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        if self.zero_centered:
            # h * (1 + w) as h + h * w: one addcmul instead of casting w and adding 1 (the same
            # float32 product up to one rounding)
            h = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
            return cast_out(torch.addcmul, h, h, self.weight, dtype=x.dtype)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, zero_centered={self.zero_centered}"


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x) * w * act(gate)``: the output norm of gated DeltaNet (``act="silu"``,
    Qwen3-Next) and Kimi delta attention (``act="sigmoid"``). Float32 inside."""

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "silu") -> None:
        super().__init__()
        if activation not in ("silu", "sigmoid"):
            raise ValueError(f"activation: expected 'silu' or 'sigmoid', got {activation!r}")
        self.eps = eps
        self.activation = activation
        self.weight = nn.Parameter(torch.ones(dim))

    def _apply(self, fn, recurse: bool = True):
        # the weight stays float32 when the model is cast to 16 bits (a 16-bit checkpoint's values
        # convert exactly): the norm computes in float32 anyway, and then needs no cast per step
        before = self.weight.data
        super()._apply(fn, recurse)
        if before.dtype == torch.float32 and self.weight.dtype in (torch.float16, torch.bfloat16):
            self.weight.data = before.to(device=self.weight.device)
        return self

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x, gate [..., dim] -> [..., dim] in ``x.dtype``."""
        w = self.weight.float()
        h = F.rms_norm(x.float(), w.shape, w, self.eps)  # (..., dim) float32
        g = gate.float()
        g = F.silu(g) if self.activation == "silu" else torch.sigmoid(g)
        return cast_out(torch.mul, h, g, dtype=x.dtype)  # rounded once, on store

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, activation={self.activation}"


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/dim)``, i < dim/2 -> float32 [dim // 2] (RoFormer)."""
    if dim % 2:
        raise ValueError(f"dim: RoPE needs an even number of rotated dims, got {dim}")
    # built on the CPU even under a `with torch.device("meta")` context, so that a model
    # materialised later (to_empty) still has real frequencies
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 when scale <= 1),
    as in DeepSeek-V2/V3 (their softmax scale is multiplied by this squared)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, theta: float, rope_scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN frequencies (Peng et al. 2023, arXiv:2309.00071) -> (inv_freq float32 [dim // 2],
    attention_factor). ``rope_scaling`` keys: factor, original_max_position_embeddings, and
    optional beta_fast (32), beta_slow (1), mscale, mscale_all_dim, attention_factor, truncate (True).

    Low-frequency dims (fewer than beta_slow rotations over the original context) are
    interpolated by ``factor``, high-frequency ones (more than beta_fast) kept, with a linear
    ramp between. ``attention_factor`` scales cos/sin:
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are given, else
    ``mscale(factor)``.
    """
    factor = float(rope_scaling["factor"])
    orig = rope_scaling.get("original_max_position_embeddings")
    if orig is None:
        raise ValueError("rope_scaling: YaRN needs 'original_max_position_embeddings'")
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1
    mscale = rope_scaling.get("mscale")
    mscale_all_dim = rope_scaling.get("mscale_all_dim")
    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)

    def correction_dim(n_rot: float) -> float:
        # the dim index whose wavelength fits n_rot full rotations in the original context
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 = keep the original frequency
    base = rope_inv_freq(dim, theta)
    inv_freq = base / factor * (1 - extrapolate) + base * extrapolate
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; ``rope_scaling={"type": "yarn", ...}`` selects YaRN.

    ``forward(positions)`` with positions int64 [B, T] (or [T]) returns ``(cos, sin)``,
    float32 [B, T, dim // 2] (or [T, dim // 2]), already multiplied by the attention factor.

    ``head_dim`` (>= dim, rotate-half layout, no scaling) enables :meth:`rotate`, which applies the
    rotation to whole heads in fewer ops than ``apply_rope(x, *self(positions))``.
    """

    def __init__(
        self, dim: int, theta: float = 10000.0, rope_scaling: dict | None = None, head_dim: int | None = None
    ) -> None:
        super().__init__()
        self.dim = dim
        kind = None if rope_scaling is None else rope_scaling.get("type", rope_scaling.get("rope_type"))
        if kind in (None, "default"):
            inv_freq, self.attention_factor = rope_inv_freq(dim, theta), 1.0
        elif kind == "yarn":
            inv_freq, self.attention_factor = yarn_inv_freq(dim, theta, rope_scaling)
        else:
            raise ValueError(f"rope_scaling: type {kind!r} is not supported (use None or 'yarn')")
        # the frequencies are computed on the CPU (exact, and meta-safe: the master copy below keeps
        # the values), then placed on the default device, so a model built under
        # ``with torch.device("cuda")`` holds them on the GPU (a CPU buffer would need a host copy
        # in every forward, which CUDA-graph capture refuses)
        default_device = torch.empty(0).device
        self.register_buffer("inv_freq", inv_freq.to(default_device), persistent=False)
        self._inv_freq_fp32 = inv_freq  # master copy: casting the model must not round the angles
        self.head_dim = head_dim
        if head_dim is not None:
            if head_dim < dim or self.attention_factor != 1.0:
                raise ValueError(f"head_dim: expected >= dim={dim} and no rope_scaling, got {head_dim}")
            # for rotate(): each dim's signed frequency over the whole head, [-f | +f | 0 (passed
            # through)], and its rotate-half partner (itself when passed through), so that
            # rot(x) = x * cos(p·freq) + x[partner] * sin(p·freq): sin(-a) = -sin(a) gives the minus
            # of the first half, and cos 1 / sin 0 leave the unrotated dims exactly as they were
            half, pass_through = dim // 2, head_dim - dim
            cpu = {"device": "cpu"}  # as inv_freq: exact under a meta device context too
            freq = torch.cat((-inv_freq, inv_freq, torch.zeros(pass_through, **cpu)))  # (head_dim,)
            partner = torch.cat((torch.arange(half, dim, **cpu), torch.arange(half, **cpu),
                                 torch.arange(dim, head_dim, **cpu)))  # (head_dim,)
            self.register_buffer("rot_freq", freq.to(default_device), persistent=False)
            self.register_buffer("rot_partner", partner.to(default_device), persistent=False)
            self._rot_freq_fp32 = freq

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round inv_freq to 8 bits of mantissa, shifting the angle of
        # position p by ~p/256 radians; keep the float32 frequencies, follow only the device.
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq_fp32.to(device=self.inv_freq.device)
        if self.head_dim is not None:
            self.rot_freq = self._rot_freq_fp32.to(device=self.rot_freq.device)
        return self

    def rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`rotate` multiplies by at int64 positions [B, T] (or [T]): (cos, sin), float32
        [B, T, 1, head_dim] (or [T, 1, head_dim]), sin signed for rotate-half, 1 / 0 on unrotated dims.
        Layers with the same rotary settings can share one per step (three ops)."""
        if self.head_dim is None:
            raise ValueError("rotation: this RotaryEmbedding was built without head_dim")
        check_tensor("positions", positions, dtypes=(torch.int64, torch.int32))
        angles = (positions[..., None] * self.rot_freq).unsqueeze(-2)  # (B, T, 1, head_dim) float32
        return angles.cos(), angles.sin()

    def rotate(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``apply_rope(x, *self(positions))`` (rotate-half, partial) in seven ops, or four given
        ``rotation = self.rotation(positions)``: x [B, T, H, head_dim] of any float dtype. Float32
        inside, returned in ``dtype`` (None = ``x.dtype``)."""
        if self.head_dim is None:
            raise ValueError("rotate: this RotaryEmbedding was built without head_dim")
        check_tensor("x", x, 4, "[B, T, H, head_dim]", shape=(None, None, None, self.head_dim))
        if (positions is None) == (rotation is None):
            raise ValueError("rotate: pass exactly one of positions and rotation")
        cos, sin = self.rotation(positions) if rotation is None else rotation
        partner = x.index_select(-1, self.rot_partner)  # (B, T, H, head_dim)
        return cast_out(torch.addcmul, x * cos, partner, sin, dtype=x.dtype if dtype is None else dtype)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor("positions", positions, dtypes=(torch.int64, torch.int32))
        inv_freq = self.inv_freq
        if inv_freq.device != positions.device:  # a module built under a device context keeps CPU freqs
            inv_freq = inv_freq.to(positions.device)
        angles = positions.float()[..., None] * inv_freq.float()  # (..., T, dim/2)
        if self.attention_factor == 1.0:  # skip two multiplies per layer per decode step
            return angles.cos(), angles.sin()
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of each head of ``x``; the rest pass through
    (partial RoPE).

    x [B, T, H, D]; cos, sin [B, T, R/2] or [T, R/2] float32 with R <= D.
    ``interleaved=False``: rotate-half pairs (i, i + R/2) (Llama, Qwen, MiniMax, DeepSeek's indexer).
    ``interleaved=True``: adjacent pairs (2i, 2i+1) (DeepSeek MLA, RoFormer). The result stays
    in interleaved order; Hugging Face de-interleaves both q and k first, which gives the same
    q·k. Computed in float32, returned in ``x.dtype``.
    """
    check_tensor("x", x, 4, "[B, T, H, D]")
    half = cos.shape[-1]
    r = 2 * half
    if r > x.shape[-1]:
        raise ValueError(f"cos: rotates {r} dims but x has head dim {x.shape[-1]}")
    if r == 0:
        return x
    c = cos.float().unsqueeze(-2)  # (B, T, 1, R/2)
    s = sin.float().unsqueeze(-2)
    xr = x[..., :r].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]  # (B, T, H, R/2)
        rot = torch.stack((torch.addcmul(x1 * c, x2, s, value=-1), torch.addcmul(x2 * c, x1, s)), dim=-1)
        rot = rot.flatten(-2)  # (B, T, H, R)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rot = torch.cat((torch.addcmul(x1 * c, x2, s, value=-1), torch.addcmul(x2 * c, x1, s)), dim=-1)
        # rot: (B, T, H, R)
    if r == x.shape[-1]:  # full RoPE: nothing passes through
        return rot.to(x.dtype)
    return torch.cat((rot.to(x.dtype), x[..., r:]), dim=-1)


# ----------------------------------------------------------------------------- fused projections


class FusedLinears:
    """Bias-free ``nn.Linear`` s reading the same input whose weights are row blocks of ONE tensor,
    so that inference runs one matmul (one GEMV per decode step) instead of one per Linear.

    The Linears stay what they were (their own Parameters, state_dict keys, Hugging Face copies);
    only their storage is shared: each weight is a view of ``fused``, so an in-place update of a
    weight (optimizer step, ``load_state_dict``, ``copy_``) is an update of ``fused`` and nothing
    can go stale, CUDA-graph replays included. :meth:`weight` returns ``fused`` when that still
    holds and no gradient is needed (autograd must reach the Parameters themselves), else None
    (the caller runs the Linears one by one): after a Parameter was replaced (FSDP2 sharding,
    ``load_state_dict(assign=True)``) or its storage swapped. ``module.to()`` / ``.half()`` give
    every Parameter new storage; the owning module calls :meth:`refuse` from its ``_apply``.
    Not an ``nn.Module``: it holds no Parameters of its own.
    """

    def __init__(self, *linears: nn.Linear) -> None:
        self.linears = linears
        self.params = tuple(lin.weight for lin in linears)
        self.fused: torch.Tensor | None = None
        self.refuse()

    def refuse(self) -> None:
        """(Re)build ``fused`` from the current weights and point them into it; skipped (the
        Linears then run one by one) unless all are plain Parameters of one dtype and device."""
        ws = tuple(lin.weight for lin in self.linears)
        plain = all(type(w) is nn.Parameter and type(w.data) is torch.Tensor for w in ws)
        if not plain or len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
            self.fused = None
            return
        with torch.no_grad():
            fused = torch.cat([w.detach() for w in ws])  # (sum of out_features, in_features)
        start = 0
        for w in ws:
            w.data = fused[start : start + w.shape[0]]
            start += w.shape[0]
        self.params, self.fused = ws, fused

    def weight(self) -> torch.Tensor | None:
        """The fused weight [sum(out), in] if it is still exactly the Linears' weights and no
        gradient is wanted; else None."""
        fused = self.fused
        if fused is None or torch.is_grad_enabled():
            return None
        ws = tuple(lin.weight for lin in self.linears)
        if any(w is not p for w, p in zip(ws, self.params, strict=True)):
            return None  # a Parameter was replaced
        if not torch.compiler.is_compiling():  # (dynamo cannot read pointers; identity suffices there)
            row_bytes = fused.stride(0) * fused.element_size()
            ptr, start = fused.data_ptr(), 0
            for w in ws:
                if w.data_ptr() != ptr + start * row_bytes or w.dtype != fused.dtype:
                    return None  # its storage was swapped (w.data = ...)
                start += w.shape[0]
        return fused

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., in] -> one output per Linear, [..., out_i] (views of one matmul's result when fused)."""
        fused = self.weight()
        if fused is None:
            return tuple(lin(x) for lin in self.linears)
        return F.linear(x, fused).split([lin.out_features for lin in self.linears], dim=-1)


# ----------------------------------------------------------------------------- residual


@dataclass(frozen=True)
class Residual:
    """The residual stream an output projection adds into: ``tensor * keep + linear(x) * scale``
    (``keep``, ``scale``: MiniMax's DeepNorm alpha and beta; 1 elsewhere).

    :meth:`project` accumulates into ``tensor`` IN PLACE with the projection's own matmul
    (``addmm_``: one kernel and one rounding instead of a matmul and an add) when no gradient is
    wanted, so pass a tensor you own; otherwise it returns a new tensor."""

    tensor: torch.Tensor
    keep: float = 1.0
    scale: float = 1.0

    def project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [..., in], weight [out, in] -> tensor * keep + (x @ weight.T) * scale, [..., out]."""
        r = self.tensor
        in_place = (
            not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
            and r.dtype == x.dtype == weight.dtype and r.is_contiguous()
        )
        if not in_place:
            return torch.add(r * self.keep if self.keep != 1.0 else r, F.linear(x, weight), alpha=self.scale)
        flat = r.view(-1, r.shape[-1])  # (N, out)
        flat.addmm_(x.reshape(-1, x.shape[-1]), weight.t(), beta=self.keep, alpha=self.scale)
        return r


def project_out(linear: nn.Linear, x: torch.Tensor, residual: Residual | None = None) -> torch.Tensor:
    """``linear(x)`` (bias-free), or added into ``residual`` (see :class:`Residual`)."""
    return linear(x) if residual is None else residual.project(x, linear.weight)


# ----------------------------------------------------------------------------- MLP


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases (Shazeer 2020; Llama and all five families).
    ``gate_proj`` and ``up_proj`` share one weight tensor (:class:`FusedLinears`): one matmul."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        self.gate_up = FusedLinears(self.gate_proj, self.up_proj)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.gate_up.refuse()  # .to() / .half() gave each weight new storage
        return self

    def forward(self, x: torch.Tensor, residual: Residual | None = None) -> torch.Tensor:
        """x [..., d_model] -> [..., d_model]: ``mlp(x)``, or added into ``residual`` by the down
        projection (in place when no gradient is wanted; see :class:`Residual`)."""
        gate, up = self.gate_up(x)  # (..., d_ff) each
        return project_out(self.down_proj, F.silu(gate) * up, residual)


# ----------------------------------------------------------------------------- short conv


class ShortConv(nn.Module):
    """Depthwise causal conv1d over time (kernel 4 by default) followed by SiLU, as in
    Mamba, gated DeltaNet and Kimi delta attention. Weight [C, 1, K] like ``nn.Conv1d``
    with ``groups=C`` (the Hugging Face layout), no bias by default.

    Decode keeps the last ``K - 1`` inputs per channel in ``conv_state`` [B, C, K - 1].
    """

    def __init__(
        self, channels: int, kernel_size: int = 4, bias: bool = False, activation: bool = True
    ) -> None:
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C] -> y [B, T, C].

        conv_state None: the sequence starts at position 0 (zero history).
        conv_state [B, C, K - 1] (any float dtype): the inputs before ``x``; it is read, then
        overwritten IN PLACE with the last ``K - 1`` inputs (so decode with T == 1 and
        chunked prefill both continue correctly).
        """
        check_tensor("x", x, 3, "[B, T, C]", shape=(None, None, self.channels))
        B, T, C = x.shape
        K = self.kernel_size
        xt = x.transpose(1, 2).to(self.weight.dtype)  # (B, C, T)
        if conv_state is None:
            history = xt.new_zeros(B, C, K - 1)
        else:
            check_tensor("conv_state", conv_state, 3, "[B, C, K - 1]", shape=(B, C, K - 1))
            history = conv_state.to(xt.dtype)
        full = torch.cat((history, xt), dim=-1)  # (B, C, K - 1 + T)
        if conv_state is not None:
            conv_state.copy_(full[:, :, -(K - 1):])
        if T == 1:  # decode: one dot product per channel, one batched matmul over the channels
            y = torch.bmm(full.transpose(0, 1), self.weight.transpose(1, 2)).transpose(0, 1)  # (B, C, 1)
            if self.bias is not None:
                y = y + self.bias[:, None]
        else:
            y = F.conv1d(full, self.weight, self.bias, groups=C)  # (B, C, T)
        if self.activation:
            y = F.silu(y)
        return y.transpose(1, 2).to(x.dtype)  # (B, T, C)

    def new_state(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A zero conv state [batch, C, K - 1]."""
        return torch.zeros(batch, self.channels, self.kernel_size - 1, device=device, dtype=dtype)
