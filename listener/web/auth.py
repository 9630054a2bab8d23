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

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
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
            # `Bearer <token>`, one space: blanks around the token make another value.
            return Principal("bearer", "") if self.token_matches(credentials) else None
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return None
        try:
            data: Any = self._signer.loads(cookie, max_age=SESSION_MAX_AGE)
        except BadSignature:  # also expired (SignatureExpired is a subclass)
            return None
        csrf = data.get("csrf") if isinstance(data, dict) else None
        return Principal("session", csrf) if isinstance(csrf, str) and csrf else None

    def session_problem(self, request: Request) -> str | None:
        """Why a request's session cookie is not accepted, for the sign-in page
        (None: there is no cookie, or it is fine)."""
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return None
        try:
            self._signer.loads(cookie, max_age=SESSION_MAX_AGE)
        except SignatureExpired:
            return "Your session expired: sign in again."
        except BadSignature:
            return "Your session is no longer valid (the token was changed?): sign in again."
        return None

    def start_session(self, request: Request, response: Response) -> None:
        value = self._signer.dumps({"csrf": secrets.token_urlsafe(32)})
        response.set_cookie(
            COOKIE,
            value,
            max_age=SESSION_MAX_AGE,
            path="/",
            httponly=True,
            samesite="strict",
            secure=served_over_https(request),
        )

    @staticmethod
    def end_session(response: Response) -> None:
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")

    @staticmethod
    async def csrf_refusal(request: Request, who: Principal) -> str | None:
        """Why a state-changing request is refused (None: it may go ahead). A
        browser session needs the same origin and the session's CSRF token; Bearer
        requests pass."""
        if who.via == "bearer":
            return None
        origin_problem = origin_refusal(request)
        if origin_problem:
            return origin_problem
        sent = request.headers.get(CSRF_HEADER)
        if sent is None:
            form = await request.form()
            field = form.get(CSRF_FIELD)
            sent = field if isinstance(field, str) else None
        if sent is None or not hmac.compare_digest(sent.encode(), who.csrf.encode()):
            return "Cross-site request refused: the form's CSRF token is missing or stale"
        return None


_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _netloc(scheme: str, netloc: str) -> str:
    host, sep, port = netloc.lower().rpartition(":")
    if sep and not host.endswith("]") and port == _DEFAULT_PORTS.get(scheme):
        return host  # https://app:443 is https://app
    return netloc.lower()


def served_over_https(request: Request) -> bool:
    """https as the browser sees it. Behind a PaaS router (Heroku, Render, Fly)
    TLS ends at the router, which forwards plain HTTP with X-Forwarded-Proto:
    https; uvicorn honours that header only from FORWARDED_ALLOW_IPS (default
    127.0.0.1), and the router's address is not known in advance. The header is
    only used to mark the cookie Secure and to accept an https Origin, which a
    forged header cannot turn into a cross-site request."""
    if request.url.scheme == "https":
        return True
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return forwarded == "https"


def origin_refusal(request: Request) -> str | None:
    """Why the request does not come from this site (None: it does). Origin (or,
    failing that, Referer) must name this host: the Host header, or the router's
    X-Forwarded-Host, which a browser never lets another site set. Its scheme
    must be this request's, or https where TLS ended before us (a browser on
    https posting through the router), and then never http. A request with
    neither header is refused when Sec-Fetch-Site says it is cross-site."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if source == "null":  # sandboxed frames, privacy-sensitive redirects
        return "Cross-site request refused: the browser sent Origin: null"
    if not source:
        if request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none"):
            return None
        return "Cross-site request refused: Sec-Fetch-Site says another site sent it"
    parts = urlsplit(source)
    schemes = {"https"} if served_over_https(request) else {request.url.scheme}
    hosts = {_netloc(s, n) for s in schemes for n in _hosts(request)}
    if parts.scheme in schemes and _netloc(parts.scheme, parts.netloc) in hosts:
        return None
    here = " or ".join(sorted(f"{s}://{h}" for s in schemes for h in _hosts(request)))
    return f"Cross-site request refused: it came from {parts.scheme}://{parts.netloc}, not {here}"


def _hosts(request: Request) -> list[str]:
    hosts = [request.headers.get("host") or request.url.netloc]
    forwarded = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
    if forwarded:
        hosts.append(forwarded)
    return hosts


def same_origin(request: Request) -> bool:
    return origin_refusal(request) is None
