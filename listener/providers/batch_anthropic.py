"""Anthropic's Message Batches: the requests in one POST /v1/messages/batches,
watched (GET /v1/messages/batches/{id}), the results read at its results_url.

Message batches carry no metadata: an intent whose batch id was not recorded
(its worker died between the creation and the record) is found among the
batches created since the intent was recorded, with as many requests, and not
recorded by another intent. Two intents of the same size that both lost their
record within the same seconds cannot be told apart: then neither is taken
and the intent is sent again (docs/generation.md says so)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from listener.providers import requests
from listener.providers.anthropic import AnthropicProvider
from listener.providers.base import Answer, CoursePrompt, Refused
from listener.providers.batchapi import (
    LIST_MAX,
    LIST_PAGE,
    MAX_REQUESTS,
    READ_CHARS,
    UNSURE,
    QueueFull,
    RequestFailed,
    Results,
    Sent,
    State,
    Unsure,
    job_of,
    lines,
    queue_limit,
    queue_refusal,
)
from listener.providers.ratelimits import RateLimits

if TYPE_CHECKING:
    import anthropic

NAMED_KEPT = 200  # ended batches whose jobs are remembered (find)


class AnthropicBatches:
    name = "anthropic"
    table = "ai_course_jobs"  # Anthropic makes no images

    def __init__(self, provider: AnthropicProvider) -> None:
        self.provider = provider  # its client made at the first request (its SDK's import)
        self.model = provider.model
        self.max_tokens = provider.max_tokens
        self._named_by: dict[str, set[UUID]] = {}  # an ended batch's jobs, by its id

    async def _client(self) -> anthropic.AsyncAnthropic:
        return cast("anthropic.AsyncAnthropic", await self.provider.ready())

    @property
    def scope(self) -> str:
        return "*"  # one queue of requests for every model

    def units(self, prompt: CoursePrompt) -> int:
        return 1

    async def submit(
        self, intent: UUID, reqs: list[tuple[UUID, CoursePrompt]], hook: Callable[[str], None]
    ) -> Sent:
        hook("after_upload")  # nothing to upload: the requests travel in the creation
        # The SDK imported (at its first use) before the `except` below names its error.
        client = await self._client()
        try:
            b = await client.messages.batches.create(
                requests=[
                    {
                        "custom_id": str(job),
                        "params": requests.anthropic_course(  # type: ignore[typeddict-item]
                            self.model, self.max_tokens, prompt
                        ),
                    }
                    for job, prompt in reqs
                ]
            )
        except _sdk().RateLimitError as exc:
            # The batch was not created. A message that names the queue: the
            # processing queue's limit (its number, when it states one). Any other
            # 429 (a per-minute limit of the Batches endpoints) is a failed send,
            # tried again by the watch (watch.py, SUBMIT_TRIES).
            message = _message(exc)
            if not queue_refusal(message):
                raise
            raise QueueFull(f"batch refused (429): {message[:300]}", queue_limit(message)) from exc
        return Sent(b.id)

    async def find(
        self, intent: UUID, since: float, until: float, jobs: set[UUID], known: set[str]
    ) -> Sent | Unsure | None:
        """Anthropic's batches carry no metadata: the intent's batch is one made
        while its holder lived (between `since` and `until`), recorded by no other
        intent, with as many requests as ours can have (at least the jobs the
        intent still holds, at most MAX_REQUESTS), whose results name every one
        of those jobs (custom_id: the job's id), read once it has ended. While
        such a batch still runs, or its results cannot be read now: UNSURE, the
        intent waits (sending it again could pay for its requests twice); each
        ends within the provider's 24 hours. None: it was never made."""
        unsure = False
        seen = 0
        async for b in (await self._client()).messages.batches.list(limit=LIST_PAGE):
            seen += 1
            created = b.created_at.timestamp()
            if created < since - 5 or seen >= LIST_MAX:
                break
            c = b.request_counts
            total = c.processing + c.succeeded + c.errored + c.canceled + c.expired
            if created > until + 5 or b.id in known or not len(jobs) <= total <= MAX_REQUESTS:
                continue
            if b.processing_status != "ended" or not b.results_url:
                unsure = True
                continue
            try:
                named = await self._named(b.id)
            except Exception:  # read again at the next look, never taken as not there
                unsure = True
                continue
            if jobs <= named:
                return Sent(b.id)
        return UNSURE if unsure else None

    async def _named(self, batch_id: str) -> set[UUID]:
        """The jobs an ended batch's results name (remembered: they do not change)."""
        named = self._named_by.get(batch_id)
        if named is None:
            raw = await (await self._client()).messages.batches.with_raw_response.results(batch_id)
            named = set()
            for doc in lines(await raw.http_response.aread()):
                cid = doc.get("custom_id") if isinstance(doc, dict) else None
                with contextlib.suppress(TypeError, ValueError, AttributeError):
                    named.add(UUID(cid))
            if len(self._named_by) >= NAMED_KEPT:
                self._named_by.clear()
            self._named_by[batch_id] = named
        return named

    async def state(self, batch_id: str) -> State:
        b = await (await self._client()).messages.batches.retrieve(batch_id)
        if b.processing_status != "ended":
            return State(None)
        c = b.request_counts
        if b.cancel_initiated_at is not None:
            return State("cancelled", "cancelled")
        if c.expired and not (c.succeeded or c.errored):
            return State("expired", "expired")
        return State("completed")

    async def results(self, batch_id: str, jobs: set[UUID]) -> Results:
        b = await (await self._client()).messages.batches.retrieve(batch_id)
        out = Results()
        if not b.results_url:
            return out
        # The raw file, not the SDK's decoder: one bad line must not hide the others.
        raw = await (await self._client()).messages.batches.with_raw_response.results(batch_id)
        data = await raw.http_response.aread()
        seen: set[UUID] = set()
        for doc in lines(data):
            job = job_of(doc, jobs, seen)
            if job is None:
                out.skipped += 1
                continue
            result = doc.get("result")
            kind = result.get("type") if isinstance(result, dict) else None
            if kind in ("canceled", "expired"):
                continue
            try:
                out.answers[job] = self._answer(result, kind)
            except (Refused, RequestFailed) as exc:
                out.answers[job] = exc
            except Exception:
                out.answers[job] = RequestFailed("the batch's answer is not a message")
        return out

    def _answer(self, result: Any, kind: Any) -> Answer:
        if kind != "succeeded":
            err = result.get("error") if isinstance(result, dict) else None
            inner = err.get("error") if isinstance(err, dict) else None
            message = inner.get("message") if isinstance(inner, dict) else None
            raise RequestFailed(f"batch request failed: {message or kind}")
        message = _sdk().types.Message.model_validate(result.get("message"))
        return requests.anthropic_answer(message, self.model, RateLimits(), batch=True)

    async def cancel(self, batch_id: str) -> None:
        await (await self._client()).messages.batches.cancel(batch_id)


def _sdk() -> Any:
    """The SDK's module, imported by the provider's client before any request."""
    return sys.modules["anthropic"]


def _message(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    return str(message or "rate_limit_error")[:READ_CHARS]
