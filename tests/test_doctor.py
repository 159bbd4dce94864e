"""%qlora_doctor / qm.doctor(): the environment checked on this machine (CPU, no GPU), and with the failures it
looks for simulated: ipywidgets missing or out of step with the frontend's widget manager, Colab, VS Code, a
bitsandbytes that does not run here, too little memory, a tracker that would ask for a login."""

import os
import sys
import time
import types

import pytest

import qlora_magic as qm
from qlora_magic.tasks import doctor

TOPICS = ["frontend", "ipywidgets", "live display", "torch", "bitsandbytes", "memory", "merge and export", "Hub", "trackers"]


def versions(monkeypatch, **given):
    """package_version answers from `given` (None: not installed) for those names, the truth for the rest."""
    real = doctor.package_version
    monkeypatch.setattr(doctor, "package_version", lambda name: given[name] if name in given else real(name))


def test_doctor_on_this_machine_reads_only_and_takes_seconds(ip, capsys):
    import bitsandbytes  # noqa: F401  (its import sets TORCHINDUCTOR_CACHE_DIR: the library's doing, not the doctor's)

    environ, session = dict(os.environ), qm.get_session()
    started = time.perf_counter()
    report = qm.doctor()
    assert time.perf_counter() - started < 30  # torch and bitsandbytes imported on 2 busy cores included
    assert [f.topic for f in report.findings] == TOPICS
    assert dict(os.environ) == environ and qm.get_session() is session and session.model is None
    import torch

    if not torch.cuda.is_available():
        assert report["torch"].level == "warning" and "(CPU build): no GPU" in report["torch"].found
        assert report["bitsandbytes"].level == "ok" and report["bitsandbytes"].found.endswith("runs on cpu")
        assert report["memory"].level == "ok" and "RAM (the CPU trains in it)" in report["memory"].found
        assert "SmolLM2-135M-Instruct needs 4-bit about" in report["memory"].found
    assert report["Hub"].found.startswith("offline (HF_HUB_OFFLINE)")  # the tests' setting; no request was made
    assert report["live display"].found.startswith("text")  # not in a kernel here
    text = repr(report)
    assert text.startswith("qlora_magic doctor: ") and all(topic in text for topic in TOPICS)
    page = report._repr_html_()
    assert page.count("<tr class='qlora-finding") == len(TOPICS)
    ip.run_line_magic("qlora_doctor", "")
    assert "qlora_magic doctor:" in capsys.readouterr().out


def test_missing_ipywidgets_in_a_notebook_is_a_warning_with_the_fix(monkeypatch):
    versions(monkeypatch, ipywidgets=None)
    found = {f.topic: f for f in doctor.widget_findings("jupyter")}
    assert found["ipywidgets"].level == "warning" and "IProgress not found" in found["ipywidgets"].found
    assert found["ipywidgets"].fix == "pip install ipywidgets, then restart the kernel"
    assert {f.level for f in doctor.widget_findings("python")} == {"ok"}  # a script needs none


def test_widget_manager_of_another_major_version_is_a_problem(monkeypatch):
    versions(monkeypatch, ipywidgets="8.1.5", jupyterlab_widgets="1.1.7", widgetsnbextension="4.0.13")
    widgets = {f.topic: f for f in doctor.widget_findings("jupyter")}["ipywidgets"]
    assert widgets.level == "problem" and "jupyterlab_widgets 1.1.7" in widgets.found and "Error displaying widget" in widgets.found
    assert widgets.fix.startswith("pip install 'ipywidgets==8.*' 'jupyterlab_widgets==3.*' 'widgetsnbextension==4.*'")
    versions(monkeypatch, ipywidgets="7.8.1", jupyterlab_widgets="1.1.7", widgetsnbextension="3.6.6")
    assert {f.topic: f for f in doctor.widget_findings("jupyter")}["ipywidgets"].level == "ok"
    versions(monkeypatch, ipywidgets="8.1.5", jupyterlab_widgets=None, widgetsnbextension=None)
    assert {f.topic: f for f in doctor.widget_findings("jupyter")}["ipywidgets"].level == "warning"


def test_the_live_display_in_a_kernel_says_its_fallback(monkeypatch):
    import qlora_magic.display as display

    monkeypatch.setattr(display, "in_notebook", lambda: True)
    assert doctor.display_finding("jupyter").found.endswith("; --display widget for widgets")
    versions(monkeypatch, ipywidgets=None)
    found = doctor.display_finding("jupyter")
    assert found.found.startswith("HTML refreshed in place") and found.found.endswith("need ipywidgets")


def test_colab_and_vscode_are_recognised(monkeypatch):
    for name in doctor.VSCODE_VARS:
        monkeypatch.delenv(name, raising=False)
    assert doctor.frontend() == "python"
    monkeypatch.setenv("VSCODE_PID", "123")
    assert doctor.frontend() == "vscode"
    assert "VS Code renders widgets" in doctor.widget_findings("vscode")[1].found
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert doctor.frontend() == "colab"
    colab = doctor.widget_findings("colab")[1]
    assert "custom widget manager" in colab.found and "enable_custom_widget_manager()" in colab.fix


