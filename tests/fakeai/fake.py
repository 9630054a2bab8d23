"""A fake OpenAI + Anthropic API on 127.0.0.1 for the real SDKs to talk to.

Point OPENAI_BASE_URL at `fake.openai_url` and ANTHROPIC_BASE_URL at
`fake.anthropic_url`. Each provider answers in the mode set in `fake.modes`:

  valid         a course built from the prompt's "Groups:" / "Items per group:" lines
  slow          waits `fake.slow_seconds` before answering (for timeouts)
  hang          never answers (until the client gives up or the fake stops); a client
                that hangs up is recorded in `fake.abandoned` (a cancelled call)
  429 / 529     rate limited / overloaded, with the headers of `fake.retry_headers`
                (e.g. {"retry-after-ms": "1000"}; default {"retry-after": "0"})
  500           a server error
  401 / 403     "Incorrect API key provided: <the key>" (as OpenAI echoes it) / forbidden
  404           the model does not exist
  context       400: the prompt exceeds the context window
  refusal       an answer that refuses (OpenAI `refusal`, Anthropic stop_reason refusal)
  blocked       a content-policy block (OpenAI finish_reason content_filter or a 400
                content_policy_violation for images; Anthropic a 400)
  invalid       text that is not JSON, every time
  invalid_once  not JSON, then a valid course on the repair round
  wrong_schema  JSON that is not a course, every time

Usage reports cached input tokens as the providers do: OpenAI when a request
repeats a system prompt seen before (`prompt_tokens_details.cached_tokens`),
Anthropic when its system block carries `cache_control` (written the first time,
read afterwards).

Routes: chat completions, messages, models list, image generation, speech. Every
request is recorded (`fake.requests`, `fake.count(...)`). The same server records
Sentry envelopes (POST /api/<project>/envelope/) in `fake.envelopes` and alert
webhooks (POST /hook/...) in `fake.hooks`.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from listener.providers.placeholder import placeholder_png, placeholder_wav

FAKE_OPENAI_KEY = "sk-test-OPENAISECRET-0123456789abcdef"
FAKE_ANTHROPIC_KEY = "sk-ant-test-ANTHROPICSECRET-0123456789"
FAKE_IMAGE = placeholder_png("fake image")
FAKE_MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 64


@dataclass
class Recorded:
    provider: str
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    mode: str = "valid"


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeout test) is expected, not noise


class HTTPFake:
    """A threaded HTTP server on a free loopback port; subclasses answer requests."""

    def __init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.handle(self)

            def do_POST(self) -> None:
                fake.handle(self)

            def do_PUT(self) -> None:
                fake.handle(self)

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.lock = threading.Lock()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    @staticmethod
    def body(h: BaseHTTPRequestHandler) -> bytes:
        n = int(h.headers.get("content-length") or 0)
        return h.rfile.read(n) if n else b""

    @staticmethod
    def send(
        h: BaseHTTPRequestHandler,
        status: int,
        data: Any,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        try:
            h.send_response(status)
            h.send_header("content-type", content_type)
            h.send_header("content-length", str(len(raw)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(raw)
        except OSError:
            pass  # the client went away (it timed out)


class FakeAI(HTTPFake):
    def __init__(self) -> None:
        super().__init__()
        self.openai_url = f"{self.url}/v1"
        self.anthropic_url = self.url
        self.modes: dict[str, str] = {"openai": "valid", "anthropic": "valid"}
        self.keys = {"openai": FAKE_OPENAI_KEY, "anthropic": FAKE_ANTHROPIC_KEY}
        self.slow_seconds = 3.0
        self.retry_headers: dict[str, str] = {"retry-after": "0"}
        self.requests: list[Recorded] = []
        self.envelopes: list[bytes] = []
        self.abandoned: list[tuple[str, float]] = []  # (path, time.time()) of hung-up calls
        self.hooks: list[Any] = []
        self.prefixes: set[str] = set()  # system prompts seen (the prompt caches)
        self._unhang = threading.Event()
        # The images API answers {"url": image_url} instead of base64 when set;
        # GET /files/<name> serves files[name] (without a Content-Length when the
        # name ends in ".stream").
        self.image_url: str | None = None
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}  # GET /files/<name> answers 302 to the value

    def stop(self) -> None:
        self._unhang.set()
        super().stop()

    def answered(self, provider: str, mode: str) -> int:
        """Requests to `provider` answered in `mode`."""
        with self.lock:
            return sum(1 for r in self.requests if r.provider == provider and r.mode == mode)

    def count(self, provider: str, path: str | None = None) -> int:
        with self.lock:
            return sum(
                1
                for r in self.requests
                if r.provider == provider and (path is None or r.path.endswith(path))
            )

    # -- dispatch --------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = self.body(h)
        path = h.path.split("?")[0]
        if re.fullmatch(r"/api/\d+/envelope/", path):
            if h.headers.get("content-encoding") == "gzip":
                raw = gzip.decompress(raw)
            with self.lock:
                self.envelopes.append(raw)
            return self.send(h, 200, {"id": "x"})
        if path.startswith("/hook/"):
            with self.lock:
                self.hooks.append(json.loads(raw))
            return self.send(h, 200, {"ok": True})
        name = path.removeprefix("/files/")
        if path.startswith("/files/") and name in self.redirects:
            return self.send(h, 302, b"", headers={"location": self.redirects[name]})
        if path.startswith("/files/") and name in self.files:
            return self.file(h, name)
        provider = "anthropic" if "anthropic-version" in h.headers else "openai"
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        mode = self.modes.get(provider, "valid")
        with self.lock:
            self.requests.append(Recorded(provider, h.command, path, dict(h.headers), body, mode))
        # Anthropic's SDK sends x-api-key, or a bearer token in newer versions.
        bearer = (h.headers.get("authorization") or "").removeprefix("Bearer ")
        key = h.headers.get("x-api-key") or bearer
        if key != self.keys[provider] or mode == "401":
            return self.error(h, provider, 401, f"Incorrect API key provided: {key}")
        if mode == "slow":
            time.sleep(self.slow_seconds)
        if mode == "hang":
            self.hang(h, path)
            return None
        if path == "/v1/models":
            return self.models(h, provider)
        if self.failure(h, provider, path, mode, body):
            return None
        if path == "/v1/chat/completions":
            return self.chat(h, body, mode)
        if path == "/v1/messages":
            return self.messages(h, body, mode)
        if path == "/v1/images/generations":
            if mode == "refusal":
                return self.error(
                    h, provider, 400, "Your request was rejected by the content policy"
                )
            if self.image_url:
                answer = {"created": int(time.time()), "data": [{"url": self.image_url}]}
                return self.send(h, 200, answer)
            b64 = base64.b64encode(FAKE_IMAGE).decode()
            return self.send(h, 200, {"created": int(time.time()), "data": [{"b64_json": b64}]})
        if path == "/v1/audio/speech":
            fmt = body.get("response_format", "mp3")
            data = placeholder_wav("fake") if fmt == "wav" else FAKE_MP3
            return self.send(h, 200, data, "audio/mpeg" if fmt == "mp3" else f"audio/{fmt}")
        return self.error(h, provider, 404, f"no route {path}")

    def hang(self, h: BaseHTTPRequestHandler, path: str) -> None:
        """Never answer: hold the request until the fake stops (or 120 s), or until
        the client hangs up, which is recorded in `abandoned` (a cancelled call)."""
        sock = h.connection
        deadline = time.monotonic() + 120
        while not self._unhang.is_set() and time.monotonic() < deadline:
            ready, _, _ = select.select([sock], [], [], 0.02)
            if ready:
                try:
                    gone = sock.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    gone = True
                if gone:
                    with self.lock:
                        self.abandoned.append((path, time.time()))
                    return

    def failure(
        self, h: BaseHTTPRequestHandler, provider: str, path: str, mode: str, body: Any
    ) -> bool:
        """Answer with the mode's error, if it has one; True when it did."""
        model = body.get("model", "?") if isinstance(body, dict) else "?"
        errors: dict[str, tuple[int, str, dict[str, str] | None]] = {
            "429": (429, "Rate limit reached", self.retry_headers),
            "529": (529, "Overloaded", self.retry_headers),
            "500": (500, "The server had an error", None),
            "403": (403, "You do not have access to this resource", None),
            "404": (404, f"The model `{model}` does not exist or you do not have access", None),
            "context": (
                400,
                "This model's maximum context length is 128000 tokens. "
                "However, your messages resulted in 200000 tokens.",
                None,
            ),
        }
        images = path == "/v1/images/generations"
        if (mode == "blocked" and provider == "anthropic") or (
            mode in ("blocked", "refusal") and images
        ):
            errors[mode] = (400, "Your request was rejected by the content policy", None)
        if mode not in errors:
            return False
        status, message, headers = errors[mode]
        self.error(h, provider, status, message, headers)
        return True

    def error(
        self,
        h: BaseHTTPRequestHandler,
        provider: str,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        if provider == "anthropic":
            kind = {
                400: "invalid_request_error",
                401: "authentication_error",
                403: "permission_error",
                404: "not_found_error",
                429: "rate_limit_error",
                529: "overloaded_error",
            }.get(status, "api_error")
            body = {"type": "error", "error": {"type": kind, "message": message}}
        else:
            code = {404: "model_not_found", 429: "rate_limit_exceeded"}.get(status)
            if "context length" in message:
                code = "context_length_exceeded"
            elif "content policy" in message:
                code = "content_policy_violation"
            body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
        self.send(h, status, body, headers=headers)

    def file(self, h: BaseHTTPRequestHandler, name: str) -> None:
        data = self.files[name]
        if not name.endswith(".stream"):
            return self.send(h, 200, data, "image/png")
        try:  # no Content-Length: the body ends when the connection closes
            h.close_connection = True
            h.send_response(200)
            h.send_header("content-type", "image/png")
            h.end_headers()
            for i in range(0, len(data), 65536):
                h.wfile.write(data[i : i + 65536])
        except OSError:
            pass  # the client stopped reading

    def models(self, h: BaseHTTPRequestHandler, provider: str) -> None:
        if provider == "anthropic":
            data = [
                {
                    "type": "model",
                    "id": "claude-haiku-4-5",
                    "display_name": "Claude Haiku 4.5",
                    "created_at": "2025-10-01T00:00:00Z",
                }
            ]
            page = {"data": data, "has_more": False, "first_id": "a", "last_id": "a"}
            return self.send(h, 200, page)
        models: list[dict[str, Any]] = [
            {"id": "gpt-4.1-mini", "object": "model", "created": 0, "owned_by": "openai"}
        ]
        return self.send(h, 200, {"object": "list", "data": models})

    # -- answers ---------------------------------------------------------------

    def answer(self, messages: list[dict[str, Any]], mode: str) -> str | dict[str, Any]:
        user = next(str(m["content"]) for m in messages if m["role"] == "user")
        repair = sum(1 for m in messages if m["role"] == "user") > 1
        if mode == "invalid" or (mode == "invalid_once" and not repair):
            return "Sure! Here is your course: {not json"
        if mode == "wrong_schema":
            return {"title": "A course without groups"}
        return course_from_prompt(user)

    def seen(self, system: str) -> bool:
        """Whether this system prompt was sent before (and remember it)."""
        with self.lock:
            hit = system in self.prefixes
            self.prefixes.add(system)
        return hit

    def chat(self, h: BaseHTTPRequestHandler, body: dict[str, Any], mode: str) -> None:
        answer = self.answer(body["messages"], mode)
        content: str | None = answer if isinstance(answer, str) else json.dumps(answer)
        refusal, finish = None, "stop"
        if mode == "refusal":
            content, refusal = None, "I'm sorry, I can't help with that request."
        elif mode == "blocked":
            content, finish = None, "content_filter"
        system = str(body["messages"][0]["content"])
        cached = 100 if self.seen(system) else 0
        self.send(
            h,
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": finish,
                        "message": {"role": "assistant", "content": content, "refusal": refusal},
                    }
                ],
                "usage": {
                    "prompt_tokens": 120,
                    "completion_tokens": 800,
                    "total_tokens": 920,
                    "prompt_tokens_details": {"cached_tokens": cached},
                },
            },
        )

    def messages(self, h: BaseHTTPRequestHandler, body: dict[str, Any], mode: str) -> None:
        answer = self.answer(body["messages"], mode)
        stop = "tool_use"
        if isinstance(answer, str):
            block: dict[str, Any] = {"type": "text", "text": answer}
        else:
            tool = body["tools"][0]["name"]
            block = {"type": "tool_use", "id": "toolu_fake", "name": tool, "input": answer}
        if mode == "refusal":
            block, stop = {"type": "text", "text": "I can't help with that."}, "refusal"
        usage = {"input_tokens": 150, "output_tokens": 700}
        system = body.get("system")
        if isinstance(system, list) and system and system[-1].get("cache_control"):
            read = self.seen(json.dumps(system))  # the cache breakpoint covers it
            usage["input_tokens"] = 50  # Anthropic counts the cached part apart
            usage["cache_read_input_tokens" if read else "cache_creation_input_tokens"] = 100
        self.send(
            h,
            200,
            {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [block],
                "stop_reason": stop,
                "stop_sequence": None,
                "usage": usage,
            },
        )


def course_from_prompt(prompt: str) -> dict[str, Any]:
    def field_(name: str, default: str) -> str:
        m = re.search(rf"^{name}: (.+)$", prompt, re.MULTILINE)
        return m.group(1).strip() if m else default

    subject = field_("Write a course on", "Something")
    groups = int(field_("Groups", "3"))
    per_group = int(field_("Items per group", "12"))
    return {
        "id": field_("Course id", "something"),
        "title": f"Learning {subject}",
        "subject": subject,
        "description": f"A fake course on {subject}.",
        "level": field_("Level", "beginner"),
        "language": field_("Language", "English").split(" (")[0],
        "groups": [
            {
                "id": f"g{g}",
                "title": f"Part {g}",
                "summary": f"Part {g} of {subject}.",
                "items": [
                    {
                        "id": f"g{g}-i{i}",
                        "prompt": f"Question {i}?",
                        "answer": f"Answer {i}",
                        "explanation": "Because.",
                        "options": [],
                    }
                    for i in range(1, per_group + 1)
                ],
            }
            for g in range(1, groups + 1)
        ],
    }


@contextmanager
def running() -> Iterator[FakeAI]:
    fake = FakeAI()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
