"""Triton DSA / MLA-decode kernels (attnlab.kernels.sparse) against the torch ops in float64.

Two ways to run:
- on the CPU, tiny sizes under ``TRITON_INTERPRET=1``. That variable must be set before triton is
  imported, so ``test_interpreter_suite`` re-runs this file's ``interp_`` tests in a subprocess with
  it set (or run ``TRITON_INTERPRET=1 pytest tests/test_kernels_sparse.py -k interp_`` directly);
- on a CUDA machine, the tests marked ``gpu`` (MLA sizes: 576/512 dims, 128 heads, top-2048).

Outputs are poisoned with NaN (``POISON_OUTPUTS``) so an unwritten element fails.
Error metric: rms(ref − out) / rms(ref) (DESIGN.md).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from _triton_tests import (
    HAVE_TRITON,
    INTERPRETED,
    capture_graph,
    compile_sm90,
    interp,
    needs_sm90_toolchain,
    needs_triton,
    rel_err,
    run_interpreter_suite,
    sm90_usage,
)

from attnlab import ops

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison():
    if not HAVE_TRITON:
        yield
        return
    from attnlab.kernels import sparse as ks

    ks.POISON_OUTPUTS = True
    yield
    ks.POISON_OUTPUTS = False


@contextlib.contextmanager
def tuned(name: str, **params):
    """Temporarily override attnlab.kernels.sparse.TUNING[name] (launch shapes)."""
    from attnlab.kernels import sparse as ks

    old = dict(ks.TUNING[name])
    ks.TUNING[name].update(params)
    try:
        yield
    finally:
        ks.TUNING[name] = old




def make_sparse(b, t, h, s, topk, d, d_v, h_kv=1, v_prefix=True, dtype=torch.float32, device="cpu", seed=0):
    """q [b,t,h,d]; latent k [b,s,h_kv,d]; v = k[..., :d_v] (MLA) or separate; distinct indices per
    query with -1 slots: query (0, 0) has none, others lose a random tail."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=gen)
    k = torch.randn(b, s, h_kv, d, generator=gen)
    v = None if v_prefix else torch.randn(b, s, h_kv, d_v, generator=gen)
    idx = torch.stack([torch.randperm(s, generator=gen)[:topk] for _ in range(b * t)]).view(b, t, topk)
    n_keep = torch.randint(0, topk + 1, (b, t), generator=gen)
    idx = idx.masked_fill(torch.arange(topk) >= n_keep[..., None], -1)
    idx[0, 0] = -1
    if t > 1:
        idx[-1, 1] = idx[-1, 1].flip(0)  # -1 slots first: empty slots anywhere in the row
    q, k = q.to(device, dtype), k.to(device, dtype)
    v = k[..., :d_v] if v_prefix else v.to(device, dtype)
    return q, k, v, idx.to(device)


def oracle_sparse(q, k, v, idx, scale=None):
    return ops.sparse_attention(
        q.double().cpu(), k.double().cpu(), v.double().cpu(), idx.cpu(), scale=scale, mode="torch"
    )


def check_sparse(b, t, h, s, topk, d, d_v, dtype, h_kv=1, v_prefix=True, n_splits=None, device="cpu", seed=0):
    from attnlab.kernels import sparse as ks

    q, k, v, idx = make_sparse(b, t, h, s, topk, d, d_v, h_kv, v_prefix, dtype, device, seed)
    o = ks.sparse_attention(q, k, v, idx, n_splits=n_splits)
    ref = oracle_sparse(q, k, v, idx)
    assert o.shape == (b, t, h, d_v) and o.dtype == dtype
    assert rel_err(o, ref) < TOL[dtype]
    empty = (idx < 0).all(-1)  # (b, t)
    assert empty[0, 0] and (o[empty] == 0).all(), "a query with no valid slot must output 0"


# ---------------------------------------------------------------------------------------------
# CPU: the subprocess runner and the checks that need no kernel launch


@needs_triton
def test_interpreter_suite():
    run_interpreter_suite(__file__)


def test_auto_mode_on_cpu_is_the_torch_path():
    q, k, v, idx = make_sparse(2, 5, 4, 40, 8, 24, 16)
    assert torch.equal(ops.sparse_attention(q, k, v, idx), ops.sparse_attention(q, k, v, idx, mode="torch"))
    qi, ki, w = torch.randn(2, 5, 4, 16), torch.randn(2, 40, 16), torch.randn(2, 5, 4)
    assert torch.equal(ops.dsa_index_scores(qi, ki, w), ops.dsa_index_scores(qi, ki, w, mode="torch"))
    qd, nv = torch.randn(2, 4, 24), torch.tensor([3, 40])
    assert torch.equal(ops.softmax_decode(qd, k, v, nv), ops.softmax_decode(qd, k, v, nv, mode="torch"))


def test_bad_modes_raise():
    q, k, v, idx = make_sparse(1, 2, 4, 10, 4, 16, 16)
    with pytest.raises(ValueError, match="mode"):
        ops.sparse_attention(q, k, v, idx, mode="fast")
    if not INTERPRETED:  # the CPU is usable by mode="triton" only under the interpreter
        with pytest.raises(ValueError, match="mode: 'triton'"):
            ops.sparse_attention(q, k, v, idx, mode="triton")
    with pytest.raises(ValueError, match="mode: 'triton'"):  # float64 has no Triton path
        ops.dsa_index_scores(
            q.double(), k[:, :, 0].double(), torch.randn(1, 2, 4, dtype=torch.float64), mode="triton"
        )


@needs_triton
def test_kernel_bad_inputs_raise():
    from attnlab.kernels import sparse as ks

    q, k, v, idx = make_sparse(1, 2, 4, 10, 4, 16, 16)
    with pytest.raises(ValueError, match=r"indices: expected shape"):
        ks.sparse_attention(q, k, v, idx[:, :1])
    with pytest.raises(ValueError, match="heads"):
        ks.sparse_attention(q[:, :, :3], k.expand(-1, -1, 2, -1), v.expand(-1, -1, 2, -1), idx)
    with pytest.raises(ValueError, match="k: dtype"):
        ks.sparse_attention(q, k.bfloat16(), v, idx)
    with pytest.raises(ValueError, match="n_valid"):
        ks.softmax_decode(q[:, 0], k, v, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="k_scale"):
        ks.dsa_index_scores(
            torch.randn(1, 2, 4, 16),
            torch.randn(1, 10, 16).to(torch.float8_e4m3fn),
            torch.randn(1, 2, 4),
            k_scale=torch.ones(1, 9),
        )


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_fast_topk_variants_equal_oracle(causal):
    """Exact, ties included: scores rounded to 0.5 steps so many positions tie (and -0.0 vs 0.0),
    -inf positions, k above the visible count and above S."""
    from attnlab.kernels.sparse import dsa_topk_chunked, dsa_topk_threshold

    scores = (torch.randn(2, 30, 700) * 2).round() / 2
    scores[0, 0, 650:] = float("-inf")
    scores[1, 3, ::2] = -0.0
    for topk in (5, 64, 690, 800):
        want = ops.dsa_topk(scores, topk, causal=causal)
        assert torch.equal(dsa_topk_chunked(scores, topk, causal=causal, chunk=64), want)
        assert torch.equal(dsa_topk_threshold(scores, topk, causal=causal), want)
        assert torch.equal(dsa_topk_threshold(scores, topk, causal=causal, chunk=100), want)  # two stages
    assert (want == -1).any()


# ---------------------------------------------------------------------------------------------
# interpreter (CPU, tiny sizes)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,h", [(5, 4), (20, 16)])
def test_interp_sparse_mqa_matches_oracle(dtype, t, h):
    check_sparse(2, t, h, 40, 8, 24, 16, dtype, seed=t + h)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_sparse_mla_dims(dtype):
    """The real absorbed-MLA head: 576-dim key, its first 512 dims the value; 20 heads (two blocks
    of 16, the second partly padded)."""
    check_sparse(1, 3, 20, 40, 8, 576, 512, dtype, seed=1)
    with tuned("sparse", DVB=2, BLOCK_H=32):  # value columns split over two programs; one head block
        check_sparse(1, 3, 20, 40, 8, 576, 512, dtype, seed=1)


@interp
def test_interp_sparse_gqa_separate_values_odd_dims():
    check_sparse(2, 6, 8, 40, 8, 24, 20, torch.float32, h_kv=2, v_prefix=False, seed=2)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_sparse_decode_split_slots(dtype):
    """T = 1 with the slots split across programs and merged by the combine kernel."""
    check_sparse(2, 1, 4, 300, 100, 24, 16, dtype, n_splits=3, seed=3)
    check_sparse(1, 1, 4, 300, 100, 24, 16, dtype, n_splits=7, seed=4)  # more splits than 32-slot blocks


@interp
def test_interp_op_dispatch_runs_the_kernel():
    from attnlab.kernels import sparse as ks

    q, k, v, idx = make_sparse(2, 5, 4, 40, 8, 24, 16)
    assert torch.equal(ops.sparse_attention(q, k, v, idx, mode="triton"), ks.sparse_attention(q, k, v, idx))
    qd, nv = torch.randn(2, 4, 24), torch.tensor([0, 17])
    assert torch.equal(ops.softmax_decode(qd, k, v, nv, mode="triton"), ks.softmax_decode(qd, k, v, nv))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,d_v,h_kv", [(576, 512, 1), (24, 16, 1), (24, 20, 2)])
