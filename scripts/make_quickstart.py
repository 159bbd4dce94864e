"""Writes notebooks/01_quickstart.ipynb (unexecuted); `make demo` or scripts/run_notebook.py runs it."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# qlora_magic quickstart

Fine-tune a language model with QLoRA in a few cells: load it quantized with LoRA adapters, look at its
answers, train on a small instruction set while the loss chart updates, compare the answers, save the adapter
and load it back. Everything here runs offline on a CPU in a couple of minutes, on the embedded default model
(SmolLM2-135M-Instruct). With a GPU and a Hub connection, give `%qlora_load` any model id instead."""),
    ("code", "%load_ext qlora_magic"),
    ("md", """## 1. Load the model

8-bit quantization (LLM.int8) and LoRA rank 8, alpha 32 on the attention `q_proj`/`v_proj`, as in the course.
The readout compares the quantized footprint with the fp32/fp16 size it replaces and counts what will train."""),
    ("code", "%qlora_load"),
    ("code", "%qlora_generate --greedy --max-new-tokens 40 What is the capital of France?"),
    ("md", """## 2. The data

`word_forms` ships with qlora_magic: 100 rows in the Dolly layout (`instruction`, `context`, `response`) asking
for opposites, plurals and past tenses, each answered in one fixed sentence. Any list of dicts, DataFrame,
`datasets.Dataset`, local `.jsonl/.csv/.parquet` file or Hub dataset id works the same way."""),
    ("code", """import pandas as pd
import qlora_magic

rows = pd.read_json(qlora_magic.examples.path("word_forms"), lines=True).to_dict("records")
pd.DataFrame(rows).head()"""),
    ("md", """The prompt template is the course's; the model learns only the response (the prompt tokens are masked
out of the loss). Here are the model's answers **before** training, on words that are *not* in the data.
`raw=True` sends the text exactly as the template writes it, without the chat template."""),
    ("code", """PROMPT = "Instruction: {instruction}\\n\\nInput: {context}\\n\\nResponse: "
TESTS = [("Give the opposite of the word.", "tall"),
         ("Give the plural of the word.", "bird"),
         ("Give the past tense of the verb.", "sit")]

def answers():
    return [qlora_magic.generate(PROMPT.format(instruction=i, context=c), raw=True, greedy=True,
                                 max_new_tokens=24, stream=False).strip() for i, c in TESTS]

before = answers()
before"""),
    ("md", """## 3. Train

One epoch over 90 rows (10% held out for evaluation), micro-batches of 4. The chart shows train loss by step and
eval loss before, during and after; the readouts show learning rate, gradient norm, tokens/s and memory. Press
the stop button (interrupt the kernel) to end at the next step and keep what was learned. TensorBoard files go
to the run folder."""),
    ("code", """%%qlora_train --epochs 1 --batch-size 4 --grad-accum 1 --lr 1e-3
data: $rows
prompt: "Instruction: {instruction}\\n\\nInput: {context}\\n\\nResponse: "
response: "{response}"
eval_split: 0.1"""),
    ("code", """after = answers()
pd.DataFrame({"input": [c for _, c in TESTS], "before": before, "after": after})"""),
    ("md", "The same through the magic (the cell body is the prompt, braces and newlines kept as written):"),
    ("code", """%%qlora_generate --raw --greedy --max-new-tokens 24
Instruction: Give the opposite of the word.

Input: quiet

Response: """),
    ("md", "`--base` answers with the adapter switched off: the model as it was."),
    ("code", """%%qlora_generate --raw --greedy --base --max-new-tokens 24
Instruction: Give the opposite of the word.

Input: quiet

Response: """),
    ("md", """## 4. Save, load back, check

`%qlora_save` writes the adapter in PEFT's own format (plain `PeftModel.from_pretrained` reads it), the
tokenizer, and a record of the configs and metrics. `%qlora_load --adapter` restores the base model and the
adapter from that folder, in this kernel or a fresh one."""),
    ("code", "%qlora_save runs/word-forms-adapter"),
    ("code", "%qlora_load --adapter runs/word-forms-adapter"),
    ("code", """reloaded = answers()
assert reloaded == after, (reloaded, after)
reloaded"""),
    ("code", "%qlora_memory"),
    ("md", "The training history is in the session, one row per logged step (eval rows carry `eval_loss`):"),
    ("code", """history = qlora_magic.get_session().history
evals = [r["eval_loss"] for r in history if "eval_loss" in r]
print(f"eval loss {evals[0]:.3f} -> {evals[-1]:.3f}")
pd.DataFrame([r for r in history if "loss" in r])[["step", "loss", "learning_rate", "grad_norm", "tokens_per_second"]].tail()"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "notebooks" / "01_quickstart.ipynb"
    nbformat.write(build(), out)
    print(out)
