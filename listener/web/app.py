"""The admin dashboard: a small Starlette app, server-rendered.

    GET  /healthz                 for the PaaS (no auth; says only ok / unavailable)
    GET  /metrics                 Prometheus text format
    GET  /admin/jobs[?live=1]     the page: alerts, metrics cards, recent jobs
    GET  /admin/jobs/snapshot     the page's fragments as JSON (Refresh)
    GET  /admin/jobs/events       server-sent events: a snapshot after each change
    POST /admin/jobs/mark-stale | dead-letter | requeue     the runbook's actions
    POST /admin/login | logout    browser session

Everything but /healthz needs the admin token (auth.py); without it a page answers
401 with the sign-in form, anything else 401 alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from listener import db, ops, registry
from listener.errors import AiJobsError, JobBusy, JobNotFound, translate
from listener.settings import Settings
from listener.web import metrics, views
from listener.web.auth import Auth, Principal, same_origin
from listener.web.live import LiveFeed
from listener.web.throttle import Throttle

SSE_KEEPALIVE_SECONDS = 15.0
PAGE = "/admin/jobs"
_STATUS = {JobNotFound: 404, JobBusy: 409}
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ai-jobs"'}

Handler = Callable[[Request, Principal], Awaitable[Response]]


def _harden(response: Response, nonce: str | None = None) -> Response:
    """Headers for every dashboard response: no caching, no framing, no outside
    resources; inline style and script only with this response's nonce."""
    src = f"'nonce-{nonce}'" if nonce else "'none'"
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src {src}; script-src {src}; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def _safe_next(value: Any) -> str:
    """Only our own page, never an open redirect."""
    return value if isinstance(value, str) and value in (PAGE, f"{PAGE}?live=1") else PAGE


