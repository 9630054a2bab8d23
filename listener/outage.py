"""Is the database away? The one decision, and what follows from it.

Every caller that talks to PostgreSQL (the worker's claims and writes, the LISTEN
service, the dashboard's live feed, the catalog) asks `diagnose(exc)` what an
exception means:

- AWAY: the database cannot be reached (refused, reset, shut down, a dead
  connection). Retry when it is back; the pool's other connections are dead too.
- BUSY: the database is there but did not serve the request in time (a pool with
  every connection in use, a statement or lock timeout, the server's connection
  limit). Retry; nothing is broken, and nothing needs replacing.
- ERROR: anything else (a bug, a constraint, a missing function). Retrying cannot
  help; show it.

`Health` logs the transitions between those states for one resource, once each
(graphile-worker #224: transitions, not every retry), and while away, each new
cause once; `Reporter` turns a failed duty into a transition or an error;
`AwayRetry` retries a write while the database is away or busy; `Backoff`
spaces the attempts.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import psycopg
from loguru import logger
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from listener.errors import (
    AiJobsError,
    DatabaseBusy,
    DatabaseUnavailable,
    HasSecrets,
    error_text,
    scrub,
    translate,
)

T = TypeVar("T")


class Verdict(Enum):
    AWAY = "away"
    BUSY = "busy"
    ERROR = "error"


@dataclass(frozen=True)
class Diagnosis:
    verdict: Verdict
    reason: str  # what happened, for a log line (passwords redacted)

    @property
    def transient(self) -> bool:
        """Retrying later can succeed (the database is away or busy)."""
        return self.verdict is not Verdict.ERROR

    def __str__(self) -> str:
        if self.verdict is Verdict.AWAY:
            return f"database unavailable: {self.reason}"
        if self.verdict is Verdict.BUSY:
            return f"database busy: {self.reason}"
        return self.reason


# Raised by a reachable server that would not serve the request in time.
_BUSY_ERRORS = (
    DatabaseBusy,
    pg_errors.QueryCanceled,  # statement_timeout, or a cancel request
    pg_errors.LockNotAvailable,  # lock_timeout
    pg_errors.TooManyConnections,
)
_AWAY_ERRORS = (DatabaseUnavailable, psycopg.OperationalError, psycopg.InterfaceError, OSError)


def diagnose(exc: BaseException, pool: AsyncConnectionPool[Any] | None = None) -> Diagnosis:
    """Away, busy or an error. `pool`, when given, tells a pool whose every
    connection is in use (busy) from one that cannot open a connection (away)."""
    if isinstance(exc, PoolTimeout):
        return _pool_timeout(exc, pool)
    if isinstance(exc, _BUSY_ERRORS):
        return Diagnosis(Verdict.BUSY, _message(exc))
    if isinstance(exc, TimeoutError):  # before OSError, of which it is a subclass
        text = str(exc).strip()
        return Diagnosis(Verdict.BUSY, f"timed out ({text})" if text else "timed out")
    if isinstance(exc, _AWAY_ERRORS):
        return Diagnosis(Verdict.AWAY, _message(exc))
    return Diagnosis(Verdict.ERROR, _message(exc))


def is_transient(exc: BaseException) -> bool:
    return diagnose(exc).transient


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, AiJobsError) else translate(exc).message


def _pool_timeout(exc: PoolTimeout, pool: AsyncConnectionPool[Any] | None) -> Diagnosis:
    waited = str(exc).strip() or "no pool connection in time"
    if pool is None:
        return Diagnosis(Verdict.BUSY, f"{waited} (pool busy, or the database away)")
    stats = pool.get_stats()
    size, free = stats.get("pool_size", 0), stats.get("pool_available", 0)
    if size >= pool.max_size and free == 0:
        return Diagnosis(Verdict.BUSY, f"{waited}: all {size} pool connections in use")
    # The pool is below its size: it could not open the connections it needed.
    cause = getattr(pool, "last_connect_error", None)  # db.WorkPool keeps it
    if cause is not None:  # the reason itself, as a direct connection would say it
        return Diagnosis(Verdict.AWAY, _message(cause))
    return Diagnosis(Verdict.AWAY, f"{waited}: the pool could not open a connection")


class Backoff:
    """Capped exponential backoff with full jitter; reset after a success."""

    def __init__(self, base: float = 0.1, cap: float = 10.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


UP, AWAY, BUSY = "up", "away", "busy"
_ACTIONS = {AWAY: "unhealthy", BUSY: "busy"}
MAX_CAUSES = 20  # causes of one outage logged at most (each once)


class Health:
    """One resource's health (`what`: database, listener, live), whose
    transitions are logged once each: `<what>_unhealthy` (away), `<what>_busy`,
    `<what>_healthy` (back), and any other state its owner enters (the LISTEN
    service's `deaf`). Away outranks busy: a timeout while away changes nothing.
    While away, a cause not seen yet in this outage is logged once
    (`<what>_still_unhealthy`: the server went from refusing connections to
    refusing the role, say); a cause seen before is not logged again, as the
    duties that share one Health may meet two causes in turn at every retry.
    With a pool medic, the pool's other connections are replaced when the
    database is found away (they died with it); `back` is called when it
    answers again after being away or busy."""

    def __init__(
        self,
        what: str,
        *,
        pool: AsyncConnectionPool[Any] | None = None,
        heal: Callable[[], None] | None = None,
        back: Callable[[], None] | None = None,
        log: Any = None,
    ) -> None:
        self.what = what
        self.pool = pool
        self.heal = heal
        self.back = back
        self.state: str | None = None  # None until the first verdict
        self._log = log if log is not None else logger
        self._causes: set[str] = set()  # those of the current outage, logged

    @property
    def healthy(self) -> bool | None:
        return None if self.state is None else self.state == UP

    def up(self, detail: str = "connection back") -> None:
        was = self.state
        self.state = UP
        if was not in (None, UP):
            self._log.bind(action=f"{self.what}_healthy").info(f"{self.what}: {detail}")
            if self.back is not None:
                self.back()

    def down(self, exc: BaseException, then: str | None = None) -> Diagnosis:
        """Classify `exc`; if the database is away or busy, enter that state
        (`then`: what the owner does about it, for the log line)."""
        d = diagnose(exc, self.pool)
        if d.verdict is Verdict.AWAY:
            if self.heal is not None:
                self.heal()
            then = then or "reconnecting"
            if self.enter(AWAY, f"connection lost ({d.reason}); {then}"):
                self._causes = {d.reason}
            elif (
                self.state == AWAY
                and d.reason not in self._causes
                and len(self._causes) < MAX_CAUSES
            ):
                self._causes.add(d.reason)
                self._log.bind(action=f"{self.what}_still_unhealthy").warning(
                    f"{self.what}: still unavailable, now: {d.reason}; {then}"
                )
        elif d.verdict is Verdict.BUSY:
            self.enter(BUSY, f"no answer in time ({d.reason}); {then or 'retrying'}")
        return d

    def enter(self, state: str, message: str, level: str = "WARNING", **fields: Any) -> bool:
        """Log `message` if this is a change of state; True if it was. A lesser
        symptom changes nothing: busy while away, away or busy while deaf."""
        current = self.state
        if current == state or (state in (AWAY, BUSY) and current not in (None, UP, BUSY)):
            return False
        self.state = state
        action = f"{self.what}_{_ACTIONS.get(state, state)}"
        self._log.bind(action=action, **fields).log(level, f"{self.what}: {message}")
        return True


class Reporter:
    """What a failed duty (a claim, a heartbeat, a sweep, a release) means: the
    database away or busy is a health transition (logged once, and, away, the
    pool's other connections replaced); anything else is an error to show
    (unless `quiet`: the same duty failing again)."""

    def __init__(self, health: Health, secrets: HasSecrets) -> None:
        self.health = health
        self.secrets = secrets  # hidden in the error's text

    def __call__(self, exc: BaseException, what: str, quiet: bool = False) -> None:
        if not self.health.down(exc).transient and not quiet:
            logger.bind(action="duty_failed", duty=what).error(
                f"{what} failed: {scrub(error_text(exc), self.secrets)}"
            )


async def every(
    interval: float, fn: Callable[[], Awaitable[Any]], name: str, report: Reporter
) -> None:
    """Run a periodic duty for ever, each failure reported."""
    while True:
        await asyncio.sleep(interval)
        try:
            await fn()
        except Exception as exc:
            report(exc, name)


class AwayRetry:
    """Retry a database call while the database is away or busy, with backoff,
    until `give_up_at` (monotonic; set by the shutdown) has passed. Failures
    are reported to `health` (one log line per transition, not per try);
    anything else is raised at once."""

    def __init__(self, health: Health, base: float = 0.2, cap: float = 5.0) -> None:
        self.health = health
        self.base, self.cap = base, cap
        self.give_up_at: float | None = None

    async def __call__(self, fn: Callable[[], Awaitable[T]]) -> T:
        backoff = Backoff(self.base, self.cap)
        while True:
            try:
                result = await fn()
            except Exception as exc:
                if not self.health.down(exc).transient:
                    raise
                if self.give_up_at is not None and time.monotonic() > self.give_up_at:
                    raise DatabaseUnavailable("database unreachable at shutdown") from exc
                await asyncio.sleep(backoff.next())
                continue
            self.health.up()
            return result
