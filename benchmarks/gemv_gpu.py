"""The fused decode GEMV (attnlab.kernels.gemv) on one GPU: against cuBLAS alone and against the
unfused torch sequence it replaces, at the projections of a d_model 2048 model, bf16.

    python benchmarks/gemv_gpu.py                    # timings, M = 1 and 4 (~30 s on an H100, estimated)
    python benchmarks/gemv_gpu.py --sweep            # + launch-shape sweep per shape at M = 1 first
                                                     # (~10 configs a shape; capped by
                                                     # --sweep-budget-s, default 60 s)
    python benchmarks/gemv_gpu.py --sweep --sweep-rows 1,4
    python benchmarks/gemv_gpu.py --chain-only       # dependent-chain CUDA-graph sweep (M = 1): the tiled
                                                     # form's best vs the persistent form's (PERSIST 1/2/4)
                                                     # per shape, a TUNING snippet (~130 s on an H100;
                                                     # --chain-budget-s, default 110)
    python benchmarks/gemv_gpu.py --cpu-smoke        # no GPU: whole script, toy sizes, interpreter

Per shape and row count M, three timings (triton.testing.do_bench, median; it clears the L2 cache
before every timed call, so each reads its weight from HBM, as a decode step does):
  fused     kernels.gemv.gemv: prologue + GEMV + epilogue, one launch
  cublas    F.linear on the already-prepared input alone (no norm / activation / residual add)
  unfused   the layers' torch sequence the fused call replaces: RMSNorm + F.linear (+ .float() for
            the LM head), silu(gate) * up + Residual.project (addmm_), o * sigmoid(g) + addmm_
Floor: the weight's bytes over the copy bandwidth measured in the same run (a 1 GiB ``copy_``,
read + write bytes per second); "%floor" = floor / time (100% = at the floor). Every fused result
is first checked against gemv_reference (rms-relative error printed).

--sweep times a small grid of (BLOCK_N, BLOCK_K) at 4 warps in both forms of the kernel (elementwise
and tensor-core DOT), then num_warps and num_stages around the best (each config checked against
the oracle first), prints the best per shape as a
``TUNING.update({...})`` snippet for attnlab/kernels/gemv.py, and uses it for the timings that
follow. TUNING is keyed by (M padded to a power of 2, N, K): o_proj and the gated o_proj share a
key, the later (gated) one's best is kept; both are printed.
Writes $OUT/gemv_gpu.json (or --out) atomically, also after each shape.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--cpu-smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from attnlab._io import atomic_write_json  # noqa: E402
from attnlab.generate import capture_cuda_graph  # noqa: E402
from attnlab.kernels import gemv as kg  # noqa: E402
from attnlab.layers.common import Residual, RMSNorm  # noqa: E402

DT = torch.bfloat16
DEVICE = "cuda"  # --cpu-smoke: "cpu" under TRITON_INTERPRET=1, tiny shapes, one call per timing
WIDE_TILED = False  # --tiled-only: the chain sweep times more tiled configs and no persistent ones
# (name, K, N, prologue, residual, out_dtype): a d_model 2048 model's decode projections
# (the GEMVs of benchmarks/decode_gpu.py's ~1B presets; the first block as of the fifth session's sweep,
# the second the shapes the presets use now that no sweep had covered: Qwen3-Next / GDN with 32 value
# heads, Kimi Linear's KDA and MLA, DeepSeek-V3 / V3.2's MLA, MiniMax-01's Lightning and softmax)
SHAPES = [
    ("qkv", 2048, 3072, "rmsnorm", False, None),
    ("o_proj", 2048, 2048, None, True, None),
    ("o_proj_gated", 2048, 2048, "sigmoid_gate", True, None),
    ("gate_up", 2048, 10944, "rmsnorm", False, None),
    ("down", 5472, 2048, "silu_mul", True, None),
    ("down_plain", 5472, 2048, None, True, None),  # down after gate|up's silu_mul epilogue
    ("lm_head", 2048, 32768, "rmsnorm", False, torch.float32),
    ("gdn_in_proj", 2048, 6208, "rmsnorm", False, None),
    ("gated_qkv", 2048, 4608, "rmsnorm", False, None),
    ("kda_in_proj", 2048, 6304, "rmsnorm", False, None),
    ("mla_x_proj", 2048, 2064, "rmsnorm", False, None),
    ("mla_o_proj", 1024, 2048, None, True, None),
    ("gdn32_in_proj", 2048, 12352, "rmsnorm", False, None),
    ("gdn32_o_proj", 4096, 2048, None, True, None),
    ("kda_in_proj_6416", 2048, 6416, "rmsnorm", False, None),
    ("kimi_mla_x_proj", 2048, 3648, "rmsnorm", False, None),
    ("v3_x_proj", 2048, 1600, "rmsnorm", False, None),
    ("v3_q_up", 1024, 3072, "rmsnorm", False, None),
    ("v32_x_proj", 2048, 1792, "rmsnorm", False, None),
    ("v32_q_up", 1024, 11264, "rmsnorm", False, None),
    ("lightning_in_proj", 2048, 8192, "rmsnorm", False, None),
    ("minimax_qkv", 2048, 2560, "rmsnorm", False, None),
]
SMOKE_SHAPES = [  # the same kinds at toy sizes (ragged against the interpreter's 8 x 32 blocks)
    ("qkv", 64, 96, "rmsnorm", False, None),
    ("o_proj", 64, 64, None, True, None),
    ("o_proj_gated", 64, 64, "sigmoid_gate", True, None),
    ("down", 100, 64, "silu_mul", True, None),
    ("lm_head", 64, 40, "rmsnorm", False, torch.float32),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def copy_bandwidth() -> float:
    if DEVICE == "cpu":
        return 1e10  # placeholder: --cpu-smoke checks that the script runs, not the numbers
    x = torch.empty(1 << 28, dtype=torch.float32, device=DEVICE).uniform_()  # 1 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * (1 << 28) * 4 / (ms * 1e-3)


def bench(fn, rep: int = 100) -> float:
    """Median ms (do_bench, L2 cleared before each call); on the CPU smoke run one timed call."""
    if DEVICE == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def inputs(m: int, k: int, n: int, prologue: str | None, seed: int = 0) -> tuple:
    """x, weight, the gemv keyword arguments, and a residual [m, n]. Norm weights are bf16 (a model
    cast to bf16 casts them); the Qwen3-Next-style gated o_proj and the KDA in_proj use the
    zero-centered norm."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k_in = 2 * k if prologue == "silu_mul" else k
    x = torch.randn(m, k_in, generator=gen).to(device=DEVICE, dtype=DT)  # (M, K_in)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(device=DEVICE, dtype=DT)  # (N, K)
    kw = {}
    if prologue == "rmsnorm":
        zc = n == 6400 and DEVICE == "cuda"
        nw = 0.2 * torch.randn(k, generator=gen) + (0.0 if zc else 1.0)
        kw = dict(norm_weight=nw.to(device=DEVICE, dtype=DT), norm_eps=1e-6, norm_zero_centered=zc)
    elif prologue == "sigmoid_gate":
        kw = dict(gate=torch.randn(m, k, generator=gen).to(device=DEVICE, dtype=DT))
    r = torch.randn(m, n, generator=gen).to(device=DEVICE, dtype=DT)  # (M, N)
    return x, w, kw, r


