"""The operators' console beyond the runbook: find jobs, one job in full, bulk
actions, charts and cost. Each function takes an open connection and returns plain
data; the dashboard (listener/web) renders it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg

from listener import dal, ops
from listener.errors import InvalidJob, JobNotFound
from listener.rows import FoundJobRow

Conn = psycopg.AsyncConnection[dict[str, Any]]

PAGE_SIZE = 50
RANGES = {  # the time-range filter: jobs created within this long ago
    "1h": timedelta(hours=1),
    "24h": timedelta(days=1),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
BULK_ACTIONS = {  # action -> the statuses it applies to (sql/017's ai_job_bulk)
    "requeue": ("failed", "dead_letter", "stale", "cancelled"),
    "cancel": ("pending", "failed"),
    "delete": ("done", "dead_letter", "cancelled"),
}
CHART_WINDOWS = {  # window -> (length, bucket)
    "hour": (timedelta(hours=1), timedelta(minutes=1)),
    "day": (timedelta(days=1), timedelta(minutes=15)),
}


@dataclass(frozen=True)
class JobFilter:
    """What the job list shows, and what a bulk action applies to."""

    table: str | None = None
    status: str | None = None
    provider: str | None = None
    user: UUID | None = None
    range: str | None = None  # a key of RANGES: created within that long
    search: str | None = None

    @classmethod
    def parse(cls, params: Any) -> JobFilter:
        """From query or form parameters; raise InvalidJob with the reason."""

        def text(name: str) -> str | None:
            value = params.get(name)
            return value.strip() or None if isinstance(value, str) else None

        kind = text("type")
        if kind is not None and kind not in ops.JOB_TYPES:
            raise InvalidJob("type must be course or media")
        status = text("status")
        if status is not None and status not in ops.STATUSES:
            raise InvalidJob(f"status must be one of {', '.join(ops.STATUSES)}")
        when = text("range")
        if when is not None and when not in RANGES:
            raise InvalidJob(f"range must be one of {', '.join(RANGES)}")
        raw_user = text("user")
        try:
            user = UUID(raw_user) if raw_user else None
        except ValueError:
            raise InvalidJob("user must be a user's UUID") from None
        provider = text("provider")
        search = text("q")
        if (provider and len(provider) > 100) or (search and len(search) > 200):
            raise InvalidJob("provider or search text too long")
        table = ops.JOB_TYPES[kind] if kind else None
        return cls(table, status, provider, user, when, search)

    @property
    def active(self) -> bool:
        return any(asdict(self).values())

    def query(self) -> dict[str, str]:
        """Back to query parameters (for links and forms)."""
        kind = {v: k for k, v in ops.JOB_TYPES.items()}.get(self.table or "")
        pairs = {
            "type": kind,
            "status": self.status,
            "provider": self.provider,
            "user": str(self.user) if self.user else None,
            "range": self.range,
            "q": self.search,
        }
        return {k: v for k, v in pairs.items() if v}

    def sql_params(self) -> dict[str, Any]:
        after = datetime.now(UTC) - RANGES[self.range] if self.range else None
        return {
            "table": self.table,
            "status": self.status,
            "provider": self.provider,
            "user": self.user,
            "created_after": after,
            "created_before": None,
            "search": self.search,
        }

    def describe(self) -> str:
        parts = []
        if self.table:
            parts.append(f"{self.table.removeprefix('ai_').removesuffix('_jobs')} jobs")
        if self.status:
            parts.append(f"status {self.status.replace('_', ' ')}")
        if self.provider:
            parts.append(f"provider {self.provider}")
        if self.user:
            parts.append(f"user {self.user}")
        if self.range:
            parts.append(f"created in the last {self.range}")
        if self.search:
            parts.append(f"matching “{self.search}”")
        return ", ".join(parts) or "all jobs"

    def without_status(self) -> JobFilter:
        return replace(self, status=None)


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: the last row shown (created_at, id)."""

    created_at: datetime
    id: UUID

    def token(self) -> str:
        return f"{self.created_at.isoformat()}~{self.id}"

    @classmethod
    def parse(cls, token: str | None) -> Cursor | None:
        if not token:
            return None
        stamp, sep, raw_id = token.partition("~")
        try:
            when = datetime.fromisoformat(stamp)
            if not sep or when.tzinfo is None:
                raise ValueError
            return cls(when, UUID(raw_id))
        except ValueError:
            raise InvalidJob("after must be a page cursor from this list") from None


async def find(
    conn: Conn, f: JobFilter, after: Cursor | None = None, page_size: int = PAGE_SIZE
) -> tuple[list[FoundJobRow], Cursor | None]:
    """One page of jobs, newest first, and the cursor of the next page (None: last)."""
    params = f.sql_params() | {
        "cursor_created_at": after.created_at if after else None,
        "cursor_id": after.id if after else None,
        "page_size": page_size + 1,
    }
    rows = await dal.FIND_JOBS.all(conn, params)
    more = len(rows) > page_size
    rows = rows[:page_size]
    nxt = Cursor(rows[-1]["created_at"], rows[-1]["id"]) if more and rows else None
    return rows, nxt


