"""The daily budget per user, enforced by the database for every role and client,
under concurrent inserts; its rejection counter and alert; `ai-jobs costs`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from listener import alerts, errors
from listener.settings import Settings
from tests.helpers import AI_JOBS, env

Conn = psycopg.AsyncConnection[dict[str, Any]]
pytestmark = pytest.mark.timeout(60)


async def as_user(db_url: str, user: uuid.UUID) -> psycopg.AsyncConnection[Any]:
    """A signed-in Supabase-style client (role authenticated)."""
    c = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
    await c.execute("set role authenticated")
    await c.execute("select set_config('request.jwt.claim.sub', %s, false)", [str(user)])
    return c


async def charge(conn: Conn, table: str, job_id: Any, cost: float | None) -> None:
    """A provider call made for the job, and what it cost (None: no price known),
    recorded as the worker records each call (listener/providers/meter.py)."""
    await conn.execute(
        "select ai_job_add_charges(array[%s], array[%s::uuid], '{openai}', '{gpt-4.1-mini}',"
        " '{100}', '{0}', '{100}', array[%s::numeric])",
        [table, job_id, cost],
    )


async def spent(conn: Conn, user: uuid.UUID, cost: float, table: str = "ai_course_jobs") -> None:
    """A done job of the user's whose provider calls cost this much."""
    metrics = json.dumps({"estimatedCostUsd": cost, "provider": "openai"})
    if table == "ai_course_jobs":
        cur = await conn.execute(
            "insert into ai_course_jobs (subject, created_by, status, metrics, completed_at)"
            " values ('paid', %s, 'done', %s, now()) returning id",
            [user, metrics],
        )
    else:
        cur = await conn.execute(
            "insert into ai_media_jobs (prompt, media_type, created_by, status, metrics)"
            " values ('paid', 'image', %s, 'done', %s) returning id",
            [user, metrics],
        )
    row = await cur.fetchone()
    assert row is not None
    await charge(conn, table, row["id"], cost)


async def rejections(conn: Conn) -> int:
    cur = await conn.execute(
        "select case when is_called then last_value else 0 end as n from ai_job_budget_rejections"
    )
    return int((await cur.fetchone() or {})["n"])


async def test_the_budget_holds_under_20_concurrent_inserts(conn: Conn, db_url: str) -> None:
    await conn.execute(
        "update ai_job_settings set rate_limit_per_hour = 100,"
        " daily_budget_usd_per_user = 0.10, budget_estimate_usd_per_job = 0.02"
    )
    user = uuid.uuid4()
    await spent(conn, user, 0.02, "ai_media_jobs")  # both tables count
    await spent(conn, user, 0.01)
    await alerts.record_samples(conn)  # the alert's baseline
    clients = [await as_user(db_url, user) for _ in range(20)]

    async def insert(c: psycopg.AsyncConnection[Any], n: int) -> str | None:
        try:
            await c.execute(
                "insert into ai_course_jobs (subject, created_by) values (%s, %s)",
                [f"burst {n}", user],
            )
        except psycopg.Error as exc:
            return str(exc.diag.message_primary)
        return None

    try:
        outcomes = await asyncio.gather(*(insert(c, n) for n, c in enumerate(clients)))
    finally:
        for c in clients:
            await c.close()
    # 0.03 spent; each unfinished job reserves 0.02: 0.03, 0.05, 0.07, 0.09 pass.
    assert outcomes.count(None) == 4
    refused = [o for o in outcomes if o is not None]
    assert len(refused) == 16
    assert all(o.startswith("Budget exceeded: $0.1100 spent or reserved") for o in refused)
    assert await rejections(conn) == 16
    found = {a.rule: a for a in await alerts.evaluate(conn, Settings())}
    assert found["budget_rejections"].value == 16 and found["budget_rejections"].firing


