"""Pure parsing: magic lines and cell bodies -> configs. No model involved."""

import re

import pytest
from IPython.core.error import UsageError

from qlora_magic.config import CompareConfig, EvalConfig, GenerateConfig, LoadConfig, MergeConfig, TrainConfig, TuneConfig
from qlora_magic.errors import ConfigError
from qlora_magic.front import parsing
from qlora_magic.front.parsing import (parse_eval, parse_generate, parse_load, parse_save, parse_train, parse_tune,
                                       split_options)

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


def test_eval_split_zero_holds_nothing_out():
    assert parse_train("", BODY + "eval_split: 0\n").eval_split is None


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
    ("", BODY + "prompt: 'Q: {question}'\n", "gives 'prompt' twice (lines 2 and 4): keep one"),
])
def test_train_bad_input_is_one_line(line, body, message):
    with pytest.raises((UsageError, ConfigError)) as info:
        parse_train(line, body, namespace={})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_generate_line_keeps_the_prompt_exactly():
    assert split_options("--greedy --max-new-tokens 5 What is -1 + {x}?") == (["--greedy", "--max-new-tokens", "5"], "What is -1 + {x}?")
    assert split_options("-- --greedy is a flag") == ([], "--greedy is a flag")
    assert split_options('--system "Be brief" What\'s "up"?') == (["--system", "Be brief"], 'What\'s "up"?')
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


def test_a_prompt_that_is_not_text_says_so():
    from qlora_magic.config import GenerateConfig

    for prompt in (123, ["a", "b"]):  # the configs' own type check (it said "The prompt is empty")
        with pytest.raises(ConfigError) as wrong:
            GenerateConfig(prompt=prompt)
        assert str(wrong.value).startswith(f"prompt must be text, got {prompt!r}")


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


# --- the YAML cell bodies of %%qlora_train, %%qlora_eval and %%qlora_tune are read alike ------------

ROWS = [{"question": "q", "answer": "a"}]


def read_body(magic, body, namespace=None):
    """The config a magic makes of `body` (for tune: its training part; the search added if missing)."""
    namespace = {"rows": ROWS} if namespace is None else namespace
    if magic == "train":
        return parse_train("", body, namespace=namespace)
    if magic == "eval":
        return parse_eval("", body, namespace=namespace)
    extra = ("" if "eval_split" in body else "eval_split: 0.25\n") + ("" if "search" in body else "search:\n  r: [2]\n")
    return parse_tune("", body + extra, namespace=namespace).train


BODY_MAGICS = ["train", "eval", "tune"]


@pytest.mark.parametrize("magic", BODY_MAGICS)
@pytest.mark.parametrize("body, line", [
    ('data: $rows\nprompt: "Q: {question}"\nresponse: "{answer}" and more\n', 3),  # text after a quoted value
    ('data: $rows\nprompt: "Q: {question}\nresponse: "{answer}"\n', 3),  # a quote left open, then another
    ("data: $rows\nprompt: [unclosed\n", 2),  # open at the end: the line where it opened
])
def test_a_yaml_error_names_its_line_in_every_body(magic, body, line):
    with pytest.raises(ConfigError) as info:
        read_body(magic, "eval_split: 0.25\nsearch: {r: [2]}\n" + body)  # (nothing added after the body for tune)
    line += 2
    message = str(info.value)
    assert message.startswith(f"The cell body is not valid YAML (line {line}): ") and "\n" not in message


