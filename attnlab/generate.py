"""Prefill, decode and sampling for :class:`attnlab.model.HybridLM` (gpt-fast's shape).

The engine is three functions over preallocated per-layer caches
(``model.new_caches(batch, max_len)``, one :class:`attnlab.cache.LayerCache` per layer):

- :func:`prefill` runs the prompt through the model in chunks of ``prefill_chunk`` tokens, so a
  long prompt never materialises more than that many tokens of activations; prompts of
  different lengths share one batched cache (the common prefix is prefilled batched, each
  row's remainder through ``cache.rows(b, b + 1)``).
- :func:`decode_one_token` / :func:`decode_n_tokens` feed one token per row and sample the
  next. The model call inside is a :class:`DecodeStep`, a pure function of preallocated
  tensors (token buffer, caches, weights) that can be captured whole as a CUDA graph
  (``decode_mode="cuda_graph"``) or compiled (``decode_mode="compile"``, ``torch.compile``
  with ``mode="reduce-overhead"``).
- :func:`generate` ties them together: validation, cache allocation, sampling (greedy,
  temperature, top-k, top-p, seed), stop tokens, streaming callback.

Return forms of :func:`generate` (the output follows the input):

- ``prompt`` a ``[B, T]`` tensor (no ``lengths``): a ``[B, T + n]`` tensor, prompt + new tokens,
  with ``n <= max_new_tokens`` (generation ends early once every row has stopped; a row that
  stopped earlier than others is filled with ``pad_token_id`` after its stop token).
- ``prompt`` a 1-D ``[T]`` tensor: one sequence, a 1-D ``[T + n]`` tensor.
- ``prompt`` a list of 1-D tensors, or a right-padded ``[B, T]`` tensor with ``lengths``
  (a ragged batch): a list of B 1-D tensors, row b = its prompt + its new tokens up to and
  including its stop token (no padding).
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_mode, check_tensor
from ._format import human_bytes
from .cache import LayerCache
from .ops.softmax import prepare_decode_kernels

DECODE_MODES = ("eager", "cuda_graph", "compile")
_HAVE_TRITON = importlib.util.find_spec("triton") is not None
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


# ----------------------------------------------------------------------------- sampling
def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError unless temperature >= 0, top_k None or >= 1, top_p None or in (0, 1]."""
    is_number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not is_number or not math.isfinite(temperature):
        raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None:
        if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf.

    logits: float [B, V]. top_k keeps the k largest (ties with the k-th are kept); top_p keeps
    the smallest set of most likely tokens whose probability reaches top_p (the most likely
    token is always kept), as in Holtzman et al. 2019. Returns float32 [B, V].
    """
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` for float logits [B, V] -> int64 [B]: on CUDA with Triton one short
    launch (:func:`attnlab.kernels.argmax.argmax_rows`; torch's argmax of a 32K row is a 12 µs
    reduction on an H100), elsewhere torch's."""
    if logits.is_cuda and _HAVE_TRITON and not torch.compiler.is_compiling():
        from .kernels import argmax

        if argmax.ENABLED:
            return argmax.argmax_rows(logits)
    return logits.argmax(dim=-1)


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row from logits float [B, V] -> int64 [B].

    temperature 0 is greedy (argmax; top_k / top_p are then irrelevant). Otherwise samples
    from softmax(filter_logits(logits / temperature)) with ``generator`` (None = torch's
    global RNG).
    """
    check_tensor("logits", logits, ndim=2, layout="[B, V]")
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return greedy_tokens(logits)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


# ----------------------------------------------------------------------------- caches
def cache_nbytes(caches: Sequence[LayerCache]) -> int:
    """Bytes allocated by all layer caches (the state tensors, not the ``lengths`` counters)."""
    return sum(c.nbytes() for c in caches)


def _cache_lengths(caches: Sequence[LayerCache]) -> torch.Tensor:
    """Tokens per row held by the caches, int64 [B]; every layer must agree."""
    if not caches:
        raise ValueError("caches: expected one LayerCache per layer, got an empty list")
    first = caches[0].lengths
    for i, c in enumerate(caches[1:], start=1):
        if c.lengths.shape != first.shape or not torch.equal(c.lengths, first):
            raise ValueError(
                f"caches: layer {i} holds {c.lengths.tolist()} tokens per row but layer 0 holds "
                f"{first.tolist()}; all layers' caches must advance together"
            )
    return first


# ----------------------------------------------------------------------------- prefill
def _check_tokens(name: str, tokens: torch.Tensor, vocab_size: int) -> None:
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"{name}: token ids must lie in [0, vocab_size={vocab_size}), got range "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )


def _chunks(n: int, chunk: int | None) -> list[tuple[int, int]]:
    step = n if chunk is None else chunk
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _run_chunked(
    model: nn.Module, tokens: torch.Tensor, caches: Sequence[LayerCache], chunk: int | None, keep_all: bool
) -> torch.Tensor:
    """Feed tokens [B, T] (T >= 1) through the model chunk by chunk, appending to the caches.
    Returns the logits of the last token, float32 [B, V], or of every token [B, T, V] if keep_all."""
    outs = []
    last = None
    for s, e in _chunks(tokens.shape[1], chunk):
        logits = model(tokens[:, s:e], list(caches))  # (B, e - s, V)
        last = logits[:, -1].float()  # (B, V)
        if keep_all:
            outs.append(logits.float())
    return torch.cat(outs, dim=1) if keep_all else last


@torch.no_grad()
def prefill(
    model: nn.Module,
    tokens: torch.Tensor,
    caches: Sequence[LayerCache],
    prefill_chunk: int | None = None,
    lengths: torch.Tensor | None = None,
    return_all_logits: bool = False,
) -> torch.Tensor:
    """Run a batch of prompts through the model, appending them to the caches.

    tokens: int64 [B, T], right-padded when ``lengths`` (int [B], 1 <= lengths[b] <= T) is
    given; row b's prompt is tokens[b, :lengths[b]]. caches: ``model.new_caches(B, max_len)``
    (or caches already holding earlier tokens: the prompt is appended). The model sees at most
    ``prefill_chunk`` tokens per call (None = the whole prompt at once). Rows of different
    lengths share the batched passes for their common prefix and are finished one row at a
    time through ``cache.rows(b, b + 1)``.

    Returns float32 logits of each row's last prompt token [B, V], or with
    ``return_all_logits`` every position [B, T, V] (positions past a row's length are NaN).
    """
    tokens = check_tensor("tokens", tokens, ndim=2, layout="[B, T]", dtypes=INT_DTYPES).long()
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk: expected None or an int >= 1, got {prefill_chunk!r}")
    B, T = tokens.shape
    if T == 0:
        raise ValueError("tokens: expected at least one prompt token, got shape (B, 0)")
    if len(caches) == 0:
        raise ValueError("caches: expected one LayerCache per layer (model.new_caches(B, max_len)), got none")
    if caches[0].lengths.shape[0] != B:
        raise ValueError(f"caches: built for batch {caches[0].lengths.shape[0]}, but tokens has batch {B}")
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    lengths = check_tensor("lengths", lengths, ndim=1, layout="[B]", shape=(B,), dtypes=INT_DTYPES)
    lens = [int(n) for n in lengths.tolist()]
    if min(lens) < 1 or max(lens) > T:
        raise ValueError(f"lengths: expected every prompt length in [1, T={T}], got {lens}")
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab is not None:
        for b, n in enumerate(lens):
            _check_tokens("tokens", tokens[b, :n], vocab)

    held = _cache_lengths(caches)
    rows_equal = bool((held == held[0]).all())
    common = min(lens) if rows_equal else 0  # batched layers need equal row positions
    last = None
    all_logits: list[torch.Tensor] = []
    if common > 0:
        out = _run_chunked(model, tokens[:, :common], caches, prefill_chunk, return_all_logits)
        if return_all_logits:
            all_logits.append(out)
            last = out[:, -1]
        else:
            last = out
    if common == T:
        return torch.cat(all_logits, dim=1) if return_all_logits else last
    # rows longer than the common prefix, one at a time
    rows_last = [None if common == 0 else last[b] for b in range(B)]
    tail = None
    if return_all_logits:
        V = all_logits[0].shape[-1] if all_logits else None
        tail = [None] * B
    for b in range(B):
        if lens[b] == common:
            continue
        row_caches = [c.rows(b, b + 1) for c in caches]
        row_tokens = tokens[b : b + 1, common : lens[b]]  # (1, lens[b] - common)
        out = _run_chunked(model, row_tokens, row_caches, prefill_chunk, return_all_logits)
        if return_all_logits:
            tail[b] = out[0]  # (lens[b] - common, V)
            V = out.shape[-1]
            rows_last[b] = out[0, -1]
        else:
            rows_last[b] = out[0]
    last = torch.stack(rows_last)  # (B, V)
    if not return_all_logits:
        return last
    full = torch.full((B, T, V), float("nan"), device=last.device)
    if all_logits:
        full[:, :common] = all_logits[0]
    for b in range(B):
        if tail[b] is not None:
            full[b, common : lens[b]] = tail[b]
    return full


# ----------------------------------------------------------------------------- decode step
def prefer_l1() -> None:
    """The L1 carveout hint for the attnlab Triton kernels compiled so far
    (:func:`attnlab.kernels._common.prefer_l1`; 3-4% of a decode step on an H100); nothing without
    triton."""
    try:
        from .kernels._common import prefer_l1 as hint
    except ImportError:
        return
    hint()


def capture_cuda_graph(
    fn: Callable[[], object], warmup: int = 1, before_capture: Callable[[], object] | None = None
) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, fn's output): ``fn`` run ``warmup`` (>= 1) times on a side stream (kernels compile,
    the allocator warms up), ``before_capture()`` if given, then ``fn`` captured in a CUDA graph on
    the current device (PyTorch's capture recipe, https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs).
    The output lives in the graph's memory pool: keep it with the graph; each ``graph.replay()``
    rewrites it from the inputs' current contents."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class DecodeStep:
    """One decode step as a pure function of preallocated tensors.

    ``step(tokens)`` with tokens int64 [B] (one per row) runs ``model(tokens[:, None], caches)``,
    updating every layer cache in place (rows may sit at different positions), and returns
    float32 logits [B, V]. The only inputs are the token buffer, the caches and the weights,
    all at fixed addresses, so the step can be replayed as a graph:

    - ``mode="eager"``: a plain call.
    - ``mode="cuda_graph"``: captured once with ``torch.cuda.CUDAGraph`` and replayed. Capture
      must run on caches that hold no sequence yet: it warms up on them (which writes a token)
      and then ``reset()``s every cache, so build the step BEFORE :func:`prefill`.
      ``simulate=True`` follows the same protocol without a GPU (static buffers, warm-up,
      reset, the step re-run instead of replayed) so it can be tested on a CPU.
    - ``mode="compile"``: ``torch.compile(mode="reduce-overhead", fullgraph=True)``; the cache
      tensors are marked static so the compiled step may update them inside its CUDA graph.
      Every DecodeStep compiles anew; call ``torch._dynamo.reset()`` between many of them (each
      new model/caches pair is a recompile of the same code, and dynamo caps recompiles).

    In the graph modes the layers skip their own cache-overflow checks (a host sync); the step
    checks on the host instead, from a host count of the longest row (``capacity`` is the
    smallest per-row capacity over the caches, None = unbounded).

    ``greedy=True``: every call also sets ``next_tokens`` (int64 [B]) to the logits' argmax
    (:func:`greedy_tokens`), inside the graph in mode "cuda_graph" (its launch then overlaps the
    LM head's end, where a launch after the replay would not); None otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        caches: Sequence[LayerCache],
        mode: str = "eager",
        simulate: bool = False,
        warmup: int = 2,
        greedy: bool = False,
    ) -> None:
        check_mode(mode, DECODE_MODES)
        self.model, self.caches, self.mode = model, list(caches), mode
        self.greedy = bool(greedy)
        self.next_tokens: torch.Tensor | None = None  # (B,) with greedy: the last call's argmax
        if not self.caches:
            raise ValueError("caches: expected one LayerCache per layer, got none")
        B = self.caches[0].lengths.shape[0]
        device = self.caches[0].lengths.device
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)  # static input (B, 1)
        self.logits: torch.Tensor | None = None  # static output (B, V) once captured
        self.graph = None
        self._compiled = None
        self._l1_hinted = False
        # room in the caches is checked on the host, outside the step: a host copy of the longest
        # row's length, re-read (one sync) only when something else changed the caches' lengths
        # (prefill, reset), which the lengths tensors' version counters reveal without a sync
        capacities = [cap for cap in (c.capacity() for c in self.caches) if cap is not None]
        self.capacity: int | None = min(capacities) if capacities else None
        self._held: int | None = None
        self._versions: tuple[int, ...] | None = None
        if mode == "cuda_graph":
            if device.type != "cuda" and not simulate:
                raise ValueError(
                    f"mode: 'cuda_graph' needs the caches on a CUDA device, they are on {device}; "
                    f"use mode='eager' (or simulate=True to test the capture protocol on a CPU)"
                )
            if bool((self.caches[0].lengths != 0).any()):
                raise ValueError(
                    "caches: 'cuda_graph' capture warms up on the caches and then resets them, so they "
                    "must be fresh (build the DecodeStep before prefill)"
                )
            self._capture(warmup, simulate)
        elif mode == "compile":
            # the decode kernels as custom ops the compiled step calls (without triton: torch paths)
            prepare_decode_kernels(device)
            for c in self.caches:
                for t in [c.lengths, *c.state_tensors().values()]:
                    torch._dynamo.mark_static_address(t)
            # fullgraph=True: the T == 1 paths of every layer have no host syncs and no data-dependent
            # shapes (room in the cache is checked here, on the host, see _check_room), so a graph
            # break would be a regression to fail loudly on, not a slow path to fall into silently
            self._compiled = torch.compile(self._forward, mode="reduce-overhead", fullgraph=True)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, self.caches)[:, -1].float()  # (B, 1, V) -> (B, V)

    @torch.no_grad()
    def _capture(self, warmup: int, simulate: bool) -> None:
        if simulate:
            for _ in range(max(1, warmup)):
                self.logits = self._forward(self.tokens)
        else:
            def step():  # logits (B, V) and, greedy, their argmax (B,): static buffers of the graph
                logits = self._forward(self.tokens)
                return logits, greedy_tokens(logits) if self.greedy else None

            self.graph, (self.logits, next_tokens) = capture_cuda_graph(step, warmup, prefer_l1)
            if self.greedy:
                self.next_tokens = next_tokens
        for c in self.caches:  # warm-up (and capture) wrote into the caches
            c.reset()

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [B] -> logits float32 [B, V] (a view of a static buffer in graph modes:
        read it before the next call)."""
        if self.mode == "eager":
            out = self._forward(tokens[:, None])
            self._hint_l1()
        else:
            self._check_room()
            self.tokens.copy_(tokens[:, None])
            if self.mode == "compile":
                torch.compiler.cudagraph_mark_step_begin()
                out = self._compiled(self.tokens).clone()
                self._hint_l1()  # (after the first call compiled the kernels, before a later one records)
            elif self.graph is None:  # simulated capture
                self.logits = out = self._forward(self.tokens)
            else:
                self.graph.replay()  # also fills next_tokens with greedy
                out = self.logits
            self._stepped()
        if self.greedy and self.graph is None:
            self.next_tokens = greedy_tokens(out)  # (B,)
        return out

    def _hint_l1(self) -> None:
        """prefer_l1 once the step's kernels are compiled (the first call, on CUDA)."""
        if not self._l1_hinted and self.tokens.is_cuda:
            prefer_l1()
            self._l1_hinted = True

    def _length_versions(self) -> tuple[int, ...] | None:
        try:
            return tuple(c.lengths._version for c in self.caches)
        except RuntimeError:  # inference-mode tensors keep no version counter: re-read every step
            return None

    def _check_room(self) -> None:
        """ValueError if some row's cache has no slot left for one more token (the layers skip this
        check inside a graph, where it would need a host sync)."""
        if self.capacity is None:
            return
        versions = self._length_versions()
        if self._held is None or versions is None or versions != self._versions:
            self._held = max(int(c.lengths.max()) for c in self.caches)  # one sync
        if self._held + 1 > self.capacity:
            raise ValueError(
                f"caches: a row holds {self._held} tokens and one more does not fit max_len={self.capacity}; "
                f"allocate the caches with a larger max_len"
            )

    def _stepped(self) -> None:
        if self.capacity is not None:
            self._held += 1
            self._versions = self._length_versions()


