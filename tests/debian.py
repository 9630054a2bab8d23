"""Debian packages the tests need (Chromium, PgBouncer): installed by the test
set-up when missing and apt can install them; otherwise the tests skip with the
reason this returns. Never by hand only."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def ensure_package(binary: Path, package: str) -> str | None:
    """Install Debian's `package` when `binary` is missing; return why it cannot
    be had, or None."""
    if binary.exists():
        return None
    apt = shutil.which("apt-get")
    if apt is None:
        return f"{binary} is missing and apt-get is not available to install it"
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return f"{binary} is missing and installing it needs root (no sudo)"
        sudo = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([*sudo, apt, "update"], [*sudo, apt, "install", "-y", "-q", package]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"installing {package} failed ({' '.join(cmd[-3:])}): {tail[0]}"
    if not binary.exists():
        return f"{package} was installed but {binary} is still missing"
    return None
