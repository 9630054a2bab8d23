"""The worker's side of channel ai_jobs: the defensive parsing of payloads, and the
Listener that hands them to the worker as nudges, on top of the LISTEN service
(listener/listen.py: connection, ping, probe, reconnects). Every notification is a
hint; the worker never trusts it for more than "look now"."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

from loguru import logger

from listener import db
from listener.jobs import JOB_TYPES
from listener.listen import Backoff, ListenService, Notify, probe_of, reason

__all__ = ["Backoff", "Health", "Listener", "Nudge", "parse_payload"]


@dataclass(frozen=True)
class Nudge:
    """What a payload asks for: a sweep (empty payload), or a look at one table or
    job."""

    sweep: bool = False
    table: str | None = None
    job_id: UUID | None = None
    probe: str | None = None  # a LISTEN service's probe: its sender, never a reason to look


def parse_payload(payload: str) -> Nudge:
    """Raise ValueError with a reason for anything that is not one of the shapes
    of INTERFACE.md (empty, a job uuid, or {"table": ..., "id"?: ...}), or a
    probe ({"probe": "<sender>", "n": k}, see listener/listen.py)."""
    text = payload.strip()
    if not text:
        return Nudge(sweep=True)
    if (probe := probe_of(text)) is not None:
        return Nudge(probe=probe[0])
    if not text.startswith("{"):
        return Nudge(job_id=UUID(text))  # ValueError if not a uuid
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("JSON payload is not an object")
    table = data.get("table")
    if table not in JOB_TYPES:
        raise ValueError(f"unknown table {table!r}")
    raw_id = data.get("id")
    if raw_id is not None and not isinstance(raw_id, str):
        raise ValueError("id is not a string")
    return Nudge(table=table, job_id=UUID(raw_id) if raw_id else None)


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
                f"{self.what}: connection lost ({reason(exc)}); reconnecting"
            )
            self.healthy = False


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
        self.service = ListenService(
            dsn,
            name="listener",
            channel=db.CHANNEL,
            listen_query="listen",
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
        try:
            nudge = parse_payload(payload)
        except ValueError as exc:
            logger.bind(action="bad_payload").warning(
                f"ignored a notification on ai_jobs with a malformed payload "
                f"({exc}): {payload[:200]!r}"
            )
            return
        if nudge.probe is not None:
            return  # another process proving its own LISTEN connection
        self.on_nudge(nudge)
