"""%qlora_export gguf / qlora_magic.export: parsing, wiring, the preflight, and real exports of the tiny Llama."""

import importlib.util

import pytest

import qlora_magic
from qlora_magic.errors import ConfigError, QloraError
from qlora_magic.front import parsing
from test_offline import cache_model, hub_cache, no_network, online_by_default  # noqa: F401 (fixtures)

TEMPLATES = dict(prompt="Q: {question}\nA: ", response="{answer}")


def test_parse_export():
    config = parsing.parse_export("gguf out/x --quant q8_0 --ollama --adapter task2 --no-verify")
    assert (config.format, config.path, config.quant, config.ollama, config.adapter, config.verify) == (
        "gguf", "out/x", "q8_0", True, "task2", False)
    assert parsing.parse_export("gguf out").quant == "f16" and not parsing.parse_export("gguf out").ollama
    with pytest.raises(ConfigError, match="--quant must be one of"):
        parsing.parse_export("gguf out --quant q3_k")
    with pytest.raises(ConfigError, match="writes gguf, got 'onnx'"):
        parsing.parse_export("onnx out")


def test_magic_passes_its_config_to_the_api(ip, monkeypatch):
    seen = {}
    monkeypatch.setattr(qlora_magic.api, "export", lambda config: seen.setdefault("config", config))
    ip.run_line_magic("qlora_export", "gguf exported/x --quant q4_0 --ollama")
    assert (seen["config"].path, seen["config"].quant, seen["config"].ollama) == ("exported/x", "q4_0", True)


@pytest.mark.parametrize("short", ["disk", "ram"])
def test_preflight_refuses_in_one_line_and_writes_nothing(tiny_loaded, tmp_path, monkeypatch, short):
    from qlora_magic.tasks import exporting

    monkeypatch.setattr(exporting, "free_disk" if short == "disk" else "free_ram", lambda *a: 10 * 2**20)
    monkeypatch.setattr(exporting, "merged_model", lambda *a: pytest.fail("the merge started"))
    with pytest.raises(exporting.NoRoomError) as info:
        qlora_magic.export("gguf", tmp_path / "out", quant="f16")
    message = str(info.value)
    assert "\n" not in message and "needs about" in message and "nothing was written" in message
    assert ("disk at" in message) == (short == "disk") and ("RAM" in message) == (short == "ram")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == []


