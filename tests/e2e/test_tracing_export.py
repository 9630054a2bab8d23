"""Traces over OTLP from the real processes to a real receiver on 127.0.0.1
(tests/otlp.py decodes the protobuf): `ai-jobs web` and `ai-jobs worker` with
OTEL_EXPORTER_OTLP_ENDPOINT set, one trace from the API's POST to the stored
course; gRPC too; and a collector that is down or a nonsense endpoint, which
cost the jobs nothing and the worker's stop a bounded time."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.apitools import ALICE, SECRET, bearer
from tests.e2e.test_generation_worker import providers_env
from tests.fakeai import FakeAI
from tests.helpers import connect, free_port, insert_course, job, wait_until, web_process
from tests.otlp import Span, grpc_receiver, http_receiver
from tests.workers import WorkerProcess

pytestmark = pytest.mark.timeout(120)

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACE_PARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
ADMIN = "tracing-test-token-0123456789-abcdef"
# Export at once, not every 5 s: the test waits for the spans, not the schedule.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}


@contextlib.contextmanager
def web(db_url: str, tmp_path: Path, **extra: Any) -> Iterator[str]:
    with web_process(
        db_url, tmp_path / "web.log", 30, ADMIN_TOKEN=ADMIN, JWT_SECRET=SECRET, **extra
    ) as base:
        yield base


def one(spans: list[Span]) -> Span:
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


def test_one_trace_from_the_request_to_the_stored_course(
    db_url: str, fake: FakeAI, tmp_path: Path
) -> None:
    with http_receiver() as receiver:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **FAST_EXPORT}
        with web(db_url, tmp_path, **otel) as base:
            w = WorkerProcess(db_url, **providers_env(fake, **otel)).started()
            try:
                headers = {**bearer(ALICE), "traceparent": TRACE_PARENT}
                body = {"subject": "Tides"}
                r = httpx.post(f"{base}/v1/jobs/course", headers=headers, json=body)
                assert r.status_code == 201, r.text
                jid = r.json()["id"]
                with connect(db_url) as c:
                    wait_until(lambda: job(c, jid)["status"] == "done", what="course done")
                wait_until(lambda: receiver.named("process "), what="the attempt's span")
                wait_until(lambda: receiver.named("chat "), what="the provider call's span")
                wait_until(lambda: receiver.named("POST "), what="the request's span")
            finally:
                w.signal(signal.SIGTERM)
                assert w.wait() == 0
        done = w.wait_for("job_done")

    post = one(receiver.named("POST /v1/jobs/course"))
    process = one(receiver.named("process "))
    chat = one(receiver.named("chat "))
    assert post.service == process.service == "ai-jobs"
    # The client's trace, continued: its span -> the POST -> the attempt -> the call.
    assert post.trace_id == process.trace_id == chat.trace_id == CLIENT_TRACE
    assert post.parent_span_id == CLIENT_SPAN and post.kind == 2
    assert process.parent_span_id == post.span_id and process.kind == 5
    assert chat.parent_span_id == process.span_id and chat.kind == 3
    assert process.attributes["messaging.system"] == "ai_jobs"
    assert process.attributes["messaging.destination.name"] == "ai_course_jobs"
    assert process.attributes["messaging.message.id"] == jid
    assert process.attributes["ai_jobs.attempt"] == 1
    assert process.attributes["ai_jobs.outcome"] == "done"
    assert process.attributes["ai_jobs.queue_wait_ms"] >= 0
    assert chat.name == "chat gpt-4.1-mini"
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.provider.name"] == "openai"
    assert chat.attributes["gen_ai.request.model"] == "gpt-4.1-mini"
    assert chat.attributes["gen_ai.usage.input_tokens"] > 0
    assert chat.attributes["gen_ai.usage.output_tokens"] > 0
    assert chat.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert chat.events == ["first_token"]
    assert {s.name for s in receiver.spans if s.parent_span_id == process.span_id} >= {
        "chat gpt-4.1-mini",
        "storage write",
        "catalog record",
    }
    # The worker's JSON logs carry the attempt's ids.
    assert done["trace_id"] == CLIENT_TRACE and done["span_id"] == process.span_id


def test_grpc_and_a_failed_call(db_url: str, fake: FakeAI) -> None:
    fake.modes["openai"] = "500"
    with grpc_receiver() as receiver:
        otel = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_SERVICE_NAME": "courses-worker",
            **FAST_EXPORT,
        }
        w = WorkerProcess(db_url, **providers_env(fake, **otel)).started()
        try:
            with connect(db_url) as c:
                jid = insert_course(c, "Tides", trace_parent=TRACE_PARENT)
                wait_until(lambda: job(c, jid)["status"] == "done", what="course done")
            wait_until(lambda: len(receiver.named("chat ")) == 2, what="both calls' spans")
            wait_until(lambda: receiver.named("process "), what="the attempt's span")
        finally:
            w.signal(signal.SIGTERM)
            assert w.wait() == 0
    process = one(receiver.named("process "))
    assert process.service == "courses-worker"
    assert process.trace_id == CLIENT_TRACE and process.parent_span_id == CLIENT_SPAN
    calls = {s.attributes["gen_ai.provider.name"]: s for s in receiver.named("chat ")}
    assert calls["openai"].status == 2 and calls["openai"].attributes["error.type"] == "500"
    assert calls["anthropic"].status == 0
    assert calls["anthropic"].attributes["gen_ai.usage.output_tokens"] > 0


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:{closed}",  # nothing listens: refused at once
        "http://10.255.255.1:4318",  # nothing answers: every export times out
        "not a url at all",
    ],
)
def test_a_collector_away_costs_the_jobs_nothing(db_url: str, endpoint: str) -> None:
    endpoint = endpoint.format(closed=free_port())
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_TIMEOUT": "3000",
        **FAST_EXPORT,
    }
    w = WorkerProcess(db_url, WORKER_CONCURRENCY=4, **otel).started()  # the placeholder
    try:
        with connect(db_url) as c:
            ids = [insert_course(c, f"Subject {i}") for i in range(20)]
            wait_until(
                lambda: all(job(c, i)["status"] == "done" for i in ids),
                timeout=60,
                what="every job done",
            )
            durations = [job(c, i)["metrics"]["totalDurationMs"] for i in ids]
    finally:
        w.signal(signal.SIGTERM)
        began = time.monotonic()
        assert w.wait(timeout=60) == 0
        stopped = time.monotonic() - began
    # The export runs in its own thread: an attempt never waits for it. (The
    # placeholder answers in milliseconds; an export that waited would take seconds.)
    assert max(durations) < 2000, durations
    assert stopped < 15, f"the worker took {stopped:.1f}s to stop"


def test_batch_jobs_link_to_their_batchs_span(db_url: str, fake: FakeAI) -> None:
    from tests.e2e.test_batches import all_done, batch_env

    with http_receiver() as receiver:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **FAST_EXPORT}
        w = WorkerProcess(db_url, **batch_env(fake, **otel)).started()
        try:
            with connect(db_url) as c:
                ids = [
                    insert_course(c, "Tides 0", params={"itemsPerGroup": 3}, batch=True),
                    insert_course(
                        c,
                        "Tides 1",
                        params={"itemsPerGroup": 3},
                        batch=True,
                        trace_parent=TRACE_PARENT,
                    ),
                ]
                try:
                    wait_until(lambda: all_done(c, ids), timeout=60, what="all done")
                except AssertionError:
                    raise AssertionError(w.log()[-6000:]) from None
            wait_until(lambda: receiver.named("batch results "), what="the batch's span")
            wait_until(
                lambda: (
                    sum(
                        s.attributes.get("ai_jobs.outcome") == "done"
                        for s in receiver.named("process ")
                    )
                    == 2
                ),
                what="both answered attempts' spans",
            )
        finally:
            w.signal(signal.SIGTERM)
            assert w.wait() == 0
    batch = one(receiver.named("batch results "))
    assert batch.name == "batch results openai"
    done = {
        s.attributes["messaging.message.id"]: s
        for s in receiver.named("process ")
        if s.attributes["ai_jobs.outcome"] == "done"
    }
    assert set(done) == set(ids)
    assert all(s.links == [batch.span_id] for s in done.values())
    continued = done[ids[1]]
    assert continued.trace_id == CLIENT_TRACE and continued.parent_span_id == CLIENT_SPAN
    assert done[ids[0]].parent_span_id == "" and done[ids[0]].trace_id != batch.trace_id
