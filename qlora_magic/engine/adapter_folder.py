"""The adapter folder: PEFT's own format (adapter_config.json + adapter_model.safetensors, loadable by plain
`PeftModel.from_pretrained`), the tokenizer, and our run record `qlora_magic.json` beside them. Writing one
and reading one back both live here, and so does the typed record of a training run (`TrainRun`) that the
session keeps and `qlora_magic.json` saves."""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainConfig
from ..errors import ConfigError, ModelNotFoundError

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

    @property
    def reloadable(self) -> bool:
        """Whether the rows can be loaded again from what was saved (a path or Hub id)."""
        return self.location is not None

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


@dataclass
class AdapterFolder:
    """A saved adapter folder, read once: the base model it was trained on, and what qlora_magic saved beside it
    (load settings, training runs, history; all empty for an adapter saved by other tools)."""

    path: Path
    base: str | None  # a Hub id or folder; None is the embedded default model
    load_settings: dict = field(default_factory=dict)  # the saved LoadConfig's fields (bits, task, 8-bit layers, ...)
    runs: list = field(default_factory=list)  # TrainRun, in order
    history: list = field(default_factory=list)


def read_adapter_folder(adapter_path) -> AdapterFolder:
    path = Path(adapter_path).expanduser()
    if not (path / "adapter_config.json").exists():
        raise ModelNotFoundError(f"No saved adapter at {str(adapter_path)!r} (adapter_config.json is missing): give the folder %qlora_save wrote.")
    record = saved_run(path)
    settings = record.get("load_config", {})
    if "model" in settings:  # our own save: None means the embedded default model
        base = settings["model"]
    else:
        base, settings = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path"), {}
    return AdapterFolder(path, base, settings, [TrainRun.from_dict(r) for r in record.get("train_configs", [])],
                         record.get("history", []))


def save_adapter(session, path) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (loadable by plain PeftModel.from_pretrained),
    the tokenizer, and qlora_magic.json (load config, training configs, history)."""
    from .._version import __version__

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{str(path)!r} is a file: give a folder path for the adapter.")
    if path.is_dir() and any(path.iterdir()) and not (path / "adapter_config.json").exists():
        raise ConfigError(f"{str(path)!r} already holds other files: choose a new folder, so nothing of yours is overwritten.")
    path.mkdir(parents=True, exist_ok=True)
    session.model.save_pretrained(str(path))
    session.tokenizer.save_pretrained(str(path))
    record = {
        "qlora_magic_version": __version__,
        "saved_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_config": {**session.load_config.to_dict(), "calibration": describe_data(session.load_config.calibration)},
        "train_configs": [run.to_json() for run in session.runs],
        "history": session.history,
    }
    (path / RUN_FILE).write_text(json.dumps(record, indent=2, default=str))
    return path


def saved_run(adapter_path) -> dict:
    """The qlora_magic.json beside a saved adapter, as saved ({} when the adapter was saved by other tools)."""
    file = Path(adapter_path).expanduser() / RUN_FILE
    return json.loads(file.read_text()) if file.exists() else {}


def adapter_base(adapter_path) -> tuple[str | None, dict]:
    """The base model a saved adapter was trained on, and the load settings qlora_magic saved beside it
    (bits, task, 8-bit layers; {} for an adapter saved by other tools)."""
    folder = read_adapter_folder(adapter_path)
    return folder.base, folder.load_settings
