"""The fast path: a notification that names its job, arriving at an idle worker,
claims that job by its id at once (claim_due_job), without a claim round; a
forged one claims nothing and still leads to a look; a burst is still claimed in
batches."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest

from listener import fastpath
from listener.errors import ProvidersUnavailable
from listener.jobs import Job, Outcome
from listener.pacing import ROUNDS
from listener.worker import Worker
from tests.faultproxy import FaultProxy, Link
from tests.helpers import await_until, connect, insert_course, insert_media, job
from tests.integration.test_fastclaim import hold_commits
from tests.workers import running_worker, settings


class Ran:
    """What the handlers were given, and whether two ever ran one job at once."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.now: set[uuid.UUID] = set()
        self.twice = False

    async def __call__(self, j: Job) -> Outcome:
        self.twice |= j.id in self.now
        self.now.add(j.id)
        self.jobs.append(j)
        await asyncio.sleep(0)  # let anything else run meanwhile
        self.now.discard(j.id)
        return Outcome(f"courses/{j.row['course_id']}/course.json", {"provider": "test"})

    def ids(self) -> list[str]:
        return [str(j.id) for j in self.jobs]


async def _true(value: Any) -> bool:
    return bool(value)


def _done(db_url: str, jid: str, table: str = "ai_course_jobs") -> Any:
    async def check() -> bool:
        with connect(db_url) as c:
            return bool(job(c, jid, table)["status"] == "done")

    return check


def _quiet_insert(c: psycopg.Connection[Any], n: int) -> list[str]:
    """Pending course jobs whose inserts notify nobody (triggers off for this
    transaction): the worker learns of them only from what the test sends."""
    with c.transaction():
        c.execute("set local session_replication_role = replica")
        return [insert_course(c, f"Quiet {i}") for i in range(n)]


async def test_a_notified_job_is_claimed_by_its_id_without_a_claim_round(db_url: str) -> None:
    ran = Ran()
    handlers = {"ai_course_jobs": ran, "ai_media_jobs": ran}
    async with running_worker(settings(db_url), handlers) as w:
        await await_until(lambda: _true(w.settled), what="an idle worker")
        rounds, fast = w.producer.claim_rounds, w.fast.started
        with connect(db_url) as c:
            course = insert_course(c, "Fast", params={"language": "en"})
            await await_until(_done(db_url, course), what="the course job done")
            media = insert_media(c, "a dog")
            await await_until(_done(db_url, media, "ai_media_jobs"), what="the media job done")
            course_row = job(c, course)
        assert w.fast.started == fast + 2
        assert w.producer.claim_rounds == rounds  # the claim loop sent nothing
    assert ran.ids() == [course, media] and not ran.twice
    # The columns the handlers read, and only those.
    assert ran.jobs[0].row == {
        "id": course,
        "subject": "Fast",
        "course_id": course_row["course_id"],
        "params": {"language": "en"},
        "batch": False,  # sql/031: the batch door asks only when it is true
    }
    assert set(ran.jobs[1].row) == {"id", "prompt", "media_type", "course_id", "params", "batch"}
    assert ran.jobs[1].row["prompt"] == "a dog" and ran.jobs[1].row["media_type"] == "image"
    assert ran.jobs[1].row["batch"] is False  # sql/034: as a course row's


