"""Ops per decode step: how many kernels one batch-1 decode token launches, per layer type. CPU only.

    python benchmarks/decode_ops.py                          # llama, qwen3-next, kimi-linear, minimax-01
    python benchmarks/decode_ops.py --presets llama --ops    # and which aten ops each part runs
    python benchmarks/decode_ops.py --branch torch           # the CPU path instead of the CUDA one
    python benchmarks/decode_ops.py --presets deepseek-v3,deepseek-v32   # the M and D layers

Each preset is built at a small size (d_model 1024 by default: 16 heads of 64, so that the softmax
layers have more than one kv head and take the GQA path the ~1B presets take), a few tokens are
prefilled, and ONE decode step (:class:`attnlab.generate.DecodeStep`, eager, under ``no_grad``) runs
under a ``TorchDispatchMode`` that records every aten op and which part of the model ran it.

What counts as a kernel: every aten op that reaches the dispatcher except the FREE ones below
(metadata only: views, reshapes, transposes, allocations without a fill). Inside a CUDA graph each
counted op is (at least) one kernel launch of a few µs; a few aten ops launch more than one kernel
on CUDA (SDPA, some reductions), so the counts are a floor on launches, not an exact figure.

The branch (``--branch``): on a GPU, in bf16/fp16, ``DecodeStep`` runs Triton kernels where the CPU
runs torch code: ``ops.*_step(mode="auto")`` takes the fused linear-attention step
(``attnlab.kernels.linear``), ``ops.softmax_decode`` the split-K GQA kernel
(``attnlab.kernels.decode.gqa_decode``) or, for one kv head (MLA), the latent kernel. ``--branch cuda``
(the default) makes the CPU take those same branches: the ops' kernel resolvers are patched to return
the real kernel wrappers, whose host-side torch code (checks, ``.contiguous()`` copies, output
allocation) runs and is counted as it would be on the GPU; only the Triton launches themselves are
replaced by stand-ins that count one kernel per launch (the linear step: 1; GQA decode: split + combine
= 2; the latent decode: counted as 2, its attention + combine launches) and compute the same result in
torch with counting paused. ``F.rms_norm`` counts as the one fused kernel CUDA runs
(``aten::_fused_rms_norm``; the CPU build decomposes it into eight ops) when input and weight share a
dtype. The step's host checks that ``in_graph()`` skips inside a CUDA graph
(token range, cache room) are skipped here too. ``--branch fused`` (the default) adds the fused decode
step a CUDA step takes (attnlab.layers.fused: GEMVs with norm / SiLU·mul / gate prologues and residual
epilogues, one RoPE + cache-write launch, one GDN/KDA/Lightning step launch; see ``_fused_branch``);
``--branch cuda`` is the step without it (``ATTNLAB_FUSED_DECODE=0``). ``--branch torch`` counts the plain
CPU path.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnlab
from attnlab import ModelConfig, ops
from attnlab.generate import DecodeStep, prefill
from attnlab.model import HybridLM

# aten ops that launch no kernel: views and metadata changes, and allocations that are not filled
# (inside a CUDA graph an allocation is a pointer into the graph's memory pool)
FREE_OPS = frozenset({
    "alias", "as_strided", "detach", "diagonal", "empty", "empty_like", "empty_strided", "expand",
    "lift_fresh", "narrow", "new_empty", "new_empty_strided", "permute", "_reshape_alias", "reshape",
    "select", "slice", "split", "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unflatten",
    "unfold", "unsqueeze", "view", "_unsafe_view", "view_as", "view_as_real", "view_as_complex",
})
# ops that read a tensor's value on the host: forbidden in a CUDA-graphed step
HOST_SYNC_OPS = frozenset({"_local_scalar_dense", "item", "equal", "is_nonzero"})

PARTS = ("norms", "mixer", "mlp", "residual")  # of a block; "norms" = mixer_norm + mlp_norm


class OpCounter(TorchDispatchMode):
    """Records every non-free aten op (and stand-in kernel launches) under the current label."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, Counter] = defaultdict(Counter)  # label -> op name -> count
        self.labels = ["step"]
        self.paused = 0
        self.host_syncs: list[str] = []

    def record(self, name: str, n: int = 1) -> None:
        if not self.paused:
            self.ops[self.labels[-1]][name] += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        ns, _, op = name.partition("::")
        if ns == "aten" and op in HOST_SYNC_OPS and not self.paused:
            self.host_syncs.append(f"{self.labels[-1]}: {op}")
        if ns == "aten" and op not in FREE_OPS:
            self.record(op)
        # other namespaces (attnlab:: custom ops wrapping Triton launches) count through the
        # stand-in launchers they call, see _cuda_branch
        return func(*args, **(kwargs or {}))

    @contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