def test_interp_decode_matches_oracle(dtype, d, d_v, h_kv):
    """Rows of length 0, partial, full and past S_max (clamped); NaN in slots past n_valid must
    not leak (the kernel never reads them); split and unsplit."""
    from attnlab.kernels import sparse as ks

    gen = torch.Generator().manual_seed(d)
    B, H, S = 4, 4 * h_kv, 150
    q = torch.randn(B, H, d, generator=gen).to(dtype)
    k = torch.randn(B, S, h_kv, d, generator=gen).to(dtype)
    v = k[..., :d_v] if h_kv == 1 else torch.randn(B, S, h_kv, d_v, generator=gen).to(dtype)
    n_valid = torch.tensor([0, 37, S, S + 9])
    ref = ops.softmax_decode(q.double(), k.double(), v.double(), n_valid, mode="torch")
    k_dirty = k.clone()
    k_dirty[1, 37:] = float("nan")  # past row 1's length
    v_dirty = k_dirty[..., :d_v] if h_kv == 1 else v
    for splits, dvb in ((None, 1), (1, 1), (3, 1), (3, 2)):
        with tuned("decode", DVB=dvb):
            o = ks.softmax_decode(q, k_dirty, v_dirty, n_valid, n_splits=splits)
        assert o.shape == (B, H, d_v)
        assert rel_err(o, ref) < TOL[dtype]
        assert (o[0] == 0).all()


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_latent_causal_attention_matches_softmax_attention(dtype):
    """T queries, the last T of each row's n_valid positions, causal, over a latent cache (MQA,
    v = first D_v dims of k), vs ops.softmax_attention on the visible prefix of each row."""
    from attnlab.kernels import sparse as ks

    gen = torch.Generator().manual_seed(11)
    B, T, H, S_max, D, D_v = 2, 6, 4, 50, 24, 16
    q = torch.randn(B, T, H, D, generator=gen).to(dtype)
    k = torch.randn(B, S_max, 1, D, generator=gen).to(dtype)
    n_valid = torch.tensor([T + 3, 41])
    o = ks.latent_causal_attention(q, k, k[..., :D_v], n_valid)
    for b in range(B):
        n = int(n_valid[b])
        kb = k[b : b + 1, :n].double()
        ref = ops.softmax_attention(q[b : b + 1].double(), kb, kb[..., :D_v], causal=True)
        assert rel_err(o[b : b + 1], ref) < TOL[dtype]


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_paged_decode_matches_dense(dtype):
    from attnlab.kernels import sparse as ks

    gen = torch.Generator().manual_seed(5)
    B, H, D, D_v, P, n_pages = 3, 4, 40, 32, 16, 30
    pages = torch.randn(n_pages, P, 1, D, generator=gen).to(dtype)
    table = torch.randperm(n_pages, generator=gen)[: B * 9].view(B, 9).int()
    n_valid = torch.tensor([1, 77, 9 * P])
    q = torch.randn(B, H, D, generator=gen).to(dtype)
    dense = pages[table.long().view(-1)].view(B, 9 * P, 1, D)  # (B, S, 1, D) the same rows, unpaged
    ref = ops.softmax_decode(q.double(), dense.double(), dense[..., :D_v].double(), n_valid, mode="torch")
    for splits in (None, 4):
        o = ks.paged_decode(q, pages, pages[..., :D_v], table, n_valid, n_splits=splits)
        assert rel_err(o, ref) < TOL[dtype]


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,d", [(4, 16), (8, 40)])
def test_interp_index_scores_match_oracle(dtype, h, d):
    from attnlab.kernels import sparse as ks

    gen = torch.Generator().manual_seed(h * d)
    B, T, S = 2, 7, 300  # S spans several key chunks when S_CHUNK is small
    q = torch.randn(B, T, h, d, generator=gen).to(dtype)
    k = torch.randn(B, S, d, generator=gen).to(dtype)
    w = torch.randn(B, T, h, generator=gen)
    ref = ops.dsa_index_scores(q.double(), k.double(), w.double(), mode="torch")
    with tuned("index", S_CHUNK=128, BLOCK_S=64):  # several key chunks per row
        out = ks.dsa_index_scores(q, k, w)
        assert out.shape == (B, T, S) and out.dtype == torch.float32
        assert rel_err(out, ref) < 1e-5  # products of bf16 numbers are exact in float32
        causal = ks.dsa_index_scores(q, k, w, causal=True)
    hidden = torch.arange(S)[None, :] > torch.arange(S - T, S)[:, None]  # (T, S)
    assert (causal[:, hidden] == float("-inf")).all()
    assert rel_err(causal[:, ~hidden], ref[:, ~hidden]) < 1e-5


@interp
@pytest.mark.parametrize("key_rows", [True, False])
@pytest.mark.parametrize("h", [4, 64])
def test_interp_decode_index_scores_both_product_forms(key_rows, h, monkeypatch):
    """Decode rows (T = 1) with the product as keys x heads (INDEX_KEY_ROWS) or heads x keys: the
    oracle's scores, -inf at and past each row's length, over several key chunks."""
    from attnlab.kernels import sparse as ks

    monkeypatch.setattr(ks, "INDEX_KEY_ROWS", key_rows)
    gen = torch.Generator().manual_seed(h)
    B, S, D = 3, 500, 32
    q = torch.randn(B, 1, h, D, generator=gen).bfloat16()
    k = torch.randn(B, S, D, generator=gen).bfloat16()
    w = torch.randn(B, 1, h, generator=gen)
    n_valid = torch.tensor([500, 131, 0])
    ref = ops.dsa_index_scores(q.double(), k.double(), w.double(), mode="torch")
    with tuned("index_decode", S_CHUNK=128):
        out = ks.dsa_index_scores(q, k, w, n_valid=n_valid)
    past = torch.arange(S)[None, None, :] >= n_valid[:, None, None]
    assert bool((out[past] == float("-inf")).all())
    assert rel_err(out[~past], ref[~past]) < 1e-5


def _spy_grids(monkeypatch, module, name: str) -> list:
    """Replace the Triton kernel ``module.<name>`` by one that records each launch's grid, then
    launches; returns the list of grids."""
    grids, original = [], getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return original[grid]

    monkeypatch.setattr(module, name, Spy())
    return grids


@interp
@pytest.mark.parametrize("S, min_chunk, programs",
                         [(600, 256, 3), (600, 0, 5), (2000, 256, 8), (100, 256, 2)])
def test_interp_decode_index_scores_chunking(S, min_chunk, programs, monkeypatch):
    """A decode row's key chunks (the interpreter's 4 "SMs"): INDEX_DECODE_PROGRAMS_PER_SM (2) programs
    per SM, unless that leaves chunks under INDEX_DECODE_MIN_CHUNK keys: then down to one program per SM
    with chunks of at most that many (600 keys: 3 chunks of 256 instead of 5 of 128; 2000 keys: 8 of
    256 either way; 100 keys: 2 of 64, BLOCK_S); the scores the same either way."""
    from attnlab.kernels import sparse as ks

    grids = _spy_grids(monkeypatch, ks, "_index_scores_kernel")
    monkeypatch.setattr(ks, "INDEX_DECODE_MIN_CHUNK", min_chunk)
    gen = torch.Generator().manual_seed(S)
    q = torch.randn(1, 1, 4, 16, generator=gen).bfloat16()
    k = torch.randn(1, S, 16, generator=gen).bfloat16()
    w = torch.randn(1, 1, 4, generator=gen)
    out = ks.dsa_index_scores(q, k, w, n_valid=torch.tensor([S - 7]))
    assert grids == [(programs,)]
    ref = ops.dsa_index_scores(q.double(), k.double(), w.double(), mode="torch")
    assert bool((out[..., S - 7 :] == float("-inf")).all())
    assert rel_err(out[..., : S - 7], ref[..., : S - 7]) < 1e-5


def _decode_selection(ks, monkeypatch, path: str, seed: int):
    """A decode selection's inputs under the interpreter: dsa_topk routed to ``path`` (_topk_path) with
    64-score steps, and (q [2, 1, 4, 16], k [2, 900, 16] bf16, w [2, 1, 4]) drawn from ``seed``."""
    monkeypatch.setattr(ks, "TOPK_BLOCK", 64)
    monkeypatch.setattr(ks, "TOPK_FUSED_BLOCK", 64)
    _topk_path(ks, monkeypatch, path)
    gen = torch.Generator().manual_seed(seed)
    B, S, H, D = 2, 900, 4, 16
    return (torch.randn(B, 1, H, D, generator=gen).bfloat16(), torch.randn(B, S, D, generator=gen).bfloat16(),
            torch.randn(B, 1, H, generator=gen))


@interp
@pytest.mark.parametrize("path", ["fused", "multi", "multi_loop"])
def test_interp_index_scores_zero_the_topk_scratch(path, monkeypatch):
    """A decode step's selection without a fill launch: dsa_index_scores(..., zero=scratch) zeroes the
    buffer (garbage before; more elements than its programs' blocks) and gives the same scores, and
    dsa_topk(..., scratch=scratch) on them gives the oracle's set (fused and multi-program paths, the
    first pass reading the scores after its wait); the scratch size follows the path; a scratch of
    the wrong dtype, shape or size is refused."""
    from attnlab.kernels import sparse as ks

    q, k, w = _decode_selection(ks, monkeypatch, path, 31)
    B, S = q.shape[0], k.shape[1]
    lengths = torch.tensor([900, 610])
    n = ks.topk_scratch_numel(B, 1, S, 100, q.device)
    # multi-program: the histograms and the passes' carried states
    assert n == (B * (4 * 256 + 2 + 65536) if path == "fused" else B * (4 * 256 + 20))
    with monkeypatch.context() as m:  # fused rows past the candidate path keep their own fill
        m.setattr(ks, "TOPK_CANDIDATES_MAX_S", 100)
        assert ks.topk_scratch_numel(B, 1, S, 100, q.device) == (0 if path == "fused" else n)
        m.setattr(ks, "TOPK_SCRATCH_LONG_FUSED", True)
        assert ks.topk_scratch_numel(B, 1, S, 100, q.device) == (B * (4 * 256 + 2) if path == "fused" else n)
    scratch = torch.full((n + 5,), 7, dtype=torch.int32)
    with tuned("index_decode", S_CHUNK=128):
        plain = ks.dsa_index_scores(q, k, w, n_valid=lengths)
        scores = ks.dsa_index_scores(q, k, w, n_valid=lengths, zero=scratch)
    assert bool((scratch == 0).all())
    assert torch.equal(scores, plain)
    for topk in (100, 700):
        want = ops.dsa_topk(scores, topk, causal=False, mode="torch")
        if topk != 100:
            scratch = torch.zeros(ks.topk_scratch_numel(B, 1, S, topk, q.device), dtype=torch.int32)
        got = ks.dsa_topk(scores, topk, causal=False, sort=False, scratch=scratch)
        _assert_same_set_in_position_order(got, want)
    with pytest.raises(ValueError, match="scratch: 3 int32 elements"):
        ks.dsa_topk(scores, 100, causal=False, sort=False, scratch=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="scratch: expected a contiguous 1-D int32"):
        ks.dsa_topk(scores, 100, causal=False, sort=False, scratch=torch.zeros(n, dtype=torch.int64))
    with pytest.raises(ValueError, match="zero: expected a contiguous 1-D int32"):
        ks.dsa_index_scores(q, k, w, zero=torch.zeros(2, n, dtype=torch.int32))


