"""The end-user API under test: tokens signed as an app's auth would sign them,
the app served by uvicorn on a real port (event streams need a real server:
httpx's ASGI transport buffers a response whole), and an SSE reader."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import uvicorn

from listener.settings import Settings
from listener.web.app import create_app
from tests.helpers import await_until, free_port

SECRET = "test-jwt-secret-0123456789-abcdefghijklmnop-0123456789-abcdefghij"
ADMIN = "test-admin-token-ABC-0123456789-xyz"
ALICE = uuid.UUID("00000000-0000-4000-8000-00000000a11c")
BOB = uuid.UUID("00000000-0000-4000-8000-000000000b0b")


def claims(user: uuid.UUID | str, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {
        "sub": str(user),
        "aud": "authenticated",
        "role": "authenticated",
        "iat": now,
        "exp": now + 3600,
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def token(user: uuid.UUID | str, key: Any = SECRET, alg: str = "HS256", **over: Any) -> str:
    headers = over.pop("headers", None)
    return jwt.encode(claims(user, **over), key, algorithm=alg, headers=headers)


def bearer(user: uuid.UUID | str, **over: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, **over)}"}


@dataclass
class Served:
    url: str
    app: Any

    @property
    def api(self) -> Any:
        return self.app.state.api


@asynccontextmanager
async def serve(db_url: str, **settings: Any) -> AsyncIterator[Served]:
    settings.setdefault("jwt_secret", SECRET)
    app = create_app(Settings(**settings), db_url, ADMIN)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    await await_until(started, what="uvicorn started")
    try:
        yield Served(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@dataclass
class Sse:
    """One event stream, read as a browser's EventSource reads it."""

    status: int
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    comments: list[str] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    body: str = ""

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        return await asyncio.wait_for(self.events.get(), timeout)


async def read_sse(response: httpx.Response, sse: Sse) -> None:
    event: dict[str, Any] = {}
    try:
        async for line in response.aiter_lines():
            if line.startswith(":"):
                sse.comments.append(line[1:].strip())
            elif line == "":
                if "data" in event:
                    event["job"] = json.loads(event["data"])
                    await sse.events.put(event)
                event = {}
            else:
                name, _, value = line.partition(": ")
                event[name] = value
    finally:
        sse.ended.set()


@asynccontextmanager
async def open_sse(
    client: httpx.AsyncClient, path: str, headers: dict[str, str]
) -> AsyncIterator[Sse]:
    async with client.stream("GET", path, headers=headers) as response:
        sse = Sse(response.status_code)
        if response.status_code != 200:
            sse.body = (await response.aread()).decode()
            yield sse
            return
        reader = asyncio.create_task(read_sse(response, sse))
        try:
            yield sse
        finally:
            reader.cancel()
            with suppress(asyncio.CancelledError, httpx.HTTPError):
                await reader
