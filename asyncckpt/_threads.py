"""Whether this process can start a thread now.

At interpreter exit Python 3.12 and later refuse new threads ("can't create new thread at
interpreter shutdown"), even in exit hooks; the saves the manager drains then are written on
the threads that already run (the writer's), one file after another, instead of on pools
made for each save."""

from __future__ import annotations

import threading


def _nothing() -> None:
    pass


def can_start_threads() -> bool:
    try:
        probe = threading.Thread(target=_nothing, name="asyncckpt-probe", daemon=True)
        probe.start()
    except RuntimeError:
        return False
    probe.join()
    return True
