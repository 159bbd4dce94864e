"""A merged Llama-architecture model written to one GGUF file (llama.cpp, Ollama, LM Studio), and read back.

The `gguf` package (llama.cpp's own Python library) gives the writer, the tensor names (`TensorNameMap`), the
tokenizer readers (`BpeVocab`, `SpecialVocab`, used in `gguf_tokenizer`) and the quantizers
(`gguf.quants`: Q8_0, Q4_0, ... in numpy). What it does not ship is llama.cpp's `convert_hf_to_gguf.py` (no PyPI
package carries it), so the per-architecture part lives here, for Llama only (SmolLM2, Llama 2/3, TinyLlama,
...): the hyperparameters, and the rotary layout of the query and key weights (`permute`, as the converter does).
"""

from __future__ import annotations

from pathlib import Path

#: --quant: the GGML type of the 2-D weights (norms stay float32, as llama.cpp's converter keeps them)
QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
#: bytes per weight of each type (blocks of 32 with their scales), for the size estimate
QUANT_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32,
               "q4_0": 18 / 32}
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def check_architecture(config) -> None:
    """One-line error for a model the writer cannot convert."""
    from ..errors import ConfigError

    found = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if found not in SUPPORTED_ARCHITECTURES or _rope(config).get("rope_type", "default") != "default":
        raise ConfigError(f"GGUF export supports Llama-architecture causal LMs without rope scaling (SmolLM2, Llama 2, "
                          f"TinyLlama), not {found}: use %qlora_merge and llama.cpp's convert_hf_to_gguf.py on its folder.")


def _rope(config) -> dict:
    """The rotary settings: `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (4.x)."""
    found = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    found.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return found


def _ggml_type(quant: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16}.get(quant) or getattr(gguf.GGMLQuantizationType, quant.upper())


def _file_type(quant: str):
    import gguf

    return getattr(gguf.LlamaFileType, "ALL_F32" if quant == "f32" else f"MOSTLY_{quant.upper()}")


def permute(weights, n_head: int, n_head_kv: int | None = None):
    """Hugging Face's rotary halves -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py's LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def unpermute(weights, n_head: int, n_head_kv: int | None = None):
    """The inverse of `permute`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _heads(config, hf_name: str):
    """(n_head, n_head_kv) when `hf_name` is a query or key weight (permuted), else None."""
    heads = config.num_attention_heads
    if hf_name.endswith("q_proj.weight"):
        return heads, heads
    if hf_name.endswith("k_proj.weight"):
        return heads, getattr(config, "num_key_value_heads", None) or heads
    return None


def tensor_names(model, names=None) -> dict:
    """{Hugging Face name: GGUF name} for every weight of a Llama model's state dict, or of `names` (the keys of
    its safetensors files) with `model` its config; a tied head is left out."""
    import gguf

    config = getattr(model, "config", model)
    table = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    mapping = {}
    for name in model.state_dict() if names is None else names:
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False) or name.endswith("rotary_emb.inv_freq"):
            continue  # a tied head is the embedding; rotary frequencies are recomputed from rope_theta
        found = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ValueError(f"no GGUF name for tensor {name}")
        mapping[name] = found
    return mapping


def write_gguf(model, tokenizer, path: Path, quant: str, name: str) -> int:
    """Write `model` (a merged LlamaForCausalLM) and its tokenizer to `path` in `quant`; returns the file's size."""
    state = model.state_dict()
    shapes = {key: tuple(state[key].shape) for key in tensor_names(model)}
    return write_gguf_tensors(model.config, tokenizer, path, quant, name, shapes, lambda key: state[key].float().numpy())


def write_gguf_tensors(config, tokenizer, path: Path, quant: str, name: str, shapes: dict, load) -> int:
    """Write the weights `load(hf_name)` gives (float32 numpy, one at a time, in the order of `shapes`:
    {Hugging Face name: shape}) and the tokenizer to `path` in `quant`; returns the file's size.

    Every tensor's type and size is known from its shape, so the header and tensor index are written first and
    then each tensor as soon as it is converted: the writer holds one tensor, not the whole file."""
    import gguf
    import numpy as np

    from .gguf_tokenizer import add_tokenizer

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(quant))
    add_tokenizer(writer, tokenizer, config.vocab_size)

    names = tensor_names(config, shapes)
    kinds = {hf_name: _tensor_type(shapes[hf_name], quant) for hf_name in names}
    for hf_name, gguf_name in names.items():
        kind, shape = kinds[hf_name], shapes[hf_name]
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        else:  # given as bytes: the writer turns the byte shape back into the weight shape
            raw = gguf.quants.quant_shape_to_byte_shape(shape, kind)
            writer.add_tensor_info(gguf_name, raw, np.dtype(np.uint8), int(np.prod(raw)), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name in names:
        data, kind = load(hf_name), kinds[hf_name]
        heads = _heads(config, hf_name)
        if heads:
            data = permute(data, *heads)
        if kind == gguf.GGMLQuantizationType.F32:
            data = data.astype(np.float32)
        elif kind == gguf.GGMLQuantizationType.F16:
            data = data.astype(np.float16)
        else:
            data = gguf.quants.quantize(data, kind)
        writer.write_tensor_data(np.ascontiguousarray(data))
        del data
    writer.close()
    return Path(path).stat().st_size


def _tensor_type(shape, quant: str):
    """The GGML type a tensor of `shape` is written in: norms (1-D) stay float32, as in llama.cpp's converter."""
    import gguf

    if len(shape) == 1 or quant == "f32":
        return gguf.GGMLQuantizationType.F32
    kind = _ggml_type(quant)
    if kind not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16) and shape[-1] % 32:
        return gguf.GGMLQuantizationType.F16  # rows not a whole number of blocks: llama.cpp's converter falls back too
    return kind


def read_gguf(path: Path, model) -> dict:
    """{Hugging Face name: float32 tensor} of `model`'s weights as the file holds them (dequantized, un-permuted)."""
    return dict(read_gguf_tensors(path, model))


def read_gguf_tensors(path: Path, model):
    """(Hugging Face name, float32 tensor) of each of `model`'s weights as the file holds them, one at a time."""
    import gguf
    import numpy as np
    import torch

    reader = gguf.GGUFReader(str(path))  # maps the file: a tensor is read when dequantized
    stored = {t.name: t for t in reader.tensors}
    for hf_name, gguf_name in tensor_names(model).items():
        tensor = stored[gguf_name]
        data = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
        data = data.reshape(tuple(reversed([int(n) for n in tensor.shape])))
        heads = _heads(model.config, hf_name)
        if heads:
            data = unpermute(data, *heads)
        yield hf_name, torch.from_numpy(np.ascontiguousarray(data))


def metadata(path: Path) -> dict:
    """The file's key-value metadata (strings and numbers; arrays as their length), for checks and reports."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    found = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            found[key] = len(field.data)
        else:
            found[key] = field.contents()
    return found
