"""tests/gpu_shards.py, the parallel runner of the GPU tests: how it deals tests out, and a run on
the CPU, where the selected gpu tests are collected and skipped."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_shards  # noqa: E402


def test_deal_round_robin_in_order():
    ids = [f"t{i}" for i in range(7)]
    assert gpu_shards.deal(ids, 3) == [["t0", "t3", "t6"], ["t1", "t4"], ["t2", "t5"]]
    assert gpu_shards.deal(ids[:2], 4) == [["t0"], ["t1"]]  # no empty shard
    assert gpu_shards.deal([], 4) == []
    with pytest.raises(ValueError, match="at least 1"):
        gpu_shards.deal(ids, 0)


def test_summary_line_is_the_last_count_line():
    log = "x\n==== 2 passed in 1.0s ====\nmore\n= 1 failed, 3 passed in 2.5s =\n"
    assert gpu_shards.summary_line(log) == "1 failed, 3 passed in 2.5s"
    assert "no pytest summary" in gpu_shards.summary_line("Traceback ...")


def test_runs_the_selection_in_processes(tmp_path, capsys):
    """Two processes over a file's gpu tests (skipped here: no GPU): exit 0, one log each."""
    rc = gpu_shards.main(["-n", "2", "--logs", str(tmp_path), "tests/test_kernels_absorb.py"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("shard ") == 2 and "skipped" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_shard0.txt", "gpu_shard1.txt"]


def test_a_process_past_the_timeout_fails_the_run(tmp_path, capsys):
    rc = gpu_shards.run([["tests/test_kernels_absorb.py"]], timeout=0.2, logs=tmp_path)
    out = capsys.readouterr().out
    assert rc == 1 and "killed after" in out


def test_bigmem_tests_run_alone_after_the_others(tmp_path, capsys):
    """A bigmem-marked gpu test is not dealt into the parallel shards: it runs after them, in a process
    of its own (two processes beside the 2^31-element state test ran out of an H100's memory)."""
    sel = ["tests/test_kernels_linear.py", "-k", "past_2_31 or test_gpu_varlen or forward_fp32"]
    rc = gpu_shards.main(["-n", "2", "--logs", str(tmp_path), *sel])
    out = capsys.readouterr().out
    assert rc == 0, out
    others = gpu_shards.collect(sel, "gpu and not bigmem")
    assert len(others) > 1 and not any("past_2_31" in i for i in others)
    dealt = sum(int(m) for m in re.findall(r"gpu_shard \d \((\d+) tests", out))
    assert dealt == len(others) and "gpu_bigmem 0 (1 tests" in out, out
    logs = sorted(p.name for p in tmp_path.iterdir())
    assert logs == ["gpu_bigmem.txt", "gpu_shard0.txt", "gpu_shard1.txt"]
    assert gpu_shards.summary_line((tmp_path / "gpu_bigmem.txt").read_text()).startswith("1 skipped")



def test_a_marker_expression_is_combined_not_replacing(monkeypatch, tmp_path):
    """-m EXPR (or -mEXPR) from the caller joins the script's own marker expression: passed on as
    it was, it replaced it, and the bigmem tests ran in the shards and once more after them."""
    got = gpu_shards.split_marks(["tests/x.py", "-m", "gpu", "-k", "kda"])
    assert got == ("gpu", ["tests/x.py", "-k", "kda"])
    assert gpu_shards.split_marks(["-mnot slow", "a.py"]) == ("not slow", ["a.py"])
    assert gpu_shards.split_marks(["-k", "m"]) == (None, ["-k", "m"])
    with pytest.raises(ValueError, match="marker expression"):
        gpu_shards.split_marks(["a.py", "-m"])
    seen = []  # (marker expression, arguments) of each collection main makes
    monkeypatch.setattr(gpu_shards, "collect", lambda args, marks: seen.append((marks, args)) or [])
    assert gpu_shards.main(["--logs", str(tmp_path), "-m", "not slow", "a.py", "-k", "kda"]) == 0
    assert seen == [("(not slow) and gpu and not bigmem", ["a.py", "-k", "kda"]),
                    ("(not slow) and gpu and bigmem", ["a.py", "-k", "kda"])]
    seen.clear()
    gpu_shards.main(["--logs", str(tmp_path), "a.py"])
    assert seen == [("gpu and not bigmem", ["a.py"]), ("gpu and bigmem", ["a.py"])]
