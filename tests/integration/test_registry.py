"""The worker registry (ai_job_workers): each worker process registers, beats
with what it reports, and leaves on a clean exit; dead ones expire in the sweep;
`ai-jobs workers` lists the live ones."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from typing import Any

from listener import __version__, db
from listener.jobs import Job, Outcome
from listener.sweeper import Sweeper
from tests.helpers import AI_JOBS, aconnect, await_until, connect, env, insert_course
from tests.workers import running_worker, settings


async def _rows(db_url: str) -> list[dict[str, Any]]:
    async with await aconnect(db_url) as c:
        cur = await c.execute("select * from ai_job_workers order by id")
        return await cur.fetchall()


async def _row_where(db_url: str, check: Any) -> dict[str, Any] | None:
    rows = await _rows(db_url)
    return rows[0] if len(rows) == 1 and check(rows[0]) else None


async def test_a_worker_registers_beats_and_leaves(db_url: str) -> None:
    gate = asyncio.Event()

    async def handler(job: Job) -> Outcome:
        await gate.wait()
        return Outcome("courses/x/course.json", {"provider": "test"})

    s = settings(db_url, listen_probe_seconds=0.3)
    async with running_worker(s, {"ai_course_jobs": handler}) as w:
        row = await await_until(
            lambda: _row_where(
                db_url,
                lambda r: r["probe_seconds"] is not None and r["listener_state"] == "listening",
            ),
            what="registered, listening, with a probe",
        )
        assert row["id"] == w.id and row["pid"] == os.getpid()
        assert row["listener_state"] == "listening" and row["version"] == __version__
        assert row["jobs_running"] == 0 and row["reconnects"] == 0
        with connect(db_url) as c:
            insert_course(c, "running")
        await await_until(lambda: _row_where(db_url, lambda r: r["jobs_running"] == 1))
        with connect(db_url) as c:  # a lost LISTEN connection is counted
            c.execute("select pg_terminate_backend(%s)", [w.listener.backend_pid])
        await await_until(lambda: _row_where(db_url, lambda r: r["reconnects"] == 1))
        gate.set()
    assert await _rows(db_url) == []  # a clean exit removes the row


async def test_a_polling_worker_registers_as_polling(db_url: str) -> None:
    async with running_worker(settings(db_url), {}, listen=False):
        row = await await_until(lambda: _row_where(db_url, lambda r: True))
        assert row["listener_state"] == "polling" and row["probe_seconds"] is None


async def test_the_sweep_expires_workers_that_stopped_beating(db_url: str) -> None:
    with connect(db_url) as c:
        c.execute(
            "insert into ai_job_workers (id, host, pid, last_seen, listener_state, version)"
            " values ('dead', 'h', 1, now() - interval '1 hour', 'listening', 'v'),"
            "        ('alive', 'h', 2, now(), 'listening', 'v')"
        )
    pool = db.make_pool(db_url, 2)
    await pool.open()
    try:
        result = await Sweeper(pool, settings(db_url, stale_after_seconds=300)).run_once()
    finally:
        await pool.close()
    assert result.expired == 1
    assert [r["id"] for r in await _rows(db_url)] == ["alive"]


def test_cli_workers_lists_the_live_ones(db_url: str) -> None:
    with connect(db_url) as c:
        c.execute(
            "insert into ai_job_workers"
            " (id, host, pid, last_seen, listener_state, jobs_running, version, probe_seconds)"
            " values ('web-1:7:abcdef', 'web-1', 7, now(), 'listening', 2, '0.1.0', 0.0015),"
            " ('old:8:abcdef', 'old', 8, now() - interval '1 hour', 'deaf', 0, '0.1.0', null)"
        )

    def run(*args: str) -> str:
        p = subprocess.run(
            [*AI_JOBS, "workers", *args],
            env=env(db_url),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert p.returncode == 0 and p.stderr == "", p.stderr
        return p.stdout

    rows = json.loads(run("--json"))
    assert [r["id"] for r in rows] == ["web-1:7:abcdef"]
    assert {
        "id",
        "host",
        "pid",
        "started_at",
        "last_seen",
        "listener_state",
        "jobs_running",
        "version",
    } <= set(rows[0])
    assert rows[0]["listener_state"] == "listening" and rows[0]["jobs_running"] == 2
    text = run()
    assert text.splitlines()[0].split()[:6] == [
        "id",
        "host",
        "pid",
        "started",
        "last_seen",
        "listener",
    ]
    assert "web-1:7:abcdef" in text and "1.5" in text and "old:8" not in text
