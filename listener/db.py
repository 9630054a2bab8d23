"""The one module that owns connections: the work pool, the LISTEN connection,
one-shot connections for the command line, and the socket callbacks of code
that drives libpq itself."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
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
