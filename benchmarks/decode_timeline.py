"""Where a decode token's time goes: the kernel timeline of one replay of the CUDA-graph step.

For each preset at ~1B parameters (``decode_gpu.build_models``, bf16, batch 1) and context, the
greedy decode step (``DecodeStep(mode="cuda_graph", greedy=True)``, caches filled to the context) is
replayed a few times back to back under ``torch.profiler`` after warm-up, and every kernel of one of
those tokens (its token copy, then the graph's kernels) is listed with its start and end on the GPU. With PDL
(``attnlab.kernels._pdl``) a kernel starts before the one ahead of it ends, so durations overlap and
do not add up to the token's time; the **exposed** time does: a kernel's end minus the latest end
before it (0 if it ends earlier). The exposed times sum to the span from the first kernel's start to
the last one's end, and show which kernels the token waits on.

Printed per (preset, context): the exposed time by kernel kind (summed over the layers, and per
launch), and one stretch of consecutive kernels from the middle of the step (a layer, roughly).
``--rounds`` profiles that many separate runs of replays; the by-kind table is their mean. The JSON
(``--json``, written atomically after each measurement) keeps every kernel of the last round.
``--configs`` profiles the step under each of several kernel settings in turn, written as
``benchmarks/decode_ab.py`` takes them (``base`` or ``MODULE.PATH=VALUE;...``), each restored after.

    python benchmarks/decode_timeline.py --presets deepseek-v3,deepseek-v32 --contexts 4096
    python benchmarks/decode_timeline.py --presets deepseek-v32 --contexts 131072 \
        --configs base "sparse.TOPK_FUSED_MAX=65536"
    python benchmarks/decode_timeline.py --tiny --device cpu --presets llama --contexts 64   # CPU smoke

On the CPU (``--tiny --device cpu``) the step runs eagerly and its top-level aten ops stand in for
kernels (a smoke run of the script, not a timeline of anything worth reading).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_ab  # noqa: E402
import decode_gpu as dg  # noqa: E402

from attnlab._io import atomic_write_json  # noqa: E402
from attnlab.generate import DecodeStep  # noqa: E402


def kind(name: str) -> str:
    """A short label for a kernel: a Triton kernel's function name without leading underscores and a
    trailing ``_kernel``; for torch's templated kernels the operation inside ``at::native::``."""
    triton_name = re.fullmatch(r"_*(\w+?)(_kernel)?", name)
    if triton_name:
        return triton_name.group(1)
    native = re.search(r"at::native::(?:\(anonymous namespace\)::)?(\w+)", name)
    if native:
        return native.group(1)
    return name[:40]


STEPS_PER_ROUND = 5  # tokens queued back to back per profiled round (CUDA)
WARMUP = 3


def step_kernels(step, tok: torch.Tensor, cuda: bool) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of the kernels of one greedy token (on the CPU: the top-level aten ops
    of all the eager steps). STEPS_PER_ROUND tokens are queued back to back, as a decode loop runs
    them (the host ahead of the GPU: no idle gaps); on CUDA the second-to-last one is returned, from
    its token copy (the Memcpy DtoD before each replay) up to the next one's."""
    steps = STEPS_PER_ROUND
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            tok = dg.greedy_step(step, tok)
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        events = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    out = sorted(((e.name, float(e.time_range.start), float(e.time_range.end)) for e in events),
                 key=lambda k: k[1])
    if not cuda:
        return out
    starts = [i for i, k in enumerate(out) if k[0].startswith("Memcpy DtoD")]
    if len(starts) < 3:
        raise RuntimeError(f"expected a token copy (Memcpy DtoD) before each of {steps} replays, found "
                           f"{len(starts)}: is the step a CUDA graph?")
    return out[starts[-2]: starts[-1]]


def exposed_times(kernels: list[tuple[str, float, float]]) -> list[dict]:
    """Each kernel with its start / end relative to the first start and its exposed time (its end
    minus the latest earlier end, at least 0); they sum to the span of the list."""
    if not kernels:
        return []
    t0 = kernels[0][1]
    last_end = t0
    rows = []
    for name, start, end in kernels:
        rows.append(dict(kind=kind(name), name=name, start_us=start - t0, end_us=end - t0,
                         duration_us=end - start, exposed_us=max(0.0, end - last_end)))
        last_end = max(last_end, end)
    return rows


