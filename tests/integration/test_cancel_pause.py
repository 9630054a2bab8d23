"""Cancel, pause and the per-attempt history, in the database (sql/016) and in an
in-process worker."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import psycopg
import pytest
from loguru import logger

from listener.jobs import Job, Outcome
from tests.helpers import aconnect, await_until, connect, insert_course, insert_media, job
from tests.workers import running_worker, settings


def _claim(c: psycopg.Connection[Any], table: str = "ai_course_jobs") -> dict[str, Any]:
    row = c.execute("select * from claim_jobs(%s, 'w', 1)", [table]).fetchone()
    assert row is not None
    return row


def _listener(db_url: str) -> psycopg.Connection[Any]:
    listener = psycopg.connect(db_url, autocommit=True)
    listener.execute("listen ai_jobs")
    return listener


def _payloads(listener: psycopg.Connection[Any]) -> list[Any]:
    return [json.loads(n.payload) for n in listener.notifies(timeout=0.5, stop_after=None)]


def test_cancel_a_pending_job_and_it_never_starts(db_url: str) -> None:
    with connect(db_url) as c:
        jid = insert_course(c)
        was = c.execute("select cancel_job(%s, 'ai_course_jobs') as w", [jid]).fetchone()
        assert was == {"w": "pending"}
        row = job(c, jid)
        assert row["status"] == "cancelled" and row["completed_at"] is not None
        assert c.execute("select * from claim_jobs(null, 'w', 10)").fetchall() == []
        assert (
            c.execute("select * from claim_job('ai_course_jobs', %s, 'w')", [jid]).fetchall() == []
        )
        # No attempt ran, so none is recorded.
        assert c.execute("select count(*) as n from ai_job_attempts").fetchone() == {"n": 0}


def test_cancel_a_running_job_notifies_its_worker_and_ignores_late_writes(db_url: str) -> None:
    with connect(db_url) as c:
        jid = insert_media(c)
        claimed = _claim(c, "ai_media_jobs")
        with _listener(db_url) as listener:
            c.execute("select cancel_job(%s, 'ai_media_jobs')", [jid])
            assert _payloads(listener) == [{"cancel": jid, "table": "ai_media_jobs"}]
        token = claimed["claim_token"]
        # The worker's late writes change nothing: its token is gone.
        done = c.execute(
            "select * from complete_jobs('ai_media_jobs', %s, %s, %s, %s::jsonb[])",
            [[jid], [token], ["media/x.png"], ["{}"]],
        ).fetchall()
        failed = c.execute(
            "select * from fail_job('ai_media_jobs', %s, %s, 'late', 10)", [jid, token]
        ).fetchall()
        assert done == [] and failed == []
        row = job(c, jid, "ai_media_jobs")
        assert (row["status"], row["result_path"], row["claim_token"]) == ("cancelled", None, None)
        attempts = c.execute("select * from ai_job_attempts where job_id = %s", [jid]).fetchall()
        assert [(a["outcome"], a["attempt"], a["worker_id"]) for a in attempts] == [
            ("cancelled", 1, "w")
        ]


@pytest.mark.parametrize("status", ["done", "dead_letter", "cancelled"])
def test_a_finished_job_cannot_be_cancelled(db_url: str, status: str) -> None:
    with connect(db_url) as c:
        jid = insert_course(c, status=status)
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match=f"already {status}"):
            c.execute("select cancel_job(%s, 'ai_course_jobs')", [jid])
        with pytest.raises(psycopg.errors.NoDataFound, match="not found"):
            c.execute("select cancel_job(%s, 'ai_course_jobs')", [str(uuid.uuid4())])
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="Unknown job table"):
            c.execute("select cancel_job(%s, 'users')", [jid])
        assert job(c, jid)["status"] == status


def test_a_signed_in_user_cancels_only_their_own_jobs(db_url: str) -> None:
    me, other = str(uuid.uuid4()), str(uuid.uuid4())
    with connect(db_url) as c:
        mine = insert_course(c, "mine", created_by=me)
        theirs = insert_course(c, "theirs", created_by=other)
    with connect(db_url) as c:
        c.execute("set role authenticated")
        c.execute("select set_config('request.jwt.claim.sub', %s, false)", [me])
        with pytest.raises(psycopg.errors.NoDataFound):
            c.execute("select cancel_job(%s, 'ai_course_jobs')", [theirs])
        assert c.execute("select cancel_job(%s, 'ai_course_jobs') as w", [mine]).fetchone() == {
            "w": "pending"
        }
        # Nothing else of the operators' surface is theirs.
        for call in ("select requeue_jobs()", "select pause_jobs('ai_course_jobs')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(call)
        c.execute("select set_config('request.jwt.claim.sub', '', false)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="signed-in"):
            c.execute("select cancel_job(%s, 'ai_course_jobs')", [theirs])
    with connect(db_url) as c:
        c.execute("set role anon")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("select cancel_job(%s, 'ai_course_jobs')", [theirs])
    with connect(db_url) as c:
        assert job(c, mine)["status"] == "cancelled"
        assert job(c, theirs)["status"] == "pending"


def test_a_paused_table_hands_out_nothing_until_resumed(db_url: str) -> None:
    with connect(db_url) as c, _listener(db_url) as listener:
        course = insert_course(c)
        media = insert_media(c)
        _payloads(listener)
        assert c.execute("select pause_jobs('ai_course_jobs') as x").fetchone() == {"x": True}
        assert c.execute("select pause_jobs('ai_course_jobs') as x").fetchone() == {"x": False}
        # Each call notifies, changed or not: a worker that missed one hears the next.
        assert _payloads(listener) == [{"table": "ai_course_jobs", "paused": True}] * 2
        # Whatever the caller heard: no course job, by table, by id, or from both.
        assert c.execute("select * from claim_jobs('ai_course_jobs', 'w', 5)").fetchall() == []
        assert (
            c.execute("select * from claim_job('ai_course_jobs', %s, 'w')", [course]).fetchall()
            == []
        )
        got = c.execute("select id from claim_jobs(null, 'w', 5)").fetchall()
        assert [str(r["id"]) for r in got] == [media]
        assert c.execute("select next_job_due() as d").fetchone() == {"d": None}
        assert c.execute("select resume_jobs('ai_course_jobs') as x").fetchone() == {"x": True}
        assert _payloads(listener) == [{"table": "ai_course_jobs", "paused": False}]
        got = c.execute("select id from claim_jobs('ai_course_jobs', 'w', 5)").fetchall()
        assert [str(r["id"]) for r in got] == [course]


def test_every_failed_attempt_keeps_its_error(db_url: str) -> None:
    with connect(db_url) as c:
        jid = insert_course(c, max_retries=3)
        for n in (1, 2):
            claimed = _claim(c)
            c.execute(
                "select * from fail_job('ai_course_jobs', %s, %s, %s, 0)",
                [jid, claimed["claim_token"], f"error {n}"],
            )
        _claim(c)
        c.execute("select * from mark_stale_jobs('0 seconds')")
        c.execute("select * from rescue_stale_jobs()")
        rows = c.execute(
            "select attempt, outcome, next_status, error, worker_id, started_at < ended_at as timed"
            " from ai_job_attempts where job_id = %s order by ended_at",
            [jid],
        ).fetchall()
        assert [(r["attempt"], r["outcome"], r["next_status"], r["error"]) for r in rows] == [
            (1, "failed", "failed", "error 1"),
            (2, "failed", "failed", "error 2"),
            (3, "lost", "dead_letter", "Worker lost: heartbeat older than the stale timeout"),
        ]
        assert all(r["worker_id"] == "w" and r["timed"] for r in rows)
        # Retention takes the history with the job.
        c.execute("update ai_job_attempts set ended_at = now() - interval '100 days'")
        c.execute("update ai_course_jobs set completed_at = now() - interval '100 days'")
        assert c.execute("select purge_old_jobs('90 days') as n").fetchone() == {"n": 1}
        assert c.execute("select count(*) as n from ai_job_attempts").fetchone() == {"n": 0}


def test_backoff_exponent_is_clamped(db_url: str) -> None:
    with connect(db_url) as c:
        jid = insert_course(c, max_retries=100, retry_count=98)
        claimed = _claim(c)
        row = c.execute(
            "select status, run_after - now() <= interval '1 day 1 minute' as bounded"
            " from fail_job('ai_course_jobs', %s, %s, 'x', 10)",
            [jid, claimed["claim_token"]],
        ).fetchone()
        assert row == {"status": "failed", "bounded": True}


def test_cancelled_jobs_are_purged_like_done_ones(db_url: str) -> None:
    with connect(db_url) as c:
        old = insert_course(c)
        new = insert_course(c)
        c.execute(
            "select cancel_job(%s, 'ai_course_jobs'), cancel_job(%s, 'ai_course_jobs')", [old, new]
        )
        c.execute(
            "update ai_course_jobs set completed_at = now() - interval '100 days' where id = %s",
            [old],
        )
        assert c.execute("select purge_old_jobs('90 days') as n").fetchone() == {"n": 1}
        assert [str(r["id"]) for r in c.execute("select id from ai_course_jobs")] == [new]


async def test_worker_stops_a_cancelled_job_and_writes_nothing(db_url: str) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(job: Job) -> Outcome:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Outcome("never")

    async def quick(job: Job) -> Outcome:
        return Outcome(f"media/{job.id}.png", {"provider": "test"})

    s = settings(db_url)
    handlers = {"ai_course_jobs": forever, "ai_media_jobs": quick}
    async with running_worker(s, handlers) as worker, await aconnect(db_url) as c:
        cur = await c.execute("insert into ai_course_jobs (subject) values ('x') returning id")
        jid = (await cur.fetchone() or {})["id"]
        await asyncio.wait_for(started.wait(), 10)
        await c.execute("select cancel_job(%s, 'ai_course_jobs')", [jid])
        await asyncio.wait_for(cancelled.wait(), 1.0)  # the "within a second"
        assert jid not in worker.leases.running
        cur = await c.execute("select status, result_path from ai_course_jobs")
        assert await cur.fetchall() == [{"status": "cancelled", "result_path": None}]
        # The worker goes on with other work.
        cur = await c.execute(
            "insert into ai_media_jobs (prompt, media_type) values ('p', 'image') returning id"
        )
        mid = (await cur.fetchone() or {})["id"]

        async def media_done() -> bool:
            cur = await c.execute("select status from ai_media_jobs where id = %s", [mid])
            return (await cur.fetchone() or {}).get("status") == "done"

        await await_until(media_done, what="media job done after the cancel")


async def test_cancelling_a_stale_job_stops_the_worker_still_running_it(db_url: str) -> None:
    # Marked stale (its heartbeat late), the job still runs on its worker until
    # the rescue hands it on: cancel_job tells that worker as for a running one.
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(job: Job) -> Outcome:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Outcome("never")

    # No heartbeat meanwhile: it would find the job stale and stop it on its own.
    s = settings(db_url, heartbeat_interval_seconds=60)
    async with (
        running_worker(s, {"ai_course_jobs": forever}) as worker,
        await aconnect(db_url) as c,
    ):

        async def swept() -> bool:  # the start-up sweep would rescue the stale job
            return worker.sweeps >= 1 and worker.settled

        await await_until(swept, what="the start-up sweep")
        cur = await c.execute("insert into ai_course_jobs (subject) values ('x') returning id")
        jid = (await cur.fetchone() or {})["id"]
        await asyncio.wait_for(started.wait(), 10)

        async def claimed() -> bool:  # (a fast claim's job starts before its commit)
            cur = await c.execute("select status from ai_course_jobs where id = %s", [jid])
            return (await cur.fetchone() or {}).get("status") == "processing"

        await await_until(claimed, what="the claim committed")
        cur = await c.execute("select job_id from mark_stale_jobs(interval '0')")
        assert await cur.fetchall() == [{"job_id": jid}]
        assert jid in worker.leases.running
        cur = await c.execute("select cancel_job(%s, 'ai_course_jobs') as was", [jid])
        assert await cur.fetchone() == {"was": "stale"}
        await asyncio.wait_for(cancelled.wait(), 5)
        assert jid not in worker.leases.running
        cur = await c.execute(
            "select outcome, worker_id from ai_job_attempts where job_id = %s", [jid]
        )
        assert await cur.fetchall() == [{"outcome": "cancelled", "worker_id": worker.id}]


async def test_a_cancel_of_a_job_held_elsewhere_is_ignored_here(db_url: str) -> None:
    # cancel_job notifies every worker; those that do not hold the job let it
    # pass quietly (no error logged), and go on.
    async def quick(job: Job) -> Outcome:
        return Outcome(f"courses/{job.id}/course.json", {"provider": "test"})

    errors: list[str] = []
    sink = logger.add(lambda m: errors.append(str(m)), level="ERROR")
    async with running_worker(settings(db_url), {"ai_course_jobs": quick}) as worker:

        async def settled() -> bool:
            return bool(worker.settled)

        await await_until(settled, what="an idle worker")
        heard = worker.notifications
        with connect(db_url) as c:
            payload = json.dumps({"cancel": str(uuid.uuid4()), "table": "ai_course_jobs"})
            c.execute("select pg_notify('ai_jobs', %s)", [payload])
            jid = insert_course(c, "After the cancel")

        async def done() -> bool:
            with connect(db_url) as c:
                return worker.notifications >= heard + 2 and job(c, jid)["status"] == "done"

        await await_until(done, what="the next job done")
        assert worker.listener.service.reconnects == 0
        assert not worker.leases.cancel_checks
    logger.remove(sink)
    assert errors == []


async def test_a_forged_cancel_notification_stops_nothing(db_url: str) -> None:
    """Any role may NOTIFY ai_jobs: a cancel payload for a running job that
    cancel_job did not cancel leaves it running to the end."""
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(job: Job) -> Outcome:
        started.set()
        await release.wait()
        return Outcome(f"courses/{job.id}/course.json", {"provider": "test"})

    s = settings(db_url)
    handlers = {"ai_course_jobs": slow, "ai_media_jobs": slow}
    async with running_worker(s, handlers) as worker, await aconnect(db_url) as c:
        cur = await c.execute("insert into ai_course_jobs (subject) values ('x') returning id")
        jid = (await cur.fetchone() or {})["id"]
        await asyncio.wait_for(started.wait(), 10)
        seen = worker.notifications
        payload = json.dumps({"cancel": str(jid), "table": "ai_course_jobs"})
        await c.execute("select pg_notify('ai_jobs', %s)", [payload])

        async def checked() -> bool:
            return worker.notifications > seen and not worker.leases.cancel_checks

        await await_until(checked, what="the forged cancel heard and checked")
        assert jid in worker.leases.running
        release.set()

        async def done() -> bool:
            cur = await c.execute("select status from ai_course_jobs where id = %s", [jid])
            return (await cur.fetchone() or {}).get("status") == "done"

        await await_until(done, what="the job finished despite the forged cancel")


def test_worker_reads_the_cancel_and_pause_payloads() -> None:
    from listener.notifications import parse_payload

    jid = uuid.uuid4()
    n = parse_payload(json.dumps({"cancel": str(jid), "table": "ai_media_jobs"}))
    assert (n.cancel, n.table, n.sweep) == (jid, "ai_media_jobs", False)
    n = parse_payload('{"table": "ai_course_jobs", "paused": true}')
    assert (n.paused, n.table, n.cancel) == (True, "ai_course_jobs", None)
    assert parse_payload('{"table": "ai_course_jobs", "paused": false}').paused is False
    for bad in (
        '{"cancel": 5, "table": "ai_course_jobs"}',
        '{"cancel": "nope", "table": "ai_course_jobs"}',
        json.dumps({"cancel": str(jid)}),
        '{"table": "ai_course_jobs", "paused": "yes"}',
    ):
        with pytest.raises(ValueError):
            parse_payload(bad)


def test_a_deferral_that_counts_is_kept_as_an_attempt(db_url: str) -> None:
    with connect(db_url) as c:
        jid = insert_course(c)
        claimed = _claim(c)
        # Waiting for providers does not count while under the limit...
        row = c.execute(
            "select * from defer_job('ai_course_jobs', %s, %s, 0, 'openai: 429', 1800)",
            [jid, claimed["claim_token"]],
        ).fetchone()
        assert row is not None and row["counted"] is False
        c.execute(
            "update ai_course_jobs set provider_wait_since = now() - interval '1 hour'"
            " where id = %s",
            [jid],
        )
        claimed = _claim(c)
        row = c.execute(
            "select * from defer_job('ai_course_jobs', %s, %s, 0, 'openai: 429', 1800)",
            [jid, claimed["claim_token"]],
        ).fetchone()
        assert row is not None and row["counted"] is True and row["status"] == "failed"
        kept = c.execute("select * from ai_job_attempts where job_id = %s", [jid]).fetchall()
        assert [(a["attempt"], a["outcome"], a["worker_id"]) for a in kept] == [(1, "failed", "w")]
        assert kept[0]["error"].startswith("openai: 429 (waiting since")
