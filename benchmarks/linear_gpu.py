"""Linear-attention kernels on one GPU: ours (attnlab.kernels.linear) vs fla vs SDPA causal.

    python benchmarks/linear_gpu.py [--T 4096,16384,65536,262144] [--sweep prep,state,output]
                                    [--profile] [--profile-bwd] [--fwdbwd-max 65536]

B=1, H=16, D=128, bf16. Prints, per T: forward ms of SDPA (flash, causal), ours and fla for GDN,
KDA, Lightning; then forward+backward. The floor is the bytes of q, k, v, o (16 KB per token here)
over the copy bandwidth measured at the start. fla (``fla-core``) is used only if importable.
--profile prints per-kernel times at 64K. --sweep first times the launch parameters of the
named kernels (attnlab.kernels.linear.PREP_TUNING, TUNING, OUT_TUNING) at T = 16K and keeps the
fastest per op; ``--sweep segmented`` tunes the segment-parallel Lightning forward
(attnlab.kernels.lightning_fwd.TUNING) at 16K and 64K. Lightning has two rows of ours: the
per-chunk forward ("ours_lightning", LIGHTNING_SEGMENTED off) and the segment-parallel one
("ours_lightning_seg", issue #8's target: 1.5x fla's throughput). GDN and KDA likewise: "ours_gdn" with
the single-pass state kernel (linear.DELTA_SEGMENTED off), "ours_gdn_seg" with the segment-parallel
state pass (attnlab.kernels.delta_segments, which also makes the outputs: linear.FUSED_OUTPUT), tuned by
``--sweep delta_segmented`` at 16K and 64K; the forward+backward rows of ours use the defaults
(segment-parallel state pass, the Triton backward of attnlab.kernels.linear_bwd). Also prints ours-vs-fla
output differences as a sanity check.
--profile-bwd prints per-kernel times of our GDN/KDA forward+backward at 64K, with the Triton and the
batched-PyTorch backward; an fla backward that refuses to run is recorded as fla_<op>_error.
``--ops`` picks the ops timed, ``--fwd-max`` skips the forward rows above a T, ``--ab-backward`` adds
forward+backward rows with the batched-PyTorch backward (linear_bwd.BACKWARD = "batched").
``--gate-scale S`` multiplies the GDN / KDA log-gates by S (30: steep gates, the case where KDA's
prepare factors its gated pairs over shorter segments). ``--graph`` times every forward as the replay
of one captured CUDA graph (same for ours, fla and SDPA: the kernels' throughput without the Python
launch path, which at 16K is longer than Lightning's kernels).
``--ab-prepare`` first times the delta-rule prepare variants against each other, interleaved (best of
3, whole forward with the segment-parallel state pass): the single ``_prepare_kernel``, the split
kernels with w, u, kd in a second launch, and fused (linear.PREP_SPLIT / PREP_FUSED per gate kind),
for GDN and KDA at each --T and for KDA with steep gates (log-gates x 30) at the first; each with its
rms-relative error against the float32 forward (single kernel) on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from attnlab._io import atomic_write_json
from attnlab.kernels import delta_segments, lightning_fwd, linear, linear_bwd

H, D = 16, 128
DT = torch.bfloat16
GATE_SCALE = 1.0  # --gate-scale: GDN / KDA log-gates times this (1: 0.1 · logsigmoid(N(0, 1)))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()  # 1 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3)


def make(t: int, op: str, grad: bool = False):
    q = torch.randn(1, t, H, D, device="cuda", dtype=DT)
    k = F.normalize(torch.randn(1, t, H, D, device="cuda", dtype=torch.float32), dim=-1).to(DT)
    v = torch.randn(1, t, H, D, device="cuda", dtype=DT)
    beta = torch.rand(1, t, H, device="cuda", dtype=DT)
    if op == "gdn":
        g = F.logsigmoid(torch.randn(1, t, H, device="cuda")) * (0.1 * GATE_SCALE)
    elif op == "kda":
        g = F.logsigmoid(torch.randn(1, t, H, D, device="cuda")) * (0.1 * GATE_SCALE)
    else:
        g = None
    xs = [q, k, v, g, beta]
    if grad:
        xs = [x.requires_grad_() if x is not None else None for x in xs]
    return xs


def fla_fns():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.kda import chunk_kda
        from fla.ops.lightning_attn import chunk_lightning_attn
    except Exception as e:  # noqa: BLE001 - any failure means "no fla here"
        print(f"fla not importable: {type(e).__name__}: {e}")
        return None
    return {
        "gdn": lambda q, k, v, g, b: chunk_gated_delta_rule(q, k, v, g, b, scale=D**-0.5)[0],
        "kda": lambda q, k, v, g, b: chunk_kda(q, k, v, g, b, scale=D**-0.5)[0],
        # fla's lightning decay: slope_h = 8/H (1 − layer/L) h; layer 0 of 1 -> 8h/H
        "lightning": lambda q, k, v, g, b: chunk_lightning_attn(q, k, v, layer_idx=0, num_layers=1,
                                                                scale=1.0)[0],
    }


SLOPE = None
# launch parameters tried by --sweep: sequential state kernel, output kernel, prepare kernel
SWEEP = [{"BV": bv, "num_warps": w, "num_stages": st} for bv, w, st in
         [(16, 4, 2), (16, 4, 3), (16, 4, 4), (16, 2, 3), (32, 4, 3)]]
OUT_SWEEP = [{"BV": bv, "num_warps": w, "num_stages": st} for bv, w, st in
             [(64, 4, 2), (128, 4, 2), (128, 8, 2), (64, 8, 3)]]
PREP_SWEEP = [{"num_warps": w} for w in (2, 4, 8)]


def lightning(segmented: bool):
    """Our Lightning forward, per-chunk (the kernels in linear.py) or segment-parallel (lightning_fwd)."""

    def fn(q, k, v, g, b):
        linear.LIGHTNING_SEGMENTED = segmented
        return linear.lightning_attention(q, k, v, SLOPE.to(q.device))[0]

    return fn


def delta(op: str, segmented: bool):
    """Our GDN / KDA forward, with the single-pass state kernel or the segment-parallel state pass
    (attnlab.kernels.delta_segments; linear.DELTA_SEGMENTED)."""
    fn = linear.gated_delta_rule if op == "gdn" else linear.kda

    def run(q, k, v, g, b):
        linear.DELTA_SEGMENTED = segmented
        return fn(q, k, v, g, b)[0]

    return run


def ours_fns():
    global SLOPE
    SLOPE = 8.0 / H * torch.arange(H, device="cuda", dtype=torch.float32)  # same decays as fla's
    return {
        "gdn": delta("gdn", False),
        "kda": delta("kda", False),
        "gdn_seg": delta("gdn", True),
        "kda_seg": delta("kda", True),
        "lightning": lightning(False),
        "lightning_seg": lightning(True),
    }


def sdpa(q, k, v, g, b):
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


ROUNDS = 1  # --rounds: forward timings per implementation, interleaved; the median is reported
GRAPH = False  # --graph: time the forward as a CUDA-graph replay (no host launch overhead)


def bench_fwd(fn, xs) -> float:
    """Median forward ms: of eager calls, or (GRAPH) of replays of one CUDA graph of the call, so that
    the kernels' throughput is timed and not the Python launch path (at 16K, Lightning's kernels take
    ~0.19 ms, less than either library's host-side launch sequence)."""
    with torch.no_grad():
        if not GRAPH:
            return do_bench(lambda: fn(*xs), warmup=10, rep=40, return_mode="median")
        fn(*xs)  # compile / autotune outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(*xs)
        return do_bench(graph.replay, warmup=10, rep=40, return_mode="median")


