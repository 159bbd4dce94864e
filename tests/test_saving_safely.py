"""Adapters loaded safely and folders saved whole (issue 10): a bad adapter folder fails in one line and leaves
the session as it was; a save is the old folder or the new one, even when killed; a bad save path fails before
anything is written."""

import json
import os
import random
import re
import select
import shutil
import signal
import time
import warnings

import pytest
import torch

import qlora_magic as qm
from qlora_magic.engine.adapter_folder import OtherBaseWarning, read_adapter_folder
from qlora_magic.engine.folder_writing import STAGING
from qlora_magic.errors import AdapterError, ConfigError, QloraError
from tiny_model import build_tiny_model


def _state(model):
    """What a failed load must leave as it was: the adapters, the active one, every LoRA weight and its trainability."""
    weights = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters() if "lora_" in n}
    return list(model.peft_config), model.active_adapter, weights


def _same_state(model, before):
    names, active, weights = _state(model)
    assert (names, active) == before[:2]
    assert weights.keys() == before[2].keys()
    assert all(torch.equal(w, before[2][n][0]) and g == before[2][n][1] for n, (w, g) in weights.items())


def _one_line(error):
    assert isinstance(error, QloraError) and "\n" not in str(error)
    assert error._render_traceback_() == [f"{type(error).__name__}: {error}"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir):
    """A good adapter of the tiny model, one of a narrower model (another base), and a base of the same shapes
    with other weights."""
    root = tmp_path_factory.mktemp("adapters")
    qm.load(tiny_model_dir, bits=8)
    qm.save(root / "good")
    narrow = build_tiny_model(root / "narrow-base", hidden=32)
    qm.load(str(narrow), bits=8)
    qm.save(root / "narrow")
    qm.reset_session()
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    other.save_pretrained(root / "other-weights")
    for name in os.listdir(tiny_model_dir):
        if name.startswith(("tokenizer", "special", "chat")):
            shutil.copy(os.path.join(tiny_model_dir, name), root / "other-weights")
    return root


@pytest.fixture
def cpu_loaded(tiny_model_dir):
    """The tiny model on the CPU, for the tests that fork (a forked child cannot use its parent's CUDA)."""
    qm.load(tiny_model_dir, bits=8, device="cpu")
    return qm.get_session()


forks = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _broken(folders, tmp_path, how):
    """A copy of the good adapter, broken one way."""
    folder = tmp_path / "broken"
    shutil.copytree(folders / "good", folder)
    weights, config, record = folder / "adapter_model.safetensors", folder / "adapter_config.json", folder / "qlora_magic.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "header cut":
        weights.write_bytes(weights.read_bytes()[:50])
    elif how == "corrupt config":
        config.write_text(config.read_text()[:-30])
    elif how == "config a list":
        config.write_text("[1, 2]")
    elif how == "corrupt record":
        record.write_text("{\"load_config\": ")
    elif how == "bad record value":
        record.write_text(json.dumps({**json.loads(record.read_text()), "train_configs": [{"lr": "fast"}]}))
    elif how in ("r mismatch", "not lora", "another task"):
        settings = json.loads(config.read_text())
        settings.update({"r mismatch": {"r": 4}, "not lora": {"peft_type": "IA3"}, "another task": {"task_type": "SEQ_CLS"}}[how])
        config.write_text(json.dumps(settings))
    elif how == "missing weights":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        save_file({k: v for k, v in tensors.items() if "layers.1.self_attn.v_proj" not in k}, weights)
    elif how == "pickle only":
        from safetensors.torch import load_file

        torch.save(load_file(weights), folder / "adapter_model.bin")
        weights.unlink()
    elif how == "no weights":
        weights.unlink()
    return folder


BAD_FOLDERS = [
    ("truncated", AdapterError, "cut short or damaged; save the adapter again"),
    ("header cut", AdapterError, "cut short or damaged"),
    ("corrupt config", AdapterError, "adapter_config.json' cannot be read (Expecting"),
    ("config a list", AdapterError, "holds a JSON list, not an object"),
    ("corrupt record", ConfigError, "qlora_magic.json' cannot be read"),
    ("bad record value", ConfigError, "qlora_magic.json' cannot be read back"),
    ("r mismatch", AdapterError, "says r=4, but the weights have rank 8"),
    ("not lora", AdapterError, "holds a IA3 adapter, not LoRA"),
    ("another task", AdapterError, "was trained for seq-cls, not causal-lm"),
    ("missing weights", AdapterError, "has no weights for 2 of the layers adapter_config.json targets"),
    ("pickle only", AdapterError, "adapter_model.bin, a pickle"),
    ("no weights", AdapterError, "has no adapter_model.safetensors"),
]


