"""The cost lab on a GPU: every mechanism and preset from 4K to 1M tokens of context.

    python benchmarks/cost_gpu.py                 # on an H100: writes benchmarks/cost_gpu/ (JSON + PNG plots)
    python benchmarks/cost_gpu.py --quick         # fewer contexts, for a first look (< 5 minutes)

This is `attnlab cost` with GPU-sized settings (bf16, d_model 2048, 16 heads of 128, published-size
windows / top-k), so the curves and exponents are measured with the kernels the layers use on CUDA
(``impl`` column). A context that runs out of memory is recorded as that mechanism's limit, never a
crash. Results go in benchmarks/RESULTS.md by hand, with the card and date. Status (2026-11-26): written,
not yet run on a GPU (the session's device time went to the kernel and decode benchmarks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from attnlab.cost import CostSettings, format_table, run_cost_lab, write_json_atomic, write_plots

FULL = dict(
    prefill_contexts=(4096, 16384, 65536, 262144, 1048576),
    decode_contexts=(4096, 16384, 65536, 262144, 1048576),
)
QUICK = dict(prefill_contexts=(4096, 16384, 65536), decode_contexts=(4096, 32768, 262144))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).with_name("cost_gpu")))
    ap.add_argument("--mechanisms", default="SWMDLGK")
    ap.add_argument("--price-per-hour", type=float, default=2.0, help="$ per GPU-hour for $/Mtok")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cost_gpu.py needs a CUDA GPU; use `attnlab cost` on the CPU", file=sys.stderr)
        return 2
    s = CostSettings(
        d_model=2048, n_heads=16, n_layers=16, vocab_size=32768, mechanisms=args.mechanisms,
        window=4096, index_topk=2048, device="cuda", dtype="bfloat16", price_per_hour=args.price_per_hour,
        **(QUICK if args.quick else FULL),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_cost_lab(s, progress=lambda m: print(m, flush=True))
    write_json_atomic(result, out / "cost.json")
    write_plots(result, out)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
