"""The end-user API against hostile clients: tokens forged, expired, unsigned,
for another user or another audience, a forged role, keys from a JWKS server
that rotates, bodies with the worker's columns, huge or malformed bodies, a
trace_parent that is not W3C's, a flood of event streams (per user and per
process, and 10,000 connections against the real `ai-jobs web`), and the API
absent (404) without a JWT setting."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from listener.settings import Settings
from listener.web import tokens
from listener.web.app import create_app
from tests.apitools import (
    ADMIN,
    ALICE,
    BOB,
    SECRET,
    bearer,
    claims,
    open_sse,
    serve,
    token,
)
from tests.helpers import AI_JOBS, aconnect, await_until, connect, env, free_port

COURSE = "/v1/jobs/course"


async def sql(db_url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    async with await aconnect(db_url) as c:
        cur = await c.execute(query, list(args))
        return await cur.fetchall() if cur.description else []


async def all_jobs(db_url: str) -> list[dict[str, Any]]:
    return await sql(db_url, "select id from ai_course_jobs union all select id from ai_media_jobs")


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(db_url) as served, httpx.AsyncClient(base_url=served.url, timeout=10) as c:
        c.served = served  # type: ignore[attr-defined]
        yield c


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def hmac_signed(key: bytes, kid: str) -> str:
    """HS256 by hand, with any bytes as the key (PyJWT itself refuses a PEM)."""
    signing = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{b64(claims(ALICE))}"
    mac = hmac.new(key, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def unsigned(alg: str = "none") -> str:
    return f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims(ALICE))}."


# -- tokens ---------------------------------------------------------------------

REFUSED = {
    "no header": ({}, "missing"),
    "not bearer": ({"Authorization": f"Basic {token(ALICE)}"}, "not Bearer"),
    "empty bearer": ({"Authorization": "Bearer"}, "not Bearer"),
    "two tokens": ({"Authorization": f"Bearer {token(ALICE)} {token(ALICE)}"}, "not Bearer"),
    "garbage": ({"Authorization": "Bearer not.a.jwt"}, "malformed"),
    "alg none": ({"Authorization": f"Bearer {unsigned()}"}, "not accepted"),
    "alg None": ({"Authorization": f"Bearer {unsigned('None')}"}, "not accepted"),
    "alg HS256 unsigned": ({"Authorization": f"Bearer {unsigned('HS256')}"}, "signature"),
    "expired": (bearer(ALICE, exp=int(time.time()) - 120), "expired"),
    "another key": (
        bearer(ALICE, key="another-secret-of-at-least-32-characters!"),
        "signature",
    ),
    "HS512 with the secret": (bearer(ALICE, alg="HS512"), "not accepted"),
    "wrong aud": (bearer(ALICE, aud="anon"), "audience"),
    "no aud": (bearer(ALICE, aud=None), "no aud"),
    "no exp": (bearer(ALICE, exp=None), "no exp"),
    "no sub": (bearer(ALICE, sub=None), "no sub"),
    "sub not a user": (bearer("service_role"), "not a user id"),
    "not yet valid": (bearer(ALICE, nbf=int(time.time()) + 600), "invalid token"),
    "too long": ({"Authorization": "Bearer " + "a" * 9000}, "too long"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_a_refused_token_is_a_401_and_touches_nothing(
    client: httpx.AsyncClient, db_url: str, case: str
) -> None:
    headers, reason = REFUSED[case]
    for method, path, body in (
        ("POST", COURSE, {"subject": "Algebra"}),
        ("GET", f"/v1/jobs/{uuid.uuid4()}", None),
        ("GET", f"/v1/jobs/{uuid.uuid4()}/events", None),
        ("POST", f"/v1/jobs/{uuid.uuid4()}/cancel", None),
    ):
        r = await client.request(method, path, headers=headers, json=body)
        assert r.status_code == 401, (case, path, r.text)
        assert reason in r.json()["error"], r.json()
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "eyJ" not in r.text  # never the token back
    assert await all_jobs(db_url) == []


async def test_an_audience_list_naming_ours_is_accepted(client: httpx.AsyncClient) -> None:
    r = await client.post(
        COURSE, headers=bearer(ALICE, aud=["other", "authenticated"]), json={"subject": "A"}
    )
    assert r.status_code == 201


async def test_a_token_for_another_user_reaches_only_that_users_jobs(
    client: httpx.AsyncClient, db_url: str
) -> None:
    r = await client.post(COURSE, headers=bearer(ALICE), json={"subject": "Algebra"})
    jid = r.json()["id"]
    for path, method in (
        (f"/v1/jobs/{jid}", "GET"),
        (f"/v1/jobs/{jid}/result", "GET"),
        (f"/v1/jobs/{jid}/events", "GET"),
        (f"/v1/jobs/{jid}/cancel", "POST"),
    ):
        r = await client.request(method, path, headers=bearer(BOB))
        assert r.status_code == 404, (path, r.text)
    (row,) = await sql(db_url, "select status from ai_course_jobs where id = %s", jid)
    assert row["status"] == "pending"
    assert client.served.api.hub.open_streams == 0  # type: ignore[attr-defined]


async def test_a_forged_role_claim_gives_no_role(client: httpx.AsyncClient, db_url: str) -> None:
    """service_role in a user's claims: the SQL still runs as authenticated (were it
    service_role, row-level security would not hide Alice's job from Bob)."""
    r = await client.post(COURSE, headers=bearer(ALICE), json={"subject": "Algebra"})
    jid = r.json()["id"]
    forged = bearer(BOB, role="service_role")
    assert (await client.get(f"/v1/jobs/{jid}", headers=forged)).status_code == 404
    assert (await client.post(f"/v1/jobs/{jid}/cancel", headers=forged)).status_code == 404
    r = await client.post(COURSE, headers=forged, json={"subject": "Mine"})
    (row,) = await sql(
        db_url, "select created_by from ai_course_jobs where id = %s", r.json()["id"]
    )
    assert row["created_by"] == BOB
    # the service key itself (role service_role, no sub) signs nobody in
    r = await client.post(COURSE, headers=bearer(BOB, sub=None, role="service_role"), json={})
    assert r.status_code == 401