def _key_histograms(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's level-0 histogram (int32 [R, 256] of key >> 24) and 16-bit histogram (int32 [R, 65536]
    of key >> 16, keys in level 0's bin 0 left out) of float32 scores [B, 1, S], in torch."""
    bits = scores.reshape(scores.shape[0] * scores.shape[1], -1).view(torch.int32)
    keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # (R, S)
    level0 = torch.stack([torch.bincount((row >> 24) + 128, minlength=256) for row in keys])
    fine = torch.stack([torch.bincount(((row >> 16) + 32768)[(row >> 24) > -128], minlength=65536)
                        for row in keys])
    return level0.int(), fine.int()


@interp
@pytest.mark.parametrize("path", ["fused", "fused_loop", "multi", "multi_loop"])
def test_interp_index_scores_prefill_the_topk(path, monkeypatch):
    """dsa_index_scores(..., topk_scratch=, topk=) writes the same scores and adds the top-k's level-0
    histogram (and on the fused path's candidate shortcut the 16-bit one) of them into the zeroed
    scratch, exactly as torch counts them (positions past a row's length as -inf); dsa_topk(...,
    prefilled=True) then starts past that pass and gives the oracle's set, also for a row with fewer
    finite scores than k (the k-th key in level 0's bin 0, where the 16-bit histogram has nothing);
    bad combinations are refused by name."""
    from attnlab.kernels import sparse as ks

    q, k, w = _decode_selection(ks, monkeypatch, path, 37)
    (B, _, H, D), S = q.shape, k.shape[1]
    fused = path.startswith("fused")
    multi_hist = _spy_grids(monkeypatch, ks, "_topk_hist")
    for lengths, topk in (([900, 610], 100), ([900, 610], 700), ([50, 899], 100)):
        lengths = torch.tensor(lengths)
        n = ks.topk_scratch_numel(B, 1, S, topk, q.device)
        scratch = torch.zeros(n, dtype=torch.int32)
        with tuned("index_decode", S_CHUNK=128):  # several programs a row add into the histograms
            scores = ks.dsa_index_scores(q, k, w, n_valid=lengths, topk_scratch=scratch, topk=topk)
            plain = ks.dsa_index_scores(q, k, w, n_valid=lengths)
        assert torch.equal(scores, plain)
        level0, fine = _key_histograms(scores)
        hist = scratch[: B * 1024].view(B, 4, 256)
        assert torch.equal(hist[:, 0], level0)
        assert not hist[:, 1:].any()
        if fused:  # the counters, then the 16-bit histograms (the candidate path: <= 8 rows, short rows)
            assert not scratch[B * 1024 : B * 1026].any()
            assert torch.equal(scratch[B * 1026 :].view(B, 65536), fine)
        else:  # the passes' carried states untouched
            assert not scratch[B * 1024 :].any()
        del multi_hist[:]
        got = ks.dsa_topk(scores, topk, causal=False, sort=False, scratch=scratch, prefilled=True)
        _assert_same_set_in_position_order(got, ops.dsa_topk(scores, topk, causal=False, mode="torch"))
        assert len(multi_hist) == (0 if fused else 3)  # levels 1-3: level 0 came with the scores
    zeros = torch.zeros(n, dtype=torch.int32)
    with pytest.raises(ValueError, match="topk_scratch, topk: give both"):
        ks.dsa_index_scores(q, k, w, topk_scratch=zeros)
    with pytest.raises(ValueError, match="zero: not with topk_scratch"):
        ks.dsa_index_scores(q, k, w, zero=zeros, topk_scratch=zeros, topk=100)
    with pytest.raises(ValueError, match="topk_scratch: decode rows only"):
        ks.dsa_index_scores(q.expand(B, 2, H, D), k, w.expand(B, 2, H), topk_scratch=zeros, topk=100)
    with pytest.raises(ValueError, match="topk_scratch: 3 int32 elements"):
        ks.dsa_index_scores(q, k, w, topk_scratch=zeros[:3], topk=100)
    with pytest.raises(ValueError, match="topk: expected an int >= 1"):
        ks.dsa_index_scores(q, k, w, topk_scratch=zeros, topk=0)
    with pytest.raises(ValueError, match="prefilled: needs the scratch"):
        ks.dsa_topk(scores, 100, causal=False, sort=False, prefilled=True)
    with pytest.raises(ValueError, match="prefilled: decode rows with causal=False"):
        ks.dsa_topk(scores, 100, causal=True, sort=False, scratch=zeros, prefilled=True)
    monkeypatch.setattr(ks, "TOPK_ONE_PROGRAM_MAX", 1 << 20)  # a path without scratch
    with pytest.raises(ValueError, match="takes no scratch"):
        ks.dsa_index_scores(q, k, w, topk_scratch=zeros, topk=100)


@interp
def test_interp_index_scores_causal_prefill_many_chunks():
    """T = S (prefill from position 0) over several key chunks: early query blocks see none of the
    later chunks, whose programs must write -inf only inside their own chunk."""
    from attnlab.kernels import sparse as ks

    gen = torch.Generator().manual_seed(13)
    B, T, H, D = 1, 200, 4, 16
    q, k = torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, D, generator=gen)
    w = torch.rand(B, T, H, generator=gen)
    ref = ops.dsa_index_scores(q.double(), k.double(), w.double(), mode="torch")
    with tuned("index", S_CHUNK=64, BLOCK_S=32):
        got = ks.dsa_index_scores(q, k, w, causal=True)
    hidden = torch.ones(T, T, dtype=torch.bool).triu(1)  # (T, S) keys after the query
    assert (got[:, hidden] == float("-inf")).all()
    assert rel_err(got[:, ~hidden], ref[:, ~hidden]) < 1e-5


@interp
def test_interp_index_scores_row_lengths():
    """n_valid: keys at or past a row's length score -inf (never read: NaN keys there stay out),
    the rest equal the unmasked scores; decode (T = 1) and a prefill block, several key chunks."""
    from attnlab.kernels import sparse as ks

    gen = torch.Generator().manual_seed(21)
    for T in (1, 3):
        B, S, H, D = 3, 150, 4, 16
        q, k = torch.randn(B, T, H, D, generator=gen), torch.randn(B, S, D, generator=gen)
        w = torch.rand(B, T, H, generator=gen)
        n_valid = torch.tensor([150, 37, 0])
        k_poisoned = k.clone()
        for b, n in enumerate(n_valid.tolist()):
            k_poisoned[b, n:] = float("nan")
        ref = ops.dsa_index_scores(q.double(), k.double(), w.double(), mode="torch")  # (B, T, S)
        with tuned("index", S_CHUNK=64, BLOCK_S=32), tuned("index_decode", S_CHUNK=64, BLOCK_S=32):
            got = ks.dsa_index_scores(q, k_poisoned, w, n_valid=n_valid)
        past = torch.arange(S)[None, :] >= n_valid[:, None]  # (B, S)
        assert (got.transpose(1, 2)[past] == float("-inf")).all()
        assert rel_err(got.transpose(1, 2)[~past], ref.transpose(1, 2)[~past]) < 1e-5
        torch_path = ops.dsa_index_scores(q, k_poisoned, w, mode="torch", n_valid=n_valid)
        assert (torch_path.transpose(1, 2)[past] == float("-inf")).all()
        assert rel_err(torch_path.transpose(1, 2)[~past], ref.transpose(1, 2)[~past]) < 1e-5


@interp
def test_interp_index_scores_fp8():
    """FP8 e4m3 operands with per-row scales: a few percent from the exact scores (3 mantissa bits)."""
    from attnlab.kernels import sparse as ks

    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(2, 5, 4, 32, generator=gen), torch.randn(2, 60, 32, generator=gen)
    w = torch.rand(2, 5, 4, generator=gen)
    k8, k_scale = ks.quantize_fp8_rows(k)
    out = ks.dsa_index_scores(q, k8, w, k_scale=k_scale)
    err = rel_err(out, ops.dsa_index_scores(q.double(), k.double(), w.double(), mode="torch"))
    assert 1e-4 < err < 0.08  # quantised (not silently exact), but close


@interp
def test_interp_index_ties_give_the_oracle_topk():
    """Integer-valued q, k, w make every score exact and produce many ties; the kernel's scores,
    through dsa_topk, must select exactly the oracle's positions (earlier position wins a tie)."""
    from attnlab.kernels import sparse as ks

    gen = torch.Generator().manual_seed(9)
    B, T, S, H, D = 2, 12, 14, 4, 16  # query 0 sits at position 2: 3 visible, 5 empty slots
    q = torch.randint(-1, 2, (B, T, H, D), generator=gen).float()
    k = torch.randint(-1, 2, (B, S, D), generator=gen).float()
    w = torch.randint(0, 3, (B, T, H), generator=gen).float()
    scores = ks.dsa_index_scores(q, k, w)
    ref = ops.dsa_index_scores(q, k, w, mode="torch")
    assert torch.equal(scores, ref)
    got, want = ops.dsa_topk(scores, 8), ops.dsa_topk(ref, 8)
    assert torch.equal(got, want) and (want == -1).any()  # early queries see fewer than 8 positions
    o = ops.sparse_attention(q, k[:, :, None], k[:, :, None], got, mode="triton")
    assert rel_err(o, oracle_sparse(q, k[:, :, None], k[:, :, None], want)) < 1e-5


@interp
@pytest.mark.parametrize("v_prefix,h_kv,d,d_v", [(True, 1, 24, 16), (False, 2, 24, 20), (True, 1, 160, 128)])
def test_interp_sparse_gradients_match_torch(v_prefix, h_kv, d, d_v):
    """dq, dk, dv of the Triton backward (atomics on the selected rows) vs autograd through the
    float64 torch path; with v a view of k (MLA) both gradients land on the one latent tensor."""
    from attnlab.kernels import sparse as ks

    q, k, v, idx = make_sparse(2, 6, 4 * h_kv, 40, 8, d, d_v, h_kv, v_prefix, seed=d)
    if v_prefix:
        idx[1, 2, :2] = idx[1, 3, :2]  # rows shared between queries: the atomics must add up
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    if not v_prefix:
        leaves.append(v.clone().requires_grad_())
    do = torch.randn(2, 6, 4 * h_kv, d_v)

    def run(fn, cast):
        xs = [x.detach().to(cast).requires_grad_() for x in leaves]
        vv = xs[1][..., :d_v] if v_prefix else xs[2]
        o = fn(xs[0], xs[1], vv)
        o.backward(do.to(cast))
        return o, [x.grad for x in xs]

    o, grads = run(lambda a, b, c: ks.sparse_attention(a, b, c, idx), torch.float32)
    ro, rgrads = run(lambda a, b, c: ops.sparse_attention(a, b, c, idx, mode="torch"), torch.float64)
    assert rel_err(o, ro) < 1e-5
    for g, rg in zip(grads, rgrads, strict=True):
        assert rel_err(g, rg) < 1e-5


@interp
def test_interp_sparse_gradient_with_detached_values():
    """v shares k's storage but carries no gradient: k's gradient must then hold only the key part
    (the kernel must not fold the value gradient into it)."""
    from attnlab.kernels import sparse as ks

    q, k, _, idx = make_sparse(1, 4, 4, 30, 6, 24, 16, seed=12)
    do = torch.randn(1, 4, 4, 16)
    grads = []
    for fn, cast in ((ks.sparse_attention, torch.float32),
                     (lambda *a: ops.sparse_attention(*a, mode="torch"), torch.float64)):
        kk = k.detach().to(cast).requires_grad_()
        fn(q.to(cast), kk, kk.detach()[..., :16], idx).backward(do.to(cast))
        grads.append(kk.grad)
    assert rel_err(grads[0], grads[1]) < 1e-5


