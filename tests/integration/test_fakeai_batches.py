"""The fake's Batch APIs as the real SDKs see them: OpenAI's files and batches
(of chat completions and of images), Anthropic's message batches; their ends
(completed, expired, failed, cancelled), per-request errors, and listing for
recovery. No database."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any, Final

import anthropic
import openai
import pytest

from listener.course_schema import CourseParams, parse_course
from tests import fakeai
from tests.fakeai import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY, FakeAI
from tests.fakeai.fake import FAKE_IMAGE

pytestmark = pytest.mark.timeout(60)

PROMPT = "Write a course on: Tides\nGroups: 2\nItems per group: 3"
PARAMS = CourseParams(group_count=2, items_per_group=3)
MESSAGES: Any = [
    {"role": "system", "content": "You write courses."},
    {"role": "user", "content": PROMPT},
]
TOOL: Any = {"name": "save_course", "description": "Save it.", "input_schema": {"type": "object"}}


@pytest.fixture
def fake() -> Iterator[FakeAI]:
    with fakeai.running() as f:
        yield f


def oai(fake: FakeAI) -> openai.OpenAI:
    return openai.OpenAI(api_key=FAKE_OPENAI_KEY, base_url=fake.openai_url, max_retries=0)


def ant(fake: FakeAI) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=FAKE_ANTHROPIC_KEY, base_url=fake.anthropic_url, max_retries=0
    )


def openai_lines(ids: list[str]) -> bytes:
    body = {"model": "gpt-4.1-mini", "messages": MESSAGES}
    lines = [
        {"custom_id": i, "method": "POST", "url": "/v1/chat/completions", "body": body} for i in ids
    ]
    return "\n".join(json.dumps(x) for x in lines).encode()


def openai_batch(fake: FakeAI, ids: list[str], tag: str = "b1") -> Any:
    c = oai(fake)
    f = c.files.create(file=("in.jsonl", io.BytesIO(openai_lines(ids))), purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0
    return c.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"ai_jobs_batch": tag},
    )


def test_openai_batch_completes_with_courses(fake: FakeAI) -> None:
    c = oai(fake)
    b = openai_batch(fake, ["a", "b"])
    assert b.status in ("validating", "in_progress", "completed")
    got = c.batches.retrieve(b.id)
    assert got.status == "completed" and got.output_file_id
    assert got.request_counts is not None and got.request_counts.completed == 2
    lines = [json.loads(x) for x in c.files.content(got.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["a", "b"]
    completion = lines[0]["response"]["body"]
    course = parse_course(completion["choices"][0]["message"]["content"], PARAMS)
    assert len(course.groups) == 2
    assert fake.batches.created["openai"] == 1


def test_openai_batch_listed_with_its_metadata(fake: FakeAI) -> None:
    for tag in ("x1", "x2", "x3"):
        openai_batch(fake, [tag], tag)
    page = oai(fake).batches.list(limit=2)
    tags = [b.metadata["ai_jobs_batch"] for b in page if b.metadata]
    assert sorted(tags) == ["x1", "x2", "x3"]


def test_openai_batch_delay_errors_expiry_failure_cancel(fake: FakeAI) -> None:
    c = oai(fake)
    fake.batches.delay = 60
    b = openai_batch(fake, ["a"])
    assert c.batches.retrieve(b.id).status == "in_progress"
    cancelled = c.batches.cancel(b.id)
    assert cancelled.status == "cancelled"
    fake.batches.delay = 0
    fake.batches.errors = {"bad"}
    b = c.batches.retrieve(openai_batch(fake, ["ok", "bad"]).id)
    assert b.status == "completed" and b.error_file_id and b.output_file_id
    errs = [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errs] == ["bad"]
    assert errs[0]["response"]["status_code"] == 400
    fake.batches.outcome = "expired"
    b = c.batches.retrieve(openai_batch(fake, ["late"]).id)
    assert b.status == "expired" and b.output_file_id is None and b.error_file_id
    fake.batches.outcome = "failed"
    assert c.batches.retrieve(openai_batch(fake, ["x"]).id).status == "failed"


IMAGES: Final = "/v1/images/generations"
PROMPT_IMAGE = "a lighthouse at dawn"
IMAGE_BODY: dict[str, Any] = {
    "model": "gpt-image-1",
    "prompt": PROMPT_IMAGE,
    "size": "1024x1024",
    "n": 1,
}


def image_batch(fake: FakeAI, ids: list[str], tag: str = "i1", url: str = IMAGES) -> Any:
    c = oai(fake)
    lines = [{"custom_id": i, "method": "POST", "url": url, "body": IMAGE_BODY} for i in ids]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    f = c.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    return c.batches.create(
        input_file_id=f.id,
        endpoint=IMAGES,
        completion_window="24h",
        metadata={"ai_jobs_batch": tag},
    )


def test_openai_image_batch_answers_as_the_direct_images_route(fake: FakeAI) -> None:
    c = oai(fake)
    fake.batches.errors = {"bad"}
    b = c.batches.retrieve(image_batch(fake, ["a", "bad"]).id)
    assert b.status == "completed" and b.endpoint == IMAGES and b.output_file_id
    out = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
    assert [x["custom_id"] for x in out] == ["a"] and out[0]["response"]["status_code"] == 200
    batched = openai.types.ImagesResponse.model_validate(out[0]["response"]["body"])
    direct = c.images.generate(**IMAGE_BODY)  # type: ignore[call-overload]
    assert batched.data and direct.data and batched.data[0].b64_json and direct.data[0].b64_json
    assert base64.b64decode(batched.data[0].b64_json) == FAKE_IMAGE
    assert base64.b64decode(direct.data[0].b64_json) == FAKE_IMAGE
    assert b.error_file_id
    errs = [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errs] == [("bad", 400)]
    fake.batches.outcome = "expired"
    late = c.batches.retrieve(image_batch(fake, ["late"], "i2").id)
    assert late.status == "expired" and late.output_file_id is None and late.error_file_id
    (expired,) = [json.loads(x) for x in c.files.content(late.error_file_id).text.splitlines()]
    assert expired["custom_id"] == "late" and expired["error"]["code"] == "batch_expired"


def test_openai_image_batch_hostile_bodies_and_a_wrong_url(fake: FakeAI) -> None:
    c = oai(fake)
    fake.batches.bodies = {"x": {"data": []}, "y": "not json"}
    b = c.batches.retrieve(image_batch(fake, ["x", "y", "z"]).id)
    assert b.output_file_id
    out = {
        x["custom_id"]: x["response"]["body"]
        for x in map(json.loads, c.files.content(b.output_file_id).text.splitlines())
    }
    assert out["x"] == {"data": []} and out["y"] == "not json" and out["z"]["data"]
    with pytest.raises(openai.BadRequestError):  # a batch has one endpoint
        image_batch(fake, ["w"], "i3", url="/v1/chat/completions")


def test_openai_image_model_has_its_own_enqueued_token_limit(fake: FakeAI) -> None:
    """The image model's queue is not the chat model's: a full one refuses its
    own model's batches only."""
    c = oai(fake)
    fake.batches.delay = 60
    prompt_tokens = -(-len(PROMPT_IMAGE) // 4)  # the prompt, 4 characters a token
    fake.batches.queue_limits = {"gpt-image-1": 2 * prompt_tokens, "gpt-4.1-mini": 10**9}
    first = c.batches.retrieve(image_batch(fake, ["a", "b"], "q1").id)
    assert first.status == "in_progress"
    refused = c.batches.retrieve(image_batch(fake, ["c"], "q2").id)
    assert refused.status == "failed" and refused.errors and refused.errors.data
    assert refused.errors.data[0].code == "token_limit_exceeded"
    assert f"Limit: {2 * prompt_tokens:,} enqueued tokens" in str(refused.errors.data[0].message)
    chat = c.batches.retrieve(openai_batch(fake, ["d"], "q3").id)
    assert chat.status == "in_progress" and fake.batches.refused["openai"] == 1


def test_openai_upload_needs_purpose_batch(fake: FakeAI) -> None:
    with pytest.raises(openai.BadRequestError):
        oai(fake).files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="assistants")


