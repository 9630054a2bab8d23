"""Jobs that wait for their providers: defer_job (no attempt counted, until the
outage has lasted too long) and the worker's hold on claiming that table."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import psycopg
import pytest

from listener import dal
from listener.errors import ProvidersUnavailable
from listener.jobs import Job, Outcome
from listener.producer import BATCH_LOOK_SECONDS
from tests.helpers import aconnect, await_until, connect, insert_course, insert_media
from tests.workers import running_worker, settings

Conn = psycopg.AsyncConnection[dict[str, Any]]
pytestmark = pytest.mark.timeout(60)


async def claim(conn: Conn, table: str = "ai_course_jobs") -> Job:
    rows = await dal.fetch(conn, "claim_jobs", {"table": table, "worker": "test", "n": 1})
    return Job.from_claim(rows[0])


async def defer(conn: Conn, job: Job, wait: float, max_wait: float = 1800) -> list[Any]:
    params = {
        "table": job.table,
        "id": job.id,
        "token": job.claim_token,
        "wait": wait,
        "reason": "Providers unavailable: openai: rate limited",
        "max_wait": max_wait,
    }
    return await dal.fetch(conn, "defer_job", params)


async def row(conn: Conn, jid: Any) -> dict[str, Any]:
    cur = await conn.execute("select * from ai_course_jobs where id = %s", [jid])
    found = await cur.fetchone()
    assert found is not None
    return found


async def test_defer_counts_no_attempt_until_the_outage_lasts_too_long(conn: Conn) -> None:
    await conn.execute("insert into ai_course_jobs (subject, max_retries) values ('x', 2)")
    job = await claim(conn)
    [d] = await defer(conn, job, 30)
    assert d["status"] == "pending" and d["retry_count"] == 0 and not d["counted"]
    assert 29 < d["due_in"] <= 30
    r = await row(conn, job.id)
    assert r["claim_token"] is None and r["started_at"] is None
    assert r["error"] == "Providers unavailable: openai: rate limited"
    since = r["provider_wait_since"]
    assert since is not None

    # A stale token changes nothing.
    assert await defer(conn, job, 30) == []

    # Waiting again keeps the first moment; past max_wait each deferral counts.
    await conn.execute("update ai_course_jobs set run_after = now()")
    job = await claim(conn)
    [d] = await defer(conn, job, 5)
    assert not d["counted"] and (await row(conn, job.id))["provider_wait_since"] == since
    await conn.execute(
        "update ai_course_jobs set run_after = now(), provider_wait_since = now() - interval '1 h'"
    )
    job = await claim(conn)
    [d] = await defer(conn, job, 5)
    assert d["counted"] and d["status"] == "failed" and d["retry_count"] == 1
    assert "past the 1800s limit" in (await row(conn, job.id))["error"]
    await conn.execute("update ai_course_jobs set run_after = now()")
    job = await claim(conn)
    [d] = await defer(conn, job, 5)
    assert d["status"] == "dead_letter" and d["retry_count"] == 2

    # A requeued job starts a fresh wait.
    await dal.fetch(conn, "requeue_job", {"id": job.id, "table": "ai_course_jobs"})
    job = await claim(conn)
    [d] = await defer(conn, job, 5)
    assert not d["counted"] and d["status"] == "pending"
    assert (await row(conn, job.id))["provider_wait_since"] > since


async def test_a_deferred_job_notifies_and_runs_again(db_url: str) -> None:
    calls: list[str] = []

    async def handler(job: Job) -> Outcome:
        calls.append(str(job.id))
        if len(calls) == 1:
            raise ProvidersUnavailable("Providers unavailable: openai: rate limited", 0.5)
        return Outcome("x", {"provider": "test"})

    async with running_worker(settings(db_url), {"ai_course_jobs": handler}):
        with connect(db_url) as c:
            jid = insert_course(c, "Later")
        async with await aconnect(db_url) as conn:
            done = await await_until(
                lambda: _status(conn, jid, "done"), timeout=10, what="done after the wait"
            )
    assert calls == [jid, jid]
    assert done["retry_count"] == 0 and done["error"] is None


async def test_the_worker_stops_claiming_that_table_while_providers_are_down(db_url: str) -> None:
    deferred: list[str] = []
    media: list[str] = []

    async def course(job: Job) -> Outcome:
        deferred.append(str(job.id))
        raise ProvidersUnavailable("Providers unavailable: openai: breaker open", 60)

    async def image(job: Job) -> Outcome:
        media.append(str(job.id))
        return Outcome("m", {"provider": "test"})

    s = settings(db_url, worker_concurrency=1)
    handlers = {"ai_course_jobs": course, "ai_media_jobs": image}
    async with running_worker(s, handlers) as w:
        with connect(db_url) as c:
            first = insert_course(c, "First")
        # Held once defer_job has answered (the handler raising is not enough).
        await await_until(lambda: _async("ai_course_jobs" in w.executor.cooldowns), what="the hold")
        notified, course_claims = w.notifications, w.producer.claims_by_table["ai_course_jobs"]
        with connect(db_url) as c:
            later = [insert_course(c, f"Later {n}") for n in range(3)]
            picture = insert_media(c)
        # The other table goes on; this one is held (no claim, no churn).
        await await_until(lambda: _async(media == [picture]), what="the media job done")
        await await_until(lambda: _async(w.notifications >= notified + 4), what="notified")
        # Every notification is in, and the claim loop has decided on all of them
        # (any claim it sends is counted before it is sent).
        await await_until(lambda: _async(w.settled), what="the claim loop settled")
        async with await aconnect(db_url) as conn:
            statuses = [(await _row(conn, jid))["status"] for jid in later]
        assert deferred == [first]
        assert statuses == ["pending"] * 3
        assert w.producer.claims_by_table["ai_course_jobs"] == course_claims  # not one while held
        assert "ai_course_jobs" in w.executor.cooldowns


async def test_a_hold_that_starts_during_a_claim_round_is_kept(db_url: str) -> None:
    """A job of a table finds its providers down while the claim loop's round is
    claiming from another table: the round does not claim from the held table
    after it (which would also have ended the hold)."""
    async with running_worker(settings(db_url), {}) as w:
        await await_until(lambda: _async(w.settled), what="an idle worker")
        claim, claimed = w.completer.claim, []

        async def claim_then_hold(params: Any) -> Any:
            claimed.append(params["table"])
            if params["table"] == "ai_media_jobs":  # meanwhile, a course job was held
                w.executor.cooldowns.start("ai_course_jobs", 60, "test: providers down")
            return await claim(params)

        w.completer.claim = claim_then_hold  # type: ignore[method-assign]
        await w.producer._claim_round(["ai_media_jobs", "ai_course_jobs"], 4, [])
        assert claimed == ["ai_media_jobs"]
        assert w.executor.cooldowns.cooling("ai_course_jobs", time.monotonic())


@pytest.mark.parametrize("quota", [True, False])
async def test_while_a_quota_holds_a_table_its_batch_jobs_alone_are_claimed(
    db_url: str, quota: bool
) -> None:
    """Held for a per-minute quota: the table's batch jobs are claimed alone
    (sql/033), and a burst of notifications makes at most a look a second, not a
    claim each. Held because every provider is down: not even those."""
    seen: list[tuple[str, bool]] = []

    async def course(job: Job) -> Outcome:
        seen.append((str(job.id), bool(job.row.get("batch"))))
        if job.row.get("batch"):
            return Outcome("b", {"provider": "test"})  # (a batch door's hand-off, here)
        raise ProvidersUnavailable("Providers unavailable: openai: quota", 60, quota=quota)

    s = settings(db_url, worker_concurrency=4)
    async with running_worker(s, {"ai_course_jobs": course}) as w:
        w.producer.batch_tables = frozenset({"ai_course_jobs"})
        with connect(db_url) as c:
            first = insert_course(c, "First")
        await await_until(lambda: _async("ai_course_jobs" in w.executor.cooldowns), what="held")
        await await_until(lambda: _async(w.settled), what="the claim loop settled")
        claims = w.producer.claims_by_table["ai_course_jobs"]
        burst, t0 = [], time.monotonic()
        with connect(db_url) as c:
            for n in range(10):  # one at a time: each notification a reason to look
                heard = w.notifications
                burst.append(insert_course(c, f"Direct {n}"))
                await await_until(
                    lambda h=heard: _async(w.notifications > h),  # type: ignore[misc]
                    what="notified",
                )
                await await_until(lambda: _async(w.settled), what="settled")
        looks = w.producer.claims_by_table["ai_course_jobs"] - claims
        allowed = 1 + math.ceil((time.monotonic() - t0) / BATCH_LOOK_SECONDS)
        heard = w.notifications
        with connect(db_url) as c:
            batched = [insert_course(c, f"Batch {n}", batch=True) for n in range(3)]
        await await_until(lambda: _async(w.notifications >= heard + 3), what="notified")
        if quota:
            await await_until(
                lambda: _async(len(seen) == 4), timeout=10, what="the batch jobs claimed"
            )
        else:  # past any pause of the batch looks, and settled: nothing came
            paused = w.producer._batch_next["ai_course_jobs"]
            await await_until(lambda: _async(time.monotonic() > paused), what="no look paused")
            await await_until(lambda: _async(w.settled), what="settled after the batch jobs")
        async with await aconnect(db_url) as conn:
            waiting = [(await _row(conn, jid))["status"] for jid in burst]
    assert waiting == ["pending"] * 10  # the direct jobs wait for the quota
    assert looks <= allowed  # 10 notifications: a look a second at most
    if quota:
        assert sorted(seen[1:]) == sorted((jid, True) for jid in batched)
    else:
        assert seen == [(first, False)]


async def _async(value: Any) -> Any:
    return value


async def _row(conn: Conn, jid: str) -> dict[str, Any]:
    cur = await conn.execute("select * from ai_course_jobs where id = %s", [jid])
    found = await cur.fetchone()
    assert found is not None
    return found


async def _status(conn: Conn, jid: str, status: str) -> dict[str, Any] | None:
    r = await _row(conn, jid)
    return r if r["status"] == status else None


@pytest.mark.parametrize(
    ("max_wait", "waited", "counted"),
    [(60, 120, True), (7200, 3600, False)],  # each on the other side of the default 1800
)
async def test_the_worker_counts_an_attempt_past_its_outage_max_wait(
    db_url: str, max_wait: int, waited: int, counted: bool
) -> None:
    # The job has waited for its providers `waited` seconds already: the
    # worker's PROVIDER_OUTAGE_MAX_WAIT_SECONDS decides whether this deferral
    # counts an attempt.
    deferred = asyncio.Event()

    async def course(job: Job) -> Outcome:
        deferred.set()
        raise ProvidersUnavailable("Providers unavailable: openai: breaker open", 60)

    with connect(db_url) as c:
        jid = insert_course(c, "Waiting", error="Providers unavailable: openai: breaker open")
        c.execute(
            "update ai_course_jobs set provider_wait_since = now() - make_interval(secs => %s)"
            " where id = %s",
            [waited, jid],
        )
    s = settings(db_url, provider_outage_max_wait_seconds=max_wait)
    async with running_worker(s, {"ai_course_jobs": course}) as w:
        await asyncio.wait_for(deferred.wait(), 10)
        if counted:  # a failed attempt: its cooldown may be over before a look at it
            async with await aconnect(db_url) as conn:
                await await_until(lambda: _status(conn, jid, "failed"), what="failed")
        else:
            await await_until(
                lambda: _async("ai_course_jobs" in w.executor.cooldowns), what="deferred"
            )
    async with await aconnect(db_url) as conn:
        row = await _row(conn, jid)
    if counted:
        assert (row["status"], row["retry_count"]) == ("failed", 1)
        assert f"past the {max_wait}s limit" in row["error"]
    else:
        assert (row["status"], row["retry_count"]) == ("pending", 0)
        assert "limit" not in row["error"]
