"""Writes the course notebooks (notebooks/02_*.ipynb ... 07_*.ipynb) and notebooks/panel.ipynb.

    python scripts/make_course.py                 # write them, unexecuted
    python scripts/make_course.py --execute       # ...and execute each in place (outputs committed)
    python scripts/make_course.py --execute 04    # only the notebooks whose name starts with 04

Each notebook is a list of ("md" | "code", source) cells below, so prose and code are reviewed as text.
Every one runs top to bottom on a CPU with the embedded default model in one to two minutes.
tests/test_course_notebooks.py executes them in CI.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"

PROMPT_LINE = 'PROMPT = "Instruction: {instruction}\\n\\nInput: {context}\\n\\nResponse: "'

PANEL = [
    ("md", """# The qlora_magic panel

One dashboard for the whole round trip, no magics to type: **Load** a quantized model with LoRA adapters,
**Train** it while the progress bar, readouts and loss chart update, **Generate** with sliders for the sampling
settings (with the adapter or the base model), **Save** the adapter; the **Memory** bars below refresh after
every action. Every control calls the same Python API as the magics (`qlora_magic.load`, `.train`, `.generate`,
`.save`, `.memory`).

Training runs in a background thread, so the kernel stays free to receive your clicks: **Stop** ends the run
after the step in flight and keeps the adapter as trained so far. Errors show as one red line in the panel.
The Train tab is pre-filled with the shipped `word_forms` example, so you can just press Load, then Train."""),
    ("code", """import qlora_magic as qm

p = qm.panel()   # the same as %qlora_panel after %load_ext qlora_magic
p"""),
    ("md", """The cells below press the buttons from Python (`button.click()` runs the same handler a mouse click does,
and `p.wait()` waits for the background action), so this notebook also runs top to bottom unattended. In
your own notebook, click instead."""),
    ("code", """p.load_button.click()
p.wait()
print(p.status_text)"""),
    ("code", """p.tabs.selected_index = 1                     # the Train tab
p.max_steps.value, p.lr.value = 12, 1e-3      # a short run: enough to learn the answer format
p.batch_size.value, p.grad_accum.value = 4, 1
p.train_button.click()
p.wait()
print(p.status_text)"""),
    ("code", """p.tabs.selected_index = 2                     # the Generate tab
p.gen_prompt.value = "Instruction: Give the opposite of the word.\\n\\nInput: tall\\n\\nResponse: "
p.raw.value, p.greedy.value, p.max_new_tokens.value = True, True, 24
p.generate_button.click()
p.wait()
print(qm.get_session().last_generation)"""),
    ("code", """p.tabs.selected_index = 3                     # the Save tab
p.save_path.value = "runs/panel-adapter"
p.save_button.click()
p.wait()
print(p.status_text)"""),
    ("md", """A mistake shows as one line in the panel, and the panel keeps working (here: a folder that is a file):"""),
    ("code", """open("runs/not-a-folder", "w").close()
p.save_path.value = "runs/not-a-folder"
p.save_button.click()
p.wait()
print(p.status_text)"""),
    ("md", """The training run is in the session like any other, so its summary (with the loss chart) can be shown in a
cell too; `%%qlora_train --display widget` shows the same widget display without the panel."""),
    ("code", """p.tabs.selected_index = 1                     # back to the Train tab, to see the run
qm.get_session().last_train_summary"""),
]


SETUP = r"""import pandas as pd
import qlora_magic as qm

%load_ext qlora_magic"""

QUANTIZATION = [
    ("md", """# 2. Quantization and memory

*Course slide 2.* A model's weights are numbers; storing each in fewer bits shrinks the model. QLoRA keeps the
base model **frozen and quantized** and trains small LoRA matrices on top, so the big part of the model costs
a fraction of its full-precision memory.