_IDLE = OpCounter()  # records nothing: the stand-ins run outside the counted step too (prefill)
_IDLE.paused = 1
_COUNTER: OpCounter = _IDLE  # the active counter, for the stand-in launchers


@contextmanager
def _labelled(model: HybridLM, counter: OpCounter):
    """Label ops by the part of the model that runs them. The parts' ``forward`` are wrapped rather
    than hooked: a forward hook on a mixer or MLP makes its Block take the unfused residual path
    (hooks must see the module's own output), which would count ops the step does not run."""
    wrapped = []  # (module, its own forward attribute if it had one)

    def wrap(module, label):
        forward = module.forward
        wrapped.append((module, module.__dict__.get("forward")))

        def labelled_forward(*args, **kwargs):
            counter.labels.append(label)
            try:
                return forward(*args, **kwargs)
            finally:
                counter.labels.pop()

        module.forward = labelled_forward

    for i, block in enumerate(model.blocks):
        wrap(block, f"{i}:{block.letter}:residual")  # ops in Block.forward outside its children
        wrap(block.mixer_norm, f"{i}:{block.letter}:norms")
        wrap(block.mlp_norm, f"{i}:{block.letter}:norms")
        wrap(block.mixer, f"{i}:{block.letter}:mixer")
        wrap(block.mlp, f"{i}:{block.letter}:mlp")
    wrap(model.embed, "embed")
    wrap(model.norm, "final_norm")
    wrap(model.lm_head, "lm_head")
    try:
        yield
    finally:
        for module, own in reversed(wrapped):
            if own is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = own


