"""The GenAI histograms of /metrics (sql/028, listener/providers/meter.py,
listener/web/metrics.py): what the provider calls of real jobs observed, added up
across workers in the database, rendered under the conventions' names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from listener import db
from listener.providers.base import Usage
from listener.providers.meter import DURATION_BOUNDS, TOKEN_BOUNDS, Meter
from listener.settings import Settings
from listener.web import metrics
from tests.fakeai import FakeAI
from tests.helpers import aconnect, connect, insert_course
from tests.integration.test_tracing import run_jobs, worker_settings


async def scrape(db_url: str) -> dict[Any, float]:
    """Each sample of the GenAI families: (name, sorted labels) -> value."""
    async with await aconnect(db_url) as c:
        text = metrics.render(await metrics.collect(c, Settings(_env_file=None)))  # type: ignore[call-arg]
    found: dict[Any, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        if family.name.startswith("gen_ai_"):
            for s in family.samples:
                found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def labels(provider: str = "openai", model: str = "gpt-4.1-mini", **more: str) -> Any:
    base = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": provider,
        "gen_ai_request_model": model,
        **more,
    }
    return tuple(sorted(base.items()))


async def test_two_workers_add_up(db_url: str) -> None:
    pool = db.make_pool(db_url, 2)
    await pool.open()
    try:
        for _ in range(2):  # two workers' meters, one database
            meter = Meter(pool, {"gpt-4.1-mini"})
            meter.observe("chat", "openai", "gpt-4.1-mini", 0.5, Usage(100, 800))
            meter.observe("chat", "openai", "gpt-4.1-mini", 3.0, None)  # failed
            meter.observe("chat", "placeholder", "placeholder", 0.001, Usage(1, 1))  # not a call
            await meter.flush()
            assert meter.histograms == {}
    finally:
        await pool.close()
    got = await scrape(db_url)
    d = "gen_ai_client_operation_duration_seconds"
    assert got[(f"{d}_count", labels())] == 4
    assert got[(f"{d}_sum", labels())] == 7.0
    assert got[(f"{d}_bucket", labels(le="0.64"))] == 2  # the two 0.5 s calls
    assert got[(f"{d}_bucket", labels(le="2.56"))] == 2
    assert got[(f"{d}_bucket", labels(le="5.12"))] == 4
    assert got[(f"{d}_bucket", labels(le="+Inf"))] == 4
    t = "gen_ai_client_token_usage"
    inp, out = labels(gen_ai_token_type="input"), labels(gen_ai_token_type="output")
    assert got[(f"{t}_count", inp)] == 2 and got[(f"{t}_sum", inp)] == 200
    assert got[(f"{t}_sum", out)] == 1600
    assert got[(f"{t}_bucket", labels(gen_ai_token_type="input", le="256"))] == 2
    assert got[(f"{t}_bucket", labels(gen_ai_token_type="output", le="256"))] == 0
    assert got[(f"{t}_bucket", labels(gen_ai_token_type="output", le="1024"))] == 2
    assert not [k for k in got if ("gen_ai_provider_name", "placeholder") in k[1]]


async def test_real_calls_are_observed(db_url: str, fake: FakeAI, tmp_path: Path) -> None:
    fake.modes["openai"] = "500"
    with connect(db_url) as c:
        jid = insert_course(c, "Tides")
    await run_jobs(worker_settings(db_url, fake, tmp_path), [("ai_course_jobs", jid)], {"done"})
    got = await scrape(db_url)  # the runtime's close flushed its meter
    d = "gen_ai_client_operation_duration_seconds_count"
    assert got[(d, labels())] == 1  # the failed call
    assert got[(d, labels("anthropic", "claude-haiku-4-5"))] == 1
    t = "gen_ai_client_token_usage_count"
    assert got[(t, labels("anthropic", "claude-haiku-4-5", gen_ai_token_type="output"))] == 1
    assert (t, labels(gen_ai_token_type="output")) not in got  # the failed call: no tokens


async def test_bounds_that_differ_are_refused_not_mixed(db_url: str) -> None:
    async with await aconnect(db_url) as c:
        args = "array['chat'], array['openai'], array['gpt-4.1-mini'], array['']"
        await c.execute(
            f"select ai_job_add_call_histograms(array['operation_duration'], {args},"
            " array['{1,0}'], array[1.0], array[1::bigint])"
        )
        await c.execute(
            f"select ai_job_add_call_histograms(array['operation_duration'], {args},"
            " array['{1,0,0}'], array[1.0], array[1::bigint])"
        )
        cur = await c.execute("select counts, count from ai_job_call_histograms")
        assert await cur.fetchall() == [{"counts": [1, 0], "count": 1}]
    # a row of other bounds than this version's: left out of /metrics, not misread
    assert not [k for k in await scrape(db_url) if k[0].endswith("_count")]
    assert len(TOKEN_BOUNDS) == len(DURATION_BOUNDS) == 14
