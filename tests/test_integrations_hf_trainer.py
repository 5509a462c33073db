"""The transformers ``Trainer`` with ``AsyncCheckpointCallback`` on CPU.

A run stopped at a step and resumed with
``trainer.train(resume_from_checkpoint=cb.resume_from(trainer))`` goes on as the Trainer's
own resume from its own checkpoint of that step does (``save_strategy="steps"``, then
``train(resume_from_checkpoint="checkpoint-<step>")``), and as the uninterrupted run: the
``TrainerState`` (step, epoch, log history, best metric, another callback's state), every
logged loss and the final ``train_loss``, the batches seen after the resume and the final
weights, all bit-exact; mid-epoch, at an epoch's last step, after an evaluation and at the
final step.  The model has dropout, the data is shuffled, every step is logged, every
fourth evaluated, and the evaluation's metric draws from torch's RNG (a bootstrap), so an
RNG captured before the evaluation would show.  Each manifest holds its own step's logs.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import signal
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from asyncckpt import CheckpointManager, ConfigError, Retention, Schedule, TrainState
from helpers_deps import need

transformers = need("transformers")
from asyncckpt.integrations.hf import AsyncCheckpointCallback  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

ROWS, BATCH, EPOCHS, EVAL_EVERY = 48, 8, 3, 4
EPOCH_STEPS = ROWS // BATCH          # 6
LAST = EPOCH_STEPS * EPOCHS          # 18; evaluated at 4, 8, 12, 16 (and 18, the last step)
CASES = {"mid-epoch": 9, "epoch-end": 6, "after-eval": 8, "final-step": LAST}
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
"""transformers 4 tracks the best metric only when it saves its own checkpoints."""
NOT_REPRODUCIBLE = ("train_runtime", "train_samples_per_second", "train_steps_per_second",
                    "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def _rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.x, self.y = _rows(n, seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class _Net(nn.Module):
    """A regressor with dropout that notes the first value of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
        self.seen: list[float] = []

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.training:
            self.seen.append(float(x[0, 0]))
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def _bootstrap(p: Any) -> dict[str, float]:
    preds, labels = torch.as_tensor(p.predictions), torch.as_tensor(p.label_ids)
    idx = torch.randint(len(labels), (len(labels),))  # draws from torch's global RNG
    return {"boot_mse": float(((preds[idx] - labels[idx]) ** 2).mean())}


class _Evaluations(transformers.TrainerCallback, transformers.trainer_callback.ExportableState):
    """A callback with a state the Trainer saves (as EarlyStoppingCallback's patience counter):
    it counts the evaluations that did not beat the best metric by ``margin``."""

    def __init__(self, margin: float = 0.5) -> None:
        self.margin = margin
        self.not_better = 0
        self.best: float | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = metrics["eval_loss"]
        if self.best is not None and loss > self.best - self.margin:
            self.not_better += 1
        self.best = loss if self.best is None else min(self.best, loss)

    def state(self) -> dict[str, Any]:
        return {"args": {"margin": self.margin},
                "attributes": {"not_better": self.not_better, "best": self.best}}


class _Crash(Exception):
    pass


class _CrashAt(transformers.TrainerCallback):
    """Kills the run at the end of ``step`` (before any later callback sees it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Crash(self.step)


@dataclasses.dataclass
class _Run:
    trainer: Any
    model: _Net
    output: Any = None  # TrainOutput; None when the run crashed

    @property
    def history(self) -> list[dict[str, Any]]:
        return _reproducible(self.trainer.state.log_history)

    @property
    def not_better(self) -> int:
        return next(c.not_better for c in self.trainer.callback_handler.callbacks
                    if isinstance(c, _Evaluations))


def _reproducible(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k not in NOT_REPRODUCIBLE} for e in history]


def _train(out, *, callbacks=(), resume=None, cb=None, counting=True, **overrides) -> _Run:
    """One ``trainer.train()`` from a fresh model and seed; with ``cb``, started as the docs say."""
    torch.manual_seed(0)
    model = _Net()
    options = dict(output_dir=str(out), num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
                   per_device_eval_batch_size=16, learning_rate=0.01, lr_scheduler_type="linear",
                   warmup_steps=2, save_strategy="no", eval_strategy="steps", eval_steps=EVAL_EVERY,
                   metric_for_best_model="eval_loss", restore_callback_states_from_checkpoint=True,
                   logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    options.update(overrides)
    stateful = [_Evaluations()] if counting else []
    trainer = transformers.Trainer(
        model=model, args=transformers.TrainingArguments(**options), train_dataset=_Rows(ROWS, 5),
        eval_dataset=_Rows(32, 6), compute_metrics=_bootstrap, callbacks=[*stateful, *callbacks])
    run = _Run(trainer, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if cb is not None:
                resume = cb.resume_from(trainer)
            run.output = trainer.train(resume_from_checkpoint=resume)
        except _Crash:
            if cb is not None and cb.manager is not None:  # what was saved commits; then "dies"
                cb.manager.close()
                cb.manager = None
    return run


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _equal_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _logged_at(history: list[dict[str, Any]], step: int) -> dict[str, float]:
    merged: dict[str, float] = {}
    for e in history:
        if e["step"] == step:
            merged.update({k: float(v) for k, v in e.items() if k != "step"})
    return merged


def _saved_trainer_state(root, step: int) -> dict[str, Any]:
    with CheckpointManager(root) as mgr:
        holder = TrainState(rng=False)
        mgr.restore(holder, step, include=["extra"])
    return json.loads(holder.extra["hf_trainer_state"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[_Run, Any]:
    """The whole run, with the Trainer's own checkpoint of every step (``checkpoint-<n>``)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run = _train(out, save_strategy="steps", save_steps=1)
    assert run.trainer.state.global_step == LAST
    return run, out


