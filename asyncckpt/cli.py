"""The ``asyncckpt`` command line: the only place that prints.

``list``, ``verify``, ``prune`` and ``releases`` read manifests, model cards and
checksums only (no torch import, so they start fast); ``export`` loads torch
lazily, through ``release.py``'s reading path.  ``prune`` deletes exactly as
the manager does (``storage.delete_checkpoint``: manifest first).  ``schedule`` plans checkpoint steps from a YAML config (no torch
either).  Every command that prints a table takes ``--json``.  Exit status: 0
on success, 1 when a check fails (verify), 2 on bad input (a local root that does not
exist included), 141 when stdout's reader went away.  A root without manifests that
holds plain DCP checkpoints (itself, or ``step-N`` folders) is read for sizes only.
``release`` writes a versioned release as ``CheckpointManager.release`` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

from .branches import list_abandoned, retire_abandoned
from .errors import (AsyncCkptError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError,
                     LeaseError, StorageError)
from .lease import live_holder
from .manifest import MANIFEST_NAME, CheckpointInfo, select, step_dir_name
from .quarantine import checked_plan, list_quarantined, quarantine, retire_expired
from .retention import Retention, best_step_for, best_tags, ranking_for
from .storage import (MARKER_NAME, Storage, delete_checkpoint, is_committed, list_committed, manifest_steps,
                      read_manifest, verify_checkpoint)

log = logging.getLogger(__name__)
"""What ``-v`` shows on stderr: the root opened and each checkpoint verified, deleted or read."""


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
    """The root of ``args``; on a local disk it must be an existing folder (a typo is an
    error, never an empty root).  An object store cannot tell an empty prefix from a
    missing one, so there an empty root lists as such."""
    storage = Storage(args.root, _options(args.storage_option))
    log.info("root %s", storage.url)
    if storage.is_local and not storage.exists(""):
        raise AsyncCkptError(f"{storage.url} does not exist")
    if storage.is_local and storage.isfile():
        raise AsyncCkptError(f"{storage.url} is a file, not a checkpoint root (a folder of "
                             "step-N checkpoint folders)")
    return storage


def _retention(args: argparse.Namespace) -> Retention:
    """The policy of prune's flags; a bad value is named by its flag, not by Retention's field."""
    checks = [(args.keep_last < 1, f"--keep-last {args.keep_last}", "an integer >= 1"),
              (args.keep_best < 0, f"--keep-best {args.keep_best}", "an integer >= 0"),
              (args.keep_best > 0 and not args.metric, f"--keep-best {args.keep_best}",
               "--metric NAME too (the metric to rank checkpoints by)"),
              (args.metric == "", "--metric ''", "a metric name"),
              (args.keep_every is not None and args.keep_every < 1, f"--keep-every {args.keep_every}",
               "an integer >= 1")]
    for bad, given, expected in checks:
        if bad:
            raise ConfigError(f"{given} is not valid: expected {expected}")
    return Retention(keep_last=args.keep_last, keep_best=args.keep_best, best_metric=args.metric,
                     best_mode=args.mode, keep_every_n_steps=args.keep_every,
                     keep_epoch_ends=args.keep_epoch_ends)


def step_spec(text: str) -> int | str:
    """A step argument: a number, ``latest``, ``best`` or ``best:<metric>`` (argparse type)."""
    if text.isdigit():
        return int(text)
    if text in ("latest", "best") or (text.startswith("best:") and len(text) > 5):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a step: expected a number, latest, best "
                                     "or best:<metric>")


STEP_HELP = "a number, latest, best (by the metric and mode the checkpoints' retention recorded, " \
    "else the one metric they record, lowest) or best:<metric> (in its recorded mode, else lowest)"


def _best(manifests: Sequence[Any], which: str, url: str) -> Any:
    """The committed manifest ``best``/``best:<metric>`` names, ranked as ``restore`` ranks them
    (``retention.best_step_for``: what the manifests recorded); plain ``best`` with nothing
    recorded takes the one metric they hold, and is an error naming them when there are more."""
    metric = which.partition(":")[2] or None
    if metric is None and ranking_for(None, None, manifests) is None:
        names = sorted({k for m in manifests for k in m.metrics})
        if len(names) != 1:
            raise ConfigError(f"best needs a metric: the checkpoints under {url} record "
                              + (", ".join(names) if names else "no metrics")
                              + "; say best:<metric> (the lowest value is best)")
        metric = names[0]
    found = best_step_for(manifests, metric, None)
    if found is None or found[1] is None:
        raise CheckpointNotFoundError(f"with metric {metric!r}", url, [m.step for m in manifests])
    return next(m for m in manifests if m.step == found[1])


def _select(manifests: Sequence[Any], which: int | str | None, url: str, verb: str) -> Any:
    """The committed manifest ``which`` names (None: the latest) for ``verb`` ("inspect"...)."""
    if isinstance(which, str) and which.startswith("best"):
        if not manifests:
            raise CheckpointNotFoundError(f"to {verb}", url, ())
        return _best(manifests, which, url)
    if which in (None, "latest"):
        if not manifests:
            raise CheckpointNotFoundError(f"to {verb}", url, ())
        return max(manifests, key=lambda m: m.step)
    return select(manifests, which, url)


METADATA_NAME = ".metadata"
"""DCP's metadata file (``dcp_io.METADATA_NAME``; named here so listing needs no torch)."""


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _progress(total: int, desc: str, unit: str = "B") -> Any:
    """A tqdm bar on stderr, shown only on a terminal; ``unit`` "B" counts bytes."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False,
                disable=not sys.stderr.isatty())


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


PLAIN_NOTE = "plain DCP checkpoint, no manifest: sizes only, no checksums"
_PLAIN_STEP = re.compile(r"step-([0-9]+)")
"""torchtitan's ``step-100`` as well as asyncckpt's ``step-0000000100``."""


def plain_dcp(storage: Storage) -> list[tuple[int | None, str]]:
    """(step, folder) of the plain DCP checkpoints (DCP's ``.metadata``, no manifest) at a root:
    the root itself (step None), or its ``step-N`` folders.  A folder with asyncckpt's marker
    is an unfinished save of asyncckpt's, not one of these."""
    here = storage.list_files()
    if MANIFEST_NAME in here or MARKER_NAME in here:
        return []
    if METADATA_NAME in here:
        return [(None, "")]
    found = []
    for name in storage.list_dirs():
        if (match := _PLAIN_STEP.fullmatch(name)) is not None:
            files = storage.list_files(name)
            if METADATA_NAME in files and MANIFEST_NAME not in files and MARKER_NAME not in files:
                found.append((int(match.group(1)), name))
    return sorted(found)


def _plain_pick(storage: Storage, plain: Sequence[tuple[int | None, str]], which: int | str | None,
                verb: str) -> tuple[int | None, Storage]:
    """The plain DCP checkpoint ``which`` names (None or latest: the newest)."""
    steps = [s for s, _ in plain if s is not None]
    if which in (None, "latest"):
        step, rel = plain[-1]
        return step, storage.child(rel) if rel else storage
    if isinstance(which, str):
        raise ConfigError(f"{which} needs metrics, and {storage.url} holds plain DCP checkpoints "
                          "without manifests (none records a metric): name a step")
    for step, rel in plain:
        if step == which:
            return step, storage.child(rel)
    have = f"steps: {', '.join(map(str, steps))}" if steps else "one, at the root itself: no step"
    raise AsyncCkptError(f"no checkpoint at step {which} to {verb} under {storage.url} "
                         f"(plain DCP {have})")


def _plain_problems(folder: Storage) -> list[str]:
    """What is wrong with a plain DCP checkpoint that its sizes show: ``.metadata`` unreadable,
    a file it names missing or shorter than its items reach (no checksums to compare)."""
    from .safe_metadata import load_metadata  # loads torch

    files = folder.list_files()
    try:
        md = load_metadata(folder.read_bytes(METADATA_NAME), folder.url_of(METADATA_NAME))
    except AsyncCkptError as e:
        return [str(e)]
    ends: dict[str, int] = {}
    for info in md.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, end in sorted(ends.items()):
        if name not in files:
            problems.append(f"{folder.url_of(name)}: missing")
        elif files[name] < end:
            problems.append(f"{folder.url_of(name)}: expected at least {end} bytes, found {files[name]}")
    return problems


def _list_plain(storage: Storage, plain: Sequence[tuple[int | None, str]], as_json: bool) -> int:
    rows = []
    for step, rel in plain:
        files = storage.list_files(rel)
        rows.append({"step": step, "path": storage.url_of(rel), "bytes": sum(files.values()),
                     "files": len(files), "plain_dcp": True, "checksums": False})
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    note = PLAIN_NOTE if len(rows) == 1 else \
        PLAIN_NOTE.replace("checkpoint, no manifest", "checkpoints, no manifests")
    print(f"{storage.url}: {note}")
    print(_table([["-" if r["step"] is None else str(r["step"]), _human(r["bytes"]), str(r["files"]),
                   r["path"]] for r in rows], ["step", "size", "files", "path"]))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .release import with_release_tags  # torch-free

    storage = _storage(args)
    manifests = with_release_tags(storage, list_committed(storage))
    if not manifests and (plain := plain_dcp(storage)):
        return _list_plain(storage, plain, args.json)
    policy = Retention(best_metric=args.metric, best_mode=args.mode) if args.metric and args.mode else None
    tags = best_tags(manifests, policy, [args.metric] if args.metric else None)  # else: as recorded
    infos = [CheckpointInfo.from_manifest(m, storage.url_of(step_dir_name(m.step)), tags.get(m.step, ()))
             for m in manifests]
    aside = list_quarantined(storage) if args.all else []
    abandoned = list_abandoned(storage) if args.all else []
    if args.json:
        rows_json: list[dict[str, Any]] = [{**i.to_dict(), "branch": m.branch, "parent": m.parent}
                                           for i, m in zip(infos, manifests)]
        if args.all:
            rows_json += [{**q.to_dict(), "quarantined": True} for q in aside]
            rows_json += [{**a.to_dict(), "abandoned": True} for a in abandoned]
        print(json.dumps(rows_json, indent=1))
        return 0
    if not infos and not aside and not abandoned:
        print(f"no committed checkpoints under {storage.url}")
        return 0
    rows = [[str(i.step), "" if i.epoch is None else str(i.epoch), i.time, _human(i.bytes),
             m.branch or "", ",".join(i.tags),
             " ".join(f"{k}={v:.6g}" for k, v in sorted(i.metrics.items()))]
            for i, m in zip(infos, manifests)]
    rows += [[str(q.step), "", q.time, "", "", "quarantined", q.reason[:100]] for q in aside]
    rows += [[str(a.step), "", a.time, "", a.branch or "", "abandoned",
              f"rolled back to step {a.from_step} (branch {a.new_branch})"] for a in abandoned]
    print(_table(rows, ["step", "epoch", "time", "size", "branch", "tags", "metrics"]))
    return 0


def _verify_steps(storage: Storage, which: int | str | None) -> list[int]:
    """The steps ``verify`` checks: every one with a manifest (None), or the one named, which
    must have a manifest (readable or not: a damaged one is a failed check)."""
    if which is None:
        return manifest_steps(storage)
    if isinstance(which, int) and which in manifest_steps(storage):
        return [which]
    if isinstance(which, int) and which in {c.step for c in (*list_quarantined(storage),
                                                             *list_abandoned(storage))}:
        return []  # set aside: reported as such, not as missing
    return [_select(list_committed(storage), which, storage.url, "verify").step]


def _verify_plain(storage: Storage, plain: Sequence[tuple[int | None, str]],
                  which: int | str | None, as_json: bool) -> int:
    """verify on plain DCP checkpoints: their sizes against their ``.metadata``; exit 1 if bad."""
    picked = [(s, storage.child(rel) if rel else storage) for s, rel in plain] if which is None \
        else [_plain_pick(storage, plain, which, "verify")]
    report = {folder.url: (step, _plain_problems(folder)) for step, folder in picked}
    bad = {url: p for url, (_, p) in report.items() if p}
    if as_json:
        print(json.dumps({"ok": not bad, "plain_dcp": True, "checksums": False,
                          "checked": [s if s is not None else url for url, (s, _) in report.items()],
                          "problems": bad}, indent=1))
        return 1 if bad else 0
    for url, (step, problems) in report.items():
        print(f"{url if step is None else f'step {step}'}: {'ok' if not problems else 'DAMAGED'} "
              f"({PLAIN_NOTE})")
        for p in problems:
            print(f"  {p}")
    return 1 if bad else 0


def cmd_verify(args: argparse.Namespace) -> int:
    storage = _storage(args)
    if not manifest_steps(storage) and (plain := plain_dcp(storage)):
        return _verify_plain(storage, plain, args.step, args.json)
    report: dict[int, list[str]] = {}
    manifests = {}
    steps = _verify_steps(storage, args.step)
    one = None if args.step is None else steps[0] if steps else args.step
    for step in steps:
        try:
            manifests[step] = read_manifest(storage, step)
        except CorruptCheckpointError as e:  # a damaged manifest is a failed check, not bad input
            report[step] = [str(e)]
        except StorageError:
            if one is not None or is_committed(storage, step):
                raise  # deleted since listing (a job's retention): not checked, not damaged
    with _progress(sum(m.total_bytes for m in manifests.values()), "verify") as bar:
        for step, manifest in manifests.items():
            problems = verify_checkpoint(storage, step, manifest, bar.update)
            if problems is None and one is not None:
                raise CheckpointNotFoundError(f"at step {step} (deleted while it was verified)",
                                              storage.url, [m.step for m in list_committed(storage)])
            if problems is not None:
                report[step] = problems
                log.info("step=%d: %d files, %d bytes checked: %s", step, len(manifest.files),
                         manifest.total_bytes, "ok" if not problems else "DAMAGED")
    bad = {s: p for s, p in report.items() if p}
    aside = [q for q in list_quarantined(storage) if one is None or q.step == one]
    abandoned = [a for a in list_abandoned(storage) if one is None or a.step == one]
    if args.json:
        print(json.dumps({"ok": not bad, "checked": sorted(report), "problems": bad,
                          "quarantined": [q.to_dict() for q in aside],
                          "abandoned": [a.to_dict() for a in abandoned]}, indent=1))
    else:
        for step, problems in sorted(report.items()):
            print(f"step {step}: {'ok' if not problems else 'DAMAGED'}")
            for p in problems:
                print(f"  {p}")
        for q in aside:  # set aside already: not a failed check
            print(f"step {q.step}: quarantined at {q.url} ({q.time}): {q.reason}")
        for a in abandoned:
            print(f"step {a.step}: abandoned (branch {a.branch}, rolled back to step {a.from_step}) "
                  f"at {a.url} ({a.time})")
        if not report and not aside and not abandoned:
            print(f"no committed checkpoints under {storage.url}")
    return 1 if bad else 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .release import with_release_tags  # torch-free

    storage = _storage(args)
    policy = _retention(args)
    if not args.dry_run and not args.ignore_lease and (holder := live_holder(storage)) is not None:
        raise LeaseError(f"{storage.url} is being written by a running job ({holder.describe()}); "
                         "its manager prunes by its own retention. Pass --ignore-lease to prune anyway")
    plan, damaged = checked_plan(storage, policy, with_release_tags(storage, list_committed(storage)),
                                 deep=not args.no_verify)
    for step, problems in damaged.items():
        verb = "would be quarantined" if args.dry_run else "quarantined"
        print(f"step {step}: DAMAGED, {verb} and not kept: {'; '.join(problems)}", file=sys.stderr)
    if plan.missing_metric:
        steps = sorted({s for s, _ in plan.missing_metric})
        print(f"warning: {len(steps)} checkpoint(s) have no value of --metric {args.metric!r} "
              f"(steps {steps}); kept only by the other rules", file=sys.stderr)
    if not args.dry_run:
        for step, problems in damaged.items():
            quarantine(storage, step, "; ".join(problems))
        for step in plan.delete:
            delete_checkpoint(storage, step)  # manifest first, as the manager does
            log.info("step=%d: deleted %s", step, storage.url_of(step_dir_name(step)))
        retire_expired(storage, policy, plan.keep)
        retire_abandoned(storage, policy, plan.keep)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "deleted": list(plan.delete), "kept": list(plan.keep),
                          "quarantined": sorted(damaged),
                          "reasons": {str(k): list(v) for k, v in plan.reasons.items()}}))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {len(plan.delete)} checkpoint(s): {list(plan.delete)}; kept {list(plan.keep)}")
    return 0


FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}
"""The weights formats ``export`` tells from OUT's extension; a name without one is a folder (dcp)."""


def export_format(out: str, given: str | None) -> str:
    """The format ``export`` writes ``out`` in: ``given`` (``--format``), else the one its
    name says (``FORMATS``; a name ending in ``/`` or without an extension: dcp).  A name that
    says another format than ``given`` is an error naming both."""
    name = out.rstrip("/").rpartition("/")[2]
    ext = "." + name.rpartition(".")[2].lower() if "." in name.lstrip(".") else ""
    said = "dcp" if out.endswith("/") else FORMATS.get(ext)
    if given is not None and said is not None and said != given:
        raise ConfigError(f"--format {given} does not match OUT {out}: "
                          f"{'a folder' if said == 'dcp' else ext} means {said}")
    if given is not None:
        return given
    if said is None and ext:
        raise ConfigError(f"cannot tell the format of {out} from its extension {ext!r}: pass "
                          "--format safetensors, torch or dcp, or name it .safetensors or .pt")
    return said or "dcp"


def _export_target(args: argparse.Namespace, fmt: str) -> tuple[Storage, str]:
    """(the folder to write in, the file name; "" for a dcp folder), OUT made ready."""
    from .errors import CheckpointExistsError

    if fmt == "dcp":
        out = Storage(args.out.rstrip("/") or "/")
        here, dirs = out.list_files(), out.list_dirs()
        dcp_only = bool(here) and not dirs and all(n == ".metadata" or n.endswith(".distcp")
                                                   for n in here)
        if out.isfile() or ((here or dirs) and not (args.force and dcp_only)):
            what = "a file" if out.isfile() else "a folder that is not empty"
            hint = "; pass --force to replace it" if dcp_only else \
                ": asyncckpt replaces only a folder of DCP files (.metadata, *.distcp), with --force"
            raise CheckpointExistsError(f"{out.url} is {what}{hint}")
        if here:
            out.remove("", recursive=True)
        out.makedirs()
        return out, ""
    parent, _, name = args.out.rstrip("/").rpartition("/")
    out = Storage(parent or ".")
    if out.exists(name) and not args.force:
        raise CheckpointExistsError(f"{out.url_of(name)} already exists; pass --force to replace it")
    out.makedirs()
    return out, name


