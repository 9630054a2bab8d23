"""Batched completion writes (River's batch completer). A finished job frees its
slot at once; its `done` row is written with the others that finished meanwhile,
one complete_jobs() call per table, while the next claims already run, or by the
worker's next claim of its table (`claim`: complete_and_claim, one commit for
both). Writes that fail on a lost connection are retried until the database is
back.

A finished course's catalog row rides with its completion, in the same
transaction, whether the completer or a claim (complete_and_claim) writes it
(catalog.complete_with_rows). A job is never `done` without its row.

A result staged because its public path was taken (listener/results.py) is
published once its completion has committed, and discarded if the completion
was refused (the claim was no longer this attempt's)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar
from uuid import UUID

from loguru import logger
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.catalog import CatalogEntry, complete_with_rows
from listener.jobs import Job, Outcome
from listener.results import settle
from listener.rows import ClaimedRow

T = TypeVar("T")
R = TypeVar("R")
MAX_BATCH = 1000
# A finished job waits this long for more to share its round trip and commit,
# or for the worker's next claim to carry it (complete_and_claim): short next
# to a generation, long next to a claim round trip.
GATHER_SECONDS = 0.005
Retry = Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]


class Completer:
    def __init__(self, pool: AsyncConnectionPool, retry: Retry[Any], backlog: int) -> None:
        self.pool = pool
        self.retry = retry
        self.backlog = backlog  # finished jobs waiting for their write before add() waits
        self._pending: list[tuple[Job, Outcome]] = []
        self._since = 0.0  # monotonic time of the oldest pending item
        self._more = asyncio.Event()
        self._written = asyncio.Condition()
        self._in_flight = 0
        self._settling: set[asyncio.Task[None]] = set()  # staged results on their way
        self.on_written: Callable[[], None] | None = None  # ends written (the producer)

    @property
    def waiting(self) -> int:
        return len(self._pending) + self._in_flight

    async def add(self, job: Job, outcome: Outcome) -> None:
        if not self._pending:
            self._since = time.monotonic()
        self._pending.append((job, outcome))
        self._more.set()
        if self.waiting > self.backlog:  # back-pressure while the database lags
            async with self._written:
                await self._written.wait_for(lambda: self.waiting <= self.backlog)

    async def run(self) -> None:
        while True:
            await self._more.wait()
            self._more.clear()
            await self._gathered()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self._in_flight += len(batch)
                try:
                    await self.retry(lambda b=batch: self._write(b))  # type: ignore[misc]
                except Exception as exc:
                    logger.bind(action="completion_lost", jobs=len(batch)).error(
                        f"could not record {len(batch)} finished job(s) ({exc}); they will be "
                        "marked stale and run again"
                    )
                finally:
                    self._in_flight -= len(batch)
                    async with self._written:
                        self._written.notify_all()

    async def _gathered(self) -> None:
        """Until the oldest pending item is GATHER_SECONDS old; a claim that takes
        the items meanwhile restarts the clock."""
        while self._pending:
            wait = self._since + GATHER_SECONDS - time.monotonic()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def claim(self, params: dict[str, Any]) -> list[ClaimedRow]:
        """claim_jobs(`params`), with the table's finished jobs riding along
        (complete_and_claim): their `done` writes and the claim in one commit.
        Raises as the claim does; the finished jobs then wait for their write
        again."""
        table = params["table"]
        done = self._take(table)
        if not done:
            return await dal.CLAIM_JOBS.all(self.pool, params)
        try:
            both = await complete_with_rows(
                self.pool,
                dal.COMPLETE_AND_CLAIM,
                params | completion_params(table, done),
                riders(done),
            )
        except Exception:
            await self._settle(done, None)
            raise
        await self._settle(done, [r["id"] for r in both if r["kind"] == "done"])
        self._told()
        return [r for r in both if r["kind"] == "claimed"]

    def _told(self) -> None:
        if self.on_written is not None:
            self.on_written()

    def _take(self, table: str) -> list[tuple[Job, Outcome]]:
        """Hand one table's finished jobs to a claim that writes them in its own
        transaction (complete_and_claim); _settle() must follow."""
        mine = [item for item in self._pending if item[0].table == table]
        if mine:
            self._pending = [item for item in self._pending if item[0].table != table]
            self._in_flight += len(mine)
        return mine

    async def _settle(
        self, items: list[tuple[Job, Outcome]], written: Collection[UUID] | None
    ) -> None:
        """The claim that took `items` ended: the ids it wrote, or None if it
        failed (the items go back to be written again)."""
        self._in_flight -= len(items)
        if written is None:
            if not self._pending:
                self._since = time.monotonic()
            self._pending[:0] = items
            self._more.set()
        else:
            self._ended(items, written)
        async with self._written:
            self._written.notify_all()

    def _ended(self, items: list[tuple[Job, Outcome]], written: Collection[UUID]) -> None:
        """The completion of `items` committed, with the ids in `written`: their
        staged results published, those of the refused ones discarded."""
        report_lost(items, written)
        won = set(written)
        for job, outcome in items:
            if outcome.staged is not None:
                task = asyncio.create_task(settle(outcome.staged, job.id in won))
                self._settling.add(task)
                task.add_done_callback(self._settling.discard)

    async def drain(self) -> None:
        """Wait until every finished job handed over so far is written (and its
        staged result published)."""
        async with self._written:
            await self._written.wait_for(lambda: self.waiting == 0)
        if self._settling:
            await asyncio.gather(*self._settling)

    async def _write(self, batch: list[tuple[Job, Outcome]]) -> None:
        by_table: dict[str, list[tuple[Job, Outcome]]] = {}
        for item in batch:
            by_table.setdefault(item[0].table, []).append(item)
        for table, items in by_table.items():
            rows = await complete_with_rows(
                self.pool, dal.COMPLETE_JOBS, completion_params(table, items), riders(items)
            )
            self._ended(items, [r["id"] for r in rows])
        self._told()


def completion_params(table: str, items: list[tuple[Job, Outcome]]) -> dict[str, Any]:
    """The arguments of complete_jobs."""
    return {
        "table": table,
        "ids": [j.id for j, _ in items],
        "tokens": [j.claim_token for j, _ in items],
        "paths": [o.result_path for _, o in items],
        # One JSON array, in the order of ids (the query makes it a jsonb[]).
        "metrics": Jsonb([finite(o.metrics) for _, o in items]),
    }


def riders(items: list[tuple[Job, Outcome]]) -> list[CatalogEntry]:
    """The catalog rows that ride with these completions."""
    return [o.catalog for _, o in items if o.catalog is not None]


METRIC_BOUND = 1e300  # the database refuses larger numbers in metrics (sql/011)


def finite(value: Any, depth: int = 0) -> Any:
    """The metrics as the database accepts them: a number that is not finite or
    beyond METRIC_BOUND becomes null. One job's odd figure (a provider's usage, a
    clock) must not make the batch's write fail for every job in it."""
    if isinstance(value, float):
        return value if math.isfinite(value) and abs(value) <= METRIC_BOUND else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value if abs(value) <= METRIC_BOUND else None
    if depth > 10:
        return None
    if isinstance(value, dict):
        return {str(k): finite(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v, depth + 1) for v in value]
    return value


def report_lost(items: list[tuple[Job, Outcome]], written: Collection[UUID]) -> None:
    """Log the items whose id is not among the ids written (each written once,
    and only ids of the items: as many as the items means every one)."""
    if len(written) >= len(items):
        return
    ids = set(written)
    for j, _ in items:
        if j.id not in ids:
            logger.bind(
                action="job_lost", job_id=str(j.id), table=j.table, attempt=j.attempt
            ).warning("job finished but no longer held by this worker; result not recorded")
