# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Several adapters on one quantized base, and merging
#
# Slide 14's multi-task idea with PEFT's named adapters: one 8-bit base in memory, one small LoRA adapter
# per task. `%qlora_adapters` adds, loads, lists, switches, combines and deletes them; the **active** adapter
# is the one `%qlora_generate`, `%qlora_eval` and `%%qlora_train` use, and only it is trained.
# `%qlora_merge` then folds an adapter into an unquantized 16-bit copy of the base and checks the result.

# %%
# %load_ext qlora_magic
import qlora_magic as qm

DATA = qm.examples.path("word_forms")   # 100 rows: opposites, plurals, past tenses
PROMPT = "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "

import json

rows = [json.loads(line) for line in open(DATA)]
opposites = [r for r in rows if "opposite" in r["instruction"]]
past_tenses = [r for r in rows if "past tense" in r["instruction"]]
# The last 6 rows of each task are kept out of training, to evaluate on.
opposites, opposites_test = opposites[:-6], opposites[-6:]
past_tenses, past_test = past_tenses[:-6], past_tenses[-6:]
len(opposites), len(past_tenses)

# %%
# %qlora_load

# %% [markdown]
# The first adapter (`default`) learns opposites:

# %%
# %%qlora_train --max-steps 10 --lr 2e-3 --batch-size 4 --grad-accum 1 --display text
data: $opposites
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: "{response}"

# %% [markdown]
# A second adapter beside it, on the same quantized base, learns past tenses. It becomes the active one:

# %%
# %qlora_adapters add past --r 8

# %%
# %%qlora_train --max-steps 10 --lr 2e-3 --batch-size 4 --grad-accum 1 --display text
data: $past_tenses
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: "{response}"

# %% [markdown]
# The same prompts through the base and each adapter, one model in memory. Two answers say little (the base
# already knows some past tenses, and each adapter answers in the `The ... of "x" is "y".` format it learned);
# the perplexities below measure the specialization:

# %%
probe = [
    {"instruction": "Give the opposite of the word.", "context": "wet"},
    {"instruction": "Give the past tense of the verb.", "context": "jump"},
]
qm.compare([PROMPT.format(**r) for r in probe], raw=True, max_new_tokens=20)

# %% [markdown]
# Perplexity of each adapter on the held-back rows of each task (the base for reference). `adapters=`
# (`--adapters` in the magic) evaluates several in one table:

# %%
for name, task in (("opposites", opposites_test), ("past tenses", past_test)):
    print(name)
    display(qm.evaluate(task, prompt=PROMPT, response="{response}", adapters=["default", "past"], base=True))

# %% [markdown]
# A weighted combination (PEFT `add_weighted_adapter`; ranks agree here, so `linear`), then switching back
# and deleting it:

# %%
# %qlora_adapters combine both --weights default=1.0,past=1.0

# %%
qm.compare([PROMPT.format(**r) for r in probe], raw=True, max_new_tokens=20, base=False)

# %%
# %qlora_adapters delete both
# %qlora_adapters switch past

# %% [markdown]
# A name that does not exist is a one-line error:

# %% tags=["raises-exception"]
# %qlora_adapters switch opposites

# %% [markdown]
# ## Merge and export
#
# `%qlora_merge` reloads the base from its original weights in 16 bits (merging into 8- or 4-bit weights would
# round the update back onto the quantization grid), copies the active adapter in, merges, saves safetensors,
# reloads what it saved and compares its greedy answers and perplexity with the adapter's. With no held-out
# split in the last run, `data=` names the rows to check on (the last run's templates apply).

# %%
import shutil
shutil.rmtree("runs/merged/past-tense", ignore_errors=True)
report = qm.merge("runs/merged/past-tense", data=past_test)   # %qlora_merge runs/merged/past-tense checks on held-out rows
report

# %% [markdown]
# The check compares two different models on purpose: the adapter *as trained*, on the 8-bit base, and the
# merged model, on the original 16-bit weights, which is what you ship. Perplexity moves by about a percent,
# usually down, since the original weights are the better ones. A greedy answer can flip where the model's two
# best next words were close (an odd verb for a 10-step adapter, say), and then the check says so instead of
# passing: read the `differs` rows. The merge itself adds nothing: on a 16-bit base (`--bits 16`) the merged
# model's logits equal the adapter's up to float rounding (`tests/test_merging.py`).

# %% [markdown]
# The merged folder is a plain transformers model: no peft, no bitsandbytes.

# %%
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("runs/merged/past-tense")
merged = AutoModelForCausalLM.from_pretrained("runs/merged/past-tense")
inputs = tokenizer(PROMPT.format(**probe[1]), return_tensors="pt")
out = merged.generate(**inputs, max_new_tokens=16, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
