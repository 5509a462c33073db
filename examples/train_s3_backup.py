"""Checkpoint to a fast local disk and mirror every commit to S3; resume from either.

    python examples/train_s3_backup.py --backup s3://my-bucket/toy-backup
    python examples/train_s3_backup.py --backup s3://my-bucket/toy-backup --steps 120
    # any S3-compatible store (MinIO, moto): add --endpoint-url http://127.0.0.1:9000

Credentials come from the usual AWS sources (environment, profile, instance role); they
never appear in logs, manifests or errors.  The backup keeps its own, longer retention.
Delete the local root and run again: the newest checkpoint is read back from S3.
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn

from asyncckpt import CheckpointManager, Retention, Schedule, TrainState


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/s3-backup/ckpt", help="local checkpoint root")
    p.add_argument("--backup", required=True, help="backup URL, e.g. s3://bucket/prefix")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, moto)")
    p.add_argument("--steps", type=int, default=60, help="train until this step")
    p.add_argument("--every", type=int, default=20, help="checkpoint every N steps")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    state = TrainState(model=model, optimizer=opt, extra={"samples_seen": 0})
    s3 = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}

    with CheckpointManager(args.root, schedule=Schedule(every_n_steps=args.every),
                           retention=Retention(keep_last=2),
                           backup=args.backup, backup_storage_options=s3,
                           backup_retention=Retention(keep_last=5)) as mgr:
        step = mgr.restore(state)       # a local copy missing or damaged is read from S3
        print(f"starting at step {step}" + (" (resumed)" if step else " (fresh run)"))
        g = torch.Generator().manual_seed(step)
        while step < args.steps:
            x = torch.randn(64, 32, generator=g)
            loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            state.extra["samples_seen"] += len(x)
            mgr.maybe_save(step, state, metrics={"loss": loss.item()}, force=step == args.steps)
        mgr.wait()                      # committed locally and copied to the backup
        print(f"done at step {step}")
        print("local: ", [i.step for i in mgr.list()])
        print("backup:", [i.step for i in mgr.list(backup=True)])


if __name__ == "__main__":
    main()
