"""What the batch modules read from a provider's refusal (batchapi.stated_limit:
OpenAI's "Limit: N enqueued tokens"; queue_refusal and queue_limit: Anthropic's
429 that names its processing queue, "... limit of N ..."), hostile messages
included, what a request holds in a batch queue, and an image batch's answer
read back (hostile ones included)."""

from __future__ import annotations

import base64
from types import SimpleNamespace
from typing import Any, cast

import pytest

from listener.course_schema import CourseParams
from listener.providers import pricing, requests
from listener.providers.base import CoursePrompt
from listener.providers.batch_openai import NOT_AN_IMAGE, OpenAIImageBatches
from listener.providers.batchapi import (
    MAX_LIMIT,
    ImageRequest,
    RequestFailed,
    image_tokens,
    input_tokens,
    queue_limit,
    queue_refusal,
    stated_limit,
)

OPENAI = (
    "Enqueued token limit reached for gpt-4o-mini in organization org-x. Limit: 2,000,000 "
    "enqueued tokens. Please try again once some in_progress batches have been completed."
)


@pytest.mark.parametrize(
    ("message", "limit"),
    [
        (OPENAI, 2_000_000),
        ("Limit: 90000 enqueued tokens.", 90_000),
        ("limit:1 enqueued tokens", 1),
        ("Enqueued token limit reached for gpt-4o-mini.", None),  # no number
        ("", None),
        (None, None),
        ("Limit: 0 enqueued tokens.", None),
        ("Limit: -5 enqueued tokens.", None),  # not matched as a number
        (f"Limit: {MAX_LIMIT + 1:,} enqueued tokens.", None),  # absurd
        ("Limit: 99999999999999999999999999999 enqueued tokens.", None),
        ("Limit: 1,2,3 enqueued tokens.", None),  # digits that are not one number
        ("Limit: ,,, enqueued tokens.", None),
        ("Limit: 2,000,000 requests.", None),  # another limit
        ("x" * 5000 + " Limit: 5 enqueued tokens.", None),  # past what is read
    ],
)
def test_the_stated_limit_is_read_or_not_believed(message: str | None, limit: int | None) -> None:
    assert stated_limit(message) == limit


ANTHROPIC = (
    "Number of requests in the batch processing queue would exceed your organization's "
    "limit of 100000 requests."
)
PER_MINUTE = (
    "This request would exceed your organization's rate limit of 50 requests per minute "
    "for the Message Batches API."
)


@pytest.mark.parametrize(
    ("message", "refusal", "limit"),
    [
        (ANTHROPIC, True, 100_000),
        ("Processing Queue full: limit of 1,000 requests", True, 1_000),
        ("the QUEUE is full", True, None),  # no number
        ("queue limit of 3, please wait", True, 3),
        (PER_MINUTE, False, 50),  # a per-minute limit: not the queue's
        ("rate_limit_error", False, None),
        ("", False, None),
        (None, False, None),
        ("queue: limit of 0 requests", True, None),
        ("queue: limit of -5 requests", True, None),
        (f"queue: limit of {MAX_LIMIT + 1} requests", True, None),  # absurd
        ("queue: limit of 99999999999999999999999999999999999999 requests", True, None),
        ("queue: limit of 1,2,3 requests", True, None),  # digits that are not one number
        ("queue: limit of ,,, requests", True, None),
        ("x" * 5000 + " queue: limit of 5", False, None),  # past what is read
    ],
)
def test_anthropics_queue_refusal_is_told_from_other_429s(
    message: str | None, refusal: bool, limit: int | None
) -> None:
    assert queue_refusal(message) is refusal
    assert queue_limit(message) == limit


def test_a_requests_input_tokens_are_estimated_on_the_high_side() -> None:
    prompt = CoursePrompt("s" * 300, "u" * 300, {"k": "v"}, "Tides", "c1", CourseParams())
    assert input_tokens(prompt) >= 600 // 4  # the provider's own count is near 4 a token


def test_an_image_requests_units_are_its_prompts_tokens() -> None:
    assert image_tokens(ImageRequest("p" * 10, "1024x1024")) == 4  # 3 characters a token, up
    assert image_tokens(ImageRequest("", "1024x1024")) == 1  # never nothing


def images(model: str = "gpt-image-1") -> OpenAIImageBatches:
    provider = SimpleNamespace(client=None, image_model=model, max_tokens=1000)
    return OpenAIImageBatches(cast(Any, provider))


