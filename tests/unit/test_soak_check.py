"""The soak's checker (bench/soak/check.py) on planted violations: it must name
the job that breaks each rule, and find nothing in a clean run."""

from __future__ import annotations

import json
from pathlib import Path

from bench.soak.check import PER_ATTEMPT, Attempt, Job, Run, attempts_from_log, check

W1, W2 = "h1:10:a", "h2:20:b"


def clean() -> Run:
    """Two done jobs (a course and an image), each finished by one attempt."""
    course = Job(
        "c1", "ai_course_jobs", "done", "soak-1", started_at=100.0, completed_at=103.0,
        worker_id=W1, result_path="courses/soak-1/course.json", digest="aa", course_id="soak-1",
    )  # fmt: skip
    image = Job(
        "m1", "ai_media_jobs", "done", "soak-2", started_at=100.0, completed_at=101.0,
        worker_id=W2, result_path="media/m1.png", digest="bb",
    )  # fmt: skip
    return Run(
        jobs={"c1": course, "m1": image},
        inserts={"c1": 99.0, "m1": 99.5},
        attempts=[
            Attempt("c1", "h1.jsonl", W1, 100.01, 102.9, "job_done", done=True),
            Attempt("m1", "h2.jsonl", W2, 100.01, 100.9, "job_done", done=True),
        ],
        files={"courses/soak-1/course.json": "aa", "media/m1.png": "bb"},
        catalog={"soak-1": "c1"},
        calls={"soak-1": 1, "soak-2": 1},
        drained_at=200.0,
    )


def rules(run: Run) -> list[tuple[str, str | None]]:
    return [(v.rule, v.job) for v in check(run).violations]


def test_a_clean_run_has_no_violation() -> None:
    assert rules(clean()) == []


def test_a_lost_job_is_named() -> None:
    run = clean()
    run.inserts["gone"] = 150.0
    assert rules(run) == [("lost", "gone")]


def test_two_attempts_that_both_wrote_at_once_overlap() -> None:
    run = clean()
    # Attempt 1 failed (written) while the winning attempt 2 was already running.
    run.jobs["c1"].started_at = 101.0
    run.attempts.insert(0, Attempt("c1", "h2.jsonl", W2, 100.5, 101.5, "job_failed", wrote=True))
    run.attempts[1].start = 101.01
    assert rules(run) == [("overlap", "c1")]


def test_a_fenced_zombie_may_overlap_and_is_counted() -> None:
    run = clean()
    # Frozen from 99 s to 104 s, its job rescued meanwhile; woken up, its writes
    # were refused (job_lost).
    run.attempts.append(
        Attempt("c1", "h2.jsonl", W2, 99.0, 104.0, "job_done", done=True, lost=True)
    )
    verdict = check(run)
    assert verdict.violations == [] and verdict.zombies == 1


def test_a_file_written_by_a_losing_attempt_is_named() -> None:
    run = clean()
    run.files["courses/soak-1/course.json"] = "zz"  # a zombie's bytes replaced the winner's
    assert rules(run) == [("result", "c1")]
    run.files.pop("courses/soak-1/course.json")
    assert rules(run) == [("result", "c1")]


def test_a_done_row_without_its_winning_attempt_is_named() -> None:
    run = clean()
    run.jobs["m1"].worker_id = W1  # the row names a worker that never finished it
    assert rules(run) == [("winner", "m1")]


def test_jobs_left_running_or_due_are_unfinished() -> None:
    run = clean()
    run.jobs["p"] = Job("p", "ai_media_jobs", "processing", "soak-3")
    run.jobs["due"] = Job("due", "ai_media_jobs", "pending", "soak-4", run_after=150.0)
    run.jobs["later"] = Job("later", "ai_media_jobs", "failed", "soak-5", run_after=300.0)
    assert rules(run) == [("unfinished", "due"), ("unfinished", "p")]


def test_provider_calls_beyond_the_retry_budget() -> None:
    run = clean()
    run.calls["soak-2"] = PER_ATTEMPT + 1  # one attempt, more calls than it may make
    run.jobs["c1"].retry_count = 4
    assert sorted(rules(run)) == [("budget", "c1"), ("budget", "m1")]


def test_a_done_course_missing_from_the_catalog() -> None:
    run = clean()
    run.catalog = {}
    assert rules(run) == [("catalog", "c1")]


def test_attempts_read_from_a_worker_log(tmp_path: Path) -> None:
    """loguru's JSON lines, as `ai-jobs worker` writes them with LOG_FORMAT=json."""

    def line(ts: float, **extra: object) -> str:
        return json.dumps({"text": "", "record": {"time": {"timestamp": ts}, "extra": extra}})

    log = tmp_path / "h1-w0.jsonl"
    log.write_text(
        "\n".join(
            [
                line(1.0, action="worker_started", worker=W1),
                line(2.0, action="job_started", job_id="a", attempt=1),
                line(3.0, action="job_started", job_id="b", attempt=1),
                line(4.0, action="job_done", job_id="a"),
                line(5.0, action="job_lost", job_id="a"),  # its completion refused
                line(6.0, action="job_failed", job_id="b"),
                line(7.0, action="job_started", job_id="c", attempt=2),
                "not json",
            ]
        )
    )
    worker, attempts = attempts_from_log(log, ended=9.0, killed=True)
    assert worker == W1
    a, b, c = attempts
    assert (a.start, a.end, a.done, a.lost) == (2.0, 4.0, True, True)
    assert (b.end, b.wrote, b.lost) == (6.0, True, False)
    assert (c.end, c.ended_by, c.wrote) == (9.0, "killed", False)