def _tie_scores(B, T, S, seed):
    """Scores on a 0.5 grid (many ties), -0.0 next to 0.0, a run of -inf, a constant row, and a
    row whose k-th value is shared by many positions on both sides of the cut."""
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(B, T, S, generator=gen) * 2).round() / 2
    scores[0, 0, S // 3:] = float("-inf")
    scores[-1, -1, ::3] = -0.0
    if T > 1:
        scores[0, 1] = 1.5  # one value everywhere: the tie rule alone decides
    if B > 1:
        scores[1, 0] = torch.where(torch.arange(S) % 7 == 0, 3.0, 1.0)  # k-th value tied many times
    return scores


def _topk_path(ks, monkeypatch, path: str) -> None:
    """Route ks.dsa_topk to one of its paths: "one_program" (_topk_row), "fused" (_topk_fused, one
    launch; one chunk per row under the interpreter), "multi" (the _topk_hist ... passes), each with its
    chunks in registers, or "fused_loop" / "multi_loop" (the same, every pass reading the scores)."""
    monkeypatch.setattr(ks, "TOPK_ONE_PROGRAM_MAX", 1 << 20 if path == "one_program" else 0)
    monkeypatch.setattr(ks, "TOPK_ONE_PROGRAM_MIN_ROWS_PER_SM", 0)
    monkeypatch.setattr(ks, "TOPK_FUSED_MAX", 1 << 20 if path.startswith("fused") else 0)
    if path.endswith("_loop"):
        monkeypatch.setattr(ks, "TOPK_REG_CHUNK_MAX", 0)
        monkeypatch.setattr(ks, "TOPK_FUSED_REG_CHUNK_MAX", 0)


@interp
@pytest.mark.parametrize("causal,path", [(True, "multi"), (False, "multi"), (True, "multi_loop"),
                                         (False, "multi_loop"), (False, "one_program"), (True, "fused_loop"),
                                         (True, "fused"), (False, "fused")])
def test_interp_triton_topk_equals_oracle(causal, path, monkeypatch):
    """The radix-select top-k (many chunks per row: small blocks; or the one-program or the fused
    path) equals ops.dsa_topk exactly: ties at the k-th value go to the earlier positions, -inf and
    causally hidden positions are -1, k above the visible count and above S; the op's
    mode="triton" dispatches to it."""
    from attnlab.kernels import sparse as ks

    monkeypatch.setattr(ks, "TOPK_BLOCK", 32)
    monkeypatch.setattr(ks, "TOPK_FUSED_BLOCK", 32)
    _topk_path(ks, monkeypatch, path)
    scores = _tie_scores(2, 2, 300, seed=1)
    for topk in (1, 40, 350):
        want = ops.dsa_topk(scores, topk, causal=causal, mode="torch")
        assert torch.equal(ks.dsa_topk(scores, topk, causal=causal), want), topk
        assert (want == -1).any() == (topk > 100)  # row (0, 0) has 100 finite scores
    assert torch.equal(ops.dsa_topk(scores, 40, causal=causal, mode="triton"),
                       ops.dsa_topk(scores, 40, causal=causal, mode="torch"))


@interp
@pytest.mark.parametrize("path", ["one_program", "multi", "multi_loop", "fused", "fused_loop"])
def test_interp_triton_topk_decode_row_long(path, monkeypatch):
    """One decode row (B = 1, T = 1) split over many programs (or one), scores from integer data so
    the k-th value is tied across chunk boundaries, float64 and bfloat16 inputs compared at float32."""
    from attnlab.kernels import sparse as ks

    monkeypatch.setattr(ks, "TOPK_BLOCK", 64)
    monkeypatch.setattr(ks, "TOPK_FUSED_BLOCK", 64)
    _topk_path(ks, monkeypatch, path)
    gen = torch.Generator().manual_seed(2)
    scores = torch.randint(-3, 4, (1, 1, 2000), generator=gen).float()
    scores[0, 0, 1900:] = float("-inf")  # past the row's length
    want = ops.dsa_topk(scores, 300, causal=True, mode="torch")
    assert torch.equal(ks.dsa_topk(scores.double(), 300), want)
    bf = (scores / 3).bfloat16()
    assert torch.equal(ks.dsa_topk(bf, 64), ops.dsa_topk(bf, 64, mode="torch"))


@interp
@pytest.mark.parametrize("carry", [True, False])
@pytest.mark.parametrize("path", ["multi", "multi_loop"])
def test_interp_topk_passes_carry_their_state(carry, path, monkeypatch):
    """The multi-program passes with each one descending only the level before it from the state the
    pass before stored (TOPK_PASSES_CARRY), or every level again: the oracle either way (sorted
    exactly, unsorted the same set in position order), ties at the cut across chunks, -inf tails,
    causal rows, k > S; the scratch size follows."""
    from attnlab.kernels import sparse as ks

    monkeypatch.setattr(ks, "TOPK_BLOCK", 32)
    monkeypatch.setattr(ks, "TOPK_PASSES_CARRY", carry)
    _topk_path(ks, monkeypatch, path)
    assert ks.topk_scratch_numel(2, 1, 700, 100, torch.device("cpu")) == 2 * (4 * 256 + (20 if carry else 0))
    gen = torch.Generator().manual_seed(29)
    scores = torch.randn(2, 1, 700, generator=gen)
    scores[1, 0, 500:] = float("-inf")
    cases = ((_threshold_ties(scores, 100, copies=6, seed=6), False), (_tie_scores(2, 2, 300, seed=8), True))
    for sc, causal in cases:
        for topk in (100, 650, 800):
            want = ops.dsa_topk(sc, topk, causal=causal, mode="torch")
            assert torch.equal(ks.dsa_topk(sc, topk, causal=causal), want), topk
            _assert_same_set_in_position_order(ks.dsa_topk(sc, topk, causal=causal, sort=False), want)


@interp
@pytest.mark.parametrize("path,match_max", [("multi", 1 << 30), ("multi", 0), ("multi", 40),
                                            ("multi_loop", 1 << 30), ("fused", 1 << 30), ("fused", 40),
                                            ("fused_loop", 1 << 30)])
def test_interp_topk_match_atomics(path, match_max, monkeypatch):
    """Histogram levels 1-3 counted with one atomic per matching key (TOPK_MATCH_ATOMICS_MAX: always,
    never, or by the row's count) equal the oracle on the multi-program and fused paths: sorted
    exactly, unsorted the same set in position order; ties at the cut across chunks, -inf tails,
    k > S."""
    from attnlab.kernels import sparse as ks

    monkeypatch.setattr(ks, "TOPK_BLOCK", 32)
    monkeypatch.setattr(ks, "TOPK_FUSED_BLOCK", 32)
    monkeypatch.setattr(ks, "TOPK_CANDIDATES_MAX", 0)  # the fused path's levels 1-3 run
    monkeypatch.setattr(ks, "TOPK_MATCH_ATOMICS_MAX", match_max)
    _topk_path(ks, monkeypatch, path)
    gen = torch.Generator().manual_seed(21)
    scores = torch.randn(2, 1, 700, generator=gen)
    scores[1, 0, 500:] = float("-inf")
    tied = _threshold_ties(scores, 100, copies=6, seed=4)
    for sc in (tied, _tie_scores(2, 2, 300, seed=9)):
        for topk in (100, 900):
            want = ops.dsa_topk(sc, topk, causal=False, mode="torch")
            assert torch.equal(ks.dsa_topk(sc, topk, causal=False), want), topk
            _assert_same_set_in_position_order(ks.dsa_topk(sc, topk, causal=False, sort=False), want)


@interp
def test_interp_topk_one_program_edge_cases(monkeypatch):
    """The one-launch top-k (_topk_row) alone (the multi-program kernels would raise): negative
    scores, -0.0 next to +0.0, all--inf rows, k > S (tail of -1), k_eff not a power of two (sort
    padding), S = 1, T > 1 causal and not, a strided bf16 input, equal to the oracle exactly; and
    the limit: a row one longer than TOPK_ONE_PROGRAM_MAX takes the multi-program path."""
    from attnlab.kernels import sparse as ks

    def refuse(*args, **kwargs):
        raise AssertionError("the multi-program top-k ran")

    monkeypatch.setattr(ks, "TOPK_BLOCK", 32)
    monkeypatch.setattr(ks, "TOPK_ONE_PROGRAM_MAX", 100)
    monkeypatch.setattr(ks, "TOPK_ONE_PROGRAM_MIN_ROWS_PER_SM", 0)
    monkeypatch.setattr(ks, "TOPK_FUSED_MAX", 0)
    gen = torch.Generator().manual_seed(11)
    neg = -(torch.randint(0, 6, (2, 3, 100), generator=gen).float() / 2) - 0.25  # all negative, tied
    zeros = torch.zeros(2, 3, 100)
    zeros[..., 1::2] = -0.0  # -0.0 ties with +0.0: the earlier position wins
    zeros[..., ::5] = -1e-30
    inf_row = neg.clone()
    inf_row[1, 2] = float("-inf")
    one = torch.randn(2, 1, 1, generator=gen)
    wide = torch.randn(2, 3, 200, generator=gen).bfloat16()[..., ::2]  # strided, S = 100
    cases = [(neg, (1, 33, 130), (True, False)), (zeros, (50,), (True,)), (inf_row, (99,), (False,)),
             (one, (4,), (True,)), (wide, (17,), (True,))]
    with monkeypatch.context() as m:
        m.setattr(ks, "_topk_hist", refuse)
        m.setattr(ks, "_topk_rank", refuse)
        for scores, ks_, causals in cases:
            for topk in ks_:
                for causal in causals:
                    want = ops.dsa_topk(scores, topk, causal=causal, mode="torch")
                    got = ks.dsa_topk(scores, topk, causal=causal)
                    assert torch.equal(got, want), (scores.shape, topk, causal)
    long = torch.randint(-2, 3, (1, 1, 101), generator=gen).float()
    calls = _spy_grids(monkeypatch, ks, "_topk_rank")
    assert torch.equal(ks.dsa_topk(long, 9), ops.dsa_topk(long, 9, mode="torch")) and calls


def _assert_same_set_in_position_order(got: torch.Tensor, want: torch.Tensor) -> None:
    """got (unsorted top-k) holds want's positions (sorted top-k) per row, in ascending position
    order, with -1 exactly where want has -1 (here: only after the taken finite scores)."""
    assert got.shape == want.shape
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    for row in got.reshape(-1, got.shape[-1]):
        pos = row[row >= 0]
        assert bool((pos[1:] > pos[:-1]).all()), row


@interp
@pytest.mark.parametrize("path", ["one_program", "multi", "multi_loop", "fused", "fused_loop"])
def test_interp_topk_unsorted_same_set_in_position_order(path, monkeypatch):
    """sort=False (a decode step's top-k): the oracle's positions, ties to the earlier position,
    -inf and causally hidden positions -1, k above the visible count and above S, in position order,
    on both paths (no _topk_rank launch); the op passes sort through."""
    from attnlab.kernels import sparse as ks

    def refuse(*args, **kwargs):
        raise AssertionError("the rank pass ran")

    monkeypatch.setattr(ks, "TOPK_BLOCK", 32)
    monkeypatch.setattr(ks, "TOPK_FUSED_BLOCK", 32)
    _topk_path(ks, monkeypatch, path)
    monkeypatch.setattr(ks, "_topk_rank", refuse)
    scores = _tie_scores(2, 2, 300, seed=5)
    for topk in (40, 350):  # k below the visible count (ties at the cut), and above S
        for causal in (True, False):
            want = ops.dsa_topk(scores, topk, causal=causal, mode="torch")
            _assert_same_set_in_position_order(ks.dsa_topk(scores, topk, causal=causal, sort=False), want)
    _assert_same_set_in_position_order(ops.dsa_topk(scores, 40, mode="triton", sort=False),
                                       ops.dsa_topk(scores, 40, mode="torch"))


def _threshold_ties(scores: torch.Tensor, topk: int, copies: int, seed: int) -> torch.Tensor:
    """scores (distinct values) with the k-th largest value of each row copied to ``copies`` more
    positions spread over the row: ties at the cut, among few keys that share its top bits."""
    gen = torch.Generator(device=scores.device).manual_seed(seed)
    kth = scores.topk(topk, dim=-1).values[..., -1:]  # (B, T, 1)
    pos = torch.randint(0, scores.shape[-1], (*scores.shape[:-1], copies), device=scores.device,
                        generator=gen)
    return scores.scatter(-1, pos, kth.expand(*scores.shape[:-1], copies))


@interp
@pytest.mark.parametrize("reg", [True, False])
def test_interp_topk_fused_candidate_path(reg, monkeypatch):
    """The fused top-k's two-barrier candidate path (the keys sharing the k-th key's top 16 bits
    ranked in the program) equals the oracle sorted and unsorted, with ties at the cut, the chunks in
    registers or read by every pass; it is taken for distinct scores and left (the row's candidate
    count 0) for scores with more than TOPK_CANDIDATES_MAX candidates, a row whose k-th score is
    -inf, and TOPK_CANDIDATES_MAX = 0."""
    from attnlab.kernels import sparse as ks

    if not reg:
        monkeypatch.setattr(ks, "TOPK_FUSED_REG_CHUNK_MAX", 0)

    monkeypatch.setattr(ks, "TOPK_FUSED_BLOCK", 64)
    gen = torch.Generator().manual_seed(12)

    def run(scores, topk, causal=False):
        B, T, S = scores.shape
        rows, want = scores.reshape(B * T, S), ops.dsa_topk(scores, topk, causal=causal, mode="torch")
        got = torch.empty(B * T, topk, dtype=torch.int64)
        n_cand = ks._topk_fused_launch(rows, got, S, T, min(topk, S), topk, causal, True)
        assert torch.equal(got.view_as(want), want)
        unsorted = torch.empty(B * T, topk, dtype=torch.int64)
        n_unsorted = ks._topk_fused_launch(rows, unsorted, S, T, min(topk, S), topk, causal, False)
        assert torch.equal(n_unsorted, n_cand)
        _assert_same_set_in_position_order(unsorted.view_as(want), want)
        return n_cand

    distinct = torch.randn(2, 1, 700, generator=gen)
    distinct[1, 0, 600:] = float("-inf")  # past the row's length
    for topk in (1, 100, 350):
        assert bool((run(distinct, topk) > 0).all()), topk
    tied = _threshold_ties(distinct, 100, copies=5, seed=3)
    assert bool((run(tied, 100) >= 6).all())  # the k-th value and its 5 copies are all candidates
    assert bool((run(torch.randn(1, 3, 400, generator=gen), 30, causal=True) > 0).all())
    quarters = (torch.randn(1, 1, 2000, generator=gen) * 4).round() / 4  # ~200 keys per value
    monkeypatch.setattr(ks, "TOPK_CANDIDATES_MAX", 64)
    assert run(quarters, 500).tolist() == [0]
    n_cand = run(distinct, 650)  # row 1 has 600 finite scores: its 650th is -inf
    assert n_cand[0] > 0 and n_cand[1] == 0
    monkeypatch.setattr(ks, "TOPK_CANDIDATES_MAX", 0)
    assert run(distinct, 100).tolist() == [0, 0]


@needs_sm90_toolchain
@pytest.mark.parametrize("key_rows", [True, False])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("pre", [0, 2])
def test_decode_index_scores_compile_for_sm90(key_rows, fp8, pre):
    """The decode index-scores kernel at the ~1B D layer's indexer (64 heads x 128, 64-key steps, 4
    warps, 4 stages), either product form, bf16 or FP8 keys, zeroing the top-k's scratch or adding
    its first histograms (PRE): builds for sm_90 without spills, its products on the warpgroup
    tensor cores."""
    from attnlab.kernels.sparse import TUNING
    from attnlab.kernels.sparse import _index_scores_kernel as fn

    cfg = TUNING["index_decode"]
    dt = "*fp8e4nv" if fp8 else "*bf16"
    const = dict(D=128, BD=128, BH=64, BLOCK_T=1, BLOCK_S=cfg["BLOCK_S"], FP8=fp8, CAUSAL=False, HAS_NV=True,
                 PREC="tf32", INTERP=False, PDL=True, ZERO_BLOCK=0 if pre else 1024, KEY_ROWS=key_rows,
                 PRE=pre)
    ptr = dict(Q=dt, K=dt, W="*fp32", KS="*fp32", NV="*i64", OUT="*fp32", ZERO="*i32", HIST="*i32",
               H16="*i32")
    kernel = compile_sm90(fn, const, ptr, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    regs, stack, res = sm90_usage(kernel)
    assert "LOCAL:0 " in res and stack == 0, res
    assert "wgmma" in kernel.asm["ptx"]


@needs_sm90_toolchain
@pytest.mark.parametrize("kernel,chunk", [("_topk_fused", 1024), ("_topk_fused", 128), ("_topk_hist", 2048),
                                          ("_topk_count", 8192), ("_topk_write", 2048),
                                          ("_topk_fused_pre", 128)])
def test_topk_register_chunks_compile_for_sm90(kernel, chunk):
    """The top-k kernels with their chunk in registers (the passes carrying their state) compile for an
    H100 (sm_90) without spills, and the chunk's score loads come before the PDL wait (a multi-program
    pass's load overlaps the pass before it)."""
    from attnlab.kernels import sparse as ks

    ptrs = {"SC": "*fp32", "HIST": "*i32", "CTR": "*i32", "CNT": "*i32", "H16": "*i32", "CAND": "*i64",
            "OUT": "*i64", "SEL": "*i64", "ST": "*i32"}
    pre = kernel.endswith("_pre")  # prefilled: the scores read after the wait
    kernel = kernel.removesuffix("_pre")
    fn = getattr(ks, kernel)
    const = dict(CAUSAL=False, BLOCK=min(chunk, 1024), CHUNK=chunk, PDL=True)
    if "CARRY" in fn.arg_names:  # the multi-program passes as launched (TOPK_PASSES_CARRY)
        const.update(CARRY=True)
    if kernel == "_topk_fused":
        const.update(BCH=256, POSITIONS=True, CAND_MAX=256 if chunk == 128 else 0, PRE=pre, EARLY=not pre)
    elif kernel == "_topk_hist":
        const.update(LEVEL=3, MATCH_MAX=4096)
    elif kernel == "_topk_write":
        const.update(BCH=1024, POSITIONS=True)
    compiled = compile_sm90(fn, const, {a: t for a, t in ptrs.items() if a in fn.arg_names},
                            num_warps=4 if chunk == 128 else 8)
    regs, stack, res = sm90_usage(compiled)
    assert "LOCAL:0 " in res and stack == 0, res
    ptx = compiled.asm["ptx"]
    if pre:  # the scores come from the launch just before: read only after the wait
        assert -1 < ptx.find("griddepcontrol.wait") < ptx.find("ld.global"), kernel
    else:
        assert -1 < ptx.find("ld.global") < ptx.find("griddepcontrol.wait"), kernel


@needs_sm90_toolchain
@pytest.mark.parametrize("kernel", ["_latent_attn_fwd", "_topk_hist"])
def test_prefetch_hints_compile_for_sm90(kernel):
    """The decode kernels that ask L2 for a later kernel's weights (the DSA row's sparse attention at
    its "sparse" shape, the top-k's first multi-program pass) build for sm_90 without spills and issue
    the bulk prefetches before their PDL wait."""
    from attnlab.kernels import sparse as ks

    fn = getattr(ks, kernel)
    if kernel == "_topk_hist":
        ptrs = {"SC": "*fp32", "HIST": "*i32", "ST": "*i32", "PF": "*bf16"}
        const = dict(LEVEL=0, CAUSAL=False, BLOCK=1024, CHUNK=1024, PDL=True, RELAXED=True, MATCH_MAX=4096,
                     EARLY=False, CARRY=True, PF_CHUNK=ks.PREFETCH_NEXT_CHUNK)
        compiled = compile_sm90(fn, const, ptrs, num_warps=8)
    else:
        cfg = ks.TUNING["sparse"]
        ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "IDX": "*i64", "NVALID": "*i64", "TABLE": "*i64",
                "O": "*bf16", "LSE": "*fp32", "OP": "*fp32", "LP": "*fp32", "PF_NEXT": "*bf16"}
        const = dict(GATHER=1, PAGE=1, DK1=512, BD1=512, DK2=64, BD2=64, D_V=512, BDV=512, NUM_DVB=1,
                     V_IS_K=True, BLOCK_H=16, BLOCK_N=cfg["BLOCK_N"], SPLIT_OUT=True, PREC="tf32",
                     ROW64=False, SHARE_QK=False, INTERP=False, PDL=True, PF_SLOTS=0,
                     PF_NEXT_CHUNK=ks.PREFETCH_NEXT_CHUNK)
        compiled = compile_sm90(fn, const, ptrs, floats=("sm_scale",), ints={"pf_next_bytes": "i64"},
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    regs, stack, res = sm90_usage(compiled)
    assert "LOCAL:0 " in res and stack == 0, res
    ptx = compiled.asm["ptx"]
    assert -1 < ptx.find("cp.async.bulk.prefetch.L2") < ptx.find("griddepcontrol.wait")


@interp
def test_interp_topk_decode_rows_take_the_fused_path(monkeypatch):
    """A decode row (few rows per SM) takes the one-launch fused path even when short enough for the
    one-program path, the multi-launch passes when the fused path is off or the row is longer than
    TOPK_FUSED_MAX; many rows keep the one-program path."""
    from attnlab.kernels import sparse as ks

    launched = []
    for name in ("_topk_row", "_topk_hist", "_topk_fused"):
        original = getattr(ks, name)

        class Spy:
            def __init__(self, name, original):
                self.name, self.original = name, original

            def __getitem__(self, grid):
                launched.append(self.name)
                return self.original[grid]

        monkeypatch.setattr(ks, name, Spy(name, original))
    scores = _tie_scores(1, 1, 200, seed=6)
    want = ops.dsa_topk(scores, 30, mode="torch")
    assert torch.equal(ks.dsa_topk(scores, 30), want)
    assert launched == ["_topk_fused"]
    for limit in (0, 199):
        launched.clear()
        monkeypatch.setattr(ks, "TOPK_FUSED_MAX", limit)
        assert torch.equal(ks.dsa_topk(scores, 30), want)
        assert "_topk_hist" in launched and "_topk_row" not in launched and "_topk_fused" not in launched
    launched.clear()
    many = _tie_scores(2, 4, 200, seed=7)  # 8 rows >= 0.5 per SM of the interpreter's 4
    assert torch.equal(ks.dsa_topk(many, 30), ops.dsa_topk(many, 30, mode="torch"))
    assert launched == ["_topk_row"]


@interp
def test_interp_topk_one_program_then_rank_launch(monkeypatch):
    """TOPK_ONE_PROGRAM_SORT = False: _topk_row leaves the k taken to _topk_rank (two launches);
    the same indices as the oracle (ties, -inf, k > the visible count and > S, causal and not)."""
    from attnlab.kernels import sparse as ks

    monkeypatch.setattr(ks, "TOPK_BLOCK", 32)
    monkeypatch.setattr(ks, "TOPK_ONE_PROGRAM_SORT", False)
    monkeypatch.setattr(ks, "TOPK_ONE_PROGRAM_MIN_ROWS_PER_SM", 0)
    monkeypatch.setattr(ks, "_topk_hist", None)  # the multi-program path must not run
    scores = _tie_scores(2, 2, 150, seed=4)
    for topk, causal in ((40, True), (60, False), (170, True)):
        want = ops.dsa_topk(scores, topk, causal=causal, mode="torch")
        assert torch.equal(ks.dsa_topk(scores, topk, causal=causal), want), (topk, causal)


@interp
@pytest.mark.parametrize("share", [True, False])
def test_interp_decode_64_heads_paged(share):
    """64 heads (one head block: the SHARE_QK path when share), latent-like v = k[..., :D_v], rows
    of length 0 / ragged / full, NaN past a row's length, split and not, dense and paged caches
    with pages aligned to the 16-slot block (one table read per block) and not (one per slot)."""
    from attnlab.kernels import sparse as ks

    gen = torch.Generator().manual_seed(21)
    B, H, S, D, D_v = 3, 64, 96, 24, 16
    q = torch.randn(B, H, D, generator=gen)
    k = torch.randn(B, S, 1, D, generator=gen)
    n_valid = torch.tensor([0, 37, S])
    ref = ops.softmax_decode(q.double(), k.double(), k[..., :D_v].double(), n_valid, mode="torch")
    k_dirty = k.clone()
    k_dirty[1, 37:] = float("nan")
    with tuned("decode", BLOCK_N=16, SHARE_QK=int(share)):
        for splits in (1, 3):
            o = ks.softmax_decode(q, k_dirty, k_dirty[..., :D_v], n_valid, n_splits=splits)
            assert rel_err(o, ref) < 1e-5 and (o[0] == 0).all()
        for page in (16, 8):
            n_pages = B * S // page
            perm = torch.randperm(n_pages, generator=gen)
            pages = torch.empty(n_pages, page, 1, D)
            pages[perm] = k_dirty.reshape(n_pages, page, 1, D)
            table = perm.view(B, S // page).int()
            o = ks.paged_decode(q, pages, pages[..., :D_v], table, n_valid, n_splits=2)
            assert rel_err(o, ref) < 1e-5


@interp
@pytest.mark.parametrize("per_sm, tile, one_load", [(2, 4096, True), (2, 4096, False), (2, 256, True),
                                                    (0, 4096, True)])
def test_interp_decode_many_splits_combine(monkeypatch, per_sm, tile, one_load):
    """30 splits, some of them empty for a short row, merged by the combine in each of its shapes:
    all 30 in one load (the default here), with the partials loaded beside the lse (ONE_LOAD) or after
    them, 16 at a time (a smaller COMBINE_TILE), and the earlier fixed shape (COMBINE_PROGRAMS_PER_SM 0)."""
    from attnlab.kernels import sparse as ks

    monkeypatch.setattr(ks, "COMBINE_ONE_LOAD", one_load)
    monkeypatch.setattr(ks, "COMBINE_PROGRAMS_PER_SM", per_sm)
    monkeypatch.setattr(ks, "COMBINE_TILE", tile)
    gen = torch.Generator().manual_seed(22)
    q, k = torch.randn(2, 4, 24, generator=gen), torch.randn(2, 480, 1, 24, generator=gen)
    n_valid = torch.tensor([100, 480])
    ref = ops.softmax_decode(q.double(), k.double(), k[..., :16].double(), n_valid, mode="torch")
    with tuned("decode", BLOCK_N=16):
        o = ks.softmax_decode(q, k, k[..., :16], n_valid, n_splits=30)
    assert rel_err(o, ref) < 1e-5


def test_combine_shape():
    """On 132 SMs: a batch-1 MLA row (16 heads x 512 value columns, 128 splits) is cut into 32-column
    programs (256) reading all its splits in one load; 512 rows keep 128 columns, 32 splits a load;
    COMBINE_PROGRAMS_PER_SM 0 gives the earlier fixed shape."""
    from attnlab.kernels import sparse as ks

    real = ks._num_sms
    ks._num_sms = lambda device: 132
    try:
        cuda = torch.device("cuda", 0)
        assert ks.combine_shape(16, 512, 128, cuda) == (32, 128)
        assert ks.combine_shape(512, 512, 40, cuda) == (128, 32)
        assert ks.combine_shape(1, 16, 3, cuda) == (16, 4)
        before = ks.COMBINE_PROGRAMS_PER_SM
        ks.COMBINE_PROGRAMS_PER_SM = 0
        try:
            assert ks.combine_shape(16, 512, 128, cuda) == (128, 16)
        finally:
            ks.COMBINE_PROGRAMS_PER_SM = before
    finally:
        ks._num_sms = real


@interp
def test_interp_lazy_rescale_with_growing_logits():
    """Logits whose row max grows block by block, slowly (below the 2^8 slack: the running max
    stays stale) and in jumps (past it: rescaled), in bf16 and float32, vs the float64 oracle."""
    from attnlab.kernels import sparse as ks

    gen = torch.Generator().manual_seed(5)
    B, H, S, D = 2, 8, 200, 32
    q = torch.randn(B, H, D, generator=gen)
    k = torch.randn(B, S, 1, D, generator=gen) * 0.3
    ramp = torch.linspace(0, 6, S)  # slow growth along the sequence
    ramp[150:] += 40.0  # a jump
    k = k + (ramp[:, None] * q.mean(1)[:, None, :] / q.mean(1).norm(dim=-1)[:, None, None] ** 2)[:, :, None]
    n_valid = torch.tensor([S, 120])
    for dtype in (torch.float32, torch.bfloat16):
        qq, kk = q.to(dtype), k.to(dtype)
        kd = kk.double()
        ref = ops.softmax_decode(qq.double(), kd, kd[..., :16], n_valid, scale=1.0, mode="torch")
        with tuned("decode", BLOCK_N=16):
            o = ks.softmax_decode(qq, kk, kk[..., :16], n_valid, scale=1.0, n_splits=2)
        assert rel_err(o, ref) < TOL[dtype]


@interp
def test_interp_sparse_64_heads_shared_qk():
    """Sparse attention with 64 heads (one head block, the SHARE_QK path), prefill and split decode."""
    with tuned("sparse", BLOCK_N=16):
        check_sparse(1, 3, 64, 40, 8, 24, 16, torch.float32, seed=6)
        check_sparse(2, 1, 64, 300, 100, 24, 16, torch.bfloat16, n_splits=3, seed=7)


@interp
def test_interp_int64_row_offsets(monkeypatch):
    """The int64 row-offset path (caches of > 2^31 elements), forced at a tiny size: dense, paged
    and gathered rows give the same outputs as the int32 path."""
    from attnlab.kernels import sparse as ks

    gen = torch.Generator().manual_seed(31)
    q, k = torch.randn(2, 4, 24, generator=gen), torch.randn(2, 64, 1, 24, generator=gen)
    n_valid = torch.tensor([50, 64])
    pages = k.reshape(8, 16, 1, 24)
    table = torch.arange(8).view(2, 4).int()
    qs, ks_, vs, idx = make_sparse(1, 2, 4, 40, 8, 24, 16, seed=3)

    def outputs():
        with tuned("decode", BLOCK_N=16):
            return (ks.softmax_decode(q, k, k[..., :16], n_valid, n_splits=2),
                    ks.paged_decode(q, pages, pages[..., :16], table, n_valid),
                    ks.sparse_attention(qs, ks_, vs, idx))

    want = outputs()
    monkeypatch.setattr(ks, "FORCE_ROW64", True)
    for got, ref in zip(outputs(), want, strict=True):
        assert torch.equal(got, ref)


def _layer(kind: str):
    """A tiny M or D layer (MLA latent 16 + RoPE 4, 3 heads; D: 2 index heads, top-6) with random weights."""
    from attnlab.config import ModelConfig
    from attnlab.layers.mla import build_dsa, build_mla

    cfg = ModelConfig(pattern=kind, d_model=32, n_layers=1, n_heads=3, q_lora_rank=12, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, index_n_heads=2,
                      index_head_dim=8, index_topk=6).validate()
    layer = (build_dsa if kind == "D" else build_mla)(cfg, 0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen) if p.dim() == 1
                    else torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return layer


@interp
@pytest.mark.parametrize("kind", ["M", "D"])
def test_interp_mla_and_dsa_layers_through_the_kernels(kind, monkeypatch):
    """The real M / D layers (prefill, then decode with rows of different lengths) with every
    sparse/MLA op routed to the kernels, as "auto" does on CUDA, against the torch path: the layers'
    views (latent cache slices, value = latent prefix) reach the kernels intact."""
    import attnlab.ops.softmax as softmax_ops
    import attnlab.ops.sparse as sparse_ops

    layer = _layer(kind)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 14, 32, generator=gen)

    def run():
        cache = layer.new_cache(2, 20)
        with torch.no_grad():
            full = layer(x[:, :9])  # no cache: training-style forward
            outs = [layer(x[:1, :9], cache.rows(0, 1)), layer(x[1:, :6], cache.rows(1, 2))]
            steps = [layer(x[:, t : t + 1], cache) for t in range(9, 13)]  # rows at lengths 9 and 6
        return [full, *outs, *steps]

    want = run()
    calls = []
    original = softmax_ops._sparse_kernel

    def to_kernels(mode, name, q, needs_grad=False):
        calls.append(name)
        return original("triton" if mode == "auto" else mode, name, q, needs_grad)

    original_topk = sparse_ops._topk_kernel

    def topk_to_kernel(mode, scores):
        calls.append("dsa_topk")
        return original_topk("triton" if mode == "auto" else mode, scores)

    monkeypatch.setattr(softmax_ops, "_sparse_kernel", to_kernels)
    monkeypatch.setattr(sparse_ops, "_sparse_kernel", to_kernels)
    monkeypatch.setattr(sparse_ops, "_topk_kernel", topk_to_kernel)
    got = run()
    expected = {"softmax_decode"} if kind == "M" else {"dsa_index_scores", "dsa_topk", "sparse_attention"}
    assert expected <= set(calls)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-5


# ---------------------------------------------------------------------------------------------
# GPU (device machine)


def _gpu_inputs_mla(b, t, h, s, topk, dtype=torch.bfloat16, seed=0):
    q, k, v, idx = make_sparse(b, t, h, s, topk, 576, 512, dtype=torch.float32, seed=seed)
    q, k = q.cuda().to(dtype), k.cuda().to(dtype)
    return q, k, k[..., :512], idx.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("t,h,topk", [(64, 128, 2048), (1, 128, 2048), (33, 16, 300), (1, 64, 64)])
def test_gpu_sparse_mla_matches_oracle(t, h, topk):
    from attnlab.kernels import sparse as ks

    q, k, v, idx = _gpu_inputs_mla(2, t, h, 4096, topk, seed=t)
    o = ks.sparse_attention(q, k, v, idx)
    ref = ops.sparse_attention(q.double(), k.double(), v.double(), idx, mode="torch")
    assert rel_err(o, ref) < 1e-2
    assert (o[(idx < 0).all(-1)] == 0).all()
    assert torch.equal(ops.sparse_attention(q, k, v, idx), o)  # "auto" on CUDA is the kernel


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sparse_small_and_gqa(dtype):
    check_sparse(2, 20, 16, 40, 8, 24, 16, dtype, device="cuda")
    check_sparse(2, 9, 8, 200, 64, 24, 20, dtype, h_kv=2, v_prefix=False, device="cuda")
    check_sparse(2, 1, 16, 3000, 2048, 576, 512, dtype, device="cuda")  # split decode


@pytest.mark.gpu
@pytest.mark.parametrize("b,s", [(4, 8192), (32, 1024), (1, 40000)])
def test_gpu_mla_decode_matches_oracle(b, s):
    from attnlab.kernels import sparse as ks

    q = torch.randn(b, 128, 576, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, s, 1, 576, device="cuda", dtype=torch.bfloat16)
    n_valid = torch.randint(0, s + 1, (b,), device="cuda")
    n_valid[0] = 0
    n_valid[-1] = s
    ref = ops.softmax_decode(q.double(), k.double(), k[..., :512].double(), n_valid, mode="torch")
    o = ks.softmax_decode(q, k, k[..., :512], n_valid)
    assert rel_err(o, ref) < 1e-2
    if b > 1:
        assert (o[0] == 0).all()
    assert torch.equal(ops.softmax_decode(q, k, k[..., :512], n_valid), o)  # "auto" with one kv head
    pages = k.view(b * s // 64, 64, 1, 576) if s % 64 == 0 else None
    if pages is not None:
        perm = torch.randperm(pages.shape[0], device="cuda")
        shuffled = torch.empty_like(pages)
        shuffled[perm] = pages  # page j of the dense layout now lives at perm[j]
        table = perm.view(b, s // 64).int()
        o_paged = ks.paged_decode(q, shuffled, shuffled[..., :512], table, n_valid)
        assert rel_err(o_paged, ref) < 1e-2


@pytest.mark.gpu
def test_gpu_prefetch_hints_change_nothing():
    """The L2 prefetch hints (a decode row's sparse attention and the first multi-program top-k pass
    asking for a weight a later kernel reads) leave the results bit for bit as they are without, and
    a tensor too small for the bytes asked (or of odd alignment) is clamped / skipped."""
    from attnlab.kernels import sparse as ks

    weight = torch.randn(10944, 2048, device="cuda", dtype=torch.bfloat16)  # the ~1B MLP's gate|up
    q, k, v, idx = _gpu_inputs_mla(1, 1, 16, 4096, 2048, seed=5)
    o = ks.sparse_attention(q, k, v, idx)
    for hint in (weight, weight[:3], weight.view(-1)[1:]):
        assert torch.equal(ks.sparse_attention(q, k, v, idx, prefetch=hint), o)
    scores = torch.randn(1, 1, 100_000, device="cuda")
    assert ks.PREFETCH_NEXT_MAX_ROWS < 100_000 <= ks.TOPK_PREFETCH_MAX_ROWS  # the top-k's pass asks
    want = ks.dsa_topk(scores, 2048, causal=False, sort=False)
    for hint in (weight, weight[:3]):
        assert torch.equal(ks.dsa_topk(scores, 2048, causal=False, sort=False, prefetch=hint), want)


@pytest.mark.gpu
@pytest.mark.parametrize("t,s", [(1, 100000), (300, 4096)])
def test_gpu_index_scores(t, s):
    from attnlab.kernels import sparse as ks

    q = torch.randn(2, t, 64, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, s, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2, t, 64, device="cuda")
    ref = ops.dsa_index_scores(q, k, w, mode="torch")
    assert rel_err(ks.dsa_index_scores(q, k, w), ref) < 1e-5
    causal = ks.dsa_index_scores(q, k, w, causal=True)
    hidden = causal == float("-inf")
    assert rel_err(causal.masked_fill(hidden, 0), ref.masked_fill(hidden, 0)) < 1e-5
    assert hidden.sum() == 2 * t * (t - 1) // 2  # exactly the keys after each query
    if torch.cuda.get_device_capability() >= (8, 9):
        k8, k_scale = ks.quantize_fp8_rows(k)
        assert rel_err(ks.dsa_index_scores(q, k8, w, k_scale=k_scale), ref) < 0.08


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sparse_gradients(dtype):
    from attnlab.kernels import sparse as ks

    q, k, _, idx = _gpu_inputs_mla(2, 16, 16, 512, 64, dtype=dtype)
    do = torch.randn(2, 16, 16, 512, device="cuda", dtype=dtype)
    grads = []
    torch_path = lambda *a: ops.sparse_attention(*a, mode="torch")  # noqa: E731
    for fn, cast in ((ks.sparse_attention, dtype), (torch_path, torch.float64)):
        qq, kk = q.detach().to(cast).requires_grad_(), k.detach().to(cast).requires_grad_()
        fn(qq, kk, kk[..., :512], idx).backward(do.to(cast))
        grads.append((qq.grad, kk.grad))
    for g, rg in zip(*grads, strict=True):
        assert rel_err(g, rg) < (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1, 1 << 20), (2, 64, 70000), (4, 1, 300000)])
def test_gpu_topk_variants_equal_oracle(shape):
    """On the GPU (where torch.topk sorts few long rows but radix-selects many short ones), with
    many ties and -inf tails: the Triton radix select (the op's "auto" on CUDA), the threshold and
    the two-stage top-k all equal ops.dsa_topk(mode="torch") exactly."""
    from attnlab.kernels.sparse import dsa_topk, dsa_topk_chunked, dsa_topk_threshold

    gen = torch.Generator(device="cuda").manual_seed(shape[2])
    scores = (torch.randn(shape, device="cuda", generator=gen) * 4).round() / 4
    scores[-1, -1, shape[2] // 2:] = float("-inf")
    scores[0, 0, ::5] = scores[0, 0, 7]  # one value repeated a fifth of the row
    want = ops.dsa_topk(scores, 2048, causal=True, mode="torch")
    assert torch.equal(dsa_topk(scores, 2048, causal=True), want)
    assert torch.equal(ops.dsa_topk(scores, 2048, causal=True), want)  # "auto" on CUDA is the kernel
    want_100 = ops.dsa_topk(scores, 100, causal=False, mode="torch")
    assert torch.equal(dsa_topk(scores, 100, causal=False), want_100)
    assert torch.equal(dsa_topk_threshold(scores, 2048, causal=True), want)
    assert torch.equal(dsa_topk_chunked(scores, 2048, causal=True), want)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1, 4096), (1, 1, 32768), (3, 2, 4096), (1, 1, 3000)])
