"""One secrets path: every secret setting (each SecretStr field of Settings, found
by its type, so a new one is covered without touching this file) is scrubbed
from each place a secret could leak to: a log line, a job's error, a provider's
error, a Sentry event."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from loguru import logger
from pydantic import SecretStr

from listener import dal, db, logs, telemetry
from listener.completer import Completer
from listener.errors import GenerationError
from listener.executor import Executor
from listener.jobs import Job, Outcome
from listener.leases import LeaseKeeper
from listener.outage import AwayRetry, Health
from listener.pacing import Pacing
from listener.providers.base import Media
from listener.providers.breaker import Breakers
from listener.providers.chain import Chain
from listener.providers.meter import Meter
from listener.settings import Settings
from tests import fakeai
from tests.helpers import connect, insert_course
from tests.helpers import job as job_row

# By type, as a reader of settings.py would find them (not through Settings' own list).
SECRET_FIELDS = [n for n, f in Settings.model_fields.items() if "SecretStr" in repr(f.annotation)]


def test_the_secret_settings_are_found_by_their_type() -> None:
    assert Settings.secret_fields() == SECRET_FIELDS
    assert {"database_url", "openai_api_key", "admin_token", "alert_webhook_url"} <= set(
        SECRET_FIELDS
    )


def settings_with_secrets(**real: str) -> tuple[Settings, dict[str, str]]:
    """A distinct value in every secret setting (`real` ones where a sink needs
    them to work: the test database, the fake Sentry)."""
    values = {name: f"{name}-{uuid.uuid4().hex}" for name in SECRET_FIELDS}
    values["database_url"] = f"postgresql://u:{uuid.uuid4().hex}@db.example:5432/x"
    values.update(real)
    fields: dict[str, Any] = {k: SecretStr(v) for k, v in values.items()}
    fields["storage_url"] = "/tmp/unused"
    return Settings(_env_file=None, **fields), values  # type: ignore[call-arg]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    logger.remove()
    logger.configure(patcher=None)
    logger.add(sys.stderr)


async def log_sink(s: Settings, leak: str) -> str:
    lines: list[str] = []
    logs.setup("json", "DEBUG", s.secrets())
    logger.add(lambda m: lines.append(f"{m} {m.record['extra']}"), level="DEBUG")
    logger.bind(action="careless", detail=leak).warning(f"careless: {leak}")
    logging.getLogger("psycopg").warning("a driver quoting %s", leak)  # through logs.py too
    assert len(lines) == 2 and all("<***>" in line for line in lines), lines
    return "\n".join(lines)


async def job_error_sink(s: Settings, leak: str, db_url: str) -> str:
    with connect(db_url) as c:
        jid = insert_course(c, "leaks a secret", max_retries=5)
    pool = db.make_pool(db_url, 2)
    await pool.open(wait=True)
    try:
        retry = AwayRetry(Health("database"))

        async def handler(j: Job) -> Outcome:
            raise RuntimeError(leak)

        leases = LeaseKeeper(pool, 3600, retry=retry, report=lambda exc, what: None)
        executor = Executor(
            s,
            pool,
            {"ai_course_jobs": handler},
            leases,
            Completer(pool, retry, backlog=1),
            Pacing(1),
            retry=retry,
            on_due=lambda due: None,
            on_free=lambda: None,
        )
        row = await dal.CLAIM_JOB.first(pool, {"table": "ai_course_jobs", "id": jid, "worker": "w"})
        assert row is not None
        await executor.start(Job.from_claim(row))
    finally:
        await pool.close()
    with connect(db_url) as c:
        failed = job_row(c, jid)
    assert failed["status"] == "failed"
    return str(failed["error"])


class LeakyProvider:
    name, model = "leaky", "leaky-1"


async def provider_error_sink(s: Settings, leak: str) -> str:
    chain = Chain(s, Breakers(None, s), Meter(None, set()))

    async def make(p: Any) -> Media:
        raise RuntimeError(f"HTTP 400 from upstream: {leak}")

    with pytest.raises(GenerationError) as err:
        await chain.media([LeakyProvider()], make)  # type: ignore[list-item]
    return err.value.message


async def sentry_sink(s: Settings, leak: str, fake: fakeai.FakeAI) -> str:
    assert telemetry.init_sentry(s)
    j = Job("ai_course_jobs", uuid.uuid4(), uuid.uuid4(), 0, 3, {"course_id": leak})
    try:
        raise RuntimeError(leak)
    except RuntimeError as exc:
        telemetry.capture_job_failure(j, exc)
    telemetry.flush()
    for _ in range(250):
        events = [
            line
            for envelope in fake.envelopes
            for line in envelope.splitlines()
            if line.startswith(b"{") and b'"exception"' in line
        ]
        if events:
            event = json.loads(events[0])
            assert event["extra"]["jobId"] == str(j.id)
            return json.dumps(event)
        await asyncio.sleep(0.02)
    raise AssertionError("no Sentry event arrived")


@pytest.fixture
def no_sentry() -> Iterator[None]:
    yield
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)


def leak_of(field: str, values: dict[str, str]) -> str:
    return f"upstream echoed <{values[field]}> in its answer"


def assert_scrubbed(text: str, field: str, values: dict[str, str]) -> None:
    assert "upstream echoed <***>" in text, text  # the sink got the text, without the value
    assert values[field] not in text


@pytest.mark.parametrize("field", SECRET_FIELDS)
async def test_every_secret_setting_is_scrubbed_from_the_logs(
    field: str, restore_logging: None
) -> None:
    s, values = settings_with_secrets()
    assert_scrubbed(await log_sink(s, leak_of(field, values)), field, values)


@pytest.mark.parametrize("field", SECRET_FIELDS)
async def test_every_secret_setting_is_scrubbed_from_a_job_error(field: str, db_url: str) -> None:
    s, values = settings_with_secrets()
    assert_scrubbed(await job_error_sink(s, leak_of(field, values), db_url), field, values)


@pytest.mark.parametrize("field", SECRET_FIELDS)
async def test_every_secret_setting_is_scrubbed_from_a_provider_error(field: str) -> None:
    s, values = settings_with_secrets()
    assert_scrubbed(await provider_error_sink(s, leak_of(field, values)), field, values)


@pytest.mark.parametrize("field", SECRET_FIELDS)
async def test_every_secret_setting_is_scrubbed_from_a_sentry_event(
    field: str, fake: fakeai.FakeAI, no_sentry: None
) -> None:
    # A DSN that reaches the fake Sentry, and a secret like any other.
    dsn = f"http://{uuid.uuid4().hex}@{fake.url.removeprefix('http://')}/42"
    s, values = settings_with_secrets(sentry_dsn=dsn)
    assert_scrubbed(await sentry_sink(s, leak_of(field, values), fake), field, values)