@pytest.fixture(scope="module")
def ours_whole(tmp_path_factory) -> tuple[_Run, Any]:
    """The whole run with the callback saving every step."""
    root = tmp_path_factory.mktemp("ours") / "ckpt"
    cb = AsyncCheckpointCallback(root, schedule=Schedule(every_n_steps=1))
    return _train(root.parent / "out", callbacks=[cb], cb=cb), root


def test_the_callback_does_not_change_the_run(uninterrupted, ours_whole):
    ref, _ = uninterrupted
    run, _ = ours_whole
    assert run.history == ref.history and _equal_weights(run.model, ref.model)
    assert run.not_better == ref.not_better
    assert (run.trainer.state.best_metric is None) if TRANSFORMERS_4 else \
        (run.trainer.state.best_metric == ref.trainer.state.best_metric)


def test_each_manifest_holds_its_own_steps_logs_epoch_and_trainer_state(uninterrupted, ours_whole):
    ref, out = uninterrupted
    run, root = ours_whole
    history = run.trainer.state.log_history
    with CheckpointManager(root) as mgr:
        infos = mgr.list()
    assert [i.step for i in infos] == list(range(1, LAST + 1))
    evaluated = {e["step"] for e in history if "eval_loss" in e}  # and 18 with transformers 5
    assert set(range(EVAL_EVERY, LAST, EVAL_EVERY)) <= evaluated
    for info in infos:
        logged = _logged_at(history[:-1], info.step)  # the last entry: the run's summary
        assert info.metrics == logged, info.step
        assert "loss" in logged and ("eval_loss" in logged) == (info.step in evaluated), info.step
        assert info.epoch == int(logged["epoch"]) == info.step // EPOCH_STEPS, info.step
        assert ("epoch_end" in info.tags) == (info.step % EPOCH_STEPS == 0), info.step
    # the TrainerState saved with each step is the Trainer's own trainer_state.json of that step,
    # but for what only the Trainer's own saving sets (best_global_step, best_model_checkpoint),
    # TrainerControl.should_save (True while the Trainer saves) and save_steps (an argument)
    mine_only = ("best_global_step", "best_model_checkpoint", "save_steps", "log_history",
                 *(("best_metric",) if TRANSFORMERS_4 else ()))
    for step in (1, 6, 8, 9, LAST):
        ours = _saved_trainer_state(root, step)
        theirs = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert ours.get("best_global_step") is None  # transformers 4 has no such field
        assert (theirs.get("best_global_step") is None) == (step < EVAL_EVERY or "best_global_step" not in theirs)
        assert ours["stateful_callbacks"]["TrainerControl"]["args"]["should_save"] is False
        theirs["stateful_callbacks"]["TrainerControl"]["args"]["should_save"] = False
        for key in mine_only:
            ours.pop(key, None), theirs.pop(key, None)
        assert ours == theirs, step
        assert _reproducible(_saved_trainer_state(root, step)["log_history"]) == \
            _reproducible(json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())[
                "log_history"]), step


def _trainers_own_resume(out, checkpoint) -> _Run | None:
    try:
        return _train(out, resume=str(checkpoint))
    except pickle.UnpicklingError:  # transformers 4.x cannot read its own RNG file on torch >= 2.6
        return None


