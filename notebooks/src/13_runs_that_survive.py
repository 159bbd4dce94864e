# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 13. Runs that survive
#
# *Beyond the slides.* The slides' `Trainer` keeps everything in the kernel: when Colab drops the runtime, the
# kernel dies (out of memory, a crash) or the laptop sleeps, the run is gone, and when the browser tab closes the
# live chart stops. With qlora_magic every run has a **run folder** with its settings, its history (written as it
# is logged) and a **checkpoint** (written every few minutes, after each evaluation and at the end), so a run can
# be carried on in a new kernel; and a run can train **in the background** while you go on working, its chart
# re-attached in any later cell.

# %%
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import qlora_magic as qm

# %load_ext qlora_magic

word_forms = qm.examples.path("word_forms")
runs = Path("runs/survive")

# %% [markdown]
# ## A kernel killed mid-run
#
# To show a real crash without killing this notebook, the run goes to a second Python process, which is then
# killed (`SIGKILL`: no chance to save anything) after its checkpoint at step 4 (an evaluation) and before the
# next one. The run writes to `runs/survive/`.

# %%
script = f"""
import qlora_magic as qm
qm.load()
qm.train({str(word_forms)!r}, prompt="Instruction: {{instruction}}\\n\\nInput: {{context}}\\n\\nResponse: ",
         response="{{response}}", max_steps=12, batch_size=4, grad_accum=1, lr=1e-3, eval_split=10, eval_steps=4,
         output_dir={str(runs)!r}, name="killed", display="none")
"""
worker = subprocess.Popen([sys.executable, "-c", script])


def steps_logged():
    rows = [json.loads(line) for history in runs.glob("*-killed/history.jsonl")
            for line in history.read_text().splitlines() if line.endswith("}")]
    return max((row["step"] for row in rows if "loss" in row), default=0)


while steps_logged() < 6:
    time.sleep(0.2)
os.kill(worker.pid, signal.SIGKILL)
worker.wait()
print("killed after step", steps_logged())

# %% [markdown]
# `%qlora_runs` lists the runs in a folder. The killed one says `crashed`: its record still says "running",
# but the process that wrote it is gone. Its history has every step it logged; its checkpoint is of step 4.

# %%
# %qlora_runs --output-dir runs/survive

# %% [markdown]
# ### Resume
#
# `%qlora_train --resume` (a line magic: no cell body needed) finds the newest run with a checkpoint, loads its
# base model with the same bits and the checkpoint's adapter, optimizer and learning-rate schedule, checks the
# data is the one the run started with, and goes on from step 4, data order and random state included. The
# chart starts with the steps before the kill; steps 5 and 6 are trained again.

# %%
# %qlora_train --resume --output-dir runs/survive

# %% [markdown]
# The resumed run's losses after step 4 are the ones the uninterrupted run would have had (same seed, same
# machine): `tests/test_resume.py` checks that step by step against a run never killed. The history has each
# step once:

# %%
history = qm.get_session().history
print([row["step"] for row in history if "loss" in row])

# %% [markdown]
# ## Training in the background
#
# `--background` starts the run and returns the cell at once. The kernel stays free: look at the data, write the
# next cells. `%qlora_attach` shows the run in any later cell: the whole history so far, then the live chart.
# After a page reload (or in another notebook on the same kernel) run it again to get the view back.
# While it trains, the model is the run's: a cell that needs it says so in one line.

# %%
# %%qlora_train --background --max-steps 40 --batch-size 4 --grad-accum 1 --lr 1e-3 --name background --output-dir runs/survive
data: $word_forms
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: "{response}"

# %% tags=["raises-exception"]
# %qlora_generate --greedy What is the plural of mouse?

# %%
time.sleep(15)  # a few steps later
# %qlora_attach

# %% [markdown]
# `%qlora_stop` stops the run at the next step boundary; the adapter keeps what it learned, and the run's
# checkpoint is written, so `--resume` could carry it on later.

# %%
# %qlora_stop

# %%
# %qlora_runs --output-dir runs/survive
