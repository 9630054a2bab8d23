"""The dashboard in headless Chromium, with the real `ai-jobs web` and `ai-jobs
worker` processes: sign in, watch a job go pending -> processing -> done without a
reload, requeue a dead-letter job with the row's ↻ button. The page is saved as
test-artifacts/dashboard.png."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, ensure_chromium
from tests.helpers import AI_JOBS, ROOT, connect, env, insert_course, job, wait_until
from tests.workers import WorkerProcess

TOKEN = "browser-test-token-0123456789-abcdef"
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 15_000


@pytest.fixture(scope="session")
def chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    reason = ensure_chromium()
    if reason:
        pytest.skip(reason)
    return str(CHROMIUM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def web(db_url: str, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    log = (tmp_path / "web.log").open("w")
    proc = subprocess.Popen(
        [*AI_JOBS, "web", "--host", "127.0.0.1"],
        env=env(db_url, ADMIN_TOKEN=TOKEN, PORT=port),
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, (tmp_path / "web.log").read_text()
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, timeout=20, interval=0.1, what="ai-jobs web")
        yield base
    finally:
        proc.terminate()
        code = proc.wait(timeout=15)
        log.close()
    assert code == 0, (tmp_path / "web.log").read_text()  # SIGTERM: a clean stop


def test_dashboard_live_updates_and_requeue(chromium: str, web: str, db_url: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    worker: WorkerProcess | None = None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        try:
            # Signed out: 401 and the sign-in form, no jobs.
            response = page.goto(f"{web}/admin/jobs?live=1")
            assert response is not None and response.status == 401
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_url(f"{web}/admin/jobs?live=1")
            expect(page.locator("#live-state")).to_have_class("live-state on")
            page.evaluate("window.__sameDocument = true")

            def row(job_id: str) -> Any:
                return page.locator(f'#rows tr[data-id="{job_id}"]')

            # Pending (no worker yet), then processing and done once a worker runs.
            with connect(db_url) as c:
                jid = insert_course(c, "Photosynthesis")
            expect(row(jid)).to_have_attribute("data-status", "pending")
            worker = WorkerProcess(db_url, PLACEHOLDER_DELAY_MS=1500).started()
            expect(row(jid)).to_have_attribute("data-status", "processing")
            expect(row(jid)).to_have_attribute("data-status", "done")
            expect(page.locator('#cards [data-status="done"] .count')).to_have_text("1")

            # A dead-letter job comes back with the row's ↻ button, after confirming.
            with connect(db_url) as c:
                dead = insert_course(
                    c,
                    "Quantum Basics",
                    status="dead_letter",
                    retry_count=3,
                    error="Course generation failed: timeout",
                )
            expect(row(dead)).to_have_attribute("data-status", "dead_letter")
            row(dead).get_by_role("button", name=f"Requeue job {dead}").click()
            expect(page.locator("#confirm")).to_be_visible()
            expect(page.locator("#confirm-text")).to_contain_text("Requeue course job")
            page.click("#confirm-ok")
            expect(page.locator("#toast")).to_contain_text(f"Requeued {dead}")
            expect(row(dead)).not_to_have_attribute("data-status", "dead_letter")
            expect(row(dead)).to_have_attribute("data-status", "done")
            with connect(db_url) as c:
                back = job(c, dead)
            assert back["error"] is None and back["retry_count"] == 0

            # Every change arrived in the same document: no reload happened.
            assert page.evaluate("window.__sameDocument") is True
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()
            if worker is not None:
                worker.stop()
