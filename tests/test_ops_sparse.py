"""DeepSeek Sparse Attention ops: indexer scores, causal top-k, sparse attention."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import ops
from attnlab.ops import sparse as sparse_mod
from attnlab.ops.softmax import _reference_softmax_attention


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def masked_reference(q, k, v, indices, scale=None):
    """Dense attention over the positions named in `indices` (float64), 0 for a row with none."""
    B, T, H, D = q.shape
    S, H_kv = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    selected = torch.zeros(B, T, S + 1, dtype=torch.bool)
    selected.scatter_(-1, torch.where(indices < 0, S, indices).long(), True)  # empty slots -> column S
    selected = selected[..., :S]  # (B, T, S)
    kx = k.double().repeat_interleave(H // H_kv, 2)  # (B, S, H, D)
    vx = v.double().repeat_interleave(H // H_kv, 2)
    logits = torch.einsum("bthd,bshd->bhts", q.double(), kx) * scale
    logits = logits.masked_fill(~selected[:, None], float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)  # all-masked rows -> 0
    return torch.einsum("bhts,bshd->bthd", probs, vx)


# ---------------------------------------------------------------- indexer scores


def loop_index_scores(q, k, w):
    B, T, H, _ = q.shape
    S = k.shape[1]
    out = torch.zeros(B, T, S, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                dots = [q[b, t, j].double() @ k[b, s].double() for j in range(H)]
                out[b, t, s] = sum(w[b, t, j].double() * torch.relu(dots[j]) for j in range(H))
    return out


@pytest.mark.parametrize("block", [None, 3])
def test_index_scores_match_loop(block, monkeypatch):
    if block:  # force several query blocks
        monkeypatch.setattr(sparse_mod, "_BLOCK_ELEMENTS", block * 2 * 3 * 11)
    q, k, w = torch.randn(2, 9, 3, 12), torch.randn(2, 11, 12), torch.randn(2, 9, 3)
    out = ops.dsa_index_scores(q, k, w)
    assert out.shape == (2, 9, 11) and out.dtype == torch.float32
    assert rel_err(out, loop_index_scores(q, k, w)) < 1e-6


def test_index_scores_bf16_and_grad():
    q, k, w = torch.randn(1, 6, 4, 16), torch.randn(1, 8, 16), torch.randn(1, 6, 4)
    out = ops.dsa_index_scores(q.bfloat16(), k.bfloat16(), w.bfloat16())
    assert out.dtype == torch.float32
    assert rel_err(out, loop_index_scores(q, k, w)) < 2e-2
    q, k, w = (t.double().requires_grad_() for t in (q, k, w))
    got = torch.autograd.grad(ops.dsa_index_scores(q, k, w).sin().sum(), (q, k, w))
    ref = torch.einsum("bths,bth->bts", torch.relu(torch.einsum("bthd,bsd->bths", q, k)), w).float()
    want = torch.autograd.grad(ref.sin().sum(), (q, k, w))
    for g, wnt in zip(got, want, strict=True):
        assert rel_err(g, wnt) < 1e-5


# ---------------------------------------------------------------- top-k


def sorted_topk_reference(scores, topk, causal=True):
    """Python ordering: visible finite positions by (-score, position); then -1."""
    B, T, S = scores.shape
    out = torch.full((B, T, topk), -1, dtype=torch.int64)
    for b in range(B):
        for t in range(T):
            p = S - T + t
            cand = [s for s in range(S) if (not causal or s <= p) and scores[b, t, s] != float("-inf")]
            cand.sort(key=lambda s: (-float(scores[b, t, s]), s))
            out[b, t, : min(topk, len(cand))] = torch.tensor(cand[:topk], dtype=torch.int64)
    return out


@pytest.mark.parametrize("T, S, topk", [(1, 1, 1), (7, 7, 3), (7, 7, 10), (5, 12, 4), (12, 12, 12)])
def test_topk_matches_sorted_reference(T, S, topk):
    scores = torch.randn(2, T, S)
    idx = ops.dsa_topk(scores, topk)
    assert idx.shape == (2, T, topk) and idx.dtype == torch.int64
    assert torch.equal(idx, sorted_topk_reference(scores, topk))


def test_topk_never_selects_invisible_and_fills_minus_one():
    T, S, topk = 20, 30, 16
    scores = torch.randn(3, T, S)
    scores[..., -1] = 1e9  # the future position has the best score; it must still be invisible to t < T-1
    idx = ops.dsa_topk(scores, topk)
    q_pos = torch.arange(S - T, S)[None, :, None]  # (1, T, 1)
    assert (idx <= q_pos).all()
    n_visible = torch.clamp(q_pos + 1, max=topk).expand(3, T, 1)  # (3, T, 1)
    assert torch.equal((idx >= 0).sum(-1, keepdim=True), n_visible)
    # -1 only after all real picks, and picks within a row are distinct
    for row in idx.reshape(-1, topk).tolist():
        real = [i for i in row if i >= 0]
        assert row[: len(real)] == real and len(set(real)) == len(real)


def test_topk_ties_prefer_earlier_positions():
    # the last query row sees all 8 positions
    scores = torch.tensor([[[0.0, 1.0, 1.0, -0.0, 1.0, 0.0, -2.0, 0.0]]]).expand(1, 8, 8).clone()
    idx = ops.dsa_topk(scores, 5)
    # the three 1.0s by position, then the zeros (-0.0 == 0.0) by position
    assert idx[0, -1].tolist() == [1, 2, 4, 0, 3]
    ints = torch.randint(-2, 3, (2, 16, 40)).float()  # heavy ties
    ints[0, :, 5] = float("-inf")
    assert torch.equal(ops.dsa_topk(ints, 9), sorted_topk_reference(ints, 9))
    assert torch.equal(ops.dsa_topk(ints, 9, causal=False), sorted_topk_reference(ints, 9, causal=False))


def test_topk_non_causal_and_minus_inf_masking():
    scores = torch.randn(2, 3, 10)
    scores[1, :, 4:] = float("-inf")  # e.g. decode: cache row 1 holds only 4 tokens
    idx = ops.dsa_topk(scores, 6, causal=False)
    assert torch.equal(idx, sorted_topk_reference(scores, 6, causal=False))
    assert (idx[1, :, 4:] == -1).all() and (idx[1, :, :4] >= 0).all()


def test_topk_bf16_and_blocks(monkeypatch):
    monkeypatch.setattr(sparse_mod, "_BLOCK_ELEMENTS", 3 * 3 * 50)  # 3 queries per block
    scores = torch.randn(1, 23, 50).bfloat16()  # bf16 has many exact ties
    assert torch.equal(ops.dsa_topk(scores, 7), sorted_topk_reference(scores.float(), 7))


@settings(deadline=None, max_examples=15)
@given(T=st.integers(1, 12), extra=st.integers(0, 8), topk=st.integers(1, 25), levels=st.integers(1, 6))
def test_property_topk(T, extra, topk, levels):
    scores = torch.randint(0, levels, (1, T, T + extra)).float() / levels
    assert torch.equal(ops.dsa_topk(scores, topk), sorted_topk_reference(scores, topk))


# ---------------------------------------------------------------- the HF DeepSeek-V3.2 indexer


def test_matches_transformers_deepseek_v32_indexer():
    """Our index scores + top-k reproduce DeepseekV32Indexer's selection when its scales are folded into w."""
    dsv32 = pytest.importorskip("transformers.models.deepseek_v32.modeling_deepseek_v32")
    from transformers import DeepseekV32Config

    sizes = dict(hidden_size=48, q_lora_rank=24, index_n_heads=4, index_head_dim=32, qk_rope_head_dim=16)
    rest = dict(num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1, vocab_size=32)
    cfg = DeepseekV32Config(**sizes, **rest, index_topk=6)
    indexer = dsv32.DeepseekV32Indexer(cfg, layer_idx=0).eval()
    B, T = 2, 15
    x, q_resid = torch.randn(B, T, 48), torch.randn(B, T, 24)
    pos = torch.arange(T)[None].expand(B, T)
    cos, sin = dsv32.DeepseekV32RotaryEmbedding(cfg)(x, pos)
    causal_mask = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, T, T)
    with torch.no_grad():
        hf_idx = indexer(x, q_resid, (cos, sin), causal_mask, pos).long()  # (B, T, 6)

        # The same q / k the HF module builds (non-interleaved RoPE on the [rope | nope] split) ...
        r = cfg.qk_rope_head_dim
        q = indexer.wq_b(q_resid).view(B, T, 4, 32)
        k = indexer.k_norm(indexer.wk(x))[:, :, None]  # (B, T, 1, 32)
        q_rot, k_rot = dsv32.apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin, unsqueeze_dim=2)
        q, k = torch.cat([q_rot, q[..., r:]], -1), torch.cat([k_rot, k[..., r:]], -1)[:, :, 0]
        # ... and both of its positive scales folded into w.
        w = indexer.weights_proj(x) * cfg.index_n_heads**-0.5 * cfg.index_head_dim**-0.5
        ours = ops.dsa_topk(ops.dsa_index_scores(q, k, w), cfg.index_topk)

    for b in range(B):
        for t in range(T):
            # HF pads rows with fewer than top-k visible positions with masked ones; we pad with -1
            visible_hf = {s for s in hf_idx[b, t].tolist() if s <= t}
            assert {s for s in ours[b, t].tolist() if s >= 0} == visible_hf


