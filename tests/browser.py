"""Headless Chromium for the browser tests: Debian's package driven by Playwright's
driver only (no browser download). The test set-up installs the package when it is
missing and apt can install it; otherwise the tests skip with the reason."""

from __future__ import annotations

from pathlib import Path

from tests.debian import ensure_package

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
    return ensure_package(CHROMIUM, "chromium")


if __name__ == "__main__":
    reason = ensure_chromium()
    print(reason or f"{CHROMIUM} ready")
    raise SystemExit(1 if reason else 0)