def test_export_round_trip(tiny_model_dir, rows, tmp_path):
    """The f16 file holds the merged weights (gguf's reader, un-permuted), the tokenizer and the chat template,
    and answers like the adapter; q8_0 stays within its quantization step; the Modelfile comes from the template."""
    import torch

    from qlora_magic.engine import gguf_file
    from qlora_magic.tasks.merging import merged_model

    torch.manual_seed(0)  # the LoRA initialization, so the run is the same every time
    qlora_magic.load(tiny_model_dir, bits=8)
    qlora_magic.train(rows, **TEMPLATES, eval_split=0.25, max_steps=4, eval_steps=4, lr=1e-2, batch_size=4, grad_accum=1,
                      display="none")
    report = qlora_magic.export("gguf", tmp_path / "f16", ollama=True, max_new_tokens=6)
    file = tmp_path / "f16" / report.path.split("/")[-1]
    assert file.exists() and file.stat().st_size == report.size and file.suffix == ".gguf"
    # The tiny model's weights are random: its greedy answers are byte soup with near-ties that f16 rounding can
    # flip a few tokens in (the same as %qlora_merge's check would report); the perplexity is the steady measure.
    assert len(report.prompts) == 4 and report.answers_matching >= 2
    if importlib.util.find_spec("llama_cpp") is None:  # the check says what read the file, and how to get llama.cpp's
        assert report.runtime.startswith("the file's tensors read back") and "pip install llama-cpp-python" in repr(report)
    assert report.merge.startswith("streamed tensor by tensor")
    assert abs(report.perplexity_drift) < 0.05 and "perplexity" in repr(report) and "drift" in report._repr_html_()

    session = qlora_magic.get_session()
    merged, _, _ = merged_model(session, "default", torch.float32)
    expected = merged.state_dict()
    for quant, step in (("f16", 1e-3), ("q8_0", None)):
        path = file if quant == "f16" else tmp_path / "q8.gguf"
        if quant != "f16":
            gguf_file.write_gguf(merged, session.tokenizer, path, quant, "tiny")
        back = gguf_file.read_gguf(path, merged)
        assert set(back) == set(expected)
        for name, weight in back.items():
            # Q8_0: per block of 32 one scale, max |w| / 127; the error is at most half of it.
            bound = step if step else expected[name].abs().max().item() / 127 * 0.51 + 1e-6
            assert (weight - expected[name]).abs().max().item() <= bound, (quant, name)

    meta = gguf_file.metadata(file)
    tok = session.tokenizer
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.tokens"] == merged.config.vocab_size
    # the tiny tokenizer (trained here) is no model llama.cpp knows: the generic split, and the report says so
    assert meta["tokenizer.ggml.pre"] == "default" and "WARNING: pre-tokenizer not recognized" in repr(report)
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and meta["tokenizer.chat_template"] == tok.chat_template

    modelfile = (tmp_path / "f16" / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{file.name}\n") and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    with pytest.raises(QloraError, match="not empty"):
        qlora_magic.export("gguf", tmp_path / "f16")


def test_quantized_export_reports_its_drift(tiny_loaded, rows, tmp_path):
    qlora_magic.train(rows, **TEMPLATES, eval_split=0.25, max_steps=4, eval_steps=4, lr=1e-2, batch_size=4, grad_accum=1,
                      display="none")
    report = qlora_magic.export("gguf", tmp_path / "q4", quant="q4_0", max_new_tokens=4)
    assert report.dtype == "q4_0" and report.perplexity_drift is not None and "q4_0" in repr(report)
    assert not (tmp_path / "q4" / "Modelfile").exists()


def test_pre_tokenizer_is_named_as_llama_cpp_names_it(tmp_path):
    """The default model's tokenizer is SmolLM's ("smollm": llama.cpp's regex for it); a tokenizer whose split
    differs from every known one (the same vocabulary, a space put before the text) is not recognized."""
    import json

    from transformers import AutoTokenizer

    from qlora_magic.engine.default_model import default_model_path
    from qlora_magic.engine.gguf_tokenizer import pre_tokenizer, pre_tokenizer_note

    smollm = AutoTokenizer.from_pretrained(default_model_path())
    assert pre_tokenizer(smollm) == "smollm" and "'smollm'" in pre_tokenizer_note(smollm)
    smollm.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True  # " hello" and "hello" become one token: another split
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    other = AutoTokenizer.from_pretrained(tmp_path)
    assert pre_tokenizer(other) is None
    note = pre_tokenizer_note(other)
    assert note.startswith("WARNING") and "'default' written" in note and "\n" not in note


def test_a_second_export_of_the_same_adapter_reuses_its_answers(tiny_loaded, rows, tmp_path, monkeypatch):
    """Exporting f16 then q4_0 asks the adapter once; trained further, it is asked again."""
    from qlora_magic.tasks import evaluation

    asked = []
    real = evaluation.greedy_answers
    monkeypatch.setattr(evaluation, "greedy_answers", lambda model, *a: asked.append(type(model).__name__) or real(model, *a))
    train = dict(eval_split=0.25, max_steps=2, eval_steps=2, batch_size=4, grad_accum=1, display="none")
    qlora_magic.train(rows, **TEMPLATES, **train)
    first = qlora_magic.export("gguf", tmp_path / "f16", max_new_tokens=4)
    second = qlora_magic.export("gguf", tmp_path / "q4", quant="q4_0", max_new_tokens=4)
    assert asked.count("PeftModelForCausalLM") == 1 and len(asked) == 3  # the adapter once, each file once
    assert (second.adapter_answers, second.adapter_perplexity) == (first.adapter_answers, first.adapter_perplexity)
    qlora_magic.train(rows, **TEMPLATES, **train)  # the optimizer's steps change the weights in place
    qlora_magic.export("gguf", tmp_path / "again", max_new_tokens=4)
    assert asked.count("PeftModelForCausalLM") == 2


def test_modelfile_from_the_generation_config(tiny_loaded):
    from transformers import GenerationConfig

    from qlora_magic.tasks.exporting import modelfile

    tok = qlora_magic.get_session().tokenizer
    text = modelfile("m.gguf", tok, GenerationConfig(do_sample=True, temperature=0.2, top_p=0.9, eos_token_id=[tok.eos_token_id]))
    assert "PARAMETER temperature 0.2" in text and "PARAMETER top_p 0.9" in text
    assert text.count('PARAMETER stop "<|im_end|>"') == 1  # the eos and the end of turn are one token here


def test_other_architectures_are_refused_in_one_line(tiny_t5_dir, tmp_path):
    qlora_magic.load(tiny_t5_dir, bits=8, task="seq2seq", device="cpu")
    with pytest.raises(ConfigError, match="causal language models") as info:
        qlora_magic.export("gguf", tmp_path / "t5")
    assert "\n" not in str(info.value) and not (tmp_path / "t5").exists()


def test_unsupported_causal_lm_is_refused(tiny_loaded, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_loaded.model.config, "architectures", ["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match="Llama-architecture.*not GPT2LMHeadModel"):
        qlora_magic.export("gguf", tmp_path / "g")


@pytest.mark.slow
def test_llama_cpp_loads_and_answers_like_the_adapter(tiny_loaded, rows, tmp_path):
    """llama.cpp's own runtime on the exported file (pip install llama-cpp-python: built from source, see
    docs/user-guide.md#export-to-llamacpp-and-ollama-qlora_export for the time it takes)."""
    pytest.importorskip("llama_cpp")
    qlora_magic.train(rows, **TEMPLATES, eval_split=0.25, max_steps=4, eval_steps=4, lr=1e-2, batch_size=4, grad_accum=1,
                      display="none")
    report = qlora_magic.export("gguf", tmp_path / "f16", max_new_tokens=6)
    assert report.runtime.startswith("llama.cpp")
    # llama.cpp's perplexity is the file's (a wrong tensor layout would be off by orders of magnitude); the tiny
    # random model's greedy answers are byte-level near ties, so a late token may differ between the runtimes.
    assert len(report.prompts) == 4 and report.answers_matching >= 2 and abs(report.perplexity_drift) < 0.05


def test_streamed_merge_is_peft_merge(tiny_model_dir):
    """Each tensor streamed from the base's safetensors equals PEFT's merge_and_unload of the same adapter, with
    rslora's alpha / sqrt(r) scaling; an adapter PEFT merges its own way (DoRA) is not streamed, and says why."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_magic.engine.streamed_merge import stream_plan

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"])
    model = trained_lora(get_peft_model(base, lora))
    plan, why = stream_plan(model, "default", tiny_model_dir)
    assert why == "" and len(plan.updates) == 3 * 2  # three targets in each of the two layers
    expected = model.merge_and_unload().state_dict()
    for name in plan.shapes:
        if name in expected:
            assert torch.allclose(torch.from_numpy(plan.load(name)), expected[name].float(), atol=1e-5), name

    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, use_dora=True))
    plan, why = stream_plan(dora, "default", tiny_model_dir)
    assert plan is None and "DoRA" in why



def test_streamed_merge_transposes_a_fan_in_fan_out_update(tmp_path):
    """GPT-2's Conv1D stores its weight transposed (PEFT's fan_in_fan_out): the streamed update is too."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from qlora_magic.engine.streamed_merge import stream_plan

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    model = trained_lora(get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path),
                                        LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)))
    plan, why = stream_plan(model, "default", str(tmp_path))
    (name,) = plan.updates
    assert why == "" and plan.updates[name][3] is True
    merged = model.merge_and_unload().state_dict()
    assert torch.allclose(torch.from_numpy(plan.load(name)), merged[name], atol=1e-5)

