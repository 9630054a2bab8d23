"""Sending a batch: the intent recorded first (ai_job_batch_submitting: the
batch's id, its provider and model, before any byte goes out), then the upload
and the creation, then the provider's batch id recorded. A batch found in the
middle of that (its worker died: state `submitting`) is first looked for at the
provider, by the intent's id, and sent only if the provider never created it."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from loguru import logger
from psycopg_pool import AsyncConnectionPool

from listener import dal
from listener.batches.crash import crash_point
from listener.errors import InvalidJob
from listener.handlers.course import parse_params
from listener.jobs import Job
from listener.prompts import course_prompt
from listener.providers.base import CoursePrompt
from listener.providers.batchapi import BatchAPI
from listener.rows import BatchWatchRow

FailJob = Any  # Executor.fail(job, exc)


class Submitter:
    def __init__(self, pool: AsyncConnectionPool[Any], worker_id: str, fail: FailJob) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.fail = fail  # a job whose request cannot be made (bad params): its attempt fails
        self.created = 0  # batches this process created at a provider
        self.recovered = 0  # intents found at the provider instead of sent again

    async def submit(self, row: BatchWatchRow, api: BatchAPI) -> bool:
        """Send (or find) the batch; True once its provider batch id is recorded."""
        intent: UUID = row["id"]
        recover = row["state"] == "submitting"
        jobs = await dal.BATCH_SUBMITTING.all(
            self.pool,
            {"batch": intent, "worker": self.worker_id, "provider": api.name, "model": api.model},
        )
        if not jobs:
            return False  # not ours any more, or nothing left in it (ended: empty)
        log = logger.bind(action="batch_submit", batch=str(intent), provider=api.name)
        if recover:
            since = time.time() - row["age_seconds"] - 60
            rows = await dal.BATCH_KNOWN.all(self.pool, {"provider": api.name, "since": since})
            known = {r["provider_batch_id"] for r in rows if r["provider_batch_id"]}
            found = await api.find(intent, since, len(jobs), known)
            if found is not None:
                await self._record(intent, found.batch_id, found.file_id)
                self.recovered += 1
                log.bind(provider_batch=found.batch_id).info(
                    "batch found at the provider: not sent again"
                )
                return True
        requests: list[tuple[UUID, CoursePrompt]] = []
        for r in jobs:
            job = Job(
                "ai_course_jobs",
                r["id"],
                r["claim_token"],
                r["retry_count"],
                r["max_retries"],
                r["job"],
            )
            try:
                requests.append((job.id, _prompt(job)))
            except InvalidJob as exc:
                await self.fail(job, exc)
        if not requests:
            return False
        crash_point("before_upload")
        sent = await api.submit(intent, requests, crash_point)
        self.created += 1
        crash_point("after_create")
        await self._record(intent, sent.batch_id, sent.file_id)
        log.bind(provider_batch=sent.batch_id, jobs=len(requests)).info(
            f"batch of {len(requests)} job(s) sent"
        )
        return True

    async def _record(self, intent: UUID, batch_id: str, file_id: str | None) -> None:
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
            logger.bind(
                action="batch_lease_lost", batch=str(intent), provider_batch=batch_id
            ).error("batch sent after its lease was lost: not recorded")


def _prompt(job: Job) -> CoursePrompt:
    """The request the course handler would make for this job."""
    subject = str(job.row.get("subject") or "").strip()
    course_id = str(job.row.get("course_id") or "")
    if not subject:
        raise InvalidJob("Invalid job: subject is empty")
    return course_prompt(subject, course_id, parse_params(job.params))
