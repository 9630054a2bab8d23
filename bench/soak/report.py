"""The soak's one-page report: jobs, faults by kind with the recovery after each
(p50/p95/max), throughput over time (a plot, drawn by bench/soak/plot.py in the
benchmark's own environment), the checker's verdict and the targets."""

from __future__ import annotations

import json
import math
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.soak.check import Job, Verdict, attempts_from_log

BUCKET = 5.0  # seconds per throughput point
WARMUP = 60.0  # seconds at the start left out of the throughput comparison
HOST_FAULTS = {"cut_link", "netem"}
PROCESS_FAULTS = {"kill_worker", "pause_worker"}
DB_FAULTS = {"restart_db", "failover"}  # every worker's
NO_RECOVERY_AFTER = 300.0


@dataclass
class Summary:
    jobs: dict[str, Counter[str]]
    faults: list[dict[str, Any]]
    recovery: dict[str, list[float | None]]  # the workers the fault affected
    fleet: dict[str, list[float | None]]  # any worker
    buckets: list[tuple[float, int]]
    outside_per_min: float
    all_per_min: float
    verdict: Verdict
    # Outside fault windows that last until the backlog each fault left is done.
    settled_per_min: float = math.nan
    info: dict[str, Any] = field(default_factory=dict)
    # Per recovery: cut short by the next fault on the same workers before any
    # job was claimed; the recovery is then the time until that fault (a lower bound).
    interrupted: dict[str, list[bool]] = field(default_factory=dict)


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def workers_by_log(folder: Path) -> tuple[dict[str, str | None], dict[str, dict[str, Any]]]:
    procs: dict[str, dict[str, Any]] = {}
    with open(folder / "processes.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            p = procs.setdefault(rec["log"], {})
            p[rec["event"]] = rec["t"]
            if "host" in rec:
                p["host"] = rec["host"]
    ids = {}
    for log in (folder / "logs").glob("*.jsonl"):
        ids[log.name] = attempts_from_log(log, None, False)[0]
    return ids, procs


def summarize(
    folder: Path,
    jobs: dict[str, Job],
    faults: list[dict[str, Any]],
    verdict: Verdict,
    started: float,
    inserts_stopped: float,
    inserts: dict[str, float] | None = None,
) -> Summary:
    ids, procs = workers_by_log(folder)
    # Work resumes: a job claimed after the heal that went on to complete (its
    # started_at is the winning claim's).
    claimed = sorted(
        (j.started_at, j.worker_id) for j in jobs.values() if j.status == "done" and j.started_at
    )
    done = sorted(
        (j.completed_at, j.worker_id)
        for j in jobs.values()
        if j.status == "done" and j.completed_at
    )
    recovery: dict[str, list[float | None]] = defaultdict(list)
    interrupted: dict[str, list[bool]] = defaultdict(list)
    fleet: dict[str, list[float | None]] = defaultdict(list)
    for f in faults:
        if f.get("error") or "healed" not in f:
            continue
        heal = f["healed"]
        kind = f["kind"]
        if kind in PROCESS_FAULTS:
            affected = {ids.get(f.get("new") or f["target"])}
        elif kind in HOST_FAULTS:
            affected = {
                ids.get(log)
                for log, p in procs.items()
                if p.get("host") == f["target"]
                and p["start"] <= heal
                and (p.get("killed") or p.get("exited") or math.inf) > heal
            }
        else:
            affected = None  # every worker
        first = next(
            (t for t, w in claimed if t >= heal and (affected is None or w in affected)), None
        )
        strike = _next_strike(f, faults, procs)
        cut = strike is not None and (first is None or first >= strike)
        recovery[kind].append(strike - heal if cut and strike is not None else _took(first, heal))
        interrupted[kind].append(cut)
        fleet[kind].append(_took(next((t for t, _ in claimed if t >= heal), None), heal))
    end = max([started, *(t for t, _ in done)])
    n = int((end - started) // BUCKET) + 1
    counts = [0] * n
    for t, _ in done:
        counts[int((t - started) // BUCKET)] += 1
    buckets = [(started + i * BUCKET, c) for i, c in enumerate(counts)]
    windows = [(f["start"], f.get("healed", f["start"])) for f in faults]
    drained = [(a, _drained(b, jobs, inserts or {})) for a, b in windows]

    def calm(t: float, windows: list[tuple[float, float]] = windows) -> bool:
        return (
            t >= started + WARMUP
            and t + BUCKET <= inserts_stopped
            and not any(t < b and a < t + BUCKET for a, b in windows)
        )

    outside = [c for t, c in buckets if calm(t)]
    settled = [c for t, c in buckets if calm(t, drained)] if inserts else []
    steady = [c for t, c in buckets if started + WARMUP <= t and t + BUCKET <= inserts_stopped]
    per_min = 60.0 / BUCKET
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for j in jobs.values():
        table[j.table][j.status] += 1
    return Summary(
        jobs=dict(table),
        faults=faults,
        recovery=dict(recovery),
        fleet=dict(fleet),
        buckets=buckets,
        outside_per_min=(sum(outside) / len(outside) * per_min) if outside else math.nan,
        all_per_min=(sum(steady) / len(steady) * per_min) if steady else math.nan,
        verdict=verdict,
        settled_per_min=(sum(settled) / len(settled) * per_min) if settled else math.nan,
        interrupted=dict(interrupted),
    )


def _next_strike(
    f: dict[str, Any], faults: list[dict[str, Any]], procs: dict[str, dict[str, Any]]
) -> float | None:
    """When a later fault struck the workers `f` affected (None: none did before
    the run's end): the same process, host, provider or storage, a process of
    the host, the host of the process, or the database (every worker's)."""
    heal = f["healed"]

    def host(log: str | None) -> str | None:
        return procs.get(log or "", {}).get("host")

    if f["kind"] in PROCESS_FAULTS:
        same = {f["target"], f.get("new"), host(f.get("new") or f["target"])}
    else:
        same = {f.get("target")}
    same.discard(None)
    starts = [
        g["start"]
        for g in faults
        if g is not f
        and g["start"] >= heal
        and (
            g["kind"] in DB_FAULTS
            or g.get("target") in same
            or (g["kind"] in PROCESS_FAULTS and host(g.get("target")) in same)
        )
    ]
    return min(starts, default=None)


def _drained(heal: float, jobs: dict[str, Job], inserts: dict[str, float]) -> float:
    """When the backlog a fault left was done: the last completion of the jobs
    inserted before its heal and not done by then (the heal itself if none)."""
    ends = [
        j.completed_at
        for jid, t in inserts.items()
        if t < heal
        and (j := jobs.get(jid)) is not None
        and j.completed_at
        and j.completed_at > heal
    ]
    return max([heal, *ends])


def _took(first: float | None, heal: float) -> float | None:
    return None if first is None or first - heal > NO_RECOVERY_AFTER else first - heal


def _fmt(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1f}"


def write(summary: Summary, folder: Path, baseline: float | None) -> Path:
    """report.md and throughput.png in `folder`, and summary.json (a later run's
    baseline); the report's path."""
    s, info = summary, summary.info
    lines = [
        f"# Soak report: {info.get('title', '')}",
        "",
        f"{info.get('when', '')}; seed {info.get('seed')}, {info.get('minutes')} min of load, "
        f"a fault every {info.get('every')} s; {info.get('layout', '')}. "
        f"Load average of the machine before / after: {info.get('load_before')} / "
        f"{info.get('load_after')} (2 cores, shared).",
        "",
        "## Jobs",
        "",
        "| table | inserted | done | dead_letter | cancelled | waiting | other |",
        "|---|---|---|---|---|---|---|",
    ]
    for table, c in sorted(s.jobs.items()):
        other = sum(
            n
            for k, n in c.items()
            if k not in {"done", "dead_letter", "cancelled", "pending", "failed"}
        )
        lines.append(
            f"| {table} | {sum(c.values())} | {c['done']} | {c['dead_letter']} | "
            f"{c['cancelled']} | {c['pending'] + c['failed']} | {other} |"
        )
    lines += [
        "",
        "## Faults and recovery",
        "",
        "Recovery: from the moment a fault is healed (the process started again and",
        "ready, or resumed; the link restored; the database accepting writes; the",
        "provider answering) to the first job claimed after it that went on to",
        "complete (its `started_at`): by a worker the fault affected (the process",
        "killed or paused, the host's workers), and by any worker.",
        "",
        "A recovery that the next fault on the same workers cut short (no job",
        "claimed by them before it struck) counts as the time until that fault, a",
        "lower bound (*interrupted*). The chaos driver leaves a healed target alone",
        "for 5 s, so such a recovery took at least that long unless the database",
        "was struck meanwhile.",
        "",
        "| fault | injected | failed to inject | recovered | interrupted | p50 s | p95 s | max s "
        "| any worker: p50 s | p95 s | max s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    kinds = Counter(f["kind"] for f in s.faults)
    errors = Counter(f["kind"] for f in s.faults if f.get("error"))
    every: list[float] = []
    anyw: list[float] = []
    cuts = sum(sum(v) for k, v in s.interrupted.items() if k != "failover")
    for kind in sorted(kinds):
        rec = s.recovery.get(kind, [])
        cut = sum(s.interrupted.get(kind, []))
        ok = [x for x in rec if x is not None]
        fl = [x for x in s.fleet.get(kind, []) if x is not None]
        if kind != "failover":
            every += ok
            anyw += fl
        lines.append(
            f"| {kind} | {kinds[kind]} | {errors[kind]} | {len(ok) - cut}/{len(rec)} | {cut} | "
            f"{_q(ok)} | {_q(fl)} |"
        )
    lines += [
        f"| **all but failover** | {sum(kinds.values()) - kinds['failover']} | | "
        f"{len(every) - cuts} | {cuts} | {_q(every)} | {_q(anyw)} |",
        "",
        "## Throughput",
        "",
        f"Jobs completed a minute: {_fmt(s.outside_per_min)} outside fault windows, "
        f"{_fmt(s.settled_per_min)} outside fault windows and the drain of the backlog "
        f"each left, {_fmt(s.all_per_min)} over the whole steady phase"
        + (f"; a fault-free run: {_fmt(baseline)}" if baseline else "")
        + ".",
        "",
        "![throughput](throughput.png)",
        "",
        "## Checker",
        "",
        f"Attempts: {s.verdict.attempts}; zombie attempts fenced (overlapped the attempt "
        f"that held the claim and wrote nothing): {s.verdict.zombies}.",
        "",
        f"**Violations: {len(s.verdict.violations)}**",
        "",
    ]
    lines += [f"- {v}" for v in s.verdict.violations[:20]]
    failover = [x for x in s.recovery.get("failover", []) if x is not None]
    p95, p95_any = quantile(every, 0.95), quantile(anyw, 0.95)
    f95 = quantile(failover, 0.95)
    ratio = s.outside_per_min / baseline if baseline else math.nan
    lines += [
        "",
        "## Targets",
        "",
        "| target | result | met |",
        "|---|---|---|",
        f"| 0 violations | {len(s.verdict.violations)} | {_yes(not s.verdict.violations)} |",
        f"| recovery p95 within 5 s (all but failover), affected workers | {_fmt(p95)} s | "
        f"{_yes(p95 <= 5)} |",
        f"| recovery p95 within 5 s (all but failover), any worker | {_fmt(p95_any)} s | "
        f"{_yes(p95_any <= 5)} |",
        f"| failover recovery p95 within 15 s | {_fmt(f95)} s | "
        f"{_yes(f95 <= 15) if failover else 'no failover'} |",
        f"| throughput outside faults within 10% of fault-free | "
        f"{_fmt(ratio * 100) if baseline else '-'}% | "
        f"{_yes(abs(ratio - 1) <= 0.1) if baseline else 'no baseline'} |",
        f"| throughput outside faults and their backlog within 10% of fault-free | "
        f"{_fmt(s.settled_per_min / baseline * 100) if baseline else '-'}% | "
        f"{_yes(abs(s.settled_per_min / baseline - 1) <= 0.1) if baseline else 'no baseline'} |",
        f"| throughput over the whole run within 10% of fault-free | "
        f"{_fmt(s.all_per_min / baseline * 100) if baseline else '-'}% | "
        f"{_yes(abs(s.all_per_min / baseline - 1) <= 0.1) if baseline else 'no baseline'} |",
        "",
    ]
    report = folder / "report.md"
    report.write_text("\n".join(lines))
    (folder / "summary.json").write_text(
        json.dumps(
            {
                "throughput_per_min": s.all_per_min,
                "outside_per_min": s.outside_per_min,
                "settled_per_min": s.settled_per_min,
                "violations": [str(v) for v in s.verdict.violations],
                "recovery": s.recovery,
                "interrupted": s.interrupted,
                "recovery_any_worker": s.fleet,
                "info": info,
            },
            indent=1,
        )
    )
    plot(s, folder)
    return report


def _q(xs: list[float]) -> str:
    """p50 | p95 | max"""
    top = max(xs) if xs else None
    return f"{_fmt(quantile(xs, 0.5))} | {_fmt(quantile(xs, 0.95))} | {_fmt(top)}"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def plot(s: Summary, folder: Path) -> None:
    """throughput.png, drawn in bench/.venv (matplotlib is the benchmark's)."""
    from bench.venv import ROOT, prepare

    data = folder / "plot.json"
    data.write_text(
        json.dumps(
            {
                "buckets": s.buckets,
                "windows": [[f["start"], f.get("healed", f["start"]), f["kind"]] for f in s.faults],
                "title": s.info.get("title", "soak"),
                "per_min": 60.0 / BUCKET,
            }
        )
    )
    python = prepare()
    subprocess.run(
        [str(python), "-m", "bench.soak.plot", str(data), str(folder / "throughput.png")],
        check=True,
        cwd=ROOT,
    )
