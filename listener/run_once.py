"""`ai-jobs run-once` (the runbook's "Manual Job Trigger"): claim one due job and
run it here to its written end, with the executor, the lease keeper and the
completer a worker uses, and none of the worker's loop."""

from __future__ import annotations

import asyncio
from typing import Any

from listener import dal
from listener.completer import Completer
from listener.executor import Executor, FailureHook
from listener.jobs import HandlerMap, Job, Outcome
from listener.leases import LeaseKeeper
from listener.outage import AwayRetry, Health, Reporter
from listener.pacing import Pacing
from listener.registry import make_worker_id
from listener.settings import Settings


async def run_one(
    settings: Settings,
    pool: Any,
    handlers: HandlerMap,
    table: str | None,
    *,
    on_failure: FailureHook | None = None,
) -> tuple[Job, Outcome | None] | None:
    """Claim one due job (of `table`, or of either) and run it, with its heartbeat,
    until its end is written. None if no job was due; the outcome is None when
    the job did not finish (failed, deferred: its row says how)."""
    health = Health("database", pool=pool)
    retry = AwayRetry(health)
    leases = LeaseKeeper(
        pool,
        settings.heartbeat_interval_seconds,
        retry=retry,
        report=Reporter(health, settings),
        progress_interval=settings.progress_interval_seconds,
    )
    completer = Completer(pool, retry, backlog=1)
    executor = Executor(
        settings,
        pool,
        handlers,
        leases,
        completer,
        Pacing(1),
        retry=retry,
        on_due=lambda _: None,
        on_free=lambda: None,
        on_failure=on_failure,
    )
    params = {"table": table, "worker": make_worker_id(), "n": 1}
    row = await dal.CLAIM_JOBS.first(pool, params)
    if row is None:
        return None
    job = Job.from_claim(row)
    side = [
        asyncio.create_task(completer.run()),
        asyncio.create_task(leases.heartbeats()),
        asyncio.create_task(leases.progress_writes()),
    ]
    try:
        outcome = await executor.start(job)
        await completer.drain()
    finally:
        for t in side:
            t.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        await leases.progress_connection.aclose()
    return job, outcome
