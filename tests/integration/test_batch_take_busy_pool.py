"""A job starting while every pool connection is in use (hundreds of jobs started
at once) waits for one: the batch door's read (ai_job_batch_take) never turns a
busy pool into the job's failed attempt."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.batches import collect
from listener.jobs import Job, Outcome


async def test_a_busy_pool_is_waited_out_not_a_failure(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as c:
        await c.execute("insert into ai_course_jobs (subject) values ('Busy pools')")
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        db_url,
        min_size=1,
        max_size=1,
        timeout=0.2,
        open=False,
        kwargs={"autocommit": True, "row_factory": dict_row},
    )
    await pool.open(wait=True)
    ran: list[Job] = []

    async def direct(job: Job) -> Outcome:
        ran.append(job)
        return Outcome(result_path="courses/x/course.json", metrics={})

    try:
        rows = await dal.CLAIM_JOBS.all(
            pool, {"table": "ai_course_jobs", "worker": "busy-pool", "n": 1}
        )
        job = Job.from_claim(rows[0])
        router = collect.BatchRouter(pool, direct, lambda name: None, 30.0)
        router.enabled, router.worker_id = True, "busy-pool"
        held = asyncio.Event()

        async def hold() -> None:
            async with pool.connection():
                held.set()
                await asyncio.sleep(1.0)  # five of the pool's timeouts

        holder = asyncio.create_task(hold())
        await held.wait()
        outcome = await router(job)
        await holder
        assert ran == [job]
        assert outcome.result_path == "courses/x/course.json"
    finally:
        await pool.close()


async def test_a_job_claimed_without_batch_never_asks_the_batch_door(db_url: str) -> None:
    """Every claim path says whether the job asked for a batch (sql/031): a job
    that did not goes straight to its handler, without a round trip, even when
    the pool has no connection to spare; one that did asks ai_job_batch_take."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as c:
        await c.execute(
            "insert into ai_course_jobs (subject, batch) values ('Direct', false), ('Later', true)"
        )
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        db_url,
        min_size=1,
        max_size=1,
        timeout=0.2,
        open=False,
        kwargs={"autocommit": True, "row_factory": dict_row},
    )
    await pool.open(wait=True)
    ran: list[Job] = []

    async def direct(job: Job) -> Outcome:
        ran.append(job)
        return Outcome(result_path=None, metrics={})

    try:
        rows = await dal.CLAIM_JOBS.all(
            pool, {"table": "ai_course_jobs", "worker": "claims", "n": 2}
        )
        jobs = {r["job"]["subject"]: Job.from_claim(r) for r in rows}
        assert {s: j.row["batch"] for s, j in jobs.items()} == {"Direct": False, "Later": True}
        router = collect.BatchRouter(pool, direct, lambda name: None, 30.0)
        router.enabled, router.worker_id = True, "claims"
        async with pool.connection():  # the pool's only connection, held throughout
            await asyncio.wait_for(router(jobs["Direct"]), 0.15)  # under the pool's timeout
            assert ran == [jobs["Direct"]]
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(router(jobs["Later"]), 0.5)  # it waits for the pool
    finally:
        await pool.close()
