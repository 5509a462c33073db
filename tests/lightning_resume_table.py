"""The table of docs/integrations.md (Lightning): each stop-and-resume case of
helpers_lightning.CASES through ``AsyncCheckpoint`` and through Lightning's own
``ModelCheckpoint`` + ``trainer.fit(ckpt_path=...)``, compared with the uninterrupted run.

    python tests/lightning_resume_table.py        # about a minute on a CPU; prints Markdown

A cell: the global step the resumed run ends at, then whether the stopped and the resumed
run together logged the uninterrupted run's losses (training and validation, in order, with
their epoch and step), called its epoch hooks (``on_train_epoch_start``/``end``, once per
epoch, with the right epoch number) and ended with its weights: ``15 ✓ ✓ ✓``.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers_lightning import (CASES, MODES, losses, reference, same_weights,  # noqa: E402
                               stop_and_resume)


def cell(case, mode: str, how: str, dropout: float) -> tuple[int, str]:
    ref = reference(case, mode, dropout)
    with tempfile.TemporaryDirectory() as folder:
        r = stop_and_resume(case, mode, folder, dropout=dropout, how=how)
    mark = {True: "✓", False: "✗"}
    text = (f"{r.resumed.trainer.global_step} {mark[losses(r.history) == losses(ref.history)]} "
            f"{mark[r.history == ref.history]} {mark[same_weights(r.resumed, ref)]}")
    return r.restored_step, text


def main() -> None:
    for mode, limits in MODES.items():
        (key, value), = limits.items()
        also = " (9 with accumulate_grad_batches=2)" if key == "max_epochs" else ""
        print(f"\n`Trainer({key}={value})`; the uninterrupted run ends at global step 15{also}.\n")
        print("| stop after | resumed from | `AsyncCheckpoint` | `ModelCheckpoint` "
              "| `AsyncCheckpoint`, Dropout(0.1) | `ModelCheckpoint`, Dropout(0.1) |")
        print("|---|---|---|---|---|---|")
        for name, case in CASES.items():
            cells = [cell(case, mode, how, dropout)
                     for dropout in (0.0, 0.1) for how in ("asyncckpt", "lightning")]
            steps = sorted({c[0] for c in cells})
            print(f"| {name} | {', '.join(map(str, steps))} | " + " | ".join(c[1] for c in cells) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
