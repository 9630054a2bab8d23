"""The full pipeline under load: one worker (WORKER_CONCURRENCY=10, the course
handler with the placeholder provider, local storage, the catalog) drains a queue
of course jobs, and what a user would look at is measured while it does:

- jobs/s, as the no-op figure counts it (jobs / last handler start - go), and to
  the last job written done;
- commits per job: pg_stat_database.xact_commit over the drain, the worker's stop
  included (its last catalog writes), divided by the jobs;
- the worker's log: WARNING and ERROR lines of a clean run (there should be none);
- the catalog's lag: courses/catalog.json is read whenever it changes; a job's lag
  is from its `done` (completed_at) to the first catalog file seen listing it (the
  file's mtime), an upper bound at the sampling interval. Target: within
  CATALOG_BATCH_SECONDS, during the drain and not only at its end.

`python -m bench --pipeline-only [--quick]` runs this part alone, beside the no-op
drain, and writes bench/results/pipeline-latest.json; the whole run includes it
in latest.json."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench import scenarios, stats
from bench.pgserver import Server
from bench.proc import WorkerProcess
from bench.queries import sql
from bench.systems import ai_jobs_full

SAMPLE_SECONDS = 0.05  # how often catalog.json is looked at (its mtime)
CATALOG = Path("courses") / "catalog.json"
KINDS = ("claims", "saves", "lookups", "renders")
_LEVEL = re.compile(r"^\S+ (WARNING|ERROR|CRITICAL)\s+(.*)$")


def batch_seconds() -> float:
    """CATALOG_BATCH_SECONDS as the worker reads it (environment, else default)."""
    from listener.settings import CATALOG_BATCH_SECONDS

    return float(os.environ.get("CATALOG_BATCH_SECONDS", CATALOG_BATCH_SECONDS))


class CatalogWatch:
    """Reads catalog.json whenever its mtime changes; the first mtime at which
    each job id was listed."""

    def __init__(self, root: Path) -> None:
        self.path = root / CATALOG
        self.first_seen: dict[str, float] = {}
        self.renders_seen = 0
        self._mtime = 0.0

    def look(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._mtime:
            return
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return  # replaced while read: the next look reads the new one
        self._mtime = mtime
        self.renders_seen += 1
        for c in doc.get("courses", []):
            self.first_seen.setdefault(str(c.get("jobId")), mtime)

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.look)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)


def log_findings(text: str) -> dict[str, Any]:
    """WARNING and ERROR lines of the worker's text log, and a few distinct ones."""
    warnings = errors = 0
    examples: list[str] = []
    found: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("pipeline-stats "):
            found = {f"{k}_per_job": v for k, v in json.loads(line[15:]).items()}
            continue
        m = _LEVEL.match(line)
        if not m:
            continue
        if m.group(1) == "WARNING":
            warnings += 1
        else:
            errors += 1
        message = m.group(2).split(" {", 1)[0][:200]
        if message not in examples and len(examples) < 5:
            examples.append(message)
    return {"log_warnings": warnings, "log_errors": errors, "log_examples": examples, **found}