class Dashboard:
    def __init__(self, settings: Settings, dsn: str, admin_token: str) -> None:
        self.settings = settings
        self.auth = Auth(admin_token)
        self.throttle = Throttle()  # failed sign-ins per client address
        self.pool: AsyncConnectionPool[Any] = db.make_pool(
            dsn, 4, app="ai-jobs web", prepare=settings.listen_mode == "listen"
        )
        self.medic = db.PoolMedic(self.pool)  # dead connections replaced after an outage
        self.alert_cache = views.AlertCache(settings)
        self.feed = LiveFeed(
            dsn,
            self.snapshot,
            notify=self._notify,
            probe_every=settings.listen_probe_seconds,
            listen=settings.listen_mode == "listen",
            on_recovered=self.medic.heal_soon,
        )
        self._log = logger.bind(action="web")

    # -- plumbing ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.pool.open(wait=True, timeout=15)
        await self.feed.start()
        try:
            yield
        finally:
            await self.feed.stop()
            await self.pool.close()

    def guarded(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            who = self.auth.principal(request)
            if who is None:
                return self.unauthorized(request)
            if request.method == "POST" and not await self.auth.csrf_ok(request, who):
                return _harden(self._result(request, 403, "Cross-site request refused"))
            try:
                return await handler(request, who)
            except (psycopg.Error, AiJobsError) as exc:
                err = translate(exc)
                status = _STATUS.get(type(err), 503)
                self._log.bind(action="web_error", path=request.url.path).warning(err.message)
                return _harden(self._result(request, status, err.message))

        return endpoint

    def unauthorized(self, request: Request) -> Response:
        if request.method == "GET" and _wants_html(request) and request.url.path == PAGE:
            live = request.query_params.get("live") == "1"
            return self.login_page(f"{PAGE}?live=1" if live else PAGE)
        body = {"ok": False, "message": "Unauthorized"}
        return _harden(JSONResponse(body, 401, headers=_CHALLENGE))

    @staticmethod
    def login_page(nxt: str, error: str = "", status: int = 401) -> Response:
        """The sign-in form, answered with 401: the page stays closed until then."""
        nonce = secrets.token_urlsafe(16)
        html = views.page("login.html", nonce=nonce, next=nxt, error=error)
        return _harden(HTMLResponse(html, status, headers=_CHALLENGE), nonce)

    @staticmethod
    def _result(request: Request, status: int, message: str, **extra: Any) -> Response:
        """An action's answer: JSON for scripts and the page's own fetch; a plain
        form post (no JavaScript) goes back to the page."""
        if _wants_json(request) or not _wants_html(request):
            return JSONResponse({"ok": status < 400, "message": message, **extra}, status)
        if status >= 400:
            return PlainTextResponse(message, status)
        return RedirectResponse(PAGE, 303)

    async def _notify(self, channel: str, payload: str) -> None:
        """The live feed's probe, sent through the dashboard's pool."""
        async with self.pool.connection(timeout=5) as conn:
            await db.fetch(conn, "notify", {"channel": channel, "payload": payload})

    async def snapshot(self) -> dict[str, str]:
        async with self.pool.connection() as conn:
            data = await views.load(conn, self.alert_cache)
        return views.fragments(data)

    # -- pages -----------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """The database answers: 200, with or without workers (their absence is
        the no_worker alert's business, not a reason to restart the dashboard)."""
        try:
            async with self.pool.connection(timeout=3) as conn:
                await conn.execute(db.sql("keepalive"))
                workers = await self._live_workers(conn)
        except psycopg.Error:
            return JSONResponse({"status": "unavailable", "database": False}, 503)
        return JSONResponse(
            {
                "status": "ok",
                "database": True,
                "live": self.feed.listening.is_set(),
                "workers": workers,
            }
        )

    async def _live_workers(self, conn: Any) -> int | None:
        try:
            return len(await ops.workers(conn, registry.live_seconds(self.settings)))
        except AiJobsError:  # a schema older than the registry: still healthy
            return None

    async def jobs_page(self, request: Request, who: Principal) -> Response:
        async with self.pool.connection() as conn:
            data = await views.load(conn, self.alert_cache)
        nonce = secrets.token_urlsafe(16)
        stale_after = timedelta(seconds=round(self.settings.stale_after_seconds))
        html = views.page(
            "jobs.html",
            **data,
            nonce=nonce,
            csrf=who.csrf,
            signed_in=who.via == "session",
            live=request.query_params.get("live") == "1",
            limit=views.RECENT_LIMIT,
            updated=views.fragments(data)["updated"],
            stale_after=stale_after,
        )
        return _harden(HTMLResponse(html), nonce)

    async def snapshot_json(self, request: Request, who: Principal) -> Response:
        return _harden(JSONResponse(await self.snapshot()))

    async def events(self, request: Request, who: Principal) -> Response:
        queue = self.feed.subscribe()

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n"
                while True:
                    try:  # asyncio.timeout: wait_for may swallow a cancellation on 3.11
                        async with asyncio.timeout(SSE_KEEPALIVE_SECONDS):
                            snap = await queue.get()
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if snap is None:  # shutting down
                        return
                    yield f"event: snapshot\ndata: {json.dumps(snap)}\n\n"
            finally:
                self.feed.unsubscribe(queue)

        response = StreamingResponse(stream(), media_type="text/event-stream")
        response.headers["X-Accel-Buffering"] = "no"  # no proxy buffering of the stream
        return _harden(response)

    async def metrics(self, request: Request, who: Principal) -> Response:
        async with self.pool.connection() as conn:
            families = await metrics.collect(conn, self.settings)
        body = metrics.render(families)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- actions -----------------------------------------------------------------

    async def mark_stale(self, request: Request, who: Principal) -> Response:
        async with self.pool.connection() as conn:
            rows = await ops.mark_stale(conn, self.settings.stale_after_seconds)
        self._log.bind(action="web_mark_stale", count=len(rows)).info("marked stale")
        jobs = [{"job_id": str(r["job_id"]), "job_type": r["job_type"]} for r in rows]
        return _harden(self._result(request, 200, f"Marked {len(rows)} job(s) stale", jobs=jobs))

    async def dead_letter(self, request: Request, who: Principal) -> Response:
        async with self.pool.connection() as conn:
            rows = await ops.dead_letter(conn)
        self._log.bind(action="web_dead_letter", count=len(rows)).info("moved to dead letter")
        jobs = [{"job_id": str(r["job_id"]), "job_type": r["job_type"]} for r in rows]
        msg = f"Moved {len(rows)} job(s) to the dead letter"
        return _harden(self._result(request, 200, msg, jobs=jobs))

    async def requeue(self, request: Request, who: Principal) -> Response:
        form = await request.form()
        raw_job, raw_id, raw_table = form.get("job"), form.get("id"), form.get("table")
        if isinstance(raw_job, str) and ":" in raw_job:
            raw_table, _, raw_id = raw_job.partition(":")
        if raw_table is not None and raw_table not in ops.TABLES:
            msg = "table must be ai_course_jobs or ai_media_jobs"
            return _harden(self._result(request, 400, msg))
        try:
            job_id = UUID(str(raw_id))
        except ValueError:
            return _harden(self._result(request, 400, "id must be a job UUID"))
        async with self.pool.connection() as conn:
            given = raw_table if isinstance(raw_table, str) else None
            table = await ops.requeue(conn, job_id, given)
        self._log.bind(action="web_requeue", job_id=str(job_id), table=table).info("requeued")
        msg = f"Requeued {job_id} in {table}"
        return _harden(self._result(request, 200, msg, job_id=str(job_id), table=table))

    # -- session ---------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        form = await request.form()
        token, nxt = form.get("token"), _safe_next(form.get("next"))
        client = request.client.host if request.client else "unknown"
        if wait := self.throttle.retry_after(client):
            self._log.bind(action="web_login_throttled").warning("sign-in throttled")
            seconds = max(1, round(wait))
            page = self.login_page(nxt, f"Too many attempts: try again in {seconds} s.", 429)
            page.headers["Retry-After"] = str(seconds)
            return page
        if (
            not same_origin(request)
            or not isinstance(token, str)
            or not self.auth.token_matches(token)
        ):
            self.throttle.failed(client)
            self._log.bind(action="web_login_failed").warning("sign-in refused")
            return self.login_page(nxt, "That token is not right.")
        self.throttle.succeeded(client)
        response = RedirectResponse(nxt, 303)
        self.auth.start_session(request, response)
        self._log.bind(action="web_login").info("signed in")
        return _harden(response)

    async def logout(self, request: Request, who: Principal) -> Response:
        response = RedirectResponse(PAGE, 303)
        self.auth.end_session(response)
        return _harden(response)


async def _to_page(request: Request) -> Response:
    return RedirectResponse(PAGE, 307)


def create_app(settings: Settings, dsn: str, admin_token: str) -> Starlette:
    d = Dashboard(settings, dsn, admin_token)
    routes = [
        Route("/healthz", d.healthz),
        Route("/metrics", d.guarded(d.metrics)),
        Route("/admin", _to_page),
        Route(PAGE, d.guarded(d.jobs_page)),
        Route(f"{PAGE}/snapshot", d.guarded(d.snapshot_json)),
        Route(f"{PAGE}/events", d.guarded(d.events)),
        Route(f"{PAGE}/mark-stale", d.guarded(d.mark_stale), methods=["POST"]),
        Route(f"{PAGE}/dead-letter", d.guarded(d.dead_letter), methods=["POST"]),
        Route(f"{PAGE}/requeue", d.guarded(d.requeue), methods=["POST"]),
        Route("/admin/login", d.login, methods=["POST"]),
        Route("/admin/logout", d.guarded(d.logout), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=d.lifespan)
    app.state.dashboard = d
    return app


async def serve(settings: Settings, host: str = "0.0.0.0", port: int | None = None) -> None:
    """`ai-jobs web` (see server.py); here too for callers that embed the dashboard."""
    from listener.web.server import serve as run

    await run(settings, host=host, port=port)
