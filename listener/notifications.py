"""The LISTEN side: one dedicated autocommit connection on channel ai_jobs, kept
alive with a ping, reconnected with capped jittered backoff, and the defensive
parsing of payloads. Every notification is a hint; the worker never trusts it
for more than "look now"."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

import psycopg
from loguru import logger

from listener import db
from listener.errors import AiJobsError
from listener.jobs import JOB_TYPES

PING_INTERVAL = 5.0  # seconds of silence before a keepalive query (River pings every 5 s)
PING_TIMEOUT = 10.0  # a ping that does not answer in this time means a dead connection


@dataclass(frozen=True)
class Nudge:
    """What a payload asks for: a sweep (empty payload), a look at one table or
    job, a running job to stop (cancel_job), or a table paused or resumed."""

    sweep: bool = False
    table: str | None = None
    job_id: UUID | None = None
    cancel: UUID | None = None
    paused: bool | None = None


# The largest payload of INTERFACE.md's shapes is about 80 characters; anything
# much longer is not ours, and is refused before json.loads sees it (any role can
# NOTIFY the channel, and a few thousand nested brackets exhaust the parser).
MAX_PAYLOAD = 512
# An empty NOTIFY asks for a sweep, and any role may send one: a flood of them
# costs at most one sweep per SWEEP_NUDGE_SPACING; the others are plain looks.
SWEEP_NUDGE_SPACING = 1.0


def parse_payload(payload: str) -> Nudge:
    """Raise ValueError with a reason for anything that is not one of the shapes
    of INTERFACE.md (empty, a job uuid, or {"table": ..., "id"?: ...}) or of the
    database's own cancel_job ({"cancel": ..., "table": ...}) and pause_jobs /
    resume_jobs ({"table": ..., "paused": ...})."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} characters (at most {MAX_PAYLOAD})")
    text = payload.strip()
    if not text:
        return Nudge(sweep=True)
    if not text.startswith("{"):
        return Nudge(job_id=UUID(text))  # ValueError if not a uuid
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError("JSON payload nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("JSON payload is not an object")
    table = data.get("table")
    if not isinstance(table, str) or table not in JOB_TYPES:
        raise ValueError(f"unknown table {str(table)[:60]!r}")
    raw_cancel = data.get("cancel")
    if raw_cancel is not None:
        if not isinstance(raw_cancel, str):
            raise ValueError("cancel is not a string")
        return Nudge(table=table, cancel=UUID(raw_cancel))
    paused = data.get("paused")
    if paused is not None and not isinstance(paused, bool):
        raise ValueError("paused is not true or false")
    raw_id = data.get("id")
    if raw_id is not None and not isinstance(raw_id, str):
        raise ValueError("id is not a string")
    return Nudge(table=table, job_id=UUID(raw_id) if raw_id else None, paused=paused)


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


class Health:
    """Logs the transitions between healthy and unhealthy, not every retry."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.healthy: bool | None = None

    def up(self) -> None:
        if self.healthy is not True:
            if self.healthy is False:
                logger.bind(action=f"{self.what}_healthy").info(f"{self.what}: connection back")
            self.healthy = True

    def down(self, exc: BaseException) -> None:
        if self.healthy is not False:
            logger.bind(action=f"{self.what}_unhealthy").warning(
                f"{self.what}: connection lost ({_reason(exc)}); reconnecting"
            )
            self.healthy = False


def _reason(exc: BaseException) -> str:
    from listener.errors import translate

    return translate(exc).message if not isinstance(exc, AiJobsError) else exc.message


class Listener:
    def __init__(
        self,
        dsn: str,
        on_nudge: Callable[[Nudge], None],
        on_connect: Callable[[], None],
    ) -> None:
        self.dsn = dsn
        self.on_nudge = on_nudge
        self.on_connect = on_connect
        self.health = Health("listener")
        self.connected = asyncio.Event()
        self.backend_pid: int | None = None
        self._last_sweep_nudge = -SWEEP_NUDGE_SPACING

    async def run(self) -> None:
        """Listen until cancelled; never returns on a database error."""
        backoff = Backoff()
        while True:
            conn = None
            try:
                conn = await db.connect(self.dsn, app="ai-jobs listener")
                await conn.execute(db.sql("listen"))
                self.backend_pid = conn.info.backend_pid
                self.health.up()
                backoff.reset()
                self.connected.set()
                self.on_connect()  # notifications sent while we were away are lost: sweep
                await self._listen(conn)
            except (psycopg.Error, AiJobsError, TimeoutError, OSError) as exc:
                self.connected.clear()
                self.health.down(exc)
                await asyncio.sleep(backoff.next())
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()

    async def _listen(self, conn: psycopg.AsyncConnection[dict[str, object]]) -> None:
        while True:
            async for n in conn.notifies(timeout=PING_INTERVAL):
                self._dispatch(n.payload)
            # Quiet for PING_INTERVAL: prove the connection is still there. A
            # half-open TCP connection does not answer; the timeout turns that
            # into an error and a reconnect. (asyncio.timeout, not wait_for: on
            # Python 3.11 wait_for can swallow a cancellation that arrives as the
            # ping completes, and the listener would then never stop.)
            async with asyncio.timeout(PING_TIMEOUT):
                await conn.execute(db.sql("keepalive"))

    def _dispatch(self, payload: str) -> None:
        # Whatever arrives, the LISTEN task goes on: a payload is a hint from a
        # channel every role may write to.
        try:
            nudge = parse_payload(payload)
        except Exception as exc:
            logger.bind(action="bad_payload").warning(
                f"ignored a notification on ai_jobs with a malformed payload "
                f"({type(exc).__name__}: {str(exc)[:200]}): {payload[:200]!r}"
            )
            return
        if nudge.sweep:
            now = time.monotonic()
            if now - self._last_sweep_nudge < SWEEP_NUDGE_SPACING:
                nudge = Nudge()  # a look at both tables, not another sweep
            else:
                self._last_sweep_nudge = now
        try:
            self.on_nudge(nudge)
        except Exception as exc:
            logger.bind(action="nudge_failed").error(f"a notification could not be handled: {exc}")
