"""OpenTelemetry traces over OTLP, built only when OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set: `setup()` then imports the SDK, builds
its tracer provider with a batching exporter (OTEL_EXPORTER_OTLP_PROTOCOL:
http/protobuf by default, or grpc; every other OTEL_* variable as the SDK reads
it; OTEL_SERVICE_NAME defaults to ai-jobs) and sets `on`. Without it nothing is
built or imported, and the hot path checks `on` (a module attribute) and nothing
else: `if tracing.on: ...`.

What is traced (docs/observability.md):

- `process <table>` (consumer), one per attempt, a child of the job's
  trace_parent when it has one: messaging.* attributes, ai_jobs.attempt,
  ai_jobs.queue_wait_ms (created_at to the attempt's start) and
  ai_jobs.outcome (done, failed, dead_letter, deferred, cancelled, released);
- under it, `chat <model>` (or `generate_content <model>` for media) per provider
  call, with OpenTelemetry's GenAI attributes, the first token of a stream as an
  event (`first_token()`), an error status when the call failed;
- the result's storage write and the catalog record;
- `POST /v1/jobs/...` of the end-user API (server), whose context becomes the
  job's trace_parent, so that one trace runs from the request to the result;
- a batch job's link to its batch's span: the attempt that reads a batch's
  answer is started under the batch's `batch results <provider>` span and links
  to it (`link_batch()` links any other span the submitting code records).

Export runs in the SDK's own thread, batched: a collector that is down or slow
loses spans (logged by the SDK), never a job's time. Span texts never carry an
error's message (it may quote a prompt or a key): error.type names the failure.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from loguru import logger

from listener.errors import ConfigError

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from listener.jobs import Job

T = TypeVar("T")
P = ParamSpec("P")

on = False  # True once setup() built the tracer: the one thing the hot path checks
SERVICE_NAME = "ai-jobs"
PROTOCOLS = ("http/protobuf", "grpc")
SYSTEM = "ai_jobs"  # messaging.system
MAX_HEADER = 512  # a traceparent is 55 characters (version 00)
TRACE_QUERY_SECONDS = 1.0  # the job's trace_parent read: never holds a job longer

_provider: Any = None  # the SDK's TracerProvider
_tracer: Any = None
_stopped: dict[Any, str] = {}  # job id -> outcome, for a task cancelled on purpose
# The running provider call: when it was sent (monotonic), whether its first token came.
_CALL: ContextVar[list[Any] | None] = ContextVar("ai_jobs_call", default=None)
_ATTEMPT: ContextVar[Any] = ContextVar("ai_jobs_attempt", default=None)  # its process span


def configured(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces (OTEL_SDK_DISABLED=true: never)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(
        env.get(name, "").strip()
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def protocol(env: Mapping[str, str] = os.environ) -> str:
    chosen = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
        or "http/protobuf"
    )
    if chosen not in PROTOCOLS:
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={chosen[:40]!r} is not supported: "
            f"use {' or '.join(PROTOCOLS)}"
        )
    return chosen


def setup(app: str, *, exporter: Any = None) -> bool:
    """Build the tracer when the environment asks for traces (or a test passes its
    `exporter`: spans then go to it as each ends); True when tracing is on."""
    global on, _provider, _tracer
    if on:
        return True
    if exporter is None and not configured():
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    # The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; without a name, ours.
    resource = Resource.create({"process.command": app})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    # shutdown() stops it, bounded; the SDK's own exit hook would wait for a
    # collector that is away as long as its retries last.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        chosen = protocol()
        provider.add_span_processor(BatchSpanProcessor(_exporter(chosen)))
        _route_sdk_logs()
        trace.set_tracer_provider(provider)  # for any instrumentation a deployment adds
        logger.bind(action="tracing_enabled", protocol=chosen).info(
            "traces are exported over OTLP ({})", chosen
        )
    _provider, _tracer = provider, provider.get_tracer("ai-jobs")
    on = True
    return True


def _exporter(chosen: str) -> Any:
    if chosen == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc import trace_exporter as grpc

        return grpc.OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http import trace_exporter as http

    return http.OTLPSpanExporter()


class _ToLoguru(logging.Handler):
    """The SDK's complaints (a collector away: one per failed export) as our logs."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        transient = message.startswith("Transient error")  # one per retry: the end is logged
        level = "WARNING" if record.levelno >= logging.WARNING and not transient else "DEBUG"
        logger.bind(action="tracing_export", logger=record.name).log(level, message)


def _route_sdk_logs() -> None:
    sdk_log = logging.getLogger("opentelemetry")
    sdk_log.handlers = [_ToLoguru()]
    sdk_log.propagate = False
    sdk_log.setLevel(logging.WARNING)


