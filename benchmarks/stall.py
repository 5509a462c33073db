"""How long does a checkpoint stop training?  One run, one model, every method.

    python benchmarks/stall.py                                  # small, runs on a CPU
    python benchmarks/stall.py --params 1e9 --saves 4 --out benchmarks   # ~1 B params on a GPU

Stall (one definition for every method): the time the save call holds the
training thread plus the extra time of the following steps over the median
step (a GPU copy that the training stream waits for shows up there).  Per
method it reports the first save alone and the median of the later ones, the
time until the checkpoint is committed, the median step-time slowdown while
the background write runs, bytes written, and peak host memory.

Methods: torch.save, dcp.save, dcp.async_save (default stager), dcp.async_save
with a pinned DefaultStager (torchtitan's "async_with_pinned_mem"), asyncckpt
pinned, asyncckpt device, and the device-to-host copy into preallocated
buffers (the limit).  Prints JSON lines and a markdown table; with --out,
writes RESULTS.md and a PNG bar chart there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from asyncckpt import CheckpointManager, TrainState


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(params: float, device: str) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    width = 4096 if params >= 2e8 else 1024 if params >= 1e7 else 256
    layers = max(1, round(params / (width * width + width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(8, width, device=device)
    return model, opt, x


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
         guard: Callable[[], Any] = contextlib.nullcontext) -> float:
    t0 = time.perf_counter()
    model(x).float().pow(2).mean().backward()
    with guard():
        opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0


def host_memory() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    if torch.cuda.is_available() and hasattr(torch.cuda, "host_memory_stats"):
        out["pinned_peak"] = int(torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0))
    return out


def release_memory() -> None:
    """Give back what the last method left cached: GPU blocks, pinned host blocks, peaks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
        if empty_host_cache is not None:
            empty_host_cache()
        if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
            torch.cuda.reset_peak_host_memory_stats()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Method:
    """A way to save: ``save(i)`` returns a waiter that blocks until committed."""

    name = ""

    def guard(self) -> Any:
        """What the training loop wraps ``optimizer.step()`` in for this method."""
        return contextlib.nullcontext()

    def setup(self, root: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None: ...
    def save(self, i: int) -> Callable[[], None]: ...
    def close(self) -> None: ...


class TorchSave(Method):
    name = "torch.save"

    def setup(self, root, model, opt):
        self.root, self.model, self.opt = root, model, opt

    def save(self, i):
        torch.save({"model": self.model.state_dict(), "optim": self.opt.state_dict()},
                   self.root / f"ckpt-{i}.pt")
        return lambda: None


class DcpSave(TorchSave):
    name = "dcp.save"

    def state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        m, o = get_state_dict(self.model, self.opt)
        return {"model": m, "optim": o}

    def save(self, i):
        dcp.save(self.state(), checkpoint_id=str(self.root / f"step-{i}"))
        return lambda: None


class DcpAsync(DcpSave):
    name = "dcp.async_save"

    def save(self, i):
        fut = dcp.async_save(self.state(), checkpoint_id=str(self.root / f"step-{i}"))
        return (lambda: fut.upload_completion.result()) if hasattr(fut, "upload_completion") else fut.result


class DcpAsyncPinned(DcpSave):
    name = "dcp.async_save pinned"

    def setup(self, root, model, opt):
        super().setup(root, model, opt)
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        self._make = lambda: DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                          use_shared_memory=False,
                                                          use_async_staging=True,
                                                          use_non_blocking_copy=torch.cuda.is_available()))
        self.stagers: list[Any] = []

    def save(self, i):
        stager = self._make()  # a fresh stager per save: reusing one raised KeyError on torch 2.11
        self.stagers.append(stager)
        resp = dcp.async_save(self.state(), checkpoint_id=str(self.root / f"step-{i}"), async_stager=stager)
        if hasattr(resp, "staging_completion"):
            return lambda: (resp.staging_completion.result(), resp.upload_completion.result())
        return resp.result

    def close(self):
        for s in self.stagers:
            s.close()


class Asyncckpt(TorchSave):
    def __init__(self, staging: str, compression: str | None) -> None:
        self.staging, self.compression = staging, compression
        self.name = f"asyncckpt {staging}" + ("" if compression else " (no zstd)")

    def setup(self, root, model, opt):
        self.mgr = CheckpointManager(root, staging=self.staging, compression=self.compression)
        self.state = TrainState(model=model, optimizer=opt, rng=False)
        self.mgr.prewarm(self.state)
        if self.mgr._stager._prewarm is not None:
            self.mgr._stager._prewarm.join()

    def save(self, i):
        h = self.mgr.save(i + 1, self.state)
        return h.result

    def close(self):
        self.mgr.close()


