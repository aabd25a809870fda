"""Diagnostics on planted cases with known answers: exact half-lives from set gates, a fact
position forced outside / inside a DSA top-k or a window, ablation of a layer that does
nothing vs one that matters, a forgetting curve of a model with a known memory span, and the
`attnlab diagnose` command end to end. Tiny random models: recall values need not be high."""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnlab import HybridLM, ModelConfig, ops
from attnlab.cli import main
from attnlab.diagnostics import (
    Probe,
    ablate_mixers,
    capacity_cliff,
    capacity_curve,
    capture_mixer_inputs,
    diagnostics_section,
    dsa_selected,
    dsa_topk_indices,
    forgetting_curve,
    horizon_histograms,
    layer_attribution,
    log_decays,
    make_probe,
    memory_horizons,
    run_diagnostics,
    selection_audit,
    window_selected,
)
from attnlab.tasks import IGNORE

LN2 = math.log(2)


def tiny(pattern: str, **kw) -> HybridLM:
    base = dict(pattern=pattern, d_model=32, n_layers=len(pattern), vocab_size=32, n_heads=2,
                linear_key_head_dim=8, linear_value_head_dim=8, window=8)  # fmt: skip
    base.update(kw)
    return HybridLM(ModelConfig(**base)).eval()


# ---------------------------------------------------------------------- probes
@pytest.mark.parametrize("spec,vocab,seq_len", [("mqar:num_pairs=3", 32, 32), ("needle", 256, 160),
                                                ("needle:variant=multi-query", 256, 400)])  # fmt: skip
def test_probe_source_holds_the_answer(spec, vocab, seq_len):
    probe = make_probe(spec, seq_len, vocab, 6, seed=1)
    n, t = torch.nonzero(probe.mask, as_tuple=True)
    assert n.numel() > 0
    assert torch.equal(probe.tokens[n, probe.source[n, t]], probe.targets[n, t])  # the fact is the answer
    assert bool((probe.source[n, t] < t).all())
    assert bool((probe.source[~probe.mask] == -1).all())


def test_probe_rejects_tasks_without_fact_positions_and_bad_sources():
    with pytest.raises(ValueError, match="mqar and needle"):
        make_probe("copying", 32, 32, 2)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    targets = torch.tensor([[IGNORE, IGNORE, 3, IGNORE]])
    with pytest.raises(ValueError, match="source"):
        Probe(tokens, targets, torch.tensor([[-1, -1, 2, -1]]), 1, {})  # source not before the target


# ---------------------------------------------------------------------- horizons
def test_lightning_half_life_is_ln2_over_slope():
    model = tiny("L")
    slopes = torch.tensor([0.1, 0.5])
    model.blocks[0].mixer.slope = slopes.clone()
    rows = memory_horizons(model, log_decays(model, torch.zeros(1, 4, dtype=torch.long)))
    assert [r["head"] for r in rows] == [0, 1]
    for r, s in zip(rows, slopes.tolist(), strict=True):
        assert r["half_life"] == pytest.approx(LN2 / s, rel=1e-12)
        assert r["p10"] == r["p90"] == r["half_life"] and r["source"] == "slope"


def _zero_in_proj_part(mixer, name: str) -> None:
    start = 0
    for part, size in mixer.in_sizes.items():
        if part == name:
            break
        start += size
    with torch.no_grad():
        mixer.in_proj.weight[start : start + mixer.in_sizes[name]] = 0


