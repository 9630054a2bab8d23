"""The lease keeper on its own, against a real database: heartbeats for every
held job, a job whose claim was taken away is stopped or dropped, a cancel is
confirmed by the database before anything stops, release gives jobs back to
pending without counting an attempt."""

from __future__ import annotations

import asyncio
from typing import Any

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal, db
from listener.jobs import Job, Outcome
from listener.leases import LeaseKeeper
from listener.outage import AwayRetry, Health
from tests.helpers import await_until, connect, insert_course, insert_media, job


class Reports:
    def __init__(self) -> None:
        self.seen: list[tuple[str, BaseException]] = []

    def __call__(self, exc: BaseException, what: str) -> None:
        self.seen.append((what, exc))


def keeper(pool: AsyncConnectionPool[Any], reports: Reports | None = None) -> LeaseKeeper:
    retry = AwayRetry(Health("database"), base=0.01, cap=0.05)
    return LeaseKeeper(pool, 3600, retry=retry, report=reports or Reports())


async def claim(pool: AsyncConnectionPool[Any], n: int, table: str = "ai_course_jobs") -> list[Job]:
    rows = await dal.CLAIM_JOBS.all(pool, {"table": table, "worker": "lease-test", "n": n})
    return [Job.from_claim(r) for r in rows]


def running(leases: LeaseKeeper, j: Job) -> asyncio.Task[Outcome | None]:
    async def forever() -> Outcome | None:
        await asyncio.sleep(3600)
        return None

    task = asyncio.create_task(forever())
    leases.track(j, task)
    return task


