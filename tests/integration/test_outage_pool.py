"""diagnose() on real failures: a pool whose every connection is in use is busy,
a pool that cannot open a connection is away, a statement timeout is busy."""

from __future__ import annotations

import asyncio
import socket

import psycopg
import pytest

from listener import db
from listener.errors import translate
from listener.outage import Verdict, diagnose
from tests.helpers import aconnect


async def test_a_pool_with_every_connection_in_use_is_busy(db_url: str) -> None:
    pool = db.make_pool(db_url, 2)
    await pool.open(wait=True)
    try:
        async with pool.connection(), pool.connection():
            with pytest.raises(psycopg.OperationalError) as caught:
                async with pool.connection(timeout=0.2):
                    pass
            d = diagnose(caught.value, pool)  # as a caller does: while the others run
    finally:
        await pool.close()
    assert d.verdict is Verdict.BUSY
    assert "all 2 pool connections in use" in str(d)


async def test_a_pool_that_cannot_connect_is_away() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = db.make_pool(f"postgresql://postgres@127.0.0.1:{port}/postgres", 2)
    await pool.open(wait=False)
    try:
        with pytest.raises(psycopg.OperationalError) as caught:
            async with pool.connection(timeout=1.5):
                pass
        d = diagnose(caught.value, pool)
    finally:
        await pool.close()
    assert d.verdict is Verdict.AWAY
    assert str(d).startswith("database unavailable: ")
    # The cause, as a direct connection would say it; not the pool's "could not open".
    assert f"port {port} failed: Connection refused" in str(d), str(d)
    assert "the pool could not open a connection" not in str(d)


async def test_a_statement_timeout_is_busy_not_away(db_url: str) -> None:
    async with await aconnect(db_url) as c:
        await c.execute("set statement_timeout = '50ms'")
        with pytest.raises(psycopg.Error) as caught:
            async with asyncio.timeout(10):
                await c.execute("select pg_sleep(5)")
    for exc in (caught.value, translate(caught.value)):
        assert diagnose(exc).verdict is Verdict.BUSY
