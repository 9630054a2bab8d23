"""sql/026: the job tables go into Supabase Realtime's publication where there is
one, once however often the migration runs; where there is none, nothing is
created (the logical replication end to end: tests/e2e/test_realtime.py)."""

from __future__ import annotations

from pathlib import Path

from tests.integration.handlers.conftest import Conn

MIGRATION = (Path(__file__).parents[2] / "sql" / "026_realtime.sql").read_text()
PUBLISHED = (
    "select tablename from pg_publication_tables where pubname = 'supabase_realtime'"
    " and schemaname = 'public' order by 1"
)


async def published(conn: Conn) -> list[str]:
    return [r["tablename"] for r in await (await conn.execute(PUBLISHED)).fetchall()]


async def test_without_the_publication_nothing_is_made(conn: Conn) -> None:
    # the database was migrated (026 included) where no publication exists
    cur = await conn.execute("select count(*) as n from pg_publication")
    row = await cur.fetchone()
    assert row is not None and row["n"] == 0
    await conn.execute(MIGRATION)  # and again: still nothing
    row = await (await conn.execute("select count(*) as n from pg_publication")).fetchone()
    assert row is not None and row["n"] == 0


async def test_with_the_publication_both_tables_once(conn: Conn) -> None:
    await conn.execute("create publication supabase_realtime")
    await conn.execute("alter publication supabase_realtime add table public.ai_media_jobs")
    await conn.execute(MIGRATION)
    assert await published(conn) == ["ai_course_jobs", "ai_media_jobs"]
    await conn.execute(MIGRATION)  # idempotent
    assert await published(conn) == ["ai_course_jobs", "ai_media_jobs"]
