"""The cost lab on a GPU: every mechanism and preset from 4K to 1M tokens of context.

    python benchmarks/cost_gpu.py --budget-s 300   # H100/H200: writes benchmarks/cost_gpu/ (JSON + PNG plots)
    python benchmarks/cost_gpu.py --quick          # contexts to 64K / 256K only, for a first look
    python benchmarks/cost_gpu.py --device cpu --tiny --out /tmp/x   # CPU smoke run of every code path
    python benchmarks/cost_gpu.py --replot benchmarks/cost_gpu/cost.json  # plots + table from a JSON
    python benchmarks/cost_gpu.py --resume benchmarks/cost_gpu/cost.json  # go on from a partial run

This is `attnlab cost` with GPU-sized settings (bf16, d_model 2048, 16 heads of 128, published-size
window 4096, DSA top-k 2048 and indexer 64 heads of 128), measured with the implementation each layer's
ops pick on CUDA (``impl`` column: Triton kernels for the linear family, the DSA indexer and sparse
attention, and MLA's absorbed decode; SDPA for softmax). Decode is timed by replaying the step
captured as a CUDA graph (``impl`` ends in ``+cuda-graph``; ``--decode-graph eager`` for the old
launch-bound timings); prefill by plain calls.

Never loses results: cost.json is rewritten atomically after every finished curve (``"status":
"partial"`` until the end), and with ``--budget-s`` every curve stops growing (recorded as "stopped:
time budget") when its next context would likely not fit its share of the time left (estimated from
the previous point: setup x context ratio, calls x ratio^2 for prefill, ^1 for decode). Out of
memory is recorded as the mechanism's limit. Contexts run in increasing order; each point prints
its time. Decode curves and presets run first, then prefill from the cheapest mechanism to the
dearest, which get the time the cheap ones left. Results go in benchmarks/RESULTS.md by hand.

One CUDA error never poisons the rest of the run. CUDA errors such as an illegal memory access
are sticky (every later CUDA call of the process fails with them), so the measuring runs in a
worker process that this script starts and watches: when a point raises one, the worker records
it as that curve's limit (the points before it are kept), writes cost.json and exits with
EXIT_POISONED; the script then starts a fresh worker with ``--resume cost.json``, which skips the
finished curves and gets what is left of ``--budget-s`` (counted from this script's start). A worker
that dies outright (a signal, a crash) has the curve it was running (``"running"`` in cost.json)
marked failed the same way. The table and plots are written once, at the end, from cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import attnlab
from attnlab.cost import (
    CostSettings,
    format_table,
    mark_curve_failed,
    run_cost_lab,
    write_json_atomic,
    write_plots,
)

EXIT_POISONED = 75  # a worker's exit status: its CUDA context is poisoned, resume in a fresh process

DOUBLING = tuple(4096 * 2**i for i in range(9))  # 4K .. 1M
FULL = dict(
    prefill_contexts=DOUBLING,
    decode_contexts=DOUBLING,
    preset_decode_contexts=(4096, 32768, 262144, 1048576),
)
QUICK = dict(
    prefill_contexts=DOUBLING[:5],
    decode_contexts=DOUBLING[:7],
    preset_decode_contexts=(4096, 32768),
)
GPU_SIZES = dict(
    d_model=2048, n_heads=16, n_layers=16, vocab_size=32768, window=4096, index_topk=2048,
    index_n_heads=64, index_head_dim=128,
)  # fmt: skip
# every code path at toy sizes, seconds on a CPU (contexts past the window and the top-k)
TINY = dict(
    d_model=32, n_heads=2, n_layers=8, vocab_size=64, window=16, index_topk=8, index_n_heads=2,
    index_head_dim=16, prefill_contexts=(32, 64, 128), decode_contexts=(64, 128, 256),
    preset_decode_contexts=(64, 256), presets=("llama", "deepseek-v32", "qwen3-next"),
)  # fmt: skip


def settings(args: argparse.Namespace) -> CostSettings:
    cuda = args.device.startswith("cuda")
    sizes = TINY if args.tiny else {**GPU_SIZES, **(QUICK if args.quick else FULL)}
    if args.presets is not None:
        sizes = {**sizes, "presets": tuple(p for p in args.presets.split(",") if p)}
    return CostSettings(
        **sizes,
        mechanisms=args.mechanisms,
        device=args.device,
        dtype="bfloat16" if cuda else "float32",
        price_per_hour=args.price_per_hour,
        threads=None if cuda else 1,  # a CPU smoke run: one thread (a second one stalls every op's join
        # when a neighbour takes its core: tiny decode steps took 10x longer)
        budget_s=args.budget_s or None,
        keep_going=True,  # an error in one curve is recorded; the other curves still run
        decode_graph=args.decode_graph or ("simulate" if args.tiny and not cuda else "auto"),
    )


def print_flush(msg: str) -> None:
    print(msg, flush=True)


def finish(result: dict, out: Path) -> None:
    """Plots and the table from a (possibly partial) result."""
    import warnings

    print(format_table(result), flush=True)
    try:
        with warnings.catch_warnings():  # an empty panel's legend warns
            warnings.simplefilter("ignore", UserWarning)
            write_plots(result, out)
    except ImportError as e:  # no matplotlib on this machine: cost.json is there, --replot elsewhere
        print(f"cost_gpu: no plots ({e}); run --replot {out / 'cost.json'} where matplotlib is installed")
    print(f"wrote {out / 'cost.json'} ({result.get('status')}) and plots to {out}", flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="contexts to 64K (prefill) / 256K (decode)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: a smoke run of every code path")
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--budget-s", type=float, default=300.0, help="time budget (s) for all measured curves; 0 = none"
    )
    ap.add_argument("--out", default=str(Path(__file__).with_name("cost_gpu")))
    ap.add_argument("--mechanisms", default="SWMDLGK")
    ap.add_argument("--presets", default=None, help="comma-separated presets ('' = none; default all)")
    ap.add_argument("--price-per-hour", type=float, default=2.0, help="$ per GPU-hour for $/Mtok")
    ap.add_argument(
        "--decode-graph",
        choices=("auto", "eager", "cuda_graph", "simulate"),
        default=None,
        help="how decode is timed (default auto: CUDA-graph replays on CUDA; with --tiny on the CPU, "
        "simulate: the graph protocol without a GPU)",
    )
    ap.add_argument("--replot", metavar="COST_JSON", help="only write plots + table from this cost.json")
    ap.add_argument("--resume", metavar="COST_JSON", help="go on from this partial cost.json (same settings)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # measure in this process
    ap.add_argument("--max-restarts", type=int, default=20, help="fresh worker processes at most")
    return ap.parse_args(argv)


def worker_argv(args: argparse.Namespace, resume: Path | None, budget_s: float) -> list[str]:
    """The command line of a worker process measuring with ``args`` (from ``resume`` if given)
    within ``budget_s`` seconds (0 = no budget)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--device", args.device]
    cmd += ["--budget-s", repr(budget_s), "--out", str(args.out), "--mechanisms", args.mechanisms]
    cmd += ["--price-per-hour", str(args.price_per_hour)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--quick"] if args.quick else []
    cmd += [] if args.presets is None else ["--presets", args.presets]
    cmd += [] if args.decode_graph is None else ["--decode-graph", args.decode_graph]
    cmd += [] if resume is None else ["--resume", str(resume)]
    return cmd


def work(args: argparse.Namespace) -> int:
    """Measure in this process; cost.json after every curve. 0 = complete, EXIT_POISONED = this
    process's CUDA context is poisoned (cost.json says which curve; resume in a fresh one)."""
    s = settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resume = json.loads(Path(args.resume).read_text()) if args.resume else None
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds; cost.json is on disk
    try:
        result = run_cost_lab(
            s,
            progress=print_flush,
            log=print_flush,
            on_update=lambda r: write_json_atomic(r, out / "cost.json"),
            resume=resume,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.get("poisoned") and result["status"] != "complete":
        print(f"cost_gpu: worker {os.getpid()} stops: {result['poisoned']['error'][:200]}", flush=True)
        sys.stderr.flush()
        # no interpreter teardown: freeing CUDA memory in a poisoned context can abort or hang
        os._exit(EXIT_POISONED)
    return 0


def supervise(args: argparse.Namespace) -> int:
    """Run workers until the run is complete: a fresh one after each poisoned CUDA context (or a
    worker that died in a curve), each resuming from cost.json. Then the table and plots."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cost.json"
    resume = Path(args.resume) if args.resume else None
    state: dict = {"proc": None, "stop": False}

    def on_term(signum, frame) -> None:  # a `timeout` kill: pass it on, then plot what is there
        state["stop"] = True
        if state["proc"] is not None and state["proc"].poll() is None:
            state["proc"].send_signal(signal.SIGTERM)

    # the worker imports the same attnlab as this process (the script's folder is not the repo root)
    root = str(Path(attnlab.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    previous = signal.signal(signal.SIGTERM, on_term)
    t0, started = time.monotonic(), time.time()
    rc = 1
    try:
        for attempt in range(args.max_restarts + 1):
            budget = args.budget_s  # 0 = none
            if attempt and budget:  # a fresh worker gets what is left (start-ups and restarts count)
                budget = max(args.budget_s - (time.monotonic() - t0), 1e-3)
            state["proc"] = subprocess.Popen(worker_argv(args, resume, budget), env=env)
            rc = state["proc"].wait()
            if rc == 0 or state["stop"]:
                break
            result = json.loads(path.read_text()) if path.is_file() else None
            if result is not None and args.resume is None and result.get("started_unix", 0) < started:
                result = None  # an older run's file: this run's first worker died before writing
            if result is None or result.get("status") == "complete":
                break
            died = rc != EXIT_POISONED and not result.get("poisoned")
            if died:  # not an exit on a poisoned context: the curve it was in is its limit
                running = result.get("running")
                if not running:
                    print(f"cost_gpu: worker exited with {rc} outside any curve; stopping", flush=True)
                    break
                mark_curve_failed(result, running, f"error: the worker process died in it (exit status {rc})")
                write_json_atomic(result, path)
            if result.get("status") == "complete":
                break
            last = result["curves_finished"][-1] if result["curves_finished"] else "the start"
            print(f"cost_gpu: fresh worker #{attempt + 1} (exit {rc}), resuming after {last}", flush=True)
            resume = path
    finally:
        signal.signal(signal.SIGTERM, previous)
        if path.is_file():
            finish(json.loads(path.read_text()), out)
        print(f"cost_gpu: {time.monotonic() - t0:.0f} s", flush=True)
    if state["stop"]:
        return 143
    complete = path.is_file() and json.loads(path.read_text()).get("status") == "complete"
    return 0 if complete else (rc or 1)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.replot:
        path = Path(args.replot)
        finish(json.loads(path.read_text()), path.parent)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "cost_gpu.py: --device cuda but no CUDA GPU; use --device cpu --tiny for a smoke run",
            file=sys.stderr,
        )
        return 2
    if args.worker:
        return work(args)
    print(f"cost_gpu: {args.device}, budget {args.budget_s} s -> {args.out}", flush=True)
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
