"""Training in worker processes through torch.distributed (`--processes N`: the gloo backend on the CPU, the same
code as `--gpus N`): two workers train what one process trains, step for step; Stop ends both; a killed worker
is one line and a resumable checkpoint; a two-"node" torchrun runs the same run folder.

The tiny Llama (tests/tiny_model.py) with LoRA dropout 0, so that the ranks' random numbers do not enter the
loss; three steps of an effective batch of 8."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import qlora_magic as qm
from qlora_magic.display.reporters import NullReporter
from qlora_magic.engine.run_folder import RunFolder
from qlora_magic.engine.speed import BatchLayout
from qlora_magic.engine.stopping import StopFlag
from qlora_magic.errors import ConfigError
from qlora_magic.tasks import multi_process

BODY = 'data: $rows\nprompt: "Q: {question}\\nA: "\nresponse: "{answer}"\nmax_length: 32\n'
TRAIN = dict(prompt="Q: {question}\nA: ", response="{answer}", max_length=32, batch_size=2, grad_accum=4,
             max_steps=3, display="none")


@pytest.fixture
def tiny_no_dropout(tiny_model_dir):
    qm.load(tiny_model_dir, bits=8, dropout=0.0)
    return qm.get_session()


def losses(rows):
    return [row["loss"] for row in rows if "loss" in row]


def lora_weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def test_two_workers_train_what_one_process_trains(ip, tiny_no_dropout, rows):
    ip.user_ns["rows"] = rows[:32]
    ip.run_cell_magic("qlora_train", "--processes 2 --max-steps 3 --batch-size 2 --grad-accum 4 --display none", BODY)
    session = qm.get_session()
    summary = session.last_train_summary
    assert summary.status == "completed" and summary.steps_done == 3
    assert summary.settings["ranks"] == "2" and summary.settings["strategy"] == "ddp"
    assert summary.settings["batch"] == "2x2"  # each rank half the accumulation: the effective batch kept
    folder = RunFolder(summary.run_dir)
    workers = losses(folder.history())
    assert len(workers) == 3
    # The trained adapter is the session's, and the run is recorded as an in-kernel run is.
    assert len(session.runs) == 1 and losses(session.history) == workers
    trained = lora_weights(session.model)
    final = qm.load(adapter=str(folder.latest_checkpoint()))
    assert final is not None
    for name, weight in lora_weights(qm.get_session().model).items():
        assert (weight - trained[name]).abs().max() < 1e-6, name
    # One process, from the same start adapter, same effective batch and seed: the same loss at every step.
    qm.load(adapter=str(folder.path / multi_process.START_ADAPTER))
    single = qm.train(rows[:32], **TRAIN)
    assert single.settings["batch"] == BatchLayout(2, 4)
    assert losses(single.history) == pytest.approx(workers, rel=1e-4, abs=1e-5)


class ModelSeen(NullReporter):
    """Records, at every logged row, whether the session had a model while the workers trained."""

    def __init__(self):
        self.models = []

    def log(self, row, progress, history):
        self.models.append(qm.get_session().model)


def test_unload_frees_the_sessions_model_while_the_workers_train_and_brings_it_back_trained(tiny_no_dropout, rows):
    session = qm.get_session()
    load_config, old_model = session.load_config, session.model
    seen = ModelSeen()
    summary = qm.train(rows[:32], **TRAIN, processes=2, unload=True, reporter=seen)
    assert summary.status == "completed" and seen.models and all(model is None for model in seen.models)
    session = qm.get_session()
    assert session.model is not None and session.model is not old_model and session.load_config is load_config
    assert len(session.runs) == 1 and losses(session.history) == losses(RunFolder(summary.run_dir).history())
    trained = lora_weights(session.model)
    qm.load(adapter=str(RunFolder(summary.run_dir).latest_checkpoint()))
    for name, weight in lora_weights(qm.get_session().model).items():
        assert (weight - trained[name]).abs().max() < 1e-6, name


class InterruptAt(NullReporter):
    """A Ctrl-C (KeyboardInterrupt in the cell's thread) once a row of `step` is logged; the launcher turns it into
    the run's StopFlag (the panel's Stop sets that flag directly)."""

    def __init__(self, step):
        self.at, self.done = step, False

    def log(self, row, progress, history):
        if not self.done and row.get("step", 0) >= self.at:
            self.done = True
            raise KeyboardInterrupt


def test_stop_ends_both_ranks(tiny_no_dropout, rows):
    stop = StopFlag()
    summary = qm.train(rows, **{**TRAIN, "max_steps": 40}, processes=2, stop=stop, reporter=InterruptAt(1))
    assert stop
    assert summary.status == "interrupted" and 1 <= summary.steps_done < 40
    folder = RunFolder(summary.run_dir)
    assert folder.status() == "interrupted"
    assert folder.latest_checkpoint().name == f"step-{summary.steps_done:06d}"
    log = (folder.path / multi_process.LOG_FILE).read_text()
    assert "Traceback" not in log  # both ranks left the loop at the same step, none waited in a collective


class KillWorkerAt(NullReporter):
    """SIGKILLs worker rank 1 once a row of `step` is logged and the run folder holds a checkpoint (on a busy
    machine the checkpoint of a step can land after the next step's row)."""

    def __init__(self, step):
        self.at, self.killed, self.folder = step, None, None

    def start(self, info):
        self.folder = RunFolder(info["run_dir"])

    def log(self, row, progress, history):
        if self.killed is None and row.get("step", 0) >= self.at and self.folder.latest_checkpoint() is not None:
            for child in psutil.Process().children(recursive=True):
                with_rank = child.environ().get("RANK") if child.is_running() else None
                if with_rank == "1" and "qlora_magic.run" in " ".join(child.cmdline()):
                    child.send_signal(signal.SIGKILL)
                    self.killed = child.pid


def test_a_killed_worker_is_one_line_and_the_run_resumes(tiny_no_dropout, rows):
    reporter = KillWorkerAt(2)
    before = lora_weights(tiny_no_dropout.model)
    with pytest.raises(multi_process.WorkerError) as failed:
        # checkpoint_minutes 0.001: a checkpoint at every step, so one is there when the worker dies
        qm.train(rows, **{**TRAIN, "max_steps": 40}, processes=2, checkpoint_minutes=0.001, reporter=reporter, unload=True)
    assert reporter.killed is not None
    # --unload: the session's model is back, as it was before the run (the failed run's weights did not go in)
    back = lora_weights(qm.get_session().model)
    assert back.keys() == before.keys() and all((back[n] - before[n]).abs().max() == 0 for n in before)
    message = str(failed.value)
    assert "\n" not in message and "workers.log" in message and "--resume" in message
    folder = RunFolder(message.rsplit("see ", 1)[1].rsplit("/", 1)[0])
    assert folder.status() == "failed" and folder.latest_checkpoint() is not None
    qm.reset_session()
    summary = qm.train(resume=str(folder.path), display="none", checkpoint_minutes=0)
    assert summary.status == "completed"
    steps = [row["step"] for row in folder.history() if "loss" in row]
    assert steps == list(range(1, 41))  # no step lost, none logged twice
    assert qm.get_session().model is not None and len(qm.get_session().runs) == 1


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_run_the_same_run_folder(tiny_no_dropout, rows):
    """Two torchrun launchers (--nnodes 2, one worker each, rendezvous on localhost), as two machines would."""
    config = qm.config.TrainConfig(data=rows[:32], **TRAIN, processes=2)
    written = multi_process.write_workers_run(qm.get_session(), config)
    port = _free_port()
    env = multi_process.worker_environment(written.launch)
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test", "-m", "qlora_magic.run",
         str(written.folder.path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
    outputs = [node.communicate(timeout=300)[0].decode(errors="replace") for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    folder = written.folder
    assert folder.status() == "completed" and folder.record["steps_done"] == 3
    workers = losses(folder.history())
    qm.load(adapter=str(folder.path / multi_process.START_ADAPTER))
    single = qm.train(rows[:32], **TRAIN)
    assert losses(single.history) == pytest.approx(workers, rel=1e-4, abs=1e-5)


def test_the_effective_batch_is_split_over_the_ranks():
    from qlora_magic.engine.distributed import per_rank_layout

    assert per_rank_layout(BatchLayout(4, 4), 2) == BatchLayout(4, 2)
    assert per_rank_layout(BatchLayout(4, 1), 2) == BatchLayout(2, 1)
    assert per_rank_layout(BatchLayout(2, 3), 6) == BatchLayout(1, 1)
    assert per_rank_layout(BatchLayout(4, 4), 1) == BatchLayout(4, 4)
    with pytest.raises(ConfigError, match="multiple of 3"):
        per_rank_layout(BatchLayout(4, 4), 3)


AGREE = """
import json, os, sys
from qlora_magic.engine.distributed import agreed_memory
rank = int(os.environ["RANK"])
budget, host, in_use = [(8_000_000_000, 30_000_000_000, 3_000_000_000), (9_500_000_000, 20_000_000_000, 3_200_000_000)][rank]
print(json.dumps(agreed_memory(budget, host, in_use)), flush=True)
import torch.distributed as dist
dist.destroy_process_group()  # as qlora_magic.run does: gloo's threads left running abort the exit (status -6)
"""


def test_the_ranks_plan_with_the_smallest_budget_of_all():
    """Rank 0 shares its GPU with the notebook's kernel (less free memory): every rank plans with the smallest GPU
    and host budget and the largest memory in use, so all choose one layout (gloo on the CPU, as nccl on GPUs)."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    ranks = [subprocess.Popen([sys.executable, "-c", AGREE], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    agreed = [tuple(json.loads(out.strip().splitlines()[-1])) for out, _ in outputs]
    assert agreed == [(8_000_000_000, 20_000_000_000, 3_200_000_000)] * 2


def test_one_process_plans_with_its_own_memory():
    from qlora_magic.engine.distributed import agreed_memory

    assert agreed_memory(8, 30, 3) == (8, 30, 3)


def test_worker_command_and_environment():
    launch = multi_process.Launch("cpu", 2)
    command = multi_process.worker_command(RunFolder("runs/x"), launch)
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"] and command[-3:] == ["-m", "qlora_magic.run", "runs/x"]
    assert "--nproc-per-node=2" in command
    assert multi_process.worker_environment(launch)["CUDA_VISIBLE_DEVICES"] == ""
    gpu_env = multi_process.worker_environment(multi_process.Launch("cuda", 2))
    assert gpu_env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")  # all the kernel sees
    assert multi_process.worker_environment(multi_process.Launch("cuda", 2, visible="0,1"))["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert gpu_env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(qm.__file__).resolve().parents[1])


def test_refusals_come_before_anything_is_written(tiny_no_dropout, rows, tmp_path):
    qm.add_adapter("second")
    with pytest.raises(ConfigError, match="one adapter"):
        qm.train(rows, **TRAIN, processes=2)
    qm.delete_adapter("second")
    with pytest.raises(ConfigError, match="multiple of 3"):
        qm.train(rows, **TRAIN, processes=3)
    assert not (tmp_path / "runs").exists()


# --- The strategy chosen from the per-rank memory plan (a fake GPU size: the plan is pure arithmetic) ---

def _smallest_estimates(model, lengths, monkeypatch):
    """The smallest layout's per-rank estimate over 2 ranks, whole and sharded (a budget of 1 byte: nothing
    fits, so the plan is the smallest layout)."""
    from qlora_magic.engine import strategy

    monkeypatch.setattr(strategy, "host_budget", lambda: 2**40)  # the CPU memory free now must not move the plan
    whole = strategy.rank_plan(model, int(model.get_memory_footprint()), lengths, 8, 1, 2, sharded=False).estimate
    sharded = strategy.rank_plan(model, int(model.get_memory_footprint()), lengths, 8, 1, 2, sharded=True).estimate
    return whole, sharded


def test_the_strategy_is_ddp_when_one_gpu_holds_the_model_fsdp_when_only_shards_fit(tiny_model_dir, monkeypatch):
    from qlora_magic.engine.strategy import choose_strategy

    qm.load(tiny_model_dir, bits=4, dropout=0.0)
    model, lengths = qm.get_session().model, [30] * 16
    whole, sharded = _smallest_estimates(model, lengths, monkeypatch)
    assert sharded < whole
    assert str(choose_strategy(model, lengths, 8, 80 * 2**30, 2)) == "ddp (auto: fits one GPU)"
    between = int((whole + sharded) / 2 / 0.9)  # a small budget leaves 10% headroom: only the sharded plan fits
    assert choose_strategy(model, lengths, 8, between, 2).strategy == "fsdp"
    with pytest.raises(ConfigError) as refused:
        choose_strategy(model, lengths, 8, int(sharded / 2), 2)
    message = str(refused.value)
    assert "\n" not in message and "does not fit" in message and "smallest GPU has" in message and "fsdp" in message
    with pytest.raises(ConfigError) as alone:  # one GPU: nothing to shard over
        choose_strategy(model, lengths, 8, between, 1)
    assert "fsdp" not in str(alone.value) and "--gpus 1: the model does not fit" in str(alone.value)
    qm.load(tiny_model_dir, bits=8, dropout=0.0)  # 8-bit weights keep scales beside the int8 data: no shards
    model = qm.get_session().model
    whole, sharded = _smallest_estimates(model, lengths, monkeypatch)
    with pytest.raises(ConfigError) as eight_bit:
        choose_strategy(model, lengths, 8, int((whole + sharded) / 2 / 0.9), 2)
    assert "load the model with --bits 4 (fsdp shards 4-bit weights only)" in str(eight_bit.value)


def test_the_gpu_the_kernel_holds_counts_only_its_free_memory_and_goes_last(monkeypatch):
    """The kernel's session keeps its own copy of the model on a GPU: workers use other GPUs first when there are
    more than they need; one that trains there plans with what is free, the others with their whole memory."""
    import types

    import torch

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 20 * gib if i == 0 else 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (58 * gib, 80 * gib) if i == 0 else (80 * gib, 80 * gib))
    assert multi_process.gpu_memory((0, 1)) == 58 * gib
    assert multi_process.gpu_memory((0, 1), "40GiB") == 40 * gib
    assert multi_process.gpu_memory((1,)) == 80 * gib
    assert multi_process.gpu_memory((0, 1), kernel_leaves=True) == 78 * gib  # --unload: the model's 20 GiB too
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    two = multi_process.plan_launch(qm.config.TrainConfig(gpus=2))  # the kernel's GPU 0 is left out
    assert two.gpus == (1, 2) and two.visible == "1,2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # ids as the kernel was given them
    assert multi_process.plan_launch(qm.config.TrainConfig(gpus=3)).visible == "5,6,7"
    assert multi_process.plan_launch(qm.config.TrainConfig(gpus=4)).gpus == (0, 1, 2, 3)  # all: the kernel's too
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 0)  # the session's model is on the CPU
    assert multi_process.gpu_memory((0, 1)) == 80 * gib
    assert multi_process.plan_launch(qm.config.TrainConfig(gpus=2)).visible == "4,5"  # the first ones again


def _two_fake_gpus(monkeypatch, memory):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(multi_process, "gpu_memory", lambda gpus, max_memory=None, kernel_leaves=False: memory)


def test_a_gpus_run_writes_the_chosen_strategy_or_is_refused_before_anything(tiny_no_dropout, rows, tmp_path, monkeypatch):
    config = qm.config.TrainConfig(data=rows[:32], **TRAIN, gpus=2)
    _two_fake_gpus(monkeypatch, 1000)
    with pytest.raises(ConfigError, match="does not fit"):
        multi_process.write_workers_run(qm.get_session(), config)
    assert not (tmp_path / "runs").exists()
    _two_fake_gpus(monkeypatch, 80 * 2**30)
    written = multi_process.write_workers_run(qm.get_session(), config)
    launch = written.folder.record["launch"]
    assert launch["strategy"] == "ddp" and launch["strategy_reason"] == "auto: fits one GPU"
    assert written.launch.shown({"strategy": "ddp"}) == {"strategy": "ddp (auto: fits one GPU)"}
    given = multi_process.write_workers_run(qm.get_session(), config.replace(strategy="ddp"))
    assert given.folder.record["launch"]["strategy"] == "ddp" and given.launch.shown({"strategy": "ddp"}) == {"strategy": "ddp"}


def test_a_run_that_fits_only_without_the_sessions_copy_unloads_it_by_itself(tiny_no_dropout, rows, tmp_path, monkeypatch):
    """No --unload, no --strategy: when neither strategy fits beside the kernel's copy of the model on GPU 0 but
    one fits once it leaves, the run unloads it (and says so in the strategy's reason) instead of being refused;
    when the kernel holds no GPU the workers use, or not even the whole GPU is enough, it is refused as before."""
    import torch

    config = qm.config.TrainConfig(data=rows[:32], **TRAIN, gpus=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(multi_process, "kernel_holds", lambda index: index == 0)
    asked = []

    def memory(gpus, max_memory=None, kernel_leaves=False):
        asked.append(kernel_leaves)
        return 80 * 2**30 if kernel_leaves else 1000

    monkeypatch.setattr(multi_process, "gpu_memory", memory)
    written = multi_process.write_workers_run(qm.get_session(), config)
    assert written.unload is True and asked == [False, True]
    reason = written.folder.record["launch"]["strategy_reason"]
    assert reason == "auto: fits one GPU, once the session's model leaves the GPU: unloaded meanwhile"
    assert written.launch.shown({"strategy": "ddp"})["strategy"] == f"ddp ({reason})"
    assert multi_process.write_workers_run(qm.get_session(), config.replace(unload=True)).unload is True
    monkeypatch.setattr(multi_process, "gpu_memory", lambda gpus, max_memory=None, kernel_leaves=False: 1000)
    with pytest.raises(ConfigError, match="does not fit") as refused:  # not even the whole GPU
        multi_process.write_workers_run(qm.get_session(), config)
    assert "\n" not in str(refused.value)
    monkeypatch.setattr(multi_process, "kernel_holds", lambda index: False)  # nothing of the kernel's to give
    monkeypatch.setattr(multi_process, "gpu_memory", memory)
    with pytest.raises(ConfigError, match="does not fit"):
        multi_process.write_workers_run(qm.get_session(), config)
    given = multi_process.write_workers_run(qm.get_session(), config.replace(strategy="ddp"))
    assert given.unload is False  # a strategy given: the user's plan, nothing chosen for it


class _Weights:
    """A model as worker_load sees it: its weight bytes."""

    def __init__(self, gib):
        self.bytes = int(gib * 2**30)

    def get_memory_footprint(self):
        return self.bytes


def test_fsdp_workers_load_into_cpu_memory_a_model_one_gpu_cannot_hold(monkeypatch):
    import types

    import psutil

    gib = 2**30
    monkeypatch.delenv(multi_process.HOST_LOAD, raising=False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=256 * gib))
    assert multi_process.worker_load(_Weights(20), 2, 80 * gib) == "gpu"  # a whole copy fits: load, then shard
    assert multi_process.worker_load(_Weights(37), 2, 40 * gib) == "host"  # a 70B on two 40 GB cards
    monkeypatch.setenv(multi_process.HOST_LOAD, "host")
    assert multi_process.worker_load(_Weights(20), 2, 80 * gib) == "host"  # forced (benchmarks, on one GPU)
    monkeypatch.delenv(multi_process.HOST_LOAD)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=60 * gib))
    with pytest.raises(ConfigError) as short:  # two copies of 37 GiB in RAM at once
        multi_process.worker_load(_Weights(37), 2, 40 * gib)
    message = str(short.value)
    assert "RAM" in message and "87.40 GB" in message and "64.42 GB" in message and "fewer GPUs" in message and "\n" not in message


def test_a_gpus_fsdp_run_records_where_its_workers_load(tiny_model_dir, rows, tmp_path, monkeypatch):
    qm.load(tiny_model_dir, bits=4, dropout=0.0)
    config = qm.config.TrainConfig(data=rows[:32], **TRAIN, gpus=2, strategy="fsdp")
    _two_fake_gpus(monkeypatch, 80 * 2**30)
    written = multi_process.write_workers_run(qm.get_session(), config)
    assert written.folder.record["launch"]["load"] == "gpu"
    qm.load(tiny_model_dir, bits=8, dropout=0.0, device="cpu")
    with pytest.raises(ConfigError) as eight_bit:  # bitsandbytes' 8-bit weights keep scales a shard would lose
        multi_process.write_workers_run(qm.get_session(), config)
    assert "--bits 4" in str(eight_bit.value) and "\n" not in str(eight_bit.value)
    assert len(list((tmp_path / "runs").iterdir())) == 1  # the refused run wrote nothing
    launch = multi_process.Launch("cuda", 2, "fsdp", reason="auto: fits only sharded over 2 GPUs", load="host")
    assert launch.shown({"strategy": "fsdp"})["strategy"] == (
        "fsdp (auto: fits only sharded over 2 GPUs; loaded in CPU memory, sharded onto the GPUs)")


def test_a_host_loaded_worker_trains_on_its_gpu_and_plans_only_its_shard(tiny_model_dir, monkeypatch):
    """A model an FSDP worker loaded into CPU memory trains on the GPU it was loaded for (not where its weights
    wait), and its memory plan counts the rank's shard: a 1/ranks share and one whole layer, never the copy."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_magic.engine.distributed import TRAINS_ON, fsdp_weights_change, training_device

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    weights, layers = int(model.get_memory_footprint()), model.config.num_hidden_layers
    assert training_device(model) == "cpu"
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert fsdp_weights_change(model) == 0  # the kernel: no shard to count
    monkeypatch.setenv("WORLD_SIZE", "4")
    share = weights // 4 + weights // layers
    assert fsdp_weights_change(model) == share - weights  # loaded whole onto the GPU: the copy goes
    setattr(model, TRAINS_ON, "cuda:1")
    assert training_device(model) == "cuda:1"
    assert fsdp_weights_change(model) == share  # loaded into CPU memory: only the shard comes


def test_weights_quantized_elsewhere_and_kept_in_cpu_memory_are_the_same_nf4(tiny_model_dir):
    """quantized_on_gpu's path (quantize there, bring the bytes and the quant state back) keeps the NF4 bytes
    and the state a direct load makes; here "there" is the CPU too, since this machine has no GPU."""
    import torch
    from bitsandbytes.nn import Params4bit
    from transformers import AutoModelForCausalLM

    from qlora_magic.engine.loading import quantization_config, quantized_on_gpu, stored_for_sharding

    def load():
        with stored_for_sharding():
            quantization = quantization_config(4, "cpu")
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization,
                                                    dtype=torch.float32, device_map={"": "cpu"})

    direct = load()
    original = Params4bit._quantize
    with quantized_on_gpu("cpu"):
        assert Params4bit._quantize is not original
        moved = load()
    assert Params4bit._quantize is original
    pairs = [(a, b) for a, b in zip(direct.modules(), moved.modules()) if type(a).__name__ == "Linear4bit"]
    assert pairs
    for a, b in pairs:
        assert b.weight.device.type == "cpu" and b.weight.dtype == torch.float32  # stored as the compute dtype
        assert torch.equal(a.weight.data.view(torch.uint8), b.weight.data.view(torch.uint8))  # packed NF4 bytes
        assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax)
        assert b.quant_state is b.weight.quant_state  # the module's copy, which FSDP's sharded weight reads


# --- A rank out of memory: every rank relaunched with the next back-off ---

# Imported by every worker (PYTHONPATH): rank 1's step OOM_STEP raises CUDA's out-of-memory error, on the first
# launch only (run.json's launch has no back-off yet), or on every launch with OOM_ALWAYS.
OUT_OF_MEMORY_HOOK = '''
import os
if os.environ.get("RANK") == "1" and os.environ.get("OOM_STEP"):
    import json, pathlib, sys
    import torch
    from transformers import Trainer

    training_step = Trainer.training_step

    def out_of_memory_once(self, *args, **kwargs):
        launch = json.loads((pathlib.Path(sys.argv[-1]) / "run.json").read_text())["launch"]
        if self.state.global_step + 1 == int(os.environ["OOM_STEP"]) and (os.environ.get("OOM_ALWAYS") or not launch.get("backoff")):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return training_step(self, *args, **kwargs)

    Trainer.training_step = out_of_memory_once
'''


class Notes(NullReporter):
    def __init__(self):
        self.notes = []

    def note(self, text):
        self.notes.append(text)


@pytest.fixture
def out_of_memory_in_rank_1(tmp_path_factory, monkeypatch):
    hooks = tmp_path_factory.mktemp("hooks")
    (hooks / "sitecustomize.py").write_text(OUT_OF_MEMORY_HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("OOM_STEP", "3")


def test_a_rank_out_of_memory_relaunches_every_rank_with_the_next_back_off(tiny_no_dropout, rows, out_of_memory_in_rank_1):
    reporter = Notes()
    summary = qm.train(rows[:48], **{**TRAIN, "max_steps": 5}, processes=2, checkpoint_minutes=1e-6, reporter=reporter)
    assert summary.status == "completed" and summary.steps_done == 5
    assert len(reporter.notes) == 1 and "step 3 on rank 1" in reporter.notes[0] and "relaunched from step 2" in reporter.notes[0]
    assert "micro-batch 1 x 4" in reporter.notes[0]  # per rank: 2x2 halved, the effective batch kept
    assert summary.settings["batch"] == "1x4" and "at step 3" in summary.settings["out_of_memory"]
    folder = RunFolder(summary.run_dir)
    assert folder.record["launch"]["backoff"]["batch"] == "1x8"
    steps = [row["step"] for row in folder.history() if "loss" in row]
    assert steps == [1, 2, 3, 4, 5]  # the history goes on from the checkpoint: no step lost, none twice
    assert losses(qm.get_session().history) == losses(folder.history())
    trained = lora_weights(qm.get_session().model)
    qm.load(adapter=str(folder.latest_checkpoint()))
    for name, weight in lora_weights(qm.get_session().model).items():
        assert (weight - trained[name]).abs().max() < 1e-6, name


def test_out_of_memory_at_the_smallest_layout_is_one_line(tiny_no_dropout, rows, out_of_memory_in_rank_1, monkeypatch):
    monkeypatch.setenv("OOM_ALWAYS", "1")
    monkeypatch.setenv("OOM_STEP", "1")
    reporter = Notes()
    with pytest.raises(qm.errors.OutOfMemory) as failed:
        qm.train(rows[:32], **TRAIN, processes=2, reporter=reporter)
    message = str(failed.value)
    assert "\n" not in message and "even with micro-batch 1 x 4 + gradient checkpointing" in message and "workers.log" in message
    assert len(reporter.notes) == 2  # 2x2 -> 1x4 -> checkpointing, then nothing smaller on the CPU
    folder = RunFolder(message.rsplit("see ", 1)[1].rsplit("/", 1)[0])
    assert folder.status() == "failed" and folder.record["error"].startswith("Training ran out of GPU memory")


def test_a_background_workers_run_trains_while_the_kernel_is_free_and_stops(tiny_no_dropout, rows):
    import time

    handle = qm.train(rows, **{**TRAIN, "max_steps": 40}, processes=2, background=True)
    assert handle.status == "running"  # returned once rank 0 began training: the cell is free
    while not any("loss" in row for row in handle.history) and handle.live.running:
        time.sleep(0.2)
    line = handle.stop()
    assert handle.status == "interrupted" and "Stopped" in line
    folder = RunFolder(handle.folder.path)
    assert folder.status() == "interrupted" and 1 <= folder.record["steps_done"] < 40
    session = qm.get_session()
    assert len(session.runs) == 1 and losses(session.history) == losses(folder.history())
    trained = lora_weights(session.model)
    qm.load(adapter=str(folder.latest_checkpoint()))
    for name, weight in lora_weights(qm.get_session().model).items():
        assert (weight - trained[name]).abs().max() < 1e-6, name