@pytest.mark.parametrize("step", CASES.values(), ids=CASES.keys())
def test_a_resume_goes_on_as_the_trainers_own_resume(uninterrupted, ours_whole, tmp_path, step):
    ref, out = uninterrupted
    whole, _ = ours_whole  # as ref, with the callback (and save_strategy="no")
    root = tmp_path / "ckpt"
    first = AsyncCheckpointCallback(root, schedule=Schedule(every_n_steps=1))
    stopped = _train(tmp_path / "a", callbacks=[_CrashAt(step + 1), first], cb=first)
    assert stopped.trainer.state.global_step == step + (step < LAST)
    cb = AsyncCheckpointCallback(root, schedule=Schedule(every_n_steps=1))
    ours = _train(tmp_path / "b", callbacks=[cb], cb=cb)
    assert cb.restored_step == step

    # as the uninterrupted run: the Trainer's state, every log entry after the resume (losses,
    # learning rates, grad norms, epochs, evaluations), the best metric, another callback's
    # state, the batches after the resume (the data position) and the weights, bit-exact
    state = ours.trainer.state
    assert state.global_step == LAST and state.epoch == EPOCHS
    assert ours.history[:-1] == ref.history[:-1]  # the last entry: this call's summary
    assert state.best_metric == whole.trainer.state.best_metric
    assert ours.not_better == ref.not_better
    assert len(ours.model.seen) == LAST - step
    assert ours.model.seen == ref.model.seen[len(ref.model.seen) - len(ours.model.seen):]
    assert _equal_weights(ours.model, ref.model), _max_diff(ours.model, ref.model)
    # the resumed run's manifests: their own step's logs, their epochs
    with CheckpointManager(root) as mgr:
        infos = [i for i in mgr.list() if i.step > step]
    assert [i.step for i in infos] == list(range(step + 1, LAST + 1))
    for info in infos:
        logged = _logged_at(state.log_history[:-1], info.step)
        assert info.metrics == logged and info.epoch == int(logged["epoch"]), info.step

    # as the Trainer's own resume from its own checkpoint of that step, which is bit-exact too;
    # train_loss is averaged over the steps of this train() call by both
    hf = _trainers_own_resume(tmp_path / "hf", out / f"checkpoint-{step}")
    if hf is None:
        pytest.skip(f"transformers {transformers.__version__} cannot resume its own checkpoints here")
    assert hf.trainer.state.global_step == LAST and hf.trainer.state.epoch == EPOCHS
    assert ours.history == hf.history
    assert ours.output.training_loss == hf.output.training_loss
    assert ours.not_better == hf.not_better
    assert TRANSFORMERS_4 or state.best_metric == hf.trainer.state.best_metric
    assert ours.model.seen == hf.model.seen
    assert _equal_weights(hf.model, ref.model), _max_diff(hf.model, ref.model)


def test_train_without_resume_from_is_refused(tmp_path):
    cb = AsyncCheckpointCallback(tmp_path / "ckpt")
    torch.manual_seed(0)
    trainer = transformers.Trainer(
        model=_Net(), args=transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=2, report_to=[], use_cpu=True),
        train_dataset=_Rows(ROWS, 5), callbacks=[cb])
    with pytest.raises(ConfigError, match=r"cb\.resume_from\(trainer\)"):
        trainer.train()


def _stopped_at(tmp_path, step: int = 5):
    root = tmp_path / "ckpt"
    cb = AsyncCheckpointCallback(root, schedule=Schedule(every_n_steps=1))
    _train(tmp_path / "a", callbacks=[_CrashAt(step + 1), cb], cb=cb)
    return root


def _fresh(tmp_path, root, trainer_cls=None):
    cb = AsyncCheckpointCallback(root)
    torch.manual_seed(0)
    trainer = (trainer_cls or transformers.Trainer)(
        model=_Net(), args=transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
            report_to=[], use_cpu=True, disable_tqdm=True),
        train_dataset=_Rows(ROWS, 5), callbacks=[cb])
    return cb, trainer


def test_a_resume_the_trainer_does_not_load_is_refused(tmp_path):
    cb, trainer = _fresh(tmp_path, _stopped_at(tmp_path))
    assert cb.resume_from(trainer) is not None and cb.restored_step == 5
    with pytest.raises(ConfigError, match="did not load it: pass its return value"):
        trainer.train()  # the folder resume_from returned is not passed


