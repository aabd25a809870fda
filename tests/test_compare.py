"""attnlab compare: a tiny study end to end on the CPU (seconds), its report and summary
numbers, resume without retraining, --out refusal, equal parameter budgets, config files."""

from __future__ import annotations

import json
import re

import pytest

from attnlab.cli import main
from attnlab.compare import (
    DEFAULT_MODELS,
    StudySettings,
    format_summary_table,
    load_study_config,
    run_study,
    study_configs,
    summary_table_rows,
)

TINY = dict(
    models=("S", "W"),
    d_model=16,
    n_layers=2,
    window=8,
    tasks=("mqar:num_pairs=2", "needle:key_len=2,value_digits=2", "mrcr:num_topics=2"),
    train_len=80,
    lengths=(80, 96),
    depths=(0.0, 1.0),
    steps=4,
    batch_size=4,
    eval_samples=3,
    workers=1,
    cost={"d_model": 16, "n_heads": 2, "prefill_contexts": [32, 64], "decode_contexts": [32, 64]},
)


def tiny(**changes) -> StudySettings:
    return StudySettings.from_dict({**TINY, **changes})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    summary = run_study(tiny(), out, progress=False)
    return out, summary


def _table_cells(text: str, first_cell: str) -> dict[str, list[str]]:
    """Rows of a Markdown table in ``text`` whose header starts with ``first_cell``."""
    rows: dict[str, list[str]] = {}
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def test_study_writes_report_and_files(study):
    out, summary = study
    for name in ("study.json", "summary.json", "report.md", "report.html", "cost.json",
                 "recall_vs_length.png", "needle_heatmaps.png", "recall_vs_memory.png",
                 "cache_vs_context.png",
                 "cost_vs_context.png"):  # fmt: skip
        assert (out / name).is_file(), name
    for m in ("S", "W"):
        assert (out / "models" / m / "checkpoint" / "model.safetensors").is_file()
        assert (out / "models" / m / "result.json").is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5  # self-contained: plots embedded
    assert 'src="http' not in html and "<script" not in html
    md = (out / "report.md").read_text()
    assert "## Diagnostics" in md and "## Summary" in md
    for png in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (out / png).is_file()


def test_summary_numbers_come_from_the_eval_records_and_match_the_tables(study, capsys):
    out, summary = study
    stored = json.loads((out / "summary.json").read_text())
    assert stored["models"] == json.loads(json.dumps(summary["models"]))
    s = tiny()
    for m in stored["models"]:
        result = json.loads((out / "models" / m["name"] / "result.json").read_text())
        for L in s.lengths:  # recompute recall from the raw records: mean over tasks (needle over depths)
            per_task = []
            for spec in s.tasks:
                recs = [r for r in result["results"] if r["spec"] == spec and r["length"] == L]
                assert recs, (m["name"], spec, L)
                per_task.append(sum(r.get("score", r["accuracy"]) for r in recs) / len(recs))
            assert m["recall"][str(L)] == pytest.approx(sum(per_task) / len(per_task))
        assert m["params"] == result["params"]
    # the Markdown table and the printed table show exactly the summary's numbers
    header, rows = summary_table_rows(stored)
    md_rows = _table_cells((out / "report.md").read_text(), "model")
    printed = format_summary_table(stored).splitlines()
    for row in rows:
        assert md_rows[row[0]] == row
        assert any(line.split() == " ".join(row).split() for line in printed)
    for m in stored["models"]:
        cells = dict(zip(header, md_rows[m["name"]], strict=True))
        assert cells["params"] == f"{m['params']:,}"
        for L in s.lengths:
            key = f"recall@{L}" + ("*" if L > s.train_len else "")
            assert float(cells[key].rstrip("%")) == pytest.approx(100 * m["recall"][str(L)], abs=0.05)


