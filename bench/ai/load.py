"""The load: the provider's quota and pace, the time scale, and the crowd of users.

Everything is stated at real scale (a quota per minute, answers at tokens per
second) and run `scale` times faster: the quota's window is 60 / scale seconds,
the answers come `scale` times faster, the crowd arrives `scale` times faster,
and the workers' own provider timings (call timeout, breaker cool-down, retry
base) are divided by `scale` too. Every ratio between them is kept; what is not
scaled is the queue's own machinery (its heartbeats, sweeps, the claim gate's
1-2 s waits, the database's round trips), which a faster run therefore weighs
more than a real one would. Figures are reported back at real scale: jobs and
tokens per quota minute, waits in real-scale seconds."""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass, field, replace

# Real scale, as the issue describes a low-tier key and a course.
RPM = 500
TPM = 200_000
ANSWER = (1500, 4000)  # tokens, triangular, peaked midway
TPS = 75.0  # tokens a second (the 50-100: the middle)
TTFT = 0.5  # seconds to the first token
MAX_OUTPUT = 4000  # AI_MAX_OUTPUT_TOKENS: the largest answer (OpenAI counts it against TPM)
PROMPT_TOKENS = 771  # what the fake counts for the course prompt (4 characters a token)
AI_TIMEOUT = 90.0  # a 4,000-token answer at 75 tokens/s takes 54 s: above the default 50
BREAKER_COOLDOWN = 30.0  # PROVIDER_BREAKER_COOLDOWN_SECONDS's default
RETRY_BASE = 10.0  # RETRY_BASE_SECONDS's default
CONCURRENCY = 50  # WORKER_CONCURRENCY per process (the README's advice for generation)


# The conditions of a deployment that a fixed tuning does not see (`make bench-ai
# ARGS=--scenarios ...`): a key shared with another application that takes 30% of
# its quota, and a key moved up a tier (its limits doubled) at quota minute 3 (of a
# run of 8: 3/8 of the way through a shorter one).
@dataclass(frozen=True)
class Scenario:
    what: str
    foreign: float = 0.0  # the share of the key's refill another client takes
    raise_at: float = 0.0  # the quota minute of the raise, in a run of 8 (0: none)
    raise_by: float = 1.0


SCENARIOS = {
    "": Scenario("as the issue describes it"),
    "shared": Scenario("key shared (30% to another client)", foreign=0.3),
    "raised": Scenario("key's limits doubled at minute 3", raise_at=3.0, raise_by=2.0),
}


