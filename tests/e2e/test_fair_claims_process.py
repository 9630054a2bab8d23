"""The per-user cap with the real `ai-jobs worker`: a capped user's notified job
waits pending while another user's runs, and starts when the user's running job
ends (the worker's own look at that end), the cap set from SQL while the worker
runs."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from tests.helpers import connect, insert_course, job, wait_until
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(90)

A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"


def _rows(db_url: str, *ids: str) -> list[dict[str, Any]]:
    with connect(db_url) as c:
        return [job(c, i) for i in ids]


def test_a_capped_users_job_starts_when_their_running_job_ends(db_url: str) -> None:
    with connect(db_url) as c:
        c.execute("update ai_job_settings set rate_limit_per_hour = 1000")
    # 3 s a job: B's job, inserted once A's first runs, starts before it ends
    # even on a busy machine.
    w = WorkerProcess(db_url, WORKER_CONCURRENCY=4, PLACEHOLDER_DELAY_MS=3000).started()
    try:
        w.wait_for("worker_started")
        with connect(db_url) as c:
            # Set from psql while the worker runs: no restart.
            c.execute("update ai_job_settings set max_running_per_user = 1")
            first = insert_course(c, "First", created_by=A)
        wait_until(lambda: _rows(db_url, first)[0]["status"] == "processing", what="first runs")
        with connect(db_url) as c:
            second = insert_course(c, "Second", created_by=A)  # notified: the fast path's
            other = insert_course(c, "Other", created_by=B)
        # B is not capped: B's job runs beside A's first.
        wait_until(lambda: _rows(db_url, other)[0]["status"] != "pending", what="B's job runs")
        seen_both = False
        # The second is read before the first: the first may end, and the second
        # start, between two reads, but a first still running when it is read was
        # running when the second was read.
        while (rows := _rows(db_url, second, first)[::-1])[0]["status"] == "processing":
            seen_both |= rows[1]["status"] == "processing"
            assert rows[1]["status"] == "pending"
            time.sleep(0.05)
        assert not seen_both
        wait_until(
            lambda: all(r["status"] == "done" for r in _rows(db_url, first, second, other)),
            timeout=20,
            what="all three done",
        )
        f, s, o = _rows(db_url, first, second, other)
        assert s["started_at"] >= f["completed_at"]  # the cap held: one of A's at a time
        assert o["started_at"] < f["completed_at"]  # while B's ran beside it
        assert f["retry_count"] == s["retry_count"] == 0
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    starts = [e["job_id"] for e in w.actions("job_started")]
    assert sorted(starts) == sorted([first, second, other])  # each once
