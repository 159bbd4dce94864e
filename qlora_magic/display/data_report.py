"""The data check's report (`%%qlora_data`, `qm.check_data`): the counts and verdicts, a token length
histogram of prompts and responses, and the first rows as tokens marked by whether they count in the loss.
HTML in a notebook (trained tokens on green); plain text in a terminal, trained tokens between [ and ]."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from .findings import HasFindings, count_levels, findings_html, findings_text

HISTOGRAM_BINS = 8
BAR_WIDTH = 24  # characters of the longest text bar
TRAINED_COLOR, MASKED_COLOR = "#c8e6c9", "#eeeeee"


@dataclass(repr=False)
class DataReport(HasFindings):
    """What the data check found. `findings`: the verdicts (a problem stops %%qlora_train); `samples`: the first
    rows as [(token text, counts in the loss)]; the lengths are per row, in tokens, before max_length cuts."""

    rows: int
    columns: list
    max_length: int
    prompt_lengths: list
    response_lengths: list
    findings: list = field(default_factory=list)
    samples: list = field(default_factory=list)

    title = "Data check"

    def summary(self) -> str:
        return f"{self.rows} rows, columns used: {', '.join(self.columns) or '-'}; {count_levels(self.findings)}"

    def __repr__(self):
        lines = [f"{self.title}: {self.summary()}", *findings_text(self.findings), ""]
        lines += text_histogram("prompt tokens", self.prompt_lengths, self.max_length)
        if any(self.response_lengths):
            lines += text_histogram("response tokens", self.response_lengths, self.max_length)
        if self.samples:
            lines += ["", "First rows as trained ([...] counts in the loss):"]
            lines += [f"  {i + 1}: {tokens_text(sample)}" for i, sample in enumerate(self.samples)]
        return "\n".join(lines)

    def _repr_html_(self):
        charts = [html_histogram("prompt tokens", self.prompt_lengths, self.max_length)]
        if any(self.response_lengths):
            charts.append(html_histogram("response tokens", self.response_lengths, self.max_length))
        samples = "".join(f"<div class='qlora-sample' style='margin:4px 0'>{tokens_html(s)}</div>" for s in self.samples)
        return (
            f"<div class='qlora-readout qlora-data-report'><b>{self.title}</b>: {html.escape(self.summary())}"
            f"{findings_html(self.findings)}"
            f"<div style='display:flex;gap:2em;margin:6px 0'>{''.join(charts)}</div>"
            + (f"<div><b>First rows</b> (<span style='background:{TRAINED_COLOR}'>green</span>: counts in the loss)"
               f"{samples}</div>" if samples else "")
            + "</div>"
        )


def histogram(lengths, bins: int = HISTOGRAM_BINS) -> list[tuple[int, int, int]]:
    """(low, high, rows) for at most about `bins` equal-width bins from the shortest to the longest of `lengths`,
    the width a round number of tokens and the edges its multiples."""
    if not lengths:
        return []
    bottom, top = min(lengths), max(lengths)
    width = max(1, -(-(top - bottom + 1) // bins))
    width = next((nice for nice in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 200, 250, 256, 500, 512)
                  if nice >= width), 1000 * -(-width // 1000))
    first = bottom // width
    counts = [0] * (top // width - first + 1)
    for n in lengths:
        counts[n // width - first] += 1
    return [((first + i) * width, (first + i + 1) * width - 1, c) for i, c in enumerate(counts)]


def text_histogram(title: str, lengths, max_length: int) -> list[str]:
    bins = histogram(lengths)
    most = max((c for _, _, c in bins), default=0) or 1
    label = max((len(f"{lo}-{hi}") for lo, hi, _ in bins), default=0)
    lines = [f"{title} (max_length {max_length}; longest {max(lengths, default=0)}):"]
    for lo, hi, rows in bins:
        bar = "#" * round(BAR_WIDTH * rows / most) or ("." if rows else "")
        cut = "  > max_length" if lo > max_length else ""
        lines.append(f"  {f'{lo}-{hi}'.rjust(label)} | {bar.ljust(BAR_WIDTH)} {rows}{cut}")
    return lines


def html_histogram(title: str, lengths, max_length: int) -> str:
    bins = histogram(lengths)
    most = max((c for _, _, c in bins), default=0) or 1
    bars = "".join(
        f"<div title='{lo}-{hi} tokens: {rows} rows' style='display:inline-block;vertical-align:bottom;width:14px;"
        f"margin-right:2px;height:{max(1, round(60 * rows / most)) if rows else 0}px;"
        f"background:{'#e57373' if hi >= max_length else '#64b5f6'}'></div>"
        for lo, hi, rows in bins
    )
    return (f"<div class='qlora-histogram'><div>{html.escape(title)}</div>"
            f"<div style='height:62px;display:flex;align-items:flex-end'>{bars}</div>"
            f"<div style='font-size:smaller;color:#555'>{min(lengths, default=0)} - {max(lengths, default=0)} tokens; "
            f"red: reaches max_length {max_length}</div></div>")


def _visible(text: str) -> str:
    return text.replace("\n", "\\n").replace("\t", "\\t")


def tokens_text(sample) -> str:
    """A row's tokens as text, each run of trained tokens between [ and ]: `Q: cat A: [ cats<eos>]`."""
    out, inside = [], False
    for token, trained in sample:
        if trained != inside:
            out.append("[" if trained else "]")
            inside = trained
        out.append(_visible(token))
    return "".join(out) + ("]" if inside else "")


def tokens_html(sample) -> str:
    """A row's tokens as spans: trained ones on green, masked ones on grey; a line break shown as a mark."""
    spans = []
    for token, trained in sample:
        kind, color = ("trained", TRAINED_COLOR) if trained else ("masked", MASKED_COLOR)
        spans.append(f"<span class='qlora-token qlora-{kind}' style='background:{color};border-radius:3px;"
                     f"margin:0 1px;white-space:pre-wrap;font-family:monospace'>{html.escape(_visible(token))}</span>")
    return "".join(spans)
