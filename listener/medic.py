"""The pool medic: replaces a work pool's dead connections at once after a
connection error, and shuts down those stuck on a reply that will never come
(a half-open link)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import time
from collections.abc import Iterable
from typing import Any

from loguru import logger
from psycopg.pq import TransactionStatus

from listener import dal
from listener.db import WorkPool, connect


class PoolMedic:
    """Replaces a pool's dead connections at once after a connection error.

    An outage kills every connection of the pool, but the pool only learns that
    one caller at a time, each eating a failure. `heal()` drains the pool: idle
    connections are closed and replaced now, those in use when they come back.
    Not psycopg_pool's `check()`: that makes a round trip on every idle
    connection, and on a half-open one the round trip never returns. The errors
    of one outage cost one drain (at most one every MIN_INTERVAL).

    A connection in use that went half-open never comes back: its caller (a
    sweep, a claim) waits on a reply that will never come, and TCP keepalives
    cannot tell when something on the way (a proxy, a pooler) still answers for
    the server. So after the drain the medic looks for them (`unstick`): a
    connection that waits for a reply, twice STUCK_AFTER seconds apart, while
    the server says its backend has sent everything and sat idle since before
    the first look, has lost its reply (or its query) on the way. Its socket is
    shut down: the caller's query fails now, as on any dropped connection, and
    is retried on a fresh one. A reply in transit for STUCK_AFTER would be taken
    for lost; no working network is that slow."""

    MIN_INTERVAL = 1.0
    STUCK_AFTER = 0.5
    # Its own connection, at most: one tried while a link is down gives up soon,
    # so that the next heal (the link back) looks again with a fresh one, instead
    # of waiting for TCP's SYN retries with the connections it listed then.
    CONNECT_WITHIN = 2.0
    # The watch (`watch()`, every WATCH_EVERY): a connection seen waiting for a
    # reply at WAITING_LOOKS looks in a row (the same connection, so about
    # that many seconds) has its server asked (`unstick`). A link that was down
    # for a few seconds leaves the queries sent meanwhile waiting for TCP's
    # retransmission, seconds after the link is back, with no error to start a
    # heal; this finds them about as soon as the medic's own connection can be
    # made. A long query on a working connection costs a look at
    # pg_stat_activity every few seconds.
    WATCH_EVERY = 1.0
    WAITING_LOOKS = 2

    def __init__(self, pool: WorkPool) -> None:
        self.pool = pool
        self.heals = 0
        self.unstuck = 0  # connections shut down because their reply was lost
        self._last = -self.MIN_INTERVAL
        self._task: asyncio.Task[None] | None = None
        self._unsticking: asyncio.Task[int] | None = None
        self._seen: dict[int, tuple[Any, int]] = {}  # waiting connections: looks in a row

    def heal_soon(self) -> None:
        """From an error path: drain in the background."""
        if self._due():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="pool heal")

    async def heal(self) -> None:
        """Drain now (or wait for the drain under way)."""
        if self._due():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="pool heal")
        if self._task is not None:
            await asyncio.shield(self._task)

    def _due(self) -> bool:
        if self._task is not None and not self._task.done():
            return False
        now = time.monotonic()
        if now - self._last < self.MIN_INTERVAL:
            return False
        self._last = now
        return True

    async def _drain(self) -> None:
        try:
            drain = getattr(self.pool, "drain", None)  # psycopg_pool >= 3.3
            await (drain() if drain is not None else self.pool.check())
            self.heals += 1
        except Exception as exc:  # a closed pool, at shutdown: nothing to heal
            logger.bind(action="pool_heal_failed").debug(f"pool drain failed: {exc!r}")
        # In the background: it takes STUCK_AFTER, and the drain's fresh
        # connections serve meanwhile.
        self._unstick_soon()

    def _unstick_soon(self) -> asyncio.Task[int] | None:
        """Start `unstick` unless one is under way; the task started, or None."""
        if self._unsticking is not None and not self._unsticking.done():
            return None
        self._unsticking = asyncio.get_running_loop().create_task(
            self.unstick(), name="pool unstick"
        )
        return self._unsticking

    async def watch(self) -> None:
        """One look of the watch (a periodic duty of the worker, every WATCH_EVERY)."""
        looks: dict[int, tuple[Any, int]] = {}
        for pid, conn in _waiting(self.pool.connections).items():
            before, n = self._seen.get(pid, (None, 0))
            looks[pid] = (conn, n + 1 if before is conn else 1)
        self._seen = looks
        stuck = any(n >= self.WAITING_LOOKS for _, n in looks.values())
        if stuck and (task := self._unstick_soon()) is not None:
            await asyncio.shield(task)

    async def unstick(self) -> int:
        """Shut down the connections waiting on a reply that was lost; how many.
        It asks the server on a connection of its own: the pool may have none
        left to lend, every one of them stuck."""
        first = _waiting(self.pool.connections)
        if not first:
            return 0
        try:
            async with asyncio.timeout(self.CONNECT_WITHIN):
                conn = await connect(self.pool.dsn, app="ai-jobs pool medic")
        except Exception as exc:  # the database away again: the next heal looks again
            logger.bind(action="pool_unstick_failed").debug(f"pool unstick failed: {exc!r}")
            return 0
        try:
            async with asyncio.timeout(self.STUCK_AFTER + 10.0):
                since = (await dal.SERVER_TIME.one(conn))["now"]
                await asyncio.sleep(self.STUCK_AFTER)
                waiting = {p: c for p, c in _waiting(first.values()).items() if first[p] is c}
                params = {"pids": list(waiting), "since": since, "seconds": self.STUCK_AFTER}
                idle = await dal.IDLE_BACKENDS.all(conn, params) if waiting else []
        except Exception as exc:  # the database away again: the next heal looks again
            logger.bind(action="pool_unstick_failed").debug(f"pool unstick failed: {exc!r}")
            return 0
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
        cut = sum(_shut_down(waiting[r["pid"]]) for r in idle if r["pid"] in waiting)
        if cut:
            self.unstuck += cut
            logger.bind(action="pool_unstuck", connections=cut).warning(
                f"database: {cut} pool connection(s) waited on a reply the server had"
                " sent or never got (half-open); shut down, their callers retry"
            )
        return cut


def _waiting(conns: Iterable[Any]) -> dict[int, Any]:
    """The open connections waiting for a query's reply, by backend pid."""
    found: dict[int, Any] = {}
    for conn in list(conns):
        with contextlib.suppress(Exception):  # closed meanwhile
            if not conn.closed and conn.info.transaction_status == TransactionStatus.ACTIVE:
                found[conn.info.backend_pid] = conn
    return found


def _shut_down(conn: Any) -> int:
    """Shut the connection's socket down (1), unless a reply came meanwhile (0):
    the query waiting on it fails at once, as on a dropped connection."""
    try:
        fd = conn.pgconn.socket
        if select.select([fd], [], [], 0)[0]:
            return 0  # something arrived: not lost
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except Exception:
        return 0
    return 1
