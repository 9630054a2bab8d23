"""The measurements: latency (paced single inserts to an idle worker), throughput
(drain a queue filled beforehand, with one or several worker processes), and our
claim cost against the number of finished rows. Each call uses a fresh database."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench import stats
from bench.pgserver import Server
from bench.proc import WorkerProcess
from bench.queries import sql
from bench.systems import ai_jobs

WARMUP = 5
CLAIM_WARMUP = 20  # claims per database and round not timed


def system(name: str) -> ModuleType:
    return importlib.import_module(f"bench.systems.{name}")


def _stat(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()  # fields from the 3rd (state) on


def postmaster_pid(url: str) -> int:
    """The server's postmaster: the parent of one of its backends."""
    with psycopg.connect(url, row_factory=dict_row) as conn:
        row = conn.execute(sql("backend_pid")).fetchone()
        fields = _stat(row["pid"]) if row else None  # while the backend lives
    if not fields:
        raise RuntimeError("cannot read the server's processes (is it on this machine?)")
    return int(fields[1])  # ppid


def server_cpu_seconds(postmaster: int) -> float:
    """CPU time (user + system) of this server's processes (the postmaster and its
    children: backends, WAL writer, checkpointer...), read before and after a run
    while the backends are still alive. Other PostgreSQL servers on the machine
    are not counted."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fields = _stat(pid)
        if not fields or (int(pid) != postmaster and int(fields[1]) != postmaster):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


async def counters(url: str, pg_version: int) -> dict[str, float]:
    wal = "wal_syncs_pg18" if pg_version >= 180000 else "wal_syncs_pg17"
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=dict_row
    ) as conn:
        await conn.execute(sql("clear_stats_snapshot"))
        commits = await (await conn.execute(sql("db_commits"))).fetchone()
        syncs = await (await conn.execute(sql(wal))).fetchone()
    return {
        "commits": float(commits["n"]) if commits else 0.0,
        "wal_syncs": float(syncs["n"]) if syncs else 0.0,
    }


async def latency(srv: Server, name: str, tag: str, n: int, pace_s: float) -> dict[str, Any]:
    """n single inserts, each its own transaction, paced pace_s apart, to an idle
    worker; enqueue-commit -> handler start in ms (both time.time())."""
    mod = system(name)
    dbname = f"bench_{tag}"
    url = srv.create_database(dbname)
    storage = Path(tempfile.mkdtemp(prefix="ai-jobs-bench-storage-"))
    wp: WorkerProcess | None = None
    enq: Any = None
    try:
        await mod.prepare(url)
        wp = WorkerProcess(name, url, "latency", expect=n + WARMUP, storage=storage)
        await asyncio.to_thread(wp.expect_line, "ready", 120)
        enq = await mod.open_enqueuer(url)
        wp.send("go")
        for i in range(WARMUP):  # the worker is up and listening once these ran
            await enq.one()
            await asyncio.to_thread(wp.wait_started, i + 1, 60)
        await asyncio.sleep(0.3)
        commits: dict[str, float] = {}
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i * pace_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            key = await enq.one()
            commits[key] = time.time()
        await asyncio.to_thread(wp.wait_started, WARMUP + n, 60)
        res = await asyncio.to_thread(wp.stop)
        started_lag: list[float] = []
        if name in ("ai_jobs", "ai_jobs_full", "floor"):
            started_lag = await _started_lag(url, commits)
    finally:
        if enq is not None:
            await enq.close()
        if wp is not None:
            wp.close()
        srv.drop_database(dbname)
        shutil.rmtree(storage, ignore_errors=True)
    ms = [(res["starts"][k] - t) * 1000 for k, t in commits.items() if k in res["starts"]]
    out: dict[str, Any] = {"samples_ms": ms, "missing": n - len(ms), **stats.latency_summary(ms)}
    if started_lag:
        out["started_at"] = stats.latency_summary(started_lag)
    return out


async def _started_lag(url: str, commits: dict[str, float]) -> list[float]:
    async with await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as conn:
        rows = await (await conn.execute(sql("ours_started_lag"))).fetchall()
    return [(r["started"] - commits[r["id"]]) * 1000 for r in rows if r["id"] in commits]


async def throughput(
    srv: Server,
    name: str,
    tag: str,
    n: int,
    workers: int = 1,
    profile: Path | None = None,
) -> dict[str, Any]:
    """n jobs queued first; then `workers` processes at concurrency 10 drain them.
    jobs/s = n / (last handler start - go)."""
    mod = system(name)
    dbname = f"bench_{tag}"
    url = srv.create_database(dbname)
    storage = Path(tempfile.mkdtemp(prefix="ai-jobs-bench-storage-"))
    pg_version = srv.version_num()
    procs: list[WorkerProcess] = []
    try:
        await mod.prepare(url)
        await mod.enqueue_bulk(url, n)
        expect = n if workers == 1 else 0
        procs = [
            WorkerProcess(name, url, "drain", expect=expect, profile=profile, storage=storage)
            for _ in range(workers)
        ]
        for p in procs:
            await asyncio.to_thread(p.expect_line, "ready", 120)
        before = await counters(url, pg_version)
        postmaster = postmaster_pid(url)
        cpu0 = server_cpu_seconds(postmaster)
        t_go = time.time()
        for p in procs:
            p.send("go")
        timeout = max(120.0, n / 100)
        if workers == 1:
            await asyncio.to_thread(procs[0].expect_line, "drained", timeout)
        else:
            deadline = time.monotonic() + timeout
            while await mod.remaining(url) > 0:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: {workers} workers did not drain {n} jobs")
                await asyncio.sleep(0.05)
        cpu1 = server_cpu_seconds(postmaster)
        results = [await asyncio.to_thread(p.stop) for p in procs]
        left = await mod.remaining(url)
        after = await counters(url, pg_version)
    finally:
        for p in procs:
            p.close()
        srv.drop_database(dbname)
        shutil.rmtree(storage, ignore_errors=True)
    count = sum(r["count"] for r in results)
    last = max(r["last"] for r in results)
    elapsed = last - t_go
    return {
        "jobs_per_s": n / elapsed,
        "elapsed_s": elapsed,
        "jobs": n,
        "started": count,
        "left_in_queue": left,
        "worker_cpu_s_per_1k": 1000 * sum(r["cpu_s"] for r in results) / n,
        "server_cpu_s_per_1k": 1000 * (cpu1 - cpu0) / n,
        "commits_per_job": (after["commits"] - before["commits"]) / n,
        "wal_syncs_per_job": (after["wal_syncs"] - before["wal_syncs"]) / n,
    }


async def claim_db(srv: Server, finished: int) -> tuple[str, str]:
    """A migrated database holding `finished` done rows, vacuumed and analyzed."""
    dbname = f"bench_claim_{finished}"
    url = srv.create_database(dbname)
    await ai_jobs.prepare(url)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            await conn.execute(sql("skip_triggers"))
        step = 250_000
        for start in range(0, finished, step):
            await conn.execute(sql("ours_add_finished"), {"n": min(step, finished - start)})
        await conn.execute(sql("ours_vacuum_analyze"))
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            await conn.execute(sql("checkpoint"))
    return dbname, url


async def claim_cost(url: str, claims: int) -> dict[str, float]:
    """Queue `claims` jobs, then claim them one at a time with claim_jobs(): the
    time of each call (round trip and commit included), in ms; the first
    CLAIM_WARMUP calls (plan caching, cold pages) are not counted."""
    await ai_jobs.enqueue_bulk(url, claims + CLAIM_WARMUP)
    times: list[float] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(sql("ours_vacuum_analyze"))
        q = sql("ours_claim_one")
        for i in range(claims + CLAIM_WARMUP):
            t = time.perf_counter()
            await (await conn.execute(q)).fetchall()
            if i >= CLAIM_WARMUP:
                times.append((time.perf_counter() - t) * 1000)
    return {
        "p50_ms": stats.percentile(times, 50),
        "p95_ms": stats.percentile(times, 95),
        "mean_ms": sum(times) / len(times),
    }
