"""Findings: rows of OK / warning / problem, each with what was found and, when something is to be done, the
one-line fix. The doctor's table and the data check's verdicts are built from them, in text and in HTML."""

from __future__ import annotations

import html
from dataclasses import dataclass

LEVELS = ("ok", "warning", "problem")
MARKS = {"ok": "OK", "warning": "warning", "problem": "PROBLEM"}
COLORS = {"ok": "#2e7d32", "warning": "#b35900", "problem": "#c62828"}


@dataclass(frozen=True)
class Finding:
    """One row: `level` (ok, warning or problem), the `topic` it is about, what was `found`, and the `fix`."""

    level: str
    topic: str
    found: str
    fix: str = ""

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {self.level!r}")

    def line(self) -> str:
        """The finding as one line: what was found, then what to do."""
        return f"{self.found}: {self.fix}" if self.fix else self.found


class HasFindings:
    """A report made of `findings`: its problems and warnings."""

    findings: list

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "problem"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]


def worst(findings) -> str:
    """The worst level among `findings` (ok when there are none)."""
    return max((f.level for f in findings), key=LEVELS.index, default="ok")


def count_levels(findings) -> str:
    """'2 problems, 1 warning' or 'all OK'."""
    counts = [(sum(f.level == level for f in findings), level) for level in ("problem", "warning")]
    parts = [f"{n} {level}{'s' if n != 1 else ''}" for n, level in counts if n]
    return ", ".join(parts) or "all OK"


def findings_text(findings) -> list[str]:
    """Text lines, one per finding: the mark, the topic, what was found; the fix on the next line, indented."""
    width = max((len(f.topic) for f in findings), default=0)
    lines = []
    for f in findings:
        lines.append(f"  {MARKS[f.level]:<8} {f.topic.ljust(width)}  {f.found}")
        if f.fix:
            lines.append(f"  {'':<8} {'':<{width}}  -> {f.fix}")
    return lines


def findings_html(findings) -> str:
    """An HTML table, one row per finding, its mark coloured by level."""
    cell = "text-align:left;vertical-align:top;padding:2px 8px"
    rows = "".join(
        f"<tr class='qlora-finding qlora-{f.level}'>"
        f"<td style='{cell};color:{COLORS[f.level]};font-weight:bold'>{MARKS[f.level]}</td>"
        f"<th style='{cell}'>{html.escape(f.topic)}</th>"
        f"<td style='{cell}'>{html.escape(f.found)}"
        + (f"<br><span style='color:#555'>&rarr; {html.escape(f.fix)}</span>" if f.fix else "")
        + "</td></tr>"
        for f in findings
    )
    return f"<table class='qlora-findings'>{rows}</table>"