def unfused(x, w, kw, r, prologue, residual, out_dtype):
    """The layers' torch sequence that one fused call replaces (returns a callable)."""
    k = w.shape[1]
    norm = None
    if prologue == "rmsnorm":
        norm = RMSNorm(k, eps=kw["norm_eps"], zero_centered=kw["norm_zero_centered"])
        norm = norm.to(device=DEVICE, dtype=DT)
        with torch.no_grad():
            norm.weight.copy_(kw["norm_weight"])

    def prepare():
        if prologue == "rmsnorm":
            return norm(x)
        if prologue == "silu_mul":
            return F.silu(x[:, :k]) * x[:, k:]
        if prologue == "sigmoid_gate":
            return x * torch.sigmoid(kw["gate"])
        return x

    def run():
        with torch.no_grad():
            h = prepare()
            if residual:
                return Residual(r).project(h, w)
            y = F.linear(h, w)
            return y.float() if out_dtype == torch.float32 else y

    return run, prepare


def fused_call(x, w, kw, r, residual, out_dtype, config=None):
    """The fused gemv as a callable; with ``config`` the kernel at that launch shape (into a fixed
    output when there is no residual)."""
    if config is None:
        if residual:
            return lambda: kg.gemv(x, w, residual=r, **kw)
        return lambda: kg.gemv(x, w, out_dtype=out_dtype, **kw)
    out = None if residual else torch.empty(x.shape[0], w.shape[0], dtype=out_dtype or DT, device=DEVICE)
    args = (kw.get("norm_weight"), kw.get("norm_eps", 1e-6), kw.get("norm_zero_centered", False),
            kw.get("gate"))

    def run():
        kg._launch(x, w, kw.get("prologue"), *args, r if residual else None, 1.0, 1.0, out, config)
        return r if residual else out

    return run


