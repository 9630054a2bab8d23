"""/metrics in the Prometheus text format, read from the database at scrape time.

The queue lives in PostgreSQL, so every web process reports the same numbers and
nothing is lost when one restarts. Durations and provider latency are quantiles
over the jobs finished in the last hour (gauges, since finished jobs are purged);
the rejection counter is a real, ever-growing counter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from listener import alerts, dal, ops
from listener.listen import LISTENING
from listener.providers.meter import (
    DURATION_BOUNDS,
    OPERATION_DURATION,
    TOKEN_BOUNDS,
    TOKEN_USAGE,
)
from listener.registry import LISTENER_STATES, live_seconds
from listener.settings import PROVIDERS, Settings

Conn = psycopg.AsyncConnection[dict[str, Any]]
QUANTILES = ("0.5", "0.9", "0.99")
# Every label value comes from a fixed set, never from a row: a client cannot make
# the scrape grow by writing new values. A provider not listed here is "other".
PROVIDER_LABELS = (*PROVIDERS, "placeholder", "cache")


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


async def collect(conn: Conn, settings: Settings) -> list[Metric]:
    depth = GaugeMetricFamily(
        "ai_jobs_queue_depth", "Jobs per table and status", labels=["table", "status"]
    )
    for table, statuses in (await ops.queue_depth(conn)).items():  # labels: fixed sets
        for status, count in statuses.items():
            depth.add_metric([table, status], count)

    paused = GaugeMetricFamily(
        "ai_jobs_paused", "1 while the job table is paused (pause_jobs)", labels=["table"]
    )
    for table, is_paused in (await ops.paused(conn)).items():
        paused.add_metric([table], int(is_paused))

    avg = GaugeMetricFamily(
        "ai_jobs_avg_duration_seconds",
        "Average completed_at - started_at per job type and status (as ai_job_metrics)",
        labels=["job_type", "status"],
    )
    for row in await dal.JOB_METRICS.all(conn):
        if row["avg_duration_seconds"] is not None and row["status"] in ops.STATUSES:
            avg.add_metric([row["job_type"], row["status"]], row["avg_duration_seconds"])

    duration = GaugeMetricFamily(
        "ai_jobs_job_duration_seconds",
        "Duration quantiles of the jobs done in the last hour",
        labels=["job_type", "quantile"],
    )
    done = GaugeMetricFamily(
        "ai_jobs_done_last_hour", "Jobs done in the last hour", labels=["job_type"]
    )
    for d in await dal.DURATION_QUANTILES.all(conn):
        done.add_metric([d["job_type"]], d["count"])
        for q, v in zip(QUANTILES, (d["p50"], d["p90"], d["p99"]), strict=True):
            if v is not None:
                duration.add_metric([d["job_type"], q], v)

    failures = GaugeMetricFamily(
        "ai_jobs_failures_last_hour",
        "Failed attempts of the last hour (those that ended in the dead letter included)",
        labels=["job_type"],
    )
    for f in await dal.FAILURES_LAST_HOUR.all(conn):
        failures.add_metric([f["job_type"]], f["count"])

    latency = GaugeMetricFamily(
        "ai_jobs_provider_latency_seconds",
        "Generation time quantiles per provider over the last hour (metrics.generationDurationMs). "
        "Deprecated: gen_ai_client_operation_duration_seconds; removed in the release after next",
        labels=["provider", "quantile"],
    )
    provider_jobs = GaugeMetricFamily(
        "ai_jobs_provider_jobs_last_hour",
        "Jobs done per provider in the last hour",
        labels=["provider"],
    )
    for lat in await dal.PROVIDER_LATENCY.all(conn, {"providers": list(PROVIDER_LABELS)}):
        provider_jobs.add_metric([lat["provider"]], lat["count"])
        for q, v in zip(QUANTILES, (lat["p50"], lat["p90"], lat["p99"]), strict=True):
            if v is not None:
                latency.add_metric([lat["provider"], q], v)

    rejections = CounterMetricFamily(
        "ai_jobs_rate_limit_rejections", "Inserts rejected by the rate limit since the start"
    )
    rejections.add_metric([], (await dal.RATE_LIMIT_REJECTIONS.one(conn))["value"])

    firing = GaugeMetricFamily(
        "ai_jobs_alert_firing", "1 while the alert rule fires", labels=["rule", "severity"]
    )
    value = GaugeMetricFamily(
        "ai_jobs_alert_value", "The alert rule's current value", labels=["rule"]
    )
    for alert in await alerts.evaluate(conn, settings):
        firing.add_metric([alert.rule, alert.severity], int(alert.firing))
        if alert.value is not None:
            value.add_metric([alert.rule], alert.value)

    return [
        depth,
        paused,
        avg,
        duration,
        done,
        failures,
        latency,
        provider_jobs,
        rejections,
        firing,
        value,
        *await _providers(conn),
        *await _workers(conn, settings),
    ]


async def _providers(conn: Conn) -> list[Metric]:
    """Spend and breakers. Labels come from bounded sets: the known providers, and
    the models the workers folded (configured or priced, else "other")."""
    tokens = CounterMetricFamily(
        "ai_jobs_tokens",
        "Tokens of every provider call (input includes cached_input). Deprecated: "
        "gen_ai_client_token_usage; removed in the release after next",
        labels=["provider", "model", "kind"],
    )
    cost = CounterMetricFamily(
        "ai_jobs_cost_usd",
        "Estimated USD of every provider call, at the list prices (pricing.py)",
        labels=["provider", "model"],
    )
    for row in await dal.USAGE_TOTALS.all(conn):
        labels = [row["provider"], row["model"]]
        tokens.add_metric([*labels, "input"], row["input_tokens"])
        tokens.add_metric([*labels, "cached_input"], row["cached_input_tokens"])
        tokens.add_metric([*labels, "output"], row["output_tokens"])
        cost.add_metric(labels, row["cost_usd"])
    breakers = GaugeMetricFamily(
        "ai_jobs_provider_breaker_open",
        "1 while the provider's breaker is not closed (open, or awaiting its probe)",
        labels=["provider"],
    )
    found = {r["provider"]: r["open"] for r in await dal.PROVIDER_BREAKERS.all(conn)}
    for provider in PROVIDERS:
        breakers.add_metric([provider], found.get(provider, 0))
    return [tokens, cost, breakers, *await _genai(conn)]


GENAI_LABELS = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]


async def _genai(conn: Conn) -> list[Metric]:
    """OpenTelemetry's GenAI client histograms (sql/028), under the names its
    conventions give them in Prometheus. Labels: bounded sets (providers, the
    folded models, two operations, two token types)."""
    usage = HistogramMetricFamily(
        "gen_ai_client_token_usage",
        "Tokens per provider call (gen_ai.client.token.usage)",
        labels=[*GENAI_LABELS, "gen_ai_token_type"],
    )
    duration = HistogramMetricFamily(
        "gen_ai_client_operation_duration_seconds",
        "Duration of each provider call, failed ones included (gen_ai.client.operation.duration)",
        labels=GENAI_LABELS,
    )
    for row in await dal.CALL_HISTOGRAMS.all(conn):
        if row["provider"] not in PROVIDERS:
            continue
        labels = [row["operation"], row["provider"], row["model"]]
        if row["metric"] == TOKEN_USAGE:
            family, bounds = usage, TOKEN_BOUNDS
            labels.append(row["token_type"])
        elif row["metric"] == OPERATION_DURATION:
            family, bounds = duration, DURATION_BOUNDS
        else:
            continue
        if len(row["counts"]) != len(bounds) + 1:
            continue  # written with other bounds
        buckets, total = [], 0
        for bound, n in zip([*map(_le, bounds), "+Inf"], row["counts"], strict=True):
            total += n
            buckets.append((bound, float(total)))
        family.add_metric(labels, buckets, row["sum"])
    return [usage, duration]


def _le(bound: float) -> str:
    return f"{bound:g}" if bound < 1e6 else str(int(bound))


async def _workers(conn: Conn, settings: Settings) -> list[Metric]:
    """The live workers (the registry), and what each reports of its listener.
    Worker ids as labels: bounded by the live processes, written by them alone."""
    rows = await ops.workers(conn, live_seconds(settings))
    count = GaugeMetricFamily(
        "ai_jobs_workers", "Live worker processes per listener state", labels=["listener_state"]
    )
    for state in LISTENER_STATES:
        count.add_metric([state], sum(r["listener_state"] == state for r in rows))
    up = GaugeMetricFamily(
        "ai_jobs_listener_up",
        "1 while the worker's LISTEN connection is up and hears its probes, else 0",
        labels=["worker"],
    )
    probe = GaugeMetricFamily(
        "ai_jobs_listen_probe_seconds",
        "Round trip of the worker's last probe: sent through its pool, heard on its LISTEN",
        labels=["worker"],
    )
    reconnects = CounterMetricFamily(
        "ai_jobs_reconnects", "LISTEN reconnects of the worker since it started", labels=["worker"]
    )
    for r in rows:
        up.add_metric([r["id"]], int(r["listener_state"] == LISTENING))
        if r["probe_seconds"] is not None:
            probe.add_metric([r["id"]], r["probe_seconds"])
        reconnects.add_metric([r["id"]], r["reconnects"])
    return [count, up, probe, reconnects]


def render(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)
