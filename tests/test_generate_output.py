"""Where generated text goes: the engine prints nothing and only calls on_text; %qlora_generate and
qm.generate (stream=True, the default) print the text as it comes, then a newline. Tiny offline model."""

import pytest
from IPython.utils.capture import capture_output

import qlora_magic as qm
from qlora_magic.config import GenerateConfig
from qlora_magic.engine.generation import generate_text

PROMPT = "what is the color of the sky "


def test_the_magic_streams_the_answer_into_the_cell_output(tiny_loaded, ip):
    with capture_output() as captured:
        ip.run_line_magic("qlora_generate", f"--raw --greedy --max-new-tokens 6 {PROMPT}")
    answer = tiny_loaded.last_generation
    assert answer and captured.stdout == answer + "\n"


def test_generate_prints_the_text_then_a_newline(tiny_loaded, capsys):
    text = qm.generate(PROMPT, raw=True, greedy=True, max_new_tokens=6)
    assert text and capsys.readouterr().out == text + "\n"


def test_generate_without_streaming_prints_nothing(tiny_loaded, capsys):
    assert qm.generate(PROMPT, raw=True, greedy=True, max_new_tokens=6, stream=False)
    assert capsys.readouterr().out == ""


def test_on_text_gets_the_text_and_nothing_is_printed(tiny_loaded, capsys):
    chunks = []
    text = qm.generate(PROMPT, raw=True, greedy=True, max_new_tokens=6, on_text=chunks.append)
    assert "".join(chunks) == text and capsys.readouterr().out == ""


@pytest.mark.parametrize("stream", [True, False])
def test_the_engine_never_prints(tiny_loaded, capsys, stream):
    config = GenerateConfig(prompt=PROMPT, raw=True, greedy=True, max_new_tokens=6, stream=stream)
    text = generate_text(tiny_loaded.model, tiny_loaded.tokenizer, config, on_text=None)
    assert text and capsys.readouterr().out == ""
