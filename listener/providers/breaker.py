"""The providers' breakers, shared by every worker through ai_job_provider_state.

The state and its changes live in the database (sql/014_provider_breakers.sql):
one worker's discovery (a hanging provider, a 429 with retry-after, a bad key)
spares every other worker within STATE_CACHE_SECONDS. Each process keeps a copy,
read at most once per STATE_CACHE_SECONDS and updated by its own writes, so a
healthy provider costs no query per call: a success writes only when the copy
shows something to reset.

Without the database (none configured, or unreachable) each process keeps its
breakers alone, by the same rules; the jobs go on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.outage import diagnose
from listener.providers.base import Classified, Failure
from listener.rows import BreakerChangeRow, BreakerRow
from listener.settings import Settings

R = TypeVar("R")
B = TypeVar("B", bound=BreakerRow)

STATE_CACHE_SECONDS = 1.0  # how stale a process's copy of the shared state may be
PROBE_RECHECK_SECONDS = 1.0  # while another caller's probe is in flight, look again after
DB_WAIT_SECONDS = 2.0  # a breaker write never holds a job longer than this


@dataclass
class State:
    failures: int = 0
    open_until: float | None = None  # monotonic; None: closed; past: half-open
    kind: str | None = None  # unwell | rate_limited | auth
    reason: str | None = None
    probe_until: float | None = None  # monotonic: a probe is in flight until then

    @property
    def clean(self) -> bool:
        return self.failures == 0 and self.open_until is None and self.probe_until is None


@dataclass(frozen=True)
class Admission:
    call: bool
    probe: bool = False  # this call decides a half-open breaker
    wait: float = 0.0  # not called: seconds until the provider may be asked again
    reason: str = ""


CALL = Admission(True)


def _mono(at: datetime | None, db_now: datetime, mono_now: float) -> float | None:
    return None if at is None else mono_now + (at - db_now).total_seconds()


class Breakers:
    def __init__(self, pool: AsyncConnectionPool[Any] | None, settings: Settings) -> None:
        self.pool = pool
        self.threshold = settings.provider_breaker_threshold
        self.cooldown = settings.provider_breaker_cooldown_seconds
        self.auth_cooldown = settings.provider_auth_cooldown_seconds
        self.states: dict[str, State] = {}
        self._fetched: float | None = None
        self._lock = asyncio.Lock()
        self._db_ok = True
        self.on_change: Callable[[], None] | None = None  # a breaker closed here

    # -- reading ------------------------------------------------------------

    async def admit(self, name: str, lease: float) -> Admission:
        """May this call go to `name`? Skipped while open; once the cooldown is over,
        one caller (of all workers) takes the probe and the others wait for it."""
        seen = await self.peek(name)
        if not seen.probe:
            return seen
        st = self.states.get(name)
        reason = (st.reason if st else None) or "unavailable"
        got = await self._probe(name, lease)
        st = self.states.get(name)
        now = time.monotonic()
        if st is None or st.open_until is None:
            return CALL  # closed meanwhile by another worker
        if got:
            logger.bind(action="provider_probe", provider=name).info(
                "probing {} after its cooldown ({})", name, reason
            )
            return Admission(True, probe=True)
        if st.open_until > now:  # another worker's probe failed: open again
            return Admission(False, wait=st.open_until - now, reason=_open_text(st, now))
        return Admission(False, wait=PROBE_RECHECK_SECONDS, reason=f"breaker half-open ({reason})")

    async def peek(self, name: str) -> Admission:
        """What admit() would say, without taking the probe: CALL (closed),
        Admission(True, probe=True) (half-open, the probe is free), or not now and
        for how long. While another caller's probe is in flight the answer is "not
        now, look again in a second": whoever holds claims for it asks again
        then, without claiming a job to find out."""
        await self._refresh()
        st = self.states.get(name)
        now = time.monotonic()
        if st is None or st.open_until is None:
            return CALL
        reason = st.reason or "unavailable"
        if st.open_until > now:
            return Admission(False, wait=st.open_until - now, reason=_open_text(st, now))
        if st.probe_until is not None and st.probe_until > now:
            wait = min(PROBE_RECHECK_SECONDS, st.probe_until - now)
            why = f"breaker half-open, probe in flight ({reason})"
            return Admission(False, wait=wait, reason=why)
        return Admission(True, probe=True)

    async def forget_auth(self, names: list[str]) -> None:
        """At start-up: close the breakers a credentials error opened for the
        providers this process has keys for. A new process may hold a fixed key;
        if not, its first call opens the breaker again (and the alert stays)."""
        if self.pool is None or not names:
            return
        try:
            rows = await self._fetch(dal.PROVIDER_FORGET_AUTH, {"providers": names})
        except Exception as exc:
            self._down(exc)
            return
        for row in rows:
            logger.bind(action="provider_breaker_closed", provider=row["provider"]).info(
                "{} breaker closed at start-up (opened by a credentials error; the key may "
                "be fixed now)",
                row["provider"],
            )

    def is_open(self, name: str) -> bool:
        st = self.states.get(name)
        return st is not None and st.open_until is not None

    def _fresh(self) -> bool:
        return self._fetched is not None and time.monotonic() - self._fetched < STATE_CACHE_SECONDS

    async def _refresh(self) -> None:
        if self.pool is None or self._fresh():
            return
        async with self._lock:
            if self._fresh():
                return  # another job refreshed while this one waited
            try:
                rows = await self._fetch(dal.PROVIDER_STATES, None)
            except Exception as exc:
                self._down(exc)
            else:
                self.states = {}
                for row in rows:
                    self._store(row)
            self._fetched = time.monotonic()

    # -- writing ------------------------------------------------------------

    async def record(self, name: str, c: Classified, reason: str) -> float | None:
        """Record a failed call; returns how long the provider is now unavailable
        (None: it may be asked again at once)."""
        if c.failure in (Failure.REFUSED, Failure.INVALID):
            await self.succeeded(name)  # it answered: it is up
            return None
        if c.failure not in (Failure.UNWELL, Failure.AUTH):
            return None
        kind = "auth" if c.failure is Failure.AUTH else "unwell"
        if kind == "unwell" and c.retry_after:
            kind = "rate_limited"
        cooldown = self.auth_cooldown if kind == "auth" else self.cooldown
        params = {
            "provider": name,
            "kind": kind,
            "reason": reason,
            "threshold": self.threshold,
            "cooldown": cooldown,
            "retry_after": c.retry_after,
        }
        row = await self._write(dal.PROVIDER_FAILED, params)
        if row is None:
            self._fail_locally(name, kind, reason, cooldown, c.retry_after)
        else:
            self._transition(name, row)
        st = self.states.get(name)
        now = time.monotonic()
        if st is not None and st.open_until is not None and st.open_until > now:
            return st.open_until - now
        return None

    async def succeeded(self, name: str) -> None:
        st = self.states.get(name)
        if st is None or st.clean:
            return  # the hot path: nothing to reset, nothing written
        row = await self._write(dal.PROVIDER_SUCCEEDED, {"provider": name})
        if row is None:
            self.states[name] = State()
        else:
            self._transition(name, row)

    async def _probe(self, name: str, lease: float) -> bool:
        row = await self._write(dal.PROVIDER_PROBE, {"provider": name, "lease": lease})
        if row is None:  # alone: the same rule, in this process
            st = self.states.setdefault(name, State())
            now = time.monotonic()
            if st.probe_until is None or st.probe_until <= now:
                st.probe_until = now + lease
                return True
            return False
        return bool(row["probe"])

    def _fail_locally(
        self, name: str, kind: str, reason: str, cooldown: float, retry_after: float | None
    ) -> None:
        # The rules of ai_job_provider_failed, for a process without its database.
        st = self.states.setdefault(name, State())
        now = time.monotonic()
        st.failures += 1
        until = st.open_until
        if kind == "auth":
            until = now + cooldown
        elif retry_after:
            until = max(st.open_until or now, now + retry_after)
        elif st.probe_until is not None or st.failures >= self.threshold:
            until = max(st.open_until or now, now + cooldown)
        if until != st.open_until:
            was_open = st.open_until is not None
            st.open_until, st.kind, st.reason = until, kind, reason
            if until is not None and until > now:
                self._log_open(name, st, "reopened" if was_open else "opened", now)
        st.probe_until = None

    # -- plumbing -----------------------------------------------------------

    async def _fetch(self, query: dal.Query[R], params: Any) -> list[R]:
        assert self.pool is not None
        async with asyncio.timeout(DB_WAIT_SECONDS * 2):
            async with self.pool.connection(timeout=DB_WAIT_SECONDS) as conn:
                rows = await query.all(conn, params)
        if not self._db_ok:
            self._db_ok = True
            logger.bind(action="breakers_shared").info("provider breakers shared again")
        return rows

    async def _write(self, query: dal.Query[B], params: dict[str, Any]) -> B | None:
        if self.pool is None:
            return None
        try:
            rows = await self._fetch(query, params)
        except Exception as exc:
            self._down(exc)
            return None
        if not rows:
            return None
        self._store(rows[0])
        return rows[0]

    def _down(self, exc: BaseException) -> None:
        if self._db_ok:
            self._db_ok = False
            logger.bind(action="breakers_local").warning(
                "provider breakers kept in this process ({})", diagnose(exc, self.pool)
            )

    def _store(self, row: BreakerRow) -> None:
        now, db_now = time.monotonic(), row["db_now"]
        self.states[row["provider"]] = State(
            failures=row["consecutive_failures"],
            open_until=_mono(row["open_until"], db_now, now),
            kind=row["cooldown_kind"],
            reason=row["cooldown_reason"],
            probe_until=_mono(row["probe_until"], db_now, now),
        )

    def _transition(self, name: str, row: BreakerChangeRow) -> None:
        """Log what this write changed: once, by the worker that changed it."""
        moved = row.get("transition")
        st = self.states[name]
        if moved in ("opened", "reopened"):
            self._log_open(name, st, moved, time.monotonic())
        elif moved == "closed":
            logger.bind(action="provider_breaker_closed", provider=name).info(
                "{} answers again: breaker closed", name
            )
            if self.on_change:
                self.on_change()

    def _log_open(self, name: str, st: State, moved: str, now: float) -> None:
        seconds = round((st.open_until or now) - now, 1)
        if st.kind == "auth":
            logger.bind(action="provider_auth", provider=name, seconds=seconds).error(
                "{} refuses our credentials or model ({}): skipped for {:g}s; "
                "fix the key or model, then `select ai_job_provider_reset('{}')`",
                name,
                st.reason,
                seconds,
                name,
            )
            return
        logger.bind(
            action="provider_breaker_open", provider=name, seconds=seconds, kind=st.kind
        ).warning("{} breaker {} for {:g}s: {}", name, moved, seconds, st.reason)


def _open_text(st: State, now: float) -> str:
    what = {"rate_limited": "rate limited", "auth": "credentials refused"}.get(
        st.kind or "", "breaker open"
    )
    return f"{what}, retry in {max(0.0, (st.open_until or now) - now):.1f}s ({st.reason})"
