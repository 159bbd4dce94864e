"""Load a base model quantized with bitsandbytes and put PEFT LoRA adapters on it."""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEFAULT_TARGETS, LoadConfig
from ..errors import AdapterError, ConfigError, ModelNotFoundError, QloraError
from ..display.formatting import Readout, count, gb
from .adapter_folder import AdapterFolder, check_complete, check_fits, read_adapter_folder, warn_if_other_base
from .memory_usage import MemoryReport, memory_report, release_memory
from .quiet import no_progress_bars, quiet_bnb_warnings
from .speed import use_expandable_segments

def choose_device(requested=None) -> str:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU here: use --device cpu.")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model(name) -> str:
    """A local folder (checked), or for a Hub id its cached folder or the id itself when the Hub answers
    (engine/offline.py); None is the embedded default model."""
    if name is None or name == "default":
        from .default_model import default_model_path

        return str(default_model_path())
    path = Path(name).expanduser()
    try:
        exists = path.exists()
    except OSError as error:  # a path no file system takes (a name over 255 bytes...)
        raise ModelNotFoundError(f"No model folder at {str(name)[:60]!r}... ({error.strerror or error}): give an existing folder or a Hub id.") from None
    looks_local = exists or str(name).startswith((".", "/", "~")) or str(name).count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise ModelNotFoundError(f"No model folder at {name!r}: give an existing folder with a config.json, or a Hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'.")
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{name!r} has no config.json, so it is not a model folder (for a saved adapter use --adapter {name}).")
        return str(path)
    from .offline import hub_model

    return hub_model(str(name))


#: Set while a worker of an FSDP run loads (`stored_for_sharding`): 4-bit weights are then stored in the compute
#: dtype (bnb_4bit_quant_storage), so FSDP can flatten and shard them with the model's other parameters; with
#: "host", the model is placed in CPU memory (quantized on its GPU all the same), for FSDP to move each layer's
#: shard to the GPU as it wraps it: a model whose weights do not fit one GPU never has to.
_SHARDED_STORAGE = {"on": False, "host": False}


@contextlib.contextmanager
def stored_for_sharding(on: bool = True, host: bool = False):
    """4-bit loads inside this block store their packed weights in the compute dtype (for FSDP); with `host`,
    in CPU memory (quantized_on_gpu)."""
    before = dict(_SHARDED_STORAGE)
    _SHARDED_STORAGE.update(on=on, host=on and host)
    try:
        yield
    finally:
        _SHARDED_STORAGE.update(before)


@contextlib.contextmanager
def quantized_on_gpu(gpu: str):
    """Inside this block, 4-bit weights loading onto the CPU are quantized on `gpu` and brought back, one tensor
    at a time: the same NF4 bytes as a load onto that GPU, in seconds, where bitsandbytes' CPU quantization takes
    about 30 min for a 70B model on two cores (32M parameters/s measured here). As transformers 4.x did for
    FSDP + QLoRA ("quantize on GPU, then move to CPU"), which transformers 5 no longer does."""
    import torch
    from bitsandbytes.nn import Params4bit

    quantize = Params4bit._quantize

    def quantize_there(self, device):
        if torch.device(device).type != "cpu":
            return quantize(self, device)
        quantize(self, gpu)
        self.data = self.data.to("cpu")
        self.quant_state.to("cpu")  # in place: the module's quant_state is this same object
        return self

    Params4bit._quantize = quantize_there
    try:
        yield
    finally:
        Params4bit._quantize = quantize


