"""The course catalog: one database row per finished course (sql/006), rendered to
courses/catalog.json in batches.

Saving: a finished course's row is in the database no later than its job's
`done`. In a worker, the row rides with the job's completion (the same
transaction: listener.completer.with_catalog), so it costs no
commit of its own and a process that dies loses neither or both. A handler run
without a worker (run by hand, in a test) saves its row itself before it
returns, in batches: while a save is under way, the rows of the jobs that finish
meanwhile wait for it and go together in the next (one statement, one commit
per batch). The cache lookups of jobs that start together go in one statement.

Rendering: at most once per CATALOG_BATCH_JOBS courses saved by this process,
or CATALOG_BATCH_SECONDS after the first one not yet rendered (the worker's
tick), and once more at shutdown (the runbook: "batch catalog updates"). A render
writes the rows saved so far, so it goes on under load. In a worker it never
holds a job up (it runs beside the jobs), and it takes at most a fifth of the
process's time (a render of many rows waits four times its own length after the
last one). Renders from every process take turns on an advisory lock and each
writes every row, so no entry is ever lost, whichever process renders last.

A job does not wait for the database: while it is unreachable (or does not
answer in time), rows that did not ride with a completion stay in memory and the
tick saves them once it is back. Only a process that dies during an outage loses
such rows; the course files themselves are stored. Every message says which it
was: the database away, busy (a pool with every connection in use, a statement
that did not answer in time), or an error.
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
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.course_schema import Course
from listener.errors import DatabaseBusy
from listener.outage import Diagnosis, Verdict, diagnose
from listener.rows import CachedCourseRow, CatalogRow
from listener.storage import Storage

CATALOG_PATH = "courses/catalog.json"
CATALOG_VERSION = 1
# How long a job waits for the database on the catalog's account before it moves
# on (a cache lookup counts as a miss, a row is saved later).
DB_WAIT_SECONDS = 2.0
RENDER_TIMEOUT_SECONDS = 30.0  # a render stuck on a half-open connection gives up
MAX_BATCH = 500  # rows per save statement
RENDER_SHARE = 4.0  # the pause after a render, in lengths of that render
_MISS: Any = object()  # a failed lookup, to its waiters


QUEUED, SAVING, SAVED = "queued", "saving", "saved"
RIDE_WAIT_SECONDS = 1.0  # a worker's tick saves a row no completion took in this time


class CatalogEntry:
    """One finished course's row on its way to the database: taken by its job's
    completion (`take`, then `landed` once committed, or `release` if given up),
    or saved by the catalog itself. Saved twice by accident is harmless (an
    upsert), and counted once."""

    __slots__ = ("_catalog", "row", "since", "state")

    def __init__(self, catalog: Catalog, row: dict[str, Any]) -> None:
        self._catalog = catalog
        self.row = row
        self.state = QUEUED
        self.since = time.monotonic()

    def take(self) -> dict[str, Any] | None:
        """The row, if it still needs saving; it is on its way from now on."""
        if self.state == SAVED:
            return None
        self.state = SAVING
        return self.row

    def landed(self) -> None:
        if self.state != SAVED:
            self.state = SAVED
            self._catalog._landed(1)

    def release(self) -> None:
        if self.state == SAVING:
            self.state = QUEUED


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
        # Set by a worker whose completions carry the rows (listener.app).
        self.rides = False
        self.renders = 0
        self.saves = 0  # save statements of the catalog's own that committed
        self.lookups = 0  # cache lookup statements
        self._unrendered = 0
        self._first_unrendered: float | None = None
        self._lock = asyncio.Lock()
        self._entries: list[CatalogEntry] = []  # not known to be saved
        self._save_lock = asyncio.Lock()
        self._trouble: Verdict | None = None  # the last save failed: away, busy, error
        self._trouble_text = ""  # ... and what happened
        self._lookups: list[tuple[str, float, asyncio.Future[Any]]] = []
        self._lookup_lock = asyncio.Lock()
        self._render_pause = 0.0
        self._render_took = 0.0  # seconds, the last render
        self._rendered_at = 0.0  # monotonic end of the last render
        self._render_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    @property
    def unrendered(self) -> int:
        return self._unrendered

    @property
    def unsaved(self) -> int:
        self._prune()
        return len(self._entries)

    def _prune(self) -> None:
        if any(e.state == SAVED for e in self._entries):
            self._entries = [e for e in self._entries if e.state != SAVED]

    async def record(
        self,
        course: Course,
        *,
        job_id: UUID,
        result_path: str,
        cache_key: str | None,
        provider: str,
        model: str,
    ) -> CatalogEntry | None:
        """Add or replace the course's row. In a worker, the row is the outcome's,
        saved with the job's completion; otherwise it is saved when this returns
        (unless the database is away: then the tick saves it), and a render
        follows when the batch is full."""
        if self.pool is None:
            return None
        entry = CatalogEntry(
            self,
            {
                "course_id": course.id,
                "job_id": str(job_id),
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
            },
        )
        self._prune()
        self._entries.append(entry)
        if self.rides:
            return entry
        # While the database is away or refuses the rows, a job does not wait for
        # it: the tick tries again. Busy is worth a wait (the rows are the next batch).
        if self._trouble in (None, Verdict.BUSY):
            await self._save(entry)
        # A render under way may hang on a connection gone half-open: a job never
        # waits for it. Its row is counted, and the next tick renders it.
        if self._due() and not self._lock.locked():
            await self.render_quietly(self._due)
        return entry

    def _landed(self, n: int) -> None:
        """n rows reached the database: count them for the next render, and in a
        worker start it beside the jobs when it is due."""
        self._unrendered += n
        if self._first_unrendered is None:
            self._first_unrendered = time.monotonic()
        if self.rides:
            self._kick()

    def _kick(self) -> None:
        """A worker's render, beside the jobs: now if it is due, else when it will
        be (CATALOG_BATCH_SECONDS after the first row not yet rendered)."""
        since = self._first_unrendered
        if since is None or self._render_task is not None or self._closing:
            return  # nothing to render, or a render under way (its end looks again)
        if self._due():
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._render_task = asyncio.get_running_loop().create_task(
                self._render_then_look(), name="catalog render"
            )
        elif self._timer is None:
            due = since + self.batch_seconds - self._render_took
            wait = max(due, self._rendered_at + self._render_pause)
            delay = max(0.0, wait - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._kick()

    async def _render_then_look(self) -> None:
        try:
            rendered = await self.render_quietly(self._due)
        finally:
            self._render_task = None
        if rendered:
            self._kick()  # rows that landed during the render; after a failure, the tick

    def _due(self) -> bool:
        since = self._first_unrendered
        if since is None:
            return False
        now = time.monotonic()
        if self.rides and now - self._rendered_at < self._render_pause:
            return False  # the last render was long: the worker has other work (a timer waits)
        # A render is started its own length early, to be written on time.
        late = now - since >= self.batch_seconds - self._render_took
        return self._unrendered >= self.batch_jobs or late

    async def save_quietly(self, min_age: float = 0.0) -> None:
        """Save the rows waiting (for at least `min_age` seconds); on failure keep
        them for the tick."""
        if self.pool is not None and self._entries:
            await self._save(None, min_age)

    async def _save(self, target: CatalogEntry | None, min_age: float = 0.0) -> None:
        """Until `target` is saved (None: every row waiting): wait for the save
        under way, then save what waits, in batches. Never raises; a failure is
        logged (once per change of state) and the rows are kept."""
        assert self.pool is not None
        try:
            async with asyncio.timeout(DB_WAIT_SECONDS * 2):
                async with self._save_lock:
                    while target is None or target.state != SAVED:
                        old = time.monotonic() - min_age
                        batch = [e for e in self._entries if e.state == QUEUED and e.since <= old]
                        if not batch:
                            break
                        await self._save_batch(batch[:MAX_BATCH])
        except TimeoutError:
            waited = DatabaseBusy(f"the save got no answer in {DB_WAIT_SECONDS * 2:g} s")
            self._failed(diagnose(waited, self.pool))
        except Exception as exc:
            self._failed(diagnose(exc, self.pool))
        else:
            if self._trouble is not None:
                self._trouble = None
                logger.bind(action="catalog_saved").info("catalog: rows saved again")

    async def _save_batch(self, batch: list[CatalogEntry]) -> None:
        assert self.pool is not None
        rows = [r for r in (e.take() for e in batch) if r is not None]
        try:
            async with self.pool.connection(timeout=DB_WAIT_SECONDS) as conn:
                await dal.CATALOG_UPSERT.run(conn, {"rows": catalog_rows(rows)})
        except BaseException:
            for e in batch:
                e.release()
            raise
        self.saves += 1
        for e in batch:
            e.landed()

    def _failed(self, d: Diagnosis) -> None:
        if d.verdict is self._trouble:
            return  # said once per change
        self._trouble = d.verdict
        self._trouble_text = str(d)
        n = self.unsaved
        if d.verdict is Verdict.AWAY:
            text = f"catalog: {d}; {n} row(s) kept here, saved when it is back"
        elif d.verdict is Verdict.BUSY:
            text = f"catalog: {d}; {n} row(s) kept here, saved by the next batch"
        else:
            text = f"catalog: rows not saved ({d}); {n} row(s) kept here, tried again"
        logger.bind(action="catalog_save_deferred", unsaved=n, verdict=d.verdict.value).warning(
            text
        )

    async def tick(self) -> None:
        # In a worker, rows ride with their completions: the tick saves only those
        # that none took (a completion given up).
        await self.save_quietly(RIDE_WAIT_SECONDS if self.rides else 0.0)
        if self._due():
            await self.render_quietly(self._due)

    async def flush(self) -> None:
        self._closing = True  # no more renders beside the jobs: this one is the last
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._render_task is not None:  # may hang on a half-open connection: the
            self._render_task.cancel()  # render below, on a fresh one, covers its rows
            await asyncio.gather(self._render_task, return_exceptions=True)
        for e in self._entries:
            e.release()  # at shutdown, a completion still holding a row has given up
        await self.save_quietly()
        if self._unrendered:
            await self.render_quietly(lambda: self._unrendered > 0)
        if self.unsaved:
            lost = [e.row["course_id"] for e in self._entries]
            logger.bind(action="catalog_rows_lost", courses=lost).error(
                "catalog rows not saved at shutdown ({}); the courses are stored and will "
                "be listed when they are regenerated",
                self._trouble_text or "database unavailable",
            )

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
        self._render_took = self._rendered_at - t0
        self._render_pause = RENDER_SHARE * self._render_took
        logger.bind(action="catalog_rendered", courses=len(rows)).debug("catalog rendered")
        return len(rows)

    async def cached(self, cache_key: str, ttl_seconds: float) -> CachedCourseRow | None:
        """The newest catalog row made from this request, if recent enough. Best effort:
        without the database it is a miss, and the job goes on to the providers. The
        lookups of jobs that start together go in one statement."""
        if self.pool is None or ttl_seconds <= 0:
            return None
        found: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._lookups.append((cache_key, ttl_seconds, found))
        try:
            async with asyncio.timeout(DB_WAIT_SECONDS * 2):
                async with self._lookup_lock:
                    if not found.done():
                        await asyncio.sleep(0)  # the jobs started with this one ask too
                        await self._lookup()
        except TimeoutError:
            logger.bind(action="course_cache_unavailable").warning(
                "course cache skipped (database busy: no answer in {:g} s)", DB_WAIT_SECONDS * 2
            )
            return None
        row = found.result() if found.done() else _MISS
        return None if row is _MISS else row

    async def _lookup(self) -> None:
        """One statement for every lookup waiting (per TTL: one in practice)."""
        assert self.pool is not None
        waiting, self._lookups = self._lookups, []
        by_ttl: dict[float, list[tuple[str, asyncio.Future[Any]]]] = {}
        for key, ttl, fut in waiting:
            by_ttl.setdefault(ttl, []).append((key, fut))
        try:
            for ttl, asks in by_ttl.items():
                try:
                    async with self.pool.connection(timeout=DB_WAIT_SECONDS) as conn:
                        rows = await dal.COURSE_CACHE_LOOKUP.all(
                            conn, {"keys": sorted({k for k, _ in asks}), "ttl": ttl}
                        )
                    self.lookups += 1
                except Exception as exc:
                    logger.bind(action="course_cache_unavailable").warning(
                        "course cache skipped ({})", diagnose(exc, self.pool)
                    )
                    continue  # misses, below
                hits = {r["cache_key"]: r for r in rows}
                for key, fut in asks:
                    if not fut.done():
                        fut.set_result(hits.get(key))
        finally:  # a failed or cancelled lookup is a miss for every job that asked
            for _, _, fut in waiting:
                if not fut.done():
                    fut.set_result(_MISS)


def catalog_rows(rows: list[dict[str, Any]]) -> Jsonb:
    """Rows for catalog_upsert: one per course (a course finished twice in a batch:
    its later row), text without NUL characters (PostgreSQL text cannot hold them,
    and one such row would fail the statement for every row in it)."""
    latest = {r["course_id"]: r for r in rows}
    clean = [
        {k: v.replace("\x00", "") if isinstance(v, str) else v for k, v in r.items()}
        for r in latest.values()
    ]
    return Jsonb(clean)


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
