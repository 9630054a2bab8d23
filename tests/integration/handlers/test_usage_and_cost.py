"""Tokens and cost as the providers report them: prompt caching asked for and
priced, the per-call totals behind /metrics, and a cache that holds real courses
only."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from listener.handlers import create_runtime
from listener.providers import pricing
from tests.fakeai import FakeAI
from tests.integration.handlers.conftest import Conn, MakeSettings, course_job

pytestmark = pytest.mark.timeout(30)


async def test_openai_cached_prefix_is_recorded_and_priced(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    rt = await create_runtime(make_settings(ai_provider_priority="openai"), pool)
    first = await rt.handlers["ai_course_jobs"](await course_job(conn, "Tides"))
    second = await rt.handlers["ai_course_jobs"](await course_job(conn, "Volcanoes"))
    await rt.aclose()
    # The constant part comes first (system), the request after it, with a cache key.
    body = fake.requests[0].body
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "Tides" not in body["messages"][0]["content"] and body["prompt_cache_key"]
    assert first.metrics["cachedInputTokens"] == 0
    assert second.metrics["cachedInputTokens"] == 100 and second.metrics["inputTokens"] == 120
    # gpt-4.1-mini: 0.40 per 1M input, 0.10 cached, 1.60 output
    assert first.metrics["estimatedCostUsd"] == round((120 * 0.40 + 800 * 1.60) / 1e6, 6)
    assert second.metrics["estimatedCostUsd"] == round(
        (20 * 0.40 + 100 * 0.10 + 800 * 1.60) / 1e6, 6
    )


async def test_anthropic_cache_control_on_the_constant_block(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    rt = await create_runtime(make_settings(ai_provider_priority="anthropic"), pool)
    first = await rt.handlers["ai_course_jobs"](await course_job(conn, "Tides"))
    second = await rt.handlers["ai_course_jobs"](await course_job(conn, "Volcanoes"))
    await rt.aclose()
    body = fake.requests[0].body
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "Tides" not in str(body["system"])
    # The first call writes the cache (1.25x input), the second reads it (0.1x).
    assert first.metrics["inputTokens"] == 150 and first.metrics["cachedInputTokens"] == 0
    assert second.metrics["inputTokens"] == 150 and second.metrics["cachedInputTokens"] == 100
    haiku = pricing.TOKEN_PRICES["claude-haiku-4-5"]
    assert first.metrics["estimatedCostUsd"] == round(
        (50 * haiku.input + 100 * 1.25 + 700 * haiku.output) / 1e6, 6
    )
    assert second.metrics["estimatedCostUsd"] == round(
        (50 * haiku.input + 100 * 0.10 + 700 * haiku.output) / 1e6, 6
    )


async def test_usage_totals_count_every_call(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes["openai"] = "invalid"  # two answers that bill tokens, then Anthropic serves
    rt = await create_runtime(make_settings(), pool)
    out = await rt.handlers["ai_course_jobs"](await course_job(conn, "Tides"))
    await rt.tick()
    cur = await conn.execute("select * from ai_job_usage_totals order by provider")
    rows = {r["provider"]: r for r in await cur.fetchall()}
    await rt.aclose()
    assert set(rows) == {"openai", "anthropic"}
    assert rows["openai"]["calls"] == 2 and rows["openai"]["input_tokens"] == 240
    assert rows["openai"]["model"] == "gpt-4.1-mini" and rows["openai"]["cost_usd"] > 0
    assert rows["anthropic"]["calls"] == 1
    # The job's own metrics keep only its answering provider's share.
    assert out.metrics["provider"] == "anthropic" and out.metrics["inputTokens"] == 150


async def test_unknown_models_are_folded_into_other(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    s = make_settings(ai_provider_priority="openai", openai_model="gpt-4.1-mini-2025-04-14")
    rt = await create_runtime(s, pool)
    await rt.handlers["ai_course_jobs"](await course_job(conn, "One"))
    rt.chain.meter.known_models = set()
    rt.providers.course[0].model = "gpt-4.1-mini-2025-04-14"
    await rt.handlers["ai_course_jobs"](await course_job(conn, "Two"))
    rt.providers.course[0].model = "someone-elses-model"
    out = await rt.handlers["ai_course_jobs"](await course_job(conn, "Three"))
    await rt.aclose()
    cur = await conn.execute("select model, calls from ai_job_usage_totals order by model")
    assert {r["model"]: r["calls"] for r in await cur.fetchall()} == {
        "gpt-4.1-mini-2025-04-14": 1,  # configured: kept as is
        "gpt-4.1-mini": 1,  # priced family
        "other": 1,
    }
    assert out.metrics["estimatedCostUsd"] is None  # no price: no estimate


async def test_the_cache_never_serves_a_placeholder_course(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes["openai"] = "500"
    s = make_settings(ai_provider_priority="openai", allow_placeholder=True, cache_ttl_seconds=60)
    rt = await create_runtime(s, pool)
    course = rt.handlers["ai_course_jobs"]
    made_up = await course(await course_job(conn, "Geology"))
    fake.modes["openai"] = "valid"
    real = await course(await course_job(conn, "Geology"))
    reused = await course(await course_job(conn, "Geology"))
    await rt.aclose()
    assert made_up.metrics["provider"] == "placeholder"
    assert real.metrics["provider"] == "openai" and real.metrics["cacheHit"] is False
    assert reused.metrics["cacheHit"] is True and reused.metrics["provider"] == "cache"
    assert reused.metrics["cachedProvider"] == "openai"
    assert reused.metrics["cachedModel"] == "gpt-4.1-mini"
