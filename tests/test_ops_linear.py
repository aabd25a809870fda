"""Linear-attention ops (lightning, gated delta rule, KDA): fast paths and decode steps against
the float32 token-loop oracle, on awkward shapes, split sequences, extreme gates, bf16 and
gradients; and every bad input raising ValueError that names the argument."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import ops
from attnlab.ops import delta_rule
from attnlab.ops._dispatch import resolve_mode

FAMILIES = ("lightning", "gdn", "kda")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These ops are tiny here: on a shared 2-core machine a second BLAS thread spin-waits and a
    [2, 60] @ [60, 60] product took milliseconds. One thread keeps the file fast; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """rms(ref − out) / rms(ref), in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def make_inputs(family, b=1, t=16, h=2, d_k=16, d_v=None, h_k=None, g_scale=1.0, dtype=torch.float32, seed=0):
    """Inputs of one family: dict of keyword arguments for the op (initial_state included)."""
    gen = torch.Generator().manual_seed(seed)
    d_v = d_v or d_k
    h_k = h_k or h
    rnd = lambda *shape: torch.randn(*shape, generator=gen)
    x = dict(q=rnd(b, t, h_k, d_k).to(dtype), k=rnd(b, t, h_k, d_k).to(dtype), v=rnd(b, t, h, d_v).to(dtype),
             initial_state=rnd(b, h, d_k, d_v))
    if family == "lightning":
        x["k"] = x["k"] / d_k**0.5  # keep the undecayed sum of k vᵀ at the scale of v
        x["slope"] = torch.rand(h, generator=gen) * 0.5 + 0.01
    else:
        gate_shape = (b, t, h, d_k) if family == "kda" else (b, t, h)
        x["g"] = -torch.rand(*gate_shape, generator=gen) * g_scale
        x["beta"] = torch.rand(b, t, h, generator=gen)
    return x


def run(family, x, mode, **kw):
    if family == "lightning":
        return ops.lightning_attention(x["q"], x["k"], x["v"], x["slope"], initial_state=x["initial_state"],
                                       output_final_state=True, mode=mode, **kw)
    fn = ops.gated_delta_rule if family == "gdn" else ops.kda
    kw.setdefault("use_qk_l2norm", True)
    return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"],
              output_final_state=True, mode=mode, **kw)


def step(family, x, t, state, **kw):
    if family == "lightning":
        return ops.lightning_attention_step(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["slope"], state, **kw)
    fn = ops.gated_delta_rule_step if family == "gdn" else ops.kda_step
    kw.setdefault("use_qk_l2norm", True)
    return fn(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["g"][:, t], x["beta"][:, t], state, **kw)


def slice_time(x, a, b):
    return {k: (v if k in ("slope", "initial_state") else v[:, a:b]) for k, v in x.items()}


# ------------------------------------------------------------------------------------------
# fast path vs oracle


@pytest.mark.parametrize("d", [16, 60, 64])
@pytest.mark.parametrize("t", [1, 63, 64, 65, 200, 1000])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunk_matches_oracle(family, t, d):
    x = make_inputs(family, b=1 if t == 1000 else 2, t=t, h=2, d_k=d)
    o_ref, s_ref = run(family, x, "recurrent")
    o, s = run(family, x, "chunk")
    assert o.shape == x["v"].shape and o.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(o, o_ref) < 2e-5
    assert rel_err(s, s_ref) < 2e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_on_cpu_is_chunk_and_values_differ_from_zero(family):
    x = make_inputs(family, t=70)
    o_auto, s_auto = run(family, x, "auto")
    o_chunk, s_chunk = run(family, x, "chunk")
    torch.testing.assert_close(o_auto, o_chunk, rtol=0, atol=0)
    torch.testing.assert_close(s_auto, s_chunk, rtol=0, atol=0)
    assert o_auto.abs().mean() > 1e-3


@pytest.mark.parametrize("g_scale, route", [(0.2, "chunk factored"), (5.0, (16, True)), (8.0, (8, True)),
                                             (30.0, (8, False))])