def torch_checkpointing_manager() -> Any:
    """torch_checkpointing's manager as its users would set it up: the async saver, local
    files without O_DIRECT (which failed with EINVAL on the H100 machine)."""
    import torch_checkpointing as tc
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    return tc.CheckpointManager.Config(
        save=tc.AsyncCheckpointSaverConfig(),
        storage_config=LocalFileSystemStorageConfig(use_direct_io=False)).build()


class TorchCheckpointing(TorchSave):
    """meta-pytorch's torch_checkpointing: prewarmed pinned staging, background process."""

    name = "torch_checkpointing"

    def setup(self, root, model, opt):
        super().setup(root, model, opt)
        self.mgr = torch_checkpointing_manager()
        self.mgr.prewarm_staging(self.payload())
        self.mgr.save(str(self.root / "prewarm"), self.payload()).result()  # prewarmed well before

    def payload(self):
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict()}

    def guard(self):
        return self.mgr.lock()

    def save(self, i):
        return self.mgr.save(str(self.root / f"step-{i}"), self.payload()).result

    def close(self):
        self.mgr.close()


class TorchSnapshot(TorchSave):
    name = "torchsnapshot"

    def save(self, i):
        from torchsnapshot import Snapshot

        pending = Snapshot.async_take(str(self.root / f"step-{i}"),
                                      app_state={"model": self.model, "optim": self.opt})
        return pending.wait


class CopyLimit(TorchSave):
    name = "device-to-host limit"

    def setup(self, root, model, opt):
        super().setup(root, model, opt)
        from torch.distributed.checkpoint.state_dict import get_state_dict
        m, o = get_state_dict(model, opt)
        self.src = [t for t in _tensors({"m": m, "o": o})]
        pin = torch.cuda.is_available()
        self.dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in self.src]

    def save(self, i):
        for s, d in zip(self.src, self.dst):
            d.copy_(s, non_blocking=True)
        sync()
        return lambda: None


