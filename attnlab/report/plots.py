"""The study's plots, from ``summary.json`` alone (PNG files; the HTML report embeds them).

- ``recall_vs_length.png``: recall against context length per model, one panel per task
  and one for the mean; a dashed line at the training length.
- ``needle_heatmaps.png``: needle accuracy over depth x length, one panel per model.
- ``recall_vs_memory.png``: recall against cache memory at the longest evaluated length,
  with the Pareto front (no model both recalls more and holds less).
- ``cache_vs_context.png``: each trained model's analytic cache memory from 1K to 1M tokens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .._io import save_figure

_MARKERS = "os^vDP*Xhd<>"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=100)


def _style(i: int) -> dict[str, Any]:
    return {"marker": _MARKERS[i % len(_MARKERS)], "linestyle": "-" if i < 7 else "--", "markersize": 4}


def recall_vs_length(summary: dict[str, Any], out_dir: Path) -> Path:
    plt = _plt()
    tasks = summary["tasks"]
    panels = [("mean recall", None)] + [(t, t) for t in tasks]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.1 * rows + 0.5), squeeze=False)
    lengths = summary["lengths"]
    for ax, (title, task) in zip(axes.flat, panels, strict=False):
        for i, m in enumerate(summary["models"]):
            ys = [(m["recall"] if task is None else m["tasks"][task])[str(L)] for L in lengths]
            ax.plot(lengths, [100 * y for y in ys], label=m["name"], **_style(i))
        ax.axvline(summary["train_len"], color="grey", linestyle=":", linewidth=1)
        if len(lengths) > 1 and min(lengths) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.set_ylim(-3, 103)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_ylabel("recall (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(10, len(labels)), fontsize=8)
    fig.suptitle(f"recall vs context length (dotted: training length {summary['train_len']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    path = _save(fig, out_dir / "recall_vs_length.png")
    plt.close(fig)
    return path


def needle_heatmaps(summary: dict[str, Any], out_dir: Path) -> Path | None:
    plt = _plt()
    models = [m for m in summary["models"] if m["needle_grid"]]
    if not models:
        return None
    spec = next(iter(models[0]["needle_grid"]))
    lengths, depths = summary["lengths"], summary["depths"]
    cols = min(5, len(models))
    rows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.6 * cols + 1.2, 2.5 * rows + 0.8), squeeze=False, layout="constrained"
    )
    image = None
    for ax, m in zip(axes.flat, models, strict=False):
        grid = m["needle_grid"][spec]
        data = [[100 * grid[f"{L}@{float(d)}"] for L in lengths] for d in depths]
        image = ax.imshow(data, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="upper")
        ax.set_title(m["name"], fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("length", fontsize=7)
        ax.set_ylabel("needle depth", fontsize=7)
    for ax in list(axes.flat)[len(models) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy (%)")
    fig.suptitle(f"needle in a haystack ({spec}): accuracy by depth x length", fontsize=10)
    path = _save(fig, out_dir / "needle_heatmaps.png")
    plt.close(fig)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated by another (x lower-or-equal AND y higher-or-equal,
    one strictly): low memory ``x``, high recall ``y``. Sorted by ``x``."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def recall_vs_memory(summary: dict[str, Any], out_dir: Path) -> Path:
    plt = _plt()
    L = max(summary["lengths"])
    models = summary["models"]
    pts = [(m["cache_bytes_at_lengths"][str(L)] / 1024, 100 * m["recall"][str(L)]) for m in models]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (m, (x, y)) in enumerate(zip(models, pts, strict=True)):
        ax.scatter([x], [y], marker=_MARKERS[i % len(_MARKERS)], s=40, label=m["name"], zorder=3)
        ax.annotate(m["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(pts)
    ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="black",
            linewidth=1, alpha=0.6, label="Pareto front")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(f"cache per sequence at {L} tokens (KiB, {summary['cache_dtype']})")
    ax.set_ylabel(f"recall at {L} tokens (%)")
    ax.set_ylim(-3, 103)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("recall vs cache memory (up-left is better)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = _save(fig, out_dir / "recall_vs_memory.png")
    plt.close(fig)
    return path


def cache_vs_context(summary: dict[str, Any], out_dir: Path) -> Path:
    """Analytic cache per sequence of the trained models, 1K..1M tokens (from ``cache_curves``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, m in enumerate(summary["models"]):
        curve = m["cache_curve"]
        label = f"{m['name']} ({m['pattern'][:8]})"
        ax.loglog(curve["context"], [b / 2**20 for b in curve["bytes"]], label=label, **_style(i))
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("cache per sequence (MiB)")
    ax.set_title(
        "the trained models' cache memory vs context (analytic, from the cache declarations)", fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = _save(fig, out_dir / "cache_vs_context.png")
    plt.close(fig)
    return path
