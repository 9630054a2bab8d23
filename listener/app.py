"""Wiring: settings -> handlers runtime, pool, worker; signals; run-once.

Configuration errors stop the process before the pool opens: the handlers
(providers, storage) are built first, then the start-up checks run (preflight.py:
settings that contradict each other, a database that cannot be reached, storage
that cannot be written), and the pool is closed on every way out."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from loguru import logger

from listener import dal, db, preflight, telemetry, tracing
from listener.alerts import AlertMonitor
from listener.batches import setup as setup_batches
from listener.errors import ConfigError
from listener.handlers import Runtime, create_runtime
from listener.jobs import TABLES_BY_TYPE
from listener.migrate import check_schema
from listener.run_once import run_one
from listener.settings import Settings
from listener.worker import Periodic, Worker

RUNTIME_TICK_SECONDS = 2.0


def pool_size(settings: Settings) -> int:
    return min(10, settings.worker_concurrency + 3)


@asynccontextmanager
async def open_runtime(
    settings: Settings, *, app: str
) -> AsyncIterator[tuple[str, db.WorkPool, Runtime]]:
    """The DSN, the work pool and the handlers' runtime; closed in order."""
    dsn = db.require_dsn(settings.dsn)
    tracing.setup(app)  # only when OTEL_EXPORTER_OTLP_ENDPOINT is set
    listen = settings.listen_mode == "listen"
    pool = db.make_pool(dsn, pool_size(settings), app=app, prepare=listen)  # not open yet
    runtime = await create_runtime(settings, pool, announce=False, start=False)
    runtime.catalog.rides = True  # the completions carry the catalog rows
    try:
        await preflight.run(settings, dsn, runtime.storage)
        await pool.open(wait=False)
        yield dsn, pool, runtime
    finally:
        try:
            await runtime.aclose()
        finally:
            await pool.close()
            telemetry.flush()
            tracing.shutdown()


@asynccontextmanager
async def open_worker(settings: Settings, *, app: str = "ai-jobs worker") -> AsyncIterator[Worker]:
    """A worker with its pool, its handlers and its periodic duties: it listens
    (LISTEN_MODE=listen) or polls, and watches the alert rules."""
    async with open_runtime(settings, app=app) as (dsn, pool, runtime):
        batches = setup_batches(settings, pool, runtime)  # batch jobs (listener/batches/)
        periodic: list[Periodic] = [
            (RUNTIME_TICK_SECONDS, runtime.tick, "handlers tick"),
            (settings.alert_interval_seconds, AlertMonitor(settings, pool).tick, "alerts"),
            (batches.tick_seconds, batches.tick, "batches"),
        ]
        worker = Worker(
            settings,
            pool,
            runtime.handlers,
            dsn=dsn,
            listen=settings.listen_mode == "listen",
            periodic=periodic,
            on_failure=telemetry.capture_job_failure,
            on_ready=lambda: _ready(settings, runtime, dsn, long_running=True),
            gate=runtime.chain.gate,
        )
        batches.attach(worker.id, worker.executor, worker.completer)
        worker.producer.batch_tables = batches.tables  # claimed while a quota holds the rest
        try:
            yield worker
        finally:
            await batches.aclose()


async def _ready(settings: Settings, runtime: Runtime, dsn: str, long_running: bool) -> None:
    """Once the schema is known to be current: the handlers' own start-up, then
    what this worker runs with."""
    await runtime.start()
    runtime.announce()
    if not long_running:
        return
    logger.bind(action="worker_config").info(
        f"database {db.describe(dsn)}; sweep every {settings.sweep_interval_seconds:g}s, "
        f"stale after {settings.stale_after_seconds:g}s, LISTEN_MODE={settings.listen_mode}"
    )


async def run_worker(settings: Settings) -> int:
    from listener.providers import NO_PROVIDER, configured

    if not configured(settings):  # it would send every job to the dead letter
        raise ConfigError(f"{NO_PROVIDER}; the worker does not start without one")
    async with open_worker(settings) as worker:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, worker, sig)
        await worker.run()
    return 0


def _on_signal(worker: Worker, sig: signal.Signals) -> None:
    logger.bind(action="signal", signal=sig.name).info(f"{sig.name}: stopping")
    worker.request_stop()


async def run_once(settings: Settings, job_type: str | None) -> tuple[int, dict[str, Any]]:
    """The runbook's "Manual Job Trigger": process one due job now, here."""
    table = TABLES_BY_TYPE[job_type] if job_type else None
    async with open_runtime(settings, app="ai-jobs run-once") as (dsn, pool, runtime):
        async with pool.connection() as conn:
            await check_schema(conn)
        await _ready(settings, runtime, dsn, long_running=False)
        ran = await run_one(
            settings, pool, runtime.handlers, table, on_failure=telemetry.capture_job_failure
        )
        if ran is None:
            return 0, {"processed": False, "message": "No pending jobs"}
        job, outcome = ran
        if outcome is None:
            async with pool.connection() as conn:
                row = await dal.JOB_STATE.one(conn, {"id": job.id})
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