def test_resume_reuses_finished_models(study, capsys):
    out, _ = study
    ckpt = {m: out / "models" / m / "checkpoint" / "model.safetensors" for m in ("S", "W")}
    before = {m: p.stat().st_mtime_ns for m, p in ckpt.items()}
    # an interrupted study: W never finished (no result.json); S did
    (out / "models" / "W" / "result.json").unlink()
    summary = run_study(tiny(skip_cost=True), out, progress=False)
    assert summary["run"]["reused"] == ["S"]
    assert ckpt["S"].stat().st_mtime_ns == before["S"]  # not retrained
    assert ckpt["W"].stat().st_mtime_ns != before["W"]  # retrained
    retrained = {m: p.stat().st_mtime_ns for m, p in ckpt.items()}
    again = run_study(tiny(), out, progress=False)
    assert again["run"]["reused"] == ["S", "W"]
    assert {m: p.stat().st_mtime_ns for m, p in ckpt.items()} == retrained
    assert again["models"] == json.loads((out / "summary.json").read_text())["models"]


def test_out_directory_is_never_overwritten_by_accident(study, tmp_path, capsys):
    out, _ = study
    with pytest.raises(FileExistsError, match="different study.*steps"):
        run_study(tiny(steps=5), out, progress=False)
    other = tmp_path / "not-a-study"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="not an attnlab study"):
            run_study(tiny(), other, force=force, progress=False)
    assert (other / "keep.txt").read_text() == "mine"
    # through the CLI: a clean error, exit code 2
    code = main(["compare", "--out", str(out), "--models", "S", "--steps", "3", "--quiet"])
    assert code == 2
    assert "different study" in capsys.readouterr().err


def test_force_replaces_a_different_study(tmp_path):
    out = tmp_path / "out"
    run_study(tiny(models=("S",), skip_cost=True), out, progress=False)
    with pytest.raises(FileExistsError):
        run_study(tiny(models=("W",), skip_cost=True), out, progress=False)
    summary = run_study(tiny(models=("W",), skip_cost=True), out, force=True, progress=False)
    assert [m["name"] for m in summary["models"]] == ["W"]
    assert not (out / "models" / "S").exists()


def test_every_default_model_gets_the_same_parameter_budget():
    budget, configs = study_configs(StudySettings())
    assert list(configs) == list(DEFAULT_MODELS)
    from attnlab.compare import count_params

    for name, cfg in configs.items():
        assert abs(count_params(cfg) / budget - 1) < 0.03, name
    assert configs["minimax-01"].layer_pattern == "LLLLLLLS"
    assert set(configs["W"].layer_pattern) == {"W"} and set(configs["K"].layer_pattern) == {"K"}
    assert len({cfg.ff_dim for cfg in configs.values()}) > 3  # widths differ to equalize the counts


def test_budget_too_small_names_the_model():
    with pytest.raises(ValueError, match="minimax-01"):
        study_configs(StudySettings(models=("S", "minimax-01"), param_budget=40_000))


