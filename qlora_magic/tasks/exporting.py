"""%qlora_export gguf PATH: the adapter merged into the original weights (as %qlora_merge merges it: not into the
quantized ones), written to one GGUF file (and an Ollama Modelfile), then checked against the adapter the session
trained.

The merge streams (engine/streamed_merge.py): one base tensor at a time from the safetensors shards, the LoRA
update added, converted and written before the next, so RAM holds a tensor, not the model. Adapters PEFT merges its
own way (DoRA, ...) are merged in memory through `merging.merged_model`. Before anything is loaded a preflight adds
up the RAM (the merge, and the check's model) and the disk (the file) and refuses in one line when either is short:
the crash peers meet halfway through a merge (out of RAM or disk) happens here before it starts.

The check reads the file back: its tensors dequantized into a transformers model, which then answers and scores
the held-out rows as `%qlora_merge`'s check does (the drift includes the quantization's). When llama.cpp's Python
binding (`llama-cpp-python`) is installed, the file is loaded by llama.cpp itself and its greedy answers and
perplexity are the ones compared: the runtime users serve it with.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ExportConfig
from ..display.formatting import gb
from ..engine.adapters import active_adapter, check_adapter
from ..errors import ConfigError, QloraError
from .merging import MergeReport, _check_data, checked_after_writing, merged_model

#: up to this many parameters the check's model computes in float32, as llama.cpp does on a CPU (and twice as fast
#: there as float16); a larger one is read back in 16 bits, half the RAM
FLOAT32_CHECK = 2 * 10**9
#: headroom on top of the estimate: the process itself, the tokenizer, numpy's temporaries of one tensor
RAM_MARGIN, DISK_MARGIN = 512 * 2**20, 64 * 2**20


class NoRoomError(QloraError):
    """Not enough RAM or disk for an export: nothing was started."""


def free_ram() -> int:
    import psutil

    return psutil.virtual_memory().available


def free_disk(path: Path) -> int:
    """Free bytes on the file system `path` (or its nearest existing parent) is on."""
    path = Path(path).expanduser().absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def needed_room(session, quant: str, streamed: bool = True, verify: bool = True) -> tuple[int, int]:
    """(RAM, disk) bytes an export of the loaded model in `quant` needs.

    Streamed, the merge holds one tensor at a time (read, merged in float32, permuted, converted: about four
    float32 copies of the largest one); in memory, the whole base in 16 bits. The check reads the file back into
    a model in 16 bits (32 for f32), or llama.cpp maps the file."""
    import importlib.util

    from ..engine.gguf_file import QUANT_BYTES

    count = _parameters(session)
    config = session.model.config
    largest = config.hidden_size * max(config.vocab_size, config.intermediate_size)
    file = int(count * QUANT_BYTES[quant])
    merge = 4 * 4 * largest if streamed else count * (4 if quant == "f32" else 2) + file
    runtime = file if importlib.util.find_spec("llama_cpp") else count * check_dtype(session, quant).itemsize
    check = runtime + 4 * largest if verify else 0
    return max(merge, check) + RAM_MARGIN, file + DISK_MARGIN


def _parameters(session) -> int:
    from .doctor import model_weights

    weights = model_weights(session)
    return weights["linear"] + weights["other"]


def check_dtype(session, quant: str):
    """The dtype the check's model holds the file's weights in."""
    import torch

    if quant == "f32" or _parameters(session) <= FLOAT32_CHECK:
        return torch.float32
    return torch.bfloat16 if quant == "bf16" else torch.float16


def preflight(session, config: ExportConfig, path: Path, streamed: bool = True) -> None:
    """Refuse in one line, before anything is loaded or written, when RAM or disk is short."""
    ram, disk = needed_room(session, config.quant, streamed, config.verify)
    available = free_ram()
    short = [f"{what}: needs about {gb(need)}, {gb(free)} free" for what, need, free in
             (("RAM", ram, available), (f"disk at {path.parent}", disk, free_disk(path))) if free < need]
    if short:
        unchecked = needed_room(session, config.quant, streamed, False)[0]
        hint = f" (--no-verify: about {gb(unchecked)} of RAM)" if available < ram and unchecked < ram else ""
        raise NoRoomError(f"Not enough room to export in {config.quant} ({'; '.join(short)}): free some, choose a smaller "
                          f"--quant, or export on a larger machine{hint} (nothing was written).")


def gguf_name(session, quant: str) -> str:
    base = getattr(session.load_config, "model", None) or "SmolLM2-135M-Instruct"
    return f"{Path(str(base)).name or 'model'}-{quant}.gguf"


def export_model(session, config: ExportConfig) -> "ExportReport":
    """Write the merged model as GGUF to the folder `config.path` (with `config.ollama`, a Modelfile beside it) and,
    with `config.verify`, compare its answers and perplexity with the adapter's."""
    import torch

    from ..engine.folder_writing import check_folder_path, folder_written
    from ..engine.gguf_file import check_architecture, write_gguf, write_gguf_tensors
    from ..engine.gguf_tokenizer import pre_tokenizer_note
    from ..engine.loading import resolve_model
    from ..engine.streamed_merge import stream_plan

    model = session.require_model("exporting")
    if session.task != "causal-lm":
        raise ConfigError(f"GGUF export is for causal language models; this session's task is {session.task}: use %qlora_merge.")
    check_architecture(model.config)
    name = check_adapter(model, config.adapter) if config.adapter else active_adapter(model)
    path = check_folder_path(config.path, "The export folder")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"{str(path)!r} already exists and is not empty: choose a new folder for the export.")
    base_path = resolve_model(session.load_config.model if session.load_config else None)
    plan, why = stream_plan(model, name, base_path)
    preflight(session, config, path, streamed=plan is not None)
    started = time.perf_counter()
    check = _check_data(session, config) if config.verify else None  # bad data= fails before anything is written
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}.get(config.quant, torch.float16)
    filename = gguf_name(session, config.quant)
    with folder_written(path, "the GGUF export") as staging:  # whole, or not at all
        if plan is not None:  # tensor by tensor from the base's files: RAM for one tensor, not the model
            size = write_gguf_tensors(model.config, session.tokenizer, staging / filename, config.quant,
                                      filename.removesuffix(".gguf"), plan.shapes, plan.load)
        else:
            merged, _, _ = merged_model(session, name, dtype)
            size = write_gguf(merged, session.tokenizer, staging / filename, config.quant, filename.removesuffix(".gguf"))
            del merged
        if config.ollama:
            (staging / "Modelfile").write_text(modelfile(filename, session.tokenizer, model.generation_config))
    report = ExportReport(path=str(path / filename), adapter=name, dtype=config.quant, base=str(base_path), size=size,
                          seconds=0.0, tolerance=config.tolerance, task=session.task,
                          modelfile=str(path / "Modelfile") if config.ollama else None,
                          tokenizer=pre_tokenizer_note(session.tokenizer),
                          merge="streamed tensor by tensor from the base's safetensors" if plan else f"in memory ({why})")
    if config.verify:
        with checked_after_writing("export", path / filename, "%qlora_export"):
            _verify(session, model, name, check_dtype(session, config.quant), config, report, check)
    report.seconds = time.perf_counter() - started
    return report