def test_gpu_topk_one_program_equals_oracle(shape, monkeypatch):
    """The one-launch top-k at decode lengths (k = 2048, its sort holding 2048 int64 keys; 3000:
    k_eff 2048 with many ties and a -inf tail) equals the oracle; the limit is raised so that 32K
    rows (past the default limit) take it too."""
    from attnlab.kernels import sparse as ks

    monkeypatch.setattr(ks, "TOPK_ONE_PROGRAM_MAX", max(ks.TOPK_ONE_PROGRAM_MAX, shape[2]))
    monkeypatch.setattr(ks, "TOPK_ONE_PROGRAM_MIN_ROWS_PER_SM", 0)
    gen = torch.Generator(device="cuda").manual_seed(shape[2])
    scores = (torch.randn(shape, device="cuda", generator=gen) * 4).round() / 4
    scores[-1, -1, shape[2] // 2:] = float("-inf")
    scores[0, 0, ::5] = -0.0
    for causal in (True, False):
        for topk in (2048, 100):
            want = ops.dsa_topk(scores, topk, causal=causal, mode="torch")
            assert torch.equal(ks.dsa_topk(scores, topk, causal=causal), want), (topk, causal)
            _assert_same_set_in_position_order(ks.dsa_topk(scores, topk, causal=causal, sort=False), want)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused", "fused_loop", "multi", "multi_loop"])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (1, 1, 32768), (2, 1, 131072), (1, 1, 3000), (8, 1, 70000),
                                   (1, 1, 200), (1, 1, 270000), (1, 1, 1048600)])
