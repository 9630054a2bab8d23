"""The one module that owns connections: the work pool, the LISTEN connection,
one-shot connections for the command line, and the named SQL of queries.sql."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from functools import cache
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from listener.errors import ConfigError, DatabaseUnavailable, translate

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
    if not dsn:
        raise ConfigError("DATABASE_URL is not set")
    return dsn


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


def make_pool(dsn: str, size: int, app: str = "ai-jobs worker") -> AsyncConnectionPool:
    """The pool for the work: claims, heartbeats, finishes, sweeps."""
    return AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=max(2, size),
        open=False,
        kwargs={
            "autocommit": True,
            "row_factory": dict_row,
            "application_name": app,
            **KEEPALIVES,
        },
        # No check on checkout: it would cost a round trip on every claim. A broken
        # connection fails its query, the caller retries, the pool drops it.
        timeout=5,
    )


async def fetch(conn: psycopg.AsyncConnection[Any], name: str, params: Any = None) -> list[Any]:
    """Run a named statement and return its rows, with errors translated."""
    try:
        cur = await conn.execute(sql(name), params)
        return await cur.fetchall() if cur.description else []
    except psycopg.Error as exc:
        raise translate(exc) from exc


def is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, DatabaseUnavailable | psycopg.OperationalError | psycopg.InterfaceError)