async def test_a_forged_notification_runs_nothing_and_loses_nothing(db_url: str) -> None:
    ran = Ran()
    with connect(db_url) as c:
        # Made before the worker starts: rows in every state a forged id could name.
        now = c.execute("select now() as t").fetchone()["t"]
        done = insert_course(c, "Done", status="done", completed_at=now)
        cancelled = insert_course(c, "Cancelled", status="cancelled", completed_at=now)
        later = now + datetime.timedelta(hours=1)
        backoff = insert_course(c, "Backoff", status="failed", retry_count=1, run_after=later)
        spent = insert_course(c, "Spent", status="failed", retry_count=3, max_retries=3)
        token = uuid.uuid4()
        held = insert_course(
            c, "Held", status="processing", worker_id="other", claim_token=token,
            started_at=now, last_heartbeat=now,
        )  # fmt: skip
        media = insert_media(c, "a media job named as a course job")
    forged = [done, cancelled, backoff, spent, held, media, str(uuid.uuid4())]
    async with running_worker(settings(db_url), {"ai_course_jobs": ran}) as w:
        # After the start-up sweep (it moves the spent job to the dead letter).
        await await_until(lambda: _true(w.sweeps >= 1 and w.settled), what="an idle worker")
        with connect(db_url) as c:
            before = {jid: job(c, jid) for jid in (done, cancelled, backoff, spent, held)}
            media_before = job(c, media, "ai_media_jobs")
        fast = w.fast.started
        for jid in forged:  # one at a time, each to an idle worker: each takes the fast path
            await _notify_and_settle(db_url, w, {"table": "ai_course_jobs", "id": jid})
        assert ran.jobs == [] and w.fast.started == fast
        with connect(db_url) as c:
            assert {jid: job(c, jid) for jid in before} == before  # not one column changed
            assert job(c, media, "ai_media_jobs") == media_before
            # Loses nothing: a forged id is still a reason to look at its table,
            # and the look finds the job nobody was told about.
            (quiet,) = _quiet_insert(c, 1)
            assert job(c, quiet)["status"] == "pending"
            c.execute(
                "select pg_notify('ai_jobs', %s)",
                [json.dumps({"table": "ai_course_jobs", "id": done})],
            )
        await await_until(_done(db_url, quiet), what="the unannounced job done by the look")
    assert ran.ids() == [quiet]


async def _notify_and_settle(db_url: str, w: Any, payload: dict[str, Any]) -> None:
    heard = w.notifications
    with connect(db_url) as c:
        c.execute("select pg_notify('ai_jobs', %s)", [json.dumps(payload)])
    await await_until(lambda: _true(w.notifications > heard), what="heard")
    await await_until(lambda: _true(w.settled), what="the notification dealt with")


async def test_no_fast_claim_in_a_held_or_paused_table(db_url: str) -> None:
    deferred: list[str] = []
    ran = Ran()

    async def course(j: Job) -> Outcome:
        deferred.append(str(j.id))
        raise ProvidersUnavailable("Providers unavailable: openai: breaker open", 60)

    s = settings(db_url, worker_concurrency=2)
    async with running_worker(s, {"ai_course_jobs": course, "ai_media_jobs": ran}) as w:
        await await_until(lambda: _true(w.settled), what="an idle worker")
        with connect(db_url) as c:
            first = insert_course(c, "First")
        await await_until(lambda: _true("ai_course_jobs" in w.executor.cooldowns), what="the hold")
        await await_until(lambda: _true(w.settled), what="an idle worker")
        claims, heard = w.producer.claims_by_table["ai_course_jobs"], w.notifications
        with connect(db_url) as c:
            later = insert_course(c, "Later")
        await await_until(lambda: _true(w.settled and w.notifications > heard), what="settled")
        with connect(db_url) as c:
            assert job(c, later)["status"] == "pending"
        assert deferred == [first] and w.producer.claims_by_table["ai_course_jobs"] == claims
        # Paused: the fast claim finds nothing (claim_due_job refuses the table).
        heard = w.notifications
        with connect(db_url) as c:
            c.execute("select pause_jobs('ai_media_jobs')")
        await await_until(lambda: _true(w.settled and w.notifications > heard), what="paused")
        fast, heard = w.fast.started, w.notifications
        with connect(db_url) as c:
            picture = insert_media(c)
        await await_until(lambda: _true(w.settled and w.notifications > heard), what="settled")
        assert w.fast.started == fast
        with connect(db_url) as c:
            assert job(c, picture, "ai_media_jobs")["status"] == "pending"
            c.execute("select resume_jobs('ai_media_jobs')")
        await await_until(_done(db_url, picture, "ai_media_jobs"), what="done once resumed")
    assert ran.ids() == [picture]


async def test_a_burst_of_named_notifications_is_claimed_in_batches(db_url: str) -> None:
    ran = Ran()
    s = settings(db_url, worker_concurrency=10)
    async with running_worker(s, {"ai_course_jobs": ran}) as w:
        await await_until(lambda: _true(w.settled), what="an idle worker")
        queries, fast = w.claim_queries, w.fast.started
        with connect(db_url) as c:
            ids = _quiet_insert(c, 100)
            with c.transaction():  # 100 notifications at one commit, each naming its job
                for jid in ids:
                    c.execute(
                        "select pg_notify('ai_jobs', %s)",
                        [json.dumps({"table": "ai_course_jobs", "id": jid})],
                    )

        async def all_done() -> bool:
            with connect(db_url) as c:
                row = c.execute(
                    "select count(*) as n from ai_course_jobs where status = 'done'"
                ).fetchone()
                return bool(row is not None and row["n"] == 100)

        await await_until(all_done, what="all 100 done", timeout=30)
    assert sorted(ran.ids()) == sorted(ids) and not ran.twice
    # One fast claim for the first, the rest in claim rounds of many jobs each.
    assert w.fast.started - fast <= 3
    assert w.claim_queries - queries <= 25


