# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Evaluating a QLoRA adapter
#
# Slide 9 of the course computes a "perplexity" from the cross-entropy of *all* logits (prompt tokens
# included) and a BLEU score on the argmax of teacher-forced logits, which is not what the model would say.
# `%qlora_eval` measures what matters instead:
#
# * **perplexity** = exp(mean negative log-likelihood of the *response* tokens), the loss training minimizes,
#   summed over every response token of the data set, with the prompt masked out;
# * **BLEU** (sacrebleu), **ROUGE-1/2/L** (rouge-score) and **exact match** of the model's own greedy answers
#   against the references;
# * the **base model** (adapters disabled, no second copy in memory) and the adapter **in one table**.
#
# By default it evaluates on the held-out split of the last training run, rebuilt exactly as training built it.

# %%
# %load_ext qlora_magic
import qlora_magic as qm

DATA = qm.examples.path("word_forms")   # 100 rows: opposites, plurals, past tenses
PROMPT = "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "

# %%
# %qlora_load

# %% [markdown]
# A short run on the shipped `word_forms` data, holding out 20% of the rows for evaluation:

# %%
# %%qlora_train --max-steps 15 --lr 1e-3 --batch-size 4 --grad-accum 1 --display text
data: $DATA
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: "{response}"
eval_split: 0.2

# %% [markdown]
# ## Base vs adapter on the held-out rows
#
# `--base` adds the model with its adapters switched off, so the same table shows *before* (base) and
# *after* (adapter). Greedy answers are kept for inspection below the table.

# %%
# %qlora_eval --base --metrics perplexity,bleu,rouge,exact_match --max-new-tokens 24

# %% [markdown]
# Every evaluation also lands in the session history as rows of kind `eval` (kept apart from the training
# rows, so loss charts are unaffected), next to the Trainer's own `eval_loss`. The adapter's `response_loss`
# is the same masked loss on the same rows, but weighted by token over the whole split; the Trainer averages
# the means of its batches, so short and long batches count alike and the two differ slightly.

# %%
import pandas as pd

history = qm.get_session().history
print("Trainer's last eval_loss:", [r["eval_loss"] for r in history if "eval_loss" in r][-1])
pd.DataFrame([r for r in history if r.get("kind") == "eval"]).drop(columns=["kind"])

# %% [markdown]
# ## Any data set, from Python
#
# The Python API takes the same options. Here: words the training data never contained.

# %%
new_words = [
    {"instruction": "Give the opposite of the word.", "context": "wet", "response": 'The opposite of "wet" is "dry".'},
    {"instruction": "Give the plural of the word.", "context": "box", "response": 'The plural of "box" is "boxes".'},
    {"instruction": "Give the past tense of the verb.", "context": "jump", "response": 'The past tense of "jump" is "jumped".'},
    {"instruction": "Give the opposite of the word.", "context": "young", "response": 'The opposite of "young" is "old".'},
]
report = qm.evaluate(new_words, prompt=PROMPT, response="{response}", base=True,
                     metrics=["perplexity", "exact_match"], max_new_tokens=24)
report

# %%
report.to_dataframe()

# %% [markdown]
# ## Side by side: `%qlora_compare`
#
# The same prompts answered by the base model and by each adapter, greedy by default, from one model in
# memory. `--raw` sends the prompt exactly as written, which matches the plain prompt template used in
# training (the cell body separates prompts with lines of `---`; here the Python form builds them from the
# template, so the trailing space after `Response:` is exact).

# %%
prompts = [PROMPT.format(**row) for row in new_words]
qm.compare(prompts, raw=True, max_new_tokens=24)

# %% [markdown]
# Without `--raw` the prompt goes through the model's chat template, as a user would ask it. A quick check
# that general knowledge survived the fine-tuning:

# %%
# %%qlora_compare --max-new-tokens 20
What is the capital of France?
---
Write a haiku about autumn.

# %% [markdown]
# Bad inputs fail with one line that says what to do:

# %% tags=["raises-exception"]
# %qlora_eval --metrics accuracy
