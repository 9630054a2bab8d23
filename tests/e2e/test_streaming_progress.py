"""A requester watching the row while the real `ai-jobs worker` streams courses
from the fake providers (real SDKs): progress that never goes down, the course
growing group by group in partial_result, 100 and no partial result at done;
and many jobs' progress written in one statement an interval, counted by the
database itself (pg_stat_user_functions)."""

from __future__ import annotations

import itertools
import signal
import time
from typing import Any

import psycopg
import pytest

from listener.progress import WRITE_PERIOD
from tests.e2e.test_generation_worker import providers_env
from tests.fakeai import FakeAI, Pace
from tests.helpers import connect, insert_course, insert_media, job, wait_until
from tests.workers import WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
PARAMS = {"groupCount": 4, "itemsPerGroup": 4}


def watch(c: psycopg.Connection[Any], job_id: str, table: str = "ai_course_jobs") -> list[Any]:
    """The row's (status, progress, groups in partial_result), every 20 ms, until done."""
    seen: list[Any] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row = job(c, job_id, table)
        partial = row.get("partial_result")
        seen.append((row["status"], row["progress"], len(partial["groups"]) if partial else 0))
        if row["status"] not in ("pending", "processing"):
            return seen
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} not done in 60 s: {seen[-1]}")


def test_progress_and_partial_result_while_a_course_streams(db_url: str, fake: FakeAI) -> None:
    fake.pace = Pace(ttft=0.2, tps=800, size=(2400, 2400))  # about 3 s
    w = WorkerProcess(
        db_url,
        **providers_env(fake, PROGRESS_INTERVAL_SECONDS="0.25", LOG_LEVEL="DEBUG"),
    ).started()
    try:
        with connect(db_url) as c:
            job_id = insert_course(c, "Streaming Seas", params=PARAMS)
            seen = watch(c, job_id)
            after = job(c, job_id)
            media_id = insert_media(c, "a wave", "image")
            media = watch(c, media_id, "ai_media_jobs")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    running = [(p, g) for s, p, g in seen if s == "processing" and p is not None]
    percents = [p["percent"] for p, _ in running]
    groups = [g for _, g in running]
    assert percents == sorted(percents) and len(set(percents)) >= 4  # it moved, never back
    assert groups == sorted(groups) and set(groups) >= {0, 1, 2, 3}  # group by group
    for p, g in running:
        assert p["groupsTotal"] == 4 and p["groupsDone"] == g
        assert p["phase"] in ("generating", "storing") and p["tokensOut"] >= 0
        assert "updatedAt" in p
    assert any(p["tokensOut"] > 0 and p["groupsDone"] == 0 for p, _ in running)
    status, progress, partial_groups = seen[-1]
    assert status == "done" and progress["percent"] == 100 and partial_groups == 0
    assert after["partial_result"] is None and after["progress"]["percent"] == 100
    # A medium shows its phases; done at 100.
    media_phases = {p.get("phase") for s, p, _ in media if p is not None} - {None}
    assert media_phases <= {"generating", "storing"}
    assert media[-1][0] == "done" and media[-1][1]["percent"] == 100
    # At most one write a period (WRITE_PERIOD of the interval: the interval is
    # the longest a job goes without one), with slack for the log's clock: when
    # each write started is its logged end less its duration, both rounded.
    writes = [e["ts"] - e["ms"] / 1000 for e in w.actions("progress_written")]
    assert len(writes) >= 4
    gaps = [b - a for a, b in itertools.pairwise(writes)]
    assert min(gaps) >= 0.25 * WRITE_PERIOD * 0.9, gaps


def test_many_jobs_progress_in_one_statement_an_interval(db_url: str, fake: FakeAI) -> None:
    """30 courses streaming at once in one worker: each interval one statement
    writes all of them (the database counts the calls of progress_jobs)."""
    with connect(db_url) as c:
        name = c.execute("select current_database() as db").fetchone()["db"]  # type: ignore[index]
        c.execute(f"alter database \"{name}\" set track_functions = 'pl'")
    fake.pace = Pace(ttft=0.1, tps=300, size=(1200, 1200))  # about 4 s each
    n, interval = 30, 0.5
    w = WorkerProcess(
        db_url,
        **providers_env(
            fake,
            WORKER_CONCURRENCY=str(n),
            PROGRESS_INTERVAL_SECONDS=str(interval),
            LOG_LEVEL="DEBUG",
        ),
    ).started()
    try:
        with connect(db_url) as c:
            ids = [insert_course(c, f"Many Streams {i}", params=PARAMS) for i in range(n)]
            wait_until(
                lambda: all(job(c, i)["status"] == "done" for i in ids), timeout=60, what="done"
            )
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0  # its connections closed: their statistics are flushed
    writes = w.actions("progress_written")
    times = [e["ts"] - e["ms"] / 1000 for e in writes]  # each write's start
    span = times[-1] - times[0]
    assert len(writes) <= span / (interval * WRITE_PERIOD) + 2  # one a period at most
    assert max(e["jobs"] for e in writes) >= n * 0.8  # and each for (nearly) all of them
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= interval * WRITE_PERIOD * 0.9
    with connect(db_url) as c:

        def calls() -> int:
            row = c.execute(
                "select coalesce(sum(calls), 0) as n from pg_stat_user_functions"
                " where funcname = 'progress_jobs'"
            ).fetchone()
            return int(row["n"]) if row else 0

        # each write calls progress_jobs twice (both tables), in one statement
        wait_until(lambda: calls() == 2 * len(writes), timeout=15, what="function calls")
