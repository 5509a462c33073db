"""A training loop that test_signals.py drives through pipes and stops with signals.

    python helpers_signal_child.py ROOT TOTAL_STEPS
    python helpers_signal_child.py --dist RANK WORLD_SIZE FOLDER

Prints ``START n`` (the restored step), then per step ``READY step n`` and
waits for a line on stdin before the next step.  Saves every 2 steps (each
waited for, so a "READY" step's checkpoint is committed), with
``save_on_signal=True``.  When ``maybe_save`` reports ``should_stop`` it
prints ``STOPPED step n chained=0|1`` and exits 0 after ``close()``.

A handler installed before the manager (so chained to by it) marks the
dataloader: during the final save its ``state_dict`` prints ``IN FINAL SAVE``
and blocks on stdin, so the test can send a second signal while the final
save is in progress.  The test writes ``block`` instead of an empty line to
turn that on.

``--dist``: one rank of a gloo group (file rendezvous in FOLDER); only the
last rank raises SIGTERM in itself before step 3, and every rank must still
save step 3 and stop there.  Each rank prints ``RANK r STOPPED step n``.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import torch

from asyncckpt import CheckpointManager, Schedule, TrainState


class Loader:
    """A stateful 'dataloader': its position, and the blocking hook."""

    def __init__(self) -> None:
        self.pos = 0
        self.block_when_signalled = False
        self.signalled = False

    def state_dict(self) -> dict[str, Any]:
        if self.signalled and self.block_when_signalled:
            print("IN FINAL SAVE", flush=True)
            sys.stdin.readline()
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = state["pos"]


def main() -> int:
    root, total = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = Loader()

    def earlier_handler(signum: int, frame: object) -> None:  # chained by the manager's handler
        loader.signalled = True

    signal.signal(signal.SIGTERM, earlier_handler)
    state = TrainState(model=model, optimizer=opt, dataloader=loader)
    mgr = CheckpointManager(root, schedule=Schedule(every_n_steps=2), save_on_signal=True,
                            signal_grace_s=60.0)
    start = mgr.restore(state)
    print(f"START {start} pos={loader.pos}", flush=True)
    for step in range(start, total):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loader.pos += 1
        handle = mgr.maybe_save(step + 1, state, metrics={"loss": loss.item()})
        if mgr.should_stop:
            print(f"STOPPED step {step + 1} chained={int(loader.signalled)}", flush=True)
            break
        if handle is not None:
            handle.result(timeout=120)
        print(f"READY step {step + 1}", flush=True)
        loader.block_when_signalled = sys.stdin.readline().strip() == "block"
    mgr.close()
    print(f"DONE handler_restored={int(signal.getsignal(signal.SIGTERM) is earlier_handler)}", flush=True)
    return 0


def dist_main() -> int:
    import torch.distributed as dist

    rank, world, folder = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rdzv", rank=rank, world_size=world)
    state = TrainState(model=torch.nn.Linear(4, 4))
    mgr = CheckpointManager(f"{folder}/ckpt", schedule=Schedule(every_n_steps=100), save_on_signal=True)
    stopped = None
    for step in range(1, 10):
        if step == 3 and rank == world - 1:
            signal.raise_signal(signal.SIGTERM)  # only this rank is told
        mgr.maybe_save(step, state)
        if mgr.should_stop:
            stopped = step
            break
    mgr.close()
    dist.destroy_process_group()
    print(f"RANK {rank} STOPPED step {stopped}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(dist_main() if sys.argv[1] == "--dist" else main())
