"""The generated references (docs/configuration.md, docs/cli.md) match the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers.procs import asyncckpt

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_generated_references_are_up_to_date():
    out = subprocess.run([sys.executable, str(DOCS / "gen_reference.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + "\n(regenerate: python docs/gen_reference.py)"


def test_every_option_has_a_description():
    text = (DOCS / "configuration.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
    assert rows and all(not ln.rstrip().endswith("|  |") for ln in rows), \
        [ln for ln in rows if ln.rstrip().endswith("|  |")]


def test_readme_links_every_docs_page():
    readme = (DOCS.parent / "README.md").read_text()
    for page in ("concepts.md", "configuration.md", "cli.md", "integrations.md"):
        assert f"docs/{page}" in readme, page
        assert (DOCS / page).exists(), page


def _fenced(text: str, lang: str) -> list[str]:
    """The bodies of the ```lang blocks of a markdown text."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def test_ci_runs_exactly_the_readme_test_command():
    """The README's command is CI's main run, as a line of its own, before the oldest-torch
    run repeats the suite (same markers) in its own environment."""
    readme = (DOCS.parent / "README.md").read_text()
    after = readme[readme.index("Run the tests"):]
    command = _fenced(after, "bash")[0].strip()
    ci = [ln for ln in (DOCS.parent / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith("#")]
    assert command in ci
    pytest_runs = [ln for ln in ci if "-m pytest" in ln]
    assert pytest_runs[0] == command
    markers = command.split("-m pytest", 1)[1].strip()
    assert len(pytest_runs) == 2 and pytest_runs[1].split("-m pytest", 1)[1].strip().startswith(markers)


def test_readme_schedule_example_prints_what_the_readme_shows(tmp_path):
    readme = (DOCS.parent / "README.md").read_text()
    yaml_text = next(b for b in _fenced(readme, "yaml") if "dataset_tokens" in b)
    console = next(b for b in _fenced(readme, "console") if "asyncckpt schedule" in b)
    command, *shown = console.splitlines()
    args = command.removeprefix("$ asyncckpt ").split()
    (tmp_path / "train.yaml").write_text(yaml_text)
    out = asyncckpt(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == shown


def test_readme_use_snippet_runs_and_logs_no_warning(tmp_path, monkeypatch, caplog):
    """The "Use" snippet, pasted as is after the few names it assumes, saves by its schedule,
    keeps by its retention, and logs no warning (its best_metric is one it reports)."""
    import logging

    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    readme = (DOCS.parent / "README.md").read_text()
    snippet = _fenced(readme[readme.index("## Use"):], "python")[0]
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    batches = iter(())
    loader = StatefulDataLoader(data, batch_size=8, shuffle=True)

    def train_step() -> float:
        nonlocal batches
        x, y = next(batches, None) or next(batches := iter(loader))
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    names = {"model": model, "opt": opt, "loader": loader, "train_step": train_step, "total": 1600,
             "sched": torch.optim.lr_scheduler.StepLR(opt, step_size=100)}
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="asyncckpt")
    exec(compile(snippet, "README.md (Use)", "exec"), names)
    kept = {int(p.name[5:]) for p in (tmp_path / "runs" / "exp1" / "ckpt").glob("step-*")}
    assert {1000, 1500, 1600} <= kept <= {500, 1000, 1500, 1600}     # keep_last=3 and the best
    assert [r.getMessage() for r in caplog.records if r.name.startswith("asyncckpt")] == []