def bench_fwdbwd(fn, xs, reps: int = 5) -> float:
    """Median of a few timed forward+backward passes (CUDA events) after one warm-up: the
    PyTorch-recompute backwards take long enough that do_bench's estimation rounds dominate."""
    do = torch.randn_like(xs[2])
    leaves = [x for x in xs if x is not None]

    def step():
        for x in leaves:
            x.grad = None
        o = fn(*xs)
        o = o.transpose(1, 2) if o.shape != do.shape else o
        o.backward(do)

    step()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def timed_rounds(fns: dict, xs, rounds: int) -> dict:
    """{name: median forward ms over `rounds` rounds} for the functions fns (None: not available,
    NaN), timed one after another in each round (interleaved: a slow spell of the card hits all of
    them), and with rounds > 1 {name + "_rounds": every round's ms} too."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(safe(bench_fwd, fn, xs) if fn is not None else float("nan"))
    out = {}
    for name, ms in times.items():
        ok = sorted(x for x in ms if x == x)
        out[name] = ok[(len(ok) - 1) // 2] if ok else float("nan")  # the median (lower middle if even)
        if rounds > 1:
            out[name + "_rounds"] = ms
    return out


def safe(f, *a):
    try:
        return f(*a)
    except Exception as e:  # noqa: BLE001 - report the failure in the table, keep benchmarking
        msg = str(e).split("\n")[0][:80]
        print(f"  failed: {type(e).__name__}: {msg}")
        torch.cuda.empty_cache()
        return float("nan")


def sweep(t: int, which: str) -> None:
    """Time launch parameters of the chosen kernels ("prep", "state", "output"), keep the fastest."""
    ours = ours_fns()
    grids = {"state": (linear.TUNING, SWEEP), "output": (linear.OUT_TUNING, OUT_SWEEP),
             "prep": (linear.PREP_TUNING, PREP_SWEEP)}
    for op, kind in (("gdn", "scalar"), ("kda", "vector"), ("lightning", "lightning")):
        xs = make(t, op)
        for name in which.split(","):
            table, grid = grids[name]
            if kind not in table:
                continue
            results = []
            for cfg in grid:
                table[kind] = dict(cfg)
                ms = safe(bench_fwd, ours[op], xs)
                results.append((ms, json.dumps(cfg)))
                print(f"sweep {op:9s} {name:6s} T={t} {json.dumps(cfg)}: {ms:.3f} ms", flush=True)
            table[kind] = json.loads(min(r for r in results if r[0] == r[0])[1])
        del xs
        torch.cuda.empty_cache()


# segment-parallel Lightning forward: one table at a time, the others fixed at their best so far
SEG_SWEEP = {
    "output": [{"BV": bv, "num_warps": w, "num_stages": st} for bv, w, st in
               [(64, 4, 2), (64, 8, 2), (64, 4, 3), (128, 8, 2), (128, 8, 3), (32, 4, 2),
                # sm_90 builds without spills (CPU compile, this session): BV 32 at 8 warps (254
                # registers); BV 64 spills 288 bytes per thread at 4 warps, 96 at 8
                (32, 8, 2), (32, 8, 3), (64, 8, 3)]],
    "state": [{"BV": bv, "num_warps": w, "num_stages": st} for bv, w, st in
              [(64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 4, 2), (32, 4, 2)]],
    "segments": [{"programs_per_sm": p, "min_segment": m} for p, m in
                 [(2, 256), (1, 256), (3, 256), (4, 256), (8, 256), (2, 1024)]],
}


def sweep_segmented(ts=(16384, 65536)) -> None:
    """Coordinate search over lightning_fwd.TUNING: a config's score is the sum over ts of its time
    relative to the current default's; keeps the best of each table."""
    fn = ours_fns()["lightning_seg"]
    xss = {t: make(t, "lightning") for t in ts}
    for name, grid in SEG_SWEEP.items():
        base = {t: safe(bench_fwd, fn, xss[t]) for t in ts}
        best = (float("inf"), dict(lightning_fwd.TUNING[name]))
        for cfg in grid:
            lightning_fwd.TUNING[name] = dict(cfg)
            ms = {t: safe(bench_fwd, fn, xss[t]) for t in ts}
            score = sum(ms[t] / base[t] for t in ts)
            print(f"sweep lightning_seg {name:8s} {json.dumps(cfg)}: "
                  + ", ".join(f"T={t} {ms[t]:.3f} ms" for t in ts), flush=True)
            if score < best[0]:  # NaN (a failed config) never wins
                best = (score, dict(cfg))
        lightning_fwd.TUNING[name] = best[1]
    del xss
    torch.cuda.empty_cache()


