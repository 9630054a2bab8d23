"""The real `ai-jobs worker` in subprocesses: NOTIFY-only dispatch, many workers,
SIGKILL, SIGTERM, nudges and garbage, schema refusal."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections import Counter

import pytest
from psycopg.conninfo import make_conninfo

from tests.helpers import AI_JOBS, connect, env, insert_course, job, wait_until
from tests.workers import WorkerProcess

# Worker processes started one after another on a machine that may be busy.
pytestmark = pytest.mark.timeout(120)


def _status(db_url: str, jid: str) -> str:
    with connect(db_url) as c:
        return str(job(c, jid)["status"])


def test_insert_is_processed_by_notify_alone(db_url: str) -> None:
    # trust auth ignores the password; the worker must still never print it
    secret_url = make_conninfo(db_url, password="pw-hunter2-secret")
    w = WorkerProcess(secret_url, SWEEP_INTERVAL_SECONDS=3600).started()
    try:
        w.wait_for("worker_started")
        with connect(db_url) as c:
            c.execute("select 1")  # the start-up sweep found nothing; only NOTIFY remains
            jid = insert_course(c, "Photosynthesis")
        wait_until(lambda: _status(db_url, jid) == "done", timeout=10, what="done")
        with connect(db_url) as c:
            row = job(c, jid)
        assert row["result_path"] == "courses/photosynthesis/course.json"
        assert row["started_at"] - row["created_at"] < __import__("datetime").timedelta(seconds=2)
        started = w.wait_for("job_started", lambda e: e["job_id"] == jid)
        assert started["table"] == "ai_course_jobs" and started["attempt"] == 1
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert w.actions("worker_stopped")
    lines = w.log().splitlines()
    assert lines and all(
        json.loads(line)["record"]["message"] for line in lines
    )  # JSON, one a line
    assert "pw-hunter2-secret" not in w.log()


def test_four_workers_two_thousand_jobs_each_runs_exactly_once(db_url: str) -> None:
    workers = [WorkerProcess(db_url, WORKER_CONCURRENCY=5) for _ in range(4)]
    try:
        for w in workers:
            w.started()
        with connect(db_url) as c:
            c.execute(
                "insert into ai_course_jobs (subject) select 'Topic ' || g"
                " from generate_series(1, 2000) g"
            )
        wait_until(
            lambda: _count(db_url, "done") == 2000, timeout=90, interval=0.2, what="2000 done"
        )
    finally:
        for w in workers:
            w.signal(signal.SIGTERM)
        codes = [w.wait() for w in workers]
    assert codes == [0, 0, 0, 0]
    runs = Counter(e["job_id"] for w in workers for e in w.actions("job_started"))
    assert len(runs) == 2000 and set(runs.values()) == {1}, runs.most_common(3)
    per_worker = [len(w.actions("job_started")) for w in workers]
    assert sum(per_worker) == 2000
    with connect(db_url) as c:
        row = c.execute(
            "select count(*) filter (where retry_count > 0) as retried,"
            " count(distinct worker_id) as workers from ai_course_jobs"
        ).fetchone()
    assert row["retried"] == 0 and row["workers"] >= 2


def _count(db_url: str, status: str) -> int:
    with connect(db_url) as c:
        row = c.execute(
            "select count(*) from ai_course_jobs where status = %s", [status]
        ).fetchone()
        return int(row["count"])


def test_sigkill_mid_job_another_worker_finishes_it(db_url: str) -> None:
    fast = {
        "HEARTBEAT_INTERVAL_SECONDS": "0.3",
        "STALE_AFTER_SECONDS": "2",
        "SWEEP_INTERVAL_SECONDS": "0.5",
    }
    a = WorkerProcess(db_url, PLACEHOLDER_DELAY_MS=60_000, **fast).started()
    with connect(db_url) as c:
        jid = insert_course(c, "Killer topic")
    a.wait_for("job_started", lambda e: e["job_id"] == jid)
    a.signal(signal.SIGKILL)
    assert a.wait() == -signal.SIGKILL
    assert _status(db_url, jid) == "processing"
    b = WorkerProcess(db_url, PLACEHOLDER_DELAY_MS=0, **fast).started()
    try:
        wait_until(lambda: _status(db_url, jid) == "done", timeout=20, what="rescued and done")
    finally:
        b.signal(signal.SIGTERM)
        assert b.wait() == 0
    with connect(db_url) as c:
        row = job(c, jid)
    assert row["retry_count"] == 1  # the lost attempt counts
    assert row["worker_id"].split(":")[1] == str(b.pid)
    assert b.actions("sweep")


def test_sigterm_long_grace_finishes_the_job(db_url: str) -> None:
    w = WorkerProcess(db_url, PLACEHOLDER_DELAY_MS=1500, SHUTDOWN_GRACE_SECONDS=20).started()
    with connect(db_url) as c:
        jid = insert_course(c)
    w.wait_for("job_started", lambda e: e["job_id"] == jid)
    w.signal(signal.SIGTERM)
    assert w.wait() == 0
    with connect(db_url) as c:
        row = job(c, jid)
    assert row["status"] == "done" and row["retry_count"] == 0


def test_sigterm_short_grace_releases_without_counting(db_url: str) -> None:
    w = WorkerProcess(db_url, PLACEHOLDER_DELAY_MS=60_000, SHUTDOWN_GRACE_SECONDS=0.5).started()
    with connect(db_url) as c:
        jid = insert_course(c)
        other = insert_course(
            c,
            "queued behind",
            run_after=c.execute("select now() + interval '1 hour' as t").fetchone()["t"],
        )
    w.wait_for("job_started", lambda e: e["job_id"] == jid)
    w.signal(signal.SIGTERM)
    assert w.wait(timeout=15) == 0
    with connect(db_url) as c:
        row = job(c, jid)
        assert job(c, other)["status"] == "pending"
    assert (row["status"], row["retry_count"], row["claim_token"]) == ("pending", 0, None)
    assert w.actions("jobs_released")


def test_nudges_and_garbage_payloads(db_url: str) -> None:
    w = WorkerProcess(db_url).started()
    try:
        with connect(db_url) as c:
            # With the insert trigger off, inserts send no notification at all.
            c.execute("alter table ai_course_jobs disable trigger ai_course_jobs_notify_insert")
            a = insert_course(c, "silent one")
            for payload in ("garbage", '{"table": "users", "id": 1}', "[]", "{"):
                c.execute("select pg_notify('ai_jobs', %s)", [payload])
            c.execute("notify ai_jobs")  # empty payload: sweep now
        wait_until(lambda: _status(db_url, a) == "done", timeout=10, what="swept by nudge")
        assert len(w.actions("bad_payload")) == 4

        with connect(db_url) as c:
            b = insert_course(c, "second silent one")
            d = insert_course(c, "third silent one")
            c.execute(f"notify ai_jobs, '{b}'")
        wait_until(lambda: _status(db_url, b) == "done", timeout=10, what="job nudge")
        wait_until(lambda: _status(db_url, d) == "done", timeout=10, what="queue drained")
        with connect(db_url) as c:
            e = insert_course(c, "json nudge")
            payload = json.dumps({"table": "ai_course_jobs", "id": e})
            c.execute("select pg_notify('ai_jobs', %s)", [payload])
        wait_until(lambda: _status(db_url, e) == "done", timeout=10, what="json nudge")
        assert w.proc.poll() is None
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0


def test_worker_refuses_an_unmigrated_database(empty_db_url: str) -> None:
    p = subprocess.run(
        [*AI_JOBS, "worker"],
        env=env(empty_db_url, ALLOW_PLACEHOLDER=1),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("ai-jobs: error:")
    assert "run `ai-jobs migrate`" in p.stderr and "Traceback" not in p.stderr


def test_run_once_prints_the_runbook_json(db_url: str) -> None:
    def run_once(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*AI_JOBS, "run-once", *args],
            env=env(db_url, ALLOW_PLACEHOLDER=1),
            capture_output=True,
            text=True,
            timeout=60,
        )

    p = run_once()
    assert p.returncode == 0 and json.loads(p.stdout) == {
        "processed": False,
        "message": "No pending jobs",
    }
    with connect(db_url) as c:
        jid = insert_course(c, "Algebra Basics")
    p = run_once("--type", "course")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["processed"] is True and out["jobId"] == jid
    assert out["courseId"] == "algebra-basics"
    assert out["resultPath"] == "courses/algebra-basics/course.json"
    assert {"totalDurationMs", "generationDurationMs"} <= set(out["metrics"])
    assert _status(db_url, jid) == "done"
    assert uuid.UUID(out["jobId"])


def test_pg_terminate_backend_then_new_inserts_are_processed(db_url: str) -> None:
    w = WorkerProcess(db_url).started()
    try:
        with connect(db_url) as c:
            first = insert_course(c, "before")
            wait_until(lambda: _status(db_url, first) == "done", what="first done")
            killed = c.execute(
                "select count(pg_terminate_backend(pid)) as n from pg_stat_activity"
                " where datname = current_database() and application_name like 'ai-jobs%%'"
            ).fetchone()["n"]
            assert killed >= 2  # the LISTEN connection and the pool
        w.wait_for("listener_unhealthy")
        w.wait_for("listener_healthy", timeout=20)
        with connect(db_url) as c:
            after = insert_course(c, "after")
        wait_until(lambda: _status(db_url, after) == "done", timeout=20, what="after done")
        assert w.proc.poll() is None
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
