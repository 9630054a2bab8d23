"""The runbook's alert rules against a real database, the rejection counter, the
monitor's transitions and webhook, and `ai-jobs alerts`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from typing import Any

import httpx
import psycopg
import pytest
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import alerts
from listener.settings import Settings
from tests.helpers import AI_JOBS, connect, env

Conn = psycopg.AsyncConnection[dict[str, Any]]


def by_rule(found: list[alerts.Alert]) -> dict[str, alerts.Alert]:
    return {a.rule: a for a in found}


async def test_quiet_database_fires_nothing(conn: Conn) -> None:
    found = await alerts.evaluate(conn, Settings())
    assert [a.rule for a in found] == [
        "dead_letter_last_hour",
        "stale_processing",
        "pending_depth",
        "avg_processing_time",
        "failure_rate",
        "rate_limit_violations",
        "provider_auth",
        "budget_rejections",
        "no_worker",
        "worker_deaf",
    ]
    assert not any(a.firing for a in found)
    assert [a.severity for a in found] == ["critical"] * 3 + ["warning"] * 3 + [
        "critical",
        "warning",
        "critical",
        "warning",
    ]
    assert by_rule(found)["avg_processing_time"].value is None  # nothing finished yet


async def test_each_rule_fires_above_its_threshold(conn: Conn) -> None:
    await conn.execute(
        """
        insert into ai_course_jobs (subject, status, retry_count, completed_at)
        select 'dl', 'dead_letter', 3, now() - interval '5 minutes' from generate_series(1, 6);
        -- Dead letters of yesterday are not "in the last hour".
        insert into ai_course_jobs (subject, status, retry_count, completed_at)
        select 'old', 'dead_letter', 3, now() - interval '1 day' from generate_series(1, 10);
        insert into ai_media_jobs (prompt, media_type, status, started_at, last_heartbeat)
        select 'stuck', 'image', 'processing', now() - interval '20 minutes',
               now() - interval '10 minutes' from generate_series(1, 3);
        insert into ai_media_jobs (prompt, media_type, status) values ('s', 'audio', 'stale');
        insert into ai_media_jobs (prompt, media_type, status, started_at, last_heartbeat)
        values ('alive', 'image', 'processing', now(), now());
        insert into ai_course_jobs (subject) select 'p' || g from generate_series(1, 21) g;
        insert into ai_course_jobs (subject, status, started_at, completed_at)
        select 'slow', 'done', now() - interval '130 seconds', now() - interval '10 seconds'
        from generate_series(1, 14);
        """
    )
    found = by_rule(await alerts.evaluate(conn, Settings()))
    assert found["dead_letter_last_hour"].value == 6
    assert found["stale_processing"].value == 4  # 3 with an old heartbeat + 1 marked stale
    assert found["pending_depth"].value == 21
    assert found["avg_processing_time"].value == pytest.approx(120, abs=1)
    assert found["failure_rate"].value == pytest.approx(30.0)  # 6 dead of 6 + 14 finished
    quiet: tuple[str, ...] = ("rate_limit_violations", "provider_auth", "budget_rejections")
    quiet += ("no_worker", "worker_deaf")
    assert all(a.firing for r, a in found.items() if r not in quiet)
    assert alerts.any_critical(list(found.values()))

    # Thresholds are settings.
    relaxed = Settings(
        alert_dead_letter_per_hour=6,
        alert_stale_processing=10,
        alert_pending_depth=21,
        alert_avg_processing_seconds=200,
        alert_failure_rate_percent=50,
    )
    found = by_rule(await alerts.evaluate(conn, relaxed))
    assert not any(a.firing for a in found.values())
    assert found["pending_depth"].threshold == 21


async def _rejected_inserts(db_url: str, user: uuid.UUID, n: int) -> None:
    """Inserts by a signed-in Supabase-style client (role authenticated), each
    rejected by the rate limit and rolled back."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as c:
        await c.execute("set role authenticated")
        await c.execute("select set_config('request.jwt.claim.sub', %s, false)", [str(user)])
        for _ in range(n):
            with pytest.raises(psycopg.Error, match="Rate limit exceeded"):
                await c.execute(
                    "insert into ai_course_jobs (subject, created_by) values ('x', %s)", [user]
                )


