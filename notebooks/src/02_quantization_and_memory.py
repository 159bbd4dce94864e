# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Quantization and memory
#
# *Course slide 2.* A model's weights are numbers; storing each in fewer bits shrinks the model. QLoRA keeps the
# base model **frozen and quantized** and trains small LoRA matrices on top, so the big part of the model costs
# a fraction of its full-precision memory.
#
# | `--bits` | what bitsandbytes stores | bytes per weight (quantized layers) |
# |---|---|---|
# | 16 | no quantization (fp16/bf16 on a GPU; fp32 on a CPU) | 2 (4 on a CPU) |
# | 8 (default) | LLM.int8: int8 weights, outlier features kept in 16-bit | 1 |
# | 4 | NF4 (4-bit NormalFloat) with double quantization: the paper's QLoRA | 0.5 + a little for the scales |
#
# The slide loads the model twice to compare sizes. Here every load already shows the quantized footprint next
# to the fp32 and fp16 size it replaces. We use the embedded SmolLM2-135M-Instruct so it runs on a CPU; the
# ratios are the same for a 7B model, only the numbers are bigger.

# %%
import pandas as pd
import qlora_magic as qm

# %load_ext qlora_magic

# %%
# %qlora_load --bits 8

# %% [markdown]
# Not every weight is quantized: the embeddings, the output head and the norms stay in full precision
# (quantizing them costs accuracy and saves little). That is why the 8-bit footprint is more than a quarter of
# fp32. A bigger model has relatively more of its weights in the quantized linear layers, so it shrinks more.
#
# The same load from Python returns the readout as an object, so we can put the three settings side by side:

# %%
reports = {bits: qm.load(bits=bits) for bits in (16, 8, 4)}

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
table

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 2.6))
names = ["fp32 (slide's baseline)", "fp16"] + list(table.columns)[1:]
sizes = [mb(reports[8].fp32_size), mb(reports[8].fp16_size), mb(reports[8].footprint), mb(reports[4].footprint)]
ax.barh(names, sizes, color=["#999", "#bbb", "#1f77b4", "#2ca02c"])
ax.set_xlabel("model memory (MB)")
ax.invert_yaxis()
fig.tight_layout()
plt.show()

# %% [markdown]
# ### What is in memory now
#
# `%qlora_memory` measures now: the model's footprint, and on a GPU the allocated, reserved, peak and total GPU
# memory; on a CPU the process's resident memory. *Allocated* is what tensors use; *reserved* is what PyTorch's
# caching allocator holds (what `nvidia-smi` shows); the gap is cache it will reuse.

# %%
# %qlora_memory

# %% [markdown]
# ### Exercises
#
# - Load with `--bits 4` and compare `%qlora_memory` with the 8-bit one.
# - On a GPU, load a 1-3B model from the Hub in each setting (`%qlora_load Qwen/Qwen2.5-1.5B-Instruct --bits 4`):
#   4-bit is the setting that lets a 7B model train on a 16 GB card.
# - Why do the embedding and the output head stay unquantized? (Hint: look at `model.get_input_embeddings()`.)
