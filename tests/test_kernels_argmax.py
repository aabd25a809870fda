"""Greedy decoding's argmax (attnlab.kernels.argmax) against torch.argmax, and the decode step's use of it.

- CPU: bad input -> ValueError naming the argument; CPU tensors need the interpreter; the decode
  step's greedy tokens (``DecodeStep(greedy=True)``, simulated capture) are the logits' argmax and
  greedy ``generate`` is unchanged by them.
- Interpreter (``TRITON_INTERPRET=1``, run in a subprocess by ``test_interpreter_suite``): rows of 1
  to 32768 values in float32 / bf16 / fp16, ties inside a block and across blocks, NaN, all -inf,
  strided rows, more than one pass; the output poisoned.
- sm_90 compile (no GPU): the one-pass block at 16 warps, no spills, PDL. GPU (marked ``gpu``): a
  32K vocabulary, in a CUDA graph after a producer kernel.
"""

from __future__ import annotations

import pytest
import torch
from _triton_tests import (
    INTERPRETED,
    capture_graph,
    compile_sm90,
    interp,
    needs_sm90_toolchain,
    needs_triton,
    poison_outputs,
    run_interpreter_suite,
    sm90_usage,
)

_poison = poison_outputs("argmax")


def rows(B, V, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=gen).to(device=device, dtype=dtype)


@needs_triton
def test_interpreter_suite():
    run_interpreter_suite(__file__)


@needs_triton
def test_bad_input_raises_value_error_naming_the_argument():
    from attnlab.kernels.argmax import argmax_rows

    with pytest.raises(ValueError, match="^logits: "):
        argmax_rows(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="^logits: "):
        argmax_rows(torch.zeros(2, 3, dtype=torch.long))


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs CPU tensors")
def test_cpu_tensors_without_interpreter_are_refused():
    from attnlab.kernels.argmax import argmax_rows

    with pytest.raises(ValueError, match="^logits: .*argmax_rows_reference"):
        argmax_rows(torch.zeros(1, 8))


@needs_sm90_toolchain
@pytest.mark.parametrize("block", [16384, 4096, 1024])
def test_compiles_for_sm90(block):
    """The kernel compiles for an H100 (sm_90) with the launcher's blocks, PDL on, without spills."""
    from attnlab.kernels import argmax

    kernel = compile_sm90(argmax._argmax_kernel, dict(BLOCK=block, PDL=True), dict(X="*fp32", OUT="*i64"),
                          num_warps=argmax._warps(block))
    regs, stack, res = sm90_usage(kernel)
    assert "LOCAL:0 " in res and stack == 0, res
    ptx = kernel.asm["ptx"]
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx


def test_decode_step_greedy_tokens_are_the_argmax():
    """DecodeStep(greedy=True) (simulated capture on the CPU, and eager) sets next_tokens to each
    call's argmax; greedy decoding through it (decode_n_tokens takes the step's tokens) gives the
    tokens of the eager loop."""
    from attnlab.generate import DecodeStep, decode_n_tokens, prefill, sample
    from attnlab.model import HybridLM
    from attnlab.presets import build_preset

    torch.manual_seed(0)
    model = HybridLM(build_preset("llama", d_model=64, n_layers=2, vocab_size=97)).eval()
    assert DecodeStep(model, model.new_caches(2, 16), mode="cuda_graph", simulate=True).next_tokens is None
    for mode in ("cuda_graph", "eager"):
        step = DecodeStep(model, model.new_caches(2, 16), mode=mode, simulate=True, greedy=True)
        tok = torch.tensor([3, 5])
        for _ in range(3):
            logits = step(tok)
            assert torch.equal(step.next_tokens, logits.argmax(-1))
            tok = step.next_tokens.clone()

    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])

    def decode(through_step: bool) -> torch.Tensor:
        caches = model.new_caches(2, 16)
        step = DecodeStep(model, caches, "cuda_graph", simulate=True, greedy=True) if through_step else None
        first = sample(prefill(model, prompt, caches))  # (B,)
        return decode_n_tokens(model, first, caches, 6, step=step)  # (B, 6)

    assert torch.equal(decode(through_step=True), decode(through_step=False))


# ---------------------------------------------------------------------------------------------
# interpreter


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,V", [(1, 1), (1, 7), (3, 100), (2, 1000), (1, 32768)])
def test_interp_matches_torch(B, V, dtype):
    from attnlab.kernels.argmax import argmax_rows

    x = rows(B, V, dtype)
    assert torch.equal(argmax_rows(x), x.argmax(-1))


@interp
def test_interp_ties_nan_and_minus_inf():
    """The first index of the max (ties inside one block), the first NaN, index 0 for all -inf."""
    from attnlab.kernels.argmax import argmax_rows

    x = torch.zeros(4, 300)
    x[0, 40] = x[0, 7] = x[0, 299] = 5.0  # ties: 7
    x[1, 17] = float("nan")
    x[1, 200] = float("nan")
    x[1, 3] = float("inf")  # NaN beats +inf: 17
    x[2] = float("-inf")  # 0
    x[3] = -1.0
    x[3, 250] = float("inf")
    out = argmax_rows(x)
    assert out.tolist() == [7, 17, 0, 250]
    assert torch.equal(out, x.argmax(-1))


@interp
def test_interp_several_passes_and_strided_rows(monkeypatch):
    """Rows longer than a pass (ONE_PASS_MAX 64): a tie across passes keeps the earlier one, the max
    in the last (partial) pass is found, a NaN in a later pass wins; rows of a wider tensor."""
    from attnlab.kernels import argmax

    monkeypatch.setattr(argmax, "ONE_PASS_MAX", 64)
    wide = rows(5, 300, torch.float32, seed=3)
    x = wide[:, :250]  # (5, 250), stride 300
    x[0, 10] = x[0, 130] = 9.0  # tie across passes: 10
    x[1, 249] = 9.0  # the last, partial pass
    x[2, 200] = float("nan")
    x[2, 5] = 9.0
    x[3] = float("-inf")
    x[3, 100] = -1e30
    out = argmax.argmax_rows(x)
    assert out.tolist()[:4] == [10, 249, 200, 100]
    assert torch.equal(out, x.argmax(-1))


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 3])
def test_gpu_matches_torch_in_a_cuda_graph(B):
    """A 32K vocabulary after the kernel that writes the logits, captured in a CUDA graph (PDL on)
    and replayed on new logits; ties at the row's two ends."""
    from attnlab.kernels.argmax import argmax_rows

    src = rows(B, 32768, torch.float32, device="cuda")
    logits = torch.empty_like(src)

    def step():
        torch.mul(src, 2.0, out=logits)  # the producer
        return argmax_rows(logits)

    graph, out = capture_graph(step)
    for seed in range(3):
        src.copy_(rows(B, 32768, torch.float32, seed=seed + 1, device="cuda"))
        if seed == 2:
            src[:, 0] = src[:, -1] = 100.0
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, (src * 2.0).argmax(-1))