| `--bits` | what bitsandbytes stores | bytes per weight (quantized layers) |
|---|---|---|
| 16 | no quantization (fp16/bf16 on a GPU; fp32 on a CPU) | 2 (4 on a CPU) |
| 8 (default) | LLM.int8: int8 weights, outlier features kept in 16-bit | 1 |
| 4 | NF4 (4-bit NormalFloat) with double quantization: the paper's QLoRA | 0.5 + a little for the scales |

The slide loads the model twice to compare sizes. Here every load already shows the quantized footprint next
to the fp32 and fp16 size it replaces. We use the embedded SmolLM2-135M-Instruct so it runs on a CPU; the
ratios are the same for a 7B model, only the numbers are bigger."""),
    ("code", SETUP),
    ("code", "%qlora_load --bits 8"),
    ("md", """Not every weight is quantized: the embeddings, the output head and the norms stay in full precision
(quantizing them costs accuracy and saves little). That is why the 8-bit footprint is more than a quarter of
fp32. A bigger model has relatively more of its weights in the quantized linear layers, so it shrinks more.

The same load from Python returns the readout as an object, so we can put the three settings side by side:"""),
    ("code", r"""reports = {bits: qm.load(bits=bits) for bits in (16, 8, 4)}

def mb(n):
    return round(n / 1e6, 1)

table = pd.DataFrame({
    f"{bits}-bit" if bits != 16 else "unquantized": {
        "footprint (MB)": mb(r.footprint),
        "fp32 size (MB)": mb(r.fp32_size),
        "fp16 size (MB)": mb(r.fp16_size),
        "smaller than fp32": f"{r.fp32_size / r.footprint:.1f}x",
        "load time (s)": round(r.load_seconds, 1),
    } for bits, r in reports.items()
})
table"""),
    ("code", r"""import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 2.6))
names = ["fp32 (slide's baseline)", "fp16"] + list(table.columns)[1:]
sizes = [mb(reports[8].fp32_size), mb(reports[8].fp16_size), mb(reports[8].footprint), mb(reports[4].footprint)]
ax.barh(names, sizes, color=["#999", "#bbb", "#1f77b4", "#2ca02c"])
ax.set_xlabel("model memory (MB)")
ax.invert_yaxis()
fig.tight_layout()
plt.show()"""),
    ("md", """### What is in memory now

`%qlora_memory` measures now: the model's footprint, and on a GPU the allocated, reserved, peak and total GPU
memory; on a CPU the process's resident memory. *Allocated* is what tensors use; *reserved* is what PyTorch's
caching allocator holds (what `nvidia-smi` shows); the gap is cache it will reuse."""),
    ("code", "%qlora_memory"),
    ("md", """### Exercises

- Load with `--bits 4` and compare `%qlora_memory` with the 8-bit one.
- On a GPU, load a 1-3B model from the Hub in each setting (`%qlora_load Qwen/Qwen2.5-1.5B-Instruct --bits 4`):
  4-bit is the setting that lets a 7B model train on a 16 GB card.
- Why do the embedding and the output head stay unquantized? (Hint: look at `model.get_input_embeddings()`.)"""),
]

LORA = [
    ("md", """# 3. LoRA settings and trainable parameters

*Course slide 3.* LoRA leaves each targeted weight matrix **W** (d_out x d_in) frozen and learns a low-rank
update **B A**, with A of shape r x d_in and B of shape d_out x r; the layer computes W x + (alpha / r) B A x.
B starts at zero, so training starts from the base model exactly. The settings:

