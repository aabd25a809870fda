"""Interleaved A/B of kernel settings inside the whole decode step (the in-step A/Bs of RESULTS.md).

A launch shape that wins alone can lose inside the step (early-launched programs take SM slots from
the kernel before them, L2 holds other data), so the decode kernels' settings are compared where they
run: each preset at ~1B parameters is built once (``decode_gpu.build_models``, bf16), then for every
context and round each configuration is set, the step timed (``decode_gpu.time_ours``: caches filled
to the context, the CUDA-graph step replayed ``--steps`` times) and the setting restored. The
configurations alternate within each round, so drift on the card hits them alike; the table reports
the best and every round.

A configuration is ``base`` (the code as it is) or ``;``-separated assignments ``MODULE.PATH=VALUE``:
MODULE a module of ``attnlab.kernels`` (``sparse``, ``gemv``, ``decode``, ``delta_decode``, ...) or else of
``attnlab.layers`` (``fused``: the fused decode step's switches), PATH
an attribute followed by dict keys (``TUNING.decode_row.BLOCK_N``; a key that is not a string is
written as its literal, without spaces: ``gemv.TUNING.(1,2048,5472)``), VALUE a Python literal
(``ast.literal_eval``)::

    python benchmarks/decode_ab.py --presets deepseek-v3 --contexts 4096,32768 --rounds 2 \\
        base "sparse.TUNING.decode_row.PDL=0" "sparse.TUNING.decode_row.BLOCK_N=32"
    python benchmarks/decode_ab.py --tiny --device cpu --mode eager --presets llama --contexts 64 \\
        base "decode.WAVES=1"                              # a smoke run of the code on a CPU

Each timing is printed as it is measured; ``--json`` (written atomically after every timing) keeps
them all.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_gpu as dg  # noqa: E402

from attnlab._io import atomic_write_json  # noqa: E402


def parse_config(text: str) -> list[tuple[object, list[str], object]]:
    """``base`` -> []; else [(module, [attribute, key, ...], value)] for each ``MODULE.PATH=VALUE``.
    ValueError naming the part that is wrong."""
    if text == "base":
        return []
    out = []
    for item in text.split(";"):
        if "=" not in item:
            raise ValueError(f"config {text!r}: {item!r} is not MODULE.PATH=VALUE")
        lhs, rhs = item.split("=", 1)
        parts = lhs.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"config {text!r}: {lhs!r} is not MODULE.ATTRIBUTE[.KEY...]")
        names = [f"{package}.{parts[0]}" for package in ("attnlab.kernels", "attnlab.layers")]
        name = next((n for n in names if importlib.util.find_spec(n) is not None), None)
        if name is None:
            raise ValueError(f"config {text!r}: no module {parts[0]!r} in attnlab.kernels or attnlab.layers")
        try:
            module = importlib.import_module(name)
        except ImportError as e:  # the module is there but does not import here (e.g. no triton)
            raise ValueError(f"config {text!r}: {name} does not import ({e})") from e
        try:
            value = ast.literal_eval(rhs.strip())
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"config {text!r}: {rhs!r} is not a Python literal") from e
        _get(module, parts[1:], text)  # the path must exist
        out.append((module, parts[1:], value))
    return out


def _key(obj, key: str):
    """``key`` as ``obj`` (a dict) holds it: the string, else the Python literal it spells (the
    tuple keys of ``gemv.TUNING``: ``(1,2048,5472)``, no spaces); None when it holds neither."""
    if not isinstance(obj, dict):
        return None
    if key in obj:
        return key
    try:
        lit = ast.literal_eval(key)
    except (ValueError, SyntaxError):
        return None
    return lit if lit in obj else None


def _get(module, path: list[str], text: str):
    if not hasattr(module, path[0]):
        raise ValueError(f"config {text!r}: {module.__name__} has no attribute {path[0]!r}")
    obj = getattr(module, path[0])
    for key in path[1:]:
        found = _key(obj, key)
        if found is None:
            raise ValueError(f"config {text!r}: no key {key!r} under {'.'.join(path)}")
        obj = obj[found]
    return obj


def _set(module, path: list[str], value) -> object:
    """Replace the setting at ``path`` (one that exists: parse_config checked) by ``value``; returns
    the object that was there, which restores it when set back."""
    if len(path) == 1:
        old = getattr(module, path[0])
        setattr(module, path[0], value)
        return old
    parent = getattr(module, path[0])
    for key in path[1:-1]:
        parent = parent[_key(parent, key)]
    last = _key(parent, path[-1])
    old = parent[last]
    parent[last] = value
    return old


@contextlib.contextmanager
def applied(config: list):
    """``config`` (parse_config's) set while the block runs, restored after (also on an error)."""
    done = []
    try:
        for module, path, value in config:
            done.append((module, path, _set(module, path, copy.deepcopy(value))))
        yield
    finally:
        for module, path, old in reversed(done):
            _set(module, path, old)


def time_config(model, config: list, context: int, steps: int, device: str, dtype: torch.dtype,
                mode: str) -> float:
    """ms per token of the step with ``config`` set, restored after (also on an error)."""
    with applied(config):
        return dg.time_ours(model, context, steps, device, dtype, mode)["ms"]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", help="base | MODULE.PATH=VALUE[;...]")
    ap.add_argument("--presets", default="deepseek-v3")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--mode", default="cuda_graph", choices=("cuda_graph", "eager"))
    ap.add_argument("--tiny", action="store_true", help="tiny models (a CPU smoke run)")
    ap.add_argument("--json", default=None, help="write every timing here")
    args = ap.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in dg.PRESETS]
    if unknown:
        ap.error(f"--presets: unknown {unknown}; choose from {dg.PRESETS}")
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c]
        configs = [(c, parse_config(c)) for c in args.configs]
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1 or args.steps < 1 or not contexts or min(contexts) < 1:
        ap.error("--rounds, --steps and every context must be >= 1")
    if args.mode == "cuda_graph" and not args.device.startswith("cuda"):
        ap.error("--mode cuda_graph needs a CUDA --device (use --mode eager on a CPU)")
    dtype = getattr(torch, args.dtype)
    card = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    rows: list[dict] = []
    for preset in presets:
        model, _, _ = dg.build_models(preset, args.tiny, args.device, dtype, with_hf=False)
        for context in contexts:
            for r in range(args.rounds):
                for name, config in configs:
                    ms = time_config(model, config, context, args.steps, args.device, dtype, args.mode)
                    rows.append(dict(preset=preset, context=context, config=name, round=r, ms=ms))
                    print(f"{preset} {context} round {r} {name}: {ms:.4f} ms", flush=True)
                    if args.json:
                        atomic_write_json(args.json, dict(argv=sys.argv[1:] if argv is None else argv,
                                                          card=card, mode=args.mode, dtype=args.dtype,
                                                          rows=rows))
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print("\n| preset | context | config | best ms | rounds |\n|---|---|---|---|---|")
    for preset in presets:
        for context in contexts:
            for name, _ in configs:
                ts = [x["ms"] for x in rows
                      if (x["preset"], x["context"], x["config"]) == (preset, context, name)]
                every = " ".join(f"{t:.4f}" for t in ts)
                print(f"| {preset} | {context:,} | `{name}` | {min(ts):.4f} | {every} |")
    return rows


if __name__ == "__main__":
    main()