# segment-parallel delta-rule state pass (delta_segments.TUNING): coordinate search, one step at a
# time, a config setting one or more tables. Pass 3's column width, pipeline depth (shared memory:
# how many programs fit an SM) and the segment count go together: wider blocks need more segments.
DS_SWEEP = [
    # the fused output pass (GDN's launch; KDA's, "output_vector", is tuned by hand: RESULTS.md). Its
    # programs_per_sm sets the segment count. 32 columns at 8 warps, 1 stage is left out: Triton 3.6
    # builds it with an illegal shared-memory read (compute-sanitizer; delta_segments.TUNING).
    [{"output_scalar": {"BV": bv, "num_warps": w, "num_stages": st, "programs_per_sm": p}}
     for bv, w, st, p in [(32, 4, 1, 2), (32, 4, 1, 3), (64, 4, 1, 1), (64, 4, 1, 2), (64, 4, 2, 1),
                          (128, 8, 1, 1), (128, 8, 1, 2)]],
    [{"transition": {"BX": bx, "num_warps": w, "num_stages": st}} for bx, w, st in
     [(16, 4, 2), (32, 4, 1), (32, 4, 2), (32, 4, 3), (64, 4, 1), (64, 4, 2), (64, 8, 2), (128, 8, 1),
      (128, 8, 2)]],
    [{"scan": {"BV": bv, "BKK": bkk, "num_warps": w, "precision": p}} for bv, bkk, w, p in
     [(32, 32, 4, "ieee"), (16, 32, 4, "ieee"), (64, 32, 4, "ieee"), (32, 64, 8, "ieee"),
      (32, 32, 4, "tf32x3"), (16, 32, 4, "tf32x3"), (32, 32, 4, "tf32")]],
]


