"""The end-user API's event streams: one hub per web process, fed by the live
feed's LISTEN connection (no polling per client).

ai_jobs_events names the jobs whose status or progress changed (sql/024). The
hub marks the open streams on those jobs dirty; a single loop reads the dirty
jobs, each as its stream's user (ai_job_read_as_users: role authenticated and
the user's claims, for up to CHUNK users in one statement), at most every
MIN_INTERVAL, and offers each stream the job's state
when it differs from the last one the stream sent. A stream holds only the
newest state (a queue of one): a slow reader skips to the latest, never
buffers. The notification carries ids only; what a stream sends is always read
with its own user's rights.

Caps: streams open per user and per process, checked before anything is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from listener.outage import diagnose
from listener.web.tokens import User

MIN_INTERVAL = 0.05  # seconds between two rounds of reads, whatever the change rate
CHUNK = 200  # users read in one statement
READERS = 2  # statements under way at once (the API's pool keeps the rest for requests)
TERMINAL = frozenset({"done", "dead_letter", "cancelled"})
MAX_PAYLOAD = 8000  # PostgreSQL's limit on a notification's payload

# [(user, job ids)] -> for each, the jobs of those ids that user may see
Read = Callable[[list[tuple[User, list[str]]]], Awaitable[list[list[dict[str, Any]]]]]


class StreamLimit(Exception):
    """Too many event streams open (per user or per process)."""


@dataclass(frozen=True)
class Event:
    """One `job` event: the job's JSON, and an id that names that state."""

    data: str
    id: str
    terminal: bool

    @classmethod
    def of(cls, job: dict[str, Any]) -> Event:
        data = json.dumps(job, separators=(",", ":"), default=str)
        digest = hashlib.sha256(data.encode()).hexdigest()[:20]
        return cls(data, digest, job.get("status") in TERMINAL)

    def text(self) -> str:
        return f"id: {self.id}\nevent: job\ndata: {self.data}\n\n"


@dataclass(eq=False)
class Stream:
    job_id: str
    user: User
    last_id: str | None  # the state the client has (Last-Event-ID, then each one sent)
    queue: asyncio.Queue[Event | None] = field(default_factory=lambda: asyncio.Queue(1))

    def offer(self, item: Event | None) -> None:
        if self.queue.full():  # a slow reader skips to the newest state
            self.queue.get_nowait()
        self.queue.put_nowait(item)


class StreamHub:
    def __init__(
        self,
        read: Read,
        per_user: int,
        per_process: int,
        min_interval: float = MIN_INTERVAL,
    ) -> None:
        self._read = read
        self.per_user = per_user
        self.per_process = per_process
        self._min_interval = min_interval
        self._by_job: dict[str, set[Stream]] = defaultdict(set)
        self._users: Counter[Any] = Counter()
        self._open = 0
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._log = logger.bind(action="api_streams")
        self.rounds = 0  # rounds of reads (tests, the bench)

    @property
    def open_streams(self) -> int:
        return self._open

    # -- streams ------------------------------------------------------------------

    def open(self, job_id: str, user: User, last_id: str | None) -> Stream:
        """A stream on a job the caller has seen; the first event comes from the
        hub's next round (so every event of a stream comes in order)."""
        if self._open >= self.per_process:
            raise StreamLimit(f"too many event streams open on this server ({self.per_process})")
        if self._users[user.id] >= self.per_user:
            raise StreamLimit(f"too many event streams open for this user ({self.per_user})")
        stream = Stream(job_id, user, last_id)
        self._by_job[job_id].add(stream)
        self._users[user.id] += 1
        self._open += 1
        self._mark([job_id])
        return stream

    def close(self, stream: Stream) -> None:
        streams = self._by_job.get(stream.job_id)
        if streams is None or stream not in streams:
            return
        streams.discard(stream)
        if not streams:
            del self._by_job[stream.job_id]
        self._users[stream.user.id] -= 1
        if self._users[stream.user.id] <= 0:
            del self._users[stream.user.id]
        self._open -= 1

    # -- what changed -----------------------------------------------------------------

    def changed(self, payload: str | None) -> None:
        """A notification on ai_jobs_events ('<table> <id> <id> ...'), or None:
        anything may have changed (a reconnect, a poll tick). Never raises: any
        role may send any payload on the channel."""
        if payload is None:
            self._mark(list(self._by_job))
            return
        if len(payload) > MAX_PAYLOAD or " " not in payload:
            return  # an insert or a delete names its table only: no stream to tell
        self._mark(p for p in payload.split(" ")[1:] if p in self._by_job)

    def _mark(self, job_ids: Iterable[str]) -> None:
        before = len(self._dirty)
        self._dirty.update(job_ids)
        if len(self._dirty) > before:
            self._wake.set()

    # -- the loop ---------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="api-streams")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for streams in list(self._by_job.values()):
            for stream in streams:
                stream.offer(None)  # ends the stream

    async def _run(self) -> None:
        readers = asyncio.Semaphore(READERS)
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            by_user: dict[Any, tuple[User, set[str]]] = {}
            for job_id in dirty:
                for stream in self._by_job.get(job_id, ()):
                    by_user.setdefault(stream.user.key, (stream.user, set()))[1].add(job_id)
            self.rounds += 1
            wanted = [(user, sorted(ids)) for user, ids in by_user.values()]
            await asyncio.gather(
                *(
                    self._refresh(wanted[i : i + CHUNK], readers)
                    for i in range(0, len(wanted), CHUNK)
                )
            )
            await asyncio.sleep(self._min_interval)

    async def _refresh(
        self, wanted: list[tuple[User, list[str]]], readers: asyncio.Semaphore
    ) -> None:
        try:
            async with readers:
                found = await self._read(wanted)
        except Exception as exc:  # the database may be away: read again shortly
            if not self._failing:
                self._log.bind(action="api_streams_failed").warning(
                    "could not read the jobs of open streams ({})", diagnose(exc)
                )
                self._failing = True
            await asyncio.sleep(1.0)
            self._mark(j for _, ids in wanted for j in ids)
            return
        self._failing = False
        for (user, job_ids), rows in zip(wanted, found, strict=True):
            self._offer(user, job_ids, {str(r["id"]): r for r in rows})

    def _offer(self, user: User, job_ids: list[str], found: dict[str, dict[str, Any]]) -> None:
        for job_id in job_ids:
            row = found.get(job_id)
            event = Event.of(row) if row is not None else None
            for stream in list(self._by_job.get(job_id, ())):
                if stream.user.key != user.key:
                    continue
                if event is None:  # gone (deleted), or no longer the user's to see
                    stream.offer(None)
                elif event.id != stream.last_id:
                    stream.last_id = event.id
                    stream.offer(event)
                elif event.terminal:  # the client had the last state already
                    stream.offer(None)