def test_gdn_constant_gate_gives_exact_half_life():
    model = tiny("G")
    mixer = model.blocks[0].mixer
    _zero_in_proj_part(mixer, "a")  # a(x) = 0: g = -exp(A_log) * softplus(dt_bias), constant over tokens
    A = torch.tensor([0.5, 2.0])
    dt_bias = torch.tensor([1.3, -0.7])
    with torch.no_grad():
        mixer.A_log.copy_(A.log())
        mixer.dt_bias.copy_(dt_bias)
    tokens = torch.randint(0, 32, (3, 16))
    decays = log_decays(model, tokens)
    assert decays[0].shape == (3 * 16, 2)
    rows = memory_horizons(model, decays)
    for r in rows:
        h = r["head"]
        want = LN2 / (A[h].item() * F.softplus(dt_bias[h].double()).item())
        assert r["half_life"] == pytest.approx(want, rel=1e-6)
        assert r["p10"] == pytest.approx(want, rel=1e-6) and r["p90"] == pytest.approx(want, rel=1e-6)
    hist = horizon_histograms(model, decays)[0]
    assert sum(hist["counts"]) == 3 * 16 * 2 and hist["infinite"] == 0


def test_kda_half_life_per_channel():
    model = tiny("K")
    mixer = model.blocks[0].mixer
    with torch.no_grad():
        mixer.f_b_proj.weight.zero_()  # decay input = dt_bias per channel
        mixer.A_log.copy_(torch.tensor([0.0, math.log(3.0)]))
        mixer.dt_bias.copy_(torch.linspace(-2, 2, mixer.dt_bias.numel()))
    rows = memory_horizons(model, log_decays(model, torch.randint(0, 32, (2, 8))))
    assert len(rows) == 2 * 8  # heads x key channels
    for r in rows:
        a = [1.0, 3.0][r["head"]]
        want = LN2 / (a * F.softplus(mixer.dt_bias[r["head"] * 8 + r["channel"]].double()).item())
        assert r["half_life"] == pytest.approx(want, rel=1e-6)


def test_gdn_half_life_follows_the_input():
    """With a(x) live, the gate differs per token: p10 < p90 somewhere."""
    model = tiny("G")
    rows = memory_horizons(model, log_decays(model, torch.randint(0, 32, (2, 16))))
    assert any(r["p90"] > r["p10"] * 1.0001 for r in rows)


# ---------------------------------------------------------------------- selection
FAVOURED = 5  # the token a planted indexer scores above all others


def planted_dsa(topk: int = 1) -> HybridLM:
    """A one-layer D model whose indexer gives positive scores only to positions holding
    FAVOURED, and 0 to every other position."""
    model = tiny("D", d_model=16, n_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=4, v_head_dim=8, mla_use_rope=False, index_n_heads=1, index_head_dim=8,
                 index_topk=topk)  # fmt: skip
    mixer = model.blocks[0].mixer
    with torch.no_grad():
        model.embed.weight.zero_()
        model.embed.weight[:, 0] = 1.0  # every token: a constant direction (dim 0)
        model.embed.weight[FAVOURED, 1] = 1.0  # the favoured token also has dim 1
        for lin in (mixer.wq_b, mixer.wk, mixer.weights_proj):
            lin.weight.zero_()
        mixer.wq_b.weight[0, 0] = 1.0  # q_I = x[0] e_0 > 0
        mixer.wk.weight[0, 1] = 1.0  # k_I = LayerNorm(x[1] e_0): nonzero only for FAVOURED
        mixer.weights_proj.weight[0, 0] = 1.0  # w > 0
    return model


def test_dsa_fact_outside_topk_is_not_selected_and_inside_is():
    model = planted_dsa(topk=1)
    T, t = 8, 6
    tokens = torch.tensor([[1, 2, FAVOURED, 3, 4, 1, 2, 3]] * 2)
    targets = torch.full((2, T), IGNORE)
    targets[:, t] = torch.tensor([FAVOURED, 4])
    source = torch.full((2, T), -1)
    source[:, t] = torch.tensor([2, 4])  # row 0 needs the favoured position, row 1 another one
    probe = Probe(tokens, targets, source, 1, {})
    with capture_mixer_inputs(model, [0]) as xs:
        model(tokens)
    idx = dsa_topk_indices(model.blocks[0].mixer, xs[0])  # (2, T, 1)
    assert idx[0, t, 0].item() == 2  # the indexer picks the favoured position
    sel = dsa_selected(model.blocks[0].mixer, xs[0], source)
    assert sel[0, t] and not sel[1, t]
    rows, correct = selection_audit(model, probe)
    assert len(rows) == 1
    r = rows[0]
    assert (r["mechanism"], r["budget"], r["n_selected"], r["n_pruned"]) == ("top-k", 1, 1, 1)
    assert r["selected_rate"] == 0.5 and r["chance_rate"] == pytest.approx(1 / (t + 1))
    assert correct.shape == (2, T)


