# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. LoRA settings and trainable parameters
#
# *Course slide 3.* LoRA leaves each targeted weight matrix **W** (d_out x d_in) frozen and learns a low-rank
# update **B A**, with A of shape r x d_in and B of shape d_out x r; the layer computes W x + (alpha / r) B A x.
# B starts at zero, so training starts from the base model exactly. The settings:
#
# - `--r`: the rank. Trainable parameters grow linearly with it.
# - `--alpha`: scales the update by alpha / r (so changing r does not change the update's size at the start).
# - `--targets`: which linear layers get an update; the default is the attention query and value projections
#   (`q_proj`, `v_proj`) as in the course; `all-linear` adds keys, outputs and the MLP.
# - `--dropout`: dropout on the LoRA input during training.

# %%
import pandas as pd
import qlora_magic as qm

# %load_ext qlora_magic

# %%
# %qlora_load --r 8 --alpha 32

# %% [markdown]
# The readout counts the trainable parameters: the slide's `print_trainable_parameters()` in a table. Here
# is one adapted layer, to see where the numbers come from:

# %%
model = qm.get_session().model
q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
v_proj = model.base_model.model.model.layers[0].self_attn.v_proj
print(q_proj.lora_A["default"], q_proj.lora_B["default"], sep="\n")
print(v_proj.lora_A["default"], v_proj.lora_B["default"], sep="\n")

# %% [markdown]
# Each targeted layer adds r x (d_in + d_out) parameters. SmolLM2-135M has 30 layers; `q_proj` maps 576 to
# 576 and `v_proj` 576 to 192 (grouped-query attention: 3 key/value heads for 9 query heads):

# %%
r, layers = 8, 30
by_hand = layers * r * ((576 + 576) + (576 + 192))
print(f"{by_hand:,} by hand, {qm.get_session().last_load_report.trainable_parameters:,} counted")

# %% [markdown]
# Now the settings side by side. Every load replaces the model in the session; the numbers come from the
# load readouts (each load takes a few seconds on the CPU):

# %%
rows = []
for r in (4, 8, 16, 64):
    for targets in (None, "all-linear"):
        report = qm.load(r=r, alpha=2 * r, targets=targets)
        rows.append({"r": r, "targets": targets or "q_proj, v_proj", "trainable": report.trainable_parameters,
                     "% of model": round(report.trainable_percent, 3),
                     "adapter size (MB, fp32)": round(report.trainable_parameters * 4 / 1e6, 2)})
settings = pd.DataFrame(rows)
settings

# %% [markdown]
# The adapter stays small next to the frozen base it shares. In a model this small, r=64 on every linear
# layer is 13% of the parameters; in a 7B Llama (hidden size 4096, 32 layers) the same setting is about 160M
# parameters, 2.4% of the model, because the count grows with the width while the model grows with its square.
# Rules of thumb from the QLoRA paper and practice:
#
# - Adapting **all linear layers** matters more than a large rank; r between 8 and 64 usually performs alike.
# - Keep alpha / r constant (here 2) when you change r, so the learning rate still fits.
# - Raise r when the task is far from what the model knows (a new format or language), not for small style
#   changes.
#
# Training quality for different ranks is compared in the tuning notebook; here we only count.

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 2.6))
for targets, group in settings.groupby("targets"):
    ax.plot(group["r"], group["trainable"] / 1e6, "o-", label=targets)
ax.set_xscale("log", base=2)
ax.set_xlabel("LoRA rank r")
ax.set_ylabel("trainable parameters (M)")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
