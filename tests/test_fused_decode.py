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

# every preset: S / W / G / K / L / M / D blocks take the fused mixers, minimax-01's postnorm blocks too
PRESETS = ["llama", "swa", "qwen3-next", "kimi-linear", "deepseek-v3", "deepseek-v32", "minimax-01", "gdn",
           "kda", "lightning"]


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


def _assert_same_caches(c_plain, c_ours, tol: float = 1e-5) -> None:
    """Every cache tensor of the fused step equals the plain step's: float within ``tol`` rms-relative,
    integer (lengths) exactly."""
    for a, b in zip(_cache_tensors(c_plain), _cache_tensors(c_ours), strict=True):
        if a.is_floating_point():
            assert rms_rel(a.float(), b.float()) <= tol
        else:
            assert torch.equal(a, b)


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
    _assert_same_caches(c_plain, c_ours)


@interp
@pytest.mark.parametrize("name", ["llama", "qwen3-next", "kimi-linear", "deepseek-v32", "minimax-01"])
def test_interp_fused_step_bf16_mixed_lengths(name):
    """bf16 model, rows of different lengths: fused vs plain logits agree to bf16 rounding. D: with
    index_topk above the context (every visible token chosen): a top-k boundary inside the context
    is a discrete choice that a near tie flips either way in bf16 (test_interp_fused_dsa_step_bf16_sparse)."""
    model = copy.deepcopy(tiny_model(name)).to(torch.bfloat16)
    if name == "deepseek-v32":
        for block in model.blocks:
            block.mixer.index_topk = 64
    T, n = 7, 3
    x = tokens(3, T + n, seed=4)
    lengths = torch.tensor([7, 3, 5])
    with torch.no_grad():
        plain, _ = _decode(model, x, T, n, torch.bfloat16, on=False, lengths=lengths)
        ours, _ = _decode(model, x, T, n, torch.bfloat16, on=True, lengths=lengths)
    assert rms_rel(plain.float(), ours.float()) <= 3e-2


@interp
@pytest.mark.parametrize("swiglu_epilogue", [True, False])
def test_interp_fused_step_is_taken(monkeypatch, swiglu_epilogue):
    """The fused kernels really run (a broken dispatch would silently give the plain step); SwiGLU's
    silu(gate) * up as gate|up's epilogue (gemv.MLP_SWIGLU_EPILOGUE) or down's prologue."""
    from attnlab.kernels import gemv

    monkeypatch.setattr(gemv, "MLP_SWIGLU_EPILOGUE", swiglu_epilogue)
    model = tiny_model("llama")
    calls = []
    real = gemv.gemv

    def counted(*args, **kwargs):
        calls.append((kwargs.get("prologue"), kwargs.get("epilogue")))
        return real(*args, **kwargs)

    gemv.gemv = counted
    try:
        with torch.no_grad():
            _decode(model, tokens(1, 6), 5, 1, torch.float32, on=True)
    finally:
        gemv.gemv = real
    n_layers = len(model.blocks)
    gate_up = ("rmsnorm", "silu_mul" if swiglu_epilogue else None)
    down = (None, None) if swiglu_epilogue else ("silu_mul", None)
    assert calls.count(("rmsnorm", None)) == (1 if swiglu_epilogue else 2) * n_layers + 1  # qkv, the LM head
    assert calls.count(gate_up) == (n_layers if swiglu_epilogue else 2 * n_layers + 1)
    assert calls.count(down) == (2 if swiglu_epilogue else 1) * n_layers  # (and o_proj: (None, None))


