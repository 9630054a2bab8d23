"""The real worker behind a fault-injecting proxy (tests/faultproxy.py): every
connection dropped, half-open (blackholed), muted (notifications lost while
queries answer) or slowed. The worker is deaf for no longer than the probe
interval plus the probe's timeout, finds what was inserted meanwhile, runs
nothing twice and never exits."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from listener.listen import PROBE_TIMEOUT
from tests.faultproxy import FaultProxy
from tests.helpers import AI_JOBS, connect, env, insert_course, job, wait_until
from tests.workers import WorkerProcess

# Worker and command-line processes, probe cycles: beyond the default 60 s when busy.
pytestmark = pytest.mark.timeout(120)

PROBE = 1.0  # LISTEN_PROBE_SECONDS for these tests
DEAF_WITHIN = PROBE + PROBE_TIMEOUT  # what the issue allows
SLACK = 1.5  # scheduling on a loaded 2-core machine, and the catch-up itself


@pytest.fixture
def proxied(db_url: str) -> Iterator[tuple[FaultProxy, WorkerProcess]]:
    proxy = FaultProxy(db_url).start()
    w = WorkerProcess(proxy.url(db_url), LISTEN_PROBE_SECONDS=PROBE).started()
    try:
        with connect(db_url) as c:  # warm: the pool holds connections to lose
            warm = insert_course(c, "warm-up")
        wait_until(lambda: _row(db_url, warm)["status"] == "done", what="warm-up done")
        yield proxy, w
        assert w.proc.poll() is None  # never exited
    finally:
        if w.proc.poll() is None:
            w.signal(signal.SIGTERM)
        assert w.wait() == 0
        proxy.stop()


def _row(url: str, jid: str) -> dict[str, Any]:
    with connect(url) as c:
        return job(c, jid)


def _ran_once(w: WorkerProcess, jid: str) -> None:
    starts = Counter(e["job_id"] for e in w.actions("job_started"))
    assert starts[jid] == 1, starts


def _after(ts: float) -> Any:
    return lambda e: e["ts"] >= ts


def test_a_muted_listen_connection_is_found_deaf_and_replaced(
    proxied: tuple[FaultProxy, WorkerProcess], db_url: str
) -> None:
    proxy, w = proxied
    t0 = time.time()
    assert proxy.mute() >= 2  # the LISTEN connection and the pool's: queries still answer
    with connect(db_url) as c:
        jid = insert_course(c, "notification lost")
    deaf = w.wait_for("listener_deaf", timeout=DEAF_WITHIN + 10)
    assert deaf["ts"] - t0 <= DEAF_WITHIN + SLACK
    back = w.wait_for("listener_healthy", _after(deaf["ts"]), timeout=10)
    assert "hears the channel again" in back["message"]
    wait_until(lambda: _row(db_url, jid)["status"] == "done", what="the unheard job done")
    row = _row(db_url, jid)
    assert (row["started_at"] - row["created_at"]).total_seconds() <= DEAF_WITHIN + SLACK
    _ran_once(w, jid)
    assert len(w.actions("listener_deaf")) == 1


def test_a_half_open_connection_is_found_and_replaced(
    proxied: tuple[FaultProxy, WorkerProcess], db_url: str
) -> None:
    proxy, w = proxied
    t0 = time.time()
    assert proxy.blackhole() >= 2  # every open connection: writes accepted, nothing back
    with connect(db_url) as c:
        jid = insert_course(c, "while half-open")
    # Found by the probe that never comes back (deaf), or sooner: the pool's
    # connections, shut down by the medic, come back fresh, and the database's
    # return has the LISTEN connection pinged and left for a fresh one (replaced).
    found = wait_until(
        lambda: w.actions("listener_deaf") + w.actions("listener_replaced"),
        timeout=DEAF_WITHIN + 10,
        what="the LISTEN connection left",
    )
    assert min(e["ts"] for e in found) - t0 <= DEAF_WITHIN + SLACK
    wait_until(lambda: _row(db_url, jid)["status"] == "done", what="the unheard job done")
    row = _row(db_url, jid)
    assert (row["started_at"] - row["created_at"]).total_seconds() <= DEAF_WITHIN + SLACK
    _ran_once(w, jid)
    with connect(db_url) as c:  # and the worker hears again
        later = insert_course(c, "after the reconnect")
    wait_until(lambda: _row(db_url, later)["status"] == "done", timeout=5, what="later done")
    _ran_once(w, later)


def test_dropped_connections_jobs_start_within_two_seconds(
    proxied: tuple[FaultProxy, WorkerProcess], db_url: str
) -> None:
    proxy, w = proxied
    proxy.refusing = True  # the worker cannot come back before the job is in
    assert proxy.drop() >= 2
    w.wait_for("listener_unhealthy")
    with connect(db_url) as c:
        jid = insert_course(c, "while dropped")
        back = c.execute("select clock_timestamp() as t").fetchone()["t"]  # type: ignore[index]
    proxy.refusing = False
    wait_until(lambda: _row(db_url, jid)["status"] == "done", what="the unheard job done")
    assert (_row(db_url, jid)["started_at"] - back).total_seconds() < 2.0
    _ran_once(w, jid)


def _workers(url: str) -> list[dict[str, Any]]:
    p = subprocess.run(
        [*AI_JOBS, "workers", "--json"], env=env(url), capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 0, p.stderr
    return list(json.loads(p.stdout))


def _alert(url: str, rule: str) -> dict[str, Any]:
    p = subprocess.run(
        [*AI_JOBS, "alerts", "--json"], env=env(url), capture_output=True, text=True, timeout=30
    )
    return next(a for a in json.loads(p.stdout)["alerts"] if a["rule"] == rule)


def test_a_worker_that_stays_deaf_says_so_and_keeps_working(
    proxied: tuple[FaultProxy, WorkerProcess], db_url: str
) -> None:
    proxy, w = proxied
    proxy.muting = True  # every connection, the new ones too, loses its notifications
    proxy.mute()
    wait_until(lambda: [r["listener_state"] for r in _workers(db_url)] == ["deaf"], timeout=20)
    assert _alert(db_url, "worker_deaf")["firing"]
    with connect(db_url) as c:  # unheard: found by the catch-up after each reconnect
        jid = insert_course(c, "while deaf")
    wait_until(lambda: _row(db_url, jid)["status"] == "done", timeout=DEAF_WITHIN + 10)
    _ran_once(w, jid)
    assert len(w.actions("listener_deaf")) == 1  # a transition, not every missed probe
    proxy.muting = False
    wait_until(lambda: [r["listener_state"] for r in _workers(db_url)] == ["listening"], 20)
    assert not _alert(db_url, "worker_deaf")["firing"]
    row = _workers(db_url)[0]
    assert row["reconnects"] >= 2 and row["pid"] == w.pid


def test_a_slow_network_is_slow_not_deaf(
    proxied: tuple[FaultProxy, WorkerProcess], db_url: str
) -> None:
    proxy, w = proxied
    proxy.set_delay(0.2)  # each way, on every connection
    wait_until(
        lambda: (_workers(db_url)[0]["probe_seconds"] or 0) >= 0.4,
        timeout=15,
        what="a probe round trip through the slow network",
    )
    with connect(db_url) as c:
        jid = insert_course(c, "through a slow network")
    wait_until(lambda: _row(db_url, jid)["status"] == "done", timeout=10)
    assert not w.actions("listener_deaf") and not w.actions("listener_unhealthy")
