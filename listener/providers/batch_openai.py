"""OpenAI's Batch API: the requests as a JSONL file (POST /v1/files, purpose
batch), one batch over it (POST /v1/batches, the intent's id in its metadata),
watched (GET /v1/batches/{id}), its output and error files read back.

A batch has one endpoint: course jobs go in batches of Chat Completions
(OpenAIBatches), image jobs in batches of the Images API (OpenAIImageBatches),
each request the direct path's own (requests.py). Each model has its own
enqueued-token limit, so the two never share a batch queue."""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar
from uuid import UUID

from openai.types.chat import ChatCompletion

from listener.providers import pricing, requests
from listener.providers.base import Answer, CoursePrompt, Media, Refused, Usage
from listener.providers.batchapi import (
    ENDED,
    LIST_MAX,
    LIST_PAGE,
    META_KEY,
    ImageRequest,
    RequestFailed,
    Results,
    Sent,
    State,
    image_tokens,
    input_tokens,
    job_of,
    lines,
    stated_limit,
)
from listener.providers.openai import OpenAIProvider
from listener.providers.ratelimits import RateLimits

ENDPOINT: Final = "/v1/chat/completions"
IMAGES: Final = "/v1/images/generations"
QUEUE_FULL: Final = "token_limit_exceeded"  # a failed batch's code: the enqueued tokens
NOT_AN_IMAGE: Final = "the batch's answer is not an image"
Q = TypeVar("Q", CoursePrompt, ImageRequest)
A = TypeVar("A", Answer, Media)


class _Batches(Generic[Q, A]):
    """What both endpoints share: the upload, the batch, its watch and its files."""

    name = "openai"
    table: str
    endpoint: str
    what: str  # what an answer is, in the error of one that is not

    def __init__(self, provider: OpenAIProvider, model: str) -> None:
        self.client = provider.client
        self.model = model
        self.max_tokens = provider.max_tokens

    @property
    def scope(self) -> str:
        return self.model  # each model has its own enqueued-token limit

    def units(self, request: Q) -> int:
        raise NotImplementedError

    def body(self, request: Q) -> dict[str, Any]:
        """The request line's body: the direct call's request."""
        raise NotImplementedError

    def read(self, body: Any) -> A:
        """A 200 answer's body read as the direct call's result, at the batch price."""
        raise NotImplementedError

    async def submit(
        self, intent: UUID, reqs: list[tuple[UUID, Q]], hook: Callable[[str], None]
    ) -> Sent:
        body = "\n".join(
            json.dumps(
                {
                    "custom_id": str(job),
                    "method": "POST",
                    "url": self.endpoint,
                    "body": self.body(request),
                }
            )
            for job, request in reqs
        ).encode()
        f = await self.client.files.create(
            file=(f"ai-jobs-{intent}.jsonl", io.BytesIO(body)), purpose="batch"
        )
        hook("after_upload")
        b = await self.client.batches.create(
            input_file_id=f.id,
            endpoint=self.endpoint,  # type: ignore[arg-type]  # one of the SDK's literals
            completion_window="24h",
            metadata={META_KEY: str(intent)},
        )
        return Sent(b.id, f.id)

    async def find(
        self, intent: UUID, since: float, until: float, jobs: set[UUID], known: set[str]
    ) -> Sent | None:
        """By the intent's id in the batch's metadata: exact."""
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
                except Exception:  # an answer that is not what the endpoint answers
                    out.answers[job] = RequestFailed(f"the batch's answer is not {self.what}")
        return out

    def _answer(self, doc: dict[str, Any]) -> A:
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
        return self.read(response.get("body"))

    async def cancel(self, batch_id: str) -> None:
        await self.client.batches.cancel(batch_id)


class OpenAIBatches(_Batches[CoursePrompt, Answer]):
    """Course jobs, through Chat Completions."""

    table = "ai_course_jobs"
    endpoint = ENDPOINT
    what = "a chat completion"

    def __init__(self, provider: OpenAIProvider) -> None:
        super().__init__(provider, provider.model)

    def units(self, request: CoursePrompt) -> int:
        return input_tokens(request)

    def body(self, request: CoursePrompt) -> dict[str, Any]:
        return requests.openai_course(self.model, self.max_tokens, request)

    def read(self, body: Any) -> Answer:
        completion = ChatCompletion.model_validate(body)
        return requests.openai_answer(completion, self.model, RateLimits(), batch=True)


class OpenAIImageBatches(_Batches[ImageRequest, Media]):
    """Image jobs, through the Images API (the image model's own batches)."""

    table = "ai_media_jobs"
    endpoint = IMAGES
    what = "an image"

    def __init__(self, provider: OpenAIProvider) -> None:
        super().__init__(provider, provider.image_model)

    def units(self, request: ImageRequest) -> int:
        return image_tokens(request)

    def body(self, request: ImageRequest) -> dict[str, Any]:
        return requests.openai_image(self.model, request.prompt, request.size)

    def read(self, body: Any) -> Media:
        """The image as the direct path stores it (png), or RequestFailed saying
        what is wrong with the answer: hostile input, never a crash."""
        if not isinstance(body, dict):
            raise RequestFailed(f"{NOT_AN_IMAGE}: not a JSON object")
        data = body.get("data")
        if not isinstance(data, list) or not data or not isinstance(data[0], dict):
            raise RequestFailed(f"{NOT_AN_IMAGE}: no data")
        b64 = data[0].get("b64_json")
        if not isinstance(b64, str) or not b64:
            raise RequestFailed(f"{NOT_AN_IMAGE}: no b64_json")
        try:
            image = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise RequestFailed(f"{NOT_AN_IMAGE}: b64_json is not base64") from None
        if not image:
            raise RequestFailed(f"{NOT_AN_IMAGE}: b64_json is empty")
        usage = Usage(cost_usd=pricing.batch_price(pricing.image_cost(self.model)))
        return Media(image, "png", "image/png", self.model, usage)


class _Missing(Exception):
    """No result (the request expired in the batch): the job goes back."""
