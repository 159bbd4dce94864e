"""The widget dashboard: Load, Train, Generate and Save tabs over a live Memory readout. The Save tab also exports
the merged model (a GGUF file for llama.cpp/Ollama, or a safetensors folder for vLLM/transformers).

    >>> import qlora_magic as qm
    >>> qm.panel()            # or %qlora_panel

Every button builds the same config dataclass a magic builds and calls the same Python API
(`api.load`, `api.train`, `api.generate`, `api.save`, `api.export`, `api.merge`, `api.memory`); nothing is
reachable only here.

How Stop reaches the training loop: an action runs in a background thread, so the kernel stays free
to receive widget messages while the model trains. Stop sets the `api.StopFlag` given to
`api.train(stop=...)`; the training callback sees it after the step in flight and ends the run there,
keeping the adapter as trained so far. (A kernel interrupt cannot do this: it only reaches the main
thread, and a synchronous cell would block the Stop click itself.) The action holds the session lock
(`api.session_lock`) while it runs, so one action at a time uses the model: the action buttons are
disabled meanwhile, a cell that would use the model fails in one line (BusyError), and so does a click
on another panel. `Panel.wait()` blocks until the action in flight is done (scripts and tests use it
after `button.click()`).

Errors in an action show as one line in the panel's status line, like the magics show them; the
exception is also kept in `Panel.last_error`. A click refused while the panel's own action runs is
shown under its status until that action ends; it is not the action's error.

The Train tab shows training with `display.widget_reporter.WidgetReporter`, the reporter
`%%qlora_train --display widget` uses on its own.
"""

from __future__ import annotations

import functools
import html
import threading

from .. import api
from ..config import EXPORT_QUANTS, ExportConfig, GenerateConfig, LoadConfig, MergeConfig, TrainConfig
from ..errors import BusyError, ConfigError, one_line
from ..display.formatting import gb
from ..display.widget_reporter import WidgetReporter, require_ipywidgets
from .parsing import config_default, lookup_variable

GIVEN_ROWS = "(the rows given to panel())"  # shown in the data field when panel(data=rows) got objects
# What each action is called while it holds the session lock, and how it is stopped (a refused cell says so).
ACTIVITIES = {"load": ("Loading a model", None), "train": ("Training", "the panel's Stop button"),
              "generate": ("Generating", None), "save": ("Saving", None), "export": ("Exporting", None),
              "check": ("Checking the data", None),
              "doctor": ("Checking the environment", None)}


def _enable_colab_widgets():
    """Colab renders ipywidgets 8 only through its custom widget manager; switch it on there."""
    try:
        from google.colab import output  # type: ignore[import-not-found]
    except ImportError:
        return
    output.enable_custom_widget_manager()


def _none_if_zero(value):
    return value if value else None


