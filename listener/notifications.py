"""The worker's side of channel ai_jobs: the defensive parsing of payloads, and the
Listener that hands them to the worker as nudges, on top of the LISTEN service
(listener/listen.py: connection, ping, probe, reconnects). Every notification is a
hint; the worker never trusts it for more than "look now"."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal, db
from listener.jobs import JOB_TYPES
from listener.listen import ListenService, Notify, probe_of

Report = Callable[[BaseException, str], None]

__all__ = [
    "MAX_PAYLOAD",
    "SWEEP_NUDGE_SPACING",
    "Listener",
    "Nudge",
    "parse_payload",
    "probe_through",
]


@dataclass(frozen=True)
class Nudge:
    """What a payload asks for: a sweep (empty payload), a look at one table or
    job, a running job to stop (cancel_job), or a table paused or resumed."""

    sweep: bool = False
    table: str | None = None
    job_id: UUID | None = None
    cancel: UUID | None = None
    paused: bool | None = None
    probe: str | None = None  # a LISTEN service's probe: its sender, never a reason to look


# The largest payload of the documented shapes is about 80 characters; anything
# much longer is not ours, and is refused before json.loads sees it (any role can
# NOTIFY the channel, and a few thousand nested brackets exhaust the parser).
MAX_PAYLOAD = 512
# An empty NOTIFY asks for a sweep, and any role may send one: a flood of them
# costs at most one sweep per SWEEP_NUDGE_SPACING; the others are plain looks.
SWEEP_NUDGE_SPACING = 1.0


def parse_payload(payload: str) -> Nudge:
    """Raise ValueError with a reason for anything that is not one of the shapes
    of docs/reference.md (empty, a job uuid, or {"table": ..., "id"?: ...}) or of the
    database's own cancel_job ({"cancel": ..., "table": ...}) and pause_jobs /
    resume_jobs ({"table": ..., "paused": ...}), or a probe ({"probe": "<sender>",
    "n": k}, see listener/listen.py)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} characters (at most {MAX_PAYLOAD})")
    text = payload.strip()
    if not text:
        return Nudge(sweep=True)
    if (probe := probe_of(text)) is not None:
        return Nudge(probe=probe[0])
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


def probe_through(pool: AsyncConnectionPool[Any], report: Report) -> Notify:
    """The LISTEN service's probe, sent through the pool like any job's
    notification (a failure reported as the `probe` duty's)."""

    async def notify(channel: str, payload: str) -> None:
        try:
            await dal.NOTIFY.run(pool, {"channel": channel, "payload": payload})
        except Exception as exc:
            report(exc, "probe")
            raise

    return notify


class Listener:
    """The worker's LISTEN on ai_jobs: payloads become nudges; probes of this
    process are answered by the service, those of other processes ignored."""

    def __init__(
        self,
        dsn: str,
        on_nudge: Callable[[Nudge], None],
        on_connect: Callable[[bool], None],
        *,
        notify: Notify | None = None,
        probe_every: float = 30.0,
        sender: str = "",
        on_state: Callable[[str], None] | None = None,
    ) -> None:
        self.on_nudge = on_nudge
        self._last_sweep_nudge = -SWEEP_NUDGE_SPACING
        self.service = ListenService(
            dsn,
            name="listener",
            channel=db.CHANNEL,
            listen_query=dal.LISTEN,
            on_payload=self._dispatch,
            on_connect=on_connect,
            notify=notify,
            probe_every=probe_every,
            sender=sender,
            on_state=on_state,
            app="ai-jobs listener",
        )
        self.connected = self.service.connected

    @property
    def backend_pid(self) -> int | None:
        return self.service.backend_pid

    async def run(self) -> None:
        await self.service.run()

    def _dispatch(self, payload: str) -> None:
        """The nudge to the worker."""
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
        if nudge.probe is not None:
            return  # another process proving its own LISTEN connection
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
