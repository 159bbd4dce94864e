# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 7. Inference: sampling settings side by side
#
# *Course slide 8.* The slide tokenizes, calls `model.generate` with sampling at temperature 0.7 and decodes,
# prompt included. `%qlora_generate` streams the answer as it is produced and returns only the new text;
# the settings are options: `--greedy`, `--temperature`, `--top-p`, `--max-new-tokens`, `--seed`, `--base`
# (adapter off), `--raw` (no chat template), `--system`.

# %%
import pandas as pd
import qlora_magic as qm

# %load_ext qlora_magic

PROMPT = "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
qm.load()
summary = qm.train(qm.examples.path("word_forms"), prompt=PROMPT, response="{response}",
                   max_steps=12, batch_size=4, grad_accum=1, lr=1e-3, display="none")
summary

# %% [markdown]
# The magic streams. The cell form takes the prompt from the body, so newlines and braces stay as written:

# %%
# %%qlora_generate --raw --greedy --max-new-tokens 24
Instruction: Give the past tense of the verb.

Input: swim

Response: 

# %% [markdown]
# ### Sampling settings
#
# - **greedy**: always the most likely next token. Reproducible; can loop on long answers.
# - **temperature**: divides the logits before sampling; below 1 sharpens the distribution (closer to greedy),
#   above 1 flattens it (more varied, more mistakes).
# - **top-p** (nucleus): samples only among the most likely tokens whose probabilities add up to p.
# - **seed**: makes a sampled answer reproducible.
#
# The same question under each setting, with the adapter and with the base model (three samples each):

# %%
question = PROMPT.format(instruction="Give the opposite of the word.", context="early")
settings = {"greedy": dict(greedy=True), "T=0.3": dict(temperature=0.3), "T=0.7, top-p 0.9": dict(temperature=0.7),
            "T=1.5": dict(temperature=1.5, top_p=1.0)}
table = {}
for name, options in settings.items():
    for base in (False, True):
        samples = [qm.generate(question, raw=True, base=base, max_new_tokens=16, stream=False, seed=seed, **options).strip()
                   for seed in ((0,) if options.get("greedy") else (0, 1, 2))]
        table[(name, "base model" if base else "adapter")] = " | ".join(dict.fromkeys(samples))
pd.set_option("display.max_colwidth", 120)
pd.Series(table).unstack().loc[list(settings)]

# %% [markdown]
# With the adapter, low temperatures give the trained answer format every time; at T=1.5 the samples
# drift. The base model has not learned the format and answers in its own way.
#
# ### Chat template or raw
#
# An instruct model expects its chat template; without `--raw`, `%qlora_generate` applies it. The adapter was
# trained on the plain template, so it answers best with `--raw`; a question in chat form is answered by the
# instruct model as a chatbot:

# %%
# %qlora_generate --greedy --max-new-tokens 30 What is the opposite of early?

# %% [markdown]
# A system message steers a chat model (`--system` in the magic, `system=` in Python):

# %%
qm.generate("What is the opposite of early?", system="Answer with one word.", greedy=True, max_new_tokens=30)

# %% [markdown]
# ### Exercises
#
# - Try `--temperature 0.7 --seed 1` twice: same answer; change the seed: another one.
# - Write a longer prompt and watch where greedy decoding starts to repeat itself.
# - Compare with the adapter disabled: `--base`.
