"""The data-access layer: every named statement of listener/queries/*.sql, called
through one object of this module, with the type of its rows (listener/rows.py).

    rows = await dal.CLAIM_JOBS.all(pool, {"table": t, "worker": w, "n": 10})
    row = await dal.JOB_STATE.one(conn, {"id": job_id})
    await dal.WORKER_REMOVE.run(pool, {"id": worker_id})

A Query returns rows; a Statement returns none (or none anyone reads). Either
takes a connection or a pool (one connection for the call). Errors are
translated in one place (fetch: errors.translate). tests/integration/test_dal.py
checks that every `-- name:` has its object here, that every object is used, and
that each row type matches what PostgreSQL says the statement returns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any, Generic, TypeVar, cast

import psycopg
from psycopg_pool import AsyncConnectionPool

from listener import rows
from listener.errors import AiJobsError, translate

R = TypeVar("R")
Conn = psycopg.AsyncConnection[Any]
Target = Conn | AsyncConnectionPool[Any]
Params = Mapping[str, Any] | None
_PLACEHOLDER = re.compile(r"%\((\w+)\)[sbt]")


_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def named_statements(files: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Statements by their `-- name:` header, from (file name, text) pairs."""
    found: dict[str, str] = {}
    for filename, text in files:
        parts = _NAME.split(text)
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in found:
                raise KeyError(f"query {name!r} defined twice ({filename})")
            found[name] = body.strip()
    return found


@cache
def queries() -> dict[str, str]:
    """The statements of listener/queries/*.sql, by their `-- name:` header."""
    entries = sorted(resources.files("listener").joinpath("queries").iterdir(), key=str)
    return named_statements(
        (e.name, e.read_text(encoding="utf-8")) for e in entries if e.name.endswith(".sql")
    )


def sql(name: str) -> str:
    return queries()[name]


async def fetch(conn: psycopg.AsyncConnection[Any], name: str, params: Any = None) -> list[Any]:
    """Run a named statement and return its rows, with errors translated."""
    try:
        cur = await conn.execute(sql(name), params)
        return await cur.fetchall() if cur.description else []
    except psycopg.Error as exc:
        raise translate(exc) from exc


class Statement:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def sql(self) -> str:
        """The text, for a caller with a connection of its own kind (sync, LISTEN)."""
        return sql(self.name)

    def positional(self) -> tuple[bytes, list[str]]:
        """The text with $1, $2... for its named placeholders, in their order of
        first appearance, and the names in that order: for libpq's own calls
        (the worker's fast claim prepares its statement this way)."""
        order: list[str] = []

        def number(m: re.Match[str]) -> str:
            if m.group(1) not in order:
                order.append(m.group(1))
            return f"${order.index(m.group(1)) + 1}"

        return _PLACEHOLDER.sub(number, self.sql).replace("%%", "%").encode(), order

    async def run(self, target: Target, params: Params = None) -> None:
        await self._fetch(target, params)

    async def _fetch(self, target: Target, params: Params) -> list[Any]:
        if isinstance(target, AsyncConnectionPool):
            async with target.connection() as conn:
                return await fetch(conn, self.name, params)
        return await fetch(target, self.name, params)


def named(name: str) -> Statement:
    """The object of a statement known by its name (KeyError if there is none)."""
    found = globals().get(name.upper())
    if not isinstance(found, Statement):
        raise KeyError(f"no named statement {name!r}")
    return found


class Query(Statement, Generic[R]):
    def __init__(self, name: str, row: type[R]) -> None:
        super().__init__(name)
        self.row = row

    async def all(self, target: Target, params: Params = None) -> list[R]:
        return cast(list[R], await self._fetch(target, params))

    async def first(self, target: Target, params: Params = None) -> R | None:
        found = await self._fetch(target, params)
        return cast(R, found[0]) if found else None

    async def one(self, target: Target, params: Params = None) -> R:
        """The first row of a statement that always returns one (an aggregate)."""
        found = await self._fetch(target, params)
        if not found:
            raise AiJobsError(f"{self.name} returned no row")
        return cast(R, found[0])


