"""Child process of the crash-during-pruning test (tests/test_retention_manager.py).

``python helpers_prune_child.py ROOT STEP`` opens a manager on ROOT with
``Retention(keep_last=1)`` through an ``announce://`` filesystem (local files,
registered here) and saves STEP; the commit makes every older checkpoint but
the newest two surplus, and the background retention deletes them.

Every single deletion (a recursive delete is done file by file, then the
folder, as on every backend) is announced on stdout as ``rm <path>`` and
waits for a line on stdin first, so the parent can SIGKILL this process at an
exact point: no sleeps.  ``done`` is printed once the manager has closed.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from helpers.announcing_fs import announcing_fs


def _announce(path: str) -> None:
    print(f"rm {path}", flush=True)
    if not sys.stdin.readline():
        os._exit(3)  # the parent went away


def weights_at(step: int) -> nn.Module:
    """The model as saved at ``step``: every parameter filled with the step number."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    return model


def main() -> None:
    announcing_fs("announce", lambda kind, path: _announce(path) if kind == "rm" else None)
    from asyncckpt import CheckpointManager, Retention, TrainState

    root, step = sys.argv[1], int(sys.argv[2])
    with CheckpointManager(f"announce://{root}", retention=Retention(keep_last=1)) as mgr:
        mgr.save(step, TrainState(model=weights_at(step)), blocking=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
