"""How much faster is a decode GEMV whose weights already sit in L2? (GPU only.)

The ~1B deepseek-v32 MLP's two GEMVs at batch 1 (gate|up with the SwiGLU epilogue: 10944 x 2048 bf16,
44.8 MB; down: 2048 x 5472, 22.4 MB) are timed alone after an L2 flush (a 512 MB write), cold or
after a kernel has bulk-prefetched their first N MB into L2 (``cp.async.bulk.prefetch.L2``, the
fused DSA step's prefetch: ``attnlab.kernels.sparse.PREFETCH_NEXT_BYTES``) and ~23 us have passed
for the fill to land. The host queues each measurement behind a GPU sleep, so no launch gap is
timed. Median of ``--reps``; us.

    python benchmarks/gemv_l2_gpu.py
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", default="0,8,16,24,32,40", help="comma-separated MB prefetched before the GEMV")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=None, help="write the rows here (atomically)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (Hopper: the bulk L2 prefetch is sm_90)")
    try:
        sizes = [int(m) for m in args.mb.split(",") if m]
    except ValueError:
        ap.error(f"--mb: expected comma-separated integers, got {args.mb!r}")
    if args.reps < 1 or any(m < 0 for m in sizes):
        ap.error("--reps must be >= 1 and --mb sizes >= 0")

    import triton
    import triton.language as tl

    from attnlab._io import atomic_write_json
    from attnlab.kernels._common import l2_prefetch
    from attnlab.kernels.gemv import gemv

    chunk = 64 << 10

    @triton.jit
    def _prefetch(W, nbytes, CHUNK: tl.constexpr, PER: tl.constexpr):
        pid = tl.program_id(0)
        for i in tl.static_range(PER):
            off = (pid * PER + i).to(tl.int64) * CHUNK
            l2_prefetch(W.to(tl.pointer_type(tl.int8)) + off, CHUNK, off + CHUNK <= nbytes)

    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    flush = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
    w_gate_up = torch.randn(10944, 2048, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
    w_down = torch.randn(2048, 5472, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
    x = torch.randn(1, 2048, device=dev, dtype=torch.bfloat16, generator=gen)
    h = torch.randn(1, 5472, device=dev, dtype=torch.bfloat16, generator=gen)
    gemvs = {"gate_up": (lambda: gemv(x, w_gate_up, epilogue="silu_mul"), w_gate_up),
             "down": (lambda: gemv(h, w_down), w_down)}

    def prefetch(w: torch.Tensor, nbytes: int) -> None:
        n = nbytes // chunk
        per = triton.cdiv(n, 132)
        _prefetch[(triton.cdiv(n, per),)](w, nbytes, CHUNK=chunk, PER=per, num_warps=1)

    def timed(fn, w: torch.Tensor, nbytes: int) -> float:
        ts = []
        for _ in range(args.reps):
            torch.cuda.synchronize()
            torch.cuda._sleep(2_000_000)  # the GPU spins while the host queues the rest
            flush.zero_()
            if nbytes:
                prefetch(w, nbytes)
            torch.cuda._sleep(40_000)  # ~23 us: the prefetch lands
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) * 1000)
        return sorted(ts)[len(ts) // 2]

    for fn, _ in gemvs.values():
        fn()  # compile
    card = torch.cuda.get_device_name()
    rows = []
    print(f"{card}: GEMV us (median of {args.reps}) after an L2 flush, with its first MB prefetched into L2")
    print(f"{'MB in L2':>8s} {'gate_up':>8s} {'down':>8s}")
    for mb in sizes:
        row = {"mb": mb, "card": card}
        for name, (fn, w) in gemvs.items():
            nbytes = min(mb << 20, w.numel() * w.element_size()) // chunk * chunk
            row[name + "_us"] = timed(fn, w, nbytes)
        rows.append(row)
        print(f"{mb:8d} {row['gate_up_us']:8.1f} {row['down_us']:8.1f}")
        if args.json:
            atomic_write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
