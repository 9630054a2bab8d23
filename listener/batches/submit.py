"""Sending a batch: the intent recorded first (ai_job_batch_submitting: the
batch's id, its provider and model, before any byte goes out), then the upload
and the creation, then the provider's batch id recorded. A batch found in the
middle of that (its worker died: state `submitting`) is first looked for at the
provider, by the intent's id, and sent only if the provider never created it.

Before that, the provider's batch queue (sql/030): a collecting batch sends only
the jobs that fit the room its queue has (ai_job_batch_fit: the limit learned
from the provider's last refusal, less what every worker's open batches hold
there); the others wait in a new collecting batch, no attempt counted. A batch
the provider refuses for its queue (here: Anthropic's 429 at the creation that
names the queue; in watch.py: OpenAI's batch failed with token_limit_exceeded)
teaches the limit (ai_job_batch_refused, sql/032) and its jobs wait likewise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.batches.crash import crash_point
from listener.errors import InvalidJob, scrub
from listener.handlers.course import course_input
from listener.handlers.media import media_input
from listener.jobs import Job
from listener.prompts import course_prompt
from listener.providers.base import CoursePrompt
from listener.providers.batchapi import BatchAPI, ImageRequest, QueueFull, Unsure
from listener.rows import BatchWatchRow, ClaimedRow

FailJob = Any  # Executor.fail(job, exc)
# A job waits for room in its provider's batch queue at most this long after it
# was inserted (the provider's own completion window): then it goes the direct
# way, no attempt counted, as the jobs of an expired batch do.
QUEUE_WAIT_SECONDS = 24 * 3600.0
QUEUE_LIMIT_SECONDS = 3600.0  # a learned queue limit is forgotten after an hour
SENT, WAITING, NOTHING = "sent", "waiting", "nothing"
RECORD_CHECK_SECONDS = 1.0  # a lost lease's second batch: how often its intent is read
Request = CoursePrompt | ImageRequest


class Submitter:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        worker_id: str,
        fail: FailJob,
        lease_seconds: float = 60.0,
        retry_seconds: float = 600.0,
    ) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.fail = fail  # a job whose request cannot be made (bad params): its attempt fails
        self.lease_seconds = lease_seconds  # a new collecting batch's, for the jobs left
        self.retry_seconds = retry_seconds  # a refusal the limit does not explain: the pace
        self.created = 0  # batches this process created at a provider
        self.recovered = 0  # intents found at the provider instead of sent again
        self.refused = 0  # batches the providers refused for their queue
        self.cancelled = 0  # second batches of an intent, made after its lease was lost
        self._first_look: dict[UUID, float] = {}  # an intent taken over: when (epoch)

    async def submit(self, row: BatchWatchRow, api: BatchAPI[Any]) -> str:
        """Send (or find) the batch: SENT once its provider batch id is recorded,
        WAITING when none of its jobs fits its provider's queue now (or the queue
        refused it), NOTHING when it is not ours or holds no job any more."""
        intent: UUID = row["id"]
        recover = row["state"] == "submitting"
        made: dict[UUID, Request] = {}  # the requests _fit made already
        if not recover:
            kept = await self._fit(row, api, made)
            if kept is not None:
                return kept
        jobs = await dal.BATCH_SUBMITTING.all(
            self.pool,
            {"batch": intent, "worker": self.worker_id, "provider": api.name, "model": api.model},
        )
        if not jobs:
            return NOTHING  # not ours any more, or nothing left in it (ended: empty)
        log = logger.bind(action="batch_submit", batch=str(intent), provider=api.name)
        if recover:
            since = time.time() - row["age_seconds"] - 60
            # Taken over now (the first look of this worker): its holder made no
            # batch after that; one made later is not the intent's.
            until = self._first_look.setdefault(intent, time.time())
            rows = await dal.BATCH_KNOWN.all(
                self.pool, {"provider": api.name, "since": since - 3600}
            )
            known = {r["provider_batch_id"] for r in rows if r["provider_batch_id"]}
            found = await api.find(intent, since, until, {r["id"] for r in jobs}, known)
            if isinstance(found, Unsure):
                log.info("a batch that may be this one still runs at the provider: not sent")
                return WAITING
            self._first_look.pop(intent, None)
            if found is not None:
                await self._record(intent, found.batch_id, found.file_id)
                self.recovered += 1
                log.bind(provider_batch=found.batch_id).info(
                    "batch found at the provider: not sent again"
                )
                return SENT
        requests = await self._requests(
            [
                Job(row["job_table"], r["id"], r["claim_token"], r["retry_count"],
                    r["max_retries"], r["job"])
                for r in jobs
            ],
            made,
        )  # fmt: skip
        if not requests:
            return NOTHING
        crash_point("before_upload")
        try:
            sent = await api.submit(intent, requests, crash_point)
        except QueueFull as exc:
            await self.refuse(intent, api, exc.limit, str(exc))
            return WAITING
        self.created += 1
        crash_point("after_create")
        await self._record(intent, sent.batch_id, sent.file_id, made_by=api)
        log.bind(provider_batch=sent.batch_id, jobs=len(requests)).info(
            f"batch of {len(requests)} job(s) sent"
        )
        return SENT

    async def _requests(
        self, jobs: list[Job], made: dict[UUID, Request]
    ) -> list[tuple[UUID, Request]]:
        """The jobs' requests (those in `made` as they are, the others made and
        added); a job whose request cannot be made fails its attempt."""
        out: list[tuple[UUID, Request]] = []
        for job in jobs:
            request = made.get(job.id)
            if request is None:
                try:
                    request = made[job.id] = REQUESTS[job.table](job)
                except InvalidJob as exc:
                    await self.fail(job, exc)
                    continue
            out.append((job.id, request))
        return out

    async def _fit(
        self, row: BatchWatchRow, api: BatchAPI[Any], made: dict[UUID, Request]
    ) -> str | None:
        """A collecting batch: keep the jobs that fit its provider's queue (the batch
        becomes the intent), leave the others for the next batch. None: go on and
        send it; else what submit() answers."""
        held: list[ClaimedRow] = await dal.BATCH_JOBS.all(
            self.pool, {"batch": row["id"], "worker": self.worker_id}
        )
        requests = await self._requests([Job.from_claim(r) for r in held], made)
        if not requests:
            return None  # no job left: ai_job_batch_submitting ends it (empty)
        fit = await dal.BATCH_FIT.first(
            self.pool,
            {
                "batch": row["id"],
                "worker": self.worker_id,
                "provider": api.name,
                "model": api.model,
                "scope": api.scope,
                "jobs": [job for job, _ in requests],
                "units": [api.units(request) for _, request in requests],
                "wait_bound": QUEUE_WAIT_SECONDS,
                "lease": self.lease_seconds,
                "limit_ttl": QUEUE_LIMIT_SECONDS,
            },
        )
        if fit is None:
            return NOTHING  # not ours any more, or no longer collecting
        log = logger.bind(
            action="batch_queue",
            batch=str(row["id"]),
            provider=api.name,
            kept=fit["kept"],
            moved=fit["moved"],
            direct=fit["direct"],
            enqueued=fit["enqueued"],
            queue_limit=fit["queue_limit"],
        )
        if fit["kept"] == 0:
            log.debug("no room in the provider's batch queue: the batch waits")
            return WAITING
        if fit["moved"] or fit["direct"]:
            log.info(
                f"{fit['kept']} job(s) fit the provider's batch queue; "
                f"{fit['moved']} wait for the next batch, {fit['direct']} go the direct way"
            )
        return None

    async def refuse(self, intent: UUID, api: BatchAPI[Any], limit: int | None, error: str) -> None:
        """The provider refused the batch for its queue: the limit learned, the
        batch ended, its jobs moved to a new collecting batch (no attempt)."""
        self.refused += 1
        row = await dal.BATCH_REFUSED.first(
            self.pool,
            {
                "batch": intent,
                "worker": self.worker_id,
                "provider": api.name,
                "scope": api.scope,
                "limit": limit,
                "error": scrub(error),
                "retry": self.retry_seconds,
                "wait_bound": QUEUE_WAIT_SECONDS,
                "lease": self.lease_seconds,
            },
        )
        logger.bind(
            action="batch_queue_full",
            batch=str(intent),
            provider=api.name,
            queue_limit=row["queue_limit"] if row else None,
            paced=row["paced"] if row else None,
            moved=row["moved"] if row else 0,
            direct=row["direct"] if row else 0,
        ).warning(f"{api.name} refused the batch for its batch queue limit; its jobs wait for room")

    async def _record(
        self,
        intent: UUID,
        batch_id: str,
        file_id: str | None,
        made_by: BatchAPI[Any] | None = None,
    ) -> None:
        """The intent's provider batch id recorded. `made_by`: this worker has just
        created that batch; if the intent went to another worker meanwhile (this
        one was paused past its lease) and that worker recorded another batch, or
        the intent ended, this one is a second batch of the same requests: it is
        cancelled at once (its requests not yet run are not billed)."""
        row = await dal.BATCH_SUBMITTED.first(
            self.pool,
            {
                "batch": intent,
                "worker": self.worker_id,
                "provider_batch": batch_id,
                "file": file_id,
            },
        )
        if row is None or not row["recorded"]:
            # The lease went to another worker meanwhile (this one was paused past
            # it): the batch may have been sent twice; this one's answers go unread.
            log = logger.bind(action="batch_lease_lost", batch=str(intent), provider_batch=batch_id)
            log.error("batch sent after its lease was lost: not recorded")
            if made_by is not None:
                await self._cancel_second(intent, batch_id, made_by, log)

    async def _cancel_second(
        self, intent: UUID, batch_id: str, api: BatchAPI[Any], log: Any
    ) -> None:
        # While the worker that took the intent over is still sending it, it may
        # find this batch at the provider (OpenAI: by its metadata) and take it:
        # wait for its record (two leases at most: it may die too).
        deadline = time.monotonic() + 2 * self.lease_seconds
        while True:
            now = await dal.BATCH_RECORDED.first(self.pool, {"batch": intent})
            recorded = now["provider_batch_id"] if now else None
            if recorded == batch_id:
                return  # the new holder found this batch: the intent's now
            if now is None or recorded is not None or now["state"] == "ended":
                break  # another batch is the intent's, or the intent is over
            if time.monotonic() >= deadline:
                log.warning("left running: the intent is still being sent by its new holder")
                return
            await asyncio.sleep(RECORD_CHECK_SECONDS)
        try:
            await api.cancel(batch_id)
        except Exception as exc:
            log.error(f"a second batch of the same requests, not cancelled: {scrub(str(exc))}")
            return
        self.cancelled += 1
        log.warning("a second batch of the same requests: cancelled")


def course_request(job: Job) -> CoursePrompt:
    """The request the course handler would make for this job, checked as it
    checks it: a job it would refuse fails here, before its batch is sent."""
    return course_prompt(*course_input(job))


def image_request(job: Job) -> ImageRequest:
    """The request the media handler would make for this image job."""
    prompt, media_type, params = media_input(job)
    if media_type != "image":  # never taken (collect.py): not an image
        raise InvalidJob(f"Invalid job: media_type {media_type!r} is not batched")
    return ImageRequest(prompt, params.size)


# A job's request, by its table.
REQUESTS: dict[str, Callable[[Job], Request]] = {
    "ai_course_jobs": course_request,
    "ai_media_jobs": image_request,
}
