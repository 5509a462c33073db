"""One rank of a multi-process scenario for test_distributed.py (run as a script, never imported by pytest).

    python tests/dist_worker.py <scenario> <rank> <world_size> <folder>

Joins a gloo group through a file rendezvous in ``folder``, runs the scenario,
and writes what it saw to ``folder/<scenario>-rank<r>.json`` for the test to
assert on.  Scenarios, in the order the test runs them:

- ``save4``   (4 ranks) DDP save; per-rank bytes.
- ``main2``   (2 ranks) DDP saves with plan caching, a fault on rank 1 only,
  retention, "latest" agreement with a rank whose listing is stale, exact RNG
  and loader restore, an FSDP2 save, DDP -> FSDP2 restore, 4 -> 2 restore.
- ``restore3`` (3 ranks) the 2-rank DDP checkpoint restored on 3 ranks.
- ``rollback2`` (2 ranks, its own test) a rollback: refused on every rank, then kept aside.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchdata.stateful_dataloader import StatefulDataLoader

from asyncckpt import CheckpointManager, Retention, TrainState
from asyncckpt.errors import ConfigError, SaveError
from asyncckpt.storage import list_committed

log = logging.getLogger("dist_worker")


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 16))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    x = torch.randn(8, 32, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def make_loader(rank: int) -> StatefulDataLoader:
    data = torch.utils.data.TensorDataset(torch.arange(40) + 1000 * rank)
    return StatefulDataLoader(data, batch_size=4, shuffle=False)


def ddp_state(seed: int, *, loader: bool = True, wrap: bool = True
              ) -> tuple[TrainState, nn.Module, torch.optim.Optimizer, Any]:
    """A DDP model (``wrap=False``: the same replicated model unwrapped; DDP costs ~4 CPU-s to import)."""
    model = DDP(make_model(seed)) if wrap else make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dl = make_loader(dist.get_rank()) if loader else None
    return TrainState(model=model, optimizer=opt, dataloader=dl, extra={"who": "ddp"}), model, opt, dl


def fsdp_state(seed: int) -> tuple[TrainState, nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = make_model(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return TrainState(model=model, optimizer=opt, extra={"who": "fsdp"}), model, opt


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Plain full tensors of params and Adam moments, keyed by FQN (collective for FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = {}
    for k, v in get_model_state_dict(model).items():
        out[f"param/{k}"] = v.full_tensor() if hasattr(v, "full_tensor") else v
    for k, st in get_optimizer_state_dict(model, opt)["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            v = st[name]
            out[f"{name}/{k}"] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return {k: v.detach().clone() for k, v in out.items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def handle_report(h: Any) -> dict[str, Any]:
    return {"staged": h.bytes_staged, "written": h.bytes_written,
            "written_per_rank": h.bytes_per_rank, "staged_per_rank": h.bytes_staged_per_rank}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# -- scenarios -------------------------------------------------------------------------

def save4(out: dict[str, Any], folder: Path) -> None:
    rank = dist.get_rank()
    state, model, opt, _ = ddp_state(seed=7, loader=False)
    train_step(model, opt, seed=1)
    with CheckpointManager(folder / "ddp4", compression=None) as mgr:
        h = mgr.save(10, state, blocking=True)
        out["bytes"] = handle_report(h)
        out["planned"] = mgr._plans._plan.planned_bytes
    out["state_bytes"] = sum(v.numel() * v.element_size() for v in full_state(model, opt).values())
    if rank == 0:
        torch.save(full_state(model, opt), folder / "ddp4_expected.pt")


def main2(out: dict[str, Any], folder: Path) -> None:
    from helpers_faulty_fs import new_faulty_fs

    rank = dist.get_rank()
    records = _Records()
    logging.getLogger("asyncckpt").addHandler(records)
    faulty = new_faulty_fs()
    root = folder / "ddp2"
    url = faulty.url(root) if rank == 1 else str(root)   # only rank 1 writes through the faulty fs
    torch.manual_seed(100 + rank)
    random.seed(100 + rank)
    state, model, opt, dl = ddp_state(seed=3)
    it = iter(dl)
    with CheckpointManager(url, retention=Retention(keep_last=2)) as mgr:
        # A. two saves, the second reuses the cached plan
        train_step(model, opt, seed=1)
        next(it)
        out["save1"] = handle_report(mgr.save(1, state, blocking=True))
        train_step(model, opt, seed=2)
        next(it)
        h2 = mgr.save(2, state)
        expected_rng, expected_batch = torch.rand(4).tolist(), next(it)[0].tolist()
        h2.result(timeout=120)
        out["save2"] = handle_report(h2)
        out["replans"] = mgr._plans.replans
        out["planned"] = mgr._plans._plan.planned_bytes
        expected_2 = full_state(model, opt)
        # B. a write fails on rank 1 only
        train_step(model, opt, seed=3)
        if rank == 1:
            faulty.fail_on_write(1)
        h3 = mgr.save(3, state)
        try:
            h3.result(timeout=120)
            out["save3_error"] = None
        except SaveError as e:
            out["save3_error"] = {"failed_ranks": sorted(e.failures)}
        try:
            mgr.wait()
        except SaveError:
            pass
        faulty.disarm()
        out["manifest3_exists"] = (root / "step-0000000003" / "manifest.json").exists()
        out["listed_after_fault"] = [i.step for i in mgr.list()]
        # C. the next save works (collectives still aligned); retention drops step 1 on rank 0
        train_step(model, opt, seed=4)
        h4 = mgr.save(4, state, blocking=True)
        mgr.wait()  # post-commit work (retention) too
        dist.barrier()  # ... which runs on rank 0: let it finish before rank 1 lists
        out["save4_files_ranks"] = sorted({f.rank for f in manifest_files(root, 4)} - {None})
        out["manifest4_world_size"] = json.loads((root / "step-0000000004" / "manifest.json").read_text())["world_size"]
        expected_4 = full_state(model, opt)
        if rank == 0:
            torch.save(expected_4, folder / "ddp2_step4_expected.pt")
        del h4
        mgr.wait()  # retention runs on rank 0 after the commit; wait() lines every rank up
        out["listed"] = [i.step for i in mgr.list()]
        out["retention_deletes_logged"] = sum("deleted by retention" in m for m in records.messages)
        # D. "latest": rank 1's listing is stale (its filesystem lists the root as empty);
        # rank 0 decides for everyone
        if rank == 1:
            faulty.hide_listing(root)
        out["own_listing"] = [m.step for m in list_committed(mgr.storage)]
        train_step(model, opt, seed=5)
        out["latest"] = mgr.restore(state)
        out["latest_diff"] = max_diff(full_state(model, opt), expected_4)
        faulty.show_listing()
        # exact RNG and loader restore when the world size matches
        torch.rand(10)
        out["restored_2"] = mgr.restore(state, 2)
        out["diff_2"] = max_diff(full_state(model, opt), expected_2)
        out["rng_exact"] = torch.rand(4).tolist() == expected_rng
        out["loader_exact"] = next(iter(dl))[0].tolist() == expected_batch
    # rank 1's staging budget is smaller than its share: it saves its live tensors while
    # its save() waits, rank 0 stages as usual; the checkpoint commits on both
    budget = 1000 if rank == 1 else None
    with CheckpointManager(folder / "ddp2b", pinned_memory_budget=budget) as mgr:
        h = mgr.save(1, state)
        out["direct_committed_on_return"] = h.committed(timeout=0)
        h.result(timeout=120)
        mgr.wait()
        out["direct_listed"] = [i.step for i in mgr.list()]
    # staging fails on rank 1 only (its buffer allocation fails): the save fails on both
    with CheckpointManager(folder / "ddp2c") as mgr:
        if rank == 1:
            def no_memory(*_: object) -> None:
                raise MemoryError("injected: allocating the staging buffers failed")
            mgr._stager.cpu_host._allocate = no_memory  # type: ignore[method-assign]
        try:
            h = mgr.save(1, state)
            h.result(timeout=120)
            out["stage_fault"] = None
        except (SaveError, ConfigError, MemoryError) as e:
            out["stage_fault"] = type(e).__name__
        try:
            mgr.wait()
        except SaveError:
            pass
        out["stage_fault_listed"] = [i.step for i in mgr.list()]
    # E. FSDP2 save
    fstate, fmodel, fopt = fsdp_state(seed=11)
    train_step(fmodel, fopt, seed=6)
    with CheckpointManager(folder / "fsdp2", compression=None) as mgr:
        out["fsdp_save"] = handle_report(mgr.save(5, fstate, blocking=True))
    fexp = full_state(fmodel, fopt)
    if rank == 0:
        torch.save(fexp, folder / "fsdp2_expected.pt")
    # F. DDP checkpoint (2 ranks) -> FSDP2 model (2 ranks)
    gstate, gmodel, gopt = fsdp_state(seed=12)
    with CheckpointManager(root) as mgr:
        out["ddp_to_fsdp_step"] = mgr.restore(gstate, 4)
    out["ddp_to_fsdp_diff"] = max_diff(full_state(gmodel, gopt), expected_4)
    # G. 4 ranks -> 2 ranks (DDP), RNG re-seeded deterministically
    hstate, hmodel, hopt, _ = ddp_state(seed=13, loader=False)
    with CheckpointManager(folder / "ddp4") as mgr:
        out["from4_step"] = mgr.restore(hstate)
        out["from4_rng"] = torch.rand(4).tolist()
        mgr.restore(hstate)
        out["from4_rng_again"] = torch.rand(4).tolist()
    out["from4_diff"] = max_diff(full_state(hmodel, hopt), torch.load(folder / "ddp4_expected.pt"))


def manifest_files(root: Path, step: int) -> list[Any]:
    from asyncckpt.manifest import Manifest

    return list(Manifest.from_json((root / f"step-{step:010d}" / "manifest.json").read_bytes()).files)


def restore3(out: dict[str, Any], folder: Path) -> None:
    records = _Records()
    logging.getLogger("asyncckpt").addHandler(records)
    state, model, opt, dl = ddp_state(seed=21, wrap=False)
    with CheckpointManager(folder / "ddp2") as mgr:
        out["step"] = mgr.restore(state)
        out["rng"] = torch.rand(4).tolist()
        mgr.restore(state)
        out["rng_again"] = torch.rand(4).tolist()
    out["diff"] = max_diff(full_state(model, opt), torch.load(folder / "ddp2_step4_expected.pt"))
    out["loader_first_batch"] = next(iter(dl))[0].tolist()
    out["loader_warned"] = any("dataloader state is not restored" in m for m in records.messages)
    out["extra"] = state.extra


def rollback2(out: dict[str, Any], folder: Path) -> None:
    """Saves 1..3, restore 1, then: on_rollback="refuse" raises on every rank; "keep" moves
    2 and 3 aside (rank 0) and every rank sees the new branch's 2 as the latest."""
    from asyncckpt import RollbackRefusedError

    root = folder / "rollback2"
    state, model, opt, _ = ddp_state(seed=31, loader=False)
    with CheckpointManager(root) as mgr:
        for step in (1, 2, 3):
            train_step(model, opt, seed=step)
            mgr.save(step, state, blocking=True)
    with CheckpointManager(root, on_rollback="refuse") as mgr:
        mgr.restore(state, 1)
        try:
            mgr.save(2, state, blocking=True)
            out["refused"] = None
        except RollbackRefusedError as e:
            out["refused"] = str(e)
    with CheckpointManager(root) as mgr:
        out["restored"] = mgr.restore(state, 1)
        train_step(model, opt, seed=102)
        mgr.save(2, state, blocking=True)
        mgr.wait()
        out["listed"] = [i.step for i in mgr.list()]
        out["latest"] = mgr.restore(state)
    if dist.get_rank() == 0:
        from asyncckpt.branches import list_abandoned
        from asyncckpt.storage import Storage

        out["abandoned"] = [a.step for a in list_abandoned(Storage(root))]


SCENARIOS = {"save4": save4, "main2": main2, "restore3": restore3, "rollback2": rollback2}


def main() -> None:
    scenario, rank, world, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(name)s %(levelname)s: %(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rdzv-{scenario}",
                            rank=rank, world_size=world)
    out: dict[str, Any] = {"rank": rank}
    try:
        SCENARIOS[scenario](out, folder)
        dist.barrier()
    finally:
        (folder / f"{scenario}-rank{rank}.json").write_text(json.dumps(out, default=str))
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (seconds with torch._dynamo loaded); all is written


if __name__ == "__main__":
    main()
