"""Prefill / decode / generate: cached inference equals the full forward for every preset;
chunked and ragged prefill; sampling; stop tokens; bad input; the CUDA-graph protocol on CPU.

The engine tests (sampling, stops, ragged bookkeeping) also run on ``ToyLM``, a 2-layer
model written here against the layer contract, so an engine bug and a layer bug fail
different tests.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from attnlab import HybridLM, ModelConfig
from attnlab.cache import LayerCache
from attnlab.generate import (
    DecodeStep,
    GenerateStats,
    cache_nbytes,
    decode_n_tokens,
    decode_one_token,
    filter_logits,
    generate,
    prefill,
    sample,
)

PRESETS = ["llama", "swa", "deepseek-v3", "deepseek-v32", "minimax-01", "qwen3-next", "kimi-linear",
           "lightning", "gdn", "kda"]
VOCAB = 61


def rms_rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


# ----------------------------------------------------------------------------- a toy contract model
@dataclass
class _KVCache(LayerCache):
    k: torch.Tensor  # (B, S_max, D)
    v: torch.Tensor  # (B, S_max, D)


@dataclass
class _StateCache(LayerCache):
    state: torch.Tensor  # (B, D) float32


class _ToyAttention(nn.Module):
    """Single-head causal softmax attention with sinusoidal positions added to q and k."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.d = d

    def _pe(self, pos: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        freq = 1.0 / 100.0 ** (torch.arange(self.d, dtype=torch.float32, device=pos.device) / self.d)
        return torch.sin(pos[..., None].float() * freq)

    def forward(self, x: torch.Tensor, cache: _KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, T, D) each
        start = torch.zeros(B, dtype=torch.long, device=x.device) if cache is None else cache.lengths
        pos = start[:, None] + torch.arange(T, device=x.device)  # (B, T)
        q, k = q + self._pe(pos), k + self._pe(pos)
        if cache is None:
            keys, vals, kpos = k, v, pos
        else:
            cache.k.scatter_(1, pos[..., None].expand(B, T, self.d), k.to(cache.k.dtype))
            cache.v.scatter_(1, pos[..., None].expand(B, T, self.d), v.to(cache.v.dtype))
            keys, vals = cache.k.to(x.dtype), cache.v.to(x.dtype)
            kpos = torch.arange(keys.shape[1], device=x.device).expand(B, -1)  # (B, S_max)
            cache.lengths += T
        scores = q @ keys.transpose(1, 2) / self.d**0.5  # (B, T, S)
        scores = scores.masked_fill(kpos[:, None, :] > pos[:, :, None], float("-inf"))
        return scores.softmax(-1) @ vals  # (B, T, D)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=torch.float32) -> _KVCache:
        z = lambda: torch.zeros(batch, max_len, self.d, device=device, dtype=dtype)
        return _KVCache(torch.zeros(batch, dtype=torch.long, device=device), z(), z())


class _ToyRecurrence(nn.Module):
    """s_t = 0.8 s_{t-1} + W x_t, y_t = tanh(s_t): a constant-size state."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, cache: _StateCache | None = None) -> torch.Tensor:
        u = self.inp(x).float()  # (B, T, D)
        s = torch.zeros_like(u[:, 0]) if cache is None else cache.state.clone()
        ys = []
        for t in range(x.shape[1]):
            s = 0.8 * s + u[:, t]
            ys.append(torch.tanh(s))
        if cache is not None:
            cache.state.copy_(s)
            cache.lengths += x.shape[1]
        return torch.stack(ys, 1).to(x.dtype)  # (B, T, D)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=torch.float32) -> _StateCache:
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        return _StateCache(lengths, torch.zeros(batch, self.inp.out_features, device=device))


class ToyLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, d: int = 16) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(vocab_size=vocab)
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([_ToyRecurrence(d), _ToyAttention(d)])
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor, caches: list[LayerCache] | None = None) -> torch.Tensor:
        h = self.emb(tokens)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            h = h + layer(h, None if caches is None else caches[i])
        return self.head(h).float() * 3.0  # (B, T, V): sharp enough that sampling has structure

    def new_caches(self, batch: int, max_len: int, device=None, dtype=None) -> list[LayerCache]:
        device = self.emb.weight.device if device is None else device  # as HybridLM: the model's device
        return [layer.new_cache(batch, max_len, device, dtype or torch.float32) for layer in self.layers]


# ----------------------------------------------------------------------------- real models
def tiny_model(name: str, device: str = "cpu") -> nn.Module:
    """The tiny float32 preset ``name``, built (initialised) under ``torch.device(device)``."""
    base = ModelConfig.preset(name)
    overrides = dict(
        d_model=32, vocab_size=VOCAB, d_ff=64, n_heads=2, head_dim=16,
        window=5,  # the ring buffer wraps within the test lengths
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        index_n_heads=2, index_head_dim=8, index_topk=4,  # fewer than the visible keys: selection matters
        block_size=4,  # lightning blocks smaller than the prompt
        linear_key_head_dim=8, linear_value_head_dim=8,
    )
    if base.n_kv_heads is not None:
        overrides["n_kv_heads"] = 1
    if base.q_lora_rank is not None:
        overrides["q_lora_rank"] = 16
    if base.linear_n_heads is not None:
        overrides["linear_n_heads"] = 2
    if base.linear_n_key_heads is not None:
        overrides["linear_n_key_heads"] = 2 if base.linear_n_key_heads == base.linear_heads else 1
    overrides["n_layers"] = len(base.pattern) if len(base.pattern) > 1 else 2
    torch.manual_seed(0)
    with torch.device(device):  # on CUDA: every buffer made in __init__ must land there too
        model = HybridLM(ModelConfig.preset(name, **overrides)).float().eval()
    return model


_MODELS: dict[str, nn.Module] = {}


def get_model(name: str) -> nn.Module:
    if name == "toy":
        torch.manual_seed(0)
        return ToyLM().eval()
    if name not in _MODELS:
        _MODELS[name] = tiny_model(name)
    return _MODELS[name]


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)


# ----------------------------------------------------------------------------- cached == full forward
@pytest.mark.parametrize("name", ["toy", *PRESETS])
def test_prefill_then_decode_matches_full_forward(name):
    """Prefill of T tokens then n decode steps == the full forward over T + n tokens, both for a
    one-shot prefill with eager decode and for a chunked prefill with the decode step run
    through the CUDA-graph protocol (static buffers, warm-up on fresh caches, reset)."""
    model = get_model(name)
    T, n = 9, 4
    x = tokens(2, T + n)
    with torch.no_grad():
        full = model(x)  # (2, T + n, V)
    runs = []
    for chunk, graph in ((None, False), (4, True)):
        caches = model.new_caches(2, T + n, dtype=torch.float32)
        step = DecodeStep(model, caches, mode="cuda_graph", simulate=True) if graph else None
        pre = prefill(model, x[:, :T], caches, prefill_chunk=chunk, return_all_logits=True)  # (2, T, V)
        err = rms_rel(full[:, :T], pre)
        assert err <= 1e-4, f"prefill (chunk {chunk}): rms-rel {err:.2e}"
        dec = []
        for i in range(n):
            _, logits = decode_one_token(model, x[:, T + i], caches, step=step)
            err = rms_rel(full[:, T + i], logits)
            assert err <= 1e-4, f"decode step {i} after prefill chunk {chunk}: rms-rel {err:.2e}"
            dec.append(logits.clone())
        assert caches[0].lengths.tolist() == [T + n, T + n]
        runs.append((pre, torch.stack(dec, 1)))
    # chunked prefill == one-shot prefill (directly, not only both near the full forward)
    (p1, d1), (p2, d2) = runs
    assert rms_rel(p1, p2) <= 1e-4 and rms_rel(d1, d2) <= 1e-4


@pytest.mark.parametrize("name", ["toy", *PRESETS])
def test_mixed_length_batch_equals_each_prompt_alone(name):
    model = get_model(name)
    lens, n = [7, 3, 9], 3
    x = tokens(3, max(lens), seed=3)
    caches = model.new_caches(3, max(lens) + n, dtype=torch.float32)
    last = prefill(model, x, caches, prefill_chunk=4, lengths=torch.tensor(lens))  # (3, V)
    first = last.argmax(-1)
    new, logits = decode_n_tokens(model, first, caches, n, return_logits=True)  # (3, n), (3, n, V)
    for b, L in enumerate(lens):
        c1 = model.new_caches(1, L + n, dtype=torch.float32)
        last1 = prefill(model, x[b : b + 1, :L], c1)
        assert rms_rel(last1[0], last[b]) <= 1e-4
        new1, logits1 = decode_n_tokens(model, last1.argmax(-1), c1, n, return_logits=True)
        assert torch.equal(new1[0], new[b]), f"row {b}: greedy tokens differ"
        assert rms_rel(logits1[0], logits[b]) <= 1e-4


@pytest.mark.parametrize("name", ["toy", "qwen3-next"])
def test_generate_list_of_prompts_equals_each_alone(name):
    model = get_model(name)
    lens = [7, 3, 9]
    x = tokens(3, max(lens), seed=4)
    rows = generate(model, [x[b, :L] for b, L in enumerate(lens)], max_new_tokens=4)
    for b, L in enumerate(lens):
        alone = generate(model, x[b, :L], max_new_tokens=4)
        assert alone.shape == (L + 4,)
        assert torch.equal(rows[b], alone)


def _storage_bytes(obj, seen: set, skip: set) -> int:
    """Bytes of every distinct tensor storage reachable from a cache (lists/dicts included)."""
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        key = st.data_ptr()
        if key in seen or key in skip:
            return 0
        seen.add(key)
        return st.nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_storage_bytes(o, seen, skip) for o in obj)
    if isinstance(obj, dict):
        return sum(_storage_bytes(o, seen, skip) for o in obj.values())
    if dataclasses.is_dataclass(obj):
        return sum(_storage_bytes(getattr(obj, f.name), seen, skip) for f in dataclasses.fields(obj))
    return 0


@pytest.mark.parametrize("name", PRESETS)
def test_cache_bytes_reported_equal_allocated(name):
    model = get_model(name)
    B, max_len = 3, 13
    for dtype in (torch.float32, torch.bfloat16):
        caches = model.new_caches(B, max_len, dtype=dtype)
        specs = model.cache_specs(dtype)
        assert len(specs) == len(caches)
        for i, (spec, c) in enumerate(zip(specs, caches, strict=True)):
            declared = B * spec.allocated_bytes(max_len)
            allocated = _storage_bytes(c, set(), {c.lengths.untyped_storage().data_ptr()})
            what = f"layer {i} ({type(c).__name__}, {dtype})"
            assert c.nbytes() == declared, f"{what}: nbytes {c.nbytes()} != spec {declared}"
            assert allocated == declared, f"{what}: storages {allocated} != spec {declared}"
        assert cache_nbytes(caches) == B * sum(s.allocated_bytes(max_len) for s in specs)


def test_generate_reports_cache_bytes():
    model = get_model("kimi-linear")
    stats = GenerateStats()
    out = generate(model, tokens(2, 4), max_new_tokens=3, max_len=11, cache_dtype=torch.bfloat16, stats=stats)
    assert out.shape == (2, 7)
    assert stats.cache_bytes == 2 * sum(s.allocated_bytes(11) for s in model.cache_specs(torch.bfloat16))
    assert stats.new_tokens == 3 and stats.prompt_tokens == 8 and stats.decode_s > 0
    assert torch.equal(model.generate(tokens(2, 4), max_new_tokens=3), out)  # the HybridLM method


# ----------------------------------------------------------------------------- sampling
def test_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, VOCAB, generator=g) * 2
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, 0.0), greedy)
    assert torch.equal(sample(logits, 1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sample(logits, 1.0, top_p=1e-6, generator=g), greedy)
    # top-k: samples only ever come from the k largest
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(20):
        s = sample(logits, 2.0, top_k=5, generator=g)
        assert (top5 == s[:, None]).any(-1).all()
    # top-p: the kept set is the smallest prefix (by probability) reaching top_p
    kept = torch.isfinite(filter_logits(logits, top_p=0.5))  # (64, V)
    probs = logits.softmax(-1)
    for b in range(logits.shape[0]):
        p_sorted = probs[b][kept[b]].sort(descending=True).values
        assert p_sorted.sum() >= 0.5 - 1e-6
        assert p_sorted[:-1].sum() < 0.5  # dropping the least likely kept token falls short
        assert probs[b][~kept[b]].max() <= p_sorted.min()
    s = sample(logits, 1.0, top_p=0.5, generator=g)
    assert kept.gather(1, s[:, None]).all()


def test_generate_greedy_is_argmax_and_seed_reproducible():
    model = get_model("toy")
    x = tokens(2, 5)
    out = generate(model, x, max_new_tokens=6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], x)
    with torch.no_grad():
        for t in range(5, 11):  # each new token is the argmax of the full forward over what precedes it
            assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1))
    assert torch.equal(generate(model, x, 6, temperature=1.0, top_k=1, seed=3), out)
    assert torch.equal(generate(model, x, 6, temperature=1.0, top_p=1e-6, seed=3), out)
    a = generate(model, x, 16, temperature=1.5, seed=7)
    b = generate(model, x, 16, temperature=1.5, seed=7)
    c = generate(model, x, 16, temperature=1.5, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stop_tokens_stop_a_row():
    model = get_model("toy")
    x = tokens(3, 4, seed=5)
    free = generate(model, x, max_new_tokens=8, temperature=1.0, seed=1)  # (3, 12)
    stop = int(free[0, 4 + 2])  # row 0 emits this token as its 3rd new token
    out = generate(model, x, max_new_tokens=8, temperature=1.0, seed=1, stop_tokens=[stop], pad_token_id=0)
    for b in range(3):
        new_free, new = free[b, 4:], out[b, 4:]
        hits = (new_free == stop).nonzero()
        end = int(hits[0, 0]) + 1 if hits.numel() else new_free.numel()
        assert torch.equal(new[:end], new_free[:end]), f"row {b} changed before its stop token"
        assert (new[end:] == 0).all(), f"row {b} not padded after its stop token"
    # every row stopped => generation ended early and the output is only as wide as needed
    hit = free[:, 4:] == stop  # (3, 8)
    ends = [int(hit[b].nonzero()[0, 0]) + 1 if hit[b].any() else 8 for b in range(3)]
    assert out.shape[1] == 4 + max(ends)
    # the ragged (list) form drops the padding: each row ends at its stop token
    rows = generate(model, list(x), max_new_tokens=8, temperature=1.0, seed=1, stop_tokens=[stop])
    assert int(rows[0][-1]) == stop and rows[0].numel() == 4 + 3


def test_padded_prompt_with_lengths_and_streaming():
    model = get_model("toy")
    lens = [5, 2]
    x = tokens(2, 5, seed=6)
    x[1, 2:] = 7  # padding is ignored whatever it holds
    streamed = []
    rows = generate(model, x, 4, lengths=torch.tensor(lens), on_token=lambda t: streamed.append(t.clone()))
    assert [r.numel() for r in rows] == [9, 6]
    assert torch.equal(torch.stack(streamed, 1), torch.stack([rows[0][5:], rows[1][2:]]))
    assert torch.equal(rows[1], generate(model, x[1, :2], 4))


def test_zero_new_tokens_returns_prompt():
    model = get_model("toy")
    x = tokens(2, 3)
    assert torch.equal(generate(model, x, 0), x)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=3, max_len=4), "prompt"),  # the prompt has 5 tokens
        (dict(max_new_tokens=3, max_len=6), "max_new_tokens"),
        (dict(max_new_tokens=3, temperature=-0.5), "temperature"),
        (dict(max_new_tokens=3, temperature=1.0, top_p=0.0), "top_p"),
        (dict(max_new_tokens=3, temperature=1.0, top_p=1.5), "top_p"),
        (dict(max_new_tokens=3, temperature=1.0, top_k=0), "top_k"),
        (dict(max_new_tokens=3, prefill_chunk=0), "prefill_chunk"),
        (dict(max_new_tokens=3, stop_tokens=[VOCAB]), "stop_tokens"),
        (dict(max_new_tokens=3, decode_mode="fast"), "mode"),
        (dict(max_new_tokens=3, decode_mode="cuda_graph"), "mode"),  # no GPU here
    ],
)
def test_bad_generate_arguments(kwargs, match):
    model = get_model("toy")
    with pytest.raises(ValueError, match=match):
        generate(model, tokens(1, 5), **kwargs)


@pytest.mark.parametrize(
    "prompt, lengths, match",
    [
        (torch.zeros(2, 0, dtype=torch.long), None, "prompt"),
        ([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], None, r"prompt\[1\]"),
        ([], None, "prompt"),
        (torch.zeros(2, 3), None, "prompt"),  # float ids
        (torch.tensor([[1, VOCAB]]), None, "prompt"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 0]), "lengths"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([3]), "lengths"),
    ],
)
def test_bad_prompts(prompt, lengths, match):
    model = get_model("toy")
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, 2, lengths=lengths)


# ----------------------------------------------------------------------------- CUDA-graph protocol on CPU
def test_graph_step_needs_fresh_caches():
    model = get_model("toy")
    caches = model.new_caches(1, 8)
    prefill(model, tokens(1, 3), caches)
    with pytest.raises(ValueError, match="caches"):
        DecodeStep(model, caches, mode="cuda_graph", simulate=True)


def test_graph_step_checks_room_on_the_host():
    """In the graph modes the layers skip their overflow check (a sync); the step checks instead,
    re-reading the lengths after a prefill or reset changed them behind its back."""
    model = get_model("qwen3-next")
    caches = model.new_caches(1, 6)
    step = DecodeStep(model, caches, mode="cuda_graph", simulate=True)
    assert step.capacity == 6
    prefill(model, tokens(1, 4), caches)
    tok = torch.tensor([1])
    step(tok), step(tok)  # tokens 5 and 6
    with pytest.raises(ValueError, match="max_len=6"):
        step(tok)
    for c in caches:
        c.reset()
    prefill(model, tokens(1, 5), caches)
    step(tok)
    with pytest.raises(ValueError, match="caches: a row holds 6"):
        step(tok)
    gdn = get_model("gdn")  # recurrent caches never fill
    assert DecodeStep(gdn, gdn.new_caches(1, 2), "cuda_graph", simulate=True).capacity is None


def _decode_fn(model, caches):
    def step(tok: torch.Tensor) -> torch.Tensor:
        return model(tok, caches)[:, -1].float()

    return step


@pytest.mark.parametrize("name", PRESETS)
def test_decode_step_traces_without_graph_breaks(name):
    """dynamo traces every preset's T == 1 step whole (fullgraph=True raises on any graph break:
    a host sync, .item(), data-dependent shapes); the traced step (no inductor) equals eager."""
    torch._dynamo.reset()
    model = get_model(name)
    x = tokens(2, 6, seed=13)
    out = []
    for compiled in (False, True):
        caches = model.new_caches(2, 8, dtype=torch.float32)
        prefill(model, x[:, :5], caches)
        fn = _decode_fn(model, caches)
        if compiled:
            fn = torch.compile(fn, backend="eager", fullgraph=True)
        with torch.no_grad():
            out.append(fn(x[:, 5:6]))
            out.append(fn(x[:, 4:5]))  # a second step: the caches advanced in place
        assert caches[0].lengths.tolist() == [7, 7]
    assert rms_rel(out[0], out[2]) <= 1e-6 and rms_rel(out[1], out[3]) <= 1e-6


def _inductor_works() -> bool:
    try:
        torch._dynamo.reset()
        f = torch.compile(lambda t: (t * 2).sin(), backend="inductor", fullgraph=True)
        return bool(torch.allclose(f(torch.ones(3)), torch.ones(3).mul(2).sin()))
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3-next"])
def test_compiled_decode_step_matches_eager_cpu(name):
    """DecodeStep(mode="compile"): inductor (C++ on the CPU), fullgraph, logits == eager (float32)
    and the same greedy generation."""
    if not _inductor_works():
        pytest.skip("torch.compile's inductor backend cannot compile here (no C++ compiler?)")
    torch._dynamo.reset()
    model = get_model(name)
    T, n = 9, 3
    x = tokens(2, T + n, seed=14)
    ref = model.new_caches(2, T + n, dtype=torch.float32)
    caches = model.new_caches(2, T + n, dtype=torch.float32)
    step = DecodeStep(model, caches, mode="compile")
    prefill(model, x[:, :T], ref)
    prefill(model, x[:, :T], caches)
    for i in range(n):
        want = decode_one_token(model, x[:, T + i], ref)[1]
        got = decode_one_token(model, x[:, T + i], caches, step=step)[1]
        assert rms_rel(want, got) <= 1e-5, f"step {i}"
    with pytest.raises(ValueError, match="max_len"):  # the host-side room check guards the compiled step
        step(x[:, 0])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["toy", *PRESETS])
def test_gpu_cuda_graph_decode_matches_eager(name):
    """The real capture: the decode step recorded as a CUDA graph and replayed gives the eager
    logits (float32) and the same greedy generation. The model is built under
    ``torch.device("cuda")`` (a buffer left on the CPU then broke capture) and must equal the
    CPU-built one moved over."""
    model = get_model("toy").cuda() if name == "toy" else tiny_model(name, device="cuda")
    if name != "toy":
        # the CUDA RNG draws other weights: copy the CPU model's, so only the buffers made in
        # __init__ (RoPE frequencies, decay slopes: not in the state dict) can differ
        model.load_state_dict(get_model(name).state_dict())
        moved = copy.deepcopy(get_model(name)).cuda()
        probe = tokens(2, 5, seed=10).cuda()
        with torch.no_grad():
            assert rms_rel(moved(probe), model(probe)) <= 1e-5, "built on CUDA != built on CPU and moved"
    T, n = 9, 6
    x = tokens(2, T + n, seed=11).cuda()
    ref = model.new_caches(2, T + n, dtype=torch.float32)
    prefill(model, x[:, :T], ref)
    caches = model.new_caches(2, T + n, dtype=torch.float32)
    step = DecodeStep(model, caches, mode="cuda_graph")
    assert step.graph is not None
    prefill(model, x[:, :T], caches)
    for i in range(n):
        want = decode_one_token(model, x[:, T + i], ref)[1]
        got = decode_one_token(model, x[:, T + i], caches, step=step)[1]
        assert rms_rel(want, got) <= 1e-4, f"step {i}"
    assert torch.equal(generate(model, x[:, :T], n, decode_mode="cuda_graph"), generate(model, x[:, :T], n))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
def test_gpu_compiled_decode_matches_eager(name):
    torch._dynamo.reset()
    model = tiny_model(name, device="cuda")
    x = tokens(2, 9, seed=12).cuda()
    assert torch.equal(generate(model, x, 6, decode_mode="compile"), generate(model, x, 6))


# ----------------------------------------------------------------------------- CLI
def test_cli_generate_from_checkpoint_streams_text(tmp_path, capsys):
    from attnlab.cli import main

    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset("llama", d_model=32, n_layers=2, vocab_size=256)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    rc = main(["generate", str(tmp_path / "ckpt"), "--prompt", "Hi", "-n", "6"])
    out, err = capsys.readouterr()
    assert rc == 0
    want = generate(model, torch.tensor(list(b"Hi")), 6)
    assert out == bytes(want.tolist()).decode("utf-8", errors="replace") + "\n"
    assert "tokens/s" in err and "cache" in err
    # a trainer run directory (its checkpoint/ inside) is found too
    (tmp_path / "run").mkdir()
    (tmp_path / "ckpt").rename(tmp_path / "run" / "checkpoint")
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Hi", "-n", "6"]) == 0
    assert capsys.readouterr().out == out
    assert main(["generate", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_cli_generate_preset_ids_and_errors(capsys):
    from attnlab.cli import main

    args = ["generate", "--preset", "gdn", "--set", "d_model=32", "--set", "vocab_size=50",
            "--prompt-ids", "1 2 3", "-n", "4"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    ids = [int(t) for t in out.split()]
    assert ids[:3] == [1, 2, 3] and len(ids) == 7 and all(0 <= t < 50 for t in ids)
    assert main(["generate", "--preset", "gdn", "--set", "vocab_size=50", "--prompt", "text"]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--preset", "gdn", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
