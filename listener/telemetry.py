"""Errors to Sentry when SENTRY_DSN is set (nothing is sent, or even set up, when it
is not). The worker calls capture_job_failure() for every failed attempt, tagged
as the runbook says: `function: ai-job-runner`, `request_id`, and the extras
jobId, courseId, retryCount and the error; while tracing is on, the attempt's
`trace_id` too (a tag, and the `otel` context with its span_id). Without
SENTRY_DSN the SDK is not even imported: a third of a second of every worker's
and command's start."""

from __future__ import annotations

import sys
from typing import Any

from loguru import logger

from listener import tracing
from listener.errors import ConfigError, Scrubber
from listener.jobs import Job
from listener.settings import Settings

FUNCTION_TAG = "ai-job-runner"


def init_sentry(settings: Settings) -> bool:
    """Set up the Sentry client once; True when errors will be sent."""
    if settings.sentry_dsn is None or not settings.sentry_dsn.get_secret_value():
        return False
    import sentry_sdk

    if sentry_sdk.is_initialized():
        return True
    scrub = Scrubber(settings.secrets())  # compiled once, for every event

    def before_send(event: Any, hint: Any) -> Any:
        return _scrub_event(event, scrub)

    try:
        sentry_sdk.init(
            dsn=settings.sentry_dsn.get_secret_value(),
            # Only what we capture on purpose: no auto-enabled framework or HTTP-client hooks.
            auto_enabling_integrations=False,
            before_send=before_send,
        )
    except sentry_sdk.utils.BadDsn as exc:  # never the DSN itself: it holds a key
        raise ConfigError(f"SENTRY_DSN is not a valid Sentry DSN ({exc})") from None
    logger.bind(action="sentry_enabled").info("errors are reported to Sentry")
    return True


def _client() -> Any | None:
    """The sentry_sdk module once a client is set up, else None."""
    sdk = sys.modules.get("sentry_sdk")
    return sdk if sdk is not None and sdk.is_initialized() else None


def capture_job_failure(job: Job, exc: BaseException) -> None:
    """Report one failed attempt (no-op without SENTRY_DSN)."""
    if (sdk := _client()) is None:
        return
    with sdk.new_scope() as scope:
        scope.set_tag("function", FUNCTION_TAG)
        # One id per attempt: the claim token is fresh for every claim of the job.
        scope.set_tag("request_id", str(job.claim_token))
        scope.set_tag("job_type", job.job_type)
        scope.set_extra("jobId", str(job.id))
        scope.set_extra("courseId", job.row.get("course_id"))
        scope.set_extra("retryCount", job.retry_count)
        scope.set_extra("maxRetries", job.max_retries)
        scope.set_extra("table", job.table)
        scope.set_extra("error", str(exc))
        if (found := tracing.ids()) is not None:  # the attempt's trace, while tracing is on
            scope.set_tag("trace_id", found[0])
            scope.set_context("otel", {"trace_id": found[0], "span_id": found[1]})
        scope.capture_exception(exc)


def flush(timeout: float = 2.0) -> None:
    if (sdk := _client()) is not None:
        sdk.flush(timeout=timeout)


def _scrub_event(value: Any, scrub: Scrubber) -> Any:
    """Every text of the event, however deep (message, exception values, frames'
    variables, extras, tags), through the scrubber of logs and job errors."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_event(v, scrub) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_event(v, scrub) for v in value]
    return value
