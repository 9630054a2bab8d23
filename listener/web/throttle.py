"""Failed sign-ins, counted per client address.

After LIMIT failures from one address within WINDOW seconds, every sign-in from
it is refused (429, with Retry-After) until the oldest of them is WINDOW old: a
right token too, or the refusal would tell a guesser when they hit. The token's
length is the real defence (at least 32 characters, see auth.MIN_TOKEN_LENGTH);
this keeps guessing slow and the log quiet. Memory is bounded: at most MAX_KEYS
addresses are remembered, the stalest forgotten first.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

LIMIT = 10
WINDOW = 60.0
MAX_KEYS = 10_000


class Throttle:
    def __init__(
        self, limit: int = LIMIT, window: float = WINDOW, max_keys: int = MAX_KEYS
    ) -> None:
        self.limit, self.window, self.max_keys = limit, window, max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, key: str, now: float | None = None) -> float:
        """Seconds until `key` may try again; 0 when it may now."""
        now = time.monotonic() if now is None else now
        times = self._failures.get(key)
        if times is None:
            return 0.0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0.0
        return times[0] + self.window - now if len(times) >= self.limit else 0.0

    def failed(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        times = self._failures.pop(key, None) or deque(maxlen=self.limit)
        times.append(now)
        self._failures[key] = times  # most recently failed last
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)
