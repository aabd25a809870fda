"""The fused G / K decode step (attnlab.kernels.delta_decode) against its torch reference, and the
reference against the layer's own T == 1 branch.

Three ways to run (as tests/test_kernels_decode.py):
- CPU, no interpreter: delta_decode_reference == DeltaRuleMixer.forward's decode branch; input checks;
- CPU tensors under ``TRITON_INTERPRET=1`` (tiny, odd head dims, GQA): ``test_interpreter_suite``
  re-runs this file's ``interp_`` tests in a subprocess, or
  ``TRITON_INTERPRET=1 pytest tests/test_kernels_delta_decode.py -k interp_``;
- a CUDA machine: the tests marked ``gpu`` (Qwen3-Next / Kimi Linear head shapes, bf16, CUDA graph).

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

from attnlab.layers.deltanet import GatedDeltaNet, KimiDeltaAttention

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
D_MODEL = 32


_poison = poison_outputs("delta_decode")

def build(kind: str, h: int, hk: int, dk: int, dv: int, dtype=torch.float32, device="cpu", d_model=D_MODEL,
          seed: int = 0):
    torch.manual_seed(seed)
    cls = GatedDeltaNet if kind == "G" else KimiDeltaAttention
    with torch.device(device):
        mixer = cls(d_model, h, hk, dk, dv)
    with torch.no_grad():  # a non-trivial norm weight (it starts at ones)
        mixer.o_norm.weight.uniform_(0.5, 1.5)
    return mixer.to(dtype).eval()


def step_inputs(mixer, x: torch.Tensor):
    """x [B, 1, d_model] -> (proj [B, P], f_up, g_up) as the layer computes them."""
    proj, parts = mixer.project(x)
    if not isinstance(mixer, KimiDeltaAttention):
        return proj[:, 0], None, None
    f_up = parts["f_up"] if "f_up" in parts else mixer.f_b_proj(parts["f"])  # (B, 1, H*D_k)
    g_up = parts["g_up"] if "g_up" in parts else mixer.g_b_proj(parts["g"])  # (B, 1, H*D_v)
    return proj[:, 0], f_up[:, 0], g_up[:, 0]


def prefilled(mixer, batch: int, t: int, conv_dtype=torch.float32, seed: int = 1):
    """A cache after a t-token prefill through the layer: non-zero state and conv history."""
    dev = mixer.A_log.device
    dtype = mixer.in_proj.weight.dtype
    gen = torch.Generator().manual_seed(seed)
    cache = mixer.new_cache(batch, t + 8, device=dev, dtype=conv_dtype)
    x = torch.randn(batch, t, mixer.d_model, generator=gen).to(device=dev, dtype=dtype)
    mixer(x, cache)
    return cache


def strided(x: torch.Tensor, pad: int = 5) -> torch.Tensor:
    """The same values with a row stride larger than the row (a view into a wider buffer)."""
    buf = torch.full((x.shape[0], x.shape[1] + 2 * pad), float("nan"), dtype=x.dtype, device=x.device)
    buf[:, pad : pad + x.shape[1]] = x
    return buf[:, pad : pad + x.shape[1]]


def compare_steps(mixer, cache, n_steps: int, tol: float, seed: int = 2, strided_rows: bool = False,
                  gates_given: bool = True):
    """n_steps tokens through delta_decode on `cache` and the reference on a clone of it: o, the
    state and the conv state must agree after every step. K with gates_given=False: f_up / g_up
    None (the kernel applies the up-projections itself, the reference the mixer's Linears)."""
    from attnlab.kernels.delta_decode import delta_decode, delta_decode_reference

    ref_cache = copy.deepcopy(cache)
    lengths = cache.lengths.clone()
    gen = torch.Generator().manual_seed(seed)
    dev, dtype = mixer.A_log.device, mixer.in_proj.weight.dtype
    for step in range(n_steps):
        x = torch.randn(cache.state.shape[0], 1, mixer.d_model, generator=gen).to(device=dev, dtype=dtype)
        proj, f_up, g_up = step_inputs(mixer, x)
        if not gates_given:
            f_up = g_up = None
        if strided_rows:
            proj = strided(proj)
            f_up, g_up = (None if t is None else strided(t, 3) for t in (f_up, g_up))
        o = delta_decode(mixer, proj, cache, f_up, g_up)
        want = delta_decode_reference(mixer, proj, ref_cache, f_up, g_up)
        assert o.shape == (proj.shape[0], mixer.value_dim) and o.dtype == proj.dtype
        assert torch.isfinite(o).all(), f"step {step}: unwritten (NaN) output"
        assert rel_err(o, want) <= tol, f"step {step}: o {rel_err(o, want):.2e}"
        assert rel_err(cache.state, ref_cache.state) <= tol, f"step {step}: state"
        assert torch.equal(cache.conv_state, ref_cache.conv_state), f"step {step}: conv state"
    assert torch.equal(cache.lengths, lengths), "delta_decode must leave cache.lengths to the layer"


# ---------------------------------------------------------------------------------------------
# CPU: the subprocess runner, the reference against the layer, input checks


@needs_triton
def test_interpreter_suite():
    run_interpreter_suite(__file__)


@pytest.mark.parametrize("kind, h, hk, dk, dv, dtype", [
    ("G", 4, 2, 24, 40, torch.float32),
    ("G", 2, 1, 16, 16, torch.bfloat16),
    ("K", 2, 2, 32, 24, torch.float32),  # D_k != D_v: the gates' up-projections are not fused
    ("K", 4, 2, 16, 16, torch.bfloat16),  # fused f_up / g_up
])
@torch.no_grad()
def test_reference_is_the_layers_decode_branch(kind, h, hk, dk, dv, dtype):
    """o_proj(delta_decode_reference(...)) is the layer's own T == 1 output, and both leave the same
    cache (the layer also counts the token in lengths, the reference does not)."""
    from attnlab.kernels.delta_decode import delta_decode_reference

    mixer = build(kind, h, hk, dk, dv, dtype)
    layer_cache = prefilled(mixer, 2, 5)
    ref_cache = copy.deepcopy(layer_cache)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(2, 1, D_MODEL, generator=gen).to(dtype)
        y = mixer(x, layer_cache)[:, 0]  # (B, d_model)
        o = delta_decode_reference(mixer, *step_inputs(mixer, x)[:1], ref_cache, *step_inputs(mixer, x)[1:])
        assert o.shape == (2, h * dv) and o.dtype == dtype
        torch.testing.assert_close(mixer.o_proj(o), y, rtol=0, atol=0)
        assert torch.equal(layer_cache.state, ref_cache.state)
        assert torch.equal(layer_cache.conv_state, ref_cache.conv_state)
    assert (layer_cache.lengths == 7).all() and (ref_cache.lengths == 5).all()


@pytest.mark.parametrize("dk, dv, dtype", [(32, 24, torch.float32), (16, 16, torch.bfloat16)])
@torch.no_grad()
def test_reference_computes_missing_gates_as_the_layer(dk, dv, dtype):
    """K with f_up / g_up None: the reference applies f_b_proj / g_b_proj to proj's f / g columns.
    Unfused gates (D_k != D_v): exactly the layer's values; fused (the layer's bmm): the same up to
    the matmul's accumulation order."""
    from attnlab.kernels.delta_decode import delta_decode_reference

    mixer = build("K", 2, 2, dk, dv, dtype)
    given_cache = prefilled(mixer, 2, 5)
    none_cache = copy.deepcopy(given_cache)
    x = torch.randn(2, 1, D_MODEL, generator=torch.Generator().manual_seed(4)).to(dtype)
    proj, f_up, g_up = step_inputs(mixer, x)
    want = delta_decode_reference(mixer, proj, given_cache, f_up, g_up)
    o = delta_decode_reference(mixer, proj, none_cache)
    if dk != dv:
        assert torch.equal(o, want) and torch.equal(none_cache.state, given_cache.state)
    else:
        assert rel_err(o, want) <= TOL[dtype] and rel_err(none_cache.state, given_cache.state) <= TOL[dtype]
    assert torch.equal(none_cache.conv_state, given_cache.conv_state)


@needs_triton
@torch.no_grad()
def test_bad_inputs_raise():
    from attnlab.kernels.delta_decode import delta_decode_reference

    g = build("G", 2, 1, 16, 16)
    k = build("K", 2, 2, 16, 16)
    cache_g, cache_k = g.new_cache(2, 4), k.new_cache(2, 4)
    proj_g, _, _ = step_inputs(g, torch.randn(2, 1, D_MODEL))
    proj_k, f_up, g_up = step_inputs(k, torch.randn(2, 1, D_MODEL))
    with pytest.raises(ValueError, match="proj"):
        delta_decode_reference(g, proj_g[:, :-1], cache_g)
    with pytest.raises(ValueError, match="proj"):
        delta_decode_reference(g, proj_g[:, None], cache_g)
    with pytest.raises(ValueError, match="proj"):  # last dim strided
        delta_decode_reference(g, torch.randn(proj_g.shape[1], 2).t(), cache_g)
    with pytest.raises(ValueError, match="f_up"):
        delta_decode_reference(g, proj_g, cache_g, f_up=f_up)
    with pytest.raises(ValueError, match="f_up"):
        delta_decode_reference(k, proj_k, cache_k, g_up=g_up)
    with pytest.raises(ValueError, match="g_up"):
        delta_decode_reference(k, proj_k, cache_k, f_up, g_up[:, :-1])
    with pytest.raises(ValueError, match="g_up"):  # f_up without g_up
        delta_decode_reference(k, proj_k, cache_k, f_up)
    with pytest.raises(ValueError, match="proj"):  # gates computed from proj: its dtype must be the weights'
        delta_decode_reference(k, proj_k.double(), cache_k)
    with pytest.raises(ValueError, match="cache.state"):
        delta_decode_reference(g, proj_g[:1], cache_g)  # one row of proj, a cache of two
    with pytest.raises(ValueError, match="cache"):
        delta_decode_reference(g, proj_g, cache_k)  # another layer's cache shape
    with pytest.raises(ValueError, match="mixer"):
        delta_decode_reference(torch.nn.Linear(2, 2), proj_g, cache_g)


@needs_triton
def test_value_blocks(monkeypatch):
    """V_BLOCK splits D_v into ceil(D_v / V_BLOCK) blocks, or one block of the whole padded row when
    V_BLOCK >= D_v; anything but a power of two is refused."""
    import attnlab.kernels.delta_decode as kd

    for v_block, dv, want in [(32, 128, (32, 4)), (16, 40, (16, 3)), (128, 128, (128, 1)), (64, 40, (64, 1)),
                              (32, 12, (16, 1)), (8, 32, (8, 4))]:
        monkeypatch.setattr(kd, "V_BLOCK", v_block)
        assert kd.value_blocks(dv) == want, (v_block, dv)
    monkeypatch.setattr(kd, "V_BLOCK", 24)
    with pytest.raises(ValueError, match="V_BLOCK"):
        kd.value_blocks(128)


@needs_triton
@torch.no_grad()
def test_cpu_tensors_need_the_interpreter():
    if INTERPRETED:
        pytest.skip("the interpreter makes CPU tensors usable")
    from attnlab.kernels.delta_decode import delta_decode

    g = build("G", 2, 1, 16, 16)
    proj, _, _ = step_inputs(g, torch.randn(2, 1, D_MODEL))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        delta_decode(g, proj, g.new_cache(2, 4))


@needs_sm90_toolchain
@pytest.mark.parametrize("kind, h, hk, d, v_block, max_stack", [
    ("G", 32, 16, 128, 32, 0), ("K", 16, 16, 128, 32, 64),  # ~1B qwen3-next / kimi-linear at the default
    ("G", 32, 16, 128, 16, 0), ("G", 32, 16, 128, 128, 0), ("K", 16, 16, 128, 128, 0),  # whole rows
    ("K", 32, 32, 64, 32, 0),  # D = 64
])
@pytest.mark.parametrize("pf_state", [False, True])
def test_compiles_for_sm90_at_real_shapes(kind, h, hk, d, v_block, max_stack, pf_state, monkeypatch):
    """What the interpreter cannot check: the kernel compiles for an H100 (sm_90, Triton's bundled
    ptxas, no GPU needed) at D_k = D_v = 128 and 64, bf16, with the warps delta_decode launches, as the
    fused decode step runs it (counting the token, PDL, K's gates' up-projections in the kernel).
    Triton 3.9, D = 128, V_BLOCK 32 (4 warps): G 168 registers and no stack; K with its 128 x 64
    up-projection weights 255 registers and 32 bytes of stack (0 at 8 warps: NUM_WARPS); V_BLOCK 16
    (G 95 registers, K 255) and whole rows (V_BLOCK 128: 16 warps, 115-128) spill nothing; V_BLOCK 64
    (8 warps) neither (G 171, K 255), not compiled here to save time. With the state's L2 request
    before the PDL wait (pf_state, as the GPU launches it; not for whole rows): G 165 / K 255
    registers, K 48 bytes of stack."""
    import attnlab.kernels.delta_decode as kd

    monkeypatch.setattr(kd, "V_BLOCK", v_block)
    mixer = build(kind, h, hk, d, d, d_model=16)
    const = kd.launch_constants(mixer, up=kind == "K")
    const = dict(const, COUNT=True, PDL=True, PF_STATE=pf_state and kd.prefetches_state(const))
    ptr = dict(proj="*bf16", dec="*bf16", gate="*bf16", conv_w="*bf16", conv_b="*bf16", conv_state="*bf16",
               a_log="*fp32", dt_bias="*fp32", norm_w="*fp32", state="*fp32", o="*bf16", lengths="*i64",
               w_f="*bf16", w_g="*bf16", tickets="*i32", scratch="*fp32")
    warps = kd.num_warps(const["BK"], const["BV"])
    kernel = compile_sm90(kd._delta_decode_kernel, const, ptr, floats=("scale", "eps"), num_warps=warps)
    regs, stack, _ = sm90_usage(kernel)
    print(f"{kind} H={h} H_k={hk} D={d} V_BLOCK={v_block} ({warps} warps): {regs} registers, "
          f"{stack} bytes of stack")
    assert const["NVB"] == -(-d // v_block) and regs <= 255
    assert stack <= max_stack, f"{regs} registers, {stack} bytes of stack"
    ptx = kernel.asm["ptx"]
    if const["NVB"] * h // hk > 1:  # the last-arriver ticket: one GPU-scope acq_rel atomic per program
        assert ptx.count("atom.global.gpu.acq_rel.add") == 1, "expected one acq_rel ticket atomic"
    if const["NVB"] > 1:  # the row gathered from the scratch past L1
        assert "ld.global.cg" in ptx


# ---------------------------------------------------------------------------------------------
# interpreter (CPU tensors, TRITON_INTERPRET=1)


@interp
@pytest.mark.parametrize("kind, h, hk, dk, dv, dtype, conv_dtype", [
    ("G", 4, 2, 24, 40, torch.float32, torch.float32),  # GQA, odd head dims
    ("G", 4, 1, 16, 32, torch.bfloat16, torch.bfloat16),  # 4 value heads per key head
    ("G", 2, 1, 72, 40, torch.float32, torch.float32),  # tile 128 x 64 > 64 x 64: SPLIT, two heads
    ("G", 3, 3, 32, 16, torch.float16, torch.float32),
    ("K", 2, 2, 32, 24, torch.float32, torch.float32),  # unfused gates (D_k != D_v)
    ("K", 4, 2, 16, 16, torch.bfloat16, torch.float32),  # fused gates, GQA
])
@torch.no_grad()
def test_interp_matches_reference_over_steps(kind, h, hk, dk, dv, dtype, conv_dtype):
    mixer = build(kind, h, hk, dk, dv, dtype, seed=h + dk)
    cache = prefilled(mixer, 2, 5, conv_dtype)
    assert cache.state.abs().amax() > 0 and cache.conv_state.abs().amax() > 0
    compare_steps(mixer, cache, 3, TOL[dtype], strided_rows=dtype == torch.float32)


@interp
@pytest.mark.parametrize("h, hk, dk, dv, dtype", [
    (3, 3, 20, 12, torch.float32),  # odd D_k, D_v and rank (= D_v = 12 in a 16-wide block)
    (2, 2, 32, 24, torch.float32),  # rank 24 in 32
    (4, 2, 16, 16, torch.bfloat16),  # two value heads per program, bf16 rounding of f_up / g_up
    (3, 1, 16, 20, torch.float16),  # three value heads per key head (the third one on its own)
    (2, 1, 72, 40, torch.float32),  # tile 128 x 64 > 64 x 64: SPLIT, two heads
])
@torch.no_grad()
def test_interp_kda_gates_in_kernel(h, hk, dk, dv, dtype):
    """K with f_up / g_up None: the kernel's own up-projections (W_f, W_g rows per value head from
    proj's f / g columns) against the reference's f_b_proj / g_b_proj, over steps (strided proj
    rows at float32)."""
    mixer = build("K", h, hk, dk, dv, dtype, seed=h + dk + 1)
    cache = prefilled(mixer, 2, 5)
    compare_steps(mixer, cache, 3, TOL[dtype], strided_rows=dtype == torch.float32, gates_given=False)


@interp
@pytest.mark.parametrize("kind, h, hk, dk, dv, v_block, gates_given", [
    ("G", 4, 2, 16, 32, 8, True),  # 4 blocks per value head, 8 programs per key head's ticket
    ("G", 4, 1, 24, 40, 16, True),  # a partial last block (40 = 16 + 16 + 8), 4 value heads per key head
    ("K", 2, 2, 16, 32, 16, True),  # f_up / g_up given; one value head per key head
    ("K", 4, 2, 16, 32, 8, False),  # the gates' up-projections in the kernel: g's rows per block
])
@torch.no_grad()
def test_interp_value_blocks_match_reference(kind, h, hk, dk, dv, v_block, gates_given, monkeypatch):
    """V_BLOCK < D_v: each value head's columns over several programs (the state's columns, the gated
    RMSNorm over the whole row by the key head's last arriver, the q/k conv history shifted by it)
    against the reference over two steps, bf16 so the rounding of o before the norm matters; the
    token counted once per row."""
    import attnlab.kernels.delta_decode as kd

    monkeypatch.setattr(kd, "V_BLOCK", v_block)
    assert kd.value_blocks(dv)[1] > 1
    mixer = build(kind, h, hk, dk, dv, torch.bfloat16, seed=h + dv)
    cache = prefilled(mixer, 2, 5, torch.bfloat16)
    compare_steps(mixer, cache, 1, TOL[torch.bfloat16], gates_given=gates_given)
    ref_cache = copy.deepcopy(cache)  # a second step from the first's shifted conv history, counting
    proj, f_up, g_up = step_inputs(mixer, torch.randn(2, 1, D_MODEL).to(torch.bfloat16))
    if not gates_given:
        f_up = g_up = None
    o = kd.delta_decode(mixer, proj, cache, f_up, g_up, count_token=True)
    want = kd.delta_decode_reference(mixer, proj, ref_cache, f_up, g_up, count_token=True)
    assert rel_err(o, want) <= TOL[torch.bfloat16]
    assert torch.equal(cache.lengths, ref_cache.lengths) and (cache.lengths == 6).all()


@interp
@pytest.mark.parametrize("v_block", [8, 32])
@torch.no_grad()
def test_interp_tickets_are_zero_after_a_call(v_block, monkeypatch):
    """The key heads' tickets are back at zero after every launch (the last arriver resets its own),
    so the next launch or a CUDA-graph replay starts from a clean count; they are created once per
    size and reused."""
    import attnlab.kernels.delta_decode as kd

    monkeypatch.setattr(kd, "V_BLOCK", v_block)
    mixer = build("G", 4, 2, 16, 32)
    cache = prefilled(mixer, 2, 4)
    proj, _, _ = step_inputs(mixer, torch.randn(2, 1, D_MODEL))
    kd.delta_decode(mixer, proj, cache)
    tickets = kd._BUFFERS[("tickets", proj.device, 2 * 2)]  # [B · H_k] int32
    assert tickets.dtype == torch.int32 and torch.equal(tickets, torch.zeros_like(tickets))
    kd.delta_decode(mixer, proj, cache)
    assert kd._BUFFERS[("tickets", proj.device, 2 * 2)] is tickets, "allocated again"
    assert not tickets.any()
    if kd.value_blocks(32)[1] > 1:
        assert kd._BUFFERS[("scratch", proj.device, 2 * 4 * 2 * 32)].dtype == torch.float32


@interp
@torch.no_grad()
def test_interp_kda_gates_in_kernel_match_given_gates():
    """The same step with the gates passed in and computed in the kernel: the same o and state up
    to the up-projections' accumulation order (float32: 1e-5); a kernel that skipped the gates or
    used the wrong weight rows fails this."""
    from attnlab.kernels.delta_decode import delta_decode

    mixer = build("K", 4, 4, 16, 24, seed=7)
    cache = prefilled(mixer, 2, 5)
    start, none_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    x = torch.randn(2, 1, D_MODEL, generator=torch.Generator().manual_seed(8))
    proj, f_up, g_up = step_inputs(mixer, x)
    o = delta_decode(mixer, proj, cache, f_up, g_up, count_token=True)
    o_none = delta_decode(mixer, proj, none_cache, count_token=True)
    tol = TOL[torch.float32]
    assert rel_err(o_none, o) <= tol and rel_err(none_cache.state, cache.state) <= tol
    assert torch.equal(none_cache.conv_state, cache.conv_state)
    assert torch.equal(none_cache.lengths, cache.lengths)
    # and not trivially: another head's decay inputs (f_up rolled by one head) give another output
    assert rel_err(delta_decode(mixer, proj, start, f_up.roll(16, 1), g_up), o) > 1e-3


@interp
@pytest.mark.parametrize("kind, hk", [("G", 1), ("K", 2)])
@torch.no_grad()
def test_interp_count_token_adds_one_per_row(kind, hk):
    """count_token=True: lengths += 1 once per row (one key head's program counts it), kernel and
    reference alike; o and the states as without it."""
    from attnlab.kernels.delta_decode import delta_decode, delta_decode_reference

    mixer = build(kind, 4, hk, 16, 16, seed=3)
    cache = prefilled(mixer, 3, 4)
    ref_cache = copy.deepcopy(cache)
    x = torch.randn(3, 1, mixer.d_model, generator=torch.Generator().manual_seed(5))
    proj, f_up, g_up = step_inputs(mixer, x)
    o = delta_decode(mixer, proj, cache, f_up, g_up, count_token=True)
    want = delta_decode_reference(mixer, proj, ref_cache, f_up, g_up, count_token=True)
    assert cache.lengths.tolist() == ref_cache.lengths.tolist() == [5, 5, 5]
    tol = TOL[torch.float32]
    assert rel_err(o, want) <= tol and rel_err(cache.state, ref_cache.state) <= tol


@interp
@pytest.mark.parametrize("kind", ["G", "K"])
@pytest.mark.parametrize("a_log, dt_bias", [
    (8.0, 25.0),  # A ≈ 3000, softplus past its threshold: decay e^-75000, the state is wiped each step
    (-25.0, 0.0),  # A ≈ 1e-11: no decay at all
    (0.0, -30.0),  # softplus(≈ -30) ≈ 1e-13: no decay either
    (0.0, 3.0),  # softplus(≈ 3) ≈ 3.05: a decay of e^-3, below softplus's threshold of 20
])
@torch.no_grad()
def test_interp_extreme_gates(kind, a_log, dt_bias):
    mixer = build(kind, 2, 1 if kind == "G" else 2, 16, 24)
    cache = prefilled(mixer, 2, 4)
    mixer.A_log.fill_(a_log)
    mixer.dt_bias.fill_(dt_bias)
    compare_steps(mixer, cache, 2, TOL[torch.float32])


@interp
@torch.no_grad()
def test_interp_wiped_state_is_one_write():
    """With a decay of e^-75000 the state after a step is exactly β k uᵀ from a zero state: the
    same as the step from a zeroed cache (the old state is forgotten, not mixed in)."""
    from attnlab.kernels.delta_decode import delta_decode

    mixer = build("G", 2, 2, 16, 16)
    cache = prefilled(mixer, 2, 4)
    mixer.A_log.fill_(8.0)
    mixer.dt_bias.fill_(25.0)
    fresh = copy.deepcopy(cache)
    fresh.state.zero_()
    proj, _, _ = step_inputs(mixer, torch.randn(2, 1, D_MODEL))
    o = delta_decode(mixer, proj, cache)
    o_fresh = delta_decode(mixer, proj, fresh)
    assert torch.equal(o, o_fresh) and torch.equal(cache.state, fresh.state)


@interp
@torch.no_grad()
def test_interp_empty_batch_and_bias():
    """A conv with a bias (not in the presets, supported) and a zero-row batch."""
    from attnlab.kernels.delta_decode import delta_decode
    from attnlab.layers.common import ShortConv

    mixer = build("G", 2, 1, 16, 16)
    conv = ShortConv(mixer.conv.channels, mixer.conv.kernel_size, bias=True)
    with torch.no_grad():
        conv.weight.copy_(mixer.conv.weight)
        conv.bias.uniform_(-0.5, 0.5)
    mixer.conv = conv
    compare_steps(mixer, prefilled(mixer, 2, 3), 2, TOL[torch.float32])
    empty = mixer.new_cache(0, 4)
    assert delta_decode(mixer, torch.zeros(0, sum(mixer.in_sizes.values())), empty).shape == (0, 32)


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kind, h, hk, d, gates_given", [
    ("G", 16, 16, 128, True), ("G", 32, 16, 128, True), ("K", 16, 16, 128, True),
    ("K", 16, 16, 128, False), ("K", 32, 32, 64, False),  # K's gates in the kernel (the fused step)
])
@pytest.mark.parametrize("v_block", [16, 32, 128])
@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_gpu_real_shapes(kind, h, hk, d, gates_given, v_block, batch, monkeypatch):
    """Qwen3-Next-style (32 value heads over 16 key heads) / Kimi Linear heads at D_k = D_v = 128 (and
    the ~1B Kimi preset's 32 x 64), conv 4, bf16 model with a bf16 conv state, after a 64-token
    prefill; 4 steps against the reference at V_BLOCK 16 / 32 / 128 (8 / 4 / 1 programs per value
    head); the tickets are zero afterwards."""
    import attnlab.kernels.delta_decode as kd

    monkeypatch.setattr(kd, "V_BLOCK", v_block)
    mixer = build(kind, h, hk, d, d, torch.bfloat16, device="cuda", d_model=1024)
    cache = prefilled(mixer, batch, 64, torch.bfloat16)
    compare_steps(mixer, cache, 4, TOL[torch.bfloat16], gates_given=gates_given)
    torch.cuda.synchronize()
    assert not kd._BUFFERS[("tickets", cache.state.device, batch * hk)].any()


