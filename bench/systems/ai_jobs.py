"""This project: listener.worker.Worker with a no-op handler for ai_course_jobs,
WORKER_CONCURRENCY=10, logs at WARNING, the pool and wiring of `ai-jobs worker`
(listener.app.run_worker)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench.queries import sql

LABEL = "ai-jobs"


async def prepare(url: str) -> None:
    from listener.migrate import migrate

    await migrate(url)


class Enqueuer:
    def __init__(self, conn: psycopg.AsyncConnection[dict[str, Any]]) -> None:
        self.conn = conn
        self.n = 0

    async def one(self) -> str:
        self.n += 1
        cur = await self.conn.execute(sql("ours_enqueue_one"), {"subject": f"bench {self.n}"})
        row = await cur.fetchone()
        assert row is not None
        return str(row["id"])

    async def close(self) -> None:
        await self.conn.close()


async def open_enqueuer(url: str) -> Enqueuer:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row)
    return Enqueuer(conn)


async def enqueue_bulk(url: str, n: int) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(sql("ours_enqueue_bulk"), {"n": n})


async def remaining(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as conn:
        row = await (await conn.execute(sql("ours_remaining"))).fetchone()
        return int(row["n"]) if row else 0


def settings_for(opts: argparse.Namespace, **extra: Any) -> Any:
    from listener.settings import Settings

    return Settings(
        database_url=opts.url,
        worker_concurrency=opts.concurrency,
        log_level="WARNING",
        **extra,
    )


@contextlib.asynccontextmanager
async def worker(
    opts: argparse.Namespace, rec: Any, full: bool = False
) -> AsyncIterator[Callable[[Any], Awaitable[None]]]:
    import asyncio

    from listener import app, db, logs
    from listener.handlers import create_runtime
    from listener.jobs import Job, Outcome
    from listener.worker import Worker

    extra: dict[str, Any] = {}
    if full:
        extra = {"allow_placeholder": True, "storage_url": opts.storage}
    settings = settings_for(opts, **extra)
    logs.setup(settings.log_format, settings.log_level)
    pool = db.make_pool(opts.url, app.pool_size(settings))
    await pool.open(wait=True)
    runtime = await create_runtime(settings, pool)
    periodic: list[Any] = []
    if full:
        real = runtime.handlers["ai_course_jobs"]

        async def handler(job: Job) -> Outcome:
            rec.hit(str(job.id))
            return await real(job)

        periodic = [(app.RUNTIME_TICK_SECONDS, runtime.tick, "handlers tick")]
    else:

        async def handler(job: Job) -> Outcome:
            rec.hit(str(job.id))
            return Outcome(None, {})

    w = Worker(settings, pool, {"ai_course_jobs": handler}, dsn=opts.url, periodic=periodic)

    async def run(stop: asyncio.Event) -> None:
        task = asyncio.create_task(w.run())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        w.request_stop()
        stopper.cancel()
        await task

    try:
        yield run
    finally:
        await runtime.aclose()
        await pool.close()
