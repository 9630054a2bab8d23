"""A fake OpenAI + Anthropic API for the real SDKs to talk to.

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
  stall         a valid answer that stops after `fake.break_after` tokens and holds
                the connection open (for idle timeouts); a client that hangs up is
                recorded in `fake.abandoned`
  cut           a valid answer whose connection closes after `fake.break_after`
                tokens (a stream without its end; a body shorter than its length)
  garbage       a course with `GARBAGE` (not JSON) in its middle, every time: a
                stream that goes bad after its first groups (Anthropic: inside
                the tool's input)
  bad_event     a valid course whose stream carries, halfway, a server-sent event
                whose data is not JSON (`BAD_EVENT`): the framing goes bad

Error modes answer before any stream starts. Chat completions and messages stream
when asked (`stream: true`), in the provider's server-sent events, at `fake.pace`
(answers.Pace: time to first token, tokens per second, answer size); an answer not
streamed arrives when its last token would have. Courses are in the requested
shape: JSON text for OpenAI, the forced tool's input for Anthropic.

Usage: with `fixed_usage` (the default) every answer reports 120 prompt / 800
completion tokens (OpenAI) and 150 input / 700 output (Anthropic); otherwise usage
is counted at 4 characters a token. Cached input is reported as the providers do:
OpenAI when a request repeats a system prompt seen before
(`prompt_tokens_details.cached_tokens`), Anthropic when its system block carries
`cache_control` (written the first time, read afterwards).

Quotas (quota.py): every provider answer carries the provider's rate-limit headers,
and a chat completion or message past `fake.limits` gets the provider's 429 with
`retry-after` (whatever the mode); each refusal is kept in `fake.limited` and its
request recorded in mode "limited". GET /_fake/stats answers the counters as JSON,
POST /_fake/reset zeroes them and refills the quotas, POST /_fake/mode sets the
modes ({"openai": "500"}: the soak's faults). With `request_log` (a file), each
request to a provider is also written there as a JSON line (time, provider, path,
mode, and the start of its prompt).

Routes: chat completions, messages, models list, image generation, speech, and the
Batch APIs (batches.py: `fake.batches`). Every
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
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import IO, Any

from listener.providers.placeholder import placeholder_png, placeholder_wav
from tests.fakeai.answers import (
    CHARS_PER_TOKEN,
    AnthropicStream,
    OpenAIStream,
    Pace,
    course_from_prompt,
    sized,
    tokens,
)
from tests.fakeai.batches import Batches
from tests.fakeai.http import HTTPFake
from tests.fakeai.quota import Limited, Limits, Quotas, limited_body, retry_headers

FAKE_OPENAI_KEY = "sk-test-OPENAISECRET-0123456789abcdef"
FAKE_ANTHROPIC_KEY = "sk-ant-test-ANTHROPICSECRET-0123456789"
FAKE_IMAGE = placeholder_png("fake image")
FAKE_MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 64
BAD_EVENT = b"event: content_block_delta\ndata: {not json, \xff\n\n"
GARBAGE = '}]}, ]]}{"oops": \\ not json ,,'
DEFAULT_MODEL = {"openai": "gpt-4.1-mini", "anthropic": "claude-haiku-4-5"}
GENERATE = ("/v1/chat/completions", "/v1/messages")


@dataclass
class Recorded:
    provider: str
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    mode: str = "valid"


@dataclass
class Held:
    """The output tokens a request holds against its quota (Anthropic's OTPM
    estimate, max_tokens) until it is settled to what it produced, once."""

    quotas: Quotas
    provider: str
    model: str
    tokens: int

    def settle(self, produced: int) -> None:
        self.quotas.give_back(self.provider, self.model, "output_tokens", self.tokens - produced)
        self.tokens = 0


@dataclass
class Reply:
    """What the model produces: `text` (the content, the refusal or the tool's input
    JSON) and how it ends."""

    text: str
    end: str
    refusal: bool = False  # OpenAI: the text is a refusal
    tool: str | None = None  # Anthropic: the text is this tool's input
    blocked: bool = False  # OpenAI: no content (content filter)


class FakeAI(HTTPFake):
    def __init__(
        self,
        pace: Pace | None = None,
        limits: Limits | None = None,
        fixed_usage: bool = True,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(port, host)
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
        self.pace = pace or Pace()
        self.quotas = Quotas(limits or Limits())
        self.fixed_usage = fixed_usage
        self.break_after = 100  # tokens a "stall" or "cut" answer sends first
        self.limited: list[Limited] = []  # every request refused for its quota
        self.counts: Counter[tuple[str, str]] = Counter()
        self.in_flight = self.max_in_flight = 0
        # When an Event, every call admitted waits for it (or the fake's stop) before
        # it answers: a test holds calls in flight together, whatever the machine's pace.
        self.gate: threading.Event | None = None
        self._asked: Counter[str] = Counter()  # answers per message list (the size draw)
        self.request_log: IO[str] | None = None
        self.batches = Batches(self.batch_answer)  # the Batch APIs (batches.py)

    @property
    def limits(self) -> Limits:
        return self.quotas.limits

    @limits.setter
    def limits(self, value: Limits) -> None:
        self.quotas = Quotas(value)  # full buckets

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

    def stats(self) -> dict[str, Any]:
        """The counters: {counter: {provider or kind: n}}, and the calls in flight."""
        with self.lock:
            out: dict[str, Any] = {"in_flight": self.in_flight, "max_in_flight": self.max_in_flight}
            for (group, key), n in sorted(self.counts.items()):
                out.setdefault(group, {})[key] = n
            return out

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.max_in_flight = self.in_flight
            self.limited.clear()
        self.limits = self.limits

    def _count(self, group: str, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[(group, key)] += n

    # -- dispatch --------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        start = time.monotonic()
        raw = self.body(h)
        path = h.path.split("?")[0]
        if path == "/_fake/stats":
            return self.send(h, 200, self.stats())
        if path == "/_fake/reset" and h.command == "POST":
            self.reset()
            return self.send(h, 200, {"ok": True})
        if path == "/_fake/mode" and h.command == "POST":
            with self.lock:
                self.modes.update({str(k): str(v) for k, v in json.loads(raw).items()})
                return self.send(h, 200, dict(self.modes))
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
            rec = Recorded(provider, h.command, path, dict(h.headers), body, mode)
            self.requests.append(rec)
            self.counts[("requests", provider)] += 1
            if self.request_log is not None:
                self.request_log.write(json.dumps(logged(rec)) + "\n")
                self.request_log.flush()
        # Anthropic's SDK sends x-api-key, or a bearer token in newer versions.
        bearer = (h.headers.get("authorization") or "").removeprefix("Bearer ")
        key = h.headers.get("x-api-key") or bearer
        if key != self.keys[provider] or mode == "401":
            return self.error(h, provider, 401, f"Incorrect API key provided: {key}")
        if self.batches.routes(path):
            return self.batches.handle(h, provider, path, raw, self.send)
        if mode == "slow":
            time.sleep(self.slow_seconds)
        if mode == "hang":
            self.hang(h, path)
            return None
        model = body.get("model") if isinstance(body, dict) else None
        rate = self.quotas.headers(provider, str(model or DEFAULT_MODEL[provider]))
        if path == "/v1/models":
            return self.models(h, provider, rate)
        if path in GENERATE and isinstance(body, dict):
            return self.generate(h, rec, start)
        if self.failure(h, provider, path, mode, body, rate):
            return None
        if path == "/v1/images/generations":
            if mode == "refusal":
                return self.error(
                    h, provider, 400, "Your request was rejected by the content policy", rate
                )
            if self.image_url:
                answer = {"created": int(time.time()), "data": [{"url": self.image_url}]}
                return self.send(h, 200, answer, headers=rate)
            b64 = base64.b64encode(FAKE_IMAGE).decode()
            data = {"created": int(time.time()), "data": [{"b64_json": b64}]}
            return self.send(h, 200, data, headers=rate)
        if path == "/v1/audio/speech":
            fmt = body.get("response_format", "mp3")
            audio = placeholder_wav("fake") if fmt == "wav" else FAKE_MP3
            ctype = "audio/mpeg" if fmt == "mp3" else f"audio/{fmt}"
            return self.send(h, 200, audio, ctype, headers=rate)
        return self.error(h, provider, 404, f"no route {path}", rate)

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
                    self._abandoned(path)
                    return

    def _abandoned(self, path: str) -> None:
        with self.lock:
            self.abandoned.append((path, time.time()))
            self.counts[("streams", "abandoned")] += 1

    def failure(
        self,
        h: BaseHTTPRequestHandler,
        provider: str,
        path: str,
        mode: str,
        body: Any,
        rate: dict[str, str],
    ) -> bool:
        """Answer with the mode's error, if it has one; True when it did."""
        model = body.get("model", "?") if isinstance(body, dict) else "?"
        errors: dict[str, tuple[int, str, dict[str, str]]] = {
            "429": (429, "Rate limit reached", self.retry_headers),
            "529": (529, "Overloaded", self.retry_headers),
            "500": (500, "The server had an error", {}),
            "403": (403, "You do not have access to this resource", {}),
            "404": (404, f"The model `{model}` does not exist or you do not have access", {}),
            "context": (
                400,
                "This model's maximum context length is 128000 tokens. "
                "However, your messages resulted in 200000 tokens.",
                {},
            ),
        }
        images = path == "/v1/images/generations"
        if (mode == "blocked" and provider == "anthropic") or (
            mode in ("blocked", "refusal") and images
        ):
            errors[mode] = (400, "Your request was rejected by the content policy", {})
        if mode not in errors:
            return False
        status, message, headers = errors[mode]
        self.error(h, provider, status, message, {**rate, **headers})
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

    def models(self, h: BaseHTTPRequestHandler, provider: str, rate: dict[str, str]) -> None:
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
            return self.send(h, 200, page, headers=rate)
        models: list[dict[str, Any]] = [
            {"id": "gpt-4.1-mini", "object": "model", "created": 0, "owned_by": "openai"}
        ]
        return self.send(h, 200, {"object": "list", "data": models}, headers=rate)

    # -- answers ---------------------------------------------------------------

    def answer(
        self, messages: list[dict[str, Any]], mode: str, size: int | None = None
    ) -> str | dict[str, Any]:
        user = next(str(m["content"]) for m in messages if m["role"] == "user")
        repair = sum(1 for m in messages if m["role"] == "user") > 1
        if mode == "invalid" or (mode == "invalid_once" and not repair):
            return "Sure! Here is your course: {not json"
        if mode == "wrong_schema":
            return {"title": "A course without groups"}
        course = course_from_prompt(user)
        course = sized(course, size) if size else course
        if mode == "garbage":
            text = json.dumps(course)
            mid = text.index('"id": "g2"')  # after the first group
            return text[:mid] + GARBAGE + text[mid:]
        return course

    def seen(self, system: str, mark: bool = True) -> bool:
        """Whether this system prompt was sent before (and, with `mark`, remember it)."""
        with self.lock:
            hit = system in self.prefixes
            if mark:
                self.prefixes.add(system)
        return hit

    def reply(self, provider: str, body: dict[str, Any], mode: str, size: int | None) -> Reply:
        answer = self.answer(body["messages"], mode, size)
        text = answer if isinstance(answer, str) else json.dumps(answer)
        if provider == "openai":
            if mode == "refusal":
                return Reply("I'm sorry, I can't help with that request.", "stop", refusal=True)
            if mode == "blocked":
                return Reply("", "content_filter", blocked=True)
            return Reply(text, "stop")
        if mode == "refusal":
            return Reply("I can't help with that.", "refusal")
        tools = body.get("tools") or []
        if mode == "garbage" and tools:
            return Reply(text, "tool_use", tool=str(tools[0]["name"]))
        if isinstance(answer, str) or not tools:
            return Reply(text, "tool_use" if tools else "end_turn")
        return Reply(text, "tool_use", tool=str(tools[0]["name"]))

    def input_usage(self, provider: str, body: dict[str, Any]) -> dict[str, Any]:
        """The prompt's side of the usage: OpenAI's prompt_tokens (with details),
        Anthropic's input_tokens and cache fields. Reads the prompt caches only."""
        if provider == "openai":
            system = str(body["messages"][0]["content"])
            prompt = 120
            cached = 100 if self.seen(system, mark=False) else 0
            if not self.fixed_usage:
                prompt = tokens(json.dumps([body["messages"], body.get("response_format")]))
                cached = min(prompt, tokens(system)) if cached else 0
            return {"prompt_tokens": prompt, "prompt_tokens_details": {"cached_tokens": cached}}
        usage: dict[str, int] = {"input_tokens": 150}
        system = body.get("system")
        total = tokens(json.dumps([system, body["messages"], body.get("tools")]))
        if not self.fixed_usage:
            usage["input_tokens"] = total
        if isinstance(system, list) and system and system[-1].get("cache_control"):
            # The cache breakpoint covers the tools and the system block; Anthropic
            # counts the cached part apart.
            cached = (
                100
                if self.fixed_usage
                else min(total, tokens(json.dumps([body.get("tools"), system])))
            )
            usage["input_tokens"] = 50 if self.fixed_usage else total - cached
            read = self.seen(json.dumps(system), mark=False)
            usage["cache_read_input_tokens" if read else "cache_creation_input_tokens"] = cached
        return usage

    def generate(self, h: BaseHTTPRequestHandler, rec: Recorded, start: float) -> None:
        """A chat completion or a message: charged to the quotas (refused: recorded in
        mode "limited"), then the mode's error or the answer, streamed or not."""
        provider, path, body, mode = rec.provider, rec.path, rec.body, rec.mode
        model = str(body.get("model") or DEFAULT_MODEL[provider])
        key = json.dumps(body.get("messages"), sort_keys=True)
        with self.lock:
            nth = self._asked[key]
        size = self.pace.draw(key, nth)
        max_out = body.get("max_completion_tokens") or body.get("max_tokens")
        if size is not None and max_out:
            size = min(size, int(max_out))
        reply = self.reply(provider, body, mode, size)
        out = tokens(reply.text)
        inp = self.input_usage(provider, body)
        costs = {"requests": 1}
        if provider == "openai":
            costs["tokens"] = inp["prompt_tokens"] + int(max_out or out)
        else:
            costs["input_tokens"] = inp["input_tokens"] + inp.get("cache_creation_input_tokens", 0)
            costs["output_tokens"] = int(max_out or out)
        refused = self.quotas.admit(provider, model, costs)
        if refused:
            with self.lock:
                rec.mode = "limited"
                self.limited.append(refused)
                self.counts[("rate_limited", provider)] += 1
            headers = {**self.quotas.headers(provider, model), **retry_headers(refused.retry_after)}
            return self.send(h, 429, limited_body(provider, refused), headers=headers)
        rate = self.quotas.headers(provider, model)
        held = Held(self.quotas, provider, model, costs.get("output_tokens", 0))
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            gate = self.gate
            while gate is not None and not gate.wait(0.05) and not self._unhang.is_set():
                pass
            if self.failure(h, provider, path, mode, body, rate):
                return None
            with self.lock:
                self._asked[key] += 1
            anthropic = provider == "anthropic"
            self.seen(
                json.dumps(body.get("system")) if anthropic else str(body["messages"][0]["content"])
            )
            produced = self.deliver(h, provider, path, body, mode, reply, inp, rate, start, held)
            self._count(
                "input_tokens", provider, sum(inp.values()) if anthropic else inp["prompt_tokens"]
            )
            self._count("output_tokens", provider, produced)
        finally:
            with self.lock:
                self.in_flight -= 1
            held.settle(0)  # an error, or the client left
        return None

    def batch_answer(self, provider: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A batch's request answered as its route answers it in mode "valid" (or
        "invalid" when the batch marked it so), not streamed, quotas untouched."""
        if path == "/v1/images/generations":
            b64 = base64.b64encode(FAKE_IMAGE).decode()
            return {"created": int(time.time()), "data": [{"b64_json": b64}]}
        mode = "invalid" if body.pop("_fake_invalid", False) else "valid"
        model = str(body.get("model") or DEFAULT_MODEL[provider])
        reply = self.reply(provider, body, mode, None)
        inp = self.input_usage(provider, body)
        anthropic = provider == "anthropic"
        self.seen(
            json.dumps(body.get("system")) if anthropic else str(body["messages"][0]["content"])
        )
        n = tokens(reply.text)
        if anthropic:
            done = 700 if self.fixed_usage else n
            return self.anthropic_body(model, reply, {**inp, "output_tokens": done})
        done = 800 if self.fixed_usage else n
        usage = {
            "prompt_tokens": inp["prompt_tokens"],
            "completion_tokens": done,
            "total_tokens": inp["prompt_tokens"] + done,
            "prompt_tokens_details": inp["prompt_tokens_details"],
        }
        return self.openai_body(model, reply, usage)

    def deliver(
        self,
        h: BaseHTTPRequestHandler,
        provider: str,
        path: str,
        body: dict[str, Any],
        mode: str,
        reply: Reply,
        inp: dict[str, Any],
        rate: dict[str, str],
        start: float,
        held: Held,
    ) -> int:
        """Answer `reply`, streamed or whole; the output tokens it produced. The
        quota is settled before the answer's last bytes go out."""
        model = str(body.get("model") or DEFAULT_MODEL[provider])
        n = tokens(reply.text)
        if provider == "openai":
            done = 800 if self.fixed_usage else n
            prompt = inp["prompt_tokens"]
            usage: dict[str, Any] = {
                "prompt_tokens": prompt,
                "completion_tokens": done,
                "total_tokens": prompt + done,
                "prompt_tokens_details": inp["prompt_tokens_details"],
            }
        else:
            done = 700 if self.fixed_usage else n
            usage = {**inp, "output_tokens": done}
        if body.get("stream"):
            s: OpenAIStream | AnthropicStream
            if provider == "openai":
                include = bool((body.get("stream_options") or {}).get("include_usage"))
                s = OpenAIStream(model, include, reply.refusal)
                closing = s.closing(reply.end, usage)
            else:
                s = AnthropicStream(model, reply.tool, inp)
                closing = s.closing(reply.end, done)
            sent = self.stream(h, path, s, reply.text, rate, mode, start)
            if sent is not None:
                held.settle(min(done, sent))
                return min(done, sent)
            held.settle(done)
            try:
                self.write_chunk(h, closing)
                self.write_chunk(h, b"")
                self._count("streams", "completed")
            except OSError:
                self._abandoned(path)
            return done
        # Not streamed: the whole answer once its last token is ready.
        if self._unhang.wait(max(0.0, self.pace.due(start, max(n, 1)) - time.monotonic())):
            return 0
        if provider == "openai":
            data = self.openai_body(model, reply, usage)
        else:
            data = self.anthropic_body(model, reply, usage)
        if mode not in ("stall", "cut"):
            held.settle(done)
            self.send(h, 200, data, headers=rate)
            return done
        held.settle(min(done, self.break_after))
        raw = json.dumps(data).encode()
        self.send(
            h, 200, raw, headers=rate, upto=min(len(raw) - 1, self.break_after * CHARS_PER_TOKEN)
        )
        if mode == "stall":
            self.hang(h, path)
        return min(done, self.break_after)

    def stream(
        self,
        h: BaseHTTPRequestHandler,
        path: str,
        s: OpenAIStream | AnthropicStream,
        text: str,
        rate: dict[str, str],
        mode: str,
        start: float,
    ) -> int | None:
        """Open the stream and send `text` as its events, each when its last token is
        due (what fell behind goes out together); None when all went out (the
        closing events are the caller's), else the tokens sent before it broke off
        (stall, cut, the client left, the fake stopped)."""
        broken = mode in ("stall", "cut")
        limit = min(len(text), self.break_after * CHARS_PER_TOKEN) if broken else len(text)
        step = self.pace.chunk_tokens() * CHARS_PER_TOKEN

        def events() -> Iterator[tuple[int, bytes]]:  # (tokens sent through it, bytes)
            if not limit and not broken:
                yield 0, s.first()
            half = limit // 2
            for i in range(0, limit, step):
                end = min(i + step, limit)
                data = (b"" if i else s.first()) + s.delta(text[i:end])
                if mode == "bad_event" and i <= half < i + step:
                    data += BAD_EVENT  # the stream's own framing goes bad
                yield -(-end // CHARS_PER_TOKEN), data

        self._count("streams", "started")
        sent = queued = 0
        batch: list[bytes] = []
        try:
            self.open_stream(h, rate)
            if opening := s.opening():
                self.write_chunk(h, opening)
            for through, data in events():
                wait = self.pace.due(start, max(through, 1)) - time.monotonic()
                if wait > 0:
                    if batch:
                        self.write_chunk(h, b"".join(batch))
                        batch, sent = [], queued
                    if self._unhang.wait(wait):
                        return sent
                batch.append(data)
                queued = through
            if batch:
                self.write_chunk(h, b"".join(batch))
                sent = queued
            if broken:
                self._count("streams", "stalled" if mode == "stall" else "cut")
                if mode == "stall":
                    self.hang(h, path)
                return sent
        except OSError:
            self._abandoned(path)
            return sent
        return None

    @staticmethod
    def openai_body(model: str, reply: Reply, usage: dict[str, Any]) -> dict[str, Any]:
        message = {
            "role": "assistant",
            "content": None if reply.blocked or reply.refusal else reply.text,
            "refusal": reply.text if reply.refusal else None,
        }
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "finish_reason": reply.end, "message": message}],
            "usage": usage,
        }

    @staticmethod
    def anthropic_body(model: str, reply: Reply, usage: dict[str, Any]) -> dict[str, Any]:
        block: dict[str, Any] = {"type": "text", "text": reply.text}
        if reply.tool:
            try:
                tool_input = json.loads(reply.text)
            except ValueError:  # garbage: a whole answer can only be JSON, say it in text
                return FakeAI.anthropic_body(model, Reply(reply.text, reply.end), usage)
            block = {
                "type": "tool_use",
                "id": "toolu_fake",
                "name": reply.tool,
                "input": tool_input,
            }
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [block],
            "stop_reason": reply.end,
            "stop_sequence": None,
            "usage": usage,
        }


def logged(rec: Recorded) -> dict[str, Any]:
    """A request's line in the request log: what, when, and the start of its
    prompt (the first user message, or an image's prompt, or a speech's input)."""
    body = rec.body if isinstance(rec.body, dict) else {}
    users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
    text = users[0]["content"] if users else body.get("prompt") or body.get("input") or ""
    return {
        "t": time.time(),
        "provider": rec.provider,
        "path": rec.path,
        "mode": rec.mode,
        "repair": len(users) > 1,
        "text": str(text)[:300],
    }


@contextmanager
def running(**kw: Any) -> Iterator[FakeAI]:
    """A started fake (keyword arguments as FakeAI's), stopped on the way out."""
    fake = FakeAI(**kw)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
