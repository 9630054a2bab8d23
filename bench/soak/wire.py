"""A host's link with delay and loss in user space, for kernels without netem.

`python -m bench.soak.wire NAME...` makes two TAP devices per name, `skv-NAME`
(left in the root namespace, for the bridge) and `skt-NAME` (moved into the
host's namespace by the caller, where it becomes eth0), and passes every
Ethernet frame from one to the other. Frames pass at once until a line on
standard input shapes a link:

    NAME DELAY_MS JITTER_MS LOSS_PCT   each frame either way dropped with
                                       LOSS_PCT% probability, the rest held
                                       DELAY_MS +- JITTER_MS (order kept)
    NAME clear                         back to passing at once
    NAME count                         frames passed and dropped so far

It prints `ready` once every device is made, and `ok` after each line it took
(`ok PASSED DROPPED` after a count), `error ...` after one it could not.
The devices are not persistent: they go when this process ends, and with them
the hosts' links. As netem does, the loss is per frame and random (the
generator is seeded by `--seed`), so TCP sees real drops and retransmits."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import random
import struct
import sys
import time
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
FRAME_MAX = 65536


def tap(name: str) -> int:
    """A new TAP device `name`; its file descriptor (non-blocking)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


@dataclass
class Shape:
    delay: float = 0.0  # seconds
    jitter: float = 0.0
    loss: float = 0.0  # probability

    @classmethod
    def parse(cls, words: list[str]) -> Shape:
        if words == ["clear"]:
            return cls()
        delay, jitter, loss = (float(w) for w in words)
        if not (delay >= 0 and jitter >= 0 and 0 <= loss <= 100):
            raise ValueError(f"bad shape {' '.join(words)!r}")
        return cls(delay / 1000, jitter / 1000, loss / 100)


class Link:
    """One host's link: frames from `a` go to `b` and back, shaped alike both ways."""

    def __init__(self, loop: asyncio.AbstractEventLoop, a: int, b: int, rng: random.Random):
        self.loop, self.rng = loop, rng
        self.shape = Shape()
        self.last = {a: 0.0, b: 0.0}  # per destination: when its last frame goes out
        self.passed = self.dropped = 0
        loop.add_reader(a, self._read, a, b)
        loop.add_reader(b, self._read, b, a)

    def _read(self, src: int, dst: int) -> None:
        while True:
            try:
                frame = os.read(src, FRAME_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the device is down (a cut link): nothing to read
                return
            self._pass(frame, dst)

    def _pass(self, frame: bytes, dst: int) -> None:
        s = self.shape
        if s.loss and self.rng.random() < s.loss:
            self.dropped += 1
            return
        self.passed += 1
        if not s.delay and not s.jitter:
            _write(dst, frame)
            return
        due = time.monotonic() + s.delay + self.rng.uniform(-s.jitter, s.jitter)
        due = self.last[dst] = max(due, self.last[dst])  # in order, as TCP expects of a link
        self.loop.call_at(self.loop.time() + (due - time.monotonic()), _write, dst, frame)


def _write(fd: int, frame: bytes) -> None:
    try:  # noqa: SIM105 - once per frame: a bare try is the cheapest
        os.write(fd, frame)
    except OSError:  # the other side is down (a cut link): the frame is lost
        pass


async def serve(names: list[str], seed: int) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    links = {n: Link(loop, tap(f"skv-{n}"), tap(f"skt-{n}"), rng) for n in names}
    print("ready", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        words = line.decode(errors="replace").split()
        try:
            link = links[words[0]]
            if words[1:] == ["count"]:
                print(f"ok {link.passed} {link.dropped}", flush=True)
                continue
            link.shape = Shape.parse(words[1:])
        except (IndexError, KeyError, ValueError) as exc:
            print(f"error {exc!r}", flush=True)
            continue
        print("ok", flush=True)
    # Standard input closed: the soak is over (or died); the devices go with us.


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.soak.wire", description=__doc__)
    p.add_argument("names", nargs="+")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    asyncio.run(serve(a.names, a.seed))


if __name__ == "__main__":
    main()
