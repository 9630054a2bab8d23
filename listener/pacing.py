"""How far ahead of its free slots a worker claims.

A slot that frees up waits one claim round trip for its next job. For a
generation job (seconds) that wait is nothing; for a job shorter than the
round trip, the slot would sit idle most of the time, and every claim would
cost a commit for a handful of jobs. The worker therefore holds jobs claimed
beyond its running ones, in proportion to the share of a slot's cycle spent
waiting on the round trip:

    ahead = ROUNDS * concurrency * round_trip / (job_time + round_trip)

Its slots start `concurrency` jobs per `job_time`, so a held job waits at most
ROUNDS * round_trip * job_time / (job_time + round_trip) < ROUNDS round trips
for its slot: some 16 ms here, whatever the jobs. Jobs that take no time get
ROUNDS batches ahead, so that one commit serves a hundred of them; jobs longer
than ROUNDS * concurrency round trips (a sixth of a second at concurrency 10)
get none at all, so a generation never waits in one worker's hands while
another worker is idle. Held jobs are
heartbeated like running ones and given back at shutdown without waiting.
"""

from __future__ import annotations

ROUNDS = 16
SMOOTHING = 0.2  # weight of the newest sample in the moving averages


class Average:
    """Exponentially weighted moving average; None until the first sample."""

    def __init__(self) -> None:
        self.value: float | None = None

    def add(self, sample: float) -> None:
        v = self.value
        self.value = sample if v is None else v + SMOOTHING * (sample - v)


class Pacing:
    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.round_trip = Average()  # seconds per claim round
        self.job_time = Average()  # seconds per handler run

    def ahead(self) -> int:
        r, d = self.round_trip.value, self.job_time.value
        if r is None or d is None or r <= 0:
            return 0
        return int(ROUNDS * self.concurrency * r / (d + r))
