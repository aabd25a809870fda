"""The fused L decode step (attnlab.kernels.lightning_decode) against its torch reference, and the
reference (with the output projection's norm + gate prologue) against the layer's own T == 1 branch.

Three ways to run (as tests/test_kernels_delta_decode.py):
- CPU, no interpreter: lightning_decode_reference + the GEMV oracle == LightningAttention.forward's
  decode branch; input checks;
- CPU tensors under ``TRITON_INTERPRET=1`` (tiny, odd head dims, several rows):
  ``test_interpreter_suite`` re-runs this file's ``interp_`` tests in a subprocess;
- a CUDA machine: the tests marked ``gpu`` (MiniMax-01-style heads of 128 at d_model 2048, bf16, a
  CUDA graph).

The output buffer is poisoned with NaN (``POISON_OUTPUTS``), so an unwritten element fails.
Error metric: rms(ref − out) / rms(ref) (DESIGN.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _triton_tests import (
    INTERPRETED,
    compile_sm90,
    interp,
    needs_sm90_toolchain,
    needs_triton,
    poison_outputs,
    rel_err,
    run_interpreter_suite,
    sm90_usage,
)

from attnlab.layers.common import Residual
from attnlab.layers.lightning import LightningAttention

pytestmark = needs_triton  # attnlab.kernels.lightning_decode imports triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}

_poison = poison_outputs("lightning_decode")


def build(h: int, d: int, d_model: int = 32, dtype=torch.float32, device="cpu", layer: int = 1,
          n_layers: int = 4, seed: int = 0) -> LightningAttention:
    torch.manual_seed(seed)
    with torch.device(device):
        mixer = LightningAttention(d_model, h, d, layer, n_layers)
    with torch.no_grad():  # a non-trivial output norm weight (it starts at ones)
        mixer.norm.weight.uniform_(0.5, 1.5)
    return mixer.to(dtype).eval()


def filled_cache(mixer, batch: int, device="cpu", seed: int = 1):
    """A cache with a random state (as after a prompt) and lengths 5, 6, ..."""
    cache = mixer.new_cache(batch, 16, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cache.state.copy_(0.3 * torch.randn(cache.state.shape, generator=gen))
    cache.lengths.copy_(torch.arange(batch) + 5)
    return cache


def proj_of(mixer, x: torch.Tensor, row_pad: int = 0) -> torch.Tensor:
    """in_proj(x)[:, 0] (B, 4·H·D), a view with a row stride past its width if row_pad > 0."""
    p = mixer.in_proj(x)[:, 0]
    if not row_pad:
        return p
    wide = torch.zeros(p.shape[0], p.shape[1] + row_pad, dtype=p.dtype, device=p.device)
    wide[:, : p.shape[1]] = p
    return wide[:, : p.shape[1]]


def fused_layer_step(mixer, x, cache, step):
    """The layer's decode step the fused way: ``step`` (the kernel or its reference), then the output
    projection with the norm + gate prologue (the GEMV oracle), into a residual of zeros."""
    from attnlab.kernels.gemv import gemv_reference

    proj = proj_of(mixer, x)
    o = step(mixer, proj, cache, count_token=True)
    hd = mixer.n_heads * mixer.head_dim
    res = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype, device=x.device)
    return gemv_reference(o, mixer.out_proj.weight, prologue="rmsnorm_sigmoid_gate",
                          norm_weight=mixer.norm.weight, norm_eps=mixer.norm.eps, gate=proj[:, 3 * hd:],
                          residual=res)


# ---------------------------------------------------------------------------------------------
# CPU


@needs_triton
def test_interpreter_suite():
    run_interpreter_suite(__file__)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_with_the_gemv_prologue_is_the_layer_step(dtype):
    """lightning_decode_reference, then the out projection with the "rmsnorm_sigmoid_gate" prologue
    (the fused block's two launches), equals LightningAttention.forward on one token with a cache:
    the output, the state and the token count."""
    from attnlab.kernels.lightning_decode import lightning_decode_reference

    mixer = build(3, 8, dtype=dtype)
    x = torch.randn(2, 1, 32).to(dtype)
    c_layer, c_ours = filled_cache(mixer, 2), filled_cache(mixer, 2)
    with torch.no_grad():
        ref = mixer(x, c_layer)[:, 0]  # (B, d_model)
        ours = fused_layer_step(mixer, x, c_ours, lightning_decode_reference)
    assert rel_err(ours, ref) <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert rel_err(c_ours.state, c_layer.state) <= 1e-6
    assert torch.equal(c_ours.lengths, c_layer.lengths)


def test_bad_inputs_raise_value_errors_naming_the_argument():
    from attnlab.kernels.lightning_decode import lightning_decode, lightning_decode_reference

    mixer = build(2, 8)
    proj = torch.randn(2, 64)
    cache = filled_cache(mixer, 2)
    for fn in (lightning_decode, lightning_decode_reference):
        with pytest.raises(ValueError, match="mixer: expected a LightningAttention"):
            fn(torch.nn.Linear(2, 2), proj, cache)
        with pytest.raises(ValueError, match=r"proj: expected shape \(\?, 64\)"):
            fn(mixer, proj[:, :63], cache)
        with pytest.raises(ValueError, match="proj: the last dim must be contiguous"):
            fn(mixer, torch.randn(64, 2).t(), cache)
        with pytest.raises(ValueError, match="cache: expected a LightningCache"):
            fn(mixer, proj, object())
        with pytest.raises(ValueError, match="cache.state: expected shape"):
            fn(mixer, proj[:1], cache)
        bad = filled_cache(mixer, 2)
        bad.state = bad.state.transpose(2, 3)
        with pytest.raises(ValueError, match="cache.state: must be contiguous"):
            fn(mixer, proj, bad)


def test_kernel_on_cpu_needs_the_interpreter():
    if INTERPRETED:
        pytest.skip("the interpreter makes CPU tensors usable")
    from attnlab.kernels.lightning_decode import lightning_decode

    mixer = build(2, 8)
    with pytest.raises(ValueError, match="proj: the Triton kernel needs CUDA tensors.*_reference"):
        lightning_decode(mixer, torch.randn(1, 64), filled_cache(mixer, 1))


# ---------------------------------------------------------------------------------------------
# interpreter


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h, d", [(3, 8), (2, 24), (1, 64)])
def test_interp_kernel_matches_reference(dtype, h, d):
    """Head dims 8 (one value block), 24 (masked key and value lanes) and 64 (two value blocks of
    32); three rows with a strided proj; the state and the counted token as the reference's, the
    output to rounding; a second step from the updated state too."""
    from attnlab.kernels.lightning_decode import lightning_decode, lightning_decode_reference

    mixer = build(h, d, dtype=dtype, seed=h + d)
    c_ref, c_ker = filled_cache(mixer, 3), filled_cache(mixer, 3)
    for step in range(2):
        x = torch.randn(3, 1, 32, generator=torch.Generator().manual_seed(step)).to(dtype)
        with torch.no_grad():
            proj = proj_of(mixer, x, row_pad=5)
            ref = lightning_decode_reference(mixer, proj, c_ref, count_token=True)
            out = lightning_decode(mixer, proj, c_ker, count_token=True)
        assert out.shape == (3, h * d) and out.dtype == dtype
        assert rel_err(out, ref) <= TOL[dtype], step
        assert rel_err(c_ker.state, c_ref.state) <= 1e-6
        assert torch.equal(c_ker.lengths, c_ref.lengths)
    assert c_ker.lengths.tolist() == [7, 8, 9]
    lengths = c_ker.lengths.clone()
    with torch.no_grad():
        lightning_decode(mixer, proj, c_ker)  # count_token False: lengths untouched
    assert torch.equal(c_ker.lengths, lengths)


@interp
def test_interp_fused_layer_step_equals_the_layer():
    """The kernel and the GEMV with the norm + gate prologue (both launched) against the layer's own
    forward: output, state, lengths (float32)."""
    from attnlab.kernels import gemv as kg
    from attnlab.kernels.lightning_decode import lightning_decode

    mixer = build(2, 16)
    x = torch.randn(2, 1, 32)
    c_layer, c_ours = filled_cache(mixer, 2), filled_cache(mixer, 2)
    with torch.no_grad():
        ref = mixer(x, c_layer, residual=Residual(torch.ones(2, 1, 32), keep=0.5, scale=2.0))[:, 0]
        proj = proj_of(mixer, x)
        o = lightning_decode(mixer, proj, c_ours, count_token=True)
        res = torch.ones(2, 32)
        kg.gemv(o, mixer.out_proj.weight, prologue="rmsnorm_sigmoid_gate", norm_weight=mixer.norm.weight,
                norm_eps=mixer.norm.eps, gate=proj[:, 3 * 2 * 16:], residual=res, keep=0.5, scale=2.0)
    assert rel_err(res, ref) <= 1e-5
    assert rel_err(c_ours.state, c_layer.state) <= 1e-6
    assert torch.equal(c_ours.lengths, c_layer.lengths)


@interp
def test_interp_empty_batch():
    from attnlab.kernels.lightning_decode import lightning_decode

    mixer = build(2, 8)
    assert lightning_decode(mixer, torch.randn(0, 64), filled_cache(mixer, 0)).shape == (0, 16)


# ---------------------------------------------------------------------------------------------
# CPU: the GPU build (sm_90 compile, no GPU needed)


@needs_sm90_toolchain
@pytest.mark.parametrize("pdl", [False, True])
def test_kernel_compiles_for_sm90(pdl):
    """At the ~1B presets' shape (heads of 128, value blocks of 32): no spills."""
    from attnlab.kernels import lightning_decode as ld

    const = dict(H=16, D=128, BK=128, BV=ld.BLOCK_V, NVB=128 // ld.BLOCK_V, COUNT=True, PDL=pdl, INTERP=False)
    kernel = compile_sm90(ld._lightning_decode_kernel, const,
                          dict(P="*bf16", SLOPE="*fp32", STATE="*fp32", O="*bf16", LEN="*i64"), num_warps=4)
    regs, stack, usage = sm90_usage(kernel)
    assert stack == 0 and regs <= 128, usage


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_gpu_kernel_matches_float32_reference_and_replays_in_a_cuda_graph():
    """MiniMax-01-style heads (16 x 128 at d_model 2048), bf16, batch 1 and 3: against the float32
    reference on the same bf16 proj; then captured in a CUDA graph and replayed on new inputs."""
    from attnlab.kernels.lightning_decode import lightning_decode, lightning_decode_reference

    mixer = build(16, 128, d_model=2048, dtype=torch.bfloat16, device="cuda", layer=3, n_layers=16)
    for batch in (1, 3):
        c_ref, c_ker = filled_cache(mixer, batch, "cuda"), filled_cache(mixer, batch, "cuda")
        x = torch.randn(batch, 1, 2048, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            proj = proj_of(mixer, x)
            ref = lightning_decode_reference(mixer, proj, c_ref, count_token=True)
            out = lightning_decode(mixer, proj, c_ker, count_token=True)
        assert rel_err(out, ref) <= 1e-2
        assert rel_err(c_ker.state, c_ref.state) <= 1e-6
        assert torch.equal(c_ker.lengths, c_ref.lengths)

    cache = filled_cache(mixer, 1, "cuda")
    proj = torch.randn(1, 4 * 2048, device="cuda", dtype=torch.bfloat16)
    lightning_decode(mixer, proj, copy.deepcopy(cache))  # compile outside the capture
    torch.cuda.synchronize()
    start = cache.state.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lightning_decode(mixer, proj, cache, count_token=True)
    cache.state.copy_(start)
    cache.lengths.fill_(5)
    proj.copy_(torch.randn_like(proj))
    graph.replay()
    c_ref = filled_cache(mixer, 1, "cuda")
    c_ref.state.copy_(start)
    ref = lightning_decode_reference(mixer, proj, c_ref, count_token=True)
    assert rel_err(out, ref) <= 1e-2
    assert rel_err(cache.state, c_ref.state) <= 1e-6
    assert cache.lengths.tolist() == [6]
