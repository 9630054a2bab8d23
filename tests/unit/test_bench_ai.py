"""The figures `make bench-ai` publishes (bench/ai/figures.py, bench/ai/load.py):
the quota's optimum, the crowd's shape, goodput in steady state, waits per user
class with the jobs never started counted, and Jain's index over max-min shares."""

from __future__ import annotations

import pytest

from bench.ai import figures
from bench.ai import load as L
from bench.ai.run import Config, JobRec, Outcome


def test_the_optimum_is_tpm_over_prompt_and_max_tokens() -> None:
    load = L.Load()
    # 200,000 / (771 + 4,000): OpenAI draws max_tokens whatever the answer's length
    assert load.optimum_per_min() == pytest.approx(200_000 / 4771)
    assert load.optimum_per_min(rpm=10) == 10  # the lower limit wins
    assert load.mean_call == pytest.approx(0.5 + 2750 / 75)
    assert load.in_flight == pytest.approx(load.optimum_per_min() * load.mean_call / 60)


def test_time_is_scaled_with_every_ratio_kept() -> None:
    load = L.Load(scale=4, minutes=8)
    assert load.window == 15 and load.seconds == 120
    args = dict(zip(load.fake_args()[::2], load.fake_args()[1::2], strict=True))
    assert args["--window"] == "15" and args["--tps"] == "300" and args["--ttft"] == "0.125"
    assert args["--rpm"] == "500" and args["--tpm"] == "200000"


def test_the_crowd_is_one_heavy_user_first_then_twenty_light_ones() -> None:
    load = L.Load(scale=4, minutes=8)
    crowd = load.crowd()
    assert load.heavy_jobs / load.total_jobs == pytest.approx(0.6, abs=0.01)
    assert len(crowd.arrivals) == load.light_jobs
    assert {u for _, u in crowd.arrivals} == set(crowd.light) and len(crowd.light) == 20
    times = [t for t, _ in crowd.arrivals]
    assert times == sorted(times)
    assert 0.1 * load.seconds <= times[0] and times[-1] <= 0.9 * load.seconds
    counts = [sum(1 for _, u in crowd.arrivals if u == x) for x in crowd.light]
    assert max(counts) - min(counts) <= 1
    # the light users ask for less than the quota allows while they arrive
    rate = load.light_jobs / (0.8 * load.minutes)
    assert rate < load.optimum_per_min()


def test_max_min_shares_give_the_small_demands_in_full() -> None:
    shares = figures.max_min_shares({"a": 2, "b": 3, "c": 100}, 30)
    assert shares == {"a": 2, "b": 3, "c": 25}
    assert figures.max_min_shares({"a": 10, "b": 10}, 8) == {"a": 4, "b": 4}


def test_jain() -> None:
    assert figures.jain([1, 1, 1]) == pytest.approx(1.0)
    assert figures.jain([1, 0, 0, 0]) == pytest.approx(0.25)
    assert figures.jain([]) is None


def outcome(jobs: list[JobRec], t_end: float = 120.0) -> Outcome:
    return Outcome(
        config=Config("x", "ai-jobs", 1),
        t0=0.0,
        t_end=t_end,
        jobs=jobs,
        fake={"requests": {"openai": 200}, "rate_limited": {"openai": 1}},
        cpu_s=6.0,
        rss_mb=90.0,
        in_flight=[(60.0, 20), (90.0, 30)],
        commits=1000,
        rollbacks=0,
        bench_txns=100,
        user_cap=None,
    )