def decode_one_token(
    model: nn.Module,
    tokens: torch.Tensor,
    caches: Sequence[LayerCache],
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    step: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed one token per row (int64 [B]) and sample the next.

    Returns (next_tokens int64 [B], logits float32 [B, V]). ``step`` is a :class:`DecodeStep`
    over the same model and caches (None = an eager call); greedy decoding takes a
    ``DecodeStep(greedy=True)``'s own argmax (like the logits in the graph modes, a static buffer:
    read it before the next call).
    """
    tokens = check_tensor("tokens", tokens, ndim=1, layout="[B]", dtypes=INT_DTYPES).long()
    with torch.no_grad():
        logits = step(tokens) if step is not None else model(tokens[:, None], list(caches))[:, -1].float()
    if temperature == 0 and getattr(step, "next_tokens", None) is not None:
        check_sampling(temperature, top_k, top_p)
        return step.next_tokens, logits  # the step's own argmax (DecodeStep(greedy=True))
    return sample(logits, temperature, top_k, top_p, generator), logits


def decode_n_tokens(
    model: nn.Module,
    tokens: torch.Tensor,
    caches: Sequence[LayerCache],
    n: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_tokens: Iterable[int] = (),
    pad_token_id: int = 0,
    finished: torch.Tensor | None = None,
    step: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode up to ``n`` tokens after ``tokens`` (int64 [B], the last token of every row, not
    yet in the caches).

    A row that emits a token in ``stop_tokens`` (or is already ``finished``, bool [B]) stops:
    its later positions are ``pad_token_id`` (the model still steps it, with the pad token, so
    the batch keeps one shape). Decoding ends early once every row has stopped. ``on_token``
    is called with each new int64 [B] (for streaming). Returns new tokens int64 [B, m],
    m <= n, and with ``return_logits`` also their logits float32 [B, m, V].
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    B = tokens.shape[0]
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=tokens.device)
    if finished is None:
        finished = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    finished = finished.clone()
    new, logits_out = [], []
    cur = tokens.long()
    check_stops = stop.numel() > 0 or bool(finished.any())  # skip a host sync per token when nothing can stop
    for _ in range(n):
        if check_stops and bool(finished.all()):
            break
        nxt, logits = decode_one_token(model, cur, caches, temperature, top_k, top_p, generator, step)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        new.append(nxt)
        if return_logits:
            logits_out.append(logits.clone())
        if on_token is not None:
            on_token(nxt)
        finished |= torch.isin(nxt, stop)
        cur = nxt
    out = torch.stack(new, dim=1) if new else tokens.new_empty(B, 0).long()  # (B, m)
    if return_logits:
        V = logits_out[0].shape[-1] if logits_out else 0
        lg = torch.stack(logits_out, dim=1) if logits_out else torch.empty(B, 0, V)  # (B, m, V)
        return out, lg
    return out


# ----------------------------------------------------------------------------- generate
@dataclass
class GenerateStats:
    """Timing and memory of the last :func:`generate` call (``generate(..., stats=GenerateStats())``)."""

    prompt_tokens: int = 0  # summed over rows
    new_tokens: int = 0  # new tokens per row (the first comes from prefill's logits)
    prefill_s: float = 0.0  # prefill + sampling the first new token
    decode_s: float = 0.0  # the decode steps that produced new tokens 2..n
    cache_bytes: int = 0  # bytes allocated by the caches

    @property
    def decode_steps(self) -> int:
        return max(0, self.new_tokens - 1)

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second (one step = one token for every row)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def _normalise_prompt(
    prompt: torch.Tensor | Sequence[torch.Tensor], lengths: torch.Tensor | None
) -> tuple[torch.Tensor, list[int], str]:
    """-> (padded int64 [B, T], per-row lengths, output form 'tensor' | 'vector' | 'list')."""
    if isinstance(prompt, torch.Tensor):
        check_tensor("prompt", prompt, layout="[T] or [B, T]", dtypes=INT_DTYPES)
        if prompt.dim() == 1:
            if lengths is not None:
                raise ValueError("lengths: only for a padded [B, T] prompt, got a 1-D prompt")
            prompt, form = prompt[None], "vector"
        elif prompt.dim() == 2:
            form = "tensor" if lengths is None else "list"
        else:
            raise ValueError(f"prompt: expected 1 dim [T] or 2 dims [B, T], got shape {tuple(prompt.shape)}")
        B, T = prompt.shape
        if B == 0 or T == 0:
            raise ValueError(
                f"prompt: empty prompt (shape {tuple(prompt.shape)}); give at least one token per row"
            )
        if lengths is None:
            return prompt.long(), [T] * B, form
        lengths = check_tensor("lengths", lengths, ndim=1, layout="[B]", shape=(B,), dtypes=INT_DTYPES)
        lens = [int(x) for x in lengths.tolist()]
        if min(lens) < 1 or max(lens) > T:
            raise ValueError(
                f"lengths: expected every prompt length in [1, T={T}] (no empty prompts), got {lens}"
            )
        return prompt.long(), lens, form
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError("prompt: expected a tensor [B, T] or [T], or a non-empty list of 1-D tensors")
    if lengths is not None:
        raise ValueError("lengths: not used with a list of prompts (each tensor has its own length)")
    rows = []
    for i, p in enumerate(prompt):
        check_tensor(f"prompt[{i}]", p, ndim=1, layout="[T_i]", dtypes=INT_DTYPES)
        if p.numel() == 0:
            raise ValueError(f"prompt[{i}]: empty prompt; give at least one token")
        rows.append(p.long())
    lens = [r.numel() for r in rows]
    padded = torch.zeros(len(rows), max(lens), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        padded[i, : lens[i]] = r.to(padded.device)
    return padded, lens, "list"


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor | Sequence[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] | None = None,
    seed: int | None = None,
    prefill_chunk: int | None = None,
    lengths: torch.Tensor | None = None,
    pad_token_id: int = 0,
    max_len: int | None = None,
    cache_dtype: torch.dtype | None = None,
    decode_mode: str = "eager",
    on_token: Callable[[torch.Tensor], None] | None = None,
    stats: GenerateStats | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Prefill the prompt(s), then decode up to ``max_new_tokens`` tokens per row.

    prompt: int64 [B, T] (equal lengths), [T] (one sequence), a list of 1-D tensors, or a
    right-padded [B, T] with ``lengths`` int [B]. Greedy when temperature == 0, else sampled
    with top_k / top_p filtering from a ``torch.Generator`` seeded with ``seed`` (None = the
    global RNG). A row stops after emitting a token of ``stop_tokens``; generation ends when
    all rows have stopped. ``max_len`` is the cache capacity in tokens (default: longest
    prompt + max_new_tokens); caches are allocated once, in ``cache_dtype`` (None = the
    model's choice). ``decode_mode`` is "eager", "cuda_graph" or "compile" (see
    :class:`DecodeStep`). ``on_token(tokens int64 [B])`` is called for each new token of every
    row (streaming); ``stats`` (a :class:`GenerateStats`) is filled with timings and cache bytes.

    Returns prompt + new tokens: a [B, T + n] tensor for a [B, T] prompt, [T + n] for a [T]
    prompt (n <= max_new_tokens; stopped rows padded with ``pad_token_id``), and a list of 1-D
    tensors (prompt_b + new tokens_b, no padding) for a list or a padded prompt with lengths.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    check_mode(decode_mode, DECODE_MODES)
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk: expected None or an int >= 1, got {prefill_chunk!r}")
    tokens, lens, form = _normalise_prompt(prompt, lengths)
    B, T = tokens.shape
    vocab = model.cfg.vocab_size
    for b in range(B):
        _check_tokens("prompt", tokens[b, : lens[b]], vocab)
    stop_list = sorted({int(s) for s in (stop_tokens or ())})
    for s in stop_list:
        if not 0 <= s < vocab:
            raise ValueError(f"stop_tokens: token id {s} is outside [0, vocab_size={vocab})")
    if not 0 <= pad_token_id < vocab:
        raise ValueError(f"pad_token_id: expected an id in [0, vocab_size={vocab}), got {pad_token_id}")
    if max_len is None:
        max_len = T + max_new_tokens
    if T > max_len:
        raise ValueError(f"prompt: {T} tokens is longer than max_len={max_len}")
    if T + max_new_tokens > max_len:
        raise ValueError(
            f"max_new_tokens: prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_len={max_len}"
        )
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    caches = model.new_caches(B, max_len, device=device, dtype=cache_dtype)
    step = None
    if decode_mode != "eager" and max_new_tokens > 1:
        step = DecodeStep(model, caches, decode_mode, greedy=temperature == 0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    new = torch.empty(B, 0, dtype=torch.long, device=device)
    if max_new_tokens > 0:
        lens_t = torch.tensor(lens, dtype=torch.long)
        last_logits = prefill(model, tokens, caches, prefill_chunk, lengths=lens_t)  # (B, V)
        first = sample(last_logits, temperature, top_k, top_p, generator)  # (B,)
        sync()
        t1 = time.perf_counter()
        if on_token is not None:
            on_token(first)
        stop_t = torch.tensor(stop_list, dtype=torch.long, device=device)
        finished = torch.isin(first, stop_t)
        rest = decode_n_tokens(
            model, first, caches, max_new_tokens - 1, temperature, top_k, top_p, generator,
            stop_list, pad_token_id, finished, step, on_token,
        )
        new = torch.cat([first[:, None], rest], dim=1)  # (B, n)
        sync()
        t2 = time.perf_counter()
    else:
        t1 = t2 = t0
    if stats is not None:
        stats.prompt_tokens = sum(lens) if max_new_tokens > 0 else 0
        stats.new_tokens = new.shape[1]
        stats.prefill_s, stats.decode_s = t1 - t0, t2 - t1
        stats.cache_bytes = cache_nbytes(caches)

    if form == "tensor":
        return torch.cat([tokens, new], dim=1)  # (B, T + n)
    if form == "vector":
        return torch.cat([tokens[0], new[0]])  # (T + n,)
    out = []
    for b in range(B):
        row = new[b]
        hit = torch.isin(row, torch.tensor(stop_list, dtype=torch.long, device=device)).nonzero()
        if hit.numel():
            row = row[: int(hit[0, 0]) + 1]
        out.append(torch.cat([tokens[b, : lens[b]], row]))
    return out


# ----------------------------------------------------------------------------- CLI
def _parse_ids(text: str, name: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        msg = f"{name}: expected integer token ids separated by spaces or commas, got {text!r}"
        raise ValueError(msg) from None


def _load_model(args):
    from .config import ModelConfig
    from .model import HybridLM

    if (args.checkpoint is None) == (args.preset is None):
        raise ValueError("give either a checkpoint directory or --preset NAME (not both, not neither)")
    if args.checkpoint is not None:
        from .train import find_checkpoint  # a save_pretrained dir, a trainer checkpoint or run dir

        return HybridLM.from_pretrained(find_checkpoint(args.checkpoint))
    torch.manual_seed(args.seed if args.seed is not None else 0)
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set: expected FIELD=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return HybridLM(ModelConfig.preset(args.preset, **overrides))


def _run_cli(args) -> int:

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    model = _load_model(args)
    model = model.to(device=args.device, dtype=dtypes[args.dtype]).eval()
    vocab = model.cfg.vocab_size
    byte_level = vocab == 256
    if args.prompt is not None and args.prompt_ids is not None:
        raise ValueError("give --prompt (text) or --prompt-ids, not both")
    if args.prompt_ids is not None:
        ids = _parse_ids(args.prompt_ids, "--prompt-ids")
    elif args.prompt is not None:
        if vocab < 256:
            raise ValueError(
                f"--prompt: text becomes bytes, which needs vocab_size >= 256 (the model has {vocab}); "
                f"pass --prompt-ids instead"
            )
        ids = list(args.prompt.encode("utf-8"))
    else:
        ids = list(b"The ") if vocab >= 256 else [1]
    if not ids:
        raise ValueError("--prompt: empty prompt; give at least one token")
    stop = _parse_ids(args.stop, "--stop") if args.stop else []
    prompt = torch.tensor(ids, dtype=torch.long)

    out = sys.stdout
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stopped = [False]

    def show(tok_ids: list[int]) -> None:
        if byte_level:
            out.write(utf8.decode(bytes(tok_ids)))
        else:
            out.write("".join(f"{t} " for t in tok_ids))
        out.flush()

    def on_token(tokens: torch.Tensor) -> None:
        if stopped[0]:
            return
        t = int(tokens[0])
        show([t])
        stopped[0] = t in stop

    show(ids)
    stats = GenerateStats()
    generate(
        model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        stop_tokens=stop, seed=args.seed, prefill_chunk=args.prefill_chunk, decode_mode=args.decode_mode,
        on_token=on_token, stats=stats,
    )
    if byte_level:
        out.write(utf8.decode(b"", final=True))
    out.write("\n")
    out.flush()
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    pf = stats.prompt_tokens / stats.prefill_s if stats.prefill_s > 0 else float("nan")
    # gpt-fast's figure: every decode step reads all weights (a lower bound on bytes moved)
    read = weight_bytes * stats.decode_tokens_per_s / 1e9
    print(
        f"[{n_params / 1e6:.2f}M params, {args.dtype}, {args.device}] prompt {stats.prompt_tokens} tokens "
        f"({pf:.1f} tokens/s prefill), {stats.new_tokens} new tokens, decode {stats.decode_tokens_per_s:.1f} "
        f"tokens/s (>= {read:.2f} GB/s of weights read), cache {human_bytes(stats.cache_bytes, digits=2)} "
        f"for {len(ids) + args.max_new_tokens} tokens",
        file=sys.stderr,
    )
    return 0


def add_cli(subparsers) -> None:
    """Register ``attnlab generate``."""
    p = subparsers.add_parser(
        "generate",
        help="generate tokens from a checkpoint or a randomly initialised preset, streaming them",
        description="Prefill a prompt and decode with per-layer caches, streaming tokens to stdout; prints "
        "tokens/s and cache memory to stderr. Tokens are integer ids; a model with vocab_size 256 is "
        "byte-level, so --prompt text is UTF-8 bytes and output is shown as text.",
    )
    p.add_argument("checkpoint", nargs="?", help="a HybridLM.save_pretrained dir, or a trainer run dir")
    p.add_argument("--preset", help="build this preset with random weights instead of loading a checkpoint")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a preset config field")
    p.add_argument("--prompt", help="prompt text (UTF-8 bytes as token ids; needs vocab_size >= 256)")
    p.add_argument("--prompt-ids", help="prompt as token ids, e.g. '1 2 3'")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", help="stop token ids, e.g. '0 10'")
    p.add_argument("--prefill-chunk", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--decode-mode", choices=DECODE_MODES, default="eager")
    p.set_defaults(func=_run_cli)