def test_streamed_export_of_the_default_model_equals_the_in_memory_merge(tmp_path):
    """On SmolLM2-135M (the embedded default): the streamed f16 file holds the in-memory merge's weights to f16
    rounding, and the preflight asks for much less RAM than the in-memory merge would."""
    import torch

    from qlora_magic.engine import gguf_file
    from qlora_magic.tasks.exporting import needed_room

    torch.manual_seed(0)
    qlora_magic.load(bits=8)
    session = qlora_magic.get_session()
    trained_lora(session.model, std=0.02)
    report = qlora_magic.export("gguf", tmp_path / "f16", verify=False)
    assert report.merge.startswith("streamed") and "'smollm'" in report.tokenizer
    assert gguf_file.metadata(report.path)["tokenizer.ggml.pre"] == "smollm"
    assert_file_is_the_merge(report.path, session)
    streamed, in_memory = needed_room(session, "f16", streamed=True, verify=False), needed_room(session, "f16", streamed=False, verify=False)
    assert streamed[0] < in_memory[0] and streamed[1] == in_memory[1]


def test_an_adapter_that_cannot_stream_is_merged_in_memory(tiny_loaded, rows, tmp_path, monkeypatch):
    from qlora_magic.engine import streamed_merge

    monkeypatch.setattr(streamed_merge, "stream_plan", lambda *a: (None, "DoRA or a LoRA bias is merged by PEFT's own code"))
    qlora_magic.train(rows, **TEMPLATES, eval_split=0.25, max_steps=2, eval_steps=2, batch_size=4, grad_accum=1, display="none")
    report = qlora_magic.export("gguf", tmp_path / "mem", max_new_tokens=4)
    assert report.merge == "in memory (DoRA or a LoRA bias is merged by PEFT's own code)" and abs(report.perplexity_drift) < 0.05


