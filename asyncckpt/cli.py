"""The ``asyncckpt`` command line: the only place that prints.

``list``, ``verify`` and ``prune`` read manifests and checksums only (no torch
import, so they start fast); ``export`` and ``inspect`` load the manager
lazily.  Every command that prints a table takes ``--json``.  Exit status: 0
on success, 1 when a check fails (verify), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .errors import AsyncCkptError
from .manifest import CheckpointInfo, step_dir_name
from .retention import Retention
from .storage import Storage, list_committed, read_manifest, verify_files


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    """``-o key=value`` pairs; values parse as JSON when they can (numbers, bools, dicts)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AsyncCkptError(f"storage option {pair!r} is not valid: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    if "endpoint_url" in out:
        out.setdefault("client_kwargs", {})["endpoint_url"] = out.pop("endpoint_url")
    return out


def _storage(args: argparse.Namespace) -> Storage:
    return Storage(args.root, _options(args.storage_option))


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    storage = _storage(args)
    infos = [CheckpointInfo.from_manifest(m, storage.url_of(step_dir_name(m.step)))
             for m in list_committed(storage)]
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=1))
        return 0
    if not infos:
        print(f"no committed checkpoints under {storage.url}")
        return 0
    rows = [[str(i.step), "" if i.epoch is None else str(i.epoch), i.time, _human(i.bytes),
             ",".join(i.tags), " ".join(f"{k}={v:.6g}" for k, v in sorted(i.metrics.items()))]
            for i in infos]
    print(_table(rows, ["step", "epoch", "time", "size", "tags", "metrics"]))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    storage = _storage(args)
    if args.step is not None:
        manifests = [read_manifest(storage, args.step)]
    else:
        manifests = list_committed(storage)
    report = {m.step: verify_files(storage.child(step_dir_name(m.step)), m) for m in manifests}
    bad = {s: p for s, p in report.items() if p}
    if args.json:
        print(json.dumps({"ok": not bad, "checked": sorted(report), "problems": bad}, indent=1))
    else:
        for step, problems in sorted(report.items()):
            print(f"step {step}: {'ok' if not problems else 'DAMAGED'}")
            for p in problems:
                print(f"  {p}")
        if not report:
            print(f"no committed checkpoints under {storage.url}")
    return 1 if bad else 0


def cmd_prune(args: argparse.Namespace) -> int:
    storage = _storage(args)
    policy = Retention(keep_last=args.keep_last, keep_best=args.keep_best,
                       best_metric=args.metric, best_mode=args.mode)
    plan = policy.plan(list_committed(storage))
    for step, metric in plan.missing_metric:
        print(f"warning: step {step} has no metric {metric!r}", file=sys.stderr)
    if not args.dry_run:
        for step in plan.delete:
            name = step_dir_name(step)
            storage.remove(f"{name}/manifest.json")
            storage.remove(name, recursive=True)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "deleted": list(plan.delete), "kept": list(plan.keep)}))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {len(plan.delete)} checkpoint(s): {list(plan.delete)}; kept {list(plan.keep)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncckpt", description="Inspect and manage asyncckpt checkpoints.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    def root_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("root", help="checkpoint root: a path or URL (s3://bucket/prefix)")
        sp.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000")
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return sp

    root_cmd("list", "list committed checkpoints").set_defaults(func=cmd_list)
    sp = root_cmd("verify", "check every file of committed checkpoints against its checksum")
    sp.add_argument("step", nargs="?", type=int, help="one step (default: all)")
    sp.set_defaults(func=cmd_verify)
    sp = root_cmd("prune", "delete checkpoints a retention policy drops")
    sp.add_argument("--keep-last", type=int, default=None, help="keep the newest N")
    sp.add_argument("--keep-best", type=int, default=0, help="keep the best K by --metric")
    sp.add_argument("--metric", default=None, help="metric for --keep-best")
    sp.add_argument("--mode", default="min", choices=["min", "max"], help="min or max is best")
    sp.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    sp.set_defaults(func=cmd_prune)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except AsyncCkptError as e:
        print(f"asyncckpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"asyncckpt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
