"""The end-user API's sign-in: a JWT from the app's own auth (Supabase's or any
issuer's), checked with PyJWT.

    HS256 with JWT_SECRET (Supabase's legacy JWT secret), or RS/PS/ES/EdDSA with a
    key from JWT_JWKS_URL (Supabase's signing keys), chosen by the token's `alg`;
    `alg: none`, HS256 without a secret and any algorithm but the key's are
    refused before any signature is looked at (no key confusion: a public key is
    never taken for an HMAC secret). `exp`, `sub` (a user id) and `aud`
    (JWT_AUDIENCE) are required.

The claims go to the database as they are, but for `role`: the API's SQL always
runs as `authenticated`, so the claims say so too (a policy that reads
auth.role() sees the role the statement really has).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import httpx
import jwt
from loguru import logger

MAX_TOKEN = 8192  # characters: far more than any real token, far less than a flood
LEEWAY_SECONDS = 30  # clock skew between the issuer and us (PostgREST allows as much)
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
JWKS_TTL_SECONDS = 600.0  # keys are fetched again after this long
JWKS_MIN_REFRESH_SECONDS = 30.0  # an unknown kid fetches again at most this often
JWKS_TIMEOUT_SECONDS = 5.0
JWKS_MAX_BYTES = 256 * 1024


class TokenRefused(Exception):
    """The reason a token is refused, fit to show its sender (never the token)."""


@dataclass(frozen=True)
class User:
    id: UUID
    claims: str  # the JSON for request.jwt.claims
    expires_at: float  # the token's exp (epoch seconds)

    @property
    def key(self) -> tuple[UUID, str]:
        """Streams that read as one token share their reads."""
        return self.id, self.claims


@dataclass
class _KeySet:
    keys: dict[str | None, jwt.PyJWK] = field(default_factory=dict)
    fetched_at: float = -1e18  # monotonic time of the last fetch (never: long ago)


class JwksKeys:
    """The signing keys at JWT_JWKS_URL, cached; fetched again when stale or, at
    most every JWKS_MIN_REFRESH_SECONDS, for a kid it does not know (a key
    rotation), so that tokens with made-up kids cannot make us hammer the URL."""

    def __init__(self, url: str, client: httpx.AsyncClient | None = None) -> None:
        self.url = url
        self._client = client or httpx.AsyncClient(
            timeout=JWKS_TIMEOUT_SECONDS, follow_redirects=False, trust_env=False
        )
        self._set = _KeySet()
        self._lock = asyncio.Lock()
        self._log = logger.bind(action="api_jwks")

    async def aclose(self) -> None:
        await self._client.aclose()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        if self._due(kid):
            async with self._lock:  # one fetch at a time; the others use its result
                if self._due(kid):
                    await self._fetch()
        found = self._lookup(kid)
        if found is None:
            raise TokenRefused("token signed with an unknown key")
        return found

    def _due(self, kid: str | None) -> bool:
        """Time to fetch: the keys are old, or the kid is new and the last fetch
        was not just now."""
        if self._older(JWKS_TTL_SECONDS):
            return True
        return self._lookup(kid) is None and self._older(JWKS_MIN_REFRESH_SECONDS)

    def _older(self, seconds: float) -> bool:
        return time.monotonic() - self._set.fetched_at >= seconds

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        keys = self._set.keys
        if kid is None and len(keys) == 1:
            return next(iter(keys.values()))
        return keys.get(kid)

    async def _fetch(self) -> None:
        self._set.fetched_at = time.monotonic()  # a failure waits like a success
        try:
            async with self._client.stream("GET", self.url) as resp:
                resp.raise_for_status()
                body = b""
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > JWKS_MAX_BYTES:
                        raise ValueError(f"over {JWKS_MAX_BYTES} bytes")
            data = json.loads(body)
            keys = data.get("keys") if isinstance(data, dict) else None
            if not isinstance(keys, list):
                raise ValueError("no keys array")
        except (httpx.HTTPError, ValueError, RecursionError) as exc:
            # Keep the keys we had: an outage of the issuer signs nobody out.
            self._log.warning("could not fetch the signing keys ({})", str(exc)[:200])
            return
        parsed: dict[str | None, jwt.PyJWK] = {}
        for raw in keys:
            if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
                continue
            if raw.get("kty") == "oct":
                continue  # a published symmetric key would sign for anyone
            try:
                k = jwt.PyJWK(raw)
            except jwt.PyJWTError:
                continue
            if k.algorithm_name in ASYMMETRIC:
                parsed[raw.get("kid") if isinstance(raw.get("kid"), str) else None] = k
        if not parsed:  # a broken publication, not a revocation of every key
            self._log.warning("the JWKS URL lists no usable signing key: keeping the last ones")
            return
        self._set.keys = parsed
        self._log.info("{} signing key(s) from the JWKS URL", len(parsed))


class Verifier:
    def __init__(
        self,
        secret: str | None,
        jwks_url: str | None,
        audience: str,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.secret = secret
        self.audience = audience
        self.jwks = JwksKeys(jwks_url, client) if jwks_url else None

    async def aclose(self) -> None:
        if self.jwks is not None:
            await self.jwks.aclose()

    async def user(self, authorization: str | None) -> User:
        """The user an `Authorization: Bearer <JWT>` header signs in, or TokenRefused."""
        if not authorization:
            raise TokenRefused("sign in: Authorization: Bearer <token> is missing")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token or " " in token:
            raise TokenRefused("the Authorization header is not Bearer <token>")
        if len(token) > MAX_TOKEN:
            raise TokenRefused("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefused("malformed token") from None
        alg, kid = header.get("alg"), header.get("kid")
        key: Any
        if alg == "HS256" and self.secret is not None:
            key = self.secret
        elif isinstance(alg, str) and alg in ASYMMETRIC and self.jwks is not None:
            jwk = await self.jwks.key(kid if isinstance(kid, str) else None)
            if jwk.algorithm_name != alg:
                raise TokenRefused(f"token algorithm {alg} is not its key's")
            key = jwk.key
        else:
            raise TokenRefused(f"token algorithm {str(alg)[:20]!r} is not accepted")
        claims = self._decode(token, key, alg)
        try:
            user = UUID(str(claims["sub"]))
        except ValueError:
            raise TokenRefused("token sub is not a user id") from None
        claims["role"] = "authenticated"
        return User(user, json.dumps(claims, separators=(",", ":")), float(claims["exp"]))

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRefused("token expired") from None
        except jwt.InvalidAudienceError:
            raise TokenRefused("token audience is not accepted") from None
        except jwt.InvalidSignatureError:
            raise TokenRefused("token signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRefused(f"token has no {exc.claim}") from None
        except jwt.PyJWTError:
            raise TokenRefused("invalid token") from None
        if not isinstance(claims.get("exp"), int | float) or isinstance(claims["exp"], bool):
            raise TokenRefused("token exp is not a time")
        return claims