def check(fn, x, w, kw, r, residual, out_dtype) -> float:
    """rms-relative error of one fused call against gemv_reference (in float32)."""
    if residual:
        r0 = r.clone()
        fn()
        got = r.float() - r0.float()  # what was added
        r.copy_(r0)
    else:
        got = fn()
    ref = kg.gemv_reference(x, w, out_dtype=torch.float32, **kw)
    return rel(got, ref)


def candidates(m: int, n: int, k: int) -> list[tuple]:
    """Stage 1 of the sweep: launch_config's default; the elementwise form's (BLOCK_N, BLOCK_K) at
    4 warps with 8192 / M_PAD weights per K step (the tile the default reasons for, at each BLOCK_N);
    three tensor-core (DOT) tiles pipelined 3-4 deep. All with >= 64 programs; <= 8 in all, so the
    sweep (compiles included) stays short."""
    default = kg.launch_config(m, n, k, torch.device(DEVICE))
    if DEVICE == "cpu":
        return [default, (16, 32, 4, 2, True)]
    m_pad = kg.rows_padded(m)
    k_cap = max(64, triton.next_power_of_2(k))
    out = [
        (bn, bk, 4, 1, False)
        for bn in (4, 8, 16, 32)
        for bk in (64, 128, 256, 512, 1024, 2048)
        if bk <= k_cap and m_pad * bn * bk == 8192 and triton.cdiv(n, bn) >= 64
    ]
    out += [
        (bn, bk, 4, stages, True)
        for bn, bk, stages in ((16, 256, 3), (32, 128, 4), (64, 128, 3))
        if bk <= k_cap and triton.cdiv(n, bn) >= 64
    ]
    return [default] + [c for c in out if c != default]


def around(cfg: tuple) -> list[tuple]:
    """Stage 2, around the best of stage 1: the elementwise form with 2 and 8 warps (its num_stages
    should not matter: its sm_90 SASS has no cp.async for the pipeliner to deepen); the DOT form one
    stage shallower and deeper."""
    bn, bk, warps, stages, dot = cfg[:5]
    if DEVICE == "cpu":
        return [(bn, bk, 2, 1, dot)]
    if dot:
        return [(bn, bk, warps, stages - 1, True), (bn, bk, warps, stages + 1, True)]
    return [(bn, bk, 2, 1, False), (bn, bk, 8, 1, False)]


