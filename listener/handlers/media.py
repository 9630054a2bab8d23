"""The media handler: an image (OpenAI Images API) or a sound (OpenAI Speech API)
for the job's prompt, stored as media/<jobId>.<ext>."""

from __future__ import annotations

import time

from loguru import logger

from listener import progress
from listener.errors import InvalidJob
from listener.jobs import MEDIA_TYPES, Job, Outcome
from listener.params import MediaParams, parse
from listener.providers import Providers
from listener.providers.base import Media, MediaProvider
from listener.providers.chain import Chain
from listener.results import store
from listener.settings import Settings
from listener.storage import Storage


def media_input(job: Job) -> tuple[str, str, MediaParams]:
    """The job's prompt, media type and params, checked: what the direct call and
    a batch's request are made of (InvalidJob for a job neither can run)."""
    prompt = str(job.row.get("prompt") or "").strip()
    media_type = job.row.get("media_type")
    if not prompt:
        raise InvalidJob("Invalid job: prompt is empty")
    if media_type not in MEDIA_TYPES:
        raise InvalidJob(f"Invalid job: unknown media_type {media_type!r} (image or audio)")
    return prompt, media_type, parse(MediaParams, job.params)


class MediaHandler:
    def __init__(
        self, settings: Settings, providers: Providers, chain: Chain, storage: Storage
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.chain = chain
        self.storage = storage

    async def __call__(self, job: Job) -> Outcome:
        prompt, media_type, params = media_input(job)
        voice = params.voice or self.settings.openai_tts_voice

        async def make(provider: MediaProvider) -> Media:
            if media_type == "image":
                return await provider.image(prompt, params.size)
            return await provider.speech(prompt, voice, params.format)

        shown = progress.current(job)
        shown.set_phase(progress.GENERATING)
        media, gen = await self.chain.media(
            self.providers.media_chain(), make, job, lambda p: p.media_model(media_type)
        )
        shown.set_phase(progress.STORING, progress.GENERATED)
        path = f"media/{job.id}.{media.ext}"
        t0 = time.perf_counter()
        stored = await store(self.storage, job, path, media.data, media.content_type)
        storage_ms = round((time.perf_counter() - t0) * 1000, 3)
        logger.bind(
            action="media_stored", job_id=str(job.id), provider=gen.provider, model=gen.model
        ).info("{} stored at {}", media_type, path)
        return Outcome(
            path,
            {
                "generationDurationMs": gen.duration_ms,
                "storageMs": storage_ms,
                "provider": gen.provider,
                "model": gen.model,
                "mediaType": media_type,
                "bytes": len(media.data),
                "estimatedCostUsd": gen.usage.cost_usd,
                "fallbacks": gen.fallbacks,
                "resultSha256": stored.sha256,
            },
            staged=stored.staged,
        )