def anthropic_requests(ids: list[str]) -> Any:
    params = {
        "model": "claude-haiku-4-5",
        "max_tokens": 1000,
        "system": [{"type": "text", "text": "You write courses."}],
        "messages": [{"role": "user", "content": PROMPT}],
        "tools": [TOOL],
        "tool_choice": {"type": "tool", "name": "save_course"},
    }
    return [{"custom_id": i, "params": params} for i in ids]


def test_anthropic_batch_completes_with_courses(fake: FakeAI) -> None:
    c = ant(fake)
    fake.batches.errors = {"bad"}
    b = c.messages.batches.create(requests=anthropic_requests(["a", "bad"]))
    got = c.messages.batches.retrieve(b.id)
    assert got.processing_status == "ended" and got.results_url
    assert got.request_counts.succeeded == 1 and got.request_counts.errored == 1
    results = {r.custom_id: r.result for r in c.messages.batches.results(b.id)}
    ok = results["a"]
    assert ok.type == "succeeded"
    block = ok.message.content[0]
    assert block.type == "tool_use"
    assert len(parse_course(json.dumps(block.input), PARAMS).groups) == 2
    assert results["bad"].type == "errored"
    listed = [x.id for x in c.messages.batches.list(limit=10)]
    assert listed == [b.id]
    assert fake.batches.created["anthropic"] == 1


