"""The adapter folder: PEFT's own format (adapter_config.json + adapter_model.safetensors, loadable by plain
`PeftModel.from_pretrained`), the tokenizer, and our run record `qlora_magic.json` beside them. Writing one
(whole, through folder_writing) and reading one back (checked against the model before anything is loaded: the
safetensors header, the ranks, the shapes, the base's fingerprint) both live here, and so does the typed record
of a training run (`TrainRun`) that the session keeps and `qlora_magic.json` saves."""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainConfig
from ..errors import AdapterError, ConfigError, ModelNotFoundError

RUN_FILE = "qlora_magic.json"  # our side file next to a saved adapter: load/train configs, metrics
_ROWS_NOTE = re.compile(r"<(?P<kind>[^<>]+?)(?: of (?P<count>\d+) rows)?>")  # "<list of 100 rows>", "<Dataset>"


@dataclass(frozen=True)
class DataSource:
    """Where a run's rows came from, as qlora_magic.json keeps it: a file, folder or Hub id (`location`), which can
    be loaded again, or in-memory rows (`kind` of `count` rows: a list, DataFrame or Dataset), which are not saved.

    >>> DataSource.of([{"q": "x"}] * 100)
    DataSource(location=None, kind='list', count=100)
    """

    location: str | None = None
    kind: str | None = None  # in-memory rows: their type's name
    count: int | None = None  # in-memory rows: how many (None when the object has no length)

    @classmethod
    def of(cls, data) -> "DataSource":
        if data is None:
            return cls()
        if isinstance(data, (str, Path)):
            return cls(location=str(data))
        try:
            return cls(kind=type(data).__name__, count=len(data))
        except TypeError:
            return cls(kind=type(data).__name__)

    def to_json(self):
        """The JSON value of qlora_magic.json's "data": the location, or a note like "<list of 100 rows>"."""
        if self.kind is None:
            return self.location
        return f"<{self.kind}>" if self.count is None else f"<{self.kind} of {self.count} rows>"

    @classmethod
    def from_json(cls, value) -> "DataSource":
        note = _ROWS_NOTE.fullmatch(value) if isinstance(value, str) else None
        if note:
            return cls(kind=note["kind"], count=None if note["count"] is None else int(note["count"]))
        return cls(location=None if value is None else str(value))


@dataclass
class TrainRun:
    """One training run as the session keeps it and qlora_magic.json saves it.

    config: the TrainConfig it ran with. In the session that trained, its `data` is what was given (a path, or
        the rows themselves); restored from a saved adapter, it is the saved location, or None for in-memory rows.
    source: where the rows came from (`DataSource`), and so whether they can be loaded again.
    label_names: a classifier's class names in id order (None for the other tasks).
    """

    config: TrainConfig
    source: DataSource = field(default_factory=DataSource)
    label_names: list | None = None

    @classmethod
    def of(cls, config: TrainConfig, label_names=None) -> "TrainRun":
        return cls(config, DataSource.of(config.data), None if label_names is None else list(label_names))

    @property
    def data(self):
        """What `load_rows` takes to make the rows again, or None when they were in-memory rows not saved."""
        return self.config.data

    def to_dict(self) -> dict:
        """The dict form (`Session.train_configs`): the TrainConfig's fields, "data" as given (the note of unsaved
        in-memory rows once restored), and "label_names" for a classifier."""
        record = {**self.config.replace(data=None).to_dict(), "data": self.config.data}
        if record["data"] is None:
            record["data"] = self.source.to_json()
        if self.label_names is not None:
            record["label_names"] = list(self.label_names)
        return record

    def to_json(self) -> dict:
        """One entry of qlora_magic.json's "train_configs" (in-memory rows noted, not copied)."""
        return {**self.to_dict(), "data": self.source.to_json()}

    @classmethod
    def from_dict(cls, record: dict) -> "TrainRun":
        """Read back an entry of qlora_magic.json (this version's `to_json` or an earlier version's: the same
        form) or a `to_dict`; keys this version no longer knows are dropped."""
        data = record.get("data")
        if data is None or isinstance(data, str):  # a location, or the note of in-memory rows not saved
            source = DataSource.from_json(data)
            data = source.location
        else:  # the rows themselves (a `to_dict` of this session)
            source = DataSource.of(data)
        return cls(TrainConfig.from_dict({**record, "data": data}), source, record.get("label_names"))


def describe_data(data):
    """A JSON-safe note of where data came from (in-memory data is summarized, not copied)."""
    return DataSource.of(data).to_json()


CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's saved weight names start so; the rest is the layer's name in the model
_LORA_WEIGHT = re.compile(r"(?P<module>.+)\.(?P<kind>lora_(?:embedding_)?[AB])(?:\.weight)?")