def sweep_delta_segmented(ts=(16384, 65536)) -> None:
    """Coordinate search over delta_segments.TUNING on GDN's forward (its fused output pass, then
    the transition and scan passes, which KDA shares): a config's score is the sum over ts of its
    time relative to the step's starting point. (Pass 3 without outputs, TUNING["state"], runs
    only in the backward's recompute now; this sweep does not time it.)"""
    ours = ours_fns()
    fn = ours["gdn_seg"]
    xss = {t: make(t, "gdn") for t in ts}
    old = {t: safe(bench_fwd, ours["gdn"], xss[t]) for t in ts}
    print("sweep gdn_seg: single-pass state kernel " + ", ".join(f"T={t} {old[t]:.3f} ms" for t in ts),
          flush=True)
    for grid in DS_SWEEP:
        names = sorted({name for cfg in grid for name in cfg})
        base = {t: safe(bench_fwd, fn, xss[t]) for t in ts}
        best = (float("inf"), {name: dict(delta_segments.TUNING[name]) for name in names})
        for cfg in grid:
            for name, params in cfg.items():
                delta_segments.TUNING[name] = dict(params)
            ms = {t: safe(bench_fwd, fn, xss[t]) for t in ts}
            score = sum(ms[t] / base[t] for t in ts)
            print(f"sweep gdn_seg {json.dumps(cfg)}: " + ", ".join(f"T={t} {ms[t]:.3f} ms" for t in ts),
                  flush=True)
            if score < best[0]:  # NaN (a failed config) never wins
                best = (score, {name: dict(delta_segments.TUNING[name]) for name in names})
        delta_segments.TUNING.update(best[1])
    print("sweep gdn_seg: kept", json.dumps(delta_segments.TUNING), flush=True)
    del xss
    torch.cuda.empty_cache()


