"""Wiring: settings -> pool, handlers runtime, worker; signals; run-once."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from loguru import logger

from listener import db, telemetry
from listener.alerts import AlertMonitor
from listener.errors import redact
from listener.handlers import create_runtime
from listener.jobs import TABLES_BY_TYPE, Job
from listener.migrate import check_schema
from listener.settings import Settings
from listener.worker import Running, Worker

RUNTIME_TICK_SECONDS = 2.0


def pool_size(settings: Settings) -> int:
    return min(10, settings.worker_concurrency + 3)


async def run_worker(settings: Settings) -> int:
    dsn = db.require_dsn(settings.dsn)
    pool = db.make_pool(dsn, pool_size(settings))
    await pool.open(wait=False)
    runtime = await create_runtime(settings, pool)
    worker = Worker(
        settings,
        pool,
        runtime.handlers,
        dsn=dsn,
        periodic=[
            (RUNTIME_TICK_SECONDS, runtime.tick, "handlers tick"),
            (settings.alert_interval_seconds, AlertMonitor(settings, pool).tick, "alerts"),
        ],
        on_failure=telemetry.capture_job_failure,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, worker, sig)
    logger.bind(action="worker_config").info(
        f"database {redact(dsn)}; sweep every {settings.sweep_interval_seconds:g}s, "
        f"stale after {settings.stale_after_seconds:g}s"
    )
    try:
        await worker.run()
    finally:
        await runtime.aclose()
        await pool.close()
        telemetry.flush()
    return 0


def _on_signal(worker: Worker, sig: signal.Signals) -> None:
    logger.bind(action="signal", signal=sig.name).info(f"{sig.name}: stopping")
    worker.request_stop()


async def run_once(settings: Settings, job_type: str | None) -> tuple[int, dict[str, Any]]:
    """The runbook's "Manual Job Trigger": process one due job now, here."""
    dsn = db.require_dsn(settings.dsn)
    pool = db.make_pool(dsn, 3, app="ai-jobs run-once")
    await pool.open(wait=True, timeout=15)
    runtime = await create_runtime(settings, pool)
    worker = Worker(
        settings,
        pool,
        runtime.handlers,
        dsn=dsn,
        listen=False,
        on_failure=telemetry.capture_job_failure,
    )
    table = TABLES_BY_TYPE[job_type] if job_type else None
    try:
        async with pool.connection() as conn:
            await check_schema(conn)
            rows = await db.fetch(conn, "claim_jobs", {"table": table, "worker": worker.id, "n": 1})
        if not rows:
            return 0, {"processed": False, "message": "No pending jobs"}
        job = Job.from_claim(rows[0])
        side = [
            asyncio.create_task(worker.completer.run()),
            asyncio.create_task(worker.heartbeats()),
        ]
        task = asyncio.create_task(worker.execute(job))
        worker.running[job.id] = Running(job, task)
        outcome = await task
        await worker.completer.drain()
        for t in side:
            t.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        if outcome is None:
            async with pool.connection() as conn:
                row = (await db.fetch(conn, "job_state", {"id": job.id}))[0]
            return 1, {
                "processed": True,
                "jobId": str(job.id),
                "status": row["status"],
                "error": row["error"],
            }
        return 0, {
            "processed": True,
            "jobId": str(job.id),
            "courseId": job.row.get("course_id"),
            "resultPath": outcome.result_path,
            "metrics": outcome.metrics,
        }
    finally:
        await runtime.aclose()
        await pool.close()
        telemetry.flush()
