"""pgqueuer running the same course call as ai-jobs, as its own process
(`python -m bench.ai.pgq_worker --url ... --fake ... --limit N --records FILE`).

The handler is ai-jobs' own OpenAI call (listener.providers.openai: the same
prompt, schema, max_tokens and timeout, the SDK's retries off), the answer checked
with the same validator and written to a file, as a pgqueuer user would write it.
pgqueuer 1.6 has one rate control per entrypoint, `concurrency_limit` (enforced
in its dequeue SQL across all workers); it is set to the calls in flight that the
quota allows (Little's law: calls per minute x a call's mean length). A 429 is
given back to pgqueuer with the provider's `retry-after` (`RetryRequested`), any
other failure retried with backoff, and a job failing `MAX_ATTEMPTS` times is
recorded dead (the dead letter's equivalent). Each attempt writes one JSON line
to --records: the job's number, user, times, outcome, output tokens.

Protocol with the bench: "ready" on stdout once connected; runs until "stop" or
the end of stdin."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

MAX_ATTEMPTS = 4  # ai-jobs' default: MAX_RETRIES=3 failed attempts, then the dead letter
ENTRYPOINT = "course"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.ai.pgq_worker")
    p.add_argument("--url", required=True)
    p.add_argument("--fake", required=True, help="the fake's base URL")
    p.add_argument("--limit", type=int, required=True, help="the entrypoint's concurrency_limit")
    p.add_argument("--max-tasks", type=int, default=50, help="max_concurrent_tasks per process")
    p.add_argument("--timeout", type=float, required=True, help="AI_TIMEOUT_SECONDS")
    p.add_argument("--max-output", type=int, required=True)
    p.add_argument("--retry-base", type=float, required=True)
    p.add_argument("--records", type=Path, required=True)
    p.add_argument("--storage", type=Path, required=True)
    return p.parse_args(argv)


async def serve(opts: argparse.Namespace) -> None:
    import logging

    import asyncpg
    import openai
    from pgqueuer import RetryRequested
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pydantic import SecretStr

    from bench.systems.pgqueuer_sys import _dsn
    from listener.course_schema import parse_course
    from listener.handlers.course import parse_params
    from listener.prompts import course_prompt
    from listener.providers.base import retry_after
    from listener.providers.openai import OpenAIProvider
    from listener.settings import Settings
    from tests.fakeai import FAKE_OPENAI_KEY

    logging.getLogger("pgqueuer").setLevel(logging.ERROR)
    settings = Settings(
        openai_api_key=SecretStr(FAKE_OPENAI_KEY),
        openai_base_url=f"{opts.fake}/v1",
        ai_timeout_seconds=opts.timeout,
        ai_max_output_tokens=opts.max_output,
    )
    provider = OpenAIProvider(settings)
    params = parse_params({})
    records = opts.records.open("a", buffering=1)
    opts.storage.mkdir(parents=True, exist_ok=True)

    def record(
        job: Job, data: dict[str, Any], started: float, outcome: str, out: int = 0, inp: int = 0
    ) -> None:
        line = {
            "n": data["n"],
            "user": data["user"],
            "created": job.created.timestamp(),
            "started": started,
            "ended": time.time(),
            "attempt": job.attempts,
            "outcome": outcome,
            "out_tokens": out,
            "in_tokens": inp,
        }
        records.write(json.dumps(line) + "\n")

    conn = await asyncpg.connect(_dsn(opts.url))
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint(ENTRYPOINT, concurrency_limit=opts.limit)
    async def handler(job: Job) -> None:
        started = time.time()
        data = json.loads(job.payload or b"{}")
        prompt = course_prompt(data["subject"], data["course_id"], params)
        try:
            answer = await provider.course(prompt)
            course = parse_course(answer.text, params)
            path = opts.storage / f"{data['course_id']}.json"
            await asyncio.to_thread(path.write_text, course.model_dump_json(indent=1))
        except openai.RateLimitError as exc:
            record(job, data, started, "429")
            wait = retry_after(exc)
            raise RetryRequested(delay=timedelta(seconds=1.0 if wait is None else wait)) from exc
        except Exception as exc:
            if job.attempts + 1 >= MAX_ATTEMPTS:
                record(job, data, started, "dead")
                return
            record(job, data, started, "error")
            delay = opts.retry_base * 2**job.attempts
            raise RetryRequested(delay=timedelta(seconds=delay)) from exc
        usage = answer.usage
        record(job, data, started, "done", usage.output_tokens, usage.input_tokens)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read_stdin, daemon=True).start()
    print("ready", flush=True)
    task = asyncio.create_task(qm.run(batch_size=10, max_concurrent_tasks=max(20, opts.max_tasks)))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    qm.shutdown.set()
    stopper.cancel()
    try:
        async with asyncio.timeout(5):
            await task
    except TimeoutError:
        task.cancel()
    await provider.aclose()
    await conn.close()
    records.close()


def main() -> None:
    import uvloop

    uvloop.run(serve(parse(sys.argv[1:])))


if __name__ == "__main__":
    main()
