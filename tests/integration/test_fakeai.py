"""The fake providers as the real SDKs see them: streams in each provider's events,
usage, rate-limit headers, quotas that refuse and refill, the pace, broken streams,
and the fake as its own process. No database."""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import anthropic
import httpx
import openai
import pytest

from listener.course_schema import CourseParams, parse_course
from tests import fakeai
from tests.fakeai import FAKE_ANTHROPIC_KEY, FAKE_OPENAI_KEY, FakeAI, Limits, Pace
from tests.fakeai.answers import course_from_prompt, sized, tokens
from tests.fakeai.quota import go_duration, rfc3339
from tests.helpers import ROOT, await_until, wait_until

pytestmark = pytest.mark.timeout(60)

PROMPT = "Write a course on: Tides\nGroups: 2\nItems per group: 3"
PARAMS = CourseParams(group_count=2, items_per_group=3)
MESSAGES: Any = [
    {"role": "system", "content": "You write courses."},
    {"role": "user", "content": PROMPT},
]
TOOL: Any = {"name": "save_course", "description": "Save it.", "input_schema": {"type": "object"}}
DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+(\.\d+)?s$|^\d+ms$")


@pytest.fixture
def fake() -> Iterator[FakeAI]:
    with fakeai.running(fixed_usage=False) as f:
        yield f


def oai(fake: FakeAI, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key=FAKE_OPENAI_KEY, base_url=fake.openai_url, max_retries=0, **kw)


def ant(fake: FakeAI, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=FAKE_ANTHROPIC_KEY, base_url=fake.anthropic_url, max_retries=0, **kw
    )


def chat(c: openai.OpenAI, raw: bool = False, model: str = "gpt-4.1-mini", **kw: Any) -> Any:
    api = c.chat.completions.with_raw_response if raw else c.chat.completions
    return api.create(model=model, messages=MESSAGES, **kw)


def message(
    a: anthropic.Anthropic, raw: bool = False, model: str = "claude-haiku-4-5", **kw: Any
) -> Any:
    kw.setdefault("max_tokens", 4000)
    api = a.messages.with_raw_response if raw else a.messages
    return api.create(model=model, messages=[{"role": "user", "content": PROMPT}], **kw)


def seconds(duration: str) -> float:
    """An OpenAI reset duration (6m0s, 1m30.5s, 59ms) in seconds."""
    if duration.endswith("ms"):
        return int(duration[:-2]) / 1000
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?([\d.]+)s", duration)
    assert parts, duration
    h, m, s = parts.groups()
    return int(h or 0) * 3600 + int(m or 0) * 60 + float(s)


# -- streams, sizes and usage ------------------------------------------------------


def test_openai_streams_a_sized_course_with_its_usage(fake: FakeAI) -> None:
    fake.pace = Pace(size=(1500, 4000), seed=7)
    with oai(fake) as c:
        chunks = list(chat(c, stream=True, stream_options={"include_usage": True}))
        whole = chat(c)  # the same request again, not streamed
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 10
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    parse_course(text, PARAMS)  # a valid course, padded to its drawn size
    assert usage.completion_tokens == tokens(text) == math.ceil(len(text) / 4)
    assert 1500 <= usage.completion_tokens <= 4000
    assert usage.prompt_tokens == whole.usage.prompt_tokens > 0
    # The second ask draws its own size, and the answer not streamed is a course too.
    content = whole.choices[0].message.content
    parse_course(content, PARAMS)
    assert whole.usage.completion_tokens == tokens(content) != usage.completion_tokens


def test_sizes_repeat_with_the_seed() -> None:
    def sizes(seed: int) -> list[int]:
        pace = Pace(size=(1500, 4000), seed=seed)
        with fakeai.running(pace=pace, fixed_usage=False) as f, oai(f) as c:
            return [chat(c).usage.completion_tokens for _ in range(4)]

    first = sizes(1)
    assert sizes(1) == first and sizes(2) != first
    assert len(set(first)) == 4 and all(1500 <= n <= 4000 for n in first)


