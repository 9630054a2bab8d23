"""The typed rows of the named statements (listener/queries/*.sql), one TypedDict
per shape, in the order of the files. A row is the dict psycopg's dict_row made:
the types cost nothing at run time, and mypy checks every use of a column.

tests/integration/test_dal.py holds each of them to its statement's columns as
PostgreSQL describes them (names and types); nullability is stated here.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypedDict
from uuid import UUID

# -- api.sql


class AsUserRow(TypedDict):  # api_as_user
    role: str
    claims: str
    statement_timeout: str


class CreatedJobRow(TypedDict):  # api_create_course, api_create_media
    id: UUID
    status: str


class ApiJobRow(TypedDict):  # api_jobs
    id: UUID
    job_table: str
    status: str
    progress: dict[str, Any] | None
    partial_result: dict[str, Any] | None
    result_path: str | None
    error: str | None
    created_at: datetime
    completed_at: datetime | None


class ApiReaderJobRow(ApiJobRow):  # api_read_as_users
    reader: int


class OkRow(TypedDict):  # api_check_role
    ok: bool


# -- budgets.sql


class CounterRow(TypedDict):  # budget_rejections
    value: int


class CostRow(TypedDict):  # costs
    key: str
    jobs: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_usd: float
    unpriced: int


# -- console.sql


class JobListRow(TypedDict):  # recent_jobs
    job_table: str
    job_type: str
    id: UUID
    label: str
    status: str
    retry_count: int
    max_retries: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    duration_seconds: float | None
    provider: str | None


class FoundJobRow(JobListRow):  # find_jobs
    created_by: UUID | None


class BulkRow(TypedDict):  # bulk_jobs
    n: int


class JobDetailRow(TypedDict):  # job_detail
    job_table: str
    job_type: str
    id: UUID
    label: str
    status: str
    params: dict[str, Any] | None
    retry_count: int
    max_retries: int
    error: str | None
    created_by: UUID | None
    created_at: datetime
    run_after: datetime
    started_at: datetime | None
    last_heartbeat: datetime | None
    completed_at: datetime | None
    result_path: str | None
    metrics: dict[str, Any] | None
    worker_id: str | None
    course_id: str | None
    media_type: str | None


class AttemptRow(TypedDict):  # job_attempts
    attempt: int
    worker_id: str | None
    started_at: datetime
    ended_at: datetime | None
    outcome: str
    next_status: str | None
    error: str | None
    duration_seconds: float | None


class ChartFinishedRow(TypedDict):  # chart_finished
    t: datetime
    done: int
    p50: float | None
    p95: float | None
    wait_p50: float | None
    wait_p95: float | None


class ChartFailedRow(TypedDict):  # chart_failed
    t: datetime
    failed: int


class ChartDepthRow(TypedDict):  # chart_depth
    t: datetime
    pending: int
    processing: int


class HourlyCostRow(TypedDict):  # cost_by_hour
    hour: datetime
    provider: str | None
    jobs: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_usd: float


class TopUserCostRow(TypedDict):  # cost_top_users
    created_by: UUID | None
    jobs: int
    tokens: int
    cost_usd: float


# -- core.sql


class MigrationRow(TypedDict):  # applied_migrations
    version: int
    name: str


class JobIdRow(TypedDict):  # enqueue_course
    id: UUID


class QueueDepthRow(TypedDict):  # queue_depth
    job_table: str
    status: str
    count: int
    avg_duration_seconds: float | None


class QueuePauseRow(TypedDict):  # queue_pauses
    job_table: str
    paused: bool
    changed_at: datetime | None
    changed_by: str | None


class ChangedRow(TypedDict):  # pause_jobs
    changed: bool


class CancelledRow(TypedDict):  # cancel_job
    previous: str


class FoldedRow(TypedDict):  # fold_counts
    folded: int


class ClaimedRow(TypedDict):  # claim_jobs
    job_table: str
    id: UUID
    claim_token: UUID
    retry_count: int
    max_retries: int
    job: dict[str, Any]


class ClaimedOrDoneRow(ClaimedRow):  # complete_and_claim
    kind: str


class FailedJobRow(TypedDict):  # fail_job
    status: str
    retry_count: int
    due_in: float | None


class MarkedStaleRow(TypedDict):  # mark_stale_jobs
    job_id: UUID
    job_type: str
    stale_duration: timedelta


class RescuedRow(TypedDict):  # rescue_stale_jobs
    job_id: UUID
    job_type: str
    status: str


class DeadLetteredRow(TypedDict):  # move_to_dead_letter
    job_id: UUID
    job_type: str
    retry_count: int


class DeletedRow(TypedDict):  # purge_old_jobs
    deleted: int


class JobTableRow(TypedDict):  # find_job_table
    job_table: str


class NextDueRow(TypedDict):  # next_job_due
    seconds: float | None


class CapRow(TypedDict):  # max_running_per_user
    cap: int | None


class JobStateRow(TypedDict):  # job_state
    status: str
    error: str | None
    retry_count: int


class JobTraceRow(TypedDict):  # job_trace
    trace_parent: str | None
    batch: bool
    queue_wait_ms: float | None


# -- demo.sql


class DemoJobRow(TypedDict):  # demo_jobs
    kind: str
    id: UUID
    title: str
    status: str
    retry_count: int
    max_retries: int
    error: str | None
    result_path: str | None
    seconds: Decimal | None
    created_at: datetime


# -- handlers.sql


class CatalogRow(TypedDict):  # catalog_rows
    course_id: str
    job_id: UUID
    subject: str
    title: str
    description: str | None
    level: str | None
    language: str | None
    group_count: int
    item_count: int
    result_path: str
    provider: str
    model: str
    created_at: datetime
    updated_at: datetime


class CachedCourseRow(TypedDict):  # course_cache_lookup
    cache_key: str
    course_id: str
    job_id: UUID
    result_path: str
    provider: str
    model: str


class StagedResultRow(TypedDict):  # staged_results
    id: UUID
    token: UUID
    status: str | None
    running: bool
    result_path: str | None
    sha256: str | None
    superseded: bool


# -- ops.sql


class StuckJobRow(TypedDict):  # stuck_jobs
    job_table: str
    id: UUID
    label: str
    started_at: datetime | None
    last_heartbeat: datetime | None
    worker_id: str | None
    stale_for: timedelta


class AlertValuesRow(TypedDict):  # alert_values
    dead_letter_last_hour: int
    stale_processing: int
    pending_depth: int
    avg_processing_time: float | None
    failure_rate: float | None


class LiveDepthRow(TypedDict):  # live_depth
    pending: Decimal
    processing: Decimal


class JobMetricsRow(TypedDict):  # job_metrics
    job_type: str
    status: str
    count: int
    avg_duration_seconds: float | None


class DurationQuantilesRow(TypedDict):  # duration_quantiles
    job_type: str
    count: int
    sum: float | None
    p50: float | None
    p90: float | None
    p99: float | None


class ProviderLatencyRow(TypedDict):  # provider_latency
    provider: str
    count: int
    p50: float | None
    p90: float | None
    p99: float | None


class FailuresRow(TypedDict):  # failures_last_hour
    job_type: str
    count: int


class ListedJobRow(TypedDict):  # list_jobs
    job_table: str
    id: UUID
    label: str
    status: str
    retry_count: int
    max_retries: int
    heartbeat_age: timedelta | None
    last_activity: datetime | None
    error: str | None


class RateLimitUsageRow(TypedDict):  # rate_limit_usage
    job_table: str
    created_by: UUID
    jobs_last_hour: int
    rate_limit: int


class AlertRuleRow(TypedDict):  # alert_transition
    rule: str


# -- providers.sql


class BreakerRow(TypedDict):  # provider_states
    provider: str
    consecutive_failures: int
    open_until: datetime | None
    cooldown_kind: str | None
    cooldown_reason: str | None
    probe_until: datetime | None
    db_now: datetime


class BreakerChangeRow(BreakerRow):  # provider_failed
    transition: str | None


class BreakerProbeRow(BreakerRow):  # provider_probe
    probe: bool


class ProviderRow(TypedDict):  # provider_forget_auth
    provider: str


class DeferredJobRow(TypedDict):  # defer_job
    status: str
    retry_count: int
    counted: bool
    due_in: float | None


class QuotaReserveRow(TypedDict):  # quota_reserve
    granted: int
    wait_seconds: float | None
    metered: bool
    learning: bool
    too_big: bool


class QuotaSettleRow(TypedDict):  # quota_settle
    metered: bool


class CountRow(TypedDict):  # providers_refusing_auth
    count: int


class BreakerOpenRow(TypedDict):  # provider_breakers
    provider: str
    open: int


class UsageTotalRow(TypedDict):  # usage_totals
    provider: str
    model: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_usd: float


class CallHistogramRow(TypedDict):  # call_histograms
    metric: str
    operation: str
    provider: str
    model: str
    token_type: str
    counts: list[int]
    sum: float
    count: int


# -- workers.sql


class ServerTimeRow(TypedDict):  # server_time
    now: datetime


class PidRow(TypedDict):  # idle_backends
    pid: int


class WorkerIdRow(TypedDict):  # workers_expire
    id: str


class WorkerRow(TypedDict):  # workers_list
    id: str
    host: str
    pid: int
    started_at: datetime
    last_seen: datetime
    listener_state: str
    jobs_running: int
    version: str
    probe_seconds: float | None
    reconnects: int
    seen_seconds_ago: float


class WorkerAlertValuesRow(TypedDict):  # worker_alert_values
    listening: int
    deaf: int
    waiting: int


# -- schema.sql (`make schema`: listener/schema.py)


class SchemaTableRow(TypedDict):  # schema_tables
    name: str
    row_security: bool


class SchemaColumnRow(TypedDict):  # schema_columns
    table_name: str
    name: str
    type: str
    not_null: bool
    default_value: str | None
    identity: str
    generated: str


class SchemaConstraintRow(TypedDict):  # schema_constraints
    table_name: str
    name: str
    kind: str
    definition: str


class SchemaIndexRow(TypedDict):  # schema_indexes
    table_name: str
    name: str
    definition: str


class SchemaViewRow(TypedDict):  # schema_views
    name: str
    materialized: bool
    definition: str


class SchemaSequenceRow(TypedDict):  # schema_sequences
    name: str
    type: str
    start: int
    increment: int
    min_value: int
    max_value: int
    cache: int
    cycle: bool


class SchemaFunctionRow(TypedDict):  # schema_functions
    name: str
    arguments: str
    definition: str


class SchemaTriggerRow(TypedDict):  # schema_triggers
    table_name: str
    name: str
    definition: str


class SchemaPolicyRow(TypedDict):  # schema_policies
    table_name: str
    name: str
    permissive: bool
    command: str
    roles: list[str]
    using_expr: str | None
    check_expr: str | None


class BatchTakeRow(TypedDict):  # batch_take
    batch_id: UUID | None


class BatchJobRow(TypedDict):  # batch_submitting
    id: UUID
    claim_token: UUID
    retry_count: int
    max_retries: int
    job: dict[str, Any]


class BatchSubmittedRow(TypedDict):  # batch_submitted
    recorded: bool


class BatchWatchRow(TypedDict):  # batch_watch
    id: UUID
    job_table: str
    state: str
    provider: str | None
    model: str | None
    provider_batch_id: str | None
    age_seconds: float
    jobs: int


class BatchRecordedRow(TypedDict):  # batch_recorded
    state: str
    provider_batch_id: str | None


class BatchEndRow(TypedDict):  # batch_end
    returned: int


class BatchOpenRow(TypedDict):  # batches_open
    id: UUID
    job_table: str
    state: str
    provider: str | None
    model: str | None
    provider_batch_id: str | None
    worker_id: str | None
    created_at: datetime
    submitted_at: datetime | None
    jobs: int


class BatchKnownRow(TypedDict):  # batch_known
    provider_batch_id: str | None


class BatchFitRow(TypedDict):  # batch_fit
    kept: int
    units: int
    enqueued: int
    queue_limit: int | None
    moved: int
    direct: int


class BatchRefusedRow(TypedDict):  # batch_refused
    queue_limit: int | None
    paced: bool
    moved: int
    direct: int