async def bulk(conn: Conn, action: str, f: JobFilter, dry_run: bool) -> int:
    """requeue, cancel or delete what the filter selects; dry_run: how many would be."""
    if action not in BULK_ACTIONS:
        raise InvalidJob(f"action must be one of {', '.join(BULK_ACTIONS)}")
    params = f.sql_params() | {"action": action, "dry_run": dry_run}
    return (await dal.BULK_JOBS.one(conn, params))["n"]


def bulk_actions(f: JobFilter) -> list[str]:
    """The bulk actions that can apply to what the filter shows."""
    return [a for a, statuses in BULK_ACTIONS.items() if f.status is None or f.status in statuses]


async def job(conn: Conn, job_id: UUID) -> dict[str, Any]:
    """One job, whole, with its failed attempts (either table)."""
    found = await dal.JOB_DETAIL.first(conn, {"id": job_id})
    if found is None:
        raise JobNotFound(f"Job {job_id} not found in ai_course_jobs or ai_media_jobs")
    row: dict[str, Any] = dict(found)
    row["attempts"] = await dal.JOB_ATTEMPTS.all(conn, {"id": job_id, "table": found["job_table"]})
    return row


async def charts(conn: Conn, window: str) -> dict[str, Any]:
    """Series for the charts, aligned on one time axis (epoch seconds): jobs done
    and attempts failed per minute, queue depth, duration and wait quantiles."""
    if window not in CHART_WINDOWS:
        raise InvalidJob(f"window must be one of {', '.join(CHART_WINDOWS)}")
    length, bucket = CHART_WINDOWS[window]
    params = {"window": length, "bucket": bucket}
    finished: dict[datetime, Mapping[str, Any]] = {
        r["t"]: r for r in await dal.CHART_FINISHED.all(conn, params)
    }
    failed: dict[datetime, Mapping[str, Any]] = {
        r["t"]: r for r in await dal.CHART_FAILED.all(conn, params)
    }
    depth: dict[datetime, Mapping[str, Any]] = {
        r["t"]: r for r in await dal.CHART_DEPTH.all(conn, params)
    }
    step = bucket.total_seconds()
    now = datetime.now(UTC).timestamp()
    first = (now - length.total_seconds()) // step * step + step
    times = [first + i * step for i in range(int(length.total_seconds() // step))]
    per_minute = 60.0 / step
    keys = {datetime.fromtimestamp(t, UTC): t for t in times}
    series: dict[str, list[Any]] = {
        k: []
        for k in ("done", "failed", "pending", "processing", "p50", "p95", "wait_p50", "wait_p95")
    }
    for key in keys:
        fin, fail, dep = finished.get(key, {}), failed.get(key, {}), depth.get(key, {})
        series["done"].append(round(fin.get("done", 0) * per_minute, 3))
        series["failed"].append(round(fail.get("failed", 0) * per_minute, 3))
        series["pending"].append(dep.get("pending"))
        series["processing"].append(dep.get("processing"))
        for k in ("p50", "p95", "wait_p50", "wait_p95"):
            series[k].append(fin.get(k))
    # The window asked for, for the x-axis: the charts span it whatever the data.
    span = {"from": now - length.total_seconds(), "to": now}
    return {"window": window, "bucket_seconds": step, "t": times, **span, **series}


async def cost(conn: Conn, hours: int = 24, top: int = 10) -> dict[str, Any]:
    """Spend and tokens per hour and per provider, and the top users, over `hours`."""
    params = {"window": timedelta(hours=hours), "limit": top}
    by_hour = [
        {**r, "hour": r["hour"].isoformat()} for r in await dal.COST_BY_HOUR.all(conn, params)
    ]
    providers: dict[Any, dict[str, Any]] = {}  # by provider (None: metrics that name none)
    for r in by_hour:
        p = providers.setdefault(
            r["provider"],
            {"provider": r["provider"], "jobs": 0, "input_tokens": 0, "output_tokens": 0,
             "cached_input_tokens": 0, "cost_usd": 0.0},
        )  # fmt: skip
        for k in ("jobs", "input_tokens", "output_tokens", "cached_input_tokens", "cost_usd"):
            p[k] += r[k]
    now = datetime.now(UTC).timestamp()
    return {
        "hours": hours,
        "from": now - hours * 3600,  # the window, for the chart's x-axis
        "to": now,
        "by_hour": by_hour,
        "by_provider": sorted(providers.values(), key=lambda p: -p["cost_usd"]),
        "top_users": await dal.COST_TOP_USERS.all(conn, params),
        "total_usd": sum(p["cost_usd"] for p in providers.values()),
    }


async def open_batches(conn: Conn, limit: int = 20) -> list[dict[str, Any]]:
    """The provider batches not yet ended (batch jobs: listener/batches/), oldest first."""
    return [dict(r) for r in await dal.BATCHES_OPEN.all(conn, {"limit": limit})]
