import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import qlora_magic  # noqa: E402
from ipython_shell import close_shell  # noqa: E402
from tiny_model import build_tiny_model, build_tiny_t5, toy_rows  # noqa: E402


def pytest_collection_modifyitems(config, items):
    cuda = False
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        pass
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    return str(build_tiny_t5(tmp_path_factory.mktemp("tiny-t5")))


@pytest.fixture
def rows():
    return toy_rows()


@pytest.fixture(autouse=True)
def fresh_session(tmp_path, monkeypatch):
    """Every test starts with an empty session and runs in its own folder (runs/ land there)."""
    monkeypatch.chdir(tmp_path)
    qlora_magic.reset_session()
    yield
    qlora_magic.reset_session()


@pytest.fixture
def ip():
    """A real IPython shell with the extension loaded."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance(history_length=0, history_load_length=0)
    shell.history_manager.enabled = False
    shell.extension_manager.load_extension("qlora_magic")
    yield shell
    close_shell(shell)


@pytest.fixture
def one_process_group():
    """A torch.distributed group of this process alone (gloo) and its CPU mesh, for code that meets FSDP2's
    DTensors; destroyed after, so later Trainers do not take the test process for a distributed one."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.fixture
def tiny_loaded(tiny_model_dir):
    """The tiny model loaded 8-bit into the session."""
    qlora_magic.load(tiny_model_dir, bits=8)
    return qlora_magic.get_session()