def test_anthropic_batch_expiry_and_cancel(fake: FakeAI) -> None:
    c = ant(fake)
    fake.batches.delay = 60
    b = c.messages.batches.create(requests=anthropic_requests(["a"]))
    assert c.messages.batches.retrieve(b.id).processing_status == "in_progress"
    c.messages.batches.cancel(b.id)
    assert [r.result.type for r in c.messages.batches.results(b.id)] == ["canceled"]
    fake.batches.delay = 0
    fake.batches.outcome = "expired"
    b = c.messages.batches.create(requests=anthropic_requests(["late"]))
    assert [r.result.type for r in c.messages.batches.results(b.id)] == ["expired"]


def test_openai_enqueued_token_limit_fails_the_batch_past_it(fake: FakeAI) -> None:
    c = oai(fake)
    fake.batches.delay = 60
    chars = len(json.dumps([MESSAGES, None]))  # a request's, as the fake counts (4 a token)
    fake.batches.queue_limits = {"gpt-4.1-mini": 3 * chars // 4}
    first = c.batches.retrieve(openai_batch(fake, ["a", "b"], "q1").id)
    assert first.status == "in_progress" and first.errors is None
    refused = c.batches.retrieve(openai_batch(fake, ["c", "d"], "q2").id)
    assert refused.status == "failed" and refused.errors and refused.errors.data
    err = refused.errors.data[0]
    assert err.code == "token_limit_exceeded"
    assert err.message and f"Limit: {3 * chars // 4:,} enqueued tokens" in err.message
    assert "gpt-4.1-mini" in err.message
    assert fake.batches.refused["openai"] == 1 and fake.batches.peak["openai"] == -(-2 * chars // 4)
    c.batches.cancel(first.id)  # room freed
    again = c.batches.retrieve(openai_batch(fake, ["c", "d"], "q3").id)
    assert again.status == "in_progress"
    fake.batches.queue_limits = {"gpt-4.1-mini": 1}
    fake.batches.queue_message = "Enqueued token limit reached."
    hostile = c.batches.retrieve(openai_batch(fake, ["e"], "q4").id)
    assert hostile.errors and hostile.errors.data[0].message == "Enqueued token limit reached."


def test_anthropic_request_queue_limit_is_a_429_at_the_creation(fake: FakeAI) -> None:
    c = ant(fake)
    fake.batches.delay = 60
    fake.batches.queue_limit = 3
    first = c.messages.batches.create(requests=anthropic_requests(["a", "b"]))
    with pytest.raises(anthropic.RateLimitError) as raised:
        c.messages.batches.create(requests=anthropic_requests(["c", "d"]))
    assert raised.value.status_code == 429
    assert "processing queue" in str(raised.value) and "limit of 3 requests" in str(raised.value)
    assert fake.batches.created["anthropic"] == 1 and fake.batches.refused["anthropic"] == 1
    c.messages.batches.create(requests=anthropic_requests(["c"]))  # fits: 3
    assert fake.batches.peak["anthropic"] == 3
    c.messages.batches.cancel(first.id)
    c.messages.batches.create(requests=anthropic_requests(["d", "e"]))
    assert fake.batches.created["anthropic"] == 3


def test_anthropic_per_minute_429_names_no_queue(fake: FakeAI) -> None:
    c = ant(fake)
    fake.batches.rate_limited = 1
    with pytest.raises(anthropic.RateLimitError) as raised:
        c.messages.batches.create(requests=anthropic_requests(["a"]))
    assert raised.value.status_code == 429
    assert "per minute" in str(raised.value) and "queue" not in str(raised.value).lower()
    assert fake.batches.throttled == 1 and fake.batches.created["anthropic"] == 0
    c.messages.batches.create(requests=anthropic_requests(["a"]))
    assert fake.batches.created["anthropic"] == 1 and fake.batches.refused["anthropic"] == 0
