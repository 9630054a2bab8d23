"""The benchmark's statistics (bench/stats.py): the figures published in
bench/results/latest.json are only as right as these."""

from __future__ import annotations

import pytest

from bench import stats


def test_percentile_interpolates_between_closest_ranks() -> None:
    xs = [10.0, 20.0, 30.0, 40.0]
    assert stats.percentile(xs, 0) == 10.0
    assert stats.percentile(xs, 100) == 40.0
    assert stats.percentile(xs, 50) == pytest.approx(25.0)  # mean of the middle two
    assert stats.percentile(xs, 25) == pytest.approx(17.5)
    assert stats.percentile([5.0], 99) == 5.0


def test_percentile_ignores_input_order() -> None:
    assert stats.percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_p99_of_a_hundred_values_sits_between_the_top_two() -> None:
    xs = [float(i) for i in range(1, 101)]  # 1..100
    assert stats.percentile(xs, 99) == pytest.approx(99.01)
    assert stats.percentile(xs, 95) == pytest.approx(95.05)


@pytest.mark.parametrize("p", [-1, 100.5])
def test_percentile_rejects_out_of_range(p: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        stats.percentile([1.0], p)


def test_empty_inputs_raise() -> None:
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.value_range([])
    with pytest.raises(ValueError):
        stats.across_rounds([])


def test_median_and_range() -> None:
    assert stats.median([7.0, 1.0, 4.0]) == 4.0
    assert stats.median([1.0, 2.0, 3.0, 10.0]) == 2.5
    assert stats.value_range([3.0, -1.0, 8.0]) == (-1.0, 8.0)


def test_latency_summary() -> None:
    ms = [float(i) for i in range(1, 101)]
    s = stats.latency_summary(ms)
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p95_ms"] == pytest.approx(95.05)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["max_ms"] == 100.0
    assert s["n"] == 100


def test_across_rounds_takes_medians_and_ranges() -> None:
    rounds = [
        {"jobs_per_s": 900.0, "p50_ms": 2.0},
        {"jobs_per_s": 1100.0, "p50_ms": 1.0},
        {"jobs_per_s": 1000.0, "p50_ms": 9.0, "only_here": 1.0},
    ]
    out = stats.across_rounds(rounds)
    assert out["jobs_per_s"] == 1000.0
    assert out["p50_ms"] == 2.0
    assert out["range"] == {"jobs_per_s": [900.0, 1100.0], "p50_ms": [1.0, 9.0]}
    assert out["rounds"] == 3
    assert "only_here" not in out  # a figure missing from a round is not summarised


def test_ratio() -> None:
    assert stats.ratio(1.0, 4.0) == 0.25
    assert stats.ratio(1.0, 0.0) is None


def test_across_rounds_skips_nested_figures() -> None:
    rounds = [{"p50_ms": 1.0, "started_at": {"p50_ms": 0.5}}, {"p50_ms": 3.0, "started_at": {}}]
    out = stats.across_rounds(rounds)
    assert out["p50_ms"] == 2.0
    assert "started_at" not in out
