"""``attnlab presets`` (what each preset costs to keep in memory) and ``attnlab convert``
(a Hugging Face checkpoint directory -> an attnlab one)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ._format import human_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def _tokens(n: int) -> str:
    """Context lengths the way people say them: 131072 -> 128K, 1048576 -> 1M."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def preset_rows(
    d_model: int, n_layers: int, vocab_size: int, dtype: torch.dtype, context: int
) -> list[dict]:
    """One row per preset: pattern, params, cache bytes per token / constant / at ``context``
    (per sequence, cache in ``dtype``). Models are built on the meta device (no memory)."""
    from .config import ModelConfig
    from .model import HybridLM
    from .presets import preset_names

    rows = []
    for name in preset_names():
        row: dict = {"preset": name}
        try:
            cfg = ModelConfig.preset(name, d_model=d_model, n_layers=n_layers, vocab_size=vocab_size)
            row["pattern"] = cfg.layer_pattern
            with torch.device("meta"):
                model = HybridLM(cfg)
            row["params"] = model.num_params()
            row["bytes_per_token"] = model.cache_bytes_per_token(dtype)
            row["constant_bytes"] = model.cache_constant_bytes(dtype)
            row["bytes_at_context"] = model.cache_bytes(context, 1, dtype)
        except (ValueError, ImportError, AttributeError) as e:
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def _cmd_presets(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype]
    rows = preset_rows(args.d_model, args.n_layers, args.vocab_size, dtype, args.context)
    print(
        f"presets at d_model={args.d_model}, n_layers={args.n_layers}, vocab_size={args.vocab_size}; "
        f"cache per sequence in {args.dtype}"
    )
    head = f"{'preset':<14}{'pattern':<12}{'params':>10}{'cache/token':>13}{'constant':>12}"
    head += f"{'cache @ ' + _tokens(args.context):>15}"
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<14}{r.get('pattern', '?'):<12}  unavailable: {r['error']}")
            continue
        pat = r["pattern"] if len(r["pattern"]) <= 10 else r["pattern"][:9] + "…"
        print(
            f"{r['preset']:<14}{pat:<12}{_human(r['params']):>10}{human_bytes(r['bytes_per_token']):>13}"
            f"{human_bytes(r['constant_bytes']):>12}{human_bytes(r['bytes_at_context']):>15}"
        )
    print(
        "cache/token: bytes added per token of context (layers without a window); constant: recurrent and\n"
        "conv states plus full sliding windows, independent of context length."
    )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .hf import config_from_hf, from_hf

    src, out = Path(args.hf_dir), Path(args.out_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"HF_DIR: {src} has no config.json (not a transformers save_pretrained dir)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"OUT_DIR: {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"OUT_DIR: {out} is not empty; pass --overwrite to replace its files")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise ValueError("convert needs transformers: pip install 'attnlab[hf]'") from e
    hf_config = AutoConfig.from_pretrained(src, local_files_only=True)
    config_from_hf(hf_config)  # fail on MoE / unknown types before loading any weights
    dtype = "auto" if args.dtype == "auto" else DTYPES[args.dtype]
    hf_model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=dtype)
    model = from_hf(hf_model.eval())
    model.save_pretrained(out, overwrite=args.overwrite)
    p = next(model.parameters())
    print(
        f"converted {hf_config.model_type} ({type(hf_model).__name__}) -> {out}: pattern "
        f"{model.cfg.layer_pattern}, {model.num_params():,} parameters, {str(p.dtype).replace('torch.', '')}"
    )
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("presets", help="list presets: pattern, parameters, cache bytes")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=8, help="layers (every preset pattern tiles 8)")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="cache dtype")
    p.add_argument("--context", type=int, default=131072, help="context length for the 'cache @' column")
    p.set_defaults(func=_cmd_presets)

    c = subparsers.add_parser(
        "convert", help="convert a HF checkpoint (qwen3_next, minimax, deepseek_v3/v32, kimi_linear)"
    )
    c.add_argument("hf_dir", metavar="HF_DIR", help="directory written by transformers save_pretrained")
    c.add_argument("out_dir", metavar="OUT_DIR", help="where to write config.json + model.safetensors")
    c.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="load dtype (auto = as stored)")
    c.add_argument("--overwrite", action="store_true", help="replace files in a non-empty OUT_DIR")
    c.set_defaults(func=_cmd_convert)
