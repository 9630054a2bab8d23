"""Numbered, forward-only migrations from sql/ and triggers/.

Files are named NNN_name.sql; the number is unique across both folders and sets
the order. Each file runs in its own transaction, which first takes an advisory
lock and then records its version before the body: two migrators never apply
the same file, and a second run finds everything applied (graphile-worker's
scheme).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from listener import dal, db
from listener.errors import AiJobsError, SchemaOutdated, translate
from listener.outage import Backoff, Health

_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
FOLDERS = ("sql", "triggers")
REQUEST_LIMITS_MIGRATION = 11  # adds the request limits to ai_job_settings
BUDGET_MIGRATION = 15  # adds ai_job_settings.daily_budget_usd_per_user


@dataclass(frozen=True)
class Migration:
    version: int
    name: str  # e.g. "sql/001_tables.sql"
    text: str


def _folder(name: str) -> Traversable:
    # Installed wheel: shipped as package data. Source checkout (editable
    # install): the folders at the top of the repository.
    packaged = resources.files("listener").joinpath("migrations", name)
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / name


def migrations() -> list[Migration]:
    found: dict[int, Migration] = {}
    for folder in FOLDERS:
        for entry in _folder(folder).iterdir():
            m = _FILE.match(entry.name)
            if not m:
                continue
            version = int(m.group(1))
            name = f"{folder}/{entry.name}"
            if version in found:
                raise AiJobsError(
                    f"Two migrations numbered {version}: {found[version].name}, {name}"
                )
            found[version] = Migration(version, name, entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(
    dsn: str,
    rate_limit_per_hour: int | None = None,
    request_limits: dict[str, int] | None = None,
    *,
    write_settings: bool = False,
    daily_budget_usd_per_user: float | None = None,
) -> list[str]:
    """Apply what is missing; return the names applied by this call.

    The settings the database holds (ai_job_settings: the rate limit, the request
    limits of Settings.request_limits(), the daily budget) are written from the
    arguments given (not None) when this call creates their columns (the rate
    limit on the first install, the request limits with migration 011, the budget
    with migration 015), or when `write_settings` asks for it. Otherwise they are
    left alone: `ai-jobs migrate` runs on every deploy (the Procfile's release
    line), and an operator who changed a limit live in psql must not find it reset."""
    applied: list[str] = []
    async with db.connection(dsn, app="ai-jobs migrate") as conn:
        try:
            for m in migrations():
                async with conn.transaction():
                    await dal.MIGRATE_LOCK.run(conn)
                    await dal.CREATE_MIGRATIONS_TABLE.run(conn)
                    done = {r["version"] for r in await dal.APPLIED_MIGRATIONS.all(conn)}
                    if m.version in done:
                        continue
                    await dal.RECORD_MIGRATION.run(conn, {"version": m.version, "name": m.name})
                    await conn.execute(m.text.encode())  # several statements: simple protocol
                applied.append(m.name)
            new = {m.version for m in migrations() if m.name in applied}
            if rate_limit_per_hour is not None and (1 in new or write_settings):
                await dal.SET_RATE_LIMIT.run(conn, {"limit": rate_limit_per_hour})
            if request_limits is not None and (REQUEST_LIMITS_MIGRATION in new or write_settings):
                await dal.SET_REQUEST_LIMITS.run(conn, request_limits)
            if daily_budget_usd_per_user is not None and (
                BUDGET_MIGRATION in new or write_settings
            ):
                params = {"budget": daily_budget_usd_per_user}
                await dal.SET_DAILY_BUDGET.run(conn, params)
        except psycopg.Error as exc:
            raise translate(exc) from exc
    return applied


async def wait_for_schema(
    pool: AsyncConnectionPool[Any], health: Health, stop: asyncio.Event
) -> bool:
    """Check the schema, waiting while the database is away (a worker may start
    before it); True once current, False if `stop` came first. An outdated
    schema, or any other error, is raised: retrying cannot fix it."""
    backoff = Backoff(base=0.5, cap=10.0)
    while not stop.is_set():
        try:
            async with pool.connection() as conn:
                await check_schema(conn)
            health.up()
            return True
        except Exception as exc:
            if not health.down(exc).transient:
                raise
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(backoff.next()):
                await stop.wait()
    return False


async def check_schema(conn: psycopg.AsyncConnection[Any]) -> None:
    """Raise SchemaOutdated unless every migration this code ships is applied."""
    try:
        rows = await dal.APPLIED_MIGRATIONS.all(conn)
    except SchemaOutdated:
        raise SchemaOutdated("The database has no ai-jobs schema: run `ai-jobs migrate`") from None
    done = {int(str(r["version"])) for r in rows}
    missing = [m.name for m in migrations() if m.version not in done]
    if missing:
        raise SchemaOutdated(
            f"The database schema is older than this code (missing {', '.join(missing)}): "
            "run `ai-jobs migrate`"
        )
