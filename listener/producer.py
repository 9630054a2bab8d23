"""The producer (River's name): claims jobs when there is a reason to look, as many
as the free slots allow (and, for short jobs, some ahead: pacing.py), and
starts them in the executor. Reasons to look: a notification, a freed slot, a
due retry, a sweep, a poll tick; a burst of them is one claim round, since they
only set flags and one event. A notification that names its job alone takes
the fast path (fastpath.py) when the producer knows of no other job of its
table; the finished jobs of a table ride on its next claim (Completer.claim).

A table's claims are held or metered by lane (listener.jobs.LANES): while a lane
of the media table is held or gated, its image and speech jobs are claimed by
type, each within its own limit, in one claim (sql/038), so that one model's
spent quota does not hold the other's."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Collection, Sequence
from uuid import UUID

from listener import dal, db
from listener.completer import Completer
from listener.executor import Executor
from listener.fastclaim import FastClaimer
from listener.fastpath import FastPath
from listener.jobs import FREE, JOB_TYPES, LANE_TYPES, LANES, Job, lane_of, lane_table
from listener.leases import LeaseKeeper
from listener.outage import Backoff, Health, Reporter
from listener.pacing import Pacing
from listener.rows import ClaimedRow

TABLES = tuple(JOB_TYPES)
ALL_LANES = tuple(lane for t in TABLES for lane in LANES[t])
# The lane whose quota hold lets a table's batch jobs be claimed alone: a media
# table's batch jobs are images (sql/033).
BATCH_LANES = {t: lane_of(t, "image") for t in TABLES}
# A held table's batch jobs are looked for at most this often once a look found
# none (producer._batch_round).
BATCH_LOOK_SECONDS = 1.0


class Producer:
    def __init__(
        self,
        pool: db.WorkPool,
        worker_id: str,
        executor: Executor,
        completer: Completer,
        health: Health,
        report: Reporter,
        stop: asyncio.Event,
    ) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.executor = executor
        self.leases: LeaseKeeper = executor.leases
        self.pacing: Pacing = executor.pacing
        self.completer = completer
        self.health = health
        self.report = report
        self.stop = stop  # the worker's: nothing more is claimed or started
        self.fast = FastPath(
            FastClaimer(pool, worker_id),
            executor,
            health,
            report=report,
            look=self.look_at,
            wake=self.wake,
            stopping=stop.is_set,
        )
        self.db_back = asyncio.Event()  # the database answers again: end a claim backoff
        self.claim_rounds = 0  # claim statements of the claim loop, all tables
        self._round_claims = dict.fromkeys(TABLES, 0)  # ... by table
        self._wake = asyncio.Event()
        self._may_find = dict.fromkeys(ALL_LANES, True)  # may a claim of this lane find a job?
        # Tables whose batch jobs go to a provider's Batch API (listener/batches/):
        # while such a table is held for a per-minute quota, its batch jobs, which
        # make no per-minute call, are claimed alone (sql/033).
        self.batch_tables: frozenset[str] = frozenset()
        self._batch_may_find = dict.fromkeys(TABLES, True)
        self._batch_next = dict.fromkeys(TABLES, 0.0)  # no batch claim before (monotonic)
        self._looks = dict.fromkeys(TABLES, 0)  # reasons to look so far, by table
        self._timers: list[float] = []  # monotonic times when a waiting job becomes due
        self._turn = 0  # which table a claim round asks first (fairness)
        self._waiting = False  # the loop waits for a reason to look
        # A notified table's look put off by the spread: one a table (the first
        # goes first and finds the later jobs too).
        self._spread_looks: dict[str, asyncio.TimerHandle] = {}
        # A per-user cap is set (read at each sweep): a capped user's job waits
        # pending for one of theirs to end, so the end of a job is a reason to look
        # at every table (docs/design.md, "Fair claims").
        self.capped = False

    @property
    def settled(self) -> bool:
        """The loop waits, no wake-up or spread look pending, no fast claim under way."""
        return (
            self._waiting
            and not self._wake.is_set()
            and not self._spread_looks
            and self.fast.settled
        )

    @property
    def claims_by_table(self) -> dict[str, int]:
        """Claim statements sent, fast path and claim rounds, by table."""
        return {t: self._round_claims[t] + self.fast.claims[t] for t in TABLES}

    # -- reasons to look ----------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def look_at(self, tables: Sequence[str] = TABLES) -> None:
        for t in tables:
            for lane in LANES[t]:
                self._may_find[lane] = True
            self._batch_may_find[t] = True
            self._looks[t] += 1
        self._wake.set()

    def notified(self, table: str | None, job_id: UUID | None) -> None:
        """A notification of a job (or of a table): the fast path takes the job
        alone if the claim loop knows of no other of its table; else, a look."""
        if job_id is None or table is None:
            self.look_at([table] if table else TABLES)
        elif self._finds(table) or not self.fast.offer(table, job_id):
            # Spread as the fast path's claims are (fastpath.SPREAD_*): where
            # jobs are long, a worker that started fewer lately looks first.
            if (delay := self.fast.spread(table)) <= 0:
                self.look_at([table])
            elif table not in self._spread_looks:
                self._spread_looks[table] = asyncio.get_running_loop().call_later(
                    delay, self._spread_look, table
                )

    def _finds(self, table: str) -> bool:
        """May a claim of `table` find a job the claim loop knows of?"""
        return any(self._may_find[lane] for lane in LANES[table])

    def _spread_look(self, table: str) -> None:
        del self._spread_looks[table]
        self.look_at([table])

    def due_in(self, seconds: float | None) -> None:
        """A job waits: look again in that many seconds."""
        if seconds is not None:
            heapq.heappush(self._timers, time.monotonic() + max(0.0, seconds))
            self._wake.set()

    def slot_freed(self) -> None:
        self._fill()
        if self.capped:
            self.look_at()
        self._wake.set()

    def ended(self) -> None:
        """Jobs' ends were written (the completer's batch, or a claim's): with a
        cap set, a slot of their users is free for a job the cap held back."""
        if self.capped:
            self.look_at()

    def recheck(self) -> None:
        """The providers' state changed here (a breaker closed, a model's limits
        learned): the lanes the gate holds are looked at again at once."""
        gate, cooldowns = self.executor.gate, self.executor.cooldowns
        held = [lane for lane in ALL_LANES if lane in cooldowns and gate and gate.gates(lane)]
        if held:
            cooldowns.end(held)
            self.look_at(sorted({lane_table(lane) for lane in held}))

    # -- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Claim and start jobs until the stop event is set."""
        try:
            await self._loop()
        finally:
            for handle in self._spread_looks.values():
                handle.cancel()
            self._spread_looks.clear()

    async def _loop(self) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        while not self.stop.is_set():
            self._wake.clear()
            now = time.monotonic()
            if self._timers and self._timers[0] <= now:
                while self._timers and self._timers[0] <= now:
                    heapq.heappop(self._timers)
                self.look_at()
            await self.leases.release_overdue(now)
            ahead = self.pacing.ahead(running_for=now - self.leases.oldest_start(now))
            free = self.leases.free_slots(ahead) - (1 if self.fast.busy else 0)  # its slot
            wanted, batches = self._wanted(now)
            if free > 0 and (wanted or batches):
                self.db_back.clear()
                if await self._claim_round(wanted, free, batches):
                    backoff.reset()
                else:  # until the backoff ends, or the listener finds the database back
                    await self._sleep(backoff.next())
                continue
            await self._wait(now)

    async def _wait(self, now: float) -> None:
        """Until a reason to look, the next retry timer, a cooldown's end or a
        ready job's limit."""
        waits = [t - now for t in self._timers[:1]] + self.executor.cooldowns.waits(now)
        waits += [
            self._batch_next[t] - now
            for t in TABLES
            if self._batch_next[t] > now and self._batch_due(t, now)
        ]
        if (ready := self.leases.ready.due_in(now)) is not None:
            waits.append(ready)
        self._waiting = True
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(waits, default=None)):
                    await self._wake.wait()
        finally:
            self._waiting = False

    def _wanted(self, now: float) -> tuple[list[str], list[str]]:
        """The tables to claim from: a lane with a reason to look, and no hold;
        and the tables whose batch jobs alone to claim (their batch lane held). A
        hold whose time is over ends at the lane's next claim, or here when there
        is nothing to look for."""
        cooldowns, wanted, batches = self.executor.cooldowns, [], []
        for t in self._tables_in_turn():
            finds = False
            for lane in LANES[t]:
                if cooldowns.cooling(lane, now):
                    continue
                if self._may_find[lane]:
                    finds = True
                else:
                    cooldowns.resume(lane)
            if finds:
                wanted.append(t)
            if self._batch_due(t, now) and now >= self._batch_next[t]:
                batches.append(t)
        return wanted, batches

    def _batch_due(self, table: str, now: float) -> bool:
        """Batch jobs of `table` may be waiting while a quota holds its claims."""
        return (
            table in self.batch_tables
            and self._batch_may_find[table]
            and self.executor.cooldowns.held_for_quota(BATCH_LANES[table], now)
        )

    def _tables_in_turn(self) -> list[str]:
        self._turn = (self._turn + 1) % len(TABLES)
        return [*TABLES[self._turn :], *TABLES[: self._turn]]

    async def _claim_round(self, tables: list[str], free: int, batches: list[str]) -> bool:
        for table in tables:
            got = await self._claim_table(table, free)
            if got is None:
                return False
            free -= got
            if free <= 0:
                return True
        return await self._batch_round(batches, free)

    async def _claim_table(self, table: str, free: int) -> int | None:
        """Claim and start up to `free` jobs of `table`: the table whole (what the
        gate admits, for a table of one lane) while no lane of it is held or
        gated; else its lanes that may be claimed, each up to what its gate
        admits (a gated lane) or `free`, in one claim. How many were claimed;
        None if the claim failed."""
        cooldowns, lanes = self.executor.cooldowns, LANES[table]
        whole = len(lanes) == 1 or not self.executor.lanes_held(table, time.monotonic())
        limits: dict[str, int] = {}
        for lane in lanes:
            if cooldowns.cooling(lane, time.monotonic()):
                continue  # held (maybe since the round began: a job found no provider)
            if (whole or self._may_find[lane]) and (n := await self._admitted(lane, free)):
                limits[lane] = n
        if not limits:
            return 0  # held: the gate said when to look again
        return await self._claim(table, limits, min(limits.values()) if whole else free, whole)

    async def _claim(self, table: str, limits: dict[str, int], n: int, whole: bool) -> int | None:
        """One claim of up to `n` jobs of `table`, at most limits[lane] of each
        lane's: the table whole (the finished jobs riding along), or its media
        jobs of these lanes' types."""
        looks = self._looks[table]
        self.claim_rounds += 1
        self._round_claims[table] += 1
        t0 = time.perf_counter()
        try:
            if whole:
                params = {"table": table, "worker": self.worker_id, "n": n}
                rows = await self.completer.claim(params)  # finished jobs ride along
            else:
                params = {
                    "worker": self.worker_id,
                    "n": n,
                    "types": [LANE_TYPES[lane] for lane in limits],
                    "limits": list(limits.values()),
                }
                rows = await dal.CLAIM_MEDIA.all(self.pool, params)
        except Exception as exc:
            await self._claimed(dict.fromkeys(limits, 0))
            self.report(exc, "claim")
            return None
        got = _by_lane(rows, limits) if not whole else dict.fromkeys(limits, len(rows))
        await self._claimed(got)
        self.health.up()
        self.pacing.round_trip.add(time.perf_counter() - t0)
        if len(rows) < n and looks == self._looks[table]:
            for lane, limit in limits.items():  # nothing more until the next reason to look
                if got[lane] < limit:
                    self._may_find[lane] = False
        self._start(rows)
        return len(rows)

    async def _batch_round(self, tables: list[str], free: int) -> bool:
        """The batch jobs alone of these held tables, in the slots the others left.
        One that finds fewer than it asked for is not asked again for a second
        (BATCH_LOOK_SECONDS), whatever the notifications: while a quota holds a
        table, every insert into it is a reason to look, and batch jobs gather
        for BATCH_COLLECT_SECONDS anyway."""
        for table in tables:
            if free <= 0:
                break
            looks = self._looks[table]
            try:
                rows = await dal.CLAIM_BATCH.all(
                    self.pool, {"table": table, "worker": self.worker_id, "n": free}
                )
            except Exception as exc:
                self.report(exc, "claim")
                return False
            self.claim_rounds += 1
            self._round_claims[table] += 1
            self.health.up()
            if len(rows) < free:
                self._batch_next[table] = time.monotonic() + BATCH_LOOK_SECONDS
                if looks == self._looks[table]:
                    self._batch_may_find[table] = False
            self._start(rows)
            free -= len(rows)
        return True

    async def _admitted(self, lane: str, free: int) -> int:
        """How many jobs of `lane` to claim: the free slots, or what the claim
        gate admits (the providers' breakers and quotas); 0 holds the lane."""
        gate, cooldowns = self.executor.gate, self.executor.cooldowns
        n = free
        if gate is not None and gate.gates(lane):
            try:
                admitted = await gate.admit(lane, free)
            except Exception as exc:  # never the claim loop's end: claim as without it
                self.report(exc, "claim gate")
                admitted = FREE
            if admitted.n == 0:
                cooldowns.start(lane, admitted.wait, admitted.reason, quota=admitted.quota)
                return 0
            if admitted.n is not None:
                n = min(free, admitted.n)
        cooldowns.resume(lane)
        return n

    async def _claimed(self, got: dict[str, int]) -> None:
        """The gate's reservations of each admitted lane beyond its jobs claimed go back."""
        if self.executor.gate is not None:
            for lane, n in got.items():
                await self.executor.gate.claimed(lane, n)

    def _start(self, rows: Sequence[ClaimedRow]) -> None:
        if rows:
            self.fast.started_here(len(rows))
        self.leases.ready.add([Job.from_claim(rec) for rec in rows])
        self._fill()

    def _fill(self) -> None:
        """Start ready jobs in the free slots."""
        while self.leases.ready and self.leases.can_start() and not self.stop.is_set():
            self.executor.start(self.leases.ready.pop())

    async def _sleep(self, seconds: float) -> None:
        """For `seconds`, or until stopped or the database is back."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self.stop, self.db_back)]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


def _by_lane(rows: Sequence[ClaimedRow], lanes: Collection[str]) -> dict[str, int]:
    """The jobs claimed of each of these lanes (a job of no type is of none)."""
    got = dict.fromkeys(lanes, 0)
    for row in rows:
        lane = lane_of(row["job_table"], row["job"].get("media_type"))
        if lane in got:
            got[lane] += 1
    return got
