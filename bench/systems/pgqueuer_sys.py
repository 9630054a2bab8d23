"""pgqueuer, configured as its documentation recommends for throughput: the
asyncpg driver ("roughly double the throughput of psycopg"), uvloop (what its
command line runs on), QueueManager.run(batch_size=10) as in its own benchmark
tool; LISTEN/NOTIFY is always on in pgqueuer. One entrypoint, no-op."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any, TypeVar

import asyncpg
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries

from bench.queries import sql

LABEL = "pgqueuer"
ENTRYPOINT = "bench"
BATCH_SIZE = 10
T = TypeVar("T")


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    import uvloop

    return uvloop.run(coro)


def _dsn(url: str) -> str:
    # asyncpg takes a URI; a conninfo string ("host=... dbname=...") is turned into one.
    if "://" in url:
        return url
    from psycopg.conninfo import conninfo_to_dict

    p = conninfo_to_dict(url)
    host = p.get("host", "")
    user = p.get("user", "postgres")
    port = p.get("port", "5432")
    db = p.get("dbname", "postgres")
    if str(host).startswith("/"):
        return f"postgresql://{user}@/{db}?host={host}&port={port}"
    pw = f":{p['password']}" if p.get("password") else ""
    return f"postgresql://{user}{pw}@{host}:{port}/{db}"


async def prepare(url: str) -> None:
    conn = await asyncpg.connect(_dsn(url))
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()


class Enqueuer:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.queries = Queries(AsyncpgDriver(conn))

    async def one(self) -> str:
        ids = await self.queries.enqueue(ENTRYPOINT, None)
        return str(ids[0])

    async def close(self) -> None:
        await self.conn.close()


async def open_enqueuer(url: str) -> Enqueuer:
    return Enqueuer(await asyncpg.connect(_dsn(url)))


async def enqueue_bulk(url: str, n: int) -> None:
    conn = await asyncpg.connect(_dsn(url))
    try:
        q = Queries(AsyncpgDriver(conn))
        for start in range(0, n, 5000):
            k = min(5000, n - start)
            await q.enqueue([ENTRYPOINT] * k, [None] * k, [0] * k)
    finally:
        await conn.close()


async def remaining(url: str) -> int:
    conn = await asyncpg.connect(_dsn(url))
    try:
        return int(await conn.fetchval(sql("pgqueuer_remaining")))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def worker(
    opts: argparse.Namespace, rec: Any
) -> AsyncIterator[Callable[[Any], Awaitable[None]]]:
    import logging

    logging.getLogger("pgqueuer").setLevel(logging.WARNING)
    conn = await asyncpg.connect(_dsn(opts.url))
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint(ENTRYPOINT)
    async def handler(job: Job) -> None:
        rec.hit(str(job.id))

    async def run(stop: asyncio.Event) -> None:
        task = asyncio.create_task(
            qm.run(batch_size=BATCH_SIZE, dequeue_timeout=timedelta(seconds=30))
        )
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        qm.shutdown.set()
        stopper.cancel()
        await task

    try:
        yield run
    finally:
        await conn.close()
