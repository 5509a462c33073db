"""How long does a restore take?  One checkpoint size, every loader, one run.

    python benchmarks/restore.py                                  # small, runs on a CPU
    python benchmarks/restore.py --params 1e9 --repeat 2 --out benchmarks   # ~1 B params on a GPU

Each method first saves the same model + AdamW state in its own format
(untimed), then loads it ``--repeat`` times into the live model and optimizer
on their device: the time is from the call to the state being in place (CUDA
synchronised).  Before each load the page cache is dropped where the machine
allows it (``echo 3 > /proc/sys/vm/drop_caches`` as root); otherwise every
method reads with the cache warm, and the output says which.

Methods: asyncckpt ``restore()`` (zstd and plain DCP files), ``dcp.load`` +
``set_state_dict``, ``torch.load`` + ``load_state_dict``, and, when installed,
meta-pytorch's torch_checkpointing ``CheckpointManager.load``.  Prints JSON
lines and a markdown table; with --out, writes RESTORE.md there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from stall import (add_common_args, add_peers, build, chosen, dir_bytes, run_all, start, step,  # beside this file
                   sync, torch_checkpointing_manager)

from asyncckpt import CheckpointManager, TrainState


def drop_page_cache() -> bool:
    """Write dirty pages out and drop the page cache; False where not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


class Loader:
    """A way to restore: ``save()`` once, then ``load()`` into the live model/optimizer."""

    name = ""

    def setup(self, root: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.root, self.model, self.opt = root, model, opt

    def save(self) -> None: ...
    def load(self) -> None: ...
    def close(self) -> None: ...


class TorchLoad(Loader):
    name = "torch.load"

    def save(self):
        torch.save({"model": self.model.state_dict(), "optim": self.opt.state_dict()}, self.root / "c.pt")

    def load(self):
        device = next(self.model.parameters()).device
        sd = torch.load(self.root / "c.pt", map_location=device, weights_only=True)
        self.model.load_state_dict(sd["model"])
        self.opt.load_state_dict(sd["optim"])


class DcpLoad(Loader):
    name = "dcp.load"

    def save(self):
        m, o = get_state_dict(self.model, self.opt)
        dcp.save({"model": m, "optim": o}, checkpoint_id=str(self.root / "dcp"))

    def load(self):
        m, o = get_state_dict(self.model, self.opt)
        sd = {"model": m, "optim": o}
        dcp.load(sd, checkpoint_id=str(self.root / "dcp"))
        set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


class Asyncckpt(Loader):
    def __init__(self, compression: str | None) -> None:
        self.compression = compression
        self.name = "asyncckpt" + (" (zstd)" if compression else " (plain DCP)")

    def setup(self, root, model, opt):
        super().setup(root, model, opt)
        self.mgr = CheckpointManager(root, compression=self.compression)
        self.state = TrainState(model=model, optimizer=opt, rng=False)

    def save(self):
        self.mgr.save(1, self.state, blocking=True)

    def load(self):
        self.mgr.restore(self.state, 1)

    def close(self):
        self.mgr.close()


class TorchCheckpointing(Loader):
    name = "torch_checkpointing"

    def setup(self, root, model, opt):
        super().setup(root, model, opt)
        self.mgr = torch_checkpointing_manager()

    def payload(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict()}

    def save(self):
        self.mgr.save(str(self.root / "tc"), self.payload()).result()

    def load(self):
        out = self.mgr.load(str(self.root / "tc"), into=self.payload())
        self.model.load_state_dict(out["model"])
        self.opt.load_state_dict(out["optim"])

    def close(self):
        self.mgr.close()


def fingerprint(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    """A number that changes when any parameter or AdamW moment does."""
    total = sum(p.detach().double().sum().item() for p in model.parameters())
    return total + sum(v.double().sum().item() for st in opt.state.values()
                       for v in st.values() if torch.is_tensor(v) and v.dim())


def scramble(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for st in opt.state.values():
            for v in st.values():
                if torch.is_tensor(v) and v.dim():
                    v.add_(1.0)


def measure(loader: Loader, args: argparse.Namespace, workdir: Path, device: str) -> dict[str, Any]:
    root = workdir / loader.name.replace(" ", "_").replace("(", "").replace(")", "")
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, opt, x = build(args.params, device)
    step(model, opt, x)
    loader.setup(root, model, opt)
    try:
        return _timed_loads(loader, args, root, model, opt)
    finally:
        loader.close()
        shutil.rmtree(root, ignore_errors=True)


def _timed_loads(loader: Loader, args: argparse.Namespace, root: Path, model: nn.Module,
                 opt: torch.optim.Optimizer) -> dict[str, Any]:
    loader.save()
    want = fingerprint(model, opt)
    times, dropped = [], []
    for _ in range(args.repeat):
        scramble(model, opt)
        sync()
        dropped.append(drop_page_cache())
        t0 = time.perf_counter()
        loader.load()
        sync()
        times.append(time.perf_counter() - t0)
        if fingerprint(model, opt) != want:
            raise RuntimeError(f"{loader.name}: the restored state differs from the saved one")
    nbytes = dir_bytes(root)
    state_bytes = sum(p.numel() * p.element_size() * 3 for p in model.parameters())
    return {"method": loader.name, "first_s": times[0], "median_s": statistics.median(times),
            "gb_per_s": state_bytes / statistics.median(times) / 1e9, "bytes_on_disk": nbytes,
            "page_cache": "dropped" if all(dropped) else "warm"}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | first (s) | median (s) | state GB/s | on disk | page cache |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['first_s']:.3f} | {r['median_s']:.3f} | "
                     f"{r['gb_per_s']:.2f} | {r['bytes_on_disk'] / 1e6:.1f} MB | {r['page_cache']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "folder for RESTORE.md")
    p.add_argument("--repeat", type=int, default=3, help="loads per method (first + median)")
    args = p.parse_args()

    tmp, env = start(args, "asyncckpt-restore-")
    loaders: list[Loader] = [Asyncckpt("zstd"), Asyncckpt(None), DcpLoad(), TorchLoad()]
    add_peers(loaders, [(TorchCheckpointing(), "torch_checkpointing", "torch-checkpointing")], before_last=False)
    loaders = chosen(loaders, args.methods)
    device, params = "cuda" if torch.cuda.is_available() else "cpu", env["params"]
    rows = run_all(loaders, lambda loader: measure(loader, args, tmp, device))
    md = table(rows)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "RESTORE.md").write_text(
            f"# Restore benchmark\n\n{env['device']}, torch {env['torch']}, {params / 1e6:.1f} M fp32 "
            f"parameters + AdamW ({params * 12 / 1e9:.2f} GB of state), {env['date']}.\n"
            f"Command: `python {' '.join(sys.argv)}`\n\n{md}\n")
    dist.destroy_process_group()
    if args.workdir is None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
