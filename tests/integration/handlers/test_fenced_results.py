"""Fenced results (listener/results.py): an attempt whose claim was taken away
never replaces the stored result of the attempt that completed, on the local
folder and on Supabase Storage. The course handler against the fake providers,
the completer of a worker, and claims rescued with the sweep's own functions.
The real processes paused with SIGSTOP are in tests/e2e/test_zombie_results.py."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import pytest
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.completer import Completer, completion_params
from listener.handlers import Runtime, create_runtime
from listener.jobs import Job, Outcome
from listener.results import STAGING, Results, staged_key
from listener.storage import Storage
from tests.fakeai import FakeAI, Pace
from tests.fakesupabase import FAKE_SERVICE_KEY, FakeSupabase
from tests.integration.handlers.conftest import Conn, MakeSettings, claim, course_job

pytestmark = pytest.mark.timeout(30)
PATH = "courses/optics/course.json"
Open = Callable[..., Awaitable[Runtime]]


@pytest.fixture(params=["local", "supabase"])
def runtime(
    request: pytest.FixtureRequest,
    pool: AsyncConnectionPool[Any],
    fake: FakeAI,
    make_settings: MakeSettings,
    supabase: FakeSupabase,
) -> Open:
    # Each generation of the same prompt is drawn at its own size: the attempts'
    # files differ, so whose file is stored can be told.
    fake.pace = Pace(size=(2000, 8000), seed=7)
    over: dict[str, Any] = {}
    if request.param == "supabase":
        over |= {"storage_url": supabase.storage_url, "supabase_service_role_key": FAKE_SERVICE_KEY}

    async def make() -> Runtime:
        return await create_runtime(make_settings(**over), pool)

    return make


async def rescued(conn: Conn, job: Job) -> Job:
    """The sweep's own rescue of a job whose heartbeat stopped, then a new claim:
    the attempt `job` no longer holds it."""
    await dal.fetch(conn, "mark_stale_jobs", {"seconds": 0})
    await dal.fetch(conn, "rescue_stale_jobs", {"n": 10})
    again = await claim(conn, job.table, job.id)
    assert again.claim_token != job.claim_token
    return again


async def complete(pool: AsyncConnectionPool[Any], *ended: tuple[Job, Outcome]) -> None:
    """What a worker does with finished jobs: its completer writes them."""

    async def once(f: Callable[[], Awaitable[Any]]) -> Any:
        return await f()

    completer = Completer(pool, once, backlog=10)
    task = asyncio.create_task(completer.run())
    try:
        for job, outcome in ended:
            await completer.add(job, outcome)
        await asyncio.wait_for(completer.drain(), 10)
    finally:
        task.cancel()


async def stored(storage: Storage, path: str = PATH) -> str:
    data = await storage.read(path)
    assert data is not None, f"{path} missing"
    return hashlib.sha256(data).hexdigest()


async def row(conn: Conn, job: Job) -> dict[str, Any]:
    cur = await conn.execute(
        "select status, metrics, result_path from ai_course_jobs where id = %s", [job.id]
    )
    found = await cur.fetchone()
    assert found is not None
    return dict(found)


async def test_create_writes_only_where_nothing_is(
    runtime: Open, conn: Conn, pool: AsyncConnectionPool[Any]
) -> None:
    rt = await runtime()
    s = rt.storage
    assert await s.create("media/a.png", b"first", "image/png") is True
    assert await s.create("media/a.png", b"second", "image/png") is False
    assert await s.read("media/a.png") == b"first"
    await s.write(f"{STAGING}/x", b"x", "text/plain")
    await s.write(f"{STAGING}/y", b"y", "text/plain")
    assert await s.list(STAGING) == [f"{STAGING}/x", f"{STAGING}/y"]
    assert await s.list("nothing-here") == []
    await s.delete(f"{STAGING}/x")
    await s.delete(f"{STAGING}/x")  # gone already: no error
    assert await s.list(STAGING) == [f"{STAGING}/y"]
    # Many creates of one path at once: exactly one lands.
    won = await asyncio.gather(
        *(s.create("media/b.png", bytes([i]), "image/png") for i in range(8))
    )
    assert won.count(True) == 1
    await rt.aclose()


async def test_a_zombie_after_the_winner_changes_nothing(
    runtime: Open, conn: Conn, pool: AsyncConnectionPool[Any]
) -> None:
    rt = await runtime()
    handler = rt.handlers["ai_course_jobs"]
    zombie = await course_job(conn, "Optics", course_id="optics")
    winner = await rescued(conn, zombie)
    won = await handler(winner)
    assert won.staged is None  # the path was free: written in place at once
    await complete(pool, (winner, won))
    digest = won.metrics["resultSha256"]
    assert (await row(conn, winner))["metrics"]["resultSha256"] == digest
    assert await stored(rt.storage) == digest

    late = await handler(zombie)  # it wakes up and finishes its generation
    assert late.staged is not None and late.metrics["resultSha256"] != digest
    await complete(pool, (zombie, late))  # refused: the claim is the winner's
    assert await stored(rt.storage) == digest
    assert await rt.storage.list(STAGING) == []  # its staged file discarded
    await rt.aclose()


async def test_a_zombie_that_wrote_first_is_replaced_by_the_winner(
    runtime: Open, conn: Conn, pool: AsyncConnectionPool[Any]
) -> None:
    rt = await runtime()
    handler = rt.handlers["ai_course_jobs"]
    zombie = await course_job(conn, "Optics", course_id="optics")
    early = await handler(zombie)  # stored, then the worker froze before completing
    assert early.staged is None
    winner = await rescued(conn, zombie)
    won = await handler(winner)
    assert won.staged is not None  # the path was taken: staged under its own key
    assert await stored(rt.storage) == early.metrics["resultSha256"]  # not yet the winner's
    await complete(pool, (winner, won), (zombie, early))
    assert (await row(conn, winner))["metrics"]["resultSha256"] == won.metrics["resultSha256"]
    assert await stored(rt.storage) == won.metrics["resultSha256"]
    assert await rt.storage.list(STAGING) == []
    await rt.aclose()


async def test_recovery_publishes_what_a_dead_process_committed(
    runtime: Open, conn: Conn, pool: AsyncConnectionPool[Any]
) -> None:
    """A process that died between its completion's commit and the publish left
    its staged file: the recovery publishes it; a loser's staged file is
    dropped; a running attempt's is left alone."""
    rt = await runtime()
    handler = rt.handlers["ai_course_jobs"]
    first = await course_job(conn, "Optics", course_id="optics")
    early = await handler(first)
    winner = await rescued(conn, first)
    won = await handler(winner)
    assert won.staged is not None
    # The completion commits, and the process dies before publishing.
    params = completion_params(winner.table, [(winner, won)])
    assert [r["id"] for r in await dal.COMPLETE_JOBS.all(pool, params)] == [winner.id]
    assert await stored(rt.storage) == early.metrics["resultSha256"]
    # A loser's staged file, and one of an attempt still running.
    await rt.storage.write(staged_key(first.id, first.claim_token), b"lost", "text/plain")
    running = await course_job(conn, "Optics II", course_id="optics-2")
    await rt.storage.write(staged_key(running.id, running.claim_token), b"mine", "text/plain")
    await rt.storage.write(f"{STAGING}/not-a-staged-result", b"?", "text/plain")

    results = Results(rt.storage, pool, every=0)
    assert await results.recover() == 1
    assert await stored(rt.storage) == won.metrics["resultSha256"]
    assert await rt.storage.list(STAGING) == sorted(
        [staged_key(running.id, running.claim_token), f"{STAGING}/not-a-staged-result"]
    )
    assert results.dropped == 1
    await rt.aclose()


