"""The one "is the database away?" decision (outage.diagnose), the transitions
Health logs once each, and the retry while the database is away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import psycopg
import pytest
from loguru import logger
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from listener.errors import (
    AiJobsError,
    DatabaseBusy,
    DatabaseUnavailable,
    InvalidJob,
    SchemaOutdated,
    translate,
)
from listener.outage import AwayRetry, Backoff, Health, Verdict, diagnose

AWAY, BUSY, ERROR = Verdict.AWAY, Verdict.BUSY, Verdict.ERROR


@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (psycopg.OperationalError("server closed the connection unexpectedly"), AWAY),
        (psycopg.InterfaceError("the connection is closed"), AWAY),
        (DatabaseUnavailable("Cannot reach PostgreSQL: connection refused"), AWAY),
        (ConnectionResetError("reset by peer"), AWAY),
        (pg_errors.AdminShutdown("terminating connection due to administrator command"), AWAY),
        (DatabaseBusy("PostgreSQL did not serve the request in time"), BUSY),
        (pg_errors.QueryCanceled("canceling statement due to statement timeout"), BUSY),
        (pg_errors.LockNotAvailable("could not obtain lock"), BUSY),
        (pg_errors.TooManyConnections("sorry, too many clients already"), BUSY),
        (TimeoutError(), BUSY),
        (PoolTimeout("couldn't get a connection after 5.00 sec"), BUSY),
        (SchemaOutdated(), ERROR),
        (InvalidJob("bad params"), ERROR),
        (pg_errors.UniqueViolation("duplicate key"), ERROR),
        (AiJobsError("Database error: syntax error"), ERROR),
        (RuntimeError("a bug"), ERROR),
    ],
)
def test_every_exception_is_away_busy_or_an_error(exc: BaseException, verdict: Verdict) -> None:
    d = diagnose(exc)
    assert d.verdict is verdict
    assert d.transient == (verdict is not ERROR)


def test_the_messages_tell_a_timeout_or_a_busy_pool_from_an_outage() -> None:
    away = str(diagnose(DatabaseUnavailable("Cannot reach PostgreSQL: connection refused")))
    timeout = str(diagnose(TimeoutError()))  # asyncio.timeout's: no text of its own
    pool = str(diagnose(PoolTimeout("couldn't get a connection after 2.00 sec")))
    assert away.startswith("database unavailable: ") and "connection refused" in away
    assert timeout == "database busy: timed out"
    assert pool.startswith("database busy: ") and "2.00 sec" in pool
    assert "unavailable" not in timeout + pool


def test_translate_tells_a_statement_timeout_from_a_lost_server() -> None:
    busy = translate(pg_errors.QueryCanceled("canceling statement due to statement timeout"))
    gone = translate(pg_errors.AdminShutdown("terminating connection"))
    assert isinstance(busy, DatabaseBusy) and "in time" in busy.message
    assert isinstance(gone, DatabaseUnavailable) and not isinstance(gone, DatabaseBusy)
    # Callers that only ask "retry later?" treat both alike.
    assert isinstance(busy, DatabaseUnavailable)


@pytest.fixture
def actions() -> Iterator[list[tuple[str, str, str]]]:
    found: list[tuple[str, str, str]] = []
    sink = logger.add(
        lambda m: found.append(
            (m.record["extra"].get("action", ""), m.record["level"].name, m.record["message"])
        ),
        level="DEBUG",
    )
    yield found
    logger.remove(sink)


def test_health_logs_each_transition_once(actions: list[tuple[str, str, str]]) -> None:
    healed: list[int] = []
    h = Health("database", heal=lambda: healed.append(1))
    h.up()  # the first verdict: nothing to report
    lost = psycopg.OperationalError("server closed the connection")
    for _ in range(3):
        h.down(lost)
    h.down(TimeoutError())  # busy while away changes nothing
    h.up()
    h.down(TimeoutError())
    h.down(TimeoutError())
    h.down(lost)  # busy, then away: worse
    h.down(RuntimeError("a bug"))  # not a health matter: the caller shows it
    h.up()
    assert [a for a, _, _ in actions] == [
        "database_unhealthy",
        "database_healthy",
        "database_busy",
        "database_unhealthy",
        "database_healthy",
    ]
    assert "connection lost" in actions[0][2] and "no answer in time" in actions[2][2]
    assert len(healed) == 4  # the pool's connections replaced on every "away", never on busy


def test_health_calls_back_once_per_return_from_away_or_busy() -> None:
    back: list[str | None] = []
    h = Health("database")
    h.back = lambda: back.append(h.state)
    h.up()  # the first verdict: not a return
    h.up()
    assert back == []
    h.down(psycopg.OperationalError("server closed the connection"))
    h.up()
    h.up()  # still up: once
    h.down(TimeoutError())  # busy
    h.up()
    assert back == ["up", "up"]  # called once the state is up


def test_health_logs_each_new_cause_of_an_outage_once(
    actions: list[tuple[str, str, str]],
) -> None:
    h = Health("database")
    h.up()
    refused = psycopg.OperationalError('connection to server at "db", port 5432 failed: refused')
    no_role = psycopg.OperationalError('FATAL:  role "worker" does not exist')
    for _ in range(3):
        h.down(refused)  # every retry of the same cause: one line
    for _ in range(3):
        h.down(no_role)  # a new cause: one more line
    h.down(refused)  # a cause already told in this outage (duties that share a
    h.down(no_role)  # Health meet both in turn): nothing more
    h.up()
    h.down(no_role)  # a new outage: its cause told again
    assert [a for a, _, _ in actions] == [
        "database_unhealthy",
        "database_still_unhealthy",
        "database_healthy",
        "database_unhealthy",
    ]
    assert "failed: refused" in actions[0][2]
    assert actions[1][2].startswith("database: still unavailable, now: ")
    assert 'role "worker" does not exist' in actions[1][2]
    assert 'role "worker" does not exist' in actions[3][2]


def test_health_stays_deaf_until_up(actions: list[tuple[str, str, str]]) -> None:
    h = Health("listener")
    h.up()
    assert h.enter("deaf", "deaf: no probe back")
    h.down(psycopg.OperationalError("gone"))  # the reconnect after deaf: still deaf
    assert h.state == "deaf"
    h.up("hears the channel again")
    assert [a for a, _, _ in actions] == ["listener_deaf", "listener_healthy"]
    assert actions[-1][2] == "listener: hears the channel again"


async def test_away_retry_retries_while_away_and_raises_errors_at_once() -> None:
    h = Health("database")
    retry = AwayRetry(h, base=0.001, cap=0.002)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise psycopg.OperationalError("connection refused")
        return "written"

    assert await retry(flaky) == "written" and calls == 3 and h.healthy

    async def broken() -> None:
        raise InvalidJob("refused by a constraint")

    with pytest.raises(InvalidJob):
        await retry(broken)


async def test_away_retry_gives_up_after_the_shutdown_deadline() -> None:
    retry = AwayRetry(Health("database"), base=0.001, cap=0.002)
    retry.give_up_at = time.monotonic() + 0.05

    async def away() -> None:
        raise psycopg.OperationalError("connection refused")

    with pytest.raises(DatabaseUnavailable, match="at shutdown"):
        async with asyncio.timeout(5):
            await retry(away)


def test_backoff_is_capped_jittered_and_resets() -> None:
    b = Backoff(base=0.1, cap=1.0)
    delays = [b.next() for _ in range(10)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(0.5 <= d <= 1.0 for d in delays[5:])
    b.reset()
    assert b.next() <= 0.1
