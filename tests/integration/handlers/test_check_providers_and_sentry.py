"""`ai-jobs check-providers` through the real CLI, and Sentry reporting against a
local endpoint."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest
import sentry_sdk
from psycopg_pool import AsyncConnectionPool

from listener import telemetry
from listener.errors import GenerationError
from tests.fakeai import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY, FakeAI
from tests.helpers import AI_JOBS, await_until, env
from tests.integration.handlers.conftest import Conn, MakeSettings, course_job

pytestmark = pytest.mark.timeout(60)


def check(fake: FakeAI, **extra: Any) -> subprocess.CompletedProcess[str]:
    values = {
        "OPENAI_API_KEY": FAKE_OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_url,
        "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY,
        "ANTHROPIC_BASE_URL": fake.anthropic_url,
        "AI_TIMEOUT_SECONDS": "2",
        **extra,
    }
    e = env(None, **values)
    for k in [k for k, v in values.items() if v is None]:
        e.pop(k)
    return subprocess.run(
        [*AI_JOBS, "check-providers"], env=e, capture_output=True, text=True, timeout=90
    )


def table(stdout: str) -> dict[str, list[str]]:
    """provider -> [provider, model, status, detail], cut at the header's columns."""
    lines = stdout.strip().splitlines()
    starts = [lines[0].index(h) for h in ("provider", "model", "status", "detail")]
    cut = [(a, b) for a, b in zip(starts, [*starts[1:], None], strict=True)]
    rows = [[ln[a:b].strip() for a, b in cut] for ln in lines[1:]]
    return {r[0]: r for r in rows}


def test_check_providers_all_ok(fake: FakeAI) -> None:
    p = check(fake, ALLOW_PLACEHOLDER="1")
    assert p.returncode == 0, p.stderr
    rows = table(p.stdout)
    assert rows["openai"][1:3] == ["gpt-4.1-mini", "ok"]
    assert rows["anthropic"][1:3] == ["claude-haiku-4-5", "ok"]
    assert rows["placeholder"][2] == "ok"
    assert fake.count("openai", "/v1/models") == 1 and fake.count("anthropic", "/v1/models") == 1


def test_check_providers_fails_on_a_bad_key(fake: FakeAI) -> None:
    fake.modes["anthropic"] = "401"
    p = check(fake)
    assert p.returncode == 1
    assert table(p.stdout)["anthropic"][2] == "failed"
    assert table(p.stdout)["openai"][2] == "ok"
    assert p.stderr.strip().splitlines() == [
        "ai-jobs: error: provider check failed: anthropic "
        "(HTTP 401 Incorrect API key provided: ***)"
    ]
    assert FAKE_ANTHROPIC_KEY not in p.stdout + p.stderr


def test_check_providers_skips_unset_keys_and_needs_one(fake: FakeAI) -> None:
    p = check(fake, OPENAI_API_KEY=None)
    assert p.returncode == 0, p.stderr
    assert table(p.stdout)["openai"][1:] == ["", "not configured", "OPENAI_API_KEY not set"]
    assert fake.count("openai") == 0

    p = check(fake, OPENAI_API_KEY=None, ANTHROPIC_API_KEY=None)
    assert p.returncode == 1
    assert p.stderr.strip() == (
        "ai-jobs: error: No AI provider configured: set OPENAI_API_KEY or "
        "ANTHROPIC_API_KEY (or ALLOW_PLACEHOLDER=1)"
    )


def test_check_providers_times_out(fake: FakeAI) -> None:
    fake.modes["openai"] = "slow"
    p = check(fake, AI_TIMEOUT_SECONDS="0.5", ANTHROPIC_API_KEY=None)
    assert p.returncode == 1
    assert table(p.stdout)["openai"][2:] == ["failed", "timeout after 0.5s"]


# -- Sentry --------------------------------------------------------------------------


@pytest.fixture
def no_sentry() -> Any:
    yield
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)


async def test_sentry_gets_the_failure_with_the_runbook_tags(
    conn: Conn,
    pool: AsyncConnectionPool[Any],
    fake: FakeAI,
    make_settings: MakeSettings,
    no_sentry: None,
) -> None:
    fake.modes.update(openai="429", anthropic="500")
    dsn = f"http://publickey@{fake.url.removeprefix('http://')}/42"
    s = make_settings(sentry_dsn=dsn)
    assert telemetry.init_sentry(s) is True
    job = await course_job(conn, "Failing Subject")
    with pytest.raises(GenerationError) as err:
        from listener.handlers import create_runtime

        rt = await create_runtime(s, pool)
        try:
            await rt.handlers["ai_course_jobs"](job)
        finally:
            await rt.aclose()
    telemetry.capture_job_failure(job, err.value)
    telemetry.flush()

    async def event() -> dict[str, Any] | None:
        for envelope in fake.envelopes:
            for line in envelope.splitlines():
                if line.startswith(b"{") and b'"exception"' in line:
                    return json.loads(line)  # type: ignore[no-any-return]
        return None

    ev = await await_until(event, timeout=5, what="the Sentry event")
    assert ev["tags"]["function"] == "ai-job-runner"
    assert ev["tags"]["request_id"] == str(job.claim_token)
    assert ev["extra"]["jobId"] == str(job.id)
    assert ev["extra"]["courseId"] == "failing-subject"
    assert ev["extra"]["retryCount"] == 0
    assert ev["extra"]["error"].startswith("Course generation failed: openai: HTTP 429")
    raw = b"".join(fake.envelopes).decode()
    assert FAKE_OPENAI_KEY not in raw and FAKE_ANTHROPIC_KEY not in raw


async def test_nothing_is_sent_without_a_dsn(
    conn: Conn, make_settings: MakeSettings, fake: FakeAI, no_sentry: None
) -> None:
    assert telemetry.init_sentry(make_settings(sentry_dsn=None)) is False
    assert not sentry_sdk.is_initialized()
    job = await course_job(conn)
    telemetry.capture_job_failure(job, GenerationError("x"))  # a no-op
    telemetry.flush()
    assert fake.envelopes == []
    assert uuid.UUID(str(job.claim_token))
