"""The providers' Batch APIs, faked: OpenAI's Files + Batches and Anthropic's
Message Batches, as the real SDKs call them.

OpenAI: POST /v1/files (multipart, purpose "batch"), GET /v1/files/{id}/content,
POST /v1/batches, GET /v1/batches/{id}, GET /v1/batches (list, newest first,
`after` and `limit`), POST /v1/batches/{id}/cancel.
Anthropic: POST /v1/messages/batches, GET /v1/messages/batches/{id}, GET
/v1/messages/batches (list), GET /v1/messages/batches/{id}/results (JSONL, the
batch's results_url), POST /v1/messages/batches/{id}/cancel.

Each request of a batch is answered as the provider's own route would answer it
in mode "valid" (a course from its prompt; for OpenAI's /v1/images/generations
batches, the image as base64 JSON, as the direct images route answers), when the
batch ends. How batches end (`Batches` fields, set by the tests):

  delay      seconds from creation until a batch ends (0: at the first look)
  outcome    "completed" (default), "expired" (OpenAI: status expired, each request
             in the error file as batch_expired; Anthropic: every result expired),
             "failed" (OpenAI only: status failed, no output)
  errors     custom ids answered with a per-request error (400) instead
  invalid    custom ids answered with text that is not a course
  bodies     custom id -> the 200 answer's body to give instead (hostile answers:
             any JSON value, e.g. an image answer without data or with a
             b64_json that does not decode)
  garbage    extra lines appended to every results file as they are (hostile
             results: not JSON, unknown or duplicate custom ids)
  fail_downloads  that many downloads of a results file answer 500 first

Batch queue limits, as the providers count them (not per-minute calls):

  queue_limits   OpenAI: model -> enqueued tokens (the input tokens of that
                 model's batches not ended, counted at 4 characters a token of
                 their messages and response format, or of an image request's
                 prompt). A batch past it is created, then `failed` at
                 once with errors.data[0].code "token_limit_exceeded" and OpenAI's
                 message ("... Limit: 2,000,000 enqueued tokens. ...")
  queue_message  that message instead (hostile refusals: no number, a huge one)
  queue_limit    Anthropic: requests processing in all batches; a creation past
                 it is answered 429 rate_limit_error, its message naming the
                 processing queue and the limit, nothing created
  rate_limited   Anthropic: that many creations are answered 429 rate_limit_error
                 for a per-minute limit of the Batches endpoints first (no queue
                 named), nothing created; `throttled` counts them
  refused        refusals for the queue, by provider
  peak           the most a queue held after an accepted creation (OpenAI:
                 tokens of one model; Anthropic: requests)

`created` counts batch creations by provider; `requests_in` the requests each
creation carried (a request submitted twice shows twice).
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

IMAGES = "/v1/images/generations"
ENDPOINTS = ("/v1/chat/completions", IMAGES)
Send = Callable[[BaseHTTPRequestHandler, int, Any], None]
# (provider, the request's path, its body) -> the provider's answer body, as its
# direct route answers it
Answer = Callable[[str, str, dict[str, Any]], dict[str, Any]]


@dataclass
class FakeBatch:
    provider: str
    id: str
    requests: list[dict[str, Any]]  # OpenAI: the input file's lines; Anthropic: requests
    created: float
    metadata: dict[str, str] | None = None
    input_file_id: str = ""
    endpoint: str = "/v1/chat/completions"
    cancelled: bool = False
    ended: float | None = None
    status: str = "in_progress"
    output_file_id: str | None = None
    error_file_id: str | None = None
    results: bytes = b""
    counts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, Any] | None = None  # OpenAI: a failed batch's errors

    @property
    def model(self) -> str:
        first = self.requests[0] if self.requests else {}
        body = first.get("params") if self.provider == "anthropic" else first.get("body")
        return str((body or {}).get("model", ""))

    @property
    def queued_tokens(self) -> int:
        """What OpenAI counts of it in the model's queue: its input tokens."""
        chars = 0
        for r in self.requests:
            body = r.get("body") or {}
            if self.endpoint == IMAGES:
                chars += len(str(body.get("prompt") or ""))
            else:
                chars += len(json.dumps([body.get("messages"), body.get("response_format")]))
        return -(-chars // 4)


class Batches:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.lock = threading.Lock()
        self.delay = 0.0
        self.outcome = "completed"
        self.errors: set[str] = set()
        self.invalid: set[str] = set()
        self.bodies: dict[str, Any] = {}
        self.garbage: list[str] = []
        self.fail_downloads = 0
        self.files: dict[str, tuple[str, str, bytes]] = {}  # id -> (purpose, filename, data)
        self.batches: dict[str, FakeBatch] = {}
        self.created: dict[str, int] = {"openai": 0, "anthropic": 0}
        self.requests_in: list[str] = []  # custom ids, one per request of each creation
        self.queue_limits: dict[str, int] = {}
        self.queue_message: str | None = None
        self.queue_limit: int | None = None
        self.rate_limited = 0
        self.throttled = 0
        self.refused: dict[str, int] = {"openai": 0, "anthropic": 0}
        self.peak: dict[str, int] = {"openai": 0, "anthropic": 0}
        self._ids = itertools.count(1)

    def routes(self, path: str) -> bool:
        return path.startswith(("/v1/files", "/v1/batches", "/v1/messages/batches"))

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}fake"

    # -- dispatch ----------------------------------------------------------------

    def handle(
        self, h: BaseHTTPRequestHandler, provider: str, path: str, raw: bytes, send: Send
    ) -> None:
        qs = h.path.partition("?")[2]
        query = dict(p.split("=", 1) for p in qs.split("&") if "=" in p)
        parts = path.strip("/").split("/")
        post = h.command == "POST"
        with self.lock:
            if parts[:2] == ["v1", "files"]:
                if post and len(parts) == 2:
                    return self.upload(h, raw, send)
                if len(parts) == 4 and parts[3] == "content":
                    if self.fail_downloads > 0:
                        self.fail_downloads -= 1
                        return send(h, 500, _oa_error("The server had an error"))
                    got = self.files.get(parts[2])
                    if got is None:
                        return send(h, 404, _oa_error("No such File object"))
                    return send(h, 200, got[2])
                if len(parts) == 3 and parts[2] in self.files:
                    return send(h, 200, self.file_object(parts[2]))
                return send(h, 404, _oa_error("No such File object"))
            if parts[:2] == ["v1", "batches"]:
                return self.openai(h, parts[2:], post, raw, query, send)
            if parts[:3] == ["v1", "messages", "batches"]:
                return self.anthropic(h, parts[3:], post, raw, query, send)
        return send(h, 404, _oa_error(f"no route {path}"))

    # -- OpenAI ------------------------------------------------------------------

    def upload(self, h: BaseHTTPRequestHandler, raw: bytes, send: Send) -> None:
        ctype = h.headers.get("content-type", "")
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw
        )
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in msg.iter_parts():  # type: ignore[attr-defined]
            name = part.get_param("name", header="content-disposition")
            data = part.get_payload(decode=True)
            fields[str(name)] = (part.get_filename(), data if isinstance(data, bytes) else b"")
        if "file" not in fields or fields.get("purpose", (None, b""))[1] != b"batch":
            return send(h, 400, _oa_error("a file with purpose batch is required"))
        fid = self._id("file-")
        self.files[fid] = ("batch", fields["file"][0] or "upload.jsonl", fields["file"][1])
        return send(h, 200, self.file_object(fid))

    def file_object(self, fid: str) -> dict[str, Any]:
        purpose, name, data = self.files[fid]
        return {
            "id": fid,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
            "status": "processed",
        }

    def openai(
        self,
        h: BaseHTTPRequestHandler,
        rest: list[str],
        post: bool,
        raw: bytes,
        query: dict[str, str],
        send: Send,
    ) -> None:
        if post and not rest:
            body = json.loads(raw)
            fid = body.get("input_file_id")
            if fid not in self.files:
                return send(h, 400, _oa_error("input_file_id: no such file"))
            try:
                lines = [json.loads(x) for x in self.files[fid][2].splitlines() if x.strip()]
            except ValueError:
                return send(h, 400, _oa_error("the input file is not JSONL"))
            endpoint = body.get("endpoint", "/v1/chat/completions")
            if endpoint not in ENDPOINTS:
                return send(h, 400, _oa_error(f"endpoint: {endpoint} is not supported"))
            if any(not isinstance(x, dict) or x.get("url") != endpoint for x in lines):
                return send(h, 400, _oa_error("every request's url must be the batch's endpoint"))
            b = FakeBatch(
                "openai",
                self._id("batch_"),
                lines,
                time.time(),
                metadata=body.get("metadata"),
                input_file_id=fid,
                endpoint=endpoint,
            )
            self.batches[b.id] = b
            self.created["openai"] += 1
            self.requests_in.extend(str(x.get("custom_id")) for x in lines)
            self.openai_queue(b)
            return send(h, 200, self.openai_object(b))
        if not post and not rest:
            mine = [b for b in self.batches.values() if b.provider == "openai"]
            mine.sort(key=lambda b: b.id, reverse=True)
            if "after" in query:
                mine = [b for b in mine if b.id < query["after"]]
            limit = int(query.get("limit", "20"))
            page = mine[:limit]
            return send(
                h,
                200,
                {
                    "object": "list",
                    "data": [self.openai_object(b) for b in page],
                    "first_id": page[0].id if page else None,
                    "last_id": page[-1].id if page else None,
                    "has_more": len(mine) > limit,
                },
            )
        b = self.batches.get(rest[0])
        if b is None or b.provider != "openai":
            return send(h, 404, _oa_error("No such Batch object"))
        if post and rest[1:] == ["cancel"]:
            if b.ended is None:
                b.cancelled = True
            return send(h, 200, self.openai_object(b))
        return send(h, 200, self.openai_object(b))

    def openai_object(self, b: FakeBatch) -> dict[str, Any]:
        self.advance(b)
        total = len(b.requests)
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": b.endpoint,
            "errors": b.errors,
            "input_file_id": b.input_file_id,
            "completion_window": "24h",
            "status": b.status,
            "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id,
            "created_at": int(b.created),
            "expires_at": int(b.created) + 86400,
            "completed_at": int(b.ended) if b.ended and b.status == "completed" else None,
            "request_counts": {
                "total": total,
                "completed": b.counts.get("succeeded", 0),
                "failed": b.counts.get("errored", 0),
            },
            "metadata": b.metadata,
        }

    # -- Anthropic ---------------------------------------------------------------

    def anthropic(
        self,
        h: BaseHTTPRequestHandler,
        rest: list[str],
        post: bool,
        raw: bytes,
        query: dict[str, str],
        send: Send,
    ) -> None:
        if post and not rest:
            body = json.loads(raw)
            reqs = body.get("requests")
            if not isinstance(reqs, list) or not reqs:
                return send(h, 400, _an_error("requests: a non-empty list is required"))
            if self.rate_limited > 0:
                self.rate_limited -= 1
                self.throttled += 1
                message = (
                    "This request would exceed your organization's rate limit of 50 requests"
                    " per minute for the Message Batches API."
                )
                return send(h, 429, _an_rate_limit(message))
            if self.queue_limit is not None:
                held = self.processing("anthropic")
                if held + len(reqs) > self.queue_limit:
                    self.refused["anthropic"] += 1
                    message = self.queue_message or (
                        "Number of requests in the batch processing queue would exceed your"
                        f" organization's limit of {self.queue_limit} requests."
                    )
                    return send(h, 429, _an_rate_limit(message))
                self.peak["anthropic"] = max(self.peak["anthropic"], held + len(reqs))
            b = FakeBatch("anthropic", self._id("msgbatch_"), reqs, time.time())
            self.batches[b.id] = b
            self.created["anthropic"] += 1
            self.requests_in.extend(str(x.get("custom_id")) for x in reqs)
            return send(h, 200, self.anthropic_object(b, h))
        if not post and not rest:
            mine = [b for b in self.batches.values() if b.provider == "anthropic"]
            mine.sort(key=lambda b: b.id, reverse=True)
            if "after_id" in query:
                mine = [b for b in mine if b.id < query["after_id"]]
            limit = int(query.get("limit", "20"))
            page = mine[:limit]
            return send(
                h,
                200,
                {
                    "data": [self.anthropic_object(b, h) for b in page],
                    "first_id": page[0].id if page else None,
                    "last_id": page[-1].id if page else None,
                    "has_more": len(mine) > limit,
                },
            )
        b = self.batches.get(rest[0])
        if b is None or b.provider != "anthropic":
            return send(h, 404, _an_error("batch not found"))
        if post and rest[1:] == ["cancel"]:
            if b.ended is None:
                b.cancelled = True
            return send(h, 200, self.anthropic_object(b, h))
        if rest[1:] == ["results"]:
            if self.fail_downloads > 0:
                self.fail_downloads -= 1
                return send(h, 500, _an_error("Internal server error"))
            self.advance(b)
            if b.ended is None:
                return send(h, 400, _an_error("the batch has not ended"))
            return send(h, 200, b.results)
        return send(h, 200, self.anthropic_object(b, h))

    def anthropic_object(self, b: FakeBatch, h: BaseHTTPRequestHandler) -> dict[str, Any]:
        self.advance(b)
        host = h.headers.get("host", "127.0.0.1")
        ended = b.ended is not None
        iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.created))
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": {
                "processing": 0 if ended else len(b.requests),
                "succeeded": b.counts.get("succeeded", 0),
                "errored": b.counts.get("errored", 0),
                "canceled": b.counts.get("canceled", 0),
                "expired": b.counts.get("expired", 0),
            },
            "created_at": iso,
            "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.created + 86400)),
            "ended_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.ended))
            if ended and b.ended
            else None,
            "archived_at": None,
            "cancel_initiated_at": iso if b.cancelled else None,
            "results_url": f"http://{host}/v1/messages/batches/{b.id}/results" if ended else None,
        }

    # -- the queues --------------------------------------------------------------

    def openai_queue(self, b: FakeBatch) -> None:
        """A batch past its model's enqueued-token limit fails at once."""
        limit = self.queue_limits.get(b.model)
        if limit is None:
            return
        held = 0
        for other in self.batches.values():
            if other.provider == "openai" and other is not b and other.model == b.model:
                self.advance(other)
                if other.ended is None:
                    held += other.queued_tokens
        if held + b.queued_tokens <= limit:
            self.peak["openai"] = max(self.peak["openai"], held + b.queued_tokens)
            return
        self.refused["openai"] += 1
        message = self.queue_message or (
            f"Enqueued token limit reached for {b.model} in organization org-fake. "
            f"Limit: {limit:,} enqueued tokens. "
            "Please try again once some in_progress batches have been completed."
        )
        b.errors = {
            "object": "list",
            "data": [
                {"code": "token_limit_exceeded", "message": message, "param": None, "line": None}
            ],
        }
        b.status = "failed"
        b.ended = time.time()

    def processing(self, provider: str) -> int:
        """Requests of the provider's batches not ended."""
        n = 0
        for b in self.batches.values():
            if b.provider == provider:
                self.advance(b)
                if b.ended is None:
                    n += len(b.requests)
        return n

    def completed_requests(self) -> list[str]:
        """The custom ids of every batch that completed (answered), one per request."""
        out: list[str] = []
        with self.lock:
            for b in self.batches.values():
                self.advance(b)
                if b.provider == "openai" and b.status != "completed":
                    continue
                if b.ended is None or b.cancelled or b.counts.get("expired"):
                    continue
                out.extend(str(r.get("custom_id")) for r in b.requests)
        return out

    # -- the end of a batch ----------------------------------------------------

    def advance(self, b: FakeBatch) -> None:
        """End the batch once its time has come (or at once when cancelled), and
        write its results."""
        if b.ended is not None:
            return
        if not b.cancelled and time.time() < b.created + self.delay:
            return
        b.ended = time.time()
        outcome = "cancelled" if b.cancelled else self.outcome
        ok: list[str] = []
        bad: list[str] = []
        counts = {"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for r in b.requests:
            cid = str(r.get("custom_id"))
            if outcome in ("expired", "cancelled", "failed"):
                kind = {"expired": "expired", "cancelled": "canceled", "failed": "errored"}
                counts[kind[outcome]] += 1
                if b.provider == "anthropic":
                    ok.append(json.dumps({"custom_id": cid, "result": {"type": kind[outcome]}}))
                elif outcome == "expired":
                    bad.append(_oa_line(cid, None, "batch_expired", "This request expired"))
                continue
            if cid in self.errors:
                counts["errored"] += 1
                if b.provider == "anthropic":
                    err = {"type": "errored", "error": _an_error("invalid request")}
                    ok.append(json.dumps({"custom_id": cid, "result": err}))
                else:
                    body = _oa_error("invalid request")
                    bad.append(_oa_line(cid, {"status_code": 400, "body": body}, None, None))
                continue
            counts["succeeded"] += 1
            params = r.get("params") if b.provider == "anthropic" else r.get("body")
            body = dict(params or {})
            if cid in self.invalid:
                body["_fake_invalid"] = True
            path = "/v1/messages" if b.provider == "anthropic" else b.endpoint
            answer = self.bodies[cid] if cid in self.bodies else self.answer(b.provider, path, body)
            if b.provider == "anthropic":
                ok.append(
                    json.dumps(
                        {"custom_id": cid, "result": {"type": "succeeded", "message": answer}}
                    )
                )
            else:
                ok.append(_oa_line(cid, {"status_code": 200, "body": answer}, None, None))
        b.counts = counts
        extra = list(self.garbage)
        if b.provider == "anthropic":
            b.results = ("\n".join(ok + extra) + "\n").encode()
            return
        b.status = {"cancelled": "cancelled", "expired": "expired", "failed": "failed"}.get(
            outcome, "completed"
        )
        if outcome == "failed":
            return
        if ok or extra:
            fid = self._id("file-")
            self.files[fid] = (
                "batch_output",
                "output.jsonl",
                ("\n".join(ok + extra) + "\n").encode(),
            )
            b.output_file_id = fid
        if bad:
            fid = self._id("file-")
            self.files[fid] = ("batch_output", "errors.jsonl", ("\n".join(bad) + "\n").encode())
            b.error_file_id = fid


def _oa_line(
    cid: str, response: dict[str, Any] | None, code: str | None, message: str | None
) -> str:
    error = {"code": code, "message": message} if code else None
    return json.dumps(
        {"id": f"batch_req_{cid[:8]}", "custom_id": cid, "response": response, "error": error}
    )


def _oa_error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": None}}


def _an_rate_limit(message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": "rate_limit_error", "message": message}}


def _an_error(message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
