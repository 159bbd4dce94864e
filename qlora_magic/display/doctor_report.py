"""The doctor's report (`%qlora_doctor`, `qm.doctor()`): one row per check of the environment, OK / warning /
problem, each with a one-line fix; text in a terminal, a table in a notebook."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from .findings import HasFindings, COLORS, Finding, count_levels, findings_html, findings_text, worst


@dataclass(repr=False)
class DoctorReport(HasFindings):
    findings: list = field(default_factory=list)

    title = "qlora_magic doctor"

    def __getitem__(self, topic) -> Finding:
        """The finding about `topic`: report["bitsandbytes"]."""
        found = [f for f in self.findings if f.topic == topic]
        if not found:
            raise KeyError(f"{topic!r}: the topics are {', '.join(f.topic for f in self.findings)}")
        return found[0]

    def summary(self) -> str:
        """One line: the worst finding and how many there are (the panel's Doctor line)."""
        bad = self.problems or self.warnings
        head = f"{bad[0].topic}: {bad[0].line()}" if bad else "everything checked is ready"
        return f"{count_levels(self.findings)}. {head}" if bad else head

    @property
    def level(self) -> str:
        return worst(self.findings)

    def __repr__(self):
        return "\n".join([f"{self.title}: {count_levels(self.findings)}", *findings_text(self.findings)])

    def _repr_html_(self):
        return (f"<div class='qlora-readout qlora-doctor'><b>{self.title}</b>: "
                f"<span style='color:{COLORS[self.level]}'>{html.escape(count_levels(self.findings))}</span>"
                f"{findings_html(self.findings)}</div>")