def shutdown(timeout: float = 2.0) -> None:
    """Export what is left, for at most `timeout` seconds; tracing is off after.
    The SDK's exporter retries a collector that is away for longer than its own
    timeout says: it gets its own thread, and is left behind past `timeout`."""
    global on, _provider, _tracer
    provider, on, _provider, _tracer = _provider, False, None, None
    _stopped.clear()
    if provider is None:
        return

    def stop() -> None:
        try:
            provider.force_flush(int(timeout * 1000))
            provider.shutdown()
        except Exception as exc:  # never in the way of a process's exit
            logger.bind(action="tracing_export").warning("traces not all exported: {}", exc)

    thread = threading.Thread(target=stop, name="tracing shutdown", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        logger.bind(action="tracing_export").warning(
            "traces not all exported within {:g}s: the collector is away or slow", timeout
        )


# -- context ------------------------------------------------------------------------


def _parent(traceparent: str | None) -> Any:
    """The context a W3C traceparent names (None: a root)."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def traceparent() -> str | None:
    """The current span's context as a W3C traceparent (None without one)."""
    if not on:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


def ids() -> tuple[str, str] | None:
    """The current trace id and span id as hex (None outside a span)."""
    if not on:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def add_ids(extra: dict[str, Any]) -> None:
    """A log record's fields get the current trace_id and span_id (logs.py)."""
    found = ids()
    if found is not None:
        extra["trace_id"], extra["span_id"] = found


@contextmanager
def span(
    name: str, attributes: Mapping[str, Any] | None = None, kind: str = "internal"
) -> Iterator[Any]:
    """A span under the current one (call only when `on`)."""
    from opentelemetry.trace import SpanKind

    with _tracer.start_as_current_span(
        name,
        kind=SpanKind[kind.upper()],
        attributes=dict(attributes or {}),
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as exc:
            _failed(current, exc)
            raise


def traced(name: str) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """An async function in its own span `name` while tracing is on (storage
    writes, the catalog's record); off, a call through costs one flag check."""

    def wrap(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> T:
            if not on:
                return await fn(*args, **kwargs)
            with span(name):
                return await fn(*args, **kwargs)

        return run

    return wrap


def error_type(exc: BaseException) -> str:
    """A failure's low-cardinality name: the HTTP status, `timeout`, or the class."""
    import asyncio

    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return str(status)
    if isinstance(exc, TimeoutError) or type(exc).__name__ == "APITimeoutError":
        return "timeout"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return type(exc).__qualname__


@contextmanager
def server(
    method: str,
    route: str,
    header: str | None,
    given: str | None,
    client_errors: tuple[type[BaseException], ...] = (),
) -> Iterator[Any]:
    """An HTTP request's server span (call only when `on`), the child of the
    client's trace: `given` (the job's trace_parent in the body), else the
    request's `traceparent` header (one that is not W3C-valid starts a new
    trace). A refusal in `client_errors` is not the server's error."""
    from opentelemetry.trace import SpanKind

    if header is not None and len(header) > MAX_HEADER:
        header = None  # not a traceparent: never parsed
    parent = _parent(given or header)
    attributes = {"http.request.method": method, "http.route": route}
    with _tracer.start_as_current_span(
        f"{method} {route}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as exc:
            _failed(current, exc, status=not isinstance(exc, client_errors))
            raise


# -- attempts -----------------------------------------------------------------------


async def process(
    pool: AsyncConnectionPool[Any], job: Job, run: Awaitable[T], *, client: Any = None
) -> T:
    """Await `run` (the job's attempt) inside its `process <table>` span."""
    import asyncio

    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind

    found = await _job_trace(pool, job)
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.destination.name": job.table,
        "messaging.message.id": job.key,
        "ai_jobs.job_type": job.job_type,
        "ai_jobs.attempt": job.attempt,
    }
    # Started under another span (a batch's results, listener/batches/watch.py): a
    # link to it, not its child; the job's own trace_parent, if any, is the parent.
    links = []
    around = trace.get_current_span().get_span_context()
    if around.is_valid:
        links.append(trace.Link(around, {"ai_jobs.link": "batch"}))
    parent = context.Context()  # a root, unless the job continues a trace
    if found is not None:
        parent = _parent(found["trace_parent"]) or parent
        if found["queue_wait_ms"] is not None:
            attributes["ai_jobs.queue_wait_ms"] = round(found["queue_wait_ms"], 3)
        attributes["ai_jobs.batch"] = found["batch"]
    current = _tracer.start_span(
        f"process {job.table}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
    )
    token = context.attach(trace.set_span_in_context(current))
    attempt = _ATTEMPT.set(current)
    outcome: str | None = None
    try:
        result = await run
        outcome = "done" if result is not None else None
        return result
    except asyncio.CancelledError:
        outcome = _stopped.pop(job.id, "released")
        raise
    except BaseException as exc:  # execute() never raises but on cancellation
        current.set_attribute("error.type", error_type(exc))
        outcome = "failed"
        raise
    finally:
        _stopped.pop(job.id, None)
        if "ai_jobs.outcome" not in (current.attributes or {}):
            current.set_attribute("ai_jobs.outcome", outcome or "released")
        current.end()
        _ATTEMPT.reset(attempt)
        context.detach(token)


async def _job_trace(pool: AsyncConnectionPool[Any], job: Job) -> Any:
    """The job's trace_parent, batch flag and queue wait; None if the read failed
    (the span is then a root: tracing never fails a job)."""
    import asyncio

    from listener import dal

    try:
        async with asyncio.timeout(TRACE_QUERY_SECONDS):
            return await dal.JOB_TRACE.first(pool, {"table": job.table, "id": job.id})
    except Exception as exc:
        logger.bind(action="tracing_lookup", job_id=job.key).debug(
            "no trace context for the job: {}", exc
        )
        return None


def outcome(status: str, error: str | None = None) -> None:
    """How the running attempt ended (the executor's failure and deferral writes):
    the status the database returned (pending is a retry: failed) or `deferred`."""
    if not on:
        return
    from opentelemetry import trace
    from opentelemetry.trace import StatusCode

    current = trace.get_current_span()
    ended = "failed" if status == "pending" else status
    current.set_attribute("ai_jobs.outcome", ended)
    if ended in ("failed", "dead_letter"):
        current.set_status(trace.Status(StatusCode.ERROR, (error or ended)[:200]))


def stopped(job_id: Any, action: str) -> None:
    """A running job's task is about to be cancelled on purpose (leases.stop_job):
    cancelled by cancel_job, else taken away (released)."""
    if on:
        _stopped[job_id] = "cancelled" if action == "job_cancelled" else "released"


def link_batch(batch_traceparent: str, batch_id: str | None = None) -> None:
    """Link the running attempt's span (else the current one) to its batch's span
    (the W3C traceparent the batch's submission recorded). For the code that submits a provider's
    Batch API: call it inside the attempt, once the job's batch is known."""
    if not on:
        return
    from opentelemetry import trace

    parent = _parent(batch_traceparent)
    ctx = trace.get_current_span(parent).get_span_context()
    if ctx.is_valid:
        attributes = {"ai_jobs.batch.id": batch_id} if batch_id else None
        (_ATTEMPT.get() or trace.get_current_span()).add_link(ctx, attributes)


# -- provider calls ----------------------------------------------------------------


async def provider_call(
    provider: str, model: str, operation: str, call: Callable[[], Awaitable[T]]
) -> T:
    """One provider call in its GenAI span (`chat <model>`; chain.py's one place)."""
    from opentelemetry.trace import SpanKind

    attributes = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
    }
    with _tracer.start_as_current_span(
        f"{operation} {model}",
        kind=SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        started = _CALL.set([time.monotonic(), False])  # for first_token()
        try:
            result = await call()
        except BaseException as exc:
            _usage(current, getattr(exc, "usage", None))
            _failed(current, exc)
            raise
        finally:
            _CALL.reset(started)
        _usage(current, getattr(result, "usage", None))
        model_used = getattr(result, "model", None)
        if isinstance(model_used, str) and model_used:
            current.set_attribute("gen_ai.response.model", model_used)
        reason = getattr(result, "finish_reason", None)
        if isinstance(reason, str) and reason:
            current.set_attribute("gen_ai.response.finish_reasons", [reason])
        return result


def _usage(current: Any, usage: Any) -> None:
    if usage is None:
        return
    current.set_attribute("gen_ai.usage.input_tokens", int(usage.input_tokens))
    current.set_attribute("gen_ai.usage.output_tokens", int(usage.output_tokens))
    if usage.cached_input_tokens:
        current.set_attribute("gen_ai.usage.cache_read.input_tokens", usage.cached_input_tokens)
    if getattr(usage, "cache_write_tokens", 0):
        current.set_attribute("gen_ai.usage.cache_creation.input_tokens", usage.cache_write_tokens)


def _failed(current: Any, exc: BaseException, *, status: bool = True) -> None:
    """The span's `error.type`, and its status an error (unless `status` is
    False: a client's refusal is not the server's error)."""
    from opentelemetry import trace
    from opentelemetry.trace import StatusCode

    kind = error_type(exc)
    current.set_attribute("error.type", kind)
    if status:
        current.set_status(trace.Status(StatusCode.ERROR, kind))


def first_token() -> None:
    """A stream's first token arrived (call it from the streaming provider code):
    an event on the running provider call's span, with the time to first chunk."""
    if not on:
        return
    from opentelemetry import trace

    call = _CALL.get()
    if call is None or call[1]:
        return
    call[1] = True
    seconds = time.monotonic() - call[0]
    trace.get_current_span().add_event(
        "first_token", {"gen_ai.response.time_to_first_chunk": round(seconds, 6)}
    )
