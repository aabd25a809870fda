"""The fused decode step (attnlab.layers.fused) against the plain one: same logits, same caches.

On the CPU the fused kernels run under ``TRITON_INTERPRET=1``: ``test_interpreter_suite`` re-runs this
file's ``interp_`` tests in a subprocess with it set. The GPU tests (marked ``gpu``) do the same at a
~1B model's layer sizes in bf16, through a CUDA graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _triton_tests import INTERPRETED, interp, needs_triton, run_interpreter_suite
from test_generate import rms_rel, tiny_model, tokens

from attnlab import HybridLM, ModelConfig
from attnlab.generate import DecodeStep, decode_one_token, prefill
from attnlab.layers import fused

# every preset: S / W / G / K / M blocks take the fused mixers, L / D their own step behind the fused
# MLP, minimax-01 (postnorm) the plain block
PRESETS = ["llama", "swa", "qwen3-next", "kimi-linear", "deepseek-v3", "deepseek-v32", "minimax-01", "gdn",
           "kda"]


def _decode(model, x: torch.Tensor, T: int, n: int, dtype: torch.dtype, on: bool, lengths=None):
    """Prefill x[:, :T] (rows of ``lengths`` when given) plainly, then n decode steps with the fused
    path on or off -> (stacked decode logits [B, n, V], caches)."""
    caches = model.new_caches(x.shape[0], T + n, dtype=dtype)
    before = fused.ENABLED, fused.ON_CPU_INTERPRETER
    try:
        fused.ENABLED = False
        prefill(model, x[:, :T], caches, lengths=lengths)
        fused.ENABLED, fused.ON_CPU_INTERPRETER = on, on
        out = []
        for i in range(n):
            _, logits = decode_one_token(model, x[:, T + i], caches)
            out.append(logits.clone())
    finally:
        fused.ENABLED, fused.ON_CPU_INTERPRETER = before
    return torch.stack(out, 1), caches


def _cache_tensors(caches) -> list[torch.Tensor]:
    return [t for c in caches for t in vars(c).values() if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------------------------------------
# CPU


@needs_triton
def test_interpreter_suite():
    run_interpreter_suite(__file__)


def test_not_taken_on_cpu_without_the_interpreter():
    if INTERPRETED:
        pytest.skip("the interpreter makes CPU tensors usable")
    h = torch.zeros(1, 1, 8)
    with torch.no_grad():
        fused.ON_CPU_INTERPRETER = True
        try:
            assert not fused.usable(h)
        finally:
            fused.ON_CPU_INTERPRETER = False


@needs_triton
def test_taken_only_for_inference_steps(monkeypatch):
    """Where CPU tensors may take it (as under the interpreter): a no-grad one-token step does; a
    step with gradients, a multi-token call, an integer tensor, or the switch off does not."""
    monkeypatch.setattr(fused, "_INTERPRET", True)
    monkeypatch.setattr(fused, "ON_CPU_INTERPRETER", True)
    h = torch.zeros(2, 1, 8)
    assert not fused.usable(h)  # grad mode on
    with torch.no_grad():
        assert fused.usable(h)
        assert not fused.usable(torch.zeros(2, 3, 8))
        assert not fused.usable(h.long())
        monkeypatch.setattr(fused, "ENABLED", False)
        assert not fused.usable(h)


# ---------------------------------------------------------------------------------------------
# interpreter


@interp
@pytest.mark.parametrize("name", PRESETS)
def test_interp_fused_step_equals_plain_step(name):
    """Float32: prefill then decode steps, fused vs plain: logits and every cache tensor agree to
    float32 rounding; both agree with the full forward."""
    model = tiny_model(name)
    T, n = 9, 3
    x = tokens(2, T + n)
    with torch.no_grad():
        full = model(x)  # (2, T + n, V)
        plain, c_plain = _decode(model, x, T, n, torch.float32, on=False)
        ours, c_ours = _decode(model, x, T, n, torch.float32, on=True)
    assert rms_rel(plain, ours) <= 1e-5, rms_rel(plain, ours)
    assert rms_rel(full[:, T:], ours) <= 1e-4
    for a, b in zip(_cache_tensors(c_plain), _cache_tensors(c_ours), strict=True):
        if a.is_floating_point():
            assert rms_rel(a.float(), b.float()) <= 1e-5
        else:
            assert torch.equal(a, b)


@interp
@pytest.mark.parametrize("name", ["llama", "qwen3-next", "kimi-linear"])
def test_interp_fused_step_bf16_mixed_lengths(name):
    """bf16 model, rows of different lengths: fused vs plain logits agree to bf16 rounding."""
    model = copy.deepcopy(tiny_model(name)).to(torch.bfloat16)
    T, n = 7, 3
    x = tokens(3, T + n, seed=4)
    lengths = torch.tensor([7, 3, 5])
    with torch.no_grad():
        plain, _ = _decode(model, x, T, n, torch.bfloat16, on=False, lengths=lengths)
        ours, _ = _decode(model, x, T, n, torch.bfloat16, on=True, lengths=lengths)
    assert rms_rel(plain.float(), ours.float()) <= 3e-2


@interp
def test_interp_fused_step_is_taken():
    """The fused kernels really run (a broken dispatch would silently give the plain step)."""
    from attnlab.kernels import gemv

    model = tiny_model("llama")
    calls = []
    real = gemv.gemv

    def counted(*args, **kwargs):
        calls.append(kwargs.get("prologue"))
        return real(*args, **kwargs)

    gemv.gemv = counted
    try:
        with torch.no_grad():
            _decode(model, tokens(1, 6), 5, 1, torch.float32, on=True)
    finally:
        gemv.gemv = real
    n_layers = len(model.blocks)
    assert calls.count("rmsnorm") == 2 * n_layers + 1  # qkv and gate/up per layer, the LM head
    assert calls.count("silu_mul") == n_layers


# ---------------------------------------------------------------------------------------------
# GPU


def _gpu_model(preset: str) -> HybridLM:
    cfg = ModelConfig.preset(preset, d_model=1024, n_layers=len(ModelConfig.preset(preset).pattern),
                             vocab_size=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return HybridLM(cfg).to(torch.bfloat16).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["llama", "qwen3-next", "kimi-linear", "deepseek-v32"])
def test_gpu_fused_step_equals_plain_step_in_a_cuda_graph(preset):
    model = _gpu_model(preset)
    T, n = 300, 4
    x = torch.randint(0, 4096, (1, T + n), device="cuda")
    with torch.no_grad():
        plain, _ = _decode(model, x, T, n, torch.bfloat16, on=False)
        ours, _ = _decode(model, x, T, n, torch.bfloat16, on=True)
        assert rms_rel(plain.float(), ours.float()) <= 3e-2
        caches = model.new_caches(1, T + n, dtype=torch.bfloat16)
        step = DecodeStep(model, caches, mode="cuda_graph")  # captured on fresh caches
        prefill(model, x[:, :T], caches)
        graphed = []
        for i in range(n):
            _, logits = decode_one_token(model, x[:, T + i], caches, step=step)
            graphed.append(logits.clone())
    assert rms_rel(ours.float(), torch.stack(graphed, 1).float()) <= 1e-2
