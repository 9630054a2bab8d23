"""Console cost: what the dashboard, /metrics, `ai-jobs status` and the alert
rules pay per read, against the history the tables keep.

A migrated database per size holds 0, 100,000 or 1,000,000 finished course jobs
spread over the past 30 days (one generate_series insert with triggers off, then
ai_job_recount()), plus the same recent activity at every size: 300 jobs done in
the last hour (two providers), 60 failed attempts, 60 dead letters, 20 pending,
10 processing.
Each read is the code the product runs (listener.web.views.load for a live-feed
snapshot, listener.web.metrics.collect for /metrics, ...), on one connection,
after untimed warm-up calls; the runbook's ai_job_metrics view (kept for psql)
is timed too, for contrast."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench import stats
from bench.pgserver import Server
from bench.queries import sql
from bench.systems import ai_jobs

WARMUP = 5
TARGET_MS = 50.0
TARGET_RATIO = 1.5
Conn = psycopg.AsyncConnection[dict[str, Any]]
Read = Callable[[Conn], Awaitable[Any]]


def reads() -> dict[str, Read]:
    """The reads measured, by name. Imported late: the bench's own venv has the
    project installed, the peers do not need it."""
    from listener import alerts, console, dal, ops
    from listener.settings import Settings
    from listener.web import metrics, views

    settings = Settings()

    async def snapshot(conn: Conn) -> Any:
        cache = views.AlertCache(settings)  # the rules each time: the worst case
        return views.fragments(await views.load(conn, cache))

    async def status(conn: Conn) -> Any:
        return await ops.queue_depth(conn), await ops.paused(conn)

    async def rows(name: str, conn: Conn, params: Any = None) -> Any:
        return await dal.fetch(conn, name, params)

    async def view(conn: Conn) -> Any:
        return await (await conn.execute(sql("bench_metrics_view"))).fetchall()

    return {
        "cards (job_metrics)": lambda c: rows("job_metrics", c),
        "live feed snapshot": snapshot,
        "/metrics": lambda c: metrics.collect(c, settings),
        "ai-jobs status": status,
        "alert rules": lambda c: alerts.evaluate(c, settings),
        "job list, newest 50": lambda c: console.find(c, console.JobFilter()),
        "job list, dead letters": lambda c: console.find(
            c, console.JobFilter(status="dead_letter")
        ),
        "ai_job_metrics view (psql)": view,
    }


FLAT = [
    "cards (job_metrics)",
    "live feed snapshot",
    "/metrics",
    "ai-jobs status",
    "alert rules",
    "job list, newest 50",
    "job list, dead letters",
]


async def console_db(srv: Server, finished: int) -> tuple[str, str]:
    dbname = f"bench_console_{finished}"
    url = srv.create_database(dbname)
    await ai_jobs.prepare(url)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            await conn.execute(sql("skip_triggers"))
        step = 250_000
        for start in range(0, finished, step):
            n = min(step, finished - start)
            await conn.execute(sql("console_add_history"), {"n": n, "offset": start})
        await conn.execute(sql("restore_triggers"))
        await conn.execute(sql("console_recount"))
        for name in ("console_recent_done", "console_recent_live", "console_recent_failures"):
            await conn.execute(sql(name))
        await conn.execute(sql("console_fold"))
        await conn.execute(sql("ours_vacuum_analyze"))
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            await conn.execute(sql("checkpoint"))
    return dbname, url


async def measure(url: str, calls: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=dict_row
    ) as conn:
        for name, read in reads().items():
            times = []
            for i in range(WARMUP + calls):
                t = time.perf_counter()
                await read(conn)
                if i >= WARMUP:
                    times.append((time.perf_counter() - t) * 1000)
            out[name] = {
                "p50_ms": stats.percentile(times, 50),
                "p95_ms": stats.percentile(times, 95),
            }
    return out


def summarize(rounds: dict[str, list[dict[str, dict[str, float]]]]) -> dict[str, Any]:
    """Per read and size: median across rounds; targets for the flat reads."""
    sizes = list(rounds)
    by_read: dict[str, dict[str, Any]] = {}
    for size in sizes:
        for name in rounds[size][0]:
            per = [r[name] for r in rounds[size]]
            by_read.setdefault(name, {})[size] = stats.across_rounds(per)
    targets = {}
    for name in FLAT:
        lo, hi = by_read[name][sizes[0]]["p50_ms"], by_read[name][sizes[-1]]["p50_ms"]
        worst = max(by_read[name][s]["p50_ms"] for s in sizes)
        targets[name] = {
            "max_p50_ms": worst,
            "ratio": hi / lo if lo else None,
            "met": worst < TARGET_MS and (lo == 0 or hi / lo <= TARGET_RATIO),
        }
    return {
        "reads": by_read,
        "targets": targets,
        "target": f"< {TARGET_MS:g} ms, <= {TARGET_RATIO:g}x",
    }


def table(res: dict[str, Any]) -> str:
    reads_ = res["reads"]
    sizes = list(next(iter(reads_.values())))
    head = " | ".join(f"{int(s):,} rows p50 ms" for s in sizes)
    lines = [f"| read | {head} | 1M / 0 | met |", "|---" * (len(sizes) + 3) + "|"]
    for name, per in reads_.items():
        cells = [f"{per[s]['p50_ms']:.2f} ({per[s]['range']['p50_ms'][0]:.2f} to "
                 f"{per[s]['range']['p50_ms'][1]:.2f})" for s in sizes]  # fmt: skip
        t = res["targets"].get(name)
        ratio = per[sizes[-1]]["p50_ms"] / per[sizes[0]]["p50_ms"]
        met = ("yes" if t["met"] else "no") if t else "(psql only)"
        lines.append(f"| {name} | {' | '.join(cells)} | {ratio:.2f}x | {met} |")
    return "\n".join(lines)
