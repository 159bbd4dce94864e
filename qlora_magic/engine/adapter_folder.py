"""The adapter folder: PEFT's own format (adapter_config.json + adapter_model.safetensors, loadable by plain
`PeftModel.from_pretrained`), the tokenizer, and our run record `qlora_magic.json` beside them. Writing one
and reading one back both live here."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from ..errors import ModelNotFoundError, QloraError

RUN_FILE = "qlora_magic.json"  # our side file next to a saved adapter: load/train configs, metrics


def describe_data(data):
    """A JSON-safe note of where training data came from (in-memory data is summarized, not copied)."""
    if data is None or isinstance(data, (str, int, float)):
        return data
    try:
        return f"<{type(data).__name__} of {len(data)} rows>"
    except TypeError:
        return f"<{type(data).__name__}>"


def save_adapter(session, path) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (loadable by plain PeftModel.from_pretrained),
    the tokenizer, and qlora_magic.json (load config, training configs, history)."""
    from .._version import __version__

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise QloraError(f"{str(path)!r} is a file: give a folder path for the adapter.")
    if path.is_dir() and any(path.iterdir()) and not (path / "adapter_config.json").exists():
        raise QloraError(f"{str(path)!r} already holds other files: choose a new folder, so nothing of yours is overwritten.")
    path.mkdir(parents=True, exist_ok=True)
    session.model.save_pretrained(str(path))
    session.tokenizer.save_pretrained(str(path))
    record = {
        "qlora_magic_version": __version__,
        "saved_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_config": {**session.load_config.to_dict(), "calibration": describe_data(session.load_config.calibration)},
        "train_configs": [{**c, "data": describe_data(c.get("data"))} for c in session.train_configs],
        "history": session.history,
    }
    (path / RUN_FILE).write_text(json.dumps(record, indent=2, default=str))
    return path


def saved_run(adapter_path) -> dict:
    """The qlora_magic.json beside a saved adapter ({} when the adapter was saved by other tools)."""
    file = Path(adapter_path) / RUN_FILE
    return json.loads(file.read_text()) if file.exists() else {}


def adapter_base(adapter_path) -> tuple[str | None, dict]:
    """The base model a saved adapter was trained on, and the load settings qlora_magic saved beside it
    (bits, task, 8-bit layers; {} for an adapter saved by other tools)."""
    path = Path(adapter_path).expanduser()
    if not (path / "adapter_config.json").exists():
        raise ModelNotFoundError(f"No saved adapter at {str(adapter_path)!r} (adapter_config.json is missing): give the folder %qlora_save wrote.")
    run = saved_run(path).get("load_config", {})
    if "model" in run:  # our own save: None means the embedded default model
        return run["model"], run
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    return base, {}
