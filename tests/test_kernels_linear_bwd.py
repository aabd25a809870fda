"""Backward of the Triton Gated DeltaNet / KDA ops (attnlab.kernels.linear_bwd) against autograd
through the float64 token loop (attnlab.ops, mode="recurrent").

On the CPU the kernels run under TRITON_INTERPRET=1 (``test_interpreter_suite`` re-runs this
file's ``interp`` tests in a subprocess with it set); the ``gpu`` tests run on a CUDA machine.
Error metric: rms(ref − out) / rms(ref) (DESIGN.md).
"""

from __future__ import annotations

import pytest
import torch
from _triton_tests import HAVE_TRITON, INTERPRETED, interp, rel_err, run_interpreter_suite

OPS = ("gdn", "kda")




def make_inputs(op, b, t, h, hk, d_k, d_v, gate=(-1.0, 0.0), seed=0, h0=True):
    """q, k [B,T,H_k,D_k]; v [B,T,H,D_v]; g uniform in `gate` ([B,T,H] or [B,T,H,D_k]); beta; h0."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    q, v = r(b, t, hk, d_k), r(b, t, h, d_v)
    k = torch.nn.functional.normalize(r(b, t, hk, d_k), dim=-1)  # |k| = 1, β ≤ 1: a stable delta rule
    shape = (b, t, h) if op == "gdn" else (b, t, h, d_k)
    lo, hi = gate
    g = lo + (hi - lo) * torch.rand(*shape, generator=gen)
    beta = torch.rand(b, t, h, generator=gen)
    return [q, k, v, g, beta, r(b, h, d_k, d_v) if h0 else None]


def grads(op, xs, do, dht, mode, use_qk_l2norm=False, cu_seqlens=None):
    """(o, gradients of ⟨o, do⟩ + ⟨S_T, dht⟩ w.r.t. q, k, v, g, beta[, h0])."""
    from attnlab import ops
    from attnlab.kernels import linear

    leaves = [x.clone().requires_grad_() for x in xs if x is not None]
    q, k, v, g, beta, *h0 = leaves
    kw = dict(initial_state=h0[0] if h0 else None, output_final_state=dht is not None,
              use_qk_l2norm=use_qk_l2norm)
    if mode == "triton":
        fn = linear.gated_delta_rule if op == "gdn" else linear.kda
        o, ht = fn(q, k, v, g, beta, cu_seqlens=cu_seqlens, **kw)
    else:
        fn = ops.gated_delta_rule if op == "gdn" else ops.kda
        o, ht = fn(q, k, v, g, beta, mode=mode, **kw)
    loss = (o * do.to(o)).sum() + ((ht * dht.to(ht)).sum() if dht is not None else 0)
    return o, torch.autograd.grad(loss, leaves)


def check(op, xs, tol=1e-5, gate_tol=None, use_qk_l2norm=False, dht=True, device="cpu"):
    """Kernel gradients (inputs moved to `device`, in their dtype) vs the float64 loop on the CPU."""
    b, t, h, d_v = xs[2].shape
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(b, t, h, d_v, generator=gen, dtype=torch.float64)
    dS = torch.randn(b, h, xs[0].shape[3], d_v, generator=gen, dtype=torch.float64) if dht else None
    xs64 = [None if x is None else x.double() for x in xs]
    ref_o, ref = grads(op, xs64, do, dS, "recurrent", use_qk_l2norm)
    dev = [None if x is None else x.to(device) for x in xs]
    o, got = grads(op, dev, do.to(device), None if dS is None else dS.to(device), "triton", use_qk_l2norm)
    assert rel_err(o, ref_o) < tol * 10
    names = [n for n, x in zip(("q", "k", "v", "g", "beta", "h0"), xs, strict=True) if x is not None]
    for name, a, r in zip(names, got, ref, strict=True):
        assert a.shape == r.shape and a.dtype == dev[names.index(name)].dtype, name
        limit = gate_tol if name == "g" and gate_tol is not None else tol
        assert rel_err(a, r) < limit, (name, rel_err(a, r))


# ------------------------------------------------------------------------------------------------
# CPU, under the Triton interpreter (tiny sizes: the interpreter runs every program in Python)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETED, reason="already inside the interpreter run")
def test_interpreter_suite():
    run_interpreter_suite(__file__)


@interp
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("t", [1, 63, 65, 130])
def test_interp_gradients_match_loop(op, t):
    """D_k = 24, D_v = 40 (not powers of two), 2 value heads per key head, initial state, final
    state's gradient; partial chunks, exactly one chunk plus one token, several chunks."""
    check(op, make_inputs(op, 1, t, 2, 1, 24, 40, seed=t))


