"""Client-side sliding-window limiter, one per AccessToken, shared by every thread of the process.

Mews allows a number of requests per AccessToken within a sliding window (200 per 30 s).
Staying under it on our side means a well-behaved run rarely meets a 429, and several
hooks or threads using the same token in one worker share the budget.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque

DEFAULT_MAX_REQUESTS = 200
DEFAULT_PERIOD_S = 30.0
#: Added to the window so that the server, which counts on arrival, never sees more
#: requests in its window than we do in ours.
DEFAULT_MARGIN_S = 0.05


class SlidingWindowLimiter:
    """Blocks ``acquire()`` until sending one more request keeps the window under its limit."""

    def __init__(self, max_requests: int = DEFAULT_MAX_REQUESTS, period_s: float = DEFAULT_PERIOD_S) -> None:
        if max_requests < 1 or period_s <= 0:
            raise ValueError("rate limit needs max_requests >= 1 and period_s > 0")
        self.max_requests = max_requests
        self.period_s = period_s
        self._window = period_s + DEFAULT_MARGIN_S
        self._sent: deque[float] = deque()
        self._blocked_until = 0.0
        self._lock = threading.Lock()
        #: Seconds threads spent waiting, for progress reports.
        self.waited_s = 0.0

    def acquire(self, deadline: float | None = None) -> bool:
        """Take one slot, waiting as needed. False when the slot would come after ``deadline``."""
        waited = 0.0
        while True:
            with self._lock:
                now = time.monotonic()
                while self._sent and self._sent[0] <= now - self._window:
                    self._sent.popleft()
                wait = self._blocked_until - now
                if len(self._sent) >= self.max_requests:
                    wait = max(wait, self._sent[0] + self._window - now)
                if wait <= 0:
                    self._sent.append(now)
                    self.waited_s += waited
                    return True
            if deadline is not None and time.monotonic() + wait > deadline:
                self.waited_s += waited
                return False
            time.sleep(wait)
            waited += wait

    def pause(self, seconds: float) -> None:
        """Hold every thread back after Mews answered 429 with Retry-After."""
        with self._lock:
            self._blocked_until = max(self._blocked_until, time.monotonic() + seconds)


_registry: dict[tuple[str, int, float], SlidingWindowLimiter] = {}
_registry_lock = threading.Lock()


def limiter_for(
    access_token: str, max_requests: int = DEFAULT_MAX_REQUESTS, period_s: float = DEFAULT_PERIOD_S
) -> SlidingWindowLimiter:
    """The process-wide limiter of an AccessToken (keyed by its hash, never the token itself)."""
    key = (hashlib.sha256(access_token.encode()).hexdigest(), max_requests, period_s)
    with _registry_lock:
        limiter = _registry.get(key)
        if limiter is None:
            limiter = _registry[key] = SlidingWindowLimiter(max_requests, period_s)
        return limiter
