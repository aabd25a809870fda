"""The fused decode step: a block in five to eight kernel launches instead of ~20.

A batch-1 decode step of a ~1B model reads ~1.5 GB of weights, ~0.5 ms at 3 TB/s, but the plain
step also launches ~20 small kernels per layer (norms, casts, SiLU·mul, RoPE, cache scatters,
residual adds, gate math), each a few microseconds even inside a CUDA graph: on an H100 those cost
more than the GEMVs did (benchmarks/RESULTS.md, "decode latency"). Here the small work moves into
the kernels around it:

- the RMSNorm in front of every projection, SwiGLU's ``silu(gate) * up``, the gated attention's
  ``o * sigmoid(gate)`` and the residual add run as the prologue / epilogue of one Triton GEMV
  (:mod:`attnlab.kernels.gemv`) — the normed activations never go to memory;
- a softmax layer's q/k norm, RoPE and the k, v cache write are one launch
  (:mod:`attnlab.kernels.rope_cache`), then the split-K decode kernel;
- a GDN / KDA layer's conv step, gates, L2 norms, recurrence step and gated output norm are one
  launch (:mod:`attnlab.kernels.delta_decode`);
- a Lightning (L) layer's SiLU over q|k|v and recurrence step are one launch
  (:mod:`attnlab.kernels.lightning_decode`); its output RMSNorm (over all heads) and sigmoid gate are
  the output projection's GEMV prologue;
- an MLA layer's latent norm, both RoPEs, the latent cache write, the absorbed query's assembly
  (W_UK^T q_nope included, FOLD_ABSORB_Q) and the token count are one launch
  (:mod:`attnlab.kernels.latent_cache`); W_UV o_lat after the attention is one more
  (:mod:`attnlab.kernels.absorb`, which also has the separate q absorption); for a DSA
  layer the same launch also LayerNorms, rotates and caches the indexer key, rotates the indexer
  query and scales its head weights (the indexer's projections ride in the same GEMVs).

Llama-style block: norm+qkv GEMV, RoPE+cache write, attention (split + combine, which also counts
the token), o-proj GEMV+residual, norm+gate/up GEMV, SiLU·mul+down GEMV+residual. GDN block: norm+in_proj
GEMV, the fused step (which also counts the token), out GEMV+residual, the two MLP GEMVs. DSA block: MLA's
GEMVs and latent write (with the indexer's part), then index scores, top-k and the sparse absorbed attention
over the whole cache bounded by each row's length (no host sync), W_UV, o-proj GEMV+residual; on short
caches the latent write also zeroes the top-k's scratch and the index scores add its first histogram
level into it (INDEX_PREFILL_TOPK). Lightning
block: norm+in_proj GEMV, the fused step (which also counts the token), norm+gate+out GEMV+residual, the
two MLP GEMVs.

Postnorm blocks (MiniMax-01: the residual each branch adds into is the branch's NORMED input,
``h <- alpha * norm(h) + beta * f(norm(h))``) take the same kernels: the first GEMV of each branch
already computes norm(h) in every program for its prologue, and one of its programs writes it out
(``x_hat_out``); the branch's last GEMV adds into that. The mixer's normed input goes to a new
buffer, which then holds the stream; the MLP's normed input is written back into h (no longer read),
which its down projection then adds into.

Taken only for inference (no gradient, not while torch.compile traces: inductor fuses the plain
step itself) on CUDA tensors — or CPU tensors under ``TRITON_INTERPRET=1`` with ``ON_CPU_INTERPRETER``
set, which is how the CPU tests run it — with a prenorm block whose outputs no hook watches.
``ATTNLAB_FUSED_DECODE=0`` (or ``attnlab.layers.fused.ENABLED = False``) turns it off. Every kernel
has a torch reference with the same semantics; the step's logits are tested against the plain step's
(tests/test_fused_decode.py).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from .. import ops
from .attention import SlidingKVCache, SoftmaxAttention
from .common import Residual
from .deltanet import DeltaRuleMixer
from .lightning import LightningAttention
from .mla import DeepSeekSparseAttention, MultiHeadLatentAttention

ENABLED = os.environ.get("ATTNLAB_FUSED_DECODE", "1") != "0"
# M / D: W_UK^T q_nope computed inside latent_write's launch (extra programs) instead of its own
# absorb_q launch before it (one launch fewer per layer; False: the separate kernel, to compare)
FOLD_ABSORB_Q = os.environ.get("ATTNLAB_FOLD_ABSORB_Q", "1") != "0"
# D: the index-scores launch zeroes the top-k's buffers (no fill launch between the two); False: the
# ops' calls, with the top-k's own fill launch, to compare on a GPU
INDEX_TOPK_SCRATCH = True
# D: ... and with this, the latent-write launch zeroes them instead, so that the index scores can add the
# top-k's first histogram level (and its 16-bit histogram) of the scores they write: the top-k starts
# past that pass (one launch fewer on the multi-program path, one row barrier fewer on the fused one);
# False: the index scores zero them, the top-k counts its first level itself, to compare on a GPU.
# H200, 2026-11-28, the ~1B deepseek-v32 step at 4K, best of 2, ms, prefilled / not: 0.9148 / 0.9334,
# 0.9176 / 0.9339 (benchmarks/results/decode_ab_h200_prefill_topk.json, ..._level0_adds.json)
INDEX_PREFILL_TOPK = True
# ... for caches of at most this many slots (the fused top-k's rows); longer ones keep the top-k's own
# first pass. There the index scores' per-block tl.histogram costs more than the launch it saves: same
# card and step, 32K 1.0219 / 1.0083, 128K 1.1732 / 1.1649 (the multi-program passes from level 1; a
# 32K timeline: index scores 7.4 us exposed a layer against 5.2, the level-0 pass it saves 1.7,
# decode_timeline_h200_prefill.json); the fused top-k at 32K, prefilled, 1.0595 / 1.0715
INDEX_PREFILL_MAX_S = 12 * 1024
# D: a kernel of the attention stretch asks L2 for the first bytes of the block's MLP gate|up weight while
# DRAM is otherwise idle: the sparse attention (caches up to attnlab.kernels.sparse.PREFETCH_NEXT_MAX_ROWS
# rows) or the top-k's first multi-program pass (longer ones, TOPK_PREFETCH_BYTES); False: neither
PREFETCH_MLP = True
# CPU tensors take the fused path only when a test asks for it (under TRITON_INTERPRET=1): the other
# interpreter tests check the plain step's kernels
ON_CPU_INTERPRETER = False
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_HAVE_TRITON = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def usable(h: torch.Tensor) -> bool:
    """Whether a decode step over hidden states h [B, 1, d_model] may take the fused kernels."""
    return (
        ENABLED and _HAVE_TRITON and h.dim() == 3 and h.shape[1] == 1 and h.dtype in _DTYPES
        and (h.is_cuda or (_INTERPRET and ON_CPU_INTERPRETER and h.device.type == "cpu"))
        and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        and h.shape[0] <= _gemv_module().MAX_ROWS
    )


def _gemv_module():
    from ..kernels import gemv

    return gemv


def gemv(x: torch.Tensor, weight: torch.Tensor, **kwargs) -> torch.Tensor:
    """:func:`attnlab.kernels.gemv.gemv` (x [M, K] -> [M, N]; prologue / residual keywords there)."""
    return _gemv_module().gemv(x, weight, **kwargs)


def _norm_args(norm) -> dict:
    """The GEMV prologue keywords that apply RMSNorm module ``norm`` (attnlab.layers.common.RMSNorm)."""
    return dict(prologue="rmsnorm", norm_weight=norm.weight, norm_eps=norm.eps,
                norm_zero_centered=norm.zero_centered)


# ----------------------------------------------------------------------------- mixers


def _softmax(attn: SoftmaxAttention, io: _Stream, norm, cache, rotation, keep: float,
             scale: float) -> None:
    """S / W decode step, from io.x into io.res (:class:`_Stream`)."""
    from ..kernels.decode import gqa_decode_advance
    from ..kernels.rope_cache import rope_write

    B = io.x.shape[0]
    H, D = attn.n_heads, attn.head_dim
    weight = attn.qkv.weight()
    if weight is None:
        raise ValueError("attn: the fused decode step needs the fused q|k|v weight (FusedLinears)")
    qkv = gemv(io.x, weight, **_norm_args(norm), x_hat_out=io.x_hat)  # (B, W)
    q, gate = rope_write(attn, qkv, cache, rotation)  # (B, H, D) each; k, v written to the cache
    if cache.k.dtype == q.dtype:
        # attends to the new token's slot too, then counts it (lengths += 1) in the same launches; a
        # ring buffer holds at most its S_max = window + sinks slots, where the kernel caps the count
        o = gqa_decode_advance(q, cache.k, cache.v, cache.lengths)  # (B, H, D)
    else:
        cache.lengths += 1
        n_valid = cache.lengths
        if isinstance(cache, SlidingKVCache):
            n_valid = torch.clamp(n_valid, max=cache.window + cache.sink_tokens)
        o = ops.softmax_decode(q, cache.k.to(q.dtype), cache.v.to(q.dtype), n_valid)  # (B, H, D)
    o = o.reshape(B, H * D)  # (B, H*D)
    if gate is None:
        gemv(o, attn.o_proj.weight, residual=io.res, keep=keep, scale=scale)
    else:
        gate = gate.reshape(B, H * D)  # (B, H*D): rope_write stores the gate contiguous
        gemv(o, attn.o_proj.weight, prologue="sigmoid_gate", gate=gate, residual=io.res, keep=keep,
             scale=scale)


def _delta(mixer: DeltaRuleMixer, io: _Stream, norm, cache, keep: float, scale: float) -> None:
    """G / K decode step, from io.x into io.res."""
    from ..kernels.delta_decode import delta_decode

    proj = gemv(io.x, mixer.in_proj.weight, **_norm_args(norm), x_hat_out=io.x_hat)  # (B, sum(in_sizes))
    # K: the gates' up-projections (f_b_proj, g_b_proj) run inside the kernel (f_up = g_up = None)
    o = delta_decode(mixer, proj, cache, count_token=True)  # (B, H*D_v); caches stepped
    gemv(o, mixer.o_proj.weight, residual=io.res, keep=keep, scale=scale)


def _lightning(mixer: LightningAttention, io: _Stream, norm, cache, keep: float, scale: float) -> None:
    """L decode step, from io.x into io.res: the step kernel, then the output norm (over all heads)
    and the sigmoid gate as the out projection's prologue."""
    from ..kernels.lightning_decode import lightning_decode

    proj = gemv(io.x, mixer.in_proj.weight, **_norm_args(norm), x_hat_out=io.x_hat)  # (B, 4*H*D)
    o = lightning_decode(mixer, proj, cache, count_token=True)  # (B, H*D); state stepped
    gate = proj[:, 3 * mixer.n_heads * mixer.head_dim :]  # (B, H*D), a strided view of the gate columns
    norm_out = mixer.norm
    gemv(o, mixer.out_proj.weight, prologue="rmsnorm_sigmoid_gate", norm_weight=norm_out.weight,
         norm_eps=norm_out.eps, norm_zero_centered=norm_out.zero_centered, gate=gate, residual=io.res,
         keep=keep, scale=scale)


