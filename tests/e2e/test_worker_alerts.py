"""The real worker evaluates the alert rules on its timer and posts a firing
transition, once, to ALERT_WEBHOOK_URL (a local HTTP server here)."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.helpers import connect, wait_until
from tests.workers import WorkerProcess


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook/secret-path", received
    finally:
        server.shutdown()
        server.server_close()


def test_worker_posts_a_firing_alert_once(
    db_url: str, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhook
    with connect(db_url) as c:  # 5 jobs due in an hour: pending, and staying so
        c.execute(
            "insert into ai_course_jobs (subject, run_after)"
            " select 's' || g, now() + interval '1 hour' from generate_series(1, 5) g"
        )
    w = WorkerProcess(
        db_url, ALERT_WEBHOOK_URL=url, ALERT_INTERVAL_SECONDS=0.2, ALERT_PENDING_DEPTH=2
    ).started()
    try:
        wait_until(lambda: received, timeout=15, what="a webhook post")
        w.wait_for("alert_firing", timeout=5)
        # every tick samples the rejection counter: let several more ticks pass
        wait_until(lambda: _samples(db_url) >= 6, timeout=15, what="more alert ticks")
        ticks = len(w.actions("alert_firing"))
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
    text = json.dumps(received[0])
    assert "pending_depth" in text and "secret-path" not in w.log()
    assert ticks == 1 and len(received) == 1  # a transition, not one post per tick


def _samples(db_url: str) -> int:
    with connect(db_url) as c:
        return int(c.execute("select count(*) from ai_job_counter_samples").fetchone()["count"])