@pytest.mark.gpu
@pytest.mark.parametrize("kind, h, hk", [("G", 32, 16), ("G", 32, 8), ("K", 32, 32)])
@pytest.mark.parametrize("v_block", [16, 32])
@torch.no_grad()
def test_gpu_many_programs_race(kind, h, hk, v_block, monkeypatch):
    """The cross-program ordering under load: 16 rows x 32 value heads x 4-8 value blocks (2048-4096
    programs, 16-64 per ticket), 12 steps; the conv state (whose q/k history only the last arriver may
    shift) must equal the reference's exactly after every step, o and the state within bf16
    tolerance, and lengths counted once per row per step."""
    import attnlab.kernels.delta_decode as kd

    monkeypatch.setattr(kd, "V_BLOCK", v_block)
    mixer = build(kind, h, hk, 128, 128, torch.bfloat16, device="cuda", d_model=512)
    cache = prefilled(mixer, 16, 16, torch.bfloat16)
    ref_cache = copy.deepcopy(cache)
    gen = torch.Generator().manual_seed(11)
    for step in range(12):
        x = torch.randn(16, 1, 512, generator=gen).to(device="cuda", dtype=torch.bfloat16)
        proj, f_up, g_up = step_inputs(mixer, x)
        o = kd.delta_decode(mixer, proj, cache, f_up, g_up, count_token=True)
        want = kd.delta_decode_reference(mixer, proj, ref_cache, f_up, g_up, count_token=True)
        assert torch.equal(cache.conv_state, ref_cache.conv_state), f"step {step}: conv state"
        assert rel_err(o, want) <= TOL[torch.bfloat16], f"step {step}: o"
        assert rel_err(cache.state, ref_cache.state) <= TOL[torch.bfloat16], f"step {step}: state"
    assert torch.equal(cache.lengths, ref_cache.lengths)
    assert not kd._BUFFERS[("tickets", cache.state.device, 16 * hk)].any()