def test_kda_every_intra_chunk_route_matches_oracle(g_scale, route):
    """KDA's per-channel decay takes one of several routes by gate strength; each must be exact."""
    x = make_inputs("kda", t=130, h=2, d_k=16, g_scale=g_scale)
    G = delta_rule._to_chunks(x["g"], delta_rule.CHUNK_SIZE, torch.float32).cumsum(3)
    if route == "chunk factored":
        assert delta_rule._chunk_factorable(G)
    else:
        assert not delta_rule._chunk_factorable(G) and delta_rule._pick_sub_chunk(G) == route
    o_ref, s_ref = run("kda", x, "recurrent")
    o, s = run("kda", x, "chunk")
    assert rel_err(o, o_ref) < 2e-5 and rel_err(s, s_ref) < 2e-5


@pytest.mark.parametrize("g_scale", [0.2, 5.0])
def test_gdn_both_intra_chunk_routes_match_oracle(g_scale):
    x = make_inputs("gdn", t=130, h=2, d_k=16, g_scale=g_scale)
    G = delta_rule._to_chunks(x["g"].unsqueeze(-1), delta_rule.CHUNK_SIZE, torch.float32).cumsum(3)
    assert delta_rule._chunk_factorable(G) == (g_scale < 1)
    o_ref, s_ref = run("gdn", x, "recurrent")
    o, s = run("gdn", x, "chunk")
    assert rel_err(o, o_ref) < 2e-5 and rel_err(s, s_ref) < 2e-5


@pytest.mark.parametrize("family", ["gdn", "kda"])
def test_grouped_value_heads(family):
    """H_v = 2 H_k: each q/k head serves two consecutive value heads (Qwen3-Next layout)."""
    x = make_inputs(family, t=70, h=4, h_k=2, d_k=16, d_v=24)
    o_ref, s_ref = run(family, x, "recurrent")
    o, s = run(family, x, "chunk")
    assert o.shape == (1, 70, 4, 24) and s.shape == (1, 4, 16, 24)
    assert rel_err(o, o_ref) < 2e-5 and rel_err(s, s_ref) < 2e-5
    expanded = dict(x, q=x["q"].repeat_interleave(2, dim=2), k=x["k"].repeat_interleave(2, dim=2))
    o_exp, _ = run(family, expanded, "recurrent")
    torch.testing.assert_close(o_ref, o_exp)


@pytest.mark.parametrize("family", ["gdn", "kda"])
def test_scale_and_l2norm_options(family):
    x = make_inputs(family, t=65)
    for kw in (dict(scale=0.3, use_qk_l2norm=False), dict(scale=None, use_qk_l2norm=True)):
        o_ref, _ = run(family, x, "recurrent", **kw)
        o, _ = run(family, x, "chunk", **kw)
        assert rel_err(o, o_ref) < 2e-5
    o_a, _ = run(family, x, "chunk", scale=0.3)
    o_b, _ = run(family, x, "chunk", scale=0.6)
    assert rel_err(o_a, o_b) > 0.1  # scale is applied


def test_lightning_scale_is_applied_and_defaults_to_one():
    x = make_inputs("lightning", t=40)
    o1, _ = run("lightning", x, "chunk")
    o2, _ = run("lightning", x, "chunk", scale=2.0)
    o3, _ = run("lightning", x, "recurrent", scale=1.0)
    torch.testing.assert_close(o2, 2 * o1, rtol=1e-5, atol=1e-6)
    assert rel_err(o1, o3) < 2e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_no_final_state_unless_asked(family):
    x = make_inputs(family, t=10)
    x.pop("initial_state")
    if family == "lightning":
        o, s = ops.lightning_attention(x["q"], x["k"], x["v"], x["slope"])
    else:
        fn = ops.gated_delta_rule if family == "gdn" else ops.kda
        o, s = fn(x["q"], x["k"], x["v"], x["g"], x["beta"])
    assert s is None and torch.isfinite(o).all()


