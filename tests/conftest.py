"""Shared fixtures: a real PostgreSQL (see tests/pgserver.py), a migrated template
database made once per run, and a fresh database cloned from it for each test."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from listener import db
from listener.migrate import migrate
from tests import fakeai, supabase
from tests.fakeai import FakeAI
from tests.faultproxy import FaultProxy
from tests.pgserver import server_url, with_dbname


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every end-to-end test (tests/e2e: real processes) is slow: `make test-fast`
    leaves them out."""
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.slow)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Install the Debian packages the end-to-end tests need (Chromium, PgBouncer)
    before any test runs, once, in the main process: an install takes minutes on a
    new machine, longer than a test's timeout. A run that leaves out the slow tests
    installs nothing; where apt cannot install, the tests skip with the reason."""
    config = session.config
    if hasattr(config, "workerinput") or "not slow" in (config.option.markexpr or ""):
        return
    from tests.browser import ensure_chromium
    from tests.pgbouncer import ensure_pgbouncer

    for ensure in (ensure_chromium, ensure_pgbouncer):
        ensure()  # the reason, if any, is the fixture's to report


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with server_url() as url:
        yield url


def _admin(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


def _drop_database(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> Iterator[str]:
    name = f"aijobs_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with _admin(pg_server) as conn:
        conn.execute(f'create database "{name}"')
    url = with_dbname(pg_server, name)
    asyncio.run(migrate(url, rate_limit_per_hour=10))
    yield url
    with _admin(pg_server) as conn:
        _drop_database(conn, name)


def _new_database(pg_server: str, template: str | None) -> str:
    name = f"aijobs_t_{uuid.uuid4().hex[:12]}"
    with _admin(pg_server) as conn:
        if template:
            tpl = psycopg.conninfo.conninfo_to_dict(template)["dbname"]
            # A file copy of the template (PostgreSQL 15+; the default copies it
            # block by block through the WAL): 3 times faster for a database of a
            # few MB, and every test makes one.
            how = " strategy file_copy" if conn.info.server_version >= 150000 else ""
            conn.execute(f'create database "{name}" template "{tpl}"{how}')
        else:
            conn.execute(f'create database "{name}"')
    return name


class _Dropper:
    """Drops the tests' databases on a thread of its own: a test's teardown does
    not wait for it. `close` waits for every drop asked for."""

    def __init__(self, pg_server: str) -> None:
        self.pg_server = pg_server
        self.names: queue.Queue[str | None] = queue.Queue()
        self.failed: list[str] = []
        self.thread = threading.Thread(target=self._run, name="drop-test-databases", daemon=True)
        self.thread.start()

    def drop(self, name: str) -> None:
        self.names.put(name)

    def close(self) -> None:
        self.names.put(None)
        self.thread.join(timeout=120)
        assert not self.failed, f"test databases not dropped: {self.failed}"

    def _run(self) -> None:
        with _admin(self.pg_server) as conn:
            while (name := self.names.get()) is not None:
                try:
                    _drop_database(conn, name)
                except psycopg.Error as exc:
                    self.failed.append(f"{name}: {exc}")


@pytest.fixture(scope="session")
def dropper(pg_server: str) -> Iterator[_Dropper]:
    d = _Dropper(pg_server)
    yield d
    d.close()


@pytest.fixture
def db_url(pg_server: str, template_db: str, dropper: _Dropper) -> Iterator[str]:
    """A fresh, migrated database for this test alone."""
    name = _new_database(pg_server, template_db)
    yield with_dbname(pg_server, name)
    dropper.drop(name)


@pytest.fixture
def proxy(db_url: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of this test's database (tests/faultproxy.py)."""
    p = FaultProxy(db_url).start()
    yield p
    p.stop()


@pytest.fixture(scope="session")
def supabase_template_db(pg_server: str) -> Iterator[str]:
    """Migrated once per run on a database prepared like Supabase (tests/supabase.py)."""
    name = f"aijobs_supa_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with _admin(pg_server) as conn:
        conn.execute(f'create database "{name}"')
    url = with_dbname(pg_server, name)
    supabase.prepare(url)
    asyncio.run(migrate(url, rate_limit_per_hour=10))
    yield url
    with _admin(pg_server) as conn:
        _drop_database(conn, name)


@pytest.fixture
def supabase_db_url(pg_server: str, supabase_template_db: str, dropper: _Dropper) -> Iterator[str]:
    """A fresh database for this test alone, prepared like a Supabase project
    (default grants to anon, authenticated and service_role set before
    `ai-jobs migrate`, Supabase's auth.uid()) and then migrated."""
    name = _new_database(pg_server, supabase_template_db)
    yield with_dbname(pg_server, name)
    dropper.drop(name)


@pytest.fixture
def empty_db_url(pg_server: str, dropper: _Dropper) -> Iterator[str]:
    """A fresh database with nothing in it (for migration tests)."""
    name = _new_database(pg_server, None)
    yield with_dbname(pg_server, name)
    dropper.drop(name)


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
    c = await psycopg.AsyncConnection.connect(db_url, autocommit=True, row_factory=dict_row)
    yield c
    await c.close()


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[db.WorkPool]:
    """A work pool on this test's database, open."""
    p = db.make_pool(db_url, 8, app="ai-jobs test")
    await p.open(wait=True)
    yield p
    await p.close(timeout=1)


@pytest.fixture
def fake() -> Iterator[FakeAI]:
    """The fake OpenAI and Anthropic APIs (tests/fakeai.py), on 127.0.0.1."""
    with fakeai.running() as f:
        yield f
