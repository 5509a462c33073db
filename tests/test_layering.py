"""The module layers of the design, enforced by parsing imports with ``ast``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "asyncckpt"

LAYER = {
    "errors": 0, "_threads": 0,
    "retention": 1, "schedule": 1, "manifest": 1, "config": 1,
    "_torch_compat": 2, "codec": 2, "state": 2, "staging": 2, "bounce": 2, "planner": 2, "_dist": 2, "signals": 2,
    "multipart": 2, "safe_metadata": 2, "values": 2, "loader_position": 2,
    "storage": 3, "dcp_io": 3, "lease": 3, "quarantine": 3, "branches": 3,
    "pipeline": 4, "restore": 4, "mirror": 4, "release": 4, "foreign": 4,
    "manager": 5, "weights": 5,
    "cli": 6, "__main__": 6, "integrations": 6,
}
# Same-layer imports the design names explicitly.
ALLOWED_SAME_LAYER = {("config", "retention"), ("config", "schedule"), ("dcp_io", "storage"),
                      ("planner", "_torch_compat"), ("staging", "_torch_compat"),
                      ("safe_metadata", "codec"),
                      ("state", "values"), ("state", "loader_position"), ("loader_position", "_torch_compat"),
                      ("values", "_torch_compat"),
                      ("lease", "storage"), ("quarantine", "storage"),
                      ("branches", "storage"), ("branches", "quarantine"),
                      ("foreign", "restore"),
                      ("__main__", "cli")}
PURE = ["errors", "retention", "schedule", "manifest", "config"]
NO_TORCH = PURE + ["codec", "multipart", "storage", "lease", "quarantine", "branches", "cli"]
LAZY_OK = {("cli", "manager"), ("cli", "release")}


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


def _name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return rel.parts[0]


def _internal_imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at top level) for each import of another asyncckpt module."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level >= 1 and node.module:
                names = [node.module.split(".")[0]]
            elif node.level >= 1:
                names = [a.name for a in node.names]
            elif node.module and node.module.startswith("asyncckpt."):
                names = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("asyncckpt.")]
        out += [(n, id(node) in top) for n in names]
    return out


def test_every_module_has_a_layer() -> None:
    unknown = {_name(p) for p in _modules()} - set(LAYER)
    assert not unknown, f"modules missing from the layer table: {unknown}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_respect_layers(path: Path) -> None:
    me = _name(path)
    for dep, at_top in _internal_imports(path):
        if dep not in LAYER or dep == me:
            continue
        if (me, dep) in LAZY_OK and not at_top:
            continue
        ok = LAYER[dep] < LAYER[me] or (me, dep) in ALLOWED_SAME_LAYER
        assert ok, f"{me} (layer {LAYER[me]}) imports {dep} (layer {LAYER[dep]})"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_only_storage_knows_url_schemes(path: Path) -> None:
    if _name(path) == "storage":
        return
    text = path.read_text()
    for scheme in ("s3://", "file://", "gs://", "memory://"):
        assert scheme not in text, f"{path.name} mentions {scheme}"
    assert "import fsspec" not in text and "from fsspec" not in text, f"{path.name} imports fsspec"


def test_pure_modules_and_storage_import_without_torch() -> None:
    code = ("import sys\n"
            + "".join(f"import asyncckpt.{m}\n" for m in NO_TORCH)
            + "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
            + "print(len(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stderr
