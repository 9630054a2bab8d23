"""The end-user API, under /v1/ on `ai-jobs web` (docs/api.md), mounted only when
JWT_SECRET or JWT_JWKS_URL is set (else every /v1/ path is a 404):

    POST /v1/jobs/course            {"subject", "params"?, "course_id"?, "batch"?, "trace_parent"?}
    POST /v1/jobs/media             {"prompt", "media_type", "params"?, ...}
    GET  /v1/jobs/{id}              the job as JSON
    GET  /v1/jobs/{id}/events       text/event-stream: an event `job` now and at each change
    GET  /v1/jobs/{id}/result       the course JSON or the media of a done job
    POST /v1/jobs/{id}/cancel       cancel_job

Every request carries `Authorization: Bearer <JWT>` (tokens.py) and runs its SQL as
role authenticated with the token's claims (userjobs.as_user): what a user
may do is the database's to decide, as for a Supabase client. Errors answer
{"error": "<message>"} with the status of userjobs' and the database's refusal.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
from loguru import logger
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from listener import dal, db, tracing
from listener.errors import (
    AiJobsError,
    BudgetExceeded,
    ConfigError,
    DatabaseUnavailable,
    InvalidJob,
    JobBusy,
    JobNotFound,
    PermissionDenied,
    RateLimitExceeded,
    SchemaOutdated,
    UnknownJobTable,
    translate,
)
from listener.settings import Settings
from listener.storage import Storage
from listener.web import userjobs
from listener.web.live import LiveFeed
from listener.web.pages import MEDIA_TYPES
from listener.web.responses import harden
from listener.web.streams import Stream, StreamHub, StreamLimit
from listener.web.tokens import TokenRefused, User, Verifier

PREFIX = "/v1/jobs"
MAX_BODY = 64 * 1024  # bytes: a request is a few KB (params at most 8 KB by default)
KEEPALIVE_SECONDS = 15.0  # a comment on an idle stream, so proxies keep it open
POOL_SIZE = 6
RETRY_STREAM_SECONDS = 5
_CHALLENGE = 'Bearer realm="ai-jobs", error="invalid_token"'
# The refusals, most specific first: the database's (errors.translate) and ours.
_STATUS: list[tuple[type[AiJobsError], int]] = [
    (RateLimitExceeded, 429),
    (BudgetExceeded, 402),
    (InvalidJob, 400),
    (UnknownJobTable, 400),
    (PermissionDenied, 403),
    (JobNotFound, 404),
    (JobBusy, 409),
    (DatabaseUnavailable, 503),
    (SchemaOutdated, 503),
]

_CLIENT_ERRORS = tuple(kind for kind, status in _STATUS if status < 500)

_PREFLIGHT = {
    "Access-Control-Allow-Methods": "GET, POST",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
    "Access-Control-Max-Age": "600",
}

Handler = Callable[[Request, User], Awaitable[Response]]


async def preflight(conn: psycopg.AsyncConnection[Any]) -> None:
    """At start (`ai-jobs web`): the API's connections may act as authenticated."""
    if not (await dal.API_CHECK_ROLE.one(conn))["ok"]:
        raise ConfigError(
            "The end-user API runs its SQL as role authenticated: grant it to the"
            " DATABASE_URL role (grant authenticated to <role>), or unset JWT_SECRET"
            " and JWT_JWKS_URL"
        )


class BodyTooLarge(InvalidJob):
    """The request body is over MAX_BODY bytes."""


def error(status: int, message: str, **headers: str) -> Response:
    return harden(JSONResponse({"error": message}, status, headers=headers or None))