@dataclass(frozen=True)
class Load:
    scale: float = 4.0
    minutes: float = 8.0  # quota minutes per configuration
    rpm: int = RPM
    tpm: int = TPM
    heavy_share: float = 0.6
    light_users: int = 20
    seed: int = 1
    # Conditions a deployment meets (`scenario`): another client of the key takes
    # `foreign` of its refill; the provider raises the key's limits by `raise_by`
    # at quota minute `raise_at`.
    scenario: str = ""
    foreign: float = 0.0
    raise_at: float = 0.0
    raise_by: float = 1.0
    # The quota minute the steady state is measured from, when set (`--steady-from`:
    # a long run's last part, after every system has spent the first full bucket).
    steady_start: float = 0.0

    def under(self, scenario: str) -> Load:
        """This load under one of SCENARIOS ("" the plain one)."""
        c = SCENARIOS[scenario]
        return replace(
            self,
            scenario=scenario,
            foreign=c.foreign,
            raise_at=c.raise_at * self.minutes / 8.0,  # stated for 8 minutes
            raise_by=c.raise_by,
        )

    # -- the provider -----------------------------------------------------------

    @property
    def window(self) -> float:
        return 60.0 / self.scale

    @property
    def seconds(self) -> float:
        """Wall seconds of one configuration's run."""
        return self.minutes * self.window

    def fake_args(self) -> list[str]:
        return [
            "--rpm", str(self.rpm), "--tpm", str(self.tpm), "--window", f"{self.window:g}",
            "--ttft", f"{TTFT / self.scale:g}", "--tps", f"{TPS * self.scale:g}",
            "--size", f"{ANSWER[0]}-{ANSWER[1]}", "--seed", str(self.seed),
            "--foreign", f"{self.foreign:g}",
            "--raise-at", f"{self.raise_at * self.window:g}", "--raise-by", f"{self.raise_by:g}",
        ]  # fmt: skip

    # -- the optimum ------------------------------------------------------------

    def optimum_per_min(
        self, tpm: float | None = None, rpm: float | None = None, prompt: float = PROMPT_TOKENS
    ) -> float:
        """Calls (jobs) per quota minute the quota allows in steady state: OpenAI
        draws a call's prompt and its max_tokens from TPM."""
        return min(rpm or self.rpm, (tpm or self.tpm) / (prompt + MAX_OUTPUT))

    @property
    def steady_from(self) -> float:
        """Quota minutes after which the steady state is measured: the first full
        bucket and the first calls are behind by 2, a raise's first calls a minute
        after it; `steady_start` when set."""
        if self.steady_start:
            return self.steady_start
        return max(2.0, self.raise_at + 1.0) if self.raise_at else 2.0

    def steady_optimum(self, prompt: float = PROMPT_TOKENS) -> float:
        """The optimum in the steady state: the key's quota as raised by then, less
        the other client's share."""
        k = (self.raise_by if self.raise_at else 1.0) * (1.0 - self.foreign)
        return self.optimum_per_min(tpm=self.tpm * k, rpm=self.rpm * k, prompt=prompt)

    @property
    def mean_answer(self) -> float:
        return sum(ANSWER) / 2

    @property
    def mean_call(self) -> float:
        """A call's mean length at real scale, seconds (the time a slot takes to free)."""
        return TTFT + self.mean_answer / TPS

    @property
    def in_flight(self) -> float:
        """Calls in flight at the optimum (Little's law)."""
        return self.optimum_per_min() * self.mean_call / 60

    # -- the crowd --------------------------------------------------------------

    @property
    def total_jobs(self) -> int:
        """A quarter more than the quota allows in the run (its first full bucket
        included): the queue is never empty."""
        share = 1.0 - self.foreign
        minutes = self.minutes * share
        if self.raise_at:
            minutes += (self.minutes - self.raise_at) * share * (self.raise_by - 1.0)
        return math.ceil(1.25 * self.optimum_per_min() * (minutes + 1))

    @property
    def heavy_jobs(self) -> int:
        return self.total_jobs - self.light_jobs

    @property
    def light_jobs(self) -> int:
        """At 8 minutes, about 70% of what the quota allows while they arrive (the
        quota before any raise: the heavy user asks for what a raise adds)."""
        unraised = replace(self, raise_at=0.0, raise_by=1.0).total_jobs
        return round(unraised * (1 - self.heavy_share))

    def crowd(self) -> Crowd:
        return Crowd.make(self)


@dataclass
class Crowd:
    """Who asks for what, when: the heavy user's jobs at 0, then the light users'
    one at a time, at random moments spread over the run (from a tenth of it to
    nine tenths), each from one of `light_users` users."""

    heavy: str
    light: list[str]
    arrivals: list[tuple[float, str]] = field(default_factory=list)  # (wall offset s, user)

    @classmethod
    def make(cls, load: Load) -> Crowd:
        rng = random.Random(load.seed)
        heavy = str(uuid.UUID(int=rng.getrandbits(128)))
        light = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(load.light_users)]
        lo, hi = 0.1 * load.seconds, 0.9 * load.seconds
        times = sorted(rng.uniform(lo, hi) for _ in range(load.light_jobs))
        who = [light[i % len(light)] for i in range(len(times))]  # as many jobs each
        rng.shuffle(who)
        return cls(heavy, light, list(zip(times, who, strict=True)))

    def user_class(self, user: str) -> str:
        return "heavy" if user == self.heavy else "light"