async def test_rate_limit_rejections_survive_the_rollback(conn: Conn, db_url: str) -> None:
    await conn.execute("update ai_job_settings set rate_limit_per_hour = 1")
    user = uuid.uuid4()
    await conn.execute("insert into ai_course_jobs (subject, created_by) values ('ok', %s)", [user])
    await alerts.record_samples(conn)  # the monitor's baseline

    await _rejected_inserts(db_url, user, 6)
    found = by_rule(await alerts.evaluate(conn, Settings()))
    assert found["rate_limit_violations"].value == 6
    assert found["rate_limit_violations"].firing
    assert found["rate_limit_violations"].severity == "warning"

    # The rule looks back one hour: a sample older than that becomes the baseline,
    # and samples older than two hours are pruned.
    await conn.execute(
        "insert into ai_job_counter_samples (counter, sampled_at, value) values"
        " ('rate_limit_rejections', now() - interval '70 minutes', 0),"
        " ('rate_limit_rejections', now() - interval '3 hours', 0)"
    )
    await alerts.record_samples(conn)  # now at 6
    await _rejected_inserts(db_url, user, 2)
    assert by_rule(await alerts.evaluate(conn, Settings()))["rate_limit_violations"].value == 8
    cur = await conn.execute(
        "select count(*) as n from ai_job_counter_samples where sampled_at < now() - interval '2h'"
    )
    assert (await cur.fetchone() or {})["n"] == 0


async def test_monitor_reports_transitions_once(pool: AsyncConnectionPool[Any], conn: Conn) -> None:
    posted: list[dict[str, Any]] = []

    def webhook(request: httpx.Request) -> httpx.Response:
        assert request.url == "https://hooks.example.invalid/T000/B000/secret"
        posted.append(json.loads(request.content))
        return httpx.Response(200, text="ok")

    records: list[dict[str, Any]] = []
    sink = logger.add(lambda m: records.append(m.record["extra"] | {"msg": m.record["message"]}))
    settings = Settings(alert_webhook_url="https://hooks.example.invalid/T000/B000/secret")
    client = httpx.AsyncClient(transport=httpx.MockTransport(webhook))
    monitor = alerts.AlertMonitor(settings, pool, client=client)
    # Another worker, and later a restarted one: they share the reported state.
    other = alerts.AlertMonitor(settings, pool, client=client)
    try:
        await conn.execute(
            "insert into ai_course_jobs (subject) select 'p' || g from generate_series(1, 25) g"
        )
        for _ in range(3):  # firing for three minutes, seen by two workers: reported once
            await monitor.tick()
            await other.tick()
        await alerts.AlertMonitor(settings, pool, client=client).tick()
        assert [p["text"] for p in posted] == [
            ":rotating_light: ai-jobs alert FIRING (critical): pending_depth = 25 (threshold 20):"
            " pending jobs: more worker capacity is needed"
        ]
        assert posted[0]["attachments"][0]["color"] == "danger"
        assert set(monitor.firing) == {"pending_depth"}

        await conn.execute("delete from ai_course_jobs")
        await asyncio.gather(monitor.tick(), other.tick())  # at the same moment
        await monitor.tick()
        assert len(posted) == 2 and "RESOLVED" in posted[1]["text"]
        assert monitor.firing == {}
        actions = [r["action"] for r in records if r.get("rule") == "pending_depth"]
        assert actions == ["alert_firing", "alert_resolved"]
        assert not any("secret" in str(r) for r in records)
    finally:
        logger.remove(sink)
        await client.aclose()


