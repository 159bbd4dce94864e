"""Closing the IPython shells tests make (shared by conftest.py and test_bad_inputs.py)."""


def close_shell(shell):
    """Forget a test's shell now: IPython registers each shell's exit work (a reset and a gc.collect) with
    atexit, and a hundred such shells left pytest collecting garbage for minutes after the last test."""
    import atexit

    from IPython.core.interactiveshell import InteractiveShell

    atexit.unregister(shell.atexit_operations)
    saver = getattr(shell.history_manager, "save_thread", None)
    if saver is not None:
        atexit.unregister(saver.stop)
        saver.stop()
    InteractiveShell.clear_instance()
