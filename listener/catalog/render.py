"""courses/catalog.json, rendered from the catalog's rows in batches: at most once
per CATALOG_BATCH_JOBS rows saved by this process, or CATALOG_BATCH_SECONDS
after the first one not yet rendered, and once more at shutdown. In a worker a
render runs beside the jobs, never holding one up, and takes at most a fifth of
the process's time (docs/design.md, "A course's catalog row rides with its
completion")."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.outage import diagnose
from listener.rows import CatalogRow
from listener.storage import Storage

CATALOG_PATH = "courses/catalog.json"
CATALOG_VERSION = 1
DB_WAIT_SECONDS = 2.0  # for a pool connection
RENDER_TIMEOUT_SECONDS = 30.0  # a render stuck on a half-open connection gives up
RENDER_SHARE = 4.0  # the pause after a render, in lengths of that render


class Renderer:
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
        self.beside = False  # in a worker: renders start beside the jobs, on a timer
        self.renders = 0
        self._unrendered = 0  # rows saved since the last render began
        self._first_unrendered: float | None = None
        self._lock = asyncio.Lock()
        self._pause = 0.0  # after the last render, before the next (beside the jobs)
        self._took = 0.0  # seconds, the last render
        self._rendered_at = 0.0  # monotonic end of the last render
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    @property
    def unrendered(self) -> int:
        return self._unrendered

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def landed(self, n: int) -> None:
        """n rows reached the database: count them for the next render, and beside
        the jobs start it when it is due."""
        self._unrendered += n
        if self._first_unrendered is None:
            self._first_unrendered = time.monotonic()
        if self.beside:
            self._kick()

    def due(self) -> bool:
        since = self._first_unrendered
        if since is None:
            return False
        now = time.monotonic()
        if self.beside and now - self._rendered_at < self._pause:
            return False  # the last render was long: the worker has other work (a timer waits)
        # A render is started its own length early, to be written on time.
        late = now - since >= self.batch_seconds - self._took
        return self._unrendered >= self.batch_jobs or late

    def _kick(self) -> None:
        """A render beside the jobs: now if it is due, else when it will be
        (CATALOG_BATCH_SECONDS after the first row not yet rendered)."""
        since = self._first_unrendered
        if since is None or self._task is not None or self._closing:
            return  # nothing to render, or a render under way (its end looks again)
        if self.due():
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._task = asyncio.get_running_loop().create_task(
                self._render_then_look(), name="catalog render"
            )
        elif self._timer is None:
            due = since + self.batch_seconds - self._took
            wait = max(due, self._rendered_at + self._pause)
            delay = max(0.0, wait - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._kick()

    async def _render_then_look(self) -> None:
        try:
            rendered = await self.render_quietly(self.due)
        finally:
            self._task = None
        if rendered:
            self._kick()  # rows that landed during the render; after a failure, the tick

    async def close(self) -> None:
        """No more renders beside the jobs; the one under way is cancelled (it may
        hang on a half-open connection: the last render, on a fresh one, covers
        its rows)."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def render_quietly(self, still_needed: Callable[[], bool] | None = None) -> bool:
        """Render if still needed; False if it failed (logged). The courses are
        stored and their rows saved: a failed render only delays the file, and the
        next tick tries again."""
        try:
            async with self._lock:
                # Jobs that finished together all found the batch full; the first
                # render covers them, and the others have nothing left to do.
                if still_needed is None or still_needed():
                    async with asyncio.timeout(RENDER_TIMEOUT_SECONDS):
                        await self._render()
        except TimeoutError:
            logger.bind(action="catalog_render_failed").warning(
                "catalog render failed (will retry): database busy: no answer in {:g} s",
                RENDER_TIMEOUT_SECONDS,
            )
            return False
        except Exception as exc:
            logger.bind(action="catalog_render_failed").warning(
                "catalog render failed (will retry): {}", diagnose(exc, self.pool)
            )
            return False
        return True

    async def render(self) -> int:
        """Write courses/catalog.json from every row; returns the number of courses."""
        async with self._lock:
            return await self._render()

    async def _render(self) -> int:
        if self.pool is None:
            return 0
        t0 = time.monotonic()
        async with (
            self.pool.connection(timeout=DB_WAIT_SECONDS) as conn,
            conn.transaction(),
        ):
            # Renders from every process take turns, and each writes every row, so
            # no entry is lost whichever process renders last.
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
        self._rendered_at = time.monotonic()
        self._took = self._rendered_at - t0
        self._pause = RENDER_SHARE * self._took
        logger.bind(action="catalog_rendered", courses=len(rows)).debug("catalog rendered")
        return len(rows)


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
