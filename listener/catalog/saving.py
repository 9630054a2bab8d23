"""The course catalog's rows (sql/006): one per finished course, in the database no
later than its job's `done`.

In a worker a row rides with its job's completion (`complete_with_rows`: the
same transaction), so it costs no commit of its own and a process that dies
loses neither or both. A handler run without a worker saves its row itself
before it returns, in batches. While the database is away, rows that did not
ride with a completion stay in memory and the tick saves them once it is back
(docs/design.md, "A course's catalog row rides with its completion")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, TypeVar
from uuid import UUID

from loguru import logger
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from listener import dal, tracing
from listener.catalog.render import Renderer
from listener.course_schema import Course
from listener.errors import DatabaseBusy
from listener.outage import Diagnosis, Verdict, diagnose
from listener.storage import Storage

R = TypeVar("R")
# How long a job waits for the database on the catalog's account before it moves
# on (its row is saved later).
DB_WAIT_SECONDS = 2.0
MAX_BATCH = 500  # rows per save statement
RIDE_WAIT_SECONDS = 1.0  # a worker's tick saves a row no completion took in this time
QUEUED, SAVING, SAVED = "queued", "saving", "saved"


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
            self._catalog.renderer.landed(1)

    def release(self) -> None:
        if self.state == SAVING:
            self.state = QUEUED


async def complete_with_rows(
    pool: AsyncConnectionPool[Any],
    query: dal.Query[R],
    params: dict[str, Any],
    entries: Sequence[CatalogEntry],
) -> list[R]:
    """`query` (complete_jobs, or complete_and_claim) with the catalog rows of
    `entries` saved in the same transaction: one commit. Once it commits the
    rows have landed; if it fails they wait (for another completion, or the
    catalog's own save)."""
    rows = catalog_rows([r for r in (e.take() for e in entries) if r is not None])
    try:
        if not rows.obj:
            result = await query.all(pool, params)
        else:
            async with pool.connection() as conn, conn.transaction():
                await dal.CATALOG_UPSERT.run(conn, {"rows": rows})
                result = await query.all(conn, params)
    except BaseException:
        for e in entries:
            e.release()
        raise
    for e in entries:
        e.landed()
    return result


class Catalog:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any] | None,
        storage: Storage,
        batch_jobs: int,
        batch_seconds: float,
    ) -> None:
        self.pool = pool
        self.renderer = Renderer(pool, storage, batch_jobs, batch_seconds)
        self.saves = 0  # save statements of the catalog's own that committed
        self._rides = False
        self._entries: list[CatalogEntry] = []  # not known to be saved
        self._save_lock = asyncio.Lock()
        self._trouble: Verdict | None = None  # the last save failed: away, busy, error
        self._trouble_text = ""  # ... and what happened

    @property
    def rides(self) -> bool:
        """The rows ride with their jobs' completions (in a worker)."""
        return self._rides

    @rides.setter
    def rides(self, value: bool) -> None:
        self._rides = self.renderer.beside = value

    @property
    def unsaved(self) -> int:
        self._prune()
        return len(self._entries)

    def _prune(self) -> None:
        if any(e.state == SAVED for e in self._entries):
            self._entries = [e for e in self._entries if e.state != SAVED]

    @tracing.traced("catalog record")
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
        renderer = self.renderer
        if renderer.due() and not renderer.busy:
            await renderer.render_quietly(renderer.due)
        return entry

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
        if self.renderer.due():
            await self.renderer.render_quietly(self.renderer.due)

    async def flush(self) -> None:
        """At shutdown: the rows saved, the last render."""
        await self.renderer.close()
        for e in self._entries:
            e.release()  # at shutdown, a completion still holding a row has given up
        await self.save_quietly()
        if self.renderer.unrendered:
            await self.renderer.render_quietly(lambda: self.renderer.unrendered > 0)
        if self.unsaved:
            lost = [e.row["course_id"] for e in self._entries]
            logger.bind(action="catalog_rows_lost", courses=lost).error(
                "catalog rows not saved at shutdown ({}); the courses are stored and will "
                "be listed when they are regenerated",
                self._trouble_text or "database unavailable",
            )


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
