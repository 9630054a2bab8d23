"""The worker in-process recovering from what ends its LISTEN task and from sweeps
that fail: the task is restarted and followed by a sweep; a failed sweep is
retried with backoff and still looks for work."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger

from listener.jobs import Job, Outcome
from tests.helpers import aconnect, await_until, connect, insert_course
from tests.workers import running_worker, settings


async def done_handler(job: Job) -> Outcome:
    return Outcome(f"courses/{job.row['course_id']}/course.json", {"provider": "test"})


@pytest.fixture
def records() -> Iterator[list[dict[str, Any]]]:
    found: list[dict[str, Any]] = []
    sink = logger.add(
        lambda m: found.append(
            m.record["extra"] | {"msg": m.record["message"], "level": m.record["level"].name}
        )
    )
    yield found
    logger.remove(sink)


def _actions(records: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("action") == action]


async def _status(db_url: str, jid: str) -> str:
    async with await aconnect(db_url) as c:
        cur = await c.execute("select status from ai_course_jobs where id = %s", [jid])
        row = await cur.fetchone()
    assert row is not None
    return str(row["status"])


async def _is(db_url: str, jid: str, status: str) -> bool:
    return await _status(db_url, jid) == status


async def test_the_listen_task_is_restarted_whatever_ends_it(
    db_url: str, records: list[dict[str, Any]]
) -> None:
    async with running_worker(settings(db_url), {"ai_course_jobs": done_handler}) as w:
        service = w.listener.service
        real = service._listen
        sessions = 0
        missed: list[str] = []

        async def ends_twice(conn: Any) -> None:
            nonlocal sessions
            sessions += 1
            if sessions == 1:
                # A job arrives on this connection and is never read: only the
                # sweep that follows the restart can find it.
                async with await aconnect(w.dsn) as c:
                    cur = await c.execute(
                        "insert into ai_course_jobs (subject) values ('unheard') returning id"
                    )
                    missed.append(str((await cur.fetchone() or {})["id"]))
                raise RecursionError("maximum recursion depth exceeded")
            if sessions == 2:
                return  # ends without an error
            await real(conn)

        service._listen = ends_twice  # type: ignore[method-assign]
        sweeps = w.sweeps
        with connect(db_url) as c:  # end the current session
            c.execute("select pg_terminate_backend(%s)", [service.backend_pid])
        await await_until(lambda: _is(db_url, missed[0], "done") if missed else _false())
        await await_until(lambda: _logged(records, "listener_restarted", 2))
        restarted = _actions(records, "listener_restarted")
        assert [r["level"] for r in restarted] == ["ERROR", "ERROR"]
        assert "RecursionError" in restarted[0]["msg"]
        assert "returned" in restarted[1]["msg"]
        assert w.sweeps > sweeps  # the unheard job was found by the sweep after a restart
        # Listening again: a new job is claimed on its notification.
        await await_until(lambda: _listening_in(service, lambda: sessions >= 3))
        heard = w.notifications
        with connect(db_url) as c:
            jid = insert_course(c, "heard")
        await await_until(lambda: _more(w, "notifications", heard + 1), timeout=5)
        await await_until(lambda: _is(db_url, jid, "done"), timeout=5)


async def _listening_in(service: Any, third: Any) -> bool:
    return bool(third() and service.state == "listening" and service.connected.is_set())


async def _logged(records: list[dict[str, Any]], action: str, n: int) -> bool:
    return len(_actions(records, action)) >= n


async def _false() -> bool:
    return False


async def _more(w: Any, attr: str, n: int) -> bool:
    return bool(getattr(w, attr) >= n)


async def test_a_failed_sweep_is_retried_and_still_looks_for_work(
    db_url: str, records: list[dict[str, Any]]
) -> None:
    # No LISTEN and no poll: only the sweep's look can find the job.
    s = settings(db_url, sweep_interval_seconds=3600)
    handlers = {"ai_course_jobs": done_handler}
    async with running_worker(s, handlers, listen=False, poll_interval=3600) as w:
        await await_until(lambda: _more(w, "sweeps", 1), what="the start-up sweep")
        real = w.sweeper.mark_stale
        failures = 0

        async def fails_twice() -> int:
            nonlocal failures
            if failures < 2:
                failures += 1
                raise RuntimeError("a poison row")
            return await real()

        w.sweeper.mark_stale = fails_twice  # type: ignore[method-assign]
        with connect(db_url) as c:
            jid = insert_course(c, "found by a failed sweep")
        w.request_sweep()
        await await_until(lambda: _is(db_url, jid, "done"), timeout=5, what="job done")
        await await_until(lambda: _more(w, "sweeps", 2), timeout=5, what="a sweep that ran")
    assert failures == 2
    failed = _actions(records, "duty_failed")
    assert len(failed) == 1 and "a poison row" in failed[0]["msg"]  # the streak, once
    assert len(_actions(records, "sweep_recovered")) == 1


async def test_a_failed_duty_does_not_stop_the_others(db_url: str) -> None:
    from listener import db
    from listener.sweeper import Sweeper

    with connect(db_url) as c:
        insert_course(c, status="failed", retry_count=3)  # out of retries
    pool = db.make_pool(db_url, 2)
    await pool.open()
    try:
        sweeper = Sweeper(pool, settings(db_url))

        async def boom() -> int:
            raise RuntimeError("a poison row")

        sweeper.mark_stale = boom  # type: ignore[method-assign]
        result = await sweeper.run_once()
    finally:
        await pool.close()
    assert isinstance(result.error, RuntimeError)
    assert result.dead_lettered == 1  # the next duty still ran
