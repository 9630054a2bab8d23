"""Where results go: a local folder (the default) or Supabase Storage.

STORAGE_URL
  a path or file:///abs/path      a local folder (default `.storage`)
  supabase://<project host>[/<bucket>]
                                  Supabase Storage over HTTPS, bucket `courses` unless
                                  named, authenticated with SUPABASE_SERVICE_ROLE_KEY
  supabase+http://host:port[/<bucket>]
                                  the same over plain HTTP (a local Supabase stack)

Two small classes over httpx rather than fsspec: Supabase has no first-party fsspec
backend, fsspec's local writes are not atomic, and the whole need is three verbs.

Every write is atomic: a reader sees the old file or the new one, never half of one
(locally: a temporary file in the same folder, then rename; Supabase replaces an
object only once its upload is complete). `create` writes only where nothing is yet
(locally a hard link, which fails on an existing name; Supabase an upload without
`x-upsert`): the fence of a job's result (listener/results.py).

Layout: courses/<courseId>/course.json, courses/catalog.json, media/<jobId>.<ext>.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit

import httpx

from listener.errors import AiJobsError, ConfigError
from listener.settings import Settings

DEFAULT_BUCKET = "courses"
PROBE = ".ai-jobs-write-check"  # the start-up check's file, removed at once


class StorageError(AiJobsError):
    """Storage upload failed."""


class Storage(Protocol):
    location: str  # for logs and errors; never holds a secret

    async def write(self, path: str, data: bytes, content_type: str) -> None: ...

    async def create(self, path: str, data: bytes, content_type: str) -> bool:
        """Write `data` at `path` only if nothing is there yet: False if something is."""
        ...

    async def read(self, path: str) -> bytes | None: ...

    async def delete(self, path: str) -> None:
        """Remove `path`; nothing there is no error."""
        ...

    async def list(self, folder: str) -> list[str]:
        """The paths of the files directly in `folder` (none if it does not exist)."""
        ...

    async def check(self) -> None:
        """Raise ConfigError unless a result could be written now (at start)."""
        ...

    async def aclose(self) -> None: ...


def open_storage(settings: Settings, timeout: float = 30.0) -> Storage:
    url = settings.storage_url
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme in ("supabase", "supabase+https", "supabase+http"):
        key = settings.supabase_service_role_key
        if not key:
            raise ConfigError("STORAGE_URL is a Supabase URL: set SUPABASE_SERVICE_ROLE_KEY")
        parts = urlsplit(url)
        http = "http" if scheme == "supabase+http" else "https"
        bucket = parts.path.strip("/") or DEFAULT_BUCKET
        return SupabaseStorage(
            f"{http}://{parts.netloc}", bucket, key.get_secret_value(), timeout=timeout
        )
    if scheme not in ("", "file"):
        raise ConfigError(
            f"STORAGE_URL: unsupported scheme {scheme!r} (a path, file://, or supabase://)"
        )
    return LocalStorage(settings.storage_root)


def _check(path: str) -> str:
    # Paths are ours (course ids are slugs, job ids uuids), but never let one escape.
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"Storage upload failed: invalid path {path!r}")
    return path


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    async def write(self, path: str, data: bytes, content_type: str) -> None:
        try:
            await asyncio.to_thread(self._write, self.root / _check(path), data)
        except OSError as exc:
            raise StorageError(f"Storage upload failed: {path}: {exc.strerror or exc}") from exc

    async def create(self, path: str, data: bytes, content_type: str) -> bool:
        try:
            return await asyncio.to_thread(self._write, self.root / _check(path), data, False)
        except OSError as exc:
            raise StorageError(f"Storage upload failed: {path}: {exc.strerror or exc}") from exc

    @staticmethod
    def _write(target: Path, data: bytes, replace: bool = True) -> bool:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own per writer, in the same folder (same file system), so the
        # rename is atomic and two writers of one file never share a temporary file.
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if replace:
                os.replace(tmp, target)
                return True
            try:
                os.link(tmp, target)  # atomic, and refused if the name exists
            except FileExistsError:
                return False
            return True
        finally:
            tmp.unlink(missing_ok=True)

    async def read(self, path: str) -> bytes | None:
        target = self.root / _check(path)
        try:
            return await asyncio.to_thread(target.read_bytes)
        except FileNotFoundError:
            return None

    async def delete(self, path: str) -> None:
        try:
            await asyncio.to_thread((self.root / _check(path)).unlink, missing_ok=True)
        except OSError as exc:
            raise StorageError(f"Storage delete failed: {path}: {exc.strerror or exc}") from exc

    async def list(self, folder: str) -> list[str]:
        def names() -> list[str]:
            try:
                # a writer's temporary files start with a dot
                return sorted(n for n in os.listdir(self.root / _check(folder)) if n[0] != ".")
            except FileNotFoundError:
                return []

        try:
            return [f"{folder}/{n}" for n in await asyncio.to_thread(names)]
        except OSError as exc:
            raise StorageError(f"Storage list failed: {folder}: {exc.strerror or exc}") from exc

    async def check(self) -> None:
        """Write a probe file as a result is written (the folder made if need
        be), then remove it."""
        probe = self.root / f"{PROBE}-{uuid.uuid4().hex}"
        try:
            await asyncio.to_thread(self._write, probe, b"ok")
            await asyncio.to_thread(probe.unlink)
        except OSError as exc:
            where = self.root.absolute()
            raise ConfigError(
                f"STORAGE_URL: cannot write to {where}: {exc.strerror or exc}"
                " (each job's result is written there)"
            ) from None

    async def aclose(self) -> None:
        return None


class SupabaseStorage:
    """Supabase Storage's object API: POST /storage/v1/object/<bucket>/<path>."""

    def __init__(self, base_url: str, bucket: str, key: str, timeout: float = 30.0) -> None:
        self.bucket = bucket
        self.base_url = base_url
        self.location = f"{base_url}/storage/v1/object/{bucket}"
        self.client = httpx.AsyncClient(
            base_url=f"{base_url}/storage/v1",
            headers={"Authorization": f"Bearer {key}", "apikey": key},
            timeout=timeout,
        )

    def _url(self, path: str) -> str:
        return f"/object/{quote(self.bucket)}/{quote(_check(path))}"

    async def write(self, path: str, data: bytes, content_type: str) -> None:
        await self._upload(path, data, content_type, upsert=True)

    async def create(self, path: str, data: bytes, content_type: str) -> bool:
        return await self._upload(path, data, content_type, upsert=False)

    async def _upload(self, path: str, data: bytes, content_type: str, upsert: bool) -> bool:
        headers = {"content-type": content_type}
        if upsert:
            headers["x-upsert"] = "true"
        try:
            resp = await self.client.post(self._url(path), content=data, headers=headers)
        except httpx.HTTPError as exc:
            raise StorageError(f"Storage upload failed: {path}: {type(exc).__name__}") from None
        if not upsert and (
            resp.status_code == 409
            or (resp.status_code == 400 and _message(resp, "statusCode") == "409")
        ):
            return False  # Supabase answers an existing object with 400 {"statusCode": "409"}
        if resp.status_code >= 300:
            raise StorageError(
                f"Storage upload failed: {path}: HTTP {resp.status_code} {_message(resp)}"
            )
        return True

    async def delete(self, path: str) -> None:
        try:
            resp = await self.client.delete(self._url(path))
        except httpx.HTTPError as exc:
            raise StorageError(f"Storage delete failed: {path}: {type(exc).__name__}") from None
        missing = resp.status_code == 404 or _message(resp, "statusCode") == "404"
        if resp.status_code >= 300 and not missing:
            raise StorageError(f"Storage delete failed: {path}: HTTP {resp.status_code}")

    async def list(self, folder: str) -> list[str]:
        """POST /object/list/<bucket>: one page of 1,000 names is plenty for the
        folders listed (results staged by attempts that lost their path)."""
        body = {"prefix": _check(folder), "limit": 1000, "offset": 0}
        try:
            resp = await self.client.post(f"/object/list/{quote(self.bucket)}", json=body)
        except httpx.HTTPError as exc:
            raise StorageError(f"Storage list failed: {folder}: {type(exc).__name__}") from None
        if resp.status_code >= 300:
            raise StorageError(f"Storage list failed: {folder}: HTTP {resp.status_code}")
        entries = resp.json()
        return [
            f"{folder}/{e['name']}"
            for e in entries
            if isinstance(e, dict) and e.get("id") is not None  # null id: a folder
        ]

    async def read(self, path: str) -> bytes | None:
        try:
            resp = await self.client.get(self._url(path))
        except httpx.HTTPError as exc:
            raise StorageError(f"Storage read failed: {path}: {type(exc).__name__}") from None
        if resp.status_code == 404 or (
            resp.status_code == 400 and _message(resp, "statusCode") == "404"
        ):
            return None  # Supabase answers a missing object with 400 {"statusCode": "404"}
        if resp.status_code >= 300:
            raise StorageError(f"Storage read failed: {path}: HTTP {resp.status_code}")
        return resp.content

    async def check(self) -> None:
        """The bucket exists (GET /bucket/<id>) and the key may write in it (a
        probe object uploaded, then deleted)."""
        where = f"bucket {self.bucket!r} of {self.base_url}"
        try:
            resp = await self.client.get(f"/bucket/{quote(self.bucket)}")
        except httpx.HTTPError as exc:
            raise ConfigError(
                f"STORAGE_URL: cannot reach Supabase Storage at {self.base_url}: "
                f"{type(exc).__name__}"
            ) from None
        status = _message(resp, "statusCode") or str(resp.status_code)
        if resp.status_code >= 300 and status == "404":
            raise ConfigError(
                f"STORAGE_URL: {where} does not exist (create it in Supabase Storage,"
                " or name an existing one: supabase://<project host>/<bucket>)"
            )
        if resp.status_code >= 300:
            raise ConfigError(
                f"STORAGE_URL: Supabase Storage refused SUPABASE_SERVICE_ROLE_KEY for {where}:"
                f" HTTP {resp.status_code} {_message(resp)}".rstrip()
            )
        probe = f"{PROBE}-{uuid.uuid4().hex}"
        try:
            await self.write(probe, b"ok", "text/plain")
        except StorageError as exc:
            raise ConfigError(
                f"STORAGE_URL: SUPABASE_SERVICE_ROLE_KEY may not write to {where}: {exc.message}"
            ) from None
        with contextlib.suppress(httpx.HTTPError):  # a probe left behind harms nothing
            await self.client.delete(self._url(probe))

    async def aclose(self) -> None:
        await self.client.aclose()


def _message(resp: httpx.Response, key: str = "message") -> str:
    try:
        body = resp.json()
    except ValueError:
        return ""
    return str(body.get(key, ""))[:200] if isinstance(body, dict) else ""
