# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. Preparing data: templates, chat format and masking
#
# *Course slide 4.* The slide tokenizes the prompt and the response apart, pads both to 512 tokens and uses the
# response's ids as labels for the prompt's positions. A causal language model predicts the **next token of
# the same sequence**, so that pairs each prompt token with an unrelated response token, and the padding makes
# every example 512 tokens long (most of it pad tokens the model computes for nothing).
#
# What qlora_magic does instead, for every row:
#
# 1. Render the `prompt` and `response` templates with the row's fields.
# 2. Tokenize the prompt and the response, join them (with an end-of-sequence token after the response), and
#    copy the ids to the labels.
# 3. Set the labels of the prompt tokens to -100: the loss then counts only the response, so the model learns
#    to answer, not to repeat questions.
# 4. No padding here; the collator pads each batch to its longest example, or packs the examples of a batch
#    into one row with no padding at all.

# %%
import pandas as pd
import qlora_magic as qm

# %load_ext qlora_magic

# %%
rows = pd.read_json(qm.examples.path("word_forms"), lines=True)
print(len(rows), "rows")
rows.head(3)

# %% [markdown]
# We only need the tokenizer here, so we load it alone (no model) from the embedded default model's folder:

# %%
from transformers import AutoTokenizer
from qlora_magic.engine.data import ExampleTokenizer, show_masking
from qlora_magic.engine.loading import resolve_model

tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
PROMPT = "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
RESPONSE = "{response}"
row = rows.iloc[0].to_dict()
plain = ExampleTokenizer(tokenizer, PROMPT, RESPONSE)
example = plain(row)
print(tokenizer.decode(example["input_ids"]))

# %% [markdown]
# ### Token by token
#
# Grey tokens are masked (label -100: not in the loss); green ones are what the model is trained to produce.

# %%
import html
from IPython.display import HTML


def show_tokens(pairs):
    spans = []
    for text, counted in pairs:
        style = "background:#c7f0c2;color:#000" if counted else "background:#eee;color:#777"
        shown = html.escape(text).replace("\n", "\u21b5<br>")
        spans.append(f"<span style='{style};border:1px solid #fff;font-family:monospace;white-space:pre'>{shown}</span>")
    return HTML("<div style='line-height:1.9'>" + "".join(spans) + "</div>")


show_tokens(show_masking(tokenizer, example))

# %%
counted = sum(1 for _, c in show_masking(tokenizer, example) if c)
print(f"{len(example['input_ids'])} tokens, {counted} in the loss "
      f"(the slide's version: 512 positions per example, labels misaligned)")
first = example["labels"].index(next(l for l in example["labels"] if l != -100))
pd.DataFrame({"token": [tokenizer.decode([t]) for t in example["input_ids"]], "id": example["input_ids"],
              "label": example["labels"]}).iloc[first - 4:first + 4]   # where the response starts

# %% [markdown]
# Look at the last masked token: the space at the end of `"Response: "` is a token of its own, so the
# response starts with `The` without a leading space. The model learns exactly this boundary, so at generation
# time the prompt must end the same way, with the space: that is why the course generates with `--raw` and the
# template's text as written. A template that ends without a space works as well, as long as training and
# generation agree.

# %% [markdown]
# ### The chat format
#
# An instruct model was trained on conversations in its **chat template**. `chat: true` in `%%qlora_train`
# (or `chat=True`) puts the rendered prompt into a user turn and the response into the assistant turn, and
# masks everything up to the assistant's answer. Then generate *without* `--raw`, so the same template wraps
# your question. Plain templates (`chat: false`, the default) suit base models and fixed formats; match the
# choice at generation time with `--raw`.

# %%
chat = ExampleTokenizer(tokenizer, "{instruction}\n\n{context}", RESPONSE, chat=True)
show_tokens(show_masking(tokenizer, chat(row)))

# %% [markdown]
# ### Batches: padding to the longest, or packing
#
# Examples differ in length. The default collator here **packs** the examples of a batch into one row whose
# position ids restart at each example, so attention stays inside each example and no pad token is computed;
# `--no-packing` pads each batch to its longest example (labels of the pads are -100 too).

# %%
from qlora_magic.engine.data import make_collator

by_length = sorted((plain(r) for r in rows.to_dict("records")), key=lambda f: len(f["input_ids"]))
features = [by_length[0], by_length[40], by_length[80], by_length[-1]]   # short to long
padded = make_collator(tokenizer, packing=False)(features)
packed = make_collator(tokenizer, packing=True)(features)
print("lengths:", [len(f["input_ids"]) for f in features])
print("padded batch:", tuple(padded["input_ids"].shape), " pad tokens:", int((padded["attention_mask"] == 0).sum()))
print("packed batch:", tuple(packed["input_ids"].shape), " position ids restart at:",
      [i for i, p in enumerate(packed["position_ids"][0].tolist()) if p == 0])

# %% [markdown]
# ### Your data
#
# `data:` takes a list of dicts, a DataFrame or a `datasets.Dataset` (as `$name`), a `.jsonl`/`.json`/`.csv`/
# `.parquet` file, or a Hub id with `split:`. Placeholders must name columns: a typo is caught before any
# training, in one line:

# %%
from qlora_magic.errors import QloraError

qm.load()
try:
    qm.train(rows, prompt="Instruction: {instructions}\n\nResponse: ", response="{response}", max_steps=1)
except QloraError as error:
    print(f"{type(error).__name__}: {error}")

# %% [markdown]
# ### Check the data before training: `%%qlora_data`
#
# `%%qlora_data` takes `%%qlora_train`'s options and body and trains nothing: it tokenizes every row with the
# loaded tokenizer exactly as training would, then counts what goes wrong silently otherwise: rows that
# `max_length` cuts, rows left with no trained token, targets that lose (or never had) the stop token
# generation stops at, duplicates, empty fields. The first rows are shown token by token, as above.
# Here `--max-length 32` is too short on purpose:

# %%
# %%qlora_data --max-length 32
data: $rows
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: "{response}"

# %% [markdown]
# The rows it cuts lose the end of their answer and its `<|im_end|>`: the model would learn answers that do
# not stop. The fix is in the line under each warning. `%%qlora_train` runs the same checks before it touches
# the model: a data set that would teach nothing (here, every response empty) stops it in one line, and the
# warnings go into its readout.

# %%
empty = rows.assign(response="")

# %% tags=["raises-exception"]
# %%qlora_train --max-steps 1
data: $empty
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: "{response}"

# %% [markdown]
# ### Chat conversations: `messages:`
#
# Many chat datasets on the Hub keep each example as a whole conversation: a list of turns with a `role`
# (system, user, assistant) and a `content`. `messages: <column>` takes such a column in place of `prompt:` and
# `response:`. Each conversation goes through the tokenizer's chat template, and the loss counts every assistant
# turn (with its `<|im_end|>`, so the model learns to stop) and nothing else:

# %%
chats = [
    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "And grass?"}, {"role": "assistant", "content": "Green."}]},
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
]

# %%
# %%qlora_data
data: $chats
messages: messages