# ---------------------------------------------------------------- sparse attention


@pytest.mark.parametrize("H, H_kv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("T", [1, 63, 65])
def test_all_positions_selected_equals_dense_causal(H, H_kv, T):
    q = torch.randn(2, T, H, 16)
    k, v = torch.randn(2, T, H_kv, 16), torch.randn(2, T, H_kv, 12)
    idx = ops.dsa_topk(torch.randn(2, T, T), T + 3)  # top-k >= T: every causal position, plus -1 slots
    idx = idx[..., torch.randperm(T + 3)]  # slot order and where the -1s sit do not matter
    out = ops.sparse_attention(q, k, v, idx)
    assert out.shape == (2, T, H, 12)
    assert rel_err(out, _reference_softmax_attention(q, k, v)) < 1e-5


def test_subset_and_empty_slots_match_masked_reference():
    B, T, S, K = 2, 10, 16, 5
    q, k, v = torch.randn(B, T, 4, 8), torch.randn(B, S, 2, 8), torch.randn(B, S, 2, 6)
    idx = torch.stack([torch.stack([torch.randperm(S)[:K] for _ in range(T)]) for _ in range(B)])  # (B, T, K)
    idx[:, ::2, 1:3] = -1
    out = ops.sparse_attention(q, k, v, idx, scale=0.4)
    assert rel_err(out, masked_reference(q, k, v, idx, scale=0.4)) < 1e-6
    # an ignored slot is ignored whatever position the implementation reads for it
    k2, v2 = k.clone(), v.clone()
    k2[:, 0], v2[:, 0] = float("nan"), float("nan")
    idx2 = torch.where(idx == 0, 1, idx)  # no real slot names position 0
    assert torch.isfinite(ops.sparse_attention(q, k2, v2, idx2)).all()


def test_empty_rows_output_zero_with_finite_grads():
    q, k, v = (torch.randn(1, 4, 2, 8, requires_grad=True) for _ in range(3))
    idx = torch.tensor([[[0, -1], [-1, -1], [2, 1], [-1, -1]]])
    out = ops.sparse_attention(q, k, v, idx)
    assert torch.equal(out[0, 1], torch.zeros(2, 8)) and torch.equal(out[0, 3], torch.zeros(2, 8))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[0, 1], torch.zeros(2, 8))