@pytest.mark.parametrize("how, error, message", BAD_FOLDERS, ids=[case[0] for case in BAD_FOLDERS])
def test_a_bad_adapter_folder_is_one_line_and_adds_nothing(tiny_loaded, folders, tmp_path, how, error, message):
    model = tiny_loaded.model
    bad = _broken(folders, tmp_path, how)
    before = _state(model)
    with pytest.raises(error, match=re.escape(message)) as info:
        qm.load_adapter(bad, name="second")
    _one_line(info.value)
    _same_state(model, before)
    assert qm.load_adapter(folders / "good", name="second").names == ["default", "second"]  # the name is free


@pytest.mark.parametrize("how, error, message", BAD_FOLDERS, ids=[case[0] for case in BAD_FOLDERS])
def test_a_bad_adapter_folder_on_load_keeps_the_loaded_model(tiny_loaded, folders, tmp_path, how, error, message):
    bad = _broken(folders, tmp_path, how)
    with pytest.raises(error, match=re.escape(message)) as info:
        qm.load(tiny_loaded.load_config.model, adapter=str(bad))
    _one_line(info.value)
    assert qm.get_session().model is tiny_loaded.model


def test_an_adapter_of_another_base_names_it_and_how_to_load_it(tiny_loaded, folders):
    model = tiny_loaded.model
    before = _state(model)
    fix = f"load that base with %qlora_load {folders / 'narrow-base'} --adapter {folders / 'narrow'}"
    with pytest.raises(AdapterError, match=f"trained on {folders / 'narrow-base'} and does not fit this model") as info:
        qm.load_adapter(folders / "narrow")
    _one_line(info.value)
    assert str(info.value).endswith(fix) and "needs [8, 64]" in str(info.value)
    _same_state(model, before)
    with pytest.raises(AdapterError, match="does not fit this model") as info:  # the same through %qlora_load
        qm.load(tiny_loaded.load_config.model, adapter=str(folders / "narrow"))
    assert str(info.value).endswith(fix) and qm.get_session().model is model
    assert qm.load(adapter=str(folders / "narrow")).model_name == str(folders / "narrow-base")  # as the message says


@pytest.mark.parametrize("path", ["a\x00b", "a\ud800b", "~no_such_user_xyz/adapter", "x" * 300])
def test_an_adapter_path_no_folder_can_have_is_one_line(tiny_loaded, path):
    with pytest.raises(AdapterError, match="No saved adapter at") as info:
        qm.load_adapter(path)
    _one_line(info.value)
    assert qm.list_adapters().names == ["default"]


def test_the_magic_shows_a_bad_folder_in_one_line(ip, tiny_loaded, folders, tmp_path):
    bad = _broken(folders, tmp_path, "truncated")
    result = ip.run_cell(f"%qlora_adapters load {bad}")
    _one_line(result.error_in_exec)
    assert qm.list_adapters().names == ["default"]


def test_a_base_with_other_weights_is_warned_about(tiny_model_dir, folders):
    qm.load(str(folders / "other-weights"), bits=8)
    with pytest.warns(OtherBaseWarning, match=f"trained on {tiny_model_dir}, whose weights differ") as caught:
        assert qm.load_adapter(folders / "good", name="mine").names == ["default", "mine"]
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    with pytest.warns(OtherBaseWarning, match=f"To use it as trained: %qlora_load {tiny_model_dir} --adapter"):
        qm.load(str(folders / "other-weights"), adapter=str(folders / "good"))


