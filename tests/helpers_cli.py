"""The console script as a user runs it: ``python -m asyncckpt ARGV`` in a child process, with
this checkout on the path and a deadline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = str(Path(__file__).resolve().parents[1])
DEADLINE_S = 120


def asyncckpt(*argv: object, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run the CLI with ``argv``; its exit code, stdout and stderr (text)."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "asyncckpt", *map(str, argv)], capture_output=True,
                          text=True, timeout=DEADLINE_S, env=env, **kw)
