import dataclasses
import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

from attnlab import cost
from attnlab.cli import main
from attnlab.config import ModelConfig
from attnlab.model import HybridLM
from attnlab.presets import preset_names


def test_sum_keys_seen_matches_a_loop():
    cfg = ModelConfig(pattern="W", window=7, sink_tokens=3, index_topk=5, d_model=32, n_layers=1, n_heads=2)
    for letter in "SWD":
        for start, stop in [(0, 1), (0, 30), (5, 6), (9, 40), (12, 13)]:
            want = sum(cost.keys_seen(letter, cfg, p) for p in range(start, stop))
            assert cost._sum_keys_seen(letter, cfg, start, stop) == want, (letter, start, stop)
    # a window query sees the window plus every sink once the window has moved past them
    assert cost.keys_seen("W", cfg, 100) == 7 + 3
    assert cost.keys_seen("W", cfg, 8) == 7 + 2
    assert cost.keys_seen("D", cfg, 100) == 5


def test_fit_exponent_recovers_power_laws():
    xs = [1024, 2048, 4096, 8192]
    for p in (0.0, 1.0, 2.0):
        assert cost.fit_exponent(xs, [3.0 * x**p for x in xs]) == pytest.approx(p, abs=1e-9)
    assert cost.fit_exponent([1], [1.0]) is None


def test_asymptotic_exponent_recovers_the_leading_power():
    """A planted y = a x^2 + b x whose linear term dominates at small x: the whole-range fit is
    biased towards 1, the slope between the two largest x tends to 2 as the range grows."""
    a, b = 1.0, 5000.0

    def y(x):
        return a * x * x + b * x

    xs = [2**i for i in range(11, 15)]  # 2K..16K: a x is 0.4 b .. 3.3 b
    whole = cost.fit_exponent(xs, [y(x) for x in xs])
    asym = cost.asymptotic_exponent(xs, [y(x) for x in xs])
    assert whole < asym < 2
    assert asym == pytest.approx(1 + math.log2((2 * a * 8192 + b) / (a * 8192 + b)), abs=1e-12)
    errors = []
    for top in range(14, 25):
        xs = [2**i for i in range(top - 3, top + 1)]
        errors.append(2 - cost.asymptotic_exponent(xs, [y(x) for x in xs]))
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:], strict=False))  # converges from below
    assert errors[-1] < 0.001
    # y = c + a x (decode: fixed per-step cost + a per-cached-token cost): slope -> 1, marginal = a exactly
    xs = [4096, 65536, 262144, 524288]
    ys = [0.3e-3 + 2e-9 * x for x in xs]
    assert cost.fit_exponent(xs, ys) < cost.asymptotic_exponent(xs, ys) < 1
    assert cost.asymptotic_exponent([x * 1024 for x in xs], [0.3e-3 + 2e-9 * x * 1024 for x in xs]) > 0.999
    assert cost.marginal_cost(xs, ys) == pytest.approx(2e-9, rel=1e-9)
    # the order of the points does not matter; too few points give None
    assert cost.asymptotic_exponent(xs[::-1], ys[::-1]) == cost.asymptotic_exponent(xs, ys)
    assert cost.asymptotic_exponent([1], [1.0]) is None and cost.marginal_cost([1], [1.0]) is None


