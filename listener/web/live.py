"""Live updates: one LISTEN connection per web process, fanned out to every
server-sent-events stream (with LISTEN_MODE=poll: a re-read every second instead).

PostgreSQL notifies `ai_jobs_events` once per statement that changed jobs
(triggers/007; an update names the jobs, sql/024). Notifications only mark the
view dirty, and go on to the watchers (the end-user API's streams, streams.py);
a refresher re-reads and re-renders at most every MIN_INTERVAL seconds and hands
the same rendering to every subscriber. A burst of thousands of status changes
therefore costs a few queries, and a slow browser only ever gets the latest
snapshot (queues of one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.listen import ListenService, Notify, probe_of
from listener.outage import diagnose

CHANNEL = "ai_jobs_events"
MIN_INTERVAL = 0.25  # at most four refreshes a second, whatever the write rate
POLL_SECONDS = 1.0  # LISTEN_MODE=poll: re-read this often while a browser watches

Snapshot = dict[str, Any]
Subscriber = asyncio.Queue[Snapshot | None]


class LiveFeed:
    def __init__(
        self,
        dsn: str,
        snapshot: Callable[[], Awaitable[Snapshot]],
        min_interval: float = MIN_INTERVAL,
        *,
        notify: Notify | None = None,
        probe_every: float = 30.0,
        listen: bool = True,
        on_recovered: Callable[[], None] | None = None,
        pool: AsyncConnectionPool[Any] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._pool = pool  # the snapshot's: a busy pool is told from an outage
        self._on_recovered = on_recovered
        self._listen = listen
        self._min_interval = min_interval
        self._subscribers: set[Subscriber] = set()
        self._watchers: list[Callable[[str | None], None]] = []
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # The worker's LISTEN service, on the events channel: the same ping,
        # probe, reconnects and transition logs (action live_*).
        self.service = ListenService(
            dsn,
            name="live",
            channel=CHANNEL,
            listen_query=dal.LISTEN_EVENTS,
            on_payload=self._changed,
            on_connect=self._connected,
            notify=notify,
            probe_every=probe_every,
            sender=f"web:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
            app="ai-jobs web listen",
        )
        self.listening = self.service.connected  # set while the LISTEN connection is up
        self._log = logger.bind(action="live", channel=CHANNEL)

    async def start(self) -> None:
        watch = self.service.run() if self._listen else self._poll()
        self._tasks = [
            asyncio.create_task(watch, name="live-listen"),
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

    def watch(self, watcher: Callable[[str | None], None]) -> None:
        """Every payload of the channel (probes aside) to `watcher`, as it comes;
        None when anything may have changed unheard (a reconnect, a poll tick).
        The end-user API's event streams hang on this, beside the dashboard."""
        self._watchers.append(watcher)

    def _tell(self, payload: str | None) -> None:
        for watcher in self._watchers:
            watcher(payload)

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

    def _changed(self, payload: str) -> None:
        if probe_of(payload) is None:  # another web process's probe changes nothing
            self._dirty.set()
            self._tell(payload)

    async def _poll(self) -> None:
        while True:
            self._dirty.set()
            self._tell(None)
            await asyncio.sleep(POLL_SECONDS)

    def _connected(self, recovered: bool) -> None:
        # Changes made while we were away sent no notification we could hear; and
        # the outage that took the LISTEN connection may have taken the pool's.
        if recovered and self._on_recovered is not None:
            self._on_recovered()
        self._dirty.set()
        self._tell(None)

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
                            "could not read the jobs ({})", diagnose(exc, self._pool)
                        )
                        failing = True
                    await asyncio.sleep(1.0)
                    self._dirty.set()
                    continue
                failing = False
                for queue in list(self._subscribers):
                    self._offer(queue, snap)
            await asyncio.sleep(self._min_interval)
