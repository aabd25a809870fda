"""How long one chunk's delta-rule prepare takes inside a program that runs chunk after chunk.

A forward that never writes w, u, kd and the per-chunk states would recompute the prepare inside
its segment passes (benchmarks/RESULTS.md, ninth session, "A design for GDN / KDA at 1.5x fla").
There the prepare sits in each program's chain, so what decides it is the prepare's latency per
chunk once its outputs stay on-chip, not its throughput in today's one-chunk-per-program launch
(where most of a program's time is its share of HBM traffic).

This script times exactly that: ``_chain_kernel`` runs ``linear._prepare_chunk`` (the single prepare
kernel's work: gate cumsum, A, the 4x4-block inverse and merge, w, u, kd) over SEG consecutive
chunks per program, P = segments x heads programs. Inputs come from HBM as usual. Outputs go to a
scratch region of the program's own (the same rows for every chunk, so they stay in L2), so
nothing but the inputs moves through DRAM. Per configuration it prints the time, the time per chunk
step of one program (time / SEG), and, for comparison, the production prepare
(``linear._prepare(split=False)``, GDN's single kernel) over the same tokens, one chunk per program,
writing to HBM.

    python benchmarks/prepare_latency_gpu.py                 # GDN, H = 16, D = 128, bf16
    python benchmarks/prepare_latency_gpu.py --op kda --seg 8,32 --segments 8,16
    python benchmarks/prepare_latency_gpu.py --cpu-smoke     # the kernel under TRITON_INTERPRET=1

KDA runs the single kernel's per-channel path (2 warps), which production does not use for KDA (the
split form, PREP_SPLIT): read its rows as an upper bound. ``--cpu-smoke`` checks, at toy sizes under
the Triton interpreter, that every program's last chunk in its scratch equals the production
prepare's w, u, kd for that chunk.
"""

from __future__ import annotations

import argparse
import os
import sys

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from attnlab._io import atomic_write_json
from attnlab.kernels import linear


@triton.jit
def _chain_kernel(
    q, k, v, g, beta, sw, su, skd, sg, sa, scale, T, SEG,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE_VEC: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
):
    """Program (segment s, head h) of one sequence (B = 1): the prepare of chunks s·SEG .. s·SEG + SEG − 1
    one after another. Its outputs go to its own scratch rows 0 .. BT − 1 (laid out like the real
    buffers, rows of H·K / H·V / H·BT, so that _prepare_chunk's strides apply): the pointers handed
    to _prepare_chunk are shifted back by t0 rows, so row t0 + i lands on scratch row i."""
    s, i_h = tl.program_id(0), tl.program_id(1)
    pid = (s * H + i_h).to(tl.int64)
    i_hk = i_h // (H // HK)
    GW: tl.constexpr = K if GATE_VEC else 1  # gate values per token and head
    for c in range(0, SEG):
        t0 = (s * SEG + c) * BT
        back = t0.to(tl.int64)
        linear._prepare_chunk(
            q + i_hk * K, k + i_hk * K, v + i_h * V, g + i_h * GW, beta + i_h,
            sw + pid * (BT * H * K) + i_h * K - back * (H * K),
            su + pid * (BT * H * V) + i_h * V - back * (H * V),
            skd + pid * (BT * H * K) + i_h * K - back * (H * K),
            sg + pid * (BT * H * GW) + i_h * GW - back * (H * GW),
            sa + pid * (BT * H * BT) + i_h * BT - back * (H * BT),
            t0, T, scale, H, HK, K, V, BT, BC, BK, BV, GATE_VEC, DT, PREC,
        )


