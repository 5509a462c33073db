"""The LightningModules and the one ``fit`` harness of test_integrations_lightning.py and
helpers_lightning_ddp.py (which Lightning's "ddp" strategy relaunches as a script).

Data: 40 samples, batches of 8 from a shuffling ``StatefulDataLoader``: 5 batches (optimizer
steps) an epoch.  ``TinyVal`` adds a 16-sample validation set.  Each module records what it
logs in ``history`` as ``(kind, global_step, value)``, "train" per step and "val" per
validation run (the sanity check left out), so runs can be compared entry by entry.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)

BATCHES_PER_EPOCH = 5


class Tiny(pl.LightningModule):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.history: list[tuple[str, int, int, float]] = []

    def record(self, kind: str, value: float = 0.0) -> None:
        self.history.append((kind, self.current_epoch, self.global_step, value))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        self.record("train", loss.item())
        return loss

    def on_train_epoch_start(self):
        self.record("epoch_start")

    def on_train_epoch_end(self):
        self.record("epoch_end")

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.7)}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(8 * BATCHES_PER_EPOCH, 6, generator=g)
        data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
        if torch.distributed.is_initialized():  # a sampler Lightning keeps (see the docs)
            sampler = StatefulDistributedSampler(data, shuffle=True, seed=5)
            return StatefulDataLoader(data, batch_size=8, sampler=sampler)
        return StatefulDataLoader(data, batch_size=8, shuffle=True)


class TinyVal(Tiny):
    """Tiny with a validation set: ``val_loss`` logged once per validation run."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__(dropout)
        self._val: list[float] = []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self._val.append(nn.functional.mse_loss(self.net(x), y).item())

    def on_validation_epoch_end(self):
        loss, self._val = sum(self._val) / len(self._val), []
        self.log("val_loss", loss)
        if not self.trainer.sanity_checking:
            self.record("val", loss)

    def val_dataloader(self):
        g = torch.Generator().manual_seed(4)
        x = torch.randn(16, 6, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
                                           batch_size=8)


class Crash(RuntimeError):
    """What ``fit(crash_after=...)`` raises inside Lightning: a failure after a checkpoint."""


class CrashAfter(pl.Callback):
    """Raise ``Crash`` as soon as the run goes past global step ``step``: at the start of
    the next epoch (before the LightningModule's ``on_train_epoch_start``) or of the next
    batch.  Everything the run does for step ``step`` (its validation, its epoch's end) has
    happened, nothing after it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def _check(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"crash after step {self.step}")

    def on_train_epoch_start(self, trainer, pl_module):
        self._check(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._check(trainer)


@dataclass
class Run:
    model: Tiny
    trainer: pl.Trainer
    error: BaseException | None = None
    history: list[tuple[str, int, int, float]] = field(default_factory=list)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def fit(*, max_steps: int = -1, max_epochs: int | None = None, module: type[Tiny] = Tiny,
        dropout: float = 0.0, callbacks: Sequence[pl.Callback] = (), plugins: Sequence[Any] = (),
        ckpt_path: str | None = None, crash_after: int | None = None, catch: bool = True,
        **trainer_options: Any) -> Run:
    """One ``trainer.fit`` of a fresh model, seeded as every run is (a fresh process would be
    the same).  ``crash_after``: raise ``Crash`` once that step is done (caught and returned in
    ``Run.error`` unless ``catch=False``).  ``trainer_options`` go to ``Trainer`` as they are
    (``val_check_interval``, ``devices``, ``strategy``...)."""
    pl.seed_everything(0, verbose=False)
    model = module(dropout)
    callbacks = list(callbacks) + ([CrashAfter(crash_after)] if crash_after is not None else [])
    options: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False,
                                   enable_progress_bar=False, enable_model_summary=False)
    options["enable_checkpointing"] = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    options.update(trainer_options)
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=max_epochs, callbacks=callbacks,
                         plugins=list(plugins), **options)
    run = Run(model, trainer, history=model.history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer.fit(model, ckpt_path=ckpt_path)
        except Crash as e:
            if not catch:
                raise
            run.error = e
    return run


# -- stop-and-resume cases: the tests' and lightning_resume_table.py's -----------------------

MODES: dict[str, dict[str, int]] = {"max_epochs": {"max_epochs": 3}, "max_steps": {"max_steps": 15}}
"""The whole run, two ways: Lightning's loops decide differently on a restart under each."""


@dataclass(frozen=True)
class Case:
    """A checkpoint to crash after: the run stops once step ``crash_after`` (the last one saved)
    is done, or, with ``first`` (limits per mode), ends there normally; then it is fit again.
    ``schedule`` is AsyncCheckpoint's, ``checkpoint`` the ModelCheckpoint options saving the
    same steps (every checkpoint kept; the newest resumed)."""

    module: type[Tiny]
    schedule: Any
    checkpoint: dict[str, Any]
    crash_after: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    first: dict[str, dict[str, int]] | None = None


