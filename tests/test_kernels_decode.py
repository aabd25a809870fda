"""Triton split-K GQA decode (attnlab.kernels.decode) against the float32 oracle.

Two ways to run (as tests/test_kernels_sparse.py):
- on the CPU, tiny sizes under ``TRITON_INTERPRET=1``; ``test_interpreter_suite`` re-runs this
  file's ``interp_`` tests in a subprocess with it set (the variable must be set before triton is
  imported), or run ``TRITON_INTERPRET=1 pytest tests/test_kernels_decode.py -k interp_``;
- on a CUDA machine, the tests marked ``gpu`` (Llama/Qwen sizes, long caches, the CUDA-graph and
  torch.compile paths).

Outputs are poisoned with NaN (``POISON_OUTPUTS``) so an unwritten element fails.
Error metric: rms(ref − out) / rms(ref) (DESIGN.md).
"""

from __future__ import annotations

import pytest
import torch
from _triton_tests import HAVE_TRITON, INTERPRETED, interp, needs_triton, rel_err, run_interpreter_suite

from attnlab import ops
from attnlab.ops.softmax import _reference_softmax_attention

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def _poison():
    if not HAVE_TRITON:
        yield
        return
    from attnlab.kernels import decode as kd

    kd.POISON_OUTPUTS = True
    yield
    kd.POISON_OUTPUTS = False




def oracle(q, k, v, n_valid, scale=None) -> torch.Tensor:
    """Row by row: the float32 softmax oracle over slots 0..n_valid[b]-1; an empty row is 0."""
    rows = []
    for b in range(q.shape[0]):
        n = int(n_valid[b].clamp(0, k.shape[1]))
        if n == 0:
            rows.append(torch.zeros(q.shape[1], v.shape[-1], dtype=torch.float32, device=q.device))
            continue
        o = _reference_softmax_attention(
            q[b : b + 1, None].float(), k[b : b + 1, :n].float(), v[b : b + 1, :n].float(), causal=False,
            scale=scale,
        )
        rows.append(o[0, 0])
    return torch.stack(rows)  # (B, H_q, D_v)


