"""The LISTEN service (listener/listen.py) on its own and under the dashboard's
live feed: the probe proves the connection hears its channel, a deaf connection
is found and replaced, and a channel that never delivers is refused at start."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from loguru import logger

from listener import dal
from listener import listen as listen_module
from listener.dal import Statement
from listener.listen import PROBE_TIMEOUT, ListenService, ListenUnavailable, probe_payload
from listener.notifications import parse_payload
from listener.settings import Settings
from listener.web.app import Dashboard
from tests.faultproxy import FaultProxy
from tests.helpers import aconnect, await_until

PROBE = 0.5


@pytest.fixture
def records() -> Iterator[list[dict[str, Any]]]:
    found: list[dict[str, Any]] = []
    sink = logger.add(lambda m: found.append(m.record["extra"] | {"msg": m.record["message"]}))
    yield found
    logger.remove(sink)


def _sender(url: str, channel_override: str | None = None) -> Any:
    """A `notify` that sends through a connection of its own (as a pool would)."""

    async def notify(channel: str, payload: str) -> None:
        async with await aconnect(url) as c:
            await c.execute("select pg_notify(%s, %s)", [channel_override or channel, payload])

    return notify


@asynccontextmanager
async def running(service: ListenService) -> AsyncIterator[ListenService]:
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.connected.wait(), 10)
        yield service
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def _service(url: str, notify: Any, **kw: Any) -> tuple[ListenService, list[str], list[bool]]:
    heard: list[str] = []
    connects: list[bool] = []
    service = ListenService(
        url,
        name="test",
        channel="ai_jobs",
        listen_query="listen",
        on_payload=heard.append,
        on_connect=connects.append,
        notify=notify,
        probe_every=PROBE,
        sender="test-sender",
        **kw,
    )
    return service, heard, connects


async def _true(check: Any) -> bool:
    return bool(check())


async def test_probes_prove_the_connection_and_stay_out_of_the_payloads(db_url: str) -> None:
    service, heard, connects = _service(db_url, _sender(db_url))
    async with running(service):
        await await_until(lambda: _true(lambda: service.probes >= 3), what="three probes")
        assert service.probe_seconds is not None and service.probe_seconds < PROBE_TIMEOUT
        assert service.state == "listening" and service.deaf_count == 0
        async with await aconnect(db_url) as c:
            await c.execute("notify ai_jobs, 'a payload'")
            await c.execute("select pg_notify('ai_jobs', %s)", [probe_payload("another", 1)])
        try:
            await await_until(lambda: _true(lambda: len(heard) >= 2), what="both payloads")
        except AssertionError as exc:  # say what the service went through meanwhile
            raise AssertionError(
                f"{exc}: heard {heard}, connects {connects}, state {service.state}, "
                f"deaf {service.deaf_count}"
            ) from None
    assert len(heard) == 2, heard
    assert heard[0] == "a payload"  # its own probes never reach the owner
    assert parse_payload(heard[1]).probe == "another"  # another's: a probe, not a nudge
    assert connects == [False]


async def test_a_muted_connection_is_found_deaf_then_replaced(
    db_url: str, proxy: FaultProxy, records: list[dict[str, Any]]
) -> None:
    url = proxy.url(db_url)
    service, _, connects = _service(url, _sender(db_url))
    async with running(service):
        await await_until(lambda: _true(lambda: service.probe_seconds is not None))
        t0 = asyncio.get_running_loop().time()
        assert proxy.mute() == 1  # pings still answer: only the probe can tell
        await await_until(lambda: _true(lambda: service.deaf_count == 1), timeout=15)
        deaf_after = asyncio.get_running_loop().time() - t0
        await await_until(lambda: _true(lambda: service.state == "listening"), timeout=10)
    assert deaf_after <= PROBE + PROBE_TIMEOUT + 1.0
    assert service.reconnects == 1 and connects == [False, True]  # the owner catches up
    actions = [r["action"] for r in records if r.get("listener") == "test"]
    assert actions.count("test_deaf") == 1 and actions.count("test_healthy") == 1


async def test_verify_refuses_a_channel_that_never_delivers(db_url: str) -> None:
    # Probes sent elsewhere never come back: what a transaction-mode pooler does.
    service, _, _ = _service(db_url, _sender(db_url, channel_override="elsewhere"))
    with pytest.raises(ListenUnavailable, match="LISTEN does not work through DATABASE_URL"):
        await service.verify(asyncio.Event())
    assert "LISTEN_MODE=poll" in str(ListenUnavailable(service._unavailable()))


async def test_verify_keeps_its_proved_connection_for_the_run(db_url: str) -> None:
    service, _, connects = _service(db_url, _sender(db_url))
    assert await service.verify(asyncio.Event())
    pid = service._verified.info.backend_pid if service._verified else None
    async with running(service):
        assert service.backend_pid == pid
    assert connects == [False]


async def test_the_dashboard_feed_probes_through_its_own_pool(
    db_url: str, proxy: FaultProxy, records: list[dict[str, Any]]
) -> None:
    d = Dashboard(Settings(listen_probe_seconds=PROBE), proxy.url(db_url), "x" * 32)
    await d.pool.open(wait=True)
    await d.feed.start()
    try:
        service = d.feed.service
        await await_until(lambda: _true(lambda: service.probe_seconds is not None))
        proxy.mute()
        await await_until(lambda: _true(lambda: service.deaf_count == 1), timeout=15)
        await await_until(lambda: _true(lambda: service.state == "listening"), timeout=10)
    finally:
        await d.feed.stop()
        await d.pool.close()
    assert any(r.get("action") == "live_deaf" for r in records)


class _Text(Statement):
    """A statement given by its text (what the service sends for LISTEN or a ping)."""

    def __init__(self, text: str) -> None:
        super().__init__("test")
        self.text = text

    @property
    def sql(self) -> str:
        return self.text


async def test_notifications_that_come_with_the_listens_reply_are_delivered(db_url: str) -> None:
    # The LISTEN's own reply carries a notification (sent by the same
    # statement): psycopg reads it before the service reads the socket itself.
    listen = _Text(
        "do $$ begin execute 'listen ai_jobs'; perform pg_notify('ai_jobs', 'early'); end $$"
    )
    heard: list[str] = []
    service = ListenService(
        db_url, name="test", channel="ai_jobs", listen_query=listen,
        on_payload=heard.append, on_connect=lambda _: None,
    )  # fmt: skip
    async with running(service):
        async with await aconnect(db_url) as c:
            await c.execute("notify ai_jobs, 'later'")
        await await_until(lambda: _true(lambda: len(heard) >= 2), what="both payloads")
    assert heard == ["early", "later"]


async def test_notifications_that_come_with_a_pings_reply_are_delivered(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ping's reply is read by psycopg, not by the service's reader callback:
    # what arrives with it still reaches the owner, once.
    monkeypatch.setattr(listen_module, "PING_INTERVAL", 0.2)
    monkeypatch.setattr(dal, "KEEPALIVE", _Text("select pg_notify('ai_jobs', 'during a ping')"))
    heard: list[str] = []
    service = ListenService(
        db_url, name="test", channel="ai_jobs", listen_query="listen",
        on_payload=heard.append, on_connect=lambda _: None,
    )  # fmt: skip
    async with running(service):
        await await_until(lambda: _true(lambda: len(heard) >= 2), what="two pings' payloads")
        async with await aconnect(db_url) as c:
            await c.execute("notify ai_jobs, 'between pings'")
        await await_until(lambda: _true(lambda: "between pings" in heard), what="the other")
    assert set(heard) == {"during a ping", "between pings"}
    assert heard.count("between pings") == 1


async def test_a_forged_echo_of_the_probe_does_not_hide_a_deaf_connection(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The probes never come back (sent elsewhere, as to a connection gone deaf),
    # while anyone may NOTIFY the channel: each probe is followed there by a
    # forged echo, the service's own sender with another nonce. Only the real
    # echo proves the connection hears; the forgery must not.
    monkeypatch.setattr(listen_module, "PROBE_TIMEOUT", 1.0)
    forged: list[int] = []

    async def notify(channel: str, payload: str) -> None:
        probe = listen_module.probe_of(payload)
        assert probe is not None
        sender, n = probe
        async with await aconnect(db_url) as c:
            await c.execute("select pg_notify('elsewhere', %s)", [payload])
            await c.execute(
                "select pg_notify(%s, %s), pg_notify(%s, %s)",
                [channel, probe_payload(sender, n ^ 1), channel, f"after forgery {n}"],
            )
        forged.append(n)

    service, heard, _ = _service(db_url, notify)
    async with running(service):
        # The forgery of the first probe has reached the service (the marker sent
        # after it has), while that probe was still waited for.
        await await_until(lambda: _true(lambda: forged and heard), what="a forged echo heard")
        assert heard[0] == f"after forgery {forged[0]}"
        await await_until(
            lambda: _true(lambda: service.deaf_count >= 1), timeout=10, what="found deaf"
        )
    assert service.probe_seconds is None  # no probe ever counted as back


async def test_a_ping_unanswered_moves_the_service_to_a_fresh_connection(
    db_url: str, proxy: FaultProxy, records: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The LISTEN connection's link went dead (blackholed: nothing comes back, as
    # while a host's link is down and TCP waits to retransmit), while a new
    # connection would work (the link is back). The service does not wait for
    # the ping's timeout: after PING_SUSPECT it tries a fresh connection beside
    # the ping, and moves to it.
    monkeypatch.setattr(listen_module, "PING_INTERVAL", 0.3)
    monkeypatch.setattr(listen_module, "PING_SUSPECT", 0.5)
    monkeypatch.setattr(listen_module, "PING_TIMEOUT", 60.0)  # never the reason here
    service, heard, connects = _service(proxy.url(db_url), None)
    async with running(service):
        assert proxy.blackhole() == 1
        await await_until(lambda: _true(lambda: service.replacements == 1), timeout=10)
        await await_until(lambda: _true(lambda: service.connected.is_set()))
        async with await aconnect(db_url) as c:
            await c.execute("notify ai_jobs, 'on the fresh connection'")
        await await_until(lambda: _true(lambda: "on the fresh connection" in heard))
        assert service.state == "listening" and service.reconnects == 1
        assert connects == [False, True]  # the owner catches up what the gap lost
    actions = [r["action"] for r in records if r.get("listener") == "test"]
    assert actions.count("test_replaced") == 1 and "test_unhealthy" not in actions


async def test_a_suspect_after_an_outage_is_pinged_and_moved_at_once(
    db_url: str, proxy: FaultProxy, records: list[dict[str, Any]]
) -> None:
    # The owner found the database back after an outage (a link that was down):
    # the LISTEN connection, blackholed here as one waiting for TCP's
    # retransmission, is pinged at once and left for a fresh connection within
    # SUSPECT_PING, not after PING_INTERVAL of silence plus PING_SUSPECT (7 s).
    service, heard, connects = _service(proxy.url(db_url), None)
    async with running(service):
        assert proxy.blackhole() == 1
        service.suspect()
        await await_until(
            lambda: _true(lambda: service.replacements == 1),
            timeout=listen_module.PING_INTERVAL,
            what="moved to a fresh connection",
        )
        await await_until(lambda: _true(lambda: service.connected.is_set()))
        async with await aconnect(db_url) as c:
            await c.execute("notify ai_jobs, 'after the suspect'")
        await await_until(lambda: _true(lambda: "after the suspect" in heard))
        assert connects == [False, True]  # the owner catches up what the gap lost
    replaced = [r["msg"] for r in records if r.get("action") == "test_replaced"]
    assert len(replaced) == 1 and f"within {listen_module.SUSPECT_PING:g}s" in replaced[0]


async def test_a_suspect_that_answers_keeps_its_connection(db_url: str) -> None:
    service, _, connects = _service(db_url, None)
    async with running(service):
        pid, pinged = service.backend_pid, service._pinged_at
        service.suspect()
        await await_until(lambda: _true(lambda: service._pinged_at > pinged), what="pinged")
        assert service.backend_pid == pid and service.replacements == 0
        assert connects == [False]


async def test_a_slow_ping_that_answers_keeps_its_connection(
    db_url: str, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ping slower than PING_SUSPECT, while no fresh connection can be made (the
    # server refuses them): the tries beside it fail, the ping answers, and the
    # session goes on, on the same connection, with nothing left open.
    monkeypatch.setattr(listen_module, "PING_INTERVAL", 0.2)
    monkeypatch.setattr(listen_module, "PING_SUSPECT", 0.3)
    monkeypatch.setattr(
        dal, "KEEPALIVE", _Text("select pg_sleep(1.0), pg_notify('ai_jobs', 'ping answered')")
    )
    service, heard, connects = _service(proxy.url(db_url), None)
    async with running(service):
        pid = service.backend_pid
        proxy.refusing = True
        await await_until(lambda: _true(lambda: heard.count("ping answered") >= 2), timeout=10)
        assert proxy.refused >= 1  # fresh connections were tried beside the slow pings
        assert proxy.accepted == 1  # and none got through
        assert service.backend_pid == pid and service.reconnects == 0
        assert service.replacements == 0 and connects == [False]
        assert len(proxy.links) == 1


async def test_a_probe_the_pool_could_not_send_is_sent_again(db_url: str) -> None:
    # The pool's connection failed under the probe (cut by the pool medic, say):
    # the same probe goes again at once, on the pool's next connection, instead
    # of waiting out another quiet period; its echo proves the connection.
    sent: list[int] = []
    send = _sender(db_url)

    async def notify(channel: str, payload: str) -> None:
        probe = listen_module.probe_of(payload)
        assert probe is not None
        sent.append(probe[1])
        if len(sent) == 1:
            raise psycopg.OperationalError("the pool's connection was shut down")
        await send(channel, payload)

    service, _, _ = _service(db_url, notify)
    async with running(service):
        await await_until(lambda: _true(lambda: service.probe_seconds is not None))
    assert sent[0] == sent[1]  # the same probe, sent again
    assert service.deaf_count == 0 and service.probes == len(set(sent))