def test_time_budget_estimate_and_stop():
    prev = cost.Measurement("prefill", 1000, seconds=0.1, cache_bytes=0, peak_bytes=None, setup_s=0.5)
    # setup x ratio + warm-up and repeats of a call that grows with ratio^2 (0.4 s: 3 repeats)
    assert cost.estimate_point_s(prev, 2000) == pytest.approx(0.5 * 2 + 0.4 + 3 * 0.4)
    # after a curve's first point its setup (kernel compilation, capture) is not extrapolated
    assert cost.estimate_point_s(prev, 2000, first=True) == pytest.approx(0.4 + 3 * 0.4)
    prev = cost.Measurement("decode", 1000, seconds=0.4, cache_bytes=0, peak_bytes=None, setup_s=0.0)
    assert cost.estimate_point_s(prev, 4000) == pytest.approx(2 * 1.6)  # > 1 s: warm-up + one call

    cfg = cost.mechanism_config("S", cost.CostSettings(d_model=32, n_heads=2))
    runner = cost._Runner(cost.build_layer("S", cfg, 0), cfg, False, torch.device("cpu"), torch.float32)
    seen = []
    ms = cost.measure(
        runner, [64, 16, 32, 2**26], "decode", deadline=time.monotonic() + 5, on_point=seen.append
    )
    assert [m.context for m in ms] == [16, 32, 64, 2**26]  # increasing order; 2**26 would take minutes
    assert all(m.seconds > 0 and m.wall_s >= m.seconds for m in ms[:3])
    assert ms[-1].seconds is None and ms[-1].error.startswith("stopped: time budget (context 67108864")
    assert seen == ms
    # a deadline already past stops the curve before its first point
    ms = cost.measure(runner, [16, 32], "prefill", deadline=time.monotonic() - 1)
    assert len(ms) == 1 and ms[0].context == 16 and "time budget" in ms[0].error


def test_fill_random_in_slices_fills_every_element(monkeypatch):
    monkeypatch.setattr(cost, "_FILL_SLICE", 1000)
    cfg = cost.mechanism_config("D", cost.CostSettings(d_model=32, n_heads=2))
    caches = [cost.build_layer("D", cfg, 0).new_cache(2, 300)]
    cost._fill_random(caches, 123, torch.Generator().manual_seed(0))
    for t in caches[0].state_tensors().values():
        assert t.numel() > 1000 and bool((t != 0).all()) and float(t.std()) == pytest.approx(0.1, rel=0.2)
    assert caches[0].lengths.tolist() == [123, 123]


def test_dsa_decode_scores_one_query_and_prefill_chunks_bound_the_scores(monkeypatch):
    """DSA decode at context L scores 1 query x (L + 1) keys (no O(L^2) work); prefill chunks keep
    [chunk, L] indexer scores under the device's element budget, also at 1M tokens on a GPU."""
    from attnlab import ops

    shapes = []
    real = ops.dsa_index_scores

    def spy(q, k, w, *args, **kwargs):
        shapes.append((q.shape[1], k.shape[1]))
        return real(q, k, w, *args, **kwargs)

    monkeypatch.setattr(ops, "dsa_index_scores", spy)
    s = cost.CostSettings(d_model=32, n_heads=2, index_topk=8)
    cfg = cost.mechanism_config("D", s)
    runner = cost._Runner(cost.build_layer("D", cfg, 0), cfg, False, torch.device("cpu"), torch.float32)
    cost.measure(runner, [100, 1000], "decode")
    assert shapes and set(shapes) == {(1, 101), (1, 1001)}
    for device, budget in (("cpu", 1 << 25), ("cuda", 1 << 28)):
        runner.device = torch.device(device)  # prefill_chunk only reads the device type
        for L in (2048, 16384, 2**20):
            chunk = runner.prefill_chunk(L)
            assert chunk == L or (chunk * L <= max(budget, 128 * L) and chunk >= 128)
        assert runner.prefill_chunk(2**20) * 2**20 <= 1 << 28
    m_cfg = cost.mechanism_config("M", s)
    m = cost._Runner(cost.build_layer("M", m_cfg, 0), m_cfg, False, torch.device("cpu"), torch.float32)
    assert m.prefill_chunk(16384) == 2048
    m.device = torch.device("cuda")
    assert m.prefill_chunk(2**20) == 2**20  # on CUDA M decompresses its latents once