@interp
@pytest.mark.parametrize("op", OPS)
def test_interp_strong_gates(op):
    """Log-gate ≈ −5 per token: every KDA sub-chunk's gate falls by > 60, so the per-channel
    products take the elementwise path. dg sums terms of size ~1 that cancel to ~e^−5 (a float32
    limit the chunked PyTorch op shares: 3e-5 there), hence its looser bound."""
    check(op, make_inputs(op, 1, 70, 2, 2, 16, 24, gate=(-5.5, -5.0), seed=3), gate_tol=1e-3)


@interp
def test_interp_kda_gate_falls_past_span_within_chunk():
    """KDA log-gate ≈ −2 per token: over a chunk the gate falls by > DIAG_SPAN (no chunk-wide factor),
    over a 16-token sub-chunk by less (the sub-chunk factoring, no elementwise blocks)."""
    check("kda", make_inputs("kda", 1, 70, 2, 2, 16, 24, gate=(-2.5, -1.5), seed=5), gate_tol=1e-4)


@interp
@pytest.mark.parametrize("op", OPS)
def test_interp_extreme_gates_stay_finite(op):
    """Log-gate −40 per token: decays underflow to 0, nothing overflows. The true dg is ~1e-18
    (below float32 resolution of the O(1) terms it cancels from), so only its size is checked."""
    xs = make_inputs(op, 1, 70, 2, 2, 16, 24, gate=(-40.0, -39.0), seed=4)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(1, 70, 2, 24, generator=gen, dtype=torch.float64)
    dS = torch.randn(1, 2, 16, 24, generator=gen, dtype=torch.float64)
    _, ref = grads(op, [x.double() for x in xs], do, dS, "recurrent")
    _, got = grads(op, xs, do, dS, "triton")
    for name, a, r in zip(("q", "k", "v", "g", "beta", "h0"), got, ref, strict=True):
        assert torch.isfinite(a).all(), name
        if name == "g":
            assert (a.double() - r).abs().max() < 1e-5
        else:
            assert rel_err(a, r) < 1e-5, name


@interp
@pytest.mark.parametrize("op", OPS)
def test_interp_no_initial_state_no_final_grad_l2norm(op):
    xs = make_inputs(op, 2, 40, 4, 1, 16, 16, seed=6, h0=False)
    check(op, xs, use_qk_l2norm=True, dht=False)


@interp
@pytest.mark.parametrize("op", OPS)
def test_interp_varlen_backward_matches_loop_per_sequence(op):
    check_varlen(op, "cpu")


@interp
@pytest.mark.parametrize("op", OPS)
def test_interp_packed_rows_past_the_last_sequence(op, poisoned):
    """T = 60 with cu_seqlens ending at 50: rows 50.. get zero gradients (no kernel writes them), and the
    second sequence's gradients are those it gets alone."""
    xs = make_inputs(op, 1, 60, 2, 2, 16, 24, seed=3)
    xs[5] = torch.randn(2, 2, 16, 24, generator=torch.Generator().manual_seed(4))
    cu = torch.tensor([0, 30, 50], dtype=torch.int32)
    do = torch.randn(1, 60, 2, 24, generator=torch.Generator().manual_seed(5))
    _, got = grads(op, xs, do, None, "triton", cu_seqlens=cu)
    alone = [x[:, 30:50] if i < 5 else x[1:] for i, x in enumerate(xs)]
    _, ref = grads(op, alone, do[:, 30:50], None, "triton")
    for name, a, r in zip(("q", "k", "v", "g", "beta"), got[:5], ref[:5], strict=True):
        assert torch.equal(a[:, 50:], torch.zeros_like(a[:, 50:])), name
        assert rel_err(a[:, 30:50], r) < 1e-6, name


