"""The one module that owns connections: the work pool, the LISTEN connection,
one-shot connections for the command line, and the named SQL of queries.sql."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from functools import cache
from importlib import resources
from typing import Any

import psycopg
from loguru import logger
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from listener.errors import ConfigError, redact, translate

CHANNEL = "ai_jobs"

# TCP keepalives find a half-open connection (a peer that vanished without a FIN)
# within about idle + interval * count seconds; a LISTEN connection otherwise
# waits on it forever. libpq ignores them on Unix sockets.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
    "connect_timeout": 10,
}

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def named_statements(files: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Statements by their `-- name:` header, from (file name, text) pairs."""
    found: dict[str, str] = {}
    for filename, text in files:
        parts = _NAME.split(text)
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in found:
                raise KeyError(f"query {name!r} defined twice ({filename})")
            found[name] = body.strip()
    return found


@cache
def queries() -> dict[str, str]:
    """The statements of listener/queries/*.sql, by their `-- name:` header."""
    entries = sorted(resources.files("listener").joinpath("queries").iterdir(), key=str)
    return named_statements(
        (e.name, e.read_text(encoding="utf-8")) for e in entries if e.name.endswith(".sql")
    )


def sql(name: str) -> str:
    return queries()[name]


def require_dsn(dsn: str | None) -> str:
    """The connection string, checked for form (not for reachability)."""
    if not dsn:
        raise ConfigError("DATABASE_URL is not set")
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"DATABASE_URL is not a valid connection string: {redact(first)}"
        ) from None
    return dsn


def host_port(dsn: str) -> str:
    """Where a connection string points, for messages (never the password)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "?"
    return f"{params.get('host') or 'local socket'}:{params.get('port') or 5432}"


# Connection parameters that are secrets, never shown by describe().
_SECRET_PARAMS = frozenset({"password", "sslpassword"})


def describe(dsn: str) -> str:
    """Where a connection string points, for logs and errors: every host and
    port, the database, the user and the options, the password (and nothing
    else) masked. Never the connection string itself, which the log scrubber
    hides whole as the secret it is."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "?"
    user, password = params.pop("user", None), params.pop("password", None)
    dbname = params.pop("dbname", None)
    hosts = str(params.pop("host", None) or "").split(",")
    ports = str(params.pop("port", None) or "").split(",")
    if len(ports) < len(hosts):  # one port for every host
        ports *= len(hosts)
    where = ",".join(
        f"{h}:{p or 5432}" if h and not h.startswith("/") else f"[socket {h or 'default'}]"
        for h, p in zip(hosts, ports, strict=False)
    )
    who = [f"user {user or 'default'}"] + (["password ***"] if password else [])
    who += [f"{k}={v}" for k, v in params.items() if k not in _SECRET_PARAMS]
    return f"{where}/{dbname or ''} ({', '.join(who)})"


async def connect(
    dsn: str, *, autocommit: bool = True, app: str = "ai-jobs"
) -> psycopg.AsyncConnection[dict[str, Any]]:
    """A dedicated connection (the LISTEN connection, or one for a CLI command)."""
    try:
        return await psycopg.AsyncConnection.connect(
            dsn, autocommit=autocommit, row_factory=dict_row, application_name=app, **KEEPALIVES
        )
    except psycopg.Error as exc:
        raise translate(exc) from None


@asynccontextmanager
async def connection(
    dsn: str, app: str = "ai-jobs"
) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
    conn = await connect(dsn, app=app)
    try:
        yield conn
    finally:
        await conn.close()


# How long the pool keeps retrying to open a connection before it gives up until
# the next request. psycopg_pool's own retries back off from 1 s to 2, 4, 8 s and
# more: after a long outage, a connection would be minutes away when the server
# is back. Given up quickly, the next request (a claim, the catch-up sweep that
# follows the listener's reconnect) starts a fresh attempt at once.
POOL_RECONNECT_SECONDS = 1.0


_decode_json = json.JSONDecoder().decode


def json_loads(data: str | bytes) -> Any:
    """json.loads of the server's UTF-8 text, without json.loads' detection of
    the encoding of bytes: that costs more than decoding a claimed job's row."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "surrogatepass")
    return _decode_json(data)


class SocketWatch:
    """The event loop's reader (and writer) callbacks on one connection's socket,
    for code that drives libpq itself (the LISTEN service, the fast claim).
    Removed only while on: once the connection is closed, its fd number may be
    another socket's, whose callbacks are not ours to remove."""

    def __init__(
        self,
        fd: int,
        readable: Callable[[], None],
        writable: Callable[[], None] | None = None,
    ) -> None:
        self.fd = fd
        self.readable, self.writable = readable, writable
        self._reading = self._writing = False

    def read(self, on: bool) -> None:
        if on != self._reading:
            loop = asyncio.get_running_loop()
            if on:
                loop.add_reader(self.fd, self.readable)
            else:
                loop.remove_reader(self.fd)
            self._reading = on

    def write(self, on: bool) -> None:
        if on != self._writing:
            assert self.writable is not None
            loop = asyncio.get_running_loop()
            if on:
                loop.add_writer(self.fd, self.writable)
            else:
                loop.remove_writer(self.fd)
            self._writing = on

    def off(self) -> None:
        self.read(False)
        self.write(False)


