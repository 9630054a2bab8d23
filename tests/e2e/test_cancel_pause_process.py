"""`ai-jobs cancel`, `pause` and `resume` against the real `ai-jobs worker`
process, with the real SDK talking to the fake provider."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.fakeai import FAKE_OPENAI_KEY, FakeAI
from tests.helpers import AI_JOBS, connect, env, insert_course, insert_media, job, wait_until
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(120)


def ai_jobs(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AI_JOBS, *args], env=env(db_url), capture_output=True, text=True, timeout=60
    )


def test_cancel_interrupts_the_running_provider_call(db_url: str, fake: FakeAI) -> None:
    storage = Path(tempfile.mkdtemp())
    fake.modes["openai"] = "hang"
    w = WorkerProcess(
        db_url,
        OPENAI_API_KEY=FAKE_OPENAI_KEY,
        OPENAI_BASE_URL=fake.openai_url,
        AI_PROVIDER_PRIORITY="openai",
        ALLOW_PLACEHOLDER="0",
        AI_TIMEOUT_SECONDS="90",
        STORAGE_URL=storage,
        CACHE_TTL_SECONDS="0",
    ).started()
    try:
        with connect(db_url) as c:
            jid = insert_course(c, "Slow Subject")
            wait_until(lambda: fake.count("openai", "/chat/completions") == 1, what="provider call")
            assert job(c, jid)["status"] == "processing"
            p = ai_jobs(db_url, "cancel", jid)
            assert p.returncode == 0, p.stderr
            assert p.stdout.strip() == f"cancelled {jid} in ai_course_jobs (was processing)"
            event = w.wait_for("job_cancelled", lambda e: e.get("job_id") == jid, timeout=10)
            # The provider's connection is closed: the call is abandoned, not awaited.
            wait_until(lambda: fake.abandoned, timeout=5, what="the provider call abandoned")
            assert event["level"] == "INFO", w.log()
            row = job(c, jid)
            # Within a second of the cancel's commit (both clocks are this machine's).
            assert fake.abandoned[0][1] - row["completed_at"].timestamp() < 1.0
            assert (row["status"], row["result_path"]) == ("cancelled", None)
            assert not list(storage.rglob("course.json"))
            assert not w.actions("job_failed") and not w.actions("job_done")

            # Cancelled twice, or an unknown id: one clear line, exit 1; bad usage: 2.
            p = ai_jobs(db_url, "cancel", jid)
            assert p.returncode == 1 and "already cancelled" in p.stderr
            assert len(p.stderr.strip().splitlines()) == 1
            p = ai_jobs(db_url, "cancel", "8d6c3f1e-0000-4000-8000-000000000000")
            assert p.returncode == 1 and "not found" in p.stderr
            assert ai_jobs(db_url, "cancel", "nope").returncode == 2

            # The worker goes on: the next job runs to the end.
            fake.modes["openai"] = "valid"
            nxt = insert_course(c, "Next Subject")
            wait_until(lambda: job(c, nxt)["status"] == "done", what="next job done")
    finally:
        w.stop()


def test_pause_and_resume_a_job_type(db_url: str) -> None:
    w = WorkerProcess(db_url).started()
    try:
        p = ai_jobs(db_url, "pause", "course")
        assert p.returncode == 0 and p.stdout.strip() == "paused course (ai_course_jobs)", p.stderr
        status = ai_jobs(db_url, "status")
        assert "PAUSED" in status.stdout
        with connect(db_url) as c:
            course = insert_course(c, "Waits")
            media = insert_media(c, "goes ahead")
            # The worker is busy with media meanwhile; the course never starts.
            wait_until(lambda: job(c, media, "ai_media_jobs")["status"] == "done", what="media")
            assert job(c, course)["status"] == "pending"
            p = ai_jobs(db_url, "resume", "course")
            assert p.returncode == 0, p.stderr
            wait_until(lambda: job(c, course)["status"] == "done", what="course after resume")
            row = c.execute(
                "select extract(epoch from j.started_at - q.changed_at)::float8 as s"
                " from ai_course_jobs j, ai_job_queues q"
                " where j.id = %s and q.job_table = 'ai_course_jobs'",
                [course],
            ).fetchone()
            assert row is not None and 0 <= row["s"] < 1.0  # claimed within a second
        assert ai_jobs(db_url, "pause", "video").returncode == 2
    finally:
        w.stop()
