"""Hugging Face on CPU: an Accelerate loop that stops and resumes bit-exactly through
``accelerate_state``, and the transformers ``AsyncCheckpointCallback`` in a ``Trainer``."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest
import torch
from torch import nn

from asyncckpt import CheckpointManager, Retention, Schedule, TrainState
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


class _Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(6, 1)

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class _Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.data = _data()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"x": x, "labels": y}


def _hf_train(tmp_path, root, max_steps: int):
    transformers = pytest.importorskip("transformers")
    from asyncckpt.integrations.hf import AsyncCheckpointCallback

    torch.manual_seed(0)
    model = _Regressor()
    cb = AsyncCheckpointCallback(root, schedule=Schedule(every_n_steps=3),
                                 retention=Retention(keep_last=2))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf-out"), max_steps=max_steps, per_device_train_batch_size=8,
        learning_rate=0.01, save_strategy="no", report_to=[], logging_steps=1, use_cpu=True,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return model, cb, trainer


def test_transformers_callback_saves_and_resumes(tmp_path):
    root = tmp_path / "ckpt"
    model, cb, _ = _hf_train(tmp_path, root, max_steps=7)
    with CheckpointManager(root) as mgr:
        infos = mgr.list()
        assert [i.step for i in infos] == [6, 7] and "loss" in infos[-1].metrics
        saved = _Regressor()
        mgr.restore(TrainState(model=saved), include=["model"])
    assert torch.equal(saved.net.weight, model.net.weight.detach())
    model2, cb2, trainer2 = _hf_train(tmp_path, root, max_steps=10)
    assert cb2.restored_step == 7 and trainer2.state.global_step == 10
    with CheckpointManager(root) as mgr:
        assert [i.step for i in mgr.list()] == [9, 10]


def test_importing_hf_does_not_import_transformers():
    import subprocess

    code = ("import sys, asyncckpt.integrations.hf as h; "
            "print('transformers' in sys.modules, 'accelerate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
