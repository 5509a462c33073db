"""Fits under ``Trainer(devices=2, strategy="ddp", accelerator="cpu")`` (gloo) for
test_integrations_lightning.py.  Lightning's "ddp" strategy starts rank 1 by running this
script again with the same arguments, so everything comes from the command line:

    python helpers_lightning_ddp.py OUT ROOT FIT [FIT...]

Each FIT is ``MAX_EPOCHS``, ``MAX_EPOCHS:CRASH_AFTER`` (``Crash`` raised once that step is
done, caught, and the next FIT goes on in the same process) or ``MAX_EPOCHS:plain`` (no
callback), and runs with a fresh model and Trainer (and ``AsyncCheckpoint(ROOT,
schedule=Schedule(every_n_steps=2, on_epoch_end=True))``).  Each rank writes
``OUT/rank<r>.pt``: one dict per FIT with its ``global_step``, ``restored_step``,
``history``, ``weights``, ``error`` and whether the callback's manager is closed.
"""

from __future__ import annotations

import os
import sys

import torch

from helpers_lightning import fit

from asyncckpt import Schedule
from asyncckpt.integrations.lightning import AsyncCheckpoint


def main(out: str, root: str, plans: list[str]) -> None:
    results = []
    rank = 0
    for plan in plans:
        epochs, _, crash = plan.partition(":")
        cb = None if crash == "plain" else AsyncCheckpoint(
            root, schedule=Schedule(every_n_steps=2, on_epoch_end=True))
        run = fit(max_epochs=int(epochs), crash_after=int(crash) if crash.isdigit() else None,
                  callbacks=[cb] if cb else [], devices=2, strategy="ddp", accelerator="cpu")
        results.append({"global_step": run.trainer.global_step, "history": run.history,
                        "restored_step": cb.restored_step if cb else None,
                        "weights": run.weights, "error": repr(run.error) if run.error else None,
                        "manager_closed": cb is None or cb.manager is None})
        rank = run.trainer.global_rank
    os.makedirs(out, exist_ok=True)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
