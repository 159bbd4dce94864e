"""How results and training runs are shown: reporters (HTML display handle, text, widgets), the loss chart,
and the text/HTML tables every readout is built from. This layer imports no other part of qlora_magic but
`config` and `errors`; the engine and the tasks hand it plain rows and events."""

from __future__ import annotations


def in_notebook() -> bool:
    """True inside a Jupyter kernel (which can render HTML), False in a terminal or script."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def choose_reporter(kind="auto"):
    """The reporter for --display `kind`: auto is HTML in a Jupyter kernel, text elsewhere."""
    if kind == "none":
        from .reporters import NullReporter

        return NullReporter()
    if kind == "widget":  # explicit only: widget state is not kept in a saved notebook, HTML is
        from .widget_reporter import WidgetReporter

        return WidgetReporter(show=True)
    if kind == "html" or (kind == "auto" and in_notebook()):
        from .reporters import HtmlReporter

        return HtmlReporter()
    from .reporters import TextReporter

    return TextReporter()
