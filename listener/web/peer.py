"""The client a request comes from, as the sign-in throttle counts it.

Behind a router, every request comes from the router's address and says who sent
it in X-Forwarded-For, where the router appends the address it saw to whatever
the client wrote. uvicorn's proxy headers (FORWARDED_ALLOW_IPS) give the app the
client address it logs; with `*` (only the router reaches the app) that is the
header's first entry, which the client chooses: a guesser would get a fresh
throttle at every try. The throttle keys on what nobody can write for the
client instead: the connection's own address, or, when that is a trusted
forwarder, the last entry of X-Forwarded-For (the one the forwarder appended).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

SCOPE_KEY = "ai_jobs.client_key"
MAX_KEY = 100  # an address, not an essay: the throttle keeps 10,000 of them


class ClientKey:
    """ASGI: uvicorn's proxy headers, with the throttle's key of the connection
    recorded first (serve() runs the app behind this, proxy_headers off)."""

    def __init__(self, app: Any, trusted_hosts: list[str] | str) -> None:
        self.proxy = ProxyHeadersMiddleware(app, trusted_hosts=trusted_hosts)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope[SCOPE_KEY] = key_of(scope, self.proxy.trusted_hosts)
        await self.proxy(scope, receive, send)


def key_of(scope: Any, trusted: Any) -> str:
    client = scope.get("client")
    peer = str(client[0]) if client else "unknown"
    if client is None or peer not in trusted:
        return peer[:MAX_KEY]
    values = [v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-forwarded-for"]
    entries = [e.strip() for e in ",".join(values).split(",") if e.strip()]
    return (entries[-1] if entries else peer)[:MAX_KEY]


def throttle_key(request: Request) -> str:
    """The key ClientKey recorded; without it (the app served some other way),
    the client address the server gives."""
    key = request.scope.get(SCOPE_KEY)
    if isinstance(key, str):
        return key
    return request.client.host if request.client else "unknown"