def _export_source(storage: Storage, args: argparse.Namespace) -> tuple[int | None, int, Any]:
    """(step, bytes to read, a function returning the tensors) of the checkpoint to export: a
    committed one (its model weights), else a plain DCP one (every tensor, by its DCP key)."""
    from .release import checkpoint_weights, plain_dcp_weights  # loads torch

    committed = list_committed(storage)
    if not committed and (plain := plain_dcp(storage)):
        step, folder = _plain_pick(storage, plain, args.step, "export")
        return step, sum(folder.list_files().values()), lambda: plain_dcp_weights(folder)
    m = _select(committed, args.step, storage.url, "export")
    return m.step, m.total_bytes, lambda: checkpoint_weights(storage.child(step_dir_name(m.step)),
                                                             m, model=args.model)


def cmd_export(args: argparse.Namespace) -> int:
    from .release import dtype_name, prepare, write_dcp, write_weights  # loads torch

    fmt = export_format(args.out, args.format)
    storage = _storage(args)
    dtype = dtype_name(args.dtype)
    step, nbytes, read = _export_source(storage, args)
    out, name = _export_target(args, fmt)
    with _progress(2 * nbytes, "export") as bar:  # coarse: read, then write
        tensors = prepare(read(), dtype)
        log.info("step=%s: read %d tensors (%d bytes stored) from %s", step, len(tensors), nbytes, storage.url)
        bar.update(nbytes)
        if fmt == "dcp":
            size = sum(f.size for f in write_dcp(out, tensors))
        else:
            size = write_weights(out, name, tensors, format=fmt,
                                 metadata={"format": "pt", **({} if step is None else {"step": str(step)})}).size
        bar.update(nbytes)
    what = "the plain DCP checkpoint" if step is None else f"step {step}"
    if args.json:
        print(json.dumps({"step": step, "tensors": len(tensors), "bytes": size,
                          "format": fmt, "dtype": dtype, "path": out.url_of(name)}))
        return 0
    print(f"exported {what}: {len(tensors)} tensors, {_human(size)} "
          f"({fmt}{'' if dtype is None else ', ' + dtype}) to {out.url_of(name)}")
    return 0


