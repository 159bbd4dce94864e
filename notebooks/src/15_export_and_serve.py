# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 15. Export and serve
#
# *Beyond the slides.* An adapter lives in the notebook that trained it; people serve models with llama.cpp,
# Ollama or LM Studio, which load one **GGUF** file. `%qlora_export gguf` merges the adapter into the original
# 16-bit weights (as `%qlora_merge` does), writes the GGUF file (with `--ollama`, a Modelfile beside it) and
# then **checks the file** against the adapter: the same greedy answers, the perplexity drift on held-out rows.
# And every run goes on record in the tracker your team uses: here MLflow, in a local store.

# %%
import shutil
from pathlib import Path

import qlora_magic as qm

# %load_ext qlora_magic

word_forms = qm.examples.path("word_forms")
runs = Path("runs/export")
shutil.rmtree(runs, ignore_errors=True)  # a fresh run folder, MLflow store and exports on every run of the notebook

# %% [markdown]
# ## A short run, on record in MLflow
#
# `--report-to tensorboard,mlflow` logs the run to TensorBoard (in its run folder) and to MLflow, through the
# Trainer's own integration. Nothing needs a server: the MLflow store is a sqlite file beside the run folders,
# `runs/export/mlflow.db` (`mlflow ui --backend-store-uri sqlite:///runs/export/mlflow.db` shows it).

# %%
# %qlora_load

# %%
# %%qlora_train --max-steps 8 --lr 2e-3 --batch-size 4 --grad-accum 1 --eval-steps 8 --display text --report-to tensorboard,mlflow --name served --output-dir runs/export
data: $word_forms
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: "{response}"
eval_split: 4

# %% [markdown]
# ## Export to GGUF, with an Ollama Modelfile
#
# Before anything is loaded, a preflight adds up the RAM and disk the export needs and refuses in one line when
# they are short. The merge then **streams** (the row **merge**): each tensor of the base is read from its
# safetensors file, the adapter's update added, and the tensor written to the file before the next is read, so
# RAM holds one tensor, not the model (a 7B export fits a Colab). The row **tokenizer** names the pre-tokenizer
# llama.cpp and Ollama will split text prompts with (`smollm` here: the same split as transformers).
#
# The check that follows answers the held-out rows of the last run with the adapter and with
# the exported file; the row **checked by** says which runtime read the file. With `llama-cpp-python`
# installed it is llama.cpp itself, as when this copy of the notebook ran (`%pip install llama-cpp-python`: it
# builds llama.cpp from source where no wheel serves, about 20 minutes on 2 CPU cores); without it the file's
# tensors are read back with `gguf`'s reader into the merged model, which then answers.

# %%
f16 = qm.export("gguf", runs / "f16", ollama=True, max_new_tokens=12)   # %qlora_export gguf runs/export/f16 --ollama
f16

# %% [markdown]
# The adapter's answers beside the exported file's:

# %%
import pandas as pd

pd.DataFrame({"prompt": [" ".join(p.split())[-45:] for p in f16.prompts], "adapter": f16.adapter_answers,
              "export (f16)": f16.merged_answers})

# %% [markdown]
# The Modelfile Ollama builds the model from: the file, the chat template in Ollama's Go template language, the
# default system text, and the stop tokens. `ollama create word-forms -f runs/export/f16/Modelfile` then
# `ollama run word-forms`.

# %%
print((runs / "f16" / "Modelfile").read_text())

# %% [markdown]
# ## A quantized export, and its honest drift
#
# `--quant q8_0` stores 8 bits per weight plus a scale per block of 32 (about half the f16 file); `q4_0`
# stores 4. The check measures what the rounding costs; it does not hide it: the perplexity drift is reported
# as it is, and an answer that flips is listed.

# %%
# %qlora_export gguf runs/export/q4 --quant q4_0 --max-new-tokens 12

# %% [markdown]
# ## The run in MLflow
#
# MLflow's own API on the local store: the run, its parameters and its metrics, which are the session's history.

# %%
import mlflow

client = mlflow.tracking.MlflowClient(f"sqlite:///{(runs / 'mlflow.db').resolve()}")
experiment = client.get_experiment_by_name("qlora_magic")
found = client.search_runs([experiment.experiment_id])
pd.DataFrame([{"run": r.info.run_name, "status": r.info.status, "loss": r.data.metrics.get("loss"),
               "eval_loss": r.data.metrics.get("eval_loss"), "learning_rate": r.data.params.get("learning_rate"),
               "max_steps": r.data.params.get("max_steps")} for r in found])

# %%
(run,) = found
logged = [(m.step, round(m.value, 6)) for m in client.get_metric_history(run.info.run_id, "loss")]
history = [(row["step"], round(row["loss"], 6)) for row in qm.get_session().history if row.get("loss") is not None]
print("MLflow's losses are the session's history:", sorted(logged) == history)
print(sorted(logged))
