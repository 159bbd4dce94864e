"""%qlora_eval / qlora_magic.evaluate: parsing, wiring, and real runs on the tiny model."""

import math

import pytest

import qlora_magic
from qlora_magic.front import parsing
from qlora_magic.config import EvalConfig
from qlora_magic.errors import AdapterError, ConfigError, DataError

PROMPT, RESPONSE = "Q: {question}\nA: ", "{answer}"


def train_tiny(rows, **options):
    options = {"prompt": PROMPT, "response": RESPONSE, "eval_split": 0.25, "max_steps": 6, "lr": 1e-2,
               "batch_size": 4, "grad_accum": 1, "display": "none", **options}
    return qlora_magic.train(rows, **options)


# --- parsing -----------------------------------------------------------------------------------------

def test_parse_eval_defaults_to_the_last_runs_held_out_split():
    config = parsing.parse_eval("")
    assert config.data is None and config.metrics == ["perplexity"] and not config.base


def test_parse_eval_options_and_body():
    config = parsing.parse_eval("--base --metrics perplexity,bleu,rouge --limit 5 --adapters default,task2",
                                "data: $rows\nprompt: \"Q: {q}\"\nresponse: {a}", namespace={"rows": [{"q": 1}]})
    assert config.base and config.metrics == ["perplexity", "bleu", "rouge"] and config.limit == 5
    assert config.adapters == ["default", "task2"]
    assert config.data == [{"q": 1}] and config.prompt == "Q: {q}" and config.response == "{a}"


@pytest.mark.parametrize("line, cell, message", [
    ("--metrics accuracy", None, "Unknown metric 'accuracy'"),
    ("--limit 0", None, "--limit must be > 0"),
    ("--adapters ,", None, "--adapters is empty"),
    ("", "colour: red", "Unknown key 'colour'"),
    ("", "data: $missing", "names no variable"),
])
def test_parse_eval_errors_are_one_line(line, cell, message):
    with pytest.raises(ConfigError, match=message):
        parsing.parse_eval(line, cell, namespace={})


# --- wiring ------------------------------------------------------------------------------------------

def test_magic_passes_its_config_to_the_api(ip, monkeypatch):
    seen = {}
    monkeypatch.setattr(qlora_magic.api, "evaluate", lambda config: seen.setdefault("config", config))
    ip.user_ns["rows"] = [{"q": "x", "a": "y"}]
    ip.run_cell_magic("qlora_eval", "--metrics bleu --base", "data: $rows\nprompt: \"{q} {{literal}}\"\nresponse: \"{a}\"")
    assert seen["config"].metrics == ["bleu"] and seen["config"].base
    assert seen["config"].prompt == "{q} {{literal}}" and seen["config"].data == [{"q": "x", "a": "y"}]


def test_magic_without_a_model_fails_in_one_line(ip):
    result = ip.run_cell("%qlora_eval")
    assert isinstance(result.error_in_exec, qlora_magic.errors.NoModelError)


# --- metrics -----------------------------------------------------------------------------------------

def test_text_metrics_on_known_answers():
    from qlora_magic.tasks.evaluation import text_metrics

    same = text_metrics(["the sky is blue"], ["the sky is blue"], ["bleu", "rouge", "exact_match"])
    assert same["bleu"] == pytest.approx(100) and same["rougeL"] == 1 and same["exact_match"] == 1
    half = text_metrics(["the sky is blue", "red"], ["the sky is blue", "the grass is green"], ["rouge", "exact_match"])
    assert half["exact_match"] == 0.5 and 0.5 <= half["rouge1"] < 1


# --- real runs on the tiny model -----------------------------------------------------------------------

def test_perplexity_is_the_masked_response_loss(tiny_loaded, rows):
    """One example: our perplexity is exp of the model's own loss with the prompt masked out."""
    import torch

    from qlora_magic.engine.data import ExampleTokenizer
    from qlora_magic.tasks.evaluation import response_nll

    session = tiny_loaded
    example = ExampleTokenizer(session.tokenizer, PROMPT, RESPONSE)(rows[0])
    import datasets

    nll, tokens = response_nll(session.model, session.tokenizer, datasets.Dataset.from_list([example] * 3), batch_size=2)
    with torch.inference_mode():
        loss = session.model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])).loss
    assert tokens == 3 * sum(label != -100 for label in example["labels"][1:])
    assert nll / tokens == pytest.approx(loss.item(), rel=1e-4)