@pytest.mark.parametrize("bits", [4, 16])
def test_the_same_base_at_other_bits_is_not_warned_about(tiny_model_dir, folders, bits):
    """The fingerprint is of the embedding, which bitsandbytes leaves alone: the adapter was saved at 8 bits."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", OtherBaseWarning)
        qm.load(tiny_model_dir, bits=bits)
        qm.load_adapter(folders / "good", name="mine")
        qm.load(adapter=str(folders / "good"), bits=bits)


# --- saving ----------------------------------------------------------------------------------------------------


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("path, message", [
    (None, "must be a folder path (text), got None"),
    ("", "must be a folder path (text), got ''"),
    ("   ", "must be a folder path (text)"),
    (5, "must be a folder path (text), got 5"),
    ("notes.txt/adapter", "'notes.txt/adapter' is under"),
    ("notes.txt", "'notes.txt' is a file, not a folder"),
    ("x" * 300, "is 300 bytes long; folder names must be at most 255"),
    ("deep/" + "y" * 260 + "/adapter", "is 260 bytes long"),
    ("mine", "already holds other files"),
    ("a\x00b", "cannot be a folder name (embedded null byte)"),
    ("a\ud800b", "cannot be a folder name ('utf-8' codec can't encode"),
    ("~no_such_user_xyz/adapter", "'~no_such_user_xyz' is no user's home folder"),
])
def test_a_bad_save_path_is_one_line_before_anything_is_written(tiny_loaded, tmp_path, path, message):
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "draft.txt").write_text("mine")
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        qm.save(path)
    _one_line(info.value)
    assert _files(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["mine", "notes.txt"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("path", ["/proc/qlora-test/adapter", "/proc/adapter"])
def test_a_folder_the_system_refuses_is_one_line(tiny_loaded, path):
    with pytest.raises(ConfigError, match="'/proc' is not .*write") as info:  # the folder the path would be made in
        qm.save(path)
    _one_line(info.value)


@forks
def test_a_read_only_folder_is_one_line(cpu_loaded):
    """Run as an ordinary user (root may write anywhere): in a forked child that drops to 'nobody' when root."""
    import tempfile

    shared = tempfile.mkdtemp()  # /tmp itself: 'nobody' can reach it, unlike pytest's root-only folders
    try:
        os.chmod(shared, 0o755)
        locked = os.path.join(shared, "locked")
        os.mkdir(locked, 0o555)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            message = "no error"
            try:
                if os.geteuid() == 0:
                    os.setuid(65534)
                qm.save(os.path.join(locked, "adapter"))
            except ConfigError as error:
                message = f"ConfigError: {error}"
            except BaseException as error:  # noqa: BLE001 - reported to the parent
                message = f"{type(error).__name__}: {error}"
            finally:
                os.write(write_end, message.encode())
                os._exit(0)
        os.close(write_end)
        answered, _, _ = select.select([read_end], [], [], 300)  # a child stuck on a lock held at the fork fails here
        if not answered:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        message = os.read(read_end, 10_000).decode() if answered else "no answer from the child"
        assert message.startswith("ConfigError: The adapter folder") and f"{locked!r} is not a folder you can write to" in message
        assert os.listdir(locked) == []
    finally:
        shutil.rmtree(shared)


def _set_version(session, version):
    """Give the adapter's weights and its history a version number each, to tell saves apart on disk."""
    with torch.no_grad():
        for name, p in session.model.named_parameters():
            if "lora_B" in name:
                p.fill_(version)
    session.history = [{"step": 0, "version": version}]


def _version_on_disk(folder):
    """The version a saved folder holds; its weights and qlora_magic.json must agree on it."""
    from safetensors.torch import load_file

    read_adapter_folder(folder)  # the whole folder reads and checks
    record = json.loads((folder / "qlora_magic.json").read_text())["history"][0]["version"]
    weights = {float(t.unique()) for k, t in load_file(folder / "adapter_model.safetensors").items() if "lora_B" in k}
    assert weights == {record}, f"weights of version {weights} beside the run record of version {record}"
    return record


def test_a_failed_save_leaves_the_earlier_one_whole(tiny_loaded, tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    _set_version(tiny_loaded, 1)
    qm.save(target)
    before = _files(target)
    _set_version(tiny_loaded, 2)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiny_loaded.tokenizer, "save_pretrained", disk_full)  # after the weights are written
    with pytest.raises(ConfigError, match="Cannot write the adapter to .*: No space left on device. Nothing was changed") as info:
        qm.save(target)
    _one_line(info.value)
    assert _files(target) == before and os.listdir(tmp_path) == ["adapter"]  # no staging folder left
    monkeypatch.undo()
    qm.save(target)
    assert _version_on_disk(target) == 2 and os.listdir(tmp_path) == ["adapter"]


@forks
def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new_adapter(cpu_loaded, tmp_path):
    target = tmp_path / "adapter"
    _set_version(cpu_loaded, 1)
    started = time.perf_counter()
    qm.save(target)
    one_save = time.perf_counter() - started  # to spread the kills over a save or two, not to assert on
    rng = random.Random(0)
    found = []
    for _ in range(16):
        pid = os.fork()
        if pid == 0:  # the child saves version 2, 3, 2, ... over the folder until it is killed
            try:
                version = 2
                while True:
                    _set_version(cpu_loaded, version)
                    qm.save(target)
                    version = 5 - version
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0, 3 * one_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        found.append(_version_on_disk(target))
    assert set(found) <= {1, 2, 3}
    _set_version(cpu_loaded, 4)
    qm.save(target)  # the next save clears what the killed ones left
    assert _version_on_disk(target) == 4 and os.listdir(tmp_path) == ["adapter"]
    assert qm.load_adapter(target, name="survivor").names == ["default", "survivor"]


def test_saving_over_an_adapter_replaces_it_whole(tiny_loaded, tmp_path):
    target = tmp_path / "adapter"
    qm.save(target)
    record = json.loads((target / "qlora_magic.json").read_text())
    assert record["base_check"]["model_type"] == "llama" and len(record["base_check"]["embedding"]) == 32
    _set_version(tiny_loaded, 7)
    assert qm.save(target) == target
    assert _version_on_disk(target) == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(STAGING)]