async def test_a_fast_claim_under_way_at_shutdown_gives_its_job_back(db_url: str) -> None:
    ran = Ran()
    async with running_worker(settings(db_url), {"ai_course_jobs": ran}) as w:
        await await_until(lambda: _true(w.settled), what="an idle worker")
        with connect(db_url) as c:
            (jid,) = _quiet_insert(c, 1)
        with connect(db_url) as blocker, blocker.transaction():
            # Writes to the table wait: the fast claim is sent, and waits.
            blocker.execute("lock table ai_course_jobs in exclusive mode")
            with connect(db_url) as c:
                c.execute(
                    "select pg_notify('ai_jobs', %s)",
                    [json.dumps({"table": "ai_course_jobs", "id": jid})],
                )
            await await_until(_claim_waits_on_a_lock(db_url), what="the fast claim waiting")
            w.request_stop()  # while the claim is under way; then the lock goes
    assert ran.jobs == []  # never started: claimed after the stop, then given back
    assert w.fast.started == 1
    with connect(db_url) as c:
        row = job(c, jid)
    assert row["status"] == "pending" and row["worker_id"] is None and row["retry_count"] == 0


def _claim_waits_on_a_lock(db_url: str) -> Any:
    async def check() -> bool:
        with connect(db_url) as c:
            row = c.execute(
                "select count(*) as n from pg_stat_activity where datname = current_database()"
                " and wait_event_type = 'Lock' and query like '%claim_due_job%'"
            ).fetchone()
            return bool(row is not None and row["n"] == 1)

    return check


async def test_a_job_whose_fast_claim_is_not_committed_is_stopped_and_runs_again(
    db_url: str,
) -> None:
    # The handler starts on the claim's row, before its commit. The commit is
    # refused here (a deferred trigger): the job is stopped before it ends,
    # released, claimed again by a claim round and run once to the end, never
    # in two places at once and with no attempt counted.
    hold_commits(db_url, refuse=(1,))
    events: list[str] = []
    first = asyncio.Event()

    async def handler(j: Job) -> Outcome:
        events.append("start")
        if len(events) == 1:
            first.set()
            try:
                await asyncio.sleep(30)  # stopped long before this ends
            except asyncio.CancelledError:
                events.append("stopped")
                raise
        events.append("end")
        return Outcome(f"courses/{j.row['course_id']}/course.json", {"provider": "test"})

    # No heartbeat meanwhile: it would find the claim gone and stop the job too.
    quiet = settings(db_url, heartbeat_interval_seconds=60)
    async with running_worker(quiet, {"ai_course_jobs": handler}) as w:
        await await_until(lambda: _true(w.settled), what="an idle worker")
        fast = w.fast.started
        with connect(db_url) as gate:
            gate.execute("select pg_advisory_lock(7)")  # every claim's commit waits
            with connect(db_url) as c:
                jid = insert_course(c, "Refused once")
            await asyncio.wait_for(first.wait(), 10)  # started on the row, before the commit
            assert w.fast.started == fast + 1
            with connect(db_url) as c:
                assert job(c, jid)["status"] == "pending"
            gate.execute("select pg_advisory_unlock(7)")  # the commit: refused
        await await_until(_done(db_url, jid), what="the job done by its second claim")
        # The connection of the refused commit was given back: the fast path
        # opens another (on the next notification) and claims with it again.
        with connect(db_url) as c:
            for subject in ("Reopens the fast path", "Fast again"):
                await await_until(lambda: _true(w.settled), what="an idle worker")
                later = insert_course(c, subject)
                await await_until(_done(db_url, later), what=f"{subject!r} done")
        assert w.fast.started == fast + 2
    assert events == ["start", "stopped", "start", "end", "start", "end", "start", "end"]
    with connect(db_url) as c:
        row = job(c, jid)
    assert row["retry_count"] == 0 and row["error"] is None


