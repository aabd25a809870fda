"""Ops per decode step (benchmarks/decode_ops.py) as a regression guard, and the pieces that cut them:
fused q/k/v and gate/up weights (FusedLinears) and RoPE over whole heads (RotaryEmbedding.rotate)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from attnlab import ModelConfig
from attnlab.layers.common import FusedLinears, Residual, RotaryEmbedding, SwiGLU, apply_rope

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

# Ops one batch-1 decode step launches on the CUDA branch (bf16), per layer and in total over two
# periods of the layer pattern (so that per-step sharing across layers counts), as counted when issue
# 4's cuts landed (before them: llama S 31, total 66; qwen3-next G 43, S 53, total 372). An op added
# back to the decode path fails this test; lower the numbers when you cut more.
MAX_OPS = {
    "llama": ({"S": 16}, 39),
    "qwen3-next": ({"G": 30, "S": 27}, 243),
    # M / D (issue 4, second part; d_model 256, two layers; the totals include the step's shared RoPE
    # tables): before, M 43 (total 90) and D 76 with the multi-program top-k (68 with the one-launch
    # top-k; total 144). D 30 -> 31: a decode row's top-k is now _topk_fused (one launch, 13 vs 72 us
    # on an H100 at 4K) after a zero fill of its barrier counters, where _topk_row was one launch
    "deepseek-v3": ({"M": 25}, 57),
    "deepseek-v32": ({"D": 31}, 69),
}


@pytest.fixture(scope="module")
def decode_ops():
    pytest.importorskip("triton")  # the CUDA branch runs the real kernel wrappers (attnlab.kernels)
    spec = importlib.util.spec_from_file_location("decode_ops", BENCH / "decode_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counted_within(decode_ops, preset: str, limits: tuple[dict, int], branch: str):
    """One decode step of ``preset`` (two periods of its pattern, d_model 256, two kv heads: the GQA
    decode kernel's branch, as at the ~1B size; one kv head would take MLA's) counted on ``branch``,
    checked against (ops per layer type, ops per step) -> (model, count)."""
    per_layer, total = limits
    n_layers = 2 * len(ModelConfig.preset(preset).pattern)
    model = decode_ops.build(preset, d_model=256, n_kv_heads=2, n_layers=n_layers)
    r = decode_ops.count_step(model, branch=branch)
    assert r["host_syncs"] == []
    for letter, n in per_layer.items():
        assert r["per_type"][letter]["total"] <= n, (letter, r["per_type"][letter], r["ops"])
    assert r["total"] <= total, r["total"]
    return model, r


@pytest.mark.parametrize("preset", sorted(MAX_OPS))
def test_ops_per_decode_step_do_not_grow(decode_ops, preset):
    model, r = counted_within(decode_ops, preset, MAX_OPS[preset], "cuda")
    assert set(r["per_type"]) == set(MAX_OPS[preset][0])
    # the stand-in Triton launches compute what the torch path computes
    ref = decode_ops.count_step(model, branch="torch")
    torch.testing.assert_close(r["logits"], ref["logits"], atol=2e-2, rtol=2e-2)
    assert ref["total"] > r["total"]  # the CPU decomposes rms_norm and runs the torch steps


# The fused decode step (attnlab.layers.fused, what a CUDA bf16 step takes; benchmarks/decode_ops.py
# --branch fused counts each Triton launch of it as the kernel does, computing its torch reference):
# launches per layer and per step (two periods of the pattern, d_model 256), as counted when it landed
# (the step without it: llama S 16 per layer, total 39). D: its own fused step (fused._sparse_latent:
# 2 GEMVs, the q absorption, latent_write with the indexer's part, lengths += 1, index scores, top-k
# with its zeroed counters, sparse attention, W_UV, o_proj GEMV; then the MLP's 2 GEMVs) = 13, total 28;
# before it the layer's own step behind the fused MLP: D 27, total 59. M / D 11 / 13 -> 9 / 11 (kimi-linear's
# M 10 -> 8): latent_write counts the token (no lengths += 1) and computes W_UK^T q_nope in its launch
# (fused.FOLD_ABSORB_Q; the einsum was a cuBLAS bmm), W_UV's einsum became a Triton launch (same count).
MAX_OPS_FUSED = {
    "llama": ({"S": 7}, 16),
    "qwen3-next": ({"G": 5, "S": 8}, 48),
    "kimi-linear": ({"K": 5, "M": 8}, 48),
    "deepseek-v3": ({"M": 9}, 20),
    "deepseek-v32": ({"D": 11}, 24),
}


@pytest.mark.parametrize("preset", sorted(MAX_OPS_FUSED))
def test_launches_per_fused_decode_step_do_not_grow(decode_ops, preset):
    model, r = counted_within(decode_ops, preset, MAX_OPS_FUSED[preset], "fused")
    assert r["total"] < decode_ops.count_step(model, branch="cuda")["total"]
    # the stand-ins compute the kernels' torch references: the same logits as the plain CPU step
    ref = decode_ops.count_step(model, branch="torch")
    torch.testing.assert_close(r["logits"], ref["logits"], atol=2e-2, rtol=2e-2)


def test_counter_sees_added_ops(decode_ops):
    """The guard can fail: an op added to the MLP shows up in the count."""
    model = decode_ops.build("llama", d_model=256, n_kv_heads=2)
    base = decode_ops.count_step(model)["per_type"]["S"]
    mlp = model.blocks[0].mlp
    forward = mlp.forward
    mlp.forward = lambda *args: forward(*args) * 1.0  # one more kernel
    more = decode_ops.count_step(model)["per_type"]["S"]
    assert more["mlp"] == base["mlp"] + 1 and more["total"] == base["total"] + 1


def test_main_prints_a_table(decode_ops, capsys):
    out = decode_ops.main(["--presets", "lightning", "--d-model", "128", "--ops"])
    assert out["lightning"]["per_type"]["L"]["total"] > 0
    assert "| L |" in capsys.readouterr().out


def _linears(*sizes, d=8):
    torch.manual_seed(0)
    return [nn.Linear(d, n, bias=False) for n in sizes]


def test_fused_linears_share_storage_and_stay_fresh():
    a, b, c = _linears(4, 2, 2)
    fused = FusedLinears(a, b, c)
    x = torch.randn(3, 8)
    with torch.no_grad():
        w = fused.weight()
        assert w is not None and w.shape == (8, 8)
        ya, yb, yc = fused(x)
        torch.testing.assert_close(ya, a(x))
        b.weight.copy_(torch.ones(2, 8))  # an in-place update (optimizer, load_state_dict) reaches it
        torch.testing.assert_close(fused(x)[1], x @ torch.ones(2, 8).t())
        b.weight.data = b.weight.data.clone()  # storage swapped: no longer fused
        assert fused.weight() is None
        torch.testing.assert_close(fused(x)[1], b(x))
    # autograd needs the Parameters themselves: no fused weight while gradients are on
    assert fused.weight() is None
    sum(y.sum() for y in fused(x)).backward()
    assert a.weight.grad is not None and c.weight.grad is not None


def test_swiglu_fused_through_dtype_and_state_dict():
    mlp = SwiGLU(8, 16)
    keys = set(mlp.state_dict())
    assert keys == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    x = torch.randn(2, 3, 8)
    ref = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref)
    mlp = mlp.to(torch.float64)  # new storage for every weight: re-fused by _apply
    with torch.no_grad():
        assert mlp.gate_up.weight() is not None and mlp.gate_up.weight().dtype == torch.float64
        torch.testing.assert_close(mlp(x.double()), ref.double())
    other = SwiGLU(8, 16).double()
    other.load_state_dict(mlp.state_dict())  # copies in place: still fused, with the new values
    with torch.no_grad():
        assert other.gate_up.weight() is not None
        torch.testing.assert_close(other(x.double()), ref.double())


@pytest.mark.parametrize("dim,head_dim", [(16, 16), (4, 16), (6, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_matches_apply_rope(dim, head_dim, dtype):
    rope = RotaryEmbedding(dim, 1e4, head_dim=head_dim)
    x = torch.randn(2, 5, 3, head_dim).to(dtype)
    for pos in (torch.randint(0, 200_000, (2, 5)), torch.arange(5)):
        ref = apply_rope(x, *rope(pos))
        out = rope.rotate(x, pos)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-6, rtol=1e-6)
        if dim < head_dim:  # passed-through dims unchanged, bit for bit
            assert torch.equal(out[..., dim:], x[..., dim:])
    rope = rope.to(torch.bfloat16)
    assert rope.rot_freq.dtype == torch.float32


def test_rotate_needs_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding(16, 1e4).rotate(torch.randn(1, 1, 1, 16), torch.arange(1))
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding(16, 1e4, head_dim=8)


@pytest.mark.parametrize("preset", ["llama", "swa"])
def test_shared_decode_rotation_equals_per_layer(preset):
    """HybridLM computes a decode step's RoPE factors once for all S / W layers: same logits as
    each layer computing its own."""
    from attnlab import HybridLM

    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, d_model=64, n_layers=4, vocab_size=32, window=4)
    model = HybridLM(cfg).eval()
    prompt = torch.randint(0, 32, (2, 6))
    outs = []
    for share in (True, False):
        caches = model.new_caches(2, 16)
        with torch.no_grad():
            model(prompt, caches)
            if not share:
                model._decode_rotation = lambda tokens, caches, fused_step=False: None  # each layer its own
            outs.append(model(prompt[:, :1], caches))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("preset", ["gdn", "kda"])
def test_decay_parameters_stay_float32_in_a_16_bit_model(preset):
    """A_log / dt_bias keep their float32 values when the model is cast (no cast per decode step)."""
    from attnlab import HybridLM

    model = HybridLM(ModelConfig.preset(preset, d_model=64, n_layers=1, vocab_size=32))
    mixer = model.blocks[0].mixer
    small = {"A_log": mixer.A_log, "dt_bias": mixer.dt_bias, "o_norm.weight": mixer.o_norm.weight}
    with torch.no_grad():
        mixer.o_norm.weight.normal_()  # not representable in bf16
    before = {n: p.detach().clone() for n, p in small.items()}
    model = model.to(torch.bfloat16)
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    for name, p in small.items():
        assert isinstance(p, nn.Parameter) and p.dtype == torch.float32 and torch.equal(p, before[name]), name
    model.to(torch.float64)  # not a 16-bit cast: follows it
    assert mixer.A_log.dtype == torch.float64


def test_residual_added_in_place_equals_out_of_place():
    mlp = SwiGLU(8, 16)
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        ref = r * 1.5 + mlp(x) * 0.5
        mine = r.clone()
        out = mlp(x, Residual(mine, keep=1.5, scale=0.5))
    assert out is mine  # accumulated into the residual by the down projection's matmul
    torch.testing.assert_close(out, ref)
    before = r.clone()
    y = mlp(x, Residual(r, keep=1.5, scale=0.5))  # with autograd: out of place
    assert torch.equal(r, before)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert mlp.down_proj.weight.grad is not None and mlp.gate_proj.weight.grad is not None


@pytest.mark.parametrize("preset", ["llama", "minimax-01", "qwen3-next"])
def test_block_does_not_overwrite_its_input_unless_told(preset):
    """A Block called on its own leaves h alone; HybridLM lets it add into its hidden states."""
    from attnlab import HybridLM

    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset(preset, d_model=64, n_layers=len(ModelConfig.preset(preset).pattern),
                                        vocab_size=32)).eval()
    block = model.blocks[-1]
    h = torch.randn(1, 4, 64)
    before = h.clone()
    with torch.no_grad():
        out = block(h)
        assert torch.equal(h, before)
        again = block(h.clone(), overwrite=True)
    torch.testing.assert_close(out, again)
    ref = block(h)  # autograd on: the out-of-place path
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cast_out_rounds_once_on_store():
    from attnlab.layers.common import cast_out

    h, w = torch.randn(4, 8), torch.randn(8).bfloat16()
    with torch.no_grad():
        out = cast_out(torch.addcmul, h, h, w, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.addcmul(h, h, w).bfloat16())
    x = torch.randn(4, 8, requires_grad=True)
    y = cast_out(torch.mul, x, h, dtype=torch.bfloat16)  # autograd: op then cast, gradient flows
    y.float().sum().backward()
    torch.testing.assert_close(x.grad, h)


def test_a_hooked_mixer_returns_its_own_branch():
    """Forward hooks on a mixer (attnlab.diagnostics) see its output, not the residual sum."""
    from attnlab import HybridLM

    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset("llama", d_model=64, n_layers=2, vocab_size=32)).eval()
    tokens = torch.randint(0, 32, (1, 5))
    seen = []
    block = model.blocks[0]
    handle = block.mixer.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        hooked = model(tokens)
        handle.remove()
        plain = model(tokens)
        x, out = seen[0]
        torch.testing.assert_close(out, block.mixer(x))
    torch.testing.assert_close(hooked, plain)


def test_kda_gate_up_projections_fused_equal_separate():
    from attnlab.layers.deltanet import KimiDeltaAttention

    torch.manual_seed(0)
    layer = KimiDeltaAttention(32, 2, 2, 8, 8)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        _, parts = layer.project(x)
        assert "f_up" in parts
        torch.testing.assert_close(parts["f_up"], layer.f_b_proj(parts["f"]))
        torch.testing.assert_close(parts["g_up"], layer.g_b_proj(parts["g"]))
        fused = layer(x)
    torch.testing.assert_close(fused, layer(x))  # autograd on: the separate matmuls


def test_captured_mixer_input_of_a_post_norm_block_is_not_overwritten():
    """MiniMax's residual is the mixer's normed input: a pre-hook keeping that input (as
    attnlab.diagnostics.capture_mixer_inputs does) must find it unchanged after the forward."""
    from attnlab import HybridLM
    from attnlab.diagnostics import capture_mixer_inputs

    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset("minimax-01", d_model=64, n_layers=8, vocab_size=32)).eval()
    tokens = torch.randint(0, 32, (1, 5))
    with torch.no_grad(), capture_mixer_inputs(model, [0]) as seen:
        model(tokens)
        kept = seen[0].clone()
        torch.testing.assert_close(seen[0], model.blocks[0].mixer_norm(model.embed(tokens)))
    assert torch.equal(seen[0], kept)


def test_hooked_block_outputs_are_not_overwritten_by_the_next_block():
    from attnlab import HybridLM

    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset("llama", d_model=64, n_layers=3, vocab_size=32)).eval()
    tokens = torch.randint(0, 32, (1, 5))
    kept = []
    handle = model.blocks[0].register_forward_hook(lambda m, args, out: kept.append((out, out.clone())))
    with torch.no_grad():
        hooked = model(tokens)
        handle.remove()
        plain = model(tokens)
    out, copy = kept[0]
    assert torch.equal(out, copy)  # block 1 did not add into block 0's output in place
    torch.testing.assert_close(hooked, plain)


def _mla_variants():
    """(name, letter, config overrides): q LoRA or not, interleaved or rotate-half RoPE, NoPE,
    YaRN (attention factor != 1), MLA and DSA."""
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
            "mscale_all_dim": 0.5}
    return [
        ("deepseek-v3", "M", {}),
        ("deepseek-v3", "M", {"q_lora_rank": None, "rope_interleave": False}),
        ("deepseek-v3", "M", {"rope_scaling": yarn}),
        ("kimi-linear", "M", {}),  # NoPE, no q LoRA
        ("deepseek-v32", "D", {}),
        ("deepseek-v32", "D", {"q_lora_rank": None, "rope_scaling": yarn}),
    ]


def _mla_layer(preset, letter, overrides, dtype=torch.float32):
    from attnlab.layers.mla import build_dsa, build_mla

    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, d_model=64, n_layers=1, vocab_size=32, pattern=letter, **overrides)
    layer = (build_dsa if letter == "D" else build_mla)(cfg, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():  # away from the default init (norm weights 1, biases 0)
            p.add_(torch.randn_like(p) * 0.1)
    return layer.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", range(6))
def test_mla_fused_projections_equal_the_per_projection_form(variant, dtype):
    """MLA / DSA's inference projections (one matmul per input, one RoPE table, each row rotated
    in one pass) give the values of the per-projection form (_project, _index_qkw) that autograd
    and attnlab.diagnostics use: float32 to rounding, bf16 within one rounding; after a dtype cast
    (the fused weights and float32 RoPE tables rebuilt) and an in-place weight update."""
    preset, letter, overrides = _mla_variants()[variant]
    layer = _mla_layer(preset, letter, overrides, dtype)
    x = torch.randn(2, 5, 64).to(dtype)
    positions = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]])
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    with torch.no_grad():
        layer.kv_a_proj.weight.mul_(1.5)  # lands in the fused weight (a view of it)
        if layer.rotary is not None:
            assert layer.rope_freq.dtype == torch.float32
        fused = layer._project_fused(x, positions)
        q_nope, q_pe, latent, q_latent, cos_sin = layer._project(x, positions)
        for got, want in zip(fused[:3], (q_nope, q_pe, latent), strict=True):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, **tol)
        if letter == "M":
            assert fused[3] is None
            return
        want = layer._index_qkw(x, q_latent, cos_sin)
        for got, ref in zip(fused[3], want, strict=True):
            assert got.dtype == ref.dtype
            torch.testing.assert_close(got, ref, **tol)


@pytest.mark.parametrize("letter", ["M", "D"])
def test_mla_output_adds_into_the_residual(letter):
    """The M / D output projection adds into a Residual (in place, no autograd) for prefill,
    decode and no-cache forwards: the same as residual + the layer's own output."""
    layer = _mla_layer("deepseek-v32" if letter == "D" else "deepseek-v3", letter, {})
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        for T in (None, 5):  # no cache; prefill 5 then decode 2 single tokens
            if T is None:
                r = torch.randn(2, 7, 64)
                out = layer(x, residual=Residual(r.clone()))
                torch.testing.assert_close(out, r + layer(x), atol=1e-5, rtol=1e-5)
                continue
            caches = [layer.new_cache(2, 8), layer.new_cache(2, 8)]
            for t0, t1 in ((0, T), (T, T + 1), (T + 1, T + 2)):
                r = torch.randn(2, t1 - t0, 64)
                mine = r.clone()
                out = layer(x[:, t0:t1], caches[0], residual=Residual(mine))
                assert out is mine
                torch.testing.assert_close(out, r + layer(x[:, t0:t1], caches[1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset,pattern", [("deepseek-v3", "M"), ("deepseek-v32", "D"),
                                            ("deepseek-v32", "SMD")])
def test_shared_decode_rotation_for_mla_layers(preset, pattern):
    """HybridLM computes a decode step's RoPE tables once per mixer kind (S/W, M and D each their
    own: D's include the indexer's heads): same logits as each layer computing its own, and the
    layers of a kind get the same tensors."""
    from attnlab import HybridLM

    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, d_model=64, n_layers=2 * len(pattern), vocab_size=32, pattern=pattern)
    model = HybridLM(cfg).eval()
    prompt = torch.randint(0, 32, (2, 6))
    outs = []
    for share in (True, False):
        caches = model.new_caches(2, 16)
        with torch.no_grad():
            model(prompt, caches)
            if share:
                rotations = model._decode_rotation(prompt[:, :1], caches)
                assert set(rotations) == {b.rotation_key for b in model.blocks}
                assert len({r[0].shape[-1] for r in rotations.values()}) == len(rotations)  # distinct layouts
            else:
                model._decode_rotation = lambda tokens, caches, fused_step=False: None  # each layer its own
            outs.append(model(prompt[:, :1], caches))
    assert torch.equal(outs[0], outs[1])
