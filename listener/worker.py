"""The long-running worker: wait for a reason to look, claim what the free slots
allow, run each job's handler, and record how it ended.

Reasons to look: a notification (listener), a finished job (a free slot), a due
retry (timer), a sweep, a poll tick (LISTEN_MODE=poll). A burst of any of them is
one claim round: they only set flags and one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import db
from listener.completer import Completer, completion_params
from listener.errors import (
    AiJobsError,
    DatabaseUnavailable,
    InvalidJob,
    ProvidersUnavailable,
    scrub,
)
from listener.jobs import JOB_TYPES, HandlerMap, Job, Outcome
from listener.migrate import check_schema
from listener.notifications import Backoff, Health, Listener, Nudge
from listener.pacing import ROUNDS, Held, Pacing
from listener.registry import POLLING, Registry, Status
from listener.settings import Settings
from listener.sweeper import Sweeper, SweepResult

T = TypeVar("T")
TABLES = tuple(JOB_TYPES)
Periodic = tuple[float, Callable[[], Awaitable[Any]], str]
SHUTDOWN_BACKGROUND_SECONDS = 10.0  # a cancelled background task gets this long to end
POLL_INTERVAL_SECONDS = 1.0  # LISTEN_MODE=poll: how often the worker looks for work
FailureHook = Callable[[Job, BaseException], None]


@dataclass
class Running:
    job: Job
    task: asyncio.Task[Outcome | None] = field(repr=False)
    since: float = field(default_factory=time.monotonic)


def make_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool,
        handlers: HandlerMap,
        *,
        dsn: str | None = None,
        listen: bool = True,
        poll_interval: float = POLL_INTERVAL_SECONDS,
        periodic: Sequence[Periodic] = (),
        on_failure: FailureHook | None = None,
        on_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.handlers = handlers
        self.dsn = dsn or settings.dsn or ""
        self.listen = listen
        self.poll_interval = poll_interval
        self.periodic = list(periodic)
        self.on_failure = on_failure
        self.on_ready = on_ready
        self.id = make_worker_id()
        self.concurrency = settings.worker_concurrency
        self.running: dict[uuid.UUID, Running] = {}
        self.ready = Held()  # claimed ahead of a free slot (see pacing)
        self.pacing = Pacing(self.concurrency)
        self.sweeper = Sweeper(pool, settings)
        # Results waiting for their write before a finished job has to wait too:
        # two claims' worth, the most that can finish between two claim rounds.
        backlog = 2 * (ROUNDS + 1) * self.concurrency
        self.completer = Completer(pool, self._retry, backlog=backlog)
        self.medic = db.PoolMedic(pool)
        self.listener = Listener(
            self.dsn,
            self._on_nudge,
            self._on_listening,
            notify=self._notify,
            probe_every=settings.listen_probe_seconds,
            sender=self.id,
            on_state=lambda state: self.registry.poke(),
        )
        self.registry = Registry(pool, settings, self.id, self._status, self._registry_error)
        self.db_health = Health("database")
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._back = asyncio.Event()  # the database answers again: end a claim backoff
        self._sweep_now = asyncio.Event()
        self._more = dict.fromkeys(TABLES, True)  # may a claim in this table find a job?
        self._gen = dict.fromkeys(TABLES, 0)  # bumped by every reason to look
        self._timers: list[float] = []  # monotonic times when a waiting job becomes due
        # Every provider of the table's chain is down: claim nothing there until then
        # (monotonic), rather than claim jobs only to put them back.
        self._hold: dict[str, float] = {}
        self._cancel_checks: dict[uuid.UUID, asyncio.Task[None]] = {}  # by job id
        self._turn = 0  # which table a claim round asks first (fairness)
        self._give_up_at: float | None = None  # writes stop retrying after this (shutdown)
        self.claim_queries = 0  # claim statements sent (tests check the coalescing)
        self.notifications = 0  # valid notifications received
        self.sweeps = 0  # sweeps that ran to the end
        self.polls = 0  # looks for work by the poll timer (LISTEN_MODE=poll)
        self._side: set[asyncio.Task[Any]] = set()

    # -- signals from outside -------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_sweep(self) -> None:
        self._sweep_now.set()

    def _look(self, tables: Sequence[str] = TABLES) -> None:
        for t in tables:
            self._more[t] = True
            self._gen[t] += 1
        self._wake.set()

    def _on_nudge(self, nudge: Nudge) -> None:
        self.notifications += 1
        if nudge.cancel is not None:  # cancel_job, or anyone's NOTIFY: checked first
            self._check_cancel(nudge.cancel)
            return
        if nudge.paused:  # pause_jobs: claim_jobs refuses the table; nothing to look at
            logger.bind(action="table_paused", table=nudge.table).info("job type paused")
            return
        if nudge.sweep:
            self.request_sweep()
        self._look([nudge.table] if nudge.table else TABLES)

    def _on_listening(self, recovered: bool) -> None:
        """The LISTEN connection is up. After a reconnect the notifications of the
        gap are lost, and the pool's connections may have died with it."""
        if recovered:
            self._spawn(self._catch_up())
        else:
            self.request_sweep()

    async def _catch_up(self) -> None:
        await self.medic.heal()  # fresh connections first, not one failure per caller
        self._back.set()
        self.request_sweep()

    async def _notify(self, channel: str, payload: str) -> None:
        """The listener's probe, sent through the pool like any job's notification."""
        try:
            await self._fetch("notify", {"channel": channel, "payload": payload})
        except Exception as exc:
            self._report(exc, "probe")
            raise

    def _status(self) -> Status:
        service = self.listener.service
        return Status(
            listener_state=service.state if self.listen else POLLING,
            jobs_running=len(self.running),
            probe_seconds=service.probe_seconds,
            reconnects=service.reconnects,
        )

    def _registry_error(self, exc: BaseException) -> None:
        self._report(exc, "registry")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    def _at(self, due_in: float | None) -> None:
        if due_in is not None:
            heapq.heappush(self._timers, time.monotonic() + max(0.0, due_in))
            self._wake.set()

    # -- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Work until request_stop(); then finish, release and return."""
        if not await self._wait_for_schema():
            return
        if self.listen and not await self.listener.service.verify(self._stop):
            return
        await self.prepare()
        background = [
            asyncio.create_task(self._sweeps()),
            asyncio.create_task(self.heartbeats()),
            asyncio.create_task(self.completer.run()),
            asyncio.create_task(self.registry.run(), name="registry"),
            *(asyncio.create_task(self._every(i, fn, name)) for i, fn, name in self.periodic),
        ]
        if self.listen:
            background.append(asyncio.create_task(self.listener.run(), name="listener"))
        else:
            background.append(
                asyncio.create_task(self._every(self.poll_interval, self._poll, "poll"))
            )
        mode = "listen" if self.listen else f"poll every {self.poll_interval:g}s"
        logger.bind(action="worker_started", worker=self.id).info(
            f"worker started (concurrency {self.concurrency}, {mode})"
        )
        try:
            await self._claim_loop()
        finally:
            await self._shutdown(background)
            logger.bind(action="worker_stopped", worker=self.id).info("worker stopped")

    async def prepare(self) -> None:
        """Once the schema is current: the owner's start-up that needs the database."""
        if self.on_ready is not None:
            await self.on_ready()

    async def _claim_loop(self) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        while not self._stop.is_set():
            self._wake.clear()
            now = time.monotonic()
            if self._timers and self._timers[0] <= now:
                while self._timers and self._timers[0] <= now:
                    heapq.heappop(self._timers)
                self._look()
            if overdue := self.ready.overdue(now):  # for any idle worker; kept if the db is away
                why = f"held {self.ready.limit:g}s without a free slot"
                self.ready.add(await self._release(overdue, why, retry=False))
            free = self.concurrency + self._ahead(now) - len(self.running) - len(self.ready)
            wanted = [t for t in self._tables_in_turn() if not self._held(t, now) and self._more[t]]
            if free > 0 and wanted:
                self._back.clear()
                if await self._claim_round(wanted, free):
                    backoff.reset()
                else:  # until the backoff ends, or the listener finds the database back
                    await self._sleep(backoff.next(), self._back)
                continue
            await self._wait(now)

    async def _wait(self, now: float) -> None:
        """Until a reason to look, the next retry timer, or a held job's limit."""
        waits = [t - now for t in self._timers[:1]]
        waits += [until - now for until in self._hold.values() if until > now]
        if (held := self.ready.due_in(now)) is not None:
            waits.append(held)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(waits, default=None)):
                await self._wake.wait()

    def _ahead(self, now: float) -> int:
        oldest = min((r.since for r in self.running.values()), default=now)
        return self.pacing.ahead(running_for=now - oldest)

    def _held(self, table: str, now: float) -> bool:
        until = self._hold.get(table)
        if until is None:
            return False
        if until > now:
            return True
        del self._hold[table]
        logger.bind(action="claims_resumed", table=table).info(f"claiming {table} again")
        return False

    def _tables_in_turn(self) -> list[str]:
        self._turn = (self._turn + 1) % len(TABLES)
        return [*TABLES[self._turn :], *TABLES[: self._turn]]

    async def _claim_round(self, tables: list[str], free: int) -> bool:
        for table in tables:
            gen = self._gen[table]
            self.claim_queries += 1
            done = self.completer.take(table)  # finished jobs ride along: one commit
            params = {"table": table, "worker": self.id, "n": free}
            t0 = time.perf_counter()
            try:
                async with self.pool.connection() as conn:
                    if done:
                        params |= completion_params(table, done)
                        rows = await db.fetch(conn, "complete_and_claim", params)
                    else:
                        rows = await db.fetch(conn, "claim_jobs", params)
            except Exception as exc:
                if done:
                    await self.completer.settle(done, None)
                self._report(exc, "claim")
                return False
            self.db_health.up()
            self.pacing.round_trip.add(time.perf_counter() - t0)
            if done:
                await self.completer.settle(done, {r["id"] for r in rows if r["kind"] == "done"})
                rows = [r for r in rows if r["kind"] == "claimed"]
            if len(rows) < free and gen == self._gen[table]:
                self._more[table] = False  # nothing more until the next reason to look
            self.ready.add([Job.from_claim(rec) for rec in rows])
            self._fill()
            free -= len(rows)
            if free <= 0:
                break
        return True

    async def _sleep(self, seconds: float, also: asyncio.Event | None = None) -> None:
        """For `seconds`, or until stopped (or `also` is set)."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._stop, also) if e is not None]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    # -- one job ----------------------------------------------------------------

    async def run_one(self, table: str | None) -> tuple[Job, Outcome | None] | None:
        """Claim one due job (of `table`, or of either) and run it here, with its
        heartbeat, until its end is written (`ai-jobs run-once`)."""
        rows = await self._fetch("claim_jobs", {"table": table, "worker": self.id, "n": 1})
        if not rows:
            return None
        job = Job.from_claim(rows[0])
        side = [asyncio.create_task(self.completer.run()), asyncio.create_task(self.heartbeats())]
        try:
            self._start(job)
            outcome = await self.running[job.id].task
            await self.completer.drain()
        finally:
            for t in side:
                t.cancel()
            await asyncio.gather(*side, return_exceptions=True)
        return job, outcome

    def _fill(self) -> None:
        """Start claimed jobs in the free slots."""
        while self.ready and len(self.running) < self.concurrency and not self._stop.is_set():
            self._start(self.ready.pop())

    def _start(self, job: Job) -> None:
        task = asyncio.create_task(self.execute(job), name=f"job {job.id}")
        self.running[job.id] = Running(job, task)

    async def execute(self, job: Job) -> Outcome | None:
        """Run the handler and record the end; never raises but on cancellation."""
        log = logger.bind(job_id=str(job.id), table=job.table, attempt=job.attempt)
        log.info("job started", action="job_started")
        t0 = time.perf_counter()
        try:
            handler = self.handlers.get(job.table)
            if handler is None:
                raise InvalidJob(f"No handler registered for {job.table}")
            outcome = await handler(job)
            outcome.metrics["totalDurationMs"] = round((time.perf_counter() - t0) * 1000, 3)
            self.running.pop(job.id, None)  # handed over: no longer ours to release
            await self.completer.add(job, outcome)
            ms = outcome.metrics["totalDurationMs"]
            log.info("job done in {ms} ms", action="job_done", ms=ms)
            return outcome
        except asyncio.CancelledError:
            raise  # shutdown past the grace period, or the job was taken away
        except ProvidersUnavailable as exc:
            await asyncio.shield(self._defer(job, exc, log))
            return None
        except Exception as exc:
            await asyncio.shield(self._fail(job, exc, log))
            return None
        finally:
            self.pacing.job_time.add(time.perf_counter() - t0)
            self.running.pop(job.id, None)
            self._fill()
            self._wake.set()  # a free slot

    async def _fail(self, job: Job, exc: BaseException, log: Any) -> None:
        message = scrub(error_text(exc), self.settings)
        params = {
            "table": job.table,
            "id": job.id,
            "token": job.claim_token,
            "error": message,
            "base": self.settings.retry_base_seconds,
            "give_up": isinstance(exc, InvalidJob),
        }
        if self.on_failure:
            with contextlib.suppress(Exception):
                self.on_failure(job, exc)
        try:
            rows = await self._retry(lambda: self._fetch("fail_job", params))
        except Exception as write_exc:
            log.bind(action="job_fail_lost").error(f"could not record failure: {write_exc}")
            return
        if not rows:
            log.bind(action="job_lost").warning(f"job failed ({message}) but is no longer held")
        elif rows[0]["status"] == "dead_letter":
            log.bind(action="job_dead_letter").error(f"job moved to the dead letter: {message}")
        else:
            due_in = float(rows[0]["due_in"])
            self._at(due_in)
            log.bind(action="job_failed").warning(
                f"job failed (attempt {job.attempt}/{job.max_retries}), retry in {due_in:.1f}s: "
                f"{message}"
            )

    async def _defer(self, job: Job, exc: ProvidersUnavailable, log: Any) -> None:
        """Every provider is down or rate-limited: back to pending until the earliest
        recovery, no attempt counted (past PROVIDER_OUTAGE_MAX_WAIT_SECONDS of
        waiting, defer_job counts one), and no more claims of this table until then."""
        message = scrub(exc.message, self.settings)
        params = {
            "table": job.table,
            "id": job.id,
            "token": job.claim_token,
            "wait": exc.wait_seconds,
            "reason": message,
            "max_wait": self.settings.provider_outage_max_wait_seconds,
        }
        try:
            rows = await self._retry(lambda: self._fetch("defer_job", params))
        except Exception as write_exc:
            log.bind(action="job_defer_lost").error(f"could not put the job back: {write_exc}")
            return
        if not rows:
            log.bind(action="job_lost").warning(f"job deferred ({message}) but is no longer held")
            return
        row, due_in = rows[0], max(0.0, float(rows[0]["due_in"]))
        if job.table not in self._hold:
            log.bind(action="claims_held", seconds=round(due_in, 1)).warning(
                f"every provider is unavailable: no {job.job_type} jobs claimed for "
                f"{due_in:.1f}s ({message})"
            )
        self._hold[job.table] = time.monotonic() + due_in
        self._at(due_in)
        if row["status"] == "dead_letter":
            log.bind(action="job_dead_letter").error(f"job moved to the dead letter: {message}")
        elif row["counted"]:
            log.bind(action="job_failed").warning(f"waited too long, attempt counted: {message}")
        else:
            log.bind(action="job_deferred").debug(f"job waits {due_in:.1f}s for its providers")

    # -- database writes that must land ---------------------------------------

    async def _fetch(self, name: str, params: Any) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            return await db.fetch(conn, name, params)

    async def _retry(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Retry a write while the database is unreachable; until shutdown's deadline."""
        backoff = Backoff(base=0.2, cap=5.0)
        while True:
            try:
                result = await fn()
                self.db_health.up()
                return result
            except Exception as exc:
                if not db.is_connection_error(exc) and not _is_pool_timeout(exc):
                    raise
                self._report(exc, "write")
                if self._give_up_at is not None and time.monotonic() > self._give_up_at:
                    raise DatabaseUnavailable("database unreachable at shutdown") from exc
                await asyncio.sleep(backoff.next())

    # -- background duties ------------------------------------------------------

    async def _every(self, interval: float, fn: Callable[[], Awaitable[Any]], name: str) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._guarded(fn, name)

    async def _guarded(self, fn: Callable[[], Awaitable[Any]], name: str) -> None:
        try:
            await fn()
        except Exception as exc:
            self._report(exc, name)

    async def _poll(self) -> None:
        self.polls += 1
        self._look()

    def _report(self, exc: BaseException, what: str, quiet: bool = False) -> None:
        """A lost database is a health transition, and the pool's other connections
        are replaced at once; anything else is an error to show (unless `quiet`:
        the same duty failing again)."""
        if db.is_connection_error(exc) or _is_pool_timeout(exc):
            self.db_health.down(exc)
            self.medic.heal_soon()
        elif not quiet:
            logger.bind(action="duty_failed", duty=what).error(
                f"{what} failed: {scrub(error_text(exc), self.settings)}"
            )

    async def _sweeps(self) -> None:
        await self.sweeper.run(self._sweep_now, self._swept, self._look, self._sweep_failed)

    def _swept(self, result: SweepResult) -> None:
        self.db_health.up()
        self._at(result.due_in)
        if result.error is None:
            self.sweeps += 1

    def _sweep_failed(self, exc: BaseException, again: bool) -> None:
        self._report(exc, "sweep", quiet=again)

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_seconds)
            held_here = [*(r.job for r in self.running.values()), *self.ready.jobs()]
            for table, jobs in by_table(held_here):
                try:
                    params = held_params(table, jobs)
                    held = {r["id"] for r in await self._fetch("heartbeat_jobs", params)}
                except Exception as exc:
                    self._report(exc, "heartbeat")
                    continue
                for j in jobs:
                    if j.id not in held:
                        self._drop(j)

    def _drop(self, job: Job) -> None:
        """The job was marked stale and maybe handed on: stop it (or never start
        it), so that it never runs in two places at once."""
        self._stop_job(
            job.id, "job_lost", "job no longer held by this worker (marked stale); dropping it"
        )

    def _check_cancel(self, job_id: uuid.UUID) -> None:
        """A cancel notification names a job that runs or waits here: ask the
        database whether this worker still holds it before stopping it. Any role
        may NOTIFY the channel, so the payload alone never stops a job; only
        cancel_job, which takes the claim token away, does."""
        running = self.running.get(job_id)
        held = (j for j in self.ready.jobs() if j.id == job_id)
        job = running.job if running else next(held, None)
        if job is None or job_id in self._cancel_checks:
            return  # not here, or already being checked
        task = asyncio.create_task(self._confirm_cancel(job), name=f"cancel check {job_id}")
        self._cancel_checks[job_id] = task
        task.add_done_callback(lambda _: self._cancel_checks.pop(job_id, None))

    async def _confirm_cancel(self, job: Job) -> None:
        try:
            held = await self._fetch("heartbeat_jobs", held_params(job.table, [job]))
        except Exception as exc:
            self._report(exc, "cancel check")  # kept running: the heartbeat decides later
            return
        if not held:
            self._stop_job(job.id, "job_cancelled", "job cancelled; stopping it", "INFO")
        else:
            logger.bind(action="cancel_ignored", job_id=str(job.id), table=job.table).warning(
                "ignored a cancel notification for a job this worker still holds"
            )

    def _stop_job(
        self, job_id: uuid.UUID, action: str, message: str, level: str = "WARNING"
    ) -> None:
        """Cancel a running job's task, or drop it if it is held; no result is
        written (its claim_token is gone, so a late write would change nothing)."""
        running = self.running.get(job_id)
        held = next((j for j in self.ready.jobs() if j.id == job_id), None)
        job = running.job if running is not None else held
        if job is None:
            return  # not here, or ended meanwhile
        if held is not None:
            self.ready.remove(held)
        logger.bind(action=action, job_id=str(job_id), table=job.table, attempt=job.attempt).log(
            level, message
        )
        if running is not None:
            running.task.cancel()

    async def _wait_for_schema(self) -> bool:
        backoff = Backoff(base=0.5, cap=10.0)
        while not self._stop.is_set():
            try:
                async with self.pool.connection() as conn:
                    await check_schema(conn)
                self.db_health.up()
                return True
            except AiJobsError as exc:
                if not isinstance(exc, DatabaseUnavailable):
                    raise
                self.db_health.down(exc)
            except Exception as exc:
                if not db.is_connection_error(exc) and not _is_pool_timeout(exc):
                    raise
                self.db_health.down(exc)
            await self._sleep(backoff.next())
        return False

    # -- shutdown -------------------------------------------------------------

    async def _shutdown(self, background: list[asyncio.Task[Any]]) -> None:
        grace = self.settings.shutdown_grace_seconds
        if self.ready:  # never started: back to the queue at once, for other workers
            self.ready.add(await self._release(self.ready.take_all(), "held", retry=False))
        tasks = [r.task for r in self.running.values()]
        if tasks:
            logger.bind(action="worker_draining").info(
                f"stopping: {len(tasks)} job(s) running, waiting up to {grace:g}s"
            )
            await asyncio.wait(tasks, timeout=grace)
        unfinished = [r.job for r in self.running.values()] + self.ready.take_all()
        for r in list(self.running.values()):
            r.task.cancel()
        await asyncio.gather(*(r.task for r in list(self.running.values())), return_exceptions=True)
        self._give_up_at = time.monotonic() + max(5.0, grace)
        if unfinished:
            await self._release(unfinished, "unfinished")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(5.0, grace)):
                await self.completer.drain()
        await self.registry.remove()
        background += self._side
        for t in background:
            t.cancel()
        _, stuck = await asyncio.wait(background, timeout=SHUTDOWN_BACKGROUND_SECONDS)
        if stuck:
            logger.bind(action="shutdown_stuck").warning(
                f"{len(stuck)} background task(s) did not stop in time: "
                + ", ".join(t.get_name() for t in stuck)
            )

    async def _release(self, jobs: list[Job], what: str, *, retry: bool = True) -> list[Job]:
        """Back to pending without counting an attempt. With `retry`, while the
        database is away (until shutdown's deadline), then left to be rescued when
        stale; without, one try, and the jobs it could not release are returned."""
        kept: list[Job] = []
        for table, mine in by_table(jobs):
            params = held_params(table, mine)
            try:
                if retry:
                    rows = await self._retry(lambda p=params: self._fetch("release_jobs", p))  # type: ignore[misc]
                else:
                    rows = await self._fetch("release_jobs", params)
            except Exception as exc:
                if not retry:
                    self._report(exc, "release")
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
    return {"table": table, "ids": [j.id for j in jobs], "tokens": [j.claim_token for j in jobs]}


def error_text(exc: BaseException) -> str:
    if isinstance(exc, AiJobsError):
        return exc.message
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_pool_timeout(exc: BaseException) -> bool:
    from psycopg_pool import PoolTimeout

    return isinstance(exc, PoolTimeout)
