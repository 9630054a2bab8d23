"""Runs one claimed job: its handler, then how it ended, written.

Done: the outcome goes to the completer (batched `done` writes). Raised: the
failure is written (fail_job: a retry after a backoff, or the dead letter).
Handed to a provider's batch (HandedOff): nothing is written. Every provider
unavailable: the job goes back to pending until the earliest recovery
(defer_job, no attempt counted) and its lane (listener.jobs.LANES) cools down
(no claims of its jobs until then). Cancelled: the task ends and nothing is
written (the claim is gone).

`start(job)` is all a caller needs: the claim loop, `run-once`, or any path that
claimed a row itself (Job.from_claim).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal, tracing
from listener.completer import Completer
from listener.errors import HandedOff, InvalidJob, ProvidersUnavailable, error_text, scrub
from listener.jobs import (
    JOB_TYPES,
    LANE_TYPES,
    LANES,
    Gate,
    HandlerMap,
    Job,
    Outcome,
    lane_table,
    on_work_begins,
    reset_work_begins,
)
from listener.leases import LeaseKeeper, Retry
from listener.pacing import Pacing
from listener.settings import Settings

FailureHook = Callable[[Job, BaseException], None]


R = TypeVar("R")


class Cooldowns:
    """Lanes (listener.jobs.LANES: a table's jobs, or a media table's of one type)
    whose claims are held: every provider of a job was unavailable (the job went
    back to pending), or the claim gate said not now. Held until a moment
    (monotonic); the claim loop then looks again, asking the gate first where
    there is one, so that one wait ends in one look, not in claims made only to
    put the jobs back. A hold is logged when it starts and when claims resume,
    once; a quota's holds, routine under load, at debug level."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._loud: set[str] = set()  # holds logged as warnings: their end is logged too
        self._quota: set[str] = set()  # holds for per-minute quotas alone

    def __contains__(self, lane: object) -> bool:
        return lane in self._until

    def start(self, lane: str, seconds: float, reason: str, *, quota: bool = False) -> None:
        """Hold `lane` for `seconds`; a hold that is not over (resumed) yet goes on.
        `quota`: held for per-minute quotas alone (logged quietly; batch jobs, which
        make no per-minute call, are claimed meanwhile: held_for_quota)."""
        now = time.monotonic()
        new = lane not in self._until
        over = not self.cooling(lane, now)  # the hold before, if any, is over
        self._until[lane] = now + seconds
        if quota and (over or lane in self._quota):
            self._quota.add(lane)
        else:
            self._quota.discard(lane)
        if not new:
            return
        what = f"no {_jobs_of(lane)} jobs claimed for {seconds:.1f}s ({reason})"
        log = logger.bind(
            action="claims_held", table=lane_table(lane), lane=lane, seconds=round(seconds, 1)
        )
        if quota:
            log.debug(what)
        else:
            self._loud.add(lane)
            log.warning(f"every provider is unavailable: {what}")

    def cooling(self, lane: str, now: float) -> bool:
        until = self._until.get(lane)
        return until is not None and until > now

    def held_for_quota(self, lane: str, now: float) -> bool:
        """`lane` is held, for per-minute quotas alone."""
        return lane in self._quota and self.cooling(lane, now)

    def resume(self, lane: str) -> None:
        """Claims of `lane` go on (its hold, if any, is over)."""
        self._quota.discard(lane)
        if self._until.pop(lane, None) is not None and lane in self._loud:
            self._loud.discard(lane)
            logger.bind(action="claims_resumed", table=lane_table(lane), lane=lane).info(
                f"claiming {_jobs_of(lane)} jobs again"
            )

    def end(self, lanes: list[str]) -> None:
        """End these holds now: the claim loop looks (and asks the gate) again."""
        for lane in lanes:
            if lane in self._until:
                self._until[lane] = 0.0

    def waits(self, now: float) -> list[float]:
        """Seconds until each cooldown ends."""
        return [until - now for until in self._until.values() if until > now]


def _jobs_of(lane: str) -> str:
    """What a log line calls a lane's jobs: course, media, image, audio."""
    return LANE_TYPES.get(lane) or JOB_TYPES.get(lane, lane)