def test_a_trainer_without_the_loading_methods_is_refused(tmp_path):
    class Old(transformers.Trainer):
        _load_rng_state = None  # as if this transformers had no such method

    cb, trainer = _fresh(tmp_path, tmp_path / "ckpt", Old)
    with pytest.raises(ConfigError, match=rf"transformers {transformers.__version__}: Trainer has no "
                                          r"_load_rng_state\(\)"):
        cb.resume_from(trainer)


def test_a_trainer_that_no_longer_restores_the_rngs_is_refused(tmp_path):
    """If a transformers version stopped calling ``_load_rng_state`` on a resume, the resume
    would not continue the run exactly: the first resumed step says so."""
    cb, trainer = _fresh(tmp_path, _stopped_at(tmp_path))
    folder = cb.resume_from(trainer)
    trainer._load_rng_state = lambda checkpoint: None  # bypasses the callback's hook
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match=rf"transformers {transformers.__version__} did not "
                                              r"call Trainer\._load_rng_state"):
            trainer.train(resume_from_checkpoint=folder)


def test_a_checkpoint_without_the_trainer_state_is_refused(tmp_path):
    root = tmp_path / "ckpt"
    with CheckpointManager(root) as mgr:
        mgr.save(3, TrainState(model=_Net()), blocking=True)
    cb, trainer = _fresh(tmp_path, root)
    with pytest.raises(ConfigError, match="step 3 .* holds no Trainer state"):
        cb.resume_from(trainer)


def test_resume_from_needs_the_callback_among_the_trainers(tmp_path):
    _, trainer = _fresh(tmp_path, tmp_path / "ckpt")
    with pytest.raises(ConfigError, match=r"Trainer\(callbacks=\[cb\]\)"):
        AsyncCheckpointCallback(tmp_path / "other").resume_from(trainer)


def test_retention_and_a_longer_second_run(tmp_path):
    """Saves by its schedule and at the last step, keeps by its retention; a second run with
    more steps resumes the first one's last step and goes on."""
    root = tmp_path / "ckpt"

    def train(max_steps: int) -> tuple[_Run, Any]:
        cb = AsyncCheckpointCallback(root, schedule=Schedule(every_n_steps=3),
                                     retention=Retention(keep_last=2))
        return _train(tmp_path / "out", callbacks=[cb], cb=cb, max_steps=max_steps,
                      eval_strategy="no", metric_for_best_model=None, counting=False), cb

    first, _ = train(7)
    with CheckpointManager(root) as mgr:
        infos = mgr.list()
        assert [i.step for i in infos] == [6, 7] and "loss" in infos[-1].metrics
        saved = _Net()
        mgr.restore(TrainState(model=saved), include=["model"])
    assert _equal_weights(saved, first.model)
    second, cb = train(10)
    assert cb.restored_step == 7 and second.trainer.state.global_step == 10
    assert [e["step"] for e in second.trainer.state.log_history if "loss" in e] == list(range(1, 11))
    with CheckpointManager(root) as mgr:
        assert [i.step for i in mgr.list()] == [9, 10]


def test_an_epoch_end_schedule_saves_each_epochs_last_step(tmp_path):
    root = tmp_path / "ckpt"
    cb = AsyncCheckpointCallback(root, schedule=Schedule(on_epoch_end=True))
    _train(tmp_path / "out", callbacks=[cb], cb=cb)
    with CheckpointManager(root) as mgr:
        infos = mgr.list()
    assert [(i.step, i.epoch) for i in infos] == [(6, 1), (12, 2), (18, 3)]
    assert all("epoch_end" in i.tags for i in infos)


class _SignalAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            signal.raise_signal(signal.SIGTERM)  # recorded by the manager's handler


def test_a_stop_signal_saves_the_step_and_stops_the_trainer(tmp_path):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    root = tmp_path / "ckpt"
    cb = AsyncCheckpointCallback(root, schedule=Schedule(every_n_steps=100), save_on_signal=True)
    try:
        run = _train(tmp_path / "out", callbacks=[_SignalAt(5), cb], cb=cb)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    # step 5 saved once the Trainer was done with it; the step already fetched runs, then it stops
    assert run.trainer.state.global_step == 6
    with CheckpointManager(root) as mgr:
        infos = mgr.list()
    assert [i.step for i in infos] == [5] and "signal:SIGTERM" in infos[0].tags
    assert infos[0].metrics == _logged_at(run.trainer.state.log_history, 5)
