"""A fake Supabase Storage on 127.0.0.1 speaking the object API the storage module
uses: POST/PUT /storage/v1/object/<bucket>/<path> (x-upsert), GET the same path.
Missing objects answer 400 {"statusCode": "404"}, as Supabase does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from urllib.parse import unquote

from tests.fakeai import HTTPFake

FAKE_SERVICE_KEY = "eyJhbGciOiJIUzI1NiJ9.FAKE-SERVICE-ROLE-SECRET.c2lnbmF0dXJl"
PREFIX = "/storage/v1/object/"


class FakeSupabase(HTTPFake):
    def __init__(self) -> None:
        super().__init__()
        self.key = FAKE_SERVICE_KEY
        self.objects: dict[tuple[str, str], tuple[bytes, str]] = {}  # (bucket, path)
        self.uploads = 0
        self.fail_uploads = False

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
        if not h.path.startswith(PREFIX):
            return self.send(h, 404, {"statusCode": "404", "message": "no route"})
        bucket, _, path = unquote(h.path[len(PREFIX) :]).partition("/")
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
        exists = (bucket, path) in self.objects
        if h.command == "POST" and exists and h.headers.get("x-upsert") != "true":
            return self.send(
                h,
                400,
                {
                    "statusCode": "409",
                    "error": "Duplicate",
                    "message": "The resource already exists",
                },
            )
        with self.lock:
            self.objects[(bucket, path)] = (data, h.headers.get("content-type", ""))
            self.uploads += 1
        return self.send(h, 200, {"Key": f"{bucket}/{path}"})


@contextmanager
def running() -> Iterator[FakeSupabase]:
    fake = FakeSupabase()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
