"""A job table's door to the batches: a claimed job that asks for the batch
price (`batch = true`) joins this worker's collecting batch of its table instead
of calling a provider (ai_job_batch_take), and its task ends without writing
anything (HandedOff); a job whose batch answered comes back through the same
door, and runs its table's handler with that answer in place of the provider's
call: the course handler (the repair round, if any, goes the direct way), or
the media handler (an image: stored as the direct path stores it). A job the
batches cannot take (an audio job: no provider has a Batch API for speech) runs
direct, said once in the log."""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from loguru import logger
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from listener import dal
from listener.errors import HandedOff
from listener.jobs import Job, Outcome
from listener.providers.base import (
    Answer,
    CoursePrompt,
    CourseProvider,
    Media,
    MediaProvider,
    TextSink,
    Usage,
)
from listener.providers.batchapi import MAX_REQUESTS

MAX_JOBS = MAX_REQUESTS  # requests per batch (the providers take far more); a new one past it
TAKE_TRIES = 20  # waits of about a second each for a pool connection (each try 5 s at most)
Handler = Callable[[Job], Awaitable[Outcome]]
Charge = Callable[[Job, str, str, Usage], Awaitable[None]]
# Why a job that asked for a batch cannot have one (None: it can).
Unbatchable = Callable[[Job], str | None]
_ANSWER: contextvars.ContextVar[Answer | Media | None] = contextvars.ContextVar(
    "ai_jobs_batch_answer", default=None
)


class Answered:
    """A course provider whose first answer is the batch's (paid for there: the
    chain neither reserves a quota nor asks the breaker for it); the repair
    round's call goes to the provider itself."""

    def __init__(self, real: CourseProvider) -> None:
        self.real = real
        self.name = real.name
        self.model = real.model

    @property
    def answered(self) -> bool:
        """True while the batch's answer is still to be read (chain.py's plan)."""
        return _ANSWER.get() is not None

    async def course(self, prompt: CoursePrompt, sink: TextSink | None = None) -> Answer:
        answer = _ANSWER.get()
        if isinstance(answer, Answer) and prompt.repair is None:
            _ANSWER.set(None)
            if sink is not None:
                sink(answer.text)  # the whole answer at once: the progress reader's one piece
            return answer
        return await self.real.course(prompt, sink)

    async def ready(self) -> Any:
        """The real provider's client made, where it is made at its first use."""
        ready = getattr(self.real, "ready", None)
        return None if ready is None else await ready()

    async def check(self) -> str:
        return await self.real.check()

    async def aclose(self) -> None:
        pass  # the real provider's client is closed with the runtime


class AnsweredMedia:
    """A media provider whose image is the batch's (paid for there: the chain
    neither reserves a quota nor asks the breaker for it)."""

    def __init__(self, real: MediaProvider) -> None:
        self.real = real
        self.name = real.name

    @property
    def answered(self) -> bool:
        """True while the batch's answer is still to be read (chain.py's plan)."""
        return _ANSWER.get() is not None

    def media_model(self, media_type: str) -> str:
        return self.real.media_model(media_type)

    async def image(self, prompt: str, size: str) -> Media:
        media = _ANSWER.get()
        if not isinstance(media, Media):  # unreachable: the handler asks once
            raise RuntimeError("no batch answer to read")
        _ANSWER.set(None)
        return media

    async def speech(self, text: str, voice: str, fmt: str) -> Media:
        raise RuntimeError("speech is never batched")  # unreachable: audio runs direct

    async def aclose(self) -> None:
        pass  # the real provider's client is closed with the runtime


class AnsweredProviders:
    """`Providers` as a table's handler reads them, for a batch's answer."""

    def __init__(
        self, course: CourseProvider | None = None, media: MediaProvider | None = None
    ) -> None:
        self.course: list[Answered] = [Answered(course)] if course is not None else []
        self.media: list[AnsweredMedia] = [AnsweredMedia(media)] if media is not None else []

    def course_chain(self) -> list[CourseProvider]:
        return list(self.course)

    def media_chain(self) -> list[MediaProvider]:
        return list(self.media)


class BatchRouter:
    """A job table's handler in a worker that runs batches (one per table)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        direct: Handler,
        answered: Callable[[str], Handler | None],
        lease_seconds: float,
        max_jobs: int = MAX_JOBS,
        unbatchable: Unbatchable | None = None,
    ) -> None:
        self.pool = pool
        self.direct = direct  # the table's handler
        self.answered = answered  # provider name -> the handler that reads a batch's answer
        self.lease_seconds = lease_seconds
        self.max_jobs = max_jobs  # jobs per batch of this table
        self.unbatchable = unbatchable
        self.worker_id: str | None = None  # set once the worker exists; None: all direct
        self.enabled = False  # a provider of the chain has a Batch API for this table
        # job id -> (provider name, its answer or the error that ends its attempt)
        self.results: dict[UUID, tuple[str, Answer | Media | BaseException]] = {}
        self.handed = 0
        self.charge: Charge | None = None  # the meter's: a call made for a job
        self._told: set[str] = set()  # reasons to run a batch job direct, logged once

    async def __call__(self, job: Job) -> Outcome:
        result = self.results.pop(job.id, None)
        if result is not None:
            return await self._from_batch(job, *result)
        # The claim says whether the job asked for a batch (sql/031, sql/034); a row
        # without the key (a claim of another path, an older schema) asks the database.
        if (
            self.enabled
            and self.worker_id is not None
            and job.row.get("batch", True)
            and self._batchable(job)
        ):
            row = await self._take(job)
            if row is not None and row["batch_id"] is not None:
                self.handed += 1
                raise HandedOff(f"in batch {row['batch_id']}")
        return await self.direct(job)

    def _batchable(self, job: Job) -> bool:
        why = self.unbatchable(job) if self.unbatchable is not None else None
        if why is None:
            return True
        if job.row.get("batch") is True and why not in self._told:
            self._told.add(why)
            logger.bind(action="batch_direct", table=job.table).info(
                f"{why}: batch jobs of this kind run direct"
            )
        return False

    async def _take(self, job: Job) -> Any:
        """ai_job_batch_take for a job starting. A pool that has no connection free
        in time (hundreds of jobs starting at once) is waited out, never the job's
        failed attempt: PoolTimeout comes before any statement, so trying again
        cannot take the job twice."""
        params = {
            "table": job.table,
            "id": job.id,
            "token": job.claim_token,
            "worker": self.worker_id,
            "lease": self.lease_seconds,
            "max_jobs": self.max_jobs,
        }
        for n in range(TAKE_TRIES):
            try:
                return await dal.BATCH_TAKE.first(self.pool, params)
            except PoolTimeout:
                if n == TAKE_TRIES - 1:
                    raise
                await asyncio.sleep(random.uniform(0.5, 1.5))
        return None

    async def _from_batch(
        self, job: Job, provider: str, result: Answer | Media | BaseException
    ) -> Outcome:
        if isinstance(result, BaseException):
            raise result  # this request's error: this job's failed attempt, as a direct one's
        handler = self.answered(provider)
        if handler is None:
            raise HandedOff("no provider to read the batch's answer")  # left to the batch's end
        token = _ANSWER.set(result)
        try:
            outcome = await handler(job)
            if _ANSWER.get() is not None and self.charge is not None:
                # Served without it (the course cache): the batch's request was paid.
                await self.charge(job, provider, result.model, result.usage)
        finally:
            _ANSWER.reset(token)
        outcome.metrics["batch"] = True
        return outcome
