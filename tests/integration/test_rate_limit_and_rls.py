"""The rate limit and row-level security, enforced by the database for every client."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.helpers import aconnect, connect, insert_course, insert_media
from tests.supabase import aas_user


async def test_twenty_concurrent_inserts_by_one_user_exactly_ten_succeed(db_url: str) -> None:
    user = uuid.uuid4()
    conns = [await aconnect(db_url) for _ in range(20)]
    start = asyncio.Event()

    async def insert(c: psycopg.AsyncConnection[Any]) -> str:
        await start.wait()
        try:
            await c.execute(
                "insert into ai_course_jobs (subject, created_by) values ('s', %s)", [user]
            )
            return "ok"
        except psycopg.Error as exc:
            assert exc.sqlstate == "AJ429"
            assert str(exc.diag.message_primary).startswith("Rate limit exceeded")
            return "limited"

    tasks = [asyncio.create_task(insert(c)) for c in conns]
    await asyncio.sleep(0)
    start.set()
    results = await asyncio.gather(*tasks)
    for c in conns:
        await c.close()
    assert results.count("ok") == 10 and results.count("limited") == 10
    with connect(db_url) as sc:
        n = sc.execute(
            "select count(*) from ai_course_jobs where created_by = %s", [user]
        ).fetchone()
        assert n["count"] == 10
        # every rejection was counted, although each rolled its insert back
        seq = sc.execute("select last_value from ai_job_rate_limit_rejections").fetchone()
        assert seq["last_value"] == 10


def test_limit_is_per_table_and_per_user_and_system_jobs_are_exempt(db_url: str) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    with connect(db_url) as c:
        for _ in range(10):
            insert_course(c, created_by=a)
        with pytest.raises(psycopg.Error, match=r"^Rate limit exceeded") as exc:
            insert_course(c, created_by=a)
        assert exc.value.sqlstate == "AJ429"
        insert_media(c, created_by=a)  # another table: its own count
        insert_course(c, created_by=b)  # another user
        for _ in range(15):
            insert_course(c)  # created_by null: system job
        assert (
            c.execute("select check_ai_job_rate_limit(%s)", [a]).fetchone()[
                "check_ai_job_rate_limit"
            ]
            is False
        )
        assert (
            c.execute("select check_ai_job_rate_limit(%s, 'ai_media_jobs')", [a]).fetchone()[
                "check_ai_job_rate_limit"
            ]
            is True
        )
        assert (
            c.execute("select check_ai_job_rate_limit(null)").fetchone()["check_ai_job_rate_limit"]
            is True
        )
        # jobs older than an hour no longer count
        c.execute(
            "update ai_course_jobs set created_at = now() - interval '61 minutes'"
            " where created_by = %s",
            [a],
        )
        insert_course(c, created_by=a)


def test_limit_changes_from_psql_without_restart(db_url: str) -> None:
    user = uuid.uuid4()
    with connect(db_url) as c, connect(db_url) as admin:
        insert_course(c, created_by=user)
        insert_course(c, created_by=user)
        admin.execute("update ai_job_settings set rate_limit_per_hour = 2")
        with pytest.raises(psycopg.Error, match=r"^Rate limit exceeded"):
            insert_course(c, created_by=user)
        admin.execute("update ai_job_settings set rate_limit_per_hour = 3")
        insert_course(c, created_by=user)


def _as_user(c: psycopg.Connection[Any], user: uuid.UUID) -> None:
    c.execute("set role authenticated")
    c.execute("select set_config('request.jwt.claim.sub', %s, false)", [str(user)])


def test_rls_user_sees_and_inserts_only_own_jobs(db_url: str) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    with connect(db_url) as worker:
        insert_course(worker, "bob's", created_by=bob)
        insert_course(worker, "system")
    with connect(db_url) as c:
        _as_user(c, alice)
        assert c.execute("select auth.uid()").fetchone()["uid"] == alice
        insert_course(c, "alice's", created_by=alice)
        insert_media(c, created_by=alice)
        rows = c.execute("select subject from ai_course_jobs").fetchall()
        assert [r["subject"] for r in rows] == ["alice's"]
        with pytest.raises(errors.InsufficientPrivilege):
            insert_course(c, "as bob", created_by=bob)
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("update ai_course_jobs set status = 'done'")
        assert (
            c.execute("select check_ai_job_rate_limit(auth.uid())").fetchone()[
                "check_ai_job_rate_limit"
            ]
            is True
        )
    with connect(db_url) as worker:  # the owner bypasses RLS
        assert worker.execute("select count(*) from ai_course_jobs").fetchone()["count"] == 3


def test_rls_rate_limit_applies_to_authenticated_users(db_url: str) -> None:
    alice = uuid.uuid4()
    with connect(db_url) as admin:
        admin.execute("update ai_job_settings set rate_limit_per_hour = 1")
    with connect(db_url) as c:
        _as_user(c, alice)
        insert_course(c, created_by=alice)
        with pytest.raises(psycopg.Error, match=r"^Rate limit exceeded"):
            insert_course(c, created_by=alice)


async def _racing_inserts(
    url: str, user: uuid.UUID, isolation: str, n: int, statement: str
) -> list[str]:
    """`n` direct SQL sessions of `authenticated` acting as `user`, each in a
    transaction of that isolation level whose snapshot is taken before any of them
    inserts; then all insert at once, each retrying a serialization failure as a
    client should. Each ends "ok" or with the SQLSTATE that refused it for good."""
    conns = [await aconnect(url) for _ in range(n)]
    for c in conns:
        await aas_user(c, user)
    failures: list[str] = []

    async def one(c: psycopg.AsyncConnection[Any], start: asyncio.Event) -> str:
        first = True
        while True:
            await c.execute(f"begin isolation level {isolation}")
            await c.execute("select count(*) from ai_course_jobs")  # the snapshot
            if first:
                first = False
                await start.wait()
            try:
                await c.execute(statement)
                await c.execute("commit")
                return "ok"
            except psycopg.Error as exc:
                await c.execute("rollback")
                if exc.sqlstate != "40001":
                    return str(exc.sqlstate)
                failures.append("40001")

    start = asyncio.Event()
    tasks = [asyncio.create_task(one(c, start)) for c in conns]
    await asyncio.sleep(0.2)  # every session holds its snapshot
    start.set()
    try:
        return await asyncio.gather(*tasks)
    finally:
        for c in conns:
            await c.close()


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read", "serializable"])
async def test_the_rate_limit_holds_under_every_isolation_level(
    supabase_db_url: str, isolation: str
) -> None:
    """Under REPEATABLE READ each insert counted from its own snapshot, taken before
    the others committed, even after waiting for them: 30 of 30 passed a limit of
    10. A serialization failure (retried) or a refusal is fine; a pass is not."""
    user = uuid.uuid4()
    results = await _racing_inserts(
        supabase_db_url,
        user,
        isolation,
        30,
        "insert into ai_course_jobs (subject, created_by) values ('race', auth.uid())",
    )
    assert sorted(results) == ["AJ429"] * 20 + ["ok"] * 10
    with connect(supabase_db_url) as c:
        n = c.execute("select count(*) from ai_course_jobs where created_by = %s", [user])
        assert n.fetchone()["count"] == 10
