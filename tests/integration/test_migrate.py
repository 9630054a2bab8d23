from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from listener.errors import SchemaOutdated
from listener.migrate import check_schema, migrate, migrations
from tests.helpers import AI_JOBS, ROOT, aconnect, connect, env


def run_cli(db_url: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AI_JOBS, *args], env=env(db_url, **extra), capture_output=True, text=True, timeout=60
    )


def test_migrations_are_numbered_once_across_sql_and_triggers() -> None:
    ms = migrations()
    assert [m.version for m in ms] == sorted({m.version for m in ms})
    names = [m.name for m in ms]
    assert any(n.startswith("sql/") for n in names)
    assert any(n.startswith("triggers/") for n in names)


async def test_migrate_twice_applies_each_file_once(empty_db_url: str) -> None:
    first = await migrate(empty_db_url)
    assert first == [m.name for m in migrations()]
    assert await migrate(empty_db_url) == []
    with connect(empty_db_url) as c:
        rows = c.execute("select version from ai_jobs_migrations order by 1").fetchall()
    assert [r["version"] for r in rows] == [m.version for m in migrations()]


def test_migrate_from_two_processes_at_once(empty_db_url: str) -> None:
    procs = [
        subprocess.Popen(
            [*AI_JOBS, "migrate"],
            env=env(empty_db_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    with connect(empty_db_url) as c:
        n = c.execute("select count(*) as n from ai_jobs_migrations").fetchone()
        assert n is not None and n["n"] == len(migrations())
        c.execute("insert into ai_course_jobs (subject) values ('x')")


async def test_worker_schema_check(empty_db_url: str) -> None:
    conn = await aconnect(empty_db_url)
    try:
        with pytest.raises(SchemaOutdated, match="ai-jobs migrate"):
            await check_schema(conn)
        await migrate(empty_db_url)
        await check_schema(conn)
        await conn.execute("delete from ai_jobs_migrations where version = 5")
        with pytest.raises(SchemaOutdated, match=r"missing triggers/005.*run `ai-jobs migrate`"):
            await check_schema(conn)
    finally:
        await conn.close()


async def test_migrate_sets_the_rate_limit(empty_db_url: str) -> None:
    await migrate(empty_db_url, rate_limit_per_hour=4)
    with connect(empty_db_url) as c:
        row = c.execute("select rate_limit_per_hour from ai_job_settings").fetchone()
    assert row is not None and row["rate_limit_per_hour"] == 4


def _limit(url: str) -> int:
    with connect(url) as c:
        row = c.execute("select rate_limit_per_hour from ai_job_settings").fetchone()
    assert row is not None
    return int(row["rate_limit_per_hour"])


async def test_migrate_keeps_a_limit_changed_live(empty_db_url: str) -> None:
    """`ai-jobs migrate` runs on every deploy: it writes the limit on the first
    install only, unless told to, so an operator's live change survives."""
    await migrate(empty_db_url, rate_limit_per_hour=4)
    with connect(empty_db_url) as c:
        c.execute("update ai_job_settings set rate_limit_per_hour = 25")
    await migrate(empty_db_url, rate_limit_per_hour=4)
    assert _limit(empty_db_url) == 25
    p = run_cli(empty_db_url, "migrate", RATE_LIMIT_PER_HOUR="7")
    assert p.returncode == 0, p.stderr
    assert _limit(empty_db_url) == 25
    p = run_cli(empty_db_url, "migrate", "--write-settings", RATE_LIMIT_PER_HOUR="7")
    assert p.returncode == 0, p.stderr
    assert _limit(empty_db_url) == 7


def test_wheel_ships_the_sql(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("ai_jobs-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for m in migrations():
        assert f"listener/migrations/{m.name}" in names
    assert "listener/queries/core.sql" in names
