"""Offline by default (engine/offline.py): a process without HF_HUB_OFFLINE and without network, simulated
by refusing every internet socket. A Hub id in the local cache loads with no connection, one that is not
costs one probe and one line; local models and data files make no connection at all."""

import json
import shutil
import socket

import pytest

import qlora_magic as qm
from qlora_magic.engine import offline
from qlora_magic.errors import DataError, ModelNotFoundError

SETTINGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "QLORA_MAGIC_ONLINE",
            "HF_UPDATE_DOWNLOAD_COUNTS", "HF_HUB_DISABLE_TELEMETRY")
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of the test's own."""
    from huggingface_hub import constants

    folder = tmp_path / "hub-cache"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    return folder


@pytest.fixture
def online_by_default(monkeypatch, hub_cache):
    """As a fresh process where nobody set HF_HUB_OFFLINE (tests run with it set: conftest.py)."""
    import datasets
    from huggingface_hub import constants

    for name in SETTINGS:
        monkeypatch.setenv(name, "")  # so that what the code under test sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    monkeypatch.setattr(offline, "_hub_answered", None)


@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup and internet connection is refused and recorded."""
    attempts = []
    real_connect = socket.socket.connect

    def lookup(host, *args, **kwargs):
        attempts.append(("lookup", host))
        raise socket.gaierror(socket.EAI_AGAIN, "no network in this test")

    def connect(self, address):
        if self.family not in (socket.AF_INET, socket.AF_INET6):
            return real_connect(self, address)
        attempts.append(("connect", address))
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def cache_model(hub_cache, repo_id, model_dir):
    """Put a model folder into the cache as huggingface_hub lays a download out."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_hub_id_not_in_the_cache_is_one_line_after_one_probe(tiny_loaded, online_by_default, no_network):
    from huggingface_hub import constants

    model, weights = tiny_loaded.model, lora_weights(tiny_loaded.model)
    for _ in range(2):  # the second load asks nobody: the process is offline now
        with pytest.raises(ModelNotFoundError) as info:
            qm.load("someone/not-cached")
        assert str(info.value) == (
            "'someone/not-cached' is not in the local Hugging Face cache and huggingface.co cannot be reached: download it "
            "where there is network (hf download someone/not-cached), or give a local model folder (or no name, for the "
            "embedded default model).")
    assert no_network == [("lookup", "huggingface.co")]
    assert constants.HF_HUB_OFFLINE is True
    session = qm.get_session()
    assert session.model is model and session.load_config.model == tiny_loaded.load_config.model
    assert all((p == weights[n]).all() for n, p in model.named_parameters() if p.requires_grad)


def test_a_hub_id_in_the_cache_loads_without_any_connection(tiny_model_dir, hub_cache, online_by_default, no_network, tmp_path):
    cache_model(hub_cache, "someone/tiny", tiny_model_dir)
    report = qm.load("someone/tiny", bits=8)
    assert no_network == []
    assert report.model_name == "someone/tiny" and qm.get_session().load_config.model == "someone/tiny"
    assert qm.generate("the sky", raw=True, greedy=True, max_new_tokens=2, stream=False) is not None
    saved = qm.save(tmp_path / "adapter")  # the run record names the Hub id, so the adapter loads back by it
    assert json.loads((saved / "qlora_magic.json").read_text())["load_config"]["model"] == "someone/tiny"
    assert no_network == []  # PEFT's base (adapter_config.json) is the cache folder: it checks no vocabulary online


def test_a_cached_config_without_weights_is_not_a_cached_model(tiny_model_dir, hub_cache, online_by_default, no_network):
    cache_model(hub_cache, "someone/tiny", tiny_model_dir)
    (hub_cache / "models--someone--tiny" / "snapshots" / SNAPSHOT / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="^'someone/tiny' is not in the local Hugging Face cache"):
        qm.load("someone/tiny")
    assert len(no_network) == 1 and qm.get_session().model is None


def test_with_hf_hub_offline_set_nobody_is_asked(hub_cache, no_network, monkeypatch):
    monkeypatch.setattr(offline, "_hub_answered", None)
    with pytest.raises(ModelNotFoundError, match="is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "):
        qm.load("someone/not-cached")
    assert no_network == []


def test_qlora_magic_online_skips_the_probe_and_the_cache(tiny_model_dir, hub_cache, online_by_default, no_network, monkeypatch):
    from qlora_magic.engine.loading import resolve_model

    cache_model(hub_cache, "someone/tiny", tiny_model_dir)
    monkeypatch.setenv("QLORA_MAGIC_ONLINE", "1")
    assert resolve_model("someone/tiny") == "someone/tiny"  # from_pretrained asks the Hub, as the libraries do
    assert offline.hub_reachable() and no_network == []


def test_the_probe_is_one_connection_remembered_for_the_process(online_by_default, monkeypatch):
    from huggingface_hub import constants

    knocks = []

    class Opened:
        def close(self):
            pass

    def create_connection(address, timeout):
        knocks.append((address, timeout))
        return Opened()

    monkeypatch.setattr(offline.socket, "create_connection", create_connection)
    assert offline.hub_reachable() and offline.hub_reachable()
    assert knocks == [(("huggingface.co", 443), offline.PROBE_TIMEOUT_S)]
    assert constants.HF_HUB_OFFLINE is False


def test_not_a_hub_id_is_one_line(tiny_loaded, online_by_default, no_network):
    with pytest.raises(ModelNotFoundError) as info:
        qm.load("my model")
    assert str(info.value) == ("'my model' is neither a model folder nor a Hub id: give an existing folder, or an id like "
                               "'HuggingFaceTB/SmolLM2-135M-Instruct'.")
    assert no_network == [] and qm.get_session().model is tiny_loaded.model


@pytest.mark.parametrize("bits", [8, 4])
def test_local_model_and_jsonl_training_make_no_connection(tiny_model_dir, rows, tmp_path, online_by_default, no_network, bits):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    qm.load(tiny_model_dir, bits=bits)
    qm.train("rows.jsonl", prompt="{question} ", response="{answer}", max_steps=1, batch_size=8, grad_accum=1, display="none")
    assert no_network == []  # datasets would count the load with a request to the Hub


def test_a_hub_dataset_offline_is_one_line_after_one_probe(tiny_loaded, online_by_default, no_network):
    for _ in range(2):
        with pytest.raises(DataError) as info:
            qm.train("someone/a-dataset", prompt="{q} ", response="{a}", max_steps=1, display="none")
        assert str(info.value) == ("Cannot load dataset 'someone/a-dataset': it is not in the local cache and huggingface.co "
                                   "cannot be reached (not a local file; Hub datasets need a connection).")
    assert no_network == [("lookup", "huggingface.co")]
    assert qm.get_session().train_configs == []


@pytest.mark.slow
def test_the_default_model_loads_and_trains_with_no_connection(rows, tmp_path, online_by_default, no_network):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    qm.load()
    qm.train("rows.jsonl", prompt="{question} ", response="{answer}", max_steps=1, batch_size=4, grad_accum=1, display="none")
    qm.generate("the sky is", greedy=True, max_new_tokens=2, stream=False)
    assert no_network == []
