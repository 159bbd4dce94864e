# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. Training and monitoring
#
# *Course slides 5 and 6.* The slide sets up `TrainingArguments` and a `Trainer`, and then, separately, a
# TensorBoard writer with a hand-written loop for loss, learning rate and gradient norm. `%%qlora_train` runs
# the Trainer with the options you give and the rest decided from the device, and shows everything while it
# runs: a progress bar with ETA, the train and eval loss chart, learning rate, gradient norm, tokens per second
# and memory. The same numbers go to TensorBoard files and to the session's history.

# %%
import pandas as pd
import qlora_magic as qm

# %load_ext qlora_magic

word_forms = qm.examples.path("word_forms")

# %%
# %qlora_load

# %% [markdown]
# 15 optimizer steps of 4 examples at a high learning rate (1e-3, fine for a small LoRA on a small model) are
# enough to teach the answer format. 10 rows are held out: the eval loss is measured before training, during it
# and at the end.

# %%
# %%qlora_train --max-steps 15 --batch-size 4 --grad-accum 1 --lr 1e-3
data: $word_forms
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: "{response}"
eval_split: 10

# %% [markdown]
# ### The history
#
# Every logged step is a row in `get_session().history`: `step`, `loss`, `learning_rate`, `grad_norm`,
# `tokens_per_second`, `epoch` and memory; evaluation rows carry `eval_loss`. Plot anything from it:

# %%
history = pd.DataFrame(qm.get_session().history)
train_rows = history[history["loss"].notna()]
train_rows[["step", "loss", "learning_rate", "grad_norm", "tokens_per_second"]].round(4).tail()

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 3, figsize=(8, 2.4))
for ax, key in zip(axes, ["learning_rate", "grad_norm", "tokens_per_second"]):
    ax.plot(train_rows["step"], train_rows[key], ".-")
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# How to read them: the learning rate warms up and decays linearly; the gradient norm should stay in the
# same range (spikes that grow mean the learning rate is too high); tokens/s is the speed, which on a shared CPU
# wobbles. When the eval loss turns up while the train loss keeps falling, the adapter starts to memorize.
#
# ### TensorBoard
#
# The run folder holds TensorBoard event files. In a notebook: `%load_ext tensorboard` and
# `%tensorboard --logdir runs`. They are plain files, so they can also be read directly:

# %%
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run_dir = qm.get_session().last_train_summary.run_dir   # runs/<date-time> unless --output-dir is given
events = EventAccumulator(f"{run_dir}/tensorboard")
events.Reload()
print(sorted(events.Tags()["scalars"]))
print("train/loss:", [round(e.value, 3) for e in events.Scalars("train/loss")][:5], "...")

# %% [markdown]
# ### Stopping a run
#
# Interrupt the kernel (the stop button) while a training cell runs: it stops after the step in flight and keeps
# what the adapter learned; the summary says `interrupted`. In the panel, the Stop button does the same. From
# code, give `train` a `StopFlag` and set it. Here a tiny custom reporter sets it after 3 steps, which also shows
# the event interface every display is built on (`start`, `step`, `log`, `end`):

# %%
from qlora_magic.display.reporters import Reporter
from qlora_magic.engine.stopping import StopFlag


class StopAfter(Reporter):
    def __init__(self, steps, flag):
        self.steps, self.flag = steps, flag

    def step(self, progress):
        print(f"step {progress['step']}/{progress['total_steps']}")
        if progress["step"] >= self.steps:
            self.flag.set()


flag = StopFlag()
summary = qm.train(word_forms, prompt="Instruction: {instruction}\n\nInput: {context}\n\nResponse: ",
                   response="{response}", max_steps=50, batch_size=4, grad_accum=1, lr=1e-3,
                   reporter=StopAfter(3, flag), stop=flag)
summary

# %% [markdown]
# The adapter now has 15 + 3 steps of training; the history has both runs (`run` 0 and 1).
#
# ### Exercises
#
# - Train with `--lr 2e-4` (the course's value) for the same steps and compare the curves.
# - Use `--eval-steps 2` for a finer eval curve (each evaluation costs time).
# - Try `--display text`, the display used in terminals and CI.