def test_a_course_sized_to_a_token_count_is_still_a_course() -> None:
    course = sized(course_from_prompt(PROMPT), 2000)
    text = json.dumps(course)
    assert tokens(text) == 2000
    assert parse_course(text, PARAMS).groups[0].items[0].explanation.startswith("Because. It")
    assert sized(course_from_prompt(PROMPT), 10) == course_from_prompt(PROMPT)  # never cut


def test_anthropic_streams_the_tool_input_in_its_events(fake: FakeAI) -> None:
    fake.pace = Pace(size=(1500, 1500))
    tool: Any = {"tools": [TOOL], "tool_choice": {"type": "tool", "name": "save_course"}}
    with ant(fake) as a:
        events = list(message(a, stream=True, **tool))
        # The wire, pings included (the SDK drops them).
        with a.messages.with_streaming_response.create(
            model="claude-haiku-4-5",
            max_tokens=4000,
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            **tool,
        ) as wire:
            names = [ln[7:] for ln in wire.iter_lines() if ln.startswith("event: ")]
        with a.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=4000,
            messages=[{"role": "user", "content": PROMPT}],
        ) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"} and len(names) > 10
    assert [e.type for e in events] == [n for n in names if n != "ping"]
    assert events[1].content_block.type == "tool_use"
    partial = "".join(e.delta.partial_json for e in events[2:-3])
    parse_course(partial, PARAMS)
    start, delta = events[0].message, events[-2]
    assert start.usage.input_tokens > 0
    assert delta.delta.stop_reason == "tool_use" and delta.usage.output_tokens == 1500
    # Without a tool: text deltas, and the SDK's accumulated message agrees.
    parse_course(text, PARAMS)
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == tokens(text)


def test_fixed_usage_is_the_same_streamed_or_not() -> None:
    with fakeai.running() as f, oai(f) as c, ant(f) as a:
        chunks = list(chat(c, stream=True, stream_options={"include_usage": True}))
        with a.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=4000,
            messages=[{"role": "user", "content": PROMPT}],
        ) as s:
            final = s.get_final_message()
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (120, 800)
    assert (final.usage.input_tokens, final.usage.output_tokens) == (150, 700)


# -- rate-limit headers and quotas --------------------------------------------------


def test_openai_headers_say_what_the_request_took(fake: FakeAI) -> None:
    fake.limits = Limits(rpm=50, tpm=100_000)
    with oai(fake) as c:
        first = chat(c, raw=True, max_completion_tokens=5000)
        second = chat(c, raw=True, stream=True, max_completion_tokens=5000)
        h1, h2 = first.headers, second.headers
        list(second.parse())
    prompt = first.parse().usage.prompt_tokens
    assert (h1["x-ratelimit-limit-requests"], h1["x-ratelimit-limit-tokens"]) == ("50", "100000")
    assert (h1["x-ratelimit-remaining-requests"], h2["x-ratelimit-remaining-requests"]) == (
        "49",
        "48",
    )
    # Prompt + max_completion_tokens, charged on arrival (give or take the refill since).
    took = 100_000 - int(h1["x-ratelimit-remaining-tokens"])
    assert prompt + 5000 - 200 <= took <= prompt + 5000
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        assert DURATION.match(h1[name]), h1[name]
    # The bucket refills continuously: full again after what was taken, at 100,000/60 s.
    assert seconds(h1["x-ratelimit-reset-tokens"]) == pytest.approx(took * 60 / 100_000, abs=0.1)


