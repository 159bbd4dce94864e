"""Chat conversations as data (messages: <column>): Hugging Face's chat datasets keep each example as a list of
role/content turns. Trained through the tokenizer's chat template, the loss on every assistant turn only; the
data check, the evaluation and bad rows as for templates. Real runs on the tiny offline Llama (ChatML template)."""

import json

import pytest

import qlora_magic as qm
from qlora_magic.errors import ConfigError, DataError

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": f"colour of thing {i}?"}, {"role": "assistant", "content": colour},
                  {"role": "user", "content": "and again?"}, {"role": "assistant", "content": colour}]}
    for i, colour in enumerate(["red", "blue", "green", "black"] * 6)
]


def learned_and_read(tokenizer, example):
    from qlora_magic.engine.data import IGNORE_INDEX

    pairs = list(zip(example["input_ids"], example["labels"]))
    learned = tokenizer.decode([t for t, label in pairs if label != IGNORE_INDEX])
    read = tokenizer.decode([t for t, label in pairs if label == IGNORE_INDEX])
    return learned, read


def test_every_assistant_turn_is_trained_and_nothing_else(tiny_model_dir):
    from qlora_magic.engine.data import ConversationExamples

    qm.load(tiny_model_dir)
    tok = qm.get_session().tokenizer
    examples = ConversationExamples(tok, "messages")
    row = CONVERSATIONS[1]
    example = examples(row)
    learned, read = learned_and_read(tok, example)
    assert learned.count("blue") == 2 and learned.count("<|im_end|>") == 2
    assert "colour of thing" not in learned and "and again" not in learned and "one word" not in learned
    assert "colour of thing 1?" in read and "Answer in one word." in read
    assert example["input_ids"] == tok.apply_chat_template(row["messages"], tokenize=True)["input_ids"]
    assert examples.prompt_text(row).endswith("and again?<|im_end|>\n<|im_start|>assistant\n")
    assert examples.response_text(row) == "blue"
    cut = ConversationExamples(tok, "messages", max_length=10)(row)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 10


def test_a_chat_dataset_trains_checks_and_evaluates_from_the_cell(tiny_model_dir, ip, tmp_path, capsys):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in CONVERSATIONS))
    ip.run_line_magic("qlora_load", tiny_model_dir)
    body = f"data: {path}\nmessages: messages\neval_split: 4\n"
    ip.run_cell_magic("qlora_data", "", body)
    assert "messages" in capsys.readouterr().out
    report = qm.check_data(str(path), messages="messages")
    assert report.columns == ["messages"] and not report.problems
    assert any(f.topic == "stop token" and f.level == "ok" for f in report.findings)  # answers end with <|im_end|>
    ip.run_cell_magic("qlora_train", "--max-steps 2 --batch-size 4 --grad-accum 1 --lr 1e-3 --display none", body)
    session = qm.get_session()
    assert session.last_train_summary.status == "completed" and session.runs[-1].config.messages == "messages"
    report = qm.evaluate(metrics="perplexity,exact_match", max_new_tokens=3)  # the run's held-out conversations
    assert "held-out split of training run 1, 4 rows" in str(report) and "perplexity" in str(report)


@pytest.mark.parametrize("turns, message", [
    ([], "not a conversation"),
    ([{"content": "hi"}], 'each turn needs a text "role"'),  # arrow fills the missing role with None
    ([{"role": "user"}], 'and a text "content"'),
])
def test_a_row_that_is_not_a_conversation_is_one_line(tiny_loaded, turns, message):
    weights = {n: p.detach().clone() for n, p in tiny_loaded.model.named_parameters() if p.requires_grad}
    rows = CONVERSATIONS[:8] + [{"messages": turns}]
    with pytest.raises(DataError) as bad:
        qm.train(rows, messages="messages", max_steps=1, display="none")
    assert message in str(bad.value) and "\n" not in str(bad.value)
    assert all((p == weights[n]).all() for n, p in tiny_loaded.model.named_parameters() if p.requires_grad)
    assert not tiny_loaded.runs


def test_a_turn_of_another_shape_is_one_line(tiny_loaded):
    from qlora_magic.engine.data import ConversationExamples

    examples = ConversationExamples(tiny_loaded.tokenizer, "messages")
    for turns, message in (("hello", "not a conversation"), ([["user", "hi"]], 'each turn needs a text "role"'),
                           ([{"role": "user", "content": 5}], 'a text "content"')):
        with pytest.raises(DataError, match=message):
            examples.turns({"messages": turns, "qlora_row": 3})


@pytest.mark.parametrize("options, message", [
    (dict(prompt="{q}"), "so prompt: does not apply"),
    (dict(response="{a}"), "so response: does not apply"),
    (dict(chat=True), "so chat: does not apply"),
    (dict(messages=" "), "must name the column"),
])
def test_messages_replaces_the_templates(options, message):
    from qlora_magic.config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig(data=CONVERSATIONS, **{"messages": "messages", **options})


def test_a_missing_messages_column_names_the_columns(tiny_loaded):
    with pytest.raises(DataError, match="uses {chats}, but the data has no such column; its columns are: messages"):
        qm.train(CONVERSATIONS, messages="chats", max_steps=1, display="none")
