"""The dashboard in headless Chromium, with the real `ai-jobs web` and `ai-jobs
worker` processes: sign in, watch a job go pending -> processing -> done without a
reload, requeue a dead-letter job with the row's ↻ button (saved as
test-artifacts/dashboard.png); then the console: open a job from the list and see
its course and its attempts' errors, filter to dead letters and bulk-requeue them,
watch them finish live, cancel a running job, pause and resume a job type.
Screenshots of the list, a job and the charts go to the test's temp folder."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, ensure_chromium
from tests.helpers import ROOT, connect, insert_course, job, wait_until, web_process
from tests.workers import WorkerProcess

# A web server, Chromium and a worker a test.
pytestmark = pytest.mark.timeout(120)

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


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    """Where the worker writes results and the dashboard reads them."""
    folder = tmp_path / "storage"
    folder.mkdir()
    return folder


@pytest.fixture
def web(db_url: str, tmp_path: Path, storage: Path) -> Iterator[str]:
    with web_process(db_url, tmp_path / "web.log", ADMIN_TOKEN=TOKEN, STORAGE_URL=storage) as base:
        yield base


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
            # 3 s a job: the processing row stays on screen across the expectation's
            # polls (a second apart at the end) even when the live feed lags.
            worker = WorkerProcess(db_url, PLACEHOLDER_DELAY_MS=3000).started()
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


def _sign_in(page: Any, web: str, path: str) -> None:
    response = page.goto(f"{web}{path}")
    assert response is not None and response.status == 401
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{web}{path}")


def _fail_twice(db_url: str, job_id: str) -> None:
    """Two attempts that failed, as a worker records them."""
    with connect(db_url) as c:
        for n in (1, 2):
            row = c.execute(
                "select * from claim_job('ai_course_jobs', %s, 'earlier-worker')", [job_id]
            ).fetchone()
            assert row is not None
            c.execute(
                "select * from fail_job('ai_course_jobs', %s, %s, %s, 0)",
                [job_id, row["claim_token"], f"openai: HTTP 429 rate limited (attempt {n})"],
            )


def test_console_in_the_browser(
    chromium: str, web: str, db_url: str, storage: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    worker: WorkerProcess | None = None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        try:
            _sign_in(page, web, "/admin/jobs?live=1")

            def row(job_id: str) -> Any:
                return page.locator(f'#rows tr[data-id="{job_id}"]')

            # A course that failed twice, then the worker finishes it.
            with connect(db_url) as c:
                jid = insert_course(c, "Ocean Tides", params={"itemsPerGroup": 3})
            _fail_twice(db_url, jid)
            # Each job takes 6 s: long enough for a running one to be cancelled from
            # its row (seen live, clicked, confirmed) on a busy machine.
            worker = WorkerProcess(
                db_url, STORAGE_URL=storage, PLACEHOLDER_DELAY_MS=6000, ALERT_INTERVAL_SECONDS=1
            ).started()
            expect(row(jid)).to_have_attribute("data-status", "done")

            # Open it from the list: the course, readable, and each attempt's error.
            row(jid).locator("td.label a").click()
            page.wait_for_url(f"{web}/admin/jobs/{jid}")
            expect(page.locator("#status")).to_have_attribute("data-status", "done")
            expect(page.locator(".attempt-error")).to_have_count(2)
            expect(page.locator(".attempt-error").first).to_contain_text("(attempt 1)")
            expect(page.locator("#course .group").first).to_be_visible()
            assert page.locator("#course .item").count() >= 3
            page.screenshot(path=str(shots / "job.png"), full_page=True)

            # Filter to dead letters, bulk-requeue them, watch them finish live.
            with connect(db_url) as c:
                dead = [
                    insert_course(
                        c, f"Outage {n}", status="dead_letter", retry_count=3, error="HTTP 503"
                    )
                    for n in range(3)
                ]
            page.goto(f"{web}/admin/jobs?live=1")
            page.select_option("#filters select[name=status]", "dead_letter")
            page.click("#filters button[type=submit]")
            page.wait_for_url(f"{web}/admin/jobs?*status=dead_letter*")
            expect(page.locator("#rows tr[data-id]")).to_have_count(3)
            page.screenshot(path=str(shots / "list.png"), full_page=True)
            page.click('[data-bulk="requeue"]')
            expect(page.locator("#confirm-text")).to_contain_text("Requeue 3 job(s)")
            page.click("#confirm-ok")
            expect(page.locator("#toast")).to_contain_text("Requeued 3 job(s)")
            expect(page.locator("#rows tr[data-id]")).to_have_count(0)  # live: none left
            page.get_by_role("link", name="Clear", exact=True).click()
            for d in dead:
                expect(row(d)).to_have_attribute("data-status", "done")

            # Cancel a running job from its row.
            with connect(db_url) as c:
                slow = insert_course(c, "Long Generation")
            expect(row(slow)).to_have_attribute("data-status", "processing")
            row(slow).get_by_role("button", name=f"Cancel job {slow}").click()
            expect(page.locator("#confirm-text")).to_contain_text("Cancel course job")
            # A live update re-renders the rows while the dialog is open, as the
            # heartbeats of a busy queue do: the confirmed cancel still lands.
            with connect(db_url) as c:
                bystander = insert_course(c, "Bystander", status="done")
            expect(row(bystander)).to_have_count(1)
            page.click("#confirm-ok")
            expect(page.locator("#toast")).to_contain_text(f"Cancelled {slow}")
            expect(row(slow)).to_have_attribute("data-status", "cancelled")
            worker.wait_for("job_cancelled", lambda e: e.get("job_id") == slow)

            # Pause course jobs: a new one waits; resume: it runs.
            page.get_by_role("button", name="Pause course jobs").click()
            page.click("#confirm-ok")
            expect(page.locator('#queues [data-table="ai_course_jobs"]')).to_have_attribute(
                "data-paused", "1"
            )
            with connect(db_url) as c:
                waiting = insert_course(c, "Waits For Resume")
                media = c.execute(
                    "insert into ai_media_jobs (prompt, media_type) values ('a wave', 'image')"
                    " returning id"
                ).fetchone()
            assert media is not None
            with connect(db_url) as c:
                wait_until(
                    lambda: job(c, str(media["id"]), "ai_media_jobs")["status"] == "done",
                    what="media job done while courses are paused",
                )
                assert job(c, waiting)["status"] == "pending"
            page.get_by_role("button", name="Resume course jobs").click()
            page.click("#confirm-ok")
            expect(row(waiting)).to_have_attribute("data-status", "done")

            # The overview's charts, drawn from the database by the local library.
            page.goto(f"{web}/admin/overview")
            expect(page.locator("#charts")).to_have_attribute("data-loaded", "hour")
            expect(page.locator("#chart-throughput canvas")).to_have_count(1)
            page.screenshot(path=str(shots / "charts.png"), full_page=True)
            assert not [e for e in errors if "Content Security Policy" in e], errors
        finally:
            browser.close()
            if worker is not None:
                worker.stop()


# The series' colours as overview.html draws them (RGB).
P50, P95, PENDING, WAIT_P50, WAIT_P95 = (
    (0x3B, 0x5B, 0xDB),
    (0xC9, 0x2A, 0x2A),
    (0x3B, 0x5B, 0xDB),
    (0x0C, 0x85, 0x99),
    (0xE6, 0x77, 0x00),
)
COUNT_PIXELS = """([id, colours]) => {
  const canvas = document.querySelector(`#${id} canvas`);
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] < 200) continue;
    const near = ([r, g, b]) => Math.abs(data[i] - r) < 24
      && Math.abs(data[i + 1] - g) < 24 && Math.abs(data[i + 2] - b) < 24;
    if (colours.some(near)) n++;
  }
  return n;
}"""


def _drawn(page: Any, chart: str) -> dict[str, float]:
    """The scales a chart was drawn with (overview.html records them)."""
    data = page.locator(f"#{chart}").evaluate("el => ({...el.dataset})")
    return {k: float(data[k]) for k in ("xMin", "xMax", "yMin", "yMax")} | {
        "ticks": data.get("xTicks", "[]")
    }


def test_overview_charts_span_the_window_and_draw_a_lone_point(
    chromium: str, web: str, db_url: str
) -> None:
    """A new deployment's first minutes: one job done, one queue sample, $0 spent.
    Each chart spans the window asked for (x from now - window to now, y from 0
    to a little above the data: one cent for $0, not 0-100), the lone values are
    drawn, and the time axis reads on a 24-hour clock."""
    from playwright.sync_api import expect, sync_playwright

    with connect(db_url) as c:
        c.execute(
            "insert into ai_course_jobs (subject, status, created_at, started_at, completed_at,"
            " metrics) values ('Tides', 'done', now() - interval '50 s', now() - interval '40 s',"
            ' now() - interval \'10 s\', \'{"provider": "placeholder", "estimatedCostUsd": 0}\')'
        )
        c.execute(
            "insert into ai_job_counter_samples (counter, value, sampled_at) values"
            " ('queue_pending', 3, now() - interval '20 s'),"
            " ('queue_processing', 1, now() - interval '20 s')"
        )
        now = float(c.execute("select extract(epoch from now()) as t").fetchone()["t"])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900}, locale="en-US")
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        try:
            _sign_in(page, web, "/admin/overview")
            for window, seconds in (("hour", 3600), ("day", 86400)):
                if window == "day":
                    page.click('#windows button[data-window="day"]')
                expect(page.locator("#charts")).to_have_attribute("data-loaded", window)
                for chart, value in (
                    ("chart-duration", 30),
                    ("chart-wait", 10),
                    ("chart-depth", 3),
                    ("chart-throughput", None),
                ):
                    d = _drawn(page, chart)
                    assert abs(d["xMax"] - now) < 60, (window, chart, d)  # to now ...
                    assert abs(d["xMax"] - d["xMin"] - seconds) < 1, (
                        window,
                        chart,
                        d,
                    )  # ... from now - window
                    assert d["yMin"] == 0, (window, chart, d)
                    if value is not None:
                        assert value <= d["yMax"] <= value * 1.5, (window, chart, d)
                    ticks = json.loads(str(d["ticks"]))
                    assert ticks and all(re.match(r"^\d\d:\d\d(\n|$)", t) for t in ticks), ticks
                # Each value alone in its bucket, with no neighbour to draw a line to: drawn.
                for chart, colours in (
                    ("chart-duration", [P50, P95]),
                    ("chart-wait", [WAIT_P50, WAIT_P95]),
                    ("chart-depth", [PENDING]),
                ):
                    assert page.evaluate(COUNT_PIXELS, [chart, colours]) > 10, (window, chart)
            cost = _drawn(page, "chart-cost")
            assert abs(cost["xMax"] - now) < 60 and abs(cost["xMax"] - cost["xMin"] - 86400) < 1
            assert (cost["yMin"], cost["yMax"]) == (0, 0.01), cost  # $0: up to one cent
        finally:
            browser.close()