def read_back(path: Path, config, dtype):
    """A transformers model holding the GGUF file's weights (dequantized), in `dtype`, on the CPU."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from ..engine.gguf_file import read_gguf_tensors

    config = copy.deepcopy(config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    with no_init_weights():  # every weight is overwritten from the file
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = model.state_dict()
    with torch.no_grad():
        for key, value in read_gguf_tensors(path, model):
            state[key].copy_(value)
    model.tie_weights()
    return model.eval()


def _verify(session, model, name, dtype, config, report, check):
    """The adapter's answers and perplexity against llama.cpp's on the file when it is installed, else against
    the file's weights read back into transformers."""
    from .merging import _verify_answers

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        report.runtime = ("the file's tensors read back (gguf) into transformers; for llama.cpp's own check: "
                          "%pip install llama-cpp-python")
        exported = read_back(Path(report.path), model.config, dtype)  # the file's weights: what llama.cpp multiplies with
        _verify_answers(session, model, name, exported, config, report, check)
        return
    from ..engine.llama_runtime import llama_answers, llama_nll, release
    from .merging import adapter_side

    prompts, tokenized, chat = check
    tok = session.tokenizer
    adapter_side(model, tok, name, config, check, report)
    try:
        report.merged_answers = llama_answers(report.path, tok, prompts, config.max_new_tokens, chat)
        if tokenized is not None:
            nll, n = llama_nll(report.path, tokenized)
            report.merged_perplexity = math.exp(nll / n)
    finally:
        release()
    report.runtime = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"


