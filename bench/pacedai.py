"""A paced OpenAI for hundreds of concurrent streams (bench/streaming.py `steady`).

    python -m bench.pacedai --ttft 0.5 --tps 75 --size 1500-4000 [--chunk 1]

The project's fake providers (tests/fakeai) serve each connection on a thread of
its own: right for the tests' modes and quotas, but at 500 streams of 75 tokens
a second its threads, under one interpreter lock, deliver less than half the
pace on two cores. This one serves only what that measurement needs, on one
asyncio loop: `POST /v1/chat/completions` with `stream: true`, the answer the
project's fake would give (a course from the prompt, sized from `--size` like
tests/fakeai's Pace, in OpenAI's chunk events from tests/fakeai/answers.py, the
usage chunk when asked), each token sent when it is due. One timer walks every
open stream every `--tick` seconds and writes what came due in one write per
stream: the events are as small as asked (`--chunk` tokens each, 1 as OpenAI
sends them), only their writes are grouped, as a TCP stream groups them anyway.

It prints its base URL on the first line (OpenAI's base URL is that plus /v1)
and serves until SIGTERM; `GET /_stats` answers its counters: streams open,
started and completed, tokens sent, and the time they were read."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tests.fakeai.answers import CHARS_PER_TOKEN, OpenAIStream, Pace, course_from_prompt, sized


@dataclass(eq=False)
class Stream:
    writer: asyncio.StreamWriter
    events: list[bytes]  # one per `chunk` tokens, the first carrying the role
    tokens: list[int]  # tokens sent once events[i] has gone out
    start: float
    closing: bytes
    sent: int = 0  # events written
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class PacedAI:
    def __init__(self, pace: Pace, tick: float) -> None:
        self.pace, self.tick = pace, tick
        self.open: set[Stream] = set()
        self.asked: dict[str, int] = {}
        self.stats: dict[str, int] = {"started": 0, "completed": 0, "abandoned": 0, "tokens": 0}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (x.partition(":") for x in lines[1:] if x)
                }
                n = int(headers.get("content-length") or 0)
                body = await reader.readexactly(n) if n else b""
                if not await self.answer(method, path, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def answer(
        self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection is to close."""
        if method == "GET" and path == "/_stats":
            self.send(writer, 200, {**self.stats, "open": len(self.open), "t": time.time()})
            return True
        if method != "POST" or path.rstrip("/") != "/v1/chat/completions":
            self.send(writer, 404, {"error": {"message": f"no route {path}", "type": "not_found"}})
            return True
        try:
            body = json.loads(raw)
            user = next(str(m["content"]) for m in body["messages"] if m["role"] == "user")
        except (ValueError, KeyError, StopIteration, TypeError):
            self.send(writer, 400, {"error": {"message": "bad request", "type": "invalid"}})
            return True
        if not body.get("stream"):
            self.send(writer, 400, {"error": {"message": "stream only", "type": "invalid"}})
            return True
        nth = self.asked.get(user, 0)
        self.asked[user] = nth + 1
        text = json.dumps(sized(course_from_prompt(user), self.pace.draw(user, nth) or 2750))
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        s = OpenAIStream(str(body.get("model") or "gpt-4o-mini"), include, False)
        step = self.pace.chunk_tokens() * CHARS_PER_TOKEN
        events, through = [], []
        for i in range(0, len(text), step):
            end = min(i + step, len(text))
            events.append((b"" if i else s.first()) + s.delta(text[i:end]))
            through.append(-(-end // CHARS_PER_TOKEN))
        done = through[-1]
        usage = {
            "prompt_tokens": 120,
            "completion_tokens": done,
            "total_tokens": 120 + done,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
        )
        stream = Stream(writer, events, through, time.monotonic(), s.closing("stop", usage))
        self.open.add(stream)
        self.stats["started"] += 1
        try:
            await stream.done
        finally:
            self.open.discard(stream)
        return not writer.is_closing()

    @staticmethod
    def send(writer: asyncio.StreamWriter, status: int, data: Any) -> None:
        raw = json.dumps(data).encode()
        writer.write(
            b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(raw), raw)
        )

    async def ticker(self) -> None:
        """Every `tick`: each open stream's events that came due, in one write."""
        pace = self.pace
        while True:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            for s in list(self.open):
                if s.writer.is_closing():
                    self.stats["abandoned"] += 1
                    self.open.discard(s)
                    s.done.set_result(None)
                    continue
                # events due: the n-th token is due at start + ttft + (n - 1) / tps
                due = now - s.start - pace.ttft
                if due < 0:
                    continue
                ready = int(due * pace.tps) + 1 if pace.tps else s.tokens[-1]
                k = s.sent
                while k < len(s.events) and s.tokens[k] <= ready:
                    k += 1
                if k == s.sent:
                    continue
                data = b"".join(s.events[s.sent : k])
                last = k == len(s.events)
                if last:
                    data += s.closing
                out = b"%x\r\n%s\r\n" % (len(data), data)
                if last:
                    out += b"0\r\n\r\n"
                s.writer.write(out)
                self.stats["tokens"] += s.tokens[k - 1] - (s.tokens[s.sent - 1] if s.sent else 0)
                s.sent = k
                if last:
                    self.stats["completed"] += 1
                    self.open.discard(s)
                    s.done.set_result(None)


async def amain(a: argparse.Namespace) -> None:
    fake = PacedAI(Pace(ttft=a.ttft, tps=a.tps, size=a.size, seed=a.seed, chunk=a.chunk), a.tick)
    server = await asyncio.start_server(fake.serve, a.host, a.port, backlog=2048)
    port = server.sockets[0].getsockname()[1]
    print(f"http://{a.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tick = asyncio.create_task(fake.ticker())
    async with server:
        await stop.wait()
    tick.cancel()
    print(json.dumps(fake.stats), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pacedai", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ttft", type=float, default=0.5)
    p.add_argument("--tps", type=float, default=75.0)
    p.add_argument(
        "--size",
        type=lambda t: tuple(int(x) for x in (t.split("-") * 2)[:2]),
        default=(1500, 4000),
        help="answer tokens, LO-HI",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=1, help="tokens per event (1: as OpenAI)")
    p.add_argument("--tick", type=float, default=0.05, help="seconds between writes")
    asyncio.run(amain(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