async def test_a_job_that_ends_before_its_claim_is_committed_is_written_after_it(
    db_url: str,
) -> None:
    # A write with the claim's token sent before the claim's commit would not find
    # the row (the UPDATE reads the version before the claim): the executor waits
    # for the commit, then writes the end, whether the handler returned or raised.
    hold_commits(db_url)
    ended: list[str] = []

    async def handler(j: Job) -> Outcome:
        ended.append(j.row["subject"])
        if j.row["subject"] == "Raises":
            raise RuntimeError("the handler failed at once")
        return Outcome(f"courses/{j.row['course_id']}/course.json", {"provider": "test"})

    quiet = settings(db_url, heartbeat_interval_seconds=60)
    async with running_worker(quiet, {"ai_course_jobs": handler}) as w:
        for subject in ("Returns", "Raises"):
            await await_until(lambda: _true(w.settled), what="an idle worker")
            fast = w.fast.started
            with connect(db_url) as gate:
                gate.execute("select pg_advisory_lock(7)")  # the claim's commit waits
                with connect(db_url) as c:
                    jid = insert_course(c, subject)
                await await_until(_among(subject, ended), what="the handler's end")
                assert w.fast.started == fast + 1
                with connect(db_url) as c:
                    assert job(c, jid)["status"] == "pending"  # not yet committed
                gate.execute("select pg_advisory_unlock(7)")
            want = "done" if subject == "Returns" else "failed"

            async def written(jid: str = jid, want: str = want) -> bool:
                with connect(db_url) as c:
                    return bool(job(c, jid)["status"] == want)

            await await_until(written, what=f"the job {want}")
            with connect(db_url) as c:
                row = job(c, jid)
            if want == "failed":
                assert row["retry_count"] == 1 and "failed at once" in row["error"]
            else:
                assert row["result_path"] and row["error"] is None


def _among(item: str, items: list[str]) -> Any:
    async def check() -> bool:
        return item in items

    return check


async def test_a_notified_job_is_not_claimed_while_every_slot_is_busy(db_url: str) -> None:
    # The fast path claims only into a free slot: with the one slot busy, a
    # notified job is a reason to look (the claim loop, with no slot, claims
    # nothing) and stays pending until the slot is free.
    started, go = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    async def handler(j: Job) -> Outcome:
        ran.append(j.row["subject"])
        if j.row["subject"] == "Long":
            started.set()
            await go.wait()
        return Outcome(f"courses/{j.row['course_id']}/course.json", {"provider": "test"})

    one = settings(db_url, worker_concurrency=1)
    async with running_worker(one, {"ai_course_jobs": handler}) as w:
        await await_until(lambda: _true(w.settled), what="an idle worker")
        fast = w.fast.started
        with connect(db_url) as c:
            long = insert_course(c, "Long")
        await asyncio.wait_for(started.wait(), 10)
        assert w.fast.started == fast + 1  # the claim loop still takes the table for empty
        await await_until(lambda: _true(w.settled), what="the worker settled")
        heard = w.notifications
        with connect(db_url) as c:
            later = insert_course(c, "Later")
        await await_until(lambda: _true(w.settled and w.notifications > heard), what="settled")
        assert w.fast.started == fast + 1  # not claimed past WORKER_CONCURRENCY
        assert [j.id for j in w.leases.jobs()] == [uuid.UUID(long)]
        with connect(db_url) as c:
            assert job(c, later)["status"] == "pending"
        go.set()
        await await_until(_done(db_url, later), what="the later job done once the slot is free")
    assert ran == ["Long", "Later"]


def _link_of(proxy: FaultProxy, conn: Any) -> Link:
    """The proxy's link that carries this client connection."""
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        port = sock.getsockname()[1]
    (link,) = [k for k in proxy.links if k.client.get_extra_info("peername")[1] == port]
    return link


