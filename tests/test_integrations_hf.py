"""Hugging Face on CPU: an Accelerate loop that stops and resumes bit-exactly through
``accelerate_state`` (the transformers ``Trainer``: test_integrations_hf_trainer.py)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

from asyncckpt import CheckpointManager, Schedule
from asyncckpt.integrations.hf import accelerate_state

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def _data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(48, 6, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))


def _accelerate_run(root, until: int, stop_at: int | None = None) -> dict[str, torch.Tensor]:
    """Train to ``until`` (or stop after ``stop_at``), resuming from ``root``; the weights."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import DataLoaderConfiguration
    from torchdata.stateful_dataloader import StatefulDataLoader

    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True))
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.1), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
    loader = StatefulDataLoader(_data(), batch_size=8, shuffle=True)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    state = accelerate_state(accelerator, model=model, optimizer=opt, scheduler=sched,
                             dataloader=loader)
    with CheckpointManager(root, schedule=Schedule(every_n_steps=5)) as mgr:
        step = mgr.restore(state)
        while step < until:
            for x, y in loader:
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
                step += 1
                end = stop_at if stop_at is not None else until
                mgr.maybe_save(step, state, force=step == end)
                if step >= end:
                    return {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    raise AssertionError("unreachable")


def test_accelerate_stop_and_resume_is_exact(tmp_path):
    whole = _accelerate_run(tmp_path / "a", until=14)
    _accelerate_run(tmp_path / "b", until=14, stop_at=8)      # mid-epoch 2 (6 batches an epoch)
    resumed = _accelerate_run(tmp_path / "b", until=14)
    for k, v in whole.items():
        assert torch.equal(resumed[k], v), k


def test_accelerate_state_unwraps_and_warns_about_a_stateless_loader(caplog):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    loader = torch.utils.data.DataLoader(_data(), batch_size=4)
    model, opt, sched, loader = accelerator.prepare(model, opt, sched, loader)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        state = accelerate_state(accelerator, model=model, optimizer=opt, scheduler=sched,
                                 dataloader=loader)
    assert type(state.optimizers["optimizer"]) is torch.optim.SGD
    assert isinstance(state.schedulers["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert state.dataloaders == {} and "use_stateful_dataloader" in caplog.text


def test_importing_hf_does_not_import_transformers():
    import subprocess

    code = ("import sys, asyncckpt.integrations.hf as h; "
            "print('transformers' in sys.modules, 'accelerate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
