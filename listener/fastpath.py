"""The notified job's own way in. A notification that names its job, arriving
while a slot is free and the claim loop knows of no other job of that table,
is claimed by its id at once on the fast claimer's kept connection
(fastclaim.py: the claim on the wire), from the listener's callback; the job
starts from the reply's callback, on the claim's row, before the claim's commit
has ended. Anything else (a burst, a busy worker, a claim that finds nothing)
is the claim loop's. docs/design.md, "The notified job, claimed at once",
says why and what it costs."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from listener.errors import scrub
from listener.executor import Executor
from listener.fastclaim import Abandoned, Committed, FastClaimer
from listener.jobs import JOB_TYPES, Job
from listener.leases import LeaseKeeper, Report
from listener.outage import Health
from listener.pacing import Pacing
from listener.rows import ClaimedRow

# At shutdown, a fast claim still under way (behind a table's lock) gets this
# long to end on its own; then it is cancelled (its reply still read).
SHUTDOWN_WAIT_SECONDS = 1.0

# Long jobs are spread over the workers. Every listening worker hears a
# notification and the first claim to arrive wins the job; left to the race, the
# same processes keep winning (the server wakes its listeners in an order of its
# own), and a worker that has just started, or been paused, or lost its link, may
# wait long for its first job while the others run several. So when this
# worker's jobs of the notified table take SPREAD_MIN_JOB or more on average (a
# generation: seconds to minutes), it sends its claim SPREAD_STEP later for each
# job it started in the last SPREAD_WINDOW seconds (at most SPREAD_MAX, under 5%
# of such a job): the worker that started the fewest lately wins. Shorter jobs
# start at once wherever they are heard. The claim loop's looks at a notified
# table are spread alike (producer.notified): where the claim gate counts a
# table's claims (quotas), every claim of it is the claim loop's.
SPREAD_MIN_JOB = 0.25
SPREAD_WINDOW = 10.0
SPREAD_STEP = 0.002
SPREAD_MAX = 0.012
SPREAD_STARTS = round(SPREAD_MAX / SPREAD_STEP)  # starts that count, at most

Look = Callable[[list[str]], None]


class FastPath:
    def __init__(
        self,
        claimer: FastClaimer,
        executor: Executor,
        health: Health,
        *,
        report: Report,
        look: Look,
        wake: Callable[[], None],
        stopping: Callable[[], bool],
    ) -> None:
        self.claimer = claimer
        self.executor = executor
        self.leases: LeaseKeeper = executor.leases
        self.pacing: Pacing = executor.pacing
        self.health = health
        self.report = report  # a failed claim, to the worker's health policy
        self.look = look  # tables for the claim loop to look at
        self.wake = wake  # the claim loop: a ready job's limit to wait for
        self.stopping = stopping  # the worker claims nothing more
        self.claims = dict.fromkeys(JOB_TYPES, 0)  # claim statements sent, by table
        self.started = 0  # jobs claimed (and started or made ready) here
        self.tasks: set[asyncio.Task[Any]] = set()  # closes and releases under way
        self._opening: asyncio.Task[None] | None = None
        # When its claims started jobs, lately (the spread): the last few only.
        self.starts: deque[float] = deque(maxlen=SPREAD_STARTS)
        self._deferred: asyncio.TimerHandle | None = None  # a claim sent a little later

    @property
    def busy(self) -> bool:
        """A claim is under way or about to be sent (it takes a slot until its row
        is in)."""
        return self.claimer.busy or self._deferred is not None

    @property
    def settled(self) -> bool:
        """No claim under way, the claimer not being opened."""
        return not self.busy and (self._opening is None or self._opening.done())

    def offer(self, table: str, job_id: UUID) -> bool:
        """Claim the notified job now if a slot is free, no fast claim is under
        way, the table is not cooling down and the claim gate does not count its
        claims (breakers, quotas); False: the claim loop's to take."""
        if self.busy or not self._claimable(table):
            return False
        if not self.claimer.ready:
            self.open()  # for the next one: this one is the claim loop's
            return False
        delay = self.spread(table)
        if delay > 0:
            self._deferred = asyncio.get_running_loop().call_later(
                delay, self._send_deferred, table, job_id
            )
            return True
        return self._send(table, job_id)

    def spread(self, table: str) -> float:
        """How much later this worker sends the claim of a notified job of
        `table` (SPREAD_*)."""
        job_time = self.pacing.table_time[table].value
        if job_time is None or job_time < SPREAD_MIN_JOB:
            return 0.0
        since = time.monotonic() - SPREAD_WINDOW
        while self.starts and self.starts[0] < since:
            self.starts.popleft()
        return min(SPREAD_MAX, SPREAD_STEP * len(self.starts))

    def started_here(self, n: int) -> None:
        """The claim loop started (or made ready) `n` jobs: they count in the spread."""
        now = time.monotonic()
        self.starts.extend([now] * min(n, SPREAD_STARTS))

    def _claimable(self, table: str) -> bool:
        return not (
            self.claimer.busy
            or self.stopping()
            or self.leases.free_slots() <= 0
            # Its claims are the claim loop's, which asks the gate (a notification
            # does not say the job's lane).
            or self.executor.lanes_held(table, time.monotonic())
        )

    def _send_deferred(self, table: str, job_id: UUID) -> None:
        """The spread's wait is over: claim now, unless the worker can no longer
        take the job here (then the claim loop looks at its table)."""
        self._deferred = None
        if not (self._claimable(table) and self.claimer.ready and self._send(table, job_id)):
            self.look([table])

    def _send(self, table: str, job_id: UUID) -> bool:
        try:
            self.claimer.claim(table, job_id, lambda row, exc: self._claimed(table, row, exc))
        except Exception as exc:  # not sent: the connection is broken
            self.report(exc, "claim")
            self._spawn(self.claimer.close())
            return False
        self.claims[table] += 1
        return True

    def open(self) -> None:
        """Open the claimer (a pool connection, the claim prepared) in the background."""
        if self._opening is None or self._opening.done():
            self._opening = asyncio.get_running_loop().create_task(
                self._open(), name="fast claimer"
            )

    async def _open(self) -> None:
        try:
            await self.claimer.open()
        except Abandoned:
            pass  # closed meanwhile (a LISTEN reconnect, the shutdown)
        except Exception as exc:
            self.report(exc, "claim")

    async def reconnected(self) -> None:
        """After a LISTEN reconnect: the kept connection may have died with it."""
        if not self.claimer.busy:
            await self.claimer.close()

    async def shutdown(self) -> None:
        """A claim under way gets SHUTDOWN_WAIT_SECONDS, then is cancelled (its job,
        if any, is then ready and released with the others); the connection goes back.
        A claim not yet sent is not sent."""
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        await self.claimer.settle(SHUTDOWN_WAIT_SECONDS)
        if self._opening is not None:
            self._opening.cancel()
            await asyncio.gather(self._opening, return_exceptions=True)
        await self.claimer.close()

    # -- the claim's reply and its commit, from the event loop --------------------

    def _claimed(
        self, table: str, row: ClaimedRow | None, exc: BaseException | None
    ) -> Committed | None:
        """The claim's row: start the job (or make it ready); what to call once
        its commit has ended."""
        if exc is not None:
            if not (self.stopping() or isinstance(exc, Abandoned)):  # not the shutdown's cancel
                self.report(exc, "claim")
            self._spawn(self.claimer.close())  # perhaps broken: the pool replaces it
        else:
            self.health.up()
            self.pacing.round_trip.add(self.claimer.round_trip)
        if row is None:  # not claimable (claimed elsewhere, not due, forged): look
            self.look([table])
            return None
        self.started += 1
        self.starts.append(time.monotonic())
        job = Job.from_claim(row)
        self.leases.commit_pending(job)  # its writes wait for the claim's commit
        if self.stopping() or not self.leases.can_start():
            self.leases.ready.add([job])  # started by the claim loop, or released at shutdown
            self.wake()  # the claim loop's wait takes in the ready job's limit
        else:
            self.executor.start(job)
        return lambda err: self._committed(job, err)

    def _committed(self, job: Job, exc: BaseException | None) -> None:
        """The claim's commit has ended. If it failed, or its answer was lost with
        the connection, the claim may not exist: stop the job before it writes
        anything, and release it (a claim that did commit goes back to pending
        with no attempt counted; one that did not changed nothing)."""
        self.leases.commit_ended(job, exc is None)
        if exc is None:
            return
        self._spawn(self.claimer.close())  # retired; the next notification opens another
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
        self.look([job.table])  # pending again either way: claimed by a claim round

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
