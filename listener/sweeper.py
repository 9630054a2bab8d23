"""The timer fallback's duties, each one call to a runbook SQL function that
returns what it changed (River's JobRescuer / JobCleaner, Oban's Lifeline /
Pruner). The worker calls run_once() at start-up, after every reconnect, on an
empty NOTIFY and every SWEEP_INTERVAL_SECONDS; tests call the duties directly."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import db
from listener.settings import Settings

RESCUE_PAGE = 100  # stale jobs requeued per call; the sweep calls again while pages are full
RETENTION_EVERY = 24 * 3600.0  # purge_old_jobs at most daily


@dataclass
class SweepResult:
    stale: int = 0  # processing jobs whose heartbeat was too old, marked stale
    rescued: int = 0  # stale jobs sent back to pending (or to the dead letter)
    dead_lettered: int = 0  # failed jobs out of retries moved to the dead letter
    purged: int = 0  # finished jobs deleted by retention
    due_in: float | None = None  # seconds until the next waiting job is due


class Sweeper:
    def __init__(self, pool: AsyncConnectionPool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self._last_retention: float | None = None

    async def mark_stale(self) -> int:
        async with self.pool.connection() as conn:
            rows = await db.fetch(
                conn, "mark_stale_jobs", {"seconds": self.settings.stale_after_seconds}
            )
        return len(rows)

    async def rescue_stale(self) -> int:
        total = 0
        while True:
            async with self.pool.connection() as conn:
                rows = await db.fetch(conn, "rescue_stale_jobs", {"n": RESCUE_PAGE})
            total += len(rows)
            if len(rows) < RESCUE_PAGE:  # no table filled a page: nothing left
                return total

    async def dead_letter(self) -> int:
        async with self.pool.connection() as conn:
            return len(await db.fetch(conn, "move_to_dead_letter"))

    async def retention(self, force: bool = False) -> int:
        now = time.monotonic()
        if not force and self._last_retention and now - self._last_retention < RETENTION_EVERY:
            return 0
        async with self.pool.connection() as conn:
            rows = await db.fetch(conn, "purge_old_jobs", {"days": self.settings.retention_days})
        self._last_retention = now
        return int(rows[0]["deleted"])

    async def fold_counts(self) -> int:
        """Fold the finished-status deltas into their counts (sql/017), so that
        reading the counts stays a handful of rows."""
        async with self.pool.connection() as conn:
            rows = await db.fetch(conn, "fold_counts")
        return int(rows[0]["folded"])

    async def next_due(self) -> float | None:
        async with self.pool.connection() as conn:
            rows = await db.fetch(conn, "next_job_due")
        seconds = rows[0]["seconds"]
        return None if seconds is None else float(seconds)

    async def run_once(self) -> SweepResult:
        r = SweepResult()
        r.stale = await self.mark_stale()
        r.rescued = await self.rescue_stale()
        r.dead_lettered = await self.dead_letter()
        r.purged = await self.retention()
        await self.fold_counts()
        r.due_in = await self.next_due()
        counts = {k: v for k, v in asdict(r).items() if k != "due_in" and v}
        if counts:
            logger.bind(action="sweep", **counts).info(
                "sweep: " + ", ".join(f"{k} {v}" for k, v in counts.items())
            )
        return r
