"""The providers' rate-limit headers (OpenAI's Go durations, Anthropic's RFC 3339
resets), what a call is estimated and charged, and PROVIDER_LIMITS: read as
the providers and operators write them; anything malformed is left out, never
a crash."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from listener import settings as settings_mod
from listener.errors import ConfigError
from listener.providers import quota, ratelimits
from listener.providers.base import Usage
from listener.providers.ratelimits import Limit, duration, parse, timestamp
from listener.settings import Settings, parse_provider_limits
from tests.fakeai.quota import Limits, Quotas, go_duration, rfc3339

NOW = 1_796_563_000.0  # a fixed time.time() for the sent moment


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("1s", 1.0),
        ("59ms", 0.059),
        ("1m30.5s", 90.5),
        ("0s", 0.0),
        ("1h2m3.5s", 3723.5),
        ("2.5s", 2.5),
        ("500us", 0.0005),
        ("500\u00b5s", 0.0005),  # the micro sign
        ("500\u03bcs", 0.0005),  # the Greek mu: Go reads both
        (" 20ms ", 0.02),
        ("1.5", 1.5),  # a bare number: seconds
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        *["", " ", "s", "ms", "-1s", "1s2", "1x", "1m 2s", "abc", "1e400", "nan", "inf", "2d"],
        *["9" * 50, "1_0", "1e3", "-0", "+1", "\u0661\u0662", "\u0661\u0662s", "1.5.2s"],
    ],
)
def test_malformed_durations_are_none(text: str) -> None:
    assert duration(text) is None


def test_durations_as_the_fake_writes_them() -> None:
    for seconds in (0.0, 0.001, 0.059, 0.999, 1.0, 1.25, 59.9, 90.5, 360.0, 3723.5):
        assert duration(go_duration(seconds)) == pytest.approx(seconds, abs=0.001)


def test_rfc3339_times() -> None:
    assert timestamp("2026-12-06T10:00:05Z") == 1796551205.0
    assert timestamp("2026-12-06T10:00:05.5Z") == 1796551205.5
    assert timestamp("2026-12-06T11:00:05+01:00") == 1796551205.0
    assert timestamp(rfc3339(NOW + 0.2)) == NOW + 1  # rounded up to the second
    for bad in ["", "2026-12-06T10:00:05", "2026-13-06T10:00:05Z", "tomorrow", "1796551205"]:
        assert timestamp(bad) is None, bad


def openai_headers() -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-remaining-requests": "499",
        "x-ratelimit-reset-requests": "120ms",
        "x-ratelimit-limit-tokens": "200000",
        "x-ratelimit-remaining-tokens": "150000",
        "x-ratelimit-reset-tokens": "15s",
        "retry-after-ms": "1500",
        "retry-after": "2",
    }


def anthropic_headers() -> dict[str, str]:
    def at(seconds: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW + seconds))

    return {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": at(2),
        "anthropic-ratelimit-input-tokens-limit": "40000",
        "anthropic-ratelimit-input-tokens-remaining": "30000",
        "anthropic-ratelimit-input-tokens-reset": at(15),
        "anthropic-ratelimit-output-tokens-limit": "8000",
        "anthropic-ratelimit-output-tokens-remaining": "8000",
        "anthropic-ratelimit-output-tokens-reset": at(0),
        "anthropic-ratelimit-tokens-limit": "48000",
        "anthropic-ratelimit-tokens-remaining": "38000",
        "anthropic-ratelimit-tokens-reset": at(15),
        "retry-after": "3",
    }


def test_openai_headers() -> None:
    found = parse(httpx.Headers(openai_headers()), NOW)
    assert found.kinds == {
        "requests": Limit(500, 499, 0.12),
        "tokens": Limit(200000, 150000, 15.0),
    }
    assert found.retry_after == 1.5  # retry-after-ms first, as the SDKs read it
    assert found.limits() == [500, 200000, None, None]
    assert found.remaining() == [499, 150000, None, None]
    # The window, from the kind furthest from full: 200,000 x 15 s / 50,000 used.
    assert found.window() == pytest.approx(60.0)


def test_anthropic_headers() -> None:
    # Upper-case names, as a server may send them (httpx.Headers folds case).
    found = parse(httpx.Headers({k.upper(): v for k, v in anthropic_headers().items()}), NOW)
    assert found.kinds == {
        "requests": Limit(50, 49, 2.0),
        "input_tokens": Limit(40000, 30000, 15.0),
        "output_tokens": Limit(8000, 8000, 0.0),
        # "tokens", input and output together, says nothing more beside them
    }
    assert found.limits() == [50, None, 40000, 8000]
    assert found.retry_after == 3.0
    assert found.window() == pytest.approx(60.0)  # 40,000 x 15 s / 10,000
    # A reset measured from a call sent later is shorter, never negative.
    assert parse(anthropic_headers(), NOW + 30).kinds["input_tokens"].reset == 0.0


def test_anthropic_tokens_alone_is_kept() -> None:
    only = {k: v for k, v in anthropic_headers().items() if "-tokens-" in k and "put" not in k}
    assert parse(only, NOW).kinds == {"tokens": Limit(48000, 38000, 15.0)}


def test_headers_as_the_fake_sends_them() -> None:
    q = Quotas(Limits(rpm=12, tpm=1200, itpm=600, otpm=300, window=20))
    assert q.admit("openai", "m", {"requests": 3, "tokens": 300}) is None
    assert q.admit("anthropic", "m", {"requests": 6, "input_tokens": 150}) is None
    sent = time.time()
    o = parse(q.headers("openai", "m"), sent)
    assert o.limits() == [12, 1200, None, None] and o.remaining() == [9, 900, None, None]
    assert o.window() == pytest.approx(20.0, rel=0.01)
    a = parse(q.headers("anthropic", "m"), sent)
    assert a.limits() == [12, None, 600, 300] and a.remaining() == [6, None, 450, 300]
    # Resets to the second, rounded up: a window on the long side, never shorter.
    window = a.window()
    assert window is not None and 20.0 <= window <= 60.0


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-limit-requests": "-5", "x-ratelimit-remaining-requests": "1.5"},
        {"x-ratelimit-limit-requests": "\uff15\uff10", "x-ratelimit-reset-requests": "soon"},
        {"x-ratelimit-limit-requests": "9" * 40, "x-ratelimit-remaining-tokens": ""},
        {"anthropic-ratelimit-requests-limit": "lots", "anthropic-ratelimit-requests-reset": "x"},
        {"anthropic-ratelimit-input-tokens-reset": "2026-12-06T10:00:05"},
        {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT", "retry-after-ms": "-1"},
        {"retry-after": "nan", "retry-after-ms": "inf"},
        {},
    ],
)
def test_malformed_headers_are_left_out(headers: dict[str, str]) -> None:
    found = parse(headers, NOW)
    assert not found and found.kinds == {} and found.retry_after is None
    assert found.window() is None


class Hostile(dict[str, Any]):
    def get(self, key: str, default: Any = None) -> Any:
        if key.endswith("requests"):
            raise RuntimeError("a broken mapping")
        return 12 if key.endswith("tokens") else default  # not a string

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("no")


def test_a_broken_mapping_is_no_crash() -> None:
    found = parse(Hostile(), NOW)
    assert not found
    assert parse(None, NOW) == ratelimits.RateLimits()


def test_the_window_is_bounded() -> None:
    def window(limit: int, remaining: int, reset: str) -> float | None:
        headers = {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": reset,
        }
        return parse(headers, NOW).window()

    assert window(60, 59, "1s") == 60.0
    assert window(60, 59, "6m0s") == 60.0  # at most a minute
    assert window(100, 0, "1ms") == 1.0  # at least a second
    assert window(10, 5, "1s") == 2.0
    assert window(10, 10, "0s") is None  # full: it says nothing of the refill


def test_the_window_comes_from_the_most_exact_kind() -> None:
    # The fake's bucket of 4 requests a 2 s window held 2.9 after a call, said as
    # 2: "2 used" (1.1 in truth), full in 0.55 s. Read from that kind, the window
    # would be 4 x 0.55 / 2 = 1.1 s. The same answer's tokens, 1,100 of 4,000
    # used, say it to a tenth of a percent.
    headers = {
        "x-ratelimit-limit-requests": "4",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "550ms",
        "x-ratelimit-limit-tokens": "4000",
        "x-ratelimit-remaining-tokens": "2900",
        "x-ratelimit-reset-tokens": "550ms",
    }
    assert parse(headers, NOW).window() == pytest.approx(2.0)
    # A reset written to the second says little when it is a second or two away.
    coarse = {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "50",
        "x-ratelimit-reset-requests": "30.0s",
        "x-ratelimit-limit-tokens": "100000",
        "x-ratelimit-remaining-tokens": "98000",
        "x-ratelimit-reset-tokens": "1s",
    }
    found = parse(coarse, NOW)
    assert found.kinds["requests"].precision == pytest.approx(0.1)
    assert found.kinds["tokens"].precision == 1.0
    assert found.window() == pytest.approx(60.0)  # requests: 100 x 30 / 50
    # A reset as long as its last digit (a fast refill's `1ms`, 0.2 ms in truth)
    # says nothing: 10,000,000 x 0.001 / 1,120 would be a 9 s window, not 2.
    fast = {
        "x-ratelimit-limit-requests": "12",
        "x-ratelimit-remaining-requests": "11",
        "x-ratelimit-reset-requests": "167ms",
        "x-ratelimit-limit-tokens": "10000000",
        "x-ratelimit-remaining-tokens": "9998880",
        "x-ratelimit-reset-tokens": "1ms",
    }
    assert parse(fast, NOW).window() == pytest.approx(2.0, rel=0.01)


def test_a_window_read_says_how_far_off_it_may_be() -> None:
    def read(remaining: int, reset: str) -> ratelimits.WindowRead | None:
        headers = {
            "x-ratelimit-limit-requests": "4",
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": reset,
        }
        return parse(headers, NOW).window_read()

    # 1 of 4 used, full in 500 ms: a 2 s window, off by 100% and 1/499.
    near_full = read(3, "500ms")
    assert near_full is not None
    assert near_full.seconds == pytest.approx(2.0)
    assert near_full.error == pytest.approx(1 + 1 / 499)
    empty = read(0, "2000ms")  # 4 used: a quarter
    assert empty is not None and empty.error == pytest.approx(0.25 + 1 / 1999)
    assert read(4, "0s") is None
    # A reset no longer than its last digit may be any fraction of it: read
    # only where no other kind says better, and said to be anything.
    coarse = read(3, "1s")
    assert coarse is not None and coarse.error == math.inf


@pytest.mark.parametrize(
    ("reset", "precision"),
    [("59ms", 0.001), ("1.4s", 0.1), ("6m0s", 1.0), ("1h2m", 60.0), ("2.25", 0.01)],
)
def test_a_resets_precision_is_its_last_digit(reset: str, precision: float) -> None:
    limit = parse({"x-ratelimit-reset-requests": reset}, NOW).kinds["requests"]
    assert limit.precision == pytest.approx(precision)


def test_an_anthropic_resets_precision() -> None:
    def precision(reset: str) -> float:
        headers = {"anthropic-ratelimit-requests-reset": reset}
        return parse(headers, NOW - 10).kinds["requests"].precision

    assert precision(rfc3339(NOW)) == 1.0
    assert precision("2026-12-06T10:00:05.25Z") == pytest.approx(0.01)


def test_estimate_and_charge() -> None:
    est = quota.estimate(3000, 1000)  # 3,000 characters: 1,000 tokens on the high side
    assert est.vector() == [1, 2000, 1000, 1000]
    used = Usage(900, 700)
    used.cached_input_tokens = 400
    # OpenAI counts the prompt and max_tokens; Anthropic the uncached input and the output.
    assert quota.charged("openai", used, 1000).vector() == [1, 1900, 900, 700]
    assert quota.charged("anthropic", used, 1000).vector() == [1, 1200, 500, 700]
    assert est.minus(quota.charged("openai", used, 1000)) == [0, 100, 100, 300]


def test_provider_limits() -> None:
    assert parse_provider_limits(
        "openai=rpm:500,tpm:200000;anthropic=rpm:50,itpm:40000,otpm:8000"
    ) == {
        "openai": {"requests": 500, "tokens": 200000},
        "anthropic": {"requests": 50, "input_tokens": 40000, "output_tokens": 8000},
    }
    s = Settings(provider_limits=" openai = rpm:500 , tpm:200_000 ; openai/gpt-4.1-nano=rpm:30;")
    # Each model of a provider has the provider's caps; a model's own entry wins.
    assert s.caps_for("openai", "gpt-4.1-mini") == {"requests": 500, "tokens": 200000}
    assert s.caps_for("openai", "gpt-4.1-nano") == {"requests": 30, "tokens": 200000}
    assert s.caps_for("anthropic", "claude-haiku-4-5") == {}
    assert Settings(provider_limits="  ").provider_caps == {}
    assert Settings().provider_caps == {}


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("openai", "expected provider=key:value"),
        ("mistral=rpm:5", "expected provider=key:value"),
        ("openai/=rpm:5", "expected provider=key:value"),
        ("openai=rpm:0", "rpm must be a whole number from 1 to 10^12"),
        ("openai=rpm:1.5", "rpm must be a whole number from 1 to 10^12"),
        ("openai=rpm:-5", "rpm must be a whole number from 1 to 10^12, got '-5'"),
        ("openai=tpm:1000000000001", "tpm must be a whole number from 1 to 10^12"),
        ("openai=tpm:١٢", "tpm must be a whole number from 1 to 10^12"),
        ("openai=rpm:5,RPM:6", "openai: rpm is given twice"),
        ("openai=qpm:5", "'qpm:5' is not one of rpm, tpm, itpm, otpm"),
        ("openai=rpm", "'rpm' is not one of"),
        ("openai=rpm:5;openai=tpm:9", "openai is given twice"),
    ],
)
def test_bad_provider_limits_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setenv("PROVIDER_LIMITS", value)
    with pytest.raises(ConfigError) as err:
        settings_mod.load()
    assert str(err.value).startswith("Invalid setting PROVIDER_LIMITS: ")
    assert says in str(err.value)
