"""HybridLM: token embedding, one block per pattern letter, final norm, LM head.

Each block is ``mixer`` (the letter's token mixer) and a SwiGLU ``mlp``, each behind an
RMSNorm with a residual:

    x = norm(h);  h = alpha * (x if postnorm else h) + beta * f(x)

alpha/beta are 1 except in MiniMax-01 (per mixer kind and for the MLP); ``postnorm`` is
MiniMax's residual-from-normalized stream. Caches are one :class:`attnlab.cache.LayerCache`
per layer; each layer declares its bytes with a :class:`attnlab.cache.CacheSpec`.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

import torch
from torch import nn

from ._checks import check_tensor, in_graph
from .cache import CacheSpec, LayerCache
from .config import SAVE_ID_KEY, ModelConfig
from .layers import build_layer, fused
from .layers.attention import SoftmaxAttention
from .layers.common import Residual, RMSNorm, SwiGLU
from .layers.deltanet import DeltaRuleMixer
from .layers.lightning import LightningAttention
from .layers.mla import MultiHeadLatentAttention

LINEAR_LETTERS = "LGK"  # recurrent mixers; the rest (S W M D) are softmax-family ("attn")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class Block(nn.Module):
    """mixer + MLP with their norms and (MiniMax-scaled) residuals."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, letter: str) -> None:
        super().__init__()
        self.letter = letter
        self.postnorm = cfg.postnorm
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_zero_centered)
        self.mixer = build_layer(letter, cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_zero_centered)
        self.mlp = SwiGLU(cfg.d_model, cfg.ff_dim)
        if letter in LINEAR_LETTERS:
            self.mixer_alpha, self.mixer_beta = cfg.linear_alpha, cfg.linear_beta
        else:
            self.mixer_alpha, self.mixer_beta = cfg.attn_alpha, cfg.attn_beta
        self.mlp_alpha, self.mlp_beta = cfg.mlp_alpha, cfg.mlp_beta
        # S / W layers take the decode step's RoPE factors from the model (one set per step), and so
        # do M / D layers (one set of their per-column tables per mixer class)
        self.rotation_key = _rotation_key(self.mixer)
        self.takes_rotation = self.rotation_key is not None
        # mixers whose output projection can add into the residual stream (all of them: MLA / DSA too)
        self.adds_residual = isinstance(
            self.mixer, (SoftmaxAttention, DeltaRuleMixer, LightningAttention, MultiHeadLatentAttention)
        )

    def _residual(self, h: torch.Tensor, x: torch.Tensor, f: torch.Tensor, alpha: float, beta: float):
        """alpha * (x if postnorm else h) + beta * f, in one op unless both scales differ from 1."""
        r = x if self.postnorm else h
        if alpha == 1.0:
            return torch.add(r, f, alpha=beta)
        if beta == 1.0:
            return torch.add(f, r, alpha=alpha)
        return torch.add(r * alpha, f, alpha=beta)

    def forward(
        self, h: torch.Tensor, cache: LayerCache | None = None, rotation=None, overwrite: bool = False
    ) -> torch.Tensor:
        """h [B, T, d_model] -> [B, T, d_model]. ``rotation``: a decode step's shared RoPE factors
        by ``rotation_key`` (see :meth:`HybridLM._decode_rotation`), passed to S / W / M / D mixers
        (this block's entry). ``overwrite``: h is the caller's to
        discard, so the mixer's output projection may add into it in place (HybridLM's hidden states);
        the MLP always may (it adds into a tensor this block made)."""
        take = rotation is not None and self.takes_rotation and self.rotation_key in rotation
        kwargs = {"rotation": rotation[self.rotation_key]} if take else {}
        if cache is not None and overwrite and fused.usable(h) and fused.block_step(self, h, cache, **kwargs):
            return h  # the fused decode step added both branches into h (attnlab.layers.fused)
        watched = self.watched()  # a hook may keep a tensor that an in-place add would change
        x = self.mixer_norm(h)
        r = x if self.postnorm else h
        if self.adds_residual and (self.postnorm or overwrite) and not watched:
            h = self.mixer(x, cache, residual=Residual(r, self.mixer_alpha, self.mixer_beta), **kwargs)
        else:
            h = self._residual(h, x, self.mixer(x, cache, **kwargs), self.mixer_alpha, self.mixer_beta)
        x = self.mlp_norm(h)
        if watched:
            return self._residual(h, x, self.mlp(x), self.mlp_alpha, self.mlp_beta)
        return self.mlp(x, Residual(x if self.postnorm else h, self.mlp_alpha, self.mlp_beta))

    def watched(self) -> bool:
        """Whether forward hooks watch this block or its parts (attnlab.diagnostics replaces a
        mixer's output or keeps its input): then every branch returns its own output and no tensor
        a hook may hold is added into in place."""
        return any(_hooked(m) for m in (self, self.mixer_norm, self.mixer, self.mlp_norm, self.mlp))


