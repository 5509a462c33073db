"""A plain ``torch.utils.data.DataLoader`` in a ``TrainState`` resumes at the right batch,
in the right order, as an uninterrupted run would go on (asyncckpt/loader_position.py).

Each case trains a toy loop (a draw from the global torch RNG per step stands for dropout)
through a ``CheckpointManager``, stops mid-epoch or right after an epoch's last batch,
resumes in a fresh ``TrainState`` over a fresh loader, and compares every batch seen after
the resume, into the following epochs, with an uninterrupted run.  torchdata's
``StatefulDataLoader`` runs the same loop as the reference: its resumed batches match its
own uninterrupted run.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler,
                              Sampler, SequentialSampler)
from torch.utils.data.distributed import DistributedSampler

from asyncckpt import CheckpointManager, ConfigError, TrainState
from asyncckpt.loader_position import LoaderPosition

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N, BATCH = 22, 4          # 6 batches an epoch (the last of 2), 5 with drop_last


class Rows(Dataset):
    """Item i: (i, a draw from the RNG of whoever loads it), counting the loads done in this
    process (a module-level class, so spawned workers can unpickle it)."""

    def __init__(self, n: int = N) -> None:
        self.n = n
        self.loads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.loads += 1
        return torch.tensor(i), torch.rand(())


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(8))


class Mine(Sampler):
    """A custom sampler: its order is its own business."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(reversed(range(self.n)))

    def __len__(self) -> int:
        return self.n


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


CASES = {
    "sequential": lambda cls, ds: cls(ds, batch_size=BATCH),
    "random": lambda cls, ds: cls(ds, batch_size=BATCH, shuffle=True),
    "random-generator": lambda cls, ds: cls(ds, batch_size=BATCH, shuffle=True, generator=_gen()),
    "random-sampler-generator": lambda cls, ds: cls(ds, batch_size=BATCH,
                                                    sampler=RandomSampler(ds, generator=_gen())),
    "random-replacement": lambda cls, ds: cls(ds, batch_size=BATCH, sampler=RandomSampler(
        ds, replacement=True, num_samples=N)),
    "drop-last": lambda cls, ds: cls(ds, batch_size=BATCH, shuffle=True, drop_last=True),
    "batch-sampler": lambda cls, ds: cls(ds, batch_sampler=BatchSampler(
        RandomSampler(ds), BATCH, drop_last=False)),
    "unbatched": lambda cls, ds: cls(ds, batch_size=None, shuffle=True),
    "distributed": lambda cls, ds: cls(ds, batch_size=BATCH, sampler=DistributedSampler(
        ds, num_replicas=2, rank=1, shuffle=True, seed=3)),
    "workers": lambda cls, ds: cls(ds, batch_size=BATCH, shuffle=True, num_workers=2),
    "workers-generator": lambda cls, ds: cls(ds, batch_size=BATCH, shuffle=True, num_workers=2,
                                             generator=_gen()),
    "workers-persistent": lambda cls, ds: cls(ds, batch_size=BATCH, shuffle=True, num_workers=2,
                                              persistent_workers=True),
}


def _per_epoch(case: str) -> int:
    return len(CASES[case](DataLoader, Rows()))


