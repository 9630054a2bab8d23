"""One row must never break the queue or the operators' tools.

Rows written before migration 011 are repaired by it (the issue's poison values,
reproduced on a database migrated up to 009); rows written since hold the worst
values the constraints allow, and with those the sweep, the claim, the dashboard,
/metrics and every `ai-jobs` report still answer."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import errors

from listener import dal, db
from listener.migrate import migrate, migrations
from listener.ops import OTHER, STATUSES
from listener.sweeper import Sweeper
from listener.web.metrics import PROVIDER_LABELS
from tests.helpers import AI_JOBS, aconnect, connect, env, insert_course, insert_media, job
from tests.integration.test_web import BEARER, HTML, client, web  # noqa: F401 - fixtures
from tests.workers import settings as worker_settings

ALICE, BOB = uuid.uuid4(), uuid.uuid4()


def migrate_up_to(url: str, last: int) -> None:
    """The schema as it was when `last` was the newest migration."""
    with connect(url) as c:
        c.execute(dal.sql("create_migrations_table"))
        for m in migrations():
            if m.version <= last:
                c.execute(m.text.encode())
                c.execute(dal.sql("record_migration"), {"version": m.version, "name": m.name})


def test_migration_011_repairs_the_rows_that_broke_the_worker(empty_db_url: str) -> None:
    migrate_up_to(empty_db_url, 9)
    deep = '{"a": ' + "[" * 50 + "]" * 50 + "}"
    with connect(empty_db_url) as c:
        # the poison, as clients wrote it before the fix
        done = insert_course(c, "Done", status="done", started_at="-infinity", completed_at="now()")
        huge = insert_course(
            c,
            "Huge",
            status="done",
            completed_at="now()",
            metrics=psycopg.types.json.Jsonb({"generationDurationMs": 1e300}),
        )
        c.execute(
            "update ai_course_jobs set metrics = '{\"generationDurationMs\": 1e400}' where id = %s",
            [huge],
        )
        never = insert_media(c, "Never", run_after="infinity")
        looping = insert_course(c, "Loop", status="failed", retry_count=2000, max_retries=100000)
        nested = insert_course(c, "Nested", params=json.loads(deep))
        # two users' jobs writing one course
        alices = insert_course(c, "Algebra", created_by=ALICE, status="done")
        c.execute(
            "insert into ai_course_catalog (course_id, job_id, subject, title, result_path)"
            " values ('algebra', %s, 'Algebra', 'Algebra', 'courses/algebra/course.json')",
            [alices],
        )
        bobs = insert_course(c, "Algebra", created_by=BOB)
        # the poison is real: the operators' view fails on it (PostgreSQL 17 and
        # later have infinite intervals, and answer an infinite average instead)
        if c.info.server_version < 170000:
            with pytest.raises(psycopg.errors.DatetimeFieldOverflow):
                c.execute("select * from ai_job_metrics").fetchall()

    asyncio.run(migrate(empty_db_url))

    with connect(empty_db_url) as c:
        assert c.execute("select count(*) from ai_job_metrics").fetchone()["count"] > 0
        assert job(c, done)["started_at"] is None
        assert job(c, huge)["metrics"] is None
        assert job(c, never, "ai_media_jobs")["run_after"] is not None
        c.execute("select * from next_job_due()")
        loop = job(c, looping)
        assert (loop["retry_count"], loop["max_retries"]) == (1000, 100)
        gone = job(c, nested)
        assert gone["status"] == "dead_letter" and "nested" in gone["error"]
        assert job(c, alices)["course_id"] == "algebra"
        assert job(c, bobs)["course_id"].startswith("algebra-")
        owner = c.execute("select owner from ai_course_owners where course_id = 'algebra'")
        assert owner.fetchone()["owner"] == ALICE


def _worst_rows(c: psycopg.Connection[Any]) -> list[str]:
    """The worst values the database still accepts, in every status."""
    nasty = "\x1b[2J\x1b[31mred\x1b[0m <script>alert(1)</script> \u202egnp.exe \x07"
    ids = []
    for i, status in enumerate(STATUSES):
        ids.append(
            insert_course(
                c,
                (nasty + "s" * 500)[:500],
                status=status,
                retry_count=1000,
                max_retries=100,
                created_at="9999-12-30" if i else "1970-01-01",
                run_after="9999-12-30",
                started_at="1970-01-01",
                last_heartbeat="1970-01-01",
                completed_at="9999-12-30" if status in ("done", "dead_letter") else None,
                error=(nasty + "\n" + "e" * 2000)[:2000],
                worker_id=nasty,
                metrics=psycopg.types.json.Jsonb(
                    {
                        "generationDurationMs": 1e300 if i % 2 else -1e300,
                        "provider": f"{nasty}{i}" * 3,
                        "model": nasty,
                        "nested": {"x": [1e300, -1e300, None, "y"]},
                    }
                ),
            )
        )
    for i in range(300):  # as many providers as a client could wish for
        insert_media(
            c,
            "p",
            status="done",
            started_at="now()",
            completed_at="now()",
            metrics=psycopg.types.json.Jsonb({"provider": f"p{i}", "generationDurationMs": i}),
        )
    # and fresh ones, done within the hour, for the duration quantiles and alerts
    insert_course(
        c,
        "Recent",
        status="done",
        started_at="1970-01-01",
        completed_at="now()",
        metrics=psycopg.types.json.Jsonb({"generationDurationMs": 1e300, "provider": "openai"}),
    )
    return ids


def test_the_sweep_and_the_claim_go_on_around_the_worst_rows(db_url: str) -> None:
    with connect(db_url) as c:
        _worst_rows(c)
        good = insert_course(c, "Good")

    async def sweep_and_claim() -> None:
        pool = db.make_pool(db_url, 2)
        await pool.open()
        try:
            result = await Sweeper(pool, worker_settings(db_url)).run_once()
            assert result.stale >= 1 and result.rescued >= 1
            async with pool.connection() as conn:
                rows = await dal.fetch(conn, "claim_jobs", {"table": None, "worker": "w", "n": 100})
            assert good in {str(r["id"]) for r in rows}
        finally:
            await pool.close()

    asyncio.run(sweep_and_claim())


def run(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AI_JOBS, *args], env=env(url), capture_output=True, text=True, timeout=60
    )


def test_every_report_answers_whatever_the_rows_hold(db_url: str) -> None:
    with connect(db_url) as c:
        _worst_rows(c)
    for args in (
        ["status"],
        ["status", "--json"],
        ["alerts"],
        ["alerts", "--json"],
        ["jobs"],
        ["jobs", "--json", "--limit", "100"],
        ["stuck"],
        ["stuck", "--json"],
        ["rate-limit"],
    ):
        p = run(db_url, *args)
        assert p.returncode in (0, 1), (args, p.stderr)
        assert "Traceback" not in p.stderr and "error" not in p.stderr, (args, p.stderr)
        if "--json" in args:
            json.loads(p.stdout)
        else:  # a client's escape sequences never reach the operator's terminal
            assert "\x1b" not in p.stdout and "\u202e" not in p.stdout and "\x07" not in p.stdout
    status = json.loads(run(db_url, "status", "--json").stdout)
    assert set(status["ai_course_jobs"]) == set(STATUSES)


async def test_the_dashboard_and_metrics_answer_whatever_the_rows_hold(
    db_url: str,
    client: httpx.AsyncClient,  # noqa: F811 - the fixture
) -> None:
    with connect(db_url) as c:
        ids = _worst_rows(c)
    page = await client.get("/admin/jobs", headers=BEARER | HTML)
    assert page.status_code == 200
    assert "<script>alert(1)" not in page.text and "&lt;script&gt;" in page.text
    assert all(f'data-id="{i}"' in page.text for i in ids[1:])  # the newest (year 9999)
    snap = await client.get("/admin/jobs/snapshot", headers=BEARER)
    assert snap.status_code == 200 and snap.json()["rows"]
    scrape = await client.get("/metrics", headers=BEARER)
    assert scrape.status_code == 200
    providers = set()
    statuses = set()
    for line in scrape.text.splitlines():
        if line.startswith("ai_jobs_provider_jobs_last_hour{"):
            providers.add(line.split('provider="')[1].split('"')[0])
        if line.startswith("ai_jobs_queue_depth{"):
            statuses.add(line.split('status="')[1].split('"')[0])
    assert providers and providers <= {*PROVIDER_LABELS, OTHER}
    assert "other" in providers and "openai" in providers
    assert statuses == set(STATUSES)


async def test_unknown_statuses_never_reach_the_reports(db_url: str) -> None:
    """A status this code does not know (a newer schema, a dropped constraint) is
    never a label or a column: the counts come from the statuses the schema
    defines (live ones from their partial indexes, finished ones from sql/017's
    counters), and the reports answer."""
    from listener import ops

    async with await aconnect(db_url) as c:
        await c.execute("alter table ai_course_jobs drop constraint ai_course_jobs_status_check")
        await c.execute("insert into ai_course_jobs (subject, status) values ('x', 'paused')")
        await c.execute("insert into ai_course_jobs (subject, status) values ('y', %s)", ["z" * 99])
        await c.execute("insert into ai_course_jobs (subject) values ('w')")
        depth = await ops.queue_depth(c)
    assert set(depth["ai_course_jobs"]) <= {*ops.STATUSES, OTHER}
    assert depth["ai_course_jobs"]["pending"] == 1
    p = run(db_url, "status")
    assert p.returncode == 0 and "zzz" not in p.stdout and "paused" not in p.stdout.lower()


def test_a_bad_row_fails_its_own_insert_only(db_url: str) -> None:
    """Constraints refuse the row, not the statement's neighbours in other
    statements: the queue goes on."""
    with connect(db_url) as c:
        with pytest.raises(errors.CheckViolation):
            insert_course(c, "Bad", run_after="infinity")
        good = insert_course(c, "Good")
        assert job(c, good)["status"] == "pending"