def check_varlen(op, device):
    """Packed sequences (cu_seqlens) of 5, 64 and 23 tokens, each with its own initial state:
    every gradient equals the loop's for that sequence alone."""
    lens = [5, 64, 23]
    parts = [make_inputs(op, 1, n, 2, 2, 16, 24, seed=10 + i) for i, n in enumerate(lens)]
    cu = torch.tensor([0, 5, 69, 92])
    gen = torch.Generator().manual_seed(2)
    dos = [torch.randn(1, n, 2, 24, generator=gen, dtype=torch.float64) for n in lens]
    dS = torch.randn(3, 2, 16, 24, generator=gen, dtype=torch.float64)
    packed = [torch.cat([p[j] for p in parts], dim=1) for j in range(5)]
    packed.append(torch.cat([p[5] for p in parts], dim=0))  # (N, H, K, V)
    packed = [x.to(device) for x in packed]
    do = torch.cat(dos, dim=1).to(device)
    _, got = grads(op, packed, do, dS.to(device), "triton", cu_seqlens=cu.to(device))
    for i, p in enumerate(parts):
        _, ref = grads(op, [x.double() for x in p], dos[i], dS[i:i + 1], "recurrent")
        for name, a, r in zip(("q", "k", "v", "g", "beta"), got[:5], ref[:5], strict=True):
            assert rel_err(a[:, cu[i]:cu[i + 1]], r) < 1e-5, (name, i)
        assert rel_err(got[5][i:i + 1], ref[5]) < 1e-5, ("h0", i)


class _Paused:
    """Wraps a callable (a forward pass, a @triton.jit kernel's launcher): counts calls, and pauses
    the op count while one runs (the forward's and the interpreter's tensor ops are not the backward's)."""

    def __init__(self, fn, state, name):
        self.fn, self.state, self.name = fn, state, name

    def __getitem__(self, grid):  # kernel[grid](...)
        return _Paused(self.fn[grid], self.state, self.name)

    def __call__(self, *args, **kwargs):
        self.state[self.name] += 1
        self.state["active"] = False
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.state["active"] = True


VIEWS = {"view", "_unsafe_view", "expand", "transpose", "slice", "unsqueeze", "squeeze", "permute", "t",
         "select", "split", "split_with_sizes", "detach", "alias", "as_strided", "empty", "new_empty"}