# -- bodies ---------------------------------------------------------------------

LIFECYCLE = {
    "id": str(uuid.uuid4()),
    "status": "done",
    "retry_count": 0,
    "max_retries": 100,
    "result_path": "courses/algebra/course.json",
    "progress": {"percent": 100},
    "partial_result": {"title": "x"},
    "created_by": str(BOB),
    "claim_token": str(uuid.uuid4()),
    "worker_id": "evil",
    "error": "x",
    "metrics": {},
    "created_at": "2000-01-01T00:00:00Z",
}


@pytest.mark.parametrize("column", sorted(LIFECYCLE))
async def test_a_body_with_a_lifecycle_column_is_refused(
    client: httpx.AsyncClient, db_url: str, column: str
) -> None:
    for path, body in (
        (COURSE, {"subject": "Algebra"}),
        ("/v1/jobs/media", {"prompt": "a cat", "media_type": "image"}),
    ):
        r = await client.post(path, headers=bearer(ALICE), json={**body, column: LIFECYCLE[column]})
        assert r.status_code == 400 and column in r.json()["error"], r.text
    assert await all_jobs(db_url) == []


async def test_huge_malformed_and_odd_bodies(client: httpx.AsyncClient, db_url: str) -> None:
    headers = {**bearer(ALICE), "Content-Type": "application/json"}
    # declared too large: refused before reading (the 100 MB never sent)
    host, port = client.base_url.host, client.base_url.port
    reader, writer = await asyncio.open_connection(host, port)
    auth = headers["Authorization"]
    writer.write(
        f"POST {COURSE} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {10**8}\r\n\r\n{{".encode()
    )
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 413")
    writer.close()
    # streamed without a length: refused once past the cap, the rest unread

    async def endless() -> AsyncIterator[bytes]:
        yield b'{"subject": "'
        for _ in range(200):
            yield b"x" * 65536

    r = await client.post(COURSE, headers=headers, content=endless())
    assert r.status_code == 413 and "over 65536 bytes" in r.json()["error"]
    for body, reason in (
        (b'{"subject": ', "not JSON"),
        (b"[" * 60_000, "not JSON"),  # past the parser's depth, within the size
        (b'{"subject": "x", "params": {"groupCount": NaN}}', "not JSON"),
        (b'{"subject": "x"} trailing', "not JSON"),
        ('{"subject": "\udcff"}'.encode("utf-8", "surrogatepass"), "not JSON"),
        (b'{"subject": "\\udcff"}', "not JSON"),
        (b'{"subject": "a\\u0000b"}', "NUL"),
        (b'{"subject": "a", "params": {"audience": "\\u0000"}}', "NUL"),
        (b'{"subject": "a", "params": {"\\u0000": 1}}', "NUL"),
        (b'"a string"', "JSON object"),
        (b"null", "JSON object"),
    ):
        r = await client.post(COURSE, headers=headers, content=body)
        assert r.status_code == 400 and reason in r.json()["error"], (body[:40], r.text)
    # params nested past the database's depth limit: the database's refusal
    deep: Any = 1
    for _ in range(30):
        deep = {"a": deep}
    r = await client.post(
        COURSE, headers=headers, json={"subject": "x", "params": {"audience": deep}}
    )
    assert r.status_code == 400
    assert await all_jobs(db_url) == []


