"""This project: listener.worker.Worker with a no-op handler for ai_course_jobs,
WORKER_CONCURRENCY=10, logs at WARNING, the pool and wiring of `ai-jobs worker`
(listener.app.run_worker)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
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
    """The worker exactly as `ai-jobs worker` builds it (listener.app.open_worker:
    pool, handlers runtime, periodic duties), with the course handler wrapped to
    stamp its start, or replaced by a no-op."""
    from listener import app, logs
    from listener.jobs import Job, Outcome

    extra: dict[str, Any] = {}
    if full:
        extra = {"allow_placeholder": True, "storage_url": opts.storage}
    settings = settings_for(opts, **extra)
    logs.setup(settings.log_format, settings.log_level, settings.secrets())
    async with app.open_worker(settings) as w:
        real = w.handlers["ai_course_jobs"]

        async def handler(job: Job) -> Outcome:
            rec.hit(str(job.id))
            return await real(job) if full else Outcome(None, {})

        w.handlers = {**w.handlers, "ai_course_jobs": handler}
        await w.pool.wait()  # connected before "ready"

        async def run(stop: asyncio.Event) -> None:
            task = asyncio.create_task(w.run())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            w.request_stop()
            stopper.cancel()
            await task
            catalog, cache = getattr(real, "catalog", None), getattr(real, "cache", None)
            if full and catalog is not None and cache is not None:  # where commits went
                counts = {
                    "saves": catalog.saves,
                    "lookups": cache.lookups,
                    "renders": catalog.renderer.renders,
                    "claims": w.claim_queries,
                }
                print(f"pipeline-stats {json.dumps(counts)}", file=sys.stderr, flush=True)

        yield run
