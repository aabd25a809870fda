"""The MLA decode step's two absorption products (attnlab.kernels.absorb) against their references.

- CPU: the references are the layer's own einsums (MultiHeadLatentAttention._absorb_q / _output);
  bad input -> ValueError naming the argument.
- Interpreter (``TRITON_INTERPRET=1``, run in a subprocess by ``test_interpreter_suite``):
  ``absorb_q`` / ``unabsorb_o`` on strided views of ``kv_b_proj.weight`` exactly as the fused step
  passes them (tiny, odd and real head shapes; B 1..3 and more rows than a program holds; bf16 and
  float32), outputs poisoned; the custom ops' schema and fake.
- sm_90 compile (no GPU): real shapes, no spills. GPU (marked ``gpu``): real shapes, CUDA graph.
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

_poison = poison_outputs("absorb")

# (H, dn, dv, R, dr): tiny, not powers of two, the ~1B deepseek-v32 / kimi-linear (1B) M heads
SHAPES = {
    "tiny": (2, 8, 8, 32, 4),
    "odd": (3, 5, 7, 40, 6),
    "deepseek_16h": (16, 128, 128, 512, 64),
    "kimi_32h": (32, 32, 32, 512, 16),
}


def views(shape, B, dtype, device="cpu", seed=0):
    """(q_nope [B, H, dn], w_uk [H, dn, R], o_lat [B, H, R], w_uv [H, dv, R]) as the fused step
    (attnlab.layers.fused) makes them: q_nope a strided view of a query row [B, H·(dn + dr)] inside a
    wider projection row, the weights views of one kv_b_proj.weight [H·(dn + dv), R]."""
    H, dn, dv, R, dr = shape
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(H * (dn + dv), R, generator=gen) / R**0.5).to(device=device, dtype=dtype)
    w = weight.view(H, dn + dv, R)
    row = torch.randn(B, H * (dn + dr) + 5, generator=gen).to(device=device, dtype=dtype)  # [q | kv ...]
    q_nope = row[:, : H * (dn + dr)].view(B, H, dn + dr)[..., :dn]  # (B, H, dn)
    o_lat = torch.randn(B, H, R, generator=gen).to(device=device, dtype=dtype)
    return q_nope, w[:, :dn], o_lat, w[:, dn:]


# ---------------------------------------------------------------------------------------------
# CPU


@needs_triton
def test_interpreter_suite():
    run_interpreter_suite(__file__)


def test_references_are_the_layers_einsums():
    """absorb_q_reference / unabsorb_o_reference equal MultiHeadLatentAttention's own absorption
    (``_absorb_q``'s q_lat part, the W_UV einsum of ``_output``), bit for bit, in bf16."""
    from attnlab.config import ModelConfig
    from attnlab.kernels.absorb import absorb_q_reference, unabsorb_o_reference
    from attnlab.layers.mla import MultiHeadLatentAttention

    cfg = ModelConfig(pattern="M", d_model=32, n_layers=1, n_heads=3, q_lora_rank=None, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6).validate()
    mla = MultiHeadLatentAttention(cfg).to(torch.bfloat16).eval()
    H, dn, dv, R, dr = 3, 8, 6, 16, 4
    w = mla.kv_b_proj.weight.view(H, dn + dv, R)
    q = torch.randn(2, 1, H, dn + dr).bfloat16()
    with torch.no_grad():
        q_abs = mla._absorb_q(q[..., :dn], q[..., dn:])  # (B, 1, H, R + dr)
        assert torch.equal(absorb_q_reference(q[:, 0, :, :dn], w[:, :dn]), q_abs[:, 0, :, :R])
        o_lat = torch.randn(2, H, R).bfloat16()
        want = torch.einsum("bthr,hvr->bthv", o_lat[:, None], w[:, dn:])[:, 0]  # as _output
        assert torch.equal(unabsorb_o_reference(o_lat, w[:, dn:]), want)


def test_bad_input_raises_value_error_naming_the_argument():
    from attnlab.kernels.absorb import absorb_q, absorb_q_reference, unabsorb_o, unabsorb_o_reference

    q_nope, w_uk, o_lat, w_uv = views(SHAPES["tiny"], 2, torch.float32)
    cases = [
        (absorb_q_reference, (q_nope[0], w_uk), "q_nope"),  # 2 dims
        (absorb_q_reference, (q_nope[:, :1], w_uk), "q_nope"),  # heads
        (absorb_q_reference, (q_nope, w_uk[:, :3]), "q_nope"),  # dn
        (absorb_q_reference, (q_nope, w_uk.double()), "w_uk"),  # float64
        (absorb_q_reference, (q_nope, w_uk.bfloat16()), "q_nope"),  # dtypes differ
        (absorb_q_reference, (q_nope, w_uk[0]), "w_uk"),  # 2 dims
        (unabsorb_o_reference, (o_lat[..., :5], w_uv), "o_lat"),  # R
        (unabsorb_o_reference, (o_lat, w_uv.bfloat16()), "o_lat"),
        (unabsorb_o_reference, (o_lat, w_uv.double()), "w_uv"),
        (unabsorb_o_reference, (o_lat[:, 0], w_uv), "o_lat"),
    ]
    if INTERPRETED:  # the kernels' own layout checks
        cases += [
            (absorb_q, (q_nope, w_uk.transpose(1, 2).contiguous().transpose(1, 2)), "w_uk"),
            (unabsorb_o, (o_lat.transpose(1, 2).contiguous().transpose(1, 2), w_uv), "o_lat"),
            (unabsorb_o, (o_lat, w_uv.transpose(1, 2).contiguous().transpose(1, 2)), "w_uv"),
        ]
    for fn, args, name in cases:
        with pytest.raises(ValueError, match=f"^{name}"):
            fn(*args)


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs CPU tensors")
def test_cpu_tensors_without_interpreter_are_refused():
    from attnlab.kernels.absorb import absorb_q, unabsorb_o

    q_nope, w_uk, o_lat, w_uv = views(SHAPES["tiny"], 1, torch.float32)
    with pytest.raises(ValueError, match="^q_nope: .*absorb_q_reference"):
        absorb_q(q_nope, w_uk)
    with pytest.raises(ValueError, match="^o_lat: .*unabsorb_o_reference"):
        unabsorb_o(o_lat, w_uv)


@needs_sm90_toolchain
@pytest.mark.parametrize("which", ["absorb_q", "unabsorb_o"])
@pytest.mark.parametrize("rows", [1, 8])
def test_compiles_for_sm90_at_real_shapes(which, rows):
    """The kernels compile for an H100 (sm_90) at H 16, dn = dv = 128, R 512, bf16, with the blocks
    the launchers pick, with PDL, without local memory (spills) or stack."""
    from attnlab.kernels import absorb

    if which == "absorb_q":
        const = dict(ROWS=rows, BD=128, BLOCK_R=64, INTERP=False, PDL=True)
        kernel = compile_sm90(absorb._absorb_q_kernel, const, dict(Q="*bf16", W="*bf16", O="*bf16"),
                              num_warps=4)
    else:
        const = dict(ROWS=rows, BLOCK_V=16, BK=512, INTERP=False, PDL=True)
        kernel = compile_sm90(absorb._unabsorb_o_kernel, const, dict(X="*bf16", W="*bf16", O="*bf16"),
                              num_warps=4)
    regs, stack, res = sm90_usage(kernel)
    assert "LOCAL:0 " in res and stack == 0, res
    ptx = kernel.asm["ptx"]
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx


# ---------------------------------------------------------------------------------------------
# interpreter

TOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3}  # rel_err; bf16: a rounding flip in some elements