def test_gpu_topk_decode_rows_equal_oracle(shape, path, monkeypatch):
    """Decode rows on the one-launch fused path (a row's chunks meeting at barriers: the only place
    more than one chunk per row runs it) and on the multi-launch passes (chunks in registers or
    looped over): sorted, the oracle exactly; unsorted, the oracle's set in position order."""
    from attnlab.kernels import sparse as ks

    _topk_path(ks, monkeypatch, path)

    gen = torch.Generator(device="cuda").manual_seed(shape[2] + 1)
    scores = (torch.randn(shape, device="cuda", generator=gen) * 4).round() / 4
    scores[-1, -1, shape[2] // 2:] = float("-inf")
    for topk in (2048, 100):
        want = ops.dsa_topk(scores, topk, causal=False, mode="torch")
        _assert_same_set_in_position_order(ks.dsa_topk(scores, topk, causal=False, sort=False), want)
        assert torch.equal(ks.dsa_topk(scores, topk, causal=False), want)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused", "multi", "multi_loop"])
@pytest.mark.parametrize("shape", [(1, 1, 32840), (1, 1, 131144), (2, 1, 70000), (1, 1, 1048600)])
@pytest.mark.parametrize("match_max", [1 << 30, 0, 64])
def test_gpu_topk_match_atomics(shape, path, match_max, monkeypatch):
    """Decode rows with histogram levels 1-3 counted by one atomic per matching key (always, never, or
    by the row's count), on the fused and the multi-program paths: sorted, the oracle exactly;
    unsorted, its set in position order; distinct scores and scores with many ties."""
    from attnlab.kernels import sparse as ks

    _topk_path(ks, monkeypatch, path)
    monkeypatch.setattr(ks, "TOPK_MATCH_ATOMICS_MAX", match_max)
    gen = torch.Generator(device="cuda").manual_seed(shape[2] + 3)
    distinct = torch.randn(shape, device="cuda", generator=gen)
    distinct[-1, -1, shape[2] // 2:] = float("-inf")
    for scores in (distinct, (distinct * 4).round() / 4):
        for topk in (2048, 100):
            want = ops.dsa_topk(scores, topk, causal=False, mode="torch")
            _assert_same_set_in_position_order(ks.dsa_topk(scores, topk, causal=False, sort=False), want)
            assert torch.equal(ks.dsa_topk(scores, topk, causal=False), want)


@pytest.mark.gpu
@pytest.mark.parametrize("B,S", [(1, 4168), (2, 9000), (1, 131144), (1, 1048600), (3, 300000)])
def test_gpu_index_scores_zero_the_topk_scratch(B, S, monkeypatch):
    """The decode selection without a fill launch on the GPU: dsa_index_scores(..., zero=scratch) then
    dsa_topk(..., scratch=scratch) (the top-k launched with PDL right after the scores it reads; the
    fused candidate path, long fused rows with TOPK_SCRATCH_LONG_FUSED, the multi-program path),
    replayed in a CUDA graph on new keys (garbage in the scratch before each replay), gives the
    oracle's set in position order."""
    from attnlab.kernels import sparse as ks

    monkeypatch.setattr(ks, "TOPK_SCRATCH_LONG_FUSED", True)
    gen = torch.Generator(device="cuda").manual_seed(S)
    H, D = 64, 128
    q = torch.randn(B, 1, H, D, device="cuda", generator=gen).bfloat16()
    k = torch.randn(B, S, D, device="cuda", generator=gen).bfloat16()
    w = torch.randn(B, 1, H, device="cuda", generator=gen) / H
    lengths = torch.full((B,), S - 37, device="cuda")
    n = ks.topk_scratch_numel(B, 1, S, 2048, q.device)
    assert n > 0
    scratch = torch.full((n,), 5, dtype=torch.int32, device="cuda")

    def select():
        scores = ks.dsa_index_scores(q, k, w, n_valid=lengths, zero=scratch)
        return scores, ks.dsa_topk(scores, 2048, causal=False, sort=False, scratch=scratch)

    graph, (scores, idx) = capture_graph(select)
    for _ in range(2):
        k.copy_(torch.randn(k.shape, device="cuda", generator=gen).bfloat16())
        scratch.fill_(5)
        graph.replay()
        _assert_same_set_in_position_order(idx, ops.dsa_topk(scores, 2048, causal=False, mode="torch"))
        assert bool((scores[:, :, S - 37:] == float("-inf")).all())


@pytest.mark.gpu
@pytest.mark.parametrize("B,S", [(1, 4168), (2, 9000), (1, 32840), (1, 131144), (1, 1048600)])
@pytest.mark.parametrize("keys", ["distinct", "short", "equal"])
def test_gpu_index_scores_prefill_the_topk(B, S, keys):
    """The decode selection with the top-k's first histogram level added by the index scores
    (dsa_index_scores(..., topk_scratch=), dsa_topk(..., prefilled=True); the scratch zeroed by a launch
    before, as latent_write's ``zero`` does in the step), replayed in a CUDA graph on new keys: the
    histograms as torch counts them and the oracle's set in position order. Distinct scores (the fused
    path's candidate shortcut after ONE barrier, or the multi-program passes from level 1); rows shorter
    than k (the k-th key -inf: the fused path's level passes, its barriers counted from 0); every key
    equal (all scores tie: more candidates than the shortcut takes)."""
    from attnlab.kernels import sparse as ks

    gen = torch.Generator(device="cuda").manual_seed(S)
    H, D = 64, 128
    q = torch.randn(B, 1, H, D, device="cuda", generator=gen).bfloat16()
    k = torch.randn(B, S, D, device="cuda", generator=gen).bfloat16()
    w = torch.randn(B, 1, H, device="cuda", generator=gen) / H
    lengths = torch.full((B,), 1000 if keys == "short" else S - 37, device="cuda")
    n = ks.topk_scratch_numel(B, 1, S, 2048, q.device)
    assert n > 0
    scratch = torch.full((n,), 5, dtype=torch.int32, device="cuda")

    def select():
        scratch.zero_()
        scores = ks.dsa_index_scores(q, k, w, n_valid=lengths, topk_scratch=scratch, topk=2048)
        return scores, ks.dsa_topk(scores, 2048, causal=False, sort=False, scratch=scratch, prefilled=True)

    graph, (scores, idx) = capture_graph(select)
    for _ in range(2):
        new = torch.randn(k.shape, device="cuda", generator=gen).bfloat16()
        k.copy_(new[:, :1].expand_as(k) if keys == "equal" else new)
        graph.replay()
        _assert_same_set_in_position_order(idx, ops.dsa_topk(scores, 2048, causal=False, mode="torch"))
        level0, fine = _key_histograms(scores.cpu())
        assert torch.equal(scratch[: B * 1024].view(B, 4, 256)[:, 0].cpu(), level0)
        if ks._topk_plan(B, S, 2048, q.device)[0] == "fused":
            assert torch.equal(scratch[B * 1026 :].view(B, 65536).cpu(), fine)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1, 4168), (1, 1, 32840), (1, 1, 131144), (2, 1, 70000), (8, 1, 5000),
                                   (1, 1, 300)])
