"""A threaded HTTP server on a loopback port for the fakes (AI providers, Supabase):
one thread per connection, a listen backlog deep enough for hundreds of clients
connecting at once, and the writes a streamed answer needs (chunked transfer
encoding, so that a stream cut short is seen as one by the client)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # the default 5 drops connections when hundreds arrive at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeout test) is expected, not noise


class HTTPFake:
    """A threaded HTTP server on a free loopback port (or the one given);
    subclasses answer requests."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
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

        self.server = QuietServer((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
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
        upto: int | None = None,
    ) -> None:
        """Answer `data` (bytes, or JSON of it); with `upto`, only that many bytes of
        it after a Content-Length of the whole (a body cut short)."""
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        try:
            h.send_response(status)
            h.send_header("content-type", content_type)
            h.send_header("content-length", str(len(raw)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(raw if upto is None else raw[:upto])
        except OSError:
            pass  # the client went away (it timed out)

    @staticmethod
    def open_stream(h: BaseHTTPRequestHandler, headers: dict[str, str]) -> None:
        """Start a 200 server-sent-events answer in chunked transfer encoding (an
        HTTP/1.1 status line on this one response; the connection closes after it)."""
        h.protocol_version = "HTTP/1.1"
        h.close_connection = True
        h.send_response(200)
        h.send_header("content-type", "text/event-stream; charset=utf-8")
        h.send_header("transfer-encoding", "chunked")
        h.send_header("cache-control", "no-cache")
        h.send_header("connection", "close")
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()

    @staticmethod
    def write_chunk(h: BaseHTTPRequestHandler, data: bytes) -> None:
        """One chunk of a stream (an empty one ends it); OSError when the client left."""
        h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n")
