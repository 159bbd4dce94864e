# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # qlora_magic quickstart
#
# Fine-tune a language model with QLoRA in a few cells: load it quantized with LoRA adapters, look at its
# answers, train on a small instruction set while the loss chart updates, compare the answers, save the adapter
# and load it back. Everything here runs offline on a CPU in a couple of minutes, on the embedded default model
# (SmolLM2-135M-Instruct). With a GPU and a Hub connection, give `%qlora_load` any model id instead.

# %%
# %load_ext qlora_magic

# %% [markdown]
# ## 1. Load the model
#
# 8-bit quantization (LLM.int8) and LoRA rank 8, alpha 32 on the attention `q_proj`/`v_proj`, as in the course.
# The readout compares the quantized footprint with the fp32/fp16 size it replaces and counts what will train.

# %%
# %qlora_load

# %%
# %qlora_generate --greedy --max-new-tokens 40 What is the capital of France?

# %% [markdown]
# ## 2. The data
#
# `word_forms` ships with qlora_magic: 100 rows in the Dolly layout (`instruction`, `context`, `response`) asking
# for opposites, plurals and past tenses, each answered in one fixed sentence. Any list of dicts, DataFrame,
# `datasets.Dataset`, local `.jsonl/.csv/.parquet` file or Hub dataset id works the same way.

# %%
import pandas as pd
import qlora_magic

rows = pd.read_json(qlora_magic.examples.path("word_forms"), lines=True).to_dict("records")
pd.DataFrame(rows).head()

# %% [markdown]
# The prompt template is the course's; the model learns only the response (the prompt tokens are masked
# out of the loss). Here are the model's answers **before** training, on words that are *not* in the data.
# `raw=True` sends the text exactly as the template writes it, without the chat template.

# %%
PROMPT = "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
TESTS = [("Give the opposite of the word.", "tall"),
         ("Give the plural of the word.", "bird"),
         ("Give the past tense of the verb.", "sit")]

def answers():
    return [qlora_magic.generate(PROMPT.format(instruction=i, context=c), raw=True, greedy=True,
                                 max_new_tokens=24, stream=False).strip() for i, c in TESTS]

before = answers()
before

# %% [markdown]
# ## 3. Train
#
# One epoch over 90 rows (10% held out for evaluation), micro-batches of 4. The chart shows train loss by step and
# eval loss before, during and after; the readouts show learning rate, gradient norm, tokens/s and memory. Press
# the stop button (interrupt the kernel) to end at the next step and keep what was learned. TensorBoard files go
# to the run folder.

# %%
# %%qlora_train --epochs 1 --batch-size 4 --grad-accum 1 --lr 1e-3
data: $rows
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: "{response}"
eval_split: 0.1

# %%
after = answers()
pd.DataFrame({"input": [c for _, c in TESTS], "before": before, "after": after})

# %% [markdown]
# The same through the magic (the cell body is the prompt, braces and newlines kept as written):

# %%
# %%qlora_generate --raw --greedy --max-new-tokens 24
Instruction: Give the opposite of the word.

Input: quiet

Response: 

# %% [markdown]
# `--base` answers with the adapter switched off: the model as it was.

# %%
# %%qlora_generate --raw --greedy --base --max-new-tokens 24
Instruction: Give the opposite of the word.

Input: quiet

Response: 

# %% [markdown]
# ## 4. Save, load back, check
#
# `%qlora_save` writes the adapter in PEFT's own format (plain `PeftModel.from_pretrained` reads it), the
# tokenizer, and a record of the configs and metrics. `%qlora_load --adapter` restores the base model and the
# adapter from that folder, in this kernel or a fresh one.

# %%
# %qlora_save runs/word-forms-adapter

# %%
# %qlora_load --adapter runs/word-forms-adapter

# %%
reloaded = answers()
assert reloaded == after, (reloaded, after)
reloaded

# %%
# %qlora_memory

# %% [markdown]
# The training history is in the session, one row per logged step (eval rows carry `eval_loss`):

# %%
history = qlora_magic.get_session().history
evals = [r["eval_loss"] for r in history if "eval_loss" in r]
print(f"eval loss {evals[0]:.3f} -> {evals[-1]:.3f}")
pd.DataFrame([r for r in history if "loss" in r])[["step", "loss", "learning_rate", "grad_norm", "tokens_per_second"]].tail()
