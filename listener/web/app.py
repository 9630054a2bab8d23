"""The admin dashboard: a small Starlette app, server-rendered.

    GET  /healthz                      for the PaaS (no auth; says only ok / unavailable)
    GET  /metrics                      Prometheus text format
    GET  /admin/jobs[?filters]         alerts, cards, pause toggles, jobs (filters, pages)
    GET  /admin/jobs/rows?filters      one page of the list as a fragment (live filtered view)
    GET  /admin/jobs/snapshot          the page's fragments as JSON (Refresh)
    GET  /admin/jobs/events            server-sent events: a snapshot after each change
    GET  /admin/jobs/{id}              one job in full;  .../result: its image or audio
    GET  /admin/overview[/charts]      charts, cost and workers;  the charts' data
    GET  /admin/static/{file}          the charting library (vendored, served here)
    POST /admin/jobs/mark-stale | dead-letter | requeue | cancel | pause | bulk
    POST /admin/login | logout         browser session
    /v1/jobs/...                       the end-user API (api.py), with a JWT setting only

Everything but /healthz needs the admin token (auth.py); without it a page answers
401 with the sign-in form (saying why: a wrong token, another site, an expired
session), anything else 401 alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
from loguru import logger
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

from listener import dal, db, ops, registry
from listener.errors import AiJobsError, InvalidJob, JobBusy, JobNotFound, translate
from listener.medic import PoolMedic
from listener.settings import Settings
from listener.storage import Storage, open_storage
from listener.web import metrics, views
from listener.web.actions import Actions
from listener.web.api import Api
from listener.web.auth import Auth, Principal, origin_refusal
from listener.web.live import LiveFeed
from listener.web.pages import Pages
from listener.web.peer import throttle_key
from listener.web.responses import PAGE, harden, safe_next, wants_html, wants_json
from listener.web.throttle import Throttle

SSE_KEEPALIVE_SECONDS = 15.0
_STATUS = {JobNotFound: 404, JobBusy: 409, InvalidJob: 400}
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ai-jobs"'}

Handler = Callable[[Request, Principal], Awaitable[Response]]


class Dashboard:
    def __init__(self, settings: Settings, dsn: str, admin_token: str) -> None:
        self.settings = settings
        self.auth = Auth(admin_token)
        self.throttle = Throttle()  # failed sign-ins per client address
        self.pool: db.WorkPool = db.make_pool(
            dsn, 4, app="ai-jobs web", prepare=settings.listen_mode == "listen"
        )
        self.medic = PoolMedic(self.pool)  # dead connections replaced after an outage
        self.alert_cache = views.AlertCache(settings)
        self.feed = LiveFeed(
            dsn,
            self.snapshot,
            notify=self._notify,
            probe_every=settings.listen_probe_seconds,
            listen=settings.listen_mode == "listen",
            on_recovered=self.medic.heal_soon,
            pool=self.pool,
        )
        self._storage: Storage | None = None
        self.log = logger.bind(action="web")

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
            if self._storage is not None:
                await self._storage.aclose()

    @property
    def storage(self) -> Storage:
        """Where the worker stored results (STORAGE_URL), opened on first use."""
        if self._storage is None:
            self._storage = open_storage(self.settings)
        return self._storage

    def guarded(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            who = self.auth.principal(request)
            if who is None:
                return self.unauthorized(request)
            if request.method == "POST":
                refusal = await self.auth.csrf_refusal(request, who)
                if refusal:
                    self.log.bind(action="web_csrf_refused").warning(refusal)
                    return harden(self.result(request, 403, refusal))
            try:
                return await handler(request, who)
            except (psycopg.Error, AiJobsError) as exc:
                err = translate(exc)
                status = _STATUS.get(type(err), 503)
                self.log.bind(action="web_error", path=request.url.path).warning(err.message)
                return harden(self.result(request, status, err.message))

        return endpoint

    def unauthorized(self, request: Request) -> Response:
        problem = self.auth.session_problem(request)
        if (
            request.method == "GET"
            and wants_html(request)
            and request.url.path.startswith("/admin")
        ):
            nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return self.login_page(safe_next(nxt), problem or "")
        body = {"ok": False, "message": problem or "Unauthorized"}
        return harden(JSONResponse(body, 401, headers=_CHALLENGE))

    @staticmethod
    def login_page(nxt: str, error: str = "", status: int = 401) -> Response:
        """The sign-in form, answered with 401: the page stays closed until then."""
        nonce = secrets.token_urlsafe(16)
        html = views.page("login.html", nonce=nonce, next=nxt, error=error)
        return harden(HTMLResponse(html, status, headers=_CHALLENGE), nonce)

    @staticmethod
    def result(
        request: Request, status: int, message: str, back: str = PAGE, **extra: Any
    ) -> Response:
        """An action's answer: JSON for scripts and the page's own fetch; a plain
        form post (no JavaScript) goes back to the page."""
        if wants_json(request) or not wants_html(request):
            return JSONResponse({"ok": status < 400, "message": message, **extra}, status)
        if status >= 400:
            return PlainTextResponse(message, status)
        return RedirectResponse(safe_next(back), 303)

    def html(self, name: str, who: Principal, **context: Any) -> Response:
        nonce = secrets.token_urlsafe(16)
        body = views.page(
            name, nonce=nonce, csrf=who.csrf, signed_in=who.via == "session", **context
        )
        return harden(HTMLResponse(body), nonce)

    async def _notify(self, channel: str, payload: str) -> None:
        """The live feed's probe, sent through the dashboard's pool."""
        async with self.pool.connection(timeout=5) as conn:
            await dal.NOTIFY.run(conn, {"channel": channel, "payload": payload})

    async def snapshot(self) -> dict[str, str]:
        async with self.pool.connection() as conn:
            data = await views.load(conn, self.alert_cache)
        return views.fragments(data)

    # -- plain endpoints -------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """The database answers: 200, with or without workers (their absence is
        the no_worker alert's business, not a reason to restart the dashboard)."""
        try:
            async with self.pool.connection(timeout=3) as conn:
                await dal.KEEPALIVE.run(conn)
                workers = await self._live_workers(conn)
        except (psycopg.Error, AiJobsError):  # the pool's timeout, or the query's
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

    async def snapshot_json(self, request: Request, who: Principal) -> Response:
        return harden(JSONResponse(await self.snapshot()))

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
        return harden(response)

    async def metrics(self, request: Request, who: Principal) -> Response:
        async with self.pool.connection() as conn:
            families = await metrics.collect(conn, self.settings)
        body = metrics.render(families)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- session ---------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        form = await request.form()
        token, nxt = form.get("token"), safe_next(form.get("next"))
        client = throttle_key(request)
        if wait := self.throttle.retry_after(client):
            self.log.bind(action="web_login_throttled").warning("sign-in throttled")
            seconds = max(1, round(wait))
            page = self.login_page(nxt, f"Too many attempts: try again in {seconds} s.", 429)
            page.headers["Retry-After"] = str(seconds)
            return page
        refusal = origin_refusal(request)
        if refusal is None and not (isinstance(token, str) and self.auth.token_matches(token)):
            refusal = "That token is not right."
        if refusal:
            self.throttle.failed(client)
            self.log.bind(action="web_login_failed").warning("sign-in refused: {}", refusal)
            return self.login_page(nxt, refusal)
        self.throttle.succeeded(client)
        response = RedirectResponse(nxt, 303)
        self.auth.start_session(request, response)
        self.log.bind(action="web_login").info("signed in")
        return harden(response)

    async def logout(self, request: Request, who: Principal) -> Response:
        response = RedirectResponse(PAGE, 303)
        self.auth.end_session(response)
        return harden(response)


async def _to_page(request: Request) -> Response:
    return RedirectResponse(PAGE, 307)


def create_app(settings: Settings, dsn: str, admin_token: str) -> Starlette:
    d = Dashboard(settings, dsn, admin_token)
    p, a = Pages(d), Actions(d)
    # The end-user API (api.py), on the same LISTEN connection as the dashboard.
    api = Api(settings, dsn, d.feed, lambda: d.storage) if settings.api_enabled else None
    g = d.guarded
    routes = [
        Route("/healthz", d.healthz),
        Route("/metrics", g(d.metrics)),
        Route("/admin", _to_page),
        Route(PAGE, g(p.jobs)),
        Route(f"{PAGE}/rows", g(p.rows)),
        Route(f"{PAGE}/snapshot", g(d.snapshot_json)),
        Route(f"{PAGE}/events", g(d.events)),
        Route(f"{PAGE}/mark-stale", g(a.mark_stale), methods=["POST"]),
        Route(f"{PAGE}/dead-letter", g(a.dead_letter), methods=["POST"]),
        Route(f"{PAGE}/requeue", g(a.requeue), methods=["POST"]),
        Route(f"{PAGE}/cancel", g(a.cancel), methods=["POST"]),
        Route(f"{PAGE}/pause", g(a.pause), methods=["POST"]),
        Route(f"{PAGE}/bulk", g(a.bulk), methods=["POST"]),
        Route(PAGE + "/{id:uuid}", g(p.job)),
        Route(PAGE + "/{id:uuid}/result", g(p.result)),
        Route("/admin/overview", g(p.overview)),
        Route("/admin/overview/charts", g(p.charts)),
        Route("/admin/static/{name}", g(p.static)),
        Route("/admin/login", d.login, methods=["POST"]),
        Route("/admin/logout", g(d.logout), methods=["POST"]),
        *(api.routes() if api else []),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with d.lifespan(app):
            if api is None:
                yield
                return
            await api.start()
            try:
                yield
            finally:
                await api.stop()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.dashboard = d
    app.state.api = api
    return app