def _latent_rows(mla: MultiHeadLatentAttention, io: _Stream, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """The projections of an M / D decode step: (q [B, N_q] the unrotated query row — MLA's heads,
    then D's indexer query heads —, kv [B, N_kv] the rest of x_proj's row: [c_kv | k_pe], then D's
    indexer [key | head weights]), in one GEMV per input (x; with q LoRA, the normed q latent)."""
    n_q = mla.n_heads * (mla.nope_dim + mla.rope_dim)
    if isinstance(mla, DeepSeekSparseAttention):  # x_proj / q_up hold the indexer's projections too
        n_q += mla.index_n_heads * mla.index_head_dim
    # (B, [q | q latent] + N_kv)
    row = gemv(io.x, mla.x_proj.weight(), **_norm_args(norm), x_hat_out=io.x_hat)
    if mla.q_lora_rank is None:
        return row[:, :n_q], row[:, n_q:]
    q = gemv(row[:, : mla.q_lora_rank], mla.q_up.weight(), **_norm_args(mla.q_a_norm))  # (B, N_q)
    return q, row[:, mla.q_lora_rank :]


def _absorbed_query(mla: MultiHeadLatentAttention, q: torch.Tensor) -> torch.Tensor | None:
    """W_UK^T q_nope per head from the query row q [B, N_q] -> q_lat [B, H, R] (one Triton launch), or
    None with FOLD_ABSORB_Q: latent_write computes it in its own launch."""
    from ..kernels import absorb

    if FOLD_ABSORB_Q:
        return None
    B = q.shape[0]
    H, dn, dr, R = mla.n_heads, mla.nope_dim, mla.rope_dim, mla.kv_lora_rank
    w = mla.kv_b_proj.weight.view(H, dn + mla.v_head_dim, R)
    q_nope = q[:, : H * (dn + dr)].view(B, H, dn + dr)[..., :dn]  # (B, H, dn)
    return absorb.absorb_q(q_nope, w[:, :dn])  # (B, H, R)


def _output(mla: MultiHeadLatentAttention, o_lat: torch.Tensor, res: torch.Tensor, keep: float,
            scale: float) -> None:
    """W_UV on the weighted latents o_lat [B, H, R] (one Triton launch), then o_proj adding into
    res [B, d_model]."""
    from ..kernels import absorb

    B = o_lat.shape[0]
    H, dn, dv, R = mla.n_heads, mla.nope_dim, mla.v_head_dim, mla.kv_lora_rank
    w = mla.kv_b_proj.weight.view(H, dn + dv, R)
    o = absorb.unabsorb_o(o_lat.contiguous(), w[:, dn:])  # (B, H, dv): W_UV o_lat
    gemv(o.reshape(B, H * dv), mla.o_proj.weight, residual=res, keep=keep, scale=scale)


def _latent(mla: MultiHeadLatentAttention, io: _Stream, norm, cache, rotation, keep: float,
            scale: float) -> None:
    """M (absorbed MLA) decode step, from io.x into io.res."""
    from ..kernels.latent_cache import latent_write

    R = mla.kv_lora_rank
    q, kv = _latent_rows(mla, io, norm)  # (B, H*(dn+dr)), (B, R + dr)
    # (B, H, R + dr); the row cached at slot lengths[b], then the token counted (lengths += 1) in the
    # same launch: the attention sees the new length, as the layer's own decode step counts it first
    q_abs = latent_write(mla, q, kv, _absorbed_query(mla, q), cache, rotation, count_token=True)
    lat = cache.latent if cache.latent.dtype == q_abs.dtype else cache.latent.to(q_abs.dtype)
    o_lat = ops.softmax_decode(q_abs, lat, lat[..., :R], cache.lengths, scale=mla.scale)  # (B, H, R)
    _output(mla, o_lat, io.res, keep, scale)


def _sparse_latent(dsa: DeepSeekSparseAttention, io: _Stream, norm, cache, rotation, keep: float,
                   scale: float, prefetch: torch.Tensor | None = None) -> None:
    """D (DeepSeek Sparse Attention) decode step, from io.x into io.res: M's step with
    the indexer's projections inside the same GEMVs and its key / query post-processing inside the
    latent-write launch, then index scores, top-k and the sparse absorbed attention over the WHOLE
    cache with each row's length as its bound (no host sync: CUDA-graph safe). Positions past a
    row's length score -inf and are never chosen, so this selects what the layer's own decode step
    (which scores the first max(lengths) slots) selects. ``prefetch``: weights the block reads next
    (its MLP's gate|up), which the top-k or the sparse attention asks L2 for (PREFETCH_MLP)."""
    from ..kernels.latent_cache import latent_write
    from ..ops.softmax import _sparse_kernel

    R = dsa.kv_lora_rank
    prefetch = prefetch if PREFETCH_MLP else None
    q, kv = _latent_rows(dsa, io, norm)  # (B, H*(dn+dr) + H_I*D_I), (B, R + dr + D_I + H_I)
    # the top-k's scratch; prefill: zeroed by latent_write, the index scores add to it
    scratch, prefill = _topk_scratch(dsa, q, cache)
    q_abs, q_idx, w = latent_write(dsa, q, kv, _absorbed_query(dsa, q), cache, rotation, count_token=True,
                                   zero=scratch if prefill else None)
    # q_abs (B, H, R + dr), q_idx (B, H_I, D_I), w float32 (B, H_I); latent row and indexer key cached,
    # then the token counted in the same launch (lengths += 1): the rows include it before scoring, as
    # the layer counts it
    dtype = q_abs.dtype
    keys = cache.index_keys if cache.index_keys.dtype == dtype else cache.index_keys.to(dtype)
    idx = _index_topk(q_idx[:, None], keys, w[:, None], cache.lengths, dsa.index_topk, prefetch, scratch,
                      prefill)  # (B, 1, k)
    lat = cache.latent if cache.latent.dtype == dtype else cache.latent.to(dtype)  # (B, S_max, 1, R + dr)
    kernel = None
    if prefetch is not None:
        kernel = _sparse_kernel("auto", "sparse_attention", q_abs)  # kernels.sparse.sparse_attention or None
    if kernel is not None:  # the kernel itself, given the weights to prefetch
        o_lat = kernel(q_abs[:, None], lat, lat[..., :R], idx, scale=dsa.scale, prefetch=prefetch)
    else:
        o_lat = ops.sparse_attention(q_abs[:, None], lat, lat[..., :R], idx, scale=dsa.scale)  # (B, 1, H, R)
    _output(dsa, o_lat[:, 0], io.res, keep, scale)


def _topk_scratch(dsa: DeepSeekSparseAttention, q: torch.Tensor, cache) -> tuple[torch.Tensor | None, bool]:
    """A D decode step's top-k scratch (int32, uninitialised) and whether it is prefilled: None when the
    index scores and the top-k are not both Triton kernels here (INDEX_TOPK_SCRATCH off, or not what
    "auto" picks for q's dtype and device) or the top-k's path takes none; prefilled (the latent-write
    launch zeroes it, the index scores add the first histogram level) with INDEX_PREFILL_TOPK on
    caches of at most INDEX_PREFILL_MAX_S slots, else the index scores zero it."""
    from ..ops.softmax import _sparse_kernel

    if not INDEX_TOPK_SCRATCH or _sparse_kernel("auto", "dsa_index_scores", q) is None:
        return None, False
    from ..kernels import sparse as ks

    S = cache.index_keys.shape[1]
    n = ks.topk_scratch_numel(q.shape[0], 1, S, min(dsa.index_topk, S), q.device)
    if not n:
        return None, False
    return torch.empty(n, dtype=torch.int32, device=q.device), INDEX_PREFILL_TOPK and S <= INDEX_PREFILL_MAX_S


def _index_topk(q_idx: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, lengths: torch.Tensor,
                index_topk: int, prefetch: torch.Tensor | None = None, scratch: torch.Tensor | None = None,
                prefilled: bool = False) -> torch.Tensor:
    """A D decode step's selection: the indexer's scores of q_idx [B, 1, H_I, D_I] (head weights w
    [B, 1, H_I]) over the cached keys [B, S_max, D_I] (positions past each row's length -inf), then
    their top min(index_topk, S_max) positions, unsorted (the attention sums over the set; on CUDA the
    positions in position order, one pass fewer): int64 [B, 1, k], -1 = empty. When both run as Triton
    kernels (what "auto" picks: CUDA bf16 / fp16), the index-scores launch also zeroes the top-k's
    buffers (``scratch``, from :func:`_topk_scratch`), so no fill launch sits between the two; or, when
    ``prefilled`` (the launch before zeroed it), add the top-k's first histogram level into them;
    ``prefetch``: dsa_topk's."""
    from ..ops.softmax import _sparse_kernel

    k = min(index_topk, keys.shape[1])
    if not INDEX_TOPK_SCRATCH or _sparse_kernel("auto", "dsa_index_scores", q_idx) is None:
        scores = ops.dsa_index_scores(q_idx, keys, w, n_valid=lengths)  # (B, 1, S_max)
        return ops.dsa_topk(scores, k, causal=False, sort=False)
    from ..kernels import sparse as ks

    into = dict(topk_scratch=scratch, topk=k) if prefilled else dict(zero=scratch)
    scores = ks.dsa_index_scores(q_idx, keys, w, n_valid=lengths, **into)  # (B, 1, S_max) float32
    return ks.dsa_topk(scores, k, causal=False, sort=False, scratch=scratch, prefetch=prefetch,
                       prefilled=prefilled)


def _fused_latent(mixer) -> bool:
    """An M or D layer whose projections are fused (one weight per input)."""
    return (isinstance(mixer, MultiHeadLatentAttention) and mixer.x_proj.weight() is not None
            and (mixer.q_lora_rank is None or mixer.q_up.weight() is not None))


def _fused_kind(mixer) -> str | None:
    """Which fused mixer step ``mixer`` takes ("softmax", "delta", "lightning", "latent", "sparse"), or
    None (an unfused M / D layer, or projections not fused into one weight)."""
    if isinstance(mixer, SoftmaxAttention):
        return "softmax" if mixer.qkv.weight() is not None else None
    if isinstance(mixer, DeltaRuleMixer):
        return "delta"
    if isinstance(mixer, LightningAttention):
        return "lightning"
    if _fused_latent(mixer):
        return "sparse" if isinstance(mixer, DeepSeekSparseAttention) else "latent"
    return None


def _takes_fused_block(block, kind: str | None, gate_up: torch.Tensor | None) -> bool:
    """Whether ``block``'s step takes the fused kernels, given its mixer's :func:`_fused_kind` and its
    MLP's fused gate|up weight: not when a hook watches it; a postnorm block only when both exist
    (every GEMV must write the normed stream the next one adds into)."""
    if block.watched():
        return False
    return not block.postnorm or (kind is not None and gate_up is not None)


def computes_rope(block) -> bool:
    """Whether ``block``'s fused decode step rotates q and k with angles its kernel computes (S / W
    through rope_write, M and D through latent_write): then the step's shared RoPE tables are not
    needed."""
    kind = _fused_kind(block.mixer)
    return kind in ("softmax", "latent", "sparse") and _takes_fused_block(
        block, kind, block.mlp.gate_up.weight())


@dataclass
class _Stream:
    """Where a branch of a fused block reads and adds: its first GEMV normalises ``x`` (and writes the
    normed row to ``x_hat`` if given: a postnorm block's residual), its last GEMV adds into ``res``."""

    x: torch.Tensor
    res: torch.Tensor
    x_hat: torch.Tensor | None = None


def block_step(block, h: torch.Tensor, cache, rotation=None) -> bool:
    """One decode step of ``block`` (an :class:`attnlab.model.Block`) over h [B, 1, d_model], added
    into h in place (prenorm: ``h + f(norm(h))`` per branch; postnorm: ``alpha * norm(h) + beta *
    f(norm(h))``). ``rotation``: the step's RoPE factors for this block's mixer (or None). Returns
    False (h untouched) when the block does not take the fused path (:func:`_takes_fused_block`)."""
    mixer, keep, scale = block.mixer, block.mixer_alpha, block.mixer_beta
    kind, gate_up = _fused_kind(mixer), block.mlp.gate_up.weight()
    if not _takes_fused_block(block, kind, gate_up):
        return False
    h2 = h.view(h.shape[0], h.shape[2])  # (B, d_model): h is contiguous, the residual stream
    if block.postnorm:  # norm(h) written by the mixer's first GEMV, then the stream its output adds into
        normed = torch.empty_like(h2)
        io = _Stream(x=h2, res=normed, x_hat=normed)
    else:
        io = _Stream(x=h2, res=h2)
    if kind == "softmax":
        _softmax(mixer, io, block.mixer_norm, cache, rotation, keep, scale)
    elif kind == "delta":
        _delta(mixer, io, block.mixer_norm, cache, keep, scale)
    elif kind == "lightning":
        _lightning(mixer, io, block.mixer_norm, cache, keep, scale)
    elif kind == "sparse":
        _sparse_latent(mixer, io, block.mixer_norm, cache, rotation, keep, scale, prefetch=gate_up)
    elif kind == "latent":
        _latent(mixer, io, block.mixer_norm, cache, rotation, keep, scale)
    else:  # unfused M / D (prenorm only): their own decode step behind a plain norm, adding into h
        kwargs = {} if rotation is None else {"rotation": rotation}
        mixer(block.mixer_norm(h), cache, residual=Residual(h, keep, scale), **kwargs)
    mlp = block.mlp
    if gate_up is None:  # prenorm only
        mlp(block.mlp_norm(h), Residual(h, block.mlp_alpha, block.mlp_beta))
        return True
    # postnorm: the stream is io.res; its norm goes back into h2, which the down projection adds into
    x_hat_out = h2 if block.postnorm else None
    if _gemv_module().MLP_SWIGLU_EPILOGUE:
        act = gemv(io.res, gate_up, **_norm_args(block.mlp_norm), x_hat_out=x_hat_out,
                   epilogue="silu_mul")  # (B, d_ff): silu(gate) * up
        gemv(act, mlp.down_proj.weight, residual=h2, keep=block.mlp_alpha, scale=block.mlp_beta)
        return True
    gu = gemv(io.res, gate_up, **_norm_args(block.mlp_norm), x_hat_out=x_hat_out)  # (B, 2 * d_ff)
    gemv(gu, mlp.down_proj.weight, prologue="silu_mul", residual=h2, keep=block.mlp_alpha,
         scale=block.mlp_beta)  # [gate | up] -> added into h2
    return True


def head_step(model, h: torch.Tensor) -> torch.Tensor:
    """The final norm and LM head of a decode step: h [B, 1, d_model] -> float32 logits [B, 1, vocab]."""
    h2 = h.view(h.shape[0], h.shape[2])  # (B, d_model)
    logits = gemv(h2, model.lm_head.weight, **_norm_args(model.norm), out_dtype=torch.float32)  # (B, vocab)
    return logits[:, None]  # (B, 1, vocab)


__all__ = ["ENABLED", "block_step", "computes_rope", "gemv", "head_step", "usable"]
