# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. Saving, loading and sharing adapters
#
# *Course slide 7.* An adapter is small: only the LoRA matrices are saved, not the base model. `%qlora_save`
# writes a folder in PEFT's own format (`adapter_config.json` + `adapter_model.safetensors`) with the tokenizer
# and a record of how it was made (`qlora_magic.json`: load settings, training settings, the loss history).
# `%qlora_load --adapter` restores the base model, quantized the same way, with the adapter on it.

# %%
import pandas as pd
import qlora_magic as qm

# %load_ext qlora_magic

PROMPT = "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
QUESTION = PROMPT.format(instruction="Give the plural of the word.", context="bird")

# %%
qm.load()
qm.train(qm.examples.path("word_forms"), prompt=PROMPT, response="{response}",
         max_steps=12, batch_size=4, grad_accum=1, lr=1e-3, display="none")
trained_answer = qm.generate(QUESTION, raw=True, greedy=True, max_new_tokens=24, stream=False)
trained_answer

# %%
# %qlora_save runs/course-adapter

# %%
from pathlib import Path

folder = Path("runs/course-adapter")
pd.DataFrame([(f.name, round(f.stat().st_size / 1e6, 3)) for f in sorted(folder.iterdir())],
             columns=["file", "MB"])

# %% [markdown]
# The adapter weights are under 2 MB, against 538 MB for the fp32 base model. The run record says how it
# was made:

# %%
import json

record = json.loads((folder / "qlora_magic.json").read_text())
print(json.dumps({k: record[k] for k in ("load_config", "train_configs")}, indent=1)[:900])

# %% [markdown]
# ### Load it back
#
# `reset_session()` forgets the model, as a new kernel would. `%qlora_load --adapter` reads the base model's name
# and the bits from the folder, loads the base quantized the same way and puts the adapter on it. The answer is
# the same:

# %%
qm.reset_session()
# %qlora_load --adapter runs/course-adapter

# %%
reloaded_answer = qm.generate(QUESTION, raw=True, greedy=True, max_new_tokens=24, stream=False)
assert reloaded_answer == trained_answer, (reloaded_answer, trained_answer)
reloaded_answer

# %% [markdown]
# ### Plain PEFT can read it too
#
# The folder is a standard PEFT adapter, so the slide's code loads it without qlora_magic (with transformers 5
# the 8-bit setting goes through `BitsAndBytesConfig`):

# %%
import torch
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
tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

# %% [markdown]
# ### Sharing
#
# - Share the folder (it is small), or push it to the Hugging Face Hub: `qm.get_session().model.push_to_hub("you/name")`
#   and `tokenizer.push_to_hub(...)` after `huggingface_hub.login()`. Others load it with
#   `%qlora_load --adapter you/name` or plain PEFT as above.
# - `base_model_name_or_path` in `adapter_config.json` names the base model. For the embedded default it is a
#   local cache folder; for a Hub model it is the Hub id, which is what makes the adapter portable.
# - To ship a model without PEFT, merge the adapter into the base weights (`%qlora_merge`, see the reference).