def test_goodput_counts_the_steady_state_and_waits_count_unstarted_jobs() -> None:
    load = L.Load(scale=4, minutes=8)  # window 15 s: steady from 30 s
    jobs = [JobRec("h", 0.0, 1.0, 10.0, "done", 3000, 800)]  # before the steady state
    # 60 jobs done between 30 and 120 s: 6 quota minutes, 10 a minute
    jobs += [JobRec("h", 0.0, 20.0, 30.0 + 1.5 * i, "done", 2000, 800) for i in range(60)]
    jobs.append(JobRec("l", 100.0, None, None, "pending"))  # waited 20 s so far
    jobs.append(JobRec("l", 110.0, 110.5, None, "processing"))
    f = figures.compute(outcome(jobs), load, heavy="h")
    assert f["jobs_per_min"] == 10.0
    assert f["tokens_per_min"] == 20_000
    assert f["optimum_jobs_per_min"] == pytest.approx(200_000 / 4800, abs=0.05)
    assert f["jobs_done"] == 61
    assert f["http_429_per_1000_calls"] == 5.0
    # real-scale seconds: wall waits x 4
    assert f["wait_p50_s"]["light"] == pytest.approx((20 * 4 + 0.5 * 4) / 2)
    assert f["waits_censored"] == {"light": 1}
    assert f["wait_p95_s"]["heavy"] == pytest.approx(80.0)
    assert f["transactions_per_job"] == pytest.approx(900 / 61, abs=0.1)
    assert f["in_flight_mean"] == 25.0


def test_the_conditions_a_fixed_tuning_does_not_see() -> None:
    """The shared key: the fake gives this client 70% of each refill, the optimum
    and the crowd shrink with it. The raise: the limits double at minute 3, the
    steady state starts a minute later at the doubled optimum, and the heavy user
    asks for what the raise adds while the light users ask for what they did."""
    plain = L.Load(scale=4, minutes=8)
    shared, raised = plain.under("shared"), plain.under("raised")
    args = dict(zip(shared.fake_args()[::2], shared.fake_args()[1::2], strict=True))
    assert args["--foreign"] == "0.3" and args["--raise-at"] == "0"
    assert shared.steady_optimum() == pytest.approx(0.7 * plain.optimum_per_min())
    assert shared.steady_from == plain.steady_from == 2.0
    assert shared.total_jobs == pytest.approx(1.25 * plain.optimum_per_min() * 6.6, abs=1)
    assert shared.light_jobs == round(shared.total_jobs * 0.4)

    args = dict(zip(raised.fake_args()[::2], raised.fake_args()[1::2], strict=True))
    assert args["--raise-at"] == "45" and args["--raise-by"] == "2"  # 3 windows of 15 s
    assert raised.steady_from == 4.0
    assert raised.steady_optimum() == pytest.approx(2 * plain.optimum_per_min())
    assert raised.light_jobs == plain.light_jobs
    assert raised.heavy_jobs == raised.total_jobs - plain.light_jobs > 2 * plain.heavy_jobs - 50
    # pgqueuer is tuned to the key's stated quota: the same in every condition
    assert raised.in_flight == shared.in_flight == plain.in_flight
    # a shorter run raises 3/8 of the way through
    assert L.Load(minutes=4).under("raised").raise_at == 1.5
    # a long run measured over its last part (--steady-from), in any condition
    assert L.Load(minutes=20, steady_start=10).steady_from == 10.0
    assert L.Load(minutes=20, steady_start=10).under("raised").steady_from == 10.0


def test_goodput_under_a_raise_is_against_the_raised_optimum() -> None:
    load = L.Load(scale=4, minutes=8).under("raised")  # steady from 60 s (4 windows)
    jobs = [JobRec("h", 0.0, 1.0, 59.0, "done", 3000, 771) for _ in range(30)]  # before it
    jobs += [JobRec("h", 0.0, 20.0, 60.0 + 0.25 * i, "done", 2000, 771) for i in range(240)]
    f = figures.compute(outcome(jobs), load, heavy="h")
    assert f["jobs_per_min"] == 60.0  # 240 in 4 quota minutes
    assert f["optimum_jobs_per_min"] == pytest.approx(2 * 200_000 / 4771, abs=0.05)
    assert f["goodput_vs_optimum"] == pytest.approx(60 / (2 * 200_000 / 4771), abs=0.001)