async def test_a_claim_committed_but_its_answer_lost_goes_back_to_pending(
    db_url: str, proxy: FaultProxy
) -> None:
    # The server commits the fast claim, and its answer is lost with the
    # connection: the worker cannot tell that from a commit that failed. It stops
    # the job and releases it with the claim's token: the claim did commit, so
    # the release puts the job back to pending (no attempt counted) and a claim
    # round runs it again. Without the release it would stay `processing` for
    # nobody until the stale rescue.
    hold_commits(db_url)
    events: list[str] = []
    first = asyncio.Event()

    async def handler(j: Job) -> Outcome:
        events.append("start")
        if len(events) == 1:
            first.set()
            try:
                await asyncio.sleep(30)  # stopped long before this ends
            except asyncio.CancelledError:
                events.append("stopped")
                raise
        events.append("end")
        return Outcome(f"courses/{j.row['course_id']}/course.json", {"provider": "test"})

    quiet = settings(proxy.url(db_url), heartbeat_interval_seconds=60)
    async with running_worker(quiet, {"ai_course_jobs": handler}) as w:
        await await_until(lambda: _true(w.settled and w.fast.claimer.ready), what="an idle worker")
        assert w.fast.claimer.conn is not None
        claim_link = _link_of(proxy, w.fast.claimer.conn)
        with connect(db_url) as gate:
            gate.execute("select pg_advisory_lock(7)")  # the claim's commit waits
            with connect(db_url) as c:
                jid = insert_course(c, "Answer lost")
            await asyncio.wait_for(first.wait(), 10)  # started on the row, before the commit
            claim_link.blackholed = True  # from here on nothing reaches the worker on it
            gate.execute("select pg_advisory_unlock(7)")  # the server commits

            async def committed() -> bool:
                with connect(db_url) as c:
                    return bool(job(c, jid)["status"] == "processing")

            await await_until(committed, what="the claim committed")
        proxy._loop.call_soon_threadsafe(claim_link.abort)  # and the answer is lost
        await await_until(_done(db_url, jid), what="the job done by its second claim")
    assert events == ["start", "stopped", "start", "end"]
    with connect(db_url) as c:
        row = job(c, jid)
    assert row["retry_count"] == 0 and row["error"] is None


async def test_a_held_job_whose_claim_is_not_yet_committed_is_not_given_back(
    db_url: str,
) -> None:
    # A fast-claimed job whose slot was taken meanwhile waits in `ready`; held
    # past READY_LIMIT_SECONDS it goes back to the queue. Not while its claim's commit
    # is still to come: the release would read the row from before the claim
    # and change nothing, and the claim, committed later, would leave the job
    # `processing` for nobody. Set up in order: the fast claim waits on a lock
    # of its table; meanwhile a claim round takes a media job into the only
    # slot; the lock goes, the row comes to a full worker, and its commit waits
    # (advisory lock 7).
    hold_commits(db_url)
    media_started, media_go = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    async def course(j: Job) -> Outcome:
        ran.append(str(j.id))
        return Outcome(f"courses/{j.row['course_id']}/course.json", {"provider": "test"})

    async def media(j: Job) -> Outcome:
        media_started.set()
        await media_go.wait()
        return Outcome(f"media/{j.id}.png", {"provider": "test"})

    s = settings(db_url, worker_concurrency=1, heartbeat_interval_seconds=60)
    async with running_worker(s, {"ai_course_jobs": course, "ai_media_jobs": media}) as w:
        await await_until(lambda: _true(w.settled and w.fast.claimer.ready), what="an idle worker")
        # As after a run of short jobs: the claim loop claims ahead of its slots.
        w.pacing.round_trip.value, w.pacing.job_time.value = 1.0, 0.001
        releases: list[tuple[list[uuid.UUID], list[uuid.UUID]]] = []
        release = w.leases.release

        async def watched_release(jobs: list[Job], what: str, **kw: Any) -> list[Job]:
            kept = await release(jobs, what, **kw)
            releases.append(([j.id for j in jobs], [j.id for j in kept]))
            return kept

        w.leases.release = watched_release  # type: ignore[method-assign]
        with connect(db_url) as c:
            (jid,) = _quiet_insert(c, 1)
        with connect(db_url) as gate:
            gate.execute("select pg_advisory_lock(7)")  # the claim's commit will wait
            with connect(db_url) as blocker, blocker.transaction():
                blocker.execute("lock table ai_course_jobs in exclusive mode")
                with connect(db_url) as c:
                    c.execute(
                        "select pg_notify('ai_jobs', %s)",
                        [json.dumps({"table": "ai_course_jobs", "id": jid})],
                    )
                await await_until(_claim_waits_on_a_lock(db_url), what="the fast claim waiting")
                with connect(db_url) as c:
                    insert_media(c, "takes the slot")
                await asyncio.wait_for(media_started.wait(), 10)
            # The lock is gone: the row comes, to a worker with no free slot.
            held = uuid.UUID(jid)
            await await_until(
                lambda: _true(held in [j.id for j in w.leases.ready.jobs()]), what="held"
            )
            await await_until(
                lambda: _true(any(held in given for given, _ in releases)),
                what="the held job's release, past READY_LIMIT_SECONDS",
            )
            assert releases[0] == ([held], [held])  # kept: its commit is still to come
            assert w.leases.find(held) is not None
            with connect(db_url) as c:
                assert job(c, jid)["status"] == "pending"  # (not yet committed)
            gate.execute("select pg_advisory_unlock(7)")
        media_go.set()
        await await_until(_done(db_url, jid), what="the held job done")
    assert ran == [jid]
    with connect(db_url) as c:
        row = job(c, jid)
    assert row["retry_count"] == 0 and row["worker_id"] == w.id


