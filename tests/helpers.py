"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row

from tests.pgserver import free_port as free_port  # one for every server a test starts

ROOT = Path(__file__).resolve().parent.parent
AI_JOBS = [sys.executable, "-m", "listener"]


async def aconnect(url: str) -> psycopg.AsyncConnection[dict[str, Any]]:
    return await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row)


def connect(url: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def insert_course(conn: psycopg.Connection[Any], subject: str = "Algebra", **cols: Any) -> str:
    cols = {"subject": subject, **cols}
    if "params" in cols:
        cols["params"] = json.dumps(cols["params"])
    names = ", ".join(cols)
    marks = ", ".join(["%s"] * len(cols))
    row = conn.execute(
        f"insert into ai_course_jobs ({names}) values ({marks}) returning id", list(cols.values())
    ).fetchone()
    assert row is not None
    return str(row["id"] if isinstance(row, dict) else row[0])


def insert_media(
    conn: psycopg.Connection[Any], prompt: str = "a cat", media_type: str = "image", **cols: Any
) -> str:
    cols = {"prompt": prompt, "media_type": media_type, **cols}
    names = ", ".join(cols)
    marks = ", ".join(["%s"] * len(cols))
    row = conn.execute(
        f"insert into ai_media_jobs ({names}) values ({marks}) returning id", list(cols.values())
    ).fetchone()
    assert row is not None
    return str(row["id"] if isinstance(row, dict) else row[0])


def job(
    conn: psycopg.Connection[Any], job_id: str, table: str = "ai_course_jobs"
) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(f"select * from {table} where id = %s", [job_id]).fetchone()
    assert row is not None, f"job {job_id} not in {table}"
    return row


def env(db_url: str | None = None, **extra: Any) -> dict[str, str]:
    """Environment for an `ai-jobs` subprocess."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "ANTHROPIC"))}
    e.pop("DATABASE_URL", None)
    if db_url:
        e["DATABASE_URL"] = db_url
    e.setdefault("PYTHONUNBUFFERED", "1")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def wait_until(
    predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll a condition on real state until it holds (never an assertion by sleeping)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


@contextlib.contextmanager
def web_process(db_url: str, log: Path, timeout: float = 20.0, **extra: Any) -> Iterator[str]:
    """`ai-jobs web` as its own process on a free port, `extra` in its environment
    and its output in `log`: its base URL once /healthz answers. Stopped with
    SIGTERM at the end, which must be a clean stop (exit 0)."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*AI_JOBS, "web", "--host", "127.0.0.1"],
            env=env(db_url, PORT=port, **extra),
            stdout=out,
            stderr=out,
        )
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text(errors="replace")
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_until(healthy, timeout=timeout, interval=0.1, what="ai-jobs web")
            yield base
        finally:
            proc.terminate()
            code = proc.wait(timeout=15)
    assert code == 0, log.read_text(errors="replace")


async def await_until(
    predicate: Callable[[], Awaitable[Any]],
    timeout: float = 15.0,  # noqa: ASYNC109 - a polling deadline, as in wait_until
    interval: float = 0.02,
    what: str = "",
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


# Claims and releases of course jobs, with their times (a trigger of the test's
# database): a job claimed (pending -> processing) and put back (processing ->
# pending), whatever path did it.
_MOVES = """
create table test_moves (at timestamptz not null default clock_timestamp(), kind text not null);
create function test_record_move() returns trigger language plpgsql as $$
begin
    if old.status = 'pending' and new.status = 'processing' then
        insert into test_moves (kind) values ('claim');
    elsif old.status = 'processing' and new.status = 'pending' then
        insert into test_moves (kind) values ('release');
    end if;
    return null;
end $$;
create trigger test_moves after update of status on ai_course_jobs
    for each row execute function test_record_move();
"""


def record_moves(url: str) -> None:
    """Count from now on the claims and releases of course jobs (moves())."""
    with connect(url) as c:
        c.execute(_MOVES)


def moves(url: str, kind: str, since: float = 0.0, until: float = 1e12) -> int:
    """Course jobs claimed (`claim`) or put back (`release`) between two
    time.time() moments."""
    with connect(url) as c:
        row = c.execute(
            "select count(*) as n from test_moves where kind = %s"
            " and at >= to_timestamp(%s) and at <= to_timestamp(%s)",
            [kind, since, until],
        ).fetchone()
    assert row is not None
    return int(row["n"])
