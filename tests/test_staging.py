"""Staging: pooled buffers, budgets, backpressure, prewarm, and snapshot semantics."""

from __future__ import annotations

import io
import threading

import pytest
import torch

from asyncckpt import CheckpointManager, ConfigError, TrainState
from asyncckpt.staging import BufferPool, Stager, layout_of, layout_bytes

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _state(device: str = "cpu") -> dict:
    torch.manual_seed(0)
    return {"model/m": {"w": torch.randn(64, 32, device=device), "b": torch.randn(32, device=device)},
            "optim/o": {"state": {"w": {"exp_avg": torch.randn(64, 32, device=device),
                                        "step": torch.tensor(3.0, device=device)}},
                        "param_groups": [{"lr": 0.1, "params": ["w"]}]},
            "extra": io.BytesIO(b"blob")}


def _flat(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _flat(v).items()})
        elif isinstance(v, torch.Tensor):
            out[k] = v
    return out


def test_staged_copy_is_independent_of_later_updates() -> None:
    sd = _state()
    before = {k: v.clone() for k, v in _flat(sd).items()}
    staged = Stager(mode="pinned").stage(sd)
    staged.wait_ready()
    for t in _flat(sd).values():
        t.add_(1.0)
    after = _flat(staged.state_dict)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert staged.state_dict["extra"].getvalue() == b"blob"
    assert staged.state_dict["optim/o"]["param_groups"] == [{"lr": 0.1, "params": ["w"]}]


def test_pool_allocates_once_over_twenty_saves_and_stays_in_budget() -> None:
    sd = _state()
    stager = Stager(mode="auto", pageable_sets=2)
    set_bytes = layout_bytes(layout_of(sd))
    for _ in range(20):
        staged = stager.stage(sd)
        staged.wait_ready()
        staged.release()
    assert stager.host.allocations == 1
    assert stager.host.allocated_bytes == set_bytes


def test_two_sets_in_flight_then_reuse() -> None:
    sd = _state()
    stager = Stager(pageable_sets=2)
    a, b = stager.stage(sd), stager.stage(sd)
    assert stager.host.allocations == 2
    a.release()
    c = stager.stage(sd)
    assert stager.host.allocations == 2
    for s in (b, c):
        s.release()


def test_budget_smaller_than_one_copy_stages_nothing_and_allocates_nothing() -> None:
    sd = _state()
    stager = Stager(budget_bytes=100)
    assert stager.over_budget(sd) and stager.prewarm(sd) is None
    staged = stager.stage(sd)
    assert staged.mode == "direct" and staged.bytes_staged == 0
    assert staged.state_dict["model/m"]["w"] is sd["model/m"]["w"]    # the live tensor itself
    assert stager.host.allocations == 0 and stager.host.allocated_bytes == 0
    with pytest.raises(ConfigError, match="pinned_memory_budget=100 bytes is smaller"):
        stager.host.acquire(layout_of(sd))                          # the pool itself refuses


def test_manager_over_budget_saves_block_and_restore_exactly(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    state = TrainState(model=model, optimizer=opt)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with CheckpointManager(tmp_path / "ck", pinned_memory_budget=1024) as mgr:
        with caplog.at_level("WARNING", logger="asyncckpt"):
            handle = mgr.save(1, state)
        assert handle.committed(timeout=0) is True                   # done before save() returned
        assert handle.bytes_staged == 0 and mgr._stager.host.allocated_bytes == 0
        assert "larger than pinned_memory_budget=1024" in caplog.text
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        assert mgr.restore(state) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1GB"])
def test_invalid_budget(bad) -> None:
    with pytest.raises(ConfigError, match="pinned_memory_budget"):
        Stager(budget_bytes=bad)


def test_unknown_mode() -> None:
    with pytest.raises(ConfigError, match="staging='gpu'"):
        Stager(mode="gpu")


def test_stage_waits_for_a_release_when_every_set_is_held() -> None:
    sd = _state()
    stager = Stager(budget_bytes=layout_bytes(layout_of(sd)))  # exactly one set
    held = stager.stage(sd)
    waiting = threading.Event()
    result: dict = {}

    def second() -> None:
        result["staged"] = stager.stage(sd, on_wait=waiting.set)

    t = threading.Thread(target=second)
    t.start()
    assert waiting.wait(timeout=30), "second stage never reported waiting"
    assert "staged" not in result
    held.release()
    t.join(timeout=30)
    assert not t.is_alive()
    assert stager.host.allocations == 1
    result["staged"].release()


def test_layout_change_reallocates_and_drops_idle_sets() -> None:
    stager = Stager()
    s1 = stager.stage(_state())
    s1.release()
    bigger = _state()
    bigger["model/m"]["w2"] = torch.zeros(128, 128)
    s2 = stager.stage(bigger)
    s2.release()
    assert stager.host.allocations == 2
    assert stager.host.allocated_bytes == layout_bytes(layout_of(bigger))


def test_prewarm_allocates_before_the_first_save() -> None:
    sd = _state()
    stager = Stager()
    thread = stager.prewarm(sd)
    assert thread is not None
    thread.join(timeout=30)
    assert stager.host.allocations == 1 and stager.warm
    stager.stage(sd).release()
    assert stager.host.allocations == 1
    assert stager.prewarm(sd) is None  # already warm for this layout


def test_buffer_pool_release_of_a_stale_layout_frees_its_bytes() -> None:
    pool = BufferPool(default_sets=2)
    l1 = layout_of({"a": torch.zeros(10)})
    l2 = layout_of({"a": torch.zeros(20)})
    b1 = pool.acquire(l1)
    pool.acquire(l2)  # switches the layout while b1 is held
    pool.release(b1)
    assert pool.allocated_bytes == layout_bytes(l2)


def test_manager_prewarm_then_saves_never_allocate_again(tmp_path) -> None:
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    state = TrainState(model=model, optimizer=opt)
    with CheckpointManager(tmp_path / "ck", compression=None) as mgr:
        mgr.prewarm(state)
        mgr._stager._prewarm.join(timeout=30)
        for step in range(1, 21):
            mgr.save(step, state).result(timeout=120)
        assert mgr._stager.host.allocations == 1
        assert mgr._stager.host.allocated_bytes <= 2 * layout_bytes(layout_of(state.tensors()))


def test_pinned_footprint_counts_power_of_two_rounding_and_the_budget_error_says_so() -> None:
    layout = layout_of({"a": torch.empty(3, 5), "b": torch.empty(1000), "e": torch.empty(0)})
    assert BufferPool().footprint(layout) == 60 + 4000 == layout_bytes(layout)
    assert BufferPool(pin=True).footprint(layout) == 64 + 4096      # as torch allocates pinned
    with pytest.raises(ConfigError, match=r"pinned_memory_budget=4060 .*\(4160 bytes, each tensor's "
                                          r"pinned buffer rounded up to a power of two\)"):
        BufferPool(pin=True, budget_bytes=4060).acquire(layout)     # refused before allocating


# -- GPU -------------------------------------------------------------------------

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["pinned", "device", "auto"])
def test_gpu_snapshot_matches_values_at_save_time(mode: str) -> None:
    sd = _state("cuda")
    before = {k: v.cpu() for k, v in _flat(sd).items()}
    staged = Stager(mode=mode).stage(sd)
    for t in _flat(sd).values():  # in-place updates queued right after save() returns
        t.mul_(3.0).add_(1.0)
    staged.wait_ready()
    after = _flat(staged.state_dict)
    for k in before:
        assert after[k].device.type == "cpu"
        assert torch.equal(after[k], before[k]), k
    staged.release()