- `--r`: the rank. Trainable parameters grow linearly with it.
- `--alpha`: scales the update by alpha / r (so changing r does not change the update's size at the start).
- `--targets`: which linear layers get an update; the default is the attention query and value projections
  (`q_proj`, `v_proj`) as in the course; `all-linear` adds keys, outputs and the MLP.
- `--dropout`: dropout on the LoRA input during training."""),
    ("code", SETUP),
    ("code", "%qlora_load --r 8 --alpha 32"),
    ("md", """The readout counts the trainable parameters: the slide's `print_trainable_parameters()` in a table. Here
is one adapted layer, to see where the numbers come from:"""),
    ("code", r"""model = qm.get_session().model
q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
v_proj = model.base_model.model.model.layers[0].self_attn.v_proj
print(q_proj.lora_A["default"], q_proj.lora_B["default"], sep="\n")
print(v_proj.lora_A["default"], v_proj.lora_B["default"], sep="\n")"""),
    ("md", """Each targeted layer adds r x (d_in + d_out) parameters. SmolLM2-135M has 30 layers; `q_proj` maps 576 to
576 and `v_proj` 576 to 192 (grouped-query attention: 3 key/value heads for 9 query heads):"""),
    ("code", r"""r, layers = 8, 30
by_hand = layers * r * ((576 + 576) + (576 + 192))
print(f"{by_hand:,} by hand, {qm.get_session().last_load_report.trainable_parameters:,} counted")"""),
    ("md", """Now the settings side by side. Every load replaces the model in the session; the numbers come from the
load readouts (each load takes a few seconds on the CPU):"""),
    ("code", r"""rows = []
for r in (4, 8, 16, 64):
    for targets in (None, "all-linear"):
        report = qm.load(r=r, alpha=2 * r, targets=targets)
        rows.append({"r": r, "targets": targets or "q_proj, v_proj", "trainable": report.trainable_parameters,
                     "% of model": round(report.trainable_percent, 3),
                     "adapter size (MB, fp32)": round(report.trainable_parameters * 4 / 1e6, 2)})
settings = pd.DataFrame(rows)
settings"""),
    ("md", """The adapter stays small next to the frozen base it shares. In a model this small, r=64 on every linear
layer is 13% of the parameters; in a 7B Llama (hidden size 4096, 32 layers) the same setting is about 160M
parameters, 2.4% of the model, because the count grows with the width while the model grows with its square.
Rules of thumb from the QLoRA paper and practice:

- Adapting **all linear layers** matters more than a large rank; r between 8 and 64 usually performs alike.
- Keep alpha / r constant (here 2) when you change r, so the learning rate still fits.
- Raise r when the task is far from what the model knows (a new format or language), not for small style
  changes.

Training quality for different ranks is compared in the tuning notebook; here we only count."""),
    ("code", r"""import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 2.6))
for targets, group in settings.groupby("targets"):
    ax.plot(group["r"], group["trainable"] / 1e6, "o-", label=targets)
ax.set_xscale("log", base=2)
ax.set_xlabel("LoRA rank r")
ax.set_ylabel("trainable parameters (M)")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()"""),
]

DATA = [
    ("md", """# 4. Preparing data: templates, chat format and masking

*Course slide 4.* The slide tokenizes the prompt and the response apart, pads both to 512 tokens and uses the
response's ids as labels for the prompt's positions. A causal language model predicts the **next token of
the same sequence**, so that pairs each prompt token with an unrelated response token, and the padding makes
every example 512 tokens long (most of it pad tokens the model computes for nothing).

What qlora_magic does instead, for every row:

1. Render the `prompt` and `response` templates with the row's fields.
2. Tokenize the prompt and the response, join them (with an end-of-sequence token after the response), and
   copy the ids to the labels.
3. Set the labels of the prompt tokens to -100: the loss then counts only the response, so the model learns
   to answer, not to repeat questions.
4. No padding here; the collator pads each batch to its longest example, or packs the examples of a batch
   into one row with no padding at all."""),
    ("code", SETUP),
    ("code", r"""rows = pd.read_json(qm.examples.path("word_forms"), lines=True)
