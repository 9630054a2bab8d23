"""PoolMedic through a fault-injecting proxy (tests/faultproxy.py): a heal
replaces the idle connections, and a connection in use that went half-open (its
caller waiting on a reply that will never come) is shut down so that the caller
fails now and retries, while a query the server is still running is left alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from listener import db
from listener.medic import PoolMedic
from tests.faultproxy import FaultProxy
from tests.helpers import aconnect, await_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def proxied_pool(proxy: FaultProxy, db_url: str) -> AsyncIterator[db.WorkPool]:
    """A work pool whose connections go through the fault proxy."""
    p = db.make_pool(proxy.url(db_url), 4)
    await p.open(wait=True)
    yield p
    await p.close(timeout=1)


async def _query(pool: db.WorkPool, statement: str) -> Any:
    async with pool.connection() as conn:
        return await (await conn.execute(statement)).fetchone()


async def _lost(conn: Any) -> asyncio.Task[Any]:
    """A query sent on a blackholed connection: waiting, and it would wait for
    ever (the proxy acks the bytes)."""
    stuck = asyncio.create_task(conn.execute("select 'lost'"))
    done, _ = await asyncio.wait({stuck}, timeout=1.0)
    assert not done
    return stuck


async def _long(
    pool: db.WorkPool, db_url: str, seconds: int = 2, running_for: float = 0.0
) -> asyncio.Task[Any]:
    """`select pg_sleep(seconds)` on a pool connection, once the server has run
    it for `running_for` seconds: its caller waits for its reply while the
    server works."""
    long = asyncio.create_task(_query(pool, f"select pg_sleep({seconds}) is null as slept"))
    async with await aconnect(db_url) as c:

        async def running() -> bool:
            cur = await c.execute(
                "select 1 from pg_stat_activity where state = 'active'"
                " and query like %s"
                " and state_change <= clock_timestamp() - make_interval(secs => %s)",
                [f"select pg_sleep({seconds})%", running_for],
            )
            return bool(await cur.fetchone())

        await await_until(running, what="the long query running")
    return long


async def test_a_query_stuck_on_a_half_open_connection_fails_and_is_retried(
    proxied_pool: db.WorkPool, proxy: FaultProxy
) -> None:
    medic = PoolMedic(proxied_pool)
    await _query(proxied_pool, "select 1")  # a connection to lose
    async with proxied_pool.connection() as conn:
        proxy.blackhole()  # this connection: the query goes out, nothing comes back
        stuck = await _lost(conn)
        t0 = time.monotonic()
        await medic.heal()  # idle connections replaced now; the stuck one looked for
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(stuck, 10)
        assert time.monotonic() - t0 < 3 * medic.STUCK_AFTER + 2
    assert medic.unstuck == 1
    assert await _query(proxied_pool, "select 'again' as v") == {"v": "again"}  # a fresh connection


async def test_a_long_query_on_a_working_connection_is_left_alone(
    proxied_pool: db.WorkPool, db_url: str
) -> None:
    medic = PoolMedic(proxied_pool)
    long = await _long(proxied_pool, db_url)
    assert await medic.unstick() == 0
    assert await asyncio.wait_for(long, 10) == {"slept": False}
    assert medic.unstuck == 0


async def test_a_query_running_longer_than_the_medics_wait_is_left_alone(
    proxied_pool: db.WorkPool, db_url: str
) -> None:
    # Its backend is busy, not idle: a caller waiting that long on a working
    # connection is waiting on the server, and its connection is not shut down.
    # (Looked at after the query has run for more than STUCK_AFTER: before that,
    # the backend's last state change alone would tell it apart.)
    medic = PoolMedic(proxied_pool)
    long = await _long(proxied_pool, db_url, seconds=3, running_for=2 * medic.STUCK_AFTER)
    assert await medic.unstick() == 0
    assert await asyncio.wait_for(long, 10) == {"slept": False}
    assert medic.unstuck == 0


async def test_stuck_connections_are_found_when_none_is_left_to_lend(
    proxy: FaultProxy, db_url: str
) -> None:
    pool = db.make_pool(proxy.url(db_url), 2)  # at most two
    await pool.open(wait=True)
    try:
        medic = PoolMedic(pool)
        a, b = await pool.getconn(), await pool.getconn()
        proxy.blackhole()
        stuck = [asyncio.create_task(c.execute("select 'lost'")) for c in (a, b)]
        done, _ = await asyncio.wait(stuck, timeout=1.0)
        assert not done
        await medic.heal()  # the pool has nothing to lend: the medic asks on its own
        for task in stuck:
            with pytest.raises(psycopg.OperationalError):
                await asyncio.wait_for(task, 10)
        assert medic.unstuck == 2
        for c in (a, b):
            await pool.putconn(c)
        assert await _query(pool, "select 'again' as v") == {"v": "again"}
    finally:
        await pool.close(timeout=1)


async def test_a_look_made_while_the_link_is_down_gives_up_soon_and_the_next_one_cuts(
    proxied_pool: db.WorkPool, proxy: FaultProxy
) -> None:
    # While a link is down, the medic's own connection cannot be made either: it
    # gives up within CONNECT_WITHIN (not after its 10-s connect timeout), so
    # that the heal that follows the link's return looks again, and finds the
    # query stuck since.
    medic = PoolMedic(proxied_pool)
    await _query(proxied_pool, "select 1")
    async with proxied_pool.connection() as conn:
        proxy.blackhole()
        proxy.partition = True  # new connections go nowhere too: the link is down
        stuck = await _lost(conn)
        t0 = time.monotonic()
        assert await medic.unstick() == 0  # no connection of its own: nothing decided
        # Its connection attempt given up after CONNECT_WITHIN, not the pool's 10 s.
        assert time.monotonic() - t0 < medic.CONNECT_WITHIN + 3.0
        assert not stuck.done()
        proxy.partition = False  # the link is back (for new connections)
        assert await medic.unstick() == 1
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(stuck, 10)
    assert medic.unstuck == 1


async def test_the_watch_cuts_a_query_stuck_with_no_error_to_start_a_heal(
    proxied_pool: db.WorkPool, proxy: FaultProxy
) -> None:
    # A link down for a few seconds raises nothing: the queries sent meanwhile
    # just wait. The watch (a periodic duty of the worker) asks the server about
    # a connection it saw waiting at WAITING_LOOKS looks in a row.
    medic = PoolMedic(proxied_pool)
    await _query(proxied_pool, "select 1")
    async with proxied_pool.connection() as conn:
        proxy.blackhole()
        stuck = await _lost(conn)
        for _ in range(medic.WAITING_LOOKS - 1):
            await medic.watch()  # seen waiting: not yet a reason to ask
        assert medic.unstuck == 0 and not stuck.done()
        await medic.watch()
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(stuck, 10)
    assert medic.unstuck == 1 and medic.heals == 0  # found by the watch alone


async def test_the_watch_leaves_a_long_query_alone(proxied_pool: db.WorkPool, db_url: str) -> None:
    medic = PoolMedic(proxied_pool)
    long = await _long(proxied_pool, db_url)
    for _ in range(medic.WAITING_LOOKS + 1):
        await medic.watch()
    assert await asyncio.wait_for(long, 10) == {"slept": False}
    assert medic.unstuck == 0
