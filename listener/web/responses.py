"""What every dashboard response shares: its security headers, the pages a
redirect may lead to, and what a request asks for (JSON or HTML)."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

PAGE = "/admin/jobs"
# Where a sign-in or a plain form post may lead: our own pages only.
_OWN_PAGE = re.compile(
    r"^/admin/(jobs(/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})?|overview)"
    r"(\?[A-Za-z0-9_=&%.~+:-]*)?$"
)


def harden(response: Response, nonce: str | None = None) -> Response:
    """Headers for every dashboard response: no caching, no framing, no outside
    resources; inline style and script only with this response's nonce; images,
    audio, scripts and styles from this site only."""
    src = f"'nonce-{nonce}'" if nonce else "'none'"
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src {src}; script-src {src}; connect-src 'self'; "
        "img-src 'self' data:; media-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'"
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def safe_next(value: Any) -> str:
    """Only our own pages, never an open redirect."""
    return value if isinstance(value, str) and _OWN_PAGE.match(value) else PAGE
