"""Names that do not exist, found without running the code: the CUDA paths of staging,
restore and the benchmarks never run in CI, so a typo there would surface only on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

pyflakes = pytest.importorskip("pyflakes.api", reason="pyflakes comes with the dev extra; the GPU machine lacks it")
messages = pytest.importorskip("pyflakes.messages")

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