def make(b, h_kv, g, s, d, d_v=None, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, h_kv * g, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(b, s, h_kv, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(b, s, h_kv, d_v or d, generator=gen).to(device=device, dtype=dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# CPU: the subprocess runner and the checks that need no kernel launch


@needs_triton
def test_interpreter_suite():
    run_interpreter_suite(__file__)


def test_auto_mode_on_cpu_is_the_torch_path():
    q, k, v = make(2, 2, 4, 40, 16)
    nv = torch.tensor([3, 40])
    assert torch.equal(ops.softmax_decode(q, k, v, nv), ops.softmax_decode(q, k, v, nv, mode="torch"))


@needs_triton
def test_triton_mode_on_cpu_needs_the_interpreter():
    if INTERPRETED:
        pytest.skip("the interpreter makes CPU tensors usable")
    q, k, v = make(1, 2, 2, 8, 16)
    with pytest.raises(ValueError, match="mode: 'triton'"):
        ops.softmax_decode(q, k, v, torch.tensor([4]), mode="triton")


@needs_triton
def test_num_splits_from_shapes_only():
    from attnlab.kernels.decode import MIN_SPLIT_SLOTS, num_splits

    cuda = torch.device("cuda")
    from attnlab.kernels import decode as kd

    kd._SMS[0] = 132  # an H100, without touching a GPU
    try:
        assert num_splits(1, 8, 4096 + 40, torch.device("cuda", 0)) == (4096 + 40) // MIN_SPLIT_SLOTS
        assert num_splits(1, 8, 131072, torch.device("cuda", 0)) == 50  # 3 waves of 132 SMs over 8 heads
        assert num_splits(64, 8, 131072, torch.device("cuda", 0)) == 1  # the batch alone fills the GPU
        assert num_splits(1, 8, 10, torch.device("cuda", 0)) == 1
    finally:
        kd._SMS.pop(0)
    del cuda


# ---------------------------------------------------------------------------------------------
# interpreter (CPU tensors, TRITON_INTERPRET=1)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_interp_gqa_decode_matches_oracle(dtype, g, d):
    """GQA ratios 1/4/8, head dims 64/128, rows of 1, 17 and 300 valid slots (and an empty row) in
    one batch, 5 splits of the 320 slots (some splits past a row's length: empty partials)."""
    from attnlab.kernels.decode import gqa_decode

    q, k, v = make(4, 2, g, 320, d, dtype=dtype, seed=g + d)
    nv = torch.tensor([1, 17, 300, 0])
    ref = oracle(q, k, v, nv)
    for splits in (5, None):
        out = gqa_decode(q, k, v, nv, n_splits=splits)
        assert out.shape == (4, 2 * g, d) and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) <= TOL[dtype], f"splits={splits}"
        assert (out[3] == 0).all()


@interp
def test_interp_odd_dims_values_scale_and_int32_lengths():
    from attnlab.kernels.decode import gqa_decode

    q, k, v = make(3, 3, 2, 77, 40, d_v=24, seed=5)
    nv = torch.tensor([77, 200, 30], dtype=torch.int32)  # 200 > S_max: clamped
    out = gqa_decode(q, k, v, nv, scale=0.3, n_splits=3)
    assert rel_err(out, oracle(q, k, v, nv.long(), scale=0.3)) <= 1e-5


@interp
def test_interp_advance_reads_the_new_slot_and_counts_it():
    """gqa_decode_advance: attends to lengths + 1 slots (capped at S_max: a full ring buffer), then
    lengths += 1 in place; slots past that are never read (NaN there)."""
    from attnlab.kernels.decode import gqa_decode_advance

    q, k, v = make(3, 2, 4, 64, 32, seed=11)
    lengths = torch.tensor([0, 30, 64])  # the last row: a full ring, the new token overwrote a slot
    k[1, 31:], v[1, 31:] = float("nan"), float("nan")
    out = gqa_decode_advance(q, k, v, lengths)
    assert lengths.tolist() == [1, 31, 65]
    assert rel_err(out, oracle(q, k, v, torch.tensor([1, 31, 64]))) <= 1e-5


@interp
@pytest.mark.parametrize("per_sm, tile", [(64, 64), (0, 4096)])
def test_interp_combine_shapes(monkeypatch, per_sm, tile):
    """The combine cut into 16-column programs (3 per head) loading 16 of the 20 splits at a time (more
    programs per SM and a smaller tile than the interpreter's defaults give), and the earlier fixed
    shape; with the token count (advance: counted once per row, by one of its programs)."""
    from attnlab.kernels import sparse as ks
    from attnlab.kernels.decode import gqa_decode, gqa_decode_advance

    monkeypatch.setattr(ks, "COMBINE_PROGRAMS_PER_SM", per_sm)
    monkeypatch.setattr(ks, "COMBINE_TILE", tile)
    q, k, v = make(3, 2, 2, 640, 40, d_v=48, seed=13)
    nv = torch.tensor([1, 150, 640])
    assert ks.combine_shape(12, 48, 20, q.device) == ((16, 16) if per_sm else (64, 16))
    assert rel_err(gqa_decode(q, k, v, nv, n_splits=20), oracle(q, k, v, nv)) <= 1e-5
    lengths = torch.tensor([0, 100, 200])
    out = gqa_decode_advance(q, k, v, lengths)
    assert lengths.tolist() == [1, 101, 201]
    assert rel_err(out, oracle(q, k, v, torch.tensor([1, 101, 201]))) <= 1e-5


@interp
def test_interp_op_dispatch_runs_the_kernel_and_ignores_stale_slots():
    """ops.softmax_decode(mode="triton") runs the kernel; slots past n_valid are never read (NaN there)."""
    q, k, v = make(2, 2, 4, 96, 32, seed=7)
    nv = torch.tensor([50, 96])
    k[0, 50:], v[0, 50:] = float("nan"), float("nan")
    out = ops.softmax_decode(q, k, v, nv, mode="triton")
    assert rel_err(out, oracle(q, k, v, nv)) <= 1e-5


@interp
def test_interp_compiled_call_keeps_the_kernel():
    """Under torch.compile (fullgraph) the kernel is one opaque custom op: same output."""
    from attnlab.kernels.decode import gqa_decode

    q, k, v = make(2, 2, 4, 96, 32, seed=8)
    nv = torch.tensor([20, 96])
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: gqa_decode(*a, n_splits=3), backend="eager", fullgraph=True)
    assert rel_err(fn(q, k, v, nv), oracle(q, k, v, nv)) <= 1e-5


@interp
def test_interp_latent_decode_op_compiles_and_matches_oracle():
    """MLA's absorbed decode (one kv head, v = k[..., :D_v]) through the custom op, under
    torch.compile (fullgraph): the latent kernel of attnlab.kernels.sparse, same output."""
    from attnlab.kernels.decode import latent_decode

    gen = torch.Generator().manual_seed(9)
    q, k = torch.randn(2, 8, 24, generator=gen), torch.randn(2, 40, 1, 24, generator=gen)
    nv = torch.tensor([5, 40])
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, nv: latent_decode(q, k, k[..., :16], nv, scale=0.2), backend="eager",
                       fullgraph=True)
    assert rel_err(fn(q, k, nv), oracle(q, k, k[..., :16], nv, scale=0.2)) <= 1e-5


