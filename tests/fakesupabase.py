"""A fake Supabase Storage on 127.0.0.1 speaking the API the storage module uses:
POST/PUT /storage/v1/object/<bucket>/<path> (x-upsert), GET and DELETE the same
path, POST /storage/v1/object/list/<bucket> (one folder's files), GET
/storage/v1/bucket/<bucket>. Missing objects and buckets answer 400
{"statusCode": "404"}, as Supabase does. Every bucket exists but those named in
`missing_buckets`; with `read_only`, the key may read but not write (as a key
that row-level security refuses)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote

from tests.fakeai import HTTPFake

FAKE_SERVICE_KEY = "eyJhbGciOiJIUzI1NiJ9.FAKE-SERVICE-ROLE-SECRET.c2lnbmF0dXJl"
PREFIX = "/storage/v1/object/"
LIST = "/storage/v1/object/list/"
BUCKETS = "/storage/v1/bucket/"
NO_BUCKET = {"statusCode": "404", "error": "Bucket not found", "message": "Bucket not found"}


class FakeSupabase(HTTPFake):
    def __init__(self) -> None:
        super().__init__()
        self.key = FAKE_SERVICE_KEY
        self.objects: dict[tuple[str, str], tuple[bytes, str]] = {}  # (bucket, path)
        self.uploads = 0
        self.fail_uploads = False
        self.missing_buckets: set[str] = set()
        self.read_only = False
        # HTTPFake answers GET, POST and PUT; Supabase deletes objects with DELETE.
        self.server.RequestHandlerClass.do_DELETE = lambda h: self.handle(h)  # type: ignore[attr-defined]

    @property
    def storage_url(self) -> str:
        return "supabase+http://" + self.url.removeprefix("http://")

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        data = self.body(h)
        if (
            h.headers.get("authorization") != f"Bearer {self.key}"
            or h.headers.get("apikey") != self.key
        ):
            return self.send(
                h,
                400,
                {"statusCode": "403", "error": "Unauthorized", "message": "invalid signature"},
            )
        if h.path.startswith(BUCKETS) and h.command == "GET":
            name = unquote(h.path[len(BUCKETS) :])
            if name in self.missing_buckets:
                return self.send(h, 400, NO_BUCKET)
            return self.send(h, 200, {"id": name, "name": name, "public": False})
        if h.path.startswith(LIST) and h.command == "POST":
            return self.list(h, unquote(h.path[len(LIST) :]), json.loads(data))
        if not h.path.startswith(PREFIX):
            return self.send(h, 404, {"statusCode": "404", "message": "no route"})
        bucket, _, path = unquote(h.path[len(PREFIX) :]).partition("/")
        if bucket in self.missing_buckets:
            return self.send(h, 400, NO_BUCKET)
        if h.command == "DELETE":
            with self.lock:
                found = self.objects.pop((bucket, path), None)
            if found is None:
                return self.send(h, 400, {"statusCode": "404", "message": "Object not found"})
            return self.send(h, 200, {"message": "Successfully deleted"})
        if h.command == "GET":
            if (bucket, path) not in self.objects:
                return self.send(
                    h,
                    400,
                    {"statusCode": "404", "error": "not_found", "message": "Object not found"},
                )
            content, ctype = self.objects[(bucket, path)]
            return self.send(h, 200, content, ctype)
        if self.fail_uploads:
            return self.send(h, 500, {"statusCode": "500", "message": "internal error"})
        if self.read_only:
            return self.send(
                h,
                400,
                {
                    "statusCode": "403",
                    "error": "Unauthorized",
                    "message": "new row violates row-level security policy",
                },
            )
        with self.lock:  # checked and written at once: two creates, one wins
            exists = (bucket, path) in self.objects
            duplicate = h.command == "POST" and exists and h.headers.get("x-upsert") != "true"
            if not duplicate:
                self.objects[(bucket, path)] = (data, h.headers.get("content-type", ""))
                self.uploads += 1
        if duplicate:
            return self.send(
                h,
                400,
                {
                    "statusCode": "409",
                    "error": "Duplicate",
                    "message": "The resource already exists",
                },
            )
        return self.send(h, 200, {"Key": f"{bucket}/{path}"})

    def list(self, h: BaseHTTPRequestHandler, bucket: str, body: dict[str, Any]) -> None:
        """The files directly in the folder `prefix` (Supabase also lists its
        subfolders, with a null id)."""
        folder = str(body.get("prefix", "")).strip("/")
        with self.lock:
            paths = [p for b, p in self.objects if b == bucket]
        names, folders = [], set()
        for p in paths:
            head, _, name = p.rpartition("/")
            if head == folder:
                names.append({"name": name, "id": p})
            elif head.startswith(f"{folder}/" if folder else ""):
                folders.add(head[len(folder) :].strip("/").split("/")[0])
        entries = [{"name": f, "id": None} for f in sorted(folders)] + sorted(
            names, key=lambda e: e["name"]
        )
        return self.send(h, 200, entries[: int(body.get("limit", 100))])


@contextmanager
def running() -> Iterator[FakeSupabase]:
    fake = FakeSupabase()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