# ----------------------------------------------------------------------------- the CUDA branch
def _fake_linear_step_kernel():
    """Stand-in for attnlab.kernels.linear._step_kernel[grid](...): one launch, the same math."""

    class Launcher:
        def __getitem__(self, grid):
            return self.launch

        @staticmethod
        def launch(q, k, v, g, beta, slope, state, o, scale, *, H, HK, K, V, GATE, DELTA, L2NORM, **_):
            _COUNTER.record("triton:linear_step_kernel")
            with _COUNTER.pause():
                B = state.shape[0]
                qf, kf = q.float().reshape(B, HK, K), k.float().reshape(B, HK, K)
                vf = v.float().reshape(B, H, V)
                if L2NORM:
                    qf = qf / torch.sqrt((qf * qf).sum(-1, keepdim=True) + 1e-6)
                    kf = kf / torch.sqrt((kf * kf).sum(-1, keepdim=True) + 1e-6)
                qf, kf = qf.repeat_interleave(H // HK, 1), kf.repeat_interleave(H // HK, 1)  # (B, H, K)
                S = state
                if GATE == 0:
                    S = S * torch.exp(-slope.float())[None, :, None, None]
                elif GATE == 1:
                    S = S * torch.exp(g.float().reshape(B, H))[..., None, None]
                else:
                    S = S * torch.exp(g.float().reshape(B, H, K))[..., None]
                if DELTA:
                    vf = beta.float().reshape(B, H)[..., None] * (vf - (S * kf[..., None]).sum(-2))
                S = S + kf[..., None] * vf[..., None, :]
                o.copy_((S * (qf * scale)[..., None]).sum(-2).reshape(o.shape))
                state.copy_(S)

    return Launcher()


def _fake_gqa_launch(q, k, v, n_valid, scale, n_splits):
    """Stand-in for attnlab.kernels.decode._launch: the split-K kernel and its combine."""
    _COUNTER.record("triton:gqa_decode_split")
    _COUNTER.record("triton:gqa_decode_combine")
    with _COUNTER.pause():
        return ops.softmax_decode(q, k, v, n_valid, scale=scale, mode="torch").contiguous()


def _cuda_branch(stack: ExitStack) -> None:
    """Make the CPU take the decode branches a CUDA bf16/fp16 step takes (see the module docstring)."""
    from attnlab.kernels import decode as kdecode
    from attnlab.kernels import linear as klinear
    from attnlab.ops import softmax as osoftmax

    def resolve_step(mode, q, op_name):
        if mode in ("recurrent", "chunk"):
            return None
        return getattr(klinear, op_name)

    torch_sparse_kernel = osoftmax._sparse_kernel

    def latent(q, k, v, n_valid, scale=None):
        _COUNTER.record("triton:latent_decode (attention + combine)", 2)
        with _COUNTER.pause():
            return osoftmax.softmax_decode(q, k, v, n_valid, scale=scale, mode="torch")

    def sparse_kernel(mode, name, q, needs_grad=False):
        if name == "softmax_decode" and mode == "auto" and q.dtype in (torch.bfloat16, torch.float16):
            return latent
        return torch_sparse_kernel(mode, name, q, needs_grad)

    def decode_kernel(mode, q, needs_grad):
        # "auto" takes the kernel for CUDA bf16/fp16 only (float32 stays on torch; ops.softmax)
        if mode == "auto" and q.dtype in (torch.bfloat16, torch.float16) and not needs_grad:
            return kdecode.gqa_decode
        return None

    stack.enter_context(mock.patch("attnlab.ops.delta_rule.resolve_step", resolve_step))
    stack.enter_context(mock.patch("attnlab.ops.lightning.resolve_step", resolve_step))
    stack.enter_context(mock.patch.object(klinear, "_step_kernel", _fake_linear_step_kernel()))
    stack.enter_context(mock.patch.object(osoftmax, "_decode_kernel", decode_kernel))
    stack.enter_context(mock.patch.object(osoftmax, "_sparse_kernel", sparse_kernel))
    stack.enter_context(mock.patch.object(kdecode, "_launch", _fake_gqa_launch))
    fused_rms_norm = _fused_rms_norm(torch.nn.functional.rms_norm)
    stack.enter_context(mock.patch("torch.nn.functional.rms_norm", fused_rms_norm))
    _sparse_branch(stack)


def _fused_branch(stack: ExitStack) -> None:
    """The fused decode step of a CUDA bf16/fp16 step (attnlab.layers.fused), on top of the CUDA
    branch: the block takes it on the CPU, each of its Triton launches (GEMV, RoPE + cache write, the
    GDN/KDA / Lightning step, MLA's latent write, the split-K attention + combine that counts the
    token) is a stand-in that counts its launches and computes the kernel's torch reference with
    counting paused."""
    from attnlab.kernels import absorb as kabsorb
    from attnlab.kernels import decode as kdecode
    from attnlab.kernels import delta_decode as kdelta
    from attnlab.kernels import gemv as kgemv
    from attnlab.kernels import latent_cache as klatent
    from attnlab.kernels import lightning_decode as klightning
    from attnlab.kernels import rope_cache as krope
    from attnlab.layers import fused

    def stand_in(name: str, reference, launches: int = 1):
        def launch(*args, **kwargs):
            _COUNTER.record(f"triton:{name}", launches)
            with _COUNTER.pause():
                return reference(*args, **kwargs)

        return launch

    def advance(q, k_cache, v_cache, lengths, scale=None):
        n_valid = torch.clamp(lengths + 1, max=k_cache.shape[1])
        o = ops.softmax_decode(q, k_cache, v_cache, n_valid, scale=scale, mode="torch")
        lengths += 1
        return o

    def usable(h):
        return (fused.ENABLED and h.dim() == 3 and h.shape[1] == 1 and not torch.is_grad_enabled()
                and h.shape[0] <= kgemv.MAX_ROWS)

    patches = [
        (fused, "usable", usable),
        (kgemv, "gemv", stand_in("gemv", kgemv.gemv_reference)),
        (krope, "rope_write", stand_in("rope_write", krope.rope_write_reference)),
        (kdelta, "delta_decode", stand_in("delta_decode", kdelta.delta_decode_reference)),
        (klightning, "lightning_decode", stand_in("lightning_decode", klightning.lightning_decode_reference)),
        (klatent, "latent_write", stand_in("latent_write", klatent.latent_write_reference)),
        (kabsorb, "absorb_q", stand_in("absorb_q", kabsorb.absorb_q_reference)),
        (kabsorb, "unabsorb_o", stand_in("unabsorb_o", kabsorb.unabsorb_o_reference)),
        (kdecode, "gqa_decode_advance", stand_in("gqa_decode_advance", advance, 2)),
    ]
    for module, name, value in patches:
        stack.enter_context(mock.patch.object(module, name, value))


# Triton kernels of attnlab.kernels.sparse that the D layer's decode launches (MLA's softmax_decode
# keeps the two-launch stand-in `latent` above)
_SPARSE_KERNELS = ("_index_scores_kernel", "_topk_row", "_topk_hist", "_topk_count", "_topk_write",
                   "_topk_fused", "_topk_rank", "_latent_attn_fwd", "_combine")


def _sparse_branch(stack: ExitStack) -> None:
    """The D layer's CUDA branch: ``ops.dsa_index_scores``, ``ops.dsa_topk`` and
    ``ops.sparse_attention`` call the real wrappers in attnlab.kernels.sparse, whose host code
    (checks, allocations, fills, copies) runs and is counted; each Triton launch is replaced by a
    stand-in that counts one kernel and computes nothing, then the op's torch path fills the
    wrapper's output with the same result, uncounted."""
    from attnlab.kernels import sparse as ksparse
    from attnlab.ops import sparse as osparse

    class Launcher:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):
            return self.launch

        def launch(self, *args, **kwargs):
            _COUNTER.record(f"triton:{self.name}")

    for name in _SPARSE_KERNELS:
        stack.enter_context(mock.patch.object(ksparse, name, Launcher(name)))

    def counted(real, reference):
        def run(*args, **kwargs):
            out = real(*args, **kwargs)  # host code counted; launches counted, computing nothing
            with _COUNTER.pause(), torch.no_grad():
                out.copy_(reference(*args, **kwargs))
            return out
        return run

    torch_sparse_kernel = osparse._sparse_kernel
    torch_topk_kernel = osparse._topk_kernel

    def sparse_kernel(mode, name, q, needs_grad=False):
        if mode != "auto" or q.dtype not in (torch.bfloat16, torch.float16) or needs_grad:
            return torch_sparse_kernel(mode, name, q, needs_grad)
        if name == "dsa_index_scores":
            return counted(ksparse.dsa_index_scores,
                           lambda q, k, w, n_valid=None: osparse.dsa_index_scores(q, k, w, "torch", n_valid))
        if name == "sparse_attention":
            return counted(ksparse.sparse_attention,
                           lambda q, k, v, idx, scale=None, **_: osparse.sparse_attention(
                               q, k, v, idx, scale=scale, mode="torch"))
        return torch_sparse_kernel(mode, name, q, needs_grad)

    def topk_kernel(mode, scores):
        if mode != "auto":
            return torch_topk_kernel(mode, scores)
        return counted(ksparse.dsa_topk,
                       lambda scores, topk, causal=True, sort=True: osparse.dsa_topk(
                           scores, topk, causal, "torch"))

    stack.enter_context(mock.patch.object(osparse, "_sparse_kernel", sparse_kernel))
    stack.enter_context(mock.patch.object(osparse, "_topk_kernel", topk_kernel))

    # ops.sparse_attention checks CPU indices' range with a host read (.max()) that CUDA tensors
    # skip: run the op's checks uncounted, then its kernel branch counted
    op_sparse_attention = ops.sparse_attention

    def sparse_attention(q, k, v, indices, scale=None, mode="auto"):
        kernel = sparse_kernel(mode, "sparse_attention", q, torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad))
        if mode != "auto" or kernel is None or kernel.__name__ != "run":
            return op_sparse_attention(q, k, v, indices, scale=scale, mode=mode)
        with _COUNTER.pause():
            op_sparse_attention(q[:, :0], k, v, indices[:, :0], scale=scale, mode="torch")  # checks only
        return kernel(q, k, v, indices, scale=q.shape[-1] ** -0.5 if scale is None else float(scale))

    stack.enter_context(mock.patch.object(ops, "sparse_attention", sparse_attention))


