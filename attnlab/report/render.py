"""Render report sections as Markdown and as one self-contained HTML page (inline CSS,
images as base64 data URIs, no scripts)."""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Section, Table

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .88em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
th { background: #f2f2f2; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .3em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; } code { background: #f5f5f5; padding: 0 .2em; }
"""


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _md_table(t: Table) -> list[str]:
    lines = [f"*{t.caption}*", ""] if t.caption else []
    lines.append("| " + " | ".join(t.header) + " |")
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(t.header))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in t.rows]
    return lines + [""]


def render_markdown(title: str, sections: list[Section], base: Path, level: int = 2) -> str:
    lines = [f"# {title}", ""] if level == 2 else []
    for sec in sections:
        lines += ["#" * level + " " + sec.title, ""]
        if sec.title == "Diagnostics":
            lines += [
                "<!-- diagnostics: filled by attnlab.report.write_report(diagnostics=[Section, ...]) -->",
                "",
            ]
        for p in sec.paragraphs:
            lines += [p, ""]
        for t in sec.tables:
            lines += _md_table(t)
        for path, caption in sec.images:
            rel = os.path.relpath(path, base)
            lines += [f"![{caption}]({rel})", ""]
        if sec.subsections:
            lines.append(render_markdown(title, sec.subsections, base, level + 1))
    return "\n".join(lines) + ("\n" if level == 2 else "")


def _inline(text: str) -> str:
    """Escape text, keeping `code` spans."""
    parts = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def _html_table(t: Table) -> str:
    cap = f"<caption>{_inline(t.caption)}</caption>" if t.caption else ""
    head = "".join(f"<th>{_inline(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    alt = html.escape(caption, quote=True)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _html_sections(sections: list[Section], level: int) -> list[str]:
    out = []
    for sec in sections:
        out.append(f'<section id="{_slug(sec.title)}"><h{level}>{html.escape(sec.title)}</h{level}>')
        if sec.title == "Diagnostics":
            out.append(
                "<!-- diagnostics: filled by attnlab.report.write_report(diagnostics=[Section, ...]) -->"
            )
        out += [f"<p>{_inline(p)}</p>" for p in sec.paragraphs]
        out += [_html_table(t) for t in sec.tables]
        out += [_img(p, c) for p, c in sec.images]
        out += _html_sections(sec.subsections, level + 1)
        out.append("</section>")
    return out


def render_html(title: str, sections: list[Section]) -> str:
    toc = "".join(f'<li><a href="#{_slug(s.title)}">{html.escape(s.title)}</a></li>' for s in sections)
    body = "\n".join(_html_sections(sections, 2))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        '<link rel="icon" href="data:,">'
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><nav><ul>{toc}</ul></nav>\n{body}\n</body></html>\n"
    )
