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
for its slot (some 16 ms here) while jobs keep one length, whatever it is.
Jobs that take no time get ROUNDS batches ahead, so that one claim brings in
over a hundred of them; jobs longer than ROUNDS * concurrency round trips (a
sixth of a second at concurrency 10) get none at all, so a generation never
waits in one worker's hands while another worker is idle.

Job lengths can change under a worker's feet: a run of cached courses (a few
milliseconds each) followed by generations (seconds). Two guards keep a held job
from waiting behind a slow one: the job time used above is at least the age of
the oldest running job, so no more jobs are claimed ahead while a slot is busy
with a long one; and a job held for HOLD_SECONDS goes back to the queue, where
any idle worker can take it. Held jobs are heartbeated like running ones and
given back at shutdown without waiting.
"""

from __future__ import annotations

import time
from collections import deque

from listener.jobs import Job

ROUNDS = 16
HOLD_SECONDS = 1.0  # a held job that waited this long for a slot is given back
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

    def ahead(self, running_for: float = 0.0) -> int:
        """Jobs to hold beyond the running ones; `running_for` is the age of the
        oldest running job (a long job running now counts as the job time)."""
        r, d = self.round_trip.value, self.job_time.value
        if r is None or d is None or r <= 0:
            return 0
        d = max(d, running_for)
        return int(ROUNDS * self.concurrency * r / (d + r))


class Held:
    """The jobs a worker claimed ahead of a free slot, oldest first, each with
    the monotonic time it was claimed."""

    def __init__(self, limit: float = HOLD_SECONDS) -> None:
        self.limit = limit
        self._q: deque[tuple[Job, float]] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def jobs(self) -> list[Job]:
        return [j for j, _ in self._q]

    def add(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        self._q.extend([(j, now) for j in jobs])

    def pop(self) -> Job:
        return self._q.popleft()[0]

    def remove(self, job: Job) -> bool:
        for e in self._q:
            if e[0].id == job.id:
                self._q.remove(e)
                return True
        return False

    def take_all(self) -> list[Job]:
        jobs = self.jobs()
        self._q.clear()
        return jobs

    def overdue(self, now: float) -> list[Job]:
        """Take the jobs held longer than the limit."""
        out = []
        while self._q and now - self._q[0][1] >= self.limit:
            out.append(self._q.popleft()[0])
        return out

    def due_in(self, now: float) -> float | None:
        """Seconds until the oldest held job is overdue (None: none held)."""
        return self._q[0][1] + self.limit - now if self._q else None
