"""What each kind of provider failure does, through the real SDKs against the fake
API: which ones move on, which ones open the shared breaker, which ones end the
job at once, and when a job waits instead of failing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from listener.errors import GenerationError, InvalidJob, ProvidersUnavailable, RequestRefused
from listener.handlers import create_runtime
from tests.fakeai import FakeAI
from tests.helpers import await_until
from tests.integration.handlers.conftest import Conn, MakeSettings, course_job, media_job

pytestmark = pytest.mark.timeout(60)


async def breaker(conn: Conn, provider: str) -> dict[str, Any] | None:
    cur = await conn.execute(
        "select *, open_until > now() as is_open from ai_job_provider_state where provider = %s",
        [provider],
    )
    return await cur.fetchone()


@pytest.mark.parametrize(
    ("mode", "cause"),
    [
        ("context", "openai: HTTP 400 This model's maximum context length is 128000 tokens."),
        ("refusal", "openai: refused: I'm sorry, I can't help with that request."),
        ("blocked", "openai: refused: blocked by the content filter"),
        ("invalid", "openai: Schema validation failed: "),
    ],
)
async def test_a_refusal_moves_on_and_leaves_the_breaker_closed(
    mode: str,
    cause: str,
    conn: Conn,
    pool: AsyncConnectionPool[Any],
    fake: FakeAI,
    make_settings: MakeSettings,
) -> None:
    fake.modes["openai"] = mode
    rt = await create_runtime(make_settings(provider_breaker_threshold=1), pool)
    out = await rt.handlers["ai_course_jobs"](await course_job(conn, "Refused Once"))
    again = await rt.handlers["ai_course_jobs"](await course_job(conn, "Refused Twice"))
    await rt.aclose()
    assert out.metrics["provider"] == "anthropic"
    assert out.metrics["fallbacks"][0].startswith(cause)
    # The provider answered: it is up, and the next job asks it again.
    assert again.metrics["fallbacks"][0].startswith(cause)
    state = await breaker(conn, "openai")
    assert state is None or state["open_until"] is None


@pytest.mark.parametrize("mode", ["401", "403", "404"])
async def test_auth_errors_open_the_breaker_for_long(
    mode: str,
    conn: Conn,
    pool: AsyncConnectionPool[Any],
    fake: FakeAI,
    make_settings: MakeSettings,
) -> None:
    fake.modes["openai"] = mode
    rt = await create_runtime(make_settings(provider_auth_cooldown_seconds=3600), pool)
    first = await rt.handlers["ai_course_jobs"](await course_job(conn, "Keys One"))
    second = await rt.handlers["ai_course_jobs"](await course_job(conn, "Keys Two"))
    await rt.aclose()
    assert first.metrics["fallbacks"][0].startswith(f"openai: HTTP {mode} ")
    assert second.metrics["fallbacks"][0].startswith("openai: credentials refused, retry in 3")
    assert fake.count("openai") == 1  # one call found out; the second job skipped it
    state = await breaker(conn, "openai")
    assert state is not None and state["is_open"] and state["cooldown_kind"] == "auth"
    assert "sk-test" not in str(state["cooldown_reason"])

    # A process that starts (perhaps with a fixed key) tries again.
    fake.modes["openai"] = "valid"
    rt = await create_runtime(make_settings(), pool)
    state = await breaker(conn, "openai")
    third = await rt.handlers["ai_course_jobs"](await course_job(conn, "Keys Three"))
    await rt.aclose()
    assert state is not None and state["open_until"] is None
    assert third.metrics["provider"] == "openai"


async def test_every_provider_refusing_ends_the_job(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes.update(openai="context", anthropic="refusal")
    rt = await create_runtime(make_settings(), pool)
    with pytest.raises(RequestRefused) as err:
        await rt.handlers["ai_course_jobs"](await course_job(conn))
    await rt.aclose()
    assert isinstance(err.value, InvalidJob)  # the worker's give-up path: no retry
    assert err.value.message == (
        "Request refused by every provider: openai: HTTP 400 This model's maximum context "
        "length is 128000 tokens. However, your messages resulted in 200000 tokens.; "
        "anthropic: refused: the model declined (stop_reason refusal)"
    )


async def test_a_refused_image_ends_the_job(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes["openai"] = "blocked"
    rt = await create_runtime(make_settings(), pool)
    with pytest.raises(RequestRefused, match="content policy"):
        await rt.handlers["ai_media_jobs"](await media_job(conn, "something forbidden", "image"))
    await rt.aclose()


async def test_rate_limits_make_the_job_wait_without_calls(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes.update(openai="429", anthropic="529")
    fake.retry_headers = {"retry-after-ms": "30000"}
    rt = await create_runtime(make_settings(provider_retry_after_max_seconds=20), pool)
    with pytest.raises(ProvidersUnavailable) as err:
        await rt.handlers["ai_course_jobs"](await course_job(conn, "Later"))
    assert 15 < err.value.wait_seconds <= 20  # bounded by PROVIDER_RETRY_AFTER_MAX_SECONDS
    assert err.value.message.startswith(
        "Providers unavailable: openai: HTTP 429 rate limited; anthropic: HTTP 529 overloaded"
    )
    calls = len(fake.requests)
    with pytest.raises(ProvidersUnavailable) as again:
        await rt.handlers["ai_course_jobs"](await course_job(conn, "Even Later"))
    await rt.aclose()
    assert len(fake.requests) == calls  # both skipped: nothing asked
    assert "openai: rate limited, retry in" in again.value.message
    for provider in ("openai", "anthropic"):
        state = await breaker(conn, provider)
        assert state is not None and state["cooldown_kind"] == "rate_limited"


async def test_a_429_that_names_no_wait_is_still_later_not_a_failure(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    """retry-after: 0, or none at all: the job waits (no attempt counted), and every
    worker leaves the provider alone for a moment, rather than fail the attempt."""
    fake.modes["openai"] = "429"
    fake.retry_headers = {"retry-after": "0"}
    rt = await create_runtime(make_settings(ai_provider_priority="openai"), pool)
    with pytest.raises(ProvidersUnavailable) as err:
        await rt.handlers["ai_course_jobs"](await course_job(conn, "Quota Spent"))
    await rt.aclose()
    assert err.value.wait_seconds >= 0.5
    assert err.value.message.startswith("Providers unavailable: openai: HTTP 429")
    state = await breaker(conn, "openai")
    assert state is not None and state["cooldown_kind"] == "rate_limited"


async def test_unwell_calls_open_the_breaker_at_the_threshold_then_one_probe_decides(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes["openai"] = "500"
    s = make_settings(provider_breaker_threshold=2, provider_breaker_cooldown_seconds=1)
    rt = await create_runtime(s, pool)
    course = rt.handlers["ai_course_jobs"]
    for n in range(3):
        await course(await course_job(conn, f"Outage {n}"))
    assert fake.count("openai") == 2  # the third job skipped it
    state = await breaker(conn, "openai")
    assert state is not None and state["is_open"] and state["consecutive_failures"] == 2

    # Half-open: of two jobs at once, one probes (slowly) and the other passes it by.
    await await_until(lambda: _closed_or_due(conn), what="cooldown over")
    fake.modes["openai"] = "slow"
    fake.slow_seconds = 0.5
    outs = await asyncio.gather(*[course(await course_job(conn, f"Probe {n}")) for n in range(2)])
    assert sorted(o.metrics["provider"] for o in outs) == ["anthropic", "openai"]
    assert fake.count("openai") == 3
    state = await breaker(conn, "openai")
    assert state is not None and state["open_until"] is None and state["consecutive_failures"] == 0

    # A failed probe opens it again at once, whatever the threshold.
    fake.modes["openai"] = "500"
    await course(await course_job(conn, "Relapse 1"))
    await course(await course_job(conn, "Relapse 2"))
    await await_until(lambda: _closed_or_due(conn), what="cooldown over")
    await course(await course_job(conn, "Relapse 3"))  # the probe
    state = await breaker(conn, "openai")
    await rt.aclose()
    assert state is not None and state["is_open"] and fake.count("openai") == 6


async def _closed_or_due(conn: Conn) -> bool:
    state = await breaker(conn, "openai")
    return state is None or state["open_until"] is None or not state["is_open"]


async def test_a_timeout_counts_toward_the_breaker_and_fails_the_attempt(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes["openai"] = "hang"
    rt = await create_runtime(
        make_settings(ai_provider_priority="openai", ai_timeout_seconds=1), pool
    )
    with pytest.raises(GenerationError) as err:
        await rt.handlers["ai_course_jobs"](await course_job(conn))
    await rt.aclose()
    assert not isinstance(err.value, ProvidersUnavailable)  # one timeout: not yet down
    assert (
        err.value.message == "Course generation failed: openai: stream stalled: no answer within 1s"
    )
    state = await breaker(conn, "openai")
    assert state is not None and state["consecutive_failures"] == 1 and state["open_until"] is None