async def test_a_beat_refreshes_every_held_job_and_drops_the_lost(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    with connect(db_url) as c:
        for n in range(3):
            insert_course(c, f"held {n}")
        c.execute("update ai_course_jobs set last_heartbeat = now() - interval '1 hour'")
    first, second, third = await claim(pool, 3)
    with connect(db_url) as c:
        c.execute("update ai_course_jobs set last_heartbeat = now() - interval '1 hour'")
    leases = keeper(pool)
    task = running(leases, first)
    leases.ready.add([second, third])
    with connect(db_url) as c:  # an operator marks two of them stale
        c.execute(
            "update ai_course_jobs set status = 'stale' where id = any(%s)",
            [[first.id, third.id]],
        )
    await leases.beat()
    with connect(db_url) as c:
        beaten = job(c, str(second.id))["last_heartbeat"]
        before = job(c, str(first.id))["last_heartbeat"]
    assert (beaten - before).total_seconds() > 3000  # refreshed; the stale one was not
    assert [j.id for j in leases.ready.jobs()] == [second.id]  # dropped, never to start
    await asyncio.sleep(0)
    assert task.cancelled() or task.cancelling()  # stopped: it may run elsewhere now


async def test_a_beat_costs_a_statement_per_table_however_many_jobs_are_held(
    db_url: str, pool: AsyncConnectionPool[Any], monkeypatch: Any
) -> None:
    """Issue 22's bounded cost: a worker holding 100 calls beats them in as many
    statements as one holding 2, one a table."""
    sent: list[int] = []
    beat_jobs = dal.HEARTBEAT_JOBS

    class Counted:
        async def all(self, target: Any, params: Any) -> Any:
            sent.append(len(params["ids"]))
            return await beat_jobs.all(target, params)

    monkeypatch.setattr(dal, "HEARTBEAT_JOBS", Counted())
    for n in (1, 50):
        with connect(db_url) as c:
            c.execute("delete from ai_course_jobs; delete from ai_media_jobs")
            for i in range(n):
                insert_course(c, f"beat {i}")
                insert_media(c, f"beat {i}")
        held = await claim(pool, n) + await claim(pool, n, "ai_media_jobs")
        assert len(held) == 2 * n
        with connect(db_url) as c:
            for table in ("ai_course_jobs", "ai_media_jobs"):
                c.execute(f"update {table} set last_heartbeat = now() - interval '1 hour'")
        leases = keeper(pool)
        tasks = [running(leases, j) for j in held]
        sent.clear()
        await leases.beat()
        assert sorted(sent) == [n, n]  # two statements, each naming a table's jobs
        with connect(db_url) as c:
            old = c.execute(
                "select count(*) as n from (select last_heartbeat from ai_course_jobs"
                " union all select last_heartbeat from ai_media_jobs) h"
                " where last_heartbeat < now() - interval '1 minute'"
            ).fetchone()
        assert old is not None and old["n"] == 0  # every one refreshed
        for t in tasks:
            t.cancel()


async def test_release_gives_jobs_back_without_counting_an_attempt(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    with connect(db_url) as c:
        ids = [insert_course(c, f"back {n}") for n in range(2)]
    jobs = await claim(pool, 2)
    leases = keeper(pool)
    assert await leases.release(jobs, "unfinished") == []
    with connect(db_url) as c:
        rows = [job(c, i) for i in ids]
    assert [(r["status"], r["retry_count"], r["claim_token"]) for r in rows] == [
        ("pending", 0, None)
    ] * 2


async def test_release_without_retry_keeps_what_it_could_not_write(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    with connect(db_url) as c:
        insert_course(c, "kept")
        insert_media(c, "kept too")
    jobs = await claim(pool, 1) + await claim(pool, 1, "ai_media_jobs")
    reports = Reports()
    leases = keeper(pool, reports)
    await pool.close()  # the database is out of reach
    assert await leases.release(jobs, "held", retry=False) == jobs  # each table's
    assert [what for what, _ in reports.seen] == ["release", "release"]
    assert all(isinstance(exc, Exception) for _, exc in reports.seen)


async def test_release_retries_by_default_while_the_database_is_busy(db_url: str) -> None:
    # The shutdown's release of unfinished jobs (and the release of a claim
    # whose commit was lost) must land: it retries while the database is busy
    # (here: the table locked, each try giving up after lock_timeout).
    pool = db.make_pool(f"{db_url} options='-c lock_timeout=100'", 2)
    await pool.open(wait=True)
    try:
        with connect(db_url) as c:
            jid = insert_course(c, "released once the lock goes")
        jobs = await claim(pool, 1)
        leases = keeper(pool)
        with connect(db_url) as blocker:
            with blocker.transaction():
                blocker.execute("lock table ai_course_jobs in exclusive mode")
                release = asyncio.create_task(leases.release(jobs, "unfinished"))

                async def tried() -> bool:
                    return release.done() or leases.retry.health.state is not None  # type: ignore[attr-defined]

                await await_until(tried, what="a try refused by the lock")
                assert not release.done()  # retrying, not given up
            assert await asyncio.wait_for(release, 10) == []
        with connect(db_url) as c:
            assert job(c, jid)["status"] == "pending"
    finally:
        await pool.close()


async def test_a_beat_that_fails_for_one_table_still_beats_the_other(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    with connect(db_url) as c:
        insert_course(c, "course")
        media = insert_media(c, "media")
        c.execute("update ai_media_jobs set last_heartbeat = now() - interval '1 hour'")
    held = await claim(pool, 1) + await claim(pool, 1, "ai_media_jobs")
    with connect(db_url) as c:
        c.execute("update ai_media_jobs set last_heartbeat = now() - interval '1 hour'")
        before = job(c, media, "ai_media_jobs")["last_heartbeat"]
    reports = Reports()
    leases = keeper(pool, reports)
    leases.ready.add(held)
    with connect(db_url) as c:  # the course table's heartbeat fails (the table is gone)
        c.execute("alter table ai_course_jobs rename to ai_course_jobs_away")
        try:
            await leases.beat()
        finally:
            c.execute("alter table ai_course_jobs_away rename to ai_course_jobs")
        assert job(c, media, "ai_media_jobs")["last_heartbeat"] > before
    assert [what for what, _ in reports.seen] == ["heartbeat"]
    assert isinstance(reports.seen[0][1], Exception)
    assert len(leases.ready) == 2  # a failed beat drops nothing


async def test_a_cancel_stops_a_job_only_once_the_database_confirms_it(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    with connect(db_url) as c:
        insert_course(c, "to cancel")
        insert_course(c, "forged")
    cancelled, forged = await claim(pool, 2)
    leases = keeper(pool)
    tasks = {j.id: running(leases, j) for j in (cancelled, forged)}
    with connect(db_url) as c:
        c.execute("select cancel_job(%s, 'ai_course_jobs')", [cancelled.id])
    leases.check_cancel(cancelled.id)
    leases.check_cancel(forged.id)  # a NOTIFY anyone could send: the database says no
    leases.check_cancel(forged.id)  # already being checked: one check
    assert len(leases.cancel_checks) == 2
    await asyncio.gather(*leases.cancel_checks.values())
    await asyncio.sleep(0)
    assert tasks[cancelled.id].cancelled() or tasks[cancelled.id].cancelling()
    assert not tasks[forged.id].done()
    tasks[forged.id].cancel()


async def test_a_job_being_cancelled_is_not_dropped_again_by_the_heartbeat(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    """cancel_job took the claim; the job's task is still ending (its handler
    closing a stream) when the next beat finds the job no longer held. The
    cancel says why it ended; the beat adds no "job lost" (nor, with tracing
    on, turns the attempt's outcome from cancelled to released)."""
    with connect(db_url) as c:
        insert_course(c, "to cancel")
    (j,) = await claim(pool, 1)
    leases = keeper(pool)
    ending = asyncio.Event()

    async def slow_to_stop() -> Outcome | None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await ending.wait()
            raise
        return None

    task = asyncio.create_task(slow_to_stop())
    leases.track(j, task)
    actions: list[str] = []
    sink = logger.add(lambda m: actions.append(m.record["extra"].get("action", "")))
    try:
        with connect(db_url) as c:
            c.execute("select cancel_job(%s, 'ai_course_jobs')", [j.id])
        leases.check_cancel(j.id)
        await asyncio.gather(*leases.cancel_checks.values())
        await asyncio.sleep(0)
        assert task.cancelling() and not task.done()
        await leases.beat()  # the job is no longer held: the cancel already said so
    finally:
        logger.remove(sink)
        ending.set()
        await asyncio.gather(task, return_exceptions=True)
    assert actions.count("job_cancelled") == 1
    assert "job_lost" not in actions


async def test_a_job_lost_during_a_calls_timeout_is_still_stopped(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    """A provider call's timeout cancels the job's task too (asyncio.timeout),
    and takes the cancel back when it turns into TimeoutError: a job found lost
    meanwhile is stopped all the same, not left to go on to the next provider."""
    with connect(db_url) as c:
        insert_course(c, "timing out")
    (j,) = await claim(pool, 1)
    leases = keeper(pool)
    cleaning = asyncio.Event()
    cleaned = asyncio.Event()

    async def timing_out() -> Outcome | None:
        try:
            async with asyncio.timeout(0.01):
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    cleaning.set()
                    await cleaned.wait()  # the stream closing
                    raise
        except TimeoutError:
            await asyncio.sleep(3600)  # the next provider: must not happen
        return None

    task = asyncio.create_task(timing_out())
    leases.track(j, task)
    await asyncio.wait_for(cleaning.wait(), 5)
    assert task.cancelling()  # the timeout's
    leases.stop_job(j.id, "job_lost", "lost")
    cleaned.set()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()


async def test_a_job_whose_failure_is_being_written_is_not_dropped_by_the_heartbeat(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    """fail_job took the claim (the job went to the dead letter) while its task
    still awaits the write's answer: the next beat finds the job no longer held,
    and stops nothing (the failure says how it ended: no "job lost", and with
    tracing on the attempt's outcome stays the dead letter, not released)."""
    with connect(db_url) as c:
        insert_course(c, "failing")
    (j,) = await claim(pool, 1)
    leases = keeper(pool)
    task = running(leases, j)
    leases.ending(j)
    actions: list[str] = []
    sink = logger.add(lambda m: actions.append(m.record["extra"].get("action", "")))
    try:
        with connect(db_url) as c:
            c.execute("update ai_course_jobs set status = 'dead_letter' where id = %s", [j.id])
        await leases.beat()
        await asyncio.sleep(0)
        assert not task.cancelled() and not task.cancelling()
    finally:
        logger.remove(sink)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert "job_lost" not in actions
