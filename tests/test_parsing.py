"""Pure parsing: magic lines and cell bodies -> configs. No model involved."""

import pytest
from IPython.core.error import UsageError

from qlora_magic.config import LoadConfig, TrainConfig
from qlora_magic.errors import ConfigError
from qlora_magic.front.parsing import parse_generate, parse_load, parse_save, parse_train, split_generate_line

BODY = 'data: rows.jsonl\nprompt: "Q: {question}\\nA: "\nresponse: "{answer}"\n'


def test_load_defaults_are_the_course_settings():
    config = parse_load("")
    assert config == LoadConfig()
    assert (config.model, config.bits, config.r, config.alpha, config.dropout) == (None, None, 8, 32, 0.05)


def test_load_options():
    config = parse_load("my/model --bits 4 --r 16 --alpha 64 --dropout 0.1 --targets q_proj,k_proj,v_proj")
    assert config.model == "my/model" and config.bits == 4 and config.r == 16 and config.alpha == 64
    assert config.targets == ["q_proj", "k_proj", "v_proj"]
    assert parse_load("--targets all-linear").targets == "all-linear"


@pytest.mark.parametrize("line, message", [
    ("--bits 3", "invalid choice: 3"),
    ("--r 0", "--r must be > 0"),
    ("--dropout 1.5", "--dropout must be in [0, 1)"),
    ("--task translation", "--task must be one of"),
    ("--frobnicate 2", "unrecognized arguments"),
])
def test_load_bad_values_are_one_line_errors(line, message):
    with pytest.raises((UsageError, ConfigError), match=None) as info:
        parse_load(line)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_train_flags_and_body():
    config = parse_train("--epochs 2 --batch-size 8 --grad-accum 2 --lr 1e-4", BODY + "eval_split: 0.1\nmax_length: 256\n")
    assert isinstance(config, TrainConfig)
    assert (config.epochs, config.batch_size, config.grad_accum, config.lr) == (2, 8, 2, 1e-4)
    assert config.data == "rows.jsonl" and config.prompt == "Q: {question}\nA: " and config.response == "{answer}"
    assert config.eval_split == 0.1 and config.max_length == 256


def test_train_flags_win_over_the_body():
    assert parse_train("--lr 3e-4", BODY + "lr: 1e-3\n").lr == 3e-4
    assert parse_train("", BODY + "lr: 1e-3\n").lr == 1e-3


def test_train_unquoted_single_placeholder_is_read_as_the_template():
    config = parse_train("", "data: x.jsonl\nprompt: 'Q: {question} A: '\nresponse: {answer}\n")
    assert config.response == "{answer}"


def test_train_dollar_data_comes_from_the_namespace():
    rows = [{"question": "q", "answer": "a"}]
    config = parse_train("", BODY.replace("rows.jsonl", "$my_rows"), namespace={"my_rows": rows})
    assert config.data is rows


@pytest.mark.parametrize("line, body, message", [
    ("--lr -1", BODY, "--lr must be > 0, got -1.0"),
    ("--epochs 0", BODY, "--epochs must be > 0"),
    ("", "data: [unclosed\n", "not valid YAML"),
    ("", BODY + "colour: red\n", "Unknown key 'colour'"),
    ("", "data: x.jsonl\nresponse: '{a}'\n", "needs a prompt"),
    ("", BODY.replace("rows.jsonl", "$nothing_here"), "names no variable"),
    ("", BODY + "eval_split: 1.5\n", "eval_split must be"),
    ("", "- just\n- a list\n", "key: value lines"),
])
def test_train_bad_input_is_one_line(line, body, message):
    with pytest.raises((UsageError, ConfigError)) as info:
        parse_train(line, body, namespace={})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_generate_line_keeps_the_prompt_exactly():
    assert split_generate_line("--greedy --max-new-tokens 5 What is -1 + {x}?") == ("--greedy --max-new-tokens 5", "What is -1 + {x}?")
    assert split_generate_line("-- --greedy is a flag") == ("", "--greedy is a flag")
    config = parse_generate("--temperature 0.2 --base Tell me  a joke")
    assert config.prompt == "Tell me  a joke" and config.temperature == 0.2 and config.base and not config.greedy


def test_generate_cell_body_is_the_prompt():
    config = parse_generate("--raw --greedy", "Instruction: {literal}\n\nResponse: ")
    assert config.prompt == "Instruction: {literal}\n\nResponse: " and config.raw and config.greedy


@pytest.mark.parametrize("line, cell, message", [
    ("", None, "The prompt is empty"),
    ("--greedy", None, "The prompt is empty"),
    ("--top-p 2 hi", None, "--top-p must be in (0, 1]"),
    ("hello", "body", "takes the prompt from the cell body"),
])
def test_generate_bad_input(line, cell, message):
    with pytest.raises((UsageError, ConfigError)) as info:
        parse_generate(line, cell)
    assert message in str(info.value)


def test_save_needs_a_path():
    assert parse_save("runs/a") == "runs/a"
    with pytest.raises(UsageError):
        parse_save("")


def test_quoted_option_values():
    config = parse_generate('--system "Answer in one word." --greedy What is 2+2?')
    assert config.system == "Answer in one word." and config.prompt == "What is 2+2?" and config.greedy
    assert parse_load("'./my models/llama'").model == "./my models/llama"
    with pytest.raises(UsageError, match="close the quotes"):
        parse_generate('--system "unclosed Hi')
