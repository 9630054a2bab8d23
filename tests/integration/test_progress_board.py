"""The worker's ProgressBoard against the database: every running job's progress
in one statement, percent never lowered (here and by the database's guard), a
partial result written when it grew, nothing for a job no longer held, and a
failed write kept for the next one."""

from __future__ import annotations

import contextvars
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from listener import dal, progress
from listener.course_schema import CourseParams
from listener.jobs import Job
from listener.leases import OwnConnection
from listener.progress import ProgressBoard, current
from tests.fakeai.answers import course_from_prompt
from tests.integration.handlers.conftest import Conn, course_job, media_job

PARAMS = CourseParams(group_count=2, items_per_group=2)


async def row(conn: Conn, job: Job) -> dict[str, Any]:
    cur = await conn.execute(
        f"select status, progress, {'partial_result' if job.job_type == 'course' else 'null'}"
        f" as partial_result from {job.table} where id = %s",
        [job.id],
    )
    found = await cur.fetchone()
    assert found is not None
    return found


def board_for(pool: AsyncConnectionPool[Any], calls: list[Any]) -> ProgressBoard:
    async def write(params: dict[str, Any]) -> Any:
        calls.append(params)
        return await dal.PROGRESS_JOBS.all(pool, params)

    return ProgressBoard(write, 1.0, lambda e, w: calls.append(e))


async def test_many_jobs_one_statement(conn: Conn, pool: AsyncConnectionPool[Any]) -> None:
    calls: list[Any] = []
    board = board_for(pool, calls)
    courses = [await course_job(conn, f"Board {i}") for i in range(20)]
    media = await media_job(conn, "a board", "image")
    for j in [*courses, media]:
        contextvars.copy_context().run(board.open, j)
    text = json_course()
    for j in courses:
        sink = board.jobs[j.id].course_reader(PARAMS, "board", "Board")()
        sink(text[: text.index('"id": "g2"') + 3])  # the first group and a bit
    board.jobs[media.id].set_phase("storing", 90)
    assert await board.flush() == 21
    assert board.statements == 1 and len(calls) == 1
    first = await row(conn, courses[0])
    assert first["progress"]["groupsDone"] == 1 and first["progress"]["groupsTotal"] == 2
    assert first["progress"]["phase"] == "generating" and "updatedAt" in first["progress"]
    assert [g["id"] for g in first["partial_result"]["groups"]] == ["g1"]
    assert first["partial_result"]["id"] == "board"
    m = await row(conn, media)
    assert m["progress"]["phase"] == "storing" and m["progress"]["percent"] == 90
    assert await board.flush() == 0  # nothing changed: no statement
    assert board.statements == 1


async def test_percent_never_lowered(conn: Conn, pool: AsyncConnectionPool[Any]) -> None:
    calls: list[Any] = []
    board = board_for(pool, calls)
    j = await course_job(conn, "Never Lower")
    contextvars.copy_context().run(board.open, j)
    jp = board.jobs[j.id]
    jp.set_phase("generating", 60)
    jp.set_phase("generating", 30)  # the board keeps 60
    assert jp.percent == 60
    await board.flush()
    jp.percent = 20  # even if it did not, the database does
    jp.set_phase("generating")
    await board.flush()
    assert (await row(conn, j))["progress"]["percent"] == 60


async def test_only_the_held_jobs_and_a_failed_write_is_kept(
    conn: Conn, pool: AsyncConnectionPool[Any]
) -> None:
    calls: list[Any] = []
    j = await course_job(conn, "Held")
    failing = True

    async def write(params: dict[str, Any]) -> Any:
        calls.append(params)
        if failing:
            raise OSError("the database is away")
        return await dal.PROGRESS_JOBS.all(pool, params)

    reports: list[str] = []
    board = ProgressBoard(write, 1.0, lambda e, what: reports.append(what))
    token = board.open(j)
    assert current(j) is board.jobs[j.id]  # the handler's view, in this task
    board.jobs[j.id].set_phase("generating", 10)
    assert await board.flush() == 0 and reports == ["progress"]
    failing = False
    assert await board.flush() == 1  # kept, written next time
    assert (await row(conn, j))["progress"]["percent"] == 10
    # A job whose claim was taken (rescued by another worker: a new claim, whose
    # progress starts afresh) is left alone.
    await conn.execute(
        "update ai_course_jobs set claim_token = gen_random_uuid() where id = %s", [j.id]
    )
    assert (await row(conn, j))["progress"] is None
    board.jobs[j.id].set_phase("generating", 50)
    await board.flush()
    assert (await row(conn, j))["progress"] is None
    board.close(j, token)
    assert j.id not in board.jobs


def json_course() -> str:
    import json

    c = course_from_prompt("Write a course on Board\nGroups: 2\nItems per group: 2\n")
    return json.dumps(c)


async def test_partial_results_past_the_budget_wait_for_the_next_write(
    conn: Conn, pool: AsyncConnectionPool[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "PARTIAL_BYTES_PER_WRITE", 1)  # one a write
    calls: list[Any] = []
    board = board_for(pool, calls)
    jobs = [await course_job(conn, f"Budget {i}") for i in range(3)]
    text = json_course()
    for j in jobs:
        contextvars.copy_context().run(board.open, j)
        board.jobs[j.id].course_reader(PARAMS, "budget", "Budget")()(text)
    shown = []
    for waiting in (3, 2, 1):  # the jobs with something to write
        assert await board.flush() == waiting
        rows = [await row(conn, j) for j in jobs]
        shown.append(sum(r["partial_result"] is not None for r in rows))
        assert all(r["progress"]["groupsDone"] == 2 for r in rows)
    assert shown == [1, 2, 3]  # the oldest first, one a write
    assert await board.flush() == 0  # all written: nothing due


async def test_the_writes_own_connection_comes_back(
    conn: Conn, pool: AsyncConnectionPool[Any]
) -> None:
    own = OwnConnection(pool)
    board = ProgressBoard(own.progress_jobs, 1.0, lambda e, w: None)
    j = await course_job(conn, "Own Connection")
    contextvars.copy_context().run(board.open, j)
    board.jobs[j.id].set_phase("generating", 10)
    assert await board.flush() == 1
    pid = own.conn.info.backend_pid
    await conn.execute("select pg_terminate_backend(%s)", [pid])  # the server drops it
    board.jobs[j.id].set_phase("generating", 20)
    assert await board.flush() == 0  # failed, kept
    assert own.conn is None
    assert await board.flush() == 1  # a new connection
    assert own.conn is not None and own.conn.info.backend_pid != pid
    assert (await row(conn, j))["progress"]["percent"] == 20
    await own.aclose()