print(len(rows), "rows")
rows.head(3)"""),
    ("md", """We only need the tokenizer here, so we load it alone (no model) from the embedded default model's folder:"""),
    ("code", r"""from transformers import AutoTokenizer
from qlora_magic.data import ExampleTokenizer, show_masking
from qlora_magic.loading import resolve_model

tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
PROMPT = "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
RESPONSE = "{response}"
row = rows.iloc[0].to_dict()
plain = ExampleTokenizer(tokenizer, PROMPT, RESPONSE)
example = plain(row)
print(tokenizer.decode(example["input_ids"]))"""),
    ("md", """### Token by token

Grey tokens are masked (label -100: not in the loss); green ones are what the model is trained to produce."""),
    ("code", r"""import html
from IPython.display import HTML


def show_tokens(pairs):
    spans = []
    for text, counted in pairs:
        style = "background:#c7f0c2;color:#000" if counted else "background:#eee;color:#777"
        shown = html.escape(text).replace("\n", "\u21b5<br>")
        spans.append(f"<span style='{style};border:1px solid #fff;font-family:monospace;white-space:pre'>{shown}</span>")
    return HTML("<div style='line-height:1.9'>" + "".join(spans) + "</div>")


show_tokens(show_masking(tokenizer, example))"""),
    ("code", r"""counted = sum(1 for _, c in show_masking(tokenizer, example) if c)
print(f"{len(example['input_ids'])} tokens, {counted} in the loss "
      f"(the slide's version: 512 positions per example, labels misaligned)")
first = example["labels"].index(next(l for l in example["labels"] if l != -100))
pd.DataFrame({"token": [tokenizer.decode([t]) for t in example["input_ids"]], "id": example["input_ids"],
              "label": example["labels"]}).iloc[first - 4:first + 4]   # where the response starts"""),
    ("md", """Look at the last masked token: the space at the end of `"Response: "` is a token of its own, so the
response starts with `The` without a leading space. The model learns exactly this boundary, so at generation
time the prompt must end the same way, with the space: that is why the course generates with `--raw` and the
template's text as written. A template that ends without a space works as well, as long as training and
generation agree."""),
    ("md", """### The chat format

An instruct model was trained on conversations in its **chat template**. `chat: true` in `%%qlora_train`
(or `chat=True`) puts the rendered prompt into a user turn and the response into the assistant turn, and
masks everything up to the assistant's answer. Then generate *without* `--raw`, so the same template wraps
your question. Plain templates (`chat: false`, the default) suit base models and fixed formats; match the
choice at generation time with `--raw`."""),
    ("code", r"""chat = ExampleTokenizer(tokenizer, "{instruction}\n\n{context}", RESPONSE, chat=True)
show_tokens(show_masking(tokenizer, chat(row)))"""),
    ("md", """### Batches: padding to the longest, or packing

Examples differ in length. The default collator here **packs** the examples of a batch into one row whose
position ids restart at each example, so attention stays inside each example and no pad token is computed;
`--no-packing` pads each batch to its longest example (labels of the pads are -100 too)."""),
    ("code", r"""from qlora_magic.data import make_collator

by_length = sorted((plain(r) for r in rows.to_dict("records")), key=lambda f: len(f["input_ids"]))
features = [by_length[0], by_length[40], by_length[80], by_length[-1]]   # short to long
padded = make_collator(tokenizer, packing=False)(features)
packed = make_collator(tokenizer, packing=True)(features)
print("lengths:", [len(f["input_ids"]) for f in features])
print("padded batch:", tuple(padded["input_ids"].shape), " pad tokens:", int((padded["attention_mask"] == 0).sum()))
print("packed batch:", tuple(packed["input_ids"].shape), " position ids restart at:",
      [i for i, p in enumerate(packed["position_ids"][0].tolist()) if p == 0])"""),
    ("md", """### Your data

`data:` takes a list of dicts, a DataFrame or a `datasets.Dataset` (as `$name`), a `.jsonl`/`.json`/`.csv`/
`.parquet` file, or a Hub id with `split:`. Placeholders must name columns: a typo is caught before any
training, in one line:"""),
    ("code", r"""from qlora_magic.errors import QloraError

qm.load()
try:
    qm.train(rows, prompt="Instruction: {instructions}\n\nResponse: ", response="{response}", max_steps=1)
except QloraError as error:
    print(f"{type(error).__name__}: {error}")"""),
]

