"""One rank under torchrun for test_torchrun_sigterm.py: trains until a stop signal, then the
final save; prints ``RANK r PID n``, ``RANK r TRAINING``, ``RANK r STOPPED step n`` and, as its
very last act, ``RANK r EXIT 0``.

    python -m torch.distributed.run --standalone --nproc_per_node=2 torchrun_worker.py ROOT
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from asyncckpt import CheckpointManager, Schedule, TrainState

MAX_STEPS = 10_000_000


def say(line: str) -> None:
    """One write per line: both ranks share torchrun's stdout pipe, so print() could interleave."""
    os.write(1, (line + "\n").encode())


def main() -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    state = TrainState(model=model, optimizer=opt)
    mgr = CheckpointManager(sys.argv[1], schedule=Schedule(every_n_steps=1_000_000),
                            save_on_signal=True, signal_grace_s=60.0)
    say(f"RANK {rank} PID {os.getpid()}")
    step = 0
    while step < MAX_STEPS:
        step += 1
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mgr.maybe_save(step, state, metrics={"loss": loss.item()})  # ranks agree on a signal here
        if step == 5:
            say(f"RANK {rank} TRAINING")
        if mgr.should_stop:
            break
    mgr.close()
    dist.destroy_process_group()
    say(f"RANK {rank} STOPPED step {step}")
    say(f"RANK {rank} EXIT 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
