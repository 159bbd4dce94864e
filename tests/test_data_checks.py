"""The data check (%%qlora_data, qm.check_data, and the checks %%qlora_train runs first) on real inputs: the
embedded SmolLM2-135M-Instruct's own tokenizer, chat template and generation config, offline."""

import pytest

import qlora_magic as qm
from qlora_magic.errors import DataError

ROWS = [{"question": "What is the capital of France?", "answer": "Paris."},
        {"question": "What is 2 + 2?", "answer": "4"},
        {"question": "Name a primary colour.", "answer": "Red."}]


@pytest.fixture(scope="module")
def smol():
    """The default model's tokenizer and generation config (what a loaded session holds)."""
    from transformers import AutoTokenizer, GenerationConfig

    from qlora_magic.engine.default_model import default_model_path

    folder = default_model_path()
    return AutoTokenizer.from_pretrained(folder), GenerationConfig.from_pretrained(folder)


def check(smol, rows, prompt="Q: {question}\nA: ", response="{answer}", chat=False, max_length=512, tokenizer=None):
    import datasets

    from qlora_magic.engine.data import ExampleTokenizer
    from qlora_magic.engine.data_checks import check_examples

    tokenizer = tokenizer or smol[0]
    examples = ExampleTokenizer(tokenizer, prompt, response, chat=chat, max_length=max_length)
    return check_examples(datasets.Dataset.from_list(rows), examples, smol[1])


def topics(report, level):
    return {f.topic for f in report.findings if f.level == level}


def test_good_rows_pass_and_show_trained_tokens(smol):
    report = check(smol, ROWS, chat=True)
    assert not report.problems and not report.warnings, repr(report)
    assert report.rows == 3 and report.columns == ["question", "answer"]
    assert "3 of 3 targets end with <|im_end|>, which generation stops at" in repr(report)
    trained = "".join(token for token, counts in report.samples[0] if counts)
    assert trained.startswith("Paris.<|im_end|>")  # the answer and the end of turn count; the prompt does not
    assert not any(counts for token, counts in report.samples[0][:5])
    text = repr(report)
    assert "[Paris.<|im_end|>\\n]" in text  # trained tokens between [ and ] in the terminal form
    page = report._repr_html_()
    assert page.count("qlora-token qlora-trained") >= 3 and "qlora-token qlora-masked" in page and "qlora-histogram" in page


def test_every_response_empty_is_a_problem_and_stops_training_in_one_line(smol):
    from qlora_magic.engine.data_checks import raise_if_fatal

    report = check(smol, [{**row, "answer": ""} for row in ROWS])
    assert topics(report, "problem") == {"responses"}
    with pytest.raises(DataError) as caught:
        raise_if_fatal(report)
    message = str(caught.value)
    assert "\n" not in message and "every response is empty" in message and "response:" in message


def test_responses_longer_than_max_length_are_counted(smol):
    rows = ROWS + [{"question": "Say it long.", "answer": "word " * 80}, {"question": "Longer.", "answer": "word " * 90}]
    report = check(smol, rows, max_length=40)
    cut = next(f for f in report.findings if f.topic == "max_length")
    assert cut.level == "warning" and cut.found.startswith("2 of 5 rows are longer than max_length=40")
    assert "raise max_length to" in cut.fix
    assert max(report.response_lengths) > 80  # lengths are before the cut
    lost = next(f for f in report.findings if f.found.endswith("lose their stop token to max_length=40"))
    assert lost.found.startswith("2 of 5 targets")


def test_every_response_cut_is_a_problem(smol):
    rows = [{"question": "Say it long.", "answer": "word " * 80}] * 2
    report = check(smol, rows, max_length=30)
    assert "stop token" in topics(report, "problem")
    assert any("never learn to stop" in f.found for f in report.problems)


def test_prompts_that_fill_max_length_leave_no_trained_token(smol):
    rows = ROWS + [{"question": "long " * 60, "answer": "yes"}]
    report = check(smol, rows, max_length=32)
    masked = next(f for f in report.findings if f.topic == "trained tokens")
    assert masked.level == "warning" and masked.found.startswith("1 of 4 rows have no trained token left")
    report = check(smol, [{"question": "long " * 60, "answer": "yes"}], max_length=32)
    assert "trained tokens" in topics(report, "problem")


def test_targets_without_the_chat_models_stop_token_warn_with_the_fix(smol):
    """A chat model (SmolLM2-Instruct stops at <|im_end|>) with a tokenizer whose eos is another token, as a
    base model's tokenizer is: the targets end with a token generation does not stop at."""
    from transformers import AutoTokenizer

    from qlora_magic.engine.default_model import default_model_path

    base_like = AutoTokenizer.from_pretrained(default_model_path())
    base_like.eos_token = "<|endoftext|>"
    report = check(smol, ROWS, tokenizer=base_like)
    stop = next(f for f in report.findings if f.topic == "stop token")
    assert stop.level == "warning" and not report.problems
    assert "end with <|endoftext|>, but generation stops at <|im_end|>" in stop.found
    assert stop.fix == "set chat: true (the template ends each answer with <|im_end|>)"
    assert check(smol, ROWS, chat=True, tokenizer=base_like).warnings == []  # the fix works


def test_duplicates_and_empty_fields_are_counted(smol):
    rows = ROWS + [ROWS[0], ROWS[0], {"question": "", "answer": "Something."}]
    report = check(smol, rows)
    duplicates = next(f for f in report.findings if f.topic == "duplicates")
    assert duplicates.found.startswith("2 rows repeat an earlier row")
    empty = next(f for f in report.findings if f.topic == "column 'question'")
    assert empty.found == "1 of 6 rows have it empty"


