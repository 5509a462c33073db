"""Train a small LightningModule with asyncckpt's callback; run it again to resume.

    python examples/train_lightning.py                 # 60 steps, a checkpoint every 20
    python examples/train_lightning.py --steps 120     # resumes from the newest checkpoint

``AsyncCheckpoint`` replaces Lightning's ModelCheckpoint: saves are asynchronous and
atomic, the schedule and retention are asyncckpt's, and the run resumes exactly (model,
optimizer, LR scheduler, RNGs, and the StatefulDataLoader's position in its epoch).
To keep ModelCheckpoint and only change how files are written, pass
``plugins=[AsyncCkptIO()]`` to the Trainer instead (see asyncckpt.integrations.lightning).
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

import lightning.pytorch as pl
from asyncckpt import CheckpointManager, Retention, Schedule
from asyncckpt.integrations.lightning import AsyncCheckpoint


class Regressor(pl.LightningModule):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 50, 0.5)}

    def train_dataloader(self) -> StatefulDataLoader:
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(1024, 32, generator=g)
        y = x @ torch.randn(32, 1, generator=g)
        return StatefulDataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/lightning/ckpt", help="checkpoint root (path or URL)")
    p.add_argument("--steps", type=int, default=60, help="train until this step")
    p.add_argument("--every", type=int, default=20, help="checkpoint every N steps")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    pl.seed_everything(0, verbose=False)
    ckpt = AsyncCheckpoint(args.root, schedule=Schedule(every_n_steps=args.every),
                           retention=Retention(keep_last=2, keep_best=1, best_metric="loss"))
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ckpt])
    trainer.fit(Regressor())
    print(f"started at step {ckpt.restored_step}" + (" (resumed)" if ckpt.restored_step else " (fresh run)"))
    print(f"done at step {trainer.global_step}")
    with CheckpointManager(args.root) as mgr:
        for info in mgr.list():
            print(f"  step {info.step:>5}  loss {info.metrics.get('loss', float('nan')):.4f}  "
                  f"{info.bytes / 1e3:.1f} kB  {','.join(info.tags)}")
    print(f"run again with --steps {args.steps * 2} to resume from step {trainer.global_step}")


if __name__ == "__main__":
    main()
