"""Fetching what a provider's answer points at (an image URL), as untrusted input.

An answer can name any URL. Fetched naively it would let whoever controls the
answer (a compromised or impersonated provider, a misconfigured proxy) make the
worker read its own network (cloud metadata at 169.254.169.254, the database
host, localhost admin ports) or fill its memory. So:

- https only, to a host name whose every address is a public one; plain http
  only to the configured OPENAI_BASE_URL's own scheme, host and port (a local
  gateway, and the tests' fake);
- no redirects followed, no proxy from the environment;
- at most MAX_DOWNLOAD_BYTES read, whatever the Content-Length says.

The name is resolved once, every address it gives is checked, and the connection
goes to the first of them: a name that would answer differently a second time
(DNS rebinding) is never asked again. TLS still checks the certificate against
the name (it is sent as the SNI and the Host header).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

import httpx

MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024  # an image of the largest size the APIs make is ~5 MB


class DownloadRefused(ValueError):
    """A provider's URL that the worker will not fetch, or an answer it will not read."""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


async def check_url(url: str, trusted_base: str | None = None) -> str | None:
    """Raise DownloadRefused unless the worker may fetch `url`; else the checked
    address to connect to (None for the configured base URL, fetched as named)."""
    try:
        scheme, host, port = _origin(url)
    except ValueError as exc:  # a port that is not a number, a bad IPv6 literal
        raise DownloadRefused(f"image URL refused: {exc}") from None
    if trusted_base and (scheme, host, port) == _origin(trusted_base):
        return None
    if scheme != "https":
        raise DownloadRefused(f"image URL refused: scheme {scheme or 'none'!r} (https only)")
    if not host:
        raise DownloadRefused("image URL refused: no host")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DownloadRefused(f"image URL refused: {host} does not resolve ({exc})") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise DownloadRefused(f"image URL refused: {host} does not resolve")
    for address in addresses:
        if not address.is_global:
            raise DownloadRefused(f"image URL refused: {host} is not a public address")
    return str(addresses[0])


def pinned(url: str, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """`url` sent to `address`: the URL with the address for its host, and the
    Host header and TLS server name that keep the name."""
    original = httpx.URL(url)
    host = original.host
    authority = host if original.port is None else f"{host}:{original.port}"
    return original.copy_with(host=address), {"Host": authority}, {"sni_hostname": host}


def client(io_timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=io_timeout, follow_redirects=False, trust_env=False)


async def download(
    url: str, io_timeout: float, trusted_base: str | None = None, limit: int = MAX_DOWNLOAD_BYTES
) -> bytes:
    """The body at `url`, checked as above and read up to `limit` bytes."""
    address = await check_url(url, trusted_base)
    target: httpx.URL | str = url
    headers: dict[str, str] = {}
    extensions: dict[str, str] = {}
    if address is not None:
        target, headers, extensions = pinned(url, address)
    async with (
        client(io_timeout) as http,
        http.stream("GET", target, headers=headers, extensions=extensions) as resp,
    ):
        if resp.status_code != 200:
            raise DownloadRefused(f"image download answered HTTP {resp.status_code}")
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise DownloadRefused(f"image of {declared} bytes refused (at most {limit})")
        data = bytearray()
        async for chunk in resp.aiter_bytes():
            data += chunk
            if len(data) > limit:
                raise DownloadRefused(f"image larger than {limit} bytes refused")
    return bytes(data)