def check(shape, B, dtype, seed=0):
    from attnlab.kernels.absorb import absorb_q, absorb_q_reference, unabsorb_o, unabsorb_o_reference

    H, dn, dv, R, _ = shape
    q_nope, w_uk, o_lat, w_uv = views(shape, B, dtype, seed=seed)
    q_lat, q_ref = absorb_q(q_nope, w_uk), absorb_q_reference(q_nope, w_uk)
    o, o_ref = unabsorb_o(o_lat, w_uv), unabsorb_o_reference(o_lat, w_uv)
    for out, ref, want in ((q_lat, q_ref, (B, H, R)), (o, o_ref, (B, H, dv))):
        assert out.shape == want and out.dtype == dtype and out.is_contiguous()
        assert rel_err(out, ref) <= TOL[dtype], rel_err(out, ref)
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        else:  # float32 accumulation, one rounding: at most one unit (2^-7 relative) off the einsum's
            ulp = 2.0**-7 * ref.float().abs().clamp_min(1e-3)
            assert bool(((out.float() - ref.float()).abs() <= ulp).all())


@interp
@pytest.mark.parametrize("name", ["tiny", "odd"])
@pytest.mark.parametrize("B", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_matches_reference(name, B, dtype):
    check(SHAPES[name], B, dtype)


@interp
@pytest.mark.parametrize("name", ["deepseek_16h", "kimi_32h"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_real_head_shapes(name, dtype):
    check(SHAPES[name], 3 if dtype == torch.bfloat16 else 1, dtype)


@interp
def test_interp_more_rows_than_a_program_holds(monkeypatch):
    """B = 5 with MAX_ROWS 2: three row groups along the grid, the last one partial."""
    from attnlab.kernels import absorb

    monkeypatch.setattr(absorb, "MAX_ROWS", 2)
    check(SHAPES["odd"], 5, torch.float32, seed=1)


@interp
def test_interp_reduction_longer_than_a_tile(monkeypatch):
    """Smaller tiles than the launchers pick at real sizes: unabsorb_o's loop over R in several
    blocks (R 40 in blocks of 16, the last partial) and absorb_q's narrower column blocks."""
    from attnlab.kernels import absorb

    monkeypatch.setattr(absorb, "MAX_BK", 16)
    monkeypatch.setattr(absorb, "TILE", 64)
    check(SHAPES["odd"], 3, torch.float32, seed=2)
    check(SHAPES["odd"], 2, torch.bfloat16, seed=3)


@interp
@pytest.mark.parametrize("which", ["absorb_q", "unabsorb_o"])
def test_interp_custom_op_schema_and_fake(which):
    from attnlab.kernels import absorb

    q_nope, w_uk, o_lat, w_uv = views(SHAPES["odd"], 2, torch.float32)
    op, args = ((absorb._absorb_q_op, (q_nope, w_uk)) if which == "absorb_q"
                else (absorb._unabsorb_o_op, (o_lat, w_uv)))
    result = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    assert result == {"test_schema": "SUCCESS", "test_faketensor": "SUCCESS"}


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["deepseek_16h", "kimi_32h"])
@pytest.mark.parametrize("B", [1, 3, 8, 11])
def test_gpu_matches_reference(name, B):
    from attnlab.kernels.absorb import absorb_q, absorb_q_reference, unabsorb_o, unabsorb_o_reference

    q_nope, w_uk, o_lat, w_uv = views(SHAPES[name], B, torch.bfloat16, device="cuda")
    assert rel_err(absorb_q(q_nope, w_uk), absorb_q_reference(q_nope, w_uk)) <= TOL[torch.bfloat16]
    assert rel_err(unabsorb_o(o_lat, w_uv), unabsorb_o_reference(o_lat, w_uv)) <= TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_cuda_graph_and_compile():
    """Both kernels captured in a CUDA graph (chained, PDL on) and replayed on new inputs; and kept
    by torch.compile(fullgraph=True)."""
    from attnlab.kernels.absorb import absorb_q, absorb_q_reference, unabsorb_o, unabsorb_o_reference

    q_nope, w_uk, o_lat, w_uv = views(SHAPES["deepseek_16h"], 2, torch.bfloat16, device="cuda")

    def step():
        q_lat = absorb_q(q_nope, w_uk)  # (B, H, R)
        return q_lat, unabsorb_o(q_lat, w_uv)  # (B, H, dv)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for seed in range(2):
        q_nope.copy_(views(SHAPES["deepseek_16h"], 2, torch.bfloat16, device="cuda", seed=seed + 5)[0])
        graph.replay()
        torch.cuda.synchronize()
        q_ref = absorb_q_reference(q_nope, w_uk)
        assert rel_err(static[0], q_ref) <= TOL[torch.bfloat16]
        assert rel_err(static[1], unabsorb_o_reference(static[0], w_uv)) <= TOL[torch.bfloat16]
    out = torch.compile(step, fullgraph=True)()
    assert rel_err(out[1], unabsorb_o_reference(out[0], w_uv)) <= TOL[torch.bfloat16]
