"""Child processes in tests: Python with this checkout (and tests/) on the path, output
captured as text, and a deadline that kills the child and fails the test instead of hanging."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
DEADLINE_S = 120


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: ours, ``env`` on top, and the checkout and tests/ on the path."""
    merged = {**os.environ, **(env or {})}
    merged["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(TESTS), merged.get("PYTHONPATH")]))
    return merged


def python(*args: object, env: dict[str, str] | None = None, timeout_s: float = DEADLINE_S,
           text: bool = True, **kw: Any) -> subprocess.CompletedProcess[Any]:
    """``python ARGS`` to its end (a script, ``-c CODE``, ``-m MODULE``); its exit code and output."""
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=text,
                          timeout=timeout_s, env=child_env(env), **kw)


def asyncckpt(*argv: object, **kw: Any) -> subprocess.CompletedProcess[str]:
    """The console script as a user runs it: ``python -m asyncckpt ARGV``."""
    return python("-m", "asyncckpt", *argv, **kw)


def spawn(*args: object, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[str]:
    """``python ARGS`` started, not waited for (the caller talks to it and ends it under a
    deadline: ``communicate(timeout=...)``); stdout piped, stderr into it unless given."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    return subprocess.Popen([sys.executable, *map(str, args)], text=True, env=child_env(env), **kw)


def finish(proc: subprocess.Popen[str], what: str, timeout_s: float = 180) -> str:
    """Wait for a ``spawn``ed child to end well; its output.  Past the deadline it is killed
    and the test fails with what it printed; a non-zero exit fails the test too."""
    import pytest

    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"run {what} did not finish in {timeout_s:.0f}s:\n{output}")
    assert proc.returncode == 0, f"run {what} failed:\n{output}"
    return output
