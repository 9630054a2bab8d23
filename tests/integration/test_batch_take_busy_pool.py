"""A job starting while every pool connection is in use (hundreds of jobs started
at once) waits for one: the batch door's read (ai_job_batch_take) never turns a
busy pool into the job's failed attempt; and a job whose claim says it asked
for no batch (sql/031) does not make that read at all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.batches import collect
from listener.errors import HandedOff
from listener.jobs import Job, Outcome

Pool = AsyncConnectionPool[Any]


@pytest.fixture
async def one(db_url: str) -> AsyncIterator[Pool]:
    """A pool of one connection that waits 0.2 s for it."""
    pool: Pool = AsyncConnectionPool(
        db_url,
        min_size=1,
        max_size=1,
        timeout=0.2,
        open=False,
        kwargs={"autocommit": True, "row_factory": dict_row},
    )
    await pool.open(wait=True)
    try:
        yield pool
    finally:
        await pool.close()


async def claimed(db_url: str, pool: Pool, rows: str) -> dict[str, Job]:
    """Insert `rows` (values of subject, batch) and claim them all, by subject."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as c:
        await c.execute(f"insert into ai_course_jobs (subject, batch) values {rows}")
    got = await dal.CLAIM_JOBS.all(pool, {"table": "ai_course_jobs", "worker": "w", "n": 10})
    return {r["job"]["subject"]: Job.from_claim(r) for r in got}


def router(pool: Pool, ran: list[Job]) -> collect.BatchRouter:
    async def direct(job: Job) -> Outcome:
        ran.append(job)
        return Outcome(result_path="courses/x/course.json", metrics={})

    r = collect.BatchRouter(pool, direct, lambda name: None, 30.0)
    r.enabled, r.worker_id = True, "w"
    return r


async def test_a_busy_pool_is_waited_out_not_a_failure(db_url: str, one: Pool) -> None:
    jobs = await claimed(db_url, one, "('Busy pools', true)")
    ran: list[Job] = []
    held = asyncio.Event()

    async def hold() -> None:
        async with one.connection():
            held.set()
            await asyncio.sleep(1.0)  # five of the pool's timeouts

    holder = asyncio.create_task(hold())
    await held.wait()
    with pytest.raises(HandedOff):  # in a collecting batch, once the pool had room
        await router(one, ran)(jobs["Busy pools"])
    await holder
    assert ran == []
    async with await psycopg.AsyncConnection.connect(db_url) as c:
        cur = await c.execute("select count(*) from ai_job_batch_items")
        assert await cur.fetchone() == (1,)


async def test_a_job_claimed_without_batch_never_asks_the_batch_door(
    db_url: str, one: Pool
) -> None:
    """A job that asked for no batch goes straight to its handler, without a round
    trip, even when the pool has no connection to spare; one that did asks
    ai_job_batch_take."""
    jobs = await claimed(db_url, one, "('Direct', false), ('Later', true)")
    assert {s: j.row["batch"] for s, j in jobs.items()} == {"Direct": False, "Later": True}
    ran: list[Job] = []
    door = router(one, ran)
    async with one.connection():  # the pool's only connection, held throughout
        await asyncio.wait_for(door(jobs["Direct"]), 0.15)  # under the pool's timeout
        assert ran == [jobs["Direct"]]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(door(jobs["Later"]), 0.5)  # it waits for the pool