async def test_a_notified_job_is_not_claimed_while_the_slot_and_its_ready_job_are_taken(
    db_url: str,
) -> None:
    # Jobs claimed ahead of a slot (ready) take slots too: with the one slot
    # running a job and one more ready, a notified job is the claim loop's,
    # which has no room either, and stays pending.
    go = asyncio.Event()
    ran: list[str] = []

    async def handler(j: Job) -> Outcome:
        ran.append(j.row["subject"])
        await go.wait()
        return Outcome(f"courses/{j.row['course_id']}/course.json", {"provider": "test"})

    one = settings(db_url, worker_concurrency=1)
    async with running_worker(one, {"ai_course_jobs": handler}) as w:
        await await_until(lambda: _true(w.settled), what="an idle worker")
        fast = w.fast.started
        with connect(db_url) as c:
            insert_course(c, "Running")
        await await_until(lambda: _true(ran == ["Running"]), what="the first job running")
        # Jobs ROUNDS - 1 round trips long: one held ready beside the running one.
        w.pacing.round_trip.value, w.pacing.job_time.value = 1.0, ROUNDS - 1
        w.leases.ready.limit = 3600  # ready for as long as the test needs
        with connect(db_url) as c:
            insert_course(c, "Ready")
        await await_until(lambda: _true(len(w.leases.ready) == 1 and w.settled), what="ready")
        heard = w.notifications
        with connect(db_url) as c:
            third = insert_course(c, "Third")
        await await_until(lambda: _true(w.settled and w.notifications > heard), what="settled")
        assert w.fast.started == fast + 1  # only the first: no slot for the third
        assert len(w.leases.jobs()) == 2
        with connect(db_url) as c:
            assert job(c, third)["status"] == "pending"
        go.set()
        await await_until(_done(db_url, third), what="the third job done in its turn")
    assert ran == ["Running", "Ready", "Third"]


def _wide_spread(monkeypatch: pytest.MonkeyPatch, step: float = 0.05) -> None:
    """Steps of 50 ms instead of 2 (the same six starts count): a margin that a
    loaded machine's scheduling does not eat."""
    monkeypatch.setattr(fastpath, "SPREAD_STEP", step)
    monkeypatch.setattr(fastpath, "SPREAD_MAX", step * fastpath.SPREAD_STARTS)


@contextlib.asynccontextmanager
async def _two_workers(db_url: str) -> AsyncIterator[tuple[tuple[Worker, Ran], ...]]:
    ran_a, ran_b = Ran(), Ran()
    async with (
        running_worker(settings(db_url), {"ai_course_jobs": ran_a}) as a,
        running_worker(settings(db_url), {"ai_course_jobs": ran_b}) as b,
    ):
        yield (a, ran_a), (b, ran_b)
    assert not ran_a.twice and not ran_b.twice


async def _long_jobs_to_the_favoured(
    db_url: str, favoured: tuple[Worker, Ran], other: Worker, idle: Callable[[], Awaitable[bool]]
) -> None:
    """The other worker started six jobs just now (its claims go out SPREAD_MAX
    later): three long jobs, inserted one at a time, all go to the favoured one."""
    worker, ran = favoured
    await await_until(idle, what="both workers idle")
    for w in (worker, other):
        w.pacing.table_time["ai_course_jobs"].value = 100.0  # a generation's, as learnt
        w.fast.starts.clear()
    other.fast.starts.extend([time.monotonic()] * 6)
    before = len(ran.jobs)
    with connect(db_url) as c:
        for i in range(3):
            jid = insert_course(c, f"Long {i}")
            await await_until(_done(db_url, jid), what=f"long job {i} done")
            await await_until(idle, what="both workers idle")
    assert len(ran.jobs) == before + 3, "a job went to the busier worker"


