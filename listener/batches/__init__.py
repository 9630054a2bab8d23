"""The providers' Batch APIs for jobs that can wait (`batch = true`): half the
price, within 24 hours (docs/generation.md, "Batch jobs"). Course jobs go to
OpenAI's or Anthropic's, image jobs to OpenAI's (the Images API); audio jobs
run direct (no provider has a Batch API for speech).

collect.py   a job table's door: a batch job joins a collecting batch instead
             of calling a provider; a batch's answer comes back through it
submit.py    a batch sent: the intent recorded first, then the upload and creation
watch.py     every worker's watch: leases, heartbeats, polls, results, ends
crash.py     the crash tests' hook (AI_JOBS_TEST_CRASH_AT), inert otherwise
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

from psycopg_pool import AsyncConnectionPool

from listener.batches.collect import AnsweredProviders, BatchRouter
from listener.batches.watch import BatchService
from listener.jobs import Job
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.handlers import Runtime
    from listener.providers import Providers
    from listener.providers.batchapi import BatchAPI

COURSES = "ai_course_jobs"
MEDIA = "ai_media_jobs"
# Images per batch: OpenAI's results file holds each image as base64 (2-3 MB
# each); a worker holds the file (read line by line) and the decoded images of
# one image batch at a time (watch.py), tens of MB. Courses are a few KB each
# (collect.MAX_JOBS).
MAX_IMAGES = 10
NO_SPEECH_BATCH = "no provider has a Batch API for speech"

__all__ = ["BatchRouter", "BatchService", "setup"]


def unbatchable_media(job: Job) -> str | None:
    """Why a media job cannot go in a batch: audio (speech) has no Batch API."""
    return None if job.row.get("media_type") == "image" else NO_SPEECH_BATCH


def setup(settings: Settings, pool: AsyncConnectionPool[Any], runtime: Runtime) -> BatchService:
    """Route the runtime's course and media jobs through the batches (its handler
    map is replaced) and return the service the worker ticks and attaches to."""
    from listener.handlers.course import CourseHandler
    from listener.handlers.media import MediaHandler

    apis: list[BatchAPI[Any]] = []
    courses: dict[str, Any] = {}
    media: dict[str, Any] = {}
    for p in runtime.providers.course:
        if p.name == "openai":
            from listener.providers.batch_openai import OpenAIBatches
            from listener.providers.openai import OpenAIProvider

            apis.append(OpenAIBatches(cast(OpenAIProvider, p)))
        elif p.name == "anthropic":
            from listener.providers.anthropic import AnthropicProvider
            from listener.providers.batch_anthropic import AnthropicBatches

            apis.append(AnthropicBatches(cast(AnthropicProvider, p)))
        else:
            continue
        courses[p.name] = CourseHandler(
            settings,
            cast("Providers", AnsweredProviders(course=p)),
            runtime.chain,
            runtime.storage,
            runtime.catalog,
            runtime.cache,
        )
    for m in runtime.providers.media:
        if m.name == "openai":  # the only one with images, and a Batch API for them
            from listener.providers.batch_openai import OpenAIImageBatches
            from listener.providers.openai import OpenAIProvider

            apis.append(OpenAIImageBatches(cast(OpenAIProvider, m)))
            media[m.name] = MediaHandler(
                settings,
                cast("Providers", AnsweredProviders(media=m)),
                runtime.chain,
                runtime.storage,
            )

    lease = settings.stale_after_seconds / 3
    routers = {
        COURSES: BatchRouter(pool, runtime.handlers[COURSES], courses.get, lease),
        MEDIA: BatchRouter(
            pool, runtime.handlers[MEDIA], media.get, lease, MAX_IMAGES, unbatchable_media
        ),
    }
    for router in routers.values():
        router.charge = runtime.chain.meter.charge
    runtime.handlers = {**runtime.handlers, **routers}
    service = BatchService(settings, pool, routers, apis)
    service.lanes[MEDIA].reads = asyncio.Semaphore(1)  # one image results file at a time
    return service
