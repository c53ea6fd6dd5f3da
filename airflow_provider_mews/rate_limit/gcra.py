"""The learning GCRA, as pure functions on a small state record (no clock, no I/O, no locks).

Every backend (process memory, the per-user SQLite file, Redis through a Lua script that
mirrors these functions line by line) stores the same five numbers per AccessToken and
applies these two transitions atomically:

``reserve``
    GCRA (the "virtual scheduling" form of a leaky bucket): requests leave evenly, one per
    emission interval ``T = period / (limit - burst + 1) / factor``, with a tolerance of
    ``burst - 1`` requests. Any window of ``period`` seconds then holds at most ``limit``
    requests, and, because the pace is even, so does any *shorter* window of the same
    average rate (Mews may enforce one: its limits "can be changed without prior notice").
    A caller is given a slot (a time, possibly in the future) and the slot is booked at
    once, so waiting threads leave one by one instead of all polling the same instant.
``on_429``
    Learn from the server: always hold every caller until ``Retry-After`` has passed, then
    resume at the pace, one by one (the GCRA queue restarts at the hold's end). The first
    429 of a congestion epoch (a request that was given its slot after the last cut) lowers
    ``factor`` additively by ``STEP`` and drops the burst to 1; 429s of requests already in
    flight at the cut are honoured but teach nothing new (one cut per epoch, as TCP does).
    ``factor`` recovers slowly, ``RECOVERY_STEP`` per ``period`` without a 429 (AIMD), and
    the burst comes back once the factor is whole again.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Additive decrease of the rate factor per congestion epoch.
STEP = 0.10
#: Additive recovery of the rate factor per configured period without a 429.
RECOVERY_STEP = 0.01
#: The factor never goes below this: half the configured rate.
FACTOR_MIN = 0.5
#: Requests that may leave back to back before pacing starts (while nothing was learned).
DEFAULT_BURST = 2


@dataclass(frozen=True)
class Params:
    """The configured limit of one AccessToken (after any share for a fallback)."""

    limit: int
    period_s: float
    burst: int = DEFAULT_BURST

    def __post_init__(self) -> None:
        if self.limit < 1 or self.period_s <= 0:
            raise ValueError("rate limit needs max_requests >= 1 and period_s > 0")

    @property
    def effective_burst(self) -> int:
        return max(1, min(self.burst, self.limit))

    @property
    def interval_s(self) -> float:
        """Emission interval at factor 1: ``limit`` per ``period`` including the burst."""
        return self.period_s / (self.limit - self.effective_burst + 1)


@dataclass
class State:
    """What is stored per AccessToken: times are the backend's clock (seconds)."""

    tat: float = 0.0  # theoretical arrival time of the next request
    hold: float = 0.0  # nobody sends before this (Retry-After)
    factor: float = 1.0  # learned share of the configured rate, at time ``cut``
    cut: float = 0.0  # when the factor was last lowered


def factor_at(state: State, params: Params, now: float) -> float:
    """The factor, recovered by RECOVERY_STEP per period since the last cut."""
    recovered = state.factor + RECOVERY_STEP * max(0.0, now - state.cut) / params.period_s
    return min(1.0, recovered)


def reserve(state: State, params: Params, now: float, max_wait_s: float | None) -> float | None:
    """Book the next slot; returns its time (>= now), or None (state untouched) if later than ``max_wait_s``."""
    factor = factor_at(state, params, now)
    interval = params.interval_s / factor
    burst = params.effective_burst if factor >= 1.0 else 1
    start = max(now, state.hold)
    tat = max(state.tat, start)
    if tat > start + params.period_s * 10:
        tat = start  # the clock stepped backwards: forget the queue, keep the hold
    slot = max(now, state.hold, tat - (burst - 1) * interval)
    if max_wait_s is not None and slot - now > max_wait_s:
        return None
    state.tat = tat + interval
    return slot


def on_429(state: State, params: Params, now: float, retry_after_s: float, slot: float | None) -> bool:
    """Apply a 429 answered to the request sent in ``slot``. True when it lowered the factor."""
    state.hold = max(state.hold, now + retry_after_s)
    state.tat = max(state.tat, state.hold)
    if slot is not None and slot < state.cut:
        return False  # sent before the last cut: already learned from
    state.factor = max(FACTOR_MIN, factor_at(state, params, now) - STEP)
    state.cut = now
    return True
