"""fastclaim.FastClaimer on its own, against a migrated database: the claim sent
with libpq's asynchronous calls and read by the event loop's reader callback
returns the row psycopg's execute would (the handler's columns, decoded), claims
nothing for a forged id, fails on a dropped connection without losing the job,
and gives its connection back to the pool."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest

from listener import dal, db
from listener.fastclaim import FastClaimer
from tests.helpers import await_until, connect, insert_course, job

pytestmark = pytest.mark.timeout(60)


async def _claim(claimer: FastClaimer, table: str, job_id: Any) -> tuple[Any, Any]:
    """(row, error) of one claim, as its reply callback was given them, once
    the claim has ended (its commit too)."""
    got: asyncio.Future[tuple[Any, Any]] = asyncio.get_running_loop().create_future()
    claimer.claim(table, job_id, lambda row, exc: got.set_result((row, exc)))
    assert not claimer.ready  # one claim at a time
    found = await asyncio.wait_for(got, 10)
    await claimer.settle(10)
    assert not claimer.busy
    return found


async def test_a_claim_returns_what_the_named_statement_returns(
    pool: db.WorkPool, db_url: str
) -> None:
    with connect(db_url) as c:
        fast, slow = insert_course(c, "Fast", params={"n": 1}), insert_course(c, "Slow")
    claimer = FastClaimer(pool, "w-fast")
    await claimer.open()
    try:
        row, exc = await _claim(claimer, "ai_course_jobs", uuid.UUID(fast))
        assert exc is None and claimer.ready and claimer.round_trip > 0
        async with pool.connection() as conn:  # the same claim through psycopg's execute
            other = await dal.CLAIM_DUE_JOB.first(
                conn, {"table": "ai_course_jobs", "id": uuid.UUID(slow), "worker": "w-slow"}
            )
        assert row is not None and other is not None
        assert {k: type(v) for k, v in row.items()} == {k: type(v) for k, v in other.items()}
        assert row["id"] == uuid.UUID(fast) and row["job_table"] == "ai_course_jobs"
        assert row["job"] == {
            "id": fast,
            "subject": "Fast",
            "course_id": row["job"]["course_id"],
            "params": {"n": 1},
            "batch": False,  # sql/031: the batch door asks only when it is true
        }
        with connect(db_url) as c:
            claimed = job(c, fast)
        assert claimed["status"] == "processing" and claimed["worker_id"] == "w-fast"
        assert claimed["claim_token"] == row["claim_token"]
        # Claimed already, of the other table, or no job at all: nothing.
        for table, jid in (
            ("ai_course_jobs", fast),
            ("ai_media_jobs", slow),
            ("ai_course_jobs", str(uuid.uuid4())),
        ):
            assert await _claim(claimer, table, uuid.UUID(jid)) == (None, None)
    finally:
        await claimer.close()
    assert claimer.conn is None and not claimer.ready


async def test_each_opening_prepares_its_own_statement(pool: db.WorkPool, db_url: str) -> None:
    # The pool lends the same connection again: the earlier preparation is still
    # there, and a new one (perhaps of other code) must not collide with it.
    claimer = FastClaimer(pool, "w")
    backends = []
    for subject in ("First", "Second"):
        await claimer.open()
        assert claimer.conn is not None
        backends.append(claimer.conn.info.backend_pid)
        with connect(db_url) as c:
            jid = insert_course(c, subject)
        row, exc = await _claim(claimer, "ai_course_jobs", uuid.UUID(jid))
        assert exc is None and row is not None and row["job"]["subject"] == subject
        await claimer.close()
    assert claimer.conn is None and not claimer.ready
    assert backends[0] == backends[1]  # the same connection: prepared twice, no clash


async def test_a_dropped_connection_fails_the_claim_and_loses_nothing(
    pool: db.WorkPool, db_url: str
) -> None:
    claimer = FastClaimer(pool, "w")
    await claimer.open()
    assert claimer.conn is not None
    pid = claimer.conn.info.backend_pid
    with connect(db_url) as c:
        jid = insert_course(c, "Kept")
        c.execute("select pg_terminate_backend(%s)", [pid])
    row, exc = await _claim(claimer, "ai_course_jobs", uuid.UUID(jid))
    assert row is None and isinstance(exc, psycopg.OperationalError)
    assert not claimer.ready  # retired at once: nothing more is sent on it
    with pytest.raises(RuntimeError):
        claimer.claim("ai_course_jobs", uuid.UUID(jid), lambda r, e: None)
    await claimer.close()  # the pool replaces the dead connection
    with connect(db_url) as c:
        assert job(c, jid)["status"] == "pending"
    await claimer.open()
    row, exc = await _claim(claimer, "ai_course_jobs", uuid.UUID(jid))
    assert exc is None and row is not None
    await claimer.close()


async def test_closed_with_a_claim_waiting_on_a_lock_the_claim_is_cancelled(
    pool: db.WorkPool, db_url: str
) -> None:
    # At shutdown a fast claim may wait behind a table's lock (a migration). Given
    # back with it unanswered, its backend would claim the job once the lock goes,
    # for nobody: close() cancels it and reads how it ended.
    claimer = FastClaimer(pool, "w")
    await claimer.open()
    conn = claimer.conn
    assert conn is not None
    with connect(db_url) as c:
        jid = insert_course(c, "Blocked")
    replies: list[tuple[Any, Any]] = []
    with connect(db_url) as blocker:
        with blocker.transaction():
            blocker.execute("lock table ai_course_jobs in exclusive mode")  # the claim waits
            claimer.claim("ai_course_jobs", uuid.UUID(jid), lambda r, e: replies.append((r, e)))
            pid = conn.info.backend_pid
            await await_until(_waits_on_a_lock(db_url, pid), what="claim waiting")
            assert replies == []
            await claimer.close()
        assert len(replies) == 1 and replies[0][0] is None
        assert isinstance(replies[0][1], psycopg.errors.QueryCanceled)
    with connect(db_url) as c:  # the lock is gone: nothing claims the job behind our back
        await await_until(_idle(db_url, pid), what="the claim's backend idle")
        assert job(c, jid)["status"] == "pending"
    assert not conn.closed  # answered: back in the pool, usable


def _idle(db_url: str, pid: int) -> Any:
    async def check() -> bool:
        with connect(db_url) as c:
            row = c.execute("select state from pg_stat_activity where pid = %s", [pid]).fetchone()
            return row is None or row["state"] == "idle"

    return check


def _waits_on_a_lock(db_url: str, pid: int) -> Any:
    async def check() -> bool:
        with connect(db_url) as c:
            row = c.execute(
                "select wait_event_type from pg_stat_activity where pid = %s", [pid]
            ).fetchone()
            return bool(row is not None and row["wait_event_type"] == "Lock")

    return check


# A deferred trigger that runs in the claim's commit: it waits for the test's
# advisory lock 7, and refuses the commits the `refusals` table asks it to.
_HOLD_COMMIT = """
create table refusals (n int not null);
create sequence commits_seen;
create function hold_commit() returns trigger language plpgsql as $$
begin
    perform pg_advisory_xact_lock(7);
    if nextval('commits_seen') in (select n from refusals) then
        raise exception 'commit refused by the test';
    end if;
    return null;