def test_evaluate_after_training_base_vs_adapter(tiny_loaded, rows):
    session = tiny_loaded
    train_tiny(rows)
    trainer_eval_loss = [r["eval_loss"] for r in session.history if "eval_loss" in r][-1]
    report = qlora_magic.evaluate(base=True, metrics=["perplexity", "bleu", "rouge", "exact_match"], max_new_tokens=6)
    assert [r["model"] for r in report.results] == ["base", "default"]
    base, adapter = report["base"], report["default"]
    assert adapter["rows"] == 12  # the 25% held out of 48
    # The held-out split made again exactly. (Equal here because the toy rows have equal lengths; the Trainer
    # averages batch means, ours is token-weighted.)
    assert adapter["loss"] == pytest.approx(trainer_eval_loss, rel=1e-3)
    assert adapter["perplexity"] < base["perplexity"] and adapter["perplexity"] == pytest.approx(math.exp(adapter["loss"]))
    assert {"bleu", "rouge1", "rougeL", "exact_match"} <= set(adapter)
    assert len(report.answers["base"]) == 12 and report.samples(1)[0]["reference"].startswith("the ")
    eval_rows = [r for r in session.history if r.get("kind") == "eval"]
    assert [r["model"] for r in eval_rows] == ["base", "default"] and "loss" not in eval_rows[0]  # charts stay clean
    assert "perplexity" in repr(report) and "<table>" in report._repr_html_() and "Sample answers" in report._repr_html_()
    assert session.model.active_adapter == "default"  # the base pass left the adapter on


def test_evaluate_any_dataset_with_a_limit(tiny_loaded, rows):
    report = qlora_magic.evaluate(rows, prompt=PROMPT, response=RESPONSE, limit=5)
    assert report["default"]["rows"] == 5 and "list of 48 rows" in report.data


def test_a_dataset_dict_is_evaluated_on_its_test_split_unless_told(tiny_loaded, rows):
    """Never silently the training rows: test, else validation; split= names another."""
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:12]),
                                   "test": datasets.Dataset.from_list(rows[12:17])})
    templates = dict(prompt="{question} ", response="{answer}")
    assert "5 rows" in str(qlora_magic.evaluate(splits, **templates))
    assert "12 rows" in str(qlora_magic.evaluate(splits, split="train", **templates))
    validation = datasets.DatasetDict({"train": splits["train"], "validation": splits["test"].select(range(3))})
    assert "3 rows" in str(qlora_magic.evaluate(validation, **templates))


def test_evaluate_errors(tiny_loaded, rows):
    with pytest.raises(ConfigError, match="Nothing to evaluate on"):
        qlora_magic.evaluate()
    with pytest.raises(ConfigError, match="needs references"):
        qlora_magic.evaluate(rows, prompt=PROMPT)
    with pytest.raises(DataError, match="no such column"):
        qlora_magic.evaluate(rows, prompt="{colour}", response=RESPONSE)
    with pytest.raises(AdapterError, match="No adapter 'nope'"):
        qlora_magic.evaluate(rows, prompt=PROMPT, response=RESPONSE, adapters="nope")
    train_tiny(rows, eval_split=None, max_steps=1)
    with pytest.raises(ConfigError, match="held nothing out"):
        qlora_magic.evaluate()


@pytest.mark.slow
def test_default_model_learns_word_forms_and_eval_shows_it():
    """The embedded SmolLM2-135M, 8-bit: a short run lowers held-out perplexity well below the base's."""
    qlora_magic.load()
    qlora_magic.train(qlora_magic.examples.path("word_forms"), prompt="Instruction: {instruction}\n\nInput: {context}\n\nResponse: ",
                      response="{response}", eval_split=0.2, max_steps=15, eval_steps=15, lr=1e-3, batch_size=4, grad_accum=1,
                      display="none")
    report = qlora_magic.evaluate(base=True, metrics=["perplexity", "exact_match"], max_new_tokens=24)
    assert report["default"]["perplexity"] < 0.5 * report["base"]["perplexity"]
    assert report["default"]["exact_match"] > report["base"]["exact_match"]
