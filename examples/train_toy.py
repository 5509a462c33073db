"""Train a small model on CPU with asynchronous checkpoints; run it again to resume.

    python examples/train_toy.py                 # trains, checkpointing every 50 steps
    python examples/train_toy.py --steps 400     # run again: resumes from the newest checkpoint

Everything a resume needs is saved: model, AdamW state, LR scheduler, the
shuffling dataloader's position, every RNG, and a counter in ``extra``.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from asyncckpt import CheckpointManager, Retention, Schedule, TrainState


def make_data(n: int = 4096, dim: int = 32) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/toy/ckpt", help="checkpoint root (path or URL)")
    p.add_argument("--steps", type=int, default=200, help="train until this step")
    p.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--compression", default="zstd", choices=["zstd", "none"])
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    # a fixed horizon, not --steps: a run resumed with more steps follows the same LR curve
    # as one that never stopped (the restored scheduler keeps the T_max it was saved with)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)
    loader = StatefulDataLoader(make_data(), batch_size=64, shuffle=True)
    extra = {"samples_seen": 0}
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler,
                       dataloader=loader, extra=extra)

    with CheckpointManager(
        args.root,
        retention=Retention(keep_last=3, keep_best=1, best_metric="loss"),
        schedule=Schedule(every_n_steps=args.every),
        compression=None if args.compression == "none" else "zstd",
    ) as mgr:
        step = mgr.restore(state)
        print(f"starting at step {step}" + (" (resumed)" if step else " (fresh run)"))
        stall = 0.0
        while step < args.steps:
            for x, y in loader:
                loss = nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                extra["samples_seen"] += len(x)
                t0 = time.perf_counter()
                handle = mgr.maybe_save(step, state, metrics={"loss": loss.item()},
                                        force=step == args.steps)
                if handle is not None:
                    stall += time.perf_counter() - t0
                    print(f"step {step}: loss {loss.item():.4f}, checkpoint staged in "
                          f"{handle.stall_s * 1000:.1f} ms")
                if step >= args.steps:
                    break
        mgr.wait()
        print(f"done at step {step}; training waited {stall * 1000:.1f} ms on checkpoints in all")
        for info in mgr.list():
            print(f"  step {info.step:>6}  loss {info.metrics.get('loss', float('nan')):.4f}  "
                  f"{info.bytes / 1e6:.2f} MB  {','.join(info.tags)}")
        print(f"run again with --steps {args.steps * 2} to resume from step {step}")


if __name__ == "__main__":
    main()
