"""A PostgreSQL server of the test's own, stopped and restarted under a running
worker (never the shared server)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import pytest

from listener.migrate import migrate
from tests.helpers import connect, insert_course, job, wait_until
from tests.pgserver import Cluster
from tests.workers import WorkerProcess


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


def test_worker_started_while_the_database_is_down_waits_for_it(cluster: Cluster) -> None:
    cluster.stop("fast")
    w = WorkerProcess(cluster.url)
    try:
        w.wait_for("database_unhealthy", timeout=20)
        cluster.start()
        w.wait_for("worker_started", timeout=30)
        with connect(cluster.url) as c:
            jid = insert_course(c, "after the database came up")
        wait_until(lambda: _status(cluster.url, jid) == "done", timeout=20, what="done")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
