"""The worker in-process, with handlers written by the test: dispatch, coalescing,
retries, dead letter, heartbeats, polling fallback, lost jobs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from listener.errors import InvalidJob
from listener.jobs import Job, Outcome
from listener.notifications import parse_payload
from listener.pacing import ROUNDS
from listener.sweeper import Sweeper
from tests.helpers import aconnect, await_until, connect, insert_course, insert_media, job
from tests.workers import running_worker, settings


async def done_handler(job: Job) -> Outcome:
    return Outcome(f"courses/{job.row['course_id']}/course.json", {"provider": "test"})


async def _status(db_url: str, jid: str, table: str = "ai_course_jobs") -> dict[str, Any]:
    c = await aconnect(db_url)
    try:
        cur = await c.execute(f"select * from {table} where id = %s", [jid])
        row = await cur.fetchone()
        assert row is not None
        return row
    finally:
        await c.close()


async def test_notified_job_runs_at_once_with_no_sweep(db_url: str) -> None:
    started = asyncio.Event()

    async def handler(job: Job) -> Outcome:
        started.set()
        return await done_handler(job)

    s = settings(db_url, sweep_interval_seconds=3600)
    async with running_worker(s, {"ai_course_jobs": handler}) as w:
        await asyncio.sleep(0)  # the start-up sweep has nothing to find
        with connect(db_url) as c:
            jid = insert_course(c, "Algebra")
        await asyncio.wait_for(started.wait(), 5)
        row = await await_until(lambda: _done(db_url, jid), what="job done")
        assert row["result_path"] == "courses/algebra/course.json"
        assert row["metrics"]["provider"] == "test" and "totalDurationMs" in row["metrics"]
        assert row["worker_id"] == w.id


async def _done(db_url: str, jid: str, table: str = "ai_course_jobs") -> dict[str, Any] | None:
    row = await _status(db_url, jid, table)
    return row if row["status"] == "done" else None


async def test_concurrency_is_bounded_and_free_slots_refill(db_url: str) -> None:
    now_running = 0
    peak = 0
    gate = asyncio.Event()

    async def handler(job: Job) -> Outcome:
        nonlocal now_running, peak
        now_running += 1
        peak = max(peak, now_running)
        await gate.wait()
        await asyncio.sleep(0.01)
        now_running -= 1
        return await done_handler(job)

    with connect(db_url) as c:
        c.execute(
            "insert into ai_course_jobs (subject) select 's' || g from generate_series(1, 40) g"
        )
    s = settings(db_url, worker_concurrency=4)
    async with running_worker(s, {"ai_course_jobs": handler}):
        await await_until(lambda: _count(db_url, "processing", 4), what="4 processing")
        gate.set()
        await await_until(lambda: _count(db_url, "done", 40), what="all done", timeout=20)
    assert peak == 4


async def _count(db_url: str, status: str, n: int) -> bool:
    c = await aconnect(db_url)
    try:
        cur = await c.execute("select count(*) from ai_course_jobs where status = %s", [status])
        row = await cur.fetchone()
        return bool(row and row["count"] == n)
    finally:
        await c.close()


async def test_failures_retry_with_backoff_then_dead_letter(db_url: str) -> None:
    attempts: list[float] = []

    async def handler(job: Job) -> Outcome:
        attempts.append(asyncio.get_running_loop().time())
        raise RuntimeError(
            f"provider exploded on attempt {job.attempt} with key sk-test-SECRET123456"
        )

    s = settings(db_url, retry_base_seconds=0.3)
    with connect(db_url) as c:
        jid = insert_course(c, "Flaky", max_retries=3)
    async with running_worker(s, {"ai_course_jobs": handler}):
        row = await await_until(
            lambda: _with_status(db_url, jid, "dead_letter"), timeout=15, what="dead letter"
        )
    assert len(attempts) == 3
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # 0.3 * 2^(n-1), +-25%, plus the failure's write and the next claim: up to a
    # second more on a busy machine.
    assert 0.2 < gaps[0] < 0.375 + 1.0 and 0.4 < gaps[1] < 0.75 + 1.0
    assert row["retry_count"] == 3 and row["completed_at"] is not None
    assert row["error"].startswith("RuntimeError: provider exploded on attempt 3")
    assert "SECRET123456" not in row["error"]


async def _with_status(db_url: str, jid: str, status: str, table: str = "ai_course_jobs") -> Any:
    row = await _status(db_url, jid, table)
    return row if row["status"] == status else None


async def test_invalid_job_goes_to_dead_letter_at_once_and_worker_keeps_going(db_url: str) -> None:
    async def handler(job: Job) -> Outcome:
        if not isinstance(job.params.get("itemsPerGroup", 12), int):
            raise InvalidJob("Invalid params: itemsPerGroup must be an integer")
        return await done_handler(job)

    with connect(db_url) as c:
        bad = insert_course(c, "Bad", params={"itemsPerGroup": "many"})
        good = insert_course(c, "Good")
        media = insert_media(c)  # no handler registered for media in this test
    async with running_worker(settings(db_url), {"ai_course_jobs": handler}):
        row = await await_until(lambda: _with_status(db_url, bad, "dead_letter"))
        await await_until(lambda: _done(db_url, good))
        m = await await_until(lambda: _with_status(db_url, media, "dead_letter", "ai_media_jobs"))
    assert row["retry_count"] == 1 and "itemsPerGroup must be an integer" in row["error"]
    assert "No handler registered" in m["error"]


async def test_heartbeat_while_running_and_lost_job_is_cancelled(db_url: str) -> None:
    cancelled = asyncio.Event()

    async def handler(job: Job) -> Outcome:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("not reached")

    with connect(db_url) as c:
        jid = insert_course(c)
    async with running_worker(settings(db_url), {"ai_course_jobs": handler}) as w:
        first = await await_until(lambda: _with_status(db_url, jid, "processing"))
        later = await await_until(
            lambda: _beat_after(db_url, jid, first["last_heartbeat"]), what="a newer heartbeat"
        )
        assert later["last_heartbeat"] > first["last_heartbeat"]
        with connect(db_url) as c:  # an operator marks it stale: the worker must let go
            c.execute("select * from mark_stale_jobs('0 seconds')")
        await asyncio.wait_for(cancelled.wait(), 5)
        await await_until(lambda: _not_running(w, jid), what="job gone from running")
        assert (await _status(db_url, jid))["status"] == "stale"


async def _beat_after(db_url: str, jid: str, t: Any) -> Any:
    row = await _status(db_url, jid)
    return row if row["last_heartbeat"] > t else None


async def _not_running(w: Any, jid: str) -> bool:
    return uuid.UUID(jid) not in w.leases.running


async def test_polling_fallback_with_listen_disabled(db_url: str) -> None:
    """With LISTEN off, a job starts on the poll after its insert, never before: the
    handler records which poll it started under."""
    s = settings(db_url, sweep_interval_seconds=3600)
    polls_at_start: list[int] = []
    box: dict[str, Any] = {}

    async def handler(job: Job) -> Outcome:
        polls_at_start.append(box["w"].polls)
        return await done_handler(job)

    async with running_worker(s, {"ai_course_jobs": handler}, listen=False, poll_interval=1.0) as w:
        box["w"] = w
        await await_until(lambda: _polled(w, 1), what="a first poll")
        await await_until(lambda: _swept(w), what="the start-up sweep")
        with connect(db_url) as c:
            listening = await aconnect(db_url)  # hears what a listening worker would
            await listening.execute("listen ai_jobs")
            assert (
                c.execute(
                    "select count(*) from pg_stat_activity where datname = current_database()"
                    " and application_name = 'ai-jobs listener'"
                ).fetchone()["count"]
                == 0
            )  # the worker holds no LISTEN connection
            polls = w.polls
            jid = insert_course(c)
        async for _ in listening.notifies(timeout=5, stop_after=1):
            pass  # delivered: a listening worker would start the job now
        await listening.close()
        await await_until(lambda: _done(db_url, jid), what="done by polling")
        assert len(polls_at_start) == 1
        assert polls_at_start[0] > polls  # started by a poll that came after the insert


async def _swept(w: Any) -> bool:
    return bool(w.sweeps >= 1)


async def _swept_and_idle(w: Any) -> bool:
    return bool(w.sweeps >= 1 and not w.sweeping)


async def _polled(w: Any, n: int) -> bool:
    return bool(w.polls >= n)


async def test_sweeper_duties_return_counts(db_url: str) -> None:
    with connect(db_url) as c:
        stale = insert_course(c, status="processing", last_heartbeat=_ago(c, 600))
        insert_course(c, status="failed", retry_count=3)
        insert_course(c, status="done", completed_at=_ago(c, 100 * 86400))
    s = settings(db_url, stale_after_seconds=300)
    from listener import db

    pool = db.make_pool(db_url, 2)
    await pool.open()
    try:
        sw = Sweeper(pool, s)
        assert await sw.mark_stale() == 1
        assert await sw.rescue_stale() == 1
        assert await sw.dead_letter() == 1
        assert await sw.retention() == 1
        assert await sw.retention() == 0  # at most daily
        result = await sw.run_once()
        assert (result.stale, result.rescued, result.dead_lettered, result.purged) == (0, 0, 0, 0)
        assert result.due_in is not None and result.due_in <= 0  # the rescued job is due
    finally:
        await pool.close()
    with connect(db_url) as c:
        row = job(c, stale)
    assert row["status"] == "pending" and row["retry_count"] == 1


def _ago(c: Any, seconds: float) -> Any:
    return c.execute("select now() - make_interval(secs => %s) as t", [seconds]).fetchone()["t"]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("", {"sweep": True}),
        ("  ", {"sweep": True}),
        ("1b4e28ba-2fa1-11d2-883f-0016d3cca427", {"job_id": True}),
        (
            '{"table": "ai_media_jobs", "id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"}',
            {"table": "ai_media_jobs", "job_id": True},
        ),
        ('{"table": "ai_course_jobs", "count": 3}', {"table": "ai_course_jobs"}),
    ],
)
def test_parse_payload_accepts_the_documented_shapes(
    payload: str, expected: dict[str, Any]
) -> None:
    n = parse_payload(payload)
    assert n.sweep == expected.get("sweep", False)
    assert n.table == expected.get("table")
    assert (n.job_id is not None) == expected.get("job_id", False)


@pytest.mark.parametrize(
    "payload",
    [
        "garbage",
        "{",
        "[1,2]",
        '{"table": "users"}',
        '{"table": "ai_course_jobs", "id": 5}',
        '{"table": "ai_course_jobs", "id": "nope"}',
        "'; drop table ai_course_jobs; --",
    ],
)
def test_parse_payload_rejects_everything_else(payload: str) -> None:
    with pytest.raises(ValueError):
        parse_payload(payload)


async def test_a_burst_of_notifications_is_not_a_burst_of_queries(db_url: str) -> None:
    gate = asyncio.Event()

    async def handler(job: Job) -> Outcome:
        await gate.wait()
        return await done_handler(job)

    s = settings(db_url, worker_concurrency=2)
    async with running_worker(s, {"ai_course_jobs": handler}) as w:
        with connect(db_url) as c:
            insert_course(c, "first")
            insert_course(c, "second")
        await await_until(lambda: _count(db_url, "processing", 2), what="both slots busy")
        before, heard = w.claim_queries, w.notifications
        with connect(db_url) as c:  # 100 commits, 100 notifications, while no slot is free
            for i in range(100):
                insert_course(c, f"burst {i}")
        await await_until(lambda: _heard(w, heard + 100), what="all 100 notifications heard")
        assert w.claim_queries == before  # full: the notifications only set a flag
        gate.set()
        await await_until(lambda: _count(db_url, "done", 102), what="all done", timeout=20)
        # Each claim fills every free slot: about one query per two jobs, not per notification.
        assert w.claim_queries - before <= 102 // 2 + 10


async def _heard(w: Any, n: int) -> bool:
    return bool(w.notifications >= n)


async def _statuses(db_url: str) -> dict[str, int]:
    c = await aconnect(db_url)
    try:
        cur = await c.execute("select status, count(*) from ai_course_jobs group by status")
        return {r["status"]: r["count"] for r in await cur.fetchall()}
    finally:
        await c.close()


@contextlib.asynccontextmanager
async def _holding_ahead(
    db_url: str, **overrides: Any
) -> AsyncIterator[tuple[Any, list[str], asyncio.Event]]:
    """A worker with one slot, its one job blocked until `gate`, that has learnt
    that its jobs are short (so it claims ahead of its slot) and holds 4 more."""
    started: list[str] = []
    gate = asyncio.Event()

    async def handler(job: Job) -> Outcome:
        started.append(str(job.id))
        await gate.wait()
        return await done_handler(job)

    s = settings(db_url, worker_concurrency=1, **overrides)
    async with running_worker(s, {"ai_course_jobs": handler}) as w:
        with connect(db_url) as c:
            insert_course(c, "first")
        await await_until(lambda: _started(started, 1), what="the first job running")
        # Jobs (ROUNDS / 4 - 1) round trips long: 4 jobs ahead of the one slot.
        w.pacing.round_trip.value, w.pacing.job_time.value = 1.0, ROUNDS / 4 - 1
        assert w.pacing.ahead() == 4
        w.leases.ready.limit = 3600  # held for as long as the test needs
        with connect(db_url) as c:
            c.execute(
                "insert into ai_course_jobs (subject) select 's' || g from generate_series(1, 5) g"
            )
        await await_until(lambda: _ready(w, 4), what="4 jobs claimed ahead")
        assert await _statuses(db_url) == {"processing": 5, "pending": 1}
        # The start's sweeps over (on a loaded machine they can come this late; the
        # LISTEN connection's first start asks for one more, which may follow the
        # first at once): one now would rescue the jobs a test marks stale.
        await await_until(lambda: _swept_and_idle(w), what="the start's sweeps")
        yield w, started, gate


async def _started(started: list[str], n: int) -> bool:
    return len(started) == n


async def _ready(w: Any, n: int) -> bool:
    return len(w.leases.ready) == n


async def test_jobs_claimed_ahead_wait_for_a_slot_and_go_back_at_shutdown(db_url: str) -> None:
    async with _holding_ahead(db_url, shutdown_grace_seconds=30) as (w, started, gate):
        # Held jobs are heartbeated like the running one. Older than the check's
        # minute, younger than STALE_AFTER: the start's sweep, which a loaded
        # machine may run only now, must not take them for stale.
        with connect(db_url) as c:
            c.execute("update ai_course_jobs set last_heartbeat = now() - interval '2 minutes'")
        await await_until(lambda: _fresh_heartbeats(db_url, 5), what="5 fresh heartbeats")
        w.request_stop()
        # Given back at once, while the running job still has its grace period.
        await await_until(lambda: _statuses_are(db_url, {"processing": 1, "pending": 5}))
        assert len(started) == 1 and not w.leases.ready
        gate.set()  # the running job ends within its grace period
    assert await _statuses(db_url) == {"done": 1, "pending": 5}
    assert len(started) == 1  # no held job ever ran


async def _fresh_heartbeats(db_url: str, n: int) -> bool:
    c = await aconnect(db_url)
    try:
        cur = await c.execute(
            "select count(*) from ai_course_jobs where status = 'processing'"
            " and last_heartbeat > now() - interval '1 minute'"
        )
        row = await cur.fetchone()
        return bool(row and row["count"] == n)
    finally:
        await c.close()


async def _statuses_are(db_url: str, want: dict[str, int]) -> bool:
    return await _statuses(db_url) == want


async def test_a_held_job_marked_stale_is_dropped_not_run(db_url: str) -> None:
    async with _holding_ahead(db_url) as (w, started, gate):
        with connect(db_url) as c:  # an operator marks every running job stale
            stale = {str(r["job_id"]) for r in c.execute("select * from mark_stale_jobs('0 s')")}
        assert len(stale) == 5
        await await_until(lambda: _ready(w, 0), what="held jobs dropped")
        await await_until(lambda: _not_running(w, started[0]), what="running job cancelled")
        # The freed slot takes the job still pending, never one of the stale ones.
        await await_until(lambda: _started(started, 2), what="the pending job started")
        gate.set()
        await await_until(lambda: _statuses_are(db_url, {"stale": 5, "done": 1}))
        assert started[1] not in stale


async def test_jobs_held_too_long_go_back_for_an_idle_worker(db_url: str) -> None:
    async with _holding_ahead(db_url) as (w, started, gate):
        # Round trips of a millisecond: with its slot busy for seconds the worker
        # claims nothing more ahead, and what it holds goes back after the limit.
        w.pacing.round_trip.value = 0.001
        w.leases.ready.limit = 0.2
        w.request_sweep()  # any reason to look makes the loop read the new limit
        await await_until(lambda: _statuses_are(db_url, {"processing": 1, "pending": 5}))
        assert len(w.leases.ready) == 0 and len(started) == 1
        async with running_worker(settings(db_url), {"ai_course_jobs": done_handler}) as idle:
            await await_until(lambda: _statuses_are(db_url, {"processing": 1, "done": 5}))
        gate.set()
    c = await aconnect(db_url)
    try:
        cur = await c.execute(
            "select worker_id, retry_count from ai_course_jobs where subject <> 'first'"
        )
        rows = await cur.fetchall()
    finally:
        await c.close()
    assert {r["worker_id"] for r in rows} == {idle.id}  # ran once each, by the idle worker
    assert {r["retry_count"] for r in rows} == {0}  # giving back is not a failed attempt
    assert len(started) == 1


async def test_the_database_back_ends_the_claim_loops_backoff_at_once(db_url: str) -> None:
    # Claims failed for a while (a link down), so the claim loop sleeps in its
    # backoff, seconds at its cap; the LISTEN connection survived, so no reconnect
    # wakes it. The first query of any duty that answers again wakes it: the
    # job waiting since the outage starts at once, and the LISTEN connection is
    # pinged (it may be waiting on TCP's retransmission).
    import psycopg

    started = asyncio.Event()

    async def handler(job: Job) -> Outcome:
        started.set()
        return await done_handler(job)

    failures = 0
    async with running_worker(settings(db_url), {"ai_course_jobs": handler}) as w:
        claim = w.completer.claim

        async def failing(params: Any) -> Any:
            nonlocal failures
            failures += 1
            raise psycopg.OperationalError("server closed the connection unexpectedly")

        w.completer.claim = failing  # type: ignore[method-assign]
        with connect(db_url) as c:
            insert_course(c, "Geometry")
        await await_until(lambda: _true(lambda: failures >= 6), timeout=20, what="6 failures")
        w.completer.claim = claim  # type: ignore[method-assign]
        pinged = w.listener.service._pinged_at
        w.db_health.up()  # a duty's query answered: the database is back
        await asyncio.wait_for(started.wait(), 1.5)  # not the backoff's 2.5-5 s
        await await_until(lambda: _true(lambda: w.listener.service._pinged_at > pinged))


async def _true(check: Any) -> bool:
    return bool(check())
