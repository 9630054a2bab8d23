"""The claim gate: how many jobs of a lane the claim loop may claim now.

A lane is the jobs whose calls ask the same providers and models
(listener.jobs.LANES): a table's, or a media table's image or speech jobs. A job
that finds every provider of its chain unavailable (a breaker open, its probe
in flight, the quota spent) goes back to pending; claiming the next ones of its
lane only to find the same would be churn. So the chain notes, per lane, the
providers its last job would ask (their stops: provider, model, estimated
cost), and before each claim round of a lane that is gated (a metered quota, or
a breaker not closed) the claim loop asks `admit`:

- the first provider of the lane that may be called decides: a breaker open or
  probing sends the question on to the next provider; a half-open breaker whose
  probe is free admits one job (it takes the probe; no other is admitted for it
  meanwhile); a metered quota admits as
  many jobs as it has room for, and reserves their calls (Quotas.take), so that
  two workers never claim for the same room;
- when none may be called: claim nothing, and ask again after the shortest
  wait (an open breaker's cooldown, a second while a probe is in flight or the
  first calls learn the limits, or the time until one more call fits).

A lane that ends in an unguarded provider (the placeholder) is never held: its
jobs always have somewhere to go.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from listener.jobs import FREE, Admitted
from listener.providers.breaker import PROBE_RECHECK_SECONDS, Admission, Breakers
from listener.providers.quota import Cost, Key, Quotas, Taken


@dataclass(frozen=True)
class Stop:
    """One provider of a lane's chain, as its jobs would ask it."""

    provider: str
    model: str
    cost: Cost
    guarded: bool = True  # breakers and quotas apply (not the placeholder)

    @property
    def key(self) -> Key:
        return (self.provider, self.model)


class ClaimGate:
    def __init__(self, breakers: Breakers, quotas: Quotas) -> None:
        self.breakers = breakers
        self.quotas = quotas
        self.lanes: dict[str, tuple[Stop, ...]] = {}  # by lane, the stops of its last job
        self.on_change: Callable[[], None] | None = None  # a held lane may be claimed again
        self._taken: dict[str, tuple[Key, int]] = {}  # a lane's permits of its last admit
        # A job admitted to take a half-open breaker's probe, until when: the
        # probe is its own until it had the time to take it.
        self._probers: dict[str, float] = {}
        breakers.on_change = self._changed
        quotas.on_change = self._changed

    def note(self, lane: str, stops: Sequence[Stop]) -> None:
        """The providers a job of `lane` asks, in order (the chain, at each job)."""
        self.lanes[lane] = tuple(stops)

    def gates(self, lane: str) -> bool:
        """Whether `lane`'s claims go through `admit` (cheap: the local copies)."""
        stops = self.lanes.get(lane)
        if not stops or not all(s.guarded for s in stops):
            return False
        return any(
            self.quotas.is_metered(s.key) or self.breakers.is_open(s.provider) for s in stops
        )

    async def admit(self, lane: str, wanted: int) -> Admitted:
        stops = self.lanes.get(lane)
        if not stops or not all(s.guarded for s in stops):
            return FREE
        waits: list[float] = []
        reasons: list[str] = []
        quota = True
        for stop in stops:
            seen = await self.breakers.peek(stop.provider)
            now = time.monotonic()
            prober = self._probers.get(stop.provider, 0.0)
            if seen.probe and prober > now:
                seen = Admission(False, wait=prober - now, reason="breaker half-open, probe due")
            if not seen.call:
                waits.append(seen.wait)
                reasons.append(f"{stop.provider}: {seen.reason}")
                quota = False
                continue
            n = 1 if seen.probe else wanted
            taken = Taken(n)  # not metered: no reservation to make
            if self.quotas.is_metered(stop.key):
                taken = await self.quotas.take(stop.key, stop.cost, n)
                if taken.granted:
                    self._taken[lane] = (stop.key, taken.granted)
            if taken.granted:
                if seen.probe:
                    self._probers[stop.provider] = now + PROBE_RECHECK_SECONDS
                return Admitted(taken.granted)
            if taken.too_big:
                continue  # its jobs go on to the next provider, or are refused
            waits.append(taken.wait)
            reasons.append(f"{stop.provider}: quota of {stop.model} spent")
        if not waits:
            return FREE  # every provider refuses these jobs: let them say so
        return Admitted(0, min(waits), "; ".join(reasons), quota)

    async def claimed(self, lane: str, got: int) -> None:
        """After the claim of an admitted round: the reservations beyond the jobs
        claimed go back at once."""
        key, n = self._taken.pop(lane, (None, 0))
        if key is not None and got < n:
            await self.quotas.give_back(key, n - got)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
