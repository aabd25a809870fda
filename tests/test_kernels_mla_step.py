"""The one-launch absorbed MLA decode attention (attnlab.kernels.mla_step) against the four-step oracle.

The oracle is what the fused decode step ran before: ``latent_write_reference`` (the layer's own norm,
RoPE, cache write and absorbed query), ``softmax_decode`` in torch over the latent cache, and
``unabsorb_o_reference`` (W_UV o_lat).

- Interpreter (``TRITON_INTERPRET=1``, tiny, in a subprocess started by ``test_interpreter_suite``):
  the single launch (one program per row there) and the three phases as separate launches with
  1-5 programs per row (the work items spread over programs as on the GPU): o, the whole latent cache
  and the lengths, outputs poisoned; bad input -> ValueError.
- sm_90 compile (CPU, with triton's ptxas): no more register spills than the split kernel it replaces.
- GPU (marked ``gpu``): the ~1B presets' layer sizes in bf16 with 5-128 programs per row meeting at
  real barriers, CUDA-graph replays (the barrier counters grow across launches and layers).
"""

from __future__ import annotations

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
from test_kernels_latent_cache import MLA_CONFIGS, clone, inputs, make, tables

from attnlab.ops import softmax_decode

_poison = poison_outputs("mla_step")


def reference(mla, q, kv, cache, rotation):
    """The four-step oracle on ``cache`` (written, lengths + 1) -> o [B, H, dv]."""
    from attnlab.kernels.absorb import unabsorb_o_reference
    from attnlab.kernels.latent_cache import latent_write_reference
    from attnlab.kernels.mla_step import _w_uv

    R = mla.kv_lora_rank
    q_abs = latent_write_reference(mla, q, kv, None, cache, rotation, count_token=True)  # (B, H, R + dr)
    lat = cache.latent
    o_lat = softmax_decode(q_abs.to(lat.dtype), lat, lat[..., :R], cache.lengths, scale=mla.scale,
                           mode="torch")  # (B, H, R)
    return unabsorb_o_reference(o_lat.to(q.dtype), _w_uv(mla))


def check(mla, cache, x, use_tables, phases_splits=None, tol=1e-5):
    """mla_step (or its phases as separate launches with ``phases_splits`` programs a row) on ``cache``
    against the oracle on a copy: o, the whole latent cache and the lengths."""
    from attnlab.kernels.mla_step import mla_step, mla_step_phases

    with torch.no_grad():
        q, kv, _ = inputs(mla, x)
        rotation = tables(mla, cache, use_tables)
        ref_cache = clone(cache)
        before = cache.lengths.clone()
        want = reference(mla, q, kv, ref_cache, rotation)
        if phases_splits is None:
            out = mla_step(mla, q, kv, cache, rotation)
        else:
            out = mla_step_phases(mla, q, kv, cache, rotation, splits=phases_splits)
    assert out.shape == want.shape and out.dtype == q.dtype and out.is_contiguous()
    assert rel_err(out, want) <= tol, rel_err(out, want)
    torch.testing.assert_close(cache.latent, ref_cache.latent, rtol=tol, atol=tol)  # the whole cache
    assert torch.equal(cache.lengths, before + 1) and torch.equal(ref_cache.lengths, cache.lengths)


# ---------------------------------------------------------------------------------------------
# CPU


@needs_triton
def test_interpreter_suite():
    run_interpreter_suite(__file__)


@needs_triton
def test_bad_input_is_named():
    from attnlab.kernels.mla_step import mla_step

    mla, cache, x = make("lora_interleaved")
    q, kv, _ = inputs(mla, x)
    with pytest.raises(ValueError, match="kv"):
        mla_step(mla, q, kv[:, :-1], cache)
    with pytest.raises(ValueError, match="cache.latent"):
        _, cache16, _ = make("lora_interleaved", cache_dtype=torch.bfloat16)
        mla_step(mla, q, kv, cache16)
    dsa, dsa_cache, x = make("dsa_lora")
    q, kv, _ = inputs(dsa, x)
    with pytest.raises(ValueError, match="cache"):
        mla_step(dsa, q, kv, dsa_cache)
    if not INTERPRETED:
        with pytest.raises(ValueError, match="CUDA"):
            mla_step(mla, *inputs(mla, make("lora_interleaved")[2])[:2], cache)


