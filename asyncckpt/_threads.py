"""Whether the interpreter is exiting (the manager's drain at exit has begun).

At interpreter exit Python 3.12 and later refuse new threads ("can't create new thread at
interpreter shutdown"), and 3.11's pools may already be shut; the saves the manager drains
then are written on the thread that already runs (the writer's), one file after another,
instead of on pools made for each save."""

from __future__ import annotations

import threading

exiting = threading.Event()
"""Set by the manager's drain at exit, before it closes the managers still open."""


def can_start_threads() -> bool:
    return not exiting.is_set()