@pytest.mark.parametrize(
    "trace",
    [
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "",
        "x" * 10_000,
    ],
)
async def test_a_trace_parent_that_is_not_w3c_is_refused(
    client: httpx.AsyncClient, db_url: str, trace: str
) -> None:
    r = await client.post(
        COURSE, headers=bearer(ALICE), json={"subject": "Algebra", "trace_parent": trace}
    )
    assert r.status_code == 400 and "trace_parent" in r.json()["error"]
    assert await all_jobs(db_url) == []


# -- event streams: caps -----------------------------------------------------------


async def test_streams_are_capped_per_user_and_per_process(db_url: str) -> None:
    async with (
        serve(db_url, api_streams_per_user=2, api_streams_per_process=3) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as client,
    ):
        ids = {}
        for who in (ALICE, BOB):
            r = await client.post(COURSE, headers=bearer(who), json={"subject": "Algebra"})
            ids[who] = r.json()["id"]

        def path(who: uuid.UUID) -> str:
            return f"/v1/jobs/{ids[who]}/events"

        async with open_sse(client, path(ALICE), bearer(ALICE)) as a1:
            async with open_sse(client, path(ALICE), bearer(ALICE)) as a2:
                assert a1.status == a2.status == 200
                async with open_sse(client, path(ALICE), bearer(ALICE)) as a3:
                    assert a3.status == 429 and "for this user (2)" in a3.body
                async with open_sse(client, path(BOB), bearer(BOB)) as b1:
                    assert b1.status == 200
                    async with open_sse(client, path(BOB), bearer(BOB)) as b2:
                        assert b2.status == 429 and "on this server (3)" in b2.body
                    # the streams held still hear their jobs
                    await b1.next()
                    await sql(db_url, "select cancel_job(%s, 'ai_course_jobs')", ids[BOB])
                    assert (await b1.next())["job"]["status"] == "cancelled"
            # a closed stream gives its slot back
            await await_until(lambda: _true(served.api.hub.open_streams == 1))
            async with open_sse(client, path(ALICE), bearer(ALICE)) as again:
                assert again.status == 200
        await await_until(lambda: _true(served.api.hub.open_streams == 0))


async def _true(value: bool) -> bool:
    return value


# -- the API is off without a JWT setting ------------------------------------------------


async def test_every_v1_path_is_404_without_a_jwt_setting(db_url: str) -> None:
    app = create_app(Settings(), db_url, ADMIN)
    assert app.state.api is None
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        jid = uuid.uuid4()
        for method, path in (
            ("POST", COURSE),
            ("POST", "/v1/jobs/media"),
            ("GET", f"/v1/jobs/{jid}"),
            ("GET", f"/v1/jobs/{jid}/events"),
            ("GET", f"/v1/jobs/{jid}/result"),
            ("POST", f"/v1/jobs/{jid}/cancel"),
            ("GET", "/v1/"),
            ("DELETE", f"/v1/jobs/{jid}"),
        ):
            r = await client.request(method, path, headers=bearer(ALICE), json={"subject": "x"})
            assert r.status_code == 404, (method, path)
    assert await all_jobs(db_url) == []