def quantization_config(bits: int, device: str, skip_modules=None):
    """bitsandbytes settings for --bits; `skip_modules` (for auto) are left unquantized by the 4-bit load."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits == 4:
        storage = {"bnb_4bit_quant_storage": compute_dtype(device)} if _SHARDED_STORAGE["on"] else {}
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(device),
            llm_int8_skip_modules=skip_modules,
            **storage,
        )
    return None


def compute_dtype(device: str):
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.startswith("cuda"):
        return torch.float16
    return torch.float32  # the CPU: fp32 is exact and as fast as bf16 on most cores


def default_targets(model):
    model_type = getattr(model.config, "model_type", None)
    return DEFAULT_TARGETS.get(model_type)  # None lets PEFT use its own per-architecture table


def check_targets(model, targets):
    """A one-line ConfigError when a --targets name matches no module of the model: PEFT adapts the names that
    do match and silently skips the rest, so q_proj,bogus_proj would train q_proj alone."""
    if not isinstance(targets, list):  # None (the default table) or "all-linear"
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__.startswith("Linear")})
        raise ConfigError(f"--targets {missing[0]!r} names no module of this model: choose from {', '.join(linear[:12])}"
                          f"{', ...' if len(linear) > 12 else ''}, or all-linear.")


def adapted_modules(model) -> list[str]:
    """The module names that carry LoRA layers (what 'all-linear' or a default resolved to)."""
    from peft.tuners.lora import LoraLayer

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoraLayer)})


#: --task -> (the transformers Auto class, PEFT's task type)
TASK_CLASSES = {
    "causal-lm": ("AutoModelForCausalLM", "CAUSAL_LM"),
    "seq-cls": ("AutoModelForSequenceClassification", "SEQ_CLS"),
    "seq2seq": ("AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM"),
}


def check_task(path, config: LoadConfig):
    """Fail in one line, before any weights load, when the model cannot do the task."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return  # resolved below by from_pretrained, which says why in its own error
    encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
    name = repr(config.model) if config.model else "The default model"
    if config.task == "seq2seq" and not encoder_decoder:
        raise ConfigError(f"{name} ({model_config.model_type}) is decoder-only: use --task causal-lm, or an encoder-decoder model such as google/flan-t5-base.")
    if config.task == "causal-lm" and encoder_decoder:
        raise ConfigError(f"{name} ({model_config.model_type}) is an encoder-decoder model: use --task seq2seq.")


@dataclass
class LoadedModel:
    """What `load_model` returns."""

    model: Any  # the PEFT model: the quantized base with LoRA on it
    tokenizer: Any
    config: LoadConfig  # with model, bits and targets filled in (and a restored adapter's own settings)
    report: "LoadReport"
    adapter_folder: AdapterFolder | None = None  # the saved adapter restored, as read (None without config.adapter)


def load_model(config: LoadConfig) -> LoadedModel:
    """Load the tokenizer and the quantized base model, then put new LoRA adapters on it, or restore the
    saved adapter `config.adapter` (its folder is read once, here, and returned with the model).

    Returns a LoadedModel: model, tokenizer, the config filled in, the LoadReport, and the AdapterFolder.
    """
    quiet_bnb_warnings()  # before peft imports bitsandbytes
    started = time.perf_counter()
    folder = read_adapter_folder(config.adapter) if config.adapter else None
    if folder is not None:
        config = settings_from_adapter(config, folder)
    config = config.replace(bits=config.bits or 8)
    with seeded(config.seed if folder is None else None):  # a restored adapter brings its own weights
        model, tokenizer, config, adaptive_report = load_quantized(config)
        if folder is None:
            model, config = add_lora(model, config)
    if folder is not None:
        try:
            model, config = restore_adapter(model, config, folder)
        except QloraError as error:  # an adapter that does not fit: the base goes, the traceback must not keep it
            model = error.__traceback__ = error.__context__ = None
            release_memory()
            raise error
    report = LoadReport.measure(model, config, time.perf_counter() - started, adaptive_report)
    return LoadedModel(model, tokenizer, config, report, folder)


@contextlib.contextmanager
def seeded(seed: int | None):
    """The new weights made in the block (LoRA matrices, a classifier's head) drawn from `seed` (None: as the
    process's random state has it), so the same seed gives the same start. The CPU's random state is put back
    after: a load does not change what the notebook's own torch.rand() calls draw next."""
    if seed is None:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the GPUs' generators too (a head made on the GPU): not put back, as set_seed
        yield


