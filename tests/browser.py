"""Headless Chromium for the browser tests: Debian's package driven by Playwright's
driver only (no browser download). The test set-up installs the package when it is
missing and apt can install it; otherwise the tests skip with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def ensure_chromium() -> str | None:
    """Install Debian's chromium when missing; return why it cannot be had, or None."""
    if CHROMIUM.exists():
        return None
    apt = shutil.which("apt-get")
    if apt is None:
        return f"{CHROMIUM} is missing and apt-get is not available to install it"
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return f"{CHROMIUM} is missing and installing it needs root (no sudo)"
        sudo = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([*sudo, apt, "update"], [*sudo, apt, "install", "-y", "-q", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"installing chromium failed ({' '.join(cmd[-3:])}): {tail[0]}"
    if not CHROMIUM.exists():
        return f"chromium was installed but {CHROMIUM} is still missing"
    return None


if __name__ == "__main__":
    reason = ensure_chromium()
    print(reason or f"{CHROMIUM} ready")
    raise SystemExit(1 if reason else 0)
