"""The generated references (docs/configuration.md, docs/cli.md) match the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