def profile(t: int) -> None:
    """Per-kernel CUDA time of one forward of each op (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    ours = ours_fns()
    for op in ("gdn", "gdn_seg", "kda", "kda_seg", "lightning", "lightning_seg"):
        xs = make(t, op)
        with torch.no_grad():
            ours[op](*xs)
            torch.cuda.synchronize()
            with prof(activities=[ProfilerActivity.CUDA]) as p:
                ours[op](*xs)
                torch.cuda.synchronize()
        for e in p.key_averages():
            if e.device_time_total > 0:
                print(f"profile {op:9s} T={t} {e.key[:40]:40s} {e.device_time_total / 1e3:8.3f} ms")
        del xs


def profile_bwd(t: int) -> None:
    """Per-kernel CUDA time of one forward+backward of our GDN and KDA after a warm-up: top 25 kernels of
    the default (Triton) backward, then the totals with the batched-PyTorch backward (linear_bwd.BACKWARD
    "batched"), its per-chunk terms torch.compile'd, eager (linear_bwd.COMPILE off) and with TF32."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    ours = ours_fns()
    variants = [("triton", "triton", True, False), ("batched compiled", "batched", True, False),
                ("batched eager", "batched", False, False), ("batched compiled+tf32", "batched", True, True)]
    for op in ("gdn", "kda"):
        xs = make(t, op, grad=True)
        do = torch.randn_like(xs[2])
        for label, backward, compiled, tf32 in variants:
            default = linear_bwd.BACKWARD
            linear_bwd.BACKWARD = backward
            linear_bwd.COMPILE = compiled
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                ours[f"{op}_seg"](*xs).backward(do)
                torch.cuda.synchronize()
                with prof(activities=[ProfilerActivity.CUDA]) as p:
                    ours[f"{op}_seg"](*xs).backward(do)
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"profile-bwd {op} {label}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            finally:
                linear_bwd.BACKWARD = default
                linear_bwd.COMPILE = True
                torch.backends.cuda.matmul.allow_tf32 = False
            events = sorted((e for e in p.key_averages() if e.device_time_total > 0),
                            key=lambda e: -e.device_time_total)
            total = sum(e.device_time_total for e in events) / 1e3
            launches = sum(e.count for e in events)
            print(f"profile-bwd {op} T={t} {label}: {total:.3f} ms of kernels, {launches} launches (fwd+bwd)",
                  flush=True)
            if label == "triton":
                for e in events[:25]:
                    ms = e.device_time_total / 1e3
                    print(f"profile-bwd {op:4s} {e.key[:60]:60s} x{e.count:<4d} {ms:8.3f} ms")
        del xs
        torch.cuda.empty_cache()


PREP_VARIANTS = {"single": (False, False), "split": (True, False), "split+fused": (True, True)}