def test_run_cost_lab_reports_after_every_curve():
    s = cost.CostSettings(
        d_model=32, n_heads=2, mechanisms="SL", presets=("llama",), prefill_contexts=(32, 64),
        decode_contexts=(32, 64), preset_decode_contexts=(32,), budget_s=60,
    )  # fmt: skip
    updates = []
    result = cost.run_cost_lab(s, on_update=lambda r: updates.append(json.loads(json.dumps(r))))
    # before the first curve, then after each: decode S, L; preset llama; prefill L, S (cheapest
    # first); the S op alone: decode, prefill
    assert [u["status"] for u in updates] == ["partial"] * 8 + ["complete"]
    assert [u["curves_done"] for u in updates[:8]] == list(range(0, 8))
    assert [u["running"] for u in updates] == [
        "decode S", "decode L", "preset llama", "prefill L", "prefill S", "op-decode S", "op-prefill S",
        None, None,
    ]  # fmt: skip
    assert (
        updates[-1]["curves_finished"]
        == updates[-2]["curves_finished"]
        == [u["running"] for u in updates[:7]]
    )
    assert updates[0]["mechanisms"]["S"]["analytic"]["prefill_flops"]  # the analytic part is saved at once
    updates = updates[1:]
    first = updates[0]
    assert (
        len(first["mechanisms"]["S"]["measured"]["decode"]) == 2
        and first["mechanisms"]["L"]["measured"]["decode"] == []
    )
    assert first["mechanisms"]["L"]["limit"]["decode"] == "not measured yet"
    assert (
        updates[3]["mechanisms"]["L"]["measured"]["prefill"]
        and not updates[3]["mechanisms"]["S"]["measured"]["prefill"]
    )
    assert result["status"] == "complete" and result["mechanisms"]["S"]["limit"] == {
        "prefill": "complete",
        "decode": "complete",
    }
    ex = result["ops"]["S"]["exponents"]
    assert ex["prefill"] is not None and ex["decode_asymptotic"] is not None
    assert "S op alone" in cost.format_table(result)