def test_gradients_match_dense_masked(monkeypatch):
    monkeypatch.setattr(sparse_mod, "_BLOCK_ELEMENTS", 2000)  # several checkpointed blocks
    B, T, S, K = 2, 12, 12, 6
    shapes = ((B, T, 4, 8), (B, S, 2, 8), (B, S, 2, 8))
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in shapes)
    idx = ops.dsa_topk(torch.randn(B, T, S), K)
    idx[0, 5] = -1  # one empty row
    got = torch.autograd.grad(ops.sparse_attention(q, k, v, idx).pow(2).sum(), (q, k, v))
    want = torch.autograd.grad(masked_reference(q, k, v, idx).pow(2).sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-10


def test_mla_absorbed_shapes():
    """MQA over one latent head: keys 576 dims, values the first 512 of them, 16 query heads."""
    B, T, S, K, H = 1, 3, 40, 8, 16
    q, latent = torch.randn(B, T, H, 576), torch.randn(B, S, 1, 576)
    idx = ops.dsa_topk(torch.randn(B, T, S), K)
    want = masked_reference(q, latent, latent[..., :512], idx, scale=0.04)
    with torch.no_grad():  # shared-gather path (v is a prefix view of k)
        out = ops.sparse_attention(q, latent, latent[..., :512], idx, scale=0.04)
    assert out.shape == (B, T, H, 512)
    assert rel_err(out, want) < 1e-6
    out = ops.sparse_attention(q, latent, latent[..., :512].clone(), idx, scale=0.04)  # separate v
    assert rel_err(out, want) < 1e-6


def test_decode_row_over_a_cache():
    """D-layer decode: one query against a partially filled cache, top-k over finite scores only."""
    B, S_max, H = 2, 30, 4
    n_valid = torch.tensor([30, 9])
    q, k, v = torch.randn(B, 1, H, 16), torch.randn(B, S_max, 1, 16), torch.randn(B, S_max, 1, 16)
    unwritten = torch.arange(S_max) >= n_valid[:, None, None]  # (B, 1, S_max)
    scores = torch.randn(B, 1, S_max).masked_fill(unwritten, float("-inf"))
    idx = ops.dsa_topk(scores, 64, causal=False)  # top-k > cache: everything valid
    out = ops.sparse_attention(q, k, v, idx)
    dense = ops.softmax_decode(q[:, 0], k, v, n_valid)
    assert rel_err(out[:, 0], dense) < 1e-5


def test_bf16_inputs():
    q, k, v = torch.randn(2, 20, 4, 64), torch.randn(2, 20, 2, 64), torch.randn(2, 20, 2, 64)
    idx = ops.dsa_topk(torch.randn(2, 20, 20), 8)
    out = ops.sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), idx.int())
    assert out.dtype == torch.bfloat16
    assert rel_err(out, masked_reference(q, k, v, idx)) < 2e-2