def sweep(shapes, rows, deadline: float, results: list) -> dict:
    """Best launch shape per (M_PAD, N, K) among the candidates; stops at ``deadline`` (time.time())."""
    best: dict = {}
    for m in rows:
        for name, k, n, prologue, residual, out_dtype in shapes:
            key = (kg.rows_padded(m), n, k)
            x, w, kw, r = inputs(m, k, n, prologue)
            kw = dict(kw, prologue=prologue)
            times: dict = {}

            def try_config(cfg, x=x, w=w, kw=kw, r=r, residual=residual, out_dtype=out_dtype, times=times,
                           name=name, m=m):
                if cfg in times or time.time() > deadline:
                    return
                fn = fused_call(x, w, kw, r, residual, out_dtype, cfg)
                err = check(fn, x, w, kw, r, residual, out_dtype)
                if not err <= 1e-2:
                    print(f"  sweep {name} M={m} {cfg}: WRONG (rel err {err:.2e}), skipped")
                    times[cfg] = float("inf")
                    return
                kept = r.clone()
                times[cfg] = bench(fn, rep=25)
                r.copy_(kept)  # the timed calls added into the residual: the next check needs it as it was

            for cfg in candidates(m, n, k):
                try_config(cfg)
            if not times:
                print(f"  sweep budget spent before {name} M={m}")
                continue
            for cfg in around(min(times, key=times.get)):
                try_config(cfg)
            cfg = min(times, key=times.get)
            default = candidates(m, n, k)[0]
            best[key] = cfg
            print(f"  sweep {name:13} M={m}: best {cfg} {times[cfg] * 1e3:7.1f} us; default {default} "
                  f"{times.get(default, float('nan')) * 1e3:7.1f} us ({len(times)} configs)", flush=True)
            results.append(dict(kind="sweep", name=name, rows=m, n=n, k=k, best=list(cfg),
                                best_us=times[cfg] * 1e3, default=list(default),
                                default_us=times.get(default, float("nan")) * 1e3,
                                all={str(c): t * 1e3 for c, t in times.items()}))
    return best


def measure(shapes, rows, env: dict, results: list, out_path: str) -> None:
    print(f"{'shape':13} {'M':>2} {'N':>6} {'K':>5} {'floor us':>8} {'fused':>14} {'cublas':>14} "
          f"{'unfused':>14} {'err':>8}   (us, %floor)")
    for m in rows:
        for name, k, n, prologue, residual, out_dtype in shapes:
            x, w, kw, r = inputs(m, k, n, prologue)
            floor_us = w.numel() * w.element_size() / env["copy_Bps"] * 1e6
            # the kernel launch itself at launch_config's shape (gemv()'s host-side checks and custom-op
            # dispatch cost tens of us per call on the host, which a CUDA graph does not replay)
            cfg = kg.launch_config(m, n, k, torch.device(DEVICE))
            fused = fused_call(x, w, dict(kw, prologue=prologue), r, residual, out_dtype, cfg)
            err = check(fused, x, w, dict(kw, prologue=prologue), r, residual, out_dtype)
            run_unfused, prepare = unfused(x, w, kw, r, prologue, residual, out_dtype)
            with torch.no_grad():
                h = prepare()
            times = {
                "fused": bench(fused),
                "cublas": bench(lambda h=h, w=w: F.linear(h, w)),
                "unfused": bench(run_unfused),
            }
            cells = " ".join(f"{t * 1e3:7.1f} {100 * floor_us / (t * 1e3):4.0f}%" for t in times.values())
            print(f"{name:13} {m:>2} {n:>6} {k:>5} {floor_us:8.1f} {cells}  {err:8.1e}", flush=True)
            results.append(dict(kind="time", name=name, rows=m, n=n, k=k, prologue=prologue,
                                residual=residual, out_dtype=str(out_dtype or DT), floor_us=floor_us,
                                rel_err=err,
                                config=list(kg.launch_config(m, n, k, torch.device(DEVICE))),
                                **{f"{k_}_us": t * 1e3 for k_, t in times.items()}))
            atomic_write_json(out_path, {"env": env, "tuning": tuning_json(), "results": results})