end
$$;
create constraint trigger hold_commit after update on ai_course_jobs
    deferrable initially deferred for each row execute function hold_commit();
"""


def hold_commits(db_url: str, refuse: tuple[int, ...] = ()) -> None:
    """Make every commit that updates a course job wait for advisory lock 7 (held
    by whoever holds it), and refuse the commits numbered in `refuse` (1: the first)."""
    with connect(db_url) as c:
        c.execute(_HOLD_COMMIT)
        for n in refuse:
            c.execute("insert into refusals values (%s)", [n])


async def test_the_row_comes_before_the_commit_and_the_commit_is_told_apart(
    pool: db.WorkPool, db_url: str
) -> None:
    # The job starts on the claim's row; its commit (the WAL flush) follows. Held
    # here by a deferred trigger, the commit is told to the owner on its own:
    # durable, refused, or lost with the connection (the claim is then undone).
    hold_commits(db_url, refuse=(2,))
    claimer = FastClaimer(pool, "w")
    await claimer.open()
    try:
        with connect(db_url) as c:
            ids = [insert_course(c, f"Held {i}") for i in range(3)]
        row, end, after = await _held_claim(claimer, db_url, ids[0])
        assert end is None and claimer.ready
        assert after["status"] == "processing" and after["claim_token"] == row["claim_token"]

        row, end, after = await _held_claim(claimer, db_url, ids[1])
        assert isinstance(end, psycopg.errors.RaiseException)
        assert "commit refused by the test" in str(end)
        assert not claimer.ready  # retired: the owner closes it
        assert after["status"] == "pending" and after["claim_token"] is None
        await claimer.close()

        await claimer.open()
        row, end, after = await _held_claim(claimer, db_url, ids[2], lose=True)
        assert isinstance(end, psycopg.OperationalError) and not claimer.ready
        assert after["status"] == "pending" and after["claim_token"] is None
    finally:
        await claimer.close()


async def _held_claim(
    claimer: FastClaimer, db_url: str, jid: str, lose: bool = False
) -> tuple[Any, Any, Any]:
    """Claim `jid` while its commit waits for advisory lock 7, held here; check
    that the row comes first, then let the commit go (or, with `lose`, end its
    connection before). The row, how the commit ended, and the job after."""
    rows: list[tuple[Any, Any]] = []
    ends: list[Any] = []
    with connect(db_url) as gate:
        gate.execute("select pg_advisory_lock(7)")

        def reply(r: Any, e: Any) -> Any:
            rows.append((r, e))
            return ends.append

        claimer.claim("ai_course_jobs", uuid.UUID(jid), reply)
        await await_until(lambda: _true(rows), what="the claim's row")
        row, exc = rows[0]
        assert exc is None and row is not None and row["id"] == uuid.UUID(jid)
        assert claimer.busy and not claimer.ready and ends == []  # the commit waits
        with connect(db_url) as c:  # not committed: others still see it pending
            assert job(c, jid)["status"] == "pending"
        if lose:
            assert claimer.conn is not None
            with connect(db_url) as c:
                c.execute("select pg_terminate_backend(%s)", [claimer.conn.info.backend_pid])
            await await_until(lambda: _true(ends), what="the lost commit told")
        gate.execute("select pg_advisory_unlock(7)")
    await claimer.settle(10)
    assert not claimer.busy and len(ends) == 1
    with connect(db_url) as c:
        return row, ends[0], job(c, jid)


async def _true(value: Any) -> bool:
    return bool(value)
