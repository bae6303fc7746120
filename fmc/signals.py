"""SIGTERM (``docker stop``) and SIGINT as one clean stop: no traceback, exit code 128 + N.

Why a module of its own with no heavy imports: ``inference.py`` installs the handler before it
imports torch, so a signal in the first seconds is a clean stop too, not a KeyboardInterrupt
traceback. The handler is idempotent: the first signal raises :class:`Interrupted`, and any later
one (a second ``docker stop`` while the temporary is being removed) changes nothing, neither the
exit code nor what is printed. Once the run is over, :func:`ignore_signals` makes a late signal a
no-op, so interpreter shutdown (atexit handlers) prints nothing after a clean exit.

While torch is imported the stop is deferred (:func:`signals_deferred`): torch's import runs
Python code called from C++, and an exception raised there aborts the process (``terminate
called after throwing ... pybind11::error_already_set``, exit -6) instead of unwinding.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("fmc")

SIGNALS = (signal.SIGTERM, signal.SIGINT)

Handlers = dict[int, Any]


class Interrupted(BaseException):
    """A stop signal: a BaseException, so no retry handler swallows it on its way out.

    On its way it passes :func:`fmc.atomic.atomic_write`, which removes the hidden temporary.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: list[int] = []  # the signals seen since install_signal_handlers: only the first raises
_deferring = False  # inside signals_deferred: record the first signal, raise it when the block ends


def _raise_once(signum: int, frame: object) -> None:
    _received.append(signum)
    if len(_received) == 1 and not _deferring:
        raise Interrupted(signum)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold a stop signal until the block ends, then raise it: for imports that call Python from C++."""
    global _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
    if _received:
        raise Interrupted(_received[0])


def _set_all(handler: Callable[[int, object], None] | int) -> Handlers | None:
    """Install ``handler`` for every stop signal; returns the previous ones, or None off the main thread."""
    previous: Handlers = {}
    for sig in SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (an embedding program): leave its handlers alone
            return None
    return previous


def install_signal_handlers() -> Handlers | None:
    """Turn the first SIGTERM / SIGINT into :class:`Interrupted`; returns the handlers it replaced."""
    _received.clear()
    return _set_all(_raise_once)


def restore_signal_handlers(previous: Handlers | None) -> None:
    """Put back what :func:`install_signal_handlers` replaced (a test harness's own SIGINT handler)."""
    for sig, handler in (previous or {}).items():
        if handler is not None:
            signal.signal(sig, handler)


def ignore_signals() -> None:
    """After the run: a late signal must not raise inside interpreter shutdown (an atexit traceback)."""
    _set_all(signal.SIG_IGN)


def report_interrupted(stop: Interrupted) -> int:
    """One line for a stop outside the cases (imports, start-up, shut-down); returns the exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.error(
        "stopped by %s while starting up or shutting down (no output was being written); exit code %d",
        stop,
        stop.exit_code,
    )
    return stop.exit_code