@settings(deadline=None, max_examples=12)
@given(
    T=st.integers(1, 10),
    S=st.integers(1, 12),
    K=st.integers(0, 14),
    groups=st.sampled_from([(1, 1), (4, 1), (4, 2)]),
    seed=st.integers(0, 2**16),
)
def test_property_sparse_matches_masked_reference(T, S, K, groups, seed):
    H, H_kv = groups
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, h, 8, generator=gen) for n, h in ((T, H), (S, H_kv), (S, H_kv)))
    # K distinct entries from -3..S-1 per query; the negatives are empty slots
    idx = torch.stack([torch.randperm(S + 3, generator=gen)[:K] - 3 for _ in range(T)])[None]
    out = ops.sparse_attention(q, k, v, idx)
    want = masked_reference(q, k, v, idx)
    assert torch.isfinite(out).all()
    if want.abs().max() > 0:
        assert rel_err(out, want) < 1e-5
    else:
        assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------- bad input


def _sparse_args():
    q, k, v = torch.randn(1, 4, 4, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 5)
    return q, k, v, torch.zeros(1, 4, 3, dtype=torch.int64)


@pytest.mark.parametrize(
    "mutate, name",
    [
        (lambda q, k, v, i: (q[0], k, v, i), "q"),
        (lambda q, k, v, i: (q, k[..., :7], v, i), "k"),
        (lambda q, k, v, i: (q[:, :, :3], k, v, i), "q"),  # 3 heads over 2 kv heads
        (lambda q, k, v, i: (q, k, v[:, :5], i), "v"),
        (lambda q, k, v, i: (q, k.half(), v, i), "k"),
        (lambda q, k, v, i: (q, k, v.to("meta"), i), "v"),
        (lambda q, k, v, i: (q, k, v, i.float()), "indices"),
        (lambda q, k, v, i: (q, k, v, i[0]), "indices"),
        (lambda q, k, v, i: (q, k, v, i[:, :3]), "indices"),  # T mismatch
        (lambda q, k, v, i: (q, k, v, i + 6), "indices"),  # position >= S
        (lambda q, k, v, i: (q, k, v, i.to("meta")), "indices"),
    ],
)
def test_sparse_bad_input(mutate, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.sparse_attention(*mutate(*_sparse_args()))


@pytest.mark.parametrize(
    "mutate, name",
    [
        (lambda q, k, w: (q[0], k, w), "q"),
        (lambda q, k, w: (q, k[..., :5], w), "k"),
        (lambda q, k, w: (q, k[None], w), "k"),
        (lambda q, k, w: (q, k, w[:, :, :2]), "w"),
        (lambda q, k, w: (q, k.double(), w), "k"),
        (lambda q, k, w: (q, k, w.long()), "w"),
        (lambda q, k, w: (q, k.to("meta"), w), "k"),
    ],
)
def test_index_scores_bad_input(mutate, name):
    args = (torch.randn(1, 4, 3, 8), torch.randn(1, 6, 8), torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.dsa_index_scores(*mutate(*args))


@pytest.mark.parametrize(
    "scores, topk, name",
    [
        (torch.randn(4, 6), 2, "scores"),
        (torch.randint(0, 3, (1, 4, 6)), 2, "scores"),
        (torch.randn(1, 6, 4), 2, "scores"),  # causal needs S >= T
        (torch.randn(1, 4, 6), 0, "topk"),
        (torch.randn(1, 4, 6), 2.0, "topk"),
    ],
)
def test_topk_bad_input(scores, topk, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.dsa_topk(scores, topk)