def test_merge_path_errors_are_one_line_and_the_folder_is_written_whole(tiny_loaded, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    for path, message in [("notes.txt/merged", "which is a file"), ("notes.txt", "is a file, not a folder"),
                          ("m" * 300, "300 bytes long")]:
        with pytest.raises(ConfigError, match=message) as info:
            qm.merge(path, verify=False)
        _one_line(info.value)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    report = qm.merge(tmp_path / "merged", verify=False)
    assert (tmp_path / "merged" / "config.json").exists() and report.size > 0
    assert sorted(os.listdir(tmp_path)) == ["merged", "notes.txt"]


# --- folder_written on its own ---------------------------------------------------------------------------------


def _write(folder, files):
    for name, text in files.items():
        (folder / name).write_text(text)


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_folder_written_replaces_a_folder_whole(tmp_path, monkeypatch, swap):
    from qlora_magic.engine import folder_writing

    if swap == "two renames":  # as on a system without renameat2
        monkeypatch.setattr(folder_writing, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    for files in ({"a.txt": "1", "b.txt": "1"}, {"a.txt": "2", "c.txt": "2"}):
        with folder_writing.folder_written(target, "the test folder") as staging:
            assert staging.parent == tmp_path and staging.name.startswith(STAGING) and not any(staging.iterdir())
            _write(staging, files)
            assert not (target / "c.txt").exists()  # nothing reaches the target before the block ends
        assert {p.name: p.read_text() for p in target.iterdir()} == files
        assert os.listdir(tmp_path) == ["out"]


def test_folder_written_into_an_empty_folder_and_new_parents(tmp_path):
    from qlora_magic.engine.folder_writing import folder_written

    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new" / "deeper" / "out"):
        with folder_written(target, "the test folder") as staging:
            _write(staging, {"a.txt": "x"})
        assert os.listdir(target) == ["a.txt"]


def test_folder_written_leaves_everything_as_it_was_on_an_error(tmp_path):
    from qlora_magic.engine.folder_writing import folder_written

    (tmp_path / "old").mkdir()
    _write(tmp_path / "old", {"a.txt": "old"})
    for target in (tmp_path / "old", tmp_path / "new" / "deeper" / "out"):
        with pytest.raises(KeyError):
            with folder_written(target, "the test folder") as staging:
                _write(staging, {"a.txt": "new"})
                raise KeyError("a bug half-way")
    assert os.listdir(tmp_path) == ["old"]  # no staging folder, and the parents made for the new one removed
    assert (tmp_path / "old" / "a.txt").read_text() == "old"


@forks
def test_a_staging_folder_left_by_a_killed_writer_is_removed(tmp_path):
    from qlora_magic.engine.folder_writing import folder_written

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that is no longer alive
    abandoned, live = tmp_path / f"{STAGING}{pid}-abc", tmp_path / f"{STAGING}{os.getpid()}-def"
    abandoned.mkdir()
    live.mkdir()
    with folder_written(tmp_path / "out", "the test folder") as staging:
        _write(staging, {"a.txt": "x"})
    assert sorted(os.listdir(tmp_path)) == sorted(["out", live.name])  # another writer's, still running, is kept


def test_a_base_loaded_for_an_adapter_that_does_not_fit_is_freed(tiny_model_dir, folders, monkeypatch):
    import gc
    import weakref

    from qlora_magic.engine import loading

    bases = []
    check_fits = loading.check_fits
    monkeypatch.setattr(loading, "check_fits", lambda model, folder: (bases.append(weakref.ref(model)), check_fits(model, folder)))
    with pytest.raises(AdapterError, match="does not fit this model") as info:
        qm.load(tiny_model_dir, adapter=str(folders / "narrow"))
    gc.collect()
    assert info.value.__traceback__ is not None  # kept, as IPython keeps the last one (sys.last_traceback)
    assert len(bases) == 1 and bases[0]() is None


def test_the_fingerprint_survives_bf16_rounding_but_not_other_weights(tiny_model_dir):
    """On a GPU the embedding is loaded in bf16; an adapter saved on a CPU (fp32) must not warn there."""
    from transformers import AutoModelForCausalLM

    from qlora_magic.engine.adapter_folder import base_differs, base_fingerprint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    saved = base_fingerprint(model)
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        embedding.copy_(embedding.to(torch.bfloat16).float())
        assert not base_differs(model, saved)
        embedding.mul_(1.05)  # values 5% off: another base
        assert base_differs(model, saved)
    assert not base_differs(model, {})  # nothing saved (an adapter from other tools): nothing to say


def test_a_saved_folder_has_the_usual_mode(tmp_path):
    from qlora_magic.engine.folder_writing import folder_written

    (tmp_path / "plain").mkdir()
    with folder_written(tmp_path / "out", "the test folder") as staging:
        _write(staging, {"a.txt": "x"})
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode
