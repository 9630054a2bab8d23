"""A worker paused past its lease in the middle of a batch's creation (SIGSTOP, a
frozen VM) wakes to find the intent taken over. The batch it has just made is a
second batch of the same requests when the worker that took over recorded
another one, or the intent has ended: it is cancelled at once (real OpenAI
Batch API client against the fake, real database). When the batch recorded is
this one, or the new holder is still sending, it is left running."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from listener.batches.submit import Submitter
from listener.course_schema import CourseParams
from listener.db import WorkPool
from listener.prompts import course_prompt
from listener.providers.batch_openai import OpenAIBatches
from listener.providers.openai import OpenAIProvider
from tests.fakeai import FakeAI
from tests.integration.handlers.conftest import MakeSettings

pytestmark = pytest.mark.timeout(60)


def _no_crash(moment: str) -> None:
    pass


async def _fail(*_: Any) -> None:
    raise AssertionError("no job fails here")


@pytest.mark.parametrize(
    ("state", "recorded", "cancelled"),
    [
        ("submitted", "another", True),  # the new holder made and recorded its own
        ("ended", None, True),  # the intent is over (its jobs went elsewhere)
        ("submitted", "ours", False),  # the new holder found this one: it is the intent's
        ("submitting", None, False),  # still sent by the new holder past two leases
        ("submitting", "another, later", True),  # ... who then records its own
        ("submitting", "ours, later", False),  # ... who then finds this one
    ],
)
async def test_a_second_batch_made_after_the_lease_was_lost(
    pool: WorkPool,
    fake: FakeAI,
    make_settings: MakeSettings,
    state: str,
    recorded: str | None,
    cancelled: bool,
) -> None:
    fake.batches.delay = 60  # it runs at the provider when the worker wakes
    provider = OpenAIProvider(make_settings())
    try:
        await _second_batch(pool, fake, OpenAIBatches(provider), state, recorded, cancelled)
    finally:
        await provider.aclose()


async def _second_batch(
    pool: WorkPool,
    fake: FakeAI,
    api: OpenAIBatches,
    state: str,
    recorded: str | None,
    cancelled: bool,
) -> None:
    intent, job_id = uuid.uuid4(), uuid.uuid4()
    prompt = course_prompt("Tides", "tides", CourseParams(group_count=2, items_per_group=3))
    sent = await api.submit(intent, [(job_id, prompt)], _no_crash)
    later = recorded is not None and recorded.endswith(", later")
    provider_batch = sent.batch_id if recorded and recorded.startswith("ours") else recorded
    async with pool.connection() as conn:
        await conn.execute(
            "insert into ai_job_batches (id, job_table, state, provider, model, worker_id,"
            " provider_batch_id) values (%s, 'ai_course_jobs', %s, 'openai', %s, 'w2', %s)",
            [intent, state, api.model, None if later else provider_batch],
        )
    submitter = Submitter(pool, "w1", _fail, lease_seconds=1.5)
    record = asyncio.ensure_future(
        submitter._record(intent, sent.batch_id, sent.file_id, made_by=api)
    )
    if later:  # the new holder records its batch while the paused worker waits
        await asyncio.sleep(0.3)
        assert not record.done()
        async with pool.connection() as conn:
            await conn.execute(
                "update ai_job_batches set state = 'submitted', provider_batch_id = %s"
                " where id = %s",
                [provider_batch, intent],
            )
        state = "submitted"
    await record
    assert fake.batches.batches[sent.batch_id].cancelled is cancelled
    assert submitter.cancelled == int(cancelled)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select state, worker_id, provider_batch_id from ai_job_batches where id = %s",
            [intent],
        )
        row = await cur.fetchone()
    assert row is not None  # the intent's row is the new holder's, untouched
    assert (row["state"], row["worker_id"], row["provider_batch_id"]) == (
        state,
        "w2",
        provider_batch,
    )
