"""The data check's token view and the doctor's table, rendered in JupyterLab in headless Chromium.

A notebook loads the embedded model, runs `%%qlora_data` on a few rows (one cut by max_length) and
`%qlora_doctor`. In the page: the first rows are shown as token spans, those that count in the loss on green and
the prompt's on grey, with the length histograms and the verdicts; the doctor's table has one row per check. Both
are plain HTML outputs (no widgets), so they also survive in a saved notebook.

Setup and skipping as for test_notebooks_in_browser.py (scripts/setup-browser.sh; QLORA_SKIP_BROWSER=1;
QLORA_BROWSER_OUT=/dir keeps the screenshots)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import notebook_in_browser as nib  # noqa: E402
from test_background_attach import lab_on, new_notebook  # noqa: E402
from test_notebooks_in_browser import _require_browser_tools  # noqa: E402

TIMEOUT = float(os.environ.get("QLORA_BROWSER_TIMEOUT", "600"))
CELLS = [
    "%load_ext qlora_magic\n%qlora_load",
    "rows = [{'question': 'What is the capital of France?', 'answer': 'Paris.'},\n"
    "        {'question': 'What is 2 + 2?', 'answer': '4'},\n"
    "        {'question': 'Say it long.', 'answer': 'word ' * 40}]",
    "%%qlora_data --max-length 32\ndata: $rows\nprompt: \"Q: {question}\\nA: \"\nresponse: \"{answer}\"\n",
    "%qlora_doctor",
]

# What the data report and the doctor's table look like in the page, as the browser computed it.
JS_CHECKS = r"""() => {
  const colour = el => getComputedStyle(el).backgroundColor;
  const report = document.querySelector('.jp-OutputArea-output .qlora-data-report');
  const trained = Array.from(document.querySelectorAll('.qlora-data-report .qlora-token.qlora-trained'));
  const masked = Array.from(document.querySelectorAll('.qlora-data-report .qlora-token.qlora-masked'));
  const firstSample = document.querySelector('.qlora-data-report .qlora-sample');
  return {
    report: report ? report.innerText : null,
    trained: trained.map(s => s.textContent), trainedColours: [...new Set(trained.map(colour))],
    masked: masked.length, maskedColours: [...new Set(masked.map(colour))],
    visible: trained.length ? trained[0].getBoundingClientRect().width > 0 : false,
    firstSample: firstSample ? firstSample.textContent : null,
    histograms: document.querySelectorAll('.qlora-data-report .qlora-histogram').length,
    doctorRows: Array.from(document.querySelectorAll('.qlora-doctor tr.qlora-finding')).map(r => r.innerText.split('\t')[0] + ' ' + r.querySelector('th').innerText),
  };
}"""


@pytest.mark.browser
def test_the_token_view_and_the_doctor_render_in_jupyterlab(tmp_path):
    _require_browser_tools()
    out, notebook = new_notebook(tmp_path, "checks", CELLS)
    deadline = nib.Deadline(TIMEOUT)
    with lab_on(notebook, out, deadline) as lab:
        page = lab.page
        lab.run.run_all()
        lab.run.wait_run_done(deadline)
        lab.wait_for(3, lambda c: "qlora_magic doctor" in c["text"], "the doctor's table", 180)
        shown = page.evaluate(JS_CHECKS)
        page.screenshot(path=str(out / "checks.png"), full_page=True)

        assert shown["report"] and shown["report"].startswith("Data check: 3 rows"), shown
        assert "1 of 3 rows are longer than max_length=32" in shown["report"]
        assert "".join(shown["trained"]).startswith("Paris.<|im_end|>"), shown["trained"]
        assert shown["trainedColours"] == ["rgb(200, 230, 201)"] and shown["visible"]  # on green, on screen
        assert shown["masked"] > 5 and shown["maskedColours"] == ["rgb(238, 238, 238)"]  # the prompt, on grey
        assert shown["firstSample"].startswith("Q: What is the capital of France?")
        assert shown["histograms"] == 2
        topics = [row.split(" ", 1)[1] for row in shown["doctorRows"]]
        assert topics[:3] == ["frontend", "ipywidgets", "live display"] and len(topics) == 9, shown["doctorRows"]
        assert lab.cell(3)["text"].count("a Jupyter kernel") == 1  # the doctor knows it runs in a kernel
        assert "HTML refreshed in place" in lab.cell(3)["text"]

        cells = page.evaluate(nib.JS_COLLECT)["cells"]
        errors, widget_errors = nib.find_errors(cells)
        assert errors == [] and widget_errors == [], (errors, widget_errors)