async def test_what_counts_and_who_is_exempt(conn: Conn, db_url: str) -> None:
    await conn.execute(
        "update ai_job_settings set daily_budget_usd_per_user = 0.05,"
        " budget_estimate_usd_per_job = 0.04"
    )
    user = uuid.uuid4()
    # Jobs that ended without a result, and yesterday's jobs, cost nothing today.
    await conn.execute(
        "insert into ai_course_jobs (subject, created_by, status, created_at) values"
        " ('dl', %(u)s, 'dead_letter', now()), ('old', %(u)s, 'pending', now() - interval '25 h')",
        {"u": user},
    )
    await conn.execute(
        "insert into ai_course_jobs (subject, created_by) values ('first', %s)", [user]
    )
    # 0.04 reserved, under 0.05: one more passes, in either table; then 0.08 is over.
    media = "insert into ai_media_jobs (prompt, media_type, created_by) values ('p', 'image', %s)"
    await conn.execute(media, [user])
    with pytest.raises(psycopg.Error) as err:
        await conn.execute(media, [user])
    assert err.value.sqlstate == "AJ402"
    assert isinstance(errors.translate(err.value), errors.BudgetExceeded)
    # System jobs are exempt; a null cap turns it off.
    await conn.execute("insert into ai_course_jobs (subject) values ('system')")
    await conn.execute("update ai_job_settings set daily_budget_usd_per_user = null")
    await conn.execute("insert into ai_course_jobs (subject, created_by) values ('ok', %s)", [user])


def _cli(db_url: str, *args: str, **extra: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AI_JOBS, *args], env=env(db_url, **extra), capture_output=True, text=True, timeout=60
    )


async def test_cli_refuses_with_one_line_and_migrate_writes_the_setting(
    conn: Conn, db_url: str
) -> None:
    # An installed database keeps its value through every deploy's migrate ...
    assert _cli(db_url, "migrate", DAILY_BUDGET_USD_PER_USER="0.01").returncode == 0
    assert await cap(conn) is None
    # ... unless asked.
    p = _cli(db_url, "migrate", "--write-settings", DAILY_BUDGET_USD_PER_USER="0.01")
    assert p.returncode == 0, p.stderr
    assert await cap(conn) == 0.01
    user = uuid.uuid4()
    await spent(conn, user, 0.02)
    p = _cli(db_url, "enqueue", "course", "--subject", "More", "--user", str(user))
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        "ai-jobs: error: Budget exceeded: $0.0200 spent or reserved in the last 24 hours "
        "(cap $0.01 per user)"
    ]
    # Unset, even --write-settings leaves the value an operator set from psql alone.
    await conn.execute("update ai_job_settings set daily_budget_usd_per_user = 7")
    assert _cli(db_url, "migrate", "--write-settings").returncode == 0
    assert await cap(conn) == 7


async def cap(conn: Conn) -> float | None:
    cur = await conn.execute("select daily_budget_usd_per_user::float8 as cap from ai_job_settings")
    return (await cur.fetchone() or {})["cap"]


async def test_a_fresh_install_takes_the_budget_from_the_setting(empty_db_url: str) -> None:
    p = _cli(empty_db_url, "migrate", DAILY_BUDGET_USD_PER_USER="2.5")
    assert p.returncode == 0, p.stderr
    async with await psycopg.AsyncConnection.connect(
        empty_db_url, autocommit=True, row_factory=dict_row
    ) as c:
        assert await cap(c) == 2.5


