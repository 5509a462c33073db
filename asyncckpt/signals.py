"""SIGTERM/SIGINT: remember that a stop was asked for; a second signal exits at once.

``StopSignals`` is what ``CheckpointManager(save_on_signal=True)`` installs.
Call order: ``install()`` (main thread), poll ``received`` (the first signal
number, or None) from the training loop, ``uninstall()`` when done.

- First signal: the handler only records it (and calls a previous Python
  handler, if there was one other than Python's default SIGINT handler, so a
  framework watching the signal still sees it).  The training loop notices it
  at its next ``maybe_save``, which saves, commits and sets ``should_stop``.
- Second signal (any of the watched ones): the process exits at once with
  ``os._exit(128 + signum)`` (143 for SIGTERM, 130 for SIGINT), the shell's
  convention for "killed by a signal".  No ``finally`` block or ``atexit``
  hook runs and pending saves are abandoned; that is safe, because a
  checkpoint without its manifest is never read.
- A signal that was ignored (``SIG_IGN``) when ``install()`` ran stays
  ignored: a process started in the background by a shell ignores SIGINT on
  purpose.

Stdlib only; nothing here knows about checkpoints.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
"""The signals ``StopSignals`` watches unless told otherwise."""

Handler = Callable[[int, FrameType | None], Any] | int | None


class StopSignals:
    """Signal handlers that record the first stop request and exit on the second."""

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.received: int | None = None
        """The first signal received since ``install()``; None until one arrives."""
        self.count = 0
        """How many watched signals arrived since ``install()``."""
        self._previous: dict[int, Handler] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Install the handlers; False (with a warning) off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("save_on_signal: signal handlers can only be installed from the main "
                        "thread; %s will not trigger a final save", self._names())
            return False
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN:
                log.info("save_on_signal: %s is ignored by this process; leaving it ignored", sig.name)
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        log.debug("save_on_signal: watching %s", self._names())
        return self.installed

    def uninstall(self) -> None:
        """Put the previous handlers back (where ours is still the one installed)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("save_on_signal: cannot restore the previous handlers of %s off the main "
                        "thread", self._names())
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            else:
                log.debug("save_on_signal: %s has another handler now; leaving it", signal.Signals(sig).name)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count > 1:
            _exit_now(signum)
        self.received = signum
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def _names(self) -> str:
        return "/".join(s.name for s in self.signals)


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15; the number as text when it has no name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _exit_now(signum: int) -> None:
    """Leave at once with status 128 + signum, saying why on stderr (best effort)."""
    message = (f"asyncckpt: second stop signal ({signal_name(signum)}): exiting now with status "
               f"{128 + signum}; saves in flight are abandoned\n")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - flushing is best effort; exiting is what matters
            pass
    try:
        os.write(2, message.encode())
    except OSError:
        pass
    os._exit(128 + signum)