TRAINING = [
    ("md", """# 5. Training and monitoring

*Course slides 5 and 6.* The slide sets up `TrainingArguments` and a `Trainer`, and then, separately, a
TensorBoard writer with a hand-written loop for loss, learning rate and gradient norm. `%%qlora_train` runs
the Trainer with the options you give and the rest decided from the device, and shows everything while it
runs: a progress bar with ETA, the train and eval loss chart, learning rate, gradient norm, tokens per second
and memory. The same numbers go to TensorBoard files and to the session's history."""),
    ("code", SETUP + "\n\nword_forms = qm.examples.path(\"word_forms\")"),
    ("code", "%qlora_load"),
    ("md", """15 optimizer steps of 4 examples at a high learning rate (1e-3, fine for a small LoRA on a small model) are
enough to teach the answer format. 10 rows are held out: the eval loss is measured before training, during it
and at the end."""),
    ("code", r"""%%qlora_train --max-steps 15 --batch-size 4 --grad-accum 1 --lr 1e-3
data: $word_forms
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: "{response}"
eval_split: 10"""),
    ("md", """### The history

Every logged step is a row in `get_session().history`: `step`, `loss`, `learning_rate`, `grad_norm`,
`tokens_per_second`, `epoch` and memory; evaluation rows carry `eval_loss`. Plot anything from it:"""),
    ("code", r"""history = pd.DataFrame(qm.get_session().history)
train_rows = history[history["loss"].notna()]
train_rows[["step", "loss", "learning_rate", "grad_norm", "tokens_per_second"]].round(4).tail()"""),
    ("code", r"""import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 3, figsize=(8, 2.4))
for ax, key in zip(axes, ["learning_rate", "grad_norm", "tokens_per_second"]):
    ax.plot(train_rows["step"], train_rows[key], ".-")
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
fig.tight_layout()
plt.show()"""),
    ("md", """How to read them: the learning rate warms up and decays linearly; the gradient norm should stay in the
same range (spikes that grow mean the learning rate is too high); tokens/s is the speed, which on a shared CPU
wobbles. When the eval loss turns up while the train loss keeps falling, the adapter starts to memorize.

### TensorBoard

The run folder holds TensorBoard event files. In a notebook: `%load_ext tensorboard` and
`%tensorboard --logdir runs`. They are plain files, so they can also be read directly:"""),
    ("code", r"""from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run_dir = qm.get_session().last_train_summary.run_dir   # runs/<date-time> unless --output-dir is given
events = EventAccumulator(f"{run_dir}/tensorboard")
events.Reload()
print(sorted(events.Tags()["scalars"]))
print("train/loss:", [round(e.value, 3) for e in events.Scalars("train/loss")][:5], "...")"""),
    ("md", """### Stopping a run

Interrupt the kernel (the stop button) while a training cell runs: it stops after the step in flight and keeps
what the adapter learned; the summary says `interrupted`. In the panel, the Stop button does the same. From
code, give `train` a `StopFlag` and set it. Here a tiny custom reporter sets it after 3 steps, which also shows
the event interface every display is built on (`start`, `step`, `log`, `end`):"""),
    ("code", r"""from qlora_magic.reporters import Reporter
from qlora_magic.training import StopFlag


class StopAfter(Reporter):
    def __init__(self, steps, flag):
        self.steps, self.flag = steps, flag

    def step(self, progress):
        print(f"step {progress['step']}/{progress['total_steps']}")
        if progress["step"] >= self.steps:
            self.flag.set()


flag = StopFlag()
summary = qm.train(word_forms, prompt="Instruction: {instruction}\n\nInput: {context}\n\nResponse: ",
                   response="{response}", max_steps=50, batch_size=4, grad_accum=1, lr=1e-3,
                   reporter=StopAfter(3, flag), stop=flag)
summary"""),
    ("md", """The adapter now has 15 + 3 steps of training; the history has both runs (`run` 0 and 1).

### Exercises

- Train with `--lr 2e-4` (the course's value) for the same steps and compare the curves.
- Use `--eval-steps 2` for a finer eval curve (each evaluation costs time).
- Try `--display text`, the display used in terminals and CI."""),
]

