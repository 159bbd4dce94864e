"""Where generated text goes: the engine prints nothing and only calls on_text; %qlora_generate and
qm.generate (stream=True, the default) print the text as it comes, then a newline. Tiny offline model."""

import pytest
from IPython.utils.capture import capture_output

import qlora_magic as qm
from qlora_magic.config import GenerateConfig
from qlora_magic.engine.generation import generate_text
from qlora_magic.errors import ConfigError

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


# --- limits: the context length, --system, text that is not valid Unicode ---------------------------

def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def spy_on_generate(model, monkeypatch):
    """The keyword arguments each real model.generate call got, and what it returned ("sequences")."""
    calls, real = [], model.generate

    def generate(**kwargs):
        calls.append(kwargs)
        kwargs["sequences"] = real(**kwargs)
        return kwargs["sequences"]

    monkeypatch.setattr(model, "generate", generate)
    return calls


def test_max_new_tokens_is_capped_at_what_the_context_leaves(tiny_loaded, monkeypatch):
    calls = spy_on_generate(tiny_loaded.model, monkeypatch)
    qm.generate(PROMPT, raw=True, greedy=True, max_new_tokens=10_000, stream=False)
    assert tiny_loaded.model.config.max_position_embeddings == 256
    assert calls[0]["max_new_tokens"] == 256 - calls[0]["input_ids"].shape[-1]
    assert calls[0]["sequences"].shape[-1] <= 256


def test_a_small_max_new_tokens_is_kept(tiny_loaded, monkeypatch):
    calls = spy_on_generate(tiny_loaded.model, monkeypatch)
    qm.generate(PROMPT, raw=True, greedy=True, max_new_tokens=6, stream=False)
    assert calls[0]["max_new_tokens"] == 6


@pytest.mark.parametrize("words", [256, 50_000])
def test_a_prompt_that_fills_the_context_is_one_line_before_generating(tiny_loaded, monkeypatch, words):
    calls = spy_on_generate(tiny_loaded.model, monkeypatch)
    tiny_loaded.last_generation = "earlier answer"
    weights = lora_weights(tiny_loaded.model)
    with pytest.raises(ConfigError) as info:
        qm.generate("sky " * words, raw=True, greedy=True, stream=False)
    message = str(info.value)
    assert message.startswith("The prompt is ") and "this model reads at most 256 (its context length)" in message
    assert message.endswith("leaving no room for an answer: shorten the prompt.") and "\n" not in message
    assert calls == [] and tiny_loaded.last_generation == "earlier answer"
    assert all((p == weights[n]).all() for n, p in tiny_loaded.model.named_parameters() if p.requires_grad)


def test_the_cap_follows_the_model_config():
    from types import SimpleNamespace

    from qlora_magic.engine.generation import max_new_tokens_for

    decoder = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=100))
    gpt2_like = SimpleNamespace(config=SimpleNamespace(n_positions=50))
    encoder_decoder = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=100, is_encoder_decoder=True))
    no_limit = SimpleNamespace(config=SimpleNamespace())  # T5: relative positions
    assert max_new_tokens_for(decoder, 30, 10**9) == 70 and max_new_tokens_for(decoder, 30, 5) == 5
    assert max_new_tokens_for(decoder, 99, 10) == 1
    assert max_new_tokens_for(gpt2_like, 30, 10**9) == 20
    assert max_new_tokens_for(encoder_decoder, 90, 10**9) == 100  # the answer does not follow the prompt
    assert max_new_tokens_for(no_limit, 10**6, 10**9) == 10**9
    for model, length in ((decoder, 100), (encoder_decoder, 101)):
        with pytest.raises(ConfigError, match=f"The prompt is {length} tokens"):
            max_new_tokens_for(model, length, 10)


def test_system_without_the_chat_template_is_one_line(tiny_loaded, monkeypatch):
    assert tiny_loaded.tokenizer.chat_template  # the tiny tokenizer has one: --raw skips it
    with pytest.raises(ConfigError) as info:
        qm.generate(PROMPT, raw=True, system="Answer in French.", stream=False)
    assert str(info.value) == ("--system 'Answer in French.' would be ignored: it goes into the chat template, and --raw skips "
                               "the template: put it at the start of the prompt instead, or drop --raw.")
    monkeypatch.setattr(tiny_loaded.tokenizer, "chat_template", None)
    with pytest.raises(ConfigError, match="and this tokenizer has none: put it at the start of the prompt instead.$"):
        qm.generate(PROMPT, system="Answer in French.", stream=False)
    assert tiny_loaded.last_generation is None


def test_system_with_the_chat_template_is_used(tiny_loaded, monkeypatch):
    calls = spy_on_generate(tiny_loaded.model, monkeypatch)
    qm.generate(PROMPT, system="Answer in French.", greedy=True, max_new_tokens=2, stream=False)
    prompt = tiny_loaded.tokenizer.decode(calls[0]["input_ids"][0])
    assert "<|im_start|>system\nAnswer in French.<|im_end|>" in prompt


def test_the_magic_shows_the_system_error_in_one_line(tiny_loaded, ip, capsys):
    result = ip.run_cell('%qlora_generate --raw --system "Be brief." what is the sky')
    assert isinstance(result.error_in_exec, ConfigError)
    assert capsys.readouterr().out.strip().splitlines() == [
        "ConfigError: --system 'Be brief.' would be ignored: it goes into the chat template, and --raw skips the template: "
        "put it at the start of the prompt instead, or drop --raw."]


@pytest.mark.parametrize("field, what", [("prompt", "prompt"), ("system", "--system text")])
def test_a_lone_surrogate_is_one_line(tiny_loaded, field, what):
    options = {"prompt": PROMPT, field: "the sky \ud800 is"}
    with pytest.raises(ConfigError) as info:
        qm.generate(**options, greedy=True, stream=False)
    assert str(info.value).startswith(f"The {what} holds '\\ud800' at character 8, half of a UTF-16 surrogate pair")
    assert "\n" not in str(info.value) and tiny_loaded.last_generation is None
