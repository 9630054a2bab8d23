"""The jobs a worker holds, and the claims on them. The lease keeper is their one
owner: the running jobs (each with its task) and the ready ones (claimed ahead
of a free slot, see pacing), the slots they fill, and whether a job's claim has
committed yet (a job started on a fast claim's row runs before its commit). It
beats for every held job in one statement per table, stops a job whose claim
was taken away (marked stale, or cancelled by cancel_job), and gives jobs back
to pending without counting an attempt (release_jobs)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal, tracing
from listener.jobs import JOB_TYPES, Job
from listener.progress import ProgressBoard

T = TypeVar("T")
TABLES = tuple(JOB_TYPES)
Retry = Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]
Report = Callable[[BaseException, str], None]
READY_LIMIT_SECONDS = 1.0  # a ready job that waited this long for a slot is given back


@dataclass
class Running:
    job: Job
    task: asyncio.Task[Any] = field(repr=False)  # Executor.start's
    since: float = field(default_factory=time.monotonic)
    stopped: bool = False  # stop_job cancelled its task: the reason is said
    ending: bool = False  # its task writes how it ended (fail_job, defer_job): nothing to stop


class ReadyQueue:
    """Jobs claimed ahead of a free slot, oldest first, each with the monotonic
    time it was claimed. One that waits `limit` seconds is overdue: given back
    to the queue, where any idle worker can take it."""

    def __init__(self, limit: float = READY_LIMIT_SECONDS) -> None:
        self.limit = limit
        self._q: deque[tuple[Job, float]] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def jobs(self) -> list[Job]:
        return [j for j, _ in self._q]

    def add(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        self._q.extend([(j, now) for j in jobs])

    def pop(self) -> Job:
        return self._q.popleft()[0]

    def remove(self, job: Job) -> bool:
        for e in self._q:
            if e[0].id == job.id:
                self._q.remove(e)
                return True
        return False

    def take_all(self) -> list[Job]:
        jobs = self.jobs()
        self._q.clear()
        return jobs

    def overdue(self, now: float) -> list[Job]:
        """Take the jobs that waited longer than the limit."""
        out = []
        while self._q and now - self._q[0][1] >= self.limit:
            out.append(self._q.popleft()[0])
        return out

    def due_in(self, now: float) -> float | None:
        """Seconds until the oldest ready job is overdue (None: none waits)."""
        return self._q[0][1] + self.limit - now if self._q else None


class LeaseKeeper:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        interval: float,
        *,
        retry: Retry[Any],
        report: Report,
        concurrency: int = 1,
        progress_interval: float = 1.0,
    ) -> None:
        self.pool = pool
        self.interval = interval  # HEARTBEAT_INTERVAL_SECONDS
        self.retry = retry  # while the database is away (outage.AwayRetry)
        self.report = report  # a failed write that is not retried
        self.concurrency = concurrency  # WORKER_CONCURRENCY: jobs running at once
        self.ready = ReadyQueue()  # claimed ahead of a free slot
        self.cancel_checks: dict[uuid.UUID, asyncio.Task[None]] = {}  # by job id
        self._running: dict[uuid.UUID, Running] = {}
        # Jobs started on a fast claim's row whose commit is still to come: a
        # write with their token before it would not find the row (the UPDATE
        # reads the version before the claim), so the writes wait for it.
        self._commits: dict[uuid.UUID, asyncio.Future[bool]] = {}
        # The running jobs' progress, written for all of them in one statement an
        # interval (PROGRESS_INTERVAL_SECONDS); a write is a heartbeat too.
        self.progress_connection = OwnConnection(pool)
        self.progress = ProgressBoard(
            self.progress_connection.progress_jobs,
            progress_interval,
            report,
            held=lambda job_id: job_id not in self._commits,
        )

    # -- the jobs held, and the slots -----------------------------------------------

    @property
    def running(self) -> Mapping[uuid.UUID, Running]:
        """The running jobs by id (read-only: track() and untrack() change it)."""
        return MappingProxyType(self._running)

    def track(self, job: Job, task: asyncio.Task[Any]) -> None:
        """The job runs in `task`: held (heartbeated, releasable) until untracked."""
        self._running[job.id] = Running(job, task)

    def untrack(self, job: Job) -> None:
        """The job's task no longer needs it held (its end is written or handed on).
        Only that run's entry: the same job claimed here again is another run."""
        running = self._running.get(job.id)
        if running is not None and running.job.claim_token == job.claim_token:
            del self._running[job.id]

    def ending(self, job: Job) -> None:
        """The job's task writes how it ended: a beat or a cancel that finds the
        job no longer held (that write took its claim) has nothing to stop."""
        running = self._running.get(job.id)
        if running is not None and running.job.claim_token == job.claim_token:
            running.ending = True

    def can_start(self) -> bool:
        """A slot is free for a job to run now."""
        return len(self._running) < self.concurrency

    def free_slots(self, ahead: int = 0) -> int:
        """How many more jobs to claim: the free slots, plus `ahead` to hold ready."""
        return self.concurrency + ahead - len(self._running) - len(self.ready)

    def oldest_start(self, now: float) -> float:
        """The monotonic start of the oldest running job (`now` if none runs)."""
        return min((r.since for r in self._running.values()), default=now)

    def jobs(self) -> list[Job]:
        """Every job held here, running or ready."""
        return [*(r.job for r in self._running.values()), *self.ready.jobs()]

    def find(self, job_id: uuid.UUID) -> Job | None:
        running = self._running.get(job_id)
        if running is not None:
            return running.job
        return next((j for j in self.ready.jobs() if j.id == job_id), None)

    # -- claims not yet committed -------------------------------------------------

    def commit_pending(self, job: Job) -> None:
        """The job starts before its claim's commit has ended."""
        self._commits[job.id] = asyncio.get_running_loop().create_future()

    def commit_ended(self, job: Job, durable: bool) -> None:
        fut = self._commits.pop(job.id, None)
        if fut is not None and not fut.done():
            fut.set_result(durable)

    @property
    def any_uncommitted(self) -> bool:
        """Some job's claim is still to commit (rarely: a fast claim's WAL flush)."""
        return bool(self._commits)

    async def committed(self, job: Job) -> bool:
        """Wait until the job's claim is committed (at once for most): False if it
        was not (the job is not this worker's: write nothing)."""
        fut = self._commits.get(job.id)
        return True if fut is None else await asyncio.shield(fut)

    # -- heartbeats -------------------------------------------------------------

    async def progress_writes(self) -> None:
        """Write the running jobs' progress as it changes (listener/progress.py)."""
        await self.progress.run()

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.beat()

    async def beat(self) -> None:
        """Refresh every held job's heartbeat; drop those no longer held."""
        held = [j for j in self.jobs() if j.id not in self._commits]  # those: not yet visible
        for table, jobs in by_table(held):
            try:
                rows = await dal.HEARTBEAT_JOBS.all(self.pool, claim_params(table, jobs))
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
            still = await dal.HEARTBEAT_JOBS.all(self.pool, claim_params(job.table, [job]))
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
        """Cancel a running job's task, or drop it if it is ready; no result is
        written (its claim_token is gone, so a late write would change nothing)."""
        running = self._running.get(job_id)
        waiting = next((j for j in self.ready.jobs() if j.id == job_id), None)
        job = running.job if running is not None else waiting
        if job is None:
            return  # not here, or ended meanwhile
        if running is not None and (running.stopped or running.ending):
            # Stopped already (a cancel, then the heartbeat's drop: the first says
            # why), or its end is being written (the write says how it ended).
            return
        if waiting is not None:
            self.ready.remove(waiting)
        logger.bind(action=action, job_id=str(job_id), table=job.table, attempt=job.attempt).log(
            level, message
        )
        if running is not None:
            running.stopped = True
            tracing.stopped(job_id, action)  # the attempt's span says why it ended
            running.task.cancel()

    # -- release --------------------------------------------------------------------

    async def release(self, jobs: list[Job], what: str, *, retry: bool = True) -> list[Job]:
        """Back to pending without counting an attempt. With `retry`, while the
        database is away (until shutdown's deadline), then left to be rescued when
        stale; without, one try, and the jobs it could not release are returned.
        A job whose claim's commit is still to come is kept, and returned: its
        release would read the row from before the claim and change nothing."""
        kept = [j for j in jobs if j.id in self._commits]
        for table, mine in by_table([j for j in jobs if j.id not in self._commits]):
            params = claim_params(table, mine)
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

    async def release_overdue(self, now: float) -> None:
        """Give back the ready jobs that waited too long for a slot (for any idle
        worker); those it could not release stay ready."""
        if overdue := self.ready.overdue(now):
            why = f"ready {self.ready.limit:g}s without a free slot"
            self.ready.add(await self.release(overdue, why, retry=False))

    async def wind_down(self, grace: float) -> list[Job]:
        """At shutdown: the ready jobs back to the queue at once, the running ones
        given `grace` seconds to end, then cancelled; returns the jobs that did
        not end (to release)."""
        if self.ready:  # never started: back to the queue at once, for other workers
            self.ready.add(await self.release(self.ready.take_all(), "ready", retry=False))
        tasks = [r.task for r in self._running.values()]
        if tasks:
            logger.bind(action="worker_draining").info(
                f"stopping: {len(tasks)} job(s) running, waiting up to {grace:g}s"
            )
            await asyncio.wait(tasks, timeout=grace)
        unfinished = [r.job for r in self._running.values()] + self.ready.take_all()
        tasks = [r.task for r in self._running.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return unfinished


class OwnConnection:
    """The progress writes' connection of their own, opened when first needed and
    again after a failure. Not the work pool's: with hundreds of jobs starting
    and ending together, a write waited there behind their statements for
    seconds (docs/benchmarks.md), and progress is promised every interval."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool  # its connection settings
        self.conn: Any = None

    async def progress_jobs(self, params: dict[str, Any]) -> list[Any]:
        if self.conn is None or self.conn.closed:
            # the pool's settings (a DSN and keyword arguments, as db.make_pool gives)
            conninfo, kwargs = self.pool.conninfo, self.pool.kwargs
            assert isinstance(conninfo, str) and isinstance(kwargs, dict)
            self.conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
        try:
            return await dal.PROGRESS_JOBS.all(self.conn, params)
        except Exception:
            await self.aclose()  # a new connection for the next write
            raise

    async def aclose(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


def by_table(jobs: list[Job]) -> Iterator[tuple[str, list[Job]]]:
    for table in TABLES:
        if mine := [j for j in jobs if j.table == table]:
            yield table, mine


def claim_params(table: str, jobs: list[Job]) -> dict[str, Any]:
    """The parameters that name jobs by their claims (heartbeat, release)."""
    return {"table": table, "ids": [j.id for j in jobs], "tokens": [j.claim_token for j in jobs]}