# -- JWKS ------------------------------------------------------------------------------


class Jwks:
    """A JWKS endpoint on this machine, as an issuer publishes its keys."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.down = False

    async def endpoint(self, request: Request) -> JSONResponse:
        self.fetches += 1
        if self.down:
            return JSONResponse({"message": "unavailable"}, 503)
        return JSONResponse({"keys": self.keys})


def public_jwk(private: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    algo = (
        jwt.algorithms.ECAlgorithm
        if isinstance(private, ec.EllipticCurvePrivateKey)
        else (jwt.algorithms.RSAAlgorithm)
    )
    data: dict[str, Any] = json.loads(algo.to_jwk(private.public_key()))
    data.update({"kid": kid, "use": "sig"})
    if alg:
        data["alg"] = alg
    return data


@asynccontextmanager
async def jwks_server(jwks: Jwks) -> AsyncIterator[str]:
    app = Starlette(routes=[Route("/.well-known/jwks.json", jwks.endpoint)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    await await_until(lambda: _true(server.started))
    try:
        yield f"http://127.0.0.1:{port}/.well-known/jwks.json"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_keys_from_a_jwks_url(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "JWKS_MIN_REFRESH_SECONDS", 0.5)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = Jwks()
    jwks.keys = [public_jwk(ec_key, "ec1"), public_jwk(rsa_key, "rsa1", "RS256")]
    # a symmetric key published by mistake must sign nothing
    jwks.keys.append({"kty": "oct", "kid": "oct1", "k": b64({"x": 1}), "alg": "HS256"})
    async with (
        jwks_server(jwks) as url,
        serve(db_url, jwt_secret=None, jwt_jwks_url=url) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as client,
    ):

        async def ask(tok: str) -> httpx.Response:
            return await client.post(
                COURSE, headers={"Authorization": f"Bearer {tok}"}, json={"subject": "Algebra"}
            )

        ok = await ask(token(ALICE, ec_key, "ES256", headers={"kid": "ec1"}))
        assert ok.status_code == 201, ok.text
        assert (await ask(token(BOB, rsa_key, "RS256", headers={"kid": "rsa1"}))).status_code == 201
        fetched = jwks.fetches
        assert fetched == 1  # cached
        refusals = {
            # the key's algorithm, not the token's choice
            "alg": token(ALICE, rsa_key, "PS256", headers={"kid": "rsa1"}),
            # key confusion: the public key as an HMAC secret
            "hs": hmac_signed(
                rsa_key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
                kid="rsa1",
            ),
            "oct": token(ALICE, "any-secret-at-all-0123456789-0123456789", headers={"kid": "oct1"}),
            "unknown kid": token(ALICE, ec_key, "ES256", headers={"kid": "nope"}),
            "right kid, other key": token(
                ALICE, ec.generate_private_key(ec.SECP256R1()), "ES256", headers={"kid": "ec1"}
            ),
        }
        for case, tok in refusals.items():
            r = await ask(tok)
            assert r.status_code == 401, (case, r.text)
        # made-up kids do not make the server hammer the issuer
        for _ in range(30):
            await ask(token(ALICE, ec_key, "ES256", headers={"kid": str(uuid.uuid4())}))
        assert jwks.fetches <= fetched + 2
        # a rotation: a new key is picked up once the refresh interval has passed
        new = ec.generate_private_key(ec.SECP256R1())
        jwks.keys.append(public_jwk(new, "ec2"))
        await asyncio.sleep(0.6)
        assert (await ask(token(ALICE, new, "ES256", headers={"kid": "ec2"}))).status_code == 201
        # the issuer down: the keys known stay valid
        jwks.keys = []
        await asyncio.sleep(0.6)
        assert (await ask(token(BOB, new, "ES256", headers={"kid": "nope2"}))).status_code == 401
        assert (await ask(token(BOB, ec_key, "ES256", headers={"kid": "ec1"}))).status_code == 201


# -- the real `ai-jobs web`: settings, and 10,000 streams from one client ----------------------


@pytest.fixture
def web_process(db_url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    # Its output to a file: a pipe nobody reads would block the process once full.
    log = (tmp_path / "web.log").open("w")
    proc = subprocess.Popen(
        [*AI_JOBS, "web"],
        env=env(
            db_url,
            ADMIN_TOKEN=ADMIN,
            JWT_SECRET=SECRET,
            PORT=port,
            STORAGE_URL=tmp_path,
            API_STREAMS_PER_USER=5,
            API_STREAMS_PER_PROCESS=50,
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    deadline = time.monotonic() + 20
    while not up() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "web.log").read_text()
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    log.close()


async def _flood(
    host: str, port: int, path: str, headers: str, n: int, at_once: int
) -> dict[str, int]:
    """n connections, at_once at a time, each asking for the stream: status -> count."""
    counts: dict[str, int] = {}
    gate = asyncio.Semaphore(at_once)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode()

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(request)
                line = await asyncio.wait_for(reader.readline(), 30)
                status = line.split(b" ")[1].decode() if line else "closed"
                counts[status] = counts.get(status, 0) + 1
            finally:
                writer.close()
                await writer.wait_closed()

    await asyncio.gather(*(one() for _ in range(n)))
    return counts


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_ten_thousand_streams_from_one_client(web_process: str, db_url: str) -> None:
    # The held stream's reads wait past the server's keep-alive comments (15 s): a
    # flood that takes longer than a short read timeout must not end it client-side.
    timeout = httpx.Timeout(10, read=60)
    async with httpx.AsyncClient(base_url=web_process, timeout=timeout) as client:
        r = await client.post(COURSE, headers=bearer(ALICE), json={"subject": "Algebra"})
        jid = r.json()["id"]
        path = f"/v1/jobs/{jid}/events"
        async with open_sse(client, path, bearer(ALICE)) as held:
            await held.next()
            auth = f"Authorization: Bearer {token(ALICE)}\r\n"
            t0 = time.monotonic()
            counts = await _flood(
                "127.0.0.1", int(web_process.rsplit(":", 1)[1]), path, auth, 10_000, 100
            )
            spent = time.monotonic() - t0
            # 4 more streams fit the user's cap of 5 while they last; the rest: 429
            assert counts.get("429", 0) >= 10_000 - 4 * 100, counts
            assert set(counts) <= {"200", "429"}, counts
            print(f"\n10,000 stream requests from one client in {spent:.1f} s: {counts}")
            # the held stream still hears its job (the process may still be closing
            # the flood's sockets: allow for a loaded machine)
            await sql(db_url, "select cancel_job(%s, 'ai_course_jobs')", jid)
            assert (await held.next(timeout=20))["job"]["status"] == "cancelled"


def test_the_api_refuses_to_start_on_a_short_secret(db_url: str) -> None:
    out = subprocess.run(
        [*AI_JOBS, "web"],
        env=env(db_url, ADMIN_TOKEN=ADMIN, JWT_SECRET="short", PORT=free_port()),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "JWT_SECRET" in out.stderr and "32 characters" in out.stderr
    assert "short" not in out.stderr  # the value is never quoted


def test_the_api_needs_a_role_that_may_act_as_authenticated(db_url: str) -> None:
    """A DATABASE_URL role that is not a member of authenticated: a clear refusal at
    start, not a 500 at every request."""
    name = f"web_{uuid.uuid4().hex[:8]}"
    with connect(db_url) as c:
        c.execute(f"create role {name} login in role service_role")
    try:
        url = psycopg.conninfo.make_conninfo(db_url, user=name)
        out = subprocess.run(
            [*AI_JOBS, "web"],
            env=env(url, ADMIN_TOKEN=ADMIN, JWT_SECRET=SECRET, PORT=free_port()),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 1, out.stderr
        assert "grant authenticated to" in out.stderr, out.stderr
    finally:
        with connect(db_url) as c:
            c.execute(f"drop role {name}")
