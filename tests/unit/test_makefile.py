"""The README's two commands, read by make itself (`make -n`: what would run): `make
demo` installs the package with the demo extra alone, `make test` with the test
tools; they share one virtualenv, each with a stamp of its own, so either order
works and neither undoes the other."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make here")

DEMO, TEST = "-e '.[demo]'", "-e '.[test]'"


def plan(target: str, venv: Path) -> str:
    """The commands `make <target>` would run with this virtualenv."""
    p = subprocess.run(
        ["make", "-n", target, f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        # Not the make this suite may run under: its flags, nor its ARGS (which
        # make exports, and the demo's recipe passes on).
        env={k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "ARGS"},
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


def made(venv: Path, *stamps: str) -> None:
    """A virtualenv as `make` leaves it, with these stamps newer than pyproject.toml."""
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    if not (venv / "bin" / "python").exists():
        (venv / "bin" / "python").symlink_to(sys.executable)
    for stamp in stamps:
        (venv / stamp).touch()


def test_make_demo_installs_the_demo_extra_alone(tmp_path: Path) -> None:
    commands = plan("demo", tmp_path / "venv")
    assert "-m venv" in commands and DEMO in commands and TEST not in commands
    assert commands.rstrip().endswith(f"{tmp_path / 'venv'}/bin/ai-jobs demo")


def test_make_test_installs_the_test_tools(tmp_path: Path) -> None:
    commands = plan("test", tmp_path / "venv")
    assert TEST in commands and DEMO not in commands
    assert "-m pytest" in commands


def test_demo_then_test_then_demo(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    made(venv, ".demo-installed")  # after `make demo`
    after_demo = plan("test", venv)
    assert TEST in after_demo and "-m venv" not in after_demo  # the same virtualenv
    made(venv, ".installed")  # after `make test`
    again = plan("demo", venv)
    assert DEMO not in again and TEST not in again and "-m venv" not in again
    assert "pip install" not in plan("test", venv)


def test_test_then_demo(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    made(venv, ".installed")  # after `make test` (or `make install`)
    commands = plan("demo", venv)
    assert DEMO in commands and TEST not in commands and "-m venv" not in commands