@pytest.mark.parametrize("reg", [True, False])
def test_gpu_topk_fused_candidate_path(shape, reg, monkeypatch):
    """Decode rows over many chunks on the fused path's two-barrier candidate path (its length limit
    lifted): distinct scores (and the same with the k-th value copied to positions across the row, so
    tied candidates sit in different chunks) give the oracle sorted and unsorted, and the path was
    taken (every row's candidate count > 0); a row with fewer finite scores than k keeps the
    five-barrier path; the chunks in registers (``reg``) or read by every pass."""
    from attnlab.kernels import sparse as ks

    monkeypatch.setattr(ks, "TOPK_CANDIDATES_MAX_S", 1 << 20)
    if not reg:
        monkeypatch.setattr(ks, "TOPK_FUSED_REG_CHUNK_MAX", 0)

    gen = torch.Generator(device="cuda").manual_seed(shape[2] + 7)
    R, S = shape[0] * shape[1], shape[2]
    distinct = torch.randn(shape, device="cuda", generator=gen)
    for topk in (2048, 100):
        k_eff = min(topk, S)
        for scores in (distinct, _threshold_ties(distinct, k_eff, copies=9, seed=S)):
            want = ops.dsa_topk(scores, topk, causal=False, mode="torch")
            got = torch.empty(R, topk, dtype=torch.int64, device="cuda")
            n_cand = ks._topk_fused_launch(scores.reshape(R, S), got, S, 1, k_eff, topk, False, True)
            assert torch.equal(got.view_as(want), want), topk
            assert bool((n_cand > 0).all()), n_cand
            _assert_same_set_in_position_order(ks.dsa_topk(scores, topk, causal=False, sort=False), want)
    short = distinct.clone()
    short[0, 0, 50:] = float("-inf")
    got = torch.empty(R, 100, dtype=torch.int64, device="cuda")
    n_cand = ks._topk_fused_launch(short.reshape(R, S), got, S, 1, 100, 100, False, True)
    want = ops.dsa_topk(short, 100, causal=False, mode="torch")
    assert torch.equal(got.view_as(want), want)
    assert n_cand[0].item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("s", [4096, 300000])
