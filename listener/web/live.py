"""Live updates: one LISTEN connection per web process, fanned out to every
server-sent-events stream.

PostgreSQL notifies `ai_jobs_events` once per statement that changed jobs
(triggers/007). Notifications only mark the view dirty; a refresher re-reads and
re-renders at most every MIN_INTERVAL seconds and hands the same rendering to every
subscriber. A burst of thousands of status changes therefore costs a few queries,
and a slow browser only ever gets the latest snapshot (queues of one).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from loguru import logger

from listener import db
from listener.errors import AiJobsError

CHANNEL = "ai_jobs_events"
MIN_INTERVAL = 0.25  # at most four refreshes a second, whatever the write rate
KEEPALIVE_SECONDS = 5.0
MAX_BACKOFF = 10.0

Snapshot = dict[str, Any]
Subscriber = asyncio.Queue[Snapshot | None]


class LiveFeed:
    def __init__(
        self,
        dsn: str,
        snapshot: Callable[[], Awaitable[Snapshot]],
        min_interval: float = MIN_INTERVAL,
    ) -> None:
        self._dsn = dsn
        self._snapshot = snapshot
        self._min_interval = min_interval
        self._subscribers: set[Subscriber] = set()
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = asyncio.Event()  # set while the LISTEN connection is up
        self._log = logger.bind(action="live", channel=CHANNEL)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="live-listen"),
            asyncio.create_task(self._refresh(), name="live-refresh"),
        ]
        self._log.bind(action="live_started").info("live updates started")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for queue in self._subscribers:
            self._offer(queue, None)  # ends the stream
        self._log.bind(action="live_stopped").info("live updates stopped")

    def subscribe(self) -> Subscriber:
        queue: Subscriber = asyncio.Queue(maxsize=1)
        self._subscribers.add(queue)
        self._dirty.set()  # a fresh snapshot first: nothing is missed since the page loaded
        return queue

    def unsubscribe(self, queue: Subscriber) -> None:
        self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @staticmethod
    def _offer(queue: Subscriber, item: Snapshot | None) -> None:
        if queue.full():  # a slow reader skips to the newest snapshot
            queue.get_nowait()
        queue.put_nowait(item)

    async def _listen(self) -> None:
        backoff = 0.5
        healthy = True
        while True:
            try:
                conn = await db.connect(self._dsn, app="ai-jobs web listen")
                try:
                    await conn.execute(db.sql("listen_events"))
                    self.listening.set()
                    backoff = 0.5
                    if not healthy:
                        self._log.bind(action="live_reconnected").info("LISTEN connection back")
                        healthy = True
                    # Changes made while we were away sent no notification we could hear.
                    self._dirty.set()
                    while True:
                        async for _ in conn.notifies(timeout=KEEPALIVE_SECONDS):
                            self._dirty.set()
                        await conn.execute(db.sql("keepalive"))
                finally:
                    self.listening.clear()
                    with contextlib.suppress(psycopg.Error):
                        await conn.close()
            except (psycopg.Error, AiJobsError) as exc:
                if healthy:
                    message = exc.message if isinstance(exc, AiJobsError) else type(exc).__name__
                    self._log.bind(action="live_lost").warning(
                        "LISTEN connection lost ({}); reconnecting", message
                    )
                    healthy = False
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _refresh(self) -> None:
        failing = False
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self._subscribers:
                try:
                    snap = await self._snapshot()
                except Exception as exc:  # the database may be away: try again shortly
                    if not failing:
                        self._log.bind(action="live_refresh_failed").warning(
                            "could not read the jobs: {}", type(exc).__name__
                        )
                        failing = True
                    await asyncio.sleep(1.0)
                    self._dirty.set()
                    continue
                failing = False
                for queue in list(self._subscribers):
                    self._offer(queue, snap)
            await asyncio.sleep(self._min_interval)