async def test_costs_command(conn: Conn, db_url: str) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    jobs = [
        (alice, "openai", "gpt-4.1-mini", 1000, 200, 500, 0.25),
        (alice, "anthropic", "claude-haiku-4-5", 2000, 0, 100, 0.5),
        (bob, "openai", "gpt-4.1-mini", 10, 0, 10, None),
    ]
    for user, provider, model, inp, cached, out, cost in jobs:
        metrics = {
            "provider": provider,
            "model": model,
            "inputTokens": inp,
            "cachedInputTokens": cached,
            "outputTokens": out,
            "estimatedCostUsd": cost,
        }
        await conn.execute(
            "insert into ai_course_jobs (subject, created_by, status, metrics)"
            " values ('s', %s, 'done', %s)",
            [user, json.dumps(metrics)],
        )
    await conn.execute(  # older than the window
        "insert into ai_course_jobs (subject, status, metrics, created_at) values"
        " ('old', 'done', '{\"estimatedCostUsd\": 9}', now() - interval '3 days')"
    )
    p = _cli(db_url, "costs", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["by"] == "model" and out["totalCostUsd"] == 9.75
    p = _cli(db_url, "costs", "--days", "2", "--json")
    by_model = {r["model"]: r for r in json.loads(p.stdout)["rows"]}
    assert by_model["openai gpt-4.1-mini"] == {
        "model": "openai gpt-4.1-mini",
        "jobs": 2,
        "inputTokens": 1010,
        "cachedInputTokens": 200,
        "outputTokens": 510,
        "costUsd": 0.25,
        "unpricedJobs": 1,
    }
    p = _cli(db_url, "costs", "--days", "1", "--by", "user", "--json")
    by_user = {r["user"]: r["costUsd"] for r in json.loads(p.stdout)["rows"]}
    assert by_user == {str(alice): 0.75, str(bob): 0.0}
    p = _cli(db_url, "costs", "--by", "day")
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["day", "jobs", "input", "cached", "output", "cost_usd", "unpriced"]
    assert len(lines) == 3  # today and three days ago


# -- spend is what was paid ------------------------------------------------------


async def spend(conn: Conn, user: uuid.UUID) -> float:
    cur = await conn.execute(
        "select ai_job_user_spend(%s, now() - interval '24 hours')::float8 as usd", [user]
    )
    return float((await cur.fetchone() or {})["usd"])


async def insert_as(c: psycopg.AsyncConnection[Any], table: str = "ai_course_jobs") -> str:
    """An insert by the signed-in user of `c`; its id."""
    if table == "ai_course_jobs":
        sql = (
            "insert into ai_course_jobs (subject, created_by) values ('s', auth.uid()) returning id"
        )
    else:
        sql = (
            "insert into ai_media_jobs (prompt, media_type, created_by)"
            " values ('p', 'image', auth.uid()) returning id"
        )
    row = await (await c.execute(sql)).fetchone()
    assert row is not None
    return str(row[0])


async def claimed(conn: Conn, table: str, job_id: str) -> Any:
    cur = await conn.execute("select * from claim_job(%s, %s, 'w')", [table, job_id])
    row = await cur.fetchone()
    assert row is not None, "not claimable"
    return row["claim_token"]


async def test_cancelling_a_running_job_does_not_give_its_cost_back(supabase_db_url: str) -> None:
    """The issue's dodge: insert, wait for processing, cancel_job, insert again. A
    job cancelled while it runs may have a provider call in flight that will be
    paid: it keeps the estimate (or what it paid, if more)."""
    async with await psycopg.AsyncConnection.connect(
        supabase_db_url, autocommit=True, row_factory=dict_row
    ) as owner:
        await owner.execute(
            "update ai_job_settings set daily_budget_usd_per_user = 0.05,"
            " budget_estimate_usd_per_job = 0.05"
        )
        user = uuid.uuid4()
        alice = await as_user(supabase_db_url, user)
        try:
            first = await insert_as(alice)
            await claimed(owner, "ai_course_jobs", first)
            await alice.execute("select cancel_job(%s, 'ai_course_jobs')", [first])
            with pytest.raises(psycopg.Error) as err:
                await insert_as(alice)
            assert err.value.sqlstate == "AJ402"
            # the call in flight returns, dearer than the estimate: that counts
            await charge(owner, "ai_course_jobs", first, 0.07)
            assert await spend(owner, user) == pytest.approx(0.07)
            # a job cancelled before it ran paid nothing and keeps nothing
            await owner.execute("update ai_job_settings set daily_budget_usd_per_user = 1")
            second = await insert_as(alice, "ai_media_jobs")
            assert await spend(owner, user) == pytest.approx(0.12)
            await alice.execute("select cancel_job(%s, 'ai_media_jobs')", [second])
            assert await spend(owner, user) == pytest.approx(0.07)
        finally:
            await alice.close()


async def test_every_provider_call_counts_whatever_became_of_the_job(conn: Conn) -> None:
    """Failed attempts each count, and so do jobs in the dead letter; a call with no
    known price counts at the estimate; a job not finished is reserved at the
    estimate, less what it paid already."""
    await conn.execute(
        "update ai_job_settings set daily_budget_usd_per_user = 10,"
        " budget_estimate_usd_per_job = 0.05"
    )
    user = uuid.uuid4()
    cur = await conn.execute(
        "insert into ai_course_jobs (subject, created_by, max_retries) values ('s', %s, 3)"
        " returning id",
        [user],
    )
    jid = str((await cur.fetchone() or {})["id"])
    assert await spend(conn, user) == pytest.approx(0.05)  # reserved
    for attempt in range(3):
        token = await claimed(conn, "ai_course_jobs", jid)
        await charge(conn, "ai_course_jobs", jid, 0.01)  # the answer
        await charge(conn, "ai_course_jobs", jid, 0.02)  # its repair round
        await conn.execute(
            "select * from fail_job('ai_course_jobs', %s, %s, 'invalid', 0)", [jid, token]
        )
        paid = 0.03 * (attempt + 1)
        if attempt < 2:  # failed, retries left: at least the estimate
            assert await spend(conn, user) == pytest.approx(max(paid, 0.05))
    row = await (
        await conn.execute("select status from ai_course_jobs where id = %s", [jid])
    ).fetchone()
    assert row == {"status": "dead_letter"}
    assert await spend(conn, user) == pytest.approx(0.09)
    cur = await conn.execute(
        "insert into ai_media_jobs (prompt, media_type, created_by, status)"
        " values ('p', 'image', %s, 'done') returning id",
        [user],
    )
    await charge(conn, "ai_media_jobs", (await cur.fetchone() or {})["id"], None)
    assert await spend(conn, user) == pytest.approx(0.14)


async def test_spend_exactly_at_the_cap_refuses_the_next_insert(conn: Conn) -> None:
    await conn.execute(
        "update ai_job_settings set daily_budget_usd_per_user = 0.05,"
        " budget_estimate_usd_per_job = 0.01"
    )
    user = uuid.uuid4()
    await spent(conn, user, 0.0499)
    await conn.execute("insert into ai_course_jobs (subject, created_by) values ('a', %s)", [user])
    # 0.0499 + 0.01 reserved: over; a user exactly at the cap is refused too
    other = uuid.uuid4()
    await spent(conn, other, 0.05)
    with pytest.raises(psycopg.Error) as err:
        await conn.execute(
            "insert into ai_course_jobs (subject, created_by) values ('b', %s)", [other]
        )
    assert err.value.sqlstate == "AJ402"
    assert str(err.value.diag.message_primary).startswith("Budget exceeded: $0.0500 spent")


async def test_a_users_spend_counts_only_their_own_jobs(conn: Conn) -> None:
    """Bob's calls, paid or reserved, in either table, are not Alice's."""
    await conn.execute(
        "update ai_job_settings set daily_budget_usd_per_user = null,"
        " budget_estimate_usd_per_job = 0.02, rate_limit_per_hour = 100"
    )
    alice, bob = uuid.uuid4(), uuid.uuid4()
    await spent(conn, bob, 1.0, "ai_media_jobs")
    await spent(conn, bob, 1.0, "ai_course_jobs")
    await conn.execute(
        "insert into ai_media_jobs (prompt, media_type, created_by, status)"
        " select 'p', 'image', %s, 'pending' from generate_series(1, 5)",
        [bob],
    )
    await conn.execute("update ai_job_settings set daily_budget_usd_per_user = 0.05")
    assert await spend(conn, alice) == 0
    await spent(conn, alice, 0.01, "ai_media_jobs")
    assert await spend(conn, alice) == pytest.approx(0.01)
    for table in ("ai_media_jobs", "ai_course_jobs"):
        if table == "ai_media_jobs":
            await conn.execute(
                "insert into ai_media_jobs (prompt, media_type, created_by)"
                " values ('mine', 'image', %s)",
                [alice],
            )
        else:
            await conn.execute(
                "insert into ai_course_jobs (subject, created_by) values ('mine', %s)", [alice]
            )
    assert await spend(conn, alice) == pytest.approx(0.05)


async def test_the_budget_holds_under_repeatable_read(supabase_db_url: str) -> None:
    """Each insert summed the spend from its own snapshot, taken before the others
    committed: under REPEATABLE READ all of them passed."""
    from tests.integration.test_rate_limit_and_rls import _racing_inserts

    async with await psycopg.AsyncConnection.connect(supabase_db_url, autocommit=True) as owner:
        await owner.execute(
            "update ai_job_settings set rate_limit_per_hour = 100,"
            " daily_budget_usd_per_user = 0.10, budget_estimate_usd_per_job = 0.02"
        )
    user = uuid.uuid4()
    results = await _racing_inserts(
        supabase_db_url,
        user,
        "repeatable read",
        20,
        "insert into ai_media_jobs (prompt, media_type, created_by)"
        " values ('race', 'image', auth.uid())",
    )
    assert sorted(results) == ["AJ402"] * 15 + ["ok"] * 5
