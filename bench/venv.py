"""The benchmark's own environment, bench/.venv: this project (editable) plus the
peers and tools it measures with, so that none of them enters the project's
dependencies. Made on first use, refreshed when bench/requirements.txt or
pyproject.toml changes, then the benchmark re-runs itself inside it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "bench" / ".venv"
REQUIREMENTS = ROOT / "bench" / "requirements.txt"
STAMP = VENV / ".installed"


def _digest() -> str:
    h = hashlib.sha256()
    for f in (REQUIREMENTS, ROOT / "pyproject.toml"):
        h.update(f.read_bytes())
    return h.hexdigest()


def _inside() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def prepare() -> Path:
    """Make or refresh bench/.venv if need be; its python."""
    python = VENV / "bin" / "python"
    digest = _digest()
    if not (STAMP.exists() and STAMP.read_text().strip() == digest):
        print("bench: preparing bench/.venv (first run or changed requirements)", flush=True)
        if not python.exists():
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-e", str(ROOT)], check=True)
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
        STAMP.write_text(digest + "\n")
    return python


def ensure(argv: list[str], module: str = "bench") -> None:
    fresh = STAMP.exists() and STAMP.read_text().strip() == _digest()
    if _inside() and fresh:
        return
    python = prepare()
    os.chdir(ROOT)
    os.execv(str(python), [str(python), "-m", module, *argv])
