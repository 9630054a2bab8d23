"""Fixtures of the handler tests: the fake providers, a real pool on a fresh
database, settings pointing at both, jobs claimed for real, captured logs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from loguru import logger

from listener import dal, ops
from listener.jobs import Job
from listener.settings import Settings
from tests import fakesupabase
from tests.fakeai import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY, FakeAI
from tests.fakesupabase import FakeSupabase

Conn = psycopg.AsyncConnection[dict[str, Any]]
MakeSettings = Callable[..., Settings]


@pytest.fixture
def supabase() -> Iterator[FakeSupabase]:
    with fakesupabase.running() as f:
        yield f


@pytest.fixture
def make_settings(tmp_path: Path, fake: FakeAI) -> MakeSettings:
    """Settings for the fake providers; keyword arguments override."""

    def make(**over: Any) -> Settings:
        values: dict[str, Any] = {
            "openai_api_key": FAKE_OPENAI_KEY,
            "openai_base_url": fake.openai_url,
            "anthropic_api_key": FAKE_ANTHROPIC_KEY,
            "anthropic_base_url": fake.anthropic_url,
            "ai_provider_priority": "openai,anthropic",
            "ai_timeout_seconds": 5,
            "allow_placeholder": False,
            "storage_url": str(tmp_path / "storage"),
            "cache_ttl_seconds": 0,
            "catalog_batch_jobs": 1,
            "sentry_dsn": None,
        }
        values.update(over)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


async def claim(conn: Conn, table: str, job_id: UUID) -> Job:
    rows = await dal.fetch(conn, "claim_job", {"table": table, "id": job_id, "worker": "test"})
    assert rows, f"job {job_id} could not be claimed"
    return Job.from_claim(rows[0])


async def course_job(conn: Conn, subject: str = "Algebra Basics", **kw: Any) -> Job:
    job_id = await ops.enqueue_course(conn, subject, **kw)
    return await claim(conn, "ai_course_jobs", job_id)


async def media_job(conn: Conn, prompt: str, media_type: str, **kw: Any) -> Job:
    job_id = await ops.enqueue_media(conn, prompt, media_type, **kw)
    return await claim(conn, "ai_media_jobs", job_id)


class Logs:
    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.lines: list[str] = []

    def text(self) -> str:
        """Every loguru record with its bound fields, and every stdlib record (the
        SDKs' and httpx's) with its arguments."""
        stdlib = [f"{r.getMessage()} {r.args!r}" for r in self.caplog.records]
        return "\n".join([*self.lines, *stdlib])


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[Logs]:
    captured = Logs(caplog)
    sink = logger.add(lambda m: captured.lines.append(f"{m} {m.record['extra']}"), level="TRACE")
    caplog.set_level(logging.DEBUG)
    yield captured
    logger.remove(sink)
