"""The operators' one-shot operations (the runbook's "Common Operations").
Each takes an open connection and returns plain data; cli.py prints it."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb

from listener import dal, rows
from listener.errors import InvalidJob, JobNotFound

Conn = psycopg.AsyncConnection[dict[str, Any]]

TABLES = ("ai_course_jobs", "ai_media_jobs")
STATUSES = ("pending", "processing", "done", "failed", "dead_letter", "stale", "cancelled")
OTHER = "other"  # a status this code does not know (a newer schema): counted, not named
JOB_TYPES = {"course": "ai_course_jobs", "media": "ai_media_jobs"}


def parse_param(text: str) -> tuple[str, Any]:
    """K=V; V is read as JSON when it is JSON (12, true, "x"), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise InvalidJob(f"--param expects KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


async def enqueue_course(
    conn: Conn,
    subject: str,
    *,
    user: UUID | None = None,
    params: dict[str, Any] | None = None,
    max_retries: int = 3,
    course_id: str | None = None,
) -> UUID:
    row = await dal.ENQUEUE_COURSE.one(
        conn,
        {
            "subject": subject,
            "params": Jsonb(params or {}),
            "user": user,
            "max_retries": max_retries,
            "course_id": course_id,
        },
    )
    return row["id"]


async def enqueue_media(
    conn: Conn,
    prompt: str,
    media_type: str,
    *,
    user: UUID | None = None,
    params: dict[str, Any] | None = None,
    max_retries: int = 3,
    course_id: str | None = None,
) -> UUID:
    row = await dal.ENQUEUE_MEDIA.one(
        conn,
        {
            "prompt": prompt,
            "media_type": media_type,
            "params": Jsonb(params or {}),
            "user": user,
            "max_retries": max_retries,
            "course_id": course_id,
        },
    )
    return row["id"]


async def queue_depth(conn: Conn) -> dict[str, dict[str, int]]:
    """Jobs per table and status: every status of STATUSES, plus OTHER when some
    job has a status this code does not know. Live statuses are counted on their
    partial indexes, finished ones kept by the database as they change (sql/017):
    the cost does not grow with the history the tables keep."""
    depth = {t: dict.fromkeys(STATUSES, 0) for t in TABLES}
    for row in await dal.QUEUE_DEPTH.all(conn):
        status = row["status"] if row["status"] in STATUSES else OTHER
        counts = depth[row["job_table"]]
        counts[status] = counts.get(status, 0) + int(row["count"])
    return depth


async def paused(conn: Conn) -> dict[str, bool]:
    """Which job tables are paused (pause_jobs / resume_jobs)."""
    state = dict.fromkeys(TABLES, False)
    for row in await dal.QUEUE_PAUSES.all(conn):
        state[row["job_table"]] = bool(row["paused"])
    return state


async def set_paused(conn: Conn, table: str, pause: bool) -> bool:
    """Pause or resume one job table; True when this call changed it."""
    row = await (dal.PAUSE_JOBS if pause else dal.RESUME_JOBS).one(conn, {"table": table})
    return bool(row["changed"])


async def cancel(conn: Conn, job_id: UUID, table: str | None = None) -> tuple[str, str]:
    """cancel_job: returns the table and the status the job had."""
    table = table or await find_table(conn, job_id)
    row = await dal.CANCEL_JOB.one(conn, {"id": job_id, "table": table})
    return table, str(row["previous"])


async def find_table(conn: Conn, job_id: UUID) -> str:
    row = await dal.FIND_JOB_TABLE.first(conn, {"id": job_id})
    if row is None:
        raise JobNotFound(f"Job {job_id} not found in ai_course_jobs or ai_media_jobs")
    return row["job_table"]


async def requeue(conn: Conn, job_id: UUID, table: str | None = None) -> str:
    table = table or await find_table(conn, job_id)
    await dal.REQUEUE_JOB.run(conn, {"id": job_id, "table": table})
    return table


async def mark_stale(conn: Conn, stale_after_seconds: float) -> list[rows.MarkedStaleRow]:
    return await dal.MARK_STALE_JOBS.all(conn, {"seconds": stale_after_seconds})


async def dead_letter(conn: Conn) -> list[rows.DeadLetteredRow]:
    return await dal.MOVE_TO_DEAD_LETTER.all(conn)


async def purge(conn: Conn, days: float) -> int:
    row = await dal.PURGE_OLD_JOBS.one(conn, {"days": days})
    return row["deleted"]


async def stuck(conn: Conn, stale_after_seconds: float) -> list[rows.StuckJobRow]:
    """The runbook's "Find stuck jobs": processing jobs with an old heartbeat."""
    return await dal.STUCK_JOBS.all(conn, {"seconds": stale_after_seconds})


async def list_jobs(conn: Conn, status: str | None, limit: int) -> list[rows.ListedJobRow]:
    """Jobs of one status (or all), newest activity first: the runbook's diagnoses."""
    return await dal.LIST_JOBS.all(conn, {"status": status, "limit": limit})


async def rate_limit_usage(conn: Conn) -> list[rows.RateLimitUsageRow]:
    """Jobs per user and table in the last hour, with the enforced limit."""
    return await dal.RATE_LIMIT_USAGE.all(conn)


COST_GROUPS = ("model", "user", "day")


async def costs(conn: Conn, days: float, by: str) -> list[rows.CostRow]:
    """Tokens and USD of the done jobs created in the last `days`, from their
    metrics, per model ("provider model"), user or UTC day; the dearest first."""
    if by not in COST_GROUPS:
        raise InvalidJob(f"--by expects one of {', '.join(COST_GROUPS)}, got {by!r}")
    return await dal.COSTS.all(conn, {"days": days, "by": by})


async def workers(conn: Conn, live_seconds: float) -> list[rows.WorkerRow]:
    """The live worker processes (the registry, sql/012), oldest first."""
    return await dal.WORKERS_LIST.all(conn, {"live_seconds": live_seconds})
