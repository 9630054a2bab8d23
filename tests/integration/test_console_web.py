"""The console pages and actions served by uvicorn on a real port: one job in
full, filters and keyset pages, bulk actions, cancel, pause, the overview, and
sign-in behind a PaaS router."""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from psycopg.rows import dict_row

from listener.console import Cursor, JobFilter, find
from listener.settings import Settings
from listener.web.app import create_app
from tests.helpers import aconnect, await_until, free_port
from tests.integration.test_web import BEARER, HTML, JSON, TOKEN, insert_course

COURSE = {
    "id": "tides",
    "title": "Tides <for> beginners",
    "subject": "Tides",
    "description": "Why the sea rises and falls.",
    "level": "beginner",
    "language": "English",
    "groups": [
        {
            "id": "g1",
            "title": "The Moon",
            "summary": "Gravity at work.",
            "items": [
                {
                    "id": "g1-i1",
                    "prompt": "What pulls the tides?",
                    "answer": "The Moon's gravity",
                    "explanation": "Mostly the Moon, partly the Sun.",
                    "options": ["The wind", "The Moon's gravity"],
                }
            ],
        }
    ],
}


@pytest.fixture
async def console(db_url: str) -> AsyncIterator[tuple[str, Path]]:
    """The app with a storage folder, served as a PaaS router would reach it:
    the client's address is not one uvicorn trusts for forwarded headers."""
    storage = Path(tempfile.mkdtemp())
    app = create_app(Settings(storage_url=str(storage)), db_url, TOKEN)
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        timeout_graceful_shutdown=1,
        forwarded_allow_ips="10.255.255.1",  # not us: as behind Heroku's, Render's, Fly's router
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    await await_until(started, what="uvicorn started")
    yield f"http://127.0.0.1:{port}", storage
    server.should_exit = True
    await asyncio.wait_for(task, 10)


@pytest.fixture
async def client(console: tuple[str, Path]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=console[0], timeout=20) as c:
        yield c


async def sql(db_url: str, query: str, *params: Any) -> list[dict[str, Any]]:
    async with await aconnect(db_url) as c:
        cur = await c.execute(query, list(params))
        return await cur.fetchall() if cur.description else []


def ids_in(html: str) -> list[str]:
    return re.findall(r'<tr data-id="([0-9a-f-]{36})"', html)


