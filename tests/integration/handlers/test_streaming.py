"""Course answers streamed through the real SDKs against the fake API: the text
arrives in pieces and its groups before its end, the usage still comes (from the
stream's last events), a stream that stalls is a provider failure (the next
provider answers), and garbage in the middle of a stream ends in the repair
round or the next provider, never in a crash."""

from __future__ import annotations

import time
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from listener.course_schema import CourseParams, parse_course
from listener.course_stream import CourseStream
from listener.errors import GenerationError
from listener.handlers import create_runtime
from listener.progress import ProgressBoard
from listener.prompts import course_prompt
from listener.providers.anthropic import AnthropicProvider
from listener.providers.openai import OpenAIProvider
from tests.fakeai import FakeAI, Pace
from tests.integration.handlers.conftest import Conn, MakeSettings, course_job

pytestmark = pytest.mark.timeout(60)
PARAMS = CourseParams(group_count=3, items_per_group=4)


def provider(name: str, make_settings: MakeSettings) -> OpenAIProvider | AnthropicProvider:
    settings = make_settings()
    return OpenAIProvider(settings) if name == "openai" else AnthropicProvider(settings)


@pytest.mark.parametrize("name", ["openai", "anthropic"])
async def test_the_answer_streams_with_its_usage(
    name: str, fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.pace = Pace(tps=4000, size=(1500, 1500), chunk=2)
    p = provider(name, make_settings)
    pieces: list[str] = []
    try:
        answer = await p.course(course_prompt("Streams", "streams", PARAMS), pieces.append)
    finally:
        await p.aclose()
    assert len(pieces) > 100  # token by token, not at once
    assert "".join(pieces) == answer.text
    assert len(parse_course(answer.text, PARAMS).groups) == 3
    # the usage of the stream's closing events (fixed by the fake)
    expected = (120, 800) if name == "openai" else (150, 700)
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == expected
    assert answer.usage.cost_usd is not None and answer.usage.cost_usd > 0
    assert answer.limits.kinds  # the rate-limit headers came with the stream
    body = fake.requests[-1].body
    assert body["stream"] is True
    if name == "openai":
        assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("name", ["openai", "anthropic"])
async def test_groups_are_read_before_the_answer_ends(
    name: str, fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.pace = Pace(ttft=0.1, tps=1500, size=(1500, 1500))  # about one second
    p = provider(name, make_settings)
    reader = CourseStream(PARAMS)
    seen: list[float] = []  # when each group was read
    t0 = time.monotonic()

    def sink(text: str) -> None:
        if reader.feed(text):
            seen.append(time.monotonic() - t0)

    try:
        await p.course(course_prompt("Early Groups", "early", PARAMS), sink)
    finally:
        await p.aclose()
    total = time.monotonic() - t0
    assert len(reader.groups) == 3 and len(seen) == 3
    assert seen[0] < 0.6 * total  # the first third of the course, well before the end


async def test_a_stalled_stream_fails_over_to_the_next_provider(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes["openai"] = "stall"
    fake.break_after = 60
    fake.pace = Pace(tps=2000)
    rt = await create_runtime(make_settings(ai_timeout_seconds=20), pool)
    first = rt.providers.course[0]
    assert isinstance(first, OpenAIProvider)
    first.idle_timeout = 0.5
    t0 = time.monotonic()
    out = await rt.handlers["ai_course_jobs"](await course_job(conn, "Stalled Stream"))
    took = time.monotonic() - t0
    await rt.aclose()
    assert out.metrics["provider"] == "anthropic"
    assert out.metrics["fallbacks"] == ["openai: stream stalled: no token within 0.5s"]
    assert took < 10  # the idle timeout, not the whole call's 20 s
    assert fake.answered("openai", "stall") == 1
    sql = "select consecutive_failures from ai_job_provider_state where provider = 'openai'"
    state = await (await conn.execute(sql)).fetchone()
    assert state is not None and state["consecutive_failures"] == 1  # unwell: counted


async def test_no_first_token_in_time_fails_over(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes["anthropic"] = "hang"
    rt = await create_runtime(
        make_settings(ai_timeout_seconds=20, ai_provider_priority="anthropic,openai"), pool
    )
    first = rt.providers.course[0]
    assert isinstance(first, AnthropicProvider)
    first.first_token_timeout = 0.5
    out = await rt.handlers["ai_course_jobs"](await course_job(conn, "Never Starts"))
    await rt.aclose()
    assert out.metrics["provider"] == "openai"
    assert out.metrics["fallbacks"] == ["anthropic: stream stalled: no answer within 0.5s"]


async def test_garbage_mid_stream_goes_to_the_repair_round_then_the_next_provider(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes["openai"] = "garbage"
    rt = await create_runtime(make_settings(), pool)
    job = await course_job(conn, "Garbage Inside", params={"groupCount": 3, "itemsPerGroup": 4})
    board = ProgressBoard(lambda _: None, 1.0, lambda e, w: None)
    shown = board.open(job)
    out = await rt.handlers["ai_course_jobs"](job)
    jp = board.jobs[job.id]
    board.close(job, shown)
    await rt.aclose()
    assert out.metrics["provider"] == "anthropic"
    assert out.metrics["fallbacks"][0].startswith("openai: Schema validation failed")
    assert fake.answered("openai", "garbage") == 2  # the answer and its repair round
    # what was shown only grew: openai's first group, then anthropic's course
    assert jp.groups_done == 3 and jp.partial is not None and len(jp.partial["groups"]) == 3
    assert jp.percent == 95 and jp.phase == "storing"


async def test_garbage_from_every_provider_fails_the_attempt(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes = {"openai": "garbage", "anthropic": "garbage"}
    rt = await create_runtime(make_settings(), pool)
    job = await course_job(conn, "Garbage Everywhere", params={"groupCount": 3, "itemsPerGroup": 4})
    board = ProgressBoard(lambda _: None, 1.0, lambda e, w: None)
    shown = board.open(job)
    with pytest.raises(GenerationError, match="Schema validation failed"):
        await rt.handlers["ai_course_jobs"](job)
    jp = board.jobs[job.id]
    board.close(job, shown)
    await rt.aclose()
    # the first group of each stream was valid, and shown; the garbage never
    assert jp.groups_done == 1 and jp.partial is not None
    assert [g["id"] for g in jp.partial["groups"]] == ["g1"]


@pytest.mark.parametrize("name", ["openai", "anthropic"])
async def test_an_event_that_is_not_json_moves_on(
    name: str, conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes[name] = "bad_event"  # an event whose data is neither UTF-8 nor JSON
    other = "anthropic" if name == "openai" else "openai"
    rt = await create_runtime(make_settings(ai_provider_priority=f"{name},{other}"), pool)
    out = await rt.handlers["ai_course_jobs"](await course_job(conn, f"Bad Event {name}"))
    await rt.aclose()
    assert out.metrics["provider"] == other
    assert out.metrics["fallbacks"] == [f"{name}: malformed stream event (JSONDecodeError)"]
    assert fake.answered(name, "bad_event") == 1


@pytest.mark.parametrize("name", ["openai", "anthropic"])
async def test_a_stream_cut_off_is_a_connection_error(
    name: str, conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes[name] = "cut"
    fake.break_after = 60
    other = "anthropic" if name == "openai" else "openai"
    rt = await create_runtime(make_settings(ai_provider_priority=f"{name},{other}"), pool)
    out = await rt.handlers["ai_course_jobs"](await course_job(conn, f"Cut Off {name}"))
    await rt.aclose()
    assert out.metrics["provider"] == other
    assert out.metrics["fallbacks"] == [f"{name}: connection error"]


async def test_a_live_stream_may_run_longer_than_the_call_timeout(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    """AI_TIMEOUT_SECONDS bounds a stream's silences, not its length: an answer that
    streams for three times the setting is read to its end from the first provider."""
    fake.pace = Pace(ttft=0.1, tps=200, size=(600, 600))
    rt = await create_runtime(make_settings(ai_timeout_seconds=1), pool)
    t0 = time.monotonic()
    out = await rt.handlers["ai_course_jobs"](await course_job(conn, "Long Stream"))
    took = time.monotonic() - t0
    await rt.aclose()
    assert took > 2  # it did stream for longer than the setting
    assert out.metrics["provider"] == "openai"
    assert "fallbacks" not in out.metrics or out.metrics["fallbacks"] == []
