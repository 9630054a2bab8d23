"""`ai-jobs web`: checks its settings and the database, then serves the app with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import uvicorn
from loguru import logger

from listener import db, ops, tracing
from listener.errors import AiJobsError, ConfigError
from listener.settings import Settings
from listener.web import api
from listener.web.app import create_app
from listener.web.auth import token_problem
from listener.web.peer import ClientKey

GRACEFUL_SECONDS = 3  # open event streams never end by themselves


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # SIGTERM/SIGINT start uvicorn's graceful shutdown, then the process exits
        # 0 as the worker does (uvicorn would re-raise the signal after shutdown).
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)


async def serve(settings: Settings, host: str = "0.0.0.0", port: int | None = None) -> None:
    token = settings.admin_token.get_secret_value().strip() if settings.admin_token else ""
    if problem := token_problem(token):
        raise ConfigError(problem)
    dsn = db.require_dsn(settings.dsn)
    async with db.connection(dsn, app="ai-jobs web") as conn:
        await ops.queue_depth(conn)  # reachable, and migrated (else: run `ai-jobs migrate`)
        if settings.api_enabled:
            await api.preflight(conn)
    port = port or settings.port
    tracing.setup("ai-jobs web")  # only when OTEL_EXPORTER_OTLP_ENDPOINT is set
    app = create_app(settings, dsn, token)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        proxy_headers=False,  # ClientKey applies them, after noting the connection's address
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
    )
    # uvicorn's proxy headers (https behind the PaaS router: Secure cookies, the
    # right origin), from FORWARDED_ALLOW_IPS as uvicorn reads it.
    config.app = ClientKey(app, config.forwarded_allow_ips)
    server = _Server(config)
    log = logger.bind(action="web", port=port)
    log.bind(action="web_started").info("dashboard on http://{}:{}/admin/jobs", host, port)
    try:
        await server.serve()
    finally:
        tracing.shutdown()
    if not server.started:
        raise AiJobsError(f"The dashboard could not start on {host}:{port}")
    log.bind(action="web_stopped").info("dashboard stopped")
