"""``asyncckpt inspect`` and ``asyncckpt diff``: what a checkpoint holds, what changed; progress
bars only on a terminal; nothing unpickled unsafely."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from asyncckpt import CheckpointManager, TrainState, cli
from helpers_crafting import replace_item

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """Steps 1 and 2 of a small run (AdamW + StepLR), and step 3 = step 2's state again."""
    root = tmp_path_factory.mktemp("inspect") / "ckpt"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    state = TrainState(model=model, optimizer=opt, scheduler=sched, rng=False)
    weights = {}
    with CheckpointManager(root) as mgr:
        for step in (1, 2):
            model(torch.randn(8, 64)).sum().backward()
            opt.step()
            sched.step()
            mgr.save(step, state, metrics={"loss": 1.0 / step}, tags=["t"]).result(timeout=120)
            weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
        mgr.save(3, state, metrics={"loss": 0.5}).result(timeout=120)
    return root, weights


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_lists_tensors_with_shapes_dtypes_bytes_and_ratio(run, capsys):
    root, _ = run
    code, out, err = _run(capsys, "inspect", str(root), "2")
    assert code == 0 and err == ""
    assert "step 2" in out and "loss=0.5" in out and "tags: t" in out and "codec zstd" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("model/model.0.weight"))
    assert "tensor" in line and "float32" in line and "32x64" in line and "8.2 KB" in line
    assert "scheduler" in out and "object" in out and "tensors:" in out
    _, doc, _ = _run(capsys, "inspect", str(root), "2", "--json")
    item = next(i for i in json.loads(doc)["items"] if i["key"] == "model/model.0.weight")
    assert item["raw_bytes"] == 32 * 64 * 4 and 0 < item["stored_bytes"]
    assert line.split()[-1] == f"{item['stored_bytes'] / item['raw_bytes']:.2f}"   # stored/raw
    assert float(line.split()[-1]) < 1  # compressed: smaller than raw, as README and COMPRESSION.md say
    assert "stored/raw" in out.splitlines()[6]  # the column is labelled
    tensors = [i for i in json.loads(doc)["items"] if i["kind"] == "tensor"]
    raw, stored = sum(i["raw_bytes"] for i in tensors), sum(i["stored_bytes"] for i in tensors)
    assert f"(stored/raw {stored / raw:.2f})" in out


def test_inspect_json_matches_the_model(run, capsys):
    root, weights = run
    code, out, _ = _run(capsys, "inspect", str(root), "--json", "--stats")
    assert code == 0
    doc = json.loads(out)
    assert doc["manifest"]["step"] == 3
    items = {i["key"]: i for i in doc["items"]}
    w = weights[2]["0.weight"]
    item = items["model/model.0.weight"]
    assert item["shape"] == [32, 64] and item["dtype"] == "float32" and item["raw_bytes"] == w.numel() * 4
    assert item["stored_bytes"] > 0 and item["kind"] == "tensor"
    assert item["stats"]["min"] == pytest.approx(w.min().item())
    assert item["stats"]["max"] == pytest.approx(w.max().item())
    assert item["stats"]["nonfinite"] == 0
    assert items["scheduler"]["kind"] == "object" and items["scheduler"]["shape"] is None


def test_diff_names_changed_tensors_with_max_abs_difference(run, capsys):
    root, weights = run
    code, out, _ = _run(capsys, "diff", str(root), "1", "2", "--json")
    assert code == 0
    doc = json.loads(out)
    expected = (weights[2]["0.weight"] - weights[1]["0.weight"]).abs().max().item()
    assert doc["changed"]["model/model.0.weight"] == pytest.approx(expected)
    assert doc["changed"]["optim/optimizer.param_groups.0.lr"] == "0.005 -> 0.0025"
    assert doc["metrics"] == {"loss": [1.0, 0.5]}
    assert "optim/optimizer.param_groups.0.betas" in doc["unchanged"]
    code, out, _ = _run(capsys, "diff", str(root), "1", "2")
    assert "model/model.0.weight" in out and "-0.5" in out and "changed:" in out


def test_diff_of_identical_states_changes_nothing(run, capsys):
    root, _ = run
    code, out, _ = _run(capsys, "diff", str(root), "2", "3", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["changed"] == {} and doc["only_a"] == doc["only_b"] == []


def test_diff_of_a_missing_step_is_bad_input(run, capsys):
    root, _ = run
    code, _, err = _run(capsys, "diff", str(root), "1", "9")
    assert code == 2 and "9" in err


class _Boom:
    def __reduce__(self) -> tuple:
        return (open, (str(Path(__file__).parent / "PWNED-by-asyncckpt-test"), "w"))


def test_inspect_and_diff_never_unpickle_code(tmp_path, capsys):
    marker = Path(__file__).parent / "PWNED-by-asyncckpt-test"
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        for step in (1, 2):
            mgr.save(step, TrainState(model=nn.Linear(2, 2), extra={"n": step})).result(timeout=120)
    for step in (1, 2):  # each extra blob replaced by a pickle that would run code when loaded
        replace_item(tmp_path / "ckpt" / f"step-{step:010d}", "extra",
                     pickle.dumps({"n": step, "x": _Boom()}, protocol=2))
    assert _run(capsys, "inspect", str(tmp_path / "ckpt"), "--stats")[0] == 0
    code, out, _ = _run(capsys, "diff", str(tmp_path / "ckpt"), "1", "2", "--json")
    assert code == 0 and json.loads(out)["changed"]["extra"] == "changed"
    assert not marker.exists()


@pytest.mark.parametrize("command,args,unit", [("verify", [], "B"), ("inspect", ["--stats"], "B"),
                                               ("diff", ["2", "3"], "item"),
                                               ("export", ["OUT"], "B")])
def test_progress_bars_only_on_a_terminal_and_run_to_the_end(run, capsys, monkeypatch, tmp_path,
                                                             command, args, unit):
    import tqdm

    closed: list[tuple[float, float, str, bool]] = []

    class Recorded(tqdm.tqdm):  # the real bar, remembering where it stood when it closed
        def close(self) -> None:
            if not getattr(self, "_recorded", False):
                self._recorded = True
                closed.append((self.n, self.total, getattr(self, "unit", None), self.disable))
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    root, _ = run
    argv = [command, str(root), *[str(tmp_path / "w.safetensors") if a == "OUT" else a for a in args]]
    code, _, err = _run(capsys, *argv)
    assert code == 0 and err == ""                               # not a TTY: no bar
    assert [c[3] for c in closed] == [True]
    if command == "export":
        argv.append("--force")
    closed.clear()
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    code, _, err = _run(capsys, *argv)
    assert code == 0 and command in err                          # drawn on stderr
    ((n, total, got_unit, disabled),) = closed
    assert not disabled and total > 0 and n == total, closed    # the bar reaches its total
    assert got_unit == unit


def test_export_json(run, capsys, tmp_path):
    root, _ = run
    code, out, _ = _run(capsys, "export", str(root), str(tmp_path / "w.safetensors"), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["step"] == 3 and doc["tensors"] == 4 and doc["format"] == "safetensors"


def test_every_table_command_takes_json():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("list", "verify", "prune", "export", "releases", "inspect", "diff"):
        assert "--json" in sub.choices[name]._option_string_actions, name