def settings_from_adapter(config: LoadConfig, folder: AdapterFolder) -> LoadConfig:
    """The config a saved adapter loads with: its base model and bits unless given, its task (and a classifier's
    head size), and with bits "auto" the 8-bit layers it was trained with (unless a new keep_8bit asks anew)."""
    saved = folder.load_settings
    saved_bits = saved.get("bits")
    if config.task == "causal-lm" and saved.get("task", "causal-lm") != "causal-lm":  # the adapter's own task
        config = config.replace(task=saved["task"], num_labels=saved.get("num_labels", 2))
    plan = {}
    if (config.bits or saved_bits) == "auto" == saved_bits and config.keep_8bit is None:
        plan = {"layers_8bit": config.layers_8bit or saved.get("layers_8bit"), "keep_8bit": saved.get("keep_8bit")}
    config = config.replace(model=config.model or folder.base, bits=config.bits or saved_bits, **plan)
    check_task_type(folder, config.task)
    return config


def check_task_type(folder: AdapterFolder, task: str):
    """One line when the adapter was saved for another task (adapter_config.json's task_type) than `task`."""
    saved = folder.lora.get("task_type")
    tasks = {peft_type: name for name, (_, peft_type) in TASK_CLASSES.items()}
    if saved and saved != TASK_CLASSES[task][1]:
        fix = f"load it with {folder.load_command} --task {tasks[saved]}" if saved in tasks else "qlora_magic loads causal-lm, seq-cls and seq2seq adapters"
        raise AdapterError(f"Adapter {str(folder.path)!r} was trained for {tasks.get(saved, saved)}, not {task}: {fix}.")


