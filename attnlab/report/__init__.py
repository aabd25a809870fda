"""The study's report: ``report.md`` and a self-contained ``report.html``.

Everything in the report is computed from the study's ``summary.json`` (and the cost lab's
``cost.json``) of the same run; the plots are PNG files in the output directory, linked from
the Markdown and embedded base64 in the HTML (no external files, no scripts).

The "Diagnostics" section is a slot: :func:`write_report` takes ``diagnostics``, a list of
:class:`Section` (title, Markdown-ish paragraphs, tables, images) that a diagnostics module
fills; without it the section says that no diagnostics were run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from . import plots
from .render import render_html, render_markdown


@dataclasses.dataclass
class Table:
    """A table for the report: ``header`` and ``rows`` of already-formatted strings."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclasses.dataclass
class Section:
    """A report section: a title, paragraphs (plain text; ``code`` in backticks is kept),
    tables, and images (PNG paths, embedded in the HTML, linked relative to the report in
    the Markdown), each image with an optional caption."""

    title: str
    paragraphs: list[str] = dataclasses.field(default_factory=list)
    tables: list[Table] = dataclasses.field(default_factory=list)
    images: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    subsections: list[Section] = dataclasses.field(default_factory=list)


DIAGNOSTICS_TITLE = "Diagnostics"


def build_sections(
    summary: dict[str, Any],
    out_dir: Path,
    cost_result: dict | None = None,
    diagnostics: list[Section] | None = None,
) -> list[Section]:
    """The report's sections, plots written into ``out_dir`` on the way."""
    from ..compare import human_bytes, recall_cell, summary_table_rows

    s = summary["settings"]
    lengths = summary["lengths"]
    seeds = summary.get("seeds")  # present only when several training seeds were run
    sections: list[Section] = []

    header, rows = summary_table_rows(summary)
    overview = Section(
        "Summary",
        paragraphs=[
            f"{len(summary['models'])} models, each with {summary['param_budget']:,} parameters (± a few %: "
            f"the SwiGLU width `d_ff` of each is chosen to match), d_model {s['d_model']}, trained "
            f"{s['steps']} steps (batch {s['batch_size']}, lr {s['lr']}) on one mixture of "
            + ", ".join(f"`{t}`" for t in summary["tasks"])
            + f" at length {summary['train_len']}, then scored at lengths {', '.join(map(str, lengths))} "
            f"({s['eval_samples']} samples per task, length and needle depth).",
            "Recall is the mean over the tasks of: MQAR and needle accuracy at the answer tokens "
            "(teacher-forced; needle averaged over depths) and the MRCR SequenceMatcher score of the "
            "greedily decoded answer. `*` marks lengths beyond training. Cache memory is per sequence "
            f"({summary['cache_dtype']}, recurrent states float32), from each layer's cache declaration. "
            "Exponents are log-log slopes of the analytic decode / prefill FLOPs between 128K and 1M tokens "
            "(2 quadratic, 1 linear, 0 flat).",
            _seeds_paragraph(summary),
        ],
        tables=[Table(header, rows)],
    )
    for m in summary["models"]:
        if m.get("diverged"):
            overview.paragraphs.append(f"Note: {m['name']} {m['diverged']}")
    sections.append(overview)

    recall = Section("Recall vs context length")
    of_seeds = f" (mean over {len(seeds)} seeds)" if seeds else ""
    if seeds:
        recall.paragraphs.append(
            f"Plots show the mean over the {len(seeds)} seeds; the tables give the mean and, in parentheses, "
            "the lowest and highest seed's recall (%)."
        )
    recall.images.append(
        (plots.recall_vs_length(summary, out_dir), f"recall against context length, per task{of_seeds}")
    )
    for task in summary["tasks"]:
        t_rows = [[m["name"]] + [recall_cell(m, L, task) for L in lengths]
                  for m in summary["models"]]  # fmt: skip
        recall.tables.append(Table(["model"] + [str(L) for L in lengths], t_rows, caption=f"`{task}`"))
    sections.append(recall)

    heat = plots.needle_heatmaps(summary, out_dir)
    if heat is not None:
        sections.append(Section(
            "Needle in a haystack: depth x length",
            paragraphs=["Accuracy of the needle's value by where the needle sits (0 = start of the haystack, "
                        "1 = end, next to the question) and by context length" + of_seeds + "."],
            images=[(heat, f"needle accuracy by depth and length, per model{of_seeds}")],
        ))  # fmt: skip

    L = max(lengths)
    pareto = Section(
        "Recall vs memory",
        paragraphs=[f"Each model's recall at {L} tokens against the cache it holds at {L} tokens; the line "
                    "joins the models no other model beats on both" + of_seeds + "."],
        images=[(plots.recall_vs_memory(summary, out_dir), "recall vs cache memory, Pareto front")],
        tables=[Table(
            ["model", "pattern", "params", "d_ff", "layers"]
            + [f"cache@{x}" for x in lengths],
            [[m["name"], m["pattern"], f"{m['params']:,}", str(m["d_ff"]), str(m["n_layers"])]
             + [human_bytes(m["cache_bytes_at_lengths"][str(x)]) for x in lengths]
             for m in summary["models"]],
        )],
    )  # fmt: skip
    sections.append(pareto)

    cost = Section("Cost vs context")
    cost.images.append((plots.cache_vs_context(summary, out_dir), "cache memory of the trained models"))
    cost.tables.append(Table(
        ["model", "decode FLOPs exp", "prefill FLOPs exp", "measured decode exp", "measured prefill exp"],
        [[m["name"]] + [_exp(m["exponents"][k]) for k in
                        ("decode_flops", "prefill_flops", "measured_decode", "measured_prefill")]
         for m in summary["models"]],
        caption="analytic exponents are for the trained models; measured ones are the cost lab's single "
                "layer of the model's mechanism, timed on this machine",
    ))  # fmt: skip
    if cost_result is not None:
        from ..cost import summary_rows

        cost.paragraphs.append(
            f"The cost lab timed one layer of each mechanism on {cost_result['device']} (d_model "
            f"{cost_result['settings']['d_model']}, {cost_result['settings']['dtype']}): prefill at "
            f"{', '.join(map(str, cost_result['settings']['prefill_contexts']))} tokens and one decode "
            "step at "
            f"{', '.join(map(str, cost_result['settings']['decode_contexts']))} tokens of context."
            + (" It ran once for the study: its timings do not depend on the training seed." if seeds else "")
        )
        cost.tables.append(Table(
            ["mechanism", "implementation", "prefill exp", "decode exp", "decode exp (analytic)"],
            [[r["mechanism"], r["impl"], _exp(r["prefill_exp"]), _exp(r["decode_exp"]),
              _exp(r["analytic_decode_exp"])] for r in summary_rows(cost_result)],
            caption="measured time vs context exponents (cost lab)",
        ))  # fmt: skip
        for name in ("cost_vs_context.png", "memory_vs_context.png", "dollars_vs_context.png"):
            if (out_dir / name).is_file():
                cost.images.append((out_dir / name, name.removesuffix(".png").replace("_", " ")))
    else:
        cost.paragraphs.append("The cost lab was skipped (--skip-cost); the exponents above are analytic.")
    sections.append(cost)

    diag = Section(DIAGNOSTICS_TITLE, subsections=list(diagnostics or []))
    if not diagnostics:
        diag.paragraphs.append("No diagnostics were run for this study.")
    elif seeds:
        diag.paragraphs.append(
            f"The diagnostics ran once, on the first seed's models (seed {seeds[0]}) only."
        )
    sections.append(diag)

    if seeds:
        train_rows = [[m["name"], seed, *_train_cells(m["by_seed"][str(seed)]["train"])]
                      for m in summary["models"] for seed in map(str, seeds)]  # fmt: skip
        train_header = ["model", "seed", "steps", "final loss", "train wall s", "train CPU s"]
    else:
        train_rows = [[m["name"], *_train_cells(m["train"])] for m in summary["models"]]
        train_header = ["model", "steps", "final loss", "train wall s", "train CPU s"]
    train = Section("Training", tables=[Table(train_header, train_rows)], paragraphs=[_run_line(summary)])
    sections.append(train)
    return sections


