"""procrastinate with its PsycopgConnector, the worker at concurrency=10 and
listen_notify=True (its defaults otherwise: jobs kept after success, as in
production). One task, no-op."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
from procrastinate import App, JobContext, PsycopgConnector
from psycopg.rows import dict_row

from bench.queries import sql

LABEL = "procrastinate"


def make_app(url: str, rec: Any = None) -> App:
    app = App(connector=PsycopgConnector(conninfo=url))

    @app.task(name="bench", pass_context=True)
    async def bench(context: JobContext) -> None:
        if rec is not None:
            assert context.job.id is not None
            rec.hit(str(context.job.id))

    return app


async def prepare(url: str) -> None:
    app = make_app(url)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


class Enqueuer:
    def __init__(self, app: App) -> None:
        self.app = app
        self.task = app.tasks["bench"]

    async def one(self) -> str:
        return str(await self.task.defer_async())

    async def close(self) -> None:
        await self.app.close_async()


async def open_enqueuer(url: str) -> Enqueuer:
    app = make_app(url)
    await app.open_async()
    return Enqueuer(app)


async def enqueue_bulk(url: str, n: int) -> None:
    app = make_app(url)
    async with app.open_async():
        task = app.tasks["bench"]
        for start in range(0, n, 2000):
            await task.batch_defer_async(*({} for _ in range(min(2000, n - start))))


async def remaining(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as conn:
        row = await (await conn.execute(sql("procrastinate_remaining"))).fetchone()
        return int(row["n"]) if row else 0


@contextlib.asynccontextmanager
async def worker(
    opts: argparse.Namespace, rec: Any
) -> AsyncIterator[Callable[[Any], Awaitable[None]]]:
    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    app = make_app(opts.url, rec)

    async def run(stop: asyncio.Event) -> None:
        task = asyncio.create_task(
            app.run_worker_async(
                concurrency=opts.concurrency, listen_notify=True, install_signal_handlers=False
            )
        )
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async with app.open_async():
        yield run