@pytest.mark.parametrize("model", ["gpt-image-1", "dall-e-3"])
def test_an_image_batch_request_is_the_direct_paths(model: str) -> None:
    body = images(model).body(ImageRequest("a fox", "512x512"))
    assert body == requests.openai_image(model, "a fox", "512x512")
    assert body["model"] == model and body["size"] == "512x512" and body["n"] == 1
    assert ("response_format" in body) is model.startswith("dall-e")  # base64 either way


def test_an_image_answer_is_the_png_at_the_batch_price() -> None:
    b64 = base64.b64encode(b"the image").decode()
    media = images().read({"created": 1, "data": [{"b64_json": b64}]})
    assert (media.data, media.ext, media.content_type) == (b"the image", "png", "image/png")
    full = pricing.image_cost("gpt-image-1")
    assert full and media.usage.cost_usd == pytest.approx(full / 2)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("<html>not json</html>", "not a JSON object"),
        (7, "not a JSON object"),
        (None, "not a JSON object"),
        ([{"b64_json": "QQ=="}], "not a JSON object"),
        ({}, "no data"),
        ({"data": []}, "no data"),
        ({"data": "QQ=="}, "no data"),
        ({"data": ["QQ=="]}, "no data"),
        ({"data": [{"url": "https://example.com/x.png"}]}, "no b64_json"),
        ({"data": [{"b64_json": 5}]}, "no b64_json"),
        ({"data": [{"b64_json": ""}]}, "no b64_json"),
        ({"data": [{"b64_json": "%%% not base64 %%%"}]}, "b64_json is not base64"),
        ({"data": [{"b64_json": "abc"}]}, "b64_json is not base64"),  # cut short
        ({"data": [{"b64_json": "===="}]}, "b64_json is not base64"),
    ],
)
def test_a_hostile_image_answer_is_a_clear_error_of_that_request(body: Any, why: str) -> None:
    with pytest.raises(RequestFailed) as raised:
        images().read(body)
    assert str(raised.value) == f"{NOT_AN_IMAGE}: {why}"


def _job(table: str, row: dict[str, Any]) -> Any:
    from uuid import uuid4

    from listener.jobs import Job

    return Job(table, uuid4(), uuid4(), 0, 3, row)


@pytest.mark.parametrize(
    ("row", "error"),
    [
        ({"subject": " ", "course_id": "x", "params": {}}, "subject is empty"),
        ({"subject": "Tides", "course_id": "../etc", "params": {}}, "is not a slug"),
        ({"subject": "Tides", "course_id": "", "params": {}}, "is not a slug"),
        ({"subject": "Tides", "course_id": "tides", "params": {"groups": "many"}}, "params"),
    ],
)
def test_a_course_batch_request_refuses_what_the_handler_refuses(
    row: dict[str, Any], error: str
) -> None:
    """A job the course handler would refuse fails when its batch is made, not
    when its answer comes back a day later."""
    from listener.batches.submit import course_request
    from listener.errors import InvalidJob
    from listener.handlers.course import course_input

    job = _job("ai_course_jobs", row)
    for check in (course_request, course_input):
        with pytest.raises(InvalidJob, match=error):
            check(job)


def test_a_course_batch_request_is_the_handlers_prompt() -> None:
    from listener.batches.submit import course_request
    from listener.prompts import course_prompt

    job = _job("ai_course_jobs", {"subject": " Tides ", "course_id": "tides-1", "params": {}})
    assert course_request(job) == course_prompt("Tides", "tides-1", CourseParams())


@pytest.mark.parametrize(
    ("row", "error"),
    [
        ({"prompt": "", "media_type": "image", "params": {}}, "prompt is empty"),
        ({"prompt": "a cat", "media_type": "audio", "params": {}}, "is not batched"),
        ({"prompt": "a cat", "media_type": "video", "params": {}}, "unknown media_type"),
        ({"prompt": "a cat", "media_type": "image", "params": {"size": 7}}, "params"),
    ],
)
def test_an_image_batch_request_refuses_what_the_handler_refuses(
    row: dict[str, Any], error: str
) -> None:
    from listener.batches.submit import image_request
    from listener.errors import InvalidJob

    with pytest.raises(InvalidJob, match=error):
        image_request(_job("ai_media_jobs", row))


def test_results_lines_are_read_one_at_a_time_and_a_too_deep_line_is_skipped() -> None:
    from listener.providers.batchapi import lines

    data = b"[" * 200_000 + b'\n{"custom_id": "a"}\r\n\nnot json\n[1]\n{"custom_id": "\xff"}'
    got = lines(data)
    assert not isinstance(got, list)  # a generator: no copy of the file whole
    assert list(got) == [None, {"custom_id": "a"}, None, None, {"custom_id": "\ufffd"}]