def test_anthropic_headers_count_input_at_the_start_and_settle_output(fake: FakeAI) -> None:
    fake.limits = Limits(rpm=50, itpm=30_000, otpm=8_000)
    system: Any = [{"type": "text", "text": "x" * 400, "cache_control": {"type": "ephemeral"}}]
    with ant(fake) as a:
        t0 = time.monotonic()
        first = message(a, raw=True, max_tokens=1000, system=system)
        second = message(a, raw=True, max_tokens=1000, system=system)
        # The input bucket refills at 500 tokens a second meanwhile: its counts
        # are off by that much, however slowly a busy machine made the calls.
        refill = math.ceil(30_000 / 60 * (time.monotonic() - t0)) + 1
    u1, u2 = first.parse().usage, second.parse().usage
    h1, h2 = first.headers, second.headers
    assert u1.cache_creation_input_tokens > 0 and u2.cache_read_input_tokens > 0
    now = datetime.now(UTC)
    for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
        reset = datetime.fromisoformat(h1[f"anthropic-ratelimit-{kind}-reset"])
        assert 0 <= (reset - now).total_seconds() <= 61
    assert h1["anthropic-ratelimit-requests-remaining"] == "49"
    assert h1["anthropic-ratelimit-tokens-limit"] == "38000"
    assert int(h1["anthropic-ratelimit-tokens-remaining"]) == int(
        h1["anthropic-ratelimit-input-tokens-remaining"]
    ) + int(h1["anthropic-ratelimit-output-tokens-remaining"])
    # Input: what is written to the cache counts, what is read from it does not.
    cost1 = u1.input_tokens + u1.cache_creation_input_tokens
    took1 = 30_000 - int(h1["anthropic-ratelimit-input-tokens-remaining"])
    took2 = 30_000 - int(h2["anthropic-ratelimit-input-tokens-remaining"])
    assert cost1 - refill <= took1 <= cost1  # give or take the refill since
    assert u2.input_tokens - refill <= took2 - took1 <= u2.input_tokens
    assert u2.input_tokens < u2.cache_read_input_tokens
    # Output: max_tokens held while the first answer ran, then only what it produced.
    assert 7_000 <= int(h1["anthropic-ratelimit-output-tokens-remaining"]) <= 7_050
    out2 = int(h2["anthropic-ratelimit-output-tokens-remaining"])
    assert 8_000 - u1.output_tokens - 1000 <= out2 <= 8_000 - 1000


def test_requests_past_rpm_get_429_with_retry_after_and_the_bucket_refills(
    fake: FakeAI,
) -> None:
    fake.limits = Limits(rpm=2, window=4.0)  # one request back every 2 s
    with oai(fake) as c, ant(fake) as a:
        chat(c)
        chat(c)
        with pytest.raises(openai.RateLimitError) as refused:
            chat(c)
        message(a)
        message(a)
        with pytest.raises(anthropic.RateLimitError) as refused_too:
            message(a)
        e = refused.value
        assert e.code == "rate_limit_exceeded" and e.type == "requests"
        assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
        wait = int(e.response.headers["retry-after-ms"]) / 1000
        assert 0 < wait <= 2 and e.response.headers["retry-after"] in ("1", "2")
        body = refused_too.value.body
        assert isinstance(body, dict) and body["error"]["type"] == "rate_limit_error"
        assert int(refused_too.value.response.headers["retry-after"]) >= 1
        assert fake.answered("openai", "limited") == fake.answered("anthropic", "limited") == 1
        assert [(r.provider, r.kind) for r in fake.limited] == [
            ("openai", "requests"),
            ("anthropic", "requests"),
        ]
        # Once the time it said has passed, the request goes through.
        time.sleep(wait)
        assert chat(c).choices[0].message.content
    assert fake.stats()["rate_limited"] == {"openai": 1, "anthropic": 1}


def test_openai_charges_max_tokens_when_the_request_arrives(fake: FakeAI) -> None:
    fake.limits = Limits(tpm=10_000)
    with oai(fake) as c:
        small = chat(c, max_completion_tokens=6000)  # produces far fewer than 6,000
        assert small.usage.completion_tokens < 1000
        with pytest.raises(openai.RateLimitError) as refused:
            chat(c, max_completion_tokens=6000)
        chat(c, max_completion_tokens=1000)  # what is left still fits this one
    e = refused.value
    assert e.type == "tokens" and "tokens per min (TPM): Limit 10000" in e.message
    assert fake.limited[0].kind == "tokens"
    assert fake.limited[0].cost == small.usage.prompt_tokens + 6000
    assert 1 <= int(e.response.headers["retry-after"]) <= 60


