"""Formats and determinism of the recall task generators (attnlab.tasks)."""

from __future__ import annotations

import difflib
import re

import numpy as np
import pytest
import torch

from attnlab.tasks import (
    IGNORE,
    MQAR,
    MRCR,
    TASKS,
    Copying,
    Needle,
    Passkey,
    TaskMixture,
    TextLM,
    corpus_bytes,
    corpus_fingerprint,
    make_task,
    mrcr_score,
    parse_task_spec,
)
from attnlab.tasks.corpus import TRAIN_FILES, VALIDATION_FILES
from attnlab.tasks.passkey import INTRO


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------- MQAR
@pytest.mark.parametrize("filler", ["zero", "noise"])
@pytest.mark.parametrize("L,N,V", [(64, 4, 64), (16, 4, 10), (128, 8, 512)])
def test_mqar_labels_are_exactly_the_queried_values(L, N, V, filler):
    task = MQAR(seq_len=L, vocab_size=V, num_pairs=N, filler=filler)
    for seed in range(5):
        tokens, targets = task.sample(rng(seed))
        assert tokens.shape == targets.shape == (L,) and tokens.dtype == targets.dtype == torch.int64
        keys, values = tokens[0 : 2 * N : 2].tolist(), tokens[1 : 2 * N : 2].tolist()
        assert len(set(keys)) == N and all(1 <= k < V // 2 for k in keys)
        assert all(V // 2 <= v < V for v in values)
        pairs = dict(zip(keys, values, strict=True))
        query_pos = (targets != IGNORE).nonzero().flatten().tolist()
        assert len(query_pos) == N and all(p >= 2 * N and (p - 2 * N) % 2 == 0 for p in query_pos)
        assert sorted(tokens[query_pos].tolist()) == sorted(keys)  # every key asked once
        for p in query_pos:
            assert targets[p].item() == pairs[tokens[p].item()]
        # outside the queries the region holds only filler (0 or value ids), never a key
        rest = [t for i, t in enumerate(tokens.tolist()) if i >= 2 * N and i not in query_pos]
        assert all(t == 0 for t in rest) if filler == "zero" else all(t >= V // 2 for t in rest)


def test_mqar_bad_inputs():
    with pytest.raises(ValueError, match="seq_len.*4 \\* num_pairs"):
        MQAR(seq_len=15, vocab_size=64, num_pairs=4)
    with pytest.raises(ValueError, match="vocab_size"):
        MQAR(seq_len=64, vocab_size=9, num_pairs=4)
    with pytest.raises(ValueError, match="filler"):
        MQAR(seq_len=64, vocab_size=64, filler="junk")
    with pytest.raises(ValueError, match="num_pairs"):
        MQAR(seq_len=64, vocab_size=64, num_pairs=0)


# ---------------------------------------------------------------------- needle / passkey
@pytest.mark.parametrize("haystack", ["noise", "text"])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_sits_at_requested_depth(depth, haystack):
    task = Needle(seq_len=600, vocab_size=256, depth=depth, haystack=haystack)
    for seed in range(3):
        built = task.build(rng(seed))
        text, off = built.text, built.needle_offsets[0]
        m = re.match(rb"The magic number for ([a-z]{6}) is (\d{7})\.", text[off:])
        assert m is not None, text[off : off + 50]
        # the haystack before the needle is what the depth says, up to one boundary gap
        gap = 30 if haystack == "noise" else 200
        assert abs(off - depth * built.haystack_len) <= gap
        assert built.needle_depths[0] == pytest.approx(off / built.haystack_len)
        if haystack == "noise" and 0 < off < built.haystack_len:
            assert text[off - 2 : off] == b". "  # at a sentence boundary
        if haystack == "text" and 0 < off < built.haystack_len:
            assert text[off - 1 : off] == b"\n"  # at a line start
        # the question asks for this key and the target is its value
        tokens, targets = task.sample(rng(seed))
        assert bytes(tokens.tolist()).endswith(text)
        answer = bytes(t for t in targets.tolist() if t != IGNORE)
        assert answer == m.group(2)
        assert text.endswith(b"What is the magic number for " + m.group(1) + b"? " + m.group(2))


def test_needle_variants():
    multi_key = Needle(seq_len=700, vocab_size=256, variant="multi-key", depth=0.3)
    built = multi_key.build(rng(1))
    found = re.findall(rb"The magic number for ([a-z]{6}) is (\d{7})\.", built.text)
    assert len(found) == 4 and len({k for k, _ in found}) == 4  # 1 asked + 3 distractor keys
    asked = re.search(rb"What is the magic number for ([a-z]{6})\? (\d+)$", built.text)
    assert dict(found)[asked.group(1)] == asked.group(2)

    multi_value = Needle(seq_len=700, vocab_size=256, variant="multi-value", depth=0.6)
    built = multi_value.build(rng(2))
    found = re.findall(rb"The magic number for ([a-z]{6}) is (\d{7})\.", built.text)
    assert len(found) == 4 and len({k for k, _ in found}) == 1
    assert built.text.endswith(b", ".join(v for _, v in found))  # all values, in text order
    tokens, targets = multi_value.sample(rng(2))
    assert bytes(t for t in targets.tolist() if t != IGNORE) == b", ".join(v for _, v in found)

    multi_query = Needle(seq_len=700, vocab_size=256, variant="multi-query", depth=0.0)
    built = multi_query.build(rng(3))
    pairs = dict(re.findall(rb"The magic number for ([a-z]{6}) is (\d{7})\.", built.text))
    asked = re.findall(rb"What is the magic number for ([a-z]{6})\? (\d{7})", built.text)
    assert len(pairs) == 4 and len(asked) == 2
    assert all(pairs[k] == v for k, v in asked)
    tokens, targets = multi_query.sample(rng(3))
    assert (targets != IGNORE).sum() == 14


def test_needle_bad_inputs():
    with pytest.raises(ValueError, match="seq_len"):
        Needle(seq_len=40, vocab_size=256)
    with pytest.raises(ValueError, match="vocab_size.*256"):
        Needle(seq_len=400, vocab_size=64)
    with pytest.raises(ValueError, match="depth"):
        Needle(seq_len=400, vocab_size=256, depth=1.5)
    with pytest.raises(ValueError, match="variant"):
        Needle(seq_len=400, vocab_size=256, variant="multi-hop")
    with pytest.raises(ValueError, match="num_queries"):
        Needle(seq_len=400, vocab_size=256, variant="multi-query", num_keys=2, num_queries=3)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_format_and_depth(depth):
    task = Passkey(seq_len=500, vocab_size=256, depth=depth)
    tokens, targets = task.sample(rng(7))
    text = bytes(tokens.tolist())
    m = re.search(rb"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.", text)
    assert m is not None
    assert bytes(t for t in targets.tolist() if t != IGNORE) == m.group(1)
    assert text.endswith(b"What is the pass key? The pass key is " + m.group(1))
    intro_len = len(INTRO)
    hay_len = len(text) - intro_len - len(m.group(0)) - 1 - len(b"What is the pass key? The pass key is ") - 5
    assert abs((m.start() - intro_len) - depth * hay_len) <= 30


# ---------------------------------------------------------------------- copying / MRCR
def test_copying_targets_are_the_copy():
    task = Copying(seq_len=21, vocab_size=16)
    tokens, targets = task.sample(rng(0))
    n = 10
    string, sep, copy = tokens[:n], tokens[n], tokens[n + 1 :]
    assert sep.item() == 1 and torch.equal(string, copy) and (string >= 2).all()
    assert torch.equal(targets[n : 2 * n], copy) and (targets[:n] == IGNORE).all() and targets[-1] == IGNORE
    short = Copying(seq_len=20, vocab_size=16, copy_len=5)
    tokens, targets = short.sample(rng(0))
    assert (tokens[:9] == 0).all() and tokens[14] == 1 and torch.equal(tokens[9:14], tokens[15:])
    assert torch.equal(targets[14:19], tokens[15:])
    with pytest.raises(ValueError, match="seq_len"):
        Copying(seq_len=10, vocab_size=16, copy_len=5)


@pytest.mark.parametrize("prefix_len", [0, 2])
def test_mrcr_answer_is_the_ith_response(prefix_len):
    task = MRCR(seq_len=80, vocab_size=64, num_needles=3, num_topics=5, response_len=4, prefix_len=prefix_len)
    first_topic = 5 + 3
    for seed in range(5):
        tokens, targets = task.sample(rng(seed))
        t = tokens.tolist()
        start, end = task.answer_span()
        ask_at = start - 4 - prefix_len
        assert t[ask_at] == 3 and t[start - 1] == 4  # ASK ... ANS
        ordinal, topic = t[ask_at + 1] - 5, t[ask_at + 2]
        turns = [i for i in range(ask_at) if t[i] == 1 and t[i + 1] == topic and t[i + 2] == 2]
        assert len(turns) == 3 and topic >= first_topic
        expected = t[ask_at + 3 : ask_at + 3 + prefix_len] + t[turns[ordinal] + 3 : turns[ordinal] + 7]
        assert t[start:end] == expected
        assert targets[start - 1 : end - 1].tolist() == expected
        assert (targets != IGNORE).sum() == task.answer_len


def test_mrcr_score_is_openai_grader():
    assert mrcr_score([5, 6, 7, 8], [5, 6, 7, 8]) == 1.0
    assert mrcr_score([5, 6, 9, 8], [5, 6, 7, 8]) == pytest.approx(0.75)  # 2 * 3 matches / 8
    assert mrcr_score([9, 9, 5, 6], [1, 2, 5, 6], prefix=[1, 2]) == 0.0  # prefix missing -> 0
    assert mrcr_score([1, 2, 5, 7], [1, 2, 5, 6], prefix=[1, 2]) == pytest.approx(0.5)
    a, b = [3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]
    assert mrcr_score(a, b) == difflib.SequenceMatcher(None, a, b).ratio()


def test_mrcr_bad_inputs():
    with pytest.raises(ValueError, match="seq_len"):
        MRCR(seq_len=20, vocab_size=64, num_needles=4)
    with pytest.raises(ValueError, match="vocab_size"):
        MRCR(seq_len=80, vocab_size=16, num_needles=4, num_topics=8)


# ---------------------------------------------------------------------- corpus
def test_corpus_split_and_fingerprint():
    train, val = corpus_bytes("train"), corpus_bytes("validation")
    assert len(train) > 1_000_000 and len(val) > 50_000
    assert not set(TRAIN_FILES) & set(VALIDATION_FILES)
    assert b"class SequenceMatcher" in val and b"class SequenceMatcher" not in train  # difflib is validation
    fp = corpus_fingerprint()
    assert len(fp) == 64 and fp == corpus_fingerprint()
    task = TextLM(seq_len=32, vocab_size=256, split="validation")
    tokens, targets = task.sample(rng(0))
    assert torch.equal(tokens[1:], targets[:-1])
    start = val.find(bytes(tokens.tolist()))
    assert start >= 0 and val[start + 32] == targets[-1].item()
    with pytest.raises(ValueError, match="split"):
        TextLM(seq_len=32, vocab_size=256, split="test")


# ---------------------------------------------------------------------- determinism, registry, mixtures
@pytest.mark.parametrize(
    "spec,L,V",
    [
        ("mqar:num_pairs=3", 32, 32),
        ("needle:haystack=text", 300, 256),
        ("passkey:intro=false", 200, 256),
        ("copying", 33, 20),
        ("mrcr", 60, 40),
        ("text", 64, 256),
    ],
)
def test_every_task_is_deterministic_by_seed(spec, L, V):
    task = make_task(spec, L, V)
    a, b, c = task.batch(rng(5), 4), task.batch(rng(5), 4), task.batch(rng(6), 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (4, L) and int(a[0].max()) < V and int(a[0].min()) >= 0
    assert (a[1] != IGNORE).any()
    e1, e2 = task.eval_batch(3, seed=1), task.eval_batch(3, seed=1)
    assert torch.equal(e1[0], e2[0])


def test_registry_and_specs():
    assert set(TASKS) == {"mqar", "needle", "passkey", "copying", "mrcr", "text"}
    assert parse_task_spec("mqar:num_pairs=4,weight=2") == ("mqar", {"num_pairs": 4}, 2.0)
    spec = parse_task_spec("needle:variant=multi-key,depth=0.25")
    assert spec[1] == {"variant": "multi-key", "depth": 0.25}
    task = make_task("needle:variant=multi-value,haystack=text", 512, 256)
    assert isinstance(task, Needle) and task.num_values == 4
    assert make_task(task.options(), 1024, 256).seq_len == 1024
    with pytest.raises(ValueError, match="unknown task 'mqr'"):
        make_task("mqr", 64, 64)
    with pytest.raises(ValueError, match="unknown option.*pairs"):
        make_task("mqar:pairs=4", 64, 64)
    with pytest.raises(ValueError, match="key=value"):
        parse_task_spec("mqar:num_pairs")


def test_task_spec_bad_weight_names_the_weight():
    for bad, shown in (("abc", "'abc'"), ("none", "None"), ("inf", "inf"), ("0", "0"), ("-1", "-1")):
        with pytest.raises(ValueError, match=f"weight must be a finite number > 0, got {shown}$"):
            parse_task_spec(f"mqar:num_pairs=2,weight={bad}")


def test_mixture_mixes_and_restores_state():
    tasks = [MQAR(seq_len=32, vocab_size=32, num_pairs=2), Copying(seq_len=32, vocab_size=32)]
    mix = TaskMixture(tasks, weights=[1, 3], seed=3)
    tokens, targets, ids = mix.batch(64)
    assert tokens.shape == targets.shape == (64, 32)
    assert 0 < int((ids == 0).sum()) < int((ids == 1).sum())  # both present, weighted 1:3
    for row in range(64):  # each row has its task's format
        n_targets = int((targets[row] != IGNORE).sum())
        assert n_targets == (2 if ids[row] == 0 else 15)
    state = mix.state_dict()
    after = [mix.batch(8) for _ in range(2)]
    mix2 = TaskMixture(tasks, weights=[1, 3], seed=3)
    mix2.load_state_dict(state)
    for want, got in zip(after, [mix2.batch(8) for _ in range(2)], strict=True):
        assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True))
    with pytest.raises(ValueError, match="one seq_len"):
        TaskMixture([tasks[0], Copying(seq_len=16, vocab_size=32)])
