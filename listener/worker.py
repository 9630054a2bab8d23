"""The long-running worker process: its rooms wired together, started, and shut
down in order. The producer claims and starts jobs, the executor runs them, the
lease keeper holds them, the completer writes their ends; the listener, the
sweeper and the registry run beside them (docs/design.md, "The worker")."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from loguru import logger

from listener import dal, db
from listener.completer import Completer
from listener.executor import Executor, FailureHook
from listener.jobs import Gate, HandlerMap
from listener.leases import LeaseKeeper
from listener.listen import DEAF
from listener.medic import PoolMedic
from listener.migrate import wait_for_schema
from listener.notifications import Listener, Nudge, probe_through
from listener.outage import AwayRetry, Health, Reporter, every
from listener.pacing import ROUNDS, Pacing
from listener.producer import TABLES, Producer
from listener.registry import POLLING, Registry, Status, make_worker_id
from listener.settings import Settings
from listener.sweeper import Sweeper, SweepResult

Periodic = tuple[float, Callable[[], Awaitable[Any]], str]
SHUTDOWN_BACKGROUND_SECONDS = 10.0  # a cancelled background task gets this long to end
POLL_INTERVAL_SECONDS = 1.0  # LISTEN_MODE=poll: how often the worker looks for work

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
        gate: Gate | None = None,
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
        self._stop = asyncio.Event()
        self._sweep_now = asyncio.Event()
        self.medic = PoolMedic(pool)
        self.db_health = Health(
            "database", pool=pool, heal=self.medic.heal_soon, back=self._database_back
        )
        self.report = Reporter(self.db_health, settings)  # a duty's failure: health or error
        self.retry = AwayRetry(self.db_health)  # writes that must land
        self.pacing = Pacing(self.concurrency)
        self.sweeper = Sweeper(pool, settings)
        # Results waiting for their write before a finished job has to wait too:
        # two claims' worth, the most that can finish between two claim rounds.
        backlog = 2 * (ROUNDS + 1) * self.concurrency
        self.completer = Completer(pool, self.retry, backlog=backlog)
        interval = settings.heartbeat_interval_seconds
        self.leases = LeaseKeeper(
            pool,
            interval,
            retry=self.retry,
            report=self.report,
            concurrency=self.concurrency,
            progress_interval=settings.progress_interval_seconds,
        )
        self.executor = Executor(
            settings,
            pool,
            handlers,
            self.leases,
            self.completer,
            self.pacing,
            retry=self.retry,
            on_due=lambda seconds: self.producer.due_in(seconds),
            on_free=lambda: self.producer.slot_freed(),
            on_failure=on_failure,
            gate=gate,
        )
        self.producer = Producer(
            pool, self.id, self.executor, self.completer, self.db_health, self.report, self._stop
        )
        if gate is not None:  # a breaker closed, a quota learned: held tables looked at again
            gate.on_change = self.producer.recheck
        self.completer.on_written = self.producer.ended
        self.fast = self.producer.fast
        self.listener = Listener(
            self.dsn,
            self._on_nudge,
            self._on_listening,
            notify=probe_through(pool, self.report),
            probe_every=settings.listen_probe_seconds,
            sender=self.id,
            on_state=self._listener_state,
        )
        self.registry = Registry(
            pool, settings, self.id, self._status, lambda exc: self.report(exc, "registry")
        )
        self.notifications = 0  # valid notifications received
        self.sweeps = 0  # sweeps that ran to the end
        self.polls = 0  # looks for work by the poll timer (LISTEN_MODE=poll)
        self._side: set[asyncio.Task[Any]] = set()
        self._pause_checks: set[str] = set()  # tables whose pause notification is checked

    @property
    def handlers(self) -> HandlerMap:
        return self.executor.handlers

    @handlers.setter
    def handlers(self, handlers: HandlerMap) -> None:
        self.executor.handlers = handlers

    @property
    def settled(self) -> bool:
        """Every reason to look so far is dealt with: the producer waits, no fast
        claim or sweep is under way or asked for."""
        return self.producer.settled and not self.sweeping

    @property
    def sweeping(self) -> bool:
        """A sweep is under way or asked for."""
        return self.sweeper.busy or self._sweep_now.is_set()

    @property
    def claim_queries(self) -> int:
        """Claim statements sent, fast path and claim rounds (tests check the coalescing)."""
        return sum(self.producer.claims_by_table.values())

    def request_stop(self) -> None:
        self._stop.set()
        self.producer.wake()

    def request_sweep(self) -> None:
        self._sweep_now.set()

    # -- the listener's side --------------------------------------------------------

    def _on_nudge(self, nudge: Nudge) -> None:
        self.notifications += 1
        table = nudge.table
        if nudge.cancel is not None:  # cancel_job, or anyone's NOTIFY: checked first
            self.leases.check_cancel(nudge.cancel)
        elif nudge.paused:  # pause_jobs: claim_jobs refuses the table; nothing to look at
            if table is not None and table not in self._pause_checks:
                self._pause_checks.add(table)
                self._spawn(self._confirm_pause(table))
        elif nudge.sweep:
            self.request_sweep()
            self.producer.look_at([table] if table else TABLES)
        else:
            self.producer.notified(table, nudge.job_id)

    async def _confirm_pause(self, table: str) -> None:
        """Any role may NOTIFY a pause's payload: the log says a job type was paused
        only when ai_job_queues says so (the claims never read the payload)."""
        try:
            rows = await dal.QUEUE_PAUSES.all(self.pool)
        except Exception as exc:
            self.report(exc, "pause check")
            return
        finally:
            self._pause_checks.discard(table)
        if any(r["job_table"] == table and r["paused"] for r in rows):
            logger.bind(action="table_paused", table=table).info("job type paused")
        else:
            logger.bind(action="pause_unconfirmed", table=table).warning(
                "ignored a pause notification for a job type that is not paused"
            )

    def _database_back(self) -> None:
        """The database answers again (any duty's query) after an outage. The
        LISTEN connection may have survived it, waiting for TCP's retransmission
        (a link that was down): it is pinged now, and the claim loop's backoff
        ends, which nothing else would end for up to its cap."""
        self.producer.db_back.set()
        if self.listen:
            self.listener.service.suspect()

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
        await self.fast.reconnected()
        await self.medic.heal()  # fresh connections first, not one failure per caller
        self.producer.db_back.set()
        self.request_sweep()

    def _status(self) -> Status:
        service = self.listener.service
        return Status(
            listener_state=service.state if self.listen else POLLING,
            jobs_running=len(self.leases.running),
            probe_seconds=service.probe_seconds,
            reconnects=service.reconnects,
        )

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    # -- start and stop -----------------------------------------------------------

    async def run(self) -> None:
        """Work until request_stop(); then finish, release and return."""
        if not await wait_for_schema(self.pool, self.db_health, self._stop):
            return
        if self.listen and not await self.listener.service.verify(self._stop):
            return
        await self.prepare()
        if self.listen:  # the fast path claims notified jobs: none without LISTEN
            self.fast.open()
        duties = [*self.periodic, (self.medic.WATCH_EVERY, self.medic.watch, "pool watch")]
        if not self.listen:
            duties.append((self.poll_interval, self._poll, "poll"))
        background = [
            asyncio.create_task(self._sweeps()),
            asyncio.create_task(self.leases.heartbeats()),
            asyncio.create_task(self.leases.progress_writes(), name="progress"),
            asyncio.create_task(self.completer.run()),
            asyncio.create_task(self.registry.run(), name="registry"),
            *(asyncio.create_task(every(i, fn, name, self.report)) for i, fn, name in duties),
        ]
        if self.listen:
            background.append(asyncio.create_task(self.listener.run(), name="listener"))
        mode = "listen" if self.listen else f"poll every {self.poll_interval:g}s"
        logger.bind(action="worker_started", worker=self.id).info(
            f"worker started (concurrency {self.concurrency}, {mode})"
        )
        try:
            await self.producer.run()
        finally:
            await self._shutdown(background)
            logger.bind(action="worker_stopped", worker=self.id).info("worker stopped")

    async def prepare(self) -> None:
        """Once the schema is current: the owner's start-up that needs the database."""
        if self.on_ready is not None:
            await self.on_ready()

    async def _poll(self) -> None:
        self.polls += 1
        self.producer.look_at()

    async def _sweeps(self) -> None:
        await self.sweeper.run(
            self._sweep_now, self._swept, self.producer.look_at, self._sweep_failed
        )

    def _swept(self, result: SweepResult) -> None:
        self.db_health.up()
        self.producer.due_in(result.due_in)
        self.producer.capped = result.capped
        if result.error is None:
            self.sweeps += 1

    def _sweep_failed(self, exc: BaseException, again: bool) -> None:
        self.report(exc, "sweep", quiet=again)

    async def _shutdown(self, background: list[asyncio.Task[Any]]) -> None:
        grace = self.settings.shutdown_grace_seconds
        self._stop.set()  # (set already, unless the loop failed): nothing more starts
        await self.fast.shutdown()  # a claim under way: its job is ready, released below
        unfinished = await self.leases.wind_down(grace)
        self.retry.give_up_at = time.monotonic() + max(5.0, grace)
        if unfinished:
            await self.leases.release(unfinished, "unfinished")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(5.0, grace)):
                await self.completer.drain()
        await self.registry.remove()
        background += [*self._side, *self.fast.tasks]
        for t in background:
            t.cancel()
        _, stuck = await asyncio.wait(background, timeout=SHUTDOWN_BACKGROUND_SECONDS)
        await self.leases.progress_connection.aclose()
        if stuck:
            logger.bind(action="shutdown_stuck").warning(
                f"{len(stuck)} background task(s) did not stop in time: "
                + ", ".join(t.get_name() for t in stuck)
            )