class _EventStream(StreamingResponse):
    """A stream that gives its slot back however it ends: a client gone before
    the first byte never runs the body's generator, whose `finally` would miss it."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class Api:
    def __init__(
        self,
        settings: Settings,
        dsn: str,
        feed: LiveFeed,
        storage: Callable[[], Storage],
        *,
        keepalive: float = KEEPALIVE_SECONDS,
    ) -> None:
        secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        self.verifier = Verifier(secret, settings.jwt_jwks_url, settings.jwt_audience)
        # Its own pool: end users' load never starves the operators' dashboard.
        self.pool: db.WorkPool = db.make_pool(
            dsn, POOL_SIZE, app="ai-jobs web api", prepare=settings.listen_mode == "listen"
        )
        self.hub = StreamHub(
            self._read, settings.api_streams_per_user, settings.api_streams_per_process
        )
        feed.watch(self.hub.changed)
        self._storage = storage
        self._origins = settings.cors_origins
        self.keepalive = keepalive
        self.log = logger.bind(action="api")

    async def start(self) -> None:
        await self.pool.open(wait=True, timeout=15)
        await self.hub.start()

    async def stop(self) -> None:
        await self.hub.stop()
        await self.pool.close()
        await self.verifier.aclose()

    def routes(self) -> list[Route]:
        g = self.guarded
        get, post = ["GET", "OPTIONS"], ["POST", "OPTIONS"]  # OPTIONS: CORS preflights
        return [
            Route(f"{PREFIX}/course", g(self.create_course), methods=post),
            Route(f"{PREFIX}/media", g(self.create_media), methods=post),
            Route(PREFIX + "/{id:uuid}", g(self.job), methods=get),
            Route(PREFIX + "/{id:uuid}/events", g(self.events), methods=get),
            Route(PREFIX + "/{id:uuid}/result", g(self.result), methods=get),
            Route(PREFIX + "/{id:uuid}/cancel", g(self.cancel), methods=post),
        ]

    def guarded(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            response = await answer(request)
            origin = request.headers.get("origin", "").rstrip("/")
            if origin and ("*" in self._origins or origin in self._origins):
                response.headers["Access-Control-Allow-Origin"] = origin
                response.headers["Access-Control-Expose-Headers"] = "Retry-After"
            response.headers["Vary"] = "Origin"
            return response

        async def answer(request: Request) -> Response:
            if request.method == "OPTIONS":  # a browser's preflight: no token in it
                return Response(status_code=204, headers=_PREFLIGHT)
            try:
                user = await self.verifier.user(request.headers.get("authorization"))
            except TokenRefused as exc:
                return error(401, str(exc), **{"WWW-Authenticate": _CHALLENGE})
            try:
                return await handler(request, user)
            except StreamLimit as exc:
                return error(429, str(exc), **{"Retry-After": str(RETRY_STREAM_SECONDS)})
            except BodyTooLarge as exc:
                return error(413, exc.message)
            except (psycopg.Error, AiJobsError) as exc:
                return self._refusal(request, translate(exc))

        return endpoint

    def _refusal(self, request: Request, err: AiJobsError) -> Response:
        for kind, status in _STATUS:
            if isinstance(err, kind):
                if status >= 500:
                    self.log.bind(action="api_error", path=request.url.path).warning(err.message)
                return error(status, err.message)
        self.log.bind(action="api_error", path=request.url.path).error(err.message)
        return error(500, "internal error")

    # -- jobs ------------------------------------------------------------------------

    async def create_course(self, request: Request, user: User) -> Response:
        body = userjobs.parse(userjobs.CourseRequest, await _json(request), "course")
        return await self._create(request, user, body)

    async def create_media(self, request: Request, user: User) -> Response:
        body = userjobs.parse(userjobs.MediaRequest, await _json(request), "media")
        return await self._create(request, user, body)

    async def _create(self, request: Request, user: User, body: userjobs.JobRequest) -> Response:
        if not tracing.on:
            return harden(JSONResponse(await userjobs.create(self.pool, user, body), 201))
        # The request's server span; the job continues its trace (listener/tracing.py).
        header = request.headers.get("traceparent")
        route = request.url.path
        with tracing.server("POST", route, header, body.trace_parent, _CLIENT_ERRORS) as span:
            body = body.model_copy(update={"trace_parent": tracing.traceparent()})
            created = await userjobs.create(self.pool, user, body)
            span.set_attribute("http.response.status_code", 201)
            span.set_attribute("messaging.message.id", created["id"])
        return harden(JSONResponse(created, 201))

    async def job(self, request: Request, user: User) -> Response:
        row = await userjobs.one(self.pool, user, str(request.path_params["id"]))
        return harden(JSONResponse(userjobs.view(row)))

    async def cancel(self, request: Request, user: User) -> Response:
        return harden(
            JSONResponse(await userjobs.cancel(self.pool, user, str(request.path_params["id"])))
        )

    async def result(self, request: Request, user: User) -> Response:
        job_id = str(request.path_params["id"])
        row = await userjobs.one(self.pool, user, job_id)
        path = row["result_path"]
        if row["status"] != "done" or not path:
            raise JobBusy(f"Job {job_id} is {row['status']}: it has no result yet")
        if row["job_table"] == "ai_course_jobs":
            media = "application/json"
        else:
            media = MEDIA_TYPES.get(path.rsplit(".", 1)[-1].lower(), "")
        data = await self._storage().read(path) if media else None
        if data is None:
            raise JobNotFound(f"The result of job {job_id} is not in storage")
        return harden(Response(data, media_type=media))

    # -- events ----------------------------------------------------------------------

    async def events(self, request: Request, user: User) -> Response:
        job_id = str(request.path_params["id"])
        last_id = request.headers.get("last-event-id", "")[:64] or None
        stream = self.hub.open(job_id, user, last_id)  # the caps, before any read
        try:
            await userjobs.one(self.pool, user, job_id)  # not theirs: 404, no stream
        except BaseException:
            self.hub.close(stream)
            raise
        response = _EventStream(self._sse(stream), lambda: self.hub.close(stream))
        response.headers["X-Accel-Buffering"] = "no"  # no proxy buffering of the stream
        return harden(response)

    async def _sse(self, stream: Stream) -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        while True:
            left = stream.user.expires_at - time.time()
            if left <= 0:  # a new token resumes it (Last-Event-ID)
                yield ": token expired\n\n"
                return
            try:  # asyncio.timeout: wait_for may swallow a cancellation on 3.11
                async with asyncio.timeout(min(self.keepalive, left)):
                    event = await stream.queue.get()
            except TimeoutError:
                yield ": keepalive\n\n"
                continue
            if event is None:  # the job is gone, or the server is stopping
                return
            yield event.text()
            if event.terminal:
                return

    async def _read(self, wanted: list[tuple[User, list[str]]]) -> list[list[dict[str, Any]]]:
        return await userjobs.jobs_of(self.pool, wanted)


async def _json(request: Request) -> Any:
    """The body as JSON, read up to MAX_BODY bytes and no further."""
    declared = request.headers.get("content-length", "")
    if declared and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise BodyTooLarge(f"The request body is over {MAX_BODY} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BodyTooLarge(f"The request body is over {MAX_BODY} bytes")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
        # Valid JSON, yet text PostgreSQL cannot hold: a lone surrogate (\udcff)
        # cannot be encoded, a NUL (\u0000) is refused by text and jsonb alike.
        text = json.dumps(data, ensure_ascii=False)
        text.encode("utf-8")
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise InvalidJob(f"Invalid request: the body is not JSON ({str(exc)[:100]})") from None
    if "\x00" in text or "\\u0000" in text:
        raise InvalidJob("Invalid request: the body is not JSON PostgreSQL can store (NUL)")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
