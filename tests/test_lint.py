"""The linter is part of the suite, so CI (which runs the README's test command) keeps the tree ruff-clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(ROOT)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, f"ruff found problems (run `.venv/bin/ruff check --fix .`):\n{proc.stdout}{proc.stderr}"