class OtherBaseWarning(UserWarning):
    """A saved adapter was loaded on a base of the same shapes whose weights differ from those it was trained on."""


@dataclass
class AdapterFolder:
    """A saved adapter folder, read once and checked: its LoRA settings and weight shapes (the safetensors header
    only), the base model it was trained on, and what qlora_magic saved beside it (load settings, training runs,
    history, the base's fingerprint; all empty for an adapter saved by other tools)."""

    path: Path
    base: str | None  # a Hub id or folder; None is the embedded default model
    load_settings: dict = field(default_factory=dict)  # the saved LoadConfig's fields (bits, task, 8-bit layers, ...)
    runs: list = field(default_factory=list)  # TrainRun, in order
    history: list = field(default_factory=list)
    lora: dict = field(default_factory=dict)  # adapter_config.json
    shapes: dict = field(default_factory=dict)  # saved weight name -> shape
    base_check: dict = field(default_factory=dict)  # the base's model type and fingerprint (base_fingerprint)

    @property
    def trained_on(self) -> str:
        return self.base or "the embedded default model"

    @property
    def load_command(self) -> str:
        """The magic that loads this adapter on the base it was trained on."""
        base = f"{shlex.quote(self.base)} " if self.base else ""
        return f"%qlora_load {base}--adapter {shlex.quote(str(self.path))}"


def read_adapter_folder(adapter_path, missing=ModelNotFoundError) -> AdapterFolder:
    """Read and check a saved adapter folder before anything is loaded. One line (`missing` when there is no
    adapter there) when a file cannot be read, the weights are not safetensors or are cut short, or
    adapter_config.json's r does not match the weights."""
    try:
        path = Path(adapter_path).expanduser()
        found = (path / CONFIG_FILE).exists()
    except (TypeError, ValueError, RuntimeError, OSError) as error:  # a NUL, a lone surrogate, ~nobody, too long
        raise missing(f"No saved adapter at {str(adapter_path)!r} ({error}): give the folder %qlora_save wrote.") from None
    if not found:
        raise missing(f"No saved adapter at {str(adapter_path)!r} (adapter_config.json is missing): give the folder %qlora_save wrote.")
    lora = _read_json(path / CONFIG_FILE, AdapterError, "save the adapter again")
    if lora.get("peft_type") != "LORA":
        raise AdapterError(f"{str(path)!r} holds a {lora.get('peft_type')} adapter, not LoRA: qlora_magic loads LoRA adapters only.")
    shapes = _weight_shapes(path)
    _check_ranks(path, lora, shapes)
    record = saved_run(path)
    try:
        settings = dict(record.get("load_config", {}))
        if "model" in settings:  # our own save: None means the embedded default model
            base = settings["model"]
        else:
            base, settings = lora.get("base_model_name_or_path"), {}
        runs = [TrainRun.from_dict(run) for run in record.get("train_configs", [])]
        return AdapterFolder(path, base, settings, runs, list(record.get("history", [])), lora, shapes,
                             dict(record.get("base_check") or {}))
    except (TypeError, ValueError, KeyError, AttributeError) as error:  # a record edited by hand, or from a bad run
        raise ConfigError(f"{str(path / RUN_FILE)!r} cannot be read back ({str(error).splitlines()[0]}): fix it, or "
                          "delete it (the adapter then loads without its run record).") from None


def _read_json(file: Path, error, fix: str) -> dict:
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as problem:  # ValueError: not JSON, or not UTF-8
        raise error(f"{str(file)!r} cannot be read ({str(problem).splitlines()[0]}): {fix}.") from None
    if not isinstance(record, dict):
        raise error(f"{str(file)!r} holds a JSON {type(record).__name__}, not an object: {fix}.")
    return record


def _weight_shapes(path: Path) -> dict:
    """Each saved weight's shape, from the safetensors header (which safetensors checks against the file's size)."""
    from safetensors import SafetensorError, safe_open

    weights = path / WEIGHTS_FILE
    if not weights.exists():
        if (path / "adapter_model.bin").exists():
            raise AdapterError(f"{str(path)!r} holds adapter_model.bin, a pickle, which can run code when loaded: "
                               "save the adapter with safetensors (PEFT's save_pretrained does by default) and load that.")
        raise AdapterError(f"{str(path)!r} has no {WEIGHTS_FILE}: give the whole folder %qlora_save wrote.")
    try:
        with safe_open(str(weights), "pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{str(weights)!r} cannot be read ({str(error).splitlines()[0]}): it is cut short or "
                           "damaged; save the adapter again.") from None
    if not any(_LORA_WEIGHT.fullmatch(key) for key in shapes):
        raise AdapterError(f"{str(weights)!r} holds no LoRA weights: give the folder %qlora_save wrote.")
    return shapes