def test_config_files_json_and_toml(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"models": ["S", "L"], "steps": 7, "lengths": [128, 256]}))
    (tmp_path / "s.toml").write_text(
        'models = ["S", "L"]\nsteps = 7\nlengths = [128, 256]\n[overrides.L]\nblock_size = 64\n'
    )
    a = StudySettings.from_dict(load_study_config(tmp_path / "s.json")).validate()
    b = StudySettings.from_dict(load_study_config(tmp_path / "s.toml")).validate()
    assert a.models == b.models == ("S", "L") and a.steps == b.steps == 7 and a.lengths == (128, 256)
    assert study_configs(b)[1]["L"].block_size == 64
    (tmp_path / "bad.json").write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="stepz"):
        StudySettings.from_dict(load_study_config(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="unknown model 'Q'"):
        StudySettings(models=("Q",)).validate()
    with pytest.raises(FileNotFoundError):
        load_study_config(tmp_path / "missing.toml")


def test_cli_flags_override_the_config_file(tmp_path):
    from attnlab.cli import build_parser
    from attnlab.compare import settings_from_args

    cfg = tmp_path / "s.json"
    cfg.write_text(json.dumps({"models": ["S", "L"], "steps": 7}))
    args = build_parser().parse_args(
        ["compare", "--config", str(cfg), "--steps", "9", "--lengths", "128,512", "--skip-cost"]
    )
    s = settings_from_args(args)
    assert s.models == ("S", "L") and s.steps == 9 and s.lengths == (128, 512) and s.skip_cost


def test_progress_lines_when_not_a_tty(tmp_path):
    import io

    from attnlab.compare import StudyProgress

    stream = io.StringIO()
    bar = StudyProgress({"a": 1.0, "b": 3.0}, stream=stream)
    bar.set("a", 1.0, "a done")
    bar.note("hello")
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and "hello" in text
    assert re.search(r"25\.0%\s+elapsed 0:\d\d\s+ETA \d+:\d\d", text)


# ----------------------------------------------------------------------------- several seeds
@pytest.fixture(scope="module")
def seeds_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds") / "out"
    summary = run_study(tiny(seeds=(0, 1)), out, progress=False)
    return out, summary


def test_two_seeds_store_every_seed_and_mean_min_max_of_them(seeds_study):
    out, summary = seeds_study
    s = tiny()
    stored = json.loads((out / "summary.json").read_text())
    assert stored["seeds"] == [0, 1] and stored["models"] == json.loads(json.dumps(summary["models"]))
    # the first seed keeps the single-seed layout; the second gets its own directory
    dirs = {0: out / "models", 1: out / "models" / "seed-1"}
    for m in stored["models"]:
        losses = []
        for seed, base in dirs.items():
            result = json.loads((base / m["name"] / "result.json").read_text())
            assert result["seed"] == seed
            assert (base / m["name"] / "checkpoint" / "model.safetensors").is_file()
            losses.append(result["train"]["loss_curve"])
            own = m["by_seed"][str(seed)]
            assert own["train"] == result["train"]
            for L in s.lengths:  # each seed's numbers come from that seed's own eval records
                per_task = []
                for spec in s.tasks:
                    recs = [r for r in result["results"] if r["spec"] == spec and r["length"] == L]
                    per_task.append(sum(r.get("score", r["accuracy"]) for r in recs) / len(recs))
                    assert own["tasks"][spec][str(L)] == pytest.approx(per_task[-1])
                assert own["recall"][str(L)] == pytest.approx(sum(per_task) / len(per_task))
        assert losses[0] != losses[1]  # the seed reaches the model's init and data
        # mean / min / max across the stored per-seed numbers
        for L in map(str, s.lengths):
            vals = [m["by_seed"][str(seed)]["recall"][L] for seed in (0, 1)]
            assert m["recall"][L] == pytest.approx(sum(vals) / 2)
            assert (m["recall_min"][L], m["recall_max"][L]) == (min(vals), max(vals))
            for spec in s.tasks:
                tv = [m["by_seed"][str(seed)]["tasks"][spec][L] for seed in (0, 1)]
                assert m["tasks"][spec][L] == pytest.approx(sum(tv) / 2)
                assert (m["tasks_min"][spec][L], m["tasks_max"][spec][L]) == (min(tv), max(tv))
        assert m["mean_recall"] == pytest.approx(sum(m["recall"].values()) / len(s.lengths))
    assert summary["run"]["reused"] == []
    assert sorted(summary["run"]["models_cpu_s"]) == ["S seed 0", "S seed 1", "W seed 0", "W seed 1"]


def test_two_seeds_tables_and_report_show_mean_and_range(seeds_study):
    out, _ = seeds_study
    stored = json.loads((out / "summary.json").read_text())
    md = (out / "report.md").read_text()
    header, rows = summary_table_rows(stored)
    md_rows = _table_cells(md, "model")
    for row in rows:
        assert md_rows[row[0]] == row
    for m in stored["models"]:
        cells = dict(zip(header, md_rows[m["name"]], strict=True))
        for L in (80, 96):
            key = f"recall@{L}" + ("*" if L > 80 else "")
            got = re.fullmatch(r"(\d+\.\d)% \((\d+)–(\d+)\)", cells[key])
            assert got, cells[key]
            assert float(got[1]) == pytest.approx(100 * m["recall"][str(L)], abs=0.05)
            assert int(got[2]) == round(100 * m["recall_min"][str(L)])
            assert int(got[3]) == round(100 * m["recall_max"][str(L)])
    needle = "needle:key_len=2,value_digits=2"
    i = md.index(f"*`{needle}`*")
    needle_rows = _table_cells(md[i:], "model")
    for m in stored["models"]:
        lo, hi = m["tasks_min"][needle]["80"], m["tasks_max"][needle]["80"]
        assert needle_rows[m["name"]][1] == (
            f"{100 * m['tasks'][needle]['80']:.1f}% ({100 * lo:.0f}–{100 * hi:.0f})"
        )
    assert "2 seeds (0, 1)" in md and "not meaningful" in md
    assert "first seed's models (seed 0)" in md  # diagnostics: once
    assert "ran once for the study" in md  # cost lab: once
    assert "mean over 2 training seeds" in format_summary_table(stored)
    assert "| model | seed | steps |" in md  # training: one row per model and seed
    assert all(f"| {m} | {seed} | 4 |" in md for m in ("S", "W") for seed in (0, 1))
    html = (out / "report.html").read_text()
    assert "2 seeds (0, 1)" in html and "<script" not in html


def test_two_seeds_resume_reuses_both_seeds_runs(seeds_study):
    out, _ = seeds_study
    ckpt = {
        (m, seed): (out / "models" / m if seed == 0 else out / "models" / "seed-1" / m)
        / "checkpoint"
        / "model.safetensors"
        for m in ("S", "W")
        for seed in (0, 1)
    }
    before = {k: p.stat().st_mtime_ns for k, p in ckpt.items()}
    again = run_study(tiny(seeds=(0, 1)), out, progress=False)
    assert again["run"]["reused"] == ["S seed 0", "W seed 0", "S seed 1", "W seed 1"]
    assert {k: p.stat().st_mtime_ns for k, p in ckpt.items()} == before
    (out / "models" / "seed-1" / "W" / "result.json").unlink()  # interrupted in W's second seed
    resumed = run_study(tiny(seeds=(0, 1)), out, progress=False)
    assert resumed["run"]["reused"] == ["S seed 0", "W seed 0", "S seed 1"]
    after = {k: p.stat().st_mtime_ns for k, p in ckpt.items()}
    assert after[("W", 1)] != before[("W", 1)]
    assert all(after[k] == before[k] for k in ckpt if k != ("W", 1))
    # the seed list is part of the study's identity
    for other in (tiny(seeds=(0, 2)), tiny()):
        with pytest.raises(FileExistsError, match="different study.*seeds"):
            run_study(other, out, progress=False)


def test_seed_and_seeds_flags(tmp_path, capsys):
    from attnlab.cli import build_parser
    from attnlab.compare import settings_from_args

    def parse(*argv):
        return settings_from_args(build_parser().parse_args(["compare", *argv]))

    assert parse("--seeds", "0,1,2").run_seeds == (0, 1, 2)
    one = parse("--seeds", "5")  # one seed is the single-seed study (same layout and identity as --seed 5)
    assert one.seeds == () and one.seed == 5 and one.identity() == parse("--seed", "5").identity()
    assert "seeds" not in StudySettings().identity()  # single-seed directories of before still resume
    out = str(tmp_path / "out")
    assert main(["compare", "--out", out, "--seed", "1", "--seeds", "0,1", "--quiet"]) == 2
    assert "--seeds" in capsys.readouterr().err and not (tmp_path / "out").exists()
    for bad in ("--seeds=-1,2", "--seeds=0,0"):
        assert main(["compare", "--out", out, bad, "--quiet"]) == 2
        assert "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--seeds", "a,b"])
    assert "--seeds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seed and seeds"):
        StudySettings.from_dict({"seed": 3, "seeds": [0, 1]})
    cfg = tmp_path / "s.json"
    cfg.write_text(json.dumps({"seeds": [0, 1]}))
    assert parse("--config", str(cfg), "--seed", "4").run_seeds == (4,)  # a flag replaces the file's choice
