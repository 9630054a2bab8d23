"""`ai-jobs stuck`, `jobs`, `rate-limit`, and the failures of `ai-jobs web` before it serves."""

from __future__ import annotations

import json
import subprocess
import uuid
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


def test_web_refuses_a_short_admin_token(db_url: str) -> None:
    p = run(db_url, "web", "--port", "1", ADMIN_TOKEN="x" * 31)
    assert p.returncode == 1
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("ai-jobs: error: ADMIN_TOKEN is too short (31 characters, at least 32)")
    assert "x" * 31 not in line  # never the token itself


def test_web_needs_a_migrated_database(empty_db_url: str) -> None:
    p = run(empty_db_url, "web", ADMIN_TOKEN="t" * 32)
    assert p.returncode == 1
    (line,) = p.stderr.strip().splitlines()
    assert "run `ai-jobs migrate`" in line


def test_bad_usage_exits_2(db_url: str) -> None:
    assert run(db_url, "stuck", "--frobnicate").returncode == 2
    assert run(db_url, "alerts", "extra").returncode == 2
    assert run(db_url, "web", "--port", "eighty").returncode == 2


def test_jobs_lists_a_status_newest_first_with_errors(db_url: str) -> None:
    with connect(db_url) as c:
        old = insert_course(c, "Old", status="dead_letter", retry_count=3, error="timeout")
        c.execute(
            "update ai_course_jobs set completed_at = now() - interval '1 hour' where id = %s",
            [old],
        )
        new = insert_media(c, status="dead_letter", retry_count=3, error="Storage upload failed")
        c.execute("update ai_media_jobs set completed_at = now() where id = %s", [new])
        insert_course(c, "Fine")

    p = run(db_url, "jobs", "--status", "dead_letter", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert [(r["id"], r["error"]) for r in rows] == [
        (new, "Storage upload failed"),
        (old, "timeout"),
    ]
    p = run(db_url, "jobs", "--status", "dead_letter", "--limit", "1")
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 2 and new in p.stdout
    assert len(json.loads(run(db_url, "jobs", "--json").stdout)) == 3
    assert run(db_url, "jobs", "--status", "lost").returncode == 2


def test_rate_limit_shows_users_against_the_limit(db_url: str) -> None:
    heavy, light = str(uuid.uuid4()), str(uuid.uuid4())
    with connect(db_url) as c:
        c.execute("update ai_job_settings set rate_limit_per_hour = 3")
        for _ in range(3):
            insert_course(c, created_by=heavy)
        insert_media(c, created_by=light)
        insert_course(c, "system job")  # no user: exempt, not listed
    p = run(db_url, "rate-limit", "--json")
    assert p.returncode == 0, p.stderr
    assert [
        (r["created_by"], r["job_table"], r["jobs_last_hour"]) for r in json.loads(p.stdout)
    ] == [
        (heavy, "ai_course_jobs", 3),
        (light, "ai_media_jobs", 1),
    ]
    lines = run(db_url, "rate-limit").stdout.splitlines()
    assert lines[1].split()[-2:] == ["3", "yes"] and heavy in lines[1]
