"""Keep a trailing '?' in `%qlora_generate What is the capital of France?` part of the prompt
(and likewise for `%qlora_compare`).

IPython reads a line that ends in '?' as a help request (`France?` -> "Object `France` not found").
Prompts are often questions, so before IPython's help transformer sees the line, we turn a
`%qlora_generate <prompt>` line into the magic call IPython would have made. `%qlora_generate?`
alone (nothing after the name) is left alone and still shows the help.
"""

from __future__ import annotations

import re

# The line magics whose argument ends in a free-text prompt.
_PROMPT_LINE = re.compile(r"^(\s*)%(qlora_generate|qlora_compare)[ \t]+(\S.*?)\s*$")


def keep_question_marks(lines: list[str]) -> list[str]:
    """An IPython cleanup transformer (list of lines in, list of lines out)."""
    if not lines or lines[0].lstrip().startswith("%%"):
        return lines  # a cell magic: its body is never read as help
    out = []
    for line in lines:
        match = _PROMPT_LINE.match(line.rstrip("\n"))
        if match and match.group(3).endswith("?"):
            indent, magic, rest = match.groups()
            line = f"{indent}get_ipython().run_line_magic({magic!r}, {rest!r})\n"
        out.append(line)
    return out


def register(ipython):
    if keep_question_marks not in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.append(keep_question_marks)


def unregister(ipython):
    if keep_question_marks in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.remove(keep_question_marks)
