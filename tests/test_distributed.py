"""Distributed saves and restores: real ranks (subprocesses, gloo, CPU, file rendezvous).

Three launches are shared by the ``dist`` tests below (see dist_worker.py):
4 ranks save a DDP checkpoint; 2 ranks save DDP checkpoints (plan cache, a
fault on rank 1, retention, "latest"), save FSDP2, restore DDP into FSDP2 and
restore the 4-rank checkpoint; 3 ranks restore the 2-rank checkpoint.  One
more test restores on a single process here.  Every launch has a hard
deadline: the ranks are killed and the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorProperties,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from asyncckpt import CheckpointManager, TrainState
from asyncckpt.planner import PlanCache, balance_plans, item_bytes
from asyncckpt.state import capture_rng, restore_rng

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
LAUNCH_DEADLINE_S = 90.0


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {p.name} ---\n" + p.read_text(errors="replace")[-3000:] for p in logs)


def run_ranks(argvs: list[list[str]], folder: Path, name: str, *,
              deadline_s: float = LAUNCH_DEADLINE_S) -> None:
    """Start one process per argv, wait up to ``deadline_s`` in all, kill them all on timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = [folder / f"{name}-rank{r}.log" for r in range(len(argvs))]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for argv, log_path in zip(argvs, logs):
            with open(log_path, "wb") as log_file:
                procs.append(subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                              env=env, cwd=HERE.parent))
        end = time.monotonic() + deadline_s
        for p in procs:
            try:
                p.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(procs)
                pytest.fail(f"{name}: ranks still running after {deadline_s}s; killed\n{_tails(logs)}")
    finally:
        _kill(procs)
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"{name}: exit codes {[p.returncode for p in procs]}\n{_tails(logs)}")


