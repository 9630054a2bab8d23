"""The soak's checker: from the database, the storage, the fake providers' request
log and the workers' logs, after the run, prove each rule or name the job that
breaks it.

- lost: every insert the client saw acknowledged is a job in the database.
- unfinished: every job is terminal (`done`, `dead_letter`, `cancelled`) or
  legitimately waiting (`pending` or `failed` with its `run_after` still to come
  when the run drained); never `processing` or `stale` for nobody.
- overlap: no two attempts of a job ran at once where both wrote an end to the
  database. An attempt runs from its `job_started` to its end in the same
  process's log (or the process's death). Only the attempt that held the claim
  can write: the winner of a `done` row, or one whose failure or deferral was
  written (`job_failed`, `job_dead_letter`, `job_deferred` are logged after the
  write). An attempt that overlapped a writer and wrote nothing (a zombie whose
  writes were refused: `job_lost`, or killed) is counted, not a violation.
- winner: every `done` row names an attempt that finished it: one that logged
  `job_done` in the process whose worker id the row holds, started at or after
  the row's claim (`started_at`).
- result: every `done` job's stored file exists and its SHA-256 is the row's
  `metrics.resultSha256` (the completion's own digest: a file written by any
  other attempt differs).
- budget: provider calls per job (the fake's log, by the job's tag) at most
  PER_ATTEMPT per attempt that started (two providers, each with a repair
  round); `retry_count` never above `max_retries`.
- catalog: courses/catalog.json lists every `done` course with its job."""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TERMINAL = {"done", "dead_letter", "cancelled"}
WAITING = {"pending", "failed"}
PER_ATTEMPT = 4  # providers in the chain (2) x (1 + a repair round)
ENDS = {"job_done", "job_failed", "job_dead_letter", "job_deferred", "job_cancelled"}
WROTE = {"job_failed", "job_dead_letter", "job_deferred"}  # logged once written
TAG = re.compile(r"soak-\d+")
CLOCK_SLACK = 0.5  # seconds: a log's time against the database's, same machine


@dataclass
class Job:
    id: str
    table: str
    status: str
    tag: str
    retry_count: int = 0
    max_retries: int = 3
    run_after: float = 0.0
    started_at: float | None = None
    completed_at: float | None = None
    worker_id: str | None = None
    result_path: str | None = None
    digest: str | None = None  # metrics.resultSha256
    course_id: str | None = None


@dataclass
class Attempt:
    job: str
    log: str  # the process's log file: one process
    worker: str | None
    start: float
    end: float = float("inf")
    ended_by: str = ""
    done: bool = False  # logged job_done
    lost: bool = False  # logged job_lost: its writes refused
    wrote: bool = False  # a failure or deferral written


@dataclass
class Run:
    jobs: dict[str, Job]
    inserts: dict[str, float]  # acknowledged inserts: id -> time
    attempts: list[Attempt]
    files: dict[str, str | None]  # result path -> SHA-256 of the stored file (None: missing)
    catalog: dict[str, str]  # course id -> job id, from courses/catalog.json
    calls: dict[str, int]  # job tag -> provider requests
    drained_at: float  # when the run stopped waiting for the queue to drain


@dataclass
class Violation:
    rule: str
    job: str | None
    detail: str

    def __str__(self) -> str:
        return (
            f"{self.rule}: job {self.job}: {self.detail}"
            if self.job
            else f"{self.rule}: {self.detail}"
        )


@dataclass
class Verdict:
    violations: list[Violation] = field(default_factory=list)
    zombies: int = 0  # attempts that overlapped a writer and wrote nothing
    attempts: int = 0


def check(run: Run) -> Verdict:
    v = Verdict(attempts=len(run.attempts))
    bad = v.violations.append
    for jid in sorted(set(run.inserts) - set(run.jobs)):
        bad(Violation("lost", jid, "its insert was acknowledged; no such job"))
    by_job: dict[str, list[Attempt]] = defaultdict(list)
    for a in run.attempts:
        by_job[a.job].append(a)
    for job in sorted(run.jobs.values(), key=lambda j: j.id):
        attempts = sorted(by_job.get(job.id, []), key=lambda a: a.start)
        winner = _winner(job, attempts)
        if job.status not in TERMINAL and not (
            job.status in WAITING and job.run_after > run.drained_at - CLOCK_SLACK
        ):
            bad(Violation("unfinished", job.id, f"{job.status} when the run drained"))
        if job.status == "done":
            if winner is None:
                bad(Violation("winner", job.id, f"no attempt of {job.worker_id} finished it"))
            found = run.files.get(job.result_path or "")
            if found is None:
                bad(Violation("result", job.id, f"{job.result_path} is missing"))
            elif found != job.digest:
                bad(Violation("result", job.id, f"{job.result_path} is not the completion's"))
        writers = [a for a in attempts if a.wrote or a is winner]
        for i, w in enumerate(writers):
            for u in writers[i + 1 :]:
                if _overlap(w, u):
                    bad(Violation("overlap", job.id, f"{_span(w)} and {_span(u)} both wrote"))
        v.zombies += sum(
            1 for a in attempts if a not in writers and any(_overlap(a, w) for w in writers)
        )
        if job.retry_count > job.max_retries:
            bad(Violation("budget", job.id, f"retry_count {job.retry_count} > {job.max_retries}"))
        calls = run.calls.get(job.tag, 0)
        if calls > PER_ATTEMPT * len(attempts):
            bad(
                Violation(
                    "budget", job.id, f"{calls} provider calls for {len(attempts)} attempt(s)"
                )
            )
        if job.table == "ai_course_jobs" and job.status == "done":
            listed = run.catalog.get(job.course_id or "")
            if listed != job.id:
                bad(Violation("catalog", job.id, f"catalog.json lists {job.course_id} as {listed}"))
    return v


