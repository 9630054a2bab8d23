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

The address check resolves the name once before connecting; a name that changes
its answer in between (DNS rebinding) is not covered (docs/security.md).
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


async def check_url(url: str, trusted_base: str | None = None) -> None:
    """Raise DownloadRefused unless the worker may fetch `url`."""
    try:
        scheme, host, port = _origin(url)
    except ValueError as exc:  # a port that is not a number, a bad IPv6 literal
        raise DownloadRefused(f"image URL refused: {exc}") from None
    if trusted_base and (scheme, host, port) == _origin(trusted_base):
        return
    if scheme != "https":
        raise DownloadRefused(f"image URL refused: scheme {scheme or 'none'!r} (https only)")
    if not host:
        raise DownloadRefused("image URL refused: no host")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DownloadRefused(f"image URL refused: {host} does not resolve ({exc})") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global:
            raise DownloadRefused(f"image URL refused: {host} is not a public address")


async def download(
    url: str, io_timeout: float, trusted_base: str | None = None, limit: int = MAX_DOWNLOAD_BYTES
) -> bytes:
    """The body at `url`, checked as above and read up to `limit` bytes."""
    await check_url(url, trusted_base)
    async with (
        httpx.AsyncClient(timeout=io_timeout, follow_redirects=False, trust_env=False) as http,
        http.stream("GET", url) as resp,
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
