"""Errors a user can fix: one line that says what is wrong and how to fix it."""


def one_line(error: BaseException) -> str:
    """'Type: first line' of an error, as the panel's status, a failed run's view and a failed reload show it (the
    type's own description when the error says nothing)."""
    text = str(error).strip() or (type(error).__doc__ or "").strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


class QloraError(Exception):
    """A problem the user can fix. IPython shows it as one line, without a traceback.

    The cell still fails (the exception propagates); only its rendering is short.
    """

    def _render_traceback_(self):
        return [f"{type(self).__name__}: {self}"]


class ConfigError(QloraError, ValueError):
    """An option or a cell body has a bad value."""


class ConflictingOptionsError(ConfigError, TypeError):
    """A ready config= and keyword options were given together. Also a TypeError, as it was before."""


class UnknownOptionError(ConfigError, TypeError):
    """A keyword option no config has. Also a TypeError, as Python's own unexpected keyword is."""


class DataError(QloraError, ValueError):
    """The training data cannot be used as given."""


class NoModelError(QloraError, RuntimeError):
    """An action needs a loaded model and there is none."""

    def __init__(self, action="this"):
        super().__init__(f"No model is loaded, so {action} cannot run: run %qlora_load (or qlora_magic.load()) first.")


class ModelNotFoundError(QloraError, FileNotFoundError):
    """The model or adapter named cannot be found."""


class AdapterError(QloraError, LookupError):
    """An adapter named does not exist, or cannot be added, removed or combined as asked."""


class BusyError(QloraError, RuntimeError):
    """Another thread (the panel's action, a run started in a thread) is using the model; the message says what."""


class Interrupted(QloraError, KeyboardInterrupt):
    """Ctrl-C ended an action; the message says what state it left. Still a KeyboardInterrupt, so the cell fails
    as an interrupted one does, and code that catches KeyboardInterrupt still does."""


class DivergedError(QloraError, ArithmeticError):
    """The training loss (or the adapter's weights) became NaN or infinite; the adapter was put back."""


class OutOfMemory(QloraError, MemoryError):
    """A training step ran out of GPU memory at the smallest batch layout; the message says what would fit."""


class WorkerError(QloraError, RuntimeError):
    """A worker process of a --gpus / --processes run failed; the message says how far the run got and names
    the workers' log."""
