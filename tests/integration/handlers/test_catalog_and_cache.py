"""The catalog (rows in the database, rendered to courses/catalog.json in batches)
and the course cache."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from listener import dal, db
from listener.catalog import CATALOG_PATH, Catalog
from listener.course_schema import Course
from listener.handlers import create_runtime
from listener.storage import LocalStorage
from tests.fakeai import FakeAI
from tests.helpers import await_until
from tests.integration.handlers.conftest import Conn, MakeSettings, course_job

pytestmark = pytest.mark.timeout(60)


def catalog_ids(root: Path) -> list[str]:
    doc = json.loads((root / CATALOG_PATH).read_bytes())
    assert doc["count"] == len(doc["courses"])
    return [c["id"] for c in doc["courses"]]


async def test_fifty_jobs_finishing_at_once_all_reach_the_catalog(
    conn: Conn, db_url: str, make_settings: MakeSettings
) -> None:
    # Three runtimes with pools of their own stand for three worker processes.
    s = make_settings(
        openai_api_key=None,
        anthropic_api_key=None,
        allow_placeholder=True,
        placeholder_delay_ms=20,
        catalog_batch_jobs=7,
        catalog_batch_seconds=3600,
    )
    pools = [db.make_pool(db_url, 6) for _ in range(3)]
    for p in pools:
        await p.open(wait=True)
    runtimes = [await create_runtime(s, p) for p in pools]
    params = {"itemsPerGroup": 2, "groupCount": 1}
    jobs = [await course_job(conn, f"Topic {n}", params=params) for n in range(50)]

    outs = await asyncio.gather(
        *(runtimes[n % 3].handlers["ai_course_jobs"](job) for n, job in enumerate(jobs))
    )
    renders = sum(rt.catalog.renderer.renders for rt in runtimes)
    assert 0 < renders <= 50 // 7 + 3  # batched: about once per 7 courses per process
    for rt in runtimes:
        await rt.aclose()  # the last partial batch of each
    for p in pools:
        await p.close()

    expected = sorted(f"topic-{n}" for n in range(50))
    assert catalog_ids(s.storage_root) == expected
    assert sorted(o.result_path or "" for o in outs) == [
        f"courses/{c}/course.json" for c in expected
    ]
    assert not list(s.storage_root.rglob("*.tmp"))  # no half-written file left behind


async def test_catalog_renders_after_the_batch_seconds(
    conn: Conn, pool: AsyncConnectionPool[Any], make_settings: MakeSettings
) -> None:
    # 2 s: no stall of a busy machine between the job and the first tick makes a
    # render due before it is looked for.
    s = make_settings(catalog_batch_jobs=100, catalog_batch_seconds=2)
    rt = await create_runtime(s, pool)
    await rt.handlers["ai_course_jobs"](await course_job(conn, "Welsh"))
    await rt.tick()
    assert not (s.storage_root / CATALOG_PATH).exists()  # neither N jobs nor T seconds yet

    async def ticked() -> bool:
        await rt.tick()
        return (s.storage_root / CATALOG_PATH).exists()

    await await_until(ticked, timeout=10, what="the timed render")
    assert catalog_ids(s.storage_root) == ["welsh"]
    await rt.handlers["ai_course_jobs"](await course_job(conn, "Breton"))
    assert catalog_ids(s.storage_root) == ["welsh"]
    await rt.aclose()  # shutdown renders what is left
    assert catalog_ids(s.storage_root) == ["breton", "welsh"]


async def test_same_request_within_the_ttl_reuses_the_course(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    s = make_settings(cache_ttl_seconds=3600)
    rt = await create_runtime(s, pool)
    course = rt.handlers["ai_course_jobs"]
    params = {"itemsPerGroup": 3, "level": "intermediate"}

    first = await course(await course_job(conn, "Music Theory", params=params))
    assert first.metrics["cacheHit"] is False and fake.count("openai") == 1

    # The same request, spelt differently: no provider call.
    again = await course(
        await course_job(conn, "  music   THEORY ", params=params, course_id="music-theory")
    )
    assert fake.count("openai") == 1
    assert again.metrics["cacheHit"] is True and again.metrics["provider"] == "cache"
    assert again.result_path == first.result_path
    assert "cachedFromJobId" not in again.metrics  # the requester reads it: no other job's id

    # The same request under another course id: a copy under that id, also listed.
    copy = await course(await course_job(conn, "Music theory", params=params, course_id="theory-2"))
    assert fake.count("openai") == 1 and copy.result_path == "courses/theory-2/course.json"
    stored = Course.model_validate_json((s.storage_root / copy.result_path).read_bytes())
    assert stored.id == "theory-2"
    assert catalog_ids(s.storage_root) == ["music-theory", "theory-2"]

    # Other params: another course.
    other = await course(
        await course_job(conn, "Music Theory", params={**params, "language": "French"})
    )
    assert other.metrics["cacheHit"] is False and fake.count("openai") == 2
    await rt.aclose()


async def test_cache_off_and_expired(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    off = await create_runtime(make_settings(cache_ttl_seconds=0), pool)
    for _ in range(2):
        out = await off.handlers["ai_course_jobs"](await course_job(conn, "Poetry"))
        assert out.metrics["cacheHit"] is False
    await off.aclose()
    assert fake.count("openai") == 2

    on = await create_runtime(make_settings(cache_ttl_seconds=60), pool)
    await conn.execute("update ai_course_catalog set updated_at = now() - interval '2 minutes'")
    out = await on.handlers["ai_course_jobs"](await course_job(conn, "Poetry"))
    assert out.metrics["cacheHit"] is False and fake.count("openai") == 3
    out = await on.handlers["ai_course_jobs"](await course_job(conn, "Poetry"))
    assert out.metrics["cacheHit"] is True and fake.count("openai") == 3
    await on.aclose()


async def test_a_missing_cached_file_means_a_fresh_generation(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    s = make_settings(cache_ttl_seconds=3600)
    rt = await create_runtime(s, pool)
    first = await rt.handlers["ai_course_jobs"](await course_job(conn, "Sailing"))
    (s.storage_root / (first.result_path or "")).unlink()
    job = await course_job(conn, "Sailing")
    out = await rt.handlers["ai_course_jobs"](job)
    await rt.aclose()
    assert out.metrics["cacheHit"] is False and fake.count("openai") == 2
    assert (s.storage_root / (out.result_path or "")).exists()
    rows = await dal.fetch(conn, "catalog_rows")
    assert [(r["course_id"], r["job_id"]) for r in rows] == [("sailing", job.id)]


async def test_jobs_finish_while_the_catalog_table_is_unreachable(
    conn: Conn, pool: AsyncConnectionPool[Any], make_settings: MakeSettings
) -> None:
    s = make_settings(cache_ttl_seconds=3600, catalog_batch_jobs=1)
    rt = await create_runtime(s, pool)
    await conn.execute("alter table ai_course_catalog rename to ai_course_catalog_away")
    out = await rt.handlers["ai_course_jobs"](await course_job(conn, "Outage Course"))
    assert out.result_path and (s.storage_root / out.result_path).exists()
    assert not (s.storage_root / CATALOG_PATH).exists()  # the row waits in memory
    await rt.tick()
    assert not (s.storage_root / CATALOG_PATH).exists()

    await conn.execute("alter table ai_course_catalog_away rename to ai_course_catalog")
    await rt.tick()  # saves the row, then renders the due batch
    assert catalog_ids(s.storage_root) == ["outage-course"]
    await rt.aclose()


async def test_a_job_does_not_wait_for_an_unreachable_database(
    conn: Conn, make_settings: MakeSettings
) -> None:
    # A pool whose server never answers: the cache is a miss, the row is kept.
    dead = db.make_pool("postgresql://postgres@127.0.0.1:9/none", 2)
    await dead.open(wait=False)
    s = make_settings(
        openai_api_key=None, anthropic_api_key=None, allow_placeholder=True, cache_ttl_seconds=60
    )
    rt = await create_runtime(s, dead)
    job = await course_job(conn, "Offline")
    out = await asyncio.wait_for(rt.handlers["ai_course_jobs"](job), timeout=15)
    assert out.metrics["provider"] == "placeholder" and out.metrics["cacheHit"] is False
    assert rt.catalog.unsaved == 1
    await rt.aclose()
    await dead.close()


def _course(slug: str) -> Course:
    item = {"id": "i1", "prompt": "Why?", "answer": "Yes", "explanation": "So.", "options": []}
    return Course.model_validate(
        {
            "id": slug,
            "title": slug.title(),
            "subject": slug.title(),
            "description": "A course.",
            "level": "beginner",
            "language": "English",
            "groups": [{"id": "g1", "title": "One", "summary": "The one.", "items": [item]}],
        }
    )


async def _record(catalog: Catalog, slug: str) -> Any:
    return await catalog.record(
        _course(slug),
        job_id=uuid.uuid4(),
        result_path=f"courses/{slug}/course.json",
        cache_key=None,
        provider="test",
        model="test",
    )


def _after_read(hook: Callable[[], Awaitable[None]]) -> type[psycopg.AsyncCursor[Any]]:
    """A cursor that runs `hook` once, right after the catalog's rows are read
    (the render's snapshot taken, its rows not yet handed back)."""
    rows_sql = dal.CATALOG_ROWS.sql

    class AfterRead(psycopg.AsyncCursor[Any]):
        ran = False

        async def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
            await super().execute(query, params, **kw)
            if query == rows_sql and not AfterRead.ran:
                AfterRead.ran = True
                await hook()
            return self

    return AfterRead


async def test_a_row_saved_while_a_render_reads_is_rendered_by_the_next(
    db_url: str, tmp_path: Path
) -> None:
    # A job finishes while a render is under way: its row is saved after the
    # render read the rows, so the file written lacks it. It must still count
    # as unrendered afterwards, so that the next render (a tick, or the one at
    # shutdown) lists it.
    catalog: Catalog | None = None

    async def finish_second() -> None:
        assert catalog is not None
        await _record(catalog, "second")

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        conn.cursor_factory = _after_read(finish_second)

    pool = AsyncConnectionPool(
        db_url,
        min_size=2,
        open=False,
        kwargs={"autocommit": True, "row_factory": dict_row},
        configure=configure,
    )
    await pool.open(wait=True)
    try:
        catalog = Catalog(pool, LocalStorage(tmp_path), batch_jobs=1, batch_seconds=3600)
        await _record(catalog, "first")  # saved, then rendered: the second saved meanwhile
        assert catalog.renderer.renders == 1
        assert catalog_ids(tmp_path) == ["first"]  # read before the second row was saved
        assert catalog.renderer.unrendered == 1  # ... which the next render still owes
        await catalog.tick()
        assert catalog_ids(tmp_path) == ["first", "second"]
    finally:
        await pool.close()
