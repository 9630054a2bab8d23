"""Failover under running workers: a primary and a synchronous streaming standby
of the test's own (tests/replication.py), three `ai-jobs worker` processes on a
two-host DATABASE_URL with target_session_attrs=read-write, jobs inserted the
whole time. The primary is killed (an immediate stop, as a crash) and the standby
promoted: every worker finds the new primary by itself and finishes jobs again
within seconds, no job acknowledged before the crash is lost, and no job ran in
two places at once."""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from listener.migrate import migrate
from tests.helpers import connect, wait_until
from tests.replication import Node
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(120)
WORKERS = 3
RESUME_WITHIN = 10.0  # seconds from the promotion to each worker's next finished job


@pytest.fixture
def pair() -> Iterator[tuple[Node, Node]]:
    primary = Node()
    standby: Node | None = None
    try:
        primary.start()
        primary.wait_ready()
        asyncio.run(migrate(primary.url))
        standby = primary.standby()
        standby.start()
        wait_until(primary.streaming, timeout=20, what="the standby streaming")
        primary.require_sync()
        yield primary, standby
    finally:
        primary.destroy()
        if standby is not None:
            standby.destroy()


class Inserter(threading.Thread):
    """Inserts a course job every `every` seconds through the two-host URL, and
    keeps the ids whose commit it saw acknowledged (with their time)."""

    def __init__(self, url: str, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.url, self.every = url, every
        self.acked: dict[str, float] = {}
        self.refused = 0
        self.stop = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        n = 0
        while not self.stop.wait(self.every):
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.url, autocommit=True, connect_timeout=2)
                row = conn.execute(
                    "insert into ai_course_jobs (subject, course_id) values (%s, %s) returning id",
                    [f"Failover {n}", f"failover-{n}"],
                ).fetchone()
                assert row is not None
                self.acked[str(row[0])] = time.time()
                n += 1
            except psycopg.Error:
                self.refused += 1
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()


def _jobs(url: str) -> dict[str, dict[str, Any]]:
    with connect(url) as c:
        rows = c.execute("select id::text, status, retry_count, metrics from ai_course_jobs")
        return {r["id"]: r for r in rows.fetchall()}


def _overlaps(workers: list[WorkerProcess]) -> list[str]:
    """Jobs with two attempts whose runs overlap in time, from the workers' logs:
    an attempt runs from its job_started to its next event in the same process."""
    runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    ends = {"job_done", "job_failed", "job_dead_letter", "job_lost", "job_cancelled"}
    for w in workers:
        open_: dict[str, float] = {}
        for e in w.events():
            jid = e.get("job_id")
            if jid is None:
                continue
            if e.get("action") == "job_started":
                open_[jid] = e["ts"]
            elif e.get("action") in ends and jid in open_:
                runs[jid].append((open_.pop(jid), e["ts"]))
        for jid, start in open_.items():
            runs[jid].append((start, float("inf")))
    bad = []
    for jid, spans in runs.items():
        spans.sort()
        if any(b[0] < a[1] for a, b in itertools.pairwise(spans)):
            bad.append(jid)
    return bad


def test_failover_to_the_standby_under_running_workers(pair: tuple[Node, Node]) -> None:
    primary, standby = pair
    url = (
        f"postgresql://postgres@{primary.host}:{primary.port},{standby.host}:{standby.port}"
        "/postgres?target_session_attrs=read-write&connect_timeout=2"
    )
    workers = [
        WorkerProcess(url, PLACEHOLDER_DELAY_MS=150, WORKER_CONCURRENCY=2).started()
        for _ in range(WORKERS)
    ]
    inserter = Inserter(url)
    try:
        inserter.start()
        # Every worker has finished jobs on the first primary.
        for w in workers:
            w.wait_for("job_done", timeout=20)
        before = {j for j, r in _jobs(primary.url).items() if r["status"] == "done"}
        acked_before = set(inserter.acked)
        assert before and acked_before

        primary.stop("immediate")  # the primary dies, as in a crash
        crashed = time.time()
        for w in workers:  # each one has seen it die before the standby takes over
            w.wait_for("listener_unhealthy", lambda e: e["ts"] > crashed - 1, timeout=20)
        standby.promote()
        promoted = time.time()

        # Each worker finishes a job again, by itself, within seconds.
        resumed = {}
        for w in workers:
            done = w.wait_for("job_done", lambda e: e["ts"] > promoted, timeout=RESUME_WITHIN + 5)
            resumed[w.pid] = done["ts"] - promoted
        assert max(resumed.values()) < RESUME_WITHIN, resumed
        wait_until(
            lambda: sum(t > promoted for t in list(inserter.acked.values())) >= 20,
            what="inserts on the new primary",
        )
        inserter.stop.set()
        inserter.join(10)
        assert inserter.refused > 0  # the inserts did meet the failover

        def all_done() -> bool:
            jobs = _jobs(standby.url)
            return all(jobs.get(j, {}).get("status") == "done" for j in inserter.acked)

        wait_until(all_done, timeout=30, what="every acknowledged job done")
        jobs = _jobs(standby.url)
        # Nothing acknowledged before the crash is lost: neither the inserts nor
        # the finished jobs (a synchronous standby had each commit).
        assert acked_before <= set(jobs)
        assert all(jobs[j]["status"] == "done" for j in before)
        assert all(r["retry_count"] == 0 for r in jobs.values())  # nothing went stale
        assert all(w.proc.poll() is None for w in workers)  # the same processes
        assert _overlaps(workers) == []
        print(
            f"failover: {len(jobs)} jobs, resumed after {sorted(resumed.values())} s "
            f"(crash to promotion {promoted - crashed:.2f} s)"
        )
    finally:
        inserter.stop.set()
        for w in workers:
            if w.proc.poll() is None:
                w.signal(signal.SIGTERM)
        codes = [w.wait() for w in workers]
    assert codes == [0] * WORKERS