async def _query(url: str, name: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as conn:
        return await (await conn.execute(sql(name))).fetchall()


async def drain(srv: Server, tag: str, n: int) -> dict[str, Any]:
    """One drain of n queued course jobs by one full-pipeline worker."""
    dbname = f"bench_{tag}"
    url = srv.create_database(dbname)
    storage = Path(tempfile.mkdtemp(prefix="ai-jobs-bench-storage-"))
    pg_version = srv.version_num()
    watch = CatalogWatch(storage)
    stop_watch = asyncio.Event()
    wp: WorkerProcess | None = None
    watcher: asyncio.Task[None] | None = None
    limit = batch_seconds()
    try:
        await ai_jobs_full.prepare(url)
        await ai_jobs_full.enqueue_bulk(url, n)
        wp = WorkerProcess("ai_jobs_full", url, "drain", expect=n, storage=storage)
        await asyncio.to_thread(wp.expect_line, "ready", 120)
        before = await scenarios.counters(url, pg_version)
        watcher = asyncio.create_task(watch.watch(stop_watch))
        t_go = time.time()
        wp.send("go")
        timeout = max(120.0, n / 20)
        await asyncio.to_thread(wp.expect_line, "drained", timeout)
        deadline = time.monotonic() + timeout
        while int((await _query(url, "ours_done_count"))[0]["n"]) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"full pipeline: {n} jobs not done in {timeout:g}s")
            await asyncio.sleep(0.05)
        t_done = time.time()
        # The catalog catches up on its own (within CATALOG_BATCH_SECONDS), not
        # because the worker stops: wait for it before the stop's last render.
        settle = time.monotonic() + limit + 2.0
        for _ in range(int((settle - time.monotonic()) / SAMPLE_SECONDS) + 1):
            if len(watch.first_seen) >= n:
                break
            await asyncio.sleep(SAMPLE_SECONDS)
        listed_before_stop = len(watch.first_seen)
        stop_watch.set()
        await watcher
        res = await asyncio.to_thread(wp.stop)
        after = await scenarios.counters(url, pg_version)
        watch.look()  # the stop's render
        wp.stderr.flush()
        wp.stderr.seek(0)
        log = wp.stderr.read().decode(errors="replace")
        done = {r["id"]: r["done"] for r in await _query(url, "ours_done_times")}
        rows = int((await _query(url, "ours_catalog_rows"))[0]["n"])
    finally:
        stop_watch.set()
        if watcher is not None and not watcher.done():
            watcher.cancel()
        if wp is not None:
            wp.close()
        srv.drop_database(dbname)
        shutil.rmtree(storage, ignore_errors=True)
    lags = [max(0.0, watch.first_seen[k] - t) for k, t in done.items() if k in watch.first_seen]
    elapsed = res["last"] - t_go
    return {
        "jobs_per_s": n / elapsed,
        "jobs_per_s_to_done": n / (max(done.values()) - t_go) if done else 0.0,
        "elapsed_s": elapsed,
        "jobs": n,
        "done": len(done),
        "commits_per_job": (after["commits"] - before["commits"]) / n,
        "wal_syncs_per_job": (after["wal_syncs"] - before["wal_syncs"]) / n,
        "worker_cpu_s_per_1k": 1000 * res["cpu_s"] / n,
        "catalog_rows": rows,
        "catalog_listed_before_stop": listed_before_stop,
        "catalog_listed_at_end": len(watch.first_seen),
        "catalog_renders_seen": watch.renders_seen,
        "catalog_lag_max_s": max(lags) if lags else float("nan"),
        "catalog_lag_p50_s": stats.percentile(lags, 50) if lags else float("nan"),
        "catalog_lag_p99_s": stats.percentile(lags, 99) if lags else float("nan"),
        "catalog_batch_seconds": limit,
        "wait_for_catalog_s": max(0.0, time.time() - t_done),
        **{k: v / n if k.endswith("_per_job") else v for k, v in log_findings(log).items()},
    }


def summarize(rounds: list[dict[str, Any]], noop: dict[str, Any] | None) -> dict[str, Any]:
    """Medians across rounds, the worst of the figures that must hold in every
    round, the targets, and the no-op figure beside."""
    out = stats.across_rounds(rounds)
    out["log_warnings"] = max(r["log_warnings"] for r in rounds)
    out["log_errors"] = max(r["log_errors"] for r in rounds)
    out["log_examples"] = sorted({e for r in rounds for e in r["log_examples"]})[:10]
    out["catalog_lag_max_s"] = max(r["catalog_lag_max_s"] for r in rounds)
    out["commits_per_job"] = max(r["commits_per_job"] for r in rounds)
    limit = rounds[0]["catalog_batch_seconds"]
    n = rounds[0]["jobs"]
    out["targets"] = {
        "commits_per_job": _target(out["commits_per_job"], "<=", 1.2),
        "log_warnings": _target(float(out["log_warnings"] + out["log_errors"]), "<=", 0),
        "catalog_lag_max_s": _target(out["catalog_lag_max_s"], "<=", limit),
        "catalog_listed_before_stop": _target(
            float(min(r["catalog_listed_before_stop"] for r in rounds)), ">=", n
        ),
    }
    if noop is not None:
        out["noop_jobs_per_s"] = noop["jobs_per_s"]
        out["noop_range"] = noop["range"]["jobs_per_s"]
    return out