def launch(scenario: str, world: int, folder: Path) -> list[dict[str, Any]]:
    """Run one dist_worker scenario on ``world`` ranks; each rank's report, in rank order."""
    run_ranks([[sys.executable, str(WORKER), scenario, str(r), str(world), str(folder)]
               for r in range(world)], folder, scenario)
    return [json.loads((folder / f"{scenario}-rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("dist")
    out: dict[str, Any] = {"folder": folder}
    for scenario, world in (("save4", 4), ("main2", 2), ("restore3", 3)):
        out[scenario] = launch(scenario, world, folder)
    return out


# -- saving ------------------------------------------------------------------------------

@pytest.mark.dist
@pytest.mark.parametrize("scenario,key", [("save4", "bytes"), ("main2", "save2")])
def test_ddp_ranks_stage_and_write_about_one_nth(runs: dict[str, Any], scenario: str, key: str) -> None:
    reports = runs[scenario]
    world = len(reports)
    staged = {r["rank"]: r[key]["staged"] for r in reports}
    total = sum(staged.values())
    print(f"\nDDP world={world}: bytes staged per rank {staged} (total {total}); "
          f"tensor bytes planned per rank {reports[0].get('planned')}; "
          f"written per rank {reports[0][key]['written_per_rank']}")
    for r in reports:
        assert {int(k): v for k, v in r[key]["staged_per_rank"].items()} == staged  # every rank knows all
        assert r[key]["written"] > 0
    assert max(staged.values()) < 1.3 * total / world
    assert min(staged.values()) > 0.7 * total / world
    if scenario == "save4":
        # the state is replicated: together the ranks stage it once, not world times
        assert sum(reports[0]["planned"]) == reports[0]["state_bytes"] + 8 * 4  # + Adam's 8 step scalars


@pytest.mark.dist
def test_plan_is_computed_once_while_the_state_keeps_its_shape(runs: dict[str, Any]) -> None:
    assert [r["replans"] for r in runs["main2"]] == [1, 1]


@pytest.mark.dist
def test_manifest_records_world_size_and_each_ranks_files(runs: dict[str, Any]) -> None:
    for r in runs["main2"]:
        assert r["save4_files_ranks"] == [0, 1]
        assert r["manifest4_world_size"] == 2
        assert set(r["save2"]["written_per_rank"]) == {"0", "1"}


@pytest.mark.dist
def test_failure_on_one_rank_leaves_the_checkpoint_invisible_on_every_rank(runs: dict[str, Any]) -> None:
    for r in runs["main2"]:
        assert r["save3_error"] == {"failed_ranks": [1]}
        assert r["manifest3_exists"] is False
        assert r["listed_after_fault"] == [1, 2]


@pytest.mark.dist
def test_staging_failure_on_one_rank_fails_the_save_on_every_rank(runs: dict[str, Any]) -> None:
    r0, r1 = runs["main2"]
    assert r1["stage_fault"] == "MemoryError"  # rank 1's own error, raised by its save()
    assert r0["stage_fault"] == "SaveError"  # rank 0 hears of it; nobody hangs
    assert r0["stage_fault_listed"] == r1["stage_fault_listed"] == []


@pytest.mark.dist
def test_one_rank_over_its_staging_budget_saves_directly_and_the_checkpoint_commits(
        runs: dict[str, Any]) -> None:
    r0, r1 = runs["main2"]
    assert r1["direct_committed_on_return"] is True   # its save() waited for the commit
    assert r0["direct_listed"] == r1["direct_listed"] == [1]


@pytest.mark.dist
def test_retention_runs_on_rank_0_only(runs: dict[str, Any]) -> None:
    r0, r1 = runs["main2"]
    assert r0["listed"] == r1["listed"] == [2, 4]
    assert r0["retention_deletes_logged"] == 1
    assert r1["retention_deletes_logged"] == 0


@pytest.mark.dist
def test_all_ranks_restore_the_latest_rank_0_chose(runs: dict[str, Any]) -> None:
    # rank 1's filesystem lists the root as empty (a stale view); it still restores what rank 0 picked
    rank0, rank1 = runs["main2"]
    assert rank0["own_listing"] == rank0["listed"] == [2, 4] and rank1["own_listing"] == []
    for r in runs["main2"]:
        assert r["latest"] == 4
        assert r["latest_diff"] == 0.0


@pytest.mark.dist
def test_same_world_size_restores_each_ranks_rng_and_loader_exactly(runs: dict[str, Any]) -> None:
    for r in runs["main2"]:
        assert r["restored_2"] == 2
        assert r["diff_2"] == 0.0
        assert r["rng_exact"] is True
        assert r["loader_exact"] is True


# -- FSDP2 and resharding ----------------------------------------------------------------------

@pytest.mark.dist
def test_fsdp2_ranks_save_their_own_shards(runs: dict[str, Any]) -> None:
    staged = [r["fsdp_save"]["staged"] for r in runs["main2"]]
    assert max(staged) < 1.3 * sum(staged) / 2


@pytest.mark.dist
def test_ddp_checkpoint_restores_into_fsdp2(runs: dict[str, Any]) -> None:
    for r in runs["main2"]:
        assert r["ddp_to_fsdp_step"] == 4
        assert r["ddp_to_fsdp_diff"] == 0.0


@pytest.mark.dist
def test_4_ranks_to_2_reseeds_rng_deterministically(runs: dict[str, Any]) -> None:
    r0, r1 = runs["main2"]
    for r in (r0, r1):
        assert r["from4_step"] == 10
        assert r["from4_diff"] == 0.0
        assert r["from4_rng"] == r["from4_rng_again"]
    assert r0["from4_rng"] != r1["from4_rng"]


@pytest.mark.dist
def test_2_ranks_to_3(runs: dict[str, Any]) -> None:
    reports = runs["restore3"]
    for r in reports:
        assert r["step"] == 4
        assert r["diff"] == 0.0
        assert r["rng"] == r["rng_again"]
        assert r["extra"] == {"who": "ddp"}
        # loader state belongs to the old split of the data: not restored, and said so
        assert r["loader_first_batch"] == [1000 * r["rank"] + i for i in range(4)]
        assert r["loader_warned"] is True
    assert len({tuple(r["rng"]) for r in reports}) == 3


@pytest.mark.dist
def test_2_ranks_and_fsdp2_to_one_plain_process(runs: dict[str, Any]) -> None:
    import dist_worker

    folder = runs["folder"]
    saved_rng = capture_rng()
    try:
        model = dist_worker.make_model(seed=99)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        with CheckpointManager(folder / "ddp2") as mgr:
            assert mgr.restore(TrainState(model=model, optimizer=opt)) == 4
            rng = torch.rand(4).tolist()
        assert dist_worker.max_diff(_full(model, opt), torch.load(folder / "ddp2_step4_expected.pt")) == 0.0
        # re-seeded from the same checkpoint for the same rank: the same as rank 0 on 3 ranks
        assert rng == runs["restore3"][0]["rng"]

        model = dist_worker.make_model(seed=98)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        with CheckpointManager(folder / "fsdp2") as mgr:
            assert mgr.restore(TrainState(model=model, optimizer=opt)) == 5
        assert dist_worker.max_diff(_full(model, opt), torch.load(folder / "fsdp2_expected.pt")) == 0.0
    finally:
        restore_rng(saved_rng)


def _full(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = {f"param/{k}": v for k, v in get_model_state_dict(model).items()}
    for k, st in get_optimizer_state_dict(model, opt)["state"].items():
        out.update({f"{n}/{k}": st[n] for n in ("exp_avg", "exp_avg_sq")})
    return out


# -- examples under torchrun -------------------------------------------------------------------

@pytest.mark.dist
@pytest.mark.parametrize("example", ["train_ddp.py", "train_fsdp.py"])
def test_example_runs_under_torchrun_and_resumes(tmp_path: Path, example: str) -> None:
    root = tmp_path / "ckpt"
    for steps, expect in ((6, "fresh run"), (12, "resumed from step 6")):
        log_path = tmp_path / f"{example}-{steps}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(HERE.parent / "examples" / example), "--root", str(root), "--steps", str(steps),
               "--every", "3", "--tiny"]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            try:
                rc = proc.wait(timeout=LAUNCH_DEADLINE_S)
            except subprocess.TimeoutExpired:
                _kill([proc])
                pytest.fail(f"{example} still running after {LAUNCH_DEADLINE_S}s\n{_tails([log_path])}")
        text = log_path.read_text(errors="replace")
        assert rc == 0, text[-3000:]
        assert expect in text, text[-3000:]
        assert f"done at step {steps}" in text, text[-3000:]
    manifests = sorted(root.glob("step-*/manifest.json"))
    assert manifests and json.loads(manifests[-1].read_text())["world_size"] == 2


# -- planning, on one process (no launch) ----------------------------------------------------

def _item(fqn: str, numel: int) -> WriteItem:
    props = TensorProperties(dtype=torch.float32)
    chunk = ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([numel]))
    return WriteItem(index=MetadataIndex(fqn, [0]), type=WriteItemType.TENSOR,
                     tensor_data=TensorWriteData(chunk=chunk, properties=props, size=torch.Size([numel])))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_replicated_items_are_kept_once_and_spread_largest_first(world: int) -> None:
    sizes = [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 10]
    items = [_item(f"w{i}", n) for i, n in enumerate(sizes)]
    blob = WriteItem(index=MetadataIndex("rank_1/rng"), type=WriteItemType.BYTE_IO)
    plans = [SavePlan(items + ([blob] if r == 1 else [])) for r in range(world)]
    out = balance_plans(plans)
    kept = [it.index.fqn for p in out for it in p.items]
    assert sorted(kept) == sorted([it.index.fqn for it in items] + ["rank_1/rng"])
    assert "rank_1/rng" in [it.index.fqn for it in out[1].items]
    loads = [sum(item_bytes(it) for it in p.items) for p in out]
    assert max(loads) - min(loads) <= 4 * max(sizes)
    assert max(loads) <= 4 * sum(sizes) / world + 4 * max(sizes)
    assert balance_plans(plans) == out  # deterministic: every rank computes the same


def test_plan_cache_replans_only_when_the_structure_changes() -> None:
    cache = PlanCache(lambda obj: [obj])
    state = {"model/model": {"w": torch.zeros(3), "b": torch.zeros(2)}}
    plan, mine = cache.plan(lambda: state, step=1)
    assert set(mine) == {"model/model.w", "model/model.b"} and cache.replans == 1
    state["model/model"]["w"] += 1
    cache.plan(lambda: state, step=2)
    assert cache.replans == 1
    state["model/model"]["w"] = torch.zeros(4)
    _, mine = cache.plan(lambda: state, step=3)
    assert cache.replans == 2 and mine["model/model.w"].shape == (4,)
    assert set(cache.cached_selection(state)) == {"model/model.w", "model/model.b"}


def test_errors_cross_ranks_intact() -> None:
    """Ranks pickle errors to each other (DCP's failure gather, the restore broadcast)."""
    import pickle

    from asyncckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, SaveError, StorageError

    for err in (StorageError("write", "file:///r/x", OSError(5, "EIO")),
                CheckpointNotFoundError("at step 3", "/r", [1, 2]),
                CorruptCheckpointError("/r/x", "crc32:1", "crc32:2", "checksum mismatch"),
                SaveError(3, {1: StorageError("write", "u", "boom")})):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
        assert {k: str(v) for k, v in vars(back).items()} == {k: str(v) for k, v in vars(err).items()}


@pytest.mark.dist
def test_rank_0_decides_a_rollback_and_every_rank_follows(tmp_path: Path) -> None:
    r0, r1 = launch("rollback2", 2, tmp_path)
    assert r0["refused"] and r0["refused"] == r1["refused"] and "[2, 3]" in r0["refused"]
    for r in (r0, r1):
        assert (r["restored"], r["listed"], r["latest"]) == (1, [1, 2], 2)
    assert r0["abandoned"] == [2, 3]