SAVING = [
    ("md", """# 6. Saving, loading and sharing adapters

*Course slide 7.* An adapter is small: only the LoRA matrices are saved, not the base model. `%qlora_save`
writes a folder in PEFT's own format (`adapter_config.json` + `adapter_model.safetensors`) with the tokenizer
and a record of how it was made (`qlora_magic.json`: load settings, training settings, the loss history).
`%qlora_load --adapter` restores the base model, quantized the same way, with the adapter on it."""),
    ("code", SETUP + r"""

PROMPT = "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
QUESTION = PROMPT.format(instruction="Give the plural of the word.", context="bird")"""),
    ("code", r"""qm.load()
qm.train(qm.examples.path("word_forms"), prompt=PROMPT, response="{response}",
         max_steps=12, batch_size=4, grad_accum=1, lr=1e-3, display="none")
trained_answer = qm.generate(QUESTION, raw=True, greedy=True, max_new_tokens=24, stream=False)
trained_answer"""),
    ("code", "%qlora_save runs/course-adapter"),
    ("code", r"""from pathlib import Path

folder = Path("runs/course-adapter")
pd.DataFrame([(f.name, round(f.stat().st_size / 1e6, 3)) for f in sorted(folder.iterdir())],
             columns=["file", "MB"])"""),
    ("md", """The adapter weights are under 2 MB, against 538 MB for the fp32 base model. The run record says how it
was made:"""),
    ("code", r"""import json

record = json.loads((folder / "qlora_magic.json").read_text())
print(json.dumps({k: record[k] for k in ("load_config", "train_configs")}, indent=1)[:900])"""),
    ("md", """### Load it back

`reset_session()` forgets the model, as a new kernel would. `%qlora_load --adapter` reads the base model's name
and the bits from the folder, loads the base quantized the same way and puts the adapter on it. The answer is
the same:"""),
    ("code", r"""qm.reset_session()
%qlora_load --adapter runs/course-adapter"""),
    ("code", r"""reloaded_answer = qm.generate(QUESTION, raw=True, greedy=True, max_new_tokens=24, stream=False)
assert reloaded_answer == trained_answer, (reloaded_answer, trained_answer)
reloaded_answer"""),
    ("md", """### Plain PEFT can read it too

The folder is a standard PEFT adapter, so the slide's code loads it without qlora_magic (with transformers 5
the 8-bit setting goes through `BitsAndBytesConfig`):"""),
    ("code", r"""import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

config = PeftConfig.from_pretrained(folder)
base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path,
                                            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                            device_map={"": "cpu"}, dtype=torch.float32)
plain = PeftModel.from_pretrained(base, folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
inputs = tokenizer(QUESTION, return_tensors="pt")
with torch.no_grad():
    output = plain.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)"""),
    ("md", """### Sharing

- Share the folder (it is small), or push it to the Hugging Face Hub: `qm.get_session().model.push_to_hub("you/name")`
  and `tokenizer.push_to_hub(...)` after `huggingface_hub.login()`. Others load it with
  `%qlora_load --adapter you/name` or plain PEFT as above.
- `base_model_name_or_path` in `adapter_config.json` names the base model. For the embedded default it is a
  local cache folder; for a Hub model it is the Hub id, which is what makes the adapter portable.
- To ship a model without PEFT, merge the adapter into the base weights (`%qlora_merge`, see the reference)."""),
]

