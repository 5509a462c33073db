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
from helpers_deps import need

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def _data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(48, 6, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))


def _rows() -> torch.utils.data.TensorDataset:
    """_data() with each row's index first, to tell which samples a batch holds."""
    x, y = _data().tensors
    return torch.utils.data.TensorDataset(torch.arange(len(x)), x, y)


# Loaders: torchdata's StatefulDataLoader (use_stateful_dataloader=True), a plain
# DataLoader, and a plain one over Accelerate's SeedableRandomSampler.  48 rows in batches
# of 8: 6 batches an epoch; a stop after step 8 is mid-epoch, after step 12 an epoch end.
KINDS = ("stateful", "plain", "seedable")
STOPS = (8, 12)
UNTIL = 20


def _accelerate_loop(root, kind: str, via: str, stop_at: int | None = None) -> dict:
    """Train to UNTIL steps (or stop after ``stop_at``, saving), resuming from ``root``:
    ``via="asyncckpt"`` through ``accelerate_state`` and a ``CheckpointManager``;
    ``via="accelerate"`` with Accelerate's own resume: ``save_state``/``load_state``, then
    ``skip_first_batches`` for the rest of the interrupted epoch (not with a stateful loader,
    which restores its position itself), ``set_epoch`` at every epoch.  Returns the step it
    started from, each step's loss and sample indices, and (run to the end) the weights."""
    accelerate = need("accelerate")
    from accelerate.utils import DataLoaderConfiguration
    from torchdata.stateful_dataloader import StatefulDataLoader

    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(
        use_stateful_dataloader=kind == "stateful", use_seedable_sampler=kind == "seedable"))
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.1), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
    cls = StatefulDataLoader if kind == "stateful" else torch.utils.data.DataLoader
    loader = cls(_rows(), batch_size=8, shuffle=True)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    per_epoch = len(loader)
    out: dict = {"losses": {}, "indices": {}}
    mgr = None
    if via == "asyncckpt":
        state = accelerate_state(accelerator, model=model, optimizer=opt, scheduler=sched,
                                 dataloader=loader)
        mgr = CheckpointManager(root, schedule=Schedule(every_n_steps=5))
        step = mgr.restore(state)

        def save(step: int) -> None:
            mgr.save(step, state).result(timeout=120)
    else:
        step = 0
        if (root / "state").exists():
            accelerator.load_state(str(root / "state"))
            step = int((root / "step").read_text())

        def save(step: int) -> None:
            accelerator.save_state(str(root / "state"))
            (root / "step").write_text(str(step))
    out["start"] = step
    try:
        first = True
        while step < UNTIL:
            active = loader
            if via == "accelerate":
                loader.set_epoch(step // per_epoch)
                if first and step % per_epoch and kind != "stateful":
                    active = accelerator.skip_first_batches(loader, step % per_epoch)
            first = False
            for i, x, y in active:
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
                step += 1
                out["losses"][step], out["indices"][step] = loss.item(), i.tolist()
                if step == stop_at:
                    save(step)
                    return out
                if step == UNTIL:
                    break
    finally:
        if mgr is not None:
            mgr.close()
    out["weights"] = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    return out


def _compare(tmp_path, kind: str, via: str, stop: int) -> dict:
    """A stopped and resumed run against an uninterrupted one: the figures of docs/integrations.md."""
    whole = _accelerate_loop(tmp_path / f"{kind}-{via}-whole", kind, via)
    root = tmp_path / f"{kind}-{via}-{stop}"
    _accelerate_loop(root, kind, via, stop_at=stop)
    rest = _accelerate_loop(root, kind, via)
    steps = sorted(rest["losses"])
    w = whole["weights"]
    return {"start": rest["start"], "steps": steps,
            "batches_matching": sum(rest["indices"][s] == whole["indices"][s] for s in steps),
            "losses_equal": all(rest["losses"][s] == whole["losses"][s] for s in steps),
            "loss_max_diff": max(abs(rest["losses"][s] - whole["losses"][s]) for s in steps),
            "weights_equal": all(torch.equal(rest["weights"][k], v) for k, v in w.items()),
            "weights_max_diff": max((rest["weights"][k] - v).abs().max().item() for k, v in w.items())}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stop", STOPS)
def test_accelerate_state_resume_is_exact(tmp_path, kind, stop):
    """Stopped mid-epoch or after an epoch's last batch, resumed with accelerate_state: the
    same steps, batches, losses and final weights as the uninterrupted run, bit for bit
    (dropout on, shuffled data), a plain DataLoader as well as a StatefulDataLoader."""
    got = _compare(tmp_path, kind, "asyncckpt", stop)
    assert got["start"] == stop and got["steps"] == list(range(stop + 1, UNTIL + 1))
    assert got["batches_matching"] == UNTIL - stop
    assert got["losses_equal"] and got["weights_equal"], got


def test_accelerates_own_resume_for_comparison(tmp_path):
    """Accelerate's own save_state/load_state + skip_first_batches on the same loop, for the
    figures docs/integrations.md shows (``pytest -s`` prints them).  Asserted: the cases
    where it is bit-exact (after an epoch's last batch, a plain loader), which checks that
    this loop resumes the way Accelerate documents."""
    rows = []
    for kind in KINDS:
        for stop in STOPS:
            got = _compare(tmp_path, kind, "accelerate", stop)
            assert got["start"] == stop and got["steps"] == list(range(stop + 1, UNTIL + 1))
            rows.append((kind, stop, got))
    print("\nAccelerate's own resume against an uninterrupted run (steps "
          f"{STOPS[0] + 1}..{UNTIL} after a stop at {STOPS}):")
    for kind, stop, got in rows:
        print(f"  {kind:9s} stop {stop:2d}: batches {got['batches_matching']}/{UNTIL - stop}, "
              f"loss max |diff| {got['loss_max_diff']:.3g}, "
              f"weights max |diff| {got['weights_max_diff']:.3g}, "
              f"bit-exact {got['losses_equal'] and got['weights_equal']}")
    for kind, stop, got in rows:
        if kind != "stateful" and stop == 12:
            assert got["losses_equal"] and got["weights_equal"], (kind, stop, got)


def test_accelerate_state_unwraps_and_tracks_a_plain_loader():
    accelerate = need("accelerate")
    from asyncckpt.integrations.hf import _PreparedLoader
    from asyncckpt.loader_position import LoaderPosition

    accelerator = accelerate.Accelerator(cpu=True)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    loader = torch.utils.data.DataLoader(_data(), batch_size=4)
    model, opt, sched, loader = accelerator.prepare(model, opt, sched, loader)
    state = accelerate_state(accelerator, model=model, optimizer=opt, scheduler=sched,
                             dataloader=loader)
    assert type(state.optimizers["optimizer"]) is torch.optim.SGD
    assert isinstance(state.schedulers["scheduler"], torch.optim.lr_scheduler.StepLR)
    prepared = state.dataloaders["dataloader"]
    assert isinstance(prepared, _PreparedLoader) and isinstance(prepared.position, LoaderPosition)
    assert prepared.position.loader is loader.base_dataloader


def test_accelerate_state_refuses_an_unreproducible_loader_and_warns_about_a_dispatched_one(caplog):
    accelerate = need("accelerate")
    from accelerate.utils import DataLoaderConfiguration

    from asyncckpt import ConfigError

    class Backwards(torch.utils.data.Sampler):
        def __iter__(self):
            return iter(range(47, -1, -1))

        def __len__(self):
            return 48

    accelerator = accelerate.Accelerator(cpu=True)
    loader = accelerator.prepare(torch.utils.data.DataLoader(_data(), batch_size=4,
                                                             sampler=Backwards()))
    with pytest.raises(ConfigError, match=r"accelerate_state dataloader 'train'.*Backwards.*"
                                          r"from torchdata.stateful_dataloader import"):
        accelerate_state(accelerator, dataloader={"train": loader})
    dispatcher = accelerate.Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=True))
    loader = dispatcher.prepare(torch.utils.data.DataLoader(_data(), batch_size=4))
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        state = accelerate_state(dispatcher, dataloader=loader)
    assert state.dataloaders == {} and "use_stateful_dataloader" in caplog.text


def test_importing_hf_does_not_import_transformers():
    import subprocess

    code = ("import sys, asyncckpt.integrations.hf as h; "
            "print('transformers' in sys.modules, 'accelerate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
