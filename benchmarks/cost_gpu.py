"""The cost lab on a GPU: every mechanism and preset from 4K to 1M tokens of context.

    python benchmarks/cost_gpu.py --budget-s 300   # H100/H200: writes benchmarks/cost_gpu/ (JSON + PNG plots)
    python benchmarks/cost_gpu.py --quick          # contexts to 64K / 256K only, for a first look
    python benchmarks/cost_gpu.py --device cpu --tiny --out /tmp/x   # CPU smoke run of every code path
    python benchmarks/cost_gpu.py --replot benchmarks/cost_gpu/cost.json  # plots + table from a JSON

This is `attnlab cost` with GPU-sized settings (bf16, d_model 2048, 16 heads of 128, published-size
window 4096, DSA top-k 2048 and indexer 64 heads of 128), measured with the implementation each layer's
ops pick on CUDA (``impl`` column: Triton kernels for the linear family, the DSA indexer and sparse
attention, and MLA's absorbed decode; SDPA for softmax).

Never loses results: cost.json is rewritten atomically after every finished curve (``"status":
"partial"`` until the end), and with ``--budget-s`` every curve stops growing (recorded as "stopped:
time budget") when its next context would likely not fit its share of the time left (estimated from
the previous point: setup x context ratio, calls x ratio^2 for prefill, ^1 for decode). Out of
memory is recorded as the mechanism's limit. Contexts run in increasing order; each point prints
its time. Decode curves and presets run first, then prefill from the cheapest mechanism to the
dearest, which get the time the cheap ones left. Results go in benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch

from attnlab.cost import CostSettings, format_table, run_cost_lab, write_json_atomic, write_plots

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
        threads=None,
        budget_s=args.budget_s or None,
        keep_going=True,  # an error in one curve is recorded; the other curves still run
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


def main(argv: list[str] | None = None) -> int:
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
    ap.add_argument("--replot", metavar="COST_JSON", help="only write plots + table from this cost.json")
    args = ap.parse_args(argv)
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
    s = settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # a `timeout` kill (SIGTERM) unwinds through `finally`: plots of what was measured
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    last: dict = {}

    def save(result: dict) -> None:
        write_json_atomic(result, out / "cost.json")
        last["result"] = result

    print(f"cost_gpu: {s.device} {s.dtype}, budget {s.budget_s} s -> {out}", flush=True)
    try:
        run_cost_lab(s, progress=print_flush, log=print_flush, on_update=save)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if "result" in last:
            finish(last["result"], out)
        print(f"cost_gpu: {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