def chain(n_calls: int, k: int, env: dict, results: list) -> None:
    """Back-to-back dependent GEMVs (each one's x is the previous one's output, [1, k] x [k, k]) captured
    in ONE CUDA graph, with and without programmatic dependent launch (attnlab.kernels._pdl) and
    against cuBLAS ``F.linear``: the per-call cost where a decode step's ~100 launches sit back to back,
    which single-launch timings (do_bench) cannot show."""
    from attnlab.kernels import _pdl

    n_w = max(4, -(-(128 << 20) // (k * k * 2)))  # distinct weights, 128 MB together: not L2-resident
    w = [torch.randn(k, k, device=DEVICE, dtype=DT) * k**-0.5 for _ in range(n_w)]
    floor_us = k * k * 2 / env["copy_Bps"] * 1e6
    print(f"chain of {n_calls} dependent GEMVs [1, {k}] x [{k}, {k}] in one CUDA graph "
          f"(floor {floor_us:.2f} us)")
    for label in ("pdl", "no_pdl", "cublas"):
        _pdl.ENABLED = label == "pdl"
        bufs = [torch.randn(1, k, device=DEVICE, dtype=DT) for _ in range(2)]
        cfg = kg.launch_config(1, k, k, torch.device(DEVICE))

        def step(bufs=bufs, cfg=cfg, label=label):
            for i in range(n_calls):
                x, y = bufs[i % 2], bufs[(i + 1) % 2]
                if label == "cublas":
                    torch.mm(x, w[i % n_w].t(), out=y)
                else:
                    kg._launch(x, w[i % n_w], None, None, 1e-6, False, None, None, 1.0, 1.0, y, cfg)

        graph, _ = capture_cuda_graph(step)
        ms = bench(graph.replay, rep=50)
        per_us = ms * 1e3 / n_calls
        print(f"  {label:7} {per_us:6.2f} us per GEMV ({100 * floor_us / per_us:.0f}% of floor)", flush=True)
        results.append(dict(kind="chain", label=label, k=k, n_calls=n_calls, per_call_us=per_us,
                            floor_us=floor_us))
    _pdl.ENABLED = True


def tiled_candidates(n: int, k: int) -> list[tuple]:
    """The chain sweep's tiled-form (PERSIST 0) configs: launch_config's (TUNING's entry: the last
    sweep's best) and two neighbours; the previous chain sweep ranked 8 such and TUNING holds its winner."""
    default = (*kg.launch_config(1, n, k, torch.device(DEVICE))[:5], 0)  # (its tiled form if TUNING's is not)
    if DEVICE == "cpu":
        return [default]
    k_pow2 = triton.next_power_of_2(k)
    cands = [default, (4, min(2048, k_pow2), 4, 1, False, 0), (8, min(1024, k_pow2), 4, 1, False, 0)]
    if WIDE_TILED:  # --tiled-only: the whole 16 KB-a-step family, and 8 warps for the widest steps
        cands += [(16, min(512, k_pow2), 4, 1, False, 0), (32, min(256, k_pow2), 4, 1, False, 0),
                  (8, min(2048, k_pow2), 8, 1, False, 0), (4, min(4096, k_pow2), 8, 1, False, 0)]
    return list(dict.fromkeys(cands))


def persistent_candidates(n: int, k: int) -> list[tuple]:
    """The persistent form's grid: PERSIST 1, 2, 4 x BLOCK_N 4, 8, 16 x BLOCK_K 1024, 2048 (<= K's
    power of 2) x 4, 8 warps, keeping the weight tiles of 32..128 elements per thread (fewer: too
    little in flight per program; more: two tiles in registers spill, sm_90 compile) and dropping
    PERSIST values that give the same grid (min(tiles, PERSIST x SMs)). Most promising first (64
    elements per thread, 2 programs per SM), so a budget cut drops the long shots."""
    grid_n, grid_k, grid_warps, per_thread_ok = (4, 8, 16), (1024, 2048), (4, 8), range(32, 129)
    if DEVICE == "cpu":  # the interpreter: toy blocks (several K steps), its 4 "SMs"
        grid_n, grid_k, grid_warps, per_thread_ok = (4, 8), (32,), (4,), range(0, 1 << 20)
    k_pow2 = triton.next_power_of_2(k)
    out, seen = [], set()
    for bn in grid_n:
        for bk in dict.fromkeys(min(b, k_pow2) for b in grid_k):
            if triton.cdiv(k, bk) > 16:  # the persistent form unrolls its K loop
                continue
            for warps in grid_warps:
                if bn * bk // (32 * warps) not in per_thread_ok:
                    continue
                for persist in (1, 2, 4):
                    grid = kg.persistent_grid(n, bn, persist, torch.device(DEVICE))
                    if (bn, bk, warps, grid) not in seen:
                        seen.add((bn, bk, warps, grid))
                        out.append((bn, bk, warps, 1, False, persist))

    def rank(c):
        per_thread = c[0] * c[1] // (32 * c[2])
        return (per_thread != 64, per_thread != 32, abs(c[5] - 2), c[2])

    return sorted(out, key=rank)


def time_chain(fns: list, n_calls: int) -> float:
    """us per launch of n_calls launches (fns in turn) back to back in one CUDA graph (with PDL, as
    the decode step runs them); on the CPU smoke run each fn once, timed on the host."""
    if DEVICE == "cpu":
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - t0) * 1e6 / len(fns)
    def chain():
        for i in range(n_calls):
            fns[i % len(fns)]()

    graph, _ = capture_cuda_graph(chain)
    return bench(graph.replay, rep=30) * 1e3 / n_calls


def chain_sweep(shapes, env: dict, results: list, out_path: str, n_calls: int = 32,
                budget_s: float = 120.0) -> dict:
    """Launch shapes timed as the decode step runs them: n_calls launches of one shape back to back in
    a CUDA graph with programmatic dependent launch (M = 1), over distinct weights (192 MB: never
    L2-resident): the tiled form's best (tiled_candidates) against the persistent form's
    (persistent_candidates, then its two best with the L2 prefetch, L2_AHEAD 1 and 2). One line per
    shape with both. Each shape gets an equal share of what is left of ``budget_s``; its tiled
    candidates always run, its persistent grid until 80% of the share is spent (those left untimed
    are counted), the 4 L2 variants always. -> {(1, N, K):
    the faster config}; the JSON gets both."""
    best = {}
    deadline = time.time() + budget_s
    for i, (name, k, n, prologue, residual, out_dtype) in enumerate(shapes):
        x, w, kw, r = inputs(1, k, n, prologue)
        kw = dict(kw, prologue=prologue)
        n_w = 2 if DEVICE == "cpu" else max(1, -(-(192 << 20) // w.nbytes))
        ws = [w] + [torch.randn_like(w) * k**-0.5 for _ in range(n_w - 1)]
        floor_us = w.numel() * w.element_size() / env["copy_Bps"] * 1e6
        share_end = time.time() + max(0.0, deadline - time.time()) / (len(shapes) - i)
        times, skipped = {}, 0

        def try_config(cfg, x=x, w=w, ws=ws, kw=kw, r=r, residual=residual, out_dtype=out_dtype, times=times,
                       name=name):
            fns = [fused_call(x, w_i, kw, r, residual, out_dtype, cfg) for w_i in ws]
            kept = r.clone()
            err = check(fns[0], x, w, kw, r, residual, out_dtype)
            if not err <= 1e-2:
                print(f"  chain {name} {cfg}: WRONG ({err:.2e})")
                return
            times[cfg] = time_chain(fns, n_calls)
            r.copy_(kept)

        grid_end = share_end - 0.2 * (share_end - time.time())  # the last fifth: the L2 prefetch variants
        for cfg in tiled_candidates(n, k) + ([] if WIDE_TILED else persistent_candidates(n, k)):
            if cfg[5] and time.time() > grid_end:
                skipped += 1
                continue
            try_config(cfg)
        # the two best persistent configs again with the L2 prefetch 2 and 3 tiles ahead (L2_AHEAD 1, 2)
        ranked = sorted((c for c in times if c[5]), key=times.get)[:2]
        if k * w.element_size() % 16 == 0:
            for cfg in ranked:
                for ahead in (1, 2):
                    try_config((*cfg[:6], ahead))
        tiled = {c: t for c, t in times.items() if not c[5]}
        persistent = {c: t for c, t in times.items() if c[5]}
        if not times:
            continue
        row = dict(kind="chain_sweep", name=name, n=n, k=k, floor_us=floor_us, skipped=skipped,
                   all={str(c): t for c, t in times.items()})
        cells = []
        for form, group in (("tiled", tiled), ("persistent", persistent)):
            if group:
                c = min(group, key=group.get)
                row[f"{form}_best"], row[f"{form}_us"] = list(c), group[c]
                cells.append(f"{form} {c} {group[c]:6.2f} us ({100 * floor_us / group[c]:3.0f}%)")
            else:
                cells.append(f"{form}: none timed")
        cfg = min(times, key=times.get)
        best[(1, n, k)] = cfg
        row.update(best=list(cfg), best_us=times[cfg])
        gain = ""
        if tiled and persistent:
            gain = f" -> persistent {100 * (row['persistent_us'] / row['tiled_us'] - 1):+.1f}%"
        print(f"  chain {name:13} N={n:6} K={k:5} floor {floor_us:6.2f}: " + " | ".join(cells) + gain
              + (f" ({len(times)} configs, {skipped} over budget)"), flush=True)
        results.append(row)
        atomic_write_json(out_path, {"env": env, "tuning": tuning_json(), "results": results})
    return best


def tuning_json() -> dict:
    return {str(k): list(v) for k, v in kg.TUNING.items()}


def main(argv: list[str] | None = None) -> dict:
    global DEVICE, WIDE_TILED
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,4", help="decode rows M to time (comma-separated, <= MAX_ROWS)")
    ap.add_argument("--sweep", action="store_true", help="tune the launch shape per shape first")
    ap.add_argument("--sweep-rows", default="1", help="rows M the sweep tunes for")
    ap.add_argument("--sweep-budget-s", type=float, default=60.0, help="stop sweeping after this long")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU needed: the whole script at toy sizes under TRITON_INTERPRET=1")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gemv_gpu.json")
    ap.add_argument("--chain", action="store_true", help="also time 64 dependent GEMVs in one CUDA graph "
                    "with and without programmatic dependent launch, and cuBLAS")
    ap.add_argument("--chain-only", action="store_true", help="only the --chain timings")
    ap.add_argument("--chain-budget-s", type=float, default=105.0,  # the H100 run: < 150 s in all
                    help="the chain sweep's wall time (past a shape's share, its persistent configs are "
                    "skipped)")
    ap.add_argument("--tiled-only", action="store_true",
                    help="the chain sweep: the tiled form only (more BLOCK_N x BLOCK_K choices, no "
                    "persistent form: inside the decode step it lost, benchmarks/RESULTS.md)")
    ap.add_argument("--shapes", default=None, help="comma-separated SHAPES names to run (default: all)")
    args = ap.parse_args(argv)
    shapes = SHAPES
    if args.shapes:
        names = args.shapes.split(",")
        unknown = sorted(set(names) - {s[0] for s in SHAPES})
        if unknown:
            ap.error(f"--shapes: unknown {', '.join(unknown)}; choose from {', '.join(s[0] for s in SHAPES)}")
        shapes = [s for s in SHAPES if s[0] in names]
    WIDE_TILED = args.tiled_only
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--cpu-smoke: TRITON_INTERPRET=1 must be set before triton is imported")
        DEVICE, shapes = "cpu", SMOKE_SHAPES
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --cpu-smoke)")
    rows = [int(v) for v in args.rows.split(",") if v]
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, "gemv_gpu.json")
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter smoke run)"
    env = {"device": name, "copy_Bps": copy_bandwidth()}
    print(f"{name}: copy {env['copy_Bps'] / 1e12:.2f} TB/s")
    results: list = []
    if args.sweep:
        best = sweep(shapes, [int(v) for v in args.sweep_rows.split(",") if v], start + args.sweep_budget_s,
                     results)
        kg.TUNING.update(best)
        print("# attnlab/kernels/gemv.py, measured on " + name)
        print("TUNING.update({")
        for key, cfg in sorted(best.items()):
            print(f"    {key}: {cfg},")
        print("})")
        print(f"  sweep done ({time.time() - start:.0f} s)", flush=True)
    if args.chain or args.chain_only:
        if DEVICE == "cuda":
            for k in (2048, 4096):
                chain(64, k, env, results)
        best = chain_sweep(shapes, env, results, out_path, budget_s=args.chain_budget_s)
        kg.TUNING.update(best)
        print("# attnlab/kernels/gemv.py, chain sweep (M = 1; PERSIST > 0: the persistent form) on " + name)
        print("TUNING.update({")
        for key, cfg in sorted(best.items()):
            print(f"    {key}: {cfg},")
        print("})", flush=True)
    if not args.chain_only:
        measure(shapes, rows, env, results, out_path)
    report = {"env": env, "tuning": tuning_json(), "results": results}
    atomic_write_json(out_path, report)
    print(f"wrote {out_path}; total {time.time() - start:.0f} s")
    return report


if __name__ == "__main__":
    main()