def _run(root, case: str, cls=DataLoader, stop: int | None = None):
    """Train three epochs (or stop after ``stop``, saving), resuming from ``root``.
    Returns (the batches seen: (indices, values) per step, the loader, the dataset)."""
    torch.manual_seed(0)
    ds = Rows()
    loader = CASES[case](cls, ds)
    state = TrainState(dataloader={"train": loader}, extra={"step": 0})
    total = 3 * len(loader)
    seen = []
    with CheckpointManager(root) as mgr:
        step = mgr.restore(state)
        while step < total:
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(step // len(loader))
            for idx, val in loader:
                torch.rand(3)                      # the training step's own draws
                seen.append((idx.tolist(), val.tolist()))
                step += 1
                if step == stop:
                    mgr.save(step, state).result(timeout=120)
                    return seen, loader, ds
                if step == total:
                    break
    return seen, loader, ds


def _check(tmp_path, case: str, where: str, cls=DataLoader, known_gap: str = "") -> None:
    per_epoch = _per_epoch(case)
    stop = per_epoch + (2 if where == "mid-epoch" else 0)
    whole, _, _ = _run(tmp_path / "whole", case, cls)
    first, _, _ = _run(tmp_path / "cut", case, cls, stop=stop)
    rest, loader, ds = _run(tmp_path / "cut", case, cls)
    assert len(first) == stop and len(whole) == stop + len(rest) >= stop + per_epoch
    indices = [b[0] for b in whole]
    if known_gap:
        after = -(-stop // per_epoch) * per_epoch      # where the interrupted epoch ends
        assert [b[0] for b in first + rest][:after] == indices[:after], case
        if [b[0] for b in first + rest] != indices:
            pytest.xfail(known_gap)
    assert [b[0] for b in first + rest] == indices, case
    if loader.num_workers == 0:
        # loaded in this process: the global RNG draws of the items match too, and the
        # consumed batches of the interrupted epoch were skipped without being loaded
        assert first + rest == whole, case
        if cls is DataLoader:
            items = sum(len(b[0]) if isinstance(b[0], list) else 1 for b in rest)
            assert ds.loads == items, (case, ds.loads, items)
    elif not loader.persistent_workers:
        # workers are seeded as in the uninterrupted run; from the next epoch on their draws
        # match (the interrupted epoch's remaining batches come from freshly seeded workers)
        after = -(-stop // per_epoch) * per_epoch
        assert first + rest[after - stop:] == whole[:stop] + whole[after:], case


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])
def test_resumes_as_the_uninterrupted_run(tmp_path, case, where):
    _check(tmp_path, case, where)


@pytest.mark.parametrize("case", ["random", "random-generator", "drop-last", "distributed",
                                  "workers"])
@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])
def test_stateful_dataloader_reference_resumes_the_same_way(tmp_path, case, where):
    from torchdata.stateful_dataloader import StatefulDataLoader

    gap = "torchdata 0.11: a StatefulDataLoader given generator= does not restore that " \
          "generator, so the epochs after the interrupted one shuffle differently" \
        if case == "random-generator" else ""
    _check(tmp_path, case, where, cls=StatefulDataLoader, known_gap=gap)


def test_a_stateful_loader_is_kept_as_it_is():
    from torchdata.stateful_dataloader import StatefulDataLoader

    loader = StatefulDataLoader(Rows(), batch_size=BATCH)
    assert TrainState(dataloader=loader).dataloaders["dataloader"] is loader


def test_one_position_per_loader_however_many_states_hold_it():
    loader = DataLoader(Rows(), batch_size=BATCH, shuffle=True)
    a = TrainState(dataloader=loader).dataloaders["dataloader"]
    b = TrainState(dataloader={"train": loader}).dataloaders["train"]
    assert isinstance(a, LoaderPosition) and a is b and a.loader is loader
    assert type(iter(loader)).__name__ == "_SingleProcessDataLoaderIter"


def test_resume_before_the_first_batch_of_an_iterator(tmp_path):
    """An iterator made but not yet pulled from: the resumed run starts that epoch."""
    def run(stop_at_iter: bool):
        torch.manual_seed(0)
        loader = DataLoader(Rows(), batch_size=BATCH, shuffle=True)
        state = TrainState(dataloader=loader)
        with CheckpointManager(tmp_path / "r") as mgr:
            if mgr.restore(state) == 0:
                it = iter(loader)
                if stop_at_iter:
                    mgr.save(1, state).result(timeout=120)
                    return None
            else:
                it = iter(loader)
            return [b[0].tolist() for b in it]

    torch.manual_seed(0)
    expected = [b[0].tolist() for b in DataLoader(Rows(), batch_size=BATCH, shuffle=True)]
    run(stop_at_iter=True)
    assert run(stop_at_iter=False) == expected


