"""The soak report's throughput outside faults (bench/soak/report.py): a fault's
window, and the same window stretched until the backlog it left is done."""

from __future__ import annotations

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
