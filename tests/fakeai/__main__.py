"""Run the fake providers as their own process (for benchmarks):

    python -m tests.fakeai --port 8700 --rpm 500 --tpm 200000 --ttft 0.5 --tps 75

It prints its base URL on the first line of stdout (OpenAI's base URL is that plus
/v1, Anthropic's is that), serves until SIGTERM or SIGINT, then prints its counters
as JSON (also served while it runs at GET /_fake/stats). Usage is counted at 4
characters a token unless --fixed-usage."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from tests.fakeai.answers import Pace
from tests.fakeai.fake import FakeAI
from tests.fakeai.quota import Limits


def size(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.fakeai", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    d = Limits()
    p.add_argument("--rpm", type=int, default=d.rpm, help="requests per window, per model")
    p.add_argument("--tpm", type=int, default=d.tpm, help="OpenAI tokens per window")
    p.add_argument("--itpm", type=int, default=d.itpm, help="Anthropic input tokens per window")
    p.add_argument("--otpm", type=int, default=d.otpm, help="Anthropic output tokens per window")
    p.add_argument("--window", type=float, default=d.window, help="seconds (60: per minute)")
    p.add_argument(
        "--foreign", type=float, default=0.0, help="share of each refill another client takes"
    )
    p.add_argument(
        "--raise-at", type=float, default=0.0, help="seconds in: the limits rise (0: never)"
    )
    p.add_argument("--raise-by", type=float, default=1.0, help="... by this factor")
    p.add_argument("--ttft", type=float, default=0.0, help="seconds to the first token")
    p.add_argument("--tps", type=float, default=0.0, help="tokens per second (0: at once)")
    p.add_argument("--size", type=size, default=None, help="answer tokens, LO-HI (1500-4000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=0, help="tokens per streamed event")
    p.add_argument("--fixed-usage", action="store_true", help="the tests' fixed usage figures")
    p.add_argument(
        "--mode", action="append", default=[], metavar="PROVIDER=MODE", help="e.g. openai=500"
    )
    p.add_argument("--log", default=None, help="a file: one JSON line per provider request")
    a = p.parse_args(argv)
    try:
        a.limits = Limits(
            rpm=a.rpm,
            tpm=a.tpm,
            itpm=a.itpm,
            otpm=a.otpm,
            window=a.window,
            foreign=a.foreign,
            raise_at=a.raise_at,
            raise_by=a.raise_by,
        )
    except ValueError as e:
        p.error(str(e))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    fake = FakeAI(
        pace=Pace(ttft=a.ttft, tps=a.tps, size=a.size, seed=a.seed, chunk=a.chunk),
        limits=a.limits,
        fixed_usage=a.fixed_usage,
        port=a.port,
        host=a.host,
    )
    if a.log:
        fake.request_log = open(a.log, "a")  # noqa: SIM115 - open while the fake serves
    for item in a.mode:
        provider, _, mode = item.partition("=")
        fake.modes[provider] = mode
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fake.start()
    print(fake.url, flush=True)
    while not stop.wait(0.5):
        pass
    fake.stop()
    print(json.dumps(fake.stats()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