def load_quantized(config: LoadConfig):
    """The tokenizer and the base model quantized as `config.bits` says, ready for k-bit training.
    Returns (model, tokenizer, config with the 8-bit layers filled in for "auto", the AdaptiveReport or None)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    device = choose_device(config.device)
    path = resolve_model(config.model)
    check_task(path, config)
    if device.startswith("cuda"):
        use_expandable_segments()
    # A classifier's head is new: num_labels sizes it (the label names come from the data at training).
    head = {"num_labels": config.num_labels} if config.task == "seq-cls" else {}
    model_class = getattr(transformers, TASK_CLASSES[config.task][0])
    dtype = compute_dtype(device) if device.startswith("cuda") else torch.float32
    # An FSDP worker whose model does not fit its GPU: in CPU memory, quantized on the GPU (stored_for_sharding).
    on_host = _SHARDED_STORAGE["host"] and device.startswith("cuda") and config.bits == 4
    placement = {"": "cpu"} if on_host else {"": device}
    adaptive_report = None
    try:
        with no_progress_bars(), quiet_new_head_warning(), \
                (quantized_on_gpu(device) if on_host else contextlib.nullcontext()):
            tokenizer = AutoTokenizer.from_pretrained(path)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            if config.bits == "auto":  # NF4, but for the layers measured (or saved) as needing 8 bits
                adaptive_report, config, skip = plan_auto(model_class, path, tokenizer, config, dtype, device, head)
                quantization = quantization_config(4, device, skip_modules=skip)
            else:
                quantization = quantization_config(config.bits, device)
            model = model_class.from_pretrained(
                path,
                quantization_config=quantization,
                dtype=dtype,
                # "auto": accelerate places whole layers on each GPU in turn (the CPU when none has room)
                device_map="auto" if config.device_map == "auto" else placement,
                **head,
            )
    except OSError as error:
        raise ModelNotFoundError(
            f"Cannot load model {config.model!r}: {str(error).splitlines()[0]} "
            "Give a local model folder, or a Hub id while online."
        ) from None
    if on_host:
        from .distributed import TRAINS_ON

        setattr(model, TRAINS_ON, device)  # its run trains on the GPU (training_device), FSDP moving the shards there
    if config.bits == "auto":
        from .adaptive import to_int8

        to_int8(model, config.layers_8bit, device)
    if config.task == "seq-cls":
        model.config.pad_token_id = tokenizer.pad_token_id  # decoders classify from the last non-pad token
    if config.bits in (4, 8, "auto"):
        model = prepare_for_kbit_training(model, dtype, config.task)
    return model, tokenizer, config, adaptive_report


def prepare_for_kbit_training(model, dtype, task: str):
    """The base frozen for LoRA. Its unquantized weights (embeddings, output head, norms) stay in the bf16 they
    were loaded in when bf16 is the compute dtype of a language model: PEFT's prepare_model_for_kbit_training
    makes them fp32, a habit from fp16 (where norms overflow) that in bf16 only doubles them: +2.1 GB for a
    128k-vocabulary 8B model, whose weights were bf16 (or rounded to it by the load) anyway. Elsewhere (fp16
    GPUs; a classifier, whose new head is trained) PEFT's casts are kept. Checkpointing is decided per run."""
    import torch
    from peft import prepare_model_for_kbit_training

    if dtype == torch.bfloat16 and task == "causal-lm":
        model.requires_grad_(False)
        return model
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def restore_adapter(model, config: LoadConfig, folder: AdapterFolder):
    """The saved adapter on the loaded base, trainable, once its weights are checked against the base (one line
    naming the base it was trained on when they do not fit); returns (model, config with its rank and targets)."""
    from peft import PeftModel

    check_fits(model, folder)
    try:
        with warnings.catch_warnings():  # check_complete says it in one line
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            model = PeftModel.from_pretrained(model, str(folder.path), is_trainable=True)
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise AdapterError(f"Cannot load adapter {str(folder.path)!r} ({str(error).splitlines()[0].rstrip(':')}): "
                           f"load it on the base it was trained on, {folder.load_command}") from None
    check_complete(model, "default", folder)
    warn_if_other_base(model, folder)
    lora = model.peft_config["default"]
    return model, config.replace(r=lora.r, alpha=lora.lora_alpha, dropout=lora.lora_dropout, targets=adapted_modules(model))


def add_lora(model, config: LoadConfig):
    """New LoRA adapters on `config.targets` (or the model type's default); returns (model, config with the
    module names they landed on)."""
    from peft import LoraConfig, get_peft_model

    targets = config.targets or default_targets(model)
    check_targets(model, targets)
    try:
        lora = LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=targets,
            bias="none",
            task_type=TASK_CLASSES[config.task][1],  # SEQ_CLS also trains the new head (PEFT's modules_to_save)
        )
        model = get_peft_model(model, lora)
    except ValueError as error:
        raise ConfigError(f"--targets {targets!r} does not fit this model: {str(error).splitlines()[0]}") from None
    return model, config.replace(targets=adapted_modules(model))


def plan_auto(model_class, path, tokenizer, config: LoadConfig, dtype, device, head):
    """For --bits auto: (the measurement, or None when the 8-bit layers are given, as when restoring an adapter;
    the config with the layers filled in; the modules the 4-bit load must leave unquantized: the 8-bit layers
    and those transformers always leaves, like the output head)."""
    import torch
    from transformers import AutoConfig
    from transformers.quantizers.base import get_keys_to_not_convert

    from .adaptive import DEFAULT_KEEP_8BIT, measure, quantizable_linears, skip_patterns
    from .memory_usage import release_memory

    report = None
    if config.layers_8bit is None:
        unquantized = model_class.from_pretrained(path, dtype=dtype, device_map={"": device}, **head)
        report = measure(unquantized, tokenizer, keep_8bit=DEFAULT_KEEP_8BIT if config.keep_8bit is None else config.keep_8bit,
                         texts=config.calibration)
        del unquantized
        release_memory()
        config = config.replace(layers_8bit=report.layers_8bit, keep_8bit=report.keep_8bit)
    with torch.device("meta"):  # the architecture alone, no weights
        skeleton = model_class.from_config(AutoConfig.from_pretrained(path, **head))
    unknown = sorted(set(config.layers_8bit) - set(quantizable_linears(skeleton)))
    if unknown:
        raise ConfigError(f"layers_8bit names {unknown[0]!r}, which is not a quantizable linear layer of this model: give such names, or leave layers_8bit out to measure them.")
    return report, config, get_keys_to_not_convert(skeleton) + skip_patterns(config.layers_8bit)


