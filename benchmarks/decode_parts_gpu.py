"""Decode-step parts on one GPU: the launch-shape knobs behind benchmarks/RESULTS.md's decode figures.

One decode row (batch 1), each part's kernel timed alone. Five parts (``--parts``):

- ``index``: the DSA lightning indexer at decode (``attnlab.kernels.sparse.dsa_index_scores``, one
  query row, 64 heads x 128, bf16 keys, ``n_valid`` = S). A row's S keys are cut into chunks of at
  most ``TUNING["index_decode"]["S_CHUNK"]``, and no larger than needed for about
  ``INDEX_DECODE_PROGRAMS_PER_SM`` programs per SM (effective chunk = min(S_CHUNK, max(BLOCK_S,
  next_pow2(ceil(S / (PROGRAMS_PER_SM * SMs)))))): one program over 4K keys is ~10x slower than many
  small ones. Swept: S_CHUNK in (4096, 1024, 256, 128, 64) x INDEX_DECODE_PROGRAMS_PER_SM in (1, 2, 4,
  8); a pair whose effective chunk was already timed at that S is skipped (the same launch). Each row
  records ``s_chunk_eff``.
- ``topk``: ``dsa_topk`` of k = 2048 over one row of S scores (quantised to quarters, so there are
  ties) by each path: ``fused`` (one launch, chunks meeting at atomics; ``TOPK_FUSED_MAX``; with ties
  this many it takes five barriers, as ``fused-5-barriers`` (``TOPK_CANDIDATES_MAX`` = 0) always does;
  both are also timed on distinct scores, where ``fused`` takes its two-barrier candidate path),
  ``multi`` (the multi-launch radix select), ``one-program`` (``_topk_row``, one program per row,
  sorted in it; ``TOPK_ONE_PROGRAM_MAX``, with ``TOPK_ONE_PROGRAM_MIN_ROWS_PER_SM`` = 0 so a single
  row takes it) and ``one-program+rank`` (``TOPK_ONE_PROGRAM_SORT`` = False: a rank pass sorts), each
  ``sort`` True and False (the rank variant: True only); plus ``torch.topk(sorted=False)``. Checked:
  sorted output equal to ``ops.dsa_topk(mode="torch")``; unsorted, the same set. Why: which path a
  single decode row should take up to which S (``TOPK_FUSED_MAX``).
- ``mla``: MLA absorbed dense decode (``softmax_decode``, 16 heads over one 576-dim latent, values
  its first 512 dims, bf16; the ``TUNING["decode_row"]`` launch shape of one query row): BLOCK_N in
  (32, 64) x DVB in (1, 4) x n_splits in (None, 16, 32, 64, 128, 256), num_warps 4, BLOCK_H 16,
  fallback shapes off (``ALLOW_FALLBACK`` = False). ``n_splits`` None is the default split policy
  (``MIN_STEPS``, ``MAX_SPLITS``); a row's ``err`` is the max abs difference from the output of the untouched
  default TUNING. Why: the split policy and block shape for a batch-1 row.
- ``sparse``: DSA's attention of one decode row over its top-k (``sparse_attention``, T = 1, 16 heads
  over one 576-dim latent, values its first 512 dims, bf16, k = ``--topk`` distinct positions of S in
  position order, as the fused D step passes them; the ``TUNING["sparse"]`` launch shape):
  BLOCK_N in (32, 64) x DVB in (1, 4) x num_warps in (4, 8) x n_splits in (None, 8, 16, 32, 64),
  BLOCK_H 16, 2 stages, fallback shapes off; ``err`` as for ``mla``. Why: the split count and block
  shape of the top-k attention at batch 1 (the default came from 128-head, batch-32 sweeps; on an
  H100 it was also the fastest here: benchmarks/RESULTS.md).
- ``delta``: ``attnlab.kernels.delta_decode.delta_decode(count_token=True)`` at 1B-model shapes
  (Qwen3-Next-style G layer: 32 value heads over 16 key heads of 128; Kimi-Linear-style K layer: 16 /
  16 of 128), bf16, V_BLOCK in (16, 32, 64, 128) x NUM_WARPS in (None, 4, 8), warm (state in L2)
  and cold. Just runs (its correctness is tests/test_kernels_delta_decode.py's). Why: the state is
  read once per step, so the cold time is what a full model's step sees.

Timing (GPU): a CUDA graph of N (``--calls``, 20) calls, replayed 10 times, microseconds per call.
"cold": a 256 MB memset before every call inside the graph (L2 flushed), minus the memset alone.
Every knob this sets is a module global restored afterwards (try/finally). One line per
measurement, a summary table last; every row goes to ``--json`` (written after each part).

Commands (GPU, from the repository root)::

    python benchmarks/decode_parts_gpu.py                      # all parts, 4K / 32K / 128K (top-k + 256K)
    python benchmarks/decode_parts_gpu.py --parts topk --contexts 4096,32768,131072,262144
    python benchmarks/decode_parts_gpu.py --parts mla,delta --json benchmarks/results/decode_parts.json

CPU smoke (every part end to end on toy sizes under the Triton interpreter, perf_counter timing, no
flush; numbers meaningless)::

    TRITON_INTERPRET=1 python benchmarks/decode_parts_gpu.py --cpu-smoke --json /tmp/decode_parts.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import os
import sys
import time
import traceback
from pathlib import Path

import torch

PARTS = ("index", "topk", "mla", "sparse", "delta")
DEFAULT_CONTEXTS = (4096, 32768, 131072)
TOPK_EXTRA_CONTEXT = 262144
DEFAULT_JSON = Path(__file__).resolve().parent / "decode_parts_gpu.json"


class Timer:
    """Per-call microseconds: a CUDA graph of ``calls`` calls replayed ``replays`` times (GPU), or
    perf_counter over ``calls`` eager calls (CPU smoke). ``cold`` subtracts the flush alone."""

    def __init__(self, device: str, calls: int, replays: int = 10):
        self.device, self.calls, self.replays = device, calls, replays
        self.flush = None
        self.flush_us = 0.0
        if device == "cuda":
            big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
            self.flush = lambda: big.zero_()  # noqa: E731
            self.flush_us = self._graph(lambda: None, self.flush)

    def _graph(self, fn, flush=None) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles) outside the capture
            fn()
            if flush is not None:
                flush()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(self.calls):
                if flush is not None:
                    flush()
                fn()
        g.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(self.replays):
            g.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / self.replays / self.calls * 1e6

    def warm(self, fn) -> float:
        if self.device == "cuda":
            return self._graph(fn)
        fn()
        t = time.perf_counter()
        for _ in range(self.calls):
            fn()
        return (time.perf_counter() - t) / self.calls * 1e6

    def cold(self, fn) -> float:
        """L2 flushed before each call (GPU); the CPU smoke has no flush: a second warm timing."""
        if self.device == "cuda":
            return self._graph(fn, self.flush) - self.flush_us
        return self.warm(fn)


def emit(rows: list[dict], row: dict) -> None:
    rows.append(row)
    text = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# parts


def part_index(timer: Timer, contexts, smoke: bool, rows: list[dict]) -> None:
    from attnlab.kernels import sparse as ks

    dev = timer.device
    H, D = (4, 32) if smoke else (64, 128)
    dtype = torch.float32 if smoke else torch.bfloat16
    chunks = (4096, 1024, 256, 128, 64)
    ppsms = (1, 2) if smoke else (1, 2, 4, 8)
    n_sms = ks._num_sms(torch.device(dev))
    base, base_ppsm = dict(ks.TUNING["index_decode"]), ks.INDEX_DECODE_PROGRAMS_PER_SM
    try:
        for S in contexts:
            torch.manual_seed(0)
            q = torch.randn(1, 1, H, D, device=dev, dtype=dtype)
            k = torch.randn(1, S + 64, D, device=dev, dtype=dtype)
            w = torch.randn(1, 1, H, device=dev)
            nv = torch.tensor([S], device=dev)
            ref = ks.dsa_index_scores(q, k, w, n_valid=nv)  # the default knobs
            seen = set()
            for chunk, ppsm in itertools.product(chunks, ppsms):
                # the effective chunk as dsa_index_scores computes it for T = 1 (B = 1, rows of S + 64 keys)
                eff = min(chunk, max(base["BLOCK_S"], ks._pow2(-(-(S + 64) // (ppsm * n_sms)), 1)))
                eff = -(-eff // base["BLOCK_S"]) * base["BLOCK_S"]
                if eff in seen:
                    continue
                seen.add(eff)
                ks.TUNING["index_decode"] = dict(base, S_CHUNK=chunk)
                ks.INDEX_DECODE_PROGRAMS_PER_SM = ppsm
                fn = functools.partial(ks.dsa_index_scores, q, k, w, n_valid=nv)
                err = (fn() - ref).abs().nan_to_num(0.0).max().item()  # -inf past n_valid in both
                emit(rows, dict(part="index", S=S, S_CHUNK=chunk, programs_per_sm=ppsm, s_chunk_eff=eff,
                                us=timer.warm(fn), err=err))
    finally:
        ks.TUNING["index_decode"], ks.INDEX_DECODE_PROGRAMS_PER_SM = base, base_ppsm


TOPK_KNOBS = (
    "TOPK_FUSED_MAX", "TOPK_CANDIDATES_MAX", "TOPK_ONE_PROGRAM_MAX", "TOPK_ONE_PROGRAM_MIN_ROWS_PER_SM",
    "TOPK_ONE_PROGRAM_SORT",
)


def part_topk(timer: Timer, contexts, smoke: bool, rows: list[dict], topk: int) -> None:
    from attnlab import ops
    from attnlab.kernels import sparse as ks

    dev = timer.device
    big = 1 << 20
    paths = {  # knob values per path (the rest as found)
        "fused": dict(TOPK_FUSED_MAX=big, TOPK_ONE_PROGRAM_MAX=0),
        "fused-5-barriers": dict(TOPK_FUSED_MAX=big, TOPK_ONE_PROGRAM_MAX=0, TOPK_CANDIDATES_MAX=0),
        "multi": dict(TOPK_FUSED_MAX=0, TOPK_ONE_PROGRAM_MAX=0),
        "one-program": dict(TOPK_ONE_PROGRAM_MAX=big, TOPK_ONE_PROGRAM_MIN_ROWS_PER_SM=0,
                            TOPK_ONE_PROGRAM_SORT=True),
        "one-program+rank": dict(TOPK_ONE_PROGRAM_MAX=big, TOPK_ONE_PROGRAM_MIN_ROWS_PER_SM=0,
                                 TOPK_ONE_PROGRAM_SORT=False),
    }
    saved = {name: getattr(ks, name) for name in TOPK_KNOBS}
    try:
        for S, scores in itertools.product(contexts, ("quarters", "distinct")):
            torch.manual_seed(0)
            sc = torch.randn(1, 1, S, device=dev) * 4  # (1, 1, S)
            if scores == "quarters":
                sc = sc.round() / 4  # ties: hundreds of keys share the k-th key's top 16 bits
            want = ops.dsa_topk(sc, topk, causal=False, mode="torch")  # (1, 1, topk)
            for path, knobs in paths.items():
                if scores == "distinct" and not path.startswith("fused"):
                    continue
                for sort in ((True,) if path == "one-program+rank" else (True, False)):
                    for name in TOPK_KNOBS:
                        setattr(ks, name, knobs.get(name, saved[name]))
                    fn = functools.partial(ks.dsa_topk, sc, topk, causal=False, sort=sort)
                    try:
                        got = fn()
                        ok = (torch.equal(got, want) if sort
                              else torch.equal(got.sort(-1).values, want.sort(-1).values))
                        us = timer.warm(fn)
                    except Exception as e:  # a path that does not build at this S: say so, go on
                        emit(rows, dict(part="topk", S=S, scores=scores, path=path, sort=sort,
                                        failed=f"{type(e).__name__}: {str(e)[:200]}"))
                        continue
                    emit(rows, dict(part="topk", S=S, scores=scores, path=path, sort=sort, us=us,
                                    ok=bool(ok)))
            for name in TOPK_KNOBS:
                setattr(ks, name, saved[name])
            if scores == "distinct":
                continue
            got = torch.topk(sc, topk, dim=-1, sorted=False).indices  # (1, 1, topk)
            # ties may take other positions: the same multiset of scores
            ok = torch.equal(sc.gather(-1, got).sort(-1).values, sc.gather(-1, want).sort(-1).values)
            us = timer.warm(functools.partial(torch.topk, sc, topk, dim=-1, sorted=False))
            emit(rows, dict(part="topk", S=S, scores=scores, path="torch.topk", sort=False, us=us,
                            ok=bool(ok)))
    finally:
        for name in TOPK_KNOBS:
            setattr(ks, name, saved[name])


def _sweep_latent(timer: Timer, rows: list[dict], part: str, tun: str, contexts, grid, call_at,
                  extra: dict) -> None:
    """Shared by the mla and sparse parts: per S, ``call_at(S)`` (a callable taking ``n_splits``,
    returning the attention output) timed at the default launch shape, then at every (BLOCK_N, DVB,
    num_warps, n_splits) of ``grid`` with TUNING[tun] overridden (BLOCK_H 16, plus ``extra``), each
    row's ``err`` the max abs difference from the default's output; fallback shapes off."""
    from attnlab.kernels import sparse as ks

    names = ("BLOCK_N", "DVB", "num_warps", "n_splits")
    base, base_fallback = dict(ks.TUNING[tun]), ks.ALLOW_FALLBACK
    try:
        ks.ALLOW_FALLBACK = False
        for S in contexts:
            call = call_at(S)
            ref = call().float()
            emit(rows, dict(part=part, S=S, config="default", us=timer.warm(call), err=0.0))
            best = None
            for bn, dvb, w, splits in grid:
                knobs = dict(zip(names, (bn, dvb, w, splits), strict=True))
                ks.TUNING[tun] = dict(base, BLOCK_N=bn, DVB=dvb, num_warps=w, BLOCK_H=16, **extra)
                fn = functools.partial(call, n_splits=splits)
                try:
                    err = (fn().float() - ref).abs().max().item()
                    us = timer.warm(fn)
                except Exception as e:  # a launch shape that does not build here
                    emit(rows, dict(part=part, S=S, **knobs, failed=f"{type(e).__name__}: {str(e)[:200]}"))
                    continue
                finally:
                    ks.TUNING[tun] = base
                row = dict(part=part, S=S, **knobs, us=us, err=err)
                emit(rows, row)
                if best is None or us < best["us"]:
                    best = row
            if best is not None:
                print(f"BEST {part} S={S}: {best['us']:.2f} us at "
                      + " ".join(f"{k}={best[k]}" for k in names) + f" err={best['err']:.3g}", flush=True)
    finally:
        ks.TUNING[tun], ks.ALLOW_FALLBACK = base, base_fallback


def part_mla(timer: Timer, contexts, smoke: bool, rows: list[dict]) -> None:
    from attnlab.kernels import sparse as ks

    dev = timer.device
    H, D, D_v = (4, 48, 32) if smoke else (16, 576, 512)
    dtype = torch.float32 if smoke else torch.bfloat16
    grid = list(itertools.product((16,), (1, 2), (4,), (None, 2)) if smoke
                else itertools.product((32, 64), (1, 4), (4,), (None, 16, 32, 64, 128, 256)))

    def call_at(S: int):
        torch.manual_seed(0)
        q = torch.randn(1, H, D, device=dev, dtype=dtype)
        lat = torch.randn(1, S + 64, 1, D, device=dev, dtype=dtype)  # (1, S_max, 1, D): one latent
        nv = torch.tensor([S], device=dev)
        return functools.partial(ks.softmax_decode, q, lat, lat[..., :D_v], nv, scale=0.07)  # -> (1, H, D_v)

    _sweep_latent(timer, rows, "mla", "decode_row", contexts, grid, call_at, {})


def part_sparse(timer: Timer, contexts, smoke: bool, rows: list[dict], topk: int) -> None:
    from attnlab.kernels import sparse as ks

    dev = timer.device
    H, D, D_v = (4, 48, 32) if smoke else (16, 576, 512)
    dtype = torch.float32 if smoke else torch.bfloat16
    grid = list(itertools.product((16,), (1, 2), (4,), (None, 2)) if smoke
                else itertools.product((32, 64), (1, 4), (4, 8), (None, 8, 16, 32, 64)))

    def call_at(S: int):
        torch.manual_seed(0)
        k_eff = min(topk, S)
        q = torch.randn(1, 1, H, D, device=dev, dtype=dtype)  # (1, 1, H, D)
        lat = torch.randn(1, S + 64, 1, D, device=dev, dtype=dtype)  # (1, S_max, 1, D): one latent
        idx = torch.randperm(S, device=dev)[:k_eff].sort().values.view(1, 1, k_eff)  # (1, 1, k)
        # -> (1, 1, H, D_v)
        return functools.partial(ks.sparse_attention, q, lat, lat[..., :D_v], idx, scale=0.07)

    _sweep_latent(timer, rows, "sparse", "sparse", contexts, grid, call_at, dict(num_stages=2))


def part_delta(timer: Timer, smoke: bool, rows: list[dict]) -> None:
    from attnlab import ModelConfig
    from attnlab.kernels import delta_decode as kdd
    from attnlab.layers.deltanet import build_gated_deltanet, build_kda

    dev = timer.device
    if smoke:
        dims = dict(d_model=64, n_layers=4, vocab_size=128)
        g = dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_n_heads=4, linear_n_key_heads=2)
        kk = dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_n_heads=2, linear_n_key_heads=2)
        dtype, v_blocks, warps = torch.float32, (8, 16), (None, 4)
    else:
        dims = dict(d_model=2048, n_layers=16, vocab_size=32768)
        heads = dict(linear_key_head_dim=128, linear_value_head_dim=128)
        g = dict(heads, linear_n_heads=32, linear_n_key_heads=16)
        kk = dict(heads, linear_n_heads=16, linear_n_key_heads=16)
        dtype, v_blocks, warps = torch.bfloat16, (16, 32, 64, 128), (None, 4, 8)
    saved = kdd.V_BLOCK, kdd.NUM_WARPS
    try:
        for preset, build, extra in (("qwen3-next", build_gated_deltanet, g), ("kimi-linear", build_kda, kk)):
            cfg = ModelConfig.preset(preset, **dims, **extra)
            torch.manual_seed(0)
            with torch.device(dev):
                m = build(cfg, 0).to(dtype).eval()
            cache = m.new_cache(1, 64, device=dev, dtype=dtype)
            proj = torch.randn(1, m.in_proj.out_features, device=dev, dtype=dtype)  # (1, P)
            shape = dict(H=m.n_heads, Hk=m.n_key_heads, Dk=m.key_head_dim, Dv=m.value_head_dim)
            for vb, wps in itertools.product(v_blocks, warps):
                kdd.V_BLOCK, kdd.NUM_WARPS = vb, wps
                fn = functools.partial(kdd.delta_decode, m, proj, cache, count_token=True)
                try:
                    o = fn()  # (1, H*D_v)
                    finite = bool(torch.isfinite(o).all())
                    warm, cold = timer.warm(fn), timer.cold(fn)
                except Exception as e:
                    emit(rows, dict(part="delta", preset=preset, **shape, V_BLOCK=vb, num_warps=wps,
                                    failed=f"{type(e).__name__}: {str(e)[:200]}"))
                    continue
                finally:
                    kdd.V_BLOCK, kdd.NUM_WARPS = saved
                emit(rows, dict(part="delta", preset=preset, **shape, V_BLOCK=vb, num_warps=wps,
                                us=warm, cold_us=cold, finite=finite))
    finally:
        kdd.V_BLOCK, kdd.NUM_WARPS = saved


# ---------------------------------------------------------------------------------------------
# driver


def summary(rows: list[dict]) -> str:
    """Per part and S (delta: per preset): the fastest timed row, its knobs, and failed checks / builds."""
    info = ("part", "S", "preset", "us", "cold_us", "err", "ok", "finite", "H", "Hk", "Dk", "Dv")
    lines = ["", "summary (us per call; best = the fastest timed row and its knobs)"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["part"], r.get("S", r.get("preset"))), []).append(r)
    for (part, at), rs in groups.items():
        timed = [r for r in rs if "us" in r]
        bad = [r for r in timed
               if r.get("ok") is False or r.get("err", 0.0) > 0.05 or r.get("finite") is False]
        fails = len(rs) - len(timed)
        line = f"{part:6s} {str(at):>11s}  "
        if timed:
            best = min(timed, key=lambda r: r["us"])
            cold = f" (cold {best['cold_us']:.2f})" if "cold_us" in best else ""
            line += f"best {best['us']:9.2f} us{cold}  {({k: v for k, v in best.items() if k not in info})}"
        if bad:
            line += f"  CHECK FAILED x{len(bad)}"
        if fails:
            line += f"  failed x{fails}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    from attnlab._io import atomic_write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    p.add_argument("--contexts", default=None,
                   help="comma list of S for index/topk/mla (default 4096,32768,131072; topk also 262144)")
    p.add_argument("--calls", type=int, default=None, help="calls per CUDA graph (default 20; smoke 1)")
    p.add_argument("--topk", type=int, default=None, help="k of the top-k part (default 2048; smoke 16)")
    p.add_argument("--json", default=str(DEFAULT_JSON))
    p.add_argument("--cpu-smoke", action="store_true",
                   help="toy sizes on CPU tensors under TRITON_INTERPRET=1, perf_counter timing")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        raise ValueError(f"parts: unknown {unknown}; expected a comma list of {', '.join(PARTS)}")
    smoke = args.cpu_smoke
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--cpu-smoke: set TRITON_INTERPRET=1 in the environment (read at import)")
    if not smoke and not torch.cuda.is_available():
        raise ValueError("no CUDA device: run on a GPU, or pass --cpu-smoke with TRITON_INTERPRET=1")
    if args.contexts:
        contexts = [int(x) for x in args.contexts.split(",")]
        topk_contexts = contexts
    elif smoke:
        contexts, topk_contexts = [512], [96, 600]
    else:
        contexts, topk_contexts = list(DEFAULT_CONTEXTS), [*DEFAULT_CONTEXTS, TOPK_EXTRA_CONTEXT]
    topk = args.topk if args.topk is not None else (16 if smoke else 2048)
    device = "cpu" if smoke else "cuda"
    timer = Timer(device, args.calls or (1 if smoke else 20))
    card = "cpu (interpreter smoke)" if smoke else torch.cuda.get_device_name()
    report = dict(card=card, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
                  calls_per_graph=timer.calls, flush_us=timer.flush_us, cpu_smoke=smoke, rows=[])
    rows = report["rows"]
    print(f"card {card}; {timer.calls} calls per timing; flush alone {timer.flush_us:.2f} us", flush=True)
    crashed = []
    with torch.no_grad():
        for part in parts:
            try:
                if part == "index":
                    part_index(timer, contexts, smoke, rows)
                elif part == "topk":
                    part_topk(timer, topk_contexts, smoke, rows, topk)
                elif part == "mla":
                    part_mla(timer, contexts, smoke, rows)
                elif part == "sparse":
                    part_sparse(timer, contexts, smoke, rows, topk)
                else:
                    part_delta(timer, smoke, rows)
            except Exception as e:  # one broken part must not lose the others of a batched device run
                traceback.print_exc()
                crashed.append(part)
                emit(rows, dict(part=part, failed=f"part crashed: {type(e).__name__}: {str(e)[:300]}"))
            atomic_write_json(args.json, report)  # after each part: a later crash keeps these
    print(summary(rows), flush=True)
    print(f"wrote {len(rows)} rows to {args.json}", flush=True)
    if crashed:
        raise SystemExit(f"parts that crashed: {', '.join(crashed)} (tracebacks above; other rows written)")
    return rows


if __name__ == "__main__":
    main()
