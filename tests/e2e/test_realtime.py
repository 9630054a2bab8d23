"""Supabase Realtime, the way it reads changes: a cluster of the test's own with
`wal_level = logical` and the `supabase_realtime` publication (as a Supabase
project has it), migrated, then a logical replication consumer (pg_recvlogical
with the built-in test_decoding) reading the job tables' changes while the real
worker streams a course from the fake provider. The consumer sees the job's
progress at the promised cadence (PROGRESS_INTERVAL_SECONDS), the groups in
partial_result, and the end (100, no partial result)."""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from listener.migrate import migrate
from listener.progress import WRITE_PERIOD
from tests.e2e.test_generation_worker import providers_env
from tests.fakeai import FakeAI, Pace
from tests.helpers import connect, insert_course, job, wait_until
from tests.pgserver import Cluster, _pg_bin
from tests.workers import WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
INTERVAL = 0.5
SLOT = "realtime_test"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        with open(c.data / "postgresql.conf", "a") as conf:
            conf.write("wal_level = logical\nmax_replication_slots = 4\nmax_wal_senders = 4\n")
        c.start()
        c.wait_ready()
        with connect(c.url) as conn:
            conn.execute("create publication supabase_realtime")  # as Supabase makes it
        asyncio.run(migrate(c.url))
        yield c
    finally:
        c.destroy()


class Consumer:
    """pg_recvlogical on a test_decoding slot: each change line with the time
    it was read."""

    def __init__(self, url: str) -> None:
        with connect(url) as conn:
            conn.execute("select pg_create_logical_replication_slot(%s, 'test_decoding')", [SLOT])
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            [str(_pg_bin() / "pg_recvlogical"), "-d", url, "--slot", SLOT, "--start", "-f", "-"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def updates(self, job_id: str) -> list[tuple[float, str]]:
        return [
            (t, line)
            for t, line in list(self.lines)
            if line.startswith("table public.ai_course_jobs: UPDATE:")
            and f"id[uuid]:'{job_id}'" in line
        ]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def field(line: str, name: str) -> str | None:
    m = re.search(rf"{name}\[jsonb\]:(null|'((?:[^']|'')*)'|unchanged-toast-datum)", line)
    if m is None:
        return None
    return None if m.group(1) == "null" else (m.group(2) or m.group(1)).replace("''", "'")


def test_the_migration_publishes_both_job_tables(cluster: Cluster) -> None:
    with connect(cluster.url) as c:
        rows = c.execute(
            "select tablename from pg_publication_tables where pubname = 'supabase_realtime'"
            " order by 1"
        ).fetchall()
    assert [r["tablename"] for r in rows] == ["ai_course_jobs", "ai_media_jobs"]


def test_a_logical_consumer_sees_the_progress_at_its_cadence(
    cluster: Cluster, fake: FakeAI
) -> None:
    import json

    fake.pace = Pace(ttft=0.2, tps=600, size=(2400, 2400))  # about 4 s
    consumer = Consumer(cluster.url)
    w = WorkerProcess(
        cluster.url, **providers_env(fake, PROGRESS_INTERVAL_SECONDS=str(INTERVAL))
    ).started()
    try:
        with connect(cluster.url) as c:
            job_id = insert_course(
                c, "Realtime Rivers", params={"groupCount": 4, "itemsPerGroup": 4}
            )
            wait_until(lambda: job(c, job_id)["status"] == "done", timeout=60, what="done")
        wait_until(
            lambda: any("'done'" in line for _, line in consumer.updates(job_id)),
            what="the done change read",
        )
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
        consumer.stop()
    changes = consumer.updates(job_id)
    progress: list[tuple[float, dict[str, Any]]] = []
    groups: list[int] = []
    for t, line in changes:
        raw = field(line, "progress")
        if raw and raw != "unchanged-toast-datum" and "'processing'" in line:
            progress.append((t, json.loads(raw)))
            partial = field(line, "partial_result")
            if partial and partial != "unchanged-toast-datum":
                groups.append(len(json.loads(partial)["groups"]))
    assert len(progress) >= 5, changes
    percents = [p["percent"] for _, p in progress]
    assert percents == sorted(percents) and percents[-1] > percents[0]
    assert groups == sorted(groups) and groups and groups[-1] >= 3
    # the cadence: while tokens flow, a change at least every interval (slack for
    # a loaded machine), and never two within much less than one
    times = [t for t, p in progress if p["phase"] == "generating"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps and max(gaps) <= INTERVAL * 2.5, gaps
    # A write starts every WRITE_PERIOD of the interval: one whose commit a
    # loaded machine delayed is followed by one on time, a shorter gap between
    # the changes seen; per-token writes would be milliseconds apart.
    assert min(gaps) >= INTERVAL * WRITE_PERIOD * 0.3, gaps
    assert statistics.median(gaps) >= INTERVAL * WRITE_PERIOD * 0.8, gaps
    last = changes[-1][1]
    assert "'done'" in last
    assert field(last, "partial_result") is None
    done = field(last, "progress")
    assert done is not None and json.loads(done)["percent"] == 100
