"""An image URL in a provider's answer is untrusted input: fetched over https from a
public host only (or from the configured OPENAI_BASE_URL itself), without
redirects, and never past a size cap."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from listener.providers.download import DownloadRefused, check_url, download
from listener.providers.openai import OpenAIProvider
from tests.fakeai import FAKE_IMAGE, FakeAI
from tests.integration.handlers.conftest import MakeSettings


async def test_an_image_url_on_the_configured_base_url_is_fetched(
    fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.files["cat.png"] = FAKE_IMAGE
    fake.image_url = f"{fake.url}/files/cat.png"
    provider = OpenAIProvider(make_settings())
    try:
        media = await provider.image("a cat", "1024x1024")
    finally:
        await provider.aclose()
    assert media.data == FAKE_IMAGE


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",  # cloud metadata
        "http://127.0.0.1:5432/",  # the database's port, another origin than the base URL
        "https://127.0.0.1/x.png",
        "https://[::1]/x.png",
        "https://10.0.0.8/x.png",
        "https://localhost/x.png",
        "https://metadata.google.internal./computeMetadata/v1/",
        "file:///etc/passwd",
        "ftp://example.com/x.png",
        "gopher://127.0.0.1:6379/_INFO",
        "https:///x.png",
        "https://example.com:99999/x.png",
    ],
)
async def test_an_image_url_elsewhere_is_refused(
    url: str, fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.image_url = url
    provider = OpenAIProvider(make_settings())
    try:
        with pytest.raises(DownloadRefused, match=r"^image URL refused"):
            await provider.image("a cat", "1024x1024")
    finally:
        await provider.aclose()


async def test_the_base_url_exception_is_exact(fake: FakeAI) -> None:
    base = fake.openai_url  # http://127.0.0.1:<port>/v1
    await check_url(f"{fake.url}/files/x.png", base)
    port = int(fake.url.rsplit(":", 1)[1])
    for other in (
        f"http://127.0.0.1:{port + 1}/files/x.png",  # another port
        f"https://127.0.0.1:{port}/files/x.png",  # another scheme
        f"http://localhost:{port}/files/x.png",  # another host name
    ):
        with pytest.raises(DownloadRefused):
            await check_url(other, base)


@pytest.mark.parametrize("name", ["big.png", "big.png.stream"])
async def test_a_download_stops_at_the_cap(fake: FakeAI, name: str) -> None:
    """Declared or not (a body that just keeps coming), more than the cap is refused."""
    fake.files[name] = b"x" * 300_000
    url = f"{fake.url}/files/{name}"
    with pytest.raises(DownloadRefused, match="refused"):
        await download(url, 5, trusted_base=fake.url, limit=100_000)
    assert await download(url, 5, trusted_base=fake.url, limit=300_000) == b"x" * 300_000


async def test_redirects_are_not_followed(fake: FakeAI) -> None:
    """A redirect would take the fetch past the checks, to wherever it points."""
    fake.files["cat.png"] = FAKE_IMAGE
    fake.redirects["moved.png"] = f"{fake.url}/files/cat.png"
    with pytest.raises(DownloadRefused, match="HTTP 302"):
        await download(f"{fake.url}/files/moved.png", 5, trusted_base=fake.url)
    with pytest.raises(DownloadRefused, match=r"HTTP 4\d\d"):
        await download(f"{fake.url}/files/missing.png", 5, trusted_base=fake.url)


async def test_the_checked_address_is_the_one_connected_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name is resolved once; its second answer (a private address)
    is never asked for, and the request goes to the checked public address, with the
    name kept for the Host header and the TLS server name."""
    from listener.providers import download as dl

    answers: Iterator[list[object]] = iter([[(2, 1, 6, "", ("93.184.216.34", 443))]])
    lookups: list[str] = []

    async def getaddrinfo(host: str, port: object, **kw: object) -> list[object]:
        lookups.append(host)
        return next(answers, [(2, 1, 6, "", ("127.0.0.1", 443))])

    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=FAKE_IMAGE)

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(
        dl,
        "client",
        lambda t: httpx.AsyncClient(transport=httpx.MockTransport(answer), trust_env=False),
    )
    assert await download("https://Images.Example/cat.png?v=2", 5.0) == FAKE_IMAGE
    assert lookups == ["images.example"]
    (request,) = seen
    assert str(request.url) == "https://93.184.216.34/cat.png?v=2"
    assert request.headers["host"] == "images.example"
    assert request.extensions["sni_hostname"] == "images.example"


async def test_a_name_with_one_private_address_among_public_ones_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def getaddrinfo(host: str, port: object, **kw: object) -> list[object]:
        return [(2, 1, 6, "", ("93.184.216.34", 443)), (2, 1, 6, "", ("10.1.2.3", 443))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    with pytest.raises(DownloadRefused, match="not a public address"):
        await download("https://images.example/cat.png", 5.0)
