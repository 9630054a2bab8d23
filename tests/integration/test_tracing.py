"""Tracing (listener/tracing.py) with the SDK's in-memory exporter: a worker in
this process runs real handlers against the fake providers, the end-user API is
served by uvicorn; the spans, their tree and attributes, the client's trace
continued, error statuses, the logs' trace ids. Nothing built when unset: in a
fresh interpreter, the SDK is not even imported."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from loguru import logger
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from listener import logs, tracing
from listener.errors import ConfigError
from listener.handlers import create_runtime
from listener.settings import Settings
from tests.apitools import ALICE, bearer, serve
from tests.fakeai import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY, FakeAI
from tests.helpers import aconnect, await_until, connect, insert_course, insert_media
from tests.workers import FAST, running_worker

pytestmark = pytest.mark.timeout(60)

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACE_PARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def worker_settings(db_url: str, fake: FakeAI, tmp_path: Path, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "openai_api_key": FAKE_OPENAI_KEY,
        "openai_base_url": fake.openai_url,
        "anthropic_api_key": FAKE_ANTHROPIC_KEY,
        "anthropic_base_url": fake.anthropic_url,
        "ai_provider_priority": "openai,anthropic",
        "ai_timeout_seconds": 5,
        "allow_placeholder": False,
        "storage_url": str(tmp_path / "storage"),
        "cache_ttl_seconds": 0,
        "sentry_dsn": None,
        **FAST,
    }
    values.update(over)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def run_jobs(s: Settings, inserted: list[tuple[str, str]], statuses: set[str]) -> None:
    """Run a worker with the real handlers until every (table, id) has a status in
    `statuses`."""
    from listener import db

    pool = db.make_pool(s.dsn or "", 4)
    await pool.open()
    rt = await create_runtime(s, pool)
    try:
        async with running_worker(s, rt.handlers):

            async def ended() -> bool:
                async with await aconnect(s.dsn or "") as c:
                    for table, jid in inserted:
                        cur = await c.execute(f"select status from {table} where id = %s", [jid])
                        row = await cur.fetchone()
                        if row is None or row["status"] not in statuses:
                            return False
                return True

            await await_until(ended, timeout=30, what=f"jobs {statuses}")
    finally:
        await rt.aclose()
        await pool.close()


async def _true(value: bool) -> bool:
    return value


def by_name(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    pid = parent.context.span_id
    return [s for s in exporter.get_finished_spans() if s.parent and s.parent.span_id == pid]


async def test_a_course_job_continues_its_trace_parent(
    db_url: str, fake: FakeAI, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    with connect(db_url) as c:
        jid = insert_course(c, "Tides", trace_parent=TRACE_PARENT)
    await run_jobs(worker_settings(db_url, fake, tmp_path), [("ai_course_jobs", jid)], {"done"})

    (process,) = by_name(spans, "process ")
    assert process.name == "process ai_course_jobs" and process.kind == SpanKind.CONSUMER
    assert f"{process.context.trace_id:032x}" == CLIENT_TRACE
    assert process.parent is not None and f"{process.parent.span_id:016x}" == CLIENT_SPAN
    a = dict(process.attributes or {})
    assert a["messaging.system"] == "ai_jobs"
    assert a["messaging.destination.name"] == "ai_course_jobs"
    assert a["messaging.message.id"] == jid
    assert a["ai_jobs.attempt"] == 1 and a["ai_jobs.outcome"] == "done"
    assert isinstance(a["ai_jobs.queue_wait_ms"], float) and a["ai_jobs.queue_wait_ms"] >= 0
    assert process.status.status_code == StatusCode.UNSET

    under = {s.name: s for s in children(spans, process)}
    chat = under["chat gpt-4.1-mini"]
    assert chat.kind == SpanKind.CLIENT
    g: dict[str, Any] = dict(chat.attributes or {})
    assert g["gen_ai.operation.name"] == "chat"
    assert g["gen_ai.provider.name"] == "openai"
    assert g["gen_ai.request.model"] == "gpt-4.1-mini"
    assert g["gen_ai.response.model"]
    assert g["gen_ai.usage.input_tokens"] > 0 and g["gen_ai.usage.output_tokens"] > 0
    assert list(g["gen_ai.response.finish_reasons"]) == ["stop"]
    assert chat.status.status_code == StatusCode.UNSET
    # the answer streams: its first token is an event, once
    assert [e.name for e in chat.events] == ["first_token"]
    assert "storage write" in under and "catalog record" in under


async def test_a_failed_call_has_an_error_status_and_the_next_provider_its_span(
    db_url: str, fake: FakeAI, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    fake.modes["openai"] = "500"
    with connect(db_url) as c:
        jid = insert_course(c, "Tides")
    await run_jobs(worker_settings(db_url, fake, tmp_path), [("ai_course_jobs", jid)], {"done"})

    (process,) = by_name(spans, "process ")
    assert process.parent is None  # no trace_parent: a root
    calls = sorted(children(spans, process), key=lambda s: s.start_time or 0)
    calls = [s for s in calls if s.name.startswith("chat ")]
    assert [dict(s.attributes or {})["gen_ai.provider.name"] for s in calls] == [
        "openai",
        "anthropic",
    ]
    failed, answered = calls
    assert failed.status.status_code == StatusCode.ERROR
    assert dict(failed.attributes or {})["error.type"] == "500"
    assert answered.status.status_code == StatusCode.UNSET
    assert dict(answered.attributes or {})["gen_ai.response.finish_reasons"]  # Anthropic's
    assert dict(process.attributes or {})["ai_jobs.outcome"] == "done"


async def test_failed_and_dead_letter_attempts(
    db_url: str, fake: FakeAI, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    fake.modes.update(openai="500", anthropic="500")
    with connect(db_url) as c:
        jid = insert_course(c, "Tides", max_retries=2)
    s = worker_settings(db_url, fake, tmp_path, provider_breaker_threshold=100)
    await run_jobs(s, [("ai_course_jobs", jid)], {"dead_letter"})

    assert len(by_name(spans, "process")) == 2
    attempts = sorted(by_name(spans, "process"), key=lambda s: s.start_time or 0)
    got = [dict(p.attributes or {}) for p in attempts]
    assert [(a["ai_jobs.attempt"], a["ai_jobs.outcome"]) for a in got] == [
        (1, "failed"),
        (2, "dead_letter"),
    ]
    assert all(p.status.status_code == StatusCode.ERROR for p in attempts)
    # the message is the job's (scrubbed) error, never more than 200 characters
    assert "generation failed" in (attempts[0].status.description or "")


async def test_a_media_job_has_a_generate_content_span(
    db_url: str, fake: FakeAI, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    with connect(db_url) as c:
        jid = insert_media(c, "a red fox", "image")
    await run_jobs(worker_settings(db_url, fake, tmp_path), [("ai_media_jobs", jid)], {"done"})
    (process,) = by_name(spans, "process ")
    names = [s.name for s in children(spans, process)]
    assert any(n.startswith("generate_content ") for n in names), names
    assert "storage write" in names


async def test_log_records_carry_the_trace_and_span_ids(
    db_url: str, fake: FakeAI, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    records: list[dict[str, Any]] = []
    logger.configure(patcher=logs.scrubbing())
    sink = logger.add(lambda m: records.append(dict(m.record["extra"])), level="INFO")
    try:
        with connect(db_url) as c:
            jid = insert_course(c, "Tides", trace_parent=TRACE_PARENT)
        await run_jobs(worker_settings(db_url, fake, tmp_path), [("ai_course_jobs", jid)], {"done"})
    finally:
        logger.remove(sink)
        logger.configure(patcher=None)  # type: ignore[arg-type]
    mine = [r for r in records if r.get("job_id") == jid and r.get("action") == "job_done"]
    assert mine and mine[0]["trace_id"] == CLIENT_TRACE
    (process,) = by_name(spans, "process ")
    assert mine[0]["span_id"] == f"{process.context.span_id:016x}"
    outside = [r for r in records if r.get("action") == "worker_started"]
    assert all("trace_id" not in r for r in outside)


async def test_a_cancelled_job_says_so(
    db_url: str, fake: FakeAI, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    fake.modes["openai"] = "hang"
    with connect(db_url) as c:
        jid = insert_course(c, "Tides")
    s = worker_settings(db_url, fake, tmp_path, ai_provider_priority="openai")
    from listener import db

    pool = db.make_pool(s.dsn or "", 4)
    await pool.open()
    rt = await create_runtime(s, pool)
    try:
        async with running_worker(s, rt.handlers):
            await await_until(lambda: _true(bool(fake.requests)), what="the call sent")
            async with await aconnect(db_url) as c:
                await c.execute("select cancel_job(%s, 'ai_course_jobs')", [jid])
            await await_until(lambda: _true(bool(by_name(spans, "process"))), what="the span ended")
    finally:
        await rt.aclose()
        await pool.close()
    (process,) = by_name(spans, "process ")
    assert dict(process.attributes or {})["ai_jobs.outcome"] == "cancelled"


async def test_the_api_request_is_the_jobs_parent(
    db_url: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    async with (
        serve(db_url, storage_url=str(tmp_path)) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as client,
    ):
        # No context from the client: the request's span is a root, the job's parent.
        r = await client.post("/v1/jobs/course", headers=bearer(ALICE), json={"subject": "Tides"})
        assert r.status_code == 201
        first = r.json()["id"]
        # The W3C header continued.
        headers = {**bearer(ALICE), "traceparent": TRACE_PARENT}
        r = await client.post(
            "/v1/jobs/media", headers=headers, json={"prompt": "fox", "media_type": "image"}
        )
        assert r.status_code == 201
        second = r.json()["id"]
        # Headers that are not W3C: ignored (a new trace), never refused.
        for bad in ("00-zz-bad", TRACE_PARENT + "-" + "0" * 5000, "ff-" + TRACE_PARENT[3:]):
            headers = {**bearer(ALICE), "traceparent": bad}
            r = await client.post("/v1/jobs/course", headers=headers, json={"subject": "Moss"})
            assert r.status_code == 201
        # The body's trace_parent wins over the header.
        other = "00-11111111111111111111111111111111-2222222222222222-01"
        body = {"subject": "Ferns", "trace_parent": other}
        r = await client.post("/v1/jobs/course", headers=headers, json=body)
        assert r.status_code == 201
        fourth = r.json()["id"]

    servers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [s.name for s in servers] == [
        "POST /v1/jobs/course",
        "POST /v1/jobs/media",
        *["POST /v1/jobs/course"] * 4,
    ]
    async with await aconnect(db_url) as c:
        cur = await c.execute(
            "select id::text, trace_parent from ai_course_jobs union all"
            " select id::text, trace_parent from ai_media_jobs"
        )
        stored = {r["id"]: r["trace_parent"] for r in await cur.fetchall()}

    def own(span: ReadableSpan) -> str:  # the flags aside (sampled, random)
        return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}"

    assert servers[0].parent is None and stored[first][:-3] == own(servers[0])
    assert f"{servers[1].context.trace_id:032x}" == CLIENT_TRACE
    assert servers[1].parent is not None and f"{servers[1].parent.span_id:016x}" == CLIENT_SPAN
    assert stored[second][:-3] == own(servers[1])
    assert all(s.parent is None for s in servers[2:5])
    assert all(f"{s.context.trace_id:032x}" != CLIENT_TRACE for s in servers[2:5])
    assert f"{servers[5].context.trace_id:032x}" == "1" * 32
    assert stored[fourth][:-3] == own(servers[5])
    assert dict(servers[0].attributes or {})["http.response.status_code"] == 201


def test_nothing_is_built_or_imported_without_the_endpoint() -> None:
    code = (
        "import sys, asyncio\n"
        "from listener import tracing, worker, executor, app, logs\n"
        "from listener.web import api\n"
        "assert tracing.setup('test') is False and tracing.on is False\n"
        "assert tracing.traceparent() is None and tracing.ids() is None\n"
        "tracing.outcome('failed'); tracing.first_token(); tracing.link_batch('x')\n"
        "sdk = [m for m in sys.modules if m.startswith('opentelemetry.sdk')]\n"
        "assert not sdk, sdk\n"
        "print('ok')\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_an_unknown_protocol_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ConfigError, match="http/protobuf or grpc"):
        tracing.setup("test")
    assert tracing.on is False


def test_the_endpoint_variables() -> None:
    assert not tracing.configured({})
    assert not tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}
    assert not tracing.configured(off)
    assert tracing.protocol({}) == "http/protobuf"
    assert tracing.protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "grpc"
    assert tracing.protocol({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}) == "grpc"


async def test_spans_are_asyncio_safe(spans: InMemorySpanExporter) -> None:
    """Concurrent spans in concurrent tasks keep their own parents."""

    async def one(i: int) -> None:
        with tracing.span(f"outer {i}"):
            await asyncio.sleep(0.01)
            with tracing.span(f"inner {i}"):
                await asyncio.sleep(0.01)

    await asyncio.gather(*(one(i) for i in range(5)))
    done = {s.name: s for s in spans.get_finished_spans()}
    for i in range(5):
        inner, outer = done[f"inner {i}"], done[f"outer {i}"]
        assert inner.parent is not None and inner.parent.span_id == outer.context.span_id


async def test_sentry_events_carry_the_trace_id(
    db_url: str, fake: FakeAI, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    import json
    import uuid

    import sentry_sdk

    from listener import telemetry
    from listener.jobs import Job

    dsn = f"http://publickey@{fake.url.removeprefix('http://')}/42"
    s = worker_settings(db_url, fake, tmp_path, sentry_dsn=dsn)
    assert telemetry.init_sentry(s)
    try:
        job = Job("ai_course_jobs", uuid.uuid4(), uuid.uuid4(), 0, 3, {"course_id": "c"})
        with tracing.span("process ai_course_jobs") as current:
            telemetry.capture_job_failure(job, RuntimeError("boom"))
        telemetry.flush()
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)

    async def event() -> dict[str, Any] | None:
        for envelope in fake.envelopes:
            for line in envelope.splitlines():
                if line.startswith(b"{") and b'"exception"' in line:
                    return json.loads(line)  # type: ignore[no-any-return]
        return None

    ev = await await_until(event, timeout=5, what="the Sentry event")
    ctx = current.get_span_context()
    assert ev["tags"]["trace_id"] == f"{ctx.trace_id:032x}"
    assert ev["contexts"]["otel"] == {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
    }


async def test_the_hooks_first_token_and_link_batch(spans: InMemorySpanExporter) -> None:
    from listener.providers.base import Answer, Usage

    batch = "00-22222222222222222222222222222222-3333333333333333-01"

    async def streamed() -> Answer:
        await asyncio.sleep(0.01)
        tracing.first_token()
        tracing.first_token()  # once per call
        tracing.link_batch(batch, "batch_1")
        return Answer("{}", "gpt-4.1-mini-2025", Usage(10, 20, 0.0, 5))

    with tracing.span("process ai_course_jobs"):
        await tracing.provider_call("openai", "gpt-4.1-mini", "chat", streamed)
    tracing.first_token()  # outside a call: nothing
    (chat,) = by_name(spans, "chat ")
    assert [e.name for e in chat.events] == ["first_token"]
    ttft = dict(chat.events[0].attributes or {})["gen_ai.response.time_to_first_chunk"]
    assert isinstance(ttft, float) and ttft >= 0.005
    a: dict[str, Any] = dict(chat.attributes or {})
    assert a["gen_ai.response.model"] == "gpt-4.1-mini-2025"
    assert a["gen_ai.usage.cache_read.input_tokens"] == 5
    # outside an attempt, link_batch links the current span (here, the call's)
    (link,) = chat.links
    assert f"{link.context.trace_id:032x}" == "2" * 32
    assert dict(link.attributes or {}) == {"ai_jobs.batch.id": "batch_1"}


async def test_link_batch_in_an_attempt_links_the_attempt(spans: InMemorySpanExporter) -> None:
    import uuid

    from listener.jobs import Job

    job = Job("ai_media_jobs", uuid.uuid4(), uuid.uuid4(), 1, 3, {})
    batch = "00-22222222222222222222222222222222-3333333333333333-01"

    async def attempt() -> None:
        with tracing.span("inner"):
            tracing.link_batch(batch)

    # No database to read the job's trace_parent from: a root, never a failure.
    await tracing.process(None, job, attempt())  # type: ignore[arg-type]
    (process,) = by_name(spans, "process ")
    assert process.parent is None and [f"{x.context.span_id:016x}" for x in process.links] == [
        "3" * 16
    ]
    a = dict(process.attributes or {})
    assert a["ai_jobs.attempt"] == 2 and a["ai_jobs.outcome"] == "released"  # returned None
    assert not by_name(spans, "inner")[0].links


async def test_a_deferred_job_says_so(
    db_url: str, fake: FakeAI, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    fake.modes.update(openai="401", anthropic="401")  # both breakers open: the job waits
    with connect(db_url) as c:
        jid = insert_course(c, "Tides")
    s = worker_settings(db_url, fake, tmp_path)
    from listener import db

    pool = db.make_pool(s.dsn or "", 4)
    await pool.open()
    rt = await create_runtime(s, pool)
    try:
        async with running_worker(s, rt.handlers):
            await await_until(
                lambda: _true(bool(by_name(spans, "process"))), what="the attempt's end"
            )
    finally:
        await rt.aclose()
        await pool.close()
    (process,) = by_name(spans, "process ")
    assert dict(process.attributes or {})["ai_jobs.outcome"] == "deferred"
    assert dict(process.attributes or {})["messaging.message.id"] == jid
    assert process.status.status_code == StatusCode.UNSET
    calls = by_name(spans, "chat ")
    assert len(calls) == 2 and all(c.status.status_code == StatusCode.ERROR for c in calls)
    assert {dict(c.attributes or {})["error.type"] for c in calls} == {"401"}


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({}, "ai-jobs"),
        ({"OTEL_SERVICE_NAME": "courses"}, "courses"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,deployment.env=prod"}, "from-attrs"),
    ],
)
def test_the_service_name(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], name: str) -> None:
    for key in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    exporter = InMemorySpanExporter()
    tracing.setup("ai-jobs worker", exporter=exporter)
    try:
        with tracing.span("x"):
            pass
    finally:
        tracing.shutdown()
    (span,) = exporter.get_finished_spans()
    assert span.resource.attributes["service.name"] == name
    assert span.resource.attributes["process.command"] == "ai-jobs worker"


async def test_an_attempt_started_under_a_batchs_span_links_to_it(
    spans: InMemorySpanExporter,
) -> None:
    """listener/batches/watch.py starts the answered jobs under `batch results
    <provider>`: each attempt is a root of its own (or its trace_parent's child)
    with a link to the batch's span."""
    import uuid

    from listener.jobs import Job

    async def attempt() -> None:
        return None

    job = Job("ai_course_jobs", uuid.uuid4(), uuid.uuid4(), 0, 3, {})
    with tracing.span("batch results openai") as batch:
        await asyncio.create_task(tracing.process(None, job, attempt()))  # type: ignore[arg-type]
    (process,) = by_name(spans, "process ")
    assert process.parent is None
    assert process.context.trace_id != batch.get_span_context().trace_id
    (link,) = process.links
    assert link.context.span_id == batch.get_span_context().span_id
