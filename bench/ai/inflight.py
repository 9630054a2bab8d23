"""Many calls in flight in one worker process: WORKER_CONCURRENCY=500, a fake whose
answers take minutes (a slow stream: 10 tokens/s, 3,000-4,000 tokens, 20 tokens an
event) and whose quotas are never reached. 50 jobs, then 500: at each plateau, over
`hold` seconds, the worker's RSS and CPU and the database work it causes (its
transactions per second: heartbeats and the periodic duties, nothing else runs;
and the rows of ai_course_jobs it updates per second)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench import pgserver
from bench.ai import procs
from bench.queries import sql

CONCURRENCY = 500
HEARTBEAT = 5.0  # HEARTBEAT_INTERVAL_SECONDS: several intervals in each plateau
FAKE = [
    "--rpm", "1000000", "--tpm", "10000000000", "--window", "60",
    "--ttft", "0.5", "--tps", "10", "--size", "3000-4000", "--chunk", "20",
]  # fmt: skip


async def _read(url: str) -> dict[str, float]:
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=dict_row
    ) as conn:
        c = await (await conn.execute(sql("ai_db_counters"))).fetchone() or {}
        u = await (await conn.execute(sql("ai_course_updates"))).fetchone() or {}
        return {**c, "course_updates": u.get("n", 0.0)}


async def measure(srv: pgserver.Server, levels: tuple[int, ...], hold: float) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="ai-jobs-bench-inflight-"))
    dbname = "benchai_inflight"
    url = srv.create_database(dbname)
    fake = procs.Fake(FAKE, scratch / "fake.log")
    workers: procs.Workers | None = None
    try:
        await asyncio.to_thread(procs.migrate, procs.ROOT, url)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(sql("ai_unlimited_inserts"))
        env = procs.ai_jobs_env(
            url,
            fake.url,
            {
                "WORKER_CONCURRENCY": str(CONCURRENCY),
                "AI_MAX_OUTPUT_TOKENS": "4000",
                "AI_TIMEOUT_SECONDS": "900",
                "HEARTBEAT_INTERVAL_SECONDS": f"{HEARTBEAT:g}",
                "SHUTDOWN_GRACE_SECONDS": "1",
                "STORAGE_URL": str(scratch / "storage"),
                # Capped: metered from the first call. Without a cap, a model's limits
                # are learned from its first answer, 3 calls at a time until then:
                # minutes, with these answers.
                "PROVIDER_LIMITS": "openai=rpm:1000000,tpm:10000000000",
            },
        )
        workers = procs.start_ai_jobs(procs.ROOT, 1, env, scratch)
        pid = workers.pids[0]
        idle_rss = 0.0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and idle_rss == 0.0:
            workers.check_alive()
            await asyncio.sleep(1.0)
            idle_rss = procs.usage(pid)[1]
        await asyncio.sleep(5.0)  # started: imports done, pool open
        idle_rss = procs.usage(pid)[1]
        plateaus = []
        inserted = 0
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            for level in levels:
                k = level - inserted
                subjects = [f"Held call {inserted + i}" for i in range(k)]
                await conn.execute(
                    sql("ai_insert_jobs"), {"subjects": subjects, "users": [None] * k}
                )
                inserted = level
                t_fill = time.time()
                while int(fake.stats().get("in_flight", 0)) < level:
                    workers.check_alive()
                    if time.time() - t_fill > 120:
                        raise RuntimeError(f"{level} calls not in flight in 120 s")
                    await asyncio.sleep(0.5)
                fill_s = time.time() - t_fill
                await asyncio.sleep(HEARTBEAT * 2)  # the fill's own statements behind
                c0, (cpu0, _), t0 = await _read(url), procs.usage(pid), time.time()
                rss_max = 0.0
                flights = []
                while time.time() < t0 + hold:
                    await asyncio.sleep(1.0)
                    rss_max = max(rss_max, procs.usage(pid)[1])
                    flights.append(int(fake.stats().get("in_flight", 0)))
                # idle backends report their statistics within 10 s (PostgreSQL 15)
                await asyncio.sleep(11.0)
                c1, (cpu1, rss_end), t1 = await _read(url), procs.usage(pid), time.time()
                span = t1 - t0
                txns = (c1["commits"] + c1["rollbacks"]) - (c0["commits"] + c0["rollbacks"]) - 1
                plateaus.append(
                    {
                        "in_flight": level,
                        "in_flight_seen_min": min(flights) if flights else None,
                        "fill_seconds": round(fill_s, 1),
                        "rss_mb": round(max(rss_max, rss_end), 1),
                        "rss_mb_per_call_above_idle": round(
                            (max(rss_max, rss_end) - idle_rss) / level, 3
                        ),
                        "cpu_percent_of_a_core": round(100 * (cpu1 - cpu0) / span, 2),
                        "transactions_per_s": round(txns / span, 2),
                        "course_rows_updated_per_s": round(
                            (c1["course_updates"] - c0["course_updates"]) / span, 1
                        ),
                        "seconds": round(span, 1),
                    }
                )
                print(f"  in flight {level}: {plateaus[-1]}", flush=True)
        return {
            "worker_concurrency": CONCURRENCY,
            "heartbeat_interval_seconds": HEARTBEAT,
            "idle_rss_mb": round(idle_rss, 1),
            "fake": " ".join(FAKE),
            "plateaus": plateaus,
        }
    finally:
        if workers is not None:
            workers.stop()
        fake.stop()
        srv.drop_database(dbname)
        shutil.rmtree(scratch, ignore_errors=True)