class WorkPool(AsyncConnectionPool[psycopg.AsyncConnection[Any]]):
    """A pool that knows its connections, the ones lent out too: PoolMedic finds
    those stuck on a reply that will never come."""

    def __init__(self, dsn: str, **kwargs: Any) -> None:
        self.dsn = dsn
        self.connections: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()
        # Why the pool's last attempt to open a connection failed (None once one
        # opens): a caller that timed out waiting learns the cause (outage.py),
        # which psycopg_pool logs only at each of its silent retries.
        self.last_connect_error: BaseException | None = None
        super().__init__(dsn, configure=self._track, **kwargs)

    async def _connect(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - psycopg_pool's signature
    ) -> psycopg.AsyncConnection[Any]:
        # psycopg_pool's own connect (every connection the pool opens comes from
        # it), wrapped to keep its failure.
        try:
            conn = await super()._connect(timeout)
        except Exception as exc:
            self.last_connect_error = exc
            raise
        self.last_connect_error = None
        return conn

    async def _track(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.connections.add(conn)
        set_json_loads(json_loads, conn)


def make_pool(
    dsn: str, size: int, app: str = "ai-jobs worker", *, prepare: bool = True
) -> WorkPool:
    """The pool for the work: claims, heartbeats, finishes, sweeps. `prepare=False`
    turns off server-side prepared statements, which a transaction-mode pooler
    cannot keep (LISTEN_MODE=poll)."""
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "row_factory": dict_row,
        "application_name": app,
        **KEEPALIVES,
    }
    if not prepare:
        kwargs["prepare_threshold"] = None
    return WorkPool(
        dsn,
        min_size=1,
        max_size=max(2, size),
        open=False,
        kwargs=kwargs,
        # No check on checkout: it would cost a round trip on every claim. A broken
        # connection fails its query, the caller retries, and PoolMedic replaces
        # the rest of the pool's connections at once.
        timeout=5,
        reconnect_timeout=POOL_RECONNECT_SECONDS,
    )


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

    def __init__(self, pool: WorkPool) -> None:
        self.pool = pool
        self.heals = 0
        self.unstuck = 0  # connections shut down because their reply was lost
        self._last = -self.MIN_INTERVAL
        self._task: asyncio.Task[None] | None = None
        self._unsticking: asyncio.Task[int] | None = None

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
        if self._unsticking is None or self._unsticking.done():  # in the background:
            # it takes STUCK_AFTER, and the drain's fresh connections serve meanwhile
            self._unsticking = asyncio.get_running_loop().create_task(
                self.unstick(), name="pool unstick"
            )

    async def unstick(self) -> int:
        """Shut down the connections waiting on a reply that was lost; how many.
        It asks the server on a connection of its own: the pool may have none
        left to lend, every one of them stuck."""
        from listener import dal  # built on this module

        first = _waiting(self.pool.connections)
        if not first:
            return 0
        try:
            async with asyncio.timeout(self.STUCK_AFTER + 10.0):
                async with connection(self.pool.dsn, app="ai-jobs pool medic") as conn:
                    since = (await dal.SERVER_TIME.one(conn))["now"]
                    await asyncio.sleep(self.STUCK_AFTER)
                    waiting = {p: c for p, c in _waiting(first.values()).items() if first[p] is c}
                    params = {"pids": list(waiting), "since": since, "seconds": self.STUCK_AFTER}
                    idle = await dal.IDLE_BACKENDS.all(conn, params) if waiting else []
        except Exception as exc:  # the database away again: the next heal looks again
            logger.bind(action="pool_unstick_failed").debug(f"pool unstick failed: {exc!r}")
            return 0
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


async def fetch(conn: psycopg.AsyncConnection[Any], name: str, params: Any = None) -> list[Any]:
    """Run a named statement and return its rows, with errors translated."""
    try:
        cur = await conn.execute(sql(name), params)
        return await cur.fetchall() if cur.description else []
    except psycopg.Error as exc:
        raise translate(exc) from exc
