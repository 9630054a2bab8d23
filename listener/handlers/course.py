"""The course handler: subject + params -> a validated course in storage, its row in
the catalog, and its telemetry. A recent course made from the same request is
reused instead of asking a provider (the cache)."""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from typing import Any

from loguru import logger
from pydantic import ValidationError

from listener import params, progress
from listener.catalog import Catalog, CourseCache
from listener.course_schema import SCHEMA_VERSION, Course, CourseParams
from listener.errors import InvalidJob
from listener.jobs import Job, Outcome
from listener.prompts import course_prompt
from listener.providers import Providers
from listener.providers.chain import Chain
from listener.providers.placeholder import PlaceholderProvider
from listener.results import Stored, digest, store
from listener.settings import Settings
from listener.storage import Storage

PLACEHOLDER = PlaceholderProvider.name
# The whole id, as the database checks it (sql/011): `$` would let a trailing
# newline through, into a storage path.
_COURSE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def course_input(job: Job) -> tuple[str, str, CourseParams]:
    """The job's subject, course_id and params, checked: what the direct call and
    a batch's request are made of (InvalidJob for a job neither can run)."""
    subject = str(job.row.get("subject") or "").strip()
    course_id = str(job.row.get("course_id") or "")
    if not subject:
        raise InvalidJob("Invalid job: subject is empty")
    if not _COURSE_ID.fullmatch(course_id):
        raise InvalidJob(f"Invalid job: course_id {course_id!r} is not a slug")
    return subject, course_id, parse_params(job.params)


def parse_params(raw: dict[str, Any]) -> CourseParams:
    return params.parse(CourseParams, raw)


def normalize_subject(subject: str) -> str:
    text = unicodedata.normalize("NFKC", subject).casefold()
    return " ".join(text.split()).strip(" .!?;:,")


def cache_key(subject: str, params: CourseParams) -> str:
    """Requests that would make the same course share a key."""
    doc = {"v": SCHEMA_VERSION, "subject": normalize_subject(subject), **params.normalized()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def course_path(course_id: str) -> str:
    return f"courses/{course_id}/course.json"


class CourseHandler:
    def __init__(
        self,
        settings: Settings,
        providers: Providers,
        chain: Chain,
        storage: Storage,
        catalog: Catalog,
        cache: CourseCache,
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.chain = chain
        self.storage = storage
        self.catalog = catalog
        self.cache = cache
        self.cache_hits = 0

    async def __call__(self, job: Job) -> Outcome:
        subject, course_id, params = course_input(job)
        key = cache_key(subject, params)
        log = logger.bind(action="course_generate", job_id=str(job.id), course_id=course_id)

        if self.settings.cache_ttl_seconds > 0:
            hit = await self._from_cache(job, subject, course_id, key)
            if hit is not None:
                # The job that made it, for operators: not in the metrics, which the
                # requester reads (it may be another user's job).
                log.bind(action="course_cache_hit", source_job_id=hit[1]).info(
                    "course reused from the cache"
                )
                return hit[0]

        prompt = course_prompt(subject, course_id, params)
        # The requester watches the course being written (progress, partial_result).
        shown = progress.current(job)
        reader = shown.course_reader(params, course_id, subject)
        shown.set_phase(progress.GENERATING)
        course, gen = await self.chain.course(
            self.providers.course_chain(), prompt, job, reader=reader
        )
        # The job decides these, whatever the model wrote.
        course = course.model_copy(update={"id": course_id, "subject": subject})
        shown.set_tokens(gen.usage.output_tokens)
        shown.groups_done = len(course.groups)
        shown.set_phase(progress.STORING, progress.STORED)
        path = course_path(course_id)
        stored, storage_ms = await self._store(job, path, course)
        entry = await self.catalog.record(
            course,
            job_id=job.id,
            result_path=path,
            # The cache holds real courses only: a placeholder's (the emergency
            # switch during an outage) must not be served once the providers are back.
            cache_key=None if gen.provider == PLACEHOLDER else key,
            provider=gen.provider,
            model=gen.model,
        )
        log.bind(provider=gen.provider, model=gen.model).info("course stored at {}", path)
        return Outcome(
            path,
            {
                "generationDurationMs": gen.duration_ms,
                "storageMs": storage_ms,
                "provider": gen.provider,
                "model": gen.model,
                "inputTokens": gen.usage.input_tokens,
                "cachedInputTokens": gen.usage.cached_input_tokens,
                "outputTokens": gen.usage.output_tokens,
                "totalTokens": gen.usage.input_tokens + gen.usage.output_tokens,
                "estimatedCostUsd": gen.usage.cost_usd,
                "cacheHit": False,
                "repairRounds": gen.repairs,
                "fallbacks": gen.fallbacks,
                "groups": len(course.groups),
                "items": course.item_count,
                "resultSha256": stored.sha256,
            },
            catalog=entry,
            staged=stored.staged,
        )

    async def _store(self, job: Job, path: str, course: Course) -> tuple[Stored, float]:
        """The course written as this attempt's result (listener/results.py), and
        how long it took."""
        t0 = time.perf_counter()
        data = course.model_dump_json(indent=1).encode()
        stored = await store(self.storage, job, path, data, "application/json")
        return stored, round((time.perf_counter() - t0) * 1000, 3)

    async def _from_cache(
        self, job: Job, subject: str, course_id: str, key: str
    ) -> tuple[Outcome, str] | None:
        """The outcome of a course served from the cache, and the id of the job
        that made it."""
        t0 = time.perf_counter()
        row = await self.cache.lookup(key, self.settings.cache_ttl_seconds)
        if row is None:
            return None
        data = await self.storage.read(row["result_path"])
        if data is None:
            return None
        try:
            course = Course.model_validate_json(data)
        except ValidationError:
            return None  # an older or damaged file: generate afresh
        lookup_ms = round((time.perf_counter() - t0) * 1000, 3)
        path, storage_ms, entry = row["result_path"], 0.0, None
        stored = Stored(digest(data), None)
        if row["course_id"] != course_id:  # same request under another course id
            course = course.model_copy(update={"id": course_id, "subject": subject})
            path = course_path(course_id)
            stored, storage_ms = await self._store(job, path, course)
            entry = await self.catalog.record(
                course,
                job_id=job.id,
                result_path=path,
                cache_key=key,
                provider=row["provider"] or "cache",
                model=row["model"] or "",
            )
        self.cache_hits += 1
        outcome = Outcome(
            path,
            {
                "generationDurationMs": lookup_ms,
                "storageMs": storage_ms,
                "provider": "cache",
                "model": row["model"],
                "inputTokens": 0,
                "cachedInputTokens": 0,
                "outputTokens": 0,
                "totalTokens": 0,
                "estimatedCostUsd": 0.0,
                "cacheHit": True,
                # who made the course: the cache never holds a placeholder's
                "cachedProvider": row["provider"],
                "cachedModel": row["model"],
                "groups": len(course.groups),
                "items": course.item_count,
                "resultSha256": stored.sha256,
            },
            catalog=entry,
            staged=stored.staged,
        )
        return outcome, str(row["job_id"])
