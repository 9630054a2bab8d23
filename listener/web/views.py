"""What the dashboard shows: the data of one snapshot, and its HTML.

The same fragments (alerts, cards, rows) make the first page and every live
update, so a pushed update looks exactly like a reload. Fragments are the same for
every viewer (no per-session data in them), so one rendering serves every stream.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from jinja2 import Environment, PackageLoader, select_autoescape

from listener import alerts, dal, ops, registry
from listener.rows import JobMetricsRow
from listener.settings import Settings

Conn = psycopg.AsyncConnection[dict[str, Any]]

RECENT_LIMIT = 50
ALERTS_TTL_SECONDS = 10.0  # the rules scan an hour of jobs: not on every update
REQUEUE_STATUSES = ("failed", "dead_letter", "stale", "cancelled")  # the runbook's "When"
CANCEL_STATUSES = ("pending", "failed", "processing", "stale")  # cancel_job accepts these
JOB_TYPES = ("course", "media")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} m {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} m"


def _clock(value: datetime | None) -> str:
    return "—" if value is None else value.astimezone(UTC).strftime("%H:%M:%S")


def _iso(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).isoformat(timespec="seconds")


def _number(value: float | int | None) -> str:
    return "n/a" if value is None else f"{value:g}"


env = Environment(
    loader=PackageLoader("listener.web", "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
env.filters.update(duration=_duration, clock=_clock, iso=_iso, number=_number)


@dataclass
class Card:
    status: str
    count: int = 0
    by_type: dict[str, int] = field(default_factory=lambda: dict.fromkeys(JOB_TYPES, 0))
    avg_by_type: dict[str, float | None] = field(default_factory=dict)
    _total_seconds: float = 0.0
    _timed: int = 0

    @property
    def avg_seconds(self) -> float | None:
        return self._total_seconds / self._timed if self._timed else None


def cards(metric_rows: Sequence[JobMetricsRow]) -> list[Card]:
    """The runbook's metrics cards: count and average duration per status, with the
    split per job type (what the ai_job_metrics view says, read from sources that
    do not grow with history: sql/017)."""
    by_status = {s: Card(s) for s in ops.STATUSES}
    for row in metric_rows:
        card = by_status.get(row["status"])
        if card is None:
            continue
        count = int(row["count"])
        card.count += count
        card.by_type[row["job_type"]] = count
        avg = row["avg_duration_seconds"]
        card.avg_by_type[row["job_type"]] = avg
        if avg is not None:
            card._total_seconds += float(avg) * count
            card._timed += count
    return list(by_status.values())


class AlertCache:
    """The alert rules, re-evaluated at most every ALERTS_TTL_SECONDS."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._at = -ALERTS_TTL_SECONDS
        self._alerts: list[alerts.Alert] = []

    async def get(self, conn: Conn) -> list[alerts.Alert]:
        if time.monotonic() - self._at >= ALERTS_TTL_SECONDS:
            self._alerts = await alerts.evaluate(conn, self.settings)
            self._at = time.monotonic()
        return self._alerts


ROW_CONTEXT = {"requeue_statuses": REQUEUE_STATUSES, "cancel_statuses": CANCEL_STATUSES}


async def load(conn: Conn, alert_cache: AlertCache) -> dict[str, Any]:
    live = registry.live_seconds(alert_cache.settings)
    paused = await ops.paused(conn)
    return {
        "cards": cards(await dal.JOB_METRICS.all(conn)),
        "workers": await ops.workers(conn, live),
        "jobs": await dal.RECENT_JOBS.all(conn, {"limit": RECENT_LIMIT}),
        "alerts": await alert_cache.get(conn),
        "queues": [(t, JOB_TYPES_BY_TABLE[t], paused[t]) for t in ops.TABLES],
        "generated_at": datetime.now(UTC),
        "job_types": JOB_TYPES,
        **ROW_CONTEXT,
    }


JOB_TYPES_BY_TABLE = {v: k for k, v in ops.JOB_TYPES.items()}


def fragments(data: dict[str, Any]) -> dict[str, str]:
    """The parts of the page a live update replaces."""
    return {
        "alerts": env.get_template("_alerts.html").render(data),
        "cards": env.get_template("_cards.html").render(data),
        "workers": env.get_template("_workers.html").render(data),
        "rows": rows(data["jobs"]),
        "queues": env.get_template("_queues.html").render(data),
        "updated": _clock(data["generated_at"]),
    }


def rows(jobs: Sequence[Mapping[str, Any]], empty: str = "") -> str:
    return env.get_template("_rows.html").render(jobs=jobs, empty=empty, **ROW_CONTEXT)


def page(name: str, **context: Any) -> str:
    return env.get_template(name).render(context)
