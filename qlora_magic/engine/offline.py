"""Offline unless the Hub answers. With no network, huggingface_hub retries every request for about a
minute before it gives up; so before anything would go to the Hub we knock once at its host (1.5 s),
remember the answer for the process, and on silence put the libraries in their offline mode. A model
already in the local cache loads from there without any connection, and local data files never reach
the network (the datasets download counter and the Hub telemetry are off).

QLORA_MAGIC_ONLINE=1 skips the probe and the cache-first lookup: Hub ids go to the Hub, as the
libraries do by default.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import ModelNotFoundError

PROBE_TIMEOUT_S = 1.5
ONLINE_ENV = "QLORA_MAGIC_ONLINE"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

_hub_answered: bool | None = None  # the probe's answer, once asked (None: not asked)


def always_online() -> bool:
    return os.environ.get(ONLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def no_telemetry() -> None:
    """No request the user did not ask for: datasets reports every load_dataset, of a local file too,
    with a request to the Hub, and huggingface_hub may report library usage."""
    from huggingface_hub import constants

    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_UPDATE_DOWNLOAD_COUNTS"] = "0"
    constants.HF_HUB_DISABLE_TELEMETRY = True
    # The libraries read these at import: set them where datasets is imported already.
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_UPDATE_DOWNLOAD_COUNTS = False


def go_offline() -> None:
    """Offline mode for this process: every library answers from its local cache at once."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        config = sys.modules["datasets"].config
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


def hub_reachable() -> bool:
    """Whether the Hub answers, asked once per process; when it does not, the process goes offline."""
    global _hub_answered
    from huggingface_hub import constants

    if always_online():
        return True
    if constants.HF_HUB_OFFLINE:
        return False
    if _hub_answered is None:
        endpoint = urlsplit(constants.ENDPOINT)
        _hub_answered = knock(endpoint.hostname, endpoint.port or 443)
    if not _hub_answered:
        go_offline()
    return _hub_answered


def knock(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port opens within PROBE_TIMEOUT_S. In a thread, because the name
    lookup before it does not heed the socket's timeout (an unreachable resolver takes 10 s or more)."""
    opened = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return bool(opened)


def why_offline() -> str:
    """Why the Hub is not asked, for a message: our probe, or the user's own setting."""
    return "huggingface.co cannot be reached" if _hub_answered is False else "HF_HUB_OFFLINE is set"


def cached_model_folder(repo_id: str) -> Path | None:
    """The local snapshot of a Hub model when its config and weights are in the cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):  # None, or the marker of a file known not to exist
        return None
    folder = Path(config).parent
    return folder if any((folder / name).exists() for name in WEIGHT_FILES) else None


def hub_model(repo_id: str) -> str:
    """What to load for a Hub id: its cached folder (no connection at all), else the id when the Hub
    answers (from_pretrained downloads it); else a one-line ModelNotFoundError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    no_telemetry()
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelNotFoundError(
            f"{repo_id!r} is neither a model folder nor a Hub id: give an existing folder, or an id like 'HuggingFaceTB/SmolLM2-135M-Instruct'."
        ) from None
    folder = None if always_online() else cached_model_folder(repo_id)
    if folder is not None:
        return str(folder)
    if hub_reachable():
        return repo_id
    raise ModelNotFoundError(
        f"{repo_id!r} is not in the local Hugging Face cache and {why_offline()}: download it where there is network "
        f"(hf download {repo_id}), or give a local model folder (or no name, for the embedded default model)."
    )
