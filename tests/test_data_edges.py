"""Data that cannot be used fails in one line that says where and how to fix it, before the model is
touched: empty or malformed files, folders, unknown formats, a column of text and numbers mixed, text
that is not valid Unicode. The file and the session are left as they were. Tiny offline model."""

import json

import pytest

import qlora_magic as qm
from qlora_magic.errors import ConfigError, DataError

TEMPLATES = dict(prompt="{question} ", response="{answer}", batch_size=8, grad_accum=1, max_steps=2, display="none")
ROW = '{"question": "what is the color of the sky", "answer": "the sky is blue"}\n'


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_untouched(session, model, weights):
    assert session.model is model and session.history == [] and session.train_configs == []
    assert all((p == weights[n]).all() for n, p in model.named_parameters() if p.requires_grad)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


FILES = [  # (file name, its text, the message the error holds)
    ("empty.jsonl", "", "'empty.jsonl' is empty: write one JSON object per line"),
    ("blank.jsonl", "\n  \n", "'blank.jsonl' is empty"),
    ("empty.csv", "", "'empty.csv' is empty: write a header line of column names, then one row per line"),
    ("header_only.csv", "question,answer\n", "'header_only.csv' has no rows: write a header line"),
    ("empty.json", "", "'empty.json' is empty"),
    ("no_rows.json", "[]", "'no_rows.json' has no rows"),
    ("broken.jsonl", ROW + '{"question": "x", "answer": }\n', "'broken.jsonl' line 2 is not valid JSON (Expecting value)"),
    ("not_an_object.jsonl", ROW + "\n[1, 2]\n", "'not_an_object.jsonl': line 3 is [1, 2], not a record"),
    ("mixed.jsonl", ROW + '{"question": 42, "answer": "x"}\n',
     "'mixed.jsonl': column 'question' mixes text (row 1) and numbers (row 2): make them all text, e.g. str(value)."),
    ("mixed.json", '[{"question": 1, "answer": "a"}, {"question": "b", "answer": "c"}]',
     "'mixed.json': column 'question' mixes numbers (row 1) and text (row 2): make them all text"),
    ("broken.json", '[{"question": "x",\n "answer": }]', "'broken.json' is not valid JSON at line 2"),
    ("surrogate.jsonl", ROW + '{"question": "bad \\ud800", "answer": "y"}\n',
     "'surrogate.jsonl': line 2, column 'question', holds '\\ud800', half of a UTF-16 surrogate pair"),
    ("notes.txt", ROW, "Cannot read 'notes.txt': .txt is not a format this reads; use a .jsonl, .json, .csv or .parquet file"),
]


@pytest.mark.parametrize("name, text, message", FILES, ids=[f[0] for f in FILES])
def test_a_bad_file_is_one_line_and_nothing_changes(tiny_loaded, tmp_path, capfd, name, text, message):
    path = write(tmp_path, name, text)
    model, weights = tiny_loaded.model, lora_weights(tiny_loaded.model)
    with pytest.raises(DataError) as info:
        qm.train(name, **TEMPLATES)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert path.read_text(encoding="utf-8") == text
    assert_untouched(qm.get_session(), model, weights)
    assert capfd.readouterr().err == ""  # no "Generating train split" bars, no logged parser error


def test_a_missing_file_with_a_file_suffix_is_not_looked_up_on_the_hub(tiny_loaded):
    with pytest.raises(DataError, match=r"^No file 'data/train.txt': check the path"):
        qm.train("data/train.txt", **TEMPLATES)


@pytest.mark.parametrize("inside, message", [
    ({}, "'data' is a folder: it holds no data file; give a .jsonl, .json, .csv or .parquet file."),
    ({"notes.txt": "hello"}, "'data' is a folder: it holds no data file"),
    ({"train.jsonl": ROW, "test.jsonl": ROW}, "'data' is a folder: give one of its data files (test.jsonl, train.jsonl)."),
])
def test_a_folder_is_one_line_naming_its_data_files(tiny_loaded, tmp_path, inside, message):
    (tmp_path / "data").mkdir()
    for name, text in inside.items():
        write(tmp_path / "data", name, text)
    model, weights = tiny_loaded.model, lora_weights(tiny_loaded.model)
    with pytest.raises(DataError) as info:
        qm.train("data", **TEMPLATES)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(inside)
    assert_untouched(qm.get_session(), model, weights)


@pytest.mark.parametrize("rows, message", [
    ([{"question": "a", "answer": "b"}, {"question": 7, "answer": "c"}],
     "Column 'question' mixes text (row 1) and numbers (row 2): make them all text, e.g. str(value)."),
    ([{"question": 7, "answer": "b"}, {"question": "a", "answer": "c"}],
     "Column 'question' mixes numbers (row 1) and text (row 2): make them all text"),
    ([{"question": True, "answer": "b"}, {"question": 1, "answer": "c"}],
     "Column 'question' mixes true/false values (row 1) and numbers (row 2): give the column one kind of value."),
    ([{"question": "a", "answer": "b"}, {"question": "c\ud800", "answer": "d"}],
     "Row 2, column 'question', holds '\\ud800', half of a UTF-16 surrogate pair and not valid text: remove it"),
])
def test_rows_arrow_cannot_store_are_one_line_naming_the_row(tiny_loaded, rows, message):
    import pandas as pd

    try:
        sources = [rows, pd.DataFrame(rows)]
    except UnicodeEncodeError:  # pandas' arrow strings refuse such text themselves
        sources = [rows]
    model, weights = tiny_loaded.model, lora_weights(tiny_loaded.model)
    for source in sources:
        with pytest.raises(DataError) as info:
            qm.train(source, **TEMPLATES)
        assert message in str(info.value) and "\n" not in str(info.value)
    assert_untouched(qm.get_session(), model, weights)


@pytest.mark.parametrize("where", ["prompt", "response"])
def test_a_lone_surrogate_in_a_template_is_one_line(tiny_loaded, rows, where):
    model, weights = tiny_loaded.model, lora_weights(tiny_loaded.model)
    templates = {**TEMPLATES, where: TEMPLATES[where] + "\udc80"}
    with pytest.raises(ConfigError) as info:
        qm.train(rows, **templates)
    assert str(info.value).startswith(f"The {where} template holds '\\udc80' at character ") and "\n" not in str(info.value)
    assert_untouched(qm.get_session(), model, weights)


def test_the_magic_shows_only_the_one_line(ip, tiny_loaded, tmp_path, capfd):
    write(tmp_path, "empty.jsonl", "")
    result = ip.run_cell('%%qlora_train --max-steps 2 --display none\ndata: empty.jsonl\nprompt: "{question} "\nresponse: "{answer}"\n')
    assert isinstance(result.error_in_exec, DataError)
    captured = capfd.readouterr()
    assert captured.out.strip().splitlines() == [
        "DataError: 'empty.jsonl' is empty: write one JSON object per line, like " + json.dumps({"question": "...", "answer": "..."}) + "."]
    assert captured.err == ""