def ab_prepare(ts: list[int], reps: int = 3) -> list[dict]:
    """Interleaved A/B of the prepare variants (see the module docstring); returns one row per case."""
    fns = ours_fns()
    saved = dict(linear.PREP_SPLIT), dict(linear.PREP_FUSED)
    out = []
    cases = [(op, t, 1.0) for t in ts for op in ("gdn", "kda")] + [("kda", ts[0], 30.0)]
    try:
        for op, t, gate_scale in cases:
            kind = "vector" if op == "kda" else "scalar"
            xs = make(t, op)
            xs[3] = xs[3] * gate_scale
            times: dict[str, list[float]] = {}
            errs = {}
            with torch.no_grad():
                linear.PREP_SPLIT[kind] = False
                ref = fns[op + "_seg"](*[x.float() for x in xs]).float()  # float32 inputs: the reference
                for name, (split, fused) in PREP_VARIANTS.items():
                    linear.PREP_SPLIT[kind], linear.PREP_FUSED[kind] = split, fused
                    o = fns[op + "_seg"](*xs).float()
                    errs[name] = ((o - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
            for _ in range(reps):
                for name, (split, fused) in PREP_VARIANTS.items():
                    linear.PREP_SPLIT[kind], linear.PREP_FUSED[kind] = split, fused
                    times.setdefault(name, []).append(safe(bench_fwd, fns[op + "_seg"], xs))
            linear.PREP_SPLIT.update(saved[0])
            linear.PREP_FUSED.update(saved[1])
            row = {"op": op, "T": t, "gate_scale": gate_scale}
            row.update({f"{n}_ms": min(v) for n, v in times.items()})
            row.update({f"{n}_err": e for n, e in errs.items()})
            print(f"ab-prepare {op} T={t} gates x{gate_scale:g}: " + "  ".join(
                f"{n} {min(v):.3f} ms (err vs fp32 {errs[n]:.1e})" for n, v in times.items()), flush=True)
            out.append(row)
            del xs, ref
            torch.cuda.empty_cache()
    finally:
        linear.PREP_SPLIT.update(saved[0])
        linear.PREP_FUSED.update(saved[1])
    return out


def save(out: str, name: str, bw: float, rows: list[dict], brows: list[dict], ab_rows: list[dict]) -> None:
    """Write linear_gpu.json (atomically) with the rows so far and the launch parameters."""
    os.makedirs(out, exist_ok=True)
    atomic_write_json(os.path.join(out, "linear_gpu.json"),
                      {"device": name, "bandwidth": bw, "forward_timing": "cuda_graph" if GRAPH else "eager",
                       "forward_rounds": ROUNDS,
                       "gate_scale": GATE_SCALE,
                       "tuning": linear.TUNING,
                       "out_tuning": linear.OUT_TUNING, "prep_tuning": linear.PREP_TUNING,
                       "prep_split": linear.PREP_SPLIT, "prep_fused": linear.PREP_FUSED,
                       "wukd_from_inputs": linear.WUKD_FROM_INPUTS, "sparse_gcum": linear.SPARSE_GCUM,
                       "solve_tf32": linear.SOLVE_TF32, "overlap_prepare": linear.OVERLAP_PREPARE,
                       "lightning_seg_tuning": lightning_fwd.TUNING,
                       "delta_seg_tuning": delta_segments.TUNING,
                       "fwd": rows, "fwdbwd": brows, "ab_prepare": ab_rows})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="4096,16384,65536,262144")
    ap.add_argument("--sweep", default="", help="comma list of prep,state,output,segmented")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--ab-prepare", action="store_true",
                    help="interleaved A/B of the delta-rule prepare variants")
    ap.add_argument("--fwdbwd-max", type=int, default=65536)
    ap.add_argument("--sdpa-fwdbwd-max", type=int, default=65536)
    ap.add_argument("--profile-bwd", action="store_true",
                    help="per-kernel CUDA times of our GDN/KDA forward+backward at 64K")
    ap.add_argument("--ab-backward", action="store_true",
                    help="fwd+bwd also with the batched-PyTorch delta-rule backward (linear_bwd.BACKWARD)")
    ap.add_argument("--ops", default="gdn,kda,lightning", help="comma list of the ops to time")
    ap.add_argument("--fwd-max", type=int, default=1 << 40,
                    help="time the forward only up to this T (0: forward + backward rows only)")
    ap.add_argument("--graph", action="store_true",
                    help="time forwards as CUDA-graph replays (ours, fla and SDPA alike)")
    ap.add_argument("--gate-scale", type=float, default=1.0,
                    help="GDN / KDA log-gates times this (30: steep gates, ~-2.4 a token; KDA's prepare then "
                         "factors its pairs over shorter segments)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="forward: time ours and fla this many times, interleaved, and report the median")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    global GRAPH, GATE_SCALE, ROUNDS
    GRAPH = args.graph
    if not args.gate_scale > 0:
        ap.error(f"--gate-scale must be positive, got {args.gate_scale}")
    GATE_SCALE = args.gate_scale
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    ROUNDS = args.rounds
    ts = [int(x) for x in args.T.split(",")]
    ops = [x for x in args.ops.split(",") if x]
    bad = [x for x in ops if x not in ("gdn", "kda", "lightning")]
    if bad:
        ap.error(f"--ops: unknown {bad}; expected a comma list of gdn, kda, lightning")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"device: {name}; torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s (read+write); "
          f"gate scale {GATE_SCALE:g}")
    kernels = [x for x in args.sweep.split(",") if x and x not in ("segmented", "delta_segmented")]
    if kernels:
        sweep(16384, ",".join(kernels))
    if "segmented" in args.sweep.split(","):
        sweep_segmented()
    if "delta_segmented" in args.sweep.split(","):
        sweep_delta_segmented()
    ab_rows = ab_prepare(ts) if args.ab_prepare else []
    print("TUNING:", json.dumps(linear.TUNING))
    print("OUT_TUNING:", json.dumps(linear.OUT_TUNING))
    print("PREP_TUNING:", json.dumps(linear.PREP_TUNING))
    print("lightning_fwd.TUNING:", json.dumps(lightning_fwd.TUNING))
    print("delta_segments.TUNING:", json.dumps(delta_segments.TUNING))
    if args.profile:
        profile(65536)
    if args.profile_bwd:
        profile_bwd(65536)
    ours, fla = ours_fns(), fla_fns()

    # sanity: ours vs fla outputs (bf16; both approximate the same function)
    if fla is not None:
        for op in ("gdn", "kda", "lightning"):
            xs = make(4096, op)
            with torch.no_grad():
                a, b = safe(ours[op], *xs), safe(fla[op], *xs)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                err = ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()
                print(f"ours vs fla, {op}, T=4096: rel diff {err:.2e}")
        xs = make(4096, "lightning")
        with torch.no_grad():
            a, b = safe(ours["lightning_seg"], *xs), safe(ours["lightning"], *xs)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            err = ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()
            print(f"ours segmented vs per-chunk, lightning, T=4096: rel diff {err:.2e}")

    for op in ("gdn", "kda"):  # the segment-parallel state pass against the single pass (bf16)
        xs = make(4096, op)
        with torch.no_grad():
            a, b = safe(ours[f"{op}_seg"], *xs), safe(ours[op], *xs)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            err = ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()
            print(f"ours segmented vs single-pass state, {op}, T=4096: rel diff {err:.2e}", flush=True)

    rows = []
    for t in [t for t in ts if t <= args.fwd_max]:
        floor = 4 * t * H * D * 2 / bw * 1e3
        row = {"T": t, "floor": floor}
        xs = make(t, "gdn")
        row["sdpa"] = safe(bench_fwd, sdpa, xs)
        del xs
        for op in ops:
            xs = make(t, op)
            # the single-pass state (Lightning: per-chunk), fla, and the segment-parallel pass (issue #8),
            # interleaved, --rounds times each
            fns = {f"ours_{op}": ours[op], f"fla_{op}": fla[op] if fla else None,
                   f"ours_{op}_seg": ours[f"{op}_seg"]}
            row.update(timed_rounds(fns, xs, ROUNDS))
            if op != "lightning":
                print(f"  fwd T={t} {op}: ours single-pass state {row[f'ours_{op}']:.3f} ms, ours segmented "
                      f"{row[f'ours_{op}_seg']:.3f} ms, fla {row[f'fla_{op}']:.3f} ms", flush=True)
            if op == "lightning":
                print(f"  fwd T={t} lightning: ours per-chunk {row['ours_lightning']:.3f} ms, ours segmented "
                      f"{row['ours_lightning_seg']:.3f} ms, fla {row['fla_lightning']:.3f} ms, "
                      f"floor {floor:.3f} ms", flush=True)
            del xs
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
        save(args.out, name, bw, rows, [], ab_rows)  # after every row: a crash or time limit keeps these

    brows = []
    for t in [t for t in ts if t <= args.fwdbwd_max]:
        row = {"T": t}
        xs = make(t, "gdn", grad=True)
        row["sdpa"] = safe(bench_fwdbwd, sdpa, xs) if t <= args.sdpa_fwdbwd_max else float("nan")
        del xs
        for op in ops:
            xs = make(t, op, grad=True)
            # the default forward (segmented state pass) and backward (linear_bwd.BACKWARD)
            row[f"ours_{op}"] = safe(bench_fwdbwd, ours[op if op == "lightning" else f"{op}_seg"], xs)
            if op != "lightning" and args.ab_backward:  # the first, batched-PyTorch backward beside it
                default, linear_bwd.BACKWARD = linear_bwd.BACKWARD, "batched"
                row[f"ours_{op}_batched_bwd"] = safe(bench_fwdbwd, ours[f"{op}_seg"], xs)
                linear_bwd.BACKWARD = default
                print(f"  fwd+bwd T={t} {op}: ours with the batched backward "
                      f"{row[f'ours_{op}_batched_bwd']:.3f} ms", flush=True)
            row[f"fla_{op}"] = float("nan")
            if fla:  # fla's GDN backward refuses on Hopper with some Triton versions: record why
                try:
                    row[f"fla_{op}"] = bench_fwdbwd(fla[op], xs)
                except Exception as e:  # noqa: BLE001 - a refusal is a result here
                    first = (str(e).splitlines() or [""])[0][:120]
                    row[f"fla_{op}_error"] = f"refused: {type(e).__name__}: {first}"
                    torch.cuda.empty_cache()
            fla_ms = row.get(f"fla_{op}_error") or f"{row[f'fla_{op}']:.3f} ms"
            what = "ours with the per-chunk forward" if op == "lightning" else "ours"
            print(f"  fwd+bwd T={t} {op}: {what} {row[f'ours_{op}']:.3f} ms, fla {fla_ms}", flush=True)
            if op == "lightning":  # the segmented forward also writes the per-chunk states the backward reads
                row["ours_lightning_seg"] = safe(bench_fwdbwd, ours["lightning_seg"], xs)
                print(f"  fwd+bwd T={t} lightning: ours with the segmented forward (the default) "
                      f"{row['ours_lightning_seg']:.3f} ms", flush=True)
            del xs
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        brows.append(row)
        save(args.out, name, bw, rows, brows, ab_rows)
    cols = ["sdpa", "ours_gdn", "ours_gdn_seg", "fla_gdn", "ours_kda", "ours_kda_seg", "fla_kda",
            "ours_lightning", "ours_lightning_seg",
            "fla_lightning"]
    how = "CUDA-graph replays" if GRAPH else "eager calls"
    rounds = f", median of {args.rounds} interleaved rounds" if args.rounds > 1 else ""
    print(f"\n{name}, B=1 H={H} D={D} bf16, ms (median; forward: {how}{rounds})")
    print("forward:")
    print("| T | floor | " + " | ".join(cols) + " |")
    for r in rows:
        print(f"| {r['T']} | {r['floor']:.3f} | "
              + " | ".join(f"{r.get(c, float('nan')):.3f}" for c in cols) + " |")
    print("forward+backward:")
    print("| T | " + " | ".join(cols) + " |")
    for r in brows:
        print(f"| {r['T']} | " + " | ".join(f"{r.get(c, float('nan')):.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
