"""Small shared helpers for readouts: sizes, counts and a two-column table in text and HTML."""

from __future__ import annotations

import html


def gb(n_bytes: float | None) -> str:
    """Bytes as a short human size: 1.23 GB, 456.7 MB; "-" for None.

    The one size format every readout uses: decimal units (GB = 1e9 bytes, MB = 1e6), the convention
    --max-memory reads too (config.parse_memory)."""
    if n_bytes is None:
        return "-"
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.2f} GB"
    return f"{n_bytes / 1e6:.1f} MB"


def count(n: int) -> str:
    """A parameter count: 1.2B, 134.5M, 460.8K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def text_table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join([title] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


def html_table(title: str, rows: list[tuple[str, str]]) -> str:
    body = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
        f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    return f"<div class='qlora-readout'><b>{html.escape(title)}</b><table>{body}</table></div>"


class Readout:
    """A result with a text form (repr) and an HTML form, built from (label, value) rows."""

    title = ""

    def rows(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def __repr__(self):
        return text_table(self.title, self.rows())

    def _repr_html_(self):
        return html_table(self.title, self.rows())


def text_grid(title: str, header: list[str], rows: list[list[str]]) -> str:
    """A table with a header row, columns padded to their widest cell (multi-line cells are flattened)."""
    rows = [[" ".join(str(c).split()) for c in row] for row in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    line = lambda cells: ("  " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))).rstrip()  # noqa: E731
    return "\n".join([title, line(header), "  " + "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def html_grid(title: str, header: list[str], rows: list[list[str]], pre: bool = False) -> str:
    """The same table in HTML; `pre` keeps the cells' line breaks (for generated text)."""
    cell = "text-align:left;vertical-align:top;padding:2px 8px" + (";white-space:pre-wrap;max-width:40em" if pre else "")
    head = "".join(f"<th style='{cell}'>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style='{cell}'>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='qlora-readout'><b>{html.escape(title)}</b><table><tr>{head}</tr>{body}</table></div>"
