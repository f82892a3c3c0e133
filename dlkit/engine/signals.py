"""Turn Ctrl-C and SIGTERM into a polite request to stop at the next batch boundary."""

from __future__ import annotations

import contextlib
import signal
import threading


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def stop_on_signals():
    """Yields a StopFlag set by the first SIGINT/SIGTERM; a second one interrupts at once."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {}

    def handler(signum, frame):
        if flag.signal is not None:
            raise KeyboardInterrupt
        flag.signal = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
