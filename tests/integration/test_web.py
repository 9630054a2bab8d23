"""The dashboard served by uvicorn on a real port, against a real database:
auth on every page and action, CSRF and origin checks, the actions, /metrics,
/healthz, and live updates over server-sent events."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from listener.settings import Settings
from listener.web.app import create_app
from tests.helpers import aconnect, await_until, free_port

TOKEN = "test-admin-token-ABC-0123456789-xyz"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}


@pytest.fixture
async def web(db_url: str) -> AsyncIterator[tuple[str, Any]]:
    app = create_app(Settings(), db_url, TOKEN)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    await await_until(started, what="uvicorn started")
    yield f"http://127.0.0.1:{port}", app.state.dashboard
    server.should_exit = True
    await asyncio.wait_for(task, 10)


@pytest.fixture
async def client(web: tuple[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=web[0], timeout=10) as c:
        yield c


async def insert_course(db_url: str, subject: str = "Algebra", **cols: Any) -> str:
    cols = {"subject": subject, **cols}
    async with await aconnect(db_url) as c:
        cur = await c.execute(
            f"insert into ai_course_jobs ({', '.join(cols)})"
            f" values ({', '.join(['%s'] * len(cols))}) returning id",
            list(cols.values()),
        )
        row = await cur.fetchone()
    assert row is not None
    return str(row["id"])


async def job_row(db_url: str, job_id: str) -> dict[str, Any]:
    async with await aconnect(db_url) as c:
        cur = await c.execute("select * from ai_course_jobs where id = %s", [job_id])
        row = await cur.fetchone()
    assert row is not None
    return row


PROTECTED = [
    ("GET", "/admin/jobs"),
    ("GET", "/admin/jobs?live=1"),
    ("GET", "/admin/jobs/snapshot"),
    ("GET", "/admin/jobs/events"),
    ("GET", "/metrics"),
    ("POST", "/admin/jobs/mark-stale"),
    ("POST", "/admin/jobs/dead-letter"),
    ("POST", "/admin/jobs/requeue"),
    ("POST", "/admin/logout"),
]


async def test_every_page_and_action_needs_the_token(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "ai_jobs_session=forged"}):
        for method, path in PROTECTED:
            r = await client.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["www-authenticate"].startswith("Bearer")
    # A browser gets the sign-in form, still with 401.
    r = await client.get("/admin/jobs", headers=HTML)
    assert r.status_code == 401 and 'name="token"' in r.text and "<table" not in r.text
    assert (await client.get("/healthz")).json()["status"] == "ok"


async def test_bearer_first_html_lists_recent_jobs(client: httpx.AsyncClient, db_url: str) -> None:
    ids = [await insert_course(db_url, f"Course {i}") for i in range(3)]
    dead = await insert_course(db_url, "Dead <b>one</b>", status="dead_letter", retry_count=3)
    r = await client.get("/admin/jobs", headers=BEARER | HTML)
    assert r.status_code == 200
    for i in [*ids, dead]:
        assert f'data-id="{i}"' in r.text
    assert "Dead &lt;b&gt;one&lt;/b&gt;" in r.text  # escaped
    assert f'value="ai_course_jobs:{dead}"' in r.text  # its requeue button
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"
    cards = re.findall(r'data-status="(\w+)">\s*<h3>[^<]*</h3>\s*<div class="count">(\d+)', r.text)
    assert dict(cards)["pending"] == "3" and dict(cards)["dead_letter"] == "1"


async def test_sign_in_session_csrf_and_origin(
    web: tuple[str, Any], client: httpx.AsyncClient, db_url: str
) -> None:
    base = web[0]
    r = await client.post("/admin/login", data={"token": "nope", "next": "/admin/jobs"})
    assert r.status_code == 401 and "not right" in r.text
    assert "set-cookie" not in r.headers

    # An open redirect is not possible through `next`.
    r = await client.post(
        "/admin/login",
        data={"token": TOKEN, "next": "https://evil.example/"},
        headers={"Origin": base},
    )
    assert r.status_code == 303 and r.headers["location"] == "/admin/jobs"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.cookies.get("ai_jobs_session")

    page = await client.get("/admin/jobs?live=1", headers=HTML)
    assert page.status_code == 200
    csrf = re.search(r'data-csrf="([^"]+)"', page.text)
    assert csrf is not None
    token = csrf.group(1)

    dead = await insert_course(db_url, "Dead", status="dead_letter", retry_count=3, error="x")
    form = {"job": f"ai_course_jobs:{dead}"}
    # Without the CSRF token, or from another origin: refused, nothing changes.
    r = await client.post("/admin/jobs/requeue", data=form, headers=JSON | {"Origin": base})
    assert r.status_code == 403
    r = await client.post(
        "/admin/jobs/requeue",
        data=form | {"csrf_token": token},
        headers=JSON | {"Origin": "https://evil.example"},
    )
    assert r.status_code == 403
    assert (await job_row(db_url, dead))["status"] == "dead_letter"

    r = await client.post(
        "/admin/jobs/requeue",
        data=form,
        headers=JSON | {"Origin": base, "X-CSRF-Token": token},
    )
    assert r.status_code == 200, r.text
    assert r.json()["ok"] is True
    row = await job_row(db_url, dead)
    assert (row["status"], row["retry_count"], row["error"]) == ("pending", 0, None)

    # A plain form post (no JavaScript) goes back to the page.
    r = await client.post(
        "/admin/jobs/mark-stale",
        data={"csrf_token": token},
        headers=HTML | {"Origin": base},
    )
    assert r.status_code == 303 and r.headers["location"] == "/admin/jobs"

    r = await client.post("/admin/logout", data={"csrf_token": token}, headers={"Origin": base})
    assert r.status_code == 303
    assert (await client.get("/admin/jobs")).status_code == 401


async def test_actions_with_bearer(client: httpx.AsyncClient, db_url: str) -> None:
    stuck = await insert_course(db_url, "Stuck", status="processing")
    async with await aconnect(db_url) as c:
        await c.execute(
            "update ai_course_jobs set last_heartbeat = now() - interval '10 minutes'"
            " where id = %s",
            [stuck],
        )
    failed = await insert_course(db_url, "Out", status="failed", retry_count=3, max_retries=3)

    r = await client.post("/admin/jobs/mark-stale", headers=BEARER)
    assert r.json()["message"] == "Marked 1 job(s) stale"
    assert r.json()["jobs"] == [{"job_id": stuck, "job_type": "course"}]
    assert (await job_row(db_url, stuck))["status"] == "stale"

    r = await client.post("/admin/jobs/dead-letter", headers=BEARER)
    assert r.json()["message"] == "Moved 1 job(s) to the dead letter"
    assert (await job_row(db_url, failed))["status"] == "dead_letter"

    r = await client.post("/admin/jobs/requeue", data={"id": failed}, headers=BEARER)
    assert r.status_code == 200 and r.json()["table"] == "ai_course_jobs"

    r = await client.post(
        "/admin/jobs/requeue", data={"id": "8d6c3f1e-0000-4000-8000-000000000000"}, headers=BEARER
    )
    assert r.status_code == 404 and "not found" in r.json()["message"]
    r = await client.post(
        "/admin/jobs/requeue", data={"id": failed, "table": "pg_authid"}, headers=BEARER
    )
    assert r.status_code == 400
    r = await client.post("/admin/jobs/requeue", data={"id": "x"}, headers=BEARER)
    assert r.status_code == 400


async def test_metrics_in_prometheus_format(client: httpx.AsyncClient, db_url: str) -> None:
    await insert_course(db_url, "waiting")
    async with await aconnect(db_url) as c:
        await c.execute(
            "insert into ai_course_jobs (subject, status, started_at, completed_at, metrics)"
            " values ('a', 'done', now() - interval '40 s', now() - interval '10 s',"
            ' \'{"provider": "anthropic", "generationDurationMs": 25000}\')'
        )
    r = await client.get("/metrics", headers=BEARER)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert 'ai_jobs_queue_depth{status="pending",table="ai_course_jobs"} 1.0' in text
    assert 'ai_jobs_queue_depth{status="dead_letter",table="ai_media_jobs"} 0.0' in text
    assert 'ai_jobs_job_duration_seconds{job_type="course",quantile="0.5"} 30.0' in text
    assert 'ai_jobs_provider_latency_seconds{provider="anthropic",quantile="0.9"} 25.0' in text
    assert 'ai_jobs_alert_firing{rule="pending_depth",severity="critical"} 0.0' in text
    assert "ai_jobs_rate_limit_rejections_total 0.0" in text


async def test_metrics_of_providers(client: httpx.AsyncClient, db_url: str) -> None:
    async with await aconnect(db_url) as c:
        await c.execute(
            "select ai_job_add_usage(array['openai', 'openai'], array['gpt-4.1-mini', 'other'],"
            " array[3, 1], array[300, 10], array[100, 0], array[2400, 5], array[0.0125, 0])"
        )
        await c.execute(
            "select ai_job_add_usage(array['openai'], array['gpt-4.1-mini'],"
            " array[1], array[100], array[0], array[800], array[0.0013])"
        )
        await c.execute(
            "select * from ai_job_provider_failed('anthropic', 'auth', 'HTTP 401', 3, 60)"
        )
    r = await client.get("/metrics", headers=BEARER)
    text = r.text
    labels = 'kind="{}",model="gpt-4.1-mini",provider="openai"'
    assert f"ai_jobs_tokens_total{{{labels.format('input')}}} 400.0" in text
    assert f"ai_jobs_tokens_total{{{labels.format('cached_input')}}} 100.0" in text
    assert f"ai_jobs_tokens_total{{{labels.format('output')}}} 3200.0" in text
    assert 'ai_jobs_cost_usd_total{model="gpt-4.1-mini",provider="openai"} 0.0138' in text
    assert 'ai_jobs_provider_breaker_open{provider="anthropic"} 1.0' in text
    assert 'ai_jobs_provider_breaker_open{provider="openai"} 0.0' in text
    assert 'ai_jobs_alert_firing{rule="provider_auth",severity="critical"} 1.0' in text


async def test_workers_on_the_page_in_metrics_and_healthz(
    client: httpx.AsyncClient, db_url: str
) -> None:
    r = await client.get("/healthz")  # a deployment with no worker still answers
    assert r.status_code == 200 and r.json()["database"] is True and r.json()["workers"] == 0
    page = (await client.get("/admin/jobs", headers=BEARER | HTML)).text
    assert "No live worker" in page
    async with await aconnect(db_url) as c:
        await c.execute(
            "insert into ai_job_workers (id, host, pid, listener_state, jobs_running, version,"
            " probe_seconds, reconnects) values"
            " ('h1:10:aaaaaa', 'h1', 10, 'listening', 2, '0.1.0', 0.002, 3),"
            " ('h2:20:bbbbbb', 'h2', 20, 'deaf', 0, '0.1.0', null, 7)"
        )
        await c.execute(  # a dead one, not shown
            "insert into ai_job_workers (id, host, pid, last_seen, listener_state, version)"
            " values ('h3:30:cccccc', 'h3', 30, now() - interval '1 hour', 'listening', '0.1.0')"
        )
    page = (await client.get("/admin/jobs", headers=BEARER | HTML)).text
    assert 'data-worker="h1:10:aaaaaa" data-listener="listening"' in page
    assert 'data-worker="h2:20:bbbbbb" data-listener="deaf"' in page
    assert "h3:30:cccccc" not in page
    snap = (await client.get("/admin/jobs/snapshot", headers=BEARER | JSON)).json()
    assert 'data-worker="h1:10:aaaaaa"' in snap["workers"]
    overview = (await client.get("/admin/overview", headers=BEARER | HTML)).text
    assert "h2:20:bbbbbb" in overview and "h3:30:cccccc" not in overview
    assert (await client.get("/healthz")).json()["workers"] == 2
    text = (await client.get("/metrics", headers=BEARER)).text
    assert 'ai_jobs_workers{listener_state="listening"} 1.0' in text
    assert 'ai_jobs_workers{listener_state="deaf"} 1.0' in text
    assert 'ai_jobs_workers{listener_state="polling"} 0.0' in text
    assert 'ai_jobs_listener_up{worker="h1:10:aaaaaa"} 1.0' in text
    assert 'ai_jobs_listener_up{worker="h2:20:bbbbbb"} 0.0' in text
    assert 'ai_jobs_listen_probe_seconds{worker="h1:10:aaaaaa"} 0.002' in text
    assert 'ai_jobs_reconnects_total{worker="h2:20:bbbbbb"} 7.0' in text
    assert "h3:30:cccccc" not in text


class Stream:
    """One server-sent-events connection, read in the background."""

    def __init__(self, response: httpx.Response) -> None:
        self.snapshots: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self._task = asyncio.create_task(self._read(response))

    async def _read(self, response: httpx.Response) -> None:
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "snapshot":
                await self.snapshots.put(json.loads(line[5:]))

    async def until(self, predicate: Any, timeout: float = 10) -> dict[str, str]:  # noqa: ASYNC109
        async def find() -> dict[str, str]:
            while True:
                snap = await self.snapshots.get()
                if predicate(snap):
                    return snap

        return await asyncio.wait_for(find(), timeout)

    async def close(self) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


@asynccontextmanager
async def stream(client: httpx.AsyncClient) -> AsyncIterator[Stream]:
    async with client.stream("GET", "/admin/jobs/events", headers=BEARER) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        s = Stream(r)
        try:
            yield s
        finally:
            await s.close()


def _row_status(snap: dict[str, str], job_id: str) -> str | None:
    m = re.search(rf'data-id="{job_id}" data-status="(\w+)"', snap["rows"])
    return m.group(1) if m else None


async def test_live_updates_follow_status_changes(client: httpx.AsyncClient, db_url: str) -> None:
    async with stream(client) as a, stream(client) as b:
        await a.until(lambda s: "rows" in s)  # the first snapshot comes at once
        jid = await insert_course(db_url, "Live one")
        for s in (a, b):
            await s.until(lambda snap: _row_status(snap, jid) == "pending")
        async with await aconnect(db_url) as c:
            cur = await c.execute("select * from claim_jobs('ai_course_jobs', 'w', 1)")
            claimed = await cur.fetchone()
            assert claimed is not None
            await a.until(lambda snap: _row_status(snap, jid) == "processing")
            await c.execute(
                "select complete_jobs('ai_course_jobs', %s, %s, %s, %s::jsonb[])",
                [[claimed["id"]], [claimed["claim_token"]], ["courses/x/course.json"], ["{}"]],
            )
        snap = await a.until(lambda snap: _row_status(snap, jid) == "done")
        assert 'data-status="done"' in snap["cards"]
        await b.until(lambda snap: _row_status(snap, jid) == "done")

        # Two streams, one LISTEN connection.
        async with await aconnect(db_url) as c:
            cur = await c.execute(
                "select count(*) as n from pg_stat_activity"
                " where application_name = 'ai-jobs web listen' and datname = current_database()"
            )
            assert (await cur.fetchone() or {})["n"] == 1


async def test_live_updates_survive_a_lost_listen_connection(
    web: tuple[str, Any], client: httpx.AsyncClient, db_url: str
) -> None:
    feed = web[1].feed
    async with stream(client) as s:
        await s.until(lambda snap: "rows" in snap)
        listen_pids = (
            "select pid from pg_stat_activity"
            " where application_name = 'ai-jobs web listen' and datname = current_database()"
        )
        async with await aconnect(db_url) as c:
            old = [r["pid"] for r in await (await c.execute(listen_pids)).fetchall()]
            assert len(old) == 1
            await c.execute("select pg_terminate_backend(%s)", old)

        async def relistening() -> bool:
            # A fresh LISTEN backend, and the feed says it listens again.
            async with await aconnect(db_url) as c:
                pids = [r["pid"] for r in await (await c.execute(listen_pids)).fetchall()]
            return feed.listening.is_set() and len(pids) == 1 and pids != old

        await await_until(relistening, what="LISTEN connection back")
        jid = await insert_course(db_url, "After the reconnect")
        await s.until(lambda snap: _row_status(snap, jid) == "pending")


async def test_after_an_outage_the_dashboard_answers_at_once(
    web: tuple[str, Any], client: httpx.AsyncClient, db_url: str
) -> None:
    feed = web[1].feed
    await asyncio.gather(*(client.get("/admin/jobs/snapshot", headers=BEARER) for _ in range(4)))
    old = feed.service.backend_pid
    async with await aconnect(db_url) as c:  # every backend of the dashboard, pool included
        await c.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where datname = current_database() and pid <> pg_backend_pid()"
        )

    async def relistening() -> bool:
        return feed.listening.is_set() and feed.service.backend_pid != old

    await await_until(relistening, what="LISTEN connection back")
    await await_until(lambda: _healed(web[1]), what="the pool replaced")
    for _ in range(4):  # the pool's dead connections were replaced, not served
        r = await client.get("/admin/jobs/snapshot", headers=BEARER)
        assert r.status_code == 200, r.text


async def _healed(dashboard: Any) -> bool:
    return bool(dashboard.medic.heals >= 1)


async def test_healthz_reports_the_database(
    web: tuple[str, Any], client: httpx.AsyncClient
) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json()["database"] is True
    pool = web[1].pool
    await pool.close()  # the database is unreachable from here on
    r = await client.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