def _cases() -> dict[str, Case]:
    from asyncckpt import Schedule

    shorter = {"max_epochs": {"max_epochs": 2}, "max_steps": {"max_steps": 7}}
    return {
        "mid-epoch": Case(Tiny, Schedule(every_n_steps=3), dict(every_n_train_steps=3), 3),
        "epoch end (on_epoch_end)": Case(Tiny, Schedule(on_epoch_end=True), {}, 5),
        "every_n_steps on an epoch's last step":
            Case(Tiny, Schedule(every_n_steps=5), dict(every_n_train_steps=5), 5),
        "gradient accumulation, epoch's last step":
            Case(Tiny, Schedule(every_n_steps=3), dict(every_n_train_steps=3), 3,
                 dict(accumulate_grad_batches=2)),
        "after a mid-epoch validation (val_check_interval=2)":
            Case(TinyVal, Schedule(every_n_steps=2), {}, 4, dict(val_check_interval=2)),
        "after the epoch-end validation":
            Case(TinyVal, Schedule(on_epoch_end=True), {}, 5),
        "after validation every 3 steps, across epochs":
            Case(TinyVal, Schedule(every_n_steps=3), {}, 6,
                 dict(val_check_interval=3, check_val_every_n_epoch=None)),
        "epoch end, validation every 2nd epoch":
            Case(TinyVal, Schedule(on_epoch_end=True), {}, 10, dict(check_val_every_n_epoch=2)),
        "final step, then a longer run":
            Case(Tiny, Schedule(every_n_steps=100), dict(save_last=True, every_n_train_steps=100),
                 first=shorter),
        "final step, then the same run again":
            Case(Tiny, Schedule(every_n_steps=100), dict(save_last=True, every_n_train_steps=100),
                 first=MODES),
    }


CASES = _cases()


@dataclass
class Resumed:
    first: Run
    resumed: Run
    restored_step: int

    @property
    def history(self) -> list[tuple[str, int, int, float]]:
        """The stopped run's history, then the resumed run's.  A run that ended at max_steps
        mid-epoch ended that epoch (Lightning calls on_train_epoch_end); the resumed run
        ends it again: the first of the two is left out."""
        first = list(self.first.history)
        if (self.first.error is None and first and first[-1][0] == "epoch_end"
                and any(h[0] == "epoch_end" and h[1] == first[-1][1] for h in self.resumed.history)):
            first.pop()
        return first + self.resumed.history


def reference(case: Case, mode: str, dropout: float = 0.0) -> Run:
    """The uninterrupted run of ``case`` (cached: every test compares against it)."""
    key = (case.module, tuple(sorted(case.options.items())), mode, dropout)
    if key not in _references:
        _references[key] = fit(module=case.module, dropout=dropout, **MODES[mode], **case.options)
    return _references[key]


_references: dict[Any, Run] = {}


def stop_and_resume(case: Case, mode: str, folder: str, *, dropout: float = 0.0,
                    how: str = "asyncckpt") -> Resumed:
    """Run ``case`` until its stop, then fit again with a fresh Trainer, model and callback:
    through ``AsyncCheckpoint(folder)`` (``how="asyncckpt"``) or Lightning's own
    ``ModelCheckpoint(dirpath=folder)`` and ``trainer.fit(ckpt_path=<the newest>)``
    (``how="lightning"``)."""
    from asyncckpt.integrations.lightning import AsyncCheckpoint

    first_limits = case.first[mode] if case.first else MODES[mode]
    common = dict(module=case.module, dropout=dropout, **case.options)
    if how == "asyncckpt":
        def callback() -> AsyncCheckpoint:
            return AsyncCheckpoint(folder, schedule=case.schedule)
        first = fit(callbacks=[callback()], crash_after=case.crash_after, **first_limits, **common)
        cb = callback()
        resumed = fit(callbacks=[cb], **MODES[mode], **common)
        return Resumed(first, resumed, cb.restored_step)
    assert how == "lightning", how

    def checkpoint() -> pl.callbacks.ModelCheckpoint:
        return pl.callbacks.ModelCheckpoint(dirpath=folder, save_top_k=-1, **case.checkpoint)
    first = fit(callbacks=[checkpoint()], crash_after=case.crash_after, **first_limits, **common)
    saved = [os.path.join(folder, name) for name in os.listdir(folder)]
    steps = {p: torch.load(p, weights_only=False)["global_step"] for p in saved}
    newest = max(saved, key=lambda p: (steps[p], p.endswith("last.ckpt")))
    resumed = fit(callbacks=[checkpoint()], ckpt_path=newest, **MODES[mode], **common)
    return Resumed(first, resumed, steps[newest])


def losses(history: list[tuple[str, int, int, float]]) -> list[tuple[str, int, int, float]]:
    """The "train" and "val" entries of a history (its epoch hooks left out)."""
    return [h for h in history if h[0] in ("train", "val")]


def same_weights(a: Run, b: Run) -> bool:
    wa, wb = a.weights, b.weights
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