def _fused_rms_norm(rms_norm):
    """F.rms_norm as CUDA runs it: one fused kernel (aten::_fused_rms_norm, which has a CUDA kernel
    only; the CPU build decomposes it into eight ops) when input and weight share a dtype, plus a
    copy for a non-contiguous input; the composite fallback (counted op by op) otherwise."""

    def fused(x, normalized_shape, weight=None, eps=None):
        if weight is not None and weight.dtype != x.dtype:
            return rms_norm(x, normalized_shape, weight, eps)
        if not x.is_contiguous():
            _COUNTER.record("clone (contiguous input of _fused_rms_norm)")
        _COUNTER.record("_fused_rms_norm")
        with _COUNTER.pause():
            return rms_norm(x, normalized_shape, weight, eps)

    return fused


def _as_in_graph(stack: ExitStack) -> None:
    """in_graph() -> True in every attnlab module that imported it (the checks a graph skips)."""
    from attnlab import _checks

    original = _checks.in_graph
    for name, module in list(sys.modules.items()):
        ours = name == "attnlab" or name.startswith("attnlab.")
        if ours and getattr(module, "in_graph", None) is original:
            stack.enter_context(mock.patch.object(module, "in_graph", lambda: True))


# ----------------------------------------------------------------------------- counting
def build(preset: str, d_model: int = 1024, n_layers: int | None = None, vocab_size: int = 512,
          dtype: torch.dtype = torch.bfloat16, **overrides) -> HybridLM:
    """A small HybridLM of ``preset`` (n_layers None = one repeat of its pattern), seeded."""
    torch.manual_seed(0)
    pattern = ModelConfig.preset(preset).pattern
    n_layers = len(pattern) if n_layers is None else n_layers
    cfg = ModelConfig.preset(preset, d_model=d_model, n_layers=n_layers, vocab_size=vocab_size, **overrides)
    return HybridLM(cfg).to(dtype).eval()


