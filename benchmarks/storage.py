"""Save and restore throughput: local disk versus S3 (moto's server on loopback).

    python benchmarks/storage.py                     # 128 MiB of float32 state, ~30 s on 2 cores
    python benchmarks/storage.py --mib 512 --part-mib 32 --concurrency 8 --repeat 3
    python benchmarks/storage.py --s3-url s3://bucket/prefix -o key=... -o secret=...   # a real endpoint

For each backend it saves the same state ``--repeat`` times through
``CheckpointManager`` and restores each save: ``save`` is from ``save()`` to
the commit (``handle.result()``), ``stall`` the part of it the training
thread waited for, ``restore`` a full ``restore()`` with checksum
verification.  State bytes over seconds gives MiB/s.  Prints one JSON line per
measurement (with device, torch version, state size, part size, concurrency)
and a markdown table of medians.

moto keeps objects in the memory of one Python process, so the S3 numbers
measure the client path (multipart parts, HTTP on loopback, checksums), not
S3 itself; see the README for real S3 at scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import warnings
from typing import Any

import torch
from torch import nn

from asyncckpt import CheckpointManager, TrainState

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
MiB = 1 << 20


def build_state(mib: int) -> TrainState:
    """A model holding ``mib`` MiB of float32 parameters in 4 MiB layers (random, so incompressible)."""
    torch.manual_seed(0)
    layers = [nn.Linear(1024, 1024, bias=False) for _ in range(max(1, mib // 4))]
    return TrainState(model=nn.Sequential(*layers))


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=1):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto's S3 server did not start on 127.0.0.1 (pip install 'moto[server]')")


def moto_root(endpoint: str) -> tuple[str, dict[str, Any]]:
    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/ckpt", {"key": "bench", "secret": "bench",
                                    "client_kwargs": {"endpoint_url": endpoint}}


def run(backend: str, root: str, options: dict[str, Any], state: TrainState, args: argparse.Namespace,
        meta: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    kw = dict(storage_options=options, compression=args.compression, writer_threads=args.writer_threads,
              upload_part_bytes=args.part_mib * MiB, upload_concurrency=args.concurrency)
    with CheckpointManager(root, **kw) as mgr:
        for step in range(-args.warmup, 0):       # not measured: buffers, connections, caches
            mgr.save(step + args.warmup + 1000, state).result()
        for step in range(1, args.repeat + 1):
            started = time.perf_counter()
            handle = mgr.save(step, state)
            info = handle.result()
            out.append({**meta, "backend": backend, "op": "save", "seconds": time.perf_counter() - started,
                        "stall_s": handle.stall_s, "stored_mib": info.bytes / MiB})
        for step in range(1, args.repeat + 1):
            started = time.perf_counter()
            mgr.restore(state, step)
            out.append({**meta, "backend": backend, "op": "restore",
                        "seconds": time.perf_counter() - started})
    for r in out:
        r["mib_per_s"] = meta["state_mib"] / r["seconds"]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}),
              flush=True)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| backend | op | median s | MiB/s | stall s |", "|---|---|---:|---:|---:|"]
    for backend in dict.fromkeys(r["backend"] for r in rows):
        for op in ("save", "restore"):
            sel = [r for r in rows if r["backend"] == backend and r["op"] == op]
            if not sel:
                continue
            sec = statistics.median(r["seconds"] for r in sel)
            stall = statistics.median(r["stall_s"] for r in sel) if op == "save" else None
            lines.append(f"| {backend} | {op} | {sec:.2f} | {sel[0]['state_mib'] / sec:.0f} | "
                         f"{'' if stall is None else f'{stall:.3f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=128, help="state size in MiB (float32 parameters)")
    p.add_argument("--repeat", type=int, default=3, help="measured saves (and restores) per backend")
    p.add_argument("--warmup", type=int, default=1, help="saves before measuring")
    p.add_argument("--compression", default=None, choices=[None, "zstd"], type=lambda s: s or None)
    p.add_argument("--writer-threads", type=int, default=2)
    p.add_argument("--part-mib", type=int, default=16, help="multipart part size (>= 5)")
    p.add_argument("--concurrency", type=int, default=4, help="parts of one file in flight")
    p.add_argument("--local-dir", default=None, help="folder for the local runs (default: a temp dir)")
    p.add_argument("--s3-url", default=None, help="a real S3 root instead of moto on loopback")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="storage option for --s3-url (repeatable)")
    args = p.parse_args(argv)

    state = build_state(args.mib)
    meta = {"bench": "storage", "state_mib": args.mib, "compression": args.compression,
            "writer_threads": args.writer_threads, "part_mib": args.part_mib,
            "concurrency": args.concurrency, "torch": torch.__version__, "device": "cpu",
            "cpus": os.cpu_count(), "python": platform.python_version()}
    rows = []
    local = tempfile.mkdtemp(prefix="asyncckpt-bench-", dir=args.local_dir)
    meta["local_dir"] = local
    try:
        rows += run("local", os.path.join(local, "ckpt"), {}, state, args, meta)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    proc = None
    try:
        if args.s3_url:
            root, options = args.s3_url, dict(kv.split("=", 1) for kv in args.options)
            backend = "s3"
        else:
            proc, endpoint = start_moto()
            root, options = moto_root(endpoint)
            backend = "s3 (moto, loopback)"
        rows += run(backend, root, options, state, args, meta)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    print()
    print(f"{args.mib} MiB of float32 state, compression={args.compression}, "
          f"part {args.part_mib} MiB x {args.concurrency} in flight, {args.writer_threads} files; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; local = {local}")
    print(table(rows))


if __name__ == "__main__":
    main()