def make(op: str, t: int, h: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q = r(1, t, h, d)
    k = F.normalize(r(1, t, h, d), dim=-1)
    v = r(1, t, h, d)
    beta = torch.rand(1, t, h, generator=gen)
    g = F.logsigmoid(r(1, t, h) if op == "gdn" else r(1, t, h, d)) * 0.1
    return [x.to(device) for x in (q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(dtype))]


def chain(xs, op: str, seg: int, segments: int, warps: int):
    """A callable launching _chain_kernel over `segments` segments of `seg` chunks, and its scratch."""
    q, k, v, g, beta = xs
    _, t, h, d = q.shape
    n = segments * h
    gw = d if op == "kda" else 1
    bt = linear.CHUNK
    scratch = dict(
        w=torch.zeros(n * bt * h * d, dtype=q.dtype, device=q.device),
        u=torch.zeros(n * bt * h * d, dtype=q.dtype, device=q.device),
        kd=torch.zeros(n * bt * h * d, dtype=q.dtype, device=q.device),
        g=torch.zeros(n * bt * h * gw, dtype=torch.float32, device=q.device),
        a=torch.zeros(n * bt * h * bt if op == "kda" else 1, dtype=torch.float32, device=q.device),
    )
    bk = min(64, max(16, triton.next_power_of_2(d)))
    dt = linear._tl_dtype(q.dtype)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"

    def run():
        _chain_kernel[(segments, h)](
            q, k, v, g, beta, scratch["w"], scratch["u"], scratch["kd"], scratch["g"], scratch["a"],
            d**-0.5, t, seg, H=h, HK=h, K=d, V=d, BT=bt, BC=linear.SUB, BK=bk, BV=bk,
            GATE_VEC=op == "kda", DT=dt, PREC=prec, num_warps=warps,
        )

    return run, scratch


def production(xs, op: str):
    """linear._prepare as the forward runs it for GDN (the single kernel): one chunk per program."""
    q, k, v, g, beta = xs
    b, t, h, d = q.shape
    w, kd, u = torch.empty_like(k), torch.empty_like(k), torch.empty_like(v)
    gcum = torch.empty(g.shape, dtype=torch.float32, device=q.device)
    aqk = torch.empty(b, t, h, linear.CHUNK, dtype=torch.float32, device=q.device) if op == "kda" else q
    gate = 2 if op == "kda" else 1

    def run():
        linear._prepare(q, k, v, g, beta, w, u, kd, gcum, aqk, d**-0.5, q, q, False, gate, split=False)

    return run, dict(w=w, u=u, kd=kd)


def cpu_smoke() -> None:
    """Toy sizes under the interpreter: each program's last chunk, as left in its scratch, equals
    the production prepare's rows of that chunk."""
    seg, segments, h, d = 2, 2, 2, 32
    bt = linear.CHUNK
    for op in ("gdn", "kda"):
        xs = make(op, seg * segments * bt, h, d, torch.float32, "cpu")
        run, scratch = chain(xs, op, seg, segments, 2)
        run()
        prun, ref = production(xs, op)
        prun()
        worst = 0.0
        for s in range(segments):
            t0 = (s * seg + seg - 1) * bt
            for i_h in range(h):
                pid = s * h + i_h
                for name in ("w", "u", "kd"):
                    got = scratch[name].view(segments * h, bt, h, d)[pid, :, i_h]
                    want = ref[name][0, t0 : t0 + bt, i_h]
                    worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
        print(f"cpu smoke {op}: worst relative difference of a program's last chunk {worst:.2e}")
        if worst > 1e-5:
            raise SystemExit(f"{op}: the chained prepare differs from the production prepare ({worst:.2e})")


def _counts(text: str, flag: str) -> list[int]:
    """A comma list of positive integers (argparse type for --seg / --segments)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag}: expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{flag}: expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", default="gdn", choices=("gdn", "kda"))
    ap.add_argument("--seg", default="1,8,32", type=lambda x: _counts(x, "--seg"),
                    help="chunks per program, comma list")
    ap.add_argument("--segments", default="8,16,32", type=lambda x: _counts(x, "--segments"),
                    help="segments per head, comma list (programs: x H)")
    ap.add_argument("--warps", type=int, default=linear.PREP_SINGLE_WARPS["scalar"], choices=(1, 2, 4, 8))
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.heads < 1 or not 16 <= args.head_dim <= 256:
        ap.error(f"--heads must be positive and --head-dim in 16..256, got {args.heads}, {args.head_dim}")
    if args.cpu_smoke:
        cpu_smoke()
        return []
    from triton.testing import do_bench

    def graph_ms(fn) -> float:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return do_bench(graph.replay, warmup=10, rep=50, return_mode="median")

    rows = []
    name = torch.cuda.get_device_name()
    print(f"device: {name}; {args.op}, H = {args.heads}, D = {args.head_dim}, bf16, {args.warps} warps")
    for segments in args.segments:
        for seg in args.seg:
            t = segments * seg * linear.CHUNK
            xs = make(args.op, t, args.heads, args.head_dim, torch.bfloat16, "cuda")
            run, _ = chain(xs, args.op, seg, segments, args.warps)
            prun, _ = production(xs, args.op)
            ms = graph_ms(run)
            pms = graph_ms(prun)
            row = dict(op=args.op, segments=segments, seg=seg, programs=segments * args.heads, T=t,
                       chain_ms=ms, us_per_chunk_step=ms * 1e3 / seg, production_ms=pms)
            rows.append(row)
            print(f"  {segments * args.heads:4d} programs x {seg:3d} chunks (T = {t:6d}): chained "
                  f"{ms:.4f} ms = {ms * 1e3 / seg:6.2f} us per chunk step; production prepare {pms:.4f} ms",
                  flush=True)
            # one file per op and width, so that a second invocation does not replace the first's rows
            out = os.path.join(args.out, f"prepare_latency_gpu_{args.op}_w{args.warps}.json")
            atomic_write_json(out, {"device": name, "warps": args.warps, "rows": rows})
            del xs
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
