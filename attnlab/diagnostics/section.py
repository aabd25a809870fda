"""Plots and the Diagnostics section (Markdown and HTML) for one model or several.

Everything here reads the plain data of :func:`attnlab.diagnostics.run_diagnostics`, keyed by
a label per model (``{"llama": result, ...}``), so ``attnlab diagnose`` (one model) and the
``attnlab compare`` report (all of them) share one code path.
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Any

from .._io import save_figure

PLOTS = {
    "capacity": "diag_capacity.png",
    "forgetting": "diag_forgetting.png",
    "horizons": "diag_horizons.png",
    "selection": "diag_selection.png",
    "attribution": "diag_attribution.png",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=100)


def _grid(plt, n: int, w: float = 4.0, h: float = 3.0):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _kib(n: int | float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def write_plots(results: dict[str, dict[str, Any]], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write the PNGs that ``results`` have data for into ``out_dir``; returns name -> file name."""
    plt = _plt()
    out_dir = Path(out_dir)
    written: dict[str, str] = {}

    with_cap = {k: r for k, r in results.items() if r.get("capacity")}
    if with_cap:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for label, r in with_cap.items():
            rows = r["capacity"]
            kd = r["model"].get("linear_key_dim")
            extra = f", D_k {kd}" if kd else ""
            ax.plot(
                [x["facts"] for x in rows],
                [x["recall"] for x in rows],
                "o-",
                label=f"{label} ({_kib(rows[0]['cache_bytes'])}{extra})",
            )
        guess = {x["facts"]: x.get("guess_recall") for r in with_cap.values() for x in r["capacity"]}
        if all(v is not None for v in guess.values()):
            xs = sorted(guess)
            ax.plot(xs, [guess[x] for x in xs], "k:", lw=1, label="1/N: a stored value at random")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("facts stored (MQAR pairs / needles)")
        ax.set_ylabel("recall")
        ax.set_ylim(-0.02, 1.02)
        ctx = next(iter(with_cap.values()))["settings"]["seq_len"]
        ax.set_title(f"capacity at {ctx} tokens (legend: cache per sequence)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written["capacity"] = _save(fig, out_dir / PLOTS["capacity"]).name

    with_fg = {k: r for k, r in results.items() if r.get("forgetting")}
    if with_fg:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for label, r in with_fg.items():
            rows = r["forgetting"]
            ax.plot([x["distance_mean"] for x in rows], [x["recall"] for x in rows], "o-", label=label)
        ax.set_xlabel("distance from fact to query (tokens)")
        ax.set_ylabel("recall")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("forgetting: recall vs distance", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written["forgetting"] = _save(fig, out_dir / PLOTS["forgetting"]).name

    with_hl = {k: r for k, r in results.items() if r.get("horizon_histograms")}
    if with_hl:
        fig, axes = _grid(plt, len(with_hl))
        for ax, (label, r) in zip(axes, with_hl.items(), strict=True):
            for hist in r["horizon_histograms"]:
                edges = hist["edges"]
                ax.stairs(hist["counts"], edges, label=f"layer {hist['layer']} {hist['letter']}")
            ax.axvline(math.log10(r["settings"]["seq_len"]), color="k", ls=":", lw=1)
            used = [
                (h["edges"][j], h["edges"][j + 1])
                for h in r["horizon_histograms"]
                for j, c in enumerate(h["counts"])
                if c
            ]
            if used:
                ax.set_xlim(min(a for a, _ in used) - 0.5, max(b for _, b in used) + 0.5)
            ax.set_xlabel("log10 half-life (tokens); dotted: context")
            ax.set_ylabel("count")
            unit = {"L": "heads", "G": "tokens x heads", "K": "tokens x heads x channels"}
            kinds = sorted({h["letter"] for h in r["horizon_histograms"]})
            ax.set_title(f"{label}: over {', '.join(unit[k] for k in kinds)}", fontsize=8)
            ax.legend(fontsize=6)
        fig.tight_layout()
        written["horizons"] = _save(fig, out_dir / PLOTS["horizons"]).name

    with_sel = [(label, row) for label, r in results.items() for row in (r.get("selection") or [])]
    if with_sel:
        fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(with_sel) + 2), 4.2))
        names = ("selected_rate", "chance_rate", "recall_selected", "recall_pruned")
        width = 0.2
        for j, name in enumerate(names):
            ax.bar(
                [i + (j - 1.5) * width for i in range(len(with_sel))],
                [(row[name] if row[name] is not None else 0.0) for _, row in with_sel],
                width,
                label=name,
            )
        ax.set_xticks(range(len(with_sel)))
        ax.set_xticklabels(
            [f"{label}\nL{row['layer']} {row['letter']}" for label, row in with_sel], fontsize=7
        )
        ax.set_ylim(0, 1.05)
        ax.set_title("selection audit: is the fact's position kept? recall when kept / pruned", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        written["selection"] = _save(fig, out_dir / PLOTS["selection"]).name

    with_attr = {k: r for k, r in results.items() if r.get("attribution")}
    if with_attr:
        fig, axes = _grid(plt, len(with_attr))
        for ax, (label, r) in zip(axes, with_attr.items(), strict=True):
            rows = r["attribution"]
            ax.bar([f"{x['layer']}{x['letter']}" for x in rows[1:]], [x["recall"] or 0.0 for x in rows[1:]])
            ax.axhline(rows[0]["recall"] or 0.0, color="k", ls="--", lw=1, label="intact")
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("layer ablated")
            ax.set_ylabel("recall")
            ax.set_title(f"{label} ({r['model']['pattern']})", fontsize=8)
            ax.legend(fontsize=6)
        fig.tight_layout()
        written["attribution"] = _save(fig, out_dir / PLOTS["attribution"]).name
    plt.close("all")
    return written


# ---------------------------------------------------------------------- tables
def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isinf(x):
            return "∞"
        return f"{x:.3f}" if abs(x) < 100 else f"{x:,.0f}"
    return str(x)


def tables(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, list[str], list[list[Any]]]]:
    """The section's tables as ``(key, title, header, rows)``; key names the plot beside it."""
    out = []
    facts = sorted({x["facts"] for r in results.values() for x in r.get("capacity") or []})
    if facts:
        rows = []
        for label, r in results.items():
            if r.get("capacity"):
                by = {x["facts"]: x["recall"] for x in r["capacity"]}
                rows.append(
                    [
                        label,
                        _kib(r["model"]["cache_bytes"]),
                        r["model"].get("linear_key_dim"),
                        *[by.get(f) for f in facts],
                        r["summary"].get("cliff_facts"),
                    ]
                )
        guess = {x["facts"]: x.get("guess_recall") for r in results.values() for x in r.get("capacity") or []}
        if all(v is not None for v in guess.values()):
            rows.append(["1/N: a stored value at random", "", "", *[guess.get(f) for f in facts], ""])
        out.append(
            (
                "capacity",
                "Capacity: recall vs facts stored",
                ["model", "cache/seq", "linear D_k", *[f"N={f}" for f in facts], "cliff at N"],
                rows,
            )
        )
    bands = sorted(
        {(x["distance_lo"], x["distance_hi"]) for r in results.values() for x in r.get("forgetting") or []}
    )
    if bands:
        rows = []
        for label, r in results.items():
            if r.get("forgetting"):
                by = {(x["distance_lo"], x["distance_hi"]): x["recall"] for x in r["forgetting"]}
                rows.append([label, *[by.get(b) for b in bands]])
        out.append(
            (
                "forgetting",
                "Forgetting: recall vs fact–query distance (tokens)",
                ["model", *[f"{lo}–{hi}" for lo, hi in bands]],
                rows,
            )
        )
    rows = []
    for label, r in results.items():
        layers: dict[int, list[dict]] = {}
        for x in r.get("horizons") or []:
            layers.setdefault(x["layer"], []).append(x)
        for layer, xs in layers.items():
            hl = sorted(math.inf if x["half_life"] is None else x["half_life"] for x in xs)
            unit = "channels" if xs[0]["channel"] is not None else "heads"
            rows.append(
                [
                    label,
                    f"{layer} {xs[0]['letter']}",
                    f"{len(xs)} {unit}",
                    hl[0],
                    hl[len(hl) // 2],
                    hl[-1],
                    xs[0]["source"],
                ]
            )
    if rows:
        out.append(
            (
                "horizons",
                "Memory horizons of linear layers (half-life in tokens)",
                ["model", "layer", "units", "min", "median", "max", "from"],
                rows,
            )
        )
    rows = []
    for label, r in results.items():
        for x in r.get("selection") or []:
            rows.append(
                [
                    label,
                    f"{x['layer']} {x['letter']}",
                    x["mechanism"],
                    x["budget"],
                    x["selected_rate"],
                    x["chance_rate"],
                    x["recall_selected"],
                    x["recall_pruned"],
                    x["n_pruned"],
                ]
            )
    if rows:
        out.append(
            (
                "selection",
                "Selection audit: fact position kept by sparse layers",
                [
                    "model",
                    "layer",
                    "mechanism",
                    "budget",
                    "kept",
                    "chance",
                    "recall kept",
                    "recall pruned",
                    "pruned targets",
                ],
                rows,
            )
        )
    rows = []
    for label, r in results.items():
        for x in r.get("attribution") or []:
            name = "none (intact)" if x["layer"] is None else f"{x['layer']} {x['letter']}"
            rows.append([label, name, x["recall"], x["recall_drop"], x["mean_logit_change"]])
    if rows:
        out.append(
            (
                "attribution",
                "Layer attribution: recall with one mixer ablated",
                ["model", "ablated layer", "recall", "drop", "mean abs Δ logit"],
                rows,
            )
        )
    return out


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


INTRO = (
    "Why the efficient mechanisms forget, measured on the models of this run. Recall is teacher-forced "
    "accuracy at answer positions; a fact's position is the context token holding the answer (an MQAR "
    "value, a needle's digit). Capacity: recall vs facts at a fixed context beside each model's declared "
    "cache bytes (Zoology: recall tracks state size; a linear head stores about D_k keys without "
    "interference); on MQAR, 1/N is the recall of a model that knows which values were stored but not "
    "which key owns which. Forgetting: recall vs fact-query distance; horizons: half-life "
    "ln2/(-log alpha) of each linear layer's decay (Lightning: per head, exact; Gated DeltaNet: per head "
    "and token; KDA: per channel and token, on the probe's hidden states). Selection: how often a sparse "
    "layer keeps the fact's position (DSA top-k from its own indexer, W window + sinks), and recall when "
    "kept vs pruned. Attribution: recall with one layer's mixer output zeroed."
)


def diagnostics_section(
    results: dict[str, dict[str, Any]],
    out_dir: str | os.PathLike,
    note: str = "",
    heading: str = "## Diagnostics",
) -> tuple[str, str]:
    """Write the plots into ``out_dir`` and return ``(markdown, html)`` of the section.
    Markdown links the PNGs by file name (relative to ``out_dir``); HTML embeds them (base64),
    so it is self-contained. ``note`` (e.g. which models were skipped and why) goes under the intro."""
    out_dir = Path(out_dir)
    plots = write_plots(results, out_dir)
    md = [heading, "", INTRO]
    level = heading.split(" ")[0].count("#")
    htm = [
        f"<section id='diagnostics'><h{level}>{html.escape(heading.lstrip('# '))}</h{level}>",
        f"<p>{html.escape(INTRO)}</p>",
    ]
    if note:
        md += ["", note]
        htm.append(f"<p>{html.escape(note)}</p>")
    skipped = [
        f"{label}: {w} ({why})" for label, r in results.items() for w, why in r.get("skipped", {}).items()
    ]
    if skipped:
        line = "Not run: " + "; ".join(skipped) + "."
        md += ["", line]
        htm.append(f"<p>{html.escape(line)}</p>")
    sub = "#" * (level + 1)
    for key, title, header, rows in tables(results):
        md += ["", f"{sub} {title}", ""]
        htm.append(f"<h{level + 1}>{html.escape(title)}</h{level + 1}>")
        if key in plots:
            md += [f"![{title}]({plots[key]})", ""]
            data = base64.b64encode((out_dir / plots[key]).read_bytes()).decode()
            htm.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
        md.append(_md_table(header, rows))
        htm.append(_html_table(header, rows))
    htm.append("</section>")
    return "\n".join(md) + "\n", "\n".join(htm) + "\n"