@interp
def test_interp_fused_lightning_and_postnorm_blocks_are_taken(monkeypatch):
    """minimax-01 (postnorm, LLLLLLLS with alpha != 1): every block takes the fused kernels — no block
    norm module and no L layer's own forward runs in a decode step; each L layer launches
    lightning_decode once a step; each block's two branches write their normed input with the first
    GEMV (x_hat_out), and the out projections of L layers carry the norm + gate prologue. Logits and
    caches equal the plain step's (which runs the layers' own postnorm forward)."""
    from attnlab.kernels import gemv as kg
    from attnlab.kernels import lightning_decode as ld
    from attnlab.layers.common import RMSNorm
    from attnlab.layers.lightning import LightningAttention

    model = tiny_model("minimax-01")
    assert all(b.postnorm for b in model.blocks) and model.blocks[0].mixer_alpha != 1.0
    n_l = sum(isinstance(b.mixer, LightningAttention) for b in model.blocks)
    T, n = 9, 3
    x = tokens(2, T + n, seed=6)
    with torch.no_grad():
        plain, c_plain = _decode(model, x, T, n, torch.float32, on=False)
    calls, steps = [], []
    real_gemv, real_step = kg.gemv, ld.lightning_decode
    real_norm, real_l = RMSNorm.forward, LightningAttention.forward
    block_norms = {id(m) for b in model.blocks for m in (b.mixer_norm, b.mlp_norm)}

    def gemv(*args, **kwargs):
        calls.append((kwargs.get("prologue"), kwargs.get("x_hat_out") is not None))
        return real_gemv(*args, **kwargs)

    def step(*args, **kwargs):
        steps.append(kwargs.get("count_token"))
        return real_step(*args, **kwargs)

    def norm(self, h):
        if fused.ENABLED and id(self) in block_norms and h.shape[1] == 1:
            raise AssertionError("a block's own norm ran in a fused decode step")
        return real_norm(self, h)

    def lightning(self, h, cache=None, *args, **kwargs):
        if fused.ENABLED and cache is not None and h.shape[1] == 1:
            raise AssertionError("an L layer's own decode step ran")
        return real_l(self, h, cache, *args, **kwargs)

    monkeypatch.setattr(kg, "gemv", gemv)
    monkeypatch.setattr(ld, "lightning_decode", step)
    monkeypatch.setattr(RMSNorm, "forward", norm)
    monkeypatch.setattr(LightningAttention, "forward", lightning)
    with torch.no_grad():
        ours, c_ours = _decode(model, x, T, n, torch.float32, on=True)
    n_layers = len(model.blocks)
    assert steps == [True] * (n_l * n)
    assert calls.count(("rmsnorm", True)) == 2 * n_layers * n  # both branches of every block
    assert calls.count(("rmsnorm_sigmoid_gate", False)) == n_l * n
    assert rms_rel(plain, ours) <= 1e-5, rms_rel(plain, ours)
    _assert_same_caches(c_plain, c_ours)


@interp
@pytest.mark.parametrize("topk", [2, 64])
def test_interp_fused_dsa_step(topk):
    """D layers take their fused step (fused._sparse_latent: the layer's own forward never runs in a
    decode step; latent_write gets the DSA layer), rows of different lengths, index_topk below the
    shortest context (a sparse selection) or above the cache: logits and every cache tensor agree
    with the plain step's to float32 rounding, and the selection matters (top-2 and top-64 give
    different logits)."""
    from attnlab.kernels import latent_cache
    from attnlab.layers.mla import DeepSeekSparseAttention

    model = copy.deepcopy(tiny_model("deepseek-v32")).float()  # .float(): re-fuses the copied weights
    for block in model.blocks:
        assert isinstance(block.mixer, DeepSeekSparseAttention)
        block.mixer.index_topk = topk
    T, n = 9, 3
    x = tokens(3, T + n, seed=5)
    lengths = torch.tensor([9, 4, 6])
    with torch.no_grad():
        plain, c_plain = _decode(model, x, T, n, torch.float32, on=False, lengths=lengths)
        seen = []
        real_write, real_forward = latent_cache.latent_write, DeepSeekSparseAttention.forward

        def write(mla, *args, **kwargs):
            seen.append(type(mla))
            return real_write(mla, *args, **kwargs)

        def forward(self, x, cache=None, *args, **kwargs):
            if fused.ENABLED and cache is not None and x.shape[1] == 1:  # a decode step, not prefill
                raise AssertionError("the D layer's own decode step ran")
            return real_forward(self, x, cache, *args, **kwargs)

        latent_cache.latent_write, DeepSeekSparseAttention.forward = write, forward
        try:
            ours, c_ours = _decode(model, x, T, n, torch.float32, on=True, lengths=lengths)
        finally:
            latent_cache.latent_write, DeepSeekSparseAttention.forward = real_write, real_forward
        if topk == 2:
            for block in model.blocks:
                block.mixer.index_topk = 64
            dense, _ = _decode(model, x, T, n, torch.float32, on=False, lengths=lengths)
            assert rms_rel(dense, plain) > 1e-3  # top-2 of 4..11 tokens: a real selection
    assert seen == [DeepSeekSparseAttention] * (len(model.blocks) * n)
    assert rms_rel(plain, ours) <= 1e-5, rms_rel(plain, ours)
    _assert_same_caches(c_plain, c_ours)