def test_dsa_audit_uses_the_indices_the_layer_used():
    """Record ops.dsa_topk inside the layer's forward; the audit's recomputation must match."""
    model = tiny("DD", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                 v_head_dim=8, index_n_heads=2, index_head_dim=8, index_topk=3)  # fmt: skip
    tokens = torch.randint(0, 32, (2, 12))
    seen = []
    real = ops.dsa_topk
    with mock.patch.object(
        ops, "dsa_topk", side_effect=lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
    ):
        with capture_mixer_inputs(model, [0, 1]) as xs, torch.no_grad():
            model(tokens)
    assert len(seen) == 2
    for i in (0, 1):
        assert torch.equal(dsa_topk_indices(model.blocks[i].mixer, xs[i]), seen[i])


def test_window_selection_with_sinks():
    # query p sees keys (p - 4, p] plus key 0 (one sink): distance 3 kept, 4 pruned, the sink always kept
    source = torch.tensor([[-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 8, 7, 1]])
    sel = window_selected(window=4, sink_tokens=1, source=source)[0].tolist()
    assert sel == [False] * 10 + [True, True, False, False]
    assert window_selected(4, 0, source)[0, 10].item() is False  # without the sink, 10 back is gone


def test_window_audit_on_a_w_model():
    model = tiny("W", window=4, sink_tokens=0)
    T = 12
    tokens = torch.randint(0, 32, (1, T))
    targets = torch.full((1, T), IGNORE)
    source = torch.full((1, T), -1)
    targets[0, [5, 11]] = 3
    source[0, 5], source[0, 11] = 3, 2  # distance 2 (inside), 9 (outside)
    rows, _ = selection_audit(model, Probe(tokens, targets, source, 1, {}))
    assert (rows[0]["mechanism"], rows[0]["n_selected"], rows[0]["n_pruned"]) == ("window", 1, 1)


# ---------------------------------------------------------------------- attribution
def test_ablating_a_silent_layer_changes_nothing_and_a_live_one_changes_logits():
    model = tiny("LS")
    with torch.no_grad():
        model.blocks[0].mixer.out_proj.weight.zero_()  # layer 0 writes nothing to the stream
    tokens = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        base = model(tokens)
        with ablate_mixers(model, [0]):
            silent = model(tokens)
        with ablate_mixers(model, [1]):
            live = model(tokens)
        after = model(tokens)
    assert torch.equal(silent, base)
    assert not torch.allclose(live, base)
    assert torch.equal(after, base)  # hooks removed
    probe = make_probe("mqar:num_pairs=2", 16, 32, 8)
    rows = layer_attribution(model, probe)
    assert [r["layer"] for r in rows] == [None, 0, 1]
    assert rows[1]["recall"] == rows[0]["recall"] and rows[1]["max_logit_change"] == 0.0
    assert rows[2]["max_logit_change"] > 0


# ---------------------------------------------------------------------- capacity / forgetting
class SpanOracle(nn.Module):
    """Answers an MQAR query iff its key appeared within the last ``span`` tokens: a model
    whose forgetting curve is known (recall 1 at distance < span - 1, 0 beyond span)."""

    def __init__(self, span: int, vocab: int) -> None:
        super().__init__()
        self.span, self.vocab = span, vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            for t in range(T):
                for s in range(max(0, t - self.span), t - 1):
                    if tokens[b, s] == tokens[b, t] and tokens[b, t] != 0:
                        logits[b, t, tokens[b, s + 1]] = 1.0
        return logits