class Panel:
    """The dashboard. `Panel.widget` is the ipywidgets tree; the controls are attributes, so a
    script or a test can set values and press buttons: `p.bits.value = 4; p.load_button.click()`.

    Pre-fill the Train tab with `data=` (a path, a Hub id, "$name" of a notebook variable, or the rows
    themselves), `prompt=` and `response=`; without them it offers the shipped word_forms example.
    """

    def __init__(self, data=None, prompt=None, response=None):
        w = require_ipywidgets()
        from .. import examples

        self.last_error: BaseException | None = None
        self._status, self._refused = ("", False), None  # the status line: the action's text, and a refused click's
        self._worker: threading.Thread | None = None
        self._stop = None
        self._data_object = None
        # The forms start at the configs' defaults (the dataclasses are the one source of them).
        load_default, train_default, generate_default = (
            functools.partial(config_default, config) for config in (LoadConfig, TrainConfig, GenerateConfig))
        short = {"description_width": "110px"}

        def wide():  # a Layout of its own for each field: hiding one (display "none") must not hide the others
            return w.Layout(width="95%")

        # --- Load
        self.model = w.Text(description="model", placeholder="default: embedded SmolLM2-135M-Instruct",
                            style=short, layout=wide())
        self.bits = w.Dropdown(description="bits", options=[("8 (LLM.int8)", None), ("4 (NF4)", 4), ("16 (none)", 16), ("auto (per layer)", "auto")],
                               value=load_default("bits"), style=short)  # None: 8, or the bits a restored adapter was trained with
        self.r = w.BoundedIntText(description="LoRA r", value=load_default("r"), min=1, max=1024, style=short)
        self.alpha = w.FloatText(description="LoRA alpha", value=load_default("alpha"), style=short)
        self.dropout = w.BoundedFloatText(description="LoRA dropout", value=load_default("dropout"), min=0, max=0.99, step=0.01, style=short)
        self.targets = w.Text(description="targets", placeholder="default: attention q,v (or all-linear)",
                              style=short, layout=wide())
        self.adapter = w.Text(description="adapter", placeholder="optional: a saved adapter folder to restore",
                              style=short, layout=wide())
        self.task = w.Dropdown(description="task", options=[("causal-lm (answers)", "causal-lm"),
                                                             ("seq-cls (classifier)", "seq-cls"),
                                                             ("seq2seq (encoder-decoder)", "seq2seq")],
                               value=load_default("task"), style=short)
        self.num_labels = w.BoundedIntText(description="classes", value=load_default("num_labels"), min=2, max=10**5, style=short,
                                           tooltip="size of the classifier head (--num-labels)")
        self.task.observe(lambda _: self._show_task_fields(), names="value")
        self.load_button = w.Button(description="Load", button_style="primary", icon="download")
        self.load_info = w.HTML()
        load_tab = w.VBox([self.model, w.HBox([self.task, self.num_labels]), w.HBox([self.bits, self.r]),
                           w.HBox([self.alpha, self.dropout]), self.targets, self.adapter, self.load_button, self.load_info])

        # --- Train
        if data is None and prompt is None and response is None:
            data = examples.path("word_forms")
            prompt = "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
            response = "{response}"
        if data is not None and not isinstance(data, str):
            self._data_object = data
            data = GIVEN_ROWS
        self.data = w.Text(description="data", value=data or "", style=short, layout=wide(),
                           placeholder="a .jsonl/.json/.csv/.parquet path, a Hub id, or $variable")
        self.prompt = w.Textarea(description="prompt", value=prompt or "", style=short, layout=w.Layout(width="95%", height="70px"),
                                 placeholder="template with {field} placeholders")
        self.response = w.Textarea(description="response", value=response or "", style=short,
                                   layout=w.Layout(width="95%", height="40px"), placeholder="{answer}")
        # A classifier (task seq-cls) trains on a label column instead of a response template.
        self.label = w.Text(description="label column", style=short, layout=wide(), placeholder="e.g. sentiment")
        self.chat = w.Checkbox(description="chat template", value=train_default("chat"), style=short)
        self.epochs = w.BoundedFloatText(description="epochs", value=train_default("epochs"), min=0.01, max=1000, style=short)
        self.max_steps = w.BoundedIntText(description="max steps", value=train_default("max_steps") or 0, min=0, max=10**7, style=short,
                                          tooltip="0: as many as the epochs take")
        self.lr = w.FloatText(description="learning rate", value=train_default("lr"), style=short)
        self.batch_size = w.BoundedIntText(description="batch size", value=train_default("batch_size"), min=1, max=4096, style=short)
        self.grad_accum = w.BoundedIntText(description="grad accum", value=train_default("grad_accum"), min=1, max=4096, style=short)
        self.report_to = w.Text(description="trackers", value=train_default("report_to"), style=short, layout=wide(),
                                placeholder="tensorboard, mlflow, trackio, wandb or none (comma-separated)",
                                tooltip="where the run is logged besides its run folder (--report-to)")
        self.eval_split = w.BoundedFloatText(description="eval split", value=train_default("eval_split") or 0, min=0, max=10**6, style=short,
                                             tooltip="0: none; a fraction (0.1) or a row count")
        self.train_button = w.Button(description="Train", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True,
                                    tooltip="end training after the step in flight; the adapter keeps what it learned")
        self.check_button = w.Button(description="Check", icon="check",
                                     tooltip="check the data as training would tokenize it (%%qlora_data); trains nothing")
        self.check_info = w.HTML()
        self.reporter = WidgetReporter()
        train_tab = w.VBox([
            self.data, self.prompt, self.response, self.label,
            w.HBox([self.epochs, self.max_steps]), w.HBox([self.lr, self.eval_split]),
            w.HBox([self.batch_size, self.grad_accum]), self.chat, self.report_to,
            w.HBox([self.check_button, self.train_button, self.stop_button]), self.check_info, self.reporter.widget,
        ])

        # --- Generate
        self.gen_prompt = w.Textarea(description="prompt", style=short, layout=w.Layout(width="95%", height="90px"),
                                     placeholder="Ask something")
        self.temperature = w.FloatSlider(description="temperature", value=generate_default("temperature"), min=0.05, max=2.0, step=0.05, style=short)
        self.top_p = w.FloatSlider(description="top p", value=generate_default("top_p"), min=0.05, max=1.0, step=0.05, style=short)
        self.max_new_tokens = w.IntSlider(description="max tokens", value=generate_default("max_new_tokens"), min=1, max=1024, style=short)
        self.greedy = w.Checkbox(description="greedy (reproducible)", value=generate_default("greedy"), style=short)
        self.raw = w.Checkbox(description="raw (no chat template)", value=generate_default("raw"), style=short)
        self.which = w.ToggleButtons(options=[("with adapter", "adapter"), ("base model", "base")],
                                     value="base" if generate_default("base") else "adapter",
                                     description="answer", style=short)
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="comment")
        self.answer = w.HTML()
        generate_tab = w.VBox([self.gen_prompt, w.HBox([self.temperature, self.top_p]), self.max_new_tokens,
                               w.HBox([self.greedy, self.raw]), self.which, self.generate_button, self.answer])

        # --- Save
        self.save_path = w.Text(description="folder", value="adapters/panel-adapter", style=short, layout=wide())
        self.save_button = w.Button(description="Save", button_style="primary", icon="save")
        # Export: the adapter merged into the original 16-bit weights, for a server (%qlora_export, %qlora_merge).
        self.export_format = w.Dropdown(description="export as", options=[
            ("GGUF file (llama.cpp, Ollama, LM Studio)", "gguf"), ("merged safetensors (vLLM, transformers)", "merged")],
            value="gguf", style=short, layout=wide())
        self.export_path = w.Text(description="folder", value="exported/panel-model", style=short, layout=wide())
        self.export_quant = w.Dropdown(description="weights", options=list(EXPORT_QUANTS),
                                       value=config_default(ExportConfig, "quant"), style=short,
                                       tooltip="f16 keeps the merge as is; q8_0 is half the file, q4_0 a quarter (the check reports the drift)")
        self.export_ollama = w.Checkbox(description="Ollama Modelfile", value=False, style=short)
        self.export_button = w.Button(description="Export", button_style="primary", icon="share-square")
        self.export_info = w.HTML()
        self.export_format.observe(lambda _: self._show_export_fields(), names="value")
        save_tab = w.VBox([self.save_path, self.save_button,
                           w.HTML("<span style='color:#555'>Writes the adapter (PEFT format), tokenizer, run "
                                  "configs and metrics; restore with the Load tab's adapter field.</span>"),
                           w.HTML("<hr style='margin:6px 0'>"), self.export_format, self.export_path,
                           w.HBox([self.export_quant, self.export_ollama]), self.export_button,
                           w.HTML("<span style='color:#555'>Merges the adapter into the original 16-bit weights "
                                  "and checks the result's answers and perplexity against the adapter's.</span>"),
                           self.export_info])

        # --- Memory (always visible) and status line
        self.memory_bars = {
            name: w.FloatProgress(value=0, min=0, max=1, description=name, style={"description_width": "130px"},
                                  layout=w.Layout(width="340px"))
            for name in ("model footprint", "allocated", "reserved", "process RSS")
        }
        self.memory_labels = {name: w.Label() for name in self.memory_bars}
        self.memory_rows = {name: w.HBox([self.memory_bars[name], self.memory_labels[name]]) for name in self.memory_bars}
        self.memory_title = w.HTML("<b>Memory</b>")
        self.memory_refresh = w.Button(description="Refresh", icon="refresh", layout=w.Layout(width="100px"))
        # The doctor's line under the bars (%qlora_doctor): its summary, the table once it has run.
        self.doctor_line = w.HTML(_span("Doctor: not run yet; it checks widgets, torch/CUDA, bitsandbytes, memory, disk, Hub.", "#555"))
        self.doctor_button = w.Button(description="Doctor", icon="stethoscope", layout=w.Layout(width="100px"),
                                      tooltip="check the environment (%qlora_doctor): seconds, changes nothing")
        self.doctor_info = w.HTML()
        self.memory_box = w.VBox([w.HBox([self.memory_title, self.memory_refresh]), *self.memory_rows.values(),
                                  w.HBox([self.doctor_button, self.doctor_line]), self.doctor_info])
        self.status = w.HTML()

        self.tabs = w.Tab(children=[load_tab, train_tab, generate_tab, save_tab])
        for i, title in enumerate(["Load", "Train", "Generate", "Save"]):
            self.tabs.set_title(i, title)
        self.widget = w.VBox([w.HTML("<b>qlora_magic</b>"), self.tabs, self.status, self.memory_box])

        self._action_buttons = [self.load_button, self.train_button, self.generate_button, self.save_button,
                                self.export_button, self.check_button, self.doctor_button]
        self.load_button.on_click(lambda _: self._start("load", self._load))
        self.train_button.on_click(lambda _: self._start("train", self._train))
        self.generate_button.on_click(lambda _: self._start("generate", self._generate))
        self.save_button.on_click(lambda _: self._start("save", self._save))
        self.export_button.on_click(lambda _: self._start("export", self._export))
        self.check_button.on_click(lambda _: self._start("check", self._check))
        self.doctor_button.on_click(lambda _: self._start("doctor", self._doctor))
        self.stop_button.on_click(lambda _: self.stop())
        self.memory_refresh.on_click(lambda _: self._guarded(self.refresh_memory))
        self._say("Load a model to start." if api.get_session().model is None else "A model is loaded.")
        self._show_task_fields()
        self._show_export_fields()
        self._guarded(self.refresh_memory)

    # --- the actions: each reads the controls into a config and makes one API call

    def load_config(self) -> LoadConfig:
        return LoadConfig(
            model=self.model.value.strip() or None, bits=self.bits.value, r=self.r.value, alpha=self.alpha.value,
            dropout=self.dropout.value, targets=self.targets.value.strip() or None,
            adapter=self.adapter.value.strip() or None, task=self.task.value, num_labels=self.num_labels.value,
        )

    def train_config(self) -> TrainConfig:
        data = self._data_value()
        split = self.eval_split.value
        classifier = _loaded_task() == "seq-cls"  # the fields the loaded model trains on, as _show_task_fields shows them
        return TrainConfig(
            data=data, prompt=self.prompt.value or None, chat=self.chat.value,
            response=None if classifier else self.response.value or None,
            label=(self.label.value.strip() or None) if classifier else None,
            epochs=self.epochs.value, max_steps=_none_if_zero(self.max_steps.value), lr=self.lr.value,
            batch_size=self.batch_size.value, grad_accum=self.grad_accum.value,
            eval_split=None if not split else (int(split) if split >= 1 else split), display="none",
            report_to=self.report_to.value.strip() or config_default(TrainConfig, "report_to"),
        )

    def export_config(self) -> ExportConfig | MergeConfig:
        path = self.export_path.value.strip()
        if self.export_format.value == "merged":
            return MergeConfig(path=path)
        return ExportConfig(format="gguf", path=path, quant=self.export_quant.value, ollama=self.export_ollama.value)

    def generate_config(self) -> GenerateConfig:
        return GenerateConfig(
            prompt=self.gen_prompt.value, temperature=self.temperature.value, top_p=self.top_p.value,
            max_new_tokens=self.max_new_tokens.value, greedy=self.greedy.value, raw=self.raw.value,
            base=self.which.value == "base", stream=True,
        )

    def _data_value(self):
        text = self.data.value.strip()
        if self._data_object is not None and text == GIVEN_ROWS:
            return self._data_object
        if not text:
            raise ConfigError("No data: give a .jsonl/.json/.csv/.parquet path, a Hub dataset id, or $variable.")
        if text.startswith("$"):
            from IPython import get_ipython

            shell = get_ipython()
            return lookup_variable(text[1:], shell.user_ns if shell is not None else None)
        return text

    def _load(self):
        config = self.load_config()
        self._say("Loading the model…")
        report = api.load(config=config)
        self.load_info.value = report._repr_html_()
        self._show_task_fields()
        task = _loaded_task()
        self._say(f"Loaded {report.model_name}{'' if task == 'causal-lm' else f' ({task})'}: {report.quantization}, "
                  f"{gb(report.footprint)}, {report.trainable_parameters:,} trainable parameters ({report.trainable_percent:.2f}%).")

    def _show_task_fields(self):
        """Classes only for a classifier; the Train tab asks for what the loaded model (else the chosen
        task) trains on: a label column for seq-cls, a response template otherwise."""
        self.num_labels.layout.display = None if self.task.value == "seq-cls" else "none"
        classifier = (_loaded_task() or self.task.value) == "seq-cls"
        self.label.layout.display = None if classifier else "none"
        self.response.layout.display = "none" if classifier else None

    def _train(self):
        config = self.train_config()
        self._stop = api.StopFlag()
        self.stop_button.disabled = False
        self._say("Training… (Stop ends it after the step in flight)")
        try:
            summary = api.train(config=config, reporter=self.reporter, stop=self._stop)
        finally:
            self.stop_button.disabled = True
        first, last = summary.train_loss
        loss = f"; loss {first:.3f} → {last:.3f}" if first is not None else ""
        self._say(f"Training {summary.status}: {summary.steps_done}/{summary.steps_planned} steps{loss}.")

    def _check(self):
        config = self.train_config()
        self._say("Checking the data…")
        report = api.check_data(config=config)
        self.check_info.value = report._repr_html_()
        self._say(f"Data check: {report.summary()}.", error=bool(report.problems))

    def _doctor(self):
        self._say("Checking the environment…")
        report = api.doctor()
        color = {"ok": "#2e7d32", "warning": "#b35900", "problem": "#c62828"}[report.level]
        self.doctor_line.value = _span(f"Doctor: {report.summary()}", color)
        self.doctor_info.value = report._repr_html_()
        self._say(f"Doctor: {report.summary()}")

    def _generate(self):
        config = self.generate_config()
        pieces = []
        self.answer.value = ""
        self._say("Generating…")

        def on_text(chunk):
            pieces.append(chunk)
            self.answer.value = _pre("".join(pieces))

        text = api.generate(config=config, on_text=on_text)
        self.answer.value = _pre(text)
        self._say(f"Generated {len(text)} characters ({'base model' if config.base else 'with adapter'}).")

    def _save(self):
        path = self.save_path.value.strip()
        if not path:
            raise ConfigError("Give a folder to save the adapter to.")
        saved = api.save(path)
        self._say(f"Saved the adapter, tokenizer and run record to {saved}/")

    def _export(self):
        config = self.export_config()
        gguf = isinstance(config, ExportConfig)
        self.export_info.value = ""
        self._say("Exporting: merging, writing and checking…" if gguf else "Merging, saving and checking…")
        report = api.export(config=config) if gguf else api.merge(config=config)
        self.export_info.value = report._repr_html_()
        checked = ""
        if report.verified:
            verdict = "matches the adapter" if report.within_tolerance else "differs from the adapter (see the report)"
            checked = (f"; check: {verdict}, {report.answers_matching}/{len(report.prompts)} answers the same"
                       + (f", perplexity drift {report.perplexity_drift:+.1%}" if report.perplexity_drift is not None else ""))
        self._say(f"{'Exported' if gguf else 'Merged'} to {report.path} ({gb(report.size)}){checked}.")

    def _show_export_fields(self):
        """The GGUF weights type and the Modelfile only for a GGUF export."""
        gguf = self.export_format.value == "gguf"
        for control in (self.export_quant, self.export_ollama):
            control.layout.display = None if gguf else "none"

    def refresh_memory(self):
        """Measure memory now and redraw the bars (after every action too)."""
        report = api.memory()
        on_gpu = report.gpu_total is not None
        total = report.gpu_total if on_gpu else report.cpu_total
        values = {
            "model footprint": report.model_footprint,
            "allocated": report.gpu_allocated,
            "reserved": report.gpu_reserved,
            "process RSS": report.cpu_rss,
        }
        where = "GPU" if on_gpu else "CPU"
        self.memory_title.value = f"<b>Memory</b> <span style='color:#555'>({html.escape(report.device)}; bars are shares of {gb(total)} {where} memory)</span>"
        for name, bar in self.memory_bars.items():
            value = values[name]
            shown = value is not None and (on_gpu or name in ("model footprint", "process RSS"))
            self.memory_rows[name].layout.display = None if shown else "none"
            if shown:
                denominator = report.cpu_total if name == "process RSS" else total
                bar.value = min(1.0, value / denominator) if denominator else 0
                self.memory_labels[name].value = gb(value)
        return report

    # --- running actions in the background, one at a time

    def _start(self, name, action):
        refusal = api.session_lock.refusal()  # at the click, so a refusal shows before a thread starts
        if self.busy or refusal:
            error = BusyError(refusal or "This panel's action is starting: wait for it to finish.")
            if self.busy:
                self._refused = f"{type(error).__name__}: {error}"  # beside the running action's status, not over it
                self._show_status()
            else:
                self._fail(error)
            return
        self.last_error = None
        for button in self._action_buttons:
            button.disabled = True
        self._worker = threading.Thread(target=self._run, args=(name, action), name=f"qlora-panel-{name}", daemon=True)
        self._worker.start()

    def _run(self, name, action):
        what, stop_with = ACTIVITIES[name]

        def holding_the_session():
            with api.session_lock.hold(what, by="the panel", stop_with=stop_with):
                action()

        try:
            self._guarded(holding_the_session)
        finally:
            self._refused = None
            for button in self._action_buttons:
                button.disabled = False
            self._guarded(self.refresh_memory)
            self._show_status()

    def _guarded(self, action):
        try:
            action()
        except BaseException as error:  # shown in the panel: a click has no cell to fail
            self._fail(error)

    def _fail(self, error):
        self.last_error = error
        self._say(one_line(error), error=True)

    def _say(self, text, error=False):
        self._status = (text, error)
        self._show_status()

    def _show_status(self):
        text, error = self._status
        shown = _span(text, "#d62728" if error else "#333")
        if self._refused:
            shown += "<br>" + _span(self._refused, "#d62728")
        self.status.value = shown

    @property
    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def stop(self):
        """End training after the step in flight (what the Stop button does)."""
        if self._stop is not None and self.busy:
            self._stop.set("stopped")
            self._say("Stopping after the step in flight…")

    def wait(self, timeout=None) -> Panel:
        """Block until the action in flight is done; raises nothing (errors are in the status line
        and `last_error`). For scripts and tests: `p.train_button.click(); p.wait()`."""
        if self._worker is not None:
            self._worker.join(timeout)
        return self

    @property
    def status_text(self) -> str:
        """The status line as plain text."""
        import re

        return html.unescape(re.sub(r"<[^>]+>", "", self.status.value.replace("<br>", "\n")))

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def _loaded_task() -> str | None:
    """The task of the session's model (None when none is loaded)."""
    session = api.get_session()
    return None if session.model is None else session.task


def _span(text, color) -> str:
    return f"<span style='color:{color}'>{html.escape(text)}</span>"


def _pre(text) -> str:
    return f"<pre style='white-space:pre-wrap;margin:0'>{html.escape(text)}</pre>"


def panel(data=None, prompt=None, response=None) -> Panel:
    """The dashboard (Load, Train, Generate, Save, Memory): it shows itself as a cell's result
    (or with `display(p)`). Same as `%qlora_panel`.

    >>> p = qlora_magic.panel()                       # Train tab offers the shipped word_forms example
    >>> p = qlora_magic.panel(data="$rows", prompt="Q: {q}\\nA: ", response="{a}")
    """
    _enable_colab_widgets()
    return Panel(data=data, prompt=prompt, response=response)
