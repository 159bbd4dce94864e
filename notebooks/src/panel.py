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
# settings (with the adapter or the base model), **Save** the adapter or **Export** the merged model (a GGUF file
# for llama.cpp and Ollama, or a folder for vLLM); the **Memory** bars below refresh after every action. Every
# control calls the same Python API as the magics (`qlora_magic.load`, `.train`, `.generate`, `.save`, `.export`,
# `.memory`).
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
p.eval_split.value = 8                        # 8 rows held out: the loss on them, and the export's check below
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
# **Export**, under the adapter's Save on the same tab, merges the adapter into the original 16-bit weights for a
# server: here a GGUF file with an Ollama Modelfile beside it (`ollama create word-forms -f
# runs/panel-export/Modelfile`); "merged safetensors" writes a folder for vLLM instead. It then checks the file
# against the adapter (greedy answers and perplexity on the held-out rows) and shows the report. The adapter was
# trained on the 8-bit base and the file holds the 16-bit one, so a greedy answer can come out otherwise; the
# perplexity drift says how far apart the two are (the report calls a match: every answer the same, drift <= 5%).

# %%
import shutil

shutil.rmtree("runs/panel-export", ignore_errors=True)  # an export never writes into a folder that holds files
p.export_path.value = "runs/panel-export"
p.export_ollama.value = True
p.export_button.click()
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
