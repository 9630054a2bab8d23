"""The course catalog: one database row per finished course (sql/006), rendered to
courses/catalog.json in batches.

A render happens at most once per CATALOG_BATCH_JOBS courses this process finished,
or CATALOG_BATCH_SECONDS after the first one not yet rendered (the worker's tick),
and once more at shutdown (the runbook: "batch catalog updates"). Renders from
every process take turns on an advisory lock and each writes every row, so no
entry is ever lost, whichever process renders last.

A job does not wait for the database: while it is unreachable, finished courses
keep their rows in memory and the tick saves them once it is back (the worker,
too, writes completions when the database returns). Only a process that dies
during an outage loses such rows; the course files themselves are stored.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.course_schema import Course
from listener.outage import diagnose
from listener.rows import CachedCourseRow, CatalogRow
from listener.storage import Storage

CATALOG_PATH = "courses/catalog.json"
CATALOG_VERSION = 1
# How long a job waits for the database on the catalog's account before it moves
# on (a cache lookup counts as a miss, a row is saved later).
DB_WAIT_SECONDS = 2.0
RENDER_TIMEOUT_SECONDS = 30.0  # a render stuck on a half-open connection gives up


class Catalog:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any] | None,
        storage: Storage,
        batch_jobs: int,
        batch_seconds: float,
    ) -> None:
        self.pool = pool
        self.storage = storage
        self.batch_jobs = batch_jobs
        self.batch_seconds = batch_seconds
        self.renders = 0
        self._unrendered = 0
        self._first_unrendered: float | None = None
        self._lock = asyncio.Lock()
        self._unsaved: list[dict[str, Any]] = []
        self._save_lock = asyncio.Lock()

    @property
    def unrendered(self) -> int:
        return self._unrendered

    @property
    def unsaved(self) -> int:
        return len(self._unsaved)

    async def record(
        self,
        course: Course,
        *,
        job_id: UUID,
        result_path: str,
        cache_key: str | None,
        provider: str,
        model: str,
    ) -> None:
        """Add or replace the course's row; render when the batch is full."""
        if self.pool is None:
            return
        self._unsaved.append(
            {
                "course_id": course.id,
                "job_id": job_id,
                "subject": course.subject,
                "title": course.title,
                "description": course.description,
                "level": course.level,
                "language": course.language,
                "group_count": len(course.groups),
                "item_count": course.item_count,
                "result_path": result_path,
                "cache_key": cache_key,
                "provider": provider,
                "model": model,
            }
        )
        await self.save_quietly()
        self._unrendered += 1
        if self._first_unrendered is None:
            self._first_unrendered = time.monotonic()
        # A render under way may hang on a connection gone half-open: a job never
        # waits for it. Its row is counted, and the next tick renders it.
        if self._due() and not self._lock.locked():
            await self.render_quietly(self._due)

    def _due(self) -> bool:
        since = self._first_unrendered
        return self._unrendered >= self.batch_jobs or (
            since is not None and time.monotonic() - since >= self.batch_seconds
        )

    async def save_quietly(self) -> None:
        """Save the rows not yet in the database; on failure keep them for the tick."""
        if self.pool is None or not self._unsaved or self._save_lock.locked():
            return  # the running save takes every row, ours included
        async with self._save_lock:
            try:
                async with asyncio.timeout(DB_WAIT_SECONDS * 2):
                    async with self.pool.connection(timeout=DB_WAIT_SECONDS) as conn:
                        while self._unsaved:
                            await dal.CATALOG_UPSERT.run(conn, self._unsaved[0])
                            self._unsaved.pop(0)
            except Exception as exc:
                logger.bind(action="catalog_save_deferred", unsaved=len(self._unsaved)).warning(
                    "catalog rows saved later ({})", diagnose(exc, self.pool)
                )

    async def tick(self) -> None:
        await self.save_quietly()
        if self._due():
            await self.render_quietly(self._due)

    async def flush(self) -> None:
        await self.save_quietly()
        if self._unrendered:
            await self.render_quietly(lambda: self._unrendered > 0)
        if self._unsaved:
            lost = [r["course_id"] for r in self._unsaved]
            logger.bind(action="catalog_rows_lost", courses=lost).error(
                "catalog rows not saved (database unavailable at shutdown); "
                "the courses are stored and will be listed when they are regenerated"
            )

    async def render_quietly(self, still_needed: Callable[[], bool] | None = None) -> None:
        # The courses are stored and their rows saved; a failed render only delays
        # the file, and the next tick tries again.
        try:
            async with self._lock:
                # Jobs that finished together all found the batch full; the first
                # render covers them, and the others have nothing left to do.
                if still_needed is None or still_needed():
                    async with asyncio.timeout(RENDER_TIMEOUT_SECONDS):
                        await self._render()
        except Exception as exc:
            logger.bind(action="catalog_render_failed").warning(
                "catalog render failed (will retry): {}", diagnose(exc, self.pool)
            )

    async def render(self) -> int:
        """Write courses/catalog.json from every row; returns the number of courses."""
        async with self._lock:
            return await self._render()

    async def _render(self) -> int:
        if self.pool is None:
            return 0
        if self._unsaved:
            raise RuntimeError("catalog rows wait for the database")
        async with (
            self.pool.connection(timeout=DB_WAIT_SECONDS) as conn,
            conn.transaction(),
        ):
            await dal.CATALOG_RENDER_LOCK.run(conn)
            # Rows saved from here on are this render's or a later one's.
            pending, self._unrendered, self._first_unrendered = self._unrendered, 0, None
            try:
                rows = await dal.CATALOG_ROWS.all(conn)
                await self.storage.write(CATALOG_PATH, render_catalog(rows), "application/json")
            except BaseException:
                self._unrendered += pending
                self._first_unrendered = self._first_unrendered or time.monotonic()
                raise
        self.renders += 1
        logger.bind(action="catalog_rendered", courses=len(rows)).debug("catalog rendered")
        return len(rows)

    async def cached(self, cache_key: str, ttl_seconds: float) -> CachedCourseRow | None:
        """The newest catalog row made from this request, if recent enough. Best effort:
        without the database it is a miss, and the job goes on to the providers."""
        if self.pool is None or ttl_seconds <= 0:
            return None
        try:
            async with asyncio.timeout(DB_WAIT_SECONDS * 2):
                async with self.pool.connection(timeout=DB_WAIT_SECONDS) as conn:
                    row = await dal.COURSE_CACHE_LOOKUP.first(
                        conn, {"cache_key": cache_key, "ttl": ttl_seconds}
                    )
        except Exception as exc:
            logger.bind(action="course_cache_unavailable").warning(
                "course cache skipped ({})", diagnose(exc, self.pool)
            )
            return None
        return row


def render_catalog(rows: list[CatalogRow]) -> bytes:
    courses = [
        {
            "id": r["course_id"],
            "title": r["title"],
            "subject": r["subject"],
            "description": r["description"],
            "level": r["level"],
            "language": r["language"],
            "groups": r["group_count"],
            "items": r["item_count"],
            "path": r["result_path"],
            "jobId": str(r["job_id"]),
            "provider": r["provider"],
            "model": r["model"],
            "createdAt": r["created_at"].isoformat(),
            "updatedAt": r["updated_at"].isoformat(),
        }
        for r in rows
    ]
    doc = {
        "version": CATALOG_VERSION,
        "generatedAt": datetime.now(UTC).isoformat(),
        "count": len(courses),
        "courses": courses,
    }
    return json.dumps(doc, ensure_ascii=False, indent=1).encode()