def _json_file(path: str | None, flag: str) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {path}: cannot be read as JSON: {e}") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} {path}: expected a JSON object, found {type(value).__name__}")
    return value


def cmd_release(args: argparse.Namespace) -> int:
    """As ``CheckpointManager.release(step, ...)``, without opening a manager on the root."""
    import datetime

    import torch

    from .release import Provenance, ReleaseOptions, checkpoint_weights, write_release

    opts = ReleaseOptions(version=args.version, format=args.format, dtype=args.dtype,
                          model=args.model, model_card=_json_file(args.card, "--card"),
                          config=_json_file(args.config, "--config"))
    storage = _storage(args)
    m = _select(list_committed(storage), args.step, storage.url, "release")
    tensors = checkpoint_weights(storage.child(step_dir_name(m.step)), m, model=opts.model)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    info = write_release(storage, opts, tensors, source=Provenance.of(m),
                         torch_version=torch.__version__, now=now.replace("+00:00", "Z"))
    if args.json:
        print(json.dumps(info.to_dict(), indent=1))
        return 0
    print(f"released step {m.step} as {info.version}: {_human(info.bytes)} ({info.format}"
          f"{'' if info.dtype is None else '/' + info.dtype}) at {info.path}")
    return 0


def _checkpoint(storage: Storage, step: int | str | None, manifests: Sequence[Any] | None = None,
                verb: str = "inspect") -> Any:
    """(manifest, folder, files by name) of a committed step (None: the latest)."""
    m = _select(list_committed(storage) if manifests is None else manifests, step, storage.url, verb)
    return m, storage.child(step_dir_name(m.step)), {f.path: f for f in m.files}