def _target(value: float, op: str, bound: float) -> dict[str, Any]:
    met = value <= bound if op == "<=" else value >= bound
    return {"value": value, "target": f"{op} {bound:g}", "met": bool(met)}


def table(p: dict[str, Any]) -> str:
    lo, hi = p["range"]["jobs_per_s"]
    lines = [
        "| full pipeline (1 worker, concurrency 10) | value |",
        "|---|---|",
        f"| jobs/s (to last handler start) | {p['jobs_per_s']:.0f} ({lo:.0f} to {hi:.0f}) |",
        f"| jobs/s (to last job done) | {p['jobs_per_s_to_done']:.0f} |",
    ]
    if "noop_jobs_per_s" in p:
        nlo, nhi = p["noop_range"]
        lines.append(
            f"| no-op handler, same worker: jobs/s | {p['noop_jobs_per_s']:.0f} "
            f"({nlo:.0f} to {nhi:.0f}) |"
        )
    lines += [
        f"| commits per job (worst round) | {p['commits_per_job']:.3f} |",
        f"| worker log: warnings / errors (worst round) | {p['log_warnings']} / "
        f"{p['log_errors']} |",
        f"| catalog lag, done -> listed: p50 / p99 / max s | {p['catalog_lag_p50_s']:.2f} / "
        f"{p['catalog_lag_p99_s']:.2f} / {p['catalog_lag_max_s']:.2f} "
        f"(CATALOG_BATCH_SECONDS {p['catalog_batch_seconds']:g}) |",
        f"| catalog renders seen during a drain | {p['catalog_renders_seen']:.0f} |",
        "| statements per job: claims / catalog saves / cache lookups / catalog renders | "
        + " / ".join(f"{p.get(f'{k}_per_job', float('nan')):.3f}" for k in KINDS)
        + " |",
        "",
        "| pipeline target | value | wanted | met |",
        "|---|---|---|---|",
    ]
    for name, t in p["targets"].items():
        lines.append(
            f"| {name} | {t['value']:.3g} | {t['target']} | {'yes' if t['met'] else 'no'} |"
        )
    for e in p.get("log_examples", []):
        lines.append(f"- log: {e}")
    return "\n".join(lines)


async def rounds(srv: Server, n: int, noop_n: int, count: int, say: Any = print) -> dict[str, Any]:
    """`count` rounds of the full drain, each beside a no-op drain of noop_n jobs."""
    full: list[dict[str, Any]] = []
    noop: list[dict[str, Any]] = []
    for r in range(count):
        res = await drain(srv, f"pipe_{r}", n)
        full.append(res)
        say(
            f"round {r + 1} pipeline {res['jobs_per_s']:.0f} jobs/s, "
            f"{res['commits_per_job']:.2f} commits/job, {res['log_warnings']} warnings, "
            f"catalog lag max {res['catalog_lag_max_s']:.2f} s"
        )
        if noop_n:
            nres = await scenarios.throughput(srv, "ai_jobs", f"pipe_noop_{r}", noop_n)
            noop.append(nres)
            say(f"round {r + 1} no-op    {nres['jobs_per_s']:.0f} jobs/s")
    return {"rounds": full, "noop_rounds": noop}
