"""How far ahead of its slots a worker claims, from what it measured."""

from __future__ import annotations

import time
import uuid

import pytest

from listener.jobs import Job
from listener.leases import ReadyQueue
from listener.pacing import ROUNDS, SMOOTHING, Average, Pacing


def paced(round_trip: float | None, job_time: float | None, concurrency: int = 10) -> int:
    p = Pacing(concurrency)
    p.round_trip.value, p.job_time.value = round_trip, job_time
    return p.ahead()


def test_nothing_ahead_before_anything_was_measured() -> None:
    assert paced(None, None) == 0
    assert paced(0.001, None) == 0
    assert paced(None, 0.0) == 0


def test_jobs_that_take_no_time_get_whole_batches_ahead() -> None:
    assert paced(0.001, 0.0) == ROUNDS * 10


def test_the_buffer_shrinks_as_jobs_get_longer_than_a_round_trip() -> None:
    assert paced(0.001, 0.001) == ROUNDS * 10 // 2
    assert paced(0.001, 0.2) == 0  # two hundred round trips long: no job held back
    assert paced(0.002, 30.0) == 0  # a generation


def test_moving_average_follows_the_newest_samples() -> None:
    a = Average()
    a.add(1.0)
    assert a.value == 1.0
    for _ in range(50):
        a.add(0.0)
    assert a.value is not None and a.value < 0.001


def test_the_averages_move_a_fifth_of_the_way_to_each_sample() -> None:
    a = Average()
    a.add(1.0)
    a.add(0.0)
    assert a.value == pytest.approx(1.0 - SMOOTHING)
    a.add(0.0)
    assert a.value == pytest.approx((1.0 - SMOOTHING) ** 2)


def test_a_round_trip_of_zero_holds_nothing_back() -> None:
    assert paced(0.0, 0.0) == 0
    assert paced(0.0, 0.001) == 0


def test_a_held_job_waits_less_than_rounds_round_trips_for_its_slot() -> None:
    for job_time in (0.0, 0.0005, 0.001, 0.01, 0.1, 1.0):
        ahead = paced(0.001, job_time, concurrency=10)
        assert ahead * job_time / 10 < ROUNDS * 0.001


def test_a_long_job_running_now_stops_claiming_ahead() -> None:
    p = Pacing(10)
    p.round_trip.value, p.job_time.value = 0.001, 0.0  # short jobs so far
    assert p.ahead(running_for=0.0) == ROUNDS * 10
    assert p.ahead(running_for=5.0) == 0  # but a slot is busy with a generation


def _job(n: int) -> Job:
    return Job("ai_course_jobs", uuid.UUID(int=n), uuid.uuid4(), 0, 3, {})


def test_ready_jobs_come_out_oldest_first_and_overdue_after_the_limit() -> None:
    held = ReadyQueue(limit=1.0)
    assert held.due_in(time.monotonic()) is None
    held.add([_job(1), _job(2)])
    now = time.monotonic()
    assert held.overdue(now) == []
    assert 0.9 < (held.due_in(now) or 0) <= 1.0
    assert [j.id.int for j in held.overdue(now + 1.0)] == [1, 2]
    assert len(held) == 0


def test_ready_jobs_can_be_dropped_one_by_one_or_all_at_once() -> None:
    held = ReadyQueue()
    held.add([_job(1), _job(2), _job(3)])
    assert held.remove(_job(2)) and not held.remove(_job(2))
    assert held.pop().id.int == 1
    assert [j.id.int for j in held.take_all()] == [3]
    assert len(held) == 0


def test_a_job_held_exactly_its_limit_is_overdue() -> None:
    held = ReadyQueue(limit=0.0)
    held.add([_job(1)])
    added = held.due_in(0.0)  # its time of arrival, with a limit of 0
    assert added is not None
    assert [j.id.int for j in held.overdue(added)] == [1]