def count_step(model: HybridLM, branch: str = "cuda", prompt_len: int = 8, max_len: int = 32) -> dict:
    """Prefill ``prompt_len`` tokens (batch 1), then count the ops of ONE decode step.

    Returns {"parts": {label: Counter}, "per_type": {letter: {part: ops per layer}}, "top": {...},
    "total": int, "host_syncs": [...], "logits": float32 [1, V]}."""
    global _COUNTER
    if branch not in ("cuda", "fused", "torch"):
        raise ValueError(f"branch: expected 'cuda', 'fused' or 'torch', got {branch!r}")
    gen = torch.Generator().manual_seed(0)
    V = model.cfg.vocab_size
    tokens = torch.randint(0, V, (1, prompt_len), generator=gen)
    caches = model.new_caches(1, max_len)
    counter = OpCounter()
    with ExitStack() as stack:
        if branch in ("cuda", "fused"):
            _cuda_branch(stack)
        if branch == "fused":
            _fused_branch(stack)
        logits = prefill(model, tokens, caches)
        step = DecodeStep(model, caches, mode="eager")
        nxt = logits.argmax(-1)  # (1,)
        _as_in_graph(stack)
        _COUNTER = counter
        try:
            with _labelled(model, counter), counter:
                out = step(nxt)
        finally:
            _COUNTER = _IDLE
    return summarize(model, counter, out)


