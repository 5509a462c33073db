"""Dev dependencies in tests: skipped where one is missing (the GPU machine has only torch), a
failure where all must be there (``ASYNCCKPT_ALL_DEV_DEPS=1``, which ``.ci/run`` sets: CI installs
the dev extra, so a missing one there is a broken install, not a reason to skip)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRED = os.environ.get("ASYNCCKPT_ALL_DEV_DEPS") == "1"


def need(module: str, reason: str | None = None) -> ModuleType:
    """``module`` imported; without it the test is skipped, or fails when all are required."""
    if REQUIRED:
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{module} is not installed, though ASYNCCKPT_ALL_DEV_DEPS=1 says every dev "
                        f"dependency is (pip install -e '.[dev]'): {e}", pytrace=False)
    return pytest.importorskip(module, reason=reason)