def _load_cost_gpu():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cost_gpu.py"
    spec = importlib.util.spec_from_file_location("cost_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cost_gpu_script_tiny_on_cpu(tmp_path, capfd, monkeypatch):
    """benchmarks/cost_gpu.py end to end on the CPU (the path the GPU run takes, at toy sizes), with
    a fake sticky CUDA error injected in the middle: the points before it stay, the curve's limit
    is the error, and every later curve is measured by a fresh worker process."""
    cost_gpu = _load_cost_gpu()
    out = tmp_path / "gpu"
    # curves: decode S, D, L; preset deepseek-v32; prefill L, S, D; op-decode D, S; op-prefill S
    monkeypatch.setenv(cost.FAULT_ENV, "prefill L@64")
    args = [
        "--device",
        "cpu",
        "--tiny",
        "--out",
        str(out),
        "--mechanisms",
        "SDL",
        "--presets",
        "deepseek-v32",
    ]
    assert cost_gpu.main([*args, "--budget-s", "120"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "cost.json",
        "cost_vs_context.png",
        "dollars_vs_context.png",
        "memory_vs_context.png",
    ]  # fmt: skip  (no temporary file left behind)
    data = json.loads((out / "cost.json").read_text())
    assert data["status"] == "complete" and data["settings"]["index_topk"] == 8
    assert set(data["mechanisms"]) == set("SDL") and set(data["presets"]) == {"deepseek-v32"}
    first, second = data["processes"]
    assert first["pid"] != second["pid"]
    assert first["curves"] == ["decode S", "decode D", "decode L", "preset deepseek-v32", "prefill L"]
    assert second["curves"] == data["curves_finished"][5:] and len(second["curves"]) == 5
    assert {"prefill S", "prefill D"} < set(second["curves"]) and second["curves"][2:] == [
        "op-decode D", "op-decode S", "op-prefill S",
    ]  # fmt: skip
    assert [r["curve"] for r in data["restarts"]] == ["prefill L"]
    lp = data["mechanisms"]["L"]["measured"]["prefill"]
    assert [m["context"] for m in lp] == [32, 64] and lp[0]["seconds"] > 0 and lp[1]["seconds"] is None
    assert (
        "illegal memory access" in lp[1]["error"]
        and data["mechanisms"]["L"]["limit"]["prefill"] == lp[1]["error"]
    )
    for letter, e in data["mechanisms"].items():
        assert e["impl"].endswith("+simulated-graph") and e["decode_mode"] == "simulated_graph"
        for w in ("prefill", "decode"):
            if (letter, w) != ("L", "prefill"):
                assert [m["seconds"] > 0 for m in e["measured"][w]] == [True] * 3, (letter, w)
                assert e["limit"][w] == "complete"
    assert data["mechanisms"]["D"]["impl"] == "torch-indexer+torch-sparse+simulated-graph"
    assert [m["context"] for m in data["ops"]["D"]["measured"]["decode"]] == [64, 128, 256]  # indexer alone
    assert len(data["ops"]["S"]["measured"]["prefill"]) == 3
    preset = data["presets"]["deepseek-v32"]
    assert preset["decode_mode"] == "simulated_graph" and preset["memory_check"]
    assert all(m["analytic_bytes"] == m["allocated_bytes"] for m in preset["memory_check"])
    assert all(m["cache_len"] > m["context"] + 1 for m in preset["memory_check"])  # room for the replays
    for png in ("cost_vs_context.png", "memory_vs_context.png", "dollars_vs_context.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = capfd.readouterr().out
    assert "decode S (softmax attention) @ 64:" in log and "ms per call" in log
    assert (
        "(exit 75), resuming after prefill L" in log and "went on in a fresh process after prefill L" in log
    )
    # replot from the JSON alone; no CUDA -> a clear refusal, not a crash
    (out / "cost_vs_context.png").unlink()
    assert cost_gpu.main(["--replot", str(out / "cost.json")]) == 0
    assert (out / "cost_vs_context.png").is_file()
    if not torch.cuda.is_available():
        assert cost_gpu.main(["--out", str(tmp_path / "x")]) == 2


def test_cost_gpu_worker_that_dies_mid_curve(tmp_path, capfd, monkeypatch):
    """A worker killed inside a curve (a crash, not an exception): the curve it was running is
    recorded as failed and a fresh worker measures the rest."""
    cost_gpu = _load_cost_gpu()
    out = tmp_path / "gpu"
    monkeypatch.setenv(cost.FAULT_ENV, "decode L@128!")
    args = ["--device", "cpu", "--tiny", "--out", str(out), "--mechanisms", "LG", "--presets", ""]
    assert cost_gpu.main([*args, "--decode-graph", "eager"]) == 0
    data = json.loads((out / "cost.json").read_text())
    assert data["status"] == "complete" and data["curves_finished"][0] == "decode L"
    assert (
        data["mechanisms"]["L"]["limit"]["decode"] == "error: the worker process died in it (exit status 134)"
    )
    assert [p["curves"] for p in data["processes"]] == [[], ["decode G", "prefill G", "prefill L"]]
    assert all(
        m["seconds"] > 0 and m["mode"] == "eager" for m in data["mechanisms"]["G"]["measured"]["decode"]
    )
    assert "+" not in data["mechanisms"]["G"]["impl"]  # eager decode: no graph suffix
    assert "(exit 134), resuming after decode L" in capfd.readouterr().out


def test_sticky_device_errors_are_told_from_recoverable_ones():
    sticky = [
        torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("CUDA error: device-side assert triggered"),
        RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
        RuntimeError("CUDA error: unspecified launch failure"),
    ]
    recoverable = [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("shape mismatch"),
        ValueError("cache: full"),
    ]
    assert [cost.is_sticky_device_error(e) for e in sticky] == [True] * 4
    assert [cost.is_sticky_device_error(e) for e in recoverable] == [False] * 4


def test_poisoned_run_stops_and_resumes_with_the_rest_of_the_budget(monkeypatch):
    """In process: a fake sticky error in one curve keeps its earlier points, stops the run with
    ``poisoned`` set; a resumed run (a 'fresh process': the injected state cleared) measures only
    the curves left, within the budget it is given."""
    monkeypatch.setattr(cost, "_INJECTED", [])
    monkeypatch.setenv(cost.FAULT_ENV, "decode L@64")
    s = cost.CostSettings(
        d_model=32, n_heads=2, mechanisms="SL", presets=(), prefill_contexts=(32, 64),
        decode_contexts=(32, 64, 128), budget_s=60, keep_going=True,
    )  # fmt: skip
    first = cost.run_cost_lab(s)
    assert first["status"] == "partial" and first["poisoned"]["curve"] == "decode L"
    assert first["curves_finished"] == ["decode S", "decode L"] and first["running"] == "prefill L"
    dec = first["mechanisms"]["L"]["measured"]["decode"]
    assert [m["context"] for m in dec] == [32, 64] and dec[0]["seconds"] > 0 and dec[1]["seconds"] is None
    assert first["mechanisms"]["L"]["measured"]["prefill"] == []
    # without a fresh process every later curve would fail the same way (the error is sticky)
    with pytest.raises(cost.CurveFailed, match="illegal memory access"):
        cost.measure(cost._SoftmaxOpRunner(cost.mechanism_config("S", s), torch.device("cpu"), torch.float32),
                     [32], "decode")  # fmt: skip
    with pytest.raises(ValueError, match="resume: settings differ.*d_model"):
        cost.run_cost_lab(dataclasses.replace(s, d_model=64), resume=first)
    monkeypatch.setattr(cost, "_INJECTED", [])  # a fresh process
    seen = []  # the first process used 59 s of the 60: the resumed run gets 1 s
    second = cost.run_cost_lab(dataclasses.replace(s, budget_s=1.0), resume=first, progress=seen.append)
    assert second["status"] == "complete" and "poisoned" not in second
    assert second["settings"]["budget_s"] == 60  # the run's settings, not the remainder
    assert second["restarts"] == [first["poisoned"]] and second["processes"][-1]["curves"] == [
        "prefill L", "prefill S", "op-decode S", "op-prefill S",
    ]  # fmt: skip
    assert second["mechanisms"]["L"]["measured"]["decode"] == dec  # kept, not measured again
    assert float(seen[0].split(", ")[1].split(" s share")[0]) < 1  # <= 1 s left, in 4 shares
    with pytest.raises(ValueError, match="complete"):
        cost.run_cost_lab(s, resume=second)


def test_capture_that_poisons_the_context_is_retried_eagerly(monkeypatch):
    """A sticky error while capturing a curve's first point: the curve is not finished, the fresh
    process times it eagerly (with the reason); the other curves keep their graph timing."""
    s = cost.CostSettings(
        d_model=32, n_heads=2, mechanisms="SL", presets=(), prefill_contexts=(32,), decode_contexts=(32, 64),
        keep_going=True, decode_graph="simulate",
    )  # fmt: skip
    real = cost._GraphDecode

    def broken(runner, caches, x, simulate=False):
        if runner.cfg.layer_pattern == "S" and runner.module is not None:  # the S layer, not the op alone
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return real(runner, caches, x, simulate)

    monkeypatch.setattr(cost, "_GraphDecode", broken)
    first = cost.run_cost_lab(s)
    assert first["poisoned"]["curve"] == "decode S" and first["running"] == "decode S"
    assert first["curves_finished"] == [] and "decode S" in first["eager_decode"]
    assert first["mechanisms"]["S"]["measured"]["decode"] == []
    second = cost.run_cost_lab(s, resume=first)  # a fresh process (the capture would break again)
    assert second["status"] == "complete" and second["curves_finished"][0] == "decode S"
    e = second["mechanisms"]["S"]
    assert e["decode_mode"] == "eager" and "earlier process" in e["decode_mode_note"]
    assert [m["seconds"] > 0 for m in e["measured"]["decode"]] == [True, True] and e["impl"] == "sdpa"
    assert second["mechanisms"]["L"]["decode_mode"] == "simulated_graph"
    assert second["ops"]["S"]["decode_mode"] == "simulated_graph"


def test_graph_decode_protocol_simulated(monkeypatch):
    """The CUDA-graph decode timing path without a GPU: capture on fresh caches (reset after),
    random fill after, lengths rewound to the context before every batch (they never grow past
    context + 1 + replays), and a capture that fails is timed eagerly with the reason recorded."""
    s = cost.CostSettings(d_model=32, n_heads=2)
    cfg = cost.mechanism_config("S", s)
    runner = cost._Runner(cost.build_layer("S", cfg, 0), cfg, False, torch.device("cpu"), torch.float32)
    seen_lengths = []
    real_call = cost._Runner.__call__

    def spy(self, x, caches):
        seen_lengths.append(int(caches[0].lengths[0]))
        return real_call(self, x, caches)

    monkeypatch.setattr(cost._Runner, "__call__", spy)
    ms = cost.measure(runner, [100], "decode", decode_graph="simulate")
    (m,) = ms
    assert m.mode == "simulated_graph" and m.seconds > 0 and m.cache_len == 100 + 1 + cost._GRAPH_REPLAYS + 1
    warm = cost._GRAPH_WARMUP
    assert seen_lengths[:warm] == list(range(warm))  # warm-up on the fresh cache
    timed = seen_lengths[warm:]  # one untimed replay, then batches of _GRAPH_REPLAYS from the context
    assert timed[0] == 100 and len(timed) % cost._GRAPH_REPLAYS == 1
    batches = [
        timed[1 + i : 1 + i + cost._GRAPH_REPLAYS] for i in range(0, len(timed) - 1, cost._GRAPH_REPLAYS)
    ]
    assert len(batches) >= cost._GRAPH_BATCHES
    assert all(b == list(range(100, 100 + cost._GRAPH_REPLAYS)) for b in batches)
    assert max(seen_lengths) < m.cache_len
    # a whole model goes through DecodeStep's protocol
    pcfg = ModelConfig.preset("qwen3-next", d_model=32, n_layers=8, vocab_size=64)
    model_runner = cost._Runner(HybridLM(pcfg), pcfg, True, torch.device("cpu"), torch.float32)
    (pm,) = cost.measure(model_runner, [40], "decode", decode_graph="simulate")
    assert pm.mode == "simulated_graph" and pm.seconds > 0

    # capture fails (an op that syncs with the host inside capture): eager timing, reason kept
    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(cost, "_GraphDecode", refuse)
    ms = cost.measure(runner, [50, 100], "decode", decode_graph="simulate")
    assert [m.mode for m in ms] == ["eager", "eager"] and all(m.seconds > 0 for m in ms)
    assert "capture failed" in ms[0].note and "stream is capturing" in runner.graph_failed
    entry = {"impl": "sdpa", "measured": {"prefill": [], "decode": []}, "limit": {}, "exponents": {}}
    cost._store_curve(entry, "decode", ms, s)
    assert entry["decode_mode"] == "eager" and "capture failed" in entry["decode_mode_note"]
    assert entry["impl"] == "sdpa"
    with pytest.raises(ValueError, match="decode_graph"):
        cost.measure(runner, [50], "decode", decode_graph="graph")
    for bad in ("graph", "cuda_graph"):  # unknown; a CUDA graph asked for on the CPU
        with pytest.raises(ValueError, match="decode_graph"):
            cost.run_cost_lab(dataclasses.replace(s, decode_graph=bad, mechanisms="L", presets=()))


@pytest.mark.parametrize("name", preset_names())
def test_declared_cache_bytes_equal_allocated(name):
    """Analytic memory (from the layers' CacheSpec) == bytes of the tensors actually allocated."""
    cfg = ModelConfig.preset(name, d_model=32, n_layers=8, vocab_size=64)
    model = HybridLM(cfg)
    mc = cost.ModelCost(cfg, torch.float32)
    for max_len in (1, 37, 300):
        caches = model.new_caches(2, max_len, dtype=torch.float32)
        assert cost.allocated_cache_bytes(caches) == 2 * mc.cache_bytes(max_len)


def test_analytic_scaling_by_mechanism():
    s = cost.CostSettings(d_model=64, n_heads=2, window=128, index_topk=64)
    ctx = [2**14, 2**16, 2**18, 2**20]
    exps = {}
    for letter in "SWMDLGK":
        cfg = cost.mechanism_config(letter, s)
        mc = cost.ModelCost(cfg, torch.bfloat16)
        lc = mc.layers[0]
        exps[letter] = (
            cost.fit_exponent(ctx, [lc.prefill_flops(cfg, L) for L in ctx]),
            cost.fit_exponent(ctx, [lc.decode_flops(cfg, L) for L in ctx]),
            cost.fit_exponent(ctx, [mc.cache_bytes(L) for L in ctx]),
        )
    assert exps["S"][0] == pytest.approx(2, abs=0.05) and exps["S"][1] == pytest.approx(1, abs=0.05)
    assert exps["M"][1] == pytest.approx(1, abs=0.05)
    for letter in "WLGK":
        assert exps[letter][0] == pytest.approx(1, abs=0.02), letter  # prefill linear
        assert exps[letter][1] == pytest.approx(0, abs=0.02), letter  # decode flat
        assert exps[letter][2] == pytest.approx(0, abs=0.02), letter  # memory flat
    # DSA: attention is capped at top-k, so only the indexer's linear term remains
    cfg = cost.mechanism_config("D", s)
    lc = cost.ModelCost(cfg, torch.bfloat16).layers[0]
    indexer = [(2 * cfg.index_n_heads * cfg.index_head_dim + 2 * cfg.index_n_heads) * (L + 1) for L in ctx]
    growth = [lc.decode_flops(cfg, L) - lc.decode_flops(cfg, ctx[0]) for L in ctx]
    assert growth[1:] == [i - indexer[0] for i in indexer[1:]]


def test_decode_bytes_read_only_what_the_mechanism_needs():
    s = cost.CostSettings(d_model=64, n_heads=2, window=128, index_topk=64)
    per = {}
    for letter in "SMDLW":
        mc = cost.ModelCost(cost.mechanism_config(letter, s), torch.bfloat16)
        per[letter] = mc.decode_bytes(2**20) - mc.weight_bytes
    assert per["M"] < per["S"]  # latent instead of per-head K and V
    assert per["D"] < per["M"]  # indexer keys of every token + top-k latents
    assert per["W"] < per["D"] and per["L"] < per["W"]


def test_measure_reports_out_of_memory_as_a_limit():
    class RunsOutOfMemory(cost._Runner):
        def __call__(self, x, caches):
            if caches[0].k.shape[1] > 100:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")
            return super().__call__(x, caches)

    cfg = cost.mechanism_config("S", cost.CostSettings(d_model=32, n_heads=2))
    runner = RunsOutOfMemory(cost.build_layer("S", cfg, 0), cfg, False, torch.device("cpu"), torch.float32)
    ms = cost.measure(runner, [16, 64, 256, 1024], "decode")
    assert [m.context for m in ms] == [16, 64, 256]  # stops at the first failure
    assert ms[-1].seconds is None and "out of memory at context 256" in ms[-1].error
    assert all(m.seconds is not None and m.error is None for m in ms[:2])


def test_cost_cli_writes_json_and_plots(tmp_path, capsys):
    out = tmp_path / "cost"
    rc = main(
        [
            "cost",
            "--out",
            str(out),
            "--mechanisms",
            "SWL",
            "--presets",
            "llama,swa",
            "--d-model",
            "32",
            "--n-heads",
            "2",
            "--prefill-contexts",
            "32,64,128",
            "--decode-contexts",
            "64,128,256",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "decode S (softmax attention) @ 256:" in printed and "ms per call" in printed  # each point's time
    data = json.loads((out / "cost.json").read_text())
    assert data["status"] == "complete"
    assert set(data["mechanisms"]) == {"S", "W", "L"}
    for letter in "SWL":
        assert len(data["mechanisms"][letter]["measured"]["decode"]) == 3
        assert data["mechanisms"][letter]["dollars_per_mtok"]["decode"][0]["dollars"] > 0
    for e in data["presets"].values():
        assert e["memory_check"] and all(
            m["analytic_bytes"] == m["allocated_bytes"] for m in e["memory_check"]
        )
    for png in ("cost_vs_context.png", "memory_vs_context.png", "dollars_vs_context.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a non-empty output directory is never overwritten without --force
    assert main(["cost", "--out", str(out), "--mechanisms", "S", "--presets", ""]) == 2
    assert main(["cost", "--out", str(tmp_path / "x"), "--mechanisms", "SQ"]) == 2


def test_cost_cli_out_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "results.txt"
    path.write_text("a user's file\n")
    for extra in ([], ["--force"]):
        assert main(["cost", "--out", str(path), "--mechanisms", "S", "--presets", "", *extra]) == 2
        assert "--out:" in capsys.readouterr().err
    assert path.read_text() == "a user's file\n"