# ------------------------------------------------------------------------------------------
# state carried across a split sequence, decode steps


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("family", FAMILIES)
def test_split_sequence_equals_whole(family, mode):
    x = make_inputs(family, t=150, d_k=16)
    o_whole, s_whole = run(family, x, mode)
    first, second = slice_time(x, 0, 67), slice_time(x, 67, 150)
    o1, s1 = run(family, first, mode)
    o2, s2 = run(family, dict(second, initial_state=s1), mode)
    assert rel_err(torch.cat([o1, o2], dim=1), o_whole) < 2e-5
    assert rel_err(s2, s_whole) < 2e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_steps_equal_oracle(family):
    x = make_inputs(family, b=2, t=40, h=2, d_k=16, d_v=8)
    o_ref, s_ref = run(family, x, "recurrent")
    state = x["initial_state"].clone()
    state_ptr = state.data_ptr()
    outs = [step(family, x, t, state) for t in range(40)]
    assert state.data_ptr() == state_ptr  # updated in place
    o = torch.stack(outs, dim=1)
    assert o.shape == (2, 40, 2, 8)
    assert rel_err(o, o_ref) < 1e-6 and rel_err(state, s_ref) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_equals_whole(family):
    """Chunked prefill then step-by-step decode: what a layer with a cache does."""
    x = make_inputs(family, t=80, d_k=16)
    o_ref, s_ref = run(family, x, "recurrent")
    o_pre, state = run(family, slice_time(x, 0, 70), "chunk")
    outs = [step(family, x, t, state) for t in range(70, 80)]
    assert rel_err(torch.cat([o_pre, torch.stack(outs, dim=1)], dim=1), o_ref) < 2e-5
    assert rel_err(state, s_ref) < 2e-5


# ------------------------------------------------------------------------------------------
# extreme gates, bf16, float64


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strength", ["near_zero", "minus_30", "mixed"])
def test_extreme_gates_are_finite_and_exact(family, strength):
    x = make_inputs(family, t=150, d_k=16)
    if family == "lightning":
        x["slope"] = {"near_zero": torch.full((2,), 1e-7), "minus_30": torch.full((2,), 30.0),
                      "mixed": torch.tensor([30.0, 1e-7])}[strength]
    else:
        g = x["g"]
        if strength == "near_zero":
            g = torch.full_like(g, -1e-7)
        elif strength == "minus_30":
            g = torch.full_like(g, -30.0)
        else:  # per token (GDN) or per channel (KDA), −30 and ~0 side by side
            g = torch.where(torch.rand_like(g) < 0.5, torch.full_like(g, -30.0), torch.full_like(g, -1e-7))
        x["g"] = g
    o_ref, s_ref = run(family, x, "recurrent")
    o, s = run(family, x, "chunk")
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_err(o, o_ref) < 2e-5 and rel_err(s, s_ref) < 2e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_finite_at_minus_30(family):
    x = make_inputs(family, t=70, d_k=8)
    if family == "lightning":
        x["slope"] = torch.full((2,), 30.0)
    else:
        x["g"] = torch.full_like(x["g"], -30.0)
    leaves = {k: v.requires_grad_() for k, v in x.items()}
    o, s = run(family, leaves, "chunk")
    (o.sum() + s.sum()).backward()
    for name, leaf in leaves.items():
        assert torch.isfinite(leaf.grad).all(), name


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_inputs_float32_state(family):
    x = make_inputs(family, t=100, d_k=32, dtype=torch.bfloat16)
    o, s = run(family, x, "chunk")
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    upcast = {k: (v.float() if k in ("q", "k", "v") else v) for k, v in x.items()}
    o_ref, s_ref = run(family, upcast, "recurrent")
    assert rel_err(o, o_ref) < 1e-2  # bf16 rounding of the output only
    assert rel_err(s, s_ref) < 2e-5  # the state never left float32
    state = x["initial_state"].clone()
    o_step = step(family, x, 0, state)
    assert o_step.dtype == torch.bfloat16 and state.dtype == torch.float32


@pytest.mark.parametrize("g_scale", [0.5, 5.0, 8.0, 30.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_float64_inputs_compute_in_float64(family, g_scale):
    """In float64 every route of the chunked form is exact to ~1e-16: no approximation hides in
    the factorisations or the decay floor (a misplaced floor showed up here as 3e-7)."""
    x = {k: v.double() for k, v in make_inputs(family, t=200, d_k=16, g_scale=g_scale).items()}
    o_ref, s_ref = run(family, x, "recurrent")
    o, s = run(family, x, "chunk")
    assert o.dtype == torch.float64 and s.dtype == torch.float64
    assert rel_err(o, o_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


# ------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("family, g_scale", [("lightning", 1.0), ("gdn", 0.5), ("gdn", 5.0), ("kda", 0.5),
                                             ("kda", 5.0), ("kda", 30.0)])
def test_gradients_chunk_vs_recurrent(family, g_scale):
    """Autograd through the chunked form (training uses it) equals autograd through the loop,
    on every intra-chunk route (mild gates factored per chunk, strong ones per sub-chunk)."""
    x = {k: v.double() for k, v in make_inputs(family, t=70, d_k=8, d_v=6, g_scale=g_scale).items()}
    grads = {}
    for mode in ("recurrent", "chunk"):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        o, s = run(family, leaves, mode)
        w_o = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)
        w_s = torch.linspace(1, -1, s.numel(), dtype=s.dtype).reshape(s.shape)
        ((o * w_o).sum() + (s * w_s).sum()).backward()
        grads[mode] = {k: v.grad for k, v in leaves.items()}
    for name, g_ref in grads["recurrent"].items():
        assert g_ref.abs().sum() > 0, name
        assert rel_err(grads["chunk"][name], g_ref) < 1e-9, name


