"""The floor: what PostgreSQL itself allows on our schema, with no queue library.

latency: a bare psycopg listener (LISTEN ai_jobs on one connection) that claims
each notified row with one UPDATE on a second connection;
drain: claim 100 rows with one UPDATE ... FOR UPDATE SKIP LOCKED, then mark them
done with one UPDATE, on one connection, until the expected count is reached."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg

from bench.queries import sql
from bench.systems import ai_jobs

LABEL = "floor (bare SQL)"
BATCH = 100
prepare = ai_jobs.prepare
open_enqueuer = ai_jobs.open_enqueuer
enqueue_bulk = ai_jobs.enqueue_bulk
remaining = ai_jobs.remaining


def _listen(
    listen: psycopg.Connection[Any], work: psycopg.Connection[Any], rec: Any, halt: threading.Event
) -> None:
    with listen, work:
        claim = sql("floor_claim_one")
        while not halt.is_set():
            for n in listen.notifies(timeout=0.1):
                try:
                    job_id = json.loads(n.payload)["id"]
                except (ValueError, KeyError, TypeError):
                    continue
                if work.execute(claim, {"id": job_id}).fetchone():
                    rec.hit(str(job_id))


def _drain(conn: psycopg.Connection[Any], rec: Any, halt: threading.Event) -> None:
    with conn:
        claim, finish = sql("floor_claim_batch"), sql("floor_finish_batch")
        while not halt.is_set():
            ids = [r[0] for r in conn.execute(claim, {"n": BATCH}).fetchall()]
            for i in ids:
                rec.hit(str(i))
            if ids:
                conn.execute(finish, {"ids": ids})


@contextlib.asynccontextmanager
async def worker(
    opts: argparse.Namespace, rec: Any
) -> AsyncIterator[Callable[[Any], Awaitable[None]]]:
    halt = threading.Event()
    # Connected, and listening, before "ready": a job inserted after that is seen.
    if opts.mode == "latency":
        listen = psycopg.connect(opts.url, autocommit=True)
        listen.execute(sql("floor_listen"))
        work = psycopg.connect(opts.url, autocommit=True)
        target: Any = functools.partial(_listen, listen, work, rec, halt)
    else:
        target = functools.partial(_drain, psycopg.connect(opts.url, autocommit=True), rec, halt)

    async def run(stop: asyncio.Event) -> None:
        fut = asyncio.ensure_future(asyncio.to_thread(target))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({fut, stopper}, return_when=asyncio.FIRST_COMPLETED)
        halt.set()
        stopper.cancel()
        await fut

    yield run
