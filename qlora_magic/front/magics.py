"""The IPython magics. Each one is a parser plus one call to the Python API."""

from __future__ import annotations

from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class, no_var_expand
from IPython.display import display
from traitlets import Unicode

from .. import api
from . import parsing


def _doc_from(declaration):
    """Give a magic the usage generated from its declared options (shown by %name?)."""

    def decorate(method):
        method.__doc__ = declaration.__doc__
        return method

    return decorate


def _print_text(text):
    """%qlora_generate streams the answer into the cell's output as it comes."""
    print(text, end="", flush=True)


@magics_class
class QloraMagics(Magics):
    display = Unicode("auto", help="How %%qlora_train shows progress: auto, html, text or none.").tag(config=True)

    @line_magic
    @no_var_expand
    @_doc_from(parsing.qlora_load)
    def qlora_load(self, line=""):
        display(api.load(config=parsing.parse_load(line)))

    @line_cell_magic
    @_doc_from(parsing.qlora_train)
    def qlora_train(self, line="", cell=None):  # a line magic too: %qlora_train --resume needs no body
        config = parsing.parse_train(line, cell or "", namespace=self.shell.user_ns)
        if config.display == "auto":  # neither the line nor the body chose: %config QloraMagics.display may
            config = config.replace(display=self.display)
        summary = api.train(config=config)
        display(summary)

    @line_cell_magic
    @no_var_expand
    @_doc_from(parsing.qlora_generate)
    def qlora_generate(self, line="", cell=None):
        api.generate(config=parsing.parse_generate(line, cell), on_text=_print_text)
        print()  # after the streamed answer, as api.generate ends it

    @line_magic
    @no_var_expand
    @_doc_from(parsing.qlora_save)
    def qlora_save(self, line=""):
        path = api.save(parsing.parse_save(line))
        print(f"Saved the adapter, tokenizer and run record to {path}/")

    @line_magic
    @_doc_from(parsing.qlora_memory)
    def qlora_memory(self, line=""):
        parsing.parse_line(parsing.qlora_memory, line)
        display(api.memory())

    @line_magic
    @_doc_from(parsing.qlora_unload)
    def qlora_unload(self, line=""):
        parsing.parse_line(parsing.qlora_unload, line)
        display(api.unload())

    @line_magic
    @_doc_from(parsing.qlora_panel)
    def qlora_panel(self, line=""):
        from .panel import panel

        parsing.parse_line(parsing.qlora_panel, line)
        return panel()

    @line_cell_magic
    @no_var_expand
    @_doc_from(parsing.qlora_eval)
    def qlora_eval(self, line="", cell=None):
        display(api.evaluate(config=parsing.parse_eval(line, cell, namespace=self.shell.user_ns)))

    @line_cell_magic
    @no_var_expand
    @_doc_from(parsing.qlora_compare)
    def qlora_compare(self, line="", cell=None):
        config = parsing.parse_compare(line, cell)
        handle = display(display_id=True)  # the table fills in as answers come (None outside IPython)
        comparison = api.compare(config=config, on_update=handle.update if handle else None)
        handle.update(comparison) if handle else display(comparison)

    @line_magic
    @no_var_expand
    @_doc_from(parsing.qlora_adapters)
    def qlora_adapters(self, line=""):
        options = parsing.parse_adapters(line)
        action = options.pop("action")
        verb = {"list": api.list_adapters, "add": api.add_adapter, "load": api.load_adapter, "switch": api.switch_adapter,
                "delete": api.delete_adapter, "combine": api.combine_adapters}[action]
        display(verb(**options))

    @line_magic
    @no_var_expand
    @_doc_from(parsing.qlora_merge)
    def qlora_merge(self, line=""):
        display(api.merge(config=parsing.parse_merge(line)))

    @line_magic
    @no_var_expand
    @_doc_from(parsing.qlora_export)
    def qlora_export(self, line=""):
        display(api.export(config=parsing.parse_export(line)))

    @line_magic
    @no_var_expand
    @_doc_from(parsing.qlora_runs)
    def qlora_runs(self, line=""):
        display(api.runs(**parsing.parse_runs(line)))

    @line_magic
    @no_var_expand
    @_doc_from(parsing.qlora_attach)
    def qlora_attach(self, line=""):
        display(api.attach(**parsing.parse_run_choice(parsing.qlora_attach, line)))

    @line_magic
    @no_var_expand
    @_doc_from(parsing.qlora_stop)
    def qlora_stop(self, line=""):
        print(api.stop(**parsing.parse_run_choice(parsing.qlora_stop, line)))

    @cell_magic
    @_doc_from(parsing.qlora_tune)
    def qlora_tune(self, line="", cell=""):
        config = parsing.parse_tune(line, cell, namespace=self.shell.user_ns)
        handle = display(display_id=True)  # the table of trials, redrawn after each one (None outside IPython)
        report = api.tune(config=config, on_trial=handle.update if handle else None)
        handle.update(report) if handle else display(report)

    @cell_magic
    @_doc_from(parsing.qlora_data)
    def qlora_data(self, line="", cell=""):
        display(api.check_data(config=parsing.parse_data(line, cell, namespace=self.shell.user_ns)))

    @line_magic
    @no_var_expand
    @_doc_from(parsing.qlora_doctor)
    def qlora_doctor(self, line=""):
        display(api.doctor(**parsing.parse_doctor(line)))
