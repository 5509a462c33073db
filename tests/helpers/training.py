"""A tiny training loop for tests that need steps, saves and metrics, not a model."""

from __future__ import annotations

import torch

from asyncckpt import CheckpointManager, TrainState


def train_steps(mgr: CheckpointManager, state: TrainState, start: int, stop: int) -> None:
    """Steps ``start+1 .. stop`` of SGD on fixed batches (seeded by the step), each offered to
    ``mgr.maybe_save`` with ``loss`` = the step before it."""
    model, opt = state.models["model"], state.optimizers["optimizer"]
    for step in range(start, stop):
        torch.manual_seed(step)
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        mgr.maybe_save(step + 1, state, metrics={"loss": float(step)})


def adam_state(seed: int, sizes: tuple[int, int, int] = (4, 8, 2), *, step_size: int = 3,
               scheduler: bool = True, extra: dict | None = None, rng: bool = True) -> TrainState:
    """A two-layer model after one Adam step (so the optimizer has moments), with a StepLR."""
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Linear(sizes[1], sizes[2]))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, sizes[0])).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size) if scheduler else None
    return TrainState(model=model, optimizer=opt, scheduler=sched, extra=extra, rng=rng)


def small_model(seed: int) -> torch.nn.Module:
    """3 -> 4 -> 2 linear layers, initialised from ``seed``: a different model per seed."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