@interp
@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear", "minimax-01"])
def test_interp_linear_layers_decode_with_the_fused_step_kernels(name, monkeypatch):
    """The G / K / L layers' T == 1 path with the fused Triton steps of attnlab.kernels.linear (what
    it takes on CUDA; forced here on CPU tensors) gives the torch ops' logits."""
    import attnlab.ops.delta_rule as delta_rule_ops
    import attnlab.ops.lightning as lightning_ops
    from attnlab import HybridLM, ModelConfig
    from attnlab.generate import decode_one_token, prefill
    from attnlab.kernels import linear

    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset(name, d_model=64, n_layers=8, vocab_size=97)).eval()
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))

    def run():
        caches = model.new_caches(2, 12)
        prefill(model, x[:, :9], caches)
        return torch.stack([decode_one_token(model, x[:, 9 + i], caches)[1] for i in range(3)], 1)

    want = run()
    used = []

    def forced(mode, q, op_name):  # what ops.*_step(mode="auto") resolves to on CUDA
        assert mode == "auto"
        used.append(op_name)
        return getattr(linear, op_name)

    monkeypatch.setattr(lightning_ops, "resolve_step", forced)
    monkeypatch.setattr(delta_rule_ops, "resolve_step", forced)
    got = run()
    assert used, "the fused step was never asked for"
    assert rel_err(got, want) <= 1e-5


@interp
def test_interp_bad_inputs_raise():
    from attnlab.kernels.decode import gqa_decode

    q, k, v = make(2, 2, 4, 16, 32)
    nv = torch.tensor([3, 4])
    with pytest.raises(ValueError, match="k_cache"):
        gqa_decode(q, k[..., :16], v, nv)
    with pytest.raises(ValueError, match="n_valid"):
        gqa_decode(q, k, v, nv.float())
    with pytest.raises(ValueError, match="q"):
        gqa_decode(q[:, :3], k, v, nv)  # 3 query heads over 2 kv heads
    with pytest.raises(ValueError, match="v_cache"):
        gqa_decode(q, k, v.transpose(-1, -2).contiguous().transpose(-1, -2), nv)  # last dim strided


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h_kv, g, d", [(8, 4, 64), (4, 8, 128), (16, 1, 128), (2, 16, 64)])
def test_gpu_gqa_decode_matches_oracle(dtype, h_kv, g, d):
    from attnlab.kernels.decode import gqa_decode

    q, k, v = make(3, h_kv, g, 8192 + 40, d, dtype=dtype, device="cuda", seed=h_kv * g)
    nv = torch.tensor([1, 4096 + 17, 8192 + 40], device="cuda")
    ref = oracle(q, k, v, nv)
    for splits in (None, 1, 7):
        assert rel_err(gqa_decode(q, k, v, nv, n_splits=splits), ref) <= TOL[dtype], f"splits={splits}"
    # the op's auto mode takes the kernel for CUDA bf16/fp16
    assert torch.equal(ops.softmax_decode(q, k, v, nv), gqa_decode(q, k, v, nv))


@pytest.mark.gpu
def test_gpu_gqa_decode_long_cache_and_cuda_graph():
    """A 131K-slot cache (llama at 128K), captured in a CUDA graph and replayed after the lengths
    changed on the device: the graph reads the new lengths (no host copy of them)."""
    from attnlab.kernels.decode import gqa_decode

    q, k, v = make(1, 8, 4, 131072, 64, dtype=torch.bfloat16, device="cuda", seed=3)
    nv = torch.tensor([1000], device="cuda")
    gqa_decode(q, k, v, nv)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gqa_decode(q, k, v, nv)
    for n in (1000, 65537, 131072):
        nv.fill_(n)
        graph.replay()
        assert rel_err(out, oracle(q, k, v, nv)) <= 2e-2, f"n_valid={n}"


@pytest.mark.gpu
def test_gpu_compiled_decode_step_with_kernel_matches_eager():
    """A bf16 llama-style model: DecodeStep(mode="compile") (the kernel as a custom op inside the
    compiled step) and mode="cuda_graph" give the eager greedy tokens and close logits."""
    from attnlab import HybridLM, ModelConfig
    from attnlab.generate import DecodeStep, decode_one_token, prefill

    torch._dynamo.reset()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = HybridLM(ModelConfig.preset("llama", d_model=512, n_layers=2, vocab_size=512))
    model = model.to(torch.bfloat16).eval()
    assert model.blocks[0].mixer.n_kv_heads == 2  # GQA: the decode kernel of this file, not MLA's
    x = torch.randint(0, 512, (2, 300), device="cuda")
    logits = {}
    for mode in ("eager", "cuda_graph", "compile"):
        caches = model.new_caches(2, 320)
        step = None if mode == "eager" else DecodeStep(model, caches, mode=mode)
        prefill(model, x[:, :296], caches)
        outs = [decode_one_token(model, x[:, 296 + i], caches, step=step)[1].clone() for i in range(4)]
        logits[mode] = torch.stack(outs, 1)
    for mode in ("cuda_graph", "compile"):
        assert rel_err(logits[mode], logits["eager"]) <= 2e-2, mode
