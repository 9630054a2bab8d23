"""The long-running worker: wait for a reason to look, claim what the free slots
allow, and hand each claimed job to the executor.

Reasons to look: a notification (listener), a finished job (a free slot), a due
retry (timer), a sweep, a poll tick (LISTEN_MODE=poll). A burst of any of them is
one claim round: they only set flags and one event.

The fast path: a notification that names its job (a one-row insert), arriving
while a slot is free and the last claim round found that table empty, is
claimed by its id at once: the claim (claim_due_job, which claims only a due,
claimable job: a forged id claims nothing) is sent from the listener's callback
on a connection kept for it (fastclaim.py), and the job starts from the reply's
callback, without waiting for the claim loop. Anything else, and a fast claim
that finds nothing, is a reason to look: bursts are still claimed in batches.

The collaborators, each with one job: the lease keeper (leases.py: the jobs held
here, heartbeats, cancel, release), the executor (executor.py: run a job, write
how it ended), the completer (batched `done` writes), the sweeper, the registry,
the listener; `outage.Health` logs the database's health transitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from uuid import UUID

from loguru import logger

from listener import dal, db
from listener.completer import Completer, completion_params, with_catalog
from listener.errors import scrub
from listener.executor import Executor, FailureHook, error_text
from listener.fastclaim import Abandoned, FastClaimer
from listener.jobs import JOB_TYPES, HandlerMap, Job, Outcome
from listener.leases import LeaseKeeper
from listener.listen import DEAF
from listener.migrate import wait_for_schema
from listener.notifications import Listener, Nudge
from listener.outage import AwayRetry, Backoff, Health
from listener.pacing import ROUNDS, Pacing
from listener.registry import POLLING, Registry, Status, make_worker_id
from listener.rows import ClaimedRow
from listener.settings import Settings
from listener.sweeper import Sweeper, SweepResult

TABLES = tuple(JOB_TYPES)
Periodic = tuple[float, Callable[[], Awaitable[Any]], str]
SHUTDOWN_BACKGROUND_SECONDS = 10.0  # a cancelled background task gets this long to end
POLL_INTERVAL_SECONDS = 1.0  # LISTEN_MODE=poll: how often the worker looks for work
# At shutdown, a fast claim still under way (behind a table's lock) gets this
# long to end on its own; then it is cancelled (its reply still read).
FAST_CLAIM_SHUTDOWN_WAIT = 1.0

__all__ = ["POLL_INTERVAL_SECONDS", "FailureHook", "Periodic", "Worker", "make_worker_id"]


class Worker:
    def __init__(
        self,
        settings: Settings,
        pool: db.WorkPool,
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
        self.dsn = dsn or settings.dsn or ""
        self.listen = listen
        self.poll_interval = poll_interval
        self.periodic = list(periodic)
        self.on_ready = on_ready
        self.id = make_worker_id()
        self.concurrency = settings.worker_concurrency
        self.medic = db.PoolMedic(pool)
        self.db_health = Health("database", pool=pool, heal=self.medic.heal_soon)
        self.retry = AwayRetry(self.db_health)  # writes that must land
        self.pacing = Pacing(self.concurrency)
        self.sweeper = Sweeper(pool, settings)
        # Results waiting for their write before a finished job has to wait too:
        # two claims' worth, the most that can finish between two claim rounds.
        backlog = 2 * (ROUNDS + 1) * self.concurrency
        self.completer = Completer(pool, self.retry, backlog=backlog)
        self.leases = LeaseKeeper(
            pool, settings.heartbeat_interval_seconds, retry=self.retry, report=self._report
        )
        self.running, self.ready = self.leases.running, self.leases.ready
        self.executor = Executor(
            settings,
            pool,
            handlers,
            self.leases,
            self.completer,
            self.pacing,
            retry=self.retry,
            on_due=self._at,
            on_free=self._freed,
            on_failure=on_failure,
        )
        self.listener = Listener(
            self.dsn,
            self._on_nudge,
            self._on_listening,
            notify=self._notify,
            probe_every=settings.listen_probe_seconds,
            sender=self.id,
            on_state=self._listener_state,
        )
        self.registry = Registry(pool, settings, self.id, self._status, self._registry_error)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._back = asyncio.Event()  # the database answers again: end a claim backoff
        self._sweep_now = asyncio.Event()
        self._more = dict.fromkeys(TABLES, True)  # may a claim in this table find a job?
        self._gen = dict.fromkeys(TABLES, 0)  # bumped by every reason to look
        self._timers: list[float] = []  # monotonic times when a waiting job becomes due
        self._turn = 0  # which table a claim round asks first (fairness)
        self.claim_rounds = 0  # claim statements sent by the claim loop
        self.claims_by_table = dict.fromkeys(TABLES, 0)  # claim statements, by table
        self._waiting = False  # the claim loop waits for a reason to look
        self.fast_claims = 0  # notified jobs claimed by their id on the fast path
        # The fast claims (one under way at a time: a slot) and their connection,
        # kept out of the pool: opened at start, given back after an error
        # (opened again at the next notification) and at shutdown.
        self.fast = FastClaimer(pool, self.id)
        self._opening: asyncio.Task[None] | None = None
        self._uncommitted: Job | None = None  # started by a fast claim whose commit is to come
        self.notifications = 0  # valid notifications received
        self.sweeps = 0  # sweeps that ran to the end
        self.polls = 0  # looks for work by the poll timer (LISTEN_MODE=poll)
        self._side: set[asyncio.Task[Any]] = set()
        self._pause_checks: set[str] = set()  # tables whose pause notification is being checked

    @property
    def handlers(self) -> HandlerMap:
        return self.executor.handlers

    @handlers.setter
    def handlers(self, handlers: HandlerMap) -> None:
        self.executor.handlers = handlers

    @property
    def settled(self) -> bool:
        """Every reason to look so far is dealt with: the claim loop waits, no
        wake-up is pending, no fast claim or sweep is under way or asked for."""
        return (
            self._waiting
            and not self._wake.is_set()
            and not self.fast.busy
            and (self._opening is None or self._opening.done())
            and not self.sweeper.busy
            and not self._sweep_now.is_set()
        )

    @property
    def claim_queries(self) -> int:
        """Claim statements sent, fast path and claim rounds (tests check the coalescing)."""
        return sum(self.claims_by_table.values())

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
            self.leases.check_cancel(nudge.cancel)
        elif nudge.paused:  # pause_jobs: claim_jobs refuses the table; nothing to look at
            if nudge.table is not None and nudge.table not in self._pause_checks:
                self._pause_checks.add(nudge.table)
                self._spawn(self._confirm_pause(nudge.table))
        elif nudge.sweep:
            self.request_sweep()
            self._look([nudge.table] if nudge.table else TABLES)
        elif (
            nudge.job_id is None
            or nudge.table is None
            or not self._claim_notified(nudge.table, nudge.job_id)
        ):
            self._look([nudge.table] if nudge.table else TABLES)

    async def _confirm_pause(self, table: str) -> None:
        """Any role may NOTIFY a pause's payload: the log says a job type was paused
        only when ai_job_queues says so (the claims never read the payload)."""
        try:
            rows = await dal.QUEUE_PAUSES.all(self.pool)
        except Exception as exc:
            self._report(exc, "pause check")
            return
        finally:
            self._pause_checks.discard(table)
        if any(r["job_table"] == table and r["paused"] for r in rows):
            logger.bind(action="table_paused", table=table).info("job type paused")
        else:
            logger.bind(action="pause_unconfirmed", table=table).warning(
                "ignored a pause notification for a job type that is not paused"
            )

    def _claim_notified(self, table: str, job_id: UUID) -> bool:
        """Claim the notified job now, if that is the whole of the work: no other
        job of its table known to wait (a claim round takes those, in order and
        in batches), a slot free, no fast claim under way, the table not held."""
        if (
            self.fast.busy
            or self._more[table]
            or self._stop.is_set()
            or len(self.running) + len(self.ready) >= self.concurrency
            or self.executor.holds.held(table, time.monotonic())
        ):
            return False
        if not self.fast.ready:
            self._open_fast()  # for the next one: this one is a reason to look
            return False
        try:
            self.fast.claim(
                table,
                job_id,
                lambda row, exc: self._fast_claimed(table, row, exc),
                self._fast_committed,
            )
        except Exception as exc:  # not sent: the connection is broken
            self._report(exc, "claim")
            self._spawn(self.fast.close())
            return False
        self.claims_by_table[table] += 1
        return True

    def _fast_claimed(self, table: str, row: ClaimedRow | None, exc: BaseException | None) -> None:
        """The fast claim's reply (called by the event loop)."""
        if exc is not None:
            if not (self._stop.is_set() or isinstance(exc, Abandoned)):  # not the shutdown's cancel
                self._report(exc, "claim")
            self._spawn(self.fast.close())  # perhaps broken: the pool replaces it
        else:
            self.db_health.up()
            self.pacing.round_trip.add(self.fast.round_trip)
        if row is None:  # not claimable (claimed elsewhere, not due, forged): look
            self._look([table])
            return
        self.fast_claims += 1
        job = self._uncommitted = Job.from_claim(row)
        self.leases.commit_pending(job)  # its writes wait for the claim's commit
        if self._stop.is_set() or len(self.running) >= self.concurrency:
            self.ready.add([job])  # started by _fill, or released at shutdown
            self._fill()
        else:
            self.executor.start(job)

    def _fast_committed(self, exc: BaseException | None) -> None:
        """The fast claim's commit has ended (called by the event loop). The job
        started on the claim's row; if its commit failed, or its answer was lost
        with the connection, the claim may not exist: stop the job before it
        writes anything, and release it (a claim that did commit goes back to
        pending with no attempt counted; one that did not changed nothing)."""
        job, self._uncommitted = self._uncommitted, None
        if job is not None:
            self.leases.commit_ended(job, exc is None)
        if exc is not None:
            self._spawn(self.fast.close())  # retired; the next notification opens another
        if exc is None or job is None:
            return
        running = self.leases.running.get(job.id)
        self.leases.stop_job(
            job.id,
            "claim_not_committed",
            f"the claim of this job was not committed ({scrub(str(exc)) or type(exc).__name__});"
            " stopping it",
        )
        self._spawn(self._release_uncommitted(job, running.task if running else None))

    async def _release_uncommitted(self, job: Job, task: asyncio.Task[Any] | None) -> None:
        if task is not None:  # stopped first: never in two places at once
            await asyncio.wait({task})
        await self.leases.release([job], "uncommitted")
        self._look([job.table])  # pending again either way: claimed by a claim round

    def _open_fast(self) -> None:
        if self._opening is None or self._opening.done():
            self._opening = asyncio.get_running_loop().create_task(
                self._open_fast_claimer(), name="fast claimer"
            )

    async def _open_fast_claimer(self) -> None:
        try:
            await self.fast.open()
        except Abandoned:
            pass  # closed meanwhile (a LISTEN reconnect, the shutdown)
        except Exception as exc:
            self._report(exc, "claim")

    def _listener_state(self, state: str) -> None:
        if state == DEAF:  # the missed probe went through the pool: suspect it too
            self.medic.heal_soon()
        self.registry.poke()

    def _on_listening(self, recovered: bool) -> None:
        """The LISTEN connection is up. After a reconnect the notifications of the
        gap are lost, and the pool's connections may have died with it."""
        if recovered:
            self._spawn(self._catch_up())
        else:
            self.request_sweep()

    async def _catch_up(self) -> None:
        if not self.fast.busy:  # the fast claims' connection may have died with the LISTEN one
            await self.fast.close()
        await self.medic.heal()  # fresh connections first, not one failure per caller
        self._back.set()
        self.request_sweep()

    async def _notify(self, channel: str, payload: str) -> None:
        """The listener's probe, sent through the pool like any job's notification."""
        try:
            await dal.NOTIFY.run(self.pool, {"channel": channel, "payload": payload})
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

    def _freed(self) -> None:
        self._fill()
        self._wake.set()

    # -- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Work until request_stop(); then finish, release and return."""
        if not await wait_for_schema(self.pool, self.db_health, self._stop):
            return
        if self.listen and not await self.listener.service.verify(self._stop):
            return
        await self.prepare()
        if self.listen:  # the fast path claims notified jobs: none without LISTEN
            self._open_fast()
        background = [
            asyncio.create_task(self._sweeps()),
            asyncio.create_task(self.leases.heartbeats()),
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
                self.ready.add(await self.leases.release(overdue, why, retry=False))
            free = self.concurrency + self._ahead(now) - len(self.running) - len(self.ready)
            if self.fast.busy:
                free -= 1  # its slot
            holds = self.executor.holds
            wanted = [t for t in self._tables_in_turn() if not holds.held(t, now) and self._more[t]]
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
        waits = [t - now for t in self._timers[:1]] + self.executor.holds.waits(now)
        if (held := self.ready.due_in(now)) is not None:
            waits.append(held)
        self._waiting = True
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(waits, default=None)):
                    await self._wake.wait()
        finally:
            self._waiting = False

    def _ahead(self, now: float) -> int:
        oldest = min((r.since for r in self.running.values()), default=now)
        return self.pacing.ahead(running_for=now - oldest)

    def _tables_in_turn(self) -> list[str]:
        self._turn = (self._turn + 1) % len(TABLES)
        return [*TABLES[self._turn :], *TABLES[: self._turn]]

    async def _claim_round(self, tables: list[str], free: int) -> bool:
        for table in tables:
            gen = self._gen[table]
            self.claim_rounds += 1
            self.claims_by_table[table] += 1
            done = self.completer.take(table)  # finished jobs ride along: one commit
            params = {"table": table, "worker": self.id, "n": free}
            t0 = time.perf_counter()
            try:
                if done:
                    params |= completion_params(table, done)
                    both = await with_catalog(self.pool, dal.COMPLETE_AND_CLAIM, params)
                else:
                    rows: Sequence[ClaimedRow] = await dal.CLAIM_JOBS.all(self.pool, params)
            except Exception as exc:
                if done:
                    await self.completer.settle(done, None)
                self._report(exc, "claim")
                return False
            self.db_health.up()
            self.pacing.round_trip.add(time.perf_counter() - t0)
            if done:
                await self.completer.settle(done, [r["id"] for r in both if r["kind"] == "done"])
                rows = [r for r in both if r["kind"] == "claimed"]
            if len(rows) < free and gen == self._gen[table]:
                self._more[table] = False  # nothing more until the next reason to look
            self.ready.add([Job.from_claim(rec) for rec in rows])
            self._fill()
            free -= len(rows)
            if free <= 0:
                break
        return True

    def _fill(self) -> None:
        """Start claimed jobs in the free slots."""
        while self.ready and len(self.running) < self.concurrency and not self._stop.is_set():
            self.executor.start(self.ready.pop())

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
        row = await dal.CLAIM_JOBS.first(self.pool, {"table": table, "worker": self.id, "n": 1})
        if row is None:
            return None
        job = Job.from_claim(row)
        side = [
            asyncio.create_task(self.completer.run()),
            asyncio.create_task(self.leases.heartbeats()),
        ]
        try:
            outcome = await self.executor.start(job)
            await self.completer.drain()
        finally:
            for t in side:
                t.cancel()
            await asyncio.gather(*side, return_exceptions=True)
        return job, outcome

    # -- background duties ------------------------------------------------------

    async def _every(self, interval: float, fn: Callable[[], Awaitable[Any]], name: str) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn()
            except Exception as exc:
                self._report(exc, name)

    async def _poll(self) -> None:
        self.polls += 1
        self._look()

    def _report(self, exc: BaseException, what: str, quiet: bool = False) -> None:
        """The database away or busy is a health transition (and, away, the pool's
        other connections are replaced at once); anything else is an error to show
        (unless `quiet`: the same duty failing again)."""
        if not self.db_health.down(exc).transient and not quiet:
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

    # -- shutdown -------------------------------------------------------------

    async def _shutdown(self, background: list[asyncio.Task[Any]]) -> None:
        grace = self.settings.shutdown_grace_seconds
        self._stop.set()  # (set already, unless the loop failed): nothing more starts
        # A claim under way: its job is held, then released below.
        await self.fast.settle(FAST_CLAIM_SHUTDOWN_WAIT)
        if self._opening is not None:
            self._opening.cancel()
            await asyncio.gather(self._opening, return_exceptions=True)
        await self.fast.close()  # a claim still under way: cancelled, its reply read
        if self.ready:  # never started: back to the queue at once, for other workers
            self.ready.add(await self.leases.release(self.ready.take_all(), "held", retry=False))
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
        self.retry.give_up_at = time.monotonic() + max(5.0, grace)
        if unfinished:
            await self.leases.release(unfinished, "unfinished")
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
