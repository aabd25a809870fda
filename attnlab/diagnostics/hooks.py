"""Looking inside a HybridLM from outside: capture a mixer's input, or zero its output.

Both are context managers over forward hooks on ``model.blocks[i].mixer``; the model code is
never edited, and the hooks are removed on exit even if the body raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def _mixers(model: nn.Module, layers: Iterable[int]) -> list[tuple[int, nn.Module]]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("model: expected a HybridLM (with .blocks[i].mixer)")
    out = []
    for i in layers:
        if not 0 <= int(i) < len(blocks):
            raise ValueError(f"layers: index {i} out of range for a model of {len(blocks)} layers")
        out.append((int(i), blocks[int(i)].mixer))
    return out


@contextlib.contextmanager
def capture_mixer_inputs(model: nn.Module, layers: Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Inside the block, every forward stores each listed layer's mixer input
    ``x [B, T, d_model]`` (the normed hidden state, detached) in the yielded dict by layer index."""
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(i: int):
        def hook(module, args):
            captured[i] = args[0].detach()

        return hook

    try:
        for i, mixer in _mixers(model, layers):
            handles.append(mixer.register_forward_pre_hook(hook_for(i)))
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def ablate_mixers(model: nn.Module, layers: Iterable[int]) -> Iterator[None]:
    """Inside the block, the listed layers' mixers output zeros (their residual branch is
    cut; the block's MLP still runs), as if the mixer had never written to the stream."""
    handles = []
    try:
        for _, mixer in _mixers(model, layers):
            handles.append(mixer.register_forward_hook(lambda module, args, out: torch.zeros_like(out)))
        yield
    finally:
        for h in handles:
            h.remove()
