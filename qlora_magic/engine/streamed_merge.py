"""An adapter merged into its base one tensor at a time, straight from the base's safetensors files.

Reloading the whole 16-bit base to merge it (what `%qlora_merge` does) needs the model's size in RAM: 14 GB for
a 7B model, more than a Colab has (the crash of unsloth#1389, #2193). Here each base tensor is read from its shard
(safetensors maps the file; one tensor is copied out), the LoRA update `scaling * B @ A` of its layer is added in
float32 (PEFT's `get_delta_weight`, with `fan_in_fan_out` and the per-layer scaling PEFT computed: alpha / r, or
alpha / sqrt(r) with rslora), and the caller writes it and lets it go. The LoRA weights come from the session's
adapter, which is small.

Adapters PEFT merges some other way (DoRA, a LoRA bias, LoRA on embeddings, whole modules trained as
modules_to_save) are not streamed: `stream_plan` says why, and the export merges in memory instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


@dataclass
class StreamPlan:
    """Where each base tensor is, and the LoRA update of each adapted weight."""

    folder: Path
    files: dict  # {tensor name: safetensors file}
    shapes: dict  # {tensor name: shape}, in the files' order
    updates: dict = field(default_factory=dict)  # {weight name: (A, B, scaling, fan_in_fan_out)}

    def load(self, name: str):
        """The merged weight `name` as float32 numpy: the base's, plus its LoRA update if it has one."""
        import torch
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as shard:
            weight = shard.get_tensor(name).float()
        if name in self.updates:
            a, b, scaling, fan_in_fan_out = self.updates[name]
            with torch.no_grad():
                delta = (b.float().cpu() @ a.float().cpu()) * scaling
                weight += delta.T if fan_in_fan_out else delta
        return weight.numpy()


def base_folder(base_path: str) -> Path | None:
    """The folder holding the base's files: `base_path` itself, or for a Hub id its cached snapshot (None when it
    is not cached: nothing is downloaded before the preflight)."""
    if Path(base_path).is_dir():
        return Path(base_path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(base_path, allow_patterns=["*.safetensors", INDEX, "config.json"], local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def stream_plan(model, adapter: str, base_path: str) -> tuple[StreamPlan | None, str]:
    """(the plan, "") when adapter `adapter` of the PEFT `model` can be merged tensor by tensor into the base at
    `base_path`; else (None, why not)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    from safetensors import safe_open

    folder = base_folder(base_path)
    if folder is None:
        return None, f"{base_path} is not in the local Hugging Face cache"
    if (folder / INDEX).exists():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        files = {name: folder / file for name, file in weight_map.items()}
    elif (folder / SINGLE).exists():
        files = None
    else:
        return None, "the base has no safetensors files"
    shapes, where = {}, {}
    for file in dict.fromkeys(files.values()) if files else [folder / SINGLE]:
        with safe_open(str(file), framework="pt") as shard:
            for name in shard.keys():
                shapes[name] = tuple(shard.get_slice(name).get_shape())
                where[name] = file
    plan = StreamPlan(folder, where, shapes)
    for module_name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            return None, f"{module_name} is trained whole (modules_to_save)"
        if not isinstance(module, LoraLayer):
            continue
        if adapter in getattr(module, "lora_embedding_A", {}):
            return None, f"{module_name} has LoRA on an embedding"
        if adapter not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
            return None, "DoRA or a LoRA bias is merged by PEFT's own code"
        weight = module_name.removeprefix("base_model.model.") + ".weight"
        if weight not in shapes:
            return None, f"{weight} is not in the base's safetensors files"
        plan.updates[weight] = (module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                                module.scaling[adapter], bool(getattr(module, "fan_in_fan_out", False)))
    if not plan.updates:
        return None, f"adapter {adapter!r} has no LoRA weights on linear layers"
    return plan, ""