def _rotation_key(mixer: nn.Module) -> str | None:
    """Which decode-step RoPE factors a mixer takes (the layers of one key share one set), or None."""
    if isinstance(mixer, SoftmaxAttention) and mixer.rotary is not None:
        return "attention"  # RotaryEmbedding.rotation
    if isinstance(mixer, MultiHeadLatentAttention) and mixer.rotary is not None:
        return type(mixer).__name__  # MultiHeadLatentAttention.rotation (D's tables include the indexer)
    return None


def _hooked(module: nn.Module) -> bool:
    """Whether forward hooks (pre or post, on ``module`` or global) may see its input or output."""
    hooks = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or hooks._global_forward_hooks
                or hooks._global_forward_pre_hooks)


class HybridLM(nn.Module):
    """A language model whose layers' token mixers follow ``cfg.pattern``.

    ``forward(tokens [B, T] int64, caches=None) -> logits [B, T, vocab] float32``. With
    ``caches`` (from :meth:`new_caches`) the tokens are appended to the cached sequences.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, c) for i, c in enumerate(cfg.layer_pattern))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_zero_centered)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, caches: list[LayerCache] | None = None) -> torch.Tensor:
        """tokens int64 [B, T] -> logits float32 [B, T, vocab_size]."""
        check_tensor("tokens", tokens, 2, "[B, T]", dtypes=(torch.int64, torch.int32))
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(
                f"caches: expected one cache per layer ({len(self.blocks)}), got {len(caches)}; "
                f"use model.new_caches(batch, max_len)"
            )
        if tokens.numel() and not in_graph():  # a host check: not inside a graph
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"tokens: id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")
        h = self.embed(tokens)  # (B, T, d_model)
        rotation = self._decode_rotation(tokens, caches, fused_step=caches is not None and fused.usable(h))
        previous = self.embed
        for i, block in enumerate(self.blocks):
            # h is ours to overwrite unless a hook on its producer or on the block may have kept it
            ours = not (_hooked(previous) or block.watched())
            h = block(h, None if caches is None else caches[i], rotation, overwrite=ours)
            previous = block
        if caches is not None and fused.usable(h) and not _hooked(self.norm) and not _hooked(self.lm_head):
            return fused.head_step(self, h)  # (B, 1, vocab_size) float32
        return self.lm_head(self.norm(h)).float()  # (B, T, vocab_size)

    def _decode_rotation(
        self, tokens: torch.Tensor, caches: list[LayerCache] | None, fused_step: bool = False
    ):
        """For a decode step (one token per row, with caches): the RoPE factors of the new tokens'
        positions, computed once for all S / W layers (all built from this config: the same rotary
        settings, and their caches hold the same lengths) instead of once per layer, and once for all
        M (or D) layers: {rotation_key: factors}. None otherwise. ``fused_step``: the step takes the
        fused kernels (attnlab.layers.fused); a key none of whose layers needs tables is skipped
        (those kernels compute the angles themselves: three launches fewer per step)."""
        if caches is None or tokens.shape[1] != 1:
            return None
        rotations = {}
        for block, cache in zip(self.blocks, caches, strict=True):
            key = block.rotation_key
            if key is None or key in rotations:
                continue
            if fused_step and all(fused.computes_rope(b) for b in self.blocks if b.rotation_key == key):
                continue
            positions = cache.lengths[:, None]  # (B, 1)
            if key == "attention":
                rotations[key] = block.mixer.rotary.rotation(positions)  # (B, 1, 1, head_dim) each
            else:
                rotations[key] = block.mixer.rotation(positions)  # (B, 1, N) each
        return rotations or None

    def generate(self, *args, **kwargs):
        """Prefill + cached decode; see :func:`attnlab.generate.generate`."""
        from .generate import generate

        return generate(self, *args, **kwargs)

    # ------------------------------------------------------------------ size and caches
    def num_params(self) -> int:
        """Parameter count (a tied LM head counted once) == sum(p.numel() for p in parameters())."""
        return sum(p.numel() for p in self.parameters())

    def new_caches(
        self,
        batch: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[LayerCache]:
        """One preallocated cache per layer for ``batch`` sequences of up to ``max_len`` tokens.
        device/dtype None = the model's (recurrent states stay float32 whatever ``dtype``)."""
        p = next(self.parameters())
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        return [b.mixer.new_cache(batch, max_len, device=device, dtype=dtype) for b in self.blocks]

    def cache_specs(self, dtype: torch.dtype = torch.bfloat16) -> list[CacheSpec]:
        """Per-layer cache declarations (per sequence) for a cache stored in ``dtype``."""
        return [b.mixer.cache_spec(dtype) for b in self.blocks]

    def cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes one sequence's cache grows by per token of context, over the layers whose
        cache is not capped (sliding-window layers stop growing at their window; see
        :meth:`cache_constant_bytes`)."""
        return sum(s.bytes_per_token for s in self.cache_specs(dtype) if s.max_tokens is None)

    def cache_constant_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes one sequence's cache holds independent of long context: recurrent and conv
        states plus full sliding windows (window + sinks tokens)."""
        total = 0
        for s in self.cache_specs(dtype):
            total += s.constant_bytes
            if s.max_tokens is not None:
                total += s.bytes_per_token * s.max_tokens
        return total

    def cache_bytes(self, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes the caches hold for ``batch`` sequences of ``context`` tokens."""
        return batch * sum(s.bytes_at(context) for s in self.cache_specs(dtype))

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``.

        Each file is written to a temporary file in the same directory and moved into place
        with ``os.replace``, so neither is ever half-written; a new directory appears only
        once complete. Refuses a non-empty directory unless ``overwrite=True``.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        if directory.exists():
            if not directory.is_dir():
                raise FileExistsError(f"directory: {directory} exists and is not a directory")
            if any(directory.iterdir()) and not overwrite:
                raise FileExistsError(f"directory: {directory} is not empty; pass overwrite=True to replace")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.cfg.tie_embeddings:
            tensors.pop("lm_head.weight")  # shared with embed.weight; safetensors stores it once
        # one id per save in both files: an overwrite interrupted between the two replaces below
        # leaves new weights beside the old config.json, which from_pretrained then refuses (a
        # config.json edited by hand keeps its id and still loads)
        save_id = uuid.uuid4().hex
        config_text = json.dumps({**json.loads(self.cfg.to_json()), SAVE_ID_KEY: save_id}, indent=2) + "\n"

        def write(dest_dir: Path) -> None:
            tmp = dest_dir / f".{WEIGHTS_NAME}.tmp"
            save_file(tensors, str(tmp), metadata={"format": "pt", SAVE_ID_KEY: save_id})
            os.replace(tmp, dest_dir / WEIGHTS_NAME)
            fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{CONFIG_NAME}.")
            with os.fdopen(fd, "w") as f:
                f.write(config_text)
            os.replace(tmp_name, dest_dir / CONFIG_NAME)  # config last: its presence means complete

        if directory.exists():
            write(directory)
        else:
            directory.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
            try:
                write(staging)
                os.replace(staging, directory)
            except BaseException:
                for p in staging.glob("*"):
                    p.unlink()
                for p in staging.glob(".*"):
                    p.unlink()
                staging.rmdir()
                raise
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> HybridLM:
        """Load a directory written by :meth:`save_pretrained` (or ``attnlab convert``),
        checking that the weights match the config exactly."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"directory: {directory} has no {p.name} (not a save_pretrained dir)")
        from safetensors import safe_open

        try:
            cfg_dict = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
        config_id = cfg_dict.get(SAVE_ID_KEY) if isinstance(cfg_dict, dict) else None
        cfg = ModelConfig.from_dict(cfg_dict)
        with safe_open(str(w_path), framework="pt") as f:
            weights_id = (f.metadata() or {}).get(SAVE_ID_KEY)
        if config_id is not None and weights_id is not None and config_id != weights_id:
            raise ValueError(
                f"{w_path}: these weights come from a different save than {cfg_path} (an interrupted "
                f"save_pretrained(overwrite=True)?); save the model again"
            )
        model = cls(cfg)
        tensors = load_file(str(w_path))
        if cfg.tie_embeddings and "lm_head.weight" not in tensors and "embed.weight" in tensors:
            tensors["lm_head.weight"] = tensors["embed.weight"]
        own = model.state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{w_path}: weights do not match config.json "
                f"(missing: {missing[:8]}, unexpected: {unexpected[:8]})"
            )
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(own[k].shape):
                want = tuple(own[k].shape)
                raise ValueError(f"{w_path}: {k} has shape {tuple(v.shape)}, config.json implies {want}")
        stored_dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
        model.to(dtype=stored_dtype)
        model.load_state_dict(tensors, strict=True)
        if dtype is not None:
            model.to(dtype=dtype)
        if device is not None:
            model.to(device=device)
        return model

    def extra_repr(self) -> str:
        return f"pattern={self.cfg.layer_pattern!r}, params={self.num_params():,}"
