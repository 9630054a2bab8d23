"""Prices (built in, cached rates, overrides) and how a provider error is classified."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import openai
import pytest

from listener.course_schema import SchemaValidationError
from listener.errors import ConfigError
from listener.providers import pricing
from listener.providers.base import Failure, Refused, classify, describe, retry_after


@pytest.fixture(autouse=True)
def built_in_prices() -> Iterator[None]:
    pricing.configure(None)
    yield
    pricing.configure(None)


def test_cached_tokens_are_priced_at_the_cached_rate() -> None:
    # gpt-4.1-mini: 0.40 input, 0.10 cached, 1.60 output per 1M
    assert pricing.token_cost("gpt-4.1-mini", 1_000_000, 0, cached=1_000_000) == 0.10
    assert pricing.token_cost("gpt-4.1-mini", 1_000_000, 0, cached=250_000) == 0.325
    # Claude: reads at 0.1x input, writes at 1.25x
    assert pricing.token_cost("claude-haiku-4-5", 1_000_000, 0, cache_write=1_000_000) == 1.25
    assert pricing.token_cost("claude-haiku-4-5", 1_000_000, 0, cached=1_000_000) == 0.10


def test_overrides_inline_or_from_a_file(tmp_path: Path) -> None:
    pricing.configure('{"gpt-4.1-mini": {"input": 1}, "my-model": {"input": 2, "output": 4}}')
    assert pricing.token_cost("gpt-4.1-mini", 1_000_000, 0) == 1.0
    assert pricing.token_cost("gpt-4.1-mini", 0, 1_000_000) == 1.60  # kept
    assert pricing.token_cost("my-model-v2", 1_000_000, 1_000_000) == 6.0
    assert pricing.model_label("my-model-v2", set()) == "my-model"
    f = tmp_path / "prices.json"
    f.write_text(json.dumps({"gpt-image-1": {"image": 0.5}, "tts-1": {"speechPerMillionChars": 1}}))
    pricing.configure(str(f))
    assert pricing.image_cost("gpt-image-1") == 0.5 and pricing.speech_cost("tts-1", 10**6) == 1
    assert pricing.token_cost("my-model", 1, 1) is None  # a new configure starts afresh


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "is not JSON"),
        ("[1]", "expected a JSON object"),
        ('{"m": {"input": -1, "output": 1}}', "input must be a number >= 0"),
        ('{"m": {"inptu": 1}}', "unknown key(s) ['inptu']"),
        ('{"m": {"input": 1}}', "a new model needs input and output prices"),
        ("/nonexistent/prices.json", "cannot read /nonexistent/prices.json"),
    ],
)
def test_bad_overrides_name_the_problem(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        pricing.configure(text)
    assert err.value.message.startswith("Invalid setting PRICING_OVERRIDES: ")
    assert why in err.value.message


def test_model_labels_are_bounded() -> None:
    assert pricing.model_label("gpt-4.1-mini", {"gpt-4.1-mini"}) == "gpt-4.1-mini"
    assert pricing.model_label("gpt-4.1-mini-2025-04-14", set()) == "gpt-4.1-mini"
    assert pricing.model_label("anything-else", set()) == "other"
    assert pricing.model_label(None, set()) == "other"


def _status_error(code: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    request = httpx.Request("POST", "https://api.example.invalid/v1/chat/completions")
    response = httpx.Response(code, headers=headers or {}, request=request, json={})
    # The SDK's annotation names its own vendored httpx; the response is the same.
    return openai.APIStatusError("error", response=response, body={})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "failure"),
    [
        (500, Failure.UNWELL),
        (502, Failure.UNWELL),
        (529, Failure.UNWELL),
        (429, Failure.UNWELL),
        (408, Failure.UNWELL),
        (401, Failure.AUTH),
        (403, Failure.AUTH),
        (404, Failure.AUTH),
        (400, Failure.REFUSED),
        (422, Failure.REFUSED),
        (418, Failure.OTHER),
    ],
)
def test_status_codes_are_classified(code: int, failure: Failure) -> None:
    assert classify(_status_error(code), 600).failure is failure


def test_other_failures_are_classified() -> None:
    assert classify(TimeoutError(), 600).failure is Failure.UNWELL
    assert classify(ConnectionResetError(), 600).failure is Failure.UNWELL
    assert classify(Refused("no"), 600).failure is Failure.REFUSED
    assert classify(SchemaValidationError("bad"), 600).failure is Failure.INVALID
    assert classify(ValueError("?"), 600).failure is Failure.OTHER


def test_an_sdk_half_imported_does_not_break_the_classification(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anthropic's SDK is imported in a thread at its first call; for seconds its
    module is in sys.modules without its errors defined yet, while the other
    jobs' failures are classified on the event loop."""
    monkeypatch.setitem(sys.modules, "anthropic", types.ModuleType("anthropic"))
    monkeypatch.setitem(sys.modules, "httpx2", types.ModuleType("httpx2"))
    assert classify(_status_error(429), 600).failure is Failure.UNWELL
    assert classify(ConnectionResetError(), 600).failure is Failure.UNWELL
    assert classify(TimeoutError(), 600).failure is Failure.UNWELL
    assert "HTTP 503" in describe(_status_error(503), 2.0, [])


def test_retry_after_headers() -> None:
    assert retry_after(_status_error(429, {"retry-after-ms": "1500"})) == 1.5
    assert retry_after(_status_error(429, {"retry-after": "7"})) == 7.0
    assert retry_after(_status_error(429)) is None
    assert retry_after(_status_error(429, {"retry-after": "soon"})) is None
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    wait = retry_after(_status_error(503, {"retry-after": when}))
    assert wait is not None and 25 < wait <= 30
    # Bounded by PROVIDER_RETRY_AFTER_MAX_SECONDS.
    assert classify(_status_error(429, {"retry-after": "86400"}), 600).retry_after == 600