def test_anthropic_holds_max_tokens_until_the_answer_ends(fake: FakeAI) -> None:
    fake.limits = Limits(otpm=2000)
    fake.pace = Pace(tps=600, size=(300, 300))  # half a second
    with ant(fake) as a:
        with a.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=1500,
            messages=[{"role": "user", "content": PROMPT}],
        ) as running_one:
            with pytest.raises(anthropic.RateLimitError):
                message(a, max_tokens=1500)  # 1,500 are held by the one running
            produced = running_one.get_final_message().usage.output_tokens
        assert produced == 300
        fake.pace = Pace(size=(300, 300))
        message(a, max_tokens=1500)  # settled at 300: 1,700 free
    assert [r.kind for r in fake.limited] == ["output_tokens"]


def test_quotas_are_per_model(fake: FakeAI) -> None:
    fake.limits = Limits(rpm=1)
    with oai(fake) as c:
        chat(c, model="gpt-4.1-mini")
        with pytest.raises(openai.RateLimitError):
            chat(c, model="gpt-4.1-mini")
        chat(c, model="gpt-4.1")


def test_another_client_on_the_key_takes_its_share_of_the_refill(fake: FakeAI) -> None:
    """bench-ai's shared key: another application takes half of each refill, so a
    request comes back every 4 s instead of every 2. The headers state the key's
    whole limit, and the reset and retry-after at its whole rate, as a provider
    that cannot know the other's next calls does: they are too soon."""
    fake.limits = Limits(rpm=2, window=4.0, foreign=0.5)
    with oai(fake) as c:
        t0 = time.monotonic()  # the buckets refill from the first call, at or after it
        first = chat(c, raw=True)
        chat(c)
        with pytest.raises(openai.RateLimitError) as refused:
            chat(c)
        at = time.monotonic()
        h = refused.value.response.headers
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert h["x-ratelimit-limit-requests"] == "2"
        assert h["x-ratelimit-remaining-requests"] == "0"
        wait = int(h["retry-after-ms"]) / 1000
        # One request at the whole rate, 2 per 4 s, from the first call on.
        assert 2.0 - (at - t0) - 0.05 < wait <= 2.0
        assert 1.5 < seconds(h["x-ratelimit-reset-requests"]) <= 4.0
        time.sleep(wait)  # as the client was told
        with pytest.raises(openai.RateLimitError):
            chat(c)  # the other client took its half meanwhile

        def through() -> bool:
            try:
                chat(c)
            except openai.RateLimitError:
                return False
            return True

        wait_until(through, timeout=10, interval=0.1)
    assert time.monotonic() - t0 > 3.5 and time.monotonic() - at < 6.0


def test_the_key_is_raised_while_it_runs(fake: FakeAI) -> None:
    """bench-ai's tier upgrade: the limits rise by a factor at a set time; the
    buckets keep their level and refill at the new rate from then. The raise
    comes 2 s after the limits are set: the first three calls must land before
    it, which a loaded machine running the suite 5 at a time did not always do
    within 0.3 s."""
    fake.limits = Limits(rpm=2, raise_at=2.0, raise_by=3.0)
    with oai(fake) as c:
        chat(c)
        chat(c)

        def refused_limit() -> str:
            with pytest.raises(openai.RateLimitError) as refused:
                chat(c)
            return str(refused.value.response.headers["x-ratelimit-limit-requests"])

        assert refused_limit() == "2"
        # Raised: the limit says 6, and the bucket, nearly empty still (at most
        # 0.07 of a request refilled at the old rate), refills at 6 a minute:
        # a request in 9-10 s, against 28-30 s before.
        assert wait_until(lambda: refused_limit() == "6", timeout=10, interval=0.05)
        with pytest.raises(openai.RateLimitError) as refused:
            chat(c)
    wait = int(refused.value.response.headers["retry-after-ms"]) / 1000
    assert 5.0 < wait <= 10.0
    assert fake.limited[-1].limit == 6


