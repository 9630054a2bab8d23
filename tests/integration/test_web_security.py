"""The dashboard's credentials checked the way an attacker would probe them: tests
that fail on the planted bugs of the security issue (a prefix of ADMIN_TOKEN
accepted, a wrong CSRF token accepted from the right origin), sign-in throttling
and the token's minimum length."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from listener.web.auth import MIN_TOKEN_LENGTH, Auth
from listener.web.throttle import Throttle
from tests.helpers import web_process
from tests.integration.test_web import (  # noqa: F401 - fixtures
    HTML,
    JSON,
    TOKEN,
    client,
    insert_course,
    job_row,
    web,
)

NEAR_MISSES = [
    TOKEN[:-1],  # a prefix
    TOKEN[:1],
    TOKEN[: MIN_TOKEN_LENGTH // 2],
    TOKEN + "x",  # the token and more
    TOKEN + TOKEN,
    TOKEN[:-1] + chr(ord(TOKEN[-1]) + 1),  # the last character wrong
    "x" + TOKEN[1:],  # the first character wrong
    TOKEN.upper(),
    TOKEN.swapcase(),
    TOKEN[1:],  # a suffix
    TOKEN + " x",
    "-",
]


async def test_only_the_whole_token_opens_the_dashboard(client: httpx.AsyncClient) -> None:  # noqa: F811
    for guess in NEAR_MISSES:
        r = await client.get("/metrics", headers={"Authorization": f"Bearer {guess}"})
        assert r.status_code == 401, repr(guess)
        r = await client.get("/admin/jobs/snapshot", headers={"Authorization": f"Bearer {guess}"})
        assert r.status_code == 401, repr(guess)
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200


async def test_only_the_whole_token_signs_in(
    web: tuple[str, Any],  # noqa: F811
    client: httpx.AsyncClient,  # noqa: F811
) -> None:
    for guess in NEAR_MISSES[:8]:  # below the throttle's limit
        r = await client.post(
            "/admin/login", data={"token": guess, "next": "/admin/jobs"}, headers={"Origin": web[0]}
        )
        assert r.status_code == 401, repr(guess)
        assert "set-cookie" not in r.headers
    r = await client.post("/admin/login", data={"token": TOKEN}, headers={"Origin": web[0]})
    assert r.status_code == 303


def test_token_comparison_is_whole_and_exact() -> None:
    auth = Auth(TOKEN)
    assert auth.token_matches(TOKEN)
    assert not any(auth.token_matches(g) for g in NEAR_MISSES)


async def _signed_in(browser: httpx.AsyncClient, base: str) -> str:
    r = await browser.post("/admin/login", data={"token": TOKEN}, headers={"Origin": base})
    assert r.status_code == 303
    page = await browser.get("/admin/jobs", headers=HTML)
    found = re.search(r'data-csrf="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


async def test_a_wrong_csrf_token_from_the_right_origin_is_refused(
    web: tuple[str, Any],  # noqa: F811
    client: httpx.AsyncClient,  # noqa: F811
    db_url: str,
) -> None:
    base = web[0]
    csrf = await _signed_in(client, base)
    # another browser's session: a valid CSRF token, of another session
    async with httpx.AsyncClient(base_url=base, timeout=10) as other:
        others = await _signed_in(other, base)
    assert others != csrf
    dead = await insert_course(db_url, "Dead", status="dead_letter", retry_count=3, error="x")
    form = {"job": f"ai_course_jobs:{dead}"}
    wrong = [
        csrf[:-1] + ("A" if csrf[-1] != "A" else "B"),  # one character off
        csrf[:-1],  # a prefix
        csrf + "A",
        others,
        "",
        ("y" if csrf[0] == "x" else "x") + csrf[1:],  # the first character wrong
    ]
    for token in wrong:
        for sent in ({"headers": {"X-CSRF-Token": token}}, {"data": {"csrf_token": token}}):
            headers = JSON | {"Origin": base} | sent.get("headers", {})
            r = await client.post(
                "/admin/jobs/requeue", data=form | sent.get("data", {}), headers=headers
            )
            assert r.status_code == 403, (token, sent)
    for path in ("/admin/jobs/mark-stale", "/admin/jobs/dead-letter", "/admin/logout"):
        r = await client.post(path, headers=JSON | {"Origin": base, "X-CSRF-Token": others})
        assert r.status_code == 403, path
    assert (await job_row(db_url, dead))["status"] == "dead_letter"
    # and the right one works
    r = await client.post(
        "/admin/jobs/requeue", data=form, headers=JSON | {"Origin": base, "X-CSRF-Token": csrf}
    )
    assert r.status_code == 200


async def test_failed_sign_ins_are_throttled(
    web: tuple[str, Any],  # noqa: F811
    client: httpx.AsyncClient,  # noqa: F811
) -> None:
    base = web[0]
    dashboard = web[1]
    for _ in range(dashboard.throttle.limit):
        r = await client.post("/admin/login", data={"token": "guess"}, headers={"Origin": base})
        assert r.status_code == 401
    r = await client.post("/admin/login", data={"token": TOKEN}, headers={"Origin": base})
    assert r.status_code == 429  # the right token too: a guesser learns nothing
    assert 0 < int(r.headers["retry-after"]) <= 60
    assert "Too many attempts" in r.text and "set-cookie" not in r.headers
    # Bearer credentials are not affected (scripts, Prometheus)
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200


def test_the_throttle_forgets_after_its_window_and_bounds_its_memory() -> None:
    t = Throttle(limit=3, window=60.0, max_keys=100)
    for i in range(3):
        assert t.retry_after("a", now=float(i)) == 0
        t.failed("a", now=float(i))
    assert t.retry_after("a", now=10.0) == pytest.approx(50.0)
    assert t.retry_after("b", now=10.0) == 0  # per address
    assert t.retry_after("a", now=60.5) == 0  # the first failure is a minute old
    t.succeeded("a")
    assert t.retry_after("a", now=61.0) == 0
    for i in range(1000):
        t.failed(f"10.0.{i // 256}.{i % 256}", now=100.0)
    assert len(t._failures) == 100


@pytest.mark.parametrize("token", ["", "short", "x" * (MIN_TOKEN_LENGTH - 1)])
def test_a_short_token_is_refused(token: str) -> None:
    with pytest.raises(ValueError, match="ADMIN_TOKEN"):
        Auth(token)


PADDED = [
    f"Bearer  {TOKEN}",  # two spaces
    f"Bearer \t{TOKEN}",
    f"bearer   {TOKEN}",
    f"Bearer {TOKEN} ",  # (HTTP drops a header's own trailing blanks: checked below)
    f"Bearer {TOKEN}\t",
    f"Bearer {TOKEN} x",
]


async def test_a_bearer_value_is_the_token_exactly(
    client: httpx.AsyncClient,  # noqa: F811
) -> None:
    """`Bearer <token>` with one space: a value padded with spaces or tabs is
    another value, refused like any near miss."""
    for header in PADDED[:3]:
        r = await client.get("/metrics", headers={"Authorization": header})
        assert r.status_code == 401, repr(header)
    auth = Auth(TOKEN)
    for header in PADDED:
        scope = {"type": "http", "headers": [(b"authorization", header.encode())]}
        assert auth.principal(Request(scope)) is None, repr(header)
    ok = Request({"type": "http", "headers": [(b"authorization", f"Bearer {TOKEN}".encode())]})
    assert auth.principal(ok) is not None


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[str]:
    """`ai-jobs web` as deployed behind a PaaS router (README): FORWARDED_ALLOW_IPS=*,
    since only the router reaches it."""
    with web_process(
        db_url, tmp_path / "web.log", ADMIN_TOKEN=TOKEN, FORWARDED_ALLOW_IPS="*"
    ) as base:
        yield base


async def test_the_sign_in_throttle_is_not_keyed_on_what_a_client_says(served: str) -> None:
    """Behind the router every request comes from a trusted address with
    X-Forwarded-For. A guesser writes a new address of their own in front of what
    the router appends at each try: the throttle must count them as one client
    (what the router saw), not as ten."""
    async with httpx.AsyncClient(base_url=served, timeout=10) as c:
        for i in range(10):
            r = await c.post(
                "/admin/login",
                data={"token": f"guess {i}"},
                headers={"Origin": served, "X-Forwarded-For": f"10.9.{i}.1, 198.51.100.7"},
            )
            assert r.status_code == 401
        r = await c.post(
            "/admin/login",
            data={"token": TOKEN},
            headers={"Origin": served, "X-Forwarded-For": "10.9.99.1, 198.51.100.7"},
        )
        assert r.status_code == 429
        # another client behind the same router is not held back
        r = await c.post(
            "/admin/login",
            data={"token": TOKEN},
            headers={"Origin": served, "X-Forwarded-For": "10.9.0.1, 203.0.113.9"},
        )
        assert r.status_code == 303


def test_the_throttle_key_trusts_only_what_a_trusted_forwarder_appended() -> None:
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    from listener.web.peer import key_of

    trusted = ProxyHeadersMiddleware(None, "127.0.0.1").trusted_hosts  # type: ignore[arg-type]

    def key(peer: str, *forwarded: str) -> str:
        headers = [(b"x-forwarded-for", f.encode()) for f in forwarded]
        return key_of({"type": "http", "client": (peer, 1234), "headers": headers}, trusted)

    assert key("203.0.113.5", "10.0.0.1") == "203.0.113.5"  # not a forwarder: its own address
    assert key("127.0.0.1", "10.0.0.1, 198.51.100.7") == "198.51.100.7"
    assert key("127.0.0.1", "10.0.0.1", "198.51.100.7") == "198.51.100.7"  # two headers
    assert key("127.0.0.1", "127.0.0.1") == "127.0.0.1"  # nothing to skip to: what it appended
    assert key("127.0.0.1") == "127.0.0.1"
    assert len(key("127.0.0.1", "x" * 5000)) == 100
