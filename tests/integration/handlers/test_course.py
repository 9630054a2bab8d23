"""The course handler with the real OpenAI and Anthropic SDKs against the fake API
(tests/fakeai.py), on jobs claimed from a real database."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.course_schema import Course
from listener.errors import GenerationError, InvalidJob
from listener.handlers import create_runtime
from listener.jobs import Job
from tests.fakeai import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY, FakeAI
from tests.integration.handlers.conftest import Conn, Logs, MakeSettings, course_job

pytestmark = pytest.mark.timeout(30)

OTHER = {"openai": "anthropic", "anthropic": "openai"}
MODELS = {"openai": "gpt-4.1-mini", "anthropic": "claude-haiku-4-5"}


def stored(settings_root: Path, rel: str) -> Course:
    return Course.model_validate_json((settings_root / rel).read_bytes())


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_valid_course_from_each_provider(
    provider: str,
    conn: Conn,
    pool: AsyncConnectionPool[Any],
    fake: FakeAI,
    make_settings: MakeSettings,
) -> None:
    s = make_settings(ai_provider_priority=provider)
    rt = await create_runtime(s, pool)
    job = await course_job(conn, "Algebra Basics", params={"itemsPerGroup": 4, "groupCount": 2})
    out = await rt.handlers["ai_course_jobs"](job)
    await rt.aclose()

    assert out.result_path == "courses/algebra-basics/course.json"
    course = stored(s.storage_root, out.result_path)
    assert course.id == "algebra-basics" and course.subject == "Algebra Basics"
    assert [len(g.items) for g in course.groups] == [4, 4]
    m = out.metrics
    assert m["provider"] == provider and m["model"] == MODELS[provider]
    assert m["inputTokens"] > 0 and m["outputTokens"] > 0
    assert m["estimatedCostUsd"] > 0 and m["cacheHit"] is False
    assert m["generationDurationMs"] >= 0 and m["storageMs"] >= 0 and m["fallbacks"] == []
    # Structured output was asked for, once, with the schema generated from Course.
    assert fake.count(provider) == 1 and fake.count(OTHER[provider]) == 0
    body = fake.requests[0].body
    if provider == "openai":
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
        assert fmt["json_schema"]["schema"] == Course.model_json_schema()
    else:
        assert body["tool_choice"] == {"type": "tool", "name": body["tools"][0]["name"]}
        assert body["tools"][0]["input_schema"] == Course.model_json_schema()
    assert "Items per group: 4" in json.dumps(body)
    # The catalog lists it (batch of 1).
    catalog = json.loads((s.storage_root / "courses/catalog.json").read_bytes())
    assert [c["id"] for c in catalog["courses"]] == ["algebra-basics"]
    assert catalog["courses"][0]["provider"] == provider


@pytest.mark.parametrize("first", ["openai", "anthropic"])
@pytest.mark.parametrize("mode", ["429", "500", "slow", "invalid", "401"])
async def test_falls_through_to_the_next_provider(
    first: str,
    mode: str,
    conn: Conn,
    pool: AsyncConnectionPool[Any],
    fake: FakeAI,
    make_settings: MakeSettings,
) -> None:
    second = OTHER[first]
    fake.modes[first] = mode
    s = make_settings(ai_provider_priority=f"{first},{second}", ai_timeout_seconds=1)
    rt = await create_runtime(s, pool)
    job = await course_job(conn, "Rust Ownership", params={"itemsPerGroup": 2, "groupCount": 1})
    out = await rt.handlers["ai_course_jobs"](job)
    await rt.aclose()

    assert out.metrics["provider"] == second
    cause = {
        "429": "HTTP 429 rate limited",
        "500": "HTTP 500 server error",
        "slow": "stream stalled: no answer within 1s",
        "invalid": "Schema validation failed: ",
        "401": "HTTP 401 Incorrect API key provided: ***",
    }[mode]
    assert len(out.metrics["fallbacks"]) == 1
    assert out.metrics["fallbacks"][0].startswith(f"{first}: {cause}")
    # Once each (the SDK retries nothing); an invalid answer gets its one repair round.
    assert fake.count(first) == (2 if mode == "invalid" else 1)
    assert fake.count(second) == 1
    assert stored(s.storage_root, out.result_path).groups[0].items


async def test_every_cause_is_named_when_all_fail(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes.update(openai="429", anthropic="slow")
    rt = await create_runtime(make_settings(ai_timeout_seconds=1), pool)
    job = await course_job(conn)
    with pytest.raises(GenerationError) as err:
        await rt.handlers["ai_course_jobs"](job)
    await rt.aclose()
    assert err.value.message == (
        "Course generation failed: openai: HTTP 429 rate limited; "
        "anthropic: stream stalled: no answer within 1s"
    )
    assert fake.count("openai") == 1 and fake.count("anthropic") == 1


async def test_one_repair_round_then_schema_validation_failed(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    s = make_settings(ai_provider_priority="openai")
    rt = await create_runtime(s, pool)

    fake.modes["openai"] = "invalid_once"  # bad JSON, then fixed when told what is wrong
    out = await rt.handlers["ai_course_jobs"](await course_job(conn, "Chess Openings"))
    assert out.metrics["repairRounds"] == 1 and out.metrics["provider"] == "openai"
    repair = fake.requests[-1].body["messages"]
    assert [m["role"] for m in repair] == ["system", "user", "assistant", "user"]
    assert "not a valid course" in repair[-1]["content"]
    # Tokens of both calls are counted.
    assert out.metrics["inputTokens"] == 240

    fake.modes["openai"] = "wrong_schema"
    before = fake.count("openai")
    with pytest.raises(GenerationError) as err:
        await rt.handlers["ai_course_jobs"](await course_job(conn, "Go Channels"))
    await rt.aclose()
    assert fake.count("openai") - before == 2  # the answer and one repair, no more
    assert err.value.message.startswith("Schema validation failed: openai: ")
    assert "id: Field required" in err.value.message and "(+3 more)" in err.value.message


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"itemsPerGroup": 0}, "itemsPerGroup"),
        ({"itemsPerGroup": 51}, "itemsPerGroup"),
        ({"itemsPerGroup": "12"}, "itemsPerGroup"),
        ({"itemsPerGroup": True}, "itemsPerGroup"),
        ({"level": "expert"}, "level"),
        ({"itemsPerGroups": 3}, "itemsPerGroups"),
    ],
)
async def test_bad_params_are_invalid_jobs(
    params: dict[str, Any],
    where: str,
    conn: Conn,
    pool: AsyncConnectionPool[Any],
    fake: FakeAI,
    make_settings: MakeSettings,
) -> None:
    rt = await create_runtime(make_settings(), pool)
    with pytest.raises(InvalidJob) as err:
        await rt.handlers["ai_course_jobs"](await course_job(conn, params=params))
    await rt.aclose()
    assert err.value.message.startswith(f"Invalid job params: {where}: ")
    assert fake.requests == []  # no provider was asked


async def test_no_provider_configured_is_a_clear_error(
    conn: Conn, pool: AsyncConnectionPool[Any], make_settings: MakeSettings
) -> None:
    rt = await create_runtime(make_settings(openai_api_key=None, anthropic_api_key=None), pool)
    with pytest.raises(GenerationError, match="No AI provider configured: set OPENAI_API_KEY"):
        await rt.handlers["ai_course_jobs"](await course_job(conn))
    await rt.aclose()


async def test_a_provider_without_its_key_is_skipped(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    rt = await create_runtime(make_settings(openai_api_key=None), pool)
    out = await rt.handlers["ai_course_jobs"](await course_job(conn))
    await rt.aclose()
    assert out.metrics["provider"] == "anthropic" and out.metrics["fallbacks"] == []
    assert fake.count("openai") == 0


async def test_placeholder_alone_without_keys_and_deterministic(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    s = make_settings(
        openai_api_key=None, anthropic_api_key=None, allow_placeholder=True, placeholder_delay_ms=5
    )
    rt = await create_runtime(s, pool)
    params = {"itemsPerGroup": 3, "groupCount": 2, "itemType": "mixed"}
    out1 = await rt.handlers["ai_course_jobs"](await course_job(conn, "Knots", params=params))
    first = (s.storage_root / out1.result_path).read_bytes()
    out2 = await rt.handlers["ai_course_jobs"](await course_job(conn, "Knots", params=params))
    await rt.aclose()
    assert out1.metrics["provider"] == "placeholder" and out1.metrics["generationDurationMs"] >= 5
    assert (s.storage_root / out2.result_path).read_bytes() == first
    course = Course.model_validate_json(first)
    assert [len(g.items) for g in course.groups] == [3, 3]
    assert fake.requests == []


async def test_placeholder_comes_last(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.modes.update(openai="500", anthropic="429")
    rt = await create_runtime(make_settings(allow_placeholder=True), pool)
    out = await rt.handlers["ai_course_jobs"](await course_job(conn))
    await rt.aclose()
    assert out.metrics["provider"] == "placeholder"
    assert out.metrics["fallbacks"] == [
        "openai: HTTP 500 server error",
        "anthropic: HTTP 429 rate limited",
    ]


async def _finish(conn: Conn, job: Job, path: str | None, metrics: dict[str, Any]) -> None:
    await dal.fetch(
        conn,
        "complete_jobs",
        {
            "table": job.table,
            "ids": [job.id],
            "tokens": [job.claim_token],
            "paths": [path],
            "metrics": Jsonb([metrics]),
        },
    )


async def test_keys_never_reach_rows_or_logs(
    conn: Conn,
    pool: AsyncConnectionPool[Any],
    fake: FakeAI,
    make_settings: MakeSettings,
    logs: Logs,
) -> None:
    # OpenAI echoes a wrong key in its 401 body; Anthropic answers 500, then serves.
    fake.modes.update(openai="401", anthropic="500")
    rt = await create_runtime(make_settings(), pool)
    failing = await course_job(conn, "Secrets")
    with pytest.raises(GenerationError) as err:
        await rt.handlers["ai_course_jobs"](failing)
    await dal.fetch(
        conn,
        "fail_job",
        {
            "table": failing.table,
            "id": failing.id,
            "token": failing.claim_token,
            "error": err.value.message,
            "base": 10,
            "give_up": False,
        },
    )
    fake.modes["anthropic"] = "valid"
    ok = await course_job(conn, "More Secrets")
    out = await rt.handlers["ai_course_jobs"](ok)
    await _finish(conn, ok, out.result_path, out.metrics)
    await rt.aclose()

    assert "HTTP 401 Incorrect API key provided: ***" in err.value.message
    cur = await conn.execute("select t::text as row from ai_course_jobs t")
    rows = "\n".join(r["row"] for r in await cur.fetchall())
    assert "Incorrect API key provided: ***" in rows  # the error row is there ...
    text = logs.text()
    assert "HTTP 401" in text  # ... and the failure was logged
    for key in (FAKE_OPENAI_KEY, FAKE_ANTHROPIC_KEY):
        for haystack in (rows, text, json.dumps(out.metrics)):
            assert key not in haystack
            assert key[10:30] not in haystack  # not even a fragment


async def test_an_sdk_that_fails_to_load_passes_the_job_on_and_is_loaded_again_later(
    conn: Conn,
    pool: AsyncConnectionPool[Any],
    fake: FakeAI,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anthropic's SDK is imported at its first call. An import that fails is that
    provider's failure (the next one answers), and is tried again at the next call."""
    from listener.providers import anthropic as anthropic_provider

    loads: list[str] = []

    def import_module(name: str) -> Any:
        loads.append(name)
        if len(loads) == 1:
            raise ImportError(f"No module named {name!r}")
        return importlib.import_module(name)

    monkeypatch.setattr(
        anthropic_provider, "importlib", SimpleNamespace(import_module=import_module)
    )
    rt = await create_runtime(make_settings(ai_provider_priority="anthropic,openai"), pool)
    try:
        first = await course_job(
            conn, "Rust Ownership", params={"itemsPerGroup": 2, "groupCount": 1}
        )
        out = await rt.handlers["ai_course_jobs"](first)
        assert out.metrics["provider"] == "openai"
        [cause] = out.metrics["fallbacks"]
        assert cause.startswith("anthropic: ") and "No module named 'anthropic'" in cause
        assert fake.count("anthropic") == 0
        second = await course_job(conn, "Go Channels", params={"itemsPerGroup": 2, "groupCount": 1})
        out = await rt.handlers["ai_course_jobs"](second)
        assert out.metrics["provider"] == "anthropic" and out.metrics["fallbacks"] == []
        assert loads == ["anthropic", "anthropic"]
    finally:
        await rt.aclose()