def test_gpu_topk_cuda_graph_both_paths(s, monkeypatch):
    """The Triton top-k has no host sync: both paths (one program per row at 4K, multi-program at
    300K) captured in a CUDA graph and replayed on new scores."""
    from attnlab.kernels import sparse as ks
    from attnlab.kernels.sparse import dsa_topk

    monkeypatch.setattr(ks, "TOPK_ONE_PROGRAM_MIN_ROWS_PER_SM", 0)
    monkeypatch.setattr(ks, "TOPK_FUSED_MAX", 0)
    scores = torch.randn(1, 1, s, device="cuda")
    dsa_topk(scores, 2048)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dsa_topk(scores, 2048)
    scores.copy_((torch.randn_like(scores) * 2).round())
    graph.replay()
    assert torch.equal(out, ops.dsa_topk(scores, 2048, mode="torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("s", [4096, 65536])
def test_gpu_topk_fused_cuda_graph_replays(s):
    """The fused top-k (zeroed barrier counters and histograms each call) captured in a CUDA graph,
    replayed many times on new scores, sorted and unsorted: the oracle every time, never a hang."""
    from attnlab.kernels.sparse import dsa_topk

    scores = torch.randn(1, 1, s, device="cuda")
    dsa_topk(scores, 2048)
    dsa_topk(scores, 2048, sort=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dsa_topk(scores, 2048)
        unsorted = dsa_topk(scores, 2048, sort=False)
    for seed in range(5):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        scores.copy_((torch.randn(scores.shape, device="cuda", generator=gen) * 2).round())
        graph.replay()
        want = ops.dsa_topk(scores, 2048, mode="torch")
        assert torch.equal(out, want), seed
        _assert_same_set_in_position_order(unsorted, want)


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("h", [16, 32, 128])
def test_gpu_mla_decode_heads_and_pages(h, b):
    """MLA decode at 16 and 32 heads (memory-bound: the narrow launch shapes, "decode_row" for one
    row, else "decode_narrow") and 128 (two 64-head blocks), dense and paged with 64-slot pages (one
    table read per block), ragged rows."""
    from attnlab.kernels import sparse as ks

    s = 5000
    q = torch.randn(b, h, 576, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, s, 1, 576, device="cuda", dtype=torch.bfloat16)
    n_valid = torch.tensor([0, 1234, s], device="cuda")[-b:]
    ref = ops.softmax_decode(q.double(), k.double(), k[..., :512].double(), n_valid, mode="torch")
    assert rel_err(ks.softmax_decode(q, k, k[..., :512], n_valid), ref) < 1e-2
    s_pad = 64 * triton_cdiv(s, 64)
    dense = torch.zeros(b, s_pad, 1, 576, device="cuda", dtype=torch.bfloat16)
    dense[:, :s] = k
    n_pages = b * s_pad // 64
    perm = torch.randperm(n_pages, device="cuda")
    pages = torch.empty(n_pages, 64, 1, 576, device="cuda", dtype=torch.bfloat16)
    pages[perm] = dense.view(n_pages, 64, 1, 576)
    o = ks.paged_decode(q, pages, pages[..., :512], perm.view(b, -1).int(), n_valid)
    assert rel_err(o, ref) < 1e-2 and (b == 1 or (o[0] == 0).all())


@pytest.mark.gpu
@pytest.mark.parametrize("s", [100, 4100, 40000])
def test_gpu_mla_decode_one_row_after_a_writer(s):
    """A single decode row (TUNING["decode_row"]: PDL, 64-slot blocks, each split asking L2 for its
    key rows before it waits) right after kernels that write the row's newest slot and count it,
    captured in a CUDA graph and replayed with a new row each time: the attention sees the slot
    written just before it, not what was there. (torch's writers here are not PDL-aware, so the
    decode waits for them as usual; the early start after a PDL-aware writer, latent_write, is
    tests/test_fused_decode.py's deepseek-v3 graph step.)"""
    from attnlab.kernels import sparse as ks

    assert ks.TUNING["decode_row"].get("PDL") and ks.TUNING["decode_row"].get("PF_BLOCKS", 0) > 0
    torch.manual_seed(0)
    q = torch.randn(1, 16, 576, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, s + 8, 1, 576, device="cuda", dtype=torch.bfloat16)
    new = torch.randn(576, device="cuda", dtype=torch.bfloat16)
    n_valid = torch.tensor([s - 1], device="cuda")

    def step():
        k.index_copy_(1, n_valid, (new * 8).view(1, 1, 1, 576))  # large: the newest slot dominates
        n_valid.add_(1)
        return ks.softmax_decode(q, k, k[..., :512], n_valid)

    step()  # compile outside the capture
    n_valid.fill_(s - 1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for i in range(3):
        n_valid.fill_(s - 1 + i)
        new.copy_(torch.randn(576, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert int(n_valid) == s + i
        ref = ops.softmax_decode(q.double(), k.double(), k[..., :512].double(), n_valid, mode="torch")
        assert rel_err(out, ref) < 1e-2, (s, i)
        stale = k.clone()
        stale[0, s - 1 + i, 0] = 0
        assert rel_err(out, ops.softmax_decode(q.double(), stale.double(), stale[..., :512].double(), n_valid,
                                               mode="torch")) > 0.1


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@needs_triton
def test_decode_row_falls_back_to_the_narrow_shape(monkeypatch):
    """A single decode row's launch shape (64-slot blocks in 3 stages: ~220 KB of shared memory, an
    H100's) is followed, where it does not build, by decode_narrow's (which a GPU with less shared
    memory builds) before the general fallbacks; shapes that failed are skipped."""
    from attnlab.kernels import sparse as ks

    monkeypatch.setattr(ks, "_FAILED_CONFIGS", set())
    row, narrow = ks.TUNING["decode_row"], ks.TUNING["decode_narrow"]
    assert ks._launch_configs("decode_row") == [row, narrow, *ks.FALLBACK]
    ks._FAILED_CONFIGS.add(ks._config_key("decode_row", row))
    assert ks._launch_configs("decode_row")[0] == narrow
    assert ks._launch_configs("decode_narrow") == [narrow, *ks.FALLBACK]


@pytest.mark.gpu
def test_gpu_default_launch_shapes_compile():
    """The default bf16 launch shapes build on this GPU / Triton (no fallback to a smaller one,
    which would be correct but slower: the launcher warns and records it in _FAILED_CONFIGS)."""
    from attnlab.kernels import sparse as ks

    q, k, v, idx = _gpu_inputs_mla(1, 2, 128, 1000, 256)
    ks.sparse_attention(q, k, v, idx)
    ks.softmax_decode(q[:, 0], k, v, torch.tensor([1000], device="cuda"))
    assert not ks._FAILED_CONFIGS, f"default launch shapes failed to build: {ks._FAILED_CONFIGS}"
