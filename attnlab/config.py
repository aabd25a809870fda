"""ModelConfig: one flat dataclass describing a hybrid model.

A model is a stack of blocks; each block's token mixer is named by one letter of
``pattern`` (see ``shared/DESIGN.md``): ``S`` softmax/GQA, ``W`` sliding window, ``M`` MLA,
``D`` DeepSeek sparse attention, ``L`` lightning, ``G`` gated DeltaNet, ``K`` Kimi delta
attention. ``pattern`` is tiled over ``n_layers`` (``"GGGS"`` with 8 layers is
``"GGGSGGGS"``) or written out in full for irregular layouts.

Fields are grouped by the mechanism that reads them. Other mechanisms may ADD fields in a
marked section; nobody renames one (checkpoints store them by name).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ._io import atomic_write_text

LAYER_LETTERS = "SWMDLGK"
# a save's id, written by HybridLM.save_pretrained into config.json and the weights' metadata
SAVE_ID_KEY = "_save_id"
LAYER_NAMES = {
    "S": "softmax attention",
    "W": "sliding-window attention",
    "M": "multi-head latent attention",
    "D": "DeepSeek sparse attention",
    "L": "lightning attention",
    "G": "gated DeltaNet",
    "K": "Kimi delta attention",
}


@dataclass
class ModelConfig:
    """Everything needed to build a :class:`attnlab.model.HybridLM`.

    Build directly (``ModelConfig(pattern="KKKM", d_model=256, n_layers=8)``) or from a
    preset (``ModelConfig.preset("kimi-linear", d_model=256)``), then call :meth:`validate`
    (HybridLM does) for precise errors.
    """

    # --- model ---
    pattern: str = "S"
    d_model: int = 256
    n_layers: int = 4
    vocab_size: int = 512
    d_ff: int | None = None  # SwiGLU hidden size; None = multiple of 32 near 8/3 * d_model
    norm_eps: float = 1e-6
    norm_zero_centered: bool = False  # Qwen3-Next RMSNorm: x_hat * (1 + w), w initialised to 0
    tie_embeddings: bool = False
    # residual scales (MiniMax): h = alpha * residual + beta * f(norm(h)) for 'attn' (softmax-family
    # layers S W M D), 'linear' (L G K) and the MLP. 1.0/1.0 with postnorm=False = pre-norm residual.
    attn_alpha: float = 1.0
    attn_beta: float = 1.0
    linear_alpha: float = 1.0
    linear_beta: float = 1.0
    mlp_alpha: float = 1.0
    mlp_beta: float = 1.0
    # MiniMax-01 ("postnorm" in its config; what Hugging Face's MiniMax always does): the residual
    # branch carries the *normalized* stream, h = alpha * norm(h) + beta * f(norm(h)).
    # False = the usual pre-norm residual h = alpha * h + beta * f(norm(h)).
    postnorm: bool = False

    # --- S / W: softmax attention ---
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (MHA)
    head_dim: int | None = None  # None = d_model // n_heads
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # partial RoPE: the first rope_fraction * head_dim dims rotate
    attn_output_gate: bool = False  # Qwen3-Next: o * sigmoid(gate(x)), gate per head and channel
    qk_norm: bool = False  # RMSNorm over head_dim on q and k, before RoPE
    window: int = 256  # W: a query sees the last `window` keys (itself included)
    sink_tokens: int = 0  # W: plus the first `sink_tokens` keys always

    # --- M / D: DeepSeek / Kimi multi-head latent attention ---
    q_lora_rank: int | None = None  # None = plain q projection
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    mla_use_rope: bool = True  # False = Kimi Linear's NoPE MLA
    rope_interleave: bool = True
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "mscale", "mscale_all_dim",
    #                                          "original_max_position_embeddings", ...}
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 2048

    # --- L: MiniMax lightning attention (uses n_heads, head_dim) ---
    block_size: int = 256

    # --- G / K: gated DeltaNet, Kimi delta attention ---
    linear_n_heads: int | None = None  # value heads; None = n_heads
    linear_n_key_heads: int | None = None  # None = linear_n_heads
    linear_key_head_dim: int = 64
    linear_value_head_dim: int = 64
    conv_kernel: int = 4

    # --- fields added by other mechanisms go below this line (never rename one above) ---
    # D (owner: mla): weight of DeepSeek-V3.2's indexer KL loss in training; 0 = indexer untrained
    index_loss_weight: float = 1.0

    # ------------------------------------------------------------------ derived
    @property
    def layer_pattern(self) -> str:
        """The full per-layer pattern, ``n_layers`` letters long."""
        p = self.pattern
        if len(p) == self.n_layers:
            return p
        if p and self.n_layers % len(p) == 0:
            return p * (self.n_layers // len(p))
        raise ValueError(
            f"pattern: {p!r} has {len(p)} letters, which neither equals n_layers={self.n_layers} "
            f"nor divides it; give a pattern that tiles n_layers or one letter per layer"
        )

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def attn_head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Rotated dims per S/W head (partial RoPE), even."""
        return int(self.attn_head_dim * self.rope_fraction) // 2 * 2

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return max(32, (8 * self.d_model // 3 + 31) // 32 * 32)

    @property
    def linear_heads(self) -> int:
        return self.n_heads if self.linear_n_heads is None else self.linear_n_heads

    @property
    def linear_key_heads(self) -> int:
        return self.linear_heads if self.linear_n_key_heads is None else self.linear_n_key_heads

    # ------------------------------------------------------------------ validation
    def validate(self) -> ModelConfig:
        """Raise ValueError naming the field and what to change; return self."""
        for name in ("d_model", "n_layers", "vocab_size", "n_heads", "window", "block_size",
                     "kv_lora_rank", "v_head_dim", "index_n_heads", "index_head_dim", "index_topk",
                     "linear_key_head_dim", "linear_value_head_dim", "conv_kernel"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("n_kv_heads", "head_dim", "d_ff", "q_lora_rank", "linear_n_heads", "linear_n_key_heads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{name}: expected None or a positive int, got {v!r}")
        for name in ("qk_nope_head_dim", "qk_rope_head_dim", "sink_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(
                f"pattern: expected a non-empty string of letters {LAYER_LETTERS!r}, got {self.pattern!r}"
            )
        bad = sorted({c for c in self.pattern if c not in LAYER_LETTERS})
        if bad:
            valid = ", ".join(f"{c} ({n})" for c, n in LAYER_NAMES.items())
            raise ValueError(
                f"pattern: unknown letter(s) {''.join(bad)!r} in {self.pattern!r}; valid letters: {valid}"
            )
        letters = set(self.layer_pattern)  # raises on a pattern that does not fit n_layers
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps: expected > 0, got {self.norm_eps}")
        if not 0.0 <= self.rope_fraction <= 1.0:
            raise ValueError(f"rope_fraction: expected a value in [0, 1], got {self.rope_fraction}")
        if letters & set("SWL"):
            if self.head_dim is None and self.d_model % self.n_heads != 0:
                raise ValueError(
                    f"n_heads: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    f"change one of them or set head_dim explicitly"
                )
        if letters & set("SW"):
            if self.n_heads % self.kv_heads != 0:
                raise ValueError(
                    f"n_kv_heads: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads} "
                    f"(GQA needs n_heads % n_kv_heads == 0)"
                )
            if self.attn_head_dim % 2 and self.rope_dim:
                raise ValueError(f"head_dim: RoPE needs an even head_dim, got {self.attn_head_dim}")
            rotated = int(self.attn_head_dim * self.rope_fraction)
            if rotated % 2:
                raise ValueError(
                    f"rope_fraction: head_dim {self.attn_head_dim} * rope_fraction {self.rope_fraction} = "
                    f"{rotated} rotated dims, which must be even (RoPE rotates pairs)"
                )
        if letters & set("MD"):
            if self.mla_use_rope and self.qk_rope_head_dim % 2:
                raise ValueError(f"qk_rope_head_dim: RoPE needs an even size, got {self.qk_rope_head_dim}")
            if self.qk_nope_head_dim + self.qk_rope_head_dim <= 0:
                raise ValueError("qk_nope_head_dim + qk_rope_head_dim: expected > 0")
        if letters & set("GK"):
            if self.linear_heads % self.linear_key_heads != 0:
                raise ValueError(
                    f"linear_n_heads: {self.linear_heads} value heads is not a multiple of "
                    f"linear_n_key_heads={self.linear_key_heads}"
                )
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                got = type(self.rope_scaling).__name__
                raise ValueError(f"rope_scaling: expected None or a dict, got {got}")
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "default", None):
                raise ValueError(f"rope_scaling: only 'yarn' is supported, got type {kind!r}")
        return self

    # ------------------------------------------------------------------ presets / JSON
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see :func:`attnlab.presets.preset_names`) with any field overridden."""
        from .presets import build_preset

        return build_preset(name, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | None = None) -> str:
        """The config as JSON text; also written to ``path`` if given (atomically: a failed write
        leaves the file that was there)."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Fields by name; ``_save_id`` (written by ``HybridLM.save_pretrained``) is ignored."""
        d = {k: v for k, v in d.items() if k != SAVE_ID_KEY}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"config: unknown field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}"
            )
        return cls(**d)

    @classmethod
    def from_json(cls, text_or_path: str) -> ModelConfig:
        """Parse JSON text, or read it from a file path."""
        s = text_or_path.lstrip()
        if not s.startswith("{"):
            with open(text_or_path) as f:
                s = f.read()
        return cls.from_dict(json.loads(s))
