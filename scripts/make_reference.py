"""Writes docs/reference.md from the code itself, so the reference cannot drift from it:

- every magic from its declared options (qlora_magic.front.parsing.MAGIC_DECLARATIONS: the argparse usage that
  `%name?` prints, the docstring, one table row per option);
- every public function of the package (`qlora_magic.__all__`): signature and docstring;
- every settings dataclass (qlora_magic.config): field, default and the `help` of its metadata.

    python scripts/make_reference.py            # write docs/reference.md
    python scripts/make_reference.py --check    # exit 1 if docs/reference.md is out of date (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET = ROOT / "docs" / "reference.md"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "")


def _doc_markdown(text: str) -> str:
    """Docstring -> Markdown: reST `::` blocks and `>>>` examples become code blocks."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            out.append(line.rstrip()[:-1].rstrip(":") + (":" if line.strip() != "::" else ""))
            i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["", "```", textwrap.dedent("\n".join(block)).strip("\n"), "```", ""]
            continue
        if line.lstrip().startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += ["```python", textwrap.dedent("\n".join(block)), "```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out).strip()


def magic_section(declaration, kinds: dict) -> str:
    parser = declaration.parser
    name = declaration.__name__
    forms = []
    if name in kinds.get("line", ()):
        forms.append(f"`%{name}`")
    if name in kinds.get("cell", ()):
        forms.append(f"`%%{name}`")
    # IPython's formatter starts the usage with a reST "::" line; the Markdown code block replaces it.
    usage = "\n".join(l for l in parser.format_usage().replace("usage: ", "").splitlines() if l.strip() != "::")
    usage = textwrap.dedent(usage.strip("\n"))
    parts = [f"### %{name}", "", f"{' and '.join(forms) or '`%' + name + '`'} — {_doc_markdown(inspect.cleandoc(parser.description or ''))}",
             "", "```", usage, "```", ""]
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = ", ".join(action.option_strings) or action.dest.upper()
        if action.choices:
            flag += " {" + ",".join(map(str, action.choices)) + "}"
        elif action.option_strings and action.nargs != 0:
            flag += f" {action.metavar or action.dest.upper()}"
        rows.append(f"| `{_cell(flag)}` | {_cell(action.help or '')} |")
    if rows:
        parts += ["| option | meaning |", "|---|---|", *rows, ""]
    return "\n".join(parts)


class _Annotation:
    """Shows a postponed (string) annotation without quotes."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


def _plain_annotations(signature):
    def plain(a):
        return _Annotation(a) if isinstance(a, str) else a

    params = [p.replace(annotation=plain(p.annotation)) for p in signature.parameters.values()]
    return signature.replace(parameters=params, return_annotation=plain(signature.return_annotation))


def function_section(qualname: str, fn) -> str:
    try:
        signature = str(_plain_annotations(inspect.signature(fn)))
    except (TypeError, ValueError):
        signature = "(...)"
    return "\n".join([f"### `{qualname}{signature}`", "", _doc_markdown(_doc(fn)) or "(no docstring)", ""])


def config_section(cls) -> str:
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append(f"| `{f.name}` | `{_cell(default)}` | {_cell(f.metadata.get('help', ''))} |")
    return "\n".join([f"### `{cls.__name__}`", "", _doc_markdown(_doc(cls)), "",
                      "| field | default | meaning |", "|---|---|---|", *rows, ""])


def render() -> str:
    import qlora_magic
    from qlora_magic import config
    from qlora_magic.front import parsing
    from qlora_magic.front.magics import QloraMagics

    kinds = {kind: set(names) for kind, names in QloraMagics.magics.items()}
    out = [
        "# qlora_magic reference",
        "",
        "<!-- Generated by scripts/make_reference.py from the magics' declared options, the public functions'",
        "     docstrings and the settings dataclasses. Do not edit by hand: run `python scripts/make_reference.py`. -->",
        "",
        "Three layers, one set of names: a magic parses its line and cell into a settings dataclass and calls the",
        "Python function of the same verb; the widget panel builds the same dataclasses from its forms. So every",
        "option below exists as a magic flag, a keyword of the Python function and a field of its config.",
        "In a notebook, `%name?` prints a magic's usage, the same text as here.",
        "",
        "- [Magics](#magics)",
        "- [Python API](#python-api)",
        "- [Settings dataclasses](#settings-dataclasses)",
        "",
        "## Magics",
        "",
        "Load the extension first: `%load_ext qlora_magic` (it imports no torch; the first verb does).",
        "",
    ]
    out += [magic_section(d, kinds) for d in parsing.MAGIC_DECLARATIONS]
    out += ["## Python API", "", "`import qlora_magic` — the names in `qlora_magic.__all__`.", ""]
    for name in qlora_magic.__all__:
        obj = getattr(qlora_magic, name)
        if inspect.isfunction(obj):
            out.append(function_section(f"qlora_magic.{name}", obj))
        elif inspect.isclass(obj) and issubclass(obj, BaseException):
            out += [f"### `qlora_magic.{name}`", "", _doc_markdown(_doc(obj)), ""]
    from qlora_magic.display.widget_reporter import WidgetReporter
    from qlora_magic.front.panel import Panel

    out += ["### The panel object", "", _doc_markdown(_doc(Panel)), ""]
    for method in ("wait", "stop", "refresh_memory"):
        out.append(function_section(f"Panel.{method}", getattr(Panel, method)))
    out += ["### `qlora_magic.display.widget_reporter.WidgetReporter`", "", _doc_markdown(_doc(WidgetReporter)), ""]
    out += ["## Settings dataclasses", "", "`qlora_magic.config`: each checks its values when built and quotes a bad one.", ""]
    for name, cls in inspect.getmembers(config, inspect.isclass):
        if dataclasses.is_dataclass(cls) and cls.__module__ == config.__name__:
            out.append(config_section(cls))
    return "\n".join(out).rstrip() + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/reference.md differs from the code")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run python scripts/make_reference.py", file=sys.stderr)
            return 1
        print(f"{TARGET.relative_to(ROOT)} is up to date")
        return 0
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
