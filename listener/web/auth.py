"""Who may see the dashboard: `Authorization: Bearer <ADMIN_TOKEN>`, or a browser
session made by signing in once with the token.

The session is a signed, HttpOnly, SameSite=Strict cookie. Its key is derived from
ADMIN_TOKEN, so changing the token signs everybody out. It carries a random CSRF
token that every cookie-authenticated POST must echo (form field or header); those
POSTs must also come from our own origin. Bearer requests need neither: a browser
never attaches that header to a cross-site request by itself.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

COOKIE = "ai_jobs_session"
SESSION_MAX_AGE = 12 * 3600
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"


@dataclass(frozen=True)
class Principal:
    via: str  # "bearer" or "session"
    csrf: str  # "" for bearer requests


# A token anyone can type is a token anyone can guess: 32 characters, e.g.
# `openssl rand -hex 32` or `python -c "import secrets; print(secrets.token_urlsafe(32))"`.
MIN_TOKEN_LENGTH = 32


def token_problem(admin_token: str) -> str | None:
    """Why the dashboard must not start with this token (None: it may)."""
    if not admin_token:
        return "ADMIN_TOKEN is not set: the dashboard refuses to start without it"
    if len(admin_token) < MIN_TOKEN_LENGTH:
        return (
            f"ADMIN_TOKEN is too short ({len(admin_token)} characters, at least "
            f"{MIN_TOKEN_LENGTH}): the dashboard refuses to start; make one with "
            "`openssl rand -hex 32`"
        )
    return None


class Auth:
    def __init__(self, admin_token: str) -> None:
        if problem := token_problem(admin_token):
            raise ValueError(problem)
        self._token = admin_token.encode()
        key = hmac.new(self._token, b"ai-jobs dashboard session", hashlib.sha256).hexdigest()
        self._signer = URLSafeTimedSerializer(key, salt="ai-jobs-session")

    def token_matches(self, candidate: str) -> bool:
        """The whole token, compared in constant time whatever the lengths (of
        digests: a prefix, or the token with more after it, is another digest)."""
        return hmac.compare_digest(
            hashlib.sha256(candidate.encode()).digest(), hashlib.sha256(self._token).digest()
        )

    def principal(self, request: Request) -> Principal | None:
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials:
            return Principal("bearer", "") if self.token_matches(credentials.strip()) else None
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return None
        try:
            data: Any = self._signer.loads(cookie, max_age=SESSION_MAX_AGE)
        except BadSignature:  # also expired (SignatureExpired is a subclass)
            return None
        csrf = data.get("csrf") if isinstance(data, dict) else None
        return Principal("session", csrf) if isinstance(csrf, str) and csrf else None

    def start_session(self, request: Request, response: Response) -> None:
        value = self._signer.dumps({"csrf": secrets.token_urlsafe(32)})
        response.set_cookie(
            COOKIE,
            value,
            max_age=SESSION_MAX_AGE,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    @staticmethod
    def end_session(response: Response) -> None:
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")

    @staticmethod
    async def csrf_ok(request: Request, who: Principal) -> bool:
        """A state-changing request from a browser session: same origin and the
        session's CSRF token. Bearer requests pass."""
        if who.via == "bearer":
            return True
        if not same_origin(request):
            return False
        sent = request.headers.get(CSRF_HEADER)
        if sent is None:
            form = await request.form()
            field = form.get(CSRF_FIELD)
            sent = field if isinstance(field, str) else None
        return sent is not None and hmac.compare_digest(sent.encode(), who.csrf.encode())


def same_origin(request: Request) -> bool:
    """Origin (or, failing that, Referer) must name this host. Browsers send Origin
    on every POST; a request with neither is refused when Sec-Fetch-Site says it is
    cross-site."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if source == "null":  # sandboxed frames, privacy-sensitive redirects
        return False
    if not source:
        return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
    parts = urlsplit(source)
    return parts.scheme == request.url.scheme and parts.netloc == request.url.netloc
