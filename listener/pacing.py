"""How far ahead of its free slots a worker claims: in proportion to the share
of a slot's cycle spent waiting on the claim's round trip, so that jobs shorter
than a round trip come in batches and a generation is never claimed ahead
(docs/design.md, "Claiming ahead, for short jobs only")."""

from __future__ import annotations

from collections import defaultdict

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
        self.table_time: defaultdict[str, Average] = defaultdict(Average)  # the same, by table

    def ahead(self, running_for: float = 0.0) -> int:
        """Jobs to claim beyond the free slots:
        ROUNDS * concurrency * round_trip / (job_time + round_trip), where the
        job time is at least `running_for`, the age of the oldest running job (a
        long job running now counts as the job time)."""
        r, d = self.round_trip.value, self.job_time.value
        if r is None or d is None or r <= 0:
            return 0
        d = max(d, running_for)
        return int(ROUNDS * self.concurrency * r / (d + r))