@pytest.mark.gpu
@pytest.mark.parametrize("kind, gates_given", [("K", True), ("K", False), ("G", True)])
@pytest.mark.parametrize("v_block", [16, 32, 128])
@torch.no_grad()
def test_gpu_cuda_graph_replay(kind, gates_given, v_block, monkeypatch):
    """Captured once, replayed on new inputs written into the captured proj: the graph steps the
    live cache as the eager reference does (no host sync or allocation-dependent pointer inside; the
    tickets and scratch made before the capture, the tickets zero after each replay)."""
    import attnlab.kernels.delta_decode as kd

    monkeypatch.setattr(kd, "V_BLOCK", v_block)
    h, hk = (16, 16) if kind == "K" else (32, 16)
    mixer = build(kind, h, hk, 128, 128, torch.bfloat16, device="cuda", d_model=1024)
    cache = prefilled(mixer, 2, 32, torch.bfloat16)
    ref_cache = copy.deepcopy(cache)
    x = torch.randn(2, 1, 1024, device="cuda", dtype=torch.bfloat16)
    proj, f_up, g_up = (None if t is None else t.clone() for t in step_inputs(mixer, x))
    if not gates_given:
        f_up = g_up = None
    kd.delta_decode(mixer, proj, copy.deepcopy(cache), f_up, g_up)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kd.delta_decode(mixer, proj, cache, f_up, g_up, count_token=True)
    tickets = kd._BUFFERS[("tickets", proj.device, 2 * hk)]
    for seed in range(3):
        torch.manual_seed(seed)
        new = step_inputs(mixer, torch.randn(2, 1, 1024, device="cuda", dtype=torch.bfloat16))
        for dst, src in zip((proj, f_up, g_up), new, strict=True):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        want = kd.delta_decode_reference(mixer, proj, ref_cache, f_up, g_up, count_token=True)
        assert rel_err(out, want) <= TOL[torch.bfloat16], f"replay {seed}"
        assert rel_err(cache.state, ref_cache.state) <= TOL[torch.bfloat16]
        assert torch.equal(cache.conv_state, ref_cache.conv_state)
        assert torch.equal(cache.lengths, ref_cache.lengths)
        assert not tickets.any()
