"""The lease keeper on its own, against a real database: heartbeats for every
held job, a job whose claim was taken away is stopped or dropped, a cancel is
confirmed by the database before anything stops, release gives jobs back to
pending without counting an attempt."""

from __future__ import annotations

import asyncio
from typing import Any

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
