"""Save the adapter in PEFT's own format, with the tokenizer and our run record beside it."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from .errors import QloraError
from .loading import RUN_FILE


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
    from . import __version__

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