def _shape(shape: Sequence[int] | None) -> str:
    return "" if shape is None else "x".join(map(str, shape)) or "scalar"


def _tensor_stats(folder: Storage, files: Any, items: Sequence[Any]) -> dict[str, dict[str, Any]]:
    from .dcp_io import read_items  # loads torch

    tensors = [i for i in items if i.kind == "tensor"]
    out = {}
    with _progress(sum(i.raw_bytes for i in tensors), "inspect") as bar:
        for key, t in read_items(folder, files, [i.key for i in tensors]):
            x = (t.abs() if t.is_complex() else t).double()
            finite = x[x.isfinite()]
            out[key] = {"min": finite.min().item() if finite.numel() else None,
                        "max": finite.max().item() if finite.numel() else None,
                        "mean": finite.mean().item() if finite.numel() else None,
                        "nonfinite": int(x.numel() - finite.numel())}
            bar.update(t.numel() * t.element_size())
    return out


def _manifest_lines(m: Any, url: str) -> list[str]:
    return [f"step {m.step}  {url}",
            f"  time {m.time or '-'}  epoch {'-' if m.epoch is None else m.epoch}  world size "
            f"{m.world_size}  codec {m.codec or 'none'}  params {m.param_count:,}",
            f"  torch {m.torch_version or '-'}  git {m.git_commit or '-'}  host {m.host or '-'}  "
            f"device {m.device or '-'}",
            "  metrics: " + (" ".join(f"{k}={v:.6g}" for k, v in sorted(m.metrics.items())) or "-"),
            "  tags: " + (", ".join(m.tags) or "-"),
            f"  files: {len(m.files)}, {_human(m.total_bytes)}"]