@interp
def test_interp_fused_dsa_step_bf16_sparse():
    """bf16, rows of different lengths, top-2 of up to 9 tokens: what decides the selection, the first
    D layer's index scores (the same inputs in both steps), agree to bf16 rounding at every decode
    step, -inf at the same positions (past each row's length; the fused step scores the whole cache);
    each step's top-2 is a true top-2 of its own scores (a near tie may order the two steps apart)."""
    from attnlab import ops

    model = copy.deepcopy(tiny_model("deepseek-v32")).to(torch.bfloat16)
    for block in model.blocks:
        block.mixer.index_topk = 2
    T, n = 7, 3
    x = tokens(3, T + n, seed=4)
    lengths = torch.tensor([7, 3, 5])
    real = ops.dsa_topk
    seen = []

    def topk(scores, k, *args, **kwargs):
        idx = real(scores, k, *args, **kwargs)
        if scores.shape[1] == 1:  # decode steps (prefill scores T > 1 queries)
            seen.append((scores.clone(), idx.clone()))
        return idx

    ops.dsa_topk = topk
    try:
        with torch.no_grad():
            _decode(model, x, T, n, torch.bfloat16, on=False, lengths=lengths)
            plain, seen[:] = seen[:], []
            _decode(model, x, T, n, torch.bfloat16, on=True, lengths=lengths)
            ours = seen
    finally:
        ops.dsa_topk = real
    n_layers = len(model.blocks)
    assert len(plain) == len(ours) == n * n_layers
    for (s_plain, _), (s_ours, _) in zip(plain[::n_layers], ours[::n_layers], strict=True):  # layer 0
        S = s_plain.shape[-1]  # the plain step scores the longest row's length
        assert torch.isinf(s_ours[..., S:]).all()
        assert torch.equal(torch.isinf(s_plain), torch.isinf(s_ours[..., :S]))
        finite = torch.isfinite(s_plain)
        assert rms_rel(s_plain[finite], s_ours[..., :S][finite]) <= 2e-2
    for scores, idx in ours:  # (B, 1, S_max), (B, 1, 2)
        assert (idx >= 0).all()  # every row has at least 2 tokens
        picked = scores.gather(-1, idx)  # (B, 1, 2)
        others = scores.scatter(-1, idx, float("-inf"))
        assert (picked.amin(-1) >= others.amax(-1)).all()


# ---------------------------------------------------------------------------------------------
# GPU


@interp
@pytest.mark.parametrize("name, fold", [("deepseek-v32", True), ("deepseek-v3", False)])
def test_interp_fused_latent_step_launches(monkeypatch, name, fold):
    """An M / D layer's step runs both absorption products in Triton (W_UK^T q_nope inside
    latent_write with fused.FOLD_ABSORB_Q, else absorb_q; W_UV through unabsorb_o) and counts its
    token inside latent_write (count_token=True): once per row and step, with no separate
    lengths += 1 (the caches' lengths end at prompt + steps, the logits as the plain step's)."""
    from attnlab.kernels import absorb, latent_cache

    monkeypatch.setattr(fused, "FOLD_ABSORB_Q", fold)
    model = tiny_model(name)
    calls = []

    def spy(module, fn_name):
        real = getattr(module, fn_name)

        def wrapped(*args, **kwargs):
            q_lat = args[3] if fn_name == "latent_write" else None
            calls.append((fn_name, kwargs.get("count_token"), q_lat is None))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, fn_name, wrapped)

    for module, fn_name in ((absorb, "absorb_q"), (absorb, "unabsorb_o"), (latent_cache, "latent_write")):
        spy(module, fn_name)
    T, n = 5, 2
    x = tokens(2, T + n)
    with torch.no_grad():
        ours, caches = _decode(model, x, T, n, torch.float32, on=True)
        calls_fused = list(calls)
        plain, _ = _decode(model, x, T, n, torch.float32, on=False)
    steps = n * len(model.blocks)
    assert calls_fused.count(("latent_write", True, fold)) == steps  # q_lat None when folded
    assert calls_fused.count(("absorb_q", None, True)) == (0 if fold else steps)
    assert calls_fused.count(("unabsorb_o", None, True)) == steps
    assert len(calls_fused) == (2 if fold else 3) * steps
    assert all(c.lengths.tolist() == [T + n] * 2 for c in caches)
    assert rms_rel(plain, ours) <= 1e-5


def _gpu_model(preset: str) -> HybridLM:
    cfg = ModelConfig.preset(preset, d_model=1024, n_layers=len(ModelConfig.preset(preset).pattern),
                             vocab_size=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return HybridLM(cfg).to(torch.bfloat16).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["llama", "qwen3-next", "kimi-linear", "deepseek-v3", "deepseek-v32",
                                    "minimax-01", "lightning"])
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
