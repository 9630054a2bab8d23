"""Provider quotas through the handlers, the real SDKs and the fake's quotas:
both providers' headers read from the raw responses and learned per model, a
call that does not fit waits (no call, no attempt), one that never fits is
refused, a 429 despite the reservation corrects the quota and opens the shared
breaker, the repair round waits for its own quota, and a worker holds the
claims of jobs whose quota is spent."""

from __future__ import annotations

import time
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from listener.errors import ProvidersUnavailable, RequestRefused
from listener.handlers import create_runtime
from tests.fakeai import FakeAI, Limits
from tests.helpers import await_until, connect, insert_course, insert_media, moves, record_moves
from tests.integration.handlers.conftest import Conn, MakeSettings, course_job, media_job
from tests.workers import FAST, running_worker

pytestmark = pytest.mark.timeout(60)

OPENAI, ANTHROPIC = "gpt-4.1-mini", "claude-haiku-4-5"


async def quota_row(conn: Conn, provider: str, model: str) -> dict[str, Any]:
    cur = await conn.execute(
        "select * from ai_job_provider_quotas where provider = %s and model = %s",
        [provider, model],
    )
    row = await cur.fetchone()
    assert row is not None, (provider, model)
    return row


async def test_both_providers_headers_teach_each_models_limits(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.limits = Limits(rpm=50, tpm=60_000, itpm=30_000, otpm=20_000, window=60)
    openai = await create_runtime(make_settings(ai_max_output_tokens=2000), pool)
    anthropic = await create_runtime(
        make_settings(ai_provider_priority="anthropic", ai_max_output_tokens=2000), pool
    )
    try:
        await openai.handlers["ai_course_jobs"](await course_job(conn, "Tides"))
        await openai.handlers["ai_media_jobs"](await media_job(conn, "a cat", "image"))
        await anthropic.handlers["ai_course_jobs"](await course_job(conn, "Volcanoes"))
    finally:
        await openai.aclose()
        await anthropic.aclose()
    o = await quota_row(conn, "openai", OPENAI)
    assert (o["rpm"], o["tpm"], o["itpm"], o["otpm"]) == (50, 60_000, None, None)
    assert o["window_seconds"] == pytest.approx(60, abs=0.1)  # OpenAI's resets: durations
    # One call: the fake counted 120 prompt tokens and the 2,000 of max_tokens (and
    # the bucket refills at 1,000 a second since).
    assert 60_000 - 2120 - 10 <= o["tokens"] <= 60_000 - 2120 + 1500
    assert o["requests"] == pytest.approx(49, abs=0.5)
    a = await quota_row(conn, "anthropic", ANTHROPIC)
    assert (a["rpm"], a["tpm"], a["itpm"], a["otpm"]) == (50, None, 30_000, 20_000)
    # RFC 3339 resets, to the second: a window on the long side, never shorter.
    assert a["window_seconds"] == pytest.approx(60, abs=0.1)
    # Its output held max_tokens until the answer said 700 were produced.
    assert 20_000 - 700 - 10 <= a["output_tokens"] <= 20_000 - 700 + 500
    image = await quota_row(conn, "openai", "gpt-image-1")  # a model of its own
    assert image["rpm"] == 50 and image["learned_at"] is not None


async def test_a_call_that_does_not_fit_waits_without_being_made(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    # 100,000 tokens a window: a call's 16,120 are full again in 645 ms, a reset
    # that says the window to a tenth of a percent (the fake's default quota of
    # ten million would be full in 7 ms, a reset to the millisecond: 10% off).
    fake.limits = Limits(rpm=100, tpm=100_000, window=4)
    s = make_settings(ai_provider_priority="openai", provider_limits="openai=rpm:1")
    rt = await create_runtime(s, pool)
    try:
        t0 = time.monotonic()  # the first call's bucket refills from here or later
        await rt.handlers["ai_course_jobs"](await course_job(conn, "Tides"))
        with pytest.raises(ProvidersUnavailable) as err:
            await rt.handlers["ai_course_jobs"](await course_job(conn, "Volcanoes"))
        since = time.monotonic() - t0
    finally:
        await rt.aclose()
    assert fake.count("openai", "/chat/completions") == 1
    assert err.value.quota  # for quotas alone: held quietly
    # One request per window (4 s, learned from the first answer's resets).
    fits = float(err.value.message.split("a call fits in ")[1].split("s")[0])
    assert err.value.message.startswith("Providers unavailable: openai: quota spent, a call fits")
    assert 4.0 - since - 0.1 < fits <= 4.1
    # The job is due again within a second: the claim gate holds its table's claims
    # for as long as the quota needs, knowing better by then.
    assert err.value.wait_seconds <= 1.0


async def test_a_call_bigger_than_the_quota_is_refused(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    s = make_settings(ai_provider_priority="openai", provider_limits="openai=tpm:1000")
    rt = await create_runtime(s, pool)  # max_tokens alone (16,000) is over the cap
    try:
        with pytest.raises(RequestRefused) as err:
            await rt.handlers["ai_course_jobs"](await course_job(conn, "Tides"))
    finally:
        await rt.aclose()
    assert fake.count("openai") == 0
    assert "a call needs more than openai gpt-4.1-mini allows per minute" in err.value.message


async def test_a_429_despite_the_reservation_corrects_the_quota(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.limits = Limits(rpm=5, window=60)
    s = make_settings(ai_provider_priority="openai")
    rt = await create_runtime(s, pool)
    try:
        await rt.handlers["ai_course_jobs"](await course_job(conn, "Tides"))  # learns: 4 left
        # Another user of the key spends the rest.
        while fake.quotas.admit("openai", OPENAI, {"requests": 1}) is None:
            pass
        with pytest.raises(ProvidersUnavailable) as err:
            await rt.handlers["ai_course_jobs"](await course_job(conn, "Volcanoes"))
        assert len(fake.limited) == 1
        assert rt.chain.quotas.limited == 1
        # Every worker backs off: the shared breaker, rate limited for retry-after.
        cur = await conn.execute("select * from ai_job_provider_state where provider = 'openai'")
        breaker = await cur.fetchone()
        assert breaker is not None and breaker["cooldown_kind"] == "rate_limited"
        assert not err.value.quota and 10 < err.value.wait_seconds <= 13  # 60 s / 5, rounded up
        # And the quota is corrected: nothing left, so no call goes after the back-off
        # before the bucket has refilled.
        q = await quota_row(conn, "openai", OPENAI)
        assert q["limited_at"] is not None and q["requests"] < 0.2
        await conn.execute("select ai_job_provider_reset('openai')")
        rt.chain.breakers._fetched = None  # the copy read again at once
        with pytest.raises(ProvidersUnavailable) as again:
            await rt.handlers["ai_course_jobs"](await course_job(conn, "Comets"))
    finally:
        await rt.aclose()
    assert again.value.quota and len(fake.limited) == 1  # no second 429


async def test_the_repair_round_waits_for_its_own_quota(
    conn: Conn, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.limits = Limits(rpm=100, window=2)
    fake.modes["openai"] = "invalid_once"
    s = make_settings(ai_provider_priority="openai", provider_limits="openai=rpm:1")
    rt = await create_runtime(s, pool)
    try:
        t0 = time.monotonic()
        out = await rt.handlers["ai_course_jobs"](await course_job(conn, "Tides"))
    finally:
        await rt.aclose()
    # The first call took the request of this window; the repair waited for the next.
    assert out.metrics["repairRounds"] == 1
    assert time.monotonic() - t0 > 1.5
    assert not fake.limited


async def test_a_job_waiting_for_quota_counts_no_attempt(
    db_url: str, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    fake.limits = Limits(rpm=100, window=2)
    s = make_settings(
        database_url=db_url,
        ai_provider_priority="openai",
        provider_limits="openai=rpm:1",
        worker_concurrency=3,
        **FAST,
    )
    record_moves(db_url)
    rt = await create_runtime(s, pool)
    try:
        async with running_worker(s, rt.handlers, gate=rt.chain.gate):
            with connect(db_url) as c:
                ids = [insert_course(c, f"Subject {n}") for n in range(3)]

            async def waiting() -> list[dict[str, Any]]:
                with connect(db_url) as c:
                    return list(
                        c.execute(
                            "select * from ai_course_jobs where status = 'pending'"
                            " and error like 'Providers unavailable: openai: quota spent%%'"
                        ).fetchall()
                    )

            early = await await_until(waiting, timeout=20, what="a job waiting for its quota")

            async def done() -> bool:
                with connect(db_url) as c:
                    rows = c.execute("select status from ai_course_jobs").fetchall()
                return all(r["status"] == "done" for r in rows)

            await await_until(done, timeout=30, what="3 jobs done")
    finally:
        await rt.aclose()
    assert all(r["retry_count"] == 0 and r["provider_wait_since"] for r in early)
    with connect(db_url) as c:
        rows = c.execute("select * from ai_course_jobs").fetchall()
    assert {str(r["id"]) for r in rows} == set(ids)
    assert all(r["retry_count"] == 0 and r["status"] == "done" for r in rows)
    assert not fake.limited and fake.count("openai", "/chat/completions") == 3
    # The quota let one call through every 2 s: the three claimed at the start (the
    # quota's state not known yet), the two put back claimed again once each, as
    # their calls fitted; not a claim a second for each job waiting.
    assert moves(db_url, "claim") <= 3 + 2 and moves(db_url, "release") <= 2


@pytest.mark.parametrize("speech_metered", [False, True])
async def test_a_spent_image_quota_does_not_hold_the_speech_jobs(
    db_url: str,
    pool: AsyncConnectionPool[Any],
    fake: FakeAI,
    make_settings: MakeSettings,
    speech_metered: bool,
) -> None:
    """Image and speech are two models, two quotas, two lanes: while the image
    quota holds the image jobs, speech jobs that arrive meanwhile are claimed and
    done at once (as many as their own quota admits, when it is metered too),
    and the images wait without an attempt or a claim made only to put them
    back."""
    limits = "openai/gpt-image-1=rpm:1"  # one image a minute
    if speech_metered:
        limits += ";openai/gpt-4o-mini-tts=rpm:600"
    s = make_settings(
        database_url=db_url,
        ai_provider_priority="openai",
        provider_limits=limits,
        worker_concurrency=4,
        **FAST,
    )
    rt = await create_runtime(s, pool)
    try:
        async with running_worker(s, rt.handlers, gate=rt.chain.gate) as w:
            first: list[str] = []
            if speech_metered:  # the speech lane known, and gated: claimed apart
                with connect(db_url) as c:
                    first = [insert_media(c, "hello", "audio")]

                async def said() -> bool:
                    return fake.count("openai", "/audio/speech") == 1

                await await_until(said, what="a speech")
            with connect(db_url) as c:
                images = [insert_media(c, f"picture {n}", "image") for n in range(3)]

            def media(ids: list[str]) -> list[dict[str, Any]]:
                with connect(db_url) as c:
                    return list(
                        c.execute(
                            "select * from ai_media_jobs where id = any(%s::uuid[])", [ids]
                        ).fetchall()
                    )

            async def held() -> bool:
                # One image done, two pending: claimed and put back to wait for
                # the quota, or never claimed (the gate learned the limit before
                # their claim), as the notifications and the first call fall.
                statuses = sorted(r["status"] for r in media(images))
                return statuses == ["done", "pending", "pending"] and (
                    "ai_media_jobs:image" in w.executor.cooldowns
                )

            await await_until(held, timeout=20, what="two images waiting for their quota")
            before = {r["id"]: r for r in media(images) if r["status"] == "pending"}
            # Their due time passes (a deferral's is a second or so away): from
            # then on only the hold of their lane keeps them from being claimed.
            due = max(r["run_after"] for r in before.values())

            async def overdue() -> bool:
                with connect(db_url) as c:
                    return bool(c.execute("select now() > %s as o", [due]).fetchone()["o"])

            await await_until(overdue, what="the waiting images due")
            claims = w.producer.claims_by_table["ai_media_jobs"]
            assert w.executor.gate is not None
            assert w.executor.gate.gates("ai_media_jobs:audio") == speech_metered
            with connect(db_url) as c:
                speech = first + [insert_media(c, f"words {n}", "audio") for n in range(3)]

            async def spoken() -> bool:
                return all(r["status"] == "done" for r in media(speech))

            # Within the image quota's wait (a minute): not behind it.
            await await_until(spoken, timeout=20, what="the speech jobs done")
            waiting = media(images)
            # The claims since were the speech jobs' (one a notification, or a
            # round), a few, not one per second.
            assert w.producer.claims_by_table["ai_media_jobs"] - claims <= 6
    finally:
        await rt.aclose()
    assert sorted(r["status"] for r in waiting) == ["done", "pending", "pending"]
    assert all(r["retry_count"] == 0 for r in waiting)
    # The waiting images were not claimed again (a claim sets started_at; a
    # deferral moves run_after).
    for r in waiting:
        if r["status"] == "pending":
            was = before[r["id"]]
            assert (r["started_at"], r["run_after"]) == (was["started_at"], was["run_after"])
    assert fake.count("openai", "/images/generations") == 1
    assert fake.count("openai", "/audio/speech") == len(speech)


async def test_an_older_speech_job_is_not_kept_behind_the_images_a_quota_admits(
    db_url: str, pool: AsyncConnectionPool[Any], fake: FakeAI, make_settings: MakeSettings
) -> None:
    """The image quota is metered (its lane gated) but never spent: with one
    slot, a speech job queued before eight images is claimed first, not after
    every image the quota admits."""
    s = make_settings(
        database_url=db_url,
        ai_provider_priority="openai",
        provider_limits="openai/gpt-image-1=rpm:6000",
        worker_concurrency=1,
        **FAST,
    )
    rt = await create_runtime(s, pool)
    try:
        async with running_worker(s, rt.handlers, gate=rt.chain.gate) as w:
            with connect(db_url) as c:
                insert_media(c, "the first picture", "image")  # the image lane noted

            async def gated() -> bool:
                return w.executor.gate is not None and w.executor.gate.gates("ai_media_jobs:image")

            await await_until(gated, what="the image lane gated")
            with connect(db_url) as c, c.transaction():  # one commit: all due at once
                older = c.execute("select now() - interval '1 second' as t").fetchone()
                assert older is not None
                ids = [insert_media(c, "words", "audio", run_after=older["t"])]
                ids += [insert_media(c, f"picture {n}", "image") for n in range(8)]

            async def done() -> bool:
                with connect(db_url) as c:
                    rows = c.execute(
                        "select status from ai_media_jobs where id = any(%s::uuid[])", [ids]
                    ).fetchall()
                return all(r["status"] == "done" for r in rows)

            await await_until(done, timeout=30, what="the nine jobs done")
            with connect(db_url) as c:
                order = [
                    r["media_type"]
                    for r in c.execute(
                        "select media_type from ai_media_jobs where id = any(%s::uuid[])"
                        " order by started_at",
                        [ids],
                    ).fetchall()
                ]
    finally:
        await rt.aclose()
    # Claimed first (among the first few: on a slow database the worker claims
    # a job or two ahead of its slot, in one statement), not after the images.
    assert "audio" in order[:3], order
