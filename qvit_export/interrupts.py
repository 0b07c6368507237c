"""SIGINT and SIGTERM as exceptions (so every ``finally`` and every staged write is undone), and a window in
which they wait, for C++ code that would swallow them.

TensorRT's builder calls back into Python (its logger, its progress monitor); an exception raised by a signal
handler inside such a callback is caught by the bindings, and the build goes on and succeeds (measured with
TensorRT-RTX 1.7: Ctrl-C during a build wrote the plan and exited 0). Inside ``deferred()`` a signal is only
recorded; the progress monitor asks ``pending()`` and cancels the build; on leaving the window the signal is
raised again under the handlers that were there before.
"""
from __future__ import annotations

import contextlib
import signal
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report them


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt is for SIGINT (a BaseException: ``except Exception`` lets it by)."""


_pending: list[int] = []


def _raise(signum, frame):
    raise Terminated(signum)


def _record(signum, frame):
    _pending.append(signum)


def install() -> None:
    """Make SIGTERM raise ``Terminated`` (SIGINT raises KeyboardInterrupt already); for the commands. A signal
    the parent set to be ignored (``nohup``, background jobs) stays ignored."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise)


def pending() -> bool:
    """Whether a signal arrived inside the current ``deferred()`` window."""
    return bool(_pending)


@contextlib.contextmanager
def deferred():
    """SIGINT/SIGTERM are recorded, not raised, inside the block; the first one is raised again after it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    previous = {s: signal.signal(s, _record) for s in EXIT_CODES if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if _pending:
            signum = _pending[0]
            _pending.clear()
            signal.raise_signal(signum)
