"""The real `ai-jobs worker` draining a queue of course jobs (placeholder provider,
local storage): the catalog is rendered while the drain goes on, and a worker
killed mid-drain leaves no job done without its catalog row."""

from __future__ import annotations

import json
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import connect, wait_until
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(120)
JOBS = 1500


def _queue(db_url: str, n: int) -> None:
    with connect(db_url) as c:
        c.execute(
            "insert into ai_course_jobs (subject) "
            "select 'Load ' || g from generate_series(1, %s) g",
            [n],
        )


def _counts(db_url: str) -> dict[str, int]:
    with connect(db_url) as c:
        rows = c.execute("select status, count(*) as n from ai_course_jobs group by status")
        return {r["status"]: int(r["n"]) for r in rows}


def _listed(storage: Path) -> int | None:
    try:
        return int(json.loads((storage / "courses/catalog.json").read_bytes())["count"])
    except (OSError, ValueError):
        return None


def _drain_env(storage: Path, **extra: Any) -> dict[str, Any]:
    return {
        "STORAGE_URL": storage,
        "WORKER_CONCURRENCY": "10",
        "PLACEHOLDER_DELAY_MS": "5",
        "CATALOG_BATCH_JOBS": "10",
        "LOG_LEVEL": "INFO",
        **extra,
    }


def test_the_catalog_is_rendered_while_the_drain_goes_on(db_url: str) -> None:
    storage = Path(tempfile.mkdtemp())
    w = WorkerProcess(db_url, **_drain_env(storage, CATALOG_BATCH_SECONDS="1")).started()
    seen: list[tuple[int, int]] = []  # (courses listed, jobs left) while jobs are left
    try:
        _queue(db_url, JOBS)

        def rendered_mid_drain() -> bool:
            listed = _listed(storage)
            counts = _counts(db_url)
            left = counts.get("pending", 0) + counts.get("processing", 0)
            if listed is not None and left > 0:
                seen.append((listed, left))
            return len({n for n, _ in seen if n > 0}) >= 2  # two renders, jobs pending

        wait_until(rendered_mid_drain, timeout=60, what="two renders while jobs are pending")
        wait_until(lambda: _counts(db_url).get("done") == JOBS, timeout=60, what="drained")
        # Current within CATALOG_BATCH_SECONDS of the last job, without a stop.
        done_at = time.monotonic()
        wait_until(lambda: _listed(storage) == JOBS, timeout=10, what="every course listed")
        # The batch seconds, the pause after a render (4 times its length) and slack.
        assert time.monotonic() - done_at < 1 + 5
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    assert all(left > 0 for _, left in seen) and len({n for n, _ in seen if n > 0}) >= 2
    warnings = [e for e in w.events() if e["level"] in ("WARNING", "ERROR")]
    assert warnings == []  # a clean run under load says nothing alarming


def test_a_worker_killed_mid_drain_leaves_no_done_job_out_of_the_catalog(db_url: str) -> None:
    storage = Path(tempfile.mkdtemp())
    w = WorkerProcess(db_url, **_drain_env(storage)).started()
    try:
        _queue(db_url, JOBS)
        wait_until(lambda: _counts(db_url).get("done", 0) >= 200, timeout=60, what="200 done")
        w.signal(signal.SIGKILL)
        assert w.wait() == -signal.SIGKILL
    finally:
        w.stop()
    counts = _counts(db_url)
    assert counts.get("done", 0) < JOBS  # killed mid-drain
    with connect(db_url) as c:
        row = c.execute(
            "select count(*) filter (where c.job_id is null) as missing, count(*) as done "
            "from ai_course_jobs j left join ai_course_catalog c on c.job_id = j.id "
            "where j.status = 'done'"
        ).fetchone()
    assert row is not None and row["done"] >= 200
    assert row["missing"] == 0  # every job done has its row in the database
