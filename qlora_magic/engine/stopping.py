"""How a run is asked to stop: the flag Ctrl-C (a kernel interrupt) and the panel's Stop button set, which
the training callback checks after every optimizer step, so the adapter keeps every finished step."""

from __future__ import annotations

import contextlib
import signal
import threading


class StopFlag:
    """Set by Ctrl-C or a Stop button; the training callback checks it after every step."""

    def __init__(self):
        self.event = threading.Event()
        self.reason = None

    def set(self, reason="interrupted"):
        self.reason = reason
        self.event.set()

    def __bool__(self):
        return self.event.is_set()


@contextlib.contextmanager
def stop_on_interrupt(flag: StopFlag):
    """The first Ctrl-C asks the run to stop at the next step boundary; a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag.set("interrupted")

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
