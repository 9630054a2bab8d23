"""The end-user API (listener/web/api.py) served by uvicorn against a real
database: create, read, cancel, the result, and the event stream fed by the
LISTEN connection, each as the user the token names."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.apitools import ALICE, BOB, bearer, open_sse, serve
from tests.helpers import aconnect, await_until

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
async def client(db_url: str, tmp_path: Path) -> Any:
    async with (
        serve(db_url, storage_url=str(tmp_path)) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as c,
    ):
        c.served = served  # type: ignore[attr-defined]
        yield c


async def sql(db_url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    async with await aconnect(db_url) as c:
        cur = await c.execute(query, list(args))
        return await cur.fetchall() if cur.description else []


async def claim(db_url: str, table: str = "ai_course_jobs") -> dict[str, Any]:
    (row,) = await sql(db_url, "select * from claim_jobs(%s, 'w', 1)", table)
    return row


async def progress(
    db_url: str, row: dict[str, Any], p: dict[str, Any], partial: Any = None
) -> None:
    await sql(
        db_url,
        "select * from progress_jobs(%s, %s, %s, %s::jsonb[], %s::jsonb[])",
        row["job_table"],
        [row["id"]],
        [row["claim_token"]],
        [json.dumps(p)],
        [json.dumps(partial) if partial is not None else None],
    )


async def complete(db_url: str, row: dict[str, Any], path: str) -> None:
    await sql(
        db_url,
        "select * from complete_jobs(%s, %s, %s, %s, %s::jsonb[])",
        row["job_table"],
        [row["id"]],
        [row["claim_token"]],
        [path],
        ["{}"],
    )


async def test_a_user_asks_for_a_course_and_reads_it(
    client: httpx.AsyncClient, db_url: str
) -> None:
    r = await client.post(
        "/v1/jobs/course",
        headers=bearer(ALICE),
        json={
            "subject": "Algebra",
            "params": {"groupCount": 2},
            "batch": True,
            "trace_parent": TRACE,
        },
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["status"] == "pending" and set(created) == {"id", "status"}
    (row,) = await sql(db_url, "select * from ai_course_jobs where id = %s", created["id"])
    assert row["created_by"] == ALICE and row["batch"] is True and row["trace_parent"] == TRACE
    assert row["params"] == {"groupCount": 2}

    r = await client.get(f"/v1/jobs/{created['id']}", headers=bearer(ALICE))
    assert r.status_code == 200
    job = r.json()
    assert set(job) == {
        "id",
        "table",
        "status",
        "progress",
        "partial_result",
        "result_path",
        "error",
        "created_at",
        "completed_at",
    }
    assert job["table"] == "ai_course_jobs" and job["status"] == "pending"
    assert job["progress"] is None and job["completed_at"] is None
    # Bob, and an id nobody has: the same 404
    for who, jid in ((BOB, created["id"]), (ALICE, "00000000-0000-4000-8000-000000000000")):
        r = await client.get(f"/v1/jobs/{jid}", headers=bearer(who))
        assert r.status_code == 404 and r.json()["error"].startswith("Job ")


async def test_a_user_asks_for_media(client: httpx.AsyncClient, db_url: str) -> None:
    r = await client.post(
        "/v1/jobs/media",
        headers=bearer(BOB),
        json={"prompt": "a cat", "media_type": "image", "params": {"size": "512x512"}},
    )
    assert r.status_code == 201, r.text
    (row,) = await sql(db_url, "select * from ai_media_jobs where id = %s", r.json()["id"])
    assert row["created_by"] == BOB and row["media_type"] == "image" and row["batch"] is False
    r = await client.get(f"/v1/jobs/{row['id']}", headers=bearer(BOB))
    assert r.json()["table"] == "ai_media_jobs" and r.json()["partial_result"] is None


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("course", {"subject": "x", "params": {"groupCount": 99}}, "params"),
        ("course", {"subject": "x", "params": {"colour": "red"}}, "colour"),
        ("course", {"params": {}}, "subject: Field required"),
        ("course", {"subject": 5}, "subject"),
        ("course", {"subject": "x", "batch": "yes"}, "batch"),
        ("course", {"subject": "x" * 501}, "over the limit of 500"),  # the database's
        ("course", {"subject": "x", "course_id": "../etc"}, "not a slug"),  # the database's
        ("media", {"prompt": "x", "media_type": "video"}, "media_type"),
        ("media", {"prompt": "x", "media_type": "image", "params": {"size": "huge"}}, "size"),
        ("course", ["subject"], "JSON object"),
    ],
)
async def test_invalid_requests_answer_400_with_the_reason(
    client: httpx.AsyncClient, db_url: str, path: str, body: Any, message: str
) -> None:
    r = await client.post(f"/v1/jobs/{path}", headers=bearer(ALICE), json=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert (
        await sql(db_url, "select id from ai_course_jobs union all select id from ai_media_jobs")
        == []
    )


async def test_the_rate_limit_and_the_budget_are_the_databases(
    client: httpx.AsyncClient, db_url: str
) -> None:
    await sql(db_url, "update ai_job_settings set rate_limit_per_hour = 2")
    for _ in range(2):
        r = await client.post("/v1/jobs/course", headers=bearer(ALICE), json={"subject": "s"})
        assert r.status_code == 201
    r = await client.post("/v1/jobs/course", headers=bearer(ALICE), json={"subject": "s"})
    assert r.status_code == 429 and r.json()["error"].startswith("Rate limit exceeded")
    # another user is not limited by Alice's jobs
    r = await client.post("/v1/jobs/course", headers=bearer(BOB), json={"subject": "s"})
    assert r.status_code == 201
    await sql(db_url, "update ai_job_settings set daily_budget_usd_per_user = 0")
    r = await client.post(
        "/v1/jobs/media", headers=bearer(BOB), json={"prompt": "p", "media_type": "audio"}
    )
    assert r.status_code == 402 and r.json()["error"].startswith("Budget exceeded")


async def test_cancel_is_cancel_job_as_the_user(client: httpx.AsyncClient, db_url: str) -> None:
    r = await client.post("/v1/jobs/course", headers=bearer(ALICE), json={"subject": "Algebra"})
    jid = r.json()["id"]
    r = await client.post(f"/v1/jobs/{jid}/cancel", headers=bearer(BOB))
    assert r.status_code == 404
    (row,) = await sql(db_url, "select status from ai_course_jobs where id = %s", jid)
    assert row["status"] == "pending"
    r = await client.post(f"/v1/jobs/{jid}/cancel", headers=bearer(ALICE))
    assert r.status_code == 200 and r.json() == {
        "id": jid,
        "status": "cancelled",
        "previous": "pending",
    }
    r = await client.post(f"/v1/jobs/{jid}/cancel", headers=bearer(ALICE))
    assert r.status_code == 409 and "already cancelled" in r.json()["error"]


async def test_the_result_of_a_done_job(
    client: httpx.AsyncClient, db_url: str, tmp_path: Path
) -> None:
    r = await client.post("/v1/jobs/course", headers=bearer(ALICE), json={"subject": "Algebra"})
    jid = r.json()["id"]
    r = await client.get(f"/v1/jobs/{jid}/result", headers=bearer(ALICE))
    assert r.status_code == 409 and "pending" in r.json()["error"]
    course = {"title": "Algebra", "groups": []}
    (tmp_path / "courses" / "algebra").mkdir(parents=True)
    (tmp_path / "courses" / "algebra" / "course.json").write_text(json.dumps(course))
    await complete(db_url, await claim(db_url), "courses/algebra/course.json")
    r = await client.get(f"/v1/jobs/{jid}/result", headers=bearer(ALICE))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == course
    assert (await client.get(f"/v1/jobs/{jid}/result", headers=bearer(BOB))).status_code == 404

    r = await client.post(
        "/v1/jobs/media", headers=bearer(BOB), json={"prompt": "a cat", "media_type": "image"}
    )
    mid = r.json()["id"]
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / f"{mid}.png").write_bytes(b"\x89PNG fake")
    await complete(db_url, await claim(db_url, "ai_media_jobs"), f"media/{mid}.png")
    r = await client.get(f"/v1/jobs/{mid}/result", headers=bearer(BOB))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == b"\x89PNG fake" and r.headers["x-content-type-options"] == "nosniff"


async def test_the_event_stream_follows_the_job_to_its_end(
    client: httpx.AsyncClient, db_url: str
) -> None:
    r = await client.post("/v1/jobs/course", headers=bearer(ALICE), json={"subject": "Algebra"})
    jid = r.json()["id"]
    async with open_sse(client, f"/v1/jobs/{jid}/events", bearer(ALICE)) as sse:
        assert sse.status == 200
        first = await sse.next()
        assert first["event"] == "job" and first["job"]["status"] == "pending" and first["id"]
        row = await claim(db_url)
        assert (await sse.next())["job"]["status"] == "processing"
        t0 = time.monotonic()
        await progress(
            db_url,
            row,
            {"percent": 40, "phase": "generating", "groupsDone": 1, "groupsTotal": 3},
            {"title": "Algebra", "groups": [{"n": 1}]},
        )
        ev = await sse.next(timeout=1.0)  # within a second of the write
        assert time.monotonic() - t0 < 1.0
        assert ev["job"]["progress"]["percent"] == 40
        assert ev["job"]["partial_result"] == {"title": "Algebra", "groups": [{"n": 1}]}
        await complete(db_url, row, "courses/algebra/course.json")
        last = await sse.next()
        assert last["job"]["status"] == "done" and last["job"]["progress"]["percent"] == 100
        assert last["job"]["partial_result"] is None
        await asyncio_wait(sse.ended)  # the stream ends after done
        assert sse.events.empty()
    assert client.served.api.hub.open_streams == 0  # type: ignore[attr-defined]


async def test_keepalives_and_resuming_from_last_event_id(
    client: httpx.AsyncClient, db_url: str
) -> None:
    client.served.api.keepalive = 0.2  # type: ignore[attr-defined]
    r = await client.post("/v1/jobs/course", headers=bearer(ALICE), json={"subject": "Algebra"})
    jid = r.json()["id"]
    async with open_sse(client, f"/v1/jobs/{jid}/events", bearer(ALICE)) as sse:
        seen = await sse.next()
        await asyncio_until(lambda: "keepalive" in sse.comments)
    # Reconnecting with the id of the state it has: nothing again until a change.
    headers = {**bearer(ALICE), "Last-Event-ID": seen["id"]}
    async with open_sse(client, f"/v1/jobs/{jid}/events", headers) as sse:
        await asyncio_until(lambda: "keepalive" in sse.comments)
        assert sse.events.empty()
        await claim(db_url)
        ev = await sse.next()
        assert ev["job"]["status"] == "processing" and ev["id"] != seen["id"]
    await sql(db_url, "select cancel_job(%s, 'ai_course_jobs')", jid)
    # A client that already saw the end gets nothing and the stream ends.
    async with open_sse(client, f"/v1/jobs/{jid}/events", bearer(ALICE)) as sse:
        end = await sse.next()
        assert end["job"]["status"] == "cancelled"
    headers = {**bearer(ALICE), "Last-Event-ID": end["id"]}
    async with open_sse(client, f"/v1/jobs/{jid}/events", headers) as sse:
        await asyncio_wait(sse.ended)
        assert sse.events.empty()


async def test_a_stream_ends_when_its_token_expires(client: httpx.AsyncClient, db_url: str) -> None:
    r = await client.post("/v1/jobs/course", headers=bearer(ALICE), json={"subject": "Algebra"})
    jid = r.json()["id"]
    # exp within the leeway: accepted, and the stream closes at exp
    headers = bearer(ALICE, exp=int(time.time()) + 1)
    async with open_sse(client, f"/v1/jobs/{jid}/events", headers) as sse:
        await sse.next()
        await asyncio_wait(sse.ended, 5)
        assert "token expired" in sse.comments


async def asyncio_wait(event: asyncio.Event, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    await asyncio.wait_for(event.wait(), timeout)


async def asyncio_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
    async def check() -> bool:
        return predicate()

    await await_until(check, timeout=timeout)


async def test_cors_for_the_origins_named(db_url: str) -> None:
    app_origin = "http://app.example:8080"
    async with (
        serve(db_url, api_cors_origins=f"{app_origin}/, http://other.example") as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as client,
    ):
        pre = await client.options(
            "/v1/jobs/course",
            headers={
                "Origin": app_origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == app_origin
        assert "Authorization" in pre.headers["access-control-allow-headers"]
        r = await client.post(
            "/v1/jobs/course",
            headers={**bearer(ALICE), "Origin": app_origin},
            json={"subject": "Algebra"},
        )
        assert r.status_code == 201 and r.headers["access-control-allow-origin"] == app_origin
        # a refusal carries it too (the page must read the reason)
        r = await client.get(f"/v1/jobs/{uuid_zero()}", headers={"Origin": app_origin})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == app_origin
        r = await client.post(
            "/v1/jobs/course",
            headers={**bearer(ALICE), "Origin": "http://evil.example"},
            json={"subject": "Algebra"},
        )
        assert "access-control-allow-origin" not in r.headers
        assert r.headers["vary"] == "Origin"


def uuid_zero() -> str:
    return "00000000-0000-4000-8000-000000000000"