def _check_ranks(path: Path, lora: dict, shapes: dict):
    for key, shape in shapes.items():
        match = _LORA_WEIGHT.fullmatch(key)
        if not match or len(shape) < 2:
            continue
        rank = shape[0] if match["kind"].endswith("A") else shape[1]
        expected = _rank(lora, match["module"].removeprefix(_PREFIX))
        if rank != expected:
            raise AdapterError(f"{str(path / CONFIG_FILE)!r} says r={expected}, but the weights have rank {rank} "
                               f"({key.removeprefix(_PREFIX)}): set r to {rank} there, or save the adapter again.")


def _rank(lora: dict, module: str):
    """The rank adapter_config.json gives a layer: its rank_pattern entry, else r (as PEFT reads it)."""
    for pattern, rank in (lora.get("rank_pattern") or {}).items():
        with contextlib.suppress(re.error):
            if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
                return rank
    return lora.get("r")


def check_fits(model, folder: AdapterFolder):
    """One line naming the base the adapter was trained on when its weights do not fit `model` (another
    architecture, other sizes): checked from the shapes alone, before anything is loaded."""
    saved_type, model_type = folder.base_check.get("model_type"), getattr(model.config, "model_type", None)
    if saved_type and model_type and saved_type != model_type:
        raise _other_base(folder, f"a {saved_type} model, this is a {model_type}")
    layers = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's wrapper
    for key, shape in folder.shapes.items():
        name = key.removeprefix(_PREFIX)
        needed = _needed_shape(layers, name, shape)
        if needed is None:
            raise _other_base(folder, f"this model has no layer for its weight {name}")
        if needed != shape:
            raise _other_base(folder, f"its {name} is {list(shape)}, this model needs {list(needed)}")


def _other_base(folder: AdapterFolder, why: str) -> AdapterError:
    return AdapterError(f"Adapter {str(folder.path)!r} was trained on {folder.trained_on} and does not fit this model ({why}): "
                        f"load that base with {folder.load_command}")


def _needed_shape(layers, name: str, shape: tuple) -> tuple | None:
    """The shape the model needs for saved weight `name` (None when it has no such layer)."""
    match = _LORA_WEIGHT.fullmatch(name)
    module_name, _, attribute = (match["module"], "", "") if match else name.rpartition(".")
    try:
        module = _unwrapped(layers.get_submodule(module_name))
    except AttributeError:
        return None
    if match is None:  # a whole layer saved (PEFT's modules_to_save: a classifier's head)
        weight = getattr(module, attribute, None)
        return None if weight is None else tuple(weight.shape)
    sizes = _in_out(module)
    if sizes is None:  # a kind of layer whose sizes we cannot read: PEFT checks it when loading
        return shape
    return (shape[0], sizes[0], *shape[2:]) if match["kind"].endswith("A") else (sizes[1], *shape[1:])


def _unwrapped(module):
    """The layer itself, under PEFT's wrappers (a LoRA layer's base_layer, a saved module's original)."""
    while True:
        inner = getattr(module, "base_layer", None)
        if inner is None:
            inner = getattr(module, "original_module", None)
        if inner is None:
            return module
        module = inner


def _in_out(module) -> tuple | None:
    """A layer's (input, output) sizes, as LoRA's A and B matrices meet them."""
    for inputs, outputs in (("in_features", "out_features"), ("num_embeddings", "embedding_dim"), ("in_channels", "out_channels")):
        if hasattr(module, inputs):
            return getattr(module, inputs), getattr(module, outputs)
    if type(module).__name__ == "Conv1D":  # GPT-2's linear layers: the weight is (in, out)
        return tuple(module.weight.shape)
    return None


def check_complete(model, name: str, folder: AdapterFolder):
    """One line when adapter `name`, just loaded from `folder`, has LoRA layers the folder holds no weights for
    (they would keep their fresh initialisation)."""
    saved = {re.sub(r"\.(lora_(?:embedding_)?[AB])((?:\.weight)?)$", rf".\1.{name}\2", key) for key in folder.shapes}
    ours = re.compile(rf".+\.lora_(?:embedding_)?[AB]\.{re.escape(name)}(?:\.weight)?")
    missing = [n for n, _ in model.named_parameters() if ours.fullmatch(n) and n not in saved]
    if missing:
        raise AdapterError(f"{str(folder.path / WEIGHTS_FILE)!r} has no weights for {len(missing)} of the layers "
                           f"adapter_config.json targets (such as {missing[0].removeprefix(_PREFIX)}): save the adapter again.")


