# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # qlora_magic on Colab: a quickstart
#
# Fine-tune a small Hub model with QLoRA on Colab's GPU: install, load it in 4-bit with LoRA adapters, train
# while the loss chart updates, generate, keep the run and the adapter on Google Drive, and export a merged
# model. Choose **Runtime > Change runtime type > T4 GPU** (or better) first.
#
# This notebook is not run by the test suite (it needs a GPU and the Hub); `notebooks/01_quickstart.ipynb` is
# the same story on the CPU, offline, and is.

# %% [markdown]
# ## 1. Install
#
# Colab's own CUDA torch is kept: do not install a CPU torch here. Replace the URL with where qlora_magic lives
# for you (a wheel from `python -m build` works too: upload it, then `%pip install qlora_magic-*.whl`).

# %%
# %pip install -q "qlora_magic @ git+https://github.com/<you>/qlora_magic"

# %%
# %load_ext qlora_magic
# %qlora_doctor

# %% [markdown]
# ## 2. Keep the runs on Drive
#
# A Colab runtime can be dropped; runs written to Drive survive it, and `%qlora_train --resume` carries one on.

# %%
from google.colab import drive

drive.mount("/content/drive")
RUNS = "/content/drive/MyDrive/qlora-runs"

# %% [markdown]
# ## 3. Load a small model from the Hub, on the GPU
#
# 4-bit NF4 with double quantization (the QLoRA paper's setting), LoRA r=16 on every linear layer.

# %%
# %qlora_load HuggingFaceTB/SmolLM2-360M-Instruct --bits 4 --r 16 --targets all-linear

# %%
# %qlora_generate --greedy --max-new-tokens 40 Give the plural of the word. mouse

# %% [markdown]
# ## 4. Train
#
# The shipped word-forms set (opposites, plurals, past tenses: 100 rows) as chat turns; a tenth held out for the eval curve.
# `--report-to tensorboard,mlflow` would also log the run to a local MLflow store on Drive.

# %%
import qlora_magic.examples

rows_path = qlora_magic.examples.path("word_forms")

# %%
# %%qlora_train --epochs 2 --lr 2e-4 --output-dir $RUNS --name word-forms
data: $rows_path
prompt: "{instruction}\n\n{context}"
response: "{response}"
chat: true
eval_split: 0.1

# %% [markdown]
# ## 5. Generate

# %%
# %qlora_generate --greedy --max-new-tokens 40 Give the plural of the word. mouse

# %% [markdown]
# ## 6. Save the adapter to Drive

# %%
# %qlora_save /content/drive/MyDrive/qlora-adapters/word-forms

# %% [markdown]
# ## 7. Export
#
# A merged 16-bit model (from the original weights, verified against the adapter), for vLLM or transformers.
# For llama.cpp, Ollama or LM Studio, `%qlora_export gguf` (where your version has it) writes a GGUF file and,
# with `--ollama`, a Modelfile.

# %%
# %qlora_merge /content/drive/MyDrive/qlora-merged/word-forms

# %%
# %qlora_export gguf /content/drive/MyDrive/qlora-gguf/word-forms.gguf --quant q8_0 --ollama
