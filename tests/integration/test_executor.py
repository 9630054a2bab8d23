"""The executor on its own, against a real database: a job claimed anywhere
(here by a plain claim_jobs call, no claim loop) is started, run, and its end
written: done through the completer, a failure with its retry time, an invalid
job to the dead letter, every provider down back to pending with the table held."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.completer import Completer
from listener.errors import InvalidJob, ProvidersUnavailable
from listener.executor import Executor
from listener.jobs import Job, Outcome
from listener.leases import LeaseKeeper
from listener.outage import AwayRetry, Health
from listener.pacing import Pacing
from tests.helpers import connect, insert_course, job
from tests.workers import settings

Handler = Callable[[Job], Awaitable[Outcome]]


@dataclass
class Rig:
    executor: Executor
    leases: LeaseKeeper
    completer: Completer
    due: list[float] = field(default_factory=list)
    freed: list[int] = field(default_factory=list)
    failures: list[tuple[Job, BaseException]] = field(default_factory=list)

    async def claim(self, pool: AsyncConnectionPool[Any]) -> Job:
        rows = await dal.CLAIM_JOBS.all(
            pool, {"table": "ai_course_jobs", "worker": "exec-test", "n": 1}
        )
        return Job.from_claim(rows[0])


@pytest.fixture
async def rig(db_url: str, pool: AsyncConnectionPool[Any]) -> AsyncIterator[Rig]:
    retry = AwayRetry(Health("database"), base=0.01, cap=0.05)
    leases = LeaseKeeper(pool, 3600, retry=retry, report=lambda exc, what: None)
    completer = Completer(pool, retry, backlog=10)
    r = Rig(executor=None, leases=leases, completer=completer)  # type: ignore[arg-type]
    r.executor = Executor(
        settings(db_url),
        pool,
        {},
        leases,
        completer,
        Pacing(1),
        retry=retry,
        on_due=r.due.append,
        on_free=lambda: r.freed.append(1),
        on_failure=lambda j, exc: r.failures.append((j, exc)),
    )
    writer = asyncio.create_task(completer.run())
    yield r
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)


def handle(rig: Rig, handler: Handler) -> None:
    rig.executor.handlers = {"ai_course_jobs": handler}


async def test_a_claimed_job_runs_and_its_end_is_written(
    db_url: str, pool: AsyncConnectionPool[Any], rig: Rig
) -> None:
    async def done(j: Job) -> Outcome:
        assert j.id in rig.leases.running  # held (heartbeated, releasable) while it runs
        return Outcome(f"courses/{j.row['course_id']}/course.json", {"provider": "test"})

    handle(rig, done)
    with connect(db_url) as c:
        jid = insert_course(c, "Started directly")
    claimed = await rig.claim(pool)
    outcome = await rig.executor.start(claimed)
    await rig.completer.drain()
    assert outcome is not None and outcome.metrics["totalDurationMs"] >= 0
    assert claimed.id not in rig.leases.running and rig.freed == [1]
    with connect(db_url) as c:
        row = job(c, jid)
    assert row["status"] == "done" and row["result_path"].endswith("course.json")
    assert row["metrics"]["provider"] == "test"


async def test_a_failure_is_written_with_its_retry_time(
    db_url: str, pool: AsyncConnectionPool[Any], rig: Rig
) -> None:
    async def boom(j: Job) -> Outcome:
        raise RuntimeError("the provider said no")

    handle(rig, boom)
    with connect(db_url) as c:
        jid = insert_course(c, "Fails once")
    assert await rig.executor.start(await rig.claim(pool)) is None
    with connect(db_url) as c:
        row = job(c, jid)
    assert row["status"] == "failed" and row["retry_count"] == 1
    assert row["error"] == "RuntimeError: the provider said no"
    assert len(rig.due) == 1 and 0 < rig.due[0] < 5  # the loop looks again when it is due
    assert [str(exc) for _, exc in rig.failures] == ["the provider said no"]


async def test_an_invalid_job_goes_to_the_dead_letter_at_once(
    db_url: str, pool: AsyncConnectionPool[Any], rig: Rig
) -> None:
    async def invalid(j: Job) -> Outcome:
        raise InvalidJob("params.itemsPerGroup is not a number")

    handle(rig, invalid)
    with connect(db_url) as c:
        jid = insert_course(c, "Bad params")
    await rig.executor.start(await rig.claim(pool))
    with connect(db_url) as c:
        row = job(c, jid)
    assert row["status"] == "dead_letter" and "itemsPerGroup" in row["error"]
    assert rig.due == []


async def test_providers_down_put_the_job_back_and_hold_the_table(
    db_url: str, pool: AsyncConnectionPool[Any], rig: Rig
) -> None:
    async def down(j: Job) -> Outcome:
        raise ProvidersUnavailable("openai: breaker open", wait_seconds=30)

    handle(rig, down)
    with connect(db_url) as c:
        jid = insert_course(c, "Waits for its providers")
    await rig.executor.start(await rig.claim(pool))
    with connect(db_url) as c:
        row = job(c, jid)
    assert row["status"] == "pending" and row["retry_count"] == 0  # no attempt counted
    cooldowns = rig.executor.cooldowns
    assert "ai_course_jobs" in cooldowns
    assert "ai_media_jobs:image" not in cooldowns and "ai_media_jobs:audio" not in cooldowns
    loop_now = time.monotonic()
    assert cooldowns.cooling("ai_course_jobs", loop_now)
    assert 25 < cooldowns.waits(loop_now)[0] <= 30
    assert 25 < rig.due[0] <= 30


async def test_a_cancelled_job_writes_nothing(
    db_url: str, pool: AsyncConnectionPool[Any], rig: Rig
) -> None:
    started = asyncio.Event()

    async def slow(j: Job) -> Outcome:
        started.set()
        await asyncio.sleep(3600)
        return Outcome("never")

    handle(rig, slow)
    with connect(db_url) as c:
        jid = insert_course(c, "Stopped")
    task = rig.executor.start(await rig.claim(pool))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    with connect(db_url) as c:
        row = job(c, jid)
    assert row["status"] == "processing" and row["error"] is None  # the sweep's business
    assert not rig.leases.running and rig.freed == [1]