@interp
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backward", ["triton", "batched"])
def test_interp_backward_launches_do_not_grow_with_t(op, backward, monkeypatch):
    """At 2 and 4 chunks the backward is the same: one forward pass (the states), one launch of the
    state-gradient sweep and the same PyTorch ops, no Python loop over chunks."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from attnlab.kernels import linear, linear_bwd

    monkeypatch.setattr(linear_bwd, "BACKWARD", backward)
    state = {"forward": 0, "sweep": 0, "active": True}
    monkeypatch.setattr(linear_bwd, "_forward", _Paused(linear_bwd._forward, state, "forward"))
    sweep = _Paused(linear_bwd._dstate_tok_kernel, state, "sweep")
    monkeypatch.setattr(linear_bwd, "_dstate_tok_kernel", sweep)

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if state["active"] and func.__name__.split(".")[0] not in VIEWS:
                self.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for t in (70, 200):
        xs = [x.requires_grad_() for x in make_inputs(op, 1, t, 2, 2, 16, 16, seed=1)[:5]]
        fn = linear.gated_delta_rule if op == "gdn" else linear.kda
        o, _ = fn(*xs)
        state.update(forward=0, sweep=0)
        with CountOps() as mode:
            o.backward(torch.ones_like(o))
        counts.append((state["forward"], state["sweep"], mode.n))
        assert all(torch.isfinite(x.grad).all() for x in xs)
    print(f"{op} {backward} backward: forward passes, sweep launches, PyTorch ops = {counts[0]}")
    assert counts[0] == counts[1], counts
    assert counts[0][:2] == (1, 1), counts


@interp
@pytest.mark.parametrize("op", OPS)
def test_interp_triton_and_batched_backward_agree(op, monkeypatch):
    """The two independently written backwards (linear_bwd.BACKWARD) give the same gradients: GQA,
    awkward dims, a partial chunk, initial and final state, and a packed batch."""
    from attnlab.kernels import linear_bwd

    xs = make_inputs(op, 2, 70, 2, 1, 24, 40, seed=21)
    gen = torch.Generator().manual_seed(3)
    do, dS = torch.randn(2, 70, 2, 40, generator=gen), torch.randn(2, 2, 24, 40, generator=gen)
    cu = torch.tensor([0, 37, 70], dtype=torch.int32)
    packed = [x[:1] if i < 5 else x for i, x in enumerate(xs)]
    results = {}
    for backward in ("triton", "batched"):
        monkeypatch.setattr(linear_bwd, "BACKWARD", backward)
        results[backward] = (grads(op, xs, do, dS, "triton")[1]
                             + grads(op, packed, do[:1], dS, "triton", cu_seqlens=cu)[1])
    for a, r in zip(results["triton"], results["batched"], strict=True):
        assert rel_err(a, r) < 1e-5


@interp
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fused", [False, True])
def test_interp_forward_keeps_what_the_backward_reuses(op, fused, monkeypatch):
    """linear._forward(keep=...) gives the plain forward's output and states, and a later call that
    starts from its kept X, aqk and gcum (saved=...) the same w, u, kd, v' and states. With the
    outputs made in the segmented pass (FUSED_OUTPUT) the forward returns no states and keeps no
    v' (nothing wrote them); the states then come from the call without outputs, as the backward
    makes them."""
    from attnlab.kernels import linear

    monkeypatch.setattr(linear, "FUSED_OUTPUT", {"scalar": fused, "vector": fused})
    q, k, v, g, beta, h0 = make_inputs(op, 2, 70, 2, 1, 24, 40, seed=22)
    gate = 1 if op == "gdn" else 2
    keep, again = {}, {}
    o, _, states = linear._forward(q, k, v, g, beta, None, 0.3, h0, False, None, gate, keep=keep)
    o_plain, _, states_plain = linear._forward(q, k, v, g, beta, None, 0.3, h0, False, None, gate)
    assert rel_err(o, o_plain) < 1e-6
    if fused:
        assert states is None and states_plain is None and keep["vn"] is None
        _, _, states = linear._forward(q, k, v, g, beta, None, 0.3, h0, False, None, gate, keep=keep,
                                       output=False)
        monkeypatch.setattr(linear, "FUSED_OUTPUT", {"scalar": False, "vector": False})
        o_plain, _, states_plain = linear._forward(q, k, v, g, beta, None, 0.3, h0, False, None, gate)
        assert rel_err(o, o_plain) < 1e-6
    assert rel_err(states, states_plain) < 1e-6
    saved = {name: keep[name] for name in ("xa", "aqk", "gcum")}
    out, _, states2 = linear._forward(q, k, v, g, beta, None, 0.3, h0, False, None, gate, keep=again,
                                      output=False, saved=saved)
    assert out is None
    assert torch.equal(states2, states)
    for name in ("w", "u", "kd", "vn"):
        assert torch.equal(again[name], keep[name]), name


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETED, reason="no Triton kernel here; runs once, outside the interpreter run")
@pytest.mark.parametrize("products", ["scalar", "channel"])
def test_chunk_terms_trace_whole_for_torch_compile(products):
    """On CUDA the backward runs _chunk_terms through torch.compile (fullgraph, dynamic shapes).
    Here: it traces without a graph break (AOT autograd, eager kernels) at two chunk counts and
    gives the eager outputs and gradients."""
    from attnlab.kernels.linear_bwd import _chunk_terms

    compiled = torch.compile(_chunk_terms, backend="aot_eager", dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3):
        q, v = torch.randn(n, 2, 64, 24, generator=gen), torch.randn(n, 2, 64, 40, generator=gen)
        k = torch.nn.functional.normalize(torch.randn(n, 2, 64, 24, generator=gen), dim=-1)
        g = -torch.rand(n, 2, 64, *([24] if products == "channel" else []), generator=gen)
        beta, S = torch.rand(n, 2, 64, generator=gen), torch.randn(n, 2, 24, 40, generator=gen)
        results = []
        for fn in (_chunk_terms, compiled):
            xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
            outs = fn(*xs, S, 0.2, products)
            loss = sum((o * torch.cos(torch.arange(o.numel()).view(o.shape) * 0.1)).sum() for o in outs)
            results.append((outs, torch.autograd.grad(loss, xs)))
        for a, r in zip(results[1][0] + results[1][1], results[0][0] + results[0][1], strict=True):
            assert rel_err(a, r) < 1e-5


# ------------------------------------------------------------------------------------------------
# GPU (the device machine)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("t,d_k,d_v", [(1, 64, 64), (63, 60, 100), (130, 128, 128)])
def test_gpu_gradients_fp32(op, t, d_k, d_v, poisoned):
    check(op, make_inputs(op, 2, t, 4, 2, d_k, d_v, seed=t), tol=1e-4, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("t", [500, 4096])
def test_gpu_gradients_bf16(op, t, poisoned):
    xs = make_inputs(op, 1, t, 4, 4, 128, 128, gate=(-0.1, 0.0), seed=t)
    xs = [x.to(torch.bfloat16) if i < 3 else x for i, x in enumerate(xs)]
    check(op, xs, tol=3e-2, gate_tol=5e-2, device="cuda")  # dg sums terms that cancel


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_gradients_strong_gates(op, poisoned):
    check(op, make_inputs(op, 1, 300, 4, 4, 128, 128, gate=(-5.5, -5.0), seed=8), tol=1e-4, gate_tol=1e-2,
          device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_varlen_backward(op, poisoned):
    check_varlen(op, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_compiled_terms_equal_eager(op, monkeypatch):
    """The torch.compile'd per-chunk terms give the eager gradients, and compiling did not fail
    (a failure falls back to eager with a warning and clears linear_bwd.COMPILE)."""
    from attnlab.kernels import linear_bwd

    monkeypatch.setattr(linear_bwd, "BACKWARD", "batched")  # the backward that compiles them
    xs = make_inputs(op, 2, 300, 4, 2, 64, 64, seed=12)
    gen = torch.Generator().manual_seed(1)
    do, dS = torch.randn(2, 300, 4, 64, generator=gen), torch.randn(2, 4, 64, 64, generator=gen)
    cuda = [x.cuda() for x in xs]
    _, compiled = grads(op, cuda, do.cuda(), dS.cuda(), "triton")
    assert linear_bwd.COMPILE, "torch.compile of the per-chunk terms failed (see the warning)"
    monkeypatch.setattr(linear_bwd, "COMPILE", False)
    _, eager = grads(op, cuda, do.cuda(), dS.cuda(), "triton")
    for a, r in zip(compiled, eager, strict=True):
        assert rel_err(a, r) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_64k_bf16_backward_is_finite(op):
    """B=1, H=16, D=128, 65536 tokens (1024 chunks) in bf16: every gradient finite and nonzero."""
    from attnlab.kernels import linear

    t, h, d = 65536, 16, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, t, h, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.nn.functional.normalize(torch.randn(1, t, h, d, device="cuda", generator=gen), dim=-1)
    v = torch.randn(1, t, h, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    shape = (1, t, h) if op == "gdn" else (1, t, h, d)
    g = torch.nn.functional.logsigmoid(torch.randn(*shape, device="cuda", generator=gen)) * 0.1
    beta = torch.rand(1, t, h, device="cuda", generator=gen)
    xs = [x.requires_grad_() for x in (q, k.to(torch.bfloat16), v, g, beta)]
    fn = linear.gated_delta_rule if op == "gdn" else linear.kda
    o, _ = fn(*xs)
    o.backward(torch.randn(o.shape, device="cuda", generator=gen, dtype=o.dtype))
    for x in xs:
        assert torch.isfinite(x.grad).all() and x.grad.abs().amax() > 0
