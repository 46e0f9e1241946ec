"""The report's document model: typed blocks that render themselves to Markdown and HTML.

A :class:`Document` is a title and a list of blocks; each block type knows its two
renderings (``to_markdown``, ``to_html``), so nothing dispatches on tags. Text of a
heading, paragraph or bullet may use the two inline marks the report needs, `code` and
**bold**; everything else is escaped in HTML. Images are linked in Markdown (relative to
the report's directory) and embedded as data URIs in HTML, so report.html stands alone.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

NO_VALUE = "–"            # a table cell without a (finite) value
SIGNIFICANT_DIGITS = 4    # floats in table cells
_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}"
    "pre{background:#f7f7f7;padding:0.8em;overflow-x:auto;font-size:0.85em}.missing{color:#a33}"
)


def inline_html(text: str) -> str:
    """``text`` escaped for HTML, with Markdown's `code` and **bold** turned into tags."""
    escaped = html.escape(text)
    return _BOLD.sub(r"<b>\1</b>", _CODE.sub(r"<code>\1</code>", escaped))


def format_cell(value: object) -> str:
    """A table cell: floats with SIGNIFICANT_DIGITS significant digits, NO_VALUE for NaN/inf."""
    if isinstance(value, (float, np.floating)):
        return f"{value:.{SIGNIFICANT_DIGITS}g}" if np.isfinite(value) else NO_VALUE
    return str(value)


@dataclass(frozen=True)
class Heading:
    level: int
    text: str

    def to_markdown(self, report_dir: Path) -> str:
        return "#" * self.level + " " + self.text

    def to_html(self, report_dir: Path) -> str:
        return f"<h{self.level}>{inline_html(self.text)}</h{self.level}>"


@dataclass(frozen=True)
class Paragraph:
    text: str
    #: shown before the text in bold (e.g. "Missing"), and as the HTML paragraph's class
    label: str = ""

    def to_markdown(self, report_dir: Path) -> str:
        return f"**{self.label}**: {self.text}" if self.label else self.text

    def to_html(self, report_dir: Path) -> str:
        if not self.label:
            return f"<p>{inline_html(self.text)}</p>"
        return f"<p class='{self.label.lower()}'><b>{html.escape(self.label)}</b>: {inline_html(self.text)}</p>"


def Missing(text: str) -> Paragraph:  # noqa: N802 - reads as a block type where sections build blocks
    """What could not be shown and why (e.g. which stage writes the missing artifact)."""
    return Paragraph(text, label="Missing")


@dataclass(frozen=True)
class BulletList:
    items: tuple[str, ...]

    def to_markdown(self, report_dir: Path) -> str:
        return "\n".join(f"- {item}" for item in self.items)

    def to_html(self, report_dir: Path) -> str:
        return "<ul>" + "".join(f"<li>{inline_html(item)}</li>" for item in self.items) + "</ul>"


@dataclass(frozen=True, eq=False)
class Table:
    """A frame shown as a table. ``name``, when set, also hands the frame to the stage's
    result (``StageResult.tables``) under that name."""

    frame: pd.DataFrame
    name: str | None = None

    def _rows(self) -> list[list[str]]:
        return [[format_cell(v) for v in row] for row in self.frame.itertuples(index=False)]

    def to_markdown(self, report_dir: Path) -> str:
        columns = [str(c) for c in self.frame.columns]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in self._rows()]
        return "\n".join(lines)

    def to_html(self, report_dir: Path) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in self.frame.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self._rows())
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass(frozen=True)
class Image:
    """A PNG file: linked relative to the report in Markdown, embedded in HTML."""

    path: Path
    caption: str

    def to_markdown(self, report_dir: Path) -> str:
        return f"![{self.caption}]({Path(os.path.relpath(self.path, report_dir)).as_posix()})"

    def to_html(self, report_dir: Path) -> str:
        data = base64.b64encode(self.path.read_bytes()).decode()
        caption = html.escape(self.caption)
        return f"<figure><img alt='{caption}' src='data:image/png;base64,{data}'><figcaption>{caption}</figcaption></figure>"


@dataclass(frozen=True)
class Preformatted:
    text: str

    def to_markdown(self, report_dir: Path) -> str:
        return "```\n" + self.text + "\n```"

    def to_html(self, report_dir: Path) -> str:
        return f"<pre>{html.escape(self.text)}</pre>"


Block = Heading | Paragraph | BulletList | Table | Image | Preformatted


@dataclass
class Document:
    """A titled list of blocks, rendered to Markdown and to a standalone HTML page."""

    title: str
    blocks: list[Block] = field(default_factory=list)

    def to_markdown(self, report_dir: Path) -> str:
        return "\n\n".join(block.to_markdown(report_dir) for block in self.blocks) + "\n"

    def to_html(self, report_dir: Path) -> str:
        lines = ["<!DOCTYPE html><html><head><meta charset='utf-8'>", f"<title>{html.escape(self.title)}</title>",
                 f"<style>{STYLE}</style></head><body>"]
        lines += [block.to_html(report_dir) for block in self.blocks]
        lines.append("</body></html>")
        return "\n".join(lines) + "\n"

    def images(self) -> list[Image]:
        return [b for b in self.blocks if isinstance(b, Image)]

    def named_tables(self) -> dict[str, pd.DataFrame]:
        return {b.name: b.frame for b in self.blocks if isinstance(b, Table) and b.name}