@pytest.mark.gpu
@cuda
def test_gpu_machine_stages_cpu_state_in_pageable_buffers_and_auto_keeps_its_choice() -> None:
    stager = Stager(mode="auto")
    for _ in range(2):
        s = stager.stage(_state("cpu"))
        s.wait_ready()
        assert not any(t.is_pinned() for t in _flat(s.state_dict).values())
        s.release()
    assert stager.host.allocations == 0 and stager.cpu_host.allocations == 1
    modes = []
    for _ in range(3):
        s = stager.stage(_state("cuda"))
        s.wait_ready()
        modes.append(s.mode)
        s.release()
    assert len(set(modes)) == 1 and modes[0] in ("device", "pinned")   # decided once per layout


@pytest.mark.gpu
@cuda
def test_gpu_pinned_buffers_are_pinned_and_reused() -> None:
    sd = _state("cuda")
    stager = Stager(mode="pinned")
    for _ in range(5):
        s = stager.stage(sd)
        s.wait_ready()
        assert all(t.is_pinned() for t in _flat(s.state_dict).values())
        s.release()
    assert stager.host.allocations == 1


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("staging", ["pinned", "device"])
def test_gpu_manager_round_trip(tmp_path, staging: str) -> None:
    model = torch.nn.Linear(32, 32).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 32, device="cuda")).sum().backward()
    opt.step()
    state = TrainState(model=model, optimizer=opt)
    ref = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with CheckpointManager(tmp_path / "ck", staging=staging) as mgr:
        mgr.save(1, state)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        mgr.wait()
        assert mgr.restore(state) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), ref[k]), k


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("staging", ["pinned", "device"])
def test_gpu_overlap_saves_values_from_before_the_next_step(tmp_path, staging: str) -> None:
    """Copies overlap forward/backward; optimizer.step (hooked) and BatchNorm buffers
    (fenced at once) never leak into the snapshot."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    def train_step() -> None:
        model(torch.randn(32, 64, device="cuda")).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    train_step()
    state = TrainState(model=model, optimizer=opt, rng=False)
    with CheckpointManager(tmp_path / "ck", staging=staging, overlap=True) as mgr:
        ref_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        ref_avg = [s["exp_avg"].cpu().clone() for s in opt.state.values()]
        mgr.save(1, state)
        for _ in range(3):  # forward changes BN buffers; step changes params and moments
            train_step()
        with mgr.guard():
            with torch.no_grad():
                model[0].weight.mul_(2.0)
        mgr.wait()
        assert mgr.restore(state) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), ref_model[k]), k
    for got, ref in zip((s["exp_avg"] for s in opt.state.values()), ref_avg):
        assert torch.equal(got.cpu(), ref)


@pytest.mark.gpu
@cuda
def test_gpu_over_budget_save_writes_live_cuda_tensors_and_pins_nothing(tmp_path) -> None:
    model = torch.nn.Linear(256, 256).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 256, device="cuda")).sum().backward()
    opt.step()
    state = TrainState(model=model, optimizer=opt)
    want = {k: v.cpu() for k, v in model.state_dict().items()}
    with CheckpointManager(tmp_path / "ck", pinned_memory_budget=4096) as mgr:
        handle = mgr.save(1, state)
        assert handle.committed(timeout=0) is True and mgr._stager.host.allocated_bytes == 0
        with torch.no_grad():
            model.weight.mul_(-1)
        assert mgr.restore(state) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), want[k]), k