def test_a_bitsandbytes_that_fails_here_is_a_problem(monkeypatch):
    from bitsandbytes import functional

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA Setup failed despite GPU being available.\nmore lines")

    monkeypatch.setattr(functional, "quantize_4bit", broken)
    found = doctor.bitsandbytes_check("cpu")
    assert found.level == "problem" and found.found.endswith("fails on cpu: CUDA Setup failed despite GPU being available.")
    assert found.fix.startswith("pip install -U bitsandbytes (for torch ")
    versions(monkeypatch, bitsandbytes=None)
    assert doctor.bitsandbytes_check("cpu").fix == "pip install -U bitsandbytes"


def test_a_model_that_does_not_fit_is_a_problem_and_one_that_fits_in_4_bit_a_warning(monkeypatch, tiny_model_dir):
    import psutil

    weights = doctor.model_weights(qm.get_session(), tiny_model_dir)
    need_4, need_8 = (int(doctor.weights_bytes(weights, b) * doctor.TRAINING_MARGIN) for b in (4, 8))
    memory = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory._replace(available=(need_4 + need_8) // 2))
    found = doctor.memory_check(qm.get_session(), "cpu", weights)
    assert found.level == "warning" and found.fix == "load it with --bits 4"
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory._replace(available=need_4 // 2))
    assert doctor.memory_check(qm.get_session(), "cpu", weights).level == "problem"
    assert doctor.merge_room_check(weights).level == "warning"  # the 16-bit copy does not fit in that RAM either
    missing = doctor.memory_check(qm.get_session(), "cpu", doctor.model_weights(qm.get_session(), "no-org/not-cached-xyz"))
    assert missing.level == "warning" and "size is unknown offline" in missing.found


def test_the_loaded_model_is_sized_as_loaded(tiny_loaded):
    report = qm.doctor()
    assert report["memory"].level == "ok" and "is loaded (8-bit)" in report["memory"].found


def test_wandb_without_a_login_would_prompt(monkeypatch, tmp_path):
    versions(monkeypatch, wandb="0.19.1")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    found = doctor.tracker_check()
    assert found.level == "warning" and "login prompt" in found.found and "WANDB_MODE=offline" in found.fix
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert doctor.tracker_check().level == "ok"


def test_bad_arguments_are_one_line(ip):
    from IPython.core.error import UsageError

    from qlora_magic.errors import ConfigError

    with pytest.raises(ConfigError, match="bits must be 4 or 8"):
        qm.doctor(bits=16)
    with pytest.raises(UsageError):
        ip.run_line_magic("qlora_doctor", "--bits 16")


def test_torch_rows_for_a_gpu_and_for_a_cuda_build_that_sees_none(monkeypatch):
    """The GPU branches, simulated on this CPU: a visible GPU is named with its driver; a CUDA build of torch that
    sees no GPU is a problem; GPU memory is what the model is sized against on a GPU."""
    import torch

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(doctor, "driver_version", lambda: "580.159.04")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    found, device = doctor.torch_check()
    assert device == "cpu" and found.level == "problem" and "built for CUDA 13.0 but sees no GPU" in found.found
    assert "driver (580.159.04)" in found.found and "nvidia-smi" in found.fix

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(name="NVIDIA H200"))
    found, device = doctor.torch_check()
    assert device == "cuda" and found.level == "ok" and found.found.endswith("CUDA 13.0, NVIDIA H200 x2, driver 580.159.04")

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(1e9), int(141e9)))
    weights = {"name": "an 8B model", "linear": 7_000_000_000, "other": 1_000_000_000, "loaded": False}
    memory = doctor.memory_check(qm.get_session(), "cuda", weights)
    assert memory.level == "problem" and "GPU memory: 1.00 GB free of 141.00 GB" in memory.found
    assert memory.fix.startswith("spread it over the 2 GPUs (the several GPUs row), or free memory")


def test_several_gpus_say_how_to_use_them_and_what_stops_them(monkeypatch):
    """Two GPUs (simulated): --gpus with NCCL's version; a model too big for one GPU gets the spread-then-fsdp
    way; a torch without NCCL is a warning; one GPU or the CPU has no row."""
    import torch
    import torch.distributed as dist

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(total_memory=int(48e9)))
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 27, 7))
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    small = {"name": "an 8B model", "linear": 7_000_000_000, "other": 1_000_000_000, "loaded": False}
    found = doctor.gpus_check("cuda", small)
    assert found.level == "ok" and found.found == "2 GPUs (NCCL 2.27.7): %%qlora_train --gpus 2 trains on all of them"
    big = {"name": "a 70B model", "linear": 68_000_000_000, "other": 2_000_000_000, "loaded": False}
    found = doctor.gpus_check("cuda", big)
    assert "a 70B model in 4-bit does not fit one of them (48.00 GB)" in found.found and "--device-map auto" in found.found
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    found = doctor.gpus_check("cuda", small)
    assert found.level == "warning" and "no NCCL" in found.found and "WSL" in found.fix
    assert doctor.gpus_check("cpu", small) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert doctor.gpus_check("cuda", small) is None


def test_the_doctors_bitsandbytes_probe_prints_no_hub_kernel_notice():
    """bitsandbytes' CPU backend logs that it could not fetch an optional kernel from the Hub when first imported;
    the doctor (often a kernel's first verb) silences it as %qlora_load does. A fresh process: the import is once."""
    import subprocess
    import sys

    code = "from qlora_magic.tasks.doctor import bitsandbytes_check; print(bitsandbytes_check('cpu').level)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "ok", done.stderr
    assert "kernels-community" not in done.stdout + done.stderr