class Executor:
    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool[Any],
        handlers: HandlerMap,
        leases: LeaseKeeper,
        completer: Completer,
        pacing: Pacing,
        *,
        retry: Retry[Any],
        on_due: Callable[[float], None],
        on_free: Callable[[], None],
        on_failure: FailureHook | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.handlers = handlers
        self.leases = leases
        self.completer = completer
        self.pacing = pacing
        self.retry = retry  # writes that must land (outage.AwayRetry)
        self.on_due = on_due  # a job waits: look again in that many seconds
        self.on_free = on_free  # a slot is free
        self.on_failure = on_failure  # telemetry of a failed attempt
        self.gate = gate  # how many jobs of a table may be claimed now (providers' state)
        self.cooldowns = Cooldowns()

    def lanes_held(self, table: str, now: float) -> bool:
        """A lane of `table` is held or gated (its providers' state): its claims
        then go lane by lane, through the claim gate."""
        gate = self.gate
        for lane in LANES[table]:
            if self.cooldowns.cooling(lane, now) or (gate is not None and gate.gates(lane)):
                return True
        return False

    def start(self, job: Job) -> asyncio.Task[Outcome | None]:
        """Run a claimed job in a task of its own, held by the lease keeper."""
        run = self.execute(job)
        if tracing.on:  # its attempt's span, and the job's trace continued
            run = tracing.process(self.pool, job, run)
        task = asyncio.create_task(run, name=f"job {job.key}")
        self.leases.track(job, task)
        return task

    async def execute(self, job: Job) -> Outcome | None:
        """Run the handler and record the end; never raises but on cancellation."""
        # The job's fields go with each record as a bound logger would add them,
        # without binding one per job: most jobs log only two lines. "job started"
        # waits for the job's real work (its first provider call, else the
        # handler's end): a job put back before it asked any provider never started.
        key, table, attempt = job.key, job.table, job.attempt
        begun = False

        def begin() -> None:
            nonlocal begun
            if not begun:
                begun = True
                logger.info(
                    "job started", job_id=key, table=table, attempt=attempt, action="job_started"
                )

        hook = on_work_begins(begin)
        shown = self.leases.progress.open(job)  # what the handler reports: progress.current
        t0 = time.perf_counter()
        try:
            handler = self.handlers.get(job.table)
            if handler is None:
                raise InvalidJob(f"No handler registered for {job.table}")
            outcome = await handler(job)
            begin()
            self.leases.progress.close(job, shown)  # no progress after the end
            shown = None
            outcome.metrics["totalDurationMs"] = round((time.perf_counter() - t0) * 1000, 3)
            if self.leases.any_uncommitted and not await self.leases.committed(job):
                return None  # the claim was not committed: nothing of it is ours to write
            self.leases.untrack(job)  # handed over: no longer ours to release
            await self.completer.add(job, outcome)
            ms = outcome.metrics["totalDurationMs"]
            logger.info(
                "job done in {ms} ms",
                job_id=key,
                table=table,
                attempt=attempt,
                action="job_done",
                ms=ms,
            )
            return outcome
        except asyncio.CancelledError:
            raise  # shutdown past the grace period, or the job was taken away
        except HandedOff:
            return None  # in a batch now (listener/batches/): nothing of it is ours
        except ProvidersUnavailable as exc:
            if await self.leases.committed(job):
                self.leases.ending(job)
                await asyncio.shield(self.defer(job, exc, job_log(job)))
            return None
        except Exception as exc:
            begin()
            if await self.leases.committed(job):
                self.leases.ending(job)
                await asyncio.shield(self.fail(job, exc, job_log(job)))
            return None
        finally:
            if shown is not None:
                self.leases.progress.close(job, shown)
            reset_work_begins(hook)
            took = time.perf_counter() - t0
            self.pacing.job_time.add(took)
            self.pacing.table_time[job.table].add(took)
            self.leases.untrack(job)
            self.on_free()

    async def fail(self, job: Job, exc: BaseException, log: Any = logger) -> None:
        """Write a failed attempt: a retry after its backoff, or the dead letter."""
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
        row = await self._write_end(
            dal.FAIL_JOB, params, log, ("job_fail_lost", "record failure"), f"failed ({message})"
        )
        if row is None:
            return
        tracing.outcome(row["status"], message)
        if row["status"] == "dead_letter":
            log.bind(action="job_dead_letter").error(f"job moved to the dead letter: {message}")
        else:
            due_in = row["due_in"] or 0.0  # a failed job always has its run_after
            self.on_due(due_in)
            log.bind(action="job_failed").warning(
                f"job failed (attempt {job.attempt}/{job.max_retries}), retry in {due_in:.1f}s: "
                f"{message}"
            )

    async def defer(self, job: Job, exc: ProvidersUnavailable, log: Any = logger) -> None:
        """Every provider is down or rate-limited: back to pending until the earliest
        recovery, no attempt counted (past PROVIDER_OUTAGE_MAX_WAIT_SECONDS of
        waiting, defer_job counts one), and no more claims of its lane until then."""
        message = scrub(exc.message, self.settings)
        params = {
            "table": job.table,
            "id": job.id,
            "token": job.claim_token,
            "wait": exc.wait_seconds,
            "reason": message,
            "max_wait": self.settings.provider_outage_max_wait_seconds,
        }
        row = await self._write_end(
            dal.DEFER_JOB,
            params,
            log,
            ("job_defer_lost", "put the job back"),
            f"deferred ({message})",
        )
        if row is None:
            return
        deferred = row["status"] == "pending" and not row["counted"]
        tracing.outcome("deferred" if deferred else row["status"], message)
        due_in = max(0.0, row["due_in"] or 0.0)
        self.cooldowns.start(job.lane, due_in, message, quota=exc.quota)
        self.on_due(due_in)
        if row["status"] == "dead_letter":
            log.bind(action="job_dead_letter").error(f"job moved to the dead letter: {message}")
        elif row["counted"]:
            log.bind(action="job_failed").warning(f"waited too long, attempt counted: {message}")
        else:
            log.bind(action="job_deferred").debug(f"job waits {due_in:.1f}s for its providers")

    async def _write_end(
        self,
        query: dal.Query[R],
        params: dict[str, Any],
        log: Any,
        lost: tuple[str, str],
        ended: str,
    ) -> R | None:
        """Write how a job ended (fail_job, defer_job), retried while the database
        is away. None, logged, when it could not be written (`lost`: the action and
        what was not done) or the job is no longer this worker's (`ended`: how it
        ended, for the log)."""
        try:
            row: R | None = await self.retry(lambda: query.first(self.pool, params))
        except Exception as write_exc:
            action, what = lost
            log.bind(action=action).error(f"could not {what}: {write_exc}")
            return None
        if row is None:
            log.bind(action="job_lost").warning(f"job {ended} but is no longer held")
        return row


def job_log(job: Job) -> Any:
    """A logger bound to the job's fields (its failure's records)."""
    return logger.bind(job_id=job.key, table=job.table, attempt=job.attempt)
