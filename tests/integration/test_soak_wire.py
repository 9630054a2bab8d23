"""The soak's wire (bench/soak/wire.py): a host's link through user space, with
the delay and the random loss the `netem` fault asks for where the kernel has no
netem. A real TCP connection crosses it, from a network namespace of the test's
own to the root namespace."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bench.soak import wire

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and iproute2",
)

ROUND_TRIPS = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n, took = int(sys.argv[3]), []
for _ in range(n):
    t = time.monotonic()
    s.sendall(b"x" * 600)
    got = 0
    while got < 600:
        got += len(s.recv(600 - got))
    took.append(time.monotonic() - t)
took.sort()
print(took[len(took) // 2])
"""


@dataclass
class Wired:
    wire: subprocess.Popen[str]
    name: str
    ns: str
    server: tuple[str, int]

    def tell(self, line: str) -> str:
        assert self.wire.stdin is not None and self.wire.stdout is not None
        self.wire.stdin.write(line + "\n")
        self.wire.stdin.flush()
        return self.wire.stdout.readline().strip()

    def round_trips(self, n: int) -> float:
        """The median of n echoed round trips from the namespace, in seconds."""
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                sys.executable,
                "-c",
                ROUND_TRIPS,
                *map(str, self.server),
                str(n),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return float(out.stdout)

    def count(self) -> tuple[int, int]:
        ok, passed, dropped = self.tell(f"{self.name} count").split()
        assert ok == "ok"
        return int(passed), int(dropped)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def wired() -> Iterator[Wired]:
    n = os.getpid() % 200 + 20
    name, ns, root, host = f"tw{n}", f"tw-{n}", f"10.234.{n}.1", f"10.234.{n}.2"
    wire = subprocess.Popen(
        [sys.executable, "-m", "bench.soak.wire", "--seed", "7", name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    echo: socket.socket | None = None  # bound once the link is up
    try:
        assert wire.stdout is not None and wire.stdout.readline().strip() == "ready"
        _ip("netns", "add", ns)
        _ip("link", "set", f"skt-{name}", "netns", ns)
        _ip("-n", ns, "link", "set", f"skt-{name}", "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{host}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("addr", "add", f"{root}/24", "dev", f"skv-{name}")
        _ip("link", "set", f"skv-{name}", "up")
        echo = socket.create_server((root, 0))
        threading.Thread(target=_echo, args=(echo,), daemon=True).start()
        yield Wired(wire, name, ns, (root, echo.getsockname()[1]))
    finally:
        if echo is not None:
            echo.close()
        wire.kill()
        wire.communicate(timeout=10)  # and its pipes closed
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _echo(server: socket.socket) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:  # closed at the end of the test
            return
        threading.Thread(target=_echo_one, args=(conn,), daemon=True).start()


def _echo_one(conn: socket.socket) -> None:
    # The client may close with an echo still in flight (sent again after a
    # drop): its reset ends the echo, not the test.
    with conn, contextlib.suppress(ConnectionError):
        while data := conn.recv(65536):
            conn.sendall(data)


def test_frames_pass_then_wait_the_delay_asked_then_pass_again(wired: Wired) -> None:
    assert wired.round_trips(50) < 0.02
    assert wired.tell(f"{wired.name} 50 10 0") == "ok"  # 50 ms +- 10 each way
    delayed = wired.round_trips(20)
    assert 0.08 <= delayed <= 0.3, delayed
    assert wired.tell(f"{wired.name} clear") == "ok"
    assert wired.round_trips(50) < 0.02


def test_random_loss_drops_frames_and_tcp_still_gets_through(wired: Wired) -> None:
    wired.round_trips(20)
    passed, dropped = wired.count()
    assert passed > 40 and dropped == 0
    assert wired.tell(f"{wired.name} 0 0 10") == "ok"
    wired.round_trips(40)  # completes: TCP sends again what was dropped
    passed2, dropped2 = wired.count()
    assert dropped2 > dropped and passed2 > passed + 80
    assert wired.tell(f"{wired.name} clear") == "ok"
    wired.round_trips(20)
    assert wired.count()[1] == dropped2  # nothing dropped once cleared


def test_the_share_dropped_is_the_share_asked() -> None:
    """Per frame, at random: over many frames, the share asked (seeded, so exact)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    loop = asyncio.new_event_loop()
    try:
        link = wire.Link(loop, r, w, random.Random(1))
        link.shape = wire.Shape.parse(["0", "0", "20"])
        for _ in range(5000):
            link._pass(b"frame", w)
            with contextlib.suppress(BlockingIOError):
                os.read(r, 65536)
    finally:
        loop.close()
        os.close(r)
        os.close(w)
    assert link.passed + link.dropped == 5000
    assert 900 <= link.dropped <= 1100, link.dropped


def test_bad_lines_are_refused_and_the_wire_goes_on(wired: Wired) -> None:
    for line in (
        "",
        "nosuchhost clear",
        f"{wired.name} 1 2",
        f"{wired.name} -5 0 0",
        f"{wired.name} 0 0 101",
        f"{wired.name} a b c",
        "\u00e9\u00e9 count",
    ):
        assert wired.tell(line).startswith("error"), line
    assert wired.round_trips(20) < 0.02
