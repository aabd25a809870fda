"""Token-mixer layers, one per pattern letter, and the letter -> builder registry.

Every builder has the signature ``build_x(cfg: ModelConfig, layer_idx: int) -> nn.Module``.
Builders are imported lazily, so one mechanism's module failing to import (or not being
written yet) names that module instead of breaking every model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from ..config import ModelConfig

# letter -> (module inside attnlab.layers, builder function)
LAYER_BUILDERS: dict[str, tuple[str, str]] = {
    "S": ("attention", "build_softmax"),
    "W": ("attention", "build_sliding"),
    "M": ("mla", "build_mla"),
    "D": ("mla", "build_dsa"),
    "L": ("lightning", "build_lightning"),
    "G": ("deltanet", "build_gated_deltanet"),
    "K": ("deltanet", "build_kda"),
}


def get_builder(letter: str):
    """The builder function for a pattern letter; ValueError/ImportError say which is missing."""
    if letter not in LAYER_BUILDERS:
        raise ValueError(f"pattern letter: unknown {letter!r}; valid letters are {''.join(LAYER_BUILDERS)}")
    module_name, fn_name = LAYER_BUILDERS[letter]
    full = f"{__name__}.{module_name}"
    try:
        module = importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name == full:
            msg = f"layer {letter!r} needs {full}.{fn_name}, but module {full} does not exist yet"
            raise ImportError(msg) from e
        raise
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ImportError(f"layer {letter!r} needs {full}.{fn_name}, which that module does not define")
    return fn


def build_layer(letter: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """Build the token mixer of layer ``layer_idx`` for pattern letter ``letter``."""
    return get_builder(letter)(cfg, layer_idx)
