"""Outages under a running worker: a PostgreSQL server of the test's own, stopped
and restarted (never the shared server), and every backend terminated. Jobs
inserted during and right after an outage start within 2 s of PostgreSQL
accepting connections again, with the sweep an hour away: only the catch-up
after the listener's reconnect can explain that."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from listener.migrate import migrate
from tests.faultproxy import FaultProxy
from tests.helpers import connect, insert_course, job, wait_until
from tests.pgserver import Cluster, with_dbname
from tests.workers import WorkerProcess

# A throwaway cluster a test (initdb), worker starts and restarts.
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.start()
        c.wait_ready()
        asyncio.run(migrate(c.url))
        yield c
    finally:
        c.destroy()


def _status(url: str, jid: str) -> str:
    with connect(url) as c:
        return str(job(c, jid)["status"])


def test_postgres_restart_under_a_running_worker(cluster: Cluster) -> None:
    w = WorkerProcess(cluster.url).started()
    try:
        with connect(cluster.url) as c:
            before = insert_course(c, "before the restart")
        wait_until(lambda: _status(cluster.url, before) == "done", what="before done")
        cluster.stop("fast")
        w.wait_for("listener_unhealthy")
        cluster.start()
        w.wait_for("listener_healthy", timeout=30)
        with connect(cluster.url) as c:
            after = insert_course(c, "after the restart")
        wait_until(lambda: _status(cluster.url, after) == "done", timeout=20, what="after done")
        assert w.proc.poll() is None  # the same process
        assert len(w.actions("listener_unhealthy")) == 1  # one transition, not every retry
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0


def test_completion_written_when_the_database_is_back(cluster: Cluster) -> None:
    w = WorkerProcess(cluster.url, PLACEHOLDER_DELAY_MS=1500).started()
    try:
        with connect(cluster.url) as c:
            jid = insert_course(c, "outage")
        w.wait_for("job_started", lambda e: e["job_id"] == jid)
        cluster.stop("immediate")
        w.wait_for("job_done", lambda e: e["job_id"] == jid, timeout=10)  # finished meanwhile
        cluster.start()
        cluster.wait_ready()
        wait_until(lambda: _status(cluster.url, jid) == "done", timeout=30, what="written")
        with connect(cluster.url) as c:
            assert job(c, jid)["retry_count"] == 0
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0


def test_worker_started_while_the_database_is_down_exits_and_says_why(cluster: Cluster) -> None:
    """At start, a database that cannot be reached is a configuration error: exit
    1 with the cause (a platform restarts the process, and its log says why),
    not a wait without a word. Started again once the database is up, it works."""
    cluster.stop("fast")
    w = WorkerProcess(cluster.url)
    assert w.wait(timeout=20) == 1
    (line,) = [x for x in w.log().splitlines() if x.startswith("ai-jobs: error: ")]
    assert f"cannot connect to 127.0.0.1:{cluster.port}/postgres" in line, line
    assert "Connection refused" in line, line
    cluster.start()
    w = WorkerProcess(cluster.url).started()  # as the platform restarts it
    try:
        with connect(cluster.url) as c:
            jid = insert_course(c, "after the database came up")
        wait_until(lambda: _status(cluster.url, jid) == "done", timeout=20, what="done")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0


def _allow_connections(db_url: str, allow: bool) -> None:
    """Let this test's database accept connections, or refuse them (as a
    database being renamed or restored does), from the server's own database."""
    name = conninfo_to_dict(db_url)["dbname"]
    with connect(with_dbname(db_url, "postgres")) as c:
        c.execute(f'alter database "{name}" with allow_connections {str(allow).lower()}')


def test_a_running_worker_logs_each_new_cause_of_an_outage(db_url: str, proxy: FaultProxy) -> None:
    """Once the worker has run, an outage is waited out, with its cause told at
    every change: first the connections dropped and refused (the proxy), then
    the database refusing them (another cause, one more line), never a line per
    retry, and never the pool's "could not open a connection" without a cause."""
    w = WorkerProcess(proxy.url(db_url), SWEEP_INTERVAL_SECONDS=3600).started()
    refusing = "is not currently accepting connections"
    try:
        proxy.refusing = True
        proxy.drop()
        w.wait_for("listener_unhealthy")
        w.wait_for("database_unhealthy")
        _allow_connections(db_url, False)
        proxy.refusing = False  # the connections reach the database, which refuses them
        for what in ("listener", "database"):
            w.wait_for(f"{what}_still_unhealthy", lambda e: refusing in e["message"], timeout=30)
        tried = proxy.accepted
        wait_until(lambda: proxy.accepted >= tried + 5, what="five more connection attempts")
        _allow_connections(db_url, True)
        w.wait_for("listener_healthy", timeout=20)
        with connect(db_url) as c:
            jid = insert_course(c, "after the outage")
        wait_until(lambda: _status(db_url, jid) == "done", timeout=20, what="done")
    finally:
        _allow_connections(db_url, True)
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    for what in ("listener", "database"):
        told = [e["message"] for e in w.actions(f"{what}_still_unhealthy")]
        assert sum(refusing in m for m in told) == 1, told  # the new cause once, not per retry
        assert len(w.actions(f"{what}_unhealthy")) == 1
    messages = [e["message"] for e in w.events() if e.get("action", "").endswith("unhealthy")]
    assert not [m for m in messages if "could not open a connection" in m], messages


