"""Secrets never in a job's error or a log line, whoever wrote them there: tests
that fail on the planted bugs of the security issue (a `Bearer ...` token or a
settings secret left unscrubbed in a job error or a log line)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger
from pydantic import SecretStr

from listener import logs
from listener.errors import scrub
from listener.jobs import Job, Outcome
from listener.settings import Settings
from tests.helpers import aconnect, await_until
from tests.workers import running_worker
from tests.workers import settings as worker_settings

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJyb2xlIjoic2VydmljZV9yb2xlIiwiaXNzIjoic3VwYWJhc2UifQ."
    "M2lnbmF0dXJlLW9mLXRoZS1rZXk"
)


def secret_fields() -> list[str]:
    return [n for n, f in Settings.model_fields.items() if "SecretStr" in str(f.annotation)]


def every_secret(**base: Any) -> tuple[Settings, dict[str, str]]:
    """Settings with a distinct value in every secret setting there is."""
    values = {name: f"{name}-{uuid.uuid4().hex}" for name in secret_fields()}
    values["database_url"] = f"postgresql://u:{uuid.uuid4().hex}@db.example:5432/x"
    return Settings(**{**base, **{k: SecretStr(v) for k, v in values.items()}}), values


@pytest.fixture
def captured() -> Iterator[list[str]]:
    """Log lines as the configured sinks format them (message and extra fields)."""
    lines: list[str] = []
    yield lines
    logger.remove()
    logger.configure(patcher=None)
    logger.add(sys.stderr)


def test_every_secret_setting_is_known_to_the_scrubber() -> None:
    assert {"openai_api_key", "admin_token", "alert_webhook_url", "database_url"} <= set(
        secret_fields()
    )
    s, values = every_secret()
    assert sorted(s.secrets()) == sorted(values.values())
    text = " | ".join(values.values())
    cleaned = scrub(f"failed: {text}", s)
    for name, value in values.items():
        assert value not in cleaned, name


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("Authorization: Bearer abc", "abc"),  # however short
        (f"Authorization: Bearer {JWT}", JWT),
        (f"apikey: {JWT}", JWT),  # a Supabase key, quoted bare
        ("authorization: basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ("Incorrect API key provided: sk-proj-abcdefgh1234", "sk-proj-abcdefgh1234"),
        ("key sk-ant-api03-abcdefghij", "sk-ant-api03-abcdefghij"),
        ("connect to postgresql://user:hunter2@db:5432/x failed", "hunter2"),
        ("dsn: host=db password=hunter2 user=u", "hunter2"),
    ],
)
def test_credentials_are_hidden_wherever_they_are_quoted(text: str, hidden: str) -> None:
    cleaned = scrub(text)
    assert hidden not in cleaned and "***" in cleaned


def test_every_log_line_is_scrubbed(captured: list[str]) -> None:
    s, values = every_secret()
    logs.setup("json", "DEBUG", s.secrets())
    logger.add(lambda m: captured.append(f"{m} {m.record['extra']}"), level="DEBUG")
    for name, value in values.items():
        logger.warning(f"careless: {name} = {value}")
        logger.bind(action="x", value=value).info("bound")
    logger.error(f"upstream said: Authorization: Bearer {JWT}")
    logger.bind(header=f"Bearer {JWT}").info("bound header")
    text = "\n".join(captured)
    assert len(captured) == 2 * len(values) + 2
    for value in [*values.values(), JWT]:
        assert value not in text
    assert text.count("***") >= 2 * len(values) + 2


async def test_a_failing_job_keeps_no_secret_in_its_error_nor_the_log(
    db_url: str, captured: list[str]
) -> None:
    base = worker_settings(db_url)
    s, values = every_secret(**{k: getattr(base, k) for k in ("storage_url", "retry_base_seconds")})
    s = s.model_copy(update={"database_url": SecretStr(db_url)})
    logs.setup("text", "DEBUG", s.secrets())
    logger.add(lambda m: captured.append(f"{m} {m.record['extra']}"), level="DEBUG")
    leaked = f"{values['openai_api_key']} {values['admin_token']} Bearer {JWT} Basic abcdefgh"

    async def handler(job: Job) -> Outcome:
        logger.bind(action="handler").info(f"calling the provider with {leaked}")
        raise RuntimeError(f"upstream refused the request: {leaked}")

    async with await aconnect(db_url) as c:
        cur = await c.execute(
            "insert into ai_course_jobs (subject, max_retries) values ('x', 1) returning id"
        )
        job_id = (await cur.fetchone())["id"]
        async with running_worker(s, {"ai_course_jobs": handler}):

            async def ended() -> Any:
                cur = await c.execute("select * from ai_course_jobs where id = %s", [job_id])
                row = await cur.fetchone()
                return row if row["status"] == "dead_letter" else None

            row = await await_until(ended, what="dead letter")
    log = "\n".join(captured)
    assert "upstream refused the request" in row["error"] and "upstream refused" in log
    for secret in (values["openai_api_key"], values["admin_token"], JWT, "abcdefgh"):
        assert secret not in row["error"], secret
        assert secret not in log, secret
