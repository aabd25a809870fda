"""The GPU benchmark scripts' CPU smoke paths, so they cannot rot between device runs."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_gpu_tiny_on_cpu(tmp_path):
    """Tiny llama decode, ours (eager) beside transformers' generate() timed by its streamer."""
    pytest.importorskip("transformers")
    decode_gpu = load("decode_gpu")
    out, js = tmp_path / "r.md", tmp_path / "r.json"
    rows = decode_gpu.main(["--tiny", "--device", "cpu", "--presets", "llama", "--contexts", "64",
                            "--modes", "eager", "--steps", "4", "--out", str(out), "--json", str(js)])
    assert len(rows) == 1
    row = rows[0]
    assert row["ours_ms"] > 0 and row["hf_ms"] > 0  # the streamer gaps are real intervals
    assert json.loads(js.read_text())  # written
    assert "| llama |" in out.read_text()


def test_sparse_mla_gpu_cpu_smoke(tmp_path):
    """benchmarks/sparse_mla_gpu.py --cpu-smoke --decode-only (the Triton kernels under the
    interpreter at toy sizes) runs to its target lines and writes its JSON."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(BENCH / "sparse_mla_gpu.py"), "--cpu-smoke", "--decode-only",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "targets (issue 9):" in r.stdout
    assert json.loads((tmp_path / "sparse_mla_gpu.json").read_text())


def test_gemv_gpu_cpu_smoke(tmp_path):
    """benchmarks/gemv_gpu.py --cpu-smoke --sweep (the fused GEMV under the interpreter at toy
    sizes, every prologue and epilogue) runs through the sweep and the table and writes its JSON."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(BENCH / "gemv_gpu.py"), "--cpu-smoke", "--sweep", "--rows", "1,3",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "TUNING.update({" in r.stdout
    report = json.loads((tmp_path / "gemv_gpu.json").read_text())
    timed = [row for row in report["results"] if row["kind"] == "time"]
    assert len(timed) == 10 and all(row["rel_err"] <= 1e-2 for row in timed)


def test_gemv_gpu_chain_sweep_cpu_smoke(tmp_path):
    """benchmarks/gemv_gpu.py --cpu-smoke --chain-only: the chain sweep's tiled and persistent forms
    (interpreter, toy sizes) give one row per shape with both bests, and the TUNING snippet."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(BENCH / "gemv_gpu.py"), "--cpu-smoke", "--chain-only",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "TUNING.update({" in r.stdout
    rows = [row for row in json.loads((tmp_path / "gemv_gpu.json").read_text())["results"]
            if row["kind"] == "chain_sweep"]
    assert len(rows) == 5 and all(row["tiled_best"][5] == 0 and row["persistent_best"][5] > 0 for row in rows)


def test_decode_parts_gpu_cpu_smoke(tmp_path):
    """benchmarks/decode_parts_gpu.py --cpu-smoke (index scores, top-k paths, MLA decode launch shapes,
    delta_decode V_BLOCK x warps; interpreter, toy sizes) runs every part, passes its checks and
    writes a row per measurement."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    js = tmp_path / "decode_parts.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(BENCH / "decode_parts_gpu.py"), "--cpu-smoke", "--json", str(js)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "summary (us per call" in r.stdout and "CHECK FAILED" not in r.stdout
    report = json.loads(js.read_text())
    assert report["card"] and report["date"]
    rows = report["rows"]
    for part in ("index", "topk", "mla", "delta"):
        timed = [row for row in rows if row["part"] == part and "us" in row]
        assert timed and all(row["us"] > 0 for row in timed), part
    assert not [row for row in rows if "failed" in row]
    topk = [row for row in rows if row["part"] == "topk"]
    paths = {"fused", "fused-5-barriers", "multi", "one-program", "one-program+rank", "torch.topk"}
    assert {row["path"] for row in topk if row["scores"] == "quarters"} == paths
    assert {row["path"] for row in topk if row["scores"] == "distinct"} == {"fused", "fused-5-barriers"}
    assert all(row["ok"] for row in topk)
    assert all(row["err"] < 1e-4 for row in rows if row["part"] in ("index", "mla"))
    assert all(row["finite"] for row in rows if row["part"] == "delta")


def test_prepare_latency_gpu_cpu_smoke():
    """benchmarks/prepare_latency_gpu.py --cpu-smoke: the chained prepare (linear._prepare_chunk over a
    segment's chunks in one program, outputs to the program's scratch) leaves each program's last
    chunk equal to the production prepare's, GDN and KDA, under the interpreter."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(BENCH / "prepare_latency_gpu.py"), "--cpu-smoke"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("cpu smoke") == 2


def test_linear_gpu_timed_rounds_interleaves_and_takes_the_median(monkeypatch):
    """benchmarks/linear_gpu.py --rounds: each round times every function once, in order
    (interleaved), the reported ms is the median over rounds, every round's ms is kept, and a
    missing function (fla not installed) or a failed timing is NaN without hiding the others."""
    pytest.importorskip("triton")
    lg = load("linear_gpu")
    calls = []
    fake = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, float("nan"), 4.0])}

    def bench_fwd(fn, xs):
        calls.append(fn)
        return next(fake[fn])

    monkeypatch.setattr(lg, "bench_fwd", bench_fwd)
    out = lg.timed_rounds({"x": "a", "y": "b", "z": None}, None, 3)
    assert calls == ["a", "b"] * 3
    assert out["x"] == 2.0 and out["x_rounds"] == [3.0, 1.0, 2.0]
    assert out["y"] == 4.0 and out["y_rounds"][1] != out["y_rounds"][1]  # lower middle of the two timed
    assert out["z"] != out["z"] and len(out["z_rounds"]) == 3
    fake["a"] = iter([7.0])
    assert lg.timed_rounds({"x": "a"}, None, 1) == {"x": 7.0}  # one round: no per-round list


def test_decode_ab_tiny_on_cpu(tmp_path):
    """benchmarks/decode_ab.py on tiny models (eager, CPU): every configuration timed in every round,
    the settings back as they were after, the JSON written."""
    from attnlab.kernels import decode as kd

    decode_ab = load("decode_ab")
    waves = kd.WAVES
    js = tmp_path / "ab.json"
    rows = decode_ab.main(["--tiny", "--device", "cpu", "--mode", "eager", "--presets", "llama",
                           "--contexts", "32", "--rounds", "2", "--steps", "2", "--json", str(js),
                           "base", "decode.WAVES=1"])
    assert [(r["config"], r["round"]) for r in rows] == [("base", 0), ("decode.WAVES=1", 0), ("base", 1),
                                                          ("decode.WAVES=1", 1)]
    assert all(r["ms"] > 0 for r in rows) and kd.WAVES == waves
    report = json.loads(js.read_text())
    assert len(report["rows"]) == 4 and report["card"] == "cpu"


def test_decode_ab_configs_and_restore():
    """A configuration names a module of attnlab.kernels (or attnlab.layers), an attribute and dict
    keys that exist and a Python literal (else a ValueError naming the part); nested settings are
    restored after the timing, also when it fails."""
    pytest.importorskip("triton")
    from attnlab.kernels import sparse as ks

    decode_ab = load("decode_ab")
    assert decode_ab.parse_config("base") == []
    (mod, path, value), = decode_ab.parse_config("sparse.TUNING.decode_row.BLOCK_N=32")
    assert mod is ks and path == ["TUNING", "decode_row", "BLOCK_N"] and value == 32
    from attnlab.kernels import gemv as kg

    key = next(iter(kg.TUNING))  # a tuple key, written as its literal
    literal = str(key).replace(" ", "")
    (mod, path, value), = decode_ab.parse_config(f"gemv.TUNING.{literal}=(4,64,4,1,False,0)")
    assert mod is kg and decode_ab._get(kg, path, "") == kg.TUNING[key] and value == (4, 64, 4, 1, False, 0)
    old = decode_ab._set(kg, path, value)
    assert kg.TUNING[key] == value and str(key) not in kg.TUNING
    decode_ab._set(kg, path, old)
    assert kg.TUNING[key] == old
    from attnlab.layers import fused

    (mod, path, value), = decode_ab.parse_config("fused.INDEX_TOPK_SCRATCH=False")  # attnlab.layers
    assert mod is fused and path == ["INDEX_TOPK_SCRATCH"] and value is False
    for bad, word in [("sparse.TUNING.decode_row.BLOCK_N", "MODULE.PATH=VALUE"), ("nosuch.X=1", "nosuch"),
                      ("sparse.NOPE=1", "NOPE"), ("sparse.TUNING.nope=1", "nope"),
                      ("gemv.TUNING.(1,1,1)=(4,64,4,1,False,0)", "no key"),
                      ("sparse.PROGRAMS_PER_SM=os.system", "literal"), ("sparse=1", "MODULE.ATTRIBUTE")]:
        with pytest.raises(ValueError, match=word):
            decode_ab.parse_config(bad)

    before = {k: dict(v) for k, v in ks.TUNING.items()}
    config = [(ks, ["TUNING", "decode_row", "BLOCK_N"], 16), (ks, ["PROGRAMS_PER_SM"], 7)]

    def boom(*a, **k):
        assert ks.TUNING["decode_row"]["BLOCK_N"] == 16 and ks.PROGRAMS_PER_SM == 7  # set while timing
        raise RuntimeError("timing failed")

    real = decode_ab.dg.time_ours
    decode_ab.dg.time_ours = boom
    try:
        with pytest.raises(RuntimeError, match="timing failed"):
            decode_ab.time_config(None, config, 1, 1, "cpu", None, "eager")
    finally:
        decode_ab.dg.time_ours = real
    assert ks.TUNING == before and ks.PROGRAMS_PER_SM == 2
    usage_errors = (["--presets", "nope", "base"], ["--device", "cpu", "sparse.NOPE=1"],
                    ["--device", "cpu", "base"])
    for argv in usage_errors:
        with pytest.raises(SystemExit):  # unknown preset, bad config, cuda_graph on a CPU: usage errors
            decode_ab.main(argv)


def test_decode_timeline_tiny_on_cpu(tmp_path):
    """benchmarks/decode_timeline.py on tiny models (eager, CPU: aten ops stand in for kernels): the
    exposed times sum to the token's span, every kernel kind is counted, the JSON is written; and the
    exposed-time rule on a made-up overlapping timeline."""
    timeline = load("decode_timeline")
    js = tmp_path / "t.json"
    results = timeline.main(["--tiny", "--device", "cpu", "--presets", "llama,deepseek-v32",
                             "--contexts", "32", "--rounds", "2", "--json", str(js)])
    assert [(m["preset"], m["context"]) for m in results] == [("llama", 32), ("deepseek-v32", 32)]
    for m in results:
        rows = m["kernels"]
        assert rows and m["by_kind"]
        span = max(r["end_us"] for r in rows) - rows[0]["start_us"]
        assert abs(sum(r["exposed_us"] for r in rows) - span) < 1e-6 * max(1.0, span)
        assert sum(v["launches"] for v in m["by_kind"].values()) == len(rows)
    assert len(json.loads(js.read_text())) == 2
    # PDL-style overlap: B starts inside A and ends after it, C ends inside B (0 exposed)
    rows = timeline.exposed_times([("_a_kernel", 0.0, 10.0), ("_b", 4.0, 15.0), ("_c", 5.0, 12.0)])
    assert [r["exposed_us"] for r in rows] == [10.0, 5.0, 0.0] and rows[0]["kind"] == "a"
    assert timeline.kind("void at::native::reduce_kernel<512, 1>(...)") == "reduce_kernel"
    with pytest.raises(SystemExit):
        timeline.main(["--tiny", "--device", "cpu", "--presets", "nope"])


def test_decode_timeline_configs(monkeypatch):
    """decode_timeline.py --configs: the step is profiled under each setting in turn (set while it runs,
    restored after, also when it fails); a setting that does not exist is a usage error."""
    from attnlab.kernels import decode as kd

    timeline = load("decode_timeline")
    waves = kd.WAVES
    seen = []
    real = timeline._measure

    def spy(*a, **k):
        seen.append(kd.WAVES)
        return real(*a, **k)

    monkeypatch.setattr(timeline, "_measure", spy)
    results = timeline.main(["--tiny", "--device", "cpu", "--presets", "llama", "--contexts", "16",
                             "--rounds", "1", "--configs", "base", "decode.WAVES=1"])
    assert [m["config"] for m in results] == ["base", "decode.WAVES=1"]
    assert seen == [waves, 1] and kd.WAVES == waves

    def boom(*a, **k):
        raise RuntimeError("profiling failed")

    monkeypatch.setattr(timeline, "_measure", boom)
    with pytest.raises(RuntimeError, match="profiling failed"):
        timeline.measure(None, "llama", 16, 1, "cpu", None, [(kd, ["WAVES"], 1)])
    assert kd.WAVES == waves
    with pytest.raises(SystemExit):
        timeline.main(["--tiny", "--device", "cpu", "--presets", "llama", "--configs", "decode.NOPE=1"])


def test_gemv_l2_gpu_refuses_without_a_gpu(monkeypatch):
    """benchmarks/gemv_l2_gpu.py is GPU-only: without CUDA, or with bad sizes, a usage error."""
    import torch

    script = load("gemv_l2_gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        script.main([])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bad in (["--mb", "a,b"], ["--reps", "0"], ["--mb", "-1"]):
        with pytest.raises(SystemExit):
            script.main(bad)
