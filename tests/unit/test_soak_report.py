"""The soak report's throughput outside faults (bench/soak/report.py): a fault's
window, and the same window stretched until the backlog it left is done."""

from __future__ import annotations

import json
from pathlib import Path

from bench.soak.check import Job, Verdict
from bench.soak.report import BUCKET, WARMUP, summarize

START = 1000.0


def _done(jid: str, at: float) -> Job:
    return Job(jid, "ai_course_jobs", "done", jid, started_at=at - 0.5, completed_at=at)


def test_the_backlog_a_fault_left_is_out_of_the_settled_figure(tmp_path: Path) -> None:
    (tmp_path / "processes.jsonl").write_text("")
    (tmp_path / "logs").mkdir()
    jobs: dict[str, Job] = {}
    inserts: dict[str, float] = {}
    t0 = START + WARMUP  # after the warm-up: one job done a second, as offered
    for i in range(60):
        jid = f"steady-{i}"
        inserts[jid] = t0 + i - 0.9
        jobs[jid] = _done(jid, t0 + i + 0.1)
    # A fault over [t0 + 10, t0 + 20): nothing done; what came meanwhile (10
    # jobs) is done in the 5 s after the heal, with the offered load.
    for i in range(10, 20):
        jobs[f"steady-{i}"] = _done(f"steady-{i}", t0 + 20 + (i - 10) * 0.5 + 0.1)
    faults = [{"kind": "restart_db", "target": "db", "start": t0 + 10, "healed": t0 + 20}]
    end = t0 + 60
    s = summarize(tmp_path, jobs, faults, Verdict(), START, end, inserts)
    per_min = 60 / BUCKET
    # Outside the fault's window the drain of its backlog counts: above the load.
    assert s.outside_per_min > 60 * 1.05
    # With the window stretched to the backlog's last completion: the load.
    assert abs(s.settled_per_min - 60) <= per_min * 0.5
    # Without the inserts' times, no settled figure.
    bare = summarize(tmp_path, jobs, faults, Verdict(), START, end)
    assert bare.settled_per_min != bare.settled_per_min  # NaN


def _worker(folder: Path, log: str, host: str, worker: str) -> None:
    """A worker process of the run: its line in processes.jsonl and its log's start."""
    with open(folder / "processes.jsonl", "a") as f:
        f.write(json.dumps({"event": "start", "log": log, "host": host, "t": START}) + "\n")
    record = {"extra": {"action": "worker_started", "worker": worker}, "time": {"timestamp": START}}
    (folder / "logs" / log).write_text(json.dumps({"record": record}) + "\n")


def test_a_recovery_the_next_fault_on_the_same_workers_cut_short_is_a_lower_bound(
    tmp_path: Path,
) -> None:
    (tmp_path / "logs").mkdir()
    _worker(tmp_path, "h1-w0.jsonl", "h1", "w-h1")
    _worker(tmp_path, "h2-w0.jsonl", "h2", "w-h2")
    t = START + 100
    jobs = {
        "a": Job(
            "a",
            "ai_course_jobs",
            "done",
            "a",
            worker_id="w-h1",
            started_at=t + 5,
            completed_at=t + 6,
        ),
        "b": Job(
            "b",
            "ai_course_jobs",
            "done",
            "b",
            worker_id="w-h2",
            started_at=t + 13,
            completed_at=t + 14,
        ),
    }
    faults = [
        {"kind": "cut_link", "target": "h2", "start": t - 5, "healed": t},
        {"kind": "cut_link", "target": "h1", "start": t + 2, "healed": t + 4},  # not h2's
        {"kind": "cut_link", "target": "h2", "start": t + 6, "healed": t + 10},
    ]
    s = summarize(tmp_path, jobs, faults, Verdict(), START, t + 60)
    # h2's first recovery ran into h2's next cut (6 s later): 6 s at least, not 13.
    assert s.recovery["cut_link"] == [6.0, 1.0, 3.0]
    assert s.interrupted["cut_link"] == [True, False, False]
    # A worker of h2 killed before h2's workers claimed anything cuts it short too;
    # a database restart cuts every recovery short.
    killed = {
        "kind": "kill_worker",
        "target": "h2-w0.jsonl",
        "new": "h2-w0.jsonl",
        "start": t + 3,
        "healed": t + 5,
    }
    s = summarize(tmp_path, jobs, [faults[0], killed], Verdict(), START, t + 60)
    assert s.recovery["cut_link"] == [3.0] and s.interrupted["cut_link"] == [True]
    restart = {"kind": "restart_db", "target": "pg1", "start": t + 4, "healed": t + 5}
    s = summarize(tmp_path, jobs, [faults[0], restart], Verdict(), START, t + 60)
    assert s.recovery["cut_link"] == [4.0] and s.interrupted["cut_link"] == [True]
    # Claimed before the next fault: measured as it was.
    s = summarize(tmp_path, jobs, [faults[1], faults[2]], Verdict(), START, t + 60)
    assert s.interrupted["cut_link"] == [False, False]
