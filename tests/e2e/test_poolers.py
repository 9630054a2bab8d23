"""The worker behind a real PgBouncer (tests/pgbouncer.py). In session mode LISTEN
works and jobs start on their notification; in transaction mode notifications
cannot reach the worker, so it refuses to start with one line that names the
fix, unless LISTEN_MODE=poll was chosen: then it polls, and prepared statements
(which a transaction pooler cannot keep) are off."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial

import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.helpers import AI_JOBS, connect, env, insert_course, job, wait_until
from tests.pgbouncer import PgBouncer, ensure_pgbouncer
from tests.workers import WorkerProcess


@pytest.fixture(scope="module")
def pgbouncer_installed() -> None:
    reason = ensure_pgbouncer()
    if reason:
        pytest.skip(reason)


def _bouncer(pg_server: str, mode: str) -> Iterator[PgBouncer]:
    if str(conninfo_to_dict(pg_server).get("host") or "").startswith("/"):
        pytest.skip("PgBouncer runs as another user: it needs the test server on TCP")
    b = PgBouncer(pg_server, mode).start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def session_pooler(pg_server: str, pgbouncer_installed: None) -> Iterator[PgBouncer]:
    yield from _bouncer(pg_server, "session")


@pytest.fixture
def transaction_pooler(pg_server: str, pgbouncer_installed: None) -> Iterator[PgBouncer]:
    yield from _bouncer(pg_server, "transaction")


def _done(url: str, ids: list[str]) -> bool:
    with connect(url) as c:
        return all(job(c, j)["status"] == "done" for j in ids)


def test_session_mode_listens(session_pooler: PgBouncer, db_url: str) -> None:
    w = WorkerProcess(session_pooler.url(db_url)).started()
    try:
        assert "listen" in w.actions("worker_started")[0]["message"]
        for i in range(3):
            with connect(db_url) as c:
                jid = insert_course(c, f"through a session pooler {i}")
            wait_until(partial(_done, db_url, [jid]), timeout=5, what="done")
        with connect(db_url) as c:
            row = job(c, jid)
        assert (row["started_at"] - row["created_at"]).total_seconds() < 1.0  # notified
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0


def test_transaction_mode_is_refused_with_the_fix_named(
    transaction_pooler: PgBouncer, db_url: str
) -> None:
    t0 = time.monotonic()
    p = subprocess.run(
        [*AI_JOBS, "worker"],
        env=env(transaction_pooler.url(db_url), ALLOW_PLACEHOLDER="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - t0
    assert p.returncode == 1
    lines = p.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("ai-jobs: error: LISTEN does not work through DATABASE_URL")
    assert "session-mode" in lines[0] and "LISTEN_MODE=poll" in lines[0]
    assert took < 20


def test_transaction_mode_with_polling_chosen(transaction_pooler: PgBouncer, db_url: str) -> None:
    w = WorkerProcess(transaction_pooler.url(db_url), LISTEN_MODE="poll").started()
    try:
        assert "poll every 1s" in w.actions("worker_started")[0]["message"]
        ids: list[str] = []
        for i in range(4):  # polls enough for psycopg to prepare its statements, were it on
            with connect(db_url) as c:
                batch = [insert_course(c, f"through a transaction pooler {i}.{k}") for k in (1, 2)]
            wait_until(partial(_done, db_url, batch), timeout=10, what="done")
            ids += batch
        starts = Counter(e["job_id"] for e in w.actions("job_started"))
        assert all(starts[j] == 1 for j in ids)
        assert not w.actions("duty_failed") and not w.actions("database_unhealthy")
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
