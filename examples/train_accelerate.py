"""Train with Hugging Face Accelerate and asynchronous checkpoints; run it again to resume.

    python examples/train_accelerate.py                  # 60 steps, a checkpoint every 20
    python examples/train_accelerate.py --steps 120      # resumes from the newest checkpoint
    accelerate launch --num_processes 2 examples/train_accelerate.py   # several processes

``accelerate_state`` turns what ``accelerator.prepare`` returned into a TrainState
(Accelerate's wrappers unwrapped, the GradScaler and the stateful loader's position
included); the CheckpointManager does the rest.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from asyncckpt import CheckpointManager, Retention, Schedule
from asyncckpt.integrations.hf import accelerate_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/accelerate/ckpt", help="checkpoint root (path or URL)")
    p.add_argument("--steps", type=int, default=60, help="train until this step")
    p.add_argument("--every", type=int, default=20, help="checkpoint every N steps")
    p.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    accelerator = Accelerator(cpu=args.cpu,
                              dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(1024, 32, generator=g)
    data = torch.utils.data.TensorDataset(x, x @ torch.randn(32, 1, generator=g))
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 50, 0.5)
    loader = StatefulDataLoader(data, batch_size=64, shuffle=True)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    state = accelerate_state(accelerator, model=model, optimizer=opt, scheduler=sched,
                             dataloader=loader)

    with CheckpointManager(args.root, schedule=Schedule(every_n_steps=args.every),
                           retention=Retention(keep_last=2, keep_best=1, best_metric="loss")) as mgr:
        step = mgr.restore(state)
        accelerator.print(f"starting at step {step}" + (" (resumed)" if step else " (fresh run)"))
        while step < args.steps:
            for xb, yb in loader:
                loss = nn.functional.mse_loss(model(xb), yb)
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
                step += 1
                mgr.maybe_save(step, state, metrics={"loss": loss.item()}, force=step == args.steps)
                if step >= args.steps:
                    break
        mgr.wait()
        accelerator.print(f"done at step {step}")
        for info in mgr.list():
            accelerator.print(f"  step {info.step:>5}  loss {info.metrics['loss']:.4f}  "
                              f"{info.bytes / 1e3:.1f} kB  {','.join(info.tags)}")
    accelerator.print(f"run again with --steps {args.steps * 2} to resume from step {step}")


if __name__ == "__main__":
    main()