@contextlib.contextmanager
def quiet_new_head_warning():
    """transformers warns that a classifier head is newly initialized and "should be trained": that is
    what --task seq-cls is for, so the warning is noise here."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


@dataclass(repr=False)
class LoadReport(Readout):
    """What was loaded: quantization, footprint against the unquantized size, trainable parameters, memory."""

    model_name: str
    bits: int | str  # 4, 8, 16 or "auto"
    base_parameters: int
    trainable_parameters: int
    footprint: int
    targets: list
    r: int
    alpha: float
    memory: MemoryReport
    load_seconds: float
    adapter: str | None = None

    count_8bit: int = 0  # with bits "auto": how many layers are 8-bit and 4-bit
    count_4bit: int = 0
    adaptive: object = None  # with bits "auto" measured: the AdaptiveReport (sensitivities, quality table)

    title = "Model loaded"

    @classmethod
    def measure(cls, model, config: LoadConfig, seconds: float, adaptive=None):
        trainable, total = model.get_nb_trainable_parameters()
        if config.bits == "auto":
            from .adaptive import quantized_layers

            count_8bit, count_4bit = (len(names) for names in quantized_layers(model))
        else:
            count_8bit = count_4bit = 0
        return cls(
            model_name=config.model or "SmolLM2-135M-Instruct (embedded default)",
            bits=config.bits,
            base_parameters=total - trainable,
            trainable_parameters=trainable,
            footprint=int(model.get_memory_footprint()),
            targets=config.targets,
            r=config.r,
            alpha=config.alpha,
            memory=memory_report(model),
            load_seconds=seconds,
            adapter=config.adapter,
            count_8bit=count_8bit,
            count_4bit=count_4bit,
            adaptive=adaptive,
        )

    @property
    def quantization(self):
        if self.bits == "auto":
            return f"auto: {self.count_8bit} layers 8-bit (LLM.int8), {self.count_4bit} 4-bit NF4"
        return {8: "8-bit (LLM.int8)", 4: "4-bit NF4, double quantization", 16: "none (16/32-bit weights)"}[self.bits]

    @property
    def fp32_size(self):
        return self.base_parameters * 4

    @property
    def fp16_size(self):
        return self.base_parameters * 2

    @property
    def trainable_percent(self):
        return 100 * self.trainable_parameters / (self.base_parameters + self.trainable_parameters)

    def rows(self):
        rows = [
            ("model", self.model_name),
            ("quantization", self.quantization),
            ("footprint", f"{gb(self.footprint)}  (fp32 {gb(self.fp32_size)}, fp16 {gb(self.fp16_size)}: "
                          f"{self.fp32_size / self.footprint:.1f}x / {self.fp16_size / self.footprint:.1f}x smaller)"),
            ("LoRA", f"r={self.r}, alpha={self.alpha:g} on {', '.join(self.targets)}"),
            ("trainable", f"{self.trainable_parameters:,} of {self.base_parameters + self.trainable_parameters:,} "
                          f"({self.trainable_percent:.3f}%, {count(self.trainable_parameters)})"),
        ]
        if self.adapter:
            rows.append(("adapter", self.adapter))
        if self.adaptive is not None:
            rows += [(f"  {label}", value) for label, value in self.adaptive.rows()]
        rows += self.memory.rows()
        rows.append(("load time", f"{self.load_seconds:.1f} s"))
        return rows
