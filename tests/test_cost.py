import json

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


def test_cost_cli_writes_json_and_plots(tmp_path):
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
    data = json.loads((out / "cost.json").read_text())
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