@needs_sm90_toolchain
@pytest.mark.parametrize("dr", [64, 0])
def test_sm90_build_spills_no_more_than_the_split_kernel(dr):
    """The kernel at DeepSeek-V3's head sizes (16 heads, R 512, dn 128, dv 128), with PDL and the L2
    requests, builds for sm_90; its stack (register spills) is no larger than that of the split
    attention kernel it replaces at the same launch shape (whose [16, 512] float32 accumulator and
    64-slot key tiles already exceed 255 registers a thread with Triton 3.9): the fusion adds none."""
    from attnlab.kernels import mla_step as m
    from attnlab.kernels import sparse

    constexprs = dict(H=16, DN=128, DR=dr, R=512, DV=128, BR=512, BDR=max(16, dr), NQ=16 * (128 + dr), BD=128,
                      BLOCK_R=64, N_ABSORB=128, ROPE=dr > 0, TABLES=False, ZERO_CENTERED=False, BLOCK_H=16,
                      BLOCK_N=m.BLOCK_N, BNS=128, BC=m.BC, BV=m.BV, PHASES=m.ALL_PHASES, COUNT=True,
                      PF_SLOTS=m.PF_BLOCKS * m.BLOCK_N, PF_WEIGHTS=True, PREC="tf32", PDL=True, INTERP=False)
    ptrs = dict(Q="*bf16", KV="*bf16", LENGTHS="*i64", COS="*fp32", SIN="*fp32", FREQ="*fp32",
                PARTNER_Q="*i64", PARTNER_K="*i64", NORM_W="*bf16", QABS="*bf16", LATENT="*bf16",
                W_UK="*bf16", OP="*fp32", LP="*fp32", OLAT="*bf16", W_UV="*bf16", O="*bf16", CTR="*i64")
    ours = compile_sm90(m._mla_step_kernel, constexprs, ptrs, floats=("eps", "factor", "sm_scale"),
                        num_warps=m.NUM_WARPS, num_stages=m.NUM_STAGES)
    split = compile_sm90(
        sparse._latent_attn_fwd,
        dict(GATHER=0, PAGE=1, DK1=512, BD1=512, DK2=dr, BD2=max(16, dr), D_V=512, BDV=512, NUM_DVB=1,
             V_IS_K=True, BLOCK_H=16, BLOCK_N=m.BLOCK_N, SPLIT_OUT=True, PREC="tf32", ROW64=False,
             SHARE_QK=False, INTERP=False, PDL=True, PF_SLOTS=m.PF_BLOCKS * m.BLOCK_N),
        dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", IDX="*i64", NVALID="*i64", TABLE="*i32", LSE="*fp32",
             OP="*fp32", LP="*fp32"),
        floats=("sm_scale",), num_warps=m.NUM_WARPS, num_stages=m.NUM_STAGES)
    (_, stack, usage), (_, split_stack, _) = sm90_usage(ours), sm90_usage(split)
    assert stack <= split_stack, usage


# ---------------------------------------------------------------------------------------------
# interpreter


@interp
@pytest.mark.parametrize("name", MLA_CONFIGS)
@pytest.mark.parametrize("use_tables", [False, True])
def test_interp_one_launch_equals_the_four_steps(name, use_tables):
    """Float32, rows of lengths 3 / 0 / the last slot over a noisy cache: o, the cache and the count."""
    mla, cache, x = make(name)
    check(mla, cache, x, use_tables)


@interp
@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("name", ["lora_interleaved", "nope", "odd_sizes"])
def test_interp_phases_over_several_programs(name, splits):
    """The phases as three launches with several programs per row (each takes every splits-th item;
    a row's slots are split among them): the same results."""
    mla, cache, x = make(name, lengths=[3, 0, 23], max_len=24)
    check(mla, cache, x, use_tables=True, phases_splits=splits)


@interp
@pytest.mark.parametrize("splits", [None, 3])
def test_interp_bf16(splits):
    """bf16 layer and cache: the same roundings as the four steps (q_abs and o_lat in bf16), so equal
    up to float32 summation order."""
    mla, cache, x = make("lora_interleaved", torch.bfloat16, lengths=[5, 1], max_len=20)
    check(mla, cache, x, use_tables=False, phases_splits=splits, tol=1e-2)


# ---------------------------------------------------------------------------------------------
# GPU


def _gpu_layer(context: int, rope: bool = True):
    """A DeepSeek-V3-sized M layer (16 heads, R 512, dr 64, dn 128, dv 128) in bf16 on the GPU, its
    cache at ``context`` tokens of noise, and a decode token."""
    overrides = dict(d_model=2048, n_heads=16, q_lora_rank=1024, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True, mla_use_rope=rope)
    d = overrides.pop("d_model")
    return make("custom", torch.bfloat16, lengths=[context], max_len=context + 8, device="cuda", d_model=d,
                **overrides)


@pytest.mark.gpu
@pytest.mark.parametrize("context,rope", [(300, True), (4096, True), (40000, False)])
def test_gpu_real_barriers(context, rope):
    """5 / 65 / 128 programs meeting at real barriers: o, the cache and the count as the oracle."""
    from attnlab.kernels import mla_step as m

    mla, cache, x = _gpu_layer(context, rope)
    assert m.n_splits(1, cache.latent.shape[1], cache.latent.device) > 1
    check(mla, cache, x, use_tables=False, tol=1e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_and_layers():
    """Two layers' launches in one CUDA graph, replayed: every replay equals the oracle step by step
    (the barrier counter, shared by the layers, grows across launches and replays)."""
    from _triton_tests import capture_graph

    from attnlab.kernels.mla_step import mla_step

    layers = [_gpu_layer(1000) for _ in range(2)]
    with torch.no_grad():
        args = [inputs(mla, x)[:2] for mla, _, x in layers]
        refs = [clone(cache) for _, cache, _ in layers]
        graph, outs = capture_graph(lambda: [mla_step(mla, q, kv, cache) for (mla, cache, _), (q, kv)
                                             in zip(layers, args, strict=True)])
        for (_, cache, _), ref in zip(layers, refs, strict=True):  # the capture's warm-up ran a step
            cache.latent.copy_(ref.latent)
            cache.lengths.copy_(ref.lengths)
        for _ in range(4):
            graph.replay()
            torch.cuda.synchronize()
            for (mla, cache, _), (q, kv), ref, out in zip(layers, args, refs, outs, strict=True):
                want = reference(mla, q, kv, ref, None)
                assert rel_err(out, want) <= 1e-2
                torch.testing.assert_close(cache.latent, ref.latent, rtol=1e-2, atol=1e-2)
                assert torch.equal(cache.lengths, ref.lengths)
