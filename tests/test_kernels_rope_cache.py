"""The one-launch decode q/k/v post-processing (attnlab.kernels.rope_cache) against its oracle.

- CPU: ``rope_write_reference`` equals what SoftmaxAttention's own decode branch computes (q from
  ``_qkv``, the cache after ``forward``), bit for bit: it is the oracle. Bad input -> ValueError.
- Interpreter (``TRITON_INTERPRET=1``, tiny, run in a subprocess by ``test_interpreter_suite``):
  ``rope_write`` against the reference on several layer configs — returned q / gate and the WHOLE
  cache tensors (filled with noise first, so a missing or misplaced write fails), outputs poisoned.
- GPU (marked ``gpu``): real shapes, long positions, CUDA-graph replay and torch.compile.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from _triton_tests import (
    INTERPRETED,
    compile_sm90,
    interp,
    needs_sm90_toolchain,
    needs_triton,
    poison_outputs,
    run_interpreter_suite,
)

from attnlab.layers.attention import SoftmaxAttention

# tiny layer configs (d_model 32): GQA 4:1 and 1:1, partial RoPE, no RoPE, D not a power of 2, a ring
CONFIGS = {
    "llama": dict(n_heads=4, n_kv_heads=1, head_dim=16, rope_dim=16),
    "qwen3_next": dict(n_heads=4, n_kv_heads=4, head_dim=16, rope_dim=8, output_gate=True, qk_norm=True,
                       norm_zero_centered=True),
    "norope_d12": dict(n_heads=4, n_kv_heads=2, head_dim=12, rope_dim=0, qk_norm=True),
    "partial_d12": dict(n_heads=2, n_kv_heads=1, head_dim=12, rope_dim=8, qk_norm=True, output_gate=True),
    "sliding": dict(n_heads=4, n_kv_heads=2, head_dim=16, rope_dim=16, output_gate=True, window=8,
                    sink_tokens=2),
}
MAX_LEN = 40
# per-row positions: first token, middle, last slot; the ring (2 sinks + 8): a sink, last slot, wrapped
LENGTHS = {False: [0, 7, MAX_LEN - 1], True: [1, 9, 22]}


_poison = poison_outputs("rope_cache")

def make(name, dtype=torch.float32, cache_dtype=None, lengths=None, d_model=32, max_len=MAX_LEN, device="cpu",
         seed=0, **overrides):
    """A layer of CONFIGS[name] (random norm weights), its cache filled with noise at the given
    lengths, one decode input x [B, 1, d_model] and its fused projection qkv [B, W]."""
    gen = torch.Generator().manual_seed(seed)
    cfg = dict(CONFIGS[name], **overrides) if name in CONFIGS else overrides
    attn = SoftmaxAttention(d_model=d_model, **cfg)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 2 else 1.0))
    attn = attn.to(device=device, dtype=dtype).eval()
    lengths = LENGTHS[attn.window is not None] if lengths is None else lengths
    cache = attn.new_cache(len(lengths), max_len, device=device, dtype=cache_dtype or dtype)
    with torch.no_grad():
        cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
        cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
        cache.lengths.copy_(torch.tensor(lengths))
    x = torch.randn(len(lengths), 1, d_model, generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        qkv = F.linear(x[:, 0], attn.qkv.weight())  # (B, W)
    return attn, cache, x, qkv


def clone(cache):
    """A copy of a KVCache / SlidingKVCache with its own tensors."""
    tensors = {k: v.clone() for k, v in vars(cache).items() if isinstance(v, torch.Tensor)}
    return dataclasses.replace(cache, **tensors)


def tables(attn, cache, use):
    return attn.rotary.rotation(cache.lengths[:, None]) if use and attn.rotary is not None else None


def check_against_reference(attn, cache, qkv, rotation, rtol, atol, cache_tol=None):
    """rope_write on ``cache`` vs rope_write_reference on a copy: q, gate, whole k and v caches
    (``cache_tol``: (rtol, atol) for the k cache if not those of q)."""
    from attnlab.kernels.rope_cache import rope_write, rope_write_reference

    before = clone(cache)
    ref = clone(cache)
    q_ref, gate_ref = rope_write_reference(attn, qkv, ref, rotation)
    q, gate = rope_write(attn, qkv, cache, rotation)
    assert q.shape == (qkv.shape[0], attn.n_heads, attn.head_dim) and q.dtype == qkv.dtype
    assert q.is_contiguous()
    torch.testing.assert_close(q, q_ref, rtol=rtol, atol=atol)
    if attn.output_gate:
        assert torch.equal(gate, gate_ref)
    else:
        assert gate is None and gate_ref is None
    rtol, atol = cache_tol or (rtol, atol)
    torch.testing.assert_close(cache.k, ref.k, rtol=rtol, atol=atol)  # the whole cache: nothing misplaced
    if cache.v.dtype == qkv.dtype:
        assert torch.equal(cache.v, ref.v)  # v is copied
    else:  # a cast: the interpreter truncates float32 -> bf16 (the GPU rounds to nearest even)
        torch.testing.assert_close(cache.v, ref.v, rtol=rtol, atol=atol)
    assert torch.equal(cache.lengths, before.lengths)  # the layer counts the token, not rope_write
    assert not torch.equal(cache.k, before.k) and not torch.equal(cache.v, before.v)  # it did write


# ---------------------------------------------------------------------------------------------
# CPU: the subprocess runner, the oracle against the layer, bad input


@needs_triton
def test_interpreter_suite():
    run_interpreter_suite(__file__)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared_rotation", [False, True])
def test_reference_is_the_layers_decode_step(name, dtype, shared_rotation):
    from attnlab.kernels.rope_cache import rope_write_reference

    attn, cache, x, qkv = make(name, dtype)
    rotation = tables(attn, cache, shared_rotation)
    ref = clone(cache)
    with torch.no_grad():
        q_ref, gate_ref = rope_write_reference(attn, qkv, ref, rotation)
        q, _, _, gate = attn._qkv(x, cache.lengths[:, None], rotation)  # (B, 1, H, D)
        attn(x, cache, rotation)  # the decode branch: writes k, v, then lengths += 1
    assert torch.equal(q_ref, q[:, 0])
    assert (gate is None) == (gate_ref is None) and (gate is None or torch.equal(gate_ref, gate[:, 0]))
    assert torch.equal(ref.k, cache.k) and torch.equal(ref.v, cache.v)
    assert torch.equal(ref.lengths + 1, cache.lengths)


def test_bad_input_raises_value_error_naming_the_argument():
    from attnlab.kernels.rope_cache import rope_write, rope_write_reference

    attn, cache, x, qkv = make("qwen3_next")
    ring, ring_cache, _, ring_qkv = make("sliding")
    for fn in (rope_write, rope_write_reference):
        with pytest.raises(ValueError, match="attn"):
            fn(torch.nn.Linear(2, 2), qkv, cache)
        with pytest.raises(ValueError, match="qkv"):
            fn(attn, qkv[:, :-1], cache)
        with pytest.raises(ValueError, match="qkv"):
            fn(attn, qkv[:, None], cache)
        with pytest.raises(ValueError, match="cache"):
            fn(attn, qkv, ring_cache)  # a ring cache for a full-attention layer
        with pytest.raises(ValueError, match="cache"):
            fn(ring, ring_qkv, cache.rows(0, 3))
        bad = clone(cache)
        bad.lengths = bad.lengths.float()
        with pytest.raises(ValueError, match="cache.lengths"):
            fn(attn, qkv, bad)
        cos, sin = attn.rotary.rotation(cache.lengths[:, None])
        with pytest.raises(ValueError, match="rotation"):
            fn(attn, qkv, cache, (cos[..., :-1], sin))
        with pytest.raises(ValueError, match="rotation"):
            fn(attn, qkv, cache, cos)


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs CPU tensors")
def test_cpu_tensors_without_interpreter_are_refused():
    from attnlab.kernels.rope_cache import rope_write

    attn, cache, _, qkv = make("llama")
    with pytest.raises(ValueError, match="rope_write_reference"):
        rope_write(attn, qkv, cache)


# ---------------------------------------------------------------------------------------------
# interpreter (TRITON_INTERPRET=1): the kernel against the reference

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-5)}  # rtol, atol (bf16: a rounding flip)


@interp
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared_rotation", [False, True])
def test_interp_matches_reference(name, dtype, shared_rotation):
    attn, cache, _, qkv = make(name, dtype)
    with torch.no_grad():
        check_against_reference(attn, cache, qkv, tables(attn, cache, shared_rotation), *TOL[dtype])


@interp
@pytest.mark.parametrize("name", ["llama", "qwen3_next"])
def test_interp_float16(name):
    attn, cache, _, qkv = make(name, torch.float16)
    with torch.no_grad():
        check_against_reference(attn, cache, qkv, None, rtol=5e-3, atol=1e-5)


@interp
@pytest.mark.parametrize("lengths", [[0, 7, 30], [3]])
def test_interp_ring_without_sinks(lengths):
    """sink_tokens = 0: slot p % window (a row past several wraps)."""
    attn, cache, _, qkv = make("sliding", lengths=lengths, sink_tokens=0)
    with torch.no_grad():
        check_against_reference(attn, cache, qkv, tables(attn, cache, True), *TOL[torch.float32])


@interp
@pytest.mark.parametrize("name", ["qwen3_next", "sliding"])
def test_interp_float32_projection_into_bf16_cache(name):
    """k rounds to the projection's dtype, then to the cache's, as _qkv + _write_slot do."""
    attn, cache, _, qkv = make(name, torch.float32, cache_dtype=torch.bfloat16)
    with torch.no_grad():
        check_against_reference(attn, cache, qkv, None, *TOL[torch.float32], cache_tol=TOL[torch.bfloat16])


@interp
def test_interp_one_row_and_large_positions():
    """B = 1; positions far into a wrapped ring (in-kernel angles vs the torch tables)."""
    attn, cache, _, qkv = make("sliding", lengths=[1234], seed=3)
    with torch.no_grad():
        check_against_reference(attn, cache, qkv, None, rtol=1e-5, atol=2e-5)


@interp
def test_interp_row_without_room_is_not_written():
    """A row whose slot is past the cache (the layer would refuse it on the host) writes nothing;
    the other rows are written as usual."""
    from attnlab.kernels.rope_cache import rope_write, rope_write_reference

    attn, cache, _, qkv = make("llama", lengths=[3, MAX_LEN])
    before = clone(cache)
    ref = clone(cache.rows(0, 1))
    with torch.no_grad():
        q, _ = rope_write(attn, qkv, cache)
        q_ref, _ = rope_write_reference(attn, qkv[:1], ref)
    assert torch.equal(cache.k[1], before.k[1]) and torch.equal(cache.v[1], before.v[1])
    torch.testing.assert_close(cache.k[:1], ref.k, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.v[:1], ref.v)
    torch.testing.assert_close(q[:1], q_ref, rtol=1e-5, atol=1e-5)
    assert not q.isnan().any()


@interp
def test_interp_torch_compile_keeps_the_op_and_its_cache_writes():
    """Under torch.compile (fullgraph) the launcher is one opaque custom op that mutates the cache."""
    from attnlab.kernels.rope_cache import rope_write, rope_write_reference

    attn, cache, _, qkv = make("qwen3_next")
    ref = clone(cache)
    with torch.no_grad():
        q, gate = torch.compile(rope_write, fullgraph=True)(attn, qkv, cache)
        q_ref, gate_ref = rope_write_reference(attn, qkv, ref)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gate, gate_ref)
    torch.testing.assert_close(cache.k, ref.k, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.v, ref.v)


# ---------------------------------------------------------------------------------------------
# CPU: the GPU build (sm_90 compile of every variant at real shapes; no GPU needed)


@needs_sm90_toolchain
@pytest.mark.parametrize(
    "variant",
    [
        dict(D=128, QHEAD=128, HALF=64),  # Llama: full RoPE, no norm, no gate
        dict(D=256, QHEAD=512, HALF=32, GATE=True, NORM=True, ZERO_CENTERED=True),  # Qwen3-Next
        dict(D=128, QHEAD=128, HALF=64, TABLES=True, RING=True),  # sliding window, shared tables
        dict(D=96, QHEAD=96, HALF=0, NORM=True),  # no RoPE, D not a power of 2
    ],
)
def test_kernel_compiles_for_sm90(variant):
    """The kernel as the GPU runs it (not the interpreter): each constexpr variant compiles for an
    H100 with triton's own toolchain, and RoPE's cos / sin are the precise libdevice ones (the
    angles reach ~1e6 rad at long context, where approximate sin.approx loses its accuracy)."""
    import triton

    from attnlab.kernels.rope_cache import _rope_write_kernel as fn

    const = dict(H=16, HKV=4, GATE=False, NORM=False, ZERO_CENTERED=False, ROPE=variant["HALF"] > 0,
                 TABLES=False, RING=False, PDL=True)
    const.update(variant, BD=triton.next_power_of_2(variant["D"]))
    ptr = dict(QKV="*bf16", LENGTHS="*i64", COS="*fp32", SIN="*fp32", FREQ="*fp32", QW="*bf16", KW="*bf16",
               Q_OUT="*bf16", G_OUT="*bf16", K_CACHE="*bf16", V_CACHE="*bf16")
    # strides and sizes as i32, as triton passes them below 2^31; offsets are int64 in the kernel
    k = compile_sm90(fn, const, ptr, floats=("eps",), num_warps=2)
    assert k.asm["cubin"]
    rope_in_kernel = const["ROPE"] and not const["TABLES"]
    assert ("__nv_cosf" in k.asm["llir"]) == rope_in_kernel
    assert "sin.approx" not in k.asm["ptx"] and "cos.approx" not in k.asm["ptx"]


# ---------------------------------------------------------------------------------------------
# GPU: real shapes (bf16, 4096-slot caches), long positions, CUDA graph, torch.compile

GPU_CONFIGS = {
    "llama_1b": dict(n_heads=16, n_kv_heads=8, head_dim=128, rope_dim=128, rope_theta=500000.0),
    "qwen3_next": dict(n_heads=16, n_kv_heads=4, head_dim=256, rope_dim=64, rope_theta=10_000_000.0,
                       output_gate=True, qk_norm=True, norm_zero_centered=True),
    "sliding": dict(n_heads=16, n_kv_heads=4, head_dim=128, rope_dim=128, window=1024, sink_tokens=4),
}


def make_gpu(name, lengths, max_len=4096, seed=0):
    return make(None, torch.bfloat16, lengths=lengths, d_model=512, max_len=max_len, device="cuda", seed=seed,
                **GPU_CONFIGS[name])


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CONFIGS))
@pytest.mark.parametrize("lengths", [[4095], [0, 1000, 4095]])
@pytest.mark.parametrize("shared_rotation", [False, True])
def test_gpu_matches_reference(name, lengths, shared_rotation):
    attn, cache, _, qkv = make_gpu(name, lengths)
    with torch.no_grad():
        check_against_reference(attn, cache, qkv, tables(attn, cache, shared_rotation), *TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sliding"])
def test_gpu_long_positions_in_kernel_tables(name):
    """Positions up to ~1M (ring slots): the kernel's own cos/sin against torch's tables."""
    attn, cache, _, qkv = make_gpu(name, [1_000_003, 131_071, 5])
    with torch.no_grad():
        check_against_reference(attn, cache, qkv, None, *TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama_1b", "qwen3_next", "sliding"])
def test_gpu_cuda_graph_replay_reads_lengths_on_device(name):
    """Captured once, replayed 3 times with lengths += 1 in the graph: each replay writes the
    next slot, as the reference stepped 3 times on a copy."""
    from attnlab.kernels.rope_cache import rope_write, rope_write_reference

    attn, cache, _, qkv = make_gpu(name, [1020, 7, 3000])
    ref = clone(cache)
    static_q = torch.empty(qkv.shape[0], attn.n_heads, attn.head_dim, device="cuda", dtype=qkv.dtype)

    def step():
        q, _ = rope_write(attn, qkv, cache)
        static_q.copy_(q)
        cache.lengths += 1

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles the kernel) outside the capture
            warm = clone(cache)
            rope_write(attn, qkv, warm)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        assert torch.equal(cache.lengths, ref.lengths)  # capture ran nothing
        for _ in range(3):
            graph.replay()
            q_ref, _ = rope_write_reference(attn, qkv, ref)
            ref.lengths += 1
            torch.cuda.synchronize()
            torch.testing.assert_close(static_q, q_ref, rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(cache.k, ref.k, rtol=1e-2, atol=1e-5)
    assert torch.equal(cache.v, ref.v) and torch.equal(cache.lengths, ref.lengths)


@pytest.mark.gpu
def test_gpu_torch_compile_keeps_the_kernel():
    from attnlab.kernels.rope_cache import rope_write, rope_write_reference

    attn, cache, _, qkv = make_gpu("qwen3_next", [0, 1000, 4095])
    ref = clone(cache)
    with torch.no_grad():
        q, gate = torch.compile(rope_write, fullgraph=True)(attn, qkv, cache)
        q_ref, gate_ref = rope_write_reference(attn, qkv, ref)
    torch.testing.assert_close(q, q_ref, rtol=1e-2, atol=1e-5)
    assert torch.equal(gate, gate_ref)
    torch.testing.assert_close(cache.k, ref.k, rtol=1e-2, atol=1e-5)
    assert torch.equal(cache.v, ref.v)
