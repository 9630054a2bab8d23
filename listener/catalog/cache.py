"""The course cache: a course job whose request (subject and params) was made
into a course recently reuses it instead of calling a provider. Best effort:
without the database it is a miss, and the job goes on to the providers. The
lookups of jobs that start together go in one statement."""

from __future__ import annotations

import asyncio
from typing import Any

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.outage import diagnose
from listener.rows import CachedCourseRow

DB_WAIT_SECONDS = 2.0  # a lookup that waits longer for the database is a miss
_MISS: Any = object()  # a failed lookup, to its waiters


class CourseCache:
    def __init__(self, pool: AsyncConnectionPool[Any] | None) -> None:
        self.pool = pool
        self.lookups = 0  # lookup statements
        self._asks: list[tuple[str, float, asyncio.Future[Any]]] = []
        self._lock = asyncio.Lock()

    async def lookup(self, cache_key: str, ttl_seconds: float) -> CachedCourseRow | None:
        """The newest catalog row made from this request, if recent enough."""
        if self.pool is None or ttl_seconds <= 0:
            return None
        found: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._asks.append((cache_key, ttl_seconds, found))
        try:
            async with asyncio.timeout(DB_WAIT_SECONDS * 2):
                async with self._lock:
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
        waiting, self._asks = self._asks, []
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
