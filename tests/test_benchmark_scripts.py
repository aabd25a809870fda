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