def test_the_fakes_conditions_refuse_what_makes_no_sense() -> None:
    with pytest.raises(ValueError, match="foreign share"):
        Limits(foreign=1.0)
    with pytest.raises(ValueError, match="raise_by"):
        Limits(raise_at=5, raise_by=0)
    bad = subprocess.run(
        [sys.executable, "-m", "tests.fakeai", "--foreign", "-0.1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "foreign share must be in [0, 1)" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_reset_formats() -> None:
    assert [go_duration(s) for s in (0, 0.059, 1, 360, 90.5, 3723.25)] == [
        "0s",
        "59ms",
        "1s",
        "6m0s",
        "1m30.5s",
        "1h2m3.25s",
    ]
    assert rfc3339(0.2) == "1970-01-01T00:00:01Z"


# -- pace and broken streams --------------------------------------------------------


def test_the_pace_of_a_stream_and_of_a_whole_answer(fake: FakeAI) -> None:
    """Never early, and not much late (loose bounds: the machine is shared)."""
    fake.pace = Pace(ttft=0.3, tps=400, size=(400, 400))
    with oai(fake) as c:
        start = time.monotonic()
        times = [
            time.monotonic() - start
            for ch in chat(c, stream=True)
            if ch.choices and ch.choices[0].delta.content
        ]
        start = time.monotonic()
        chat(c)
        whole = time.monotonic() - start
    first, last = times[0], times[-1]
    assert 0.3 <= first < 0.3 + 1.0
    assert last >= 0.3 + 399 / 400
    rate = (400 - 20) / (last - first)  # the tokens after the first event's 20
    assert 400 * 0.4 < rate < 400 * 1.2
    assert 0.3 + 399 / 400 <= whole < 2 * (0.3 + 1)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_stalled_stream_trips_the_idle_timeout(fake: FakeAI, provider: str) -> None:
    fake.modes[provider] = "stall"
    fake.break_after = 25
    got: list[str] = []
    timeout = openai.Timeout(5, read=0.5)
    with pytest.raises((openai.APITimeoutError, anthropic.APITimeoutError)):
        if provider == "openai":
            with oai(fake, timeout=timeout) as c:
                for ch in chat(c, stream=True):
                    got.append(ch.choices[0].delta.content or "")
        else:
            with (
                ant(fake, timeout=timeout) as a,
                a.messages.stream(
                    model="claude-haiku-4-5",
                    max_tokens=4000,
                    messages=[{"role": "user", "content": PROMPT}],
                ) as s,
            ):
                got.extend(s.text_stream)
    assert len("".join(got)) == 25 * 4
    wait_until(lambda: fake.abandoned, what="the fake to see the client hang up")
    assert fake.stats()["streams"]["stalled"] == 1


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_cut_stream_is_an_error_not_an_end(fake: FakeAI, provider: str) -> None:
    fake.modes[provider] = "cut"
    fake.break_after = 25
    got: list[str] = []
    with pytest.raises((openai.APIConnectionError, anthropic.APIConnectionError)) as cut:
        if provider == "openai":
            with oai(fake) as c:
                for ch in chat(c, stream=True):
                    got.append(ch.choices[0].delta.content or "")
        else:
            with (
                ant(fake) as a,
                a.messages.stream(
                    model="claude-haiku-4-5",
                    max_tokens=4000,
                    messages=[{"role": "user", "content": PROMPT}],
                ) as s,
            ):
                got.extend(s.text_stream)
    assert "incomplete chunked read" in str(cut.value.__cause__)
    assert len("".join(got)) == 25 * 4
    # Not streamed: a body shorter than its Content-Length.
    with pytest.raises((openai.APIConnectionError, anthropic.APIConnectionError)):
        if provider == "openai":
            with oai(fake) as c:
                chat(c)
        else:
            with ant(fake) as a:
                message(a)


def test_errors_come_before_the_stream(fake: FakeAI) -> None:
    with oai(fake) as c:
        for mode, error in (("429", openai.RateLimitError), ("500", openai.InternalServerError)):
            fake.modes["openai"] = mode
            with pytest.raises(error):
                chat(c, stream=True)
        fake.modes["openai"] = "invalid"
        text = "".join(ch.choices[0].delta.content or "" for ch in chat(c, stream=True))
    assert text == "Sure! Here is your course: {not json"


async def test_a_hundred_streams_at_once() -> None:
    with fakeai.running(pace=Pace(ttft=0.5, tps=300, size=(300, 300))) as f:
        f.gate = threading.Event()  # each call waits, in flight, until all 100 are
        async with openai.AsyncOpenAI(
            api_key=FAKE_OPENAI_KEY, base_url=f.openai_url, max_retries=0
        ) as c:

            async def one() -> int:
                stream = await c.chat.completions.create(
                    model="gpt-4.1-mini", messages=MESSAGES, stream=True
                )
                return len("".join([ch.choices[0].delta.content or "" async for ch in stream]))

            calls = asyncio.gather(*[one() for _ in range(100)])

            async def all_in_flight() -> bool:
                return f.stats()["in_flight"] == 100

            await await_until(all_in_flight, timeout=30, what="100 calls in flight")
            f.gate.set()
            sizes = await calls
        assert sizes == [1200] * 100
        assert f.stats()["max_in_flight"] == 100 and f.stats()["streams"]["completed"] == 100


# -- its own process ---------------------------------------------------------------


def test_the_fake_as_its_own_process() -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "tests.fakeai", "--rpm", "2", "--tps", "1000", "--seed", "3"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        url = p.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        headers = {"authorization": f"Bearer {FAKE_OPENAI_KEY}"}
        body = {"model": "gpt-4.1-mini", "messages": MESSAGES}
        with httpx.Client(base_url=url, headers=headers) as http:
            codes = [http.post("/v1/chat/completions", json=body).status_code for _ in range(3)]
            stats = http.get("/_fake/stats").json()
            http.post("/_fake/reset")  # counters zeroed, quotas full again
            again = http.post("/v1/chat/completions", json=body).status_code
            last = http.get("/_fake/stats").json()
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=10)
    assert codes == [200, 200, 429]
    assert stats["requests"] == {"openai": 3} and stats["rate_limited"] == {"openai": 1}
    assert stats["output_tokens"]["openai"] > 0 and stats["in_flight"] == 0
    assert again == 200 and last["requests"] == {"openai": 1} and "rate_limited" not in last
    assert p.returncode == 0 and json.loads(out.strip().splitlines()[-1]) == last


def test_modes_switched_at_run_time_and_the_request_log(tmp_path: Any) -> None:
    """The soak's controls: POST /_fake/mode changes the answers of a running
    fake process, and --log writes one line per provider request."""
    log = tmp_path / "requests.jsonl"
    p = subprocess.Popen(
        [sys.executable, "-m", "tests.fakeai", "--log", str(log)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        url = p.stdout.readline().strip()
        headers = {"authorization": f"Bearer {FAKE_OPENAI_KEY}"}
        body = {"model": "gpt-4.1-mini", "messages": MESSAGES}
        with httpx.Client(base_url=url, headers=headers) as http:
            before = http.post("/v1/chat/completions", json=body).status_code
            modes = http.post("/_fake/mode", json={"openai": "500"}).json()
            during = http.post("/v1/chat/completions", json=body).status_code
            http.post("/_fake/mode", json={"openai": "valid"})
            image = {"model": "gpt-image-1", "prompt": "[soak-7] a lighthouse"}
            after = http.post("/v1/images/generations", json=image).status_code
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=10)
    assert (before, during, after) == (200, 500, 200)
    assert modes == {"openai": "500", "anthropic": "valid"}
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["path"], r["mode"]) for r in lines] == [
        ("/v1/chat/completions", "valid"),
        ("/v1/chat/completions", "500"),
        ("/v1/images/generations", "valid"),
    ]
    assert lines[0]["text"] == MESSAGES[-1]["content"][:300]
    assert lines[2]["text"] == "[soak-7] a lighthouse" and lines[0]["t"] <= lines[2]["t"]
