"""The providers' breakers shared through the database (listener/providers/breaker.py):
two Breakers on one database stand for two worker processes; each keeps a copy
of the shared state and reads it again at most STATE_CACHE_SECONDS later."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from listener import db
from listener.providers.base import Classified, Failure
from listener.providers.breaker import STATE_CACHE_SECONDS, Breakers
from listener.settings import Settings
from tests.helpers import await_until

pytestmark = pytest.mark.timeout(60)
LEASE = 30.0


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[db.WorkPool]:
    p = db.make_pool(db_url, 4)
    await p.open(wait=True)
    yield p
    await p.close(timeout=1)


def _settings() -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        provider_breaker_threshold=1,
        provider_breaker_cooldown_seconds=600,
    )


async def test_a_second_worker_learns_of_the_breaker_within_the_cache_time(
    pool: db.WorkPool,
) -> None:
    first, second = Breakers(pool, _settings()), Breakers(pool, _settings())
    assert (await first.admit("openai", LEASE)).call  # its copy is read: all closed
    assert (await second.admit("openai", LEASE)).call
    await second.record("openai", Classified(Failure.UNWELL), "openai: HTTP 500")
    assert not (await second.admit("openai", LEASE)).call  # its own write: at once

    async def refused(b: Breakers) -> Any:
        admission = await b.admit("openai", LEASE)
        return None if admission.call else admission

    # The first one reads the shared state again once its copy is old.
    seen = await await_until(
        lambda: refused(first), timeout=STATE_CACHE_SECONDS + 3, what="the breaker open"
    )
    assert "breaker open" in seen.reason and "openai: HTTP 500" in seen.reason
    assert seen.wait > 500

    # And of its closing (the other worker's call succeeded): it asks again.
    await second.succeeded("openai")

    async def admitted(b: Breakers) -> bool:
        return (await b.admit("openai", LEASE)).call

    await await_until(
        lambda: admitted(first), timeout=STATE_CACHE_SECONDS + 3, what="the breaker closed"
    )
