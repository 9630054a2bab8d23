"""OpenAI's Batch API: the requests as a JSONL file (POST /v1/files, purpose
batch), one batch over it (POST /v1/batches, the intent's id in its metadata),
watched (GET /v1/batches/{id}), its output and error files read back."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any, Final
from uuid import UUID

from openai.types.chat import ChatCompletion

from listener.providers import requests
from listener.providers.base import Answer, CoursePrompt, Refused
from listener.providers.batchapi import (
    ENDED,
    LIST_MAX,
    LIST_PAGE,
    META_KEY,
    RequestFailed,
    Results,
    Sent,
    State,
    input_tokens,
    job_of,
    lines,
    stated_limit,
)
from listener.providers.openai import OpenAIProvider
from listener.providers.ratelimits import RateLimits

ENDPOINT: Final = "/v1/chat/completions"
QUEUE_FULL: Final = "token_limit_exceeded"  # a failed batch's code: the enqueued tokens


class OpenAIBatches:
    name = "openai"

    def __init__(self, provider: OpenAIProvider) -> None:
        self.client = provider.client
        self.model = provider.model
        self.max_tokens = provider.max_tokens

    @property
    def scope(self) -> str:
        return self.model  # each model has its own enqueued-token limit

    def units(self, prompt: CoursePrompt) -> int:
        return input_tokens(prompt)

    async def submit(
        self, intent: UUID, reqs: list[tuple[UUID, CoursePrompt]], hook: Callable[[str], None]
    ) -> Sent:
        body = "\n".join(
            json.dumps(
                {
                    "custom_id": str(job),
                    "method": "POST",
                    "url": ENDPOINT,
                    "body": requests.openai_course(self.model, self.max_tokens, prompt),
                }
            )
            for job, prompt in reqs
        ).encode()
        f = await self.client.files.create(
            file=(f"ai-jobs-{intent}.jsonl", io.BytesIO(body)), purpose="batch"
        )
        hook("after_upload")
        b = await self.client.batches.create(
            input_file_id=f.id,
            endpoint=ENDPOINT,
            completion_window="24h",
            metadata={META_KEY: str(intent)},
        )
        return Sent(b.id, f.id)

    async def find(self, intent: UUID, since: float, count: int, known: set[str]) -> Sent | None:
        seen = 0
        async for b in self.client.batches.list(limit=LIST_PAGE):
            if (b.metadata or {}).get(META_KEY) == str(intent):
                return Sent(b.id, b.input_file_id)
            seen += 1
            if b.created_at < since - 3600 or seen >= LIST_MAX:
                break  # newest first: older batches cannot be this intent's
        return None

    async def state(self, batch_id: str) -> State:
        b = await self.client.batches.retrieve(batch_id)
        if b.status in ENDED:
            error = None
            full = False
            limit = None
            if b.errors and b.errors.data:
                error = "; ".join(str(e.message) for e in b.errors.data if e.message)[:300]
                for e in b.errors.data:
                    if e.code == QUEUE_FULL:
                        full = True
                        limit = limit or stated_limit(e.message)
            error = error or (None if b.status == "completed" else b.status)
            if full and b.status == "failed":
                return State("failed", error, queue_full=True, queue_limit=limit)
            return State(b.status, error)
        return State(None)

    async def results(self, batch_id: str, jobs: set[UUID]) -> Results:
        b = await self.client.batches.retrieve(batch_id)
        out = Results()
        seen: set[UUID] = set()
        for file_id in (b.output_file_id, b.error_file_id):
            if not file_id:
                continue
            data = (await self.client.files.content(file_id)).content
            for doc in lines(data):
                job = job_of(doc, jobs, seen)
                if job is None:
                    out.skipped += 1
                    continue
                try:
                    out.answers[job] = self._answer(doc)
                except _Missing:
                    continue
                except (Refused, RequestFailed) as exc:
                    out.answers[job] = exc
                except Exception:  # an answer that is not a completion
                    out.answers[job] = RequestFailed("the batch's answer is not a chat completion")
        return out

    def _answer(self, doc: dict[str, Any]) -> Answer:
        response = doc.get("response")
        error = doc.get("error")
        if isinstance(error, dict) and error.get("code") == "batch_expired":
            raise _Missing
        if not isinstance(response, dict) or response.get("status_code") != 200:
            message = error.get("message") if isinstance(error, dict) else None
            if isinstance(response, dict) and isinstance(response.get("body"), dict):
                err = response["body"].get("error")
                if isinstance(err, dict):
                    message = err.get("message")
            status = response.get("status_code") if isinstance(response, dict) else None
            raise RequestFailed(f"batch request failed: HTTP {status} {message or ''}".strip())
        completion = ChatCompletion.model_validate(response.get("body"))
        return requests.openai_answer(completion, self.model, RateLimits(), batch=True)

    async def cancel(self, batch_id: str) -> None:
        await self.client.batches.cancel(batch_id)


class _Missing(Exception):
    """No result (the request expired in the batch): the job goes back."""
