"""Names that do not exist, found without running the code: the CUDA paths of staging,
restore and the benchmarks never run in CI, so a typo there would surface only on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers_deps import need

pyflakes = need("pyflakes.api", reason="pyflakes comes with the dev extra; the GPU machine lacks it")
messages = need("pyflakes.messages")

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p for d in ("asyncckpt", "benchmarks", "examples", "tests") for p in (ROOT / d).rglob("*.py"))
UNDEFINED = (messages.UndefinedName, messages.UndefinedLocal)  # not UndefinedExport: hf's lazy __all__


class _Collect:
    def __init__(self) -> None:
        self.found: list[str] = []

    def flake(self, message: object) -> None:
        if isinstance(message, UNDEFINED):
            self.found.append(str(message))

    def syntaxError(self, filename: str, msg: str, lineno: int, offset: int, text: str) -> None:
        self.found.append(f"{filename}:{lineno}: {msg}")

    def unexpectedError(self, filename: str, msg: str) -> None:
        self.found.append(f"{filename}: {msg}")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_undefined_names(path: Path) -> None:
    report = _Collect()
    pyflakes.check(path.read_text(), str(path.relative_to(ROOT)), report)
    assert report.found == []


def test_a_missing_dev_dependency_fails_where_all_are_required(tmp_path) -> None:
    import os
    import subprocess
    import sys

    test = tmp_path / "test_needs.py"
    test.write_text("from helpers_deps import need\n\ndef test_it():\n    need('no_such_module_xyz')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    runs = {flag: subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                                 capture_output=True, text=True, timeout=120, cwd=tmp_path,
                                 env={**env, "ASYNCCKPT_ALL_DEV_DEPS": flag})
            for flag in ("0", "1")}
    assert runs["0"].returncode == 0 and "1 skipped" in runs["0"].stdout, runs["0"].stdout
    assert runs["1"].returncode == 1 and "no_such_module_xyz is not installed" in runs["1"].stdout, runs["1"].stdout
