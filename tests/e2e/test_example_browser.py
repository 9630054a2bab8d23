"""The example app (examples/course-progress/index.html) in headless Chromium,
served by a static server of its own, against the real `ai-jobs web` (CORS for
that origin): sign in with a token, ask for a course, watch the progress bar
and the groups appear as a worker writes them, open the result. The worker's
writes are progress_jobs and complete_jobs, as a worker sends them. Screenshot
mid-generation: test-artifacts/example-app.png."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apitools import ADMIN, ALICE, SECRET, token
from tests.browser import CHROMIUM, CHROMIUM_ARGS, ensure_chromium
from tests.helpers import ROOT, connect, web_process

EXAMPLE = ROOT / "examples" / "course-progress"
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
def page_url() -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(EXAMPLE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def api_url(db_url: str, tmp_path: Path, page_url: str) -> Iterator[str]:
    with web_process(
        db_url,
        tmp_path / "web.log",
        ADMIN_TOKEN=ADMIN,
        JWT_SECRET=SECRET,
        API_CORS_ORIGINS=page_url,
        STORAGE_URL=tmp_path / "storage",
    ) as base:
        yield base


def group(n: int) -> dict[str, Any]:
    return {
        "id": f"g{n}",
        "title": f"Light reactions, part {n}",
        "summary": f"What happens in step {n}.",
        "items": [
            {"id": f"g{n}-i1", "prompt": "Q", "answer": "A", "explanation": "", "options": []}
        ],
    }


def test_the_example_app_watches_a_course_being_written(
    chromium: str, page_url: str, api_url: str, db_url: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 900, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        try:
            page.goto(f"{page_url}/?api={api_url}")
            page.fill("#token", token(ALICE))
            page.fill("#subject", "Photosynthesis")
            page.click("#ask")
            expect(page.locator("#status")).to_have_text("pending")
            job_id = page.locator("#job").get_attribute("data-id")
            assert job_id

            with connect(db_url) as c:  # a worker claims it and writes as it goes
                (held,) = c.execute("select * from claim_jobs('ai_course_jobs', 'w', 1)").fetchall()
                assert str(held["id"]) == job_id
                expect(page.locator("#status")).to_have_text("processing")
                course: dict[str, Any] = {
                    "id": "photosynthesis",
                    "title": "Photosynthesis",
                    "subject": "Photosynthesis",
                    "description": "",
                    "level": "beginner",
                    "language": "English",
                    "groups": [],
                }
                for n in (1, 2):
                    course["groups"].append(group(n))
                    c.execute(
                        "select * from progress_jobs('ai_course_jobs', %s, %s, %s::jsonb[],"
                        " %s::jsonb[])",
                        [
                            [held["id"]],
                            [held["claim_token"]],
                            [
                                json.dumps(
                                    {
                                        "percent": 33 * n,
                                        "phase": "generating",
                                        "groupsDone": n,
                                        "groupsTotal": 3,
                                    }
                                )
                            ],
                            [json.dumps(course)],
                        ],
                    )
                    expect(page.locator("#groups li")).to_have_count(n)
                    expect(page.locator("#bar")).to_have_js_property("value", 33 * n)
                expect(page.locator("#phase")).to_contain_text("2 of 3 groups")
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "example-app.png"), animations="disabled")
                assert page.locator("#open").is_disabled()

                course["groups"].append(group(3))
                stored = tmp_path / "storage" / "courses" / "photosynthesis"
                stored.mkdir(parents=True)
                (stored / "course.json").write_text(json.dumps(course))
                c.execute(
                    "select * from complete_jobs('ai_course_jobs', %s, %s, %s, %s::jsonb[])",
                    [
                        [held["id"]],
                        [held["claim_token"]],
                        ["courses/photosynthesis/course.json"],
                        ["{}"],
                    ],
                )
            expect(page.locator("#status")).to_have_text("done")
            expect(page.locator("#bar")).to_have_js_property("value", 100)
            expect(page.locator("#groups li")).to_have_count(2)  # the groups shown stay
            page.click("#open")
            expect(page.locator("#result")).to_contain_text("Light reactions, part 3")
            assert page.locator("#error").text_content() == ""
        finally:
            browser.close()