def test_distributed_sampler_epoch_set_differently_is_named(tmp_path, caplog):
    """A resumed epoch keeps the order it was interrupted in; a different set_epoch is logged."""
    def make():
        ds = Rows()
        return DataLoader(ds, batch_size=BATCH, sampler=DistributedSampler(
            ds, num_replicas=2, rank=0, shuffle=True, seed=1))

    loader = make()
    state = TrainState(dataloader=loader)
    loader.sampler.set_epoch(4)
    it = iter(loader)
    next(it)
    with CheckpointManager(tmp_path / "d") as mgr:
        mgr.save(1, state).result(timeout=120)
        expected = [b[0].tolist() for b in it]
        fresh = make()
        mgr.restore(TrainState(dataloader=fresh))
    assert fresh.sampler.epoch == 4
    fresh.sampler.set_epoch(9)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        got = [b[0].tolist() for b in fresh]
    assert got == expected and "epoch 9" in caplog.text and "epoch 4" in caplog.text


@pytest.mark.parametrize("make, reason", [
    (lambda ds: DataLoader(ds, batch_size=BATCH, sampler=Mine(N)), "sampler is a Mine"),
    (lambda ds: DataLoader(ds, batch_sampler=[[0, 1], [2, 3]]), "batch_sampler is a list"),
    (lambda ds: DataLoader(ds, batch_sampler=BatchSampler(Mine(N), 2, False)), "sampler is a Mine"),
    (lambda ds: DataLoader(Stream(), batch_size=2), "IterableDataset (Stream)"),
])
def test_an_unreproducible_order_is_refused_with_the_fix(make, reason):
    with pytest.raises(ConfigError) as err:
        TrainState(dataloader={"train": make(Rows())})
    msg = str(err.value)
    assert "TrainState dataloader 'train'" in msg and reason in msg, msg
    assert "from torchdata.stateful_dataloader import StatefulDataLoader" in msg, msg
    assert "StatefulDataLoader(...)` in place of `DataLoader(...)" in msg, msg


def test_a_subclass_with_the_same_iteration_is_accepted():
    class Shuffled(RandomSampler):
        pass

    class Loader(DataLoader):
        pass

    ds = Rows()
    loader = Loader(ds, batch_size=BATCH, sampler=Shuffled(ds))
    assert isinstance(TrainState(dataloader=loader).dataloaders["dataloader"], LoaderPosition)
    assert isinstance(TrainState(dataloader=DataLoader(ds, sampler=SequentialSampler(ds)))
                      .dataloaders["dataloader"], LoaderPosition)


def test_restore_on_another_world_size_leaves_the_loader_alone(tmp_path, caplog):
    """The position is per rank and tied to the old split: not restored, with a warning."""
    from asyncckpt.state import TrainState as TS

    loader = DataLoader(Rows(), batch_size=BATCH, shuffle=True)
    state = TS(dataloader=loader)
    it = iter(loader)
    next(it)
    loaded = {"rank_0/dataloader": None, "rank_1/dataloader": None}
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        targets = TS(dataloader=DataLoader(Rows(), batch_size=BATCH)).load_targets(0, set(loaded))
    assert "rank_0/dataloader" not in targets and "dataloader state is not restored" in caplog.text
    assert state.dataloaders["dataloader"].state_dict()["batches"] == 1


