"""Train with DistributedDataParallel and asynchronous sharded checkpoints; run it again to resume.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py             # CPU (gloo) or GPUs (NCCL)
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --steps 400 # resumes from the newest

The replicated DDP state is written once: each rank stages and writes about
half of it (see "staged" below), every rank writes its own shard files in
parallel, and rank 0 commits the manifest once every rank's files are
durable.  Restoring on a different number of ranks works too (resharding);
the RNG is then re-seeded per rank and the loader starts its epoch afresh.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchdata.stateful_dataloader import StatefulDataLoader

from asyncckpt import CheckpointManager, Retention, Schedule, TrainState


def make_data(rank: int, world: int, n: int = 4096, dim: int = 32) -> torch.utils.data.Dataset:
    """The same synthetic regression set on every rank; each rank takes every world-th sample."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, dim, generator=g)
    y = x @ torch.randn(dim, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.Subset(torch.utils.data.TensorDataset(x, y), range(rank, n, world))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/ddp/ckpt", help="checkpoint root (path or URL)")
    p.add_argument("--steps", type=int, default=200, help="train until this step")
    p.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--tiny", action="store_true", help="a very small model and data set (smoke tests)")
    return p.parse_args()


def main() -> None:
    args = parse()
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    say = print if rank == 0 else (lambda *a, **k: None)

    hidden = 16 if args.tiny else 256
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = DDP(nn.Sequential(nn.Linear(32, hidden), nn.GELU(), nn.Linear(hidden, 1)).to(device),
                device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.steps, 1))
    torch.manual_seed(100 + rank)  # each rank its own shuffling and dropout stream
    loader = StatefulDataLoader(make_data(rank, world, n=256 if args.tiny else 4096), batch_size=32,
                                shuffle=True)
    extra = {"samples_seen": 0}
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader, extra=extra)

    with CheckpointManager(args.root, retention=Retention(keep_last=3),
                           schedule=Schedule(every_n_steps=args.every)) as mgr:
        step = mgr.restore(state)
        say(f"starting at step {step} on {world} ranks" + (f" (resumed from step {step})" if step else " (fresh run)"))
        last = None
        while step < args.steps and not mgr.should_stop:
            for x, y in loader:
                loss = nn.functional.mse_loss(model(x.to(device)), y.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                extra["samples_seen"] += len(x) * world
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)  # the training's own communicator, on the training thread
                handle = mgr.maybe_save(step, state, metrics={"loss": mean_loss.item() / world},
                                        force=step == args.steps)
                if handle is not None:
                    last = handle
                    say(f"step {step}: loss {mean_loss.item() / world:.4f}; rank {rank} staged "
                        f"{handle.bytes_staged} bytes in {handle.stall_s * 1000:.1f} ms")
                if step >= args.steps or mgr.should_stop:
                    break
        mgr.wait()
        if last is not None:
            say(f"last checkpoint, bytes staged per rank: {last.bytes_staged_per_rank}, "
                f"written per rank: {last.bytes_per_rank}")
        say(f"done at step {step}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