# -- api.sql
API_AS_USER = Query("api_as_user", rows.AsUserRow)
API_CREATE_COURSE = Query("api_create_course", rows.CreatedJobRow)
API_CREATE_MEDIA = Query("api_create_media", rows.CreatedJobRow)
API_JOBS = Query("api_jobs", rows.ApiJobRow)
API_READ_AS_USERS = Query("api_read_as_users", rows.ApiReaderJobRow)
API_CHECK_ROLE = Query("api_check_role", rows.OkRow)
# -- budgets.sql
BUDGET_REJECTIONS = Query("budget_rejections", rows.CounterRow)
SET_DAILY_BUDGET = Statement("set_daily_budget")
COSTS = Query("costs", rows.CostRow)
# -- console.sql
FIND_JOBS = Query("find_jobs", rows.FoundJobRow)
BULK_JOBS = Query("bulk_jobs", rows.BulkRow)
JOB_DETAIL = Query("job_detail", rows.JobDetailRow)
JOB_ATTEMPTS = Query("job_attempts", rows.AttemptRow)
CHART_FINISHED = Query("chart_finished", rows.ChartFinishedRow)
CHART_FAILED = Query("chart_failed", rows.ChartFailedRow)
CHART_DEPTH = Query("chart_depth", rows.ChartDepthRow)
COST_BY_HOUR = Query("cost_by_hour", rows.HourlyCostRow)
COST_TOP_USERS = Query("cost_top_users", rows.TopUserCostRow)
# -- core.sql
MIGRATE_LOCK = Statement("migrate_lock")
CREATE_MIGRATIONS_TABLE = Statement("create_migrations_table")
APPLIED_MIGRATIONS = Query("applied_migrations", rows.MigrationRow)
RECORD_MIGRATION = Statement("record_migration")
SET_RATE_LIMIT = Statement("set_rate_limit")
SET_REQUEST_LIMITS = Statement("set_request_limits")
ENQUEUE_COURSE = Query("enqueue_course", rows.JobIdRow)
ENQUEUE_MEDIA = Query("enqueue_media", rows.JobIdRow)
QUEUE_DEPTH = Query("queue_depth", rows.QueueDepthRow)
QUEUE_PAUSES = Query("queue_pauses", rows.QueuePauseRow)
PAUSE_JOBS = Query("pause_jobs", rows.ChangedRow)
RESUME_JOBS = Query("resume_jobs", rows.ChangedRow)
CANCEL_JOB = Query("cancel_job", rows.CancelledRow)
FOLD_COUNTS = Query("fold_counts", rows.FoldedRow)
CLAIM_JOBS = Query("claim_jobs", rows.ClaimedRow)
CLAIM_JOB = Query("claim_job", rows.ClaimedRow)
CLAIM_DUE_JOB = Query("claim_due_job", rows.ClaimedRow)
CLAIM_BATCH = Query("claim_batch", rows.ClaimedRow)
CLAIM_MEDIA = Query("claim_media", rows.ClaimedRow)
HEARTBEAT_JOBS = Query("heartbeat_jobs", rows.JobIdRow)
PROGRESS_JOBS = Query("progress_jobs", rows.JobIdRow)
COMPLETE_JOBS = Query("complete_jobs", rows.JobIdRow)
COMPLETE_AND_CLAIM = Query("complete_and_claim", rows.ClaimedOrDoneRow)
FAIL_JOB = Query("fail_job", rows.FailedJobRow)
RELEASE_JOBS = Query("release_jobs", rows.JobIdRow)
MARK_STALE_JOBS = Query("mark_stale_jobs", rows.MarkedStaleRow)
RESCUE_STALE_JOBS = Query("rescue_stale_jobs", rows.RescuedRow)
MOVE_TO_DEAD_LETTER = Query("move_to_dead_letter", rows.DeadLetteredRow)
PURGE_OLD_JOBS = Query("purge_old_jobs", rows.DeletedRow)
REQUEUE_JOB = Statement("requeue_job")
FIND_JOB_TABLE = Query("find_job_table", rows.JobTableRow)
NEXT_JOB_DUE = Query("next_job_due", rows.NextDueRow)
MAX_RUNNING_PER_USER = Query("max_running_per_user", rows.CapRow)
KEEPALIVE = Statement("keepalive")
SERVER_TIME = Query("server_time", rows.ServerTimeRow)
IDLE_BACKENDS = Query("idle_backends", rows.PidRow)
LISTEN = Statement("listen")
NOTIFY = Statement("notify")
JOB_STATE = Query("job_state", rows.JobStateRow)
JOB_TRACE = Query("job_trace", rows.JobTraceRow)
# -- demo.sql
DEMO_JOBS = Query("demo_jobs", rows.DemoJobRow)
DEMO_DROP_DATABASE = Statement("demo_drop_database")
DEMO_CREATE_DATABASE = Statement("demo_create_database")
# -- handlers.sql
CATALOG_UPSERT = Statement("catalog_upsert")
CATALOG_RENDER_LOCK = Statement("catalog_render_lock")
CATALOG_ROWS = Query("catalog_rows", rows.CatalogRow)
COURSE_CACHE_LOOKUP = Query("course_cache_lookup", rows.CachedCourseRow)
STAGED_RESULTS = Query("staged_results", rows.StagedResultRow)
# -- ops.sql
STUCK_JOBS = Query("stuck_jobs", rows.StuckJobRow)
ALERT_VALUES = Query("alert_values", rows.AlertValuesRow)
RATE_LIMIT_REJECTIONS = Query("rate_limit_rejections", rows.CounterRow)
RECORD_COUNTER_SAMPLE = Statement("record_counter_sample")
COUNTER_BASELINE = Query("counter_baseline", rows.CounterRow)
PRUNE_COUNTER_SAMPLES = Statement("prune_counter_samples")
LIVE_DEPTH = Query("live_depth", rows.LiveDepthRow)
JOB_METRICS = Query("job_metrics", rows.JobMetricsRow)
RECENT_JOBS = Query("recent_jobs", rows.JobListRow)
DURATION_QUANTILES = Query("duration_quantiles", rows.DurationQuantilesRow)
PROVIDER_LATENCY = Query("provider_latency", rows.ProviderLatencyRow)
FAILURES_LAST_HOUR = Query("failures_last_hour", rows.FailuresRow)
LISTEN_EVENTS = Statement("listen_events")
LIST_JOBS = Query("list_jobs", rows.ListedJobRow)
RATE_LIMIT_USAGE = Query("rate_limit_usage", rows.RateLimitUsageRow)
ALERT_TRANSITION = Query("alert_transition", rows.AlertRuleRow)
# -- providers.sql
PROVIDER_STATES = Query("provider_states", rows.BreakerRow)
PROVIDER_FAILED = Query("provider_failed", rows.BreakerChangeRow)
PROVIDER_SUCCEEDED = Query("provider_succeeded", rows.BreakerChangeRow)
PROVIDER_PROBE = Query("provider_probe", rows.BreakerProbeRow)
PROVIDER_FORGET_AUTH = Query("provider_forget_auth", rows.ProviderRow)
DEFER_JOB = Query("defer_job", rows.DeferredJobRow)
QUOTA_RESERVE = Query("quota_reserve", rows.QuotaReserveRow)
QUOTA_SETTLE = Query("quota_settle", rows.QuotaSettleRow)
ADD_USAGE = Statement("add_usage")
ADD_CHARGES = Statement("add_charges")
ADD_CALL_HISTOGRAMS = Statement("add_call_histograms")
CALL_HISTOGRAMS = Query("call_histograms", rows.CallHistogramRow)
PROVIDERS_REFUSING_AUTH = Query("providers_refusing_auth", rows.CountRow)
PROVIDER_BREAKERS = Query("provider_breakers", rows.BreakerOpenRow)
USAGE_TOTALS = Query("usage_totals", rows.UsageTotalRow)
# -- batches.sql
BATCH_TAKE = Query("batch_take", rows.BatchTakeRow)
BATCH_SUBMITTING = Query("batch_submitting", rows.BatchJobRow)
BATCH_SUBMITTED = Query("batch_submitted", rows.BatchSubmittedRow)
BATCH_WATCH = Query("batch_watch", rows.BatchWatchRow)
BATCH_JOBS = Query("batch_jobs", rows.ClaimedRow)
BATCH_LET_GO = Statement("batch_let_go")
BATCH_RECORDED = Query("batch_recorded", rows.BatchRecordedRow)
BATCH_END = Query("batch_end", rows.BatchEndRow)
BATCHES_OPEN = Query("batches_open", rows.BatchOpenRow)
BATCH_KNOWN = Query("batch_known", rows.BatchKnownRow)
BATCH_FIT = Query("batch_fit", rows.BatchFitRow)
BATCH_REFUSED = Query("batch_refused", rows.BatchRefusedRow)
# -- workers.sql
WORKER_BEAT = Statement("worker_beat")
WORKER_REMOVE = Statement("worker_remove")
WORKERS_EXPIRE = Query("workers_expire", rows.WorkerIdRow)
WORKERS_LIST = Query("workers_list", rows.WorkerRow)
WORKER_ALERT_VALUES = Query("worker_alert_values", rows.WorkerAlertValuesRow)
# -- schema.sql
SCHEMA_DROP_DATABASE = Statement("schema_drop_database")
SCHEMA_CREATE_DATABASE = Statement("schema_create_database")
SCHEMA_TABLES = Query("schema_tables", rows.SchemaTableRow)
SCHEMA_COLUMNS = Query("schema_columns", rows.SchemaColumnRow)
SCHEMA_CONSTRAINTS = Query("schema_constraints", rows.SchemaConstraintRow)
SCHEMA_INDEXES = Query("schema_indexes", rows.SchemaIndexRow)
SCHEMA_VIEWS = Query("schema_views", rows.SchemaViewRow)
SCHEMA_SEQUENCES = Query("schema_sequences", rows.SchemaSequenceRow)
SCHEMA_FUNCTIONS = Query("schema_functions", rows.SchemaFunctionRow)
SCHEMA_TRIGGERS = Query("schema_triggers", rows.SchemaTriggerRow)
SCHEMA_POLICIES = Query("schema_policies", rows.SchemaPolicyRow)