async def test_a_later_course_on_the_same_path_is_not_undone(
    runtime: Open, conn: Conn, pool: AsyncConnectionPool[Any]
) -> None:
    """Two jobs of one course id (a regenerated course): the recovery of the
    first one's staged file never brings it back over the second's."""
    rt = await runtime()
    handler = rt.handlers["ai_course_jobs"]
    one = await course_job(conn, "Optics", course_id="optics")
    first = await handler(one)
    await complete(pool, (one, first))
    old = await rt.storage.read(PATH)
    assert old is not None
    two = await course_job(conn, "Optics", course_id="optics")
    second = await handler(two)
    assert second.staged is not None
    await complete(pool, (two, second))
    # The first job's result, as if staged by it and never published: its row
    # is done with that digest, but the catalog now lists the second job's.
    await rt.storage.write(staged_key(one.id, one.claim_token), old, "application/json")
    assert await stored(rt.storage) == second.metrics["resultSha256"]
    assert await Results(rt.storage, pool, every=0).recover() == 0
    assert await stored(rt.storage) == second.metrics["resultSha256"]
    await rt.aclose()


def test_staged_keys_name_the_job_and_the_claim() -> None:
    from listener.results import parse_key

    job_id, token = UUID(int=5), UUID(int=6)
    assert parse_key(staged_key(job_id, token)) == (job_id, token)
    assert parse_key(f"{STAGING}/x.y") is None
