"""The runbook's recommended alerts, and ours, evaluated against the live database.

`evaluate()` reads the rules' values (one query, the providers' breakers, the
rejection counters and the worker registry); `AlertMonitor.tick()` runs every
minute in the worker: it samples the rejection counters, evaluates, logs each
firing and resolved *transition* once, and posts those transitions to
ALERT_WEBHOOK_URL (Slack-compatible JSON) when set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import httpx
import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.registry import NO_WORKER_GRACE_SECONDS, live_seconds
from listener.settings import Settings

Conn = psycopg.AsyncConnection[dict[str, Any]]
Severity = Literal["critical", "warning"]

REJECTIONS = "rate_limit_rejections"  # counter name in ai_job_counter_samples
BUDGET_REJECTIONS = "budget_rejections"
# counter name in ai_job_counter_samples -> the query that reads its sequence
COUNTERS = {REJECTIONS: dal.RATE_LIMIT_REJECTIONS, BUDGET_REJECTIONS: dal.BUDGET_REJECTIONS}
WEBHOOK_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Rule:
    name: str
    severity: Severity
    setting: str | None  # the Settings field that holds the threshold (None: 0)
    summary: str  # what the alert means, for people
    unit: str = ""


RULES: tuple[Rule, ...] = (
    Rule(
        "dead_letter_last_hour",
        "critical",
        "alert_dead_letter_per_hour",
        "jobs moved to the dead letter in the last hour: investigate provider issues",
    ),
    Rule(
        "stale_processing",
        "critical",
        "alert_stale_processing",
        "processing jobs with a stale heartbeat: workers may be crashing",
    ),
    Rule(
        "pending_depth",
        "critical",
        "alert_pending_depth",
        "pending jobs: more worker capacity is needed",
    ),
    Rule(
        "avg_processing_time",
        "warning",
        "alert_avg_processing_seconds",
        "average processing time of the last hour: the provider may be slow",
        " s",
    ),
    Rule(
        "failure_rate",
        "warning",
        "alert_failure_rate_percent",
        "failed jobs in the last hour: check the provider status",
        " %",
    ),
    Rule(
        "rate_limit_violations",
        "warning",
        "alert_rate_limit_violations_per_hour",
        "inserts rejected by the rate limit in the last hour: user education needed",
    ),
    Rule(
        "provider_auth",
        "critical",
        None,
        "providers refusing our credentials or model (401/403/404): their jobs wait or "
        "fall through until the key or model is fixed",
    ),
    Rule(
        "budget_rejections",
        "warning",
        "alert_budget_rejections_per_hour",
        "inserts refused by the daily budget in the last hour: users at their cap",
    ),
    Rule(
        "no_worker",
        "critical",
        None,
        "jobs due for over a minute and no live worker listening: start `ai-jobs worker`",
    ),
    Rule(
        "worker_deaf",
        "warning",
        None,
        "workers whose LISTEN connection does not hear its probes: check the network or "
        "pooler between them and PostgreSQL",
    ),
)


@dataclass(frozen=True)
class Alert:
    rule: str
    severity: Severity
    firing: bool
    value: float | int | None  # None: nothing to measure yet (no job finished this hour)
    threshold: float | int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def summary(self) -> str:
        rule = RULE_BY_NAME[self.rule]
        value = "n/a" if self.value is None else f"{self.value:g}{rule.unit}"
        return f"{self.rule} = {value} (threshold {self.threshold:g}{rule.unit}): {rule.summary}"


RULE_BY_NAME = {r.name: r for r in RULES}


async def rejections_last_hour(conn: Conn, counter: str = REJECTIONS) -> int:
    """Rejections since the sample taken about an hour ago (or since the oldest
    sample; 0 while there is none)."""
    current = (await COUNTERS[counter].one(conn))["value"]
    base = await dal.COUNTER_BASELINE.first(conn, {"counter": counter})
    # A sequence only grows; a lower current value means it was reset by hand.
    return max(0, current - base["value"]) if base else 0


async def record_samples(conn: Conn) -> None:
    """Sample the rejection counters and the queue depth (the dashboard's chart),
    and drop samples nothing needs any more."""
    for counter, query in COUNTERS.items():
        current = (await query.one(conn))["value"]
        await dal.RECORD_COUNTER_SAMPLE.run(conn, {"counter": counter, "value": current})
    depth = await dal.LIVE_DEPTH.one(conn)
    for name, count in (("pending", depth["pending"]), ("processing", depth["processing"])):
        params = {"counter": f"queue_{name}", "value": int(count)}
        await dal.RECORD_COUNTER_SAMPLE.run(conn, params)
    await dal.PRUNE_COUNTER_SAMPLES.run(conn)


async def evaluate(conn: Conn, settings: Settings) -> list[Alert]:
    """Every rule, firing or not, in the runbook's order (critical ones first)."""
    row = await dal.ALERT_VALUES.one(conn, {"stale_seconds": settings.stale_after_seconds})
    workers = await dal.WORKER_ALERT_VALUES.one(
        conn, {"live_seconds": live_seconds(settings), "grace": NO_WORKER_GRACE_SECONDS}
    )
    values: dict[str, float | int | None] = {
        "dead_letter_last_hour": int(row["dead_letter_last_hour"]),
        "stale_processing": int(row["stale_processing"]),
        "pending_depth": int(row["pending_depth"]),
        "avg_processing_time": row["avg_processing_time"],
        "failure_rate": row["failure_rate"],
        "rate_limit_violations": await rejections_last_hour(conn),
        "provider_auth": (await dal.PROVIDERS_REFUSING_AUTH.one(conn))["count"],
        "budget_rejections": await rejections_last_hour(conn, BUDGET_REJECTIONS),
        "no_worker": 0 if workers["listening"] else int(workers["waiting"]),
        "worker_deaf": int(workers["deaf"]),
    }
    alerts = []
    for rule in RULES:
        threshold: float | int = getattr(settings, rule.setting) if rule.setting else 0
        value = values[rule.name]
        firing = value is not None and value > threshold
        alerts.append(Alert(rule.name, rule.severity, firing, value, threshold))
    return alerts


def any_critical(alerts: list[Alert]) -> bool:
    return any(a.firing and a.severity == "critical" for a in alerts)


def slack_message(alert: Alert, resolved: bool) -> dict[str, Any]:
    """Slack's incoming-webhook shape: `text` (which most other chat tools accept
    too) plus one coloured attachment."""
    icon = (
        ":white_check_mark:"
        if resolved
        else (":rotating_light:" if alert.severity == "critical" else ":warning:")
    )
    state = "RESOLVED" if resolved else f"FIRING ({alert.severity})"
    text = f"{icon} ai-jobs alert {state}: {alert.summary}"
    color = "good" if resolved else ("danger" if alert.severity == "critical" else "warning")
    return {
        "text": text,
        "attachments": [
            {
                "color": color,
                "fields": [
                    {"title": "rule", "value": alert.rule, "short": True},
                    {"title": "severity", "value": alert.severity, "short": True},
                    {"title": "value", "value": str(alert.value), "short": True},
                    {"title": "threshold", "value": str(alert.threshold), "short": True},
                ],
            }
        ],
    }


class AlertMonitor:
    """Evaluates the rules on each tick and reports transitions once.

    The worker calls `tick()` every 60 s. A rule that fires for an hour is logged
    and posted once when it starts firing and once when it resolves, not every
    minute. The state lives in ai_job_alert_state, so several workers (or a
    restarted one) report each transition once between them; `firing` mirrors it
    for this process.
    """

    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool[Any],  # of dict-row connections (db.make_pool)
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.firing: dict[str, Alert] = {}
        self._client = client
        self._log = logger.bind(action="alerts")

    async def tick(self) -> list[Alert]:
        """Sample, evaluate, report transitions; returns every rule's state.
        A database error propagates (the caller logs it and tries next minute)."""
        changed: list[Alert] = []
        async with self.pool.connection() as conn:
            await record_samples(conn)
            alerts = await evaluate(conn, self.settings)
            for alert in alerts:
                params = {"rule": alert.rule, "firing": alert.firing, "value": alert.value}
                if await dal.ALERT_TRANSITION.all(conn, params):
                    changed.append(alert)
        self.firing = {a.rule: a for a in alerts if a.firing}
        for alert in changed:
            if alert.firing:
                log = self._log.bind(
                    action="alert_firing",
                    rule=alert.rule,
                    severity=alert.severity,
                    value=alert.value,
                    threshold=alert.threshold,
                )
                if alert.severity == "critical":
                    log.error("alert firing: {}", alert.summary)
                else:
                    log.warning("alert firing: {}", alert.summary)
            else:
                self._log.bind(action="alert_resolved", rule=alert.rule, value=alert.value).info(
                    "alert resolved: {}", alert.summary
                )
            await self._post(alert, resolved=not alert.firing)
        return alerts

    async def _post(self, alert: Alert, resolved: bool) -> None:
        if self.settings.alert_webhook_url is None:
            return
        url = self.settings.alert_webhook_url.get_secret_value()
        try:
            if self._client is not None:
                response = await self._client.post(url, json=slack_message(alert, resolved))
            else:
                async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_SECONDS) as client:
                    response = await client.post(url, json=slack_message(alert, resolved))
            response.raise_for_status()
        except httpx.HTTPError as exc:
            # Never the URL: a Slack webhook URL is a credential.
            detail = (
                f"HTTP {exc.response.status_code}"
                if isinstance(exc, httpx.HTTPStatusError)
                else type(exc).__name__
            )
            self._log.bind(action="alert_webhook_failed", rule=alert.rule).warning(
                "could not post the alert to ALERT_WEBHOOK_URL: {}", detail
            )