def summarize(model: HybridLM, counter: OpCounter, logits: torch.Tensor) -> dict:
    per_layer: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(PARTS, 0))
    by_type_ops: dict[str, Counter] = defaultdict(Counter)
    top: dict[str, int] = {}
    for label, ctr in counter.ops.items():
        n = sum(ctr.values())
        if ":" in label:
            i, letter, part = label.split(":")
            per_layer[int(i)][part] += n
            by_type_ops[f"{letter}.{part}"].update(ctr)
        else:
            top[label] = top.get(label, 0) + n
            by_type_ops[label].update(ctr)
    per_type: dict[str, dict[str, int]] = {}
    for i, block in enumerate(model.blocks):
        counts = {**per_layer[i], "total": sum(per_layer[i].values())}
        prev = per_type.setdefault(block.letter, counts)
        if prev != counts:  # layers of one letter must run the same ops
            raise RuntimeError(f"layer {i} ({block.letter}) runs {counts}, an earlier one {prev}")
    n_layers = Counter(b.letter for b in model.blocks)
    for letter in by_type_ops:  # op histograms per layer, not summed over the layers
        if "." in letter:
            k = n_layers[letter.split(".")[0]]
            by_type_ops[letter] = Counter({op: c // k for op, c in by_type_ops[letter].items()})
    total = sum(sum(c.values()) for c in counter.ops.values())
    return {"per_type": per_type, "layers": dict(n_layers), "top": top, "total": total,
            "ops": dict(by_type_ops), "host_syncs": counter.host_syncs, "logits": logits.float()}


def table(name: str, r: dict) -> str:
    lines = [f"{name}: {r['total']} ops per decode step "
             f"({', '.join(f'{n}×{k}' for k, n in r['layers'].items())}; "
             + ", ".join(f"{k} {v}" for k, v in r["top"].items()) + ")",
             "| layer | norms | mixer | mlp | residual | per layer |", "|---|---:|---:|---:|---:|---:|"]
    for letter, c in r["per_type"].items():
        cells = " | ".join(str(c[k]) for k in (*PARTS, "total"))
        lines.append(f"| {letter} | {cells} |")
    if r["host_syncs"]:
        lines.append(f"HOST SYNCS (not capturable): {r['host_syncs']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="llama,qwen3-next,kimi-linear,minimax-01")
    ap.add_argument("--branch", choices=("cuda", "fused", "torch"), default="fused")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--ops", action="store_true", help="also list the aten ops of each part")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    print(f"attnlab {getattr(attnlab, '__version__', '')} torch {torch.__version__}; branch={args.branch}, "
          f"{args.dtype}, batch 1, d_model {args.d_model}")
    results = {}
    for name in args.presets.split(","):
        r = count_step(build(name, d_model=args.d_model, dtype=dtype), branch=args.branch)
        results[name] = r
        print()
        print(table(name, r))
        if args.ops:
            for part, ctr in sorted(r["ops"].items()):
                print(f"  {part}: " + ", ".join(f"{op}×{c}" if c > 1 else op for op, c in ctr.most_common()))
    return results


if __name__ == "__main__":
    main()