def _winner(job: Job, attempts: list[Attempt]) -> Attempt | None:
    if job.status != "done" or job.started_at is None:
        return None
    mine = [
        a
        for a in attempts
        if a.done and a.worker == job.worker_id and a.start >= job.started_at - CLOCK_SLACK
    ]
    return mine[-1] if mine else None


def _overlap(a: Attempt, b: Attempt) -> bool:
    return a.start < b.end and b.start < a.end


def _span(a: Attempt) -> str:
    return f"[{a.log} {a.start:.3f}-{a.end:.3f}]"


# -- reading a run's folder --------------------------------------------------------


def attempts_from_log(
    path: Path, ended: float | None, killed: bool
) -> tuple[str | None, list[Attempt]]:
    """The worker id of one process's log, and its attempts."""
    worker: str | None = None
    out: list[Attempt] = []
    open_: dict[str, Attempt] = {}
    last: dict[str, Attempt] = {}
    with open(path, errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)["record"]
            except (ValueError, KeyError, TypeError):
                continue
            extra, ts = rec.get("extra", {}), rec["time"]["timestamp"]
            action, jid = extra.get("action"), extra.get("job_id")
            if action == "worker_started":
                worker = extra.get("worker")
            if jid is None:
                continue
            if action == "job_started":
                if jid in open_:
                    _close(open_.pop(jid), ts, "next")
                a = Attempt(jid, path.name, worker, ts)
                out.append(a)
                open_[jid] = last[jid] = a
            elif action in ENDS and jid in open_:
                a = open_.pop(jid)
                _close(a, ts, action)
                a.done = action == "job_done"
                a.wrote = action in WROTE
            elif action == "job_lost" and jid in last:
                if jid in open_:
                    _close(open_.pop(jid), ts, action)
                last[jid].lost = True
    for a in open_.values():  # the process ended (killed, or released at shutdown)
        _close(a, ended if ended is not None else float("inf"), "killed" if killed else "exit")
    return worker, out


def _close(a: Attempt, ts: float, how: str) -> None:
    a.end, a.ended_by = ts, how


def load(folder: Path, jobs: dict[str, Job], storage: Path, drained_at: float) -> Run:
    """A run's evidence, from its folder and the storage (the jobs from the database)."""
    procs: dict[str, dict[str, Any]] = {}
    for rec in _jsonl(folder / "processes.jsonl"):
        procs.setdefault(rec["log"], {}).update({rec["event"]: rec["t"]})
    attempts: list[Attempt] = []
    for log in sorted((folder / "logs").glob("*.jsonl")):
        p = procs.get(log.name, {})
        ended = p.get("killed") or p.get("exited")
        _, found = attempts_from_log(log, ended, "killed" in p)
        attempts += found
    inserts = {r["id"]: r["t"] for r in _jsonl(folder / "inserts.jsonl")}
    calls: dict[str, int] = defaultdict(int)
    for r in _jsonl(folder / "fake-requests.jsonl"):
        m = TAG.search(r.get("text", ""))
        if m:
            calls[m.group(0)] += 1
    files: dict[str, str | None] = {}
    for j in jobs.values():
        if j.status == "done" and j.result_path:
            target = storage / j.result_path
            files[j.result_path] = (
                hashlib.sha256(target.read_bytes()).hexdigest() if target.is_file() else None
            )
    catalog: dict[str, str] = {}
    cat = storage / "courses" / "catalog.json"
    if cat.is_file():
        catalog = {c["id"]: c["jobId"] for c in json.loads(cat.read_bytes())["courses"]}
    return Run(jobs, inserts, attempts, files, catalog, dict(calls), drained_at)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


JOBS_SQL = """
select id::text, 'ai_course_jobs' as job_table, status, subject as tag_source, retry_count,
       max_retries, extract(epoch from run_after) as run_after,
       extract(epoch from started_at) as started_at,
       extract(epoch from completed_at) as completed_at, worker_id, result_path,
       metrics ->> 'resultSha256' as digest, course_id
from ai_course_jobs
union all
select id::text, 'ai_media_jobs', status, prompt, retry_count, max_retries,
       extract(epoch from run_after), extract(epoch from started_at),
       extract(epoch from completed_at), worker_id, result_path,
       metrics ->> 'resultSha256', course_id
from ai_media_jobs
"""


def jobs_from(rows: list[dict[str, Any]]) -> dict[str, Job]:
    out = {}
    for r in rows:
        m = TAG.search(r["tag_source"] or "")
        out[r["id"]] = Job(
            id=r["id"],
            table=r["job_table"],
            status=r["status"],
            tag=m.group(0) if m else "",
            retry_count=r["retry_count"],
            max_retries=r["max_retries"],
            run_after=float(r["run_after"] or 0),
            started_at=None if r["started_at"] is None else float(r["started_at"]),
            completed_at=None if r["completed_at"] is None else float(r["completed_at"]),
            worker_id=r["worker_id"],
            result_path=r["result_path"],
            digest=r["digest"],
            course_id=r["course_id"],
        )
    return out
