"""The timer fallback's duties, each one call to a runbook SQL function that
returns what it changed (River's JobRescuer / JobCleaner, Oban's Lifeline /
Pruner). `run()` sweeps at start-up, on request (after every reconnect, on an
empty NOTIFY) and every SWEEP_INTERVAL_SECONDS; tests call the duties directly."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.outage import Backoff, is_transient
from listener.registry import live_seconds
from listener.settings import Settings

RESCUE_PAGE = 100  # stale jobs requeued per call; the sweep calls again while pages are full
RETENTION_EVERY = 24 * 3600.0  # purge_old_jobs at most daily


@dataclass
class SweepResult:
    stale: int = 0  # processing jobs whose heartbeat was too old, marked stale
    rescued: int = 0  # stale jobs sent back to pending (or to the dead letter)
    dead_lettered: int = 0  # failed jobs out of retries moved to the dead letter
    purged: int = 0  # finished jobs deleted by retention
    expired: int = 0  # rows of worker processes that stopped beating, deleted
    due_in: float | None = None  # seconds until the next waiting job is due
    capped: bool = False  # ai_job_settings.max_running_per_user is set (sql/025)
    error: Exception | None = field(default=None, repr=False)  # the first duty that failed


class Sweeper:
    def __init__(self, pool: AsyncConnectionPool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self._last_retention: float | None = None
        self.busy = True  # run(): a sweep (and its look) under way, or the first to come

    async def mark_stale(self) -> int:
        params = {"seconds": self.settings.stale_after_seconds}
        return len(await dal.MARK_STALE_JOBS.all(self.pool, params))

    async def rescue_stale(self) -> int:
        total = 0
        while True:
            rows = await dal.RESCUE_STALE_JOBS.all(self.pool, {"n": RESCUE_PAGE})
            total += len(rows)
            if len(rows) < RESCUE_PAGE:  # no table filled a page: nothing left
                return total

    async def dead_letter(self) -> int:
        return len(await dal.MOVE_TO_DEAD_LETTER.all(self.pool))

    async def retention(self, force: bool = False) -> int:
        now = time.monotonic()
        if not force and self._last_retention and now - self._last_retention < RETENTION_EVERY:
            return 0
        row = await dal.PURGE_OLD_JOBS.one(self.pool, {"days": self.settings.retention_days})
        self._last_retention = now
        return row["deleted"]

    async def expire_workers(self) -> int:
        """The registry rows of processes that died (a clean exit removes its own)."""
        seconds = max(self.settings.stale_after_seconds, live_seconds(self.settings))
        return len(await dal.WORKERS_EXPIRE.all(self.pool, {"seconds": seconds}))

    async def fold_counts(self) -> int:
        """Fold the finished-status deltas into their counts (sql/017), so that
        reading the counts stays a handful of rows."""
        return (await dal.FOLD_COUNTS.one(self.pool))["folded"]

    async def next_due(self) -> float | None:
        return (await dal.NEXT_JOB_DUE.one(self.pool))["seconds"]

    async def capped(self) -> bool:
        """Is a per-user cap set? (The settings row missing: no cap.)"""
        row = await dal.MAX_RUNNING_PER_USER.first(self.pool)
        return row is not None and row["cap"] is not None

    async def run_once(self) -> SweepResult:
        """Every duty, each on its own: one that fails does not stop the others
        (its error is in the result). A lost database stops the sweep at once:
        the other duties would only wait for a connection in turn."""
        r = SweepResult()
        duties: tuple[tuple[str | None, Callable[[], Awaitable[int]]], ...] = (
            ("stale", self.mark_stale),
            ("rescued", self.rescue_stale),
            ("dead_lettered", self.dead_letter),
            ("purged", self.retention),
            ("expired", self.expire_workers),
            (None, self.fold_counts),  # bookkeeping, not a change worth a log line
        )
        for name, duty in duties:
            try:
                n = await duty()
            except Exception as exc:
                if is_transient(exc):  # the database away or busy
                    raise
                r.error = r.error or exc
                continue
            if name is not None:
                setattr(r, name, n)
        r.due_in = await self.next_due()
        r.capped = await self.capped()
        counts = {name: getattr(r, name) for name, _ in duties if name and getattr(r, name)}
        if counts:
            logger.bind(action="sweep", **counts).info(
                "sweep: " + ", ".join(f"{k} {v}" for k, v in counts.items())
            )
        return r

    async def run(
        self,
        requested: asyncio.Event,
        swept: Callable[[SweepResult], None],
        look: Callable[[], None],
        failed: Callable[[BaseException, bool], None],
    ) -> None:
        """Sweep now, then whenever `requested` is set, or after the interval.
        A sweep that fails (`failed(exc, again)`, `again` within one streak of
        failures) is retried with backoff until it succeeds, since the catch-up
        after a reconnect must land; every attempt, failed or not, is followed by
        `look()` (a claim round): a failed duty never hides pending work."""
        backoff = Backoff(base=0.2, cap=5.0)
        failing = False
        while True:
            requested.clear()
            self.busy = True
            try:
                result = await self.run_once()
                swept(result)
                if result.error is not None:
                    raise result.error
                if failing:
                    logger.bind(action="sweep_recovered").info("sweep: ran again")
                failing = False
                backoff.reset()
            except Exception as exc:
                failed(exc, failing)
                failing = True
            look()
            self.busy = False
            wait = backoff.next() if failing else self.settings.sweep_interval_seconds
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await requested.wait()