TARGET = timedelta(seconds=2)


def _now(url: str) -> datetime:
    with connect(url) as c:
        return c.execute("select clock_timestamp() as t").fetchone()["t"]  # type: ignore[index,no-any-return]


def _rows(url: str, ids: list[str]) -> list[dict[str, Any]]:
    with connect(url) as c:
        return [job(c, j) for j in ids]


def _all_done(url: str, ids: list[str]) -> bool:
    return all(r["status"] == "done" for r in _rows(url, ids))


def _assert_started_in_time(url: str, ids: list[str], back: datetime, w: WorkerProcess) -> None:
    """Each job started within TARGET of the later of the database being back and
    its insert; each ran once, in this worker process, which never exited."""
    wait_until(lambda: _all_done(url, ids), timeout=20, what="every job done")
    for row in _rows(url, ids):
        since = max(back, row["created_at"])
        assert row["started_at"] - since < TARGET, (row["subject"], row["started_at"] - since)
        assert row["retry_count"] == 0
    starts = Counter(e["job_id"] for e in w.actions("job_started"))
    assert all(starts[j] == 1 for j in ids), starts  # nothing ran twice
    assert w.proc.poll() is None


def test_jobs_of_a_restart_start_within_two_seconds_of_the_database(cluster: Cluster) -> None:
    # Through a proxy that keeps refusing the worker after the restart until the
    # test has inserted a job: that job surely arrived while nobody listened.
    proxy = FaultProxy(cluster.url).start()
    w = WorkerProcess(proxy.url(cluster.url), SWEEP_INTERVAL_SECONDS=3600).started()
    try:
        with connect(cluster.url) as c:  # the pool has connections to lose
            warm = insert_course(c, "before")
        wait_until(lambda: _all_done(cluster.url, [warm]), what="warm-up job done")
        proxy.refusing = True
        cluster.stop("fast")
        w.wait_for("listener_unhealthy")
        cluster.start()
        with connect(cluster.url) as c:
            during = insert_course(c, "while the listener reconnects")
        back = _now(cluster.url)
        proxy.refusing = False  # the database accepts the worker's connections again
        # Alone: a later job's notification would make the worker claim it too.
        _assert_started_in_time(cluster.url, [during], back, w)
        w.wait_for("listener_healthy", timeout=10)
        with connect(cluster.url) as c:
            after = insert_course(c, "right after the reconnect")
        _assert_started_in_time(cluster.url, [after], back, w)
        assert len(w.actions("listener_unhealthy")) == 1
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
        proxy.stop()


def test_jobs_of_terminated_backends_start_within_two_seconds(db_url: str) -> None:
    w = WorkerProcess(db_url, SWEEP_INTERVAL_SECONDS=3600).started()
    try:
        with connect(db_url) as c:
            warm = insert_course(c, "before")
        wait_until(lambda: _all_done(db_url, [warm]), what="warm-up job done")
        for round_ in range(2):  # and once more, on the fresh connections
            with connect(db_url) as c:
                killed = c.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity"
                    " where datname = current_database() and pid <> pg_backend_pid()"
                ).fetchall()
                back = _now(db_url)
                during = insert_course(c, f"during the outage {round_}")  # nobody listens
            assert len(killed) >= 2  # the LISTEN connection and the pool's
            # Alone: a later job's notification would make the worker claim it too.
            _assert_started_in_time(db_url, [during], back, w)
            w.wait_for("listener_healthy", partial(_nth_event, w, "listener_healthy", round_))
            with connect(db_url) as c:
                after = insert_course(c, f"right after {round_}")
            _assert_started_in_time(db_url, [after], back, w)
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0


def _nth(w: WorkerProcess, action: str, n: int) -> bool:
    return len(w.actions(action)) > n


def _nth_event(w: WorkerProcess, action: str, n: int, event: dict[str, Any]) -> bool:
    return _nth(w, action, n)