def test_after_an_epochs_last_batch_the_first_iteration_is_the_next_epoch(tmp_path):
    """No empty iteration first (a StatefulDataLoader saved there gives one)."""
    torch.manual_seed(0)
    loader = DataLoader(Rows(), batch_size=BATCH, shuffle=True)
    state = TrainState(dataloader=loader)
    epochs = [[b[0].tolist() for b in loader]]
    with CheckpointManager(tmp_path / "e") as mgr:
        for _ in loader:
            pass
        it = iter(loader)
        for _ in range(len(loader)):
            next(it)                                     # the last batch taken, no StopIteration
        mgr.save(1, state).result(timeout=120)
        epochs.append([b[0].tolist() for b in loader])   # the uninterrupted run's next epoch
        torch.manual_seed(0)
        fresh = DataLoader(Rows(), batch_size=BATCH, shuffle=True)
        resumed = TrainState(dataloader=fresh)
        mgr.restore(resumed)
        assert resumed.dataloaders["dataloader"].state_dict()["resume"] is False
    assert [b[0].tolist() for b in fresh] == epochs[-1]


def test_the_loader_is_freed_as_without_asyncckpt():
    """No reference cycle: a tracked loader (and its persistent workers) goes with its last
    reference, not at some later garbage collection."""
    import gc
    import weakref

    gc.disable()
    try:
        for kw in ({}, {"num_workers": 2, "persistent_workers": True}):
            loader = DataLoader(Rows(), batch_size=BATCH, shuffle=True, **kw)
            state = TrainState(dataloader=loader)
            for _ in loader:
                break
            ref = weakref.ref(loader)
            del loader, state
            assert ref() is None, kw
    finally:
        gc.enable()


def test_a_copied_or_pickled_loader_is_an_untracked_one():
    import copy
    import pickle

    loader = DataLoader(Rows(), batch_size=BATCH, shuffle=True)
    TrainState(dataloader=loader)
    for other in (copy.deepcopy(loader), pickle.loads(pickle.dumps(loader))):
        assert len([b for b in other]) == len(loader)
        assert type(iter(other)) is torch.utils.data.dataloader._SingleProcessDataLoaderIter


def test_a_failed_restore_puts_the_position_back(tmp_path):
    """A restore refused after the loader was loaded leaves it as it was (all or none)."""
    from asyncckpt import CorruptCheckpointError

    torch.manual_seed(0)
    loader = DataLoader(Rows(), batch_size=BATCH, shuffle=True, generator=_gen())
    state = TrainState(dataloader=loader, extra={"a": 1})
    it = iter(loader)
    next(it)
    with CheckpointManager(tmp_path / "f") as mgr:
        mgr.save(1, state).result(timeout=120)
        fresh = DataLoader(Rows(), batch_size=BATCH, shuffle=True, generator=_gen())
        target = TrainState(dataloader=fresh, extra={"a": 1})
        before = fresh.generator.get_state()
        undo = target.apply_objects({"rank_0/dataloader": {"dataloader": state.dataloaders[
            "dataloader"].state_dict()}}, 0)
        assert target.dataloaders["dataloader"].state_dict()["resume"] is True
        undo()
        assert target.dataloaders["dataloader"].state_dict()["resume"] is False
        assert torch.equal(fresh.generator.get_state(), before)
        with pytest.raises(CorruptCheckpointError):
            target.apply_objects({"rank_0/dataloader": {"dataloader": {"format": 99}}}, 0)


@pytest.mark.parametrize("stop", [2, 6])
def test_restore_into_a_loader_whose_persistent_workers_run(tmp_path, stop):
    """Rolled back in the same process: the live persistent iterator is left for a new one
    that resumes the checkpoint's epoch."""
    torch.manual_seed(0)
    loader = DataLoader(Rows(), batch_size=BATCH, shuffle=True, num_workers=2,
                        persistent_workers=True)
    state = TrainState(dataloader=loader)
    with CheckpointManager(tmp_path / "p") as mgr:
        [b for b in loader]
        it = iter(loader)
        for _ in range(stop):
            next(it)
        mgr.save(1, state).result(timeout=120)
        expected = [b[0].tolist() for b in it] + [b[0].tolist() for b in loader]
        [b for b in loader]                         # train on, then roll back
        mgr.restore(state, which=1)
        got = [b[0].tolist() for b in loader]
        if stop < len(loader):
            got += [b[0].tolist() for b in loader]
    assert got == expected
