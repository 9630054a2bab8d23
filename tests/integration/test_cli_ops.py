"""`ai-jobs stuck`, and the failures of `ai-jobs web` before it serves."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from tests.helpers import AI_JOBS, connect, env, insert_course, insert_media


def run(db_url: str | None, *args: str, **extra: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AI_JOBS, *args], env=env(db_url, **extra), capture_output=True, text=True, timeout=60
    )


def test_stuck_lists_processing_jobs_with_an_old_heartbeat(db_url: str) -> None:
    with connect(db_url) as c:
        stuck = insert_course(c, "Stuck Course", status="processing", worker_id="host-1")
        c.execute(
            "update ai_course_jobs set last_heartbeat = now() - interval '7 minutes' where id = %s",
            [stuck],
        )
        insert_media(c, status="processing")
        c.execute("update ai_media_jobs set last_heartbeat = now(), started_at = now()")
        insert_course(c, "Pending")

    p = run(db_url, "stuck", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert [(r["job_table"], r["id"]) for r in rows] == [("ai_course_jobs", stuck)]
    assert rows[0]["worker_id"] == "host-1" and rows[0]["stale_for"].startswith("0:07:")

    p = run(db_url, "stuck")
    assert p.returncode == 0, p.stderr
    header, line = p.stdout.splitlines()
    assert header.split()[:3] == ["table", "id", "subject/prompt"]
    assert stuck in line and "Stuck Course" in line

    # A shorter STALE_AFTER_SECONDS widens the net.
    p = run(db_url, "stuck", "--json", STALE_AFTER_SECONDS="0.001")
    assert len(json.loads(p.stdout)) == 2


def test_web_refuses_to_start_without_admin_token(db_url: str) -> None:
    p = run(db_url, "web", "--port", "1")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "ai-jobs: error: ADMIN_TOKEN is not set: the dashboard refuses to start without it"
    ]


def test_web_needs_a_migrated_database(empty_db_url: str) -> None:
    p = run(empty_db_url, "web", ADMIN_TOKEN="t")
    assert p.returncode == 1
    (line,) = p.stderr.strip().splitlines()
    assert "run `ai-jobs migrate`" in line


def test_bad_usage_exits_2(db_url: str) -> None:
    assert run(db_url, "stuck", "--frobnicate").returncode == 2
    assert run(db_url, "alerts", "extra").returncode == 2
    assert run(db_url, "web", "--port", "eighty").returncode == 2
