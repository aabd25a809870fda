"""`attnlab presets` and `attnlab convert`."""

import pytest
import torch

from attnlab import HybridLM, ModelConfig
from attnlab._format import human_bytes
from attnlab.cli import main
from attnlab.cli_models import _human, preset_rows
from attnlab.presets import preset_names

transformers = pytest.importorskip("transformers")


def rms_rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def test_preset_rows_match_built_models():
    rows = preset_rows(32, 8, 64, torch.bfloat16, 1000)
    assert [r["preset"] for r in rows] == preset_names()
    for r in rows:
        assert "error" not in r, r
        model = HybridLM(ModelConfig.preset(r["preset"], d_model=32, n_layers=8, vocab_size=64))
        assert r["pattern"] == model.cfg.layer_pattern
        assert r["params"] == sum(p.numel() for p in model.parameters())
        assert r["bytes_per_token"] == model.cache_bytes_per_token(torch.bfloat16)
        assert r["constant_bytes"] == model.cache_constant_bytes(torch.bfloat16)
        assert r["bytes_at_context"] == sum(s.bytes_at(1000) for s in model.cache_specs(torch.bfloat16))
    by = {r["preset"]: r for r in rows}
    assert by["llama"]["constant_bytes"] == 0 and by["gdn"]["bytes_per_token"] == 0
    assert by["swa"]["bytes_per_token"] < by["llama"]["bytes_per_token"]


def test_presets_command_prints_every_preset(capsys):
    assert main(["presets", "--d-model", "64", "--context", "1048576"]) == 0
    out = capsys.readouterr().out
    rows = {r["preset"]: r for r in preset_rows(64, 8, 512, torch.bfloat16, 1 << 20)}
    assert "cache @ 1M" in out
    for name, r in rows.items():
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert r["pattern"] in line and _human(r["params"]) in line
        assert human_bytes(r["bytes_per_token"]) in line and human_bytes(r["bytes_at_context"]) in line


def _save_hf_qwen3_next(path, layer_types, moe=False):
    n = len(layer_types)
    cfg = transformers.Qwen3NextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=n, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8, num_experts=2, num_experts_per_tok=1,
        moe_intermediate_size=16, shared_expert_intermediate_size=16,
        mlp_only_layers=[] if moe else list(range(n)), layer_types=layer_types,
    )
    torch.manual_seed(0)
    m = transformers.Qwen3NextForCausalLM(cfg).float().eval()
    m.save_pretrained(path)
    return m


@pytest.mark.parametrize("layer_types", [["full_attention"] * 2, ["linear_attention", "full_attention"]])
def test_convert_roundtrip(tmp_path, capsys, layer_types):
    hf = _save_hf_qwen3_next(tmp_path / "hf", layer_types)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    assert "converted qwen3_next" in capsys.readouterr().out
    ours = HybridLM.from_pretrained(tmp_path / "out")
    tokens = torch.randint(0, 64, (2, 37))
    with torch.no_grad():
        assert rms_rel(hf(tokens).logits, ours(tokens)) <= 1e-4


def test_convert_errors(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    _save_hf_qwen3_next(tmp_path / "moe", ["full_attention"], moe=True)
    assert main(["convert", str(tmp_path / "moe"), str(tmp_path / "out")]) == 2
    assert "sparse MoE" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    _save_hf_qwen3_next(tmp_path / "hf", ["full_attention"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "busy")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "busy"), "--overwrite"]) == 0


def test_convert_out_dir_that_is_a_file(tmp_path, capsys):
    _save_hf_qwen3_next(tmp_path / "hf", ["full_attention"])
    path = tmp_path / "model.txt"
    path.write_text("a user's file\n")
    for extra in ([], ["--overwrite"]):
        assert main(["convert", str(tmp_path / "hf"), str(path), *extra]) == 2
        assert "OUT_DIR: " in capsys.readouterr().err
    assert path.read_text() == "a user's file\n"


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 2**20, digits=2) == "3.00 MiB"
    assert human_bytes(5 * 2**50) == "5120.0 TiB"  # stays in the largest unit