def test_preflight_names_the_ram_an_export_without_the_check_needs(tiny_loaded, tmp_path, monkeypatch):
    from qlora_magic.tasks import exporting

    session = qlora_magic.get_session()
    without_check = exporting.needed_room(session, "f16", streamed=True, verify=False)[0]
    monkeypatch.setattr(exporting, "free_ram", lambda: without_check)  # enough to write, not to check
    monkeypatch.setattr(exporting, "needed_room", lambda s, q, streamed=True, verify=True: (without_check + (2**30 if verify else 0), 0))
    with pytest.raises(exporting.NoRoomError, match="--no-verify: about") as info:
        qlora_magic.export("gguf", tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    qlora_magic.export("gguf", tmp_path / "out", verify=False)
    assert list((tmp_path / "out").glob("*.gguf"))


def trained_lora(model, std=0.1):
    """`model` with random LoRA B matrices: a fresh adapter's are zero, and its merge would change nothing."""
    import torch

    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=std)
    return model


def assert_file_is_the_merge(path, session):
    """The GGUF file's weights are the in-memory merge's (PEFT's merge_and_unload of the reloaded base in float32)
    to f16 rounding, tensor for tensor."""
    import torch

    from qlora_magic.engine import gguf_file
    from qlora_magic.tasks.merging import merged_model

    merged, _, _ = merged_model(session, "default", torch.float32)
    expected = merged.state_dict()
    back = gguf_file.read_gguf(path, merged)
    tied = merged.config.tie_word_embeddings
    assert set(back) == {k for k in expected if not (tied and k == "lm_head.weight")}
    for name, weight in back.items():
        want = expected[name].float()
        assert (weight - want).abs().le(want.abs() * 2**-10 + 2**-24).all(), name  # f16: 11 significant bits


def test_a_sharded_hub_model_in_the_cache_exports_streamed_with_no_connection(tiny_model_dir, hub_cache, online_by_default,
                                                                              no_network, tmp_path):
    """The base found as %qlora_merge finds it (a Hub id: its cached snapshot), read shard by shard."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(sharded, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").exists()
    cache_model(hub_cache, "someone/tiny", sharded)
    torch.manual_seed(0)
    qlora_magic.load("someone/tiny", bits=8)
    session = qlora_magic.get_session()
    trained_lora(session.model)
    report = qlora_magic.export("gguf", tmp_path / "out", verify=False)
    assert report.merge.startswith("streamed") and "snapshots" in report.base and no_network == []
    assert_file_is_the_merge(report.path, session)


def test_a_hub_base_not_in_the_cache_is_not_streamed(tiny_loaded, hub_cache, online_by_default, no_network):
    """Nothing is downloaded before the preflight: a Hub id whose files are not cached merges in memory."""
    from qlora_magic.engine.streamed_merge import stream_plan

    plan, why = stream_plan(tiny_loaded.model, "default", "someone/not-cached")
    assert plan is None and why == "someone/not-cached is not in the local Hugging Face cache" and no_network == []
