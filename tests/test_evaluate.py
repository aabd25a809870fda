"""attnlab eval: scoring is right on known models, grids over length/depth, results JSON."""

from __future__ import annotations

import difflib
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnlab import HybridLM, ModelConfig
from attnlab import cli as attnlab_cli
from attnlab.evaluate import evaluate, load_model, score_task
from attnlab.tasks import MQAR, MRCR
from attnlab.train import TrainConfig, Trainer


class MQAROracle(nn.Module):
    """Answers MQAR perfectly: looks the current token up among the N keys at the start."""

    def __init__(self, n_pairs: int, vocab: int, wrong: bool = False):
        super().__init__()
        self.n, self.wrong = n_pairs, wrong
        self.cfg = SimpleNamespace(vocab_size=vocab)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys, values = tokens[:, 0 : 2 * self.n : 2], tokens[:, 1 : 2 * self.n : 2]  # (B, N)
        match = tokens[:, :, None] == keys[:, None, :]  # (B, T, N)
        if self.wrong:  # answer with another pair's value (values are distinct)
            values = values.roll(1, dims=-1)
        pred = (match * values[:, None, :]).sum(-1)  # (B, T)
        return F.one_hot(pred, self.cfg.vocab_size).float()  # (B, T, V)


class Constant(nn.Module):
    def __init__(self, token: int, vocab: int):
        super().__init__()
        self.token, self.cfg = token, SimpleNamespace(vocab_size=vocab)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(torch.full_like(tokens, self.token), self.cfg.vocab_size).float()  # (B, T, V)


def test_score_task_on_known_models():
    task = MQAR(seq_len=32, vocab_size=32, num_pairs=4)
    perfect = score_task(MQAROracle(4, 32), task, n_samples=40, batch_size=16, device="cpu")
    assert perfect["accuracy"] == 1.0 and perfect["exact_match"] == 1.0 and perfect["n_samples"] == 40
    wrong = score_task(MQAROracle(4, 32, wrong=True), task, n_samples=40, batch_size=16, device="cpu")
    assert wrong["accuracy"] == 0.0 and wrong["exact_match"] == 0.0 and wrong["loss"] > perfect["loss"]
    assert perfect["bits_per_token"] == pytest.approx(perfect["loss"] / 0.6931471805599453)


def test_mrcr_score_decodes_greedily_and_uses_sequence_matcher():
    task = MRCR(seq_len=48, vocab_size=32, num_needles=2, num_topics=4, response_len=4)
    token = 20
    result = score_task(Constant(token, 32), task, n_samples=12, batch_size=5, seed=3, device="cpu")
    tokens, _ = task.eval_batch(12, seed=3)
    start, end = task.answer_span()
    expected = [difflib.SequenceMatcher(None, [token] * 4, row[start:end]).ratio() for row in tokens.tolist()]
    assert result["score"] == pytest.approx(sum(expected) / 12)
    assert 0 < result["score"] < 1  # some answers contain the token, none are all of it


def test_evaluate_grid_over_lengths_and_depths():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(pattern="S", d_model=32, n_layers=1, n_heads=2, vocab_size=256))
    records = evaluate(
        model,
        ["mqar:num_pairs=2", "needle:key_len=3,value_digits=3"],
        lengths=[128, 192],
        depths=[0.0, 0.5, 1.0],
        n_samples=4,
        batch_size=4,
    )
    grid = [(r["task"], r["length"], r["depth"]) for r in records]
    assert grid == [("mqar", 128, None), ("mqar", 192, None)] + [
        ("needle", L, d) for L in (128, 192) for d in (0.0, 0.5, 1.0)
    ]
    assert all(0 <= r["accuracy"] <= 1 and r["n_samples"] == 4 for r in records)
    again = evaluate(model, ["mqar:num_pairs=2"], lengths=[128], n_samples=4, batch_size=4)
    assert again[0]["loss"] == records[0]["loss"]  # same seed, same evaluation set
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(model, ["haystack"], lengths=[64])
    with pytest.raises(ValueError, match="lengths"):
        evaluate(model, ["mqar"], lengths=[])


def test_cli_eval_writes_results_beyond_training_length(tmp_path):
    cfg = TrainConfig(
        tasks=["mqar:num_pairs=2"],
        seq_len=16,
        batch_size=8,
        steps=2,
        eval_samples=8,
        log_every=1,
        device="cpu",
    )
    Trainer(
        ModelConfig(pattern="S", d_model=32, n_layers=1, n_heads=2, vocab_size=32),
        cfg,
        tmp_path / "run",
        progress=False,
    ).fit()
    out = tmp_path / "results" / "eval.json"
    code = attnlab_cli.main(
        [
            "eval",
            str(tmp_path / "run"),
            "--lengths",
            "16,64",
            "--task",
            "mqar:num_pairs=2",
            "--task",
            "copying",
            "--samples",
            "8",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["step"] == 2 and payload["trained_on"]["seq_len"] == 16
    assert [(r["task"], r["length"]) for r in payload["results"]] == [
        ("mqar", 16),
        ("mqar", 64),
        ("copying", 16),
        ("copying", 64),
    ]
    assert list(out.parent.iterdir()) == [out]  # written via a temp file, nothing left behind
    model, info = load_model(tmp_path / "run")
    tokens = torch.randint(0, 32, (1, 16))
    trained = Trainer(None, None, tmp_path / "run", resume=True, progress=False).model.eval()
    torch.testing.assert_close(model(tokens), trained(tokens))
    # defaults: the training tasks at the training length, into the run directory
    assert attnlab_cli.main(["eval", str(tmp_path / "run"), "--samples", "4"]) == 0
    default = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert [(r["spec"], r["length"]) for r in default["results"]] == [("mqar:num_pairs=2", 16)]
    assert attnlab_cli.main(["eval", str(tmp_path / "nothing")]) == 2


def test_corpus_tasks_are_evaluated_on_validation_text():
    from attnlab.evaluate import evaluation_task
    from attnlab.tasks import corpus_bytes

    assert evaluation_task("text", 64, 256).split == "validation"
    assert evaluation_task("text:split=train", 64, 256).split == "train"
    assert evaluation_task("needle:haystack=text", 400, 256).split == "validation"
    tokens, _ = evaluation_task("text", 64, 256).eval_batch(2, seed=0)
    assert corpus_bytes("validation").find(bytes(tokens[0].tolist())) >= 0
    assert evaluation_task("mqar", 64, 64).name == "mqar"  # tasks without a corpus are unchanged


def test_eval_default_output_stays_inside_a_plain_model_dir(tmp_path):
    """`attnlab eval` on a save_pretrained directory writes eval.json into it, not its parent."""
    from attnlab.cli import main
    from attnlab.config import ModelConfig
    from attnlab.model import HybridLM

    model_dir = tmp_path / "models" / "tiny"
    cfg = ModelConfig(pattern="S", d_model=16, n_layers=1, n_heads=2, vocab_size=64)
    HybridLM(cfg).save_pretrained(model_dir)
    args = ["eval", str(model_dir), "--task", "mqar:num_pairs=2", "--lengths", "32", "--samples", "4"]
    assert main(args) == 0
    assert (model_dir / "eval.json").is_file()
    assert not (tmp_path / "models" / "eval.json").exists()


def test_atomic_writes_follow_the_umask(tmp_path):
    import os

    from attnlab._io import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
