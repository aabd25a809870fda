"""CPU time of the chunked linear-attention ops against their token loops (the oracles).

    python benchmarks/ops_cpu.py                 # T=4096, B=1, H=4, D=64, one thread
    python benchmarks/ops_cpu.py --threads 2 --t 2048

For each family (lightning, gated delta rule, KDA) it runs mode="chunk" and mode="recurrent" on
the same float32 inputs, forward only, interleaved, and prints a Markdown table (then GDN and KDA
beside transformers' chunked torch references, when transformers is installed without fla): the best wall
and process-CPU times, and chunk's speed-up over the loop. Process-CPU time is reported beside
wall time because on a shared, loaded machine wall time mostly measures the neighbours. One
thread by default: on an oversubscribed 2-core machine a second BLAS/OpenMP thread spin-waits
(a [4, 64, 64] batched matmul took 6 ms instead of 20 µs with 2 threads there). A row
with KDA gates of about −10 per token shows the slower route the chunked KDA takes when its
per-channel decay cannot be factored (see attnlab/ops/delta_rule.py).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from attnlab import ops


def make_cases(b: int, t: int, h: int, d: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    q, k, v = rnd(b, t, h, d), rnd(b, t, h, d), rnd(b, t, h, d)
    beta = torch.rand(b, t, h, generator=gen)
    g_head = F.logsigmoid(rnd(b, t, h) + 2)  # per-head log-decay, mostly in (−1, 0)
    g_chan = -torch.rand(b, t, h, d, generator=gen)  # per-channel log-decay in (−1, 0)
    slope = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)])  # MiniMax's slopes (layer 0)
    k_small = k / d**0.5  # lightning does not normalise k: keep Σ k vᵀ at the scale of v
    g_strong = g_chan * 20
    return {
        "lightning": lambda mode: ops.lightning_attention(q, k_small, v, slope, mode=mode),
        "gated_delta_rule": lambda mode: ops.gated_delta_rule(q, k, v, g_head, beta, use_qk_l2norm=True,
                                                              mode=mode),
        "kda": lambda mode: ops.kda(q, k, v, g_chan, beta, use_qk_l2norm=True, mode=mode),
        "kda, gates ≈ −10/token": lambda mode: ops.kda(q, k, v, g_strong, beta, use_qk_l2norm=True,
                                                       mode=mode),
    }


def best_times(fns: dict, repeats: dict) -> dict:
    """Best (wall s, process-CPU s) of each function over its number of runs, after one warm-up.
    Runs are interleaved round-robin so that a burst of load on the machine hits all of them."""
    for fn in fns.values():
        fn()
    walls = {k: [] for k in fns}
    cpus = {k: [] for k in fns}
    for r in range(max(repeats.values())):
        for k, fn in fns.items():
            if r < repeats[k]:
                w, c = time.perf_counter(), time.process_time()
                fn()
                walls[k].append(time.perf_counter() - w)
                cpus[k].append(time.process_time() - c)
    return {k: (min(walls[k]), min(cpus[k])) for k in fns}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--t", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--b", type=int, default=1)
    p.add_argument("--h", type=int, default=4)
    p.add_argument("--d", type=int, default=64, help="D_k = D_v")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the docstring)")
    p.add_argument("--repeats", type=int, default=12,
                   help="timed runs of the chunked path (the loop gets a quarter, at least 2), best kept")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cases = make_cases(args.b, args.t, args.h, args.d)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"B={args.b} T={args.t} H={args.h} D_k=D_v={args.d}, float32, forward only, "
          f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs visible, "
          f"load average {load}\n")
    print("| op | chunk wall ms | chunk CPU ms | loop wall ms | loop CPU ms "
          "| speed-up (wall) | speed-up (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, fn in cases.items():
        with torch.no_grad():
            t = best_times({"chunk": lambda fn=fn: fn("chunk"), "loop": lambda fn=fn: fn("recurrent")},
                           {"chunk": args.repeats, "loop": max(2, args.repeats // 4)})
        (cw, cc), (rw, rc) = t["chunk"], t["loop"]
        print(f"| {name} | {cw * 1e3:.1f} | {cc * 1e3:.1f} | {rw * 1e3:.1f} | {rc * 1e3:.1f} | "
              f"{rw / cw:.1f}× | {rc / cc:.1f}× |", flush=True)

    hf = hf_cases(args.b, args.t, args.h, args.d)
    if hf:
        print("\nOurs (chunk) beside transformers' chunked torch references, same inputs:\n")
        print("| op | ours CPU ms | transformers CPU ms | transformers / ours |")
        print("|---|---:|---:|---:|")
    for name, (ours, ref) in hf.items():
        with torch.no_grad():
            t = best_times({"ours": ours, "hf": ref}, {"ours": args.repeats, "hf": max(2, args.repeats // 4)})
        (_, oc), (_, hc) = t["ours"], t["hf"]
        print(f"| {name} | {oc * 1e3:.1f} | {hc * 1e3:.1f} | {hc / oc:.1f}× |", flush=True)

def hf_cases(b: int, t: int, h: int, d: int) -> dict:
    """Ours (mode="chunk") beside the chunked PyTorch references in transformers (Qwen3-Next's
    torch_chunk_gated_delta_rule, Kimi Linear's chunk_kimi_delta_attention) on the same inputs as
    make_cases; {} without transformers, or with fla installed (transformers would then call fla's
    kernels instead of its torch code)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("fla") is not None:
        return {}
    from transformers.models.kimi_linear import modeling_kimi_linear as kimi
    from transformers.models.qwen3_next import modeling_qwen3_next as qwen

    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    q, k, v = rnd(b, t, h, d), rnd(b, t, h, d), rnd(b, t, h, d)
    beta = torch.rand(b, t, h, generator=gen)
    g_head = F.logsigmoid(rnd(b, t, h) + 2)
    g_chan = -torch.rand(b, t, h, d, generator=gen)
    return {
        "gated_delta_rule": (
            lambda: ops.gated_delta_rule(q, k, v, g_head, beta, use_qk_l2norm=True, mode="chunk"),
            lambda: qwen.torch_chunk_gated_delta_rule(q, k, v, g_head, beta, use_qk_l2norm_in_kernel=True),
        ),
        "kda": (
            lambda: ops.kda(q, k, v, g_chan, beta, use_qk_l2norm=True, mode="chunk"),
            lambda: kimi.chunk_kimi_delta_attention(q, k, v, g_chan, beta, use_qk_l2norm_in_kernel=True),
        ),
    }


if __name__ == "__main__":
    main()
