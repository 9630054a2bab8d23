"""The jobs a worker holds, and the claims on them: running ones and ones claimed
ahead of a free slot (pacing.Held). The lease keeper beats for all of them in one
statement per table, stops a job whose claim was taken away (marked stale, or
cancelled by cancel_job), and gives jobs back to pending without counting an
attempt (release_jobs)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.jobs import JOB_TYPES, Job
from listener.pacing import Held

T = TypeVar("T")
TABLES = tuple(JOB_TYPES)
Retry = Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]
Report = Callable[[BaseException, str], None]


@dataclass
class Running:
    job: Job
    task: asyncio.Task[Any] = field(repr=False)  # Executor.start's, or the claim's own
    since: float = field(default_factory=time.monotonic)


class LeaseKeeper:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        interval: float,
        *,
        retry: Retry[Any],
        report: Report,
    ) -> None:
        self.pool = pool
        self.interval = interval  # HEARTBEAT_INTERVAL_SECONDS
        self.retry = retry  # while the database is away (outage.AwayRetry)
        self.report = report  # a failed write that is not retried
        self.running: dict[uuid.UUID, Running] = {}
        self.ready = Held()  # claimed ahead of a free slot (see pacing)
        self.cancel_checks: dict[uuid.UUID, asyncio.Task[None]] = {}  # by job id
        # Jobs started on a fast claim's row whose commit is still to come: a
        # write with their token before it would not find the row (the UPDATE
        # reads the version before the claim), so the writes wait for it.
        self.commits: dict[uuid.UUID, asyncio.Future[bool]] = {}

    # -- claims not yet committed -------------------------------------------------

    def commit_pending(self, job: Job) -> None:
        """The job starts before its claim's commit has ended."""
        self.commits[job.id] = asyncio.get_running_loop().create_future()

    def commit_ended(self, job: Job, durable: bool) -> None:
        fut = self.commits.pop(job.id, None)
        if fut is not None and not fut.done():
            fut.set_result(durable)

    async def committed(self, job: Job) -> bool:
        """Wait until the job's claim is committed (at once for most): False if it
        was not (the job is not this worker's: write nothing)."""
        fut = self.commits.get(job.id)
        return True if fut is None else await asyncio.shield(fut)

    def jobs(self) -> list[Job]:
        """Every job held here, running or waiting for a slot."""
        return [*(r.job for r in self.running.values()), *self.ready.jobs()]

    def find(self, job_id: uuid.UUID) -> Job | None:
        running = self.running.get(job_id)
        if running is not None:
            return running.job
        return next((j for j in self.ready.jobs() if j.id == job_id), None)

    # -- heartbeats -------------------------------------------------------------

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.beat()

    async def beat(self) -> None:
        """Refresh every held job's heartbeat; drop those no longer held."""
        held = [j for j in self.jobs() if j.id not in self.commits]  # those: not yet visible
        for table, jobs in by_table(held):
            try:
                rows = await dal.HEARTBEAT_JOBS.all(self.pool, held_params(table, jobs))
            except Exception as exc:
                self.report(exc, "heartbeat")
                continue
            still = {r["id"] for r in rows}
            for j in jobs:
                if j.id not in still:
                    self.drop(j)

    def drop(self, job: Job) -> None:
        """The job was marked stale and maybe handed on: stop it (or never start
        it), so that it never runs in two places at once."""
        self.stop_job(
            job.id, "job_lost", "job no longer held by this worker (marked stale); dropping it"
        )

    # -- cancel -------------------------------------------------------------------

    def check_cancel(self, job_id: uuid.UUID) -> None:
        """A cancel notification names a job that runs or waits here: ask the
        database whether this worker still holds it before stopping it. Any role
        may NOTIFY the channel, so the payload alone never stops a job; only
        cancel_job, which takes the claim token away, does."""
        job = self.find(job_id)
        if job is None or job_id in self.cancel_checks:
            return  # not here, or already being checked
        task = asyncio.create_task(self._confirm_cancel(job), name=f"cancel check {job_id}")
        self.cancel_checks[job_id] = task
        task.add_done_callback(lambda _: self.cancel_checks.pop(job_id, None))

    async def _confirm_cancel(self, job: Job) -> None:
        if not await self.committed(job):
            return  # never this worker's: stopped already
        try:
            still = await dal.HEARTBEAT_JOBS.all(self.pool, held_params(job.table, [job]))
        except Exception as exc:
            self.report(exc, "cancel check")  # kept running: the heartbeat decides later
            return
        if not still:
            self.stop_job(job.id, "job_cancelled", "job cancelled; stopping it", "INFO")
        else:
            logger.bind(action="cancel_ignored", job_id=str(job.id), table=job.table).warning(
                "ignored a cancel notification for a job this worker still holds"
            )

    def stop_job(
        self, job_id: uuid.UUID, action: str, message: str, level: str = "WARNING"
    ) -> None:
        """Cancel a running job's task, or drop it if it is held; no result is
        written (its claim_token is gone, so a late write would change nothing)."""
        running = self.running.get(job_id)
        waiting = next((j for j in self.ready.jobs() if j.id == job_id), None)
        job = running.job if running is not None else waiting
        if job is None:
            return  # not here, or ended meanwhile
        if waiting is not None:
            self.ready.remove(waiting)
        logger.bind(action=action, job_id=str(job_id), table=job.table, attempt=job.attempt).log(
            level, message
        )
        if running is not None:
            running.task.cancel()

    # -- release --------------------------------------------------------------------

    async def release(self, jobs: list[Job], what: str, *, retry: bool = True) -> list[Job]:
        """Back to pending without counting an attempt. With `retry`, while the
        database is away (until shutdown's deadline), then left to be rescued when
        stale; without, one try, and the jobs it could not release are returned.
        A job whose claim's commit is still to come is kept, and returned: its
        release would read the row from before the claim and change nothing."""
        kept = [j for j in jobs if j.id in self.commits]
        for table, mine in by_table([j for j in jobs if j.id not in self.commits]):
            params = held_params(table, mine)
            try:
                if retry:
                    rows = await self.retry(lambda p=params: dal.RELEASE_JOBS.all(self.pool, p))  # type: ignore[misc]
                else:
                    rows = await dal.RELEASE_JOBS.all(self.pool, params)
            except Exception as exc:
                if not retry:
                    self.report(exc, "release")
                    kept += mine
                    continue
                logger.bind(action="release_failed").error(
                    f"could not release {len(mine)} job(s): {exc}; they will be rescued when stale"
                )
                continue
            logger.bind(action="jobs_released", table=table, count=len(rows)).info(
                f"released {len(rows)} {what} job(s) back to pending"
            )
        return kept


def by_table(jobs: list[Job]) -> Iterator[tuple[str, list[Job]]]:
    for table in TABLES:
        if mine := [j for j in jobs if j.table == table]:
            yield table, mine


def held_params(table: str, jobs: list[Job]) -> dict[str, Any]:
    """The parameters that name jobs held by their claims (heartbeat, release)."""
    return {"table": table, "ids": [j.id for j in jobs], "tokens": [j.claim_token for j in jobs]}