def by_kind(rounds: list[list[dict]]) -> dict[str, dict]:
    """{kind: {exposed_us (mean over rounds), launches, per_launch_us}}, largest first."""
    total: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    for rows in rounds:
        for r in rows:
            total[r["kind"]] += r["exposed_us"] / len(rounds)
            launches[r["kind"]] += 1
    out = {}
    for k in sorted(total, key=lambda k: -total[k]):
        n = launches[k] // len(rounds)
        out[k] = dict(exposed_us=total[k], launches=n, per_launch_us=total[k] / max(1, n))
    return out


def measure(model, preset: str, context: int, rounds: int, device: str, dtype: torch.dtype,
            config: list | None = None) -> dict:
    """The step's timeline with ``config`` (decode_ab.parse_config's) set, restored after."""
    with decode_ab.applied(config or []):
        return _measure(model, preset, context, rounds, device, dtype)


def _measure(model, preset: str, context: int, rounds: int, device: str, dtype: torch.dtype) -> dict:
    cuda = device.startswith("cuda")
    caches = model.new_caches(1, context + WARMUP + rounds * STEPS_PER_ROUND + 1, device=device, dtype=dtype)
    step = DecodeStep(model, caches, mode="cuda_graph" if cuda else "eager", greedy=True)
    dg.fill_caches(caches)
    dg.set_lengths(caches, context)
    tok = torch.zeros(1, dtype=torch.long, device=device)
    for _ in range(WARMUP):  # compile, first replays
        tok = dg.greedy_step(step, tok)
    all_rounds = []
    for _ in range(rounds):  # (each round adds a few tokens to the context: a negligible change)
        all_rounds.append(exposed_times(step_kernels(step, tok, cuda)))
    spans = [sum(r["exposed_us"] for r in rows) for rows in all_rounds]
    return dict(preset=preset, context=context, n_layers=model.cfg.n_layers, span_us=spans,
                by_kind=by_kind(all_rounds), kernels=all_rounds[-1])


def report(m: dict) -> None:
    rows, n_layers = m["kernels"], m["n_layers"]
    spans = ", ".join(f"{s:.1f}" for s in m["span_us"])
    config = f" [{m['config']}]" if m.get("config", "base") != "base" else ""
    print(f"\n=== {m['preset']} @ {m['context']}{config}: {len(rows)} kernels a token, span {spans} us")
    print(f"{'kind':24s} {'exposed us':>10s} {'launches':>8s} {'us each':>8s}")
    for k, v in m["by_kind"].items():
        print(f"{k:24s} {v['exposed_us']:10.1f} {v['launches']:8d} {v['per_launch_us']:8.2f}")
    per_layer = max(1, len(rows) // n_layers)
    mid = len(rows) // 2
    print(f"a stretch of {per_layer} kernels from the middle of the token (us):")
    print(f"{'kind':24s} {'start':>8s} {'end':>8s} {'dur':>7s} {'exposed':>8s}")
    for r in rows[mid: mid + per_layer]:
        print(f"{r['kind']:24s} {r['start_us']:8.1f} {r['end_us']:8.1f} {r['duration_us']:7.2f} "
              f"{r['exposed_us']:8.2f}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="deepseek-v3,deepseek-v32,llama")
    ap.add_argument("--contexts", default="4096")
    ap.add_argument("--rounds", type=int, default=3, help="separately profiled replays per measurement")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--tiny", action="store_true", help="tiny models (a CPU smoke run)")
    ap.add_argument("--json", default=None, help="write the measurements here (atomically, after each)")
    ap.add_argument("--configs", nargs="+", default=["base"],
                    help="kernel settings to profile in turn, as benchmarks/decode_ab.py takes them")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds: expected >= 1, got {args.rounds}")
    presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        if p not in dg.PRESETS:
            ap.error(f"--presets: unknown preset {p!r} (choose from {', '.join(dg.PRESETS)})")
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c]
    except ValueError:
        ap.error(f"--contexts: expected comma-separated integers, got {args.contexts!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --tiny --device cpu for a smoke run)")
    try:
        configs = [(text, decode_ab.parse_config(text)) for text in args.configs]
    except ValueError as e:
        ap.error(f"--configs: {e}")
    dtype = getattr(torch, args.dtype)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    command = "python benchmarks/decode_timeline.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{card}; command: {command}")
    results = []
    for preset in presets:
        model, _, _ = dg.build_models(preset, args.tiny, args.device, dtype, False)
        for ctx in contexts:
            for text, config in configs:
                m = measure(model, preset, ctx, args.rounds, args.device, dtype, config)
                m["card"], m["command"], m["config"] = card, command, text
                results.append(m)
                report(m)
                if args.json:
                    atomic_write_json(args.json, results)
        del model
        dg.free(args.device)
    return results


if __name__ == "__main__":
    main()