async def test_long_jobs_go_first_to_the_worker_that_started_fewest_lately(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers hear each notification. Where jobs are long, the one that started
    fewer jobs lately sends its claim first and wins, whichever of them the server
    wakes first (the test favours each in turn: a fixed order of the race would
    fail one of the two)."""
    _wide_spread(monkeypatch)
    async with _two_workers(db_url) as ((a, ran_a), (b, ran_b)):

        async def idle() -> bool:  # lone jobs: a burst is the claim loops', as it comes
            return all(w.settled and w.fast.claimer.ready for w in (a, b))

        for favoured, other in (((b, ran_b), a), ((a, ran_a), b)):
            await _long_jobs_to_the_favoured(db_url, favoured, other, idle)
            assert favoured[0].fast.started >= 3


async def test_the_claim_loops_looks_are_spread_too(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the claim gate counts a table's claims (quotas), every claim of it
    is the claim loop's: its look at a notified table is spread as the fast
    path's claims are, and its claims count in the spread."""
    _wide_spread(monkeypatch)
    async with _two_workers(db_url) as ((a, ran_a), (b, ran_b)):
        for w in (a, b):
            w.fast.offer = lambda table, job_id: False  # type: ignore[method-assign]

        async def idle() -> bool:
            return all(w.settled for w in (a, b))

        for favoured, other in (((b, ran_b), a), ((a, ran_a), b)):
            rounds = favoured[0].producer.claim_rounds
            await _long_jobs_to_the_favoured(db_url, favoured, other, idle)
            assert favoured[0].producer.claim_rounds > rounds  # the claim loop's
            assert len(favoured[0].fast.starts) == 3  # its claims count in its spread


async def test_a_put_off_look_is_pending_work_and_serves_the_jobs_heard_meanwhile(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A look the spread puts off keeps the worker unsettled until it is made (a
    look left behind would claim the next job out of its turn), and the
    notifications heard meanwhile join it: one claim round for both jobs."""
    _wide_spread(monkeypatch, step=0.2)  # six starts: 1.2 s later
    ran = Ran()
    async with running_worker(settings(db_url), {"ai_course_jobs": ran}) as w:
        w.fast.offer = lambda table, job_id: False  # type: ignore[method-assign]
        await await_until(lambda: _true(w.settled), what="an idle worker")
        w.pacing.table_time["ai_course_jobs"].value = 100.0  # a generation's, as learnt
        w.fast.starts.extend([time.monotonic()] * 6)
        rounds, heard = w.producer.claim_rounds, w.notifications
        with connect(db_url) as c:
            ids = [insert_course(c, f"Put off {i}") for i in range(2)]
        await await_until(lambda: _true(w.notifications >= heard + 2), what="both heard")
        assert not w.settled and not ran.jobs  # put off, not done
        for jid in ids:
            await await_until(_done(db_url, jid), what="the jobs done")
        await await_until(lambda: _true(w.settled), what="settled")
        assert sorted(ran.ids()) == sorted(ids)
        assert w.producer.claim_rounds == rounds + 1


async def test_short_jobs_are_claimed_at_once_however_many_started(db_url: str) -> None:
    """Each table by its own job time: a table of short jobs is not spread
    because the other's are long."""
    async with running_worker(settings(db_url), {"ai_course_jobs": Ran()}) as w:
        await await_until(lambda: _true(w.settled), what="an idle worker")
        w.fast.starts.extend([time.monotonic()] * 6)
        w.pacing.table_time["ai_course_jobs"].value = 100.0  # courses: generations
        w.pacing.table_time["ai_media_jobs"].value = 0.01  # media: placeholders
        assert w.fast.spread("ai_course_jobs") > 0.0
        assert w.fast.spread("ai_media_jobs") == 0.0  # started at once
        w.fast.starts.clear()
        assert w.fast.spread("ai_course_jobs") == 0.0  # none started lately: at once