async def test_every_new_page_and_action_needs_the_token(client: httpx.AsyncClient) -> None:
    jid = str(uuid.uuid4())
    for method, path in [
        ("GET", f"/admin/jobs/{jid}"),
        ("GET", f"/admin/jobs/{jid}/result"),
        ("GET", "/admin/jobs/rows"),
        ("GET", "/admin/overview"),
        ("GET", "/admin/overview/charts"),
        ("GET", "/admin/static/uPlot.iife.min.js"),
        ("POST", "/admin/jobs/cancel"),
        ("POST", "/admin/jobs/pause"),
        ("POST", "/admin/jobs/bulk"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = await client.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path)
    r = await client.get(f"/admin/jobs/{jid}", headers=HTML)
    assert r.status_code == 401 and 'name="token"' in r.text
    assert f'value="/admin/jobs/{jid}"' in r.text  # back to this job after signing in


async def test_one_job_in_full(client: httpx.AsyncClient, console: Any, db_url: str) -> None:
    storage: Path = console[1]
    (storage / "courses/tides").mkdir(parents=True)
    (storage / "courses/tides/course.json").write_text(json.dumps(COURSE))
    jid = await insert_course(db_url, "Tides <script>", max_retries=5)
    for n in (1, 2):
        claimed = await sql(db_url, "select * from claim_jobs('ai_course_jobs', 'w-1', 1)")
        await sql(
            db_url,
            "select * from fail_job('ai_course_jobs', %s, %s, %s, 0)",
            jid,
            claimed[0]["claim_token"],
            f"openai: HTTP 429 <b>{n}</b>",
        )
    claimed = await sql(db_url, "select * from claim_jobs('ai_course_jobs', 'w-2', 1)")
    metrics = {
        "provider": "anthropic",
        "model": "claude-haiku-4-5",
        "fallbacks": ["openai: HTTP 429 rate limited"],
        "repairRounds": 1,
        "inputTokens": 1200,
        "outputTokens": 3400,
        "cachedInputTokens": 1000,
        "estimatedCostUsd": 0.0187,
        "totalDurationMs": 4200,
        "generationDurationMs": 4000,
    }
    await sql(
        db_url,
        "select complete_jobs('ai_course_jobs', %s, %s, %s, %s::jsonb[])",
        [jid],
        [claimed[0]["claim_token"]],
        ["courses/tides/course.json"],
        [json.dumps(metrics)],
    )
    # Every row of the list links to its page.
    page = await client.get("/admin/jobs", headers=BEARER | HTML)
    assert f'href="/admin/jobs/{jid}"' in page.text

    r = await client.get(f"/admin/jobs/{jid}", headers=BEARER | HTML)
    assert r.status_code == 200
    text = r.text
    assert (
        "Tides &lt;script&gt;" in text
        and "<script>" not in text.split("</style>")[1].split("<script nonce")[0]
    )
    # The attempts' errors, each kept, escaped; the timeline to the end.
    assert text.count('class="err attempt-error"') == 2
    assert "openai: HTTP 429 &lt;b&gt;1&lt;/b&gt;" in text
    assert "openai: HTTP 429 &lt;b&gt;2&lt;/b&gt;" in text
    assert "<b>Done</b>" in text and "w-1" in text
    # Provider, fallbacks, repairs, tokens and cost.
    for fragment in (
        "anthropic · claude-haiku-4-5",
        "openai: HTTP 429 rate limited",
        "1200 in (1000 cached) · 3400 out",
        "$0.0187",
    ):
        assert fragment in text, fragment
    # The course, readable: groups and items, escaped.
    assert "Tides &lt;for&gt; beginners" in text
    assert "1. The Moon" in text and "What pulls the tides?" in text
    assert "The Moon&#39;s gravity" in text
    assert "media-src 'self'" in r.headers["content-security-policy"]

    r = await client.get(f"/admin/jobs/{uuid.uuid4()}", headers=BEARER)
    assert r.status_code == 404


async def test_media_result_is_served_for_the_page(
    client: httpx.AsyncClient, console: Any, db_url: str
) -> None:
    storage: Path = console[1]
    (storage / "media").mkdir()
    rows = await sql(
        db_url,
        "insert into ai_media_jobs (prompt, media_type, status, result_path, started_at,"
        " completed_at) values ('a cat', 'image', 'done', 'x', now(), now()),"
        " ('a song', 'audio', 'done', 'x', now(), now()) returning id, media_type",
    )
    for row in rows:
        ext = "png" if row["media_type"] == "image" else "mp3"
        path = f"media/{row['id']}.{ext}"
        (storage / path).write_bytes(b"\x89PNG fake" if ext == "png" else b"ID3 fake")
        await sql(
            db_url, "update ai_media_jobs set result_path = %s where id = %s", path, row["id"]
        )
        page = await client.get(f"/admin/jobs/{row['id']}", headers=BEARER | HTML)
        tag = "<img" if ext == "png" else "<audio"
        assert f'{tag} id="{"image" if ext == "png" else "audio"}"' in page.text
        assert f'src="/admin/jobs/{row["id"]}/result"' in page.text
        r = await client.get(f"/admin/jobs/{row['id']}/result", headers=BEARER)
        assert r.status_code == 200
        assert r.headers["content-type"] == ("image/png" if ext == "png" else "audio/mpeg")
        assert r.content.startswith(b"\x89PNG" if ext == "png" else b"ID3")
        assert r.headers["x-content-type-options"] == "nosniff"
    course = await insert_course(db_url, "No media")
    assert (await client.get(f"/admin/jobs/{course}/result", headers=BEARER)).status_code == 404


async def test_filters_search_and_keyset_pages(client: httpx.AsyncClient, db_url: str) -> None:
    user = str(uuid.uuid4())
    await sql(
        db_url,
        "insert into ai_course_jobs (subject, created_at, status, created_by)"
        " select 'bulk ' || g, now() - g * interval '1 minute',"
        " case when g %% 10 = 0 then 'dead_letter' else 'done' end,"
        " case when g <= 5 then %s::uuid end"
        " from generate_series(1, 120) g",
        user,
    )
    # Same created_at for many rows (one bulk insert): pages still never repeat a row.
    await sql(
        db_url,
        "insert into ai_media_jobs (prompt, media_type) select 'pic ' || g, 'image'"
        " from generate_series(1, 30) g",
    )
    seen: list[str] = []
    url = "/admin/jobs?range=24h"
    while url:
        r = await client.get(url, headers=BEARER | HTML)
        assert r.status_code == 200
        seen += ids_in(r.text)
        m = re.search(r'id="older" href="([^"]+)"', r.text)
        url = m.group(1).replace("&amp;", "&") if m else ""
    assert len(seen) == 150 and len(set(seen)) == 150

    r = await client.get("/admin/jobs?status=dead_letter&type=course", headers=BEARER | HTML)
    assert len(ids_in(r.text)) == 12
    r = await client.get(f"/admin/jobs?user={user}", headers=BEARER | HTML)
    assert len(ids_in(r.text)) == 5
    r = await client.get("/admin/jobs?q=bulk+11", headers=BEARER | HTML)
    assert len(ids_in(r.text)) == 11  # bulk 11, bulk 110 to 119
    one = seen[7]
    for q in (one, one[:8], one.upper()):
        r = await client.get(f"/admin/jobs/rows?q={q}", headers=BEARER)
        assert ids_in(r.json()["rows"]) == [one], q
    r = await client.get("/admin/jobs?status=nope", headers=BEARER | HTML)
    assert r.status_code == 400


async def test_bulk_actions_count_first_then_act(client: httpx.AsyncClient, db_url: str) -> None:
    user = str(uuid.uuid4())
    await sql(
        db_url,
        "insert into ai_course_jobs (subject, status, retry_count, error, created_at,"
        " completed_at) select 'dead ' || g, 'dead_letter', 3, 'timeout',"
        " now() - case when g <= 4 then interval '10 minutes' else interval '3 hours' end, now()"
        " from generate_series(1, 6) g",
    )
    await sql(
        db_url,
        "insert into ai_course_jobs (subject, created_by) select 'mine ' || g, %s::uuid"
        " from generate_series(1, 3) g",
        user,
    )
    form = {"action": "requeue", "status": "dead_letter", "range": "1h"}
    r = await client.post("/admin/jobs/bulk", data=form, headers=BEARER)
    assert r.json()["count"] == 4 and r.json()["dry_run"] is True
    assert "Requeue 4 job(s)" in r.json()["message"]
    assert len(await sql(db_url, "select 1 from ai_course_jobs where status = 'dead_letter'")) == 6
    r = await client.post("/admin/jobs/bulk", data=form | {"dry_run": "0"}, headers=BEARER)
    assert r.json()["count"] == 4 and r.json()["message"].startswith("Requeued 4 job(s)")
    assert len(await sql(db_url, "select 1 from ai_course_jobs where status = 'dead_letter'")) == 2

    form = {"action": "cancel", "status": "pending", "user": user, "dry_run": "0"}
    r = await client.post("/admin/jobs/bulk", data=form, headers=BEARER)
    assert r.json()["count"] == 3
    form = {"action": "delete", "dry_run": "0"}
    r = await client.post("/admin/jobs/bulk", data=form, headers=BEARER)
    assert r.json()["count"] == 5  # 3 cancelled and 2 dead letters; the requeued stay
    left = await sql(db_url, "select status, count(*) as n from ai_course_jobs group by 1")
    assert left == [{"status": "pending", "n": 4}]
    r = await client.post("/admin/jobs/bulk", data={"action": "drop"}, headers=BEARER)
    assert r.status_code == 400


async def test_cancel_and_pause_from_the_dashboard(client: httpx.AsyncClient, db_url: str) -> None:
    jid = await insert_course(db_url, "To cancel")
    r = await client.post(
        "/admin/jobs/cancel", data={"job": f"ai_course_jobs:{jid}"}, headers=BEARER
    )
    assert r.status_code == 200 and r.json()["message"] == f"Cancelled {jid} (was pending)"
    r = await client.post("/admin/jobs/cancel", data={"id": jid}, headers=BEARER)
    assert r.status_code == 409 and "already cancelled" in r.json()["message"]

    r = await client.post(
        "/admin/jobs/pause", data={"table": "ai_media_jobs", "paused": "1"}, headers=BEARER
    )
    assert r.json()["message"] == "Paused ai_media_jobs"
    snap = (await client.get("/admin/jobs/snapshot", headers=BEARER)).json()
    assert 'data-table="ai_media_jobs" data-paused="1"' in snap["queues"]
    metrics = (await client.get("/metrics", headers=BEARER)).text
    assert 'ai_jobs_paused{table="ai_media_jobs"} 1.0' in metrics
    assert 'ai_jobs_queue_depth{status="cancelled",table="ai_course_jobs"} 1.0' in metrics
    r = await client.post(
        "/admin/jobs/pause", data={"table": "ai_media_jobs", "paused": "0"}, headers=BEARER
    )
    assert r.json()["message"] == "Resumed ai_media_jobs"
    r = await client.post(
        "/admin/jobs/pause", data={"table": "pg_authid", "paused": "1"}, headers=BEARER
    )
    assert r.status_code == 400


async def test_overview_charts_and_static_library(client: httpx.AsyncClient, db_url: str) -> None:
    await sql(
        db_url,
        "insert into ai_course_jobs (subject, status, created_at, started_at, completed_at,"
        " metrics, created_by) values ('a', 'done', now() - interval '50 s',"
        " now() - interval '40 s', now() - interval '10 s',"
        ' \'{"provider": "openai", "inputTokens": 10, "outputTokens": 20,'
        ' "estimatedCostUsd": 0.5}\', %s)',
        str(uuid.uuid4()),
    )
    r = await client.get("/admin/overview", headers=BEARER | HTML)
    assert r.status_code == 200
    assert re.search(r'<script src="/admin/static/uPlot.iife.min.js" nonce="[^"]+">', r.text)
    assert "$0.5000" in r.text and "openai" in r.text
    d = (await client.get("/admin/overview/charts?window=hour", headers=BEARER)).json()
    assert len(d["t"]) == 60 and sum(d["done"]) == 1 and max(x or 0 for x in d["p50"]) == 30
    assert max(x or 0 for x in d["wait_p50"]) == 10
    assert d["to"] - d["from"] == 3600 and abs(d["to"] - time.time()) < 60  # the window asked for
    d = (await client.get("/admin/overview/charts?window=day", headers=BEARER)).json()
    assert len(d["t"]) == 96
    assert d["to"] - d["from"] == 86400
    js = await client.get("/admin/static/uPlot.iife.min.js", headers=BEARER)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "uPlot" in js.text
    assert (await client.get("/admin/static/x.js", headers=BEARER)).status_code == 404


# -- sign-in behind a PaaS router -------------------------------------------------

ROUTERS = {
    "heroku": {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Port": "443",
        "X-Forwarded-For": "203.0.113.7",
        "Via": "1.1 vegur",
        "X-Request-Start": "1700000000000",
    },
    "render": {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-For": "203.0.113.7, 10.0.0.1",
        "Rndr-Id": "abc123",
        "True-Client-Ip": "203.0.113.7",
    },
    "fly": {
        "X-Forwarded-Proto": "https",
        "Fly-Forwarded-Proto": "https",
        "X-Forwarded-Port": "443",
        "Fly-Client-IP": "203.0.113.7",
        "X-Forwarded-Ssl": "on",
    },
}


@pytest.mark.parametrize("router", list(ROUTERS))
async def test_sign_in_behind_a_paas_router(client: httpx.AsyncClient, router: str) -> None:
    host = f"ai-jobs-admin.{router}.example"
    headers = ROUTERS[router] | {"Host": host, "Origin": f"https://{host}"}
    r = await client.post(
        "/admin/login", data={"token": TOKEN, "next": "/admin/jobs"}, headers=headers
    )
    assert r.status_code == 303, r.text
    cookie = r.headers["set-cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    session = r.cookies["ai_jobs_session"]
    # The session then works for pages and for actions posted from the same origin.
    page_headers = headers | {"Cookie": f"ai_jobs_session={session}", "Accept": "text/html"}
    page = await client.get("/admin/jobs", headers=page_headers)
    assert page.status_code == 200
    csrf = re.search(r'data-csrf="([^"]+)"', page.text)
    assert csrf is not None
    r = await client.post(
        "/admin/jobs/mark-stale",
        headers=page_headers | {"Accept": "application/json", "X-CSRF-Token": csrf.group(1)},
    )
    assert r.status_code == 200, r.text


async def test_each_refusal_says_why(client: httpx.AsyncClient, monkeypatch: Any) -> None:
    router = ROUTERS["heroku"] | {"Host": "admin.example"}
    r = await client.post(
        "/admin/login",
        data={"token": "wrong", "next": "/admin/jobs"},
        headers=router | {"Origin": "https://admin.example"},
    )
    assert r.status_code == 401 and "That token is not right." in r.text
    r = await client.post(
        "/admin/login",
        data={"token": TOKEN, "next": "/admin/jobs"},
        headers=router | {"Origin": "https://evil.example"},
    )
    assert r.status_code == 401 and "set-cookie" not in r.headers
    assert "came from https://evil.example, not https://admin.example" in r.text
    # An https site never accepts a post from its plain-http twin.
    r = await client.post(
        "/admin/login",
        data={"token": TOKEN},
        headers=router | {"Origin": "http://evil.example"},
    )
    assert r.status_code == 401 and "came from http://evil.example" in r.text
    # Without a router, an https Origin against a plain-http request is refused.
    r = await client.post(
        "/admin/login",
        data={"token": TOKEN},
        headers={"Host": "admin.example", "Origin": "https://admin.example"},
    )
    assert r.status_code == 401 and "Cross-site request refused" in r.text

    ok = await client.post(
        "/admin/login",
        data={"token": TOKEN},
        headers=router | {"Origin": "https://admin.example"},
    )
    session = ok.cookies["ai_jobs_session"]
    import listener.web.auth as auth

    monkeypatch.setattr(auth, "SESSION_MAX_AGE", -1)
    r = await client.get(
        "/admin/jobs", headers=router | HTML | {"Cookie": f"ai_jobs_session={session}"}
    )
    assert r.status_code == 401 and "Your session expired: sign in again." in r.text
    r = await client.get("/admin/jobs/snapshot", headers={"Cookie": f"ai_jobs_session={session}"})
    assert r.status_code == 401 and "expired" in r.json()["message"]
    r = await client.get(
        "/admin/jobs", headers=router | HTML | {"Cookie": "ai_jobs_session=forged.value"}
    )
    assert r.status_code == 401 and "no longer valid" in r.text
    assert JSON  # (imported for symmetry with test_web)


async def test_overview_workers_table_is_for_humans(client: httpx.AsyncClient, db_url: str) -> None:
    """Numbers and times formatted as on the job list, not a row's raw values."""
    await sql(
        db_url,
        "insert into ai_job_workers (id, host, pid, started_at, last_seen, listener_state,"
        " jobs_running, version, probe_seconds, reconnects) values ('host-a:4242:abc123',"
        " 'host-a', 4242, '2026-12-01 08:05:09.123456+00', now() - interval '1.234 s',"
        " 'listening', 2, '0.1.0', 0.0008886680000159686, 3)",
    )
    r = await client.get("/admin/overview", headers=BEARER | HTML)
    assert r.status_code == 200
    table = r.text[r.text.index('id="workers"') :]
    assert "0.000888" not in table and "08:05:09.123456" not in table  # no raw values
    start = table.index('data-worker="host-a:4242:abc123"')
    row = table[start : table.index("</tr>", start)]
    assert "0.9 ms" in row and "0.000888" not in row  # the probe's round trip
    assert ">08:05:09<" in row and "2026-12-01 08:05:09.123456" not in row  # started, UTC
    assert re.search(r">1\.\d s ago<", row), row  # last seen
    assert "listening" in row and ">2<" in row and ">3<" in row


async def test_overview_lists_the_open_batches(client: httpx.AsyncClient, db_url: str) -> None:
    """Batch jobs (sql/027): the batches not yet ended, the provider's id escaped."""
    await sql(
        db_url,
        "insert into ai_job_batches (job_table, state, provider, provider_batch_id, worker_id)"
        " values ('ai_course_jobs', 'submitted', 'openai', '<b>batch_1</b>', 'host-a:1:x'),"
        " ('ai_course_jobs', 'ended', 'openai', 'batch_old', null)",
    )
    r = await client.get("/admin/overview", headers=BEARER | HTML)
    assert r.status_code == 200
    table = r.text[
        r.text.index('id="open-batches"') : r.text.index(
            "</table>", r.text.index('id="open-batches"')
        )
    ]
    assert "&lt;b&gt;batch_1&lt;/b&gt;" in table and "<b>batch_1" not in table
    assert "submitted" in table and "host-a:1:x" in table and "batch_old" not in table


# -- keyset pages over equal created_at ------------------------------------------

TABLES = ("ai_course_jobs", "ai_media_jobs")
# Each row: its table and which of four instants it was created at (many share one).
ROWS = st.lists(st.tuples(st.sampled_from(TABLES), st.integers(0, 3)), max_size=40)


async def _pages(conn: Any, f: JobFilter, page_size: int) -> list[tuple[Any, Any]]:
    """(created_at, id) of every row shown, page by page, each page's cursor
    going through its token as the page's link carries it."""
    shown: list[tuple[Any, Any]] = []
    after: Cursor | None = None
    for _ in range(100):
        rows, nxt = await find(conn, f, after, page_size)
        assert len(rows) <= page_size
        shown += [(r["created_at"], r["id"]) for r in rows]
        if nxt is None:
            return shown
        after = Cursor.parse(nxt.token())
    raise AssertionError("the pages never ended")


async def _check_pages(db_url: str, rows: list[tuple[str, int]], page_size: int) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, row_factory=dict_row) as conn:
        try:  # one transaction per example, rolled back: the next starts empty
            base = (await (await conn.execute("select now() as t")).fetchone())["t"]
            for table in TABLES:
                offsets = [n for t, n in rows if t == table]
                label = "subject" if table == "ai_course_jobs" else "prompt"
                extra = ", media_type" if table == "ai_media_jobs" else ""
                value = ", 'image'" if table == "ai_media_jobs" else ""
                await conn.execute(
                    f"insert into {table} ({label}, created_at{extra})"
                    f" select 'row ' || n, %s - n * interval '1 second'{value}"
                    " from unnest(%s::int[]) n",
                    [base, offsets],
                )
            want = await (
                await conn.execute(
                    "select created_at, id from ai_course_jobs union all"
                    " select created_at, id from ai_media_jobs order by created_at desc, id desc"
                )
            ).fetchall()
            shown = await _pages(conn, JobFilter(range="24h"), page_size)
            assert shown == [(r["created_at"], r["id"]) for r in want]  # each once, in order
        finally:
            await conn.rollback()


@hsettings(
    max_examples=75,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@example(rows=[("ai_course_jobs", 0)] * 5 + [("ai_media_jobs", 0)] * 4, page_size=3)
@given(rows=ROWS, page_size=st.integers(1, 12))
def test_keyset_pages_show_every_row_once_in_order(
    db_url: str, rows: list[tuple[str, int]], page_size: int
) -> None:
    # One database for the test function (the fixture); each example builds its
    # rows in a transaction and rolls it back.
    asyncio.run(_check_pages(db_url, rows, page_size))