def test_histogram_bins_cover_every_row():
    from qlora_magic.display.data_report import histogram, text_histogram

    lengths = [3, 17, 17, 40, 129]
    bins = histogram(lengths)
    assert sum(rows for _, _, rows in bins) == len(lengths) and bins[0][0] <= 3 and bins[-1][1] >= 129
    assert len(bins) <= 9 and all(high + 1 == low for (_, high, _), (low, _, _) in zip(bins, bins[1:]))
    assert histogram([100, 101]) == [(100, 100, 1), (101, 101, 1)]
    lines = text_histogram("prompt tokens", lengths, 64)
    assert lines[0] == "prompt tokens (max_length 64; longest 129):" and lines[-1].endswith("> max_length")


# --- through the magics and the API on the loaded default model ----------------------------------------------

BODY = 'data: $rows\nprompt: "Q: {question}\\nA: "\nresponse: "{answer}"\n'


@pytest.mark.slow
def test_qlora_data_and_train_on_the_default_model(ip, capsys):
    ip.run_line_magic("qlora_load", "")
    session = qm.get_session()
    model, tokenizer = session.model, session.tokenizer
    ip.user_ns["rows"] = ROWS * 2
    report = qm.check_data(ROWS * 2, prompt="Q: {question}\nA: ", response="{answer}", max_length=64)
    assert report.rows == 6 and "3 rows repeat" in repr(report)
    result = ip.run_cell_magic("qlora_data", "--max-length 64", BODY)
    assert result is None  # displayed, not returned
    ip.user_ns["rows"] = [{**row, "answer": ""} for row in ROWS]
    with pytest.raises(DataError, match="^The data check stopped training: every response is empty"):
        qm.train([{**row, "answer": ""} for row in ROWS], prompt="Q: {question}\nA: ", response="{answer}", max_steps=1,
                 display="none")
    assert session.model is model and session.tokenizer is tokenizer and session.history == [] and session.runs == []
    summary = qm.train(ROWS * 2, prompt="Q: {question}\nA: ", response="{answer}", max_steps=1, display="none")
    assert dict(summary.rows())["data check"].startswith("duplicates: 3 rows repeat"), summary.rows()


def test_seq2seq_and_classifier_rows_are_checked_too(tiny_t5_dir, tiny_model_dir):
    import datasets
    from transformers import AutoTokenizer

    from qlora_magic.engine.data import ClassificationExamples, Seq2SeqExamples
    from qlora_magic.engine.data_checks import check_examples

    rows = datasets.Dataset.from_list([{"text": "the sky is blue", "summary": "blue", "label": "pos"},
                                       {"text": "the night is black " * 20, "summary": "", "label": "neg"}])
    t5 = AutoTokenizer.from_pretrained(tiny_t5_dir)
    report = check_examples(rows, Seq2SeqExamples(t5, "{text}", "{summary}", max_length=16))
    assert report.rows == 2 and report.columns == ["text", "summary"] and not report.problems
    assert next(f for f in report.findings if f.topic == "max_length").found.startswith("1 of 2 rows")
    assert next(f for f in report.findings if f.topic == "responses").found.startswith("1 of 2 responses are empty")
    assert any(trained for _, trained in report.samples[0]) and not report.samples[0][0][1]
    classes = check_examples(rows, ClassificationExamples(AutoTokenizer.from_pretrained(tiny_model_dir), "{text}", "label",
                                                          ["neg", "pos"], max_length=16))
    assert classes.columns == ["text", "label"] and not classes.problems and not any(classes.response_lengths)
    assert "stop token" not in {f.topic for f in classes.findings}


def test_a_template_error_names_the_users_columns_only():
    """The row index qlora_magic adds to find rows again is not one of the user's columns."""
    from qlora_magic.engine.data import ROW_INDEX, check_templates

    with pytest.raises(DataError) as missing:
        check_templates("{questoin} ", "{answer}", ["question", "answer", ROW_INDEX])
    assert str(missing.value).endswith("its columns are: question, answer.")


def test_a_format_spec_that_does_not_suit_the_value_is_one_line():
    from qlora_magic.engine.data import ROW_INDEX, render

    assert render("{n:>4}|{x!r}", {"n": 7, "x": "a"}) == "   7|'a'"
    with pytest.raises(DataError) as wrong:
        render("id {id:s} score {score:.1f}", {"id": 3, "score": 1.0, ROW_INDEX: 12})
    message = str(wrong.value)
    assert "\n" not in message and "{id:s} cannot show 3 (int) of a row (row 12)" in message and "without a format spec" in message
    with pytest.raises(DataError, match=r"\{score:.1f\} cannot show '' \(str\)"):  # an empty cell reads as ''
        render("{score:.1f}", {"score": None})


def test_columns_named_with_spaces_dashes_or_numbers_fill_templates(smol):
    """A CSV's "the question", a "score-2", a DataFrame's numbered columns ({0}: the column "0", not a positional
    argument); attribute or index access stays refused in one line."""
    import pandas as pd

    from qlora_magic.engine.data import load_rows, render, template_fields
    from qlora_magic.errors import ConfigError

    report = check(smol, [{"the question": "Sky?", "answer-1": "Blue."}], prompt="Q: {the question}\nA: ", response="{answer-1}")
    assert not topics(report, "problem")
    numbered = load_rows(pd.DataFrame([["What is 2 + 2?", "4"]]), "train")
    assert numbered.column_names == ["0", "1"] and render("{0} -> {1}", numbered[0]) == "What is 2 + 2? -> 4"
    for bad in ("{row.question}", "{rows[0]}", "{}"):
        with pytest.raises(ConfigError, match="name a column as it is"):
            template_fields(bad, "prompt")