INFERENCE = [
    ("md", """# 7. Inference: sampling settings side by side

*Course slide 8.* The slide tokenizes, calls `model.generate` with sampling at temperature 0.7 and decodes,
prompt included. `%qlora_generate` streams the answer as it is produced and returns only the new text;
the settings are options: `--greedy`, `--temperature`, `--top-p`, `--max-new-tokens`, `--seed`, `--base`
(adapter off), `--raw` (no chat template), `--system`."""),
    ("code", SETUP + r"""

PROMPT = "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
qm.load()
summary = qm.train(qm.examples.path("word_forms"), prompt=PROMPT, response="{response}",
                   max_steps=12, batch_size=4, grad_accum=1, lr=1e-3, display="none")
summary"""),
    ("md", """The magic streams. The cell form takes the prompt from the body, so newlines and braces stay as written:"""),
    ("code", r"""%%qlora_generate --raw --greedy --max-new-tokens 24
Instruction: Give the past tense of the verb.

Input: swim

Response: """),
    ("md", """### Sampling settings

- **greedy**: always the most likely next token. Reproducible; can loop on long answers.
- **temperature**: divides the logits before sampling; below 1 sharpens the distribution (closer to greedy),
  above 1 flattens it (more varied, more mistakes).
- **top-p** (nucleus): samples only among the most likely tokens whose probabilities add up to p.
- **seed**: makes a sampled answer reproducible.

The same question under each setting, with the adapter and with the base model (three samples each):"""),
    ("code", r"""question = PROMPT.format(instruction="Give the opposite of the word.", context="early")
settings = {"greedy": dict(greedy=True), "T=0.3": dict(temperature=0.3), "T=0.7, top-p 0.9": dict(temperature=0.7),
            "T=1.5": dict(temperature=1.5, top_p=1.0)}
table = {}
for name, options in settings.items():
    for base in (False, True):
        samples = [qm.generate(question, raw=True, base=base, max_new_tokens=16, stream=False, seed=seed, **options).strip()
                   for seed in ((0,) if options.get("greedy") else (0, 1, 2))]
        table[(name, "base model" if base else "adapter")] = " | ".join(dict.fromkeys(samples))
pd.set_option("display.max_colwidth", 120)
pd.Series(table).unstack().loc[list(settings)]"""),
    ("md", """With the adapter, low temperatures give the trained answer format every time; at T=1.5 the samples
drift. The base model has not learned the format and answers in its own way.

### Chat template or raw

An instruct model expects its chat template; without `--raw`, `%qlora_generate` applies it. The adapter was
trained on the plain template, so it answers best with `--raw`; a question in chat form is answered by the
instruct model as a chatbot:"""),
    ("code", r"""%qlora_generate --greedy --max-new-tokens 30 What is the opposite of early?"""),
    ("md", """A system message steers a chat model (`--system` in the magic, `system=` in Python):"""),
    ("code", r"""qm.generate("What is the opposite of early?", system="Answer with one word.", greedy=True, max_new_tokens=30)"""),
    ("md", """### Exercises

- Try `--temperature 0.7 --seed 1` twice: same answer; change the seed: another one.
- Write a longer prompt and watch where greedy decoding starts to repeat itself.
- Compare with the adapter disabled: `--base`."""),
]


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


NOTEBOOKS = {
    "02_quantization_and_memory.ipynb": QUANTIZATION,
    "03_lora_settings.ipynb": LORA,
    "04_preparing_data.ipynb": DATA,
    "05_training_and_monitoring.ipynb": TRAINING,
    "06_saving_and_loading.ipynb": SAVING,
    "07_inference.ipynb": INFERENCE,
    "panel.ipynb": PANEL,
}


def _run_notebook_module():
    spec = importlib.util.spec_from_file_location("run_notebook", ROOT / "scripts" / "run_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="execute each notebook in place (nbclient)")
    parser.add_argument("only", nargs="*", help="name prefixes to restrict to (e.g. 04 panel)")
    args = parser.parse_args()
    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(p) for p in args.only)]
    for name in names:
        path = NOTEBOOKS_DIR / name
        nbformat.write(build(NOTEBOOKS[name]), path)
        if args.execute:
            started = time.perf_counter()
            _run_notebook_module().run(path, path.parent, timeout=900)
            print(f"executed {path.relative_to(ROOT)} in {time.perf_counter() - started:.0f} s", flush=True)
        else:
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