@pytest.mark.parametrize("magic", BODY_MAGICS)
def test_an_unknown_key_is_named_the_same_way_in_every_body(magic):
    with pytest.raises(ConfigError) as info:
        read_body(magic, 'data: $rows\nprompt: "Q: {question}"\ncolour: red\n')
    assert str(info.value).startswith(f"Unknown key 'colour' in the cell body of %%qlora_{magic}; known keys: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("magic", BODY_MAGICS)
def test_every_body_reads_templates_numbers_text_and_variables_alike(magic):
    config = read_body(magic, 'data: $rows\nprompt: "Q: {question}\\nA: "\nresponse: {answer}\n'
                              'max_length: "1e3"\nsplit: "2024"\n')
    assert config.data is ROWS  # $rows: the notebook variable
    assert config.prompt == "Q: {question}\nA: " and config.response == "{answer}"  # unquoted {answer} is the template
    assert config.max_length == 1000 and isinstance(config.max_length, int)  # a number written as text (YAML 1.1 leaves 1e3 a string), whole
    assert config.split == "2024"  # text stays as written


@pytest.mark.parametrize("magic", ["train", "tune"])
@pytest.mark.parametrize("written, read", [('"1"', "1"), ("1e3", "1e3")])
def test_label_stays_as_written(magic, written, read):
    assert read_body(magic, f'data: $rows\nprompt: "{{question}}"\nlabel: {written}\n').label == read


@pytest.mark.parametrize("magic", ["train", "tune"])
def test_a_number_where_a_column_name_is_meant_is_one_line(magic):
    with pytest.raises(ConfigError) as info:
        read_body(magic, 'data: $rows\nprompt: "{question}"\nlabel: 1\n')
    assert str(info.value) == 'label must be text, got 1: put it in quotes, e.g. "1".'


@pytest.mark.parametrize("magic", BODY_MAGICS)
@pytest.mark.parametrize("data, message", [("$nothing_here", "data: $nothing_here names no variable"),
                                           ("$not-a-name", "data: $not-a-name is not a variable name")])
def test_a_missing_variable_is_one_line_in_every_body(magic, data, message):
    with pytest.raises(ConfigError) as info:
        read_body(magic, f'data: {data}\nprompt: "{{question}}"\nresponse: "{{answer}}"\n', namespace={})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_eval_data_from_the_line_is_looked_up_too():
    assert parse_eval("--data $rows", None, namespace={"rows": ROWS}).data is ROWS


def test_tune_search_reads_numbers_as_the_body_does():
    config = parse_tune("", 'data: $rows\nprompt: "{question}"\nresponse: "{answer}"\neval_split: 0.25\ntrials: "3"\n'
                            "search:\n  lr: {low: 1e-4, high: 1e-2, log: true}\n  r: ['4', 8]\n  targets: [q_proj, '1']\n",
                        namespace={"rows": ROWS})
    assert config.trials == 3
    assert config.search == {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "r": [4, 8], "targets": ["q_proj", "1"]}


# --- defaults: the config dataclasses are the one source ------------------------------------------

CONFIG_OF = {"qlora_load": LoadConfig, "qlora_train": TrainConfig, "qlora_generate": GenerateConfig,
             "qlora_eval": EvalConfig, "qlora_compare": CompareConfig, "qlora_merge": MergeConfig,
             "qlora_tune": TuneConfig}
FIELD_OF = {"sampler_seed": "seed"}  # options named apart from their field


def _declared_options():
    for declaration in parsing.MAGIC_DECLARATIONS:
        config = CONFIG_OF.get(declaration.__name__)
        for action in declaration.parser._actions if config else ():
            name = FIELD_OF.get(action.dest, action.dest)
            if action.option_strings and action.nargs != 0 and name in config.__dataclass_fields__:
                yield declaration.__name__, action, config, name


def test_options_leave_their_defaults_to_the_configs():
    checked = 0
    for magic, action, config, name in _declared_options():
        default = parsing.config_default(config, name)
        assert action.default is None, f"%{magic} {action.option_strings[0]} sets its own default"
        if default is None:
            continue
        found = re.search(r"\(default ([^)]*)\)", action.help or "")
        assert found, f"%{magic} {action.option_strings[0]}: no '(default ...)' in {action.help!r}"
        shown = found.group(1)
        if isinstance(default, list):
            assert shown.split(",") == default, (magic, action.dest)
        elif isinstance(default, (int, float)):
            assert float(shown) == default, (magic, action.dest)
        else:
            assert shown == default, (magic, action.dest)
        checked += 1
    assert checked >= 25


def test_help_shows_the_defaults_readably(ip):
    doc = ip.find_cell_magic("qlora_train").__doc__
    assert "peak learning rate (default 2e-4)" in doc and "AdamW weight decay (default 0)" in doc
    doc = ip.find_line_magic("qlora_load").__doc__
    assert "LoRA rank (default 8)" in doc and "LoRA dropout (default 0.05)" in doc and "(default causal-lm)" in doc
    assert "(default perplexity)" in ip.find_line_magic("qlora_eval").__doc__
