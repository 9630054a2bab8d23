"""This process's row in the worker registry (ai_job_workers, sql/012): who runs,
where, since when, whether its LISTEN connection hears, how many jobs it runs.

The worker registers at start, beats every BEAT_SECONDS (and at once when its
listener changes state), and removes its row on a clean exit. A beat is one
upsert, bounded in time: a connection gone half-open never holds the loop."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import __version__, dal
from listener.listen import CONNECTING, DEAF, LISTENING, RECONNECTING
from listener.settings import Settings

BEAT_SECONDS = 10.0  # at most this long between beats
BEAT_TIMEOUT = 5.0
LIVE_BEATS = 3  # a worker not seen for this many beats is not live
NO_WORKER_GRACE_SECONDS = 60.0  # no_worker counts the jobs due for longer than this
POLLING = "polling"  # the listener_state of a worker with LISTEN_MODE=poll
LISTENER_STATES = (LISTENING, POLLING, RECONNECTING, DEAF, CONNECTING)


def make_worker_id() -> str:
    """host:pid:random, as in the jobs' worker_id."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def beat_interval(settings: Settings) -> float:
    return min(settings.heartbeat_interval_seconds, BEAT_SECONDS)


def live_seconds(settings: Settings) -> float:
    """How recently a worker must have beaten to count as live (list, alerts, metrics)."""
    return LIVE_BEATS * beat_interval(settings)


@dataclass(frozen=True)
class Status:
    listener_state: str
    jobs_running: int
    probe_seconds: float | None
    reconnects: int


class Registry:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        settings: Settings,
        worker_id: str,
        status: Callable[[], Status],
        on_error: Callable[[BaseException], None] = lambda exc: None,
    ) -> None:
        self.pool = pool
        self.interval = beat_interval(settings)
        self.id = worker_id
        self.status = status
        self.on_error = on_error
        self.beats = 0
        self._started_at = datetime.now(UTC)
        self._now = asyncio.Event()

    def poke(self) -> None:
        """Beat now (the listener changed state)."""
        self._now.set()

    async def run(self) -> None:
        while True:
            self._now.clear()
            await self.beat()
            try:
                async with asyncio.timeout(self.interval):
                    await self._now.wait()
            except TimeoutError:
                pass

    async def beat(self) -> bool:
        s = self.status()
        params = {
            "id": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self._started_at,
            "listener_state": s.listener_state,
            "jobs_running": s.jobs_running,
            "version": __version__,
            "probe_seconds": s.probe_seconds,
            "reconnects": s.reconnects,
        }
        try:
            async with asyncio.timeout(BEAT_TIMEOUT):
                async with self.pool.connection() as conn:
                    await dal.WORKER_BEAT.run(conn, params)
        except Exception as exc:
            self.on_error(exc)
            return False
        self.beats += 1
        return True

    async def remove(self) -> None:
        """On a clean exit; one try (a row left behind expires)."""
        try:
            async with asyncio.timeout(BEAT_TIMEOUT):
                async with self.pool.connection() as conn:
                    await dal.WORKER_REMOVE.run(conn, {"id": self.id})
        except Exception as exc:
            logger.bind(action="worker_unregister_failed").warning(
                f"worker row not removed ({type(exc).__name__}); it expires by itself"
            )
