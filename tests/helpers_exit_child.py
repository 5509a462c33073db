"""A training script that returns while a save is still being written, without ``close()``:
``python helpers_exit_child.py ROOT COMPRESSION``.  The save is held at its first write by the
``faulty`` filesystem's gate, which an exit hook of this script opens: that hook runs just before
asyncckpt's own, so at exit the save is pending for sure and only the manager's drain at exit
can commit it."""

from __future__ import annotations

import sys
import threading

import torch

from asyncckpt import CheckpointManager, TrainState
from helpers_faulty_fs import new_faulty_fs

root, compression = sys.argv[1], sys.argv[2]
fs = new_faulty_fs()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 8))
mgr = CheckpointManager(fs.url(root), compression=None if compression == "none" else compression)
mgr.save(1, TrainState(model=model), blocking=True)
with torch.no_grad():
    model[0].weight.add_(1.0)
fs.pause()
handle = mgr.save(2, TrainState(model=model))
assert fs.paused.wait(60), "the writer never reached a write"
# opened at exit, just before the manager's drain: threading's exit hooks run last-registered
# first, and the manager registered its drain there when it was imported
threading._register_atexit(fs.release)  # type: ignore[attr-defined]
torch.save(model.state_dict(), f"{root}.expected.pt")
print("PENDING", handle.done(), flush=True)