def modelfile(filename: str, tokenizer, generation_config) -> str:
    """An Ollama Modelfile: the file, the chat template as Ollama's Go template, the stop tokens (the tokenizer's
    eos, the generation config's eos ids, the template's end of turn) and the generation config's sampling."""
    template = getattr(tokenizer, "chat_template", None) or ""
    lines = [f"FROM ./{filename}", ""]
    if "<|im_start|>" in template:  # ChatML (SmolLM2, Qwen, ...): the same turns in Go's template language
        lines += ['TEMPLATE """{{- if .System }}<|im_start|>system', '{{ .System }}<|im_end|>', '{{ end }}',
                  '{{- range .Messages }}<|im_start|>{{ .Role }}', '{{ .Content }}<|im_end|>', '{{ end }}<|im_start|>assistant', '"""']
        default_system = _default_system(template)
        if default_system:
            lines.append(f'SYSTEM """{default_system}"""')
    elif template:  # Ollama reads the GGUF's own tokenizer.chat_template and picks the matching template itself
        lines.append("# TEMPLATE: taken by Ollama from the GGUF's tokenizer.chat_template (not ChatML, not translated here)")
    stops = []
    eos_ids = getattr(generation_config, "eos_token_id", None)
    for token_id in ([eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])) + [tokenizer.eos_token_id]:
        if token_id is not None:
            stops.append(tokenizer.convert_ids_to_tokens(int(token_id)))
    if "<|im_end|>" in template:
        stops.append("<|im_end|>")
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f'PARAMETER stop "{stop}"')
    sampling = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}
    for key, ollama_key in sampling.items():
        value = getattr(generation_config, key, None)
        if value is not None and getattr(generation_config, "do_sample", False) or key == "repetition_penalty" and value not in (None, 1.0):
            lines.append(f"PARAMETER {ollama_key} {value}")
    return "\n".join(lines) + "\n"


def _default_system(template: str) -> str | None:
    """The system text a template puts in when the messages have none (SmolLM2's "You are a helpful AI ...")."""
    import re

    found = re.search(r"<\|im_start\|>system\\n(.+?)<\|im_end\|>", template)
    return found.group(1) if found and "{{" not in found.group(1) else None


@dataclass(repr=False)
class ExportReport(MergeReport):
    """Where the GGUF file went, and how closely it matches the adapter it came from."""

    modelfile: str | None = None
    runtime: str = ""
    tokenizer: str = ""  # the pre-tokenizer written, or the warning that text may split differently
    merge: str = ""  # streamed, or in memory and why

    title = "GGUF export"

    def rows(self):
        rows = super().rows()
        rows[0] = ("saved to", f"{self.path} ({gb(self.size)}, {self.dtype})")
        extra = [("Ollama", f"ollama create NAME -f {self.modelfile}")] if self.modelfile else []
        extra += [("merge", self.merge)] if self.merge else []
        extra += [("tokenizer", self.tokenizer)] if self.tokenizer else []
        extra += [("checked by", self.runtime)] if self.runtime else []
        rows[2:2] = extra
        return [(label, value.replace("the merged model on the original weights", f"the export on its {self.dtype} weights"))
                for label, value in rows]