async def test_webhook_failure_is_logged_without_the_url(
    pool: AsyncConnectionPool[Any], conn: Conn
) -> None:
    records: list[str] = []
    sink = logger.add(lambda m: records.append(str(m)))
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    settings = Settings(alert_webhook_url="https://hooks.example.invalid/secret-part")
    try:
        await conn.execute(
            "insert into ai_course_jobs (subject) select 'p' || g from generate_series(1, 25) g"
        )
        await alerts.AlertMonitor(settings, pool, client=client).tick()
    finally:
        logger.remove(sink)
        await client.aclose()
    failed = [r for r in records if "could not post" in r]
    assert len(failed) == 1 and "HTTP 500" in failed[0]
    assert not any("secret-part" in r for r in records)


def _cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AI_JOBS, *args], env=env(db_url), capture_output=True, text=True, timeout=60
    )


def test_cli_alerts_exit_status_and_json(db_url: str) -> None:
    p = _cli(db_url, "alerts", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(out) == {"alerts"} and len(out["alerts"]) == len(alerts.RULES) == 10
    assert set(out["alerts"][0]) == {"rule", "severity", "firing", "value", "threshold"}

    with connect(db_url) as c:  # a warning alone does not fail the command
        c.execute(
            "insert into ai_course_jobs (subject, status, started_at, completed_at)"
            " values ('slow', 'done', now() - interval '5 minutes', now())"
        )
    p = _cli(db_url, "alerts")
    assert p.returncode == 0, p.stderr
    assert "avg_processing_time" in p.stdout and "FIRING" in p.stdout

    with connect(db_url) as c:
        c.execute(
            "insert into ai_media_jobs (prompt, media_type)"
            " select 'p' || g, 'image' from generate_series(1, 21) g"
        )
    p = _cli(db_url, "alerts", "--json")
    assert p.returncode == 1
    firing = {a["rule"]: a for a in json.loads(p.stdout)["alerts"] if a["firing"]}
    assert firing["pending_depth"] == {
        "rule": "pending_depth",
        "severity": "critical",
        "firing": True,
        "value": 21,
        "threshold": 20,
    }


async def _worker_row(conn: Conn, wid: str, state: str, seen_ago: float = 0) -> None:
    await conn.execute(
        "insert into ai_job_workers (id, host, pid, last_seen, listener_state, version)"
        " values (%s, 'h', 1, now() - make_interval(secs => %s), %s, 't')",
        [wid, seen_ago, state],
    )


async def test_no_worker_and_worker_deaf(conn: Conn) -> None:
    await conn.execute(
        """
        -- due for five minutes (a pending job, a retry), one just inserted, one due later
        insert into ai_course_jobs (subject, created_at, run_after)
        values ('waiting', now() - interval '5 minutes', now() - interval '5 minutes');
        insert into ai_media_jobs (prompt, media_type, status, retry_count, run_after)
        values ('retry due', 'image', 'failed', 1, now() - interval '5 minutes');
        insert into ai_course_jobs (subject) values ('just now');
        insert into ai_course_jobs (subject, run_after) values ('later', now() + interval '1 hour');
        """
    )
    found = by_rule(await alerts.evaluate(conn, Settings()))
    assert found["no_worker"].firing and found["no_worker"].value == 2
    assert found["no_worker"].severity == "critical"
    assert not found["worker_deaf"].firing

    # A worker that stopped beating long ago is no help; a deaf one does not listen.
    await _worker_row(conn, "gone:1:a", "listening", seen_ago=3600)
    await _worker_row(conn, "deaf:2:b", "deaf")
    found = by_rule(await alerts.evaluate(conn, Settings()))
    assert found["no_worker"].value == 2
    assert found["worker_deaf"].firing and found["worker_deaf"].value == 1
    assert found["worker_deaf"].severity == "warning"

    for state in ("listening", "polling"):  # one live worker that hears (or polls)
        await conn.execute("delete from ai_job_workers where id = 'live:3:c'")
        await _worker_row(conn, "live:3:c", state)
        found = by_rule(await alerts.evaluate(conn, Settings()))
        assert not found["no_worker"].firing and found["no_worker"].value == 0
