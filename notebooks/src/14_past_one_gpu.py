# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 14. Past one GPU
#
# *Beyond the slides.* The slides train in the notebook's own process, on one device. `%%qlora_train --gpus 2`
# trains the same cell in two worker processes, one per GPU, through `torch.distributed` (DDP): the cell shows
# the same progress and chart, and the trained adapter comes back into the session. `--processes 2` does the same
# on the CPU (torch.distributed's gloo backend), which is what this notebook runs, so it works on any laptop.

# %%
import json
from pathlib import Path

import qlora_magic as qm

# %load_ext qlora_magic

word_forms = qm.examples.path("word_forms")

# %% [markdown]
# LoRA dropout 0 here, so that the workers' random numbers do not enter the loss and the runs below compare
# step for step.

# %%
# %qlora_load --dropout 0

# %% [markdown]
# ## Two workers
#
# The effective batch is 2 x 4 = 8 examples per step. Each of the two workers takes half of the accumulation
# (2 x 2), so every optimizer step still sees the same 8 examples; their LoRA gradients are averaged (all-reduced)
# before the step. The settings row says `ranks=2, strategy=ddp`.

# %%
# %%qlora_train --processes 2 --max-steps 4 --batch-size 2 --grad-accum 4 --name two-workers --output-dir runs/multi
data: $word_forms
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: "{response}"
max_length: 128

# %% [markdown]
# The run folder is a normal one, plus `start/` (the adapter the workers started from: the session's when the
# cell ran), a `launch` entry in `run.json`, and `workers.log`, what the workers printed. Only rank 0 writes the
# history and the checkpoints.

# %%
run = Path(qm.get_session().last_train_summary.run_dir)
print(sorted(p.name for p in run.iterdir()))
print(json.loads((run / "run.json").read_text())["launch"])
print((run / "workers.log").read_text().strip().splitlines()[-2:])

# %% [markdown]
# ## The same steps in one process
#
# From the same start adapter, with the same effective batch and seed, one process (in the kernel) computes the
# same loss at every step: two workers only share the work.

# %%
workers = [row["loss"] for row in qm.get_session().history if "loss" in row]
qm.load(adapter=str(run / "start"))

# %%
# %%qlora_train --max-steps 4 --batch-size 2 --grad-accum 4 --name one-process --output-dir runs/multi
data: $word_forms
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: "{response}"
max_length: 128

# %%
single = [row["loss"] for row in qm.get_session().history if "loss" in row]
for step, (a, b) in enumerate(zip(workers, single), 1):
    print(f"step {step}: two workers {a:.5f}   one process {b:.5f}")

# %% [markdown]
# ## On GPUs, and on a cluster
#
# On a machine with GPUs the option is `--gpus 2` (or `--gpus all`). The strategy is chosen from the memory plan:
# ddp when one GPU holds the model and its smallest batch layout, fsdp (the 4-bit weights sharded over the GPUs)
# when only a shard fits, one line with the numbers when neither does; the settings row says which and why
# (`strategy=ddp (auto: fits one GPU)`). A rank whose step runs out of memory has every rank relaunched from the
# last checkpoint with a smaller layout. `--unload` frees the session's own copy of the model while the workers
# train (its GPU memory goes to them) and loads it back, with the trained adapter, when they end. Asked for GPUs
# where there are none, the cell says so in one line:

# %% tags=["raises-exception"]
# %%qlora_train --gpus 2 --max-steps 4
data: $word_forms
prompt: "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "
response: "{response}"

# %% [markdown]
# The run folder holds all a worker needs, so on a cluster the same folder, on a shared disk, runs under
# `torchrun --nnodes 2 ... -m qlora_magic.run RUN_FOLDER` on each machine, and `%qlora_attach RUN_FOLDER` follows
# it from the notebook. The user guide's "Several GPUs and several machines" has a two-node example and a Slurm
# script.
