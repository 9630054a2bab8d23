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


async def spent(conn: Conn, user: uuid.UUID, cost: float, table: str = "ai_course_jobs") -> None:
    """A done job of the user's that cost this much."""
    metrics = json.dumps({"estimatedCostUsd": cost, "provider": "openai"})
    if table == "ai_course_jobs":
        await conn.execute(
            "insert into ai_course_jobs (subject, created_by, status, metrics, completed_at)"
            " values ('paid', %s, 'done', %s, now())",
            [user, metrics],
        )
    else:
        await conn.execute(
            "insert into ai_media_jobs (prompt, media_type, created_by, status, metrics)"
            " values ('paid', 'image', %s, 'done', %s)",
            [user, metrics],
        )


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
