"""Nothing that arrives with a probe's answer is lost: a notification sent in the
same transaction as the probe reaches the LISTEN connection in the same packet,
and the service hands it over like any other (leaving psycopg's notifies() with
a break would drop the rest of the packet)."""

from __future__ import annotations

import asyncio

from listener.listen import ListenService
from tests.helpers import aconnect, await_until


async def test_what_comes_with_a_probe_answer_is_delivered(db_url: str) -> None:
    sent = 0

    async def notify_with_company(channel: str, payload: str) -> None:
        """The probe, then a job's notification, in one transaction: one packet."""
        nonlocal sent
        sent += 1  # before it is sent: an answered probe has always been counted
        async with await aconnect(db_url) as c:
            await c.execute(
                "select pg_notify(%s, %s), pg_notify(%s, 'with the probe')",
                [channel, payload, channel],
            )

    heard: list[str] = []
    service = ListenService(
        db_url,
        name="test",
        channel="ai_jobs",
        listen_query="listen",
        on_payload=heard.append,
        on_connect=lambda recovered: None,
        notify=notify_with_company,
        probe_every=0.1,
        sender="packets",
    )
    assert await service.verify(asyncio.Event())  # a first probe, and its company
    task = asyncio.create_task(service.run())
    try:

        async def probes(n: int) -> bool:
            return service.probes >= n and service._probe_deadline is None

        await await_until(lambda: probes(6), what="six probes answered")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert service.deaf_count == 0
    assert heard == ["with the probe"] * sent  # every one of them, and nothing else
