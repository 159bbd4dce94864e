"""qlora_magic: QLoRA fine-tuning from a Jupyter notebook.

    %load_ext qlora_magic
    %qlora_load
    %%qlora_train ...
    %qlora_generate ...

or from Python: qlora_magic.load(), .train(), .generate(), .classify(), .save(), .memory(), .unload(), .get_session();
.runs(), .attach(), .stop() for runs trained in the background (train(..., background=True));
.doctor() and .check_data() to catch mistakes before training.
Importing this package (and %load_ext) does not import torch; the verbs import it when first used.
"""

from ._version import __version__  # noqa: E402

from .api import classify, generate, load, memory, save, train, unload  # noqa: E402
from .api import attach, runs, stop  # noqa: E402  (background runs)
from .api import (add_adapter, combine_adapters, compare, delete_adapter, evaluate, list_adapters,  # noqa: E402
                  load_adapter, merge, switch_adapter, tune)
from .api import export  # noqa: E402  (GGUF for llama.cpp / Ollama)
from .api import check_data, doctor  # noqa: E402  (checks before the GPU time)
from .errors import QloraError  # noqa: E402
from . import examples  # noqa: E402
from .session import get_session, reset_session  # noqa: E402
from .front.panel import panel  # noqa: E402  (imports ipywidgets only when a panel is built)
from . import _moved  # noqa: E402

_moved.install(__name__)  # qlora_magic.data, .training, ... (the paths before the layers) still import


def load_ipython_extension(ipython):
    from .front import prompt_lines
    from .front.magics import QloraMagics

    ipython.register_magics(QloraMagics)
    prompt_lines.register(ipython)


def unload_ipython_extension(ipython):
    from .front import prompt_lines

    prompt_lines.unregister(ipython)


__all__ = ["load", "train", "generate", "save", "memory", "unload", "get_session", "reset_session", "panel",
           "QloraError", "evaluate", "compare", "list_adapters", "add_adapter", "load_adapter", "switch_adapter",
           "delete_adapter", "combine_adapters", "merge", "export", "tune", "classify", "runs", "attach", "stop",
           "check_data", "doctor"]