def _exp(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _train_cells(t: dict[str, Any]) -> list[str]:
    loss = "n/a" if t.get("final_loss") is None else f"{t['final_loss']:.3f}"
    return [str(t["steps"]), loss, f"{t['wall_s']:.0f}", f"{t['cpu_s']:.0f}"]


def _seeds_paragraph(summary: dict[str, Any]) -> str:
    """How many training seeds the numbers come from, and what that means for reading them."""
    seeds = summary.get("seeds")
    if not seeds:
        seed = summary["settings"]["seed"]
        return (
            f"Every model was trained once, with seed {seed}. At this size one training run's recall is "
            "chaotic: a change of seed, or even a float-rounding-level change in the ops, can move a model's "
            "needle recall by tens of points, so differences between models here may be luck; "
            "`attnlab compare --seeds 0,1,2` trains every model once per seed and shows the spread."
        )
    return (
        f"Every model was trained and scored once per seed: {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}), each setting the model's initialization, its training data and "
        "the evaluation samples. Recall cells give the mean over the seeds and, in parentheses, the lowest "
        "and highest seed's recall in % (summary.json holds every seed's numbers). A single seed's "
        "difference between two models that is smaller than this spread is not meaningful."
    )


def _run_line(summary: dict[str, Any]) -> str:
    run = summary.get("run", {})
    if not run:
        return ""
    reused = run.get("reused") or []
    text = f"Study wall time {run.get('wall_s', 0):.0f} s"
    text += f" with {run.get('workers')} worker(s) on {run.get('device')}"
    if reused:
        text += f"; reused from an earlier run: {', '.join(reused)}"
    return text + "."


def write_report(
    summary: dict[str, Any],
    out_dir: str | Path,
    cost_result: dict | None = None,
    diagnostics: list[Section] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` (and the plots) into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    sections = build_sections(summary, out_dir, cost_result, diagnostics)
    title = "attnlab compare: what each attention remembers and what it costs"
    md = out_dir / "report.md"
    html = out_dir / "report.html"
    atomic_write_text(md, render_markdown(title, sections, out_dir))
    atomic_write_text(html, render_html(title, sections))
    return md, html


__all__ = ["Section", "Table", "DIAGNOSTICS_TITLE", "build_sections", "write_report"]