def base_fingerprint(model) -> dict:
    """What a saved adapter records of its base: the model type and 32 values of the input embedding. bitsandbytes
    never quantizes the embedding, so they are the same at 4, 8 and 16 bits (and within bf16 rounding on a GPU),
    while a base of the same shapes but other weights differs in them."""
    weight = model.get_input_embeddings().weight
    rows = sorted({round(i * (weight.shape[0] - 1) / 7) for i in range(8)})
    return {"model_type": getattr(model.config, "model_type", None), "embedding_rows": rows,
            "embedding": [float(f"{v:.6g}") for v in _embedding_values(model, rows)]}


def _embedding_values(model, rows) -> list:
    return model.get_input_embeddings().weight.detach()[rows, :4].float().cpu().flatten().tolist()


def base_differs(model, saved: dict) -> bool:
    """Whether `model`'s embedding differs from the fingerprint saved with an adapter (False when none was saved).
    The tolerance, 1% of the value, covers fp32 vs bf16 rounding and nothing a different training would give."""
    try:
        rows, values = list(saved["embedding_rows"]), list(saved["embedding"])
        now = _embedding_values(model, rows)
    except (KeyError, TypeError, IndexError, RuntimeError):  # none saved, or not one we can compare
        return False
    return len(now) != len(values) or any(abs(a - b) > 0.01 * max(abs(a), abs(b)) + 1e-6 for a, b in zip(now, values))


def warn_if_other_base(model, folder: AdapterFolder):
    """A one-line warning when the adapter was trained on a base of these shapes but other weights."""
    if base_differs(model, folder.base_check):
        message = (f"Adapter {str(folder.path)!r} was trained on {folder.trained_on}, whose weights differ from this model's "
                   f"(the shapes match): its answers may be off. To use it as trained: {folder.load_command}")
        warnings.warn_explicit(message, OtherBaseWarning, "qlora_magic", 0)  # no source line: one line


def save_adapter(session, path) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (loadable by plain PeftModel.from_pretrained), the
    tokenizer, and qlora_magic.json (load config, training runs, history, the base's fingerprint), all at once:
    they go into a staging folder beside `path` that then takes its place, so an earlier save there stays whole
    until the new one is complete, and a bad path fails in one line before anything is written. Files of the
    earlier save's folder that the new save does not write (a user's notes, a checkpoint's optimizer state) stay."""
    from .folder_writing import check_folder_path, folder_written
    from .quiet import no_progress_bars

    path = check_folder_path(path, "The adapter folder")
    if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_FILE).exists():
        raise ConfigError(f"{str(path)!r} already holds other files: choose a new folder, so nothing of yours is overwritten.")
    record = run_record(session)
    with folder_written(path, "the adapter", keep_others=True) as staging, no_progress_bars():
        session.model.save_pretrained(str(staging))
        write_beside_adapter(session, staging, record)
    return path


def run_record(session, runs=None) -> str:
    """qlora_magic.json's text for the session now: load config, training runs (`runs`, default the session's),
    history, the base's fingerprint."""
    from .._version import __version__

    return json.dumps({
        "qlora_magic_version": __version__,
        "saved_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_config": load_record(session.load_config),
        "train_configs": [run.to_json() for run in (session.runs if runs is None else runs)],
        "history": session.history,
        "base_check": base_fingerprint(session.model),
    }, indent=2, default=str)


def load_record(load_config) -> dict:
    """A LoadConfig as the records keep it (qlora_magic.json, run.json): in-memory calibration rows noted, not copied."""
    return {**load_config.to_dict(), "calibration": describe_data(load_config.calibration)}


def write_beside_adapter(session, folder: Path, record: str):
    """What makes PEFT's adapter files in `folder` a qlora_magic adapter folder: the tokenizer and the run record."""
    session.tokenizer.save_pretrained(str(folder))
    (folder / RUN_FILE).write_text(record)


def saved_run(adapter_path) -> dict:
    """The qlora_magic.json beside a saved adapter, as saved ({} when the adapter was saved by other tools)."""
    file = Path(adapter_path).expanduser() / RUN_FILE
    if not file.exists():
        return {}
    return _read_json(file, ConfigError, "fix it, or delete it (the adapter then loads without its run record)")


def adapter_base(adapter_path) -> tuple[str | None, dict]:
    """The base model a saved adapter was trained on, and the load settings qlora_magic saved beside it
    (bits, task, 8-bit layers; {} for an adapter saved by other tools)."""
    folder = read_adapter_folder(adapter_path)
    return folder.base, folder.load_settings
