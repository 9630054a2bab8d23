"""The worker side of a measurement, run as its own process
(`python -m bench.child SYSTEM --url ... --mode latency|drain`), so that no worker
shares an event loop or a core's time slices with the load generator.

Protocol with bench.proc on stdin/stdout, one word a line:
  child  -> "ready"     set up (imports, connections) and waiting
  parent -> "go"        start working now
  child  -> "s"         (latency mode) a handler started; sent after the timestamp
  child  -> "drained"   (drain mode) the expected number of jobs have started
  parent -> "stop"      (or end of stdin) stop gracefully
The handler timestamps go to --out as JSON when the worker has stopped."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Recorder:
    """What handlers call first thing: the time they started, per job key."""

    mode: str  # "latency" keeps every key's time; "drain" counts only
    expect: int  # stop by itself after this many (0: wait for "stop")
    stop: asyncio.Event
    loop: asyncio.AbstractEventLoop
    starts: dict[str, float] = field(default_factory=dict)
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    t_go: float = 0.0
    cpu_go: float = 0.0
    cpu_drained: float = 0.0

    def hit(self, key: str) -> None:
        t = time.time()
        self.count += 1
        self.last = t
        if self.count == 1:
            self.first = t
        if self.mode == "latency":
            self.starts[key] = t
            _say("s")
        if self.expect and self.count == self.expect:
            self.cpu_drained = time.process_time()
            if self.mode == "drain":
                _say("drained")
            # Handlers may run on another thread (the floor's blocking loops).
            self.loop.call_soon_threadsafe(self.stop.set)

    def result(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "first": self.first,
            "last": self.last,
            "t_go": self.t_go,
            "cpu_s": (self.cpu_drained or time.process_time()) - self.cpu_go,
            "starts": self.starts,
        }


def _say(word: str) -> None:
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


def _stdin_reader(loop: asyncio.AbstractEventLoop, go: asyncio.Event, stop: asyncio.Event) -> None:
    for line in sys.stdin:
        word = line.strip()
        if word == "go":
            loop.call_soon_threadsafe(go.set)
        elif word == "stop":
            break
    loop.call_soon_threadsafe(go.set)  # end of stdin also releases a waiting start
    loop.call_soon_threadsafe(stop.set)


async def serve(opts: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    go, stop = asyncio.Event(), asyncio.Event()
    rec = Recorder(opts.mode, opts.expect, stop, loop)
    system = importlib.import_module(f"bench.systems.{opts.system}")
    threading.Thread(target=_stdin_reader, args=(loop, go, stop), daemon=True).start()
    async with system.worker(opts, rec) as run:
        _say("ready")
        await go.wait()
        if stop.is_set():
            return rec.result()
        rec.t_go = time.time()
        rec.cpu_go = time.process_time()
        profiler = _start_profiler(opts.profile)
        await run(stop)
        _stop_profiler(profiler, opts.profile)
    return rec.result()


def _start_profiler(path: str | None) -> Any:
    if not path:
        return None
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    return profiler


def _stop_profiler(profiler: Any, path: str | None) -> None:
    if profiler is None or not path:
        return
    session = profiler.stop()
    from bench.profile import summarize

    with open(path, "w", encoding="utf-8") as f:
        json.dump(summarize(session, profiler), f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.child")
    p.add_argument("system")
    p.add_argument("--url", required=True)
    p.add_argument("--mode", choices=("latency", "drain"), required=True)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--profile", default=None)
    p.add_argument("--storage", default=None)
    opts = p.parse_args()
    system = importlib.import_module(f"bench.systems.{opts.system}")
    runner = getattr(system, "run_loop", asyncio.run)
    result = runner(serve(opts))
    with open(opts.out, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
