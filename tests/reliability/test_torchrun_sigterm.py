"""SIGTERM under torchrun with two ranks: both agree on one final step, it commits, both exit 0.

The job is ``python -m torch.distributed.run --standalone --nproc_per_node=2`` running
torchrun_worker.py (gloo, CPU).  The test waits until both ranks say they are training, then
sends SIGTERM the way a scheduler does: to torchrun, which forwards it to each worker (each in
its own session); or, in the second test, to one rank only, after which torchrun exits 0 only
if both workers did.  A hard deadline kills the agent and every worker and fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("torchrun_worker.py")
DEADLINE_S = 120.0
pytestmark = pytest.mark.dist


class Job:
    """torchrun and its two workers; stdout lines are collected by a reader thread."""

    def __init__(self, tmp_path: Path, root: Path) -> None:
        self.err = tmp_path / "torchrun.stderr"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 str(WORKER), str(root)], stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                start_new_session=True)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.timer = threading.Timer(DEADLINE_S, self.kill)
        self.timer.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.strip())
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, *prefixes: str) -> list[str]:
        """Block until a line starting with each prefix was printed (or the job ended)."""
        def found() -> list[str] | None:
            hits = [next((ln for ln in self.lines if ln.startswith(p)), None) for p in prefixes]
            return hits if all(hits) else None
        with self.changed:
            self.changed.wait_for(lambda: found() is not None or self.proc.poll() is not None, DEADLINE_S)
            hits = found()
        if hits is None:
            self.kill()
            pytest.fail(f"torchrun never printed {prefixes}: {self.lines}\n{self.err.read_text()[-4000:]}")
        return hits

    def worker_pid(self, rank: int) -> int:
        return int(self.wait_for(f"RANK {rank} PID")[0].split()[-1])

    def kill(self) -> None:
        pids = [int(ln.split()[-1]) for ln in self.lines if " PID " in ln]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> int:
        try:
            return self.proc.wait(DEADLINE_S)
        finally:
            self.timer.cancel()
            self.kill()
            self.reader.join(10)


def _check_final_save(job: Job, root: Path) -> int:
    stopped = job.wait_for("RANK 0 STOPPED", "RANK 1 STOPPED")
    steps = {int(line.split()[-1]) for line in stopped}
    assert len(steps) == 1, f"the ranks stopped at different steps: {stopped}"
    step = steps.pop()
    assert job.wait_for("RANK 0 EXIT 0", "RANK 1 EXIT 0")
    manifest = json.loads((root / f"step-{step:010d}" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and any(t.startswith("signal") for t in manifest["tags"]), manifest
    ranks = {f["rank"] for f in manifest["files"] if f["rank"] is not None}
    assert ranks == {0, 1}, manifest["files"]
    committed = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert committed == [f"step-{step:010d}"], committed  # one checkpoint: the final one
    assert not (root / ".lease.json").exists(), "rank 0 did not release the lease"
    return step


def test_sigterm_to_torchrun_commits_one_final_step_and_both_ranks_exit_0(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    job = Job(tmp_path, root)
    try:
        job.wait_for("RANK 0 TRAINING", "RANK 1 TRAINING")
        job.proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
        _check_final_save(job, root)
    finally:
        code = job.close()
    # torchrun itself reports the signal it got: its SignalException, exit 1 (a worker failure
    # would be ChildFailedError).  The workers printed EXIT 0 as their last act; the next test
    # proves their exit status through torchrun's.
    err = job.err.read_text()
    assert code == 1 and "SignalException" in err and "ChildFailedError" not in err, err[-3000:]


def test_sigterm_to_one_rank_under_torchrun_stops_both_and_torchrun_exits_0(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    job = Job(tmp_path, root)
    try:
        job.wait_for("RANK 0 TRAINING", "RANK 1 TRAINING")
        os.kill(job.worker_pid(1), signal.SIGTERM)  # only rank 1 is told
        _check_final_save(job, root)
    finally:
        code = job.close()
    assert code == 0, f"torchrun reports a worker failure:\n{job.err.read_text()[-3000:]}"