def test_forgetting_curve_of_a_known_span():
    span = 20
    probe = make_probe("mqar:num_pairs=4", 64, 32, 24)
    rows = forgetting_curve(SpanOracle(span, 32), probe, bins=6)
    assert sum(r["targets"] for r in rows) == int(probe.mask.sum())
    assert any(r["distance_hi"] < span - 1 for r in rows) and any(r["distance_lo"] > span for r in rows)
    for r in rows:
        if r["distance_hi"] < span - 1:
            assert r["recall"] == 1.0
        if r["distance_lo"] > span:
            assert r["recall"] == 0.0


def test_capacity_curve_rows_and_cliff():
    model = tiny("WL")
    rows = capacity_curve(model, "mqar", seq_len=32, facts=[1, 2, 4], n_samples=8)
    assert [r["facts"] for r in rows] == [1, 2, 4]
    assert all(r["cache_bytes"] == model.cache_bytes(32) for r in rows)  # bf16, as the layers declare
    assert all(0.0 <= r["recall"] <= 1.0 for r in rows)
    assert [r["guess_recall"] for r in rows] == [1.0, 0.5, 0.25]  # one of the N stored values
    assert capacity_cliff([{"facts": 1, "recall": 1.0}, {"facts": 4, "recall": 0.9},
                           {"facts": 8, "recall": 0.2}]) == 8  # fmt: skip
    assert capacity_cliff([{"facts": 1, "recall": 1.0}, {"facts": 2, "recall": 0.9}]) is None
    assert capacity_cliff([{"facts": 1, "recall": 0.0}, {"facts": 2, "recall": 0.02}]) is None  # no recall


# ---------------------------------------------------------------------- all together
def test_run_diagnostics_and_section(tmp_path):
    model = tiny("WGS")
    result = run_diagnostics(model, "mqar:num_pairs=2", seq_len=24, n_samples=8, facts=[1, 2], bins=4)
    for key in ("capacity", "forgetting", "horizons", "horizon_histograms", "selection", "attribution"):
        assert result[key], key
    json.dumps(result, allow_nan=False)  # plain, strict JSON
    # capacity at the probe's own N reuses the probe's predictions: the same as computing it afresh
    fresh = capacity_curve(model, "mqar:num_pairs=2", seq_len=24, facts=[2], n_samples=8)
    assert result["capacity"][1] == fresh[0] and result["summary"]["recall"] == fresh[0]["recall"]
    md, html = diagnostics_section({"tiny": result}, tmp_path)
    for png in ("diag_capacity.png", "diag_forgetting.png", "diag_horizons.png", "diag_selection.png",
                "diag_attribution.png"):  # fmt: skip
        assert (tmp_path / png).stat().st_size > 1000
        assert f"({png})" in md
    assert html.count("data:image/png;base64,") == 5
    one = run_diagnostics(tiny("L"), "mqar:num_pairs=2", seq_len=24, n_samples=4, facts=[1])
    assert "selection" in one["skipped"] and "attribution" in one["skipped"]


