"""The quota functions (sql/023) on a real database: continuous refill, the lower
of learned and set limits, one call at a time while the limits are learned, a
model per row, settlement from the answer, a 429's correction and the share of
the key it teaches (sql/036), and many workers reserving at once never passing
more than the bucket holds."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import psycopg
import pytest

from listener import dal
from listener.providers import ratelimits
from listener.providers.quota import Cost, Grant, Quotas
from listener.providers.ratelimits import RateLimits
from listener.settings import Settings
from tests.helpers import aconnect

Conn = psycopg.AsyncConnection[dict[str, Any]]
pytestmark = pytest.mark.timeout(60)

NONE: list[int | None] = [None, None, None, None]


async def reserve(
    conn: Conn,
    n: int = 1,
    cost: tuple[float, ...] = (1, 100, 50, 50),
    caps: list[int | None] | None = None,
    model: str = "m",
    learners: int = 1,
) -> dict[str, Any]:
    params = {
        "provider": "openai",
        "model": model,
        "n": n,
        "cost": list(cost),
        "caps": caps or NONE,
        "lease": 30,
        "learners": learners,
    }
    row = await dal.QUOTA_RESERVE.first(conn, params)
    assert row is not None
    return dict(row)


async def settle(conn: Conn, model: str = "m", **kw: Any) -> bool:
    params = {
        "provider": "openai",
        "model": model,
        "back": [0, 0, 0, 0],
        "caps": NONE,
        "limits": None,
        "remaining": None,
        "age": 0.0,
        "window": None,
        "window_error": None,
        "heard": True,
        "learning": 0,
        "limited": False,
        "reserved": None,
        **kw,
    }
    row = await dal.QUOTA_SETTLE.first(conn, params)
    assert row is not None
    return row["metered"]


async def state(conn: Conn, model: str = "m") -> dict[str, Any]:
    cur = await conn.execute(
        "select * from ai_job_provider_quotas where provider = 'openai' and model = %s", [model]
    )
    row = await cur.fetchone()
    assert row is not None
    return row


async def age(conn: Conn, seconds: float, model: str = "m") -> None:
    """As if the levels were written `seconds` ago (the refill's clock)."""
    await conn.execute(
        "update ai_job_provider_quotas set refilled_at = refilled_at - make_interval(secs => %s)"
        " where model = %s",
        [seconds, model],
    )


async def learned(conn: Conn, rpm: int = 10, tpm: int = 1000, window: float = 10) -> None:
    """The first call, learning the limits, answered with full buckets."""
    first = await reserve(conn)
    assert first["granted"] == 1 and first["learning"]
    await settle(conn, limits=[rpm, tpm, None, None], window=window, learning=1)


async def test_one_call_learns_the_limits_then_the_buckets_meter(conn: Conn) -> None:
    first = await reserve(conn, n=5)
    assert (first["granted"], first["learning"], first["metered"]) == (1, True, True)
    # Meanwhile no other call goes: they are told to look again within the lease.
    other = await reserve(conn)
    assert other["granted"] == 0 and other["learning"] and 0 < other["wait_seconds"] <= 30
    # The answer's headers: 10 requests and 1,000 tokens per 10 s, 9 and 900 left.
    metered = await settle(
        conn,
        limits=[10, 1000, None, None],
        remaining=[9, 900, None, None],
        window=10,
        learning=1,
    )
    assert metered
    q = await state(conn)
    assert (q["rpm"], q["tpm"], q["window_seconds"]) == (10, 1000, 10)
    assert q["learning_until"] is None and q["learned_at"] is not None
    assert q["requests"] == pytest.approx(9, abs=0.01) and q["itpm"] is None
    # 9 requests left but tokens for 9 calls of 100: all nine, then a wait.
    got = await reserve(conn, n=20)
    assert got["granted"] == 9 and not got["learning"] and not got["too_big"]
    assert got["wait_seconds"] == pytest.approx(1.0, abs=0.05)  # a request per second


async def test_a_few_calls_learn_at_once_under_a_lease(conn: Conn) -> None:
    # As many as the breaker's threshold: a provider that hangs is found as fast.
    assert (await reserve(conn, n=5, learners=3))["granted"] == 3
    assert (await reserve(conn, learners=3))["granted"] == 0
    await settle(conn, heard=False, learning=1)  # one timed out: its place is free
    assert (await reserve(conn, n=5, learners=3))["granted"] == 1
    assert (await state(conn))["learning_calls"] == 3
    # Callers that died: the lease runs out and the count with it.
    await conn.execute(
        "update ai_job_provider_quotas set learning_until = clock_timestamp() - interval '1 s'"
    )
    assert (await reserve(conn, n=5, learners=3))["granted"] == 3
    await settle(conn, heard=False, learning=3)
    q = await state(conn)
    assert q["learning_calls"] == 0 and q["learning_until"] is None


async def test_nothing_goes_until_every_learning_call_is_back(conn: Conn) -> None:
    assert (await reserve(conn, n=2, learners=2))["granted"] == 2
    # The first answer states the limits; the second call, admitted after it, took
    # from the provider's buckets what ours do not know yet.
    await settle(conn, limits=[10, 1000, None, None], remaining=[9, 900, None, None], learning=1)
    held = await reserve(conn, learners=2)
    assert held["granted"] == 0 and held["learning"] and held["metered"]
    # Its headers, not refilled since the call was sent (its fellows' may be later).
    await settle(conn, remaining=[8, 800, None, None], age=5.0, learning=1)
    q = await state(conn)
    assert q["requests"] == pytest.approx(8, abs=0.01) and q["tokens"] == pytest.approx(800, abs=1)
    assert (await reserve(conn, n=20, learners=2))["granted"] == 8


async def test_answers_without_headers_leave_the_model_unmetered(conn: Conn) -> None:
    assert (await reserve(conn))["learning"]
    assert not await settle(conn, learning=1)  # an answer, no rate-limit headers
    for _ in range(3):
        got = await reserve(conn, n=50)
        assert (got["granted"], got["metered"]) == (50, False)
    # A call that got no answer (a timeout) does not end the learning that way.
    assert (await reserve(conn, model="other"))["learning"]
    assert await settle(conn, model="other", heard=False, learning=1) is False
    assert (await reserve(conn, model="other"))["learning"]  # a new learning call


async def test_the_buckets_refill_continuously(conn: Conn) -> None:
    await learned(conn, rpm=10, tpm=100_000, window=10)
    assert (await reserve(conn, n=10))["granted"] == 10
    assert (await reserve(conn))["granted"] == 0
    await age(conn, 0.55)  # half a request back: not enough
    assert (await reserve(conn))["granted"] == 0
    await age(conn, 2.0)  # 2.5 requests back
    assert (await reserve(conn, n=5))["granted"] == 2
    await age(conn, 3600)  # never more than the limit
    assert (await reserve(conn, n=50))["granted"] == 10


async def test_the_lower_of_learned_and_set_limits_wins(conn: Conn) -> None:
    await learned(conn, rpm=10, tpm=100_000, window=10)
    # PROVIDER_LIMITS below the provider's: 4 requests per window.
    caps: list[int | None] = [4, None, None, None]
    assert (await reserve(conn, n=10, caps=caps))["granted"] == 4
    got = await reserve(conn, caps=caps)
    assert got["granted"] == 0 and got["wait_seconds"] == pytest.approx(2.5, abs=0.2)
    # One bucket: what the cap let through is gone for a call without it too.
    assert (await reserve(conn, n=10))["granted"] == 0
    # Above the provider's, the provider's limit holds.
    await age(conn, 3600)
    assert (await reserve(conn, n=20, caps=[50, None, None, None]))["granted"] == 10
    # A cap on a kind the provider does not state meters it too.
    await age(conn, 3600)
    assert (await reserve(conn, n=10, caps=[None, None, None, 120]))["granted"] == 2


async def test_caps_alone_meter_without_learning(conn: Conn) -> None:
    got = await reserve(conn, n=5, caps=[3, None, None, None])
    assert (got["granted"], got["learning"], got["metered"]) == (3, False, True)
    assert got["wait_seconds"] == pytest.approx(20.0, abs=0.1)  # 3 per minute until learned


async def test_each_model_has_its_own_buckets(conn: Conn) -> None:
    await learned(conn, rpm=2)
    assert (await reserve(conn, n=5))["granted"] == 2
    assert (await reserve(conn, model="nano"))["learning"]  # another model: learned apart
    await settle(conn, model="nano", limits=[5, None, None, None], learning=1)
    assert (await reserve(conn, n=9, model="nano"))["granted"] == 5
    assert (await reserve(conn))["granted"] == 0


async def test_a_call_over_a_limit_never_fits(conn: Conn) -> None:
    await learned(conn, tpm=1000)
    got = await reserve(conn, cost=(1, 1001, 0, 0))
    assert (got["granted"], got["too_big"], got["wait_seconds"]) == (0, True, None)
    assert (await state(conn))["tokens"] == pytest.approx(1000, abs=1)  # nothing taken


async def test_settling_gives_back_and_learns_what_is_left(conn: Conn) -> None:
    # The buckets refill at 1 request and 100 tokens a second while this runs: the
    # tolerances allow a tenth of a second or so between statements (a loaded machine).
    await learned(conn, rpm=10, tpm=1000, window=10)
    assert (await reserve(conn, n=2, cost=(1, 300, 0, 0)))["granted"] == 2
    assert (await state(conn))["tokens"] == pytest.approx(400, abs=15)
    # The first call counted 120 of its 300 tokens: 180 back.
    await settle(conn, back=[0, 180, 0, 0])
    assert (await state(conn))["tokens"] == pytest.approx(580, abs=15)
    # Another user of the key: the provider says 200 tokens are left as of the call
    # sent 1 s ago (200 + 1 s of refill at 100/s = 300 now).
    await settle(conn, remaining=[9, 200, None, None], age=1.0)
    q = await state(conn)
    assert q["tokens"] == pytest.approx(300, abs=15) and q["requests"] == pytest.approx(8, abs=0.15)
    # A provider that says it has more left does not raise our count.
    await settle(conn, remaining=[10, 1000, None, None])
    assert (await state(conn))["tokens"] == pytest.approx(300, abs=15)
    # A call that cost more than reserved leaves a debt the refill pays first.
    await settle(conn, back=[0, -500, 0, 0])
    assert (await state(conn))["tokens"] < 0
    got = await reserve(conn, cost=(1, 100, 0, 0))
    assert got["granted"] == 0 and got["wait_seconds"] > 1


async def test_a_429_empties_what_it_does_not_state(conn: Conn) -> None:
    await learned(conn, rpm=10, tpm=1000, window=10)
    assert (await reserve(conn, cost=(1, 300, 0, 0)))["granted"] == 1
    # Refused: the reservation goes back (nothing was counted), the limit the 429
    # states replaces the learned one, its remaining holds, the rest is emptied.
    await settle(
        conn,
        back=[1, 300, 0, 0],
        limits=[6, None, None, None],
        remaining=[0, None, None, None],
        limited=True,
    )
    q = await state(conn)
    assert (q["rpm"], q["tpm"]) == (6, 1000) and q["limited_at"] is not None
    assert q["requests"] == pytest.approx(0, abs=0.01) and q["tokens"] == pytest.approx(0, abs=1)
    got = await reserve(conn)
    # A request back at 6 a window of 10 s, at the share the 429 cut (sql/036)
    assert q["share"] == pytest.approx(0.9, abs=0.001)
    assert got["granted"] == 0 and got["wait_seconds"] == pytest.approx(10 / 6 / 0.9, abs=0.2)


async def share(conn: Conn, model: str = "m") -> float:
    cur = await conn.execute(
        "select ai_job_quota_share(q, clock_timestamp()) as s from ai_job_provider_quotas q"
        " where provider = 'openai' and model = %s",
        [model],
    )
    row = await cur.fetchone()
    assert row is not None
    return float(row["s"])


async def test_a_429_despite_a_reservation_cuts_the_share_once_and_it_grows_back(
    conn: Conn,
) -> None:
    """sql/036: another client of the key took part of its refill. The calls
    refused together cut the buckets' share of the stated refill once; it grows
    back by 2% of the refill a window; the buckets refill at the share."""
    await learned(conn, rpm=10, tpm=100_000, window=10)
    assert await share(conn) == 1.0
    assert (await reserve(conn, n=10))["granted"] == 10
    for _ in range(3):  # three calls refused at once: one cut
        await settle(conn, back=[1, 100, 0, 0], remaining=[0, None, None, None], limited=True)
    assert (await state(conn))["share"] == pytest.approx(0.9, abs=0.001)
    # The buckets now refill at 0.9 of the stated rate: 10 s bring 9 requests.
    await age(conn, 10.0)
    assert (await reserve(conn, n=10))["granted"] == 9
    # A 429 a while later (more than a thirtieth of the window) cuts again.
    await conn.execute(
        "update ai_job_provider_quotas set limited_at = limited_at - interval '1 second'"
    )
    await settle(conn, back=[1, 100, 0, 0], remaining=[0, None, None, None], limited=True)
    assert (await state(conn))["share"] == pytest.approx(0.81, abs=0.001)
    # It grows back by 0.02 a window (10 s here), to 1 at most.
    await conn.execute(
        "update ai_job_provider_quotas set share_at = share_at - interval '25 seconds'"
    )
    assert await share(conn) == pytest.approx(0.86, abs=0.002)
    await conn.execute("update ai_job_provider_quotas set share_at = share_at - interval '1 hour'")
    assert await share(conn) == 1.0
    # A settle writes the share grown back, and the growth goes on from there.
    await settle(conn)
    q = await state(conn)
    assert q["share"] == 1.0 and q["share_at"] is not None


async def test_a_429_that_is_not_for_the_quota_cuts_nothing(conn: Conn) -> None:
    """A 429 whose headers show the quota holding the call (an overloaded
    provider), or that has no headers, says nothing of the key's share: a storm
    of them must not starve the deployment for the quarter hour the share takes
    to grow back."""
    await learned(conn, rpm=10, tpm=100_000, window=10)
    assert (await reserve(conn, n=2))["granted"] == 2
    await settle(conn, back=[1, 100, 0, 0], remaining=[5, 50_000, None, None], limited=True)
    await conn.execute(
        "update ai_job_provider_quotas set limited_at = limited_at - interval '1 second'"
    )
    await settle(conn, back=[1, 100, 0, 0], remaining=None, limited=True)
    q = await state(conn)
    assert q["share"] == 1.0 and q["limited_at"] is not None


async def test_what_a_429_wiped_is_not_given_back_and_cuts_nothing(conn: Conn) -> None:
    """A reservation made before the provider's last 429: the levels were set to
    what the provider had, which never held it. Giving it back would count it
    twice, and its own 429 says nothing new of the share."""
    await learned(conn, rpm=10, tpm=100_000, window=10)
    assert (await reserve(conn, n=10))["granted"] == 10
    await settle(conn, back=[1, 100, 0, 0], remaining=[0, None, None, None], limited=True,
                 reserved=0.2)  # fmt: skip
    assert (await state(conn))["share"] == pytest.approx(0.9, abs=0.001)
    # A permit taken 5 s ago, before that 429, comes back unused: nothing is put back.
    await settle(conn, back=[1, 100, 0, 0], reserved=5.0)
    assert (await state(conn))["requests"] == pytest.approx(0, abs=0.1)
    # A call reserved before it is refused too, a second later: no second cut.
    await conn.execute(
        "update ai_job_provider_quotas set limited_at = limited_at - interval '1 second'"
    )
    await settle(conn, back=[1, 100, 0, 0], remaining=[0, None, None, None], limited=True,
                 reserved=5.0)  # fmt: skip
    assert (await state(conn))["share"] == pytest.approx(0.9, abs=0.001)
    # One reserved since, refused a second later: the share was still too high.
    await conn.execute(
        "update ai_job_provider_quotas set limited_at = limited_at - interval '1 second'"
    )
    await settle(conn, back=[1, 100, 0, 0], remaining=[0, None, None, None], limited=True,
                 reserved=0.2)  # fmt: skip
    assert (await state(conn))["share"] == pytest.approx(0.81, abs=0.001)
    # A reservation made since is given back in full.
    await settle(conn, back=[1, 100, 0, 0], reserved=0.0)
    assert (await state(conn))["requests"] == pytest.approx(1, abs=0.1)


async def test_a_learning_calls_429_and_a_plain_settle_leave_the_share(conn: Conn) -> None:
    first = await reserve(conn)
    assert first["learning"]
    await settle(conn, limits=[10, 1000, None, None], window=10, learning=1, limited=True)
    await settle(conn, back=[0, 50, 0, 0], remaining=[3, 200, None, None])
    assert (await state(conn))["share"] == 1.0


async def test_the_share_is_a_fraction(conn: Conn) -> None:
    await learned(conn)
    for bad in (0.0, 1.5):
        with pytest.raises(psycopg.errors.CheckViolation):
            await conn.execute("update ai_job_provider_quotas set share = %s", [bad])


async def test_bad_reservations_are_refused(conn: Conn) -> None:
    for n, cost in [
        (0, (1.0, 1.0, 1.0, 1.0)),
        (1, (1.0, 1.0, 1.0)),
        (1, (1.0, -1.0, 0.0, 0.0)),
        (1, (1.0, float("nan"), 0.0, 0.0)),
    ]:
        with pytest.raises(Exception, match="quota reservation needs"):
            await reserve(conn, n=n, cost=cost)


async def test_reset_forgets(conn: Conn) -> None:
    await learned(conn)
    assert (await reserve(conn, model="nano"))["learning"]
    cur = await conn.execute("select ai_job_quota_reset('openai', 'm') as n")
    assert (await cur.fetchone()) == {"n": 1}
    assert (await reserve(conn))["learning"]  # learned again
    cur = await conn.execute("select ai_job_quota_reset() as n")
    assert (await cur.fetchone()) == {"n": 2}


async def test_many_workers_reserving_at_once_never_pass_more_than_the_bucket(
    db_url: str, conn: Conn
) -> None:
    await learned(conn, rpm=25, tpm=10**6, window=60)
    conns = [await aconnect(db_url) for _ in range(12)]
    try:

        async def worker(c: Conn) -> int:
            total = 0
            for _ in range(10):
                total += (await reserve(c, n=2))["granted"]
            return total

        granted = await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    # 240 asked for, 25 in the bucket (and a few hundredths of a request refilled).
    assert sum(granted) == 25


async def test_a_call_that_waited_for_the_row_never_turns_its_clock_back(
    db_url: str, conn: Conn
) -> None:
    """A reservation reads the time once the bucket's row is its own: one that
    waited for the row behind a settlement that read the clock later must not
    write an earlier refilled_at, or the next call refills that interval a second
    time (with several worker processes the buckets drifted ahead of the
    provider's: make bench-ai)."""
    await learned(conn, rpm=100, tpm=10**6, window=60)
    holder, waiter = await aconnect(db_url), await aconnect(db_url)
    try:
        pid = (await (await waiter.execute("select pg_backend_pid() as pid")).fetchone())["pid"]
        async with holder.transaction():
            await holder.execute(
                "select 1 from ai_job_provider_quotas where model = 'm' for update"
            )
            waiting = asyncio.create_task(reserve(waiter))
            for _ in range(500):  # until the reservation waits for the row
                cur = await conn.execute(
                    "select wait_event_type from pg_stat_activity where pid = %s", [pid]
                )
                if ((await cur.fetchone()) or {}).get("wait_event_type") == "Lock":
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the reservation never waited for the row")
            # The holder settles a call meanwhile: it reads the clock after the waiter did.
            await settle(holder, back=[0, 0, 0, 0])
            settled = (await state(holder))["refilled_at"]
        assert (await waiting)["granted"] == 1
    finally:
        await holder.close()
        await waiter.close()
    assert (await state(conn))["refilled_at"] >= settled


def _requests_only(used: int, reset: str) -> RateLimits:
    """An answer whose requests kind alone says the window: 4 a window."""
    headers = {
        "x-ratelimit-limit-requests": "4",
        "x-ratelimit-remaining-requests": str(4 - used),
        "x-ratelimit-reset-requests": reset,
    }
    return ratelimits.parse(headers, time.time())


async def test_a_window_read_less_exactly_does_not_replace_a_better_one(
    conn: Conn, pool: Any
) -> None:
    """A 2 s window: 3 of 4 used, full in 1.5 s, reads it to a third; an answer
    from a nearly full bucket (1 used, full in 0.26 s: the bucket was 0.87 short,
    said as 1) reads it 1.04 s, and is not stored (sql/037), whichever worker's
    answer it is."""
    one, other = Quotas(pool, Settings()), Quotas(pool, Settings())
    key, cost = ("openai", "m"), Cost(1, 100, 0, 0)

    async def answer(quotas: Quotas, limits: RateLimits) -> float:
        await quotas.settle(
            Grant(key, cost), counted=cost, limits=limits, sent_at=time.time(), heard=True
        )
        return (await state(conn))["window_seconds"]

    await learned(conn, rpm=4, tpm=100_000, window=60)
    assert await answer(one, _requests_only(3, "1500ms")) == pytest.approx(2.0)
    assert await answer(other, _requests_only(1, "260ms")) == pytest.approx(2.0)  # kept
    assert await answer(one, _requests_only(1, "260ms")) == pytest.approx(2.0)
    assert await answer(other, _requests_only(4, "2010ms")) == pytest.approx(2.01)  # better
    # Once the stored read is ten minutes old, a new one is stored whatever its error.
    await conn.execute("update ai_job_provider_quotas set window_at = now() - interval '11 min'")
    assert await answer(one, _requests_only(1, "260ms")) == pytest.approx(1.04)


async def test_a_window_said_without_its_error_is_stored_as_before(conn: Conn) -> None:
    """A caller of before sql/037 (no p_window_error) stores every window it reads."""
    await learned(conn, rpm=4, tpm=100_000, window=10)
    await settle(conn, window=2.0, window_error=0.01)
    await settle(conn, window=5.0, window_error=1.0)
    assert (await state(conn))["window_seconds"] == 2.0
    await conn.execute(
        "select ai_job_quota_settle('openai', 'm', '{0,0,0,0}', '{null,null,null,null}',"
        " null, null, 0, 5.0, true, 0, false)"
    )
    row = await state(conn)
    assert (row["window_seconds"], row["window_error"]) == (5.0, None)
    await settle(conn, window=3.0, window_error=math.inf)  # a reset that says nothing
    assert (await state(conn))["window_seconds"] == 3.0
    await settle(conn, window=4.0, window_error=0.5)
    assert (await state(conn))["window_seconds"] == 4.0