def cmd_inspect(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .dcp_io import describe  # loads torch

    storage = _storage(args)
    committed = list_committed(storage)
    plain = plain_dcp(storage) if not committed else []
    if plain:
        step, folder = _plain_pick(storage, plain, args.step, "inspect")
        m, files, head = None, {}, [f"{'' if step is None else f'step {step}  '}{folder.url}",
                                    f"  {PLAIN_NOTE}"]
    else:
        m, folder, files = _checkpoint(storage, args.step, committed)
        head = _manifest_lines(m, folder.url)
    items = describe(folder, files, verify=not plain)
    stats = _tensor_stats(folder, files, items) if args.stats else {}
    if args.json:
        print(json.dumps({"path": folder.url, "manifest": None if m is None else m.to_dict(),
                          **({"plain_dcp": True} if plain else {}),
                          "items": [{**asdict(i), **({"stats": stats[i.key]} if i.key in stats else {})}
                                    for i in items]}, indent=1))
        return 0
    print("\n".join(head))
    _print_items(items, stats, args.stats)
    return 0


def _print_items(items: Sequence[Any], stats: dict[str, dict[str, Any]], with_stats: bool) -> None:
    rows = []
    for i in items:
        ratio = f"{i.stored_bytes / i.raw_bytes:.2f}" if i.raw_bytes and i.stored_bytes else ""
        row = [i.key, i.kind, i.dtype or "", _shape(i.shape),
               "" if i.raw_bytes is None else _human(i.raw_bytes), _human(i.stored_bytes), ratio]
        if with_stats:
            st = stats.get(i.key) or {}
            row += ["" if st.get(k) is None else f"{st[k]:.4g}" for k in ("min", "max", "mean")]
            row.append(str(st.get("nonfinite", "")))
        rows.append(row)
    print(_table(rows, ["key", "kind", "dtype", "shape", "bytes", "stored", "stored/raw"]
                 + (["min", "max", "mean", "nan/inf"] if with_stats else [])))
    tensors = [i for i in items if i.kind == "tensor"]
    raw, stored = sum(i.raw_bytes for i in tensors), sum(i.stored_bytes for i in tensors)
    print(f"{len(tensors)} tensors: {_human(raw)}, {_human(stored)} stored"
          + (f" (stored/raw {stored / raw:.2f})" if stored and raw else "") + f"; {len(items) - len(tensors)} "
          f"objects: {_human(sum(i.stored_bytes for i in items if i.kind == 'object'))} stored")


def _compare_objects(key: str, a: bytes, b: bytes) -> str | None:
    """None when equal; else what changed (values shown when short; read weights-only)."""
    from .planner import safe_load

    if a == b:
        return None
    try:
        va, vb = safe_load(a, key), safe_load(b, key)
    except AsyncCkptError:
        return "changed"
    if isinstance(va, (int, float, str, bool, type(None))) and isinstance(vb, type(va)):
        return None if va == vb else f"{va!r} -> {vb!r}"[:80]
    return "changed"


def _diff_items(sides: Sequence[Any], keys: Sequence[str], kinds: dict[str, str]) -> dict[str, Any]:
    """{key: None (equal) | max abs difference | description} for items present in both."""
    from .dcp_io import read_items  # loads torch

    (_, fa, files_a), (_, fb, files_b) = sides
    out: dict[str, Any] = {}
    with _progress(len(keys), "diff", unit="item") as bar:
        for (key, a), (_, b) in zip(read_items(fa, files_a, keys), read_items(fb, files_b, keys)):
            if kinds[key] == "object":
                out[key] = _compare_objects(key, a, b)
            elif a.dtype != b.dtype or a.shape != b.shape:
                out[key] = f"{a.dtype} {_shape(a.shape)} -> {b.dtype} {_shape(b.shape)}"
            elif a.equal(b):
                out[key] = None
            else:
                out[key] = (a.double() - b.double()).abs().max().item() if a.is_floating_point() \
                    else "values differ"
            bar.update(1)
    return out


def cmd_diff(args: argparse.Namespace) -> int:
    from .dcp_io import describe  # loads torch

    storage = _storage(args)
    committed = list_committed(storage)
    sides = [_checkpoint(storage, s, committed, "diff") for s in (args.step_a, args.step_b)]
    (ma, fa, files_a), (mb, fb, files_b) = sides
    ia = {i.key: i for i in describe(fa, files_a)}
    ib = {i.key: i for i in describe(fb, files_b)}
    common = sorted(set(ia) & set(ib), key=lambda k: (ia[k].files, k))  # read file by file
    changes = _diff_items(sides, common, {k: ia[k].kind for k in common})
    names = sorted(set(ma.metrics) | set(mb.metrics))
    metrics = {n: [ma.metrics.get(n), mb.metrics.get(n)] for n in names}
    if args.json:
        print(json.dumps({"a": ma.step, "b": mb.step, "metrics": metrics,
                          "changed": {k: v for k, v in sorted(changes.items()) if v is not None},
                          "unchanged": sorted(k for k, v in changes.items() if v is None),
                          "only_a": sorted(set(ia) - set(ib)), "only_b": sorted(set(ib) - set(ia))},
                         indent=1))
        return 0
    print(f"step {ma.step} -> step {mb.step}  {storage.url}")
    if names:
        def cell(v: Any) -> str:
            return "-" if v is None else f"{v:.6g}"
        print(_table([[n, cell(a), cell(b), cell(None if a is None or b is None else b - a)]
                      for n, (a, b) in metrics.items()], ["metric", f"step {ma.step}", f"step {mb.step}", "change"]))
    changed = {k: v for k, v in changes.items() if v is not None or args.all}
    kinds = [ia[k].kind for k, v in changes.items() if v is not None]
    print(f"changed: {kinds.count('tensor')} of {sum(ia[k].kind == 'tensor' for k in common)} tensors, "
          f"{kinds.count('object')} of {sum(ia[k].kind == 'object' for k in common)} objects")
    for label, keys in ((f"only in step {ma.step}", set(ia) - set(ib)), (f"only in step {mb.step}", set(ib) - set(ia))):
        if keys:
            print(f"{label}: {', '.join(sorted(keys))}")
    if changed:
        rows = [[k, ia[k].kind, _shape(ia[k].shape), "unchanged" if v is None else
                 f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in sorted(changed.items())]
        print(_table(rows, ["key", "kind", "shape", "max |a-b| / change"]))
    return 0


def cmd_releases(args: argparse.Namespace) -> int:
    from .release import list_releases  # torch-free

    storage = _storage(args)
    releases = list_releases(storage)
    if args.json:
        print(json.dumps([r.to_dict() for r in releases], indent=1))
        return 0
    if not releases:
        print(f"no releases under {storage.url}")
        return 0
    rows = [[r.version, "" if r.step is None else str(r.step), r.time, _human(r.bytes),
             r.format + ("" if r.dtype is None else f"/{r.dtype}"), r.path] for r in releases]
    print(_table(rows, ["version", "step", "time", "size", "format", "path"]))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .config import decode_yaml, load_yaml_text, plan_request, with_checkpoint_schedule
    from .schedule import parse_targets

    try:
        with open(args.config, "rb") as f:
            text = decode_yaml(f.read(), args.config)
    except FileNotFoundError as e:
        raise ConfigError(f"config file {args.config!r} not found") from e
    except OSError as e:
        raise ConfigError(f"config file {args.config!r} cannot be read: {e.strerror or e}") from e
    request = plan_request(load_yaml_text(text, args.config), args.config)
    if args.min_interval is not None:
        request = replace(request, min_interval=args.min_interval)
    if args.no_log_steps:
        request = replace(request, log_steps_first_epoch=False)
    targets = parse_targets(args.targets) if args.targets is not None else None
    if targets and isinstance(request.target, int):  # a mapping is overridden by --targets
        print(f"note: training.target_checkpoints={request.target} in {args.config} "
              "takes precedence over --targets", file=sys.stderr)
    plan = request.plan(targets)
    print(_describe_plan(args.config, request, targets, plan))
    if args.dry_run:
        return 0
    out_path = args.output or args.config
    new_text, kept_layout = with_checkpoint_schedule(text, plan, args.config)
    _write_text(out_path, new_text)
    print(f"wrote training.checkpoint_schedule ({len(plan)} steps) to {out_path}")
    if not kept_layout:
        print(f"note: {out_path} was rewritten from its parsed content (comments and layout lost): "
              "training: is not a block mapping at column 0", file=sys.stderr)
    return 0


def _describe_plan(source: str, request: Any, targets: Any, plan: list[int]) -> str:
    epochs = request.total_steps / request.steps_per_epoch
    goal, why = request.target_for(targets)
    lines = [f"{source}: {request.total_steps} steps, {epochs:g} epoch(s) of {request.steps_per_epoch}"
             + ("" if request.dataset_tokens is None else f", {request.dataset_tokens:,} dataset tokens"),
             f"target: {'-' if goal is None else goal} ({why}); min interval {request.min_interval} steps; "
             f"first-epoch powers of two: {'yes' if request.log_steps_first_epoch else 'no'}"]
    short = "" if goal is None or len(plan) >= goal else \
        f" ({goal - len(plan)} short of the target: no gap has room at the min interval)"
    lines.append(f"plan: {len(plan)} checkpoints{short}")
    width = len(str(plan[-1])) if plan else 1
    for i in range(0, len(plan), 10):
        lines.append("  " + " ".join(str(s).rjust(width) for s in plan[i:i + 10]))
    return "\n".join(lines)


def _write_text(path: str, text: str) -> None:
    """Replace ``path`` atomically (a temporary file in its folder, then rename)."""
    import os
    import shutil
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".asyncckpt-", suffix=".yaml", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if os.path.exists(path):
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="asyncckpt", description="Inspect and manage asyncckpt checkpoints.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    p.add_argument("--version", action="version", version=f"asyncckpt {__version__}")
    verbose = argparse.ArgumentParser(add_help=False)  # -v after the command works too
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **kw: add_parser(*a, parents=[verbose], **kw)  # type: ignore[method-assign]

    def root_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("root", help="checkpoint root: a local path, or a URL on local disk, memory or an object store")
        sp.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000")
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return sp

    sp = root_cmd("list", "list committed checkpoints with their tags")
    sp.add_argument("--metric", default=None, help="tag the best checkpoint by this metric "
                    "best:<metric> (default: the metric the checkpoints' retention recorded)")
    sp.add_argument("--mode", default=None, choices=["min", "max"],
                    help="min or max is best (default: as recorded for the metric, else min)")
    sp.add_argument("--all", action="store_true",
                    help="also list quarantined (damaged, set aside) checkpoints and those of "
                    "abandoned branches (rolled back, kept under abandoned/)")
    sp.set_defaults(func=cmd_list)
    sp = root_cmd("verify", "check every file of committed checkpoints against its checksum")
    sp.add_argument("step", nargs="?", type=step_spec, help="one step (default: all): " + STEP_HELP)
    sp.set_defaults(func=cmd_verify)
    sp = root_cmd("prune", "delete checkpoints a retention policy drops")
    sp.add_argument("--keep-last", type=int, required=True, help="keep the newest N (>= 1)")
    sp.add_argument("--keep-best", type=int, default=0, help="keep the best K by --metric")
    sp.add_argument("--metric", default=None, help="metric for --keep-best")
    sp.add_argument("--mode", default="min", choices=["min", "max"], help="min or max is best")
    sp.add_argument("--keep-every", type=int, default=None, metavar="N",
                    help="keep every checkpoint whose step is a multiple of N")
    sp.add_argument("--keep-epoch-ends", action="store_true", help="keep checkpoints tagged epoch_end")
    sp.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    sp.add_argument("--no-verify", action="store_true",
                    help="check the kept checkpoints' file sizes only, not their checksums")
    sp.add_argument("--ignore-lease", action="store_true",
                    help="prune even while a running job holds the root's lease (.lease.json)")
    sp.set_defaults(func=cmd_prune)
    sp = sub.add_parser("export", help="write one checkpoint's model weights (no optimizer) "
                        "to a single file, or to a plain uncompressed DCP folder")
    sp.add_argument("root", help="checkpoint root: a local path, or a URL on local disk, memory or an object store")
    sp.add_argument("out", metavar="OUT", help="the weights file or DCP folder to write (path or "
                    "URL); its extension gives the format: .safetensors, .pt/.pth (torch), a name "
                    "without one or ending in / (dcp)")
    sp.add_argument("--step", type=step_spec, default=None,
                    help="the step to export (default: latest): " + STEP_HELP)
    sp.add_argument("--format", default=None, choices=["safetensors", "torch", "dcp"],
                    help="safetensors, torch (a torch.save dict of tensors) or dcp (a folder "
                    "torch.distributed.checkpoint.load reads, uncompressed); default: OUT's extension")
    sp.add_argument("--dtype", default=None, help="cast floating tensors, e.g. bf16, fp16, fp32")
    sp.add_argument("--model", default=None, help="which model of the TrainState (default: all)")
    sp.add_argument("--force", action="store_true", help="replace OUT if it exists")
    sp.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE",
                    help="fsspec storage option for ROOT")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a sentence")
    sp.set_defaults(func=cmd_export)
    sp = root_cmd("inspect", "show one checkpoint's manifest and its tensors (shape, dtype, bytes, "
                  "stored/raw size ratio); nothing is unpickled")
    sp.add_argument("step", nargs="?", type=step_spec, help="the step (default: latest): " + STEP_HELP)
    sp.add_argument("--stats", action="store_true", help="also read every tensor: min, max, mean, "
                    "NaN/Inf count")
    sp.set_defaults(func=cmd_inspect)
    sp = root_cmd("diff", "compare two checkpoints: tensors that changed (max abs difference), "
                  "objects, metrics side by side")
    sp.add_argument("step_a", type=step_spec, metavar="STEP_A", help=STEP_HELP)
    sp.add_argument("step_b", type=step_spec, metavar="STEP_B", help=STEP_HELP)
    sp.add_argument("--all", action="store_true", help="list unchanged items too")
    sp.set_defaults(func=cmd_diff)
    root_cmd("releases", "list the versioned releases under ROOT/releases").set_defaults(
        func=cmd_releases)
    sp = root_cmd("release", "write one checkpoint's model weights as a versioned release "
                  "(ROOT/releases/v<VERSION>/, with model_card.json), as CheckpointManager.release")
    sp.add_argument("--version", required=True, help="semantic version, e.g. 1.0.0")
    sp.add_argument("--step", type=step_spec, default=None,
                    help="the step to release (default: latest): " + STEP_HELP)
    sp.add_argument("--format", default="safetensors", choices=["safetensors", "torch"],
                    help="model.safetensors (default) or model.pt")
    sp.add_argument("--dtype", default=None, help="cast floating tensors, e.g. bf16, fp16, fp32")
    sp.add_argument("--model", default=None, help="which model of the TrainState (default: all)")
    sp.add_argument("--card", default=None, metavar="CARD.json",
                    help="a JSON object for the model card's \"card\" (description, license...)")
    sp.add_argument("--config", default=None, metavar="CONFIG.json",
                    help="a JSON object written as the release's config.json")
    sp.set_defaults(func=cmd_release)
    sp = sub.add_parser("schedule", help="plan checkpoint steps from a YAML config's training: "
                        "section and write them as training.checkpoint_schedule")
    sp.add_argument("config", help="YAML file with a training: section")
    sp.add_argument("--targets", default=None, metavar="CAT:N,...",
                    help="checkpoints per dataset size, e.g. small:10,medium:20,large:30,xlarge:40")
    sp.add_argument("--min-interval", type=int, default=None, metavar="N",
                    help="fewest steps between a gap-filling step and any other "
                    "(default: training.min_checkpoint_interval, else 100)")
    sp.add_argument("--no-log-steps", action="store_true",
                    help="no power-of-two steps in the first epoch")
    sp.add_argument("--output", default=None, metavar="OUT.yaml",
                    help="write the config with the plan here (default: edit CONFIG in place)")
    sp.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    sp.set_defaults(func=cmd_schedule)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncckpt").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except AsyncCkptError as e:
        print(f"asyncckpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"asyncckpt {args.command}: error: {e}", file=sys.stderr)
        return 2


def _closed_pipe() -> int:
    """The reader of stdout went away (``asyncckpt list ROOT | head -1``): stop quietly, as
    a command killed by SIGPIPE does (status 141), with nothing more written to stdout."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would fail again
    os.close(devnull)
    return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