def test_cli_diagnose(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tiny("DL", d_model=32, n_heads=2, index_topk=4, vocab_size=32).save_pretrained(ckpt)
    out = tmp_path / "diag"
    args = ["diagnose", str(ckpt), "--out", str(out), "--samples", "4", "--facts", "1,2", "--seq-len", "24"]
    assert main(args) == 0
    data = json.loads((out / "diagnostics.json").read_text())
    assert data["model"]["pattern"] == "DL" and data["selection"][0]["mechanism"] == "top-k"
    assert (out / "diagnostics.md").is_file() and (out / "diag_selection.png").is_file()
    assert main(args) == 2  # non-empty --out without --force
    assert "--force" in capsys.readouterr().err
    assert main(args + ["--force", "--only", "capacity"]) == 0
    assert "selection" not in json.loads((out / "diagnostics.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_cli_diagnose_force_never_replaces_a_foreign_directory(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tiny("L", d_model=32, vocab_size=32).save_pretrained(ckpt)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file\n")
    args = ["diagnose", str(ckpt), "--out", str(out), "--samples", "4", "--facts", "1", "--seq-len", "24",
            "--only", "capacity", "--force"]  # fmt: skip
    assert main(args) == 2
    assert "diagnostics.json" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "a user's file\n"


def test_write_outputs_failed_rename_keeps_the_previous_output(tmp_path, monkeypatch):
    from pathlib import Path

    from attnlab.diagnostics.cli import write_outputs

    out = tmp_path / "diag"
    out.mkdir()
    (out / "diagnostics.json").write_text('{"previous": true}\n')
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".diag.tmp-"):  # the finished staging directory moving into place
            raise OSError("simulated failure")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        write_outputs({"summary": {}}, "x", out, force=True)
    monkeypatch.undo()
    assert (out / "diagnostics.json").read_text() == '{"previous": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["diag"]  # no staging or .old leftovers


def test_study_diagnostics_plan_reuse_and_sections(tmp_path):
    from attnlab.diagnostics import StudyDiagnosticsSettings, run_study_diagnostics

    for name, pattern in (("L", "L"), ("hyb", "WL")):
        tiny(pattern, vocab_size=64).save_pretrained(tmp_path / "models" / name / "checkpoint")
    tasks = ["needle", "mqar:num_pairs=2,weight=2"]
    s = StudyDiagnosticsSettings(n_samples=4, facts=(1, 2, 16), bins=3)
    results = run_study_diagnostics(tmp_path, ["L", "hyb"], tasks, 32, s)
    assert results["L"]["plan"] == ["capacity", "forgetting"]
    assert results["hyb"]["plan"] == ["capacity", "forgetting", "selection", "attribution"]
    assert results["L"]["settings"]["spec"] == "mqar:num_pairs=2"  # MQAR first, weight dropped
    assert [r["facts"] for r in results["L"]["capacity"]] == [1, 2]  # 16 pairs do not fit 32 tokens
    assert not results["L"]["reused"]
    again = run_study_diagnostics(tmp_path, ["L", "hyb"], tasks, 32, s)
    assert again["hyb"]["reused"] and again["hyb"]["selection"] == results["hyb"]["selection"]
    report = pytest.importorskip("attnlab.report")
    from attnlab.diagnostics import study_sections

    sections = study_sections(again, tmp_path)
    titles = [sec.title for sec in sections]
    assert titles[0] == "What the diagnostics measure" and len(titles) == 6  # + the 5 tables
    assert all(isinstance(sec, report.Section) for sec in sections)
    assert all(path.is_file() for sec in sections for path, _ in sec.images)


def test_default_probe_task_from_the_training_run():
    from attnlab.diagnostics.cli import default_spec

    info = {"train_config": {"tasks": ["copying", "mqar:num_pairs=8,weight=3", "needle"]}}
    assert default_spec(info, 64) == "mqar:num_pairs=8"
    assert default_spec({"train_config": {"tasks": ["needle:depth=0.5"]}}, 256) == "needle:depth=0.5"
    assert default_spec({"train_config": {"tasks": ["needle"]}}, 64) == "mqar:num_pairs=4"  # no bytes
    assert default_spec({}, 64) == "mqar:num_pairs=4"


def test_diagnose_reads_a_compare_study_s_tasks_and_length(tmp_path):
    from attnlab.diagnostics.cli import study_train_config

    ckpt = tmp_path / "out" / "models" / "G" / "checkpoint"
    ckpt.mkdir(parents=True)
    settings = {"tasks": ["mqar:num_pairs=4", "mrcr"], "train_len": 128}
    (tmp_path / "out" / "study.json").write_text(json.dumps({"format": 1, "settings": settings}))
    assert study_train_config(ckpt) == {"tasks": ["mqar:num_pairs=4", "mrcr"], "seq_len": 128}
    assert study_train_config(tmp_path / "elsewhere") == {}
