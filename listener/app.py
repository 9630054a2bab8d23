"""Wiring: settings -> pool, handlers runtime, worker; signals; run-once."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from loguru import logger

from listener import db, telemetry
from listener.alerts import AlertMonitor
from listener.errors import ConfigError, redact
from listener.handlers import create_runtime
from listener.jobs import TABLES_BY_TYPE
from listener.migrate import check_schema
from listener.settings import Settings
from listener.worker import Periodic, Worker

RUNTIME_TICK_SECONDS = 2.0


def pool_size(settings: Settings) -> int:
    return min(10, settings.worker_concurrency + 3)


@asynccontextmanager
async def open_worker(
    settings: Settings, *, app: str = "ai-jobs worker", listen: bool = True
) -> AsyncIterator[Worker]:
    """A worker with its pool, its handlers and its periodic duties; closed in order."""
    dsn = db.require_dsn(settings.dsn)
    pool = db.make_pool(dsn, pool_size(settings), app=app)
    await pool.open(wait=False)
    runtime = await create_runtime(settings, pool)
    periodic: list[Periodic] = [(RUNTIME_TICK_SECONDS, runtime.tick, "handlers tick")]
    if listen:  # a long-running worker also watches the alert rules
        periodic.append(
            (settings.alert_interval_seconds, AlertMonitor(settings, pool).tick, "alerts")
        )
    worker = Worker(
        settings,
        pool,
        runtime.handlers,
        dsn=dsn,
        listen=listen,
        periodic=periodic,
        on_failure=telemetry.capture_job_failure,
    )
    try:
        yield worker
    finally:
        await runtime.aclose()
        await pool.close()
        telemetry.flush()


async def run_worker(settings: Settings) -> int:
    from listener.providers import NO_PROVIDER, configured

    if not configured(settings):  # it would send every job to the dead letter
        raise ConfigError(f"{NO_PROVIDER}; the worker does not start without one")
    async with open_worker(settings) as worker:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, worker, sig)
        logger.bind(action="worker_config").info(
            f"database {redact(worker.dsn)}; sweep every {settings.sweep_interval_seconds:g}s, "
            f"stale after {settings.stale_after_seconds:g}s"
        )
        await worker.run()
    return 0


def _on_signal(worker: Worker, sig: signal.Signals) -> None:
    logger.bind(action="signal", signal=sig.name).info(f"{sig.name}: stopping")
    worker.request_stop()


async def run_once(settings: Settings, job_type: str | None) -> tuple[int, dict[str, Any]]:
    """The runbook's "Manual Job Trigger": process one due job now, here."""
    table = TABLES_BY_TYPE[job_type] if job_type else None
    async with open_worker(settings, app="ai-jobs run-once", listen=False) as worker:
        async with worker.pool.connection() as conn:
            await check_schema(conn)
        ran = await worker.run_one(table)
        if ran is None:
            return 0, {"processed": False, "message": "No pending jobs"}
        job, outcome = ran
        if outcome is None:
            async with worker.pool.connection() as conn:
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