def _tensors(v):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _tensors(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _tensors(x)


def measure(method: Method, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, opt, x = build(args.params, device)
    for _ in range(2):
        step(model, opt, x)
    root = workdir / method.name.replace(" ", "_").replace("(", "").replace(")", "")
    root.mkdir(parents=True, exist_ok=True)
    method.setup(root, model, opt)
    try:
        return _timed_saves(method, args, root, model, opt, x)
    finally:
        method.close()
        shutil.rmtree(root, ignore_errors=True)


def _timed_saves(method: Method, args: argparse.Namespace, root: Path, model: nn.Module,
                 opt: torch.optim.Optimizer, x: torch.Tensor) -> dict[str, Any]:
    guard = method.guard
    base = statistics.median(step(model, opt, x, guard) for _ in range(args.warmup))
    stalls, commits, during = [], [], []
    nbytes = 0
    for i in range(args.saves):
        before = set(root.iterdir())
        t0 = time.perf_counter()
        waiter = method.save(i)
        call = time.perf_counter() - t0
        done: dict[str, float] = {}
        th = threading.Thread(target=lambda: (waiter(), done.setdefault("t", time.perf_counter())))
        th.start()
        follow = [step(model, opt, x, guard) for _ in range(args.follow)]
        extra = sum(max(0.0, s - base) for s in follow[:3])
        while th.is_alive():
            during.append(step(model, opt, x, guard))
            th.join(timeout=0)
        th.join()
        during += follow[3:]
        stalls.append(call + extra)
        commits.append(done["t"] - t0)
        made = set(root.iterdir()) - before          # this save's files: measured, then removed
        nbytes += sum(dir_bytes(p) if p.is_dir() else p.stat().st_size for p in made)
        for p in made:                               # (a 1 B-param state is 12 GB a save)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for _ in range(args.between):
            step(model, opt, x, guard)
    mem = host_memory()
    later = stalls[1:] or stalls
    return {
        "method": method.name, "first_stall_s": round(stalls[0], 5),
        "stall_s": round(statistics.median(later), 5), "committed_s": round(statistics.median(commits), 4),
        "step_s": round(base, 5),
        "slowdown": round(statistics.median(during) / base - 1, 4) if during else None,
        "bytes_written": nbytes // args.saves, "rss_peak": mem.get("VmHWM"), "pinned_peak": mem.get("pinned_peak"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = "| method | first stall (s) | stall, median (s) | committed (s) | step slowdown | bytes/save |\n|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        slow = "" if r["slowdown"] is None else f"{r['slowdown'] * 100:+.1f}%"
        lines.append(f"| {r['method']} | {r['first_stall_s']:.4f} | {r['stall_s']:.4f} | "
                     f"{r['committed_s']:.3f} | {slow} | {r['bytes_written'] / 1e6:.1f} MB |")
    return "\n".join(lines)


def run_all(methods: list[Any], measure_one: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """Measure each method in turn, printing a JSON line each; one failing (an error line)
    does not lose the others, and each one's model and buffers are gone before the next."""
    rows = []
    for m in methods:
        release_memory()
        try:
            rows.append(measure_one(m))
            print(json.dumps(rows[-1]), flush=True)
        except Exception as e:  # noqa: BLE001 - reported, and the run goes on
            print(json.dumps({"method": m.name, "error": f"{type(e).__name__}: {e}"}), flush=True)
        finally:
            name = m.name
            m.__dict__.clear()  # its model, optimizer and buffers: one method at a time on the GPU
            m.name = name
    return rows


def add_common_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """The options every benchmark here shares: model size, method subset, folders."""
    p.add_argument("--params", type=float, default=2e7, help="model parameters (fp32 + AdamW = 12 B each)")
    p.add_argument("--methods", default="all", help="comma-separated subset of method names")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--out", default=None, help=out_help)


def start(args: argparse.Namespace, prefix: str) -> tuple[Path, dict[str, Any]]:
    """(work folder, environment record): a one-rank gloo group, as DCP wants one."""
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix=prefix))
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=0, world_size=1)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    params = sum(q.numel() for q in build(args.params, "meta")[0].parameters())
    env = {"device": device, "torch": torch.__version__, "params": params,
           "date": dt.date.today().isoformat(), "cpus": os.cpu_count()}
    print(json.dumps({"env": env}), flush=True)
    return tmp, env


def peer_unusable(module: str, dist_name: str) -> str | None:
    """Why a peer package cannot run with this torch (None when it can): not installed,
    a torch requirement this torch does not meet, or an import that fails."""
    from importlib import metadata

    try:
        needs = [r for r in metadata.requires(dist_name) or [] if r.split(";")[0].strip().startswith("torch")
                 and "extra ==" not in r]
    except metadata.PackageNotFoundError:
        return f"{dist_name} not installed"
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
        here = Version(torch.__version__.split("+")[0])
        for spec in needs:
            req = Requirement(spec)
            if req.name == "torch" and not req.specifier.contains(here, prereleases=True):
                return f"{dist_name} needs {req}, this is torch {torch.__version__}"
    except ImportError:
        pass  # no packaging module: the import below is the only check
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001 - any failure to import leaves the peer out, with its reason
        return f"{dist_name} does not import: {type(e).__name__}: {e}"
    return None


def add_peers(methods: list[Any], peers: list[tuple[Any, str, str]], before_last: bool = True) -> None:
    """Add each peer (method, module, distribution) that can run here; print why any cannot."""
    for method, module, dist_name in peers:
        why = peer_unusable(module, dist_name)
        if why is None:
            methods.insert(len(methods) - 1 if before_last else len(methods), method)
        else:
            print(f"{method.name}: left out of this run: {why}", file=sys.stderr, flush=True)


def chosen(methods: list[Any], spec: str) -> list[Any]:
    """The methods named in ``--methods`` (all for "all")."""
    return methods if spec == "all" else [m for m in methods if m.name in set(spec.split(","))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "folder for RESULTS.md and stall.png")
    p.add_argument("--saves", type=int, default=4, help="saves per method (first + median of the rest)")
    p.add_argument("--warmup", type=int, default=10, help="steps to take the median step time from")
    p.add_argument("--follow", type=int, default=5, help="steps timed right after each save")
    p.add_argument("--between", type=int, default=3, help="untimed steps between saves")
    args = p.parse_args()

    tmp, env = start(args, "asyncckpt-stall-")
    methods: list[Method] = [TorchSave(), DcpSave(), DcpAsync(), DcpAsyncPinned(),
                             Asyncckpt("pinned", None), Asyncckpt("pinned", "zstd"), CopyLimit()]
    if torch.cuda.is_available():
        methods.insert(6, Asyncckpt("device", None))
    add_peers(methods, [(TorchCheckpointing(), "torch_checkpointing", "torch-checkpointing"),
                        (TorchSnapshot(), "torchsnapshot", "torchsnapshot")])
    methods = chosen(methods, args.methods)
    rows = run_all(methods, lambda m: measure(m, args, tmp))
    md = table(rows)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        state_gb = env["params"] * 12 / 1e9
        (out / "RESULTS.md").write_text(
            f"# Stall benchmark\n\n{env['device']}, torch {env['torch']}, {env['params'] / 1e6:.1f} M fp32 "
            f"parameters + AdamW ({state_gb:.2f} GB of state), {env['date']}.\n"
            f"Command: `python {' '.join(sys.argv)}`\n\n{md}\n")
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(figsize=(8, 4))
            ax.barh([r["method"] for r in rows], [r["stall_s"] for r in rows])
            ax.set_xscale("log")
            ax.set_xlabel("training stall per checkpoint (s, log scale)")
            ax.set_title(f"{env['device']}, {env['params'] / 1e6:.0f} M params, torch {env['torch']}")
            fig.tight_layout()
            fig.savefig(out / "stall.png", dpi=120)
        except ImportError:
            print("matplotlib not installed: no chart", file=sys.stderr)
    dist.destroy_process_group()
    if args.workdir is None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
