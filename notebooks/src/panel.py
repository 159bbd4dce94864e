# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The qlora_magic panel
#
# One dashboard for the whole round trip, no magics to type: **Load** a quantized model with LoRA adapters,
# **Train** it while the progress bar, readouts and loss chart update, **Generate** with sliders for the sampling
# settings (with the adapter or the base model), **Save** the adapter; the **Memory** bars below refresh after
# every action. Every control calls the same Python API as the magics (`qlora_magic.load`, `.train`, `.generate`,
# `.save`, `.memory`).
#
# Training runs in a background thread, so the kernel stays free to receive your clicks: **Stop** ends the run
# after the step in flight and keeps the adapter as trained so far. Errors show as one red line in the panel.
# The Train tab is pre-filled with the shipped `word_forms` example, so you can just press Load, then Train.

# %%
import qlora_magic as qm

p = qm.panel()   # the same as %qlora_panel after %load_ext qlora_magic
p

# %% [markdown]
# The cells below press the buttons from Python (`button.click()` runs the same handler a mouse click does,
# and `p.wait()` waits for the background action), so this notebook also runs top to bottom unattended. In
# your own notebook, click instead.

# %%
p.load_button.click()
p.wait()
print(p.status_text)

# %%
p.tabs.selected_index = 1                     # the Train tab
p.max_steps.value, p.lr.value = 12, 1e-3      # a short run: enough to learn the answer format
p.batch_size.value, p.grad_accum.value = 4, 1
p.train_button.click()
p.wait()
print(p.status_text)

# %%
p.tabs.selected_index = 2                     # the Generate tab
p.gen_prompt.value = "Instruction: Give the opposite of the word.\n\nInput: tall\n\nResponse: "
p.raw.value, p.greedy.value, p.max_new_tokens.value = True, True, 24
p.generate_button.click()
p.wait()
print(qm.get_session().last_generation)

# %%
p.tabs.selected_index = 3                     # the Save tab
p.save_path.value = "runs/panel-adapter"
p.save_button.click()
p.wait()
print(p.status_text)

# %% [markdown]
# A mistake shows as one line in the panel, and the panel keeps working (here: a folder that is a file):

# %%
open("runs/not-a-folder", "w").close()
p.save_path.value = "runs/not-a-folder"
p.save_button.click()
p.wait()
print(p.status_text)

# %% [markdown]
# The training run is in the session like any other, so its summary (with the loss chart) can be shown in a
# cell too; `%%qlora_train --display widget` shows the same widget display without the panel.

# %%
p.tabs.selected_index = 1                     # back to the Train tab, to see the run
qm.get_session().last_train_summary