@pytest.mark.parametrize("family", ["gdn", "kda"])
def test_gradients_grouped_heads_without_l2norm(family):
    x = {k: v.double() for k, v in make_inputs(family, t=70, h=4, h_k=2, d_k=6, d_v=5).items()}
    x["q"], x["k"] = x["q"] / 3, x["k"] / 3
    grads = []
    for mode in ("recurrent", "chunk"):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        o, s = run(family, leaves, mode, use_qk_l2norm=False, scale=0.7)
        (o.square().sum() + s.sum()).backward()
        grads.append(leaves)
    for name in x:
        assert rel_err(grads[1][name].grad, grads[0][name].grad) < 1e-9, name


@pytest.mark.parametrize("family", ["gdn", "kda"])
def test_decay_spans_restart_within_segments_and_stay_bounded(family):
    """The mild route measures decays from the start of a span of chunks: each chunk's offset is the
    sum of the earlier chunks' log-decays in its span, a span never crosses a segment boundary, its
    total decay stays within e^-_MAX_SPAN, and a segment with one chunk beyond that is not mild."""
    c, per_segment = delta_rule.CHUNK_SIZE, 4
    x = make_inputs(family, t=c * 11, h=2, d_k=8, g_scale=0.3)
    g = x["g"] if family == "kda" else x["g"].unsqueeze(-1)
    g[:, 9 * c + 3] = -2 * delta_rule._MAX_SPAN  # one chunk in the third segment decays too much
    G = delta_rule._to_chunks(g, c, torch.float32).cumsum(3).permute(2, 0, 1, 3, 4)  # (N, B, H, C, ·)
    G = G.unsqueeze(3)  # (N, B, H, rep=1, C, ·) as _delta_chunked lays it out
    mild, offset, ends = delta_rule._decay_spans(G, per_segment)
    assert mild == [True, True, False]
    assert all(ends[i] for i in (3, 7, 8, 9, 10))  # segment ends, and every chunk of a strong segment
    total = G[..., -1:, :]  # (N, B, H, 1, 1, ·)
    span_start = 0
    for i in range(G.shape[0]):
        expected = total[span_start:i].sum(0)
        torch.testing.assert_close(offset[i], expected, rtol=1e-6, atol=1e-5)
        assert float((offset[i] + total[i]).amin()) >= -delta_rule._MAX_SPAN or not mild[i // per_segment]
        if ends[i]:
            span_start = i + 1
    assert sum(ends[:8]) < 8  # the mild segments hold spans of several chunks


@pytest.mark.parametrize("family", ["gdn", "kda"])
def test_mild_and_strong_segments_in_one_sequence_match_oracle(family):
    """Several segments, multi-chunk spans, and a segment on the strong-gate route between mild ones."""
    t = 3 * delta_rule._SEGMENT - 5
    x = make_inputs(family, t=t, h=1, d_k=8, g_scale=0.2)
    x["g"][:, delta_rule._SEGMENT + 40] = -70.0
    o_ref, s_ref = run(family, x, "recurrent")
    o, s = run(family, x, "chunk")
    assert rel_err(o, o_ref) < 2e-5 and rel_err(s, s_ref) < 2e-5


def test_gradients_across_segments():
    """Sequences longer than one segment (the chunked path carries its state between segments of
    delta_rule._SEGMENT tokens) still differentiate exactly."""
    t = delta_rule._SEGMENT + 77
    x = {k: v.double() for k, v in make_inputs("kda", t=t, h=1, d_k=4, d_v=3).items()}
    grads = []
    for mode in ("recurrent", "chunk"):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        o, s = run("kda", leaves, mode)
        (o.square().sum() + s.sum()).backward()
        grads.append(leaves)
    for name in x:
        assert rel_err(grads[1][name].grad, grads[0][name].grad) < 1e-9, name


# ------------------------------------------------------------------------------------------
# property tests


@settings(max_examples=8, deadline=None)
@given(
    family=st.sampled_from(FAMILIES),
    b=st.integers(1, 2), t=st.integers(1, 140), h_k=st.integers(1, 2), rep=st.integers(1, 2),
    d_k=st.integers(1, 20), d_v=st.integers(1, 20), g_scale=st.sampled_from([0.01, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_property_chunk_equals_oracle(family, b, t, h_k, rep, d_k, d_v, g_scale, seed):
    if family == "lightning":
        rep = 1
    x = make_inputs(family, b=b, t=t, h=h_k * rep, h_k=h_k, d_k=d_k, d_v=d_v, g_scale=g_scale, seed=seed)
    o_ref, s_ref = run(family, x, "recurrent")
    o, s = run(family, x, "chunk")
    assert rel_err(o, o_ref) < 5e-5 and rel_err(s, s_ref) < 5e-5


@settings(max_examples=6, deadline=None)
@given(family=st.sampled_from(FAMILIES), t=st.integers(2, 130), cut=st.floats(0.0, 1.0),
       seed=st.integers(0, 999))
def test_property_any_split_point(family, t, cut, seed):
    x = make_inputs(family, t=t, d_k=8, seed=seed)
    split = max(1, min(t - 1, int(cut * t)))
    o_whole, s_whole = run(family, x, "chunk")
    o1, s1 = run(family, slice_time(x, 0, split), "chunk")
    o2, s2 = run(family, dict(slice_time(x, split, t), initial_state=s1), "chunk")
    assert rel_err(torch.cat([o1, o2], 1), o_whole) < 5e-5 and rel_err(s2, s_whole) < 5e-5


# ------------------------------------------------------------------------------------------
# bad input


def _bad_cases():
    """(family, what to change, expected words in the message)."""
    meta = lambda v: v.to("meta")
    return [
        ("lightning", dict(q=lambda x: x["q"][0]), "q: expected 4 dims"),
        ("lightning", dict(k=lambda x: x["k"][:, :-1]), "k: expected shape"),
        ("lightning", dict(v=lambda x: x["v"][:, :, :1]), "v: expected shape"),
        ("lightning", dict(slope=lambda x: x["slope"][:1]), "slope: expected shape"),
        ("lightning", dict(slope=lambda x: x["slope"].long()), "slope: expected dtype"),
        ("lightning", dict(k=lambda x: x["k"].double()), "k: expected dtype"),
        ("lightning", dict(q=lambda x: x["q"].long()), "q: expected dtype"),
        ("lightning", dict(initial_state=lambda x: x["initial_state"].bfloat16()),
         "initial_state: expected dtype"),
        ("lightning", dict(initial_state=lambda x: x["initial_state"][:, :1]),
         "initial_state: expected shape"),
        ("lightning", dict(k=lambda x: meta(x["k"])), "k: on device meta"),
        ("gdn", dict(q=lambda x: x["q"][..., 0]), "q: expected 4 dims"),
        ("gdn", dict(v=lambda x: x["v"][:, :5]), "v: expected shape"),
        ("gdn", dict(v=lambda x: torch.cat([x["v"], x["v"][:, :, :1]], 2)), "v has 3 heads"),
        ("gdn", dict(g=lambda x: x["g"].unsqueeze(-1).expand(-1, -1, -1, 16)), "g: expected 3 dims"),
        ("gdn", dict(g=lambda x: x["g"][:, :3]), "g: expected shape"),
        ("gdn", dict(beta=lambda x: x["beta"][..., :1]), "beta: expected shape"),
        ("gdn", dict(beta=lambda x: x["beta"].long()), "beta: expected dtype"),
        ("gdn", dict(initial_state=lambda x: x["initial_state"].transpose(-1, -2)[..., :3]),
         "initial_state: expected shape"),
        ("gdn", dict(g=lambda x: meta(x["g"])), "g: on device meta"),
        ("kda", dict(g=lambda x: x["g"][..., 0]), "g: expected 4 dims"),
        ("kda", dict(g=lambda x: x["g"][..., :3]), "g: expected shape"),
        ("kda", dict(beta=lambda x: meta(x["beta"])), "beta: on device meta"),
        ("kda", dict(initial_state=lambda x: meta(x["initial_state"])), "initial_state: on device meta"),
    ]


@pytest.mark.parametrize("family, change, words", _bad_cases())
def test_bad_input_names_the_argument(family, change, words):
    x = make_inputs(family, t=10, d_k=16)
    x.update({k: f(x) for k, f in change.items()})
    with pytest.raises(ValueError, match=words):
        run(family, x, "chunk")


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_mode(family):
    x = make_inputs(family, t=4)
    with pytest.raises(ValueError, match="mode: expected one of"):
        run(family, x, "fast")
    with pytest.raises(ValueError, match="mode: 'triton' needs CUDA tensors"):
        run(family, x, "triton")


def _bad_step_cases():
    return [
        ("lightning", "q", lambda x: x[:, :, None], "q: expected 3 dims"),
        ("lightning", "slope", lambda x: x[:1], "slope: expected shape"),
        ("lightning", "state", lambda x: x.bfloat16(), "state: expected dtype"),
        ("lightning", "state", lambda x: x[:, :1], "state: expected shape"),
        ("gdn", "g", lambda x: x.unsqueeze(-1), "g: expected 2 dims"),
        ("gdn", "beta", lambda x: x[:, :1], "beta: expected shape"),
        ("gdn", "k", lambda x: x.to("meta"), "k: on device meta"),
        ("gdn", "v", lambda x: x[:, :1], "v has 1 heads"),
        ("kda", "g", lambda x: x[..., 0], "g: expected 3 dims"),
        ("kda", "g", lambda x: x[..., :2], "g: expected shape"),
        ("kda", "state", lambda x: x[..., :2, :], "state: expected shape"),
    ]


@pytest.mark.parametrize("family, name, change, words", _bad_step_cases())
def test_bad_step_input_names_the_argument(family, name, change, words):
    x = make_inputs(family, t=3, d_k=16)
    state = x["initial_state"].clone()
    if name == "state":
        state = change(state)
    else:
        per_token = name not in ("slope",)
        x = dict(x)
        x[name] = change(x[name][:, 0]).unsqueeze(1) if per_token else change(x[name])
    with pytest.raises(ValueError, match=words):
        step(family, x, 0, state)


# ------------------------------------------------------------------------------------------
# GPU (run on the device machine)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_chunk_matches_oracle_and_auto_dispatches_to_triton(family):
    x = {k: v.cuda() for k, v in make_inputs(family, b=2, t=300, h=4, d_k=64).items()}
    o_ref, s_ref = run(family, x, "recurrent")
    o, s = run(family, x, "chunk")
    assert rel_err(o, o_ref) < 2e-5 and rel_err(s, s_ref) < 2e-5
    name = {"lightning": "lightning_attention", "gdn": "gated_delta_rule", "kda": "kda"}[family]
    assert resolve_mode("auto", x["q"], name)[0] == "triton"  # "auto" takes the kernel on CUDA
    o_tr, s_tr = run(family, x, "triton")
    assert rel_err(o_tr, o_ref) < 5e-3 and rel_err(s_tr, s_ref) < 5e-3


def test_step_modes_on_cpu():
    """The decode steps take mode= like the sequence ops: "auto", "recurrent" and "chunk" run the
    torch step on the CPU (same result); "triton" needs CUDA tensors and says so."""
    x = make_inputs("kda", b=2, t=1, h=3, d_k=8)
    q, k, v, g, beta = (x[n][:, 0] for n in ("q", "k", "v", "g", "beta"))  # one token
    outs = []
    for mode in ("auto", "recurrent", "chunk"):
        outs.append(ops.kda_step(q, k, v, g, beta, torch.zeros(2, 3, 8, 8), mode=mode))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    state = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="mode: 'triton' needs CUDA"):
        ops.lightning_attention_step(q, k, v, torch.ones(3), state, mode="triton")
    with pytest.raises(ValueError, match="mode"):
        ops.gated_delta_rule_step(q, k, v, g[..., 0], beta, state, mode="fast")
