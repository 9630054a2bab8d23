"""The real `ai-jobs worker` process with the real SDKs against the fake providers:
a course and a medium end to end, and an attempt where every provider fails
repeated until the dead letter, each failure reported to Sentry."""

from __future__ import annotations

import json
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests import fakeai
from tests.fakeai import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY, FakeAI
from tests.helpers import connect, insert_course, insert_media, job, wait_until
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(90)


def providers_env(fake: FakeAI, **extra: Any) -> dict[str, Any]:
    return {
        "OPENAI_API_KEY": FAKE_OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_url,
        "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY,
        "ANTHROPIC_BASE_URL": fake.anthropic_url,
        "ALLOW_PLACEHOLDER": "0",
        **extra,
    }


def test_course_and_media_through_the_worker(db_url: str, fake: FakeAI) -> None:
    storage = Path(tempfile.mkdtemp())
    fake.modes["openai"] = "500"  # the course falls through to Anthropic
    w = WorkerProcess(
        db_url,
        **providers_env(fake, STORAGE_URL=storage, CATALOG_BATCH_JOBS=100, CACHE_TTL_SECONDS=0),
    ).started()
    try:
        with connect(db_url) as c:
            course_id = insert_course(c, "Marine Biology", params={"itemsPerGroup": 3})
            wait_until(lambda: job(c, course_id)["status"] == "done", what="course done")
            fake.modes["openai"] = "valid"
            media_id = insert_media(c, "a coral reef", "image")
            wait_until(
                lambda: job(c, media_id, "ai_media_jobs")["status"] == "done", what="image done"
            )
            course_row = job(c, course_id)
            media_row = job(c, media_id, "ai_media_jobs")
        assert not (storage / "courses/catalog.json").exists()  # batch not full yet
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    m = course_row["metrics"]
    assert course_row["result_path"] == "courses/marine-biology/course.json"
    assert m["provider"] == "anthropic" and m["fallbacks"] == ["openai: HTTP 500 server error"]
    assert m["totalDurationMs"] >= m["generationDurationMs"] > 0
    assert m["inputTokens"] > 0 and m["estimatedCostUsd"] > 0 and "storageMs" in m
    course = json.loads((storage / course_row["result_path"]).read_bytes())
    assert [len(g["items"]) for g in course["groups"]] == [3, 3, 3]
    assert media_row["result_path"] == f"media/{media_id}.png"
    assert (storage / media_row["result_path"]).read_bytes() == fakeai.FAKE_IMAGE
    # Shutdown rendered the unfinished batch.
    catalog = json.loads((storage / "courses/catalog.json").read_bytes())
    assert [c["id"] for c in catalog["courses"]] == ["marine-biology"]


def test_all_providers_failing_retries_to_the_dead_letter(db_url: str, fake: FakeAI) -> None:
    # Server errors: a 429 is no failure of the attempt (the job waits for the
    # quota instead, tests/integration/handlers/test_failure_classes.py).
    fake.modes.update(openai="500", anthropic="500")
    dsn = f"http://publickey@{fake.url.removeprefix('http://')}/7"
    # Breakers that never open: this is about the retries (an open breaker makes the
    # job wait instead, tests/e2e/test_provider_outages.py).
    quiet = {"PROVIDER_BREAKER_THRESHOLD": "100"}
    w = WorkerProcess(
        db_url, **providers_env(fake, RETRY_BASE_SECONDS="0.2", SENTRY_DSN=dsn, **quiet)
    ).started()
    try:
        with connect(db_url) as c:
            jid = insert_course(c, "Doomed Course", max_retries=3)
            wait_until(
                lambda: job(c, jid)["status"] == "dead_letter", timeout=30, what="dead letter"
            )
            row = job(c, jid)
            wait_until(lambda: len(_events(fake)) >= 3, timeout=10, what="3 Sentry events")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert row["retry_count"] == 3 and row["completed_at"] is not None
    assert row["error"] == (
        "Course generation failed: openai: HTTP 500 server error; anthropic: HTTP 500 server error"
    )
    # One call per provider per attempt: the SDKs retried nothing.
    assert fake.count("openai") == 3 and fake.count("anthropic") == 3
    events = _events(fake)
    assert {e["tags"]["function"] for e in events} == {"ai-job-runner"}
    assert len({e["tags"]["request_id"] for e in events}) == 3  # one per attempt
    assert sorted(e["extra"]["retryCount"] for e in events) == [0, 1, 2]
    assert {e["extra"]["jobId"] for e in events} == {jid}
    assert {e["extra"]["courseId"] for e in events} == {"doomed-course"}
    everything = w.log() + json.dumps(row, default=str) + json.dumps(events)
    for key in (FAKE_OPENAI_KEY, FAKE_ANTHROPIC_KEY):
        assert key not in everything


def _events(fake: FakeAI) -> list[dict[str, Any]]:
    found = []
    for envelope in list(fake.envelopes):
        for line in envelope.splitlines():
            if line.startswith(b"{") and b'"exception"' in line:
                found.append(json.loads(line))
    return found


def test_run_once_says_a_job_waits_for_its_providers(db_url: str, fake: FakeAI) -> None:
    """Every provider rate-limited: the job goes back to pending (no attempt
    counted), and run-once says it did not finish rather than that it failed."""
    import subprocess

    from tests.helpers import AI_JOBS, env

    fake.modes.update(openai="429", anthropic="529")
    fake.retry_headers = {"retry-after": "30"}  # "come back later": a wait, not a failure
    with connect(db_url) as c:
        jid = insert_course(c, "Waiting")
    p = subprocess.run(
        [*AI_JOBS, "run-once"],
        env=env(db_url, STORAGE_URL=tempfile.mkdtemp(), **providers_env(fake)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1
    out = json.loads(p.stdout)
    assert out["jobId"] == jid and out["status"] == "pending"
    last = p.stderr.splitlines()[-1]  # logs go to stderr before it
    assert last.startswith(f"ai-jobs: error: job {jid} did not finish (pending): Providers")
    with connect(db_url) as c:
        assert job(c, jid)["retry_count"] == 0
