"""The learning GCRA, as pure functions on a small state record (no clock, no I/O, no locks).

Every backend (process memory, the per-user SQLite file, Redis through a Lua script that
mirrors these functions line by line) stores the same :class:`State` per AccessToken (six
numbers and the slots of the last period) and applies these two transitions atomically:

``reserve``
    While the rate is whole (no cut yet, or none for ``FRONT_RETRY_PERIODS``): windows of a
    tenth, which learn while they meet no 429 (``LEARN_AFTER_WINDOWS``, :func:`front_extra`: one
    more request per window, within ``limit`` per period plus ``LEARNED_MARGIN``). At most
    ``limit // 10`` requests in any ``limit // 10`` intervals of the rate plus
    ``FRONT_MARGIN`` (20 per 3.3 s at Mews's 200 per 30 s), each window's requests leaving at
    once. Any server window from a tenth of the period up holds them at the same average
    rate, and the margin covers a count that lags by up to a tenth of that window. Why not
    only the even pace below: a server counting late needs the same margin from an even pace,
    which then sends a run's last requests one by one where windows send them together
    (against 20 per 3 s counting 0-300 ms late, simulated: 0.87 of the ceiling at best evenly,
    0.93-0.99 in windows). The price: against a server enforcing exactly 200 per 30 s, a long
    run keeps 0.91 of the ceiling where the even pace keeps 0.97.

    Once a 429 has cut the rate, and for limits under ``FRONT_MIN_REQUESTS`` or over
    ``FRONT_MAX_REQUESTS`` per window:
    GCRA (the "virtual scheduling" form of a leaky bucket): requests leave evenly, one per
    emission interval ``T = period * (1 + margin) / (limit - burst + 1) / factor``, with a
    tolerance of ``burst - 1`` requests. Any window of ``period`` seconds then holds at most
    ``limit`` requests, and, because the pace is even, so does any *shorter* window of the
    same average rate (Mews may enforce one: its limits "can be changed without prior notice").

    Either way a caller is given a slot (a time, possibly in the future) and the slot is booked
    at once, so waiting threads leave in order instead of all polling the same instant. The
    slots of the last period (at least ``limit``) are kept at either pace, so windows resume
    from what was sent.
``on_429``
    Learn from the server: always hold every caller until ``Retry-After`` has passed (slots
    booked before its end are forgotten), then resume at the pace, one by one. A 429 while the
    windows are wider than a tenth (:func:`probing`) ends the probe: windows of a tenth again,
    no cut, no learning for ``FRONT_RETRY_PERIODS``. Otherwise, the first 429 of a
    congestion epoch (a request that was given its slot after the last cut) lowers ``factor``
    additively by ``STEP``, drops the burst to 1 and restarts the GCRA queue at the hold's end:
    every slot booked before the cut is stale (:func:`must_rebook`), so the 32-64 threads
    already waiting, in every process, book again at the new pace instead of spending 5-10 s of
    slots at the old one, which would fill the server's window again and cost a second cut.
    429s of requests already in flight at the cut are honoured but teach nothing new (one cut
    per epoch, as TCP does). A 429 at the very rate the last cut set (nothing recovered since)
    cuts only ``REFINE_STEP``.

Recovery (AIMD's slow increase) is careful because each cut costs ~2 429s (the requests in
flight): the factor stays where the cut put it for ``RECOVERY_DELAY_PERIODS`` periods, then
recovers ``RECOVERY_STEP`` per period, but never above ``PEAK_MARGIN`` times the factor at
which the last 429 came (``peak``); that memory fades by ``PEAK_DECAY`` per period, so a
limit that was raised is found again after some minutes. The burst comes back once the
factor is whole again, the windows ``FRONT_RETRY_PERIODS`` after the last cut (an hour at
30 s). The state outlives a task (a day without use), so runs, and mapped shards that start
later, begin at the learned pace while it lasts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Additive decrease of the rate factor per congestion epoch.
STEP = 0.10
#: The decrease when the 429 came at the rate the last cut set, before any recovery: the limit
#: lies just below it (a request sent late under load, a count lagging), so step half as far.
REFINE_STEP = 0.05
#: Additive recovery of the rate factor per configured period without a 429.
RECOVERY_STEP = 0.01
#: Periods after a cut during which the factor does not recover (the server just said no).
RECOVERY_DELAY_PERIODS = 4.0
#: Recovery stops below this share of the factor at which the last 429 came ...
PEAK_MARGIN = 0.98
#: ... a ceiling that rises by this much per period (0.02 in 20 periods: forgotten within minutes).
PEAK_DECAY = 0.001
#: The factor never goes below this: half the configured rate.
FACTOR_MIN = 0.5
#: Requests that may leave back to back before pacing starts (while nothing was learned).
DEFAULT_BURST = 2
#: Front-loaded windows: at most ``limit // FRONT_WINDOWS`` requests in any ``period / FRONT_WINDOWS``.
#: Mews documents 200 per 30 s; a server enforcing the same rate over a window down to 3 s still
#: holds each window's requests.
FRONT_WINDOWS = 10
#: Fewer requests per window gain little (a window's requests leave together, but its margin
#: is paid all along): the even pace only, as for the 20 per 3 s of the benchmark's connection.
FRONT_MIN_REQUESTS = 10
#: More than this per window (limits far above Mews's 200 per 30 s, or a limit lifted for a
#: test): the even pace, whose state stays five numbers (every booking reads and writes the log).
FRONT_MAX_REQUESTS = 100
#: After a 429, windows come back only this many periods later (an hour at 30 s), even once the
#: rate is whole again: a server whose window is shorter than a tenth refuses a window's
#: requests in flight at once (7-11 429s simulated), so it must not meet them every few minutes.
FRONT_RETRY_PERIODS = 120.0
#: Share of each front-loaded window left free: a server may count a request some hundred
#: milliseconds after it was sent (sandbox ``--count-delay-ms``), and both windows lag alike.
FRONT_MARGIN = 0.10
#: Share of each period the pace leaves free. A server counts a request when it has read it,
#: tens of milliseconds after it left, and threads wake late under load: at the exact limit the
#: first 429 comes within a window even when the server's limit is the configured one (measured:
#: one per run at 0.81 of the ceiling, against none at 0.90 with this margin).
PACE_MARGIN = 0.02
#: Learning the server (issue 21). While a token's windows meet no 429, each window sent is
#: evidence that the server holds them. After ``LEARN_AFTER_WINDOWS`` windows as today, each
#: further window may hold one request more than the last (a probe), up to ``front_extra_max``
#: more (a tenth more: 22 per 3.3 s at 200 per 30 s, the full rate). The margin then moves to
#: the period: besides the windows, at most ``limit`` requests in any ``period`` plus
#: ``LEARNED_MARGIN`` (200 per 30.6 s), which covers the same count lag (0.3 s at 30 s) over Mews's
#: own window, and the threads' lateness: it is the even pace's margin. A server enforcing 200 per
#: 30 s holds both (0.98 of its rate); one with a window of a tenth (issue 10's 20 per 3 s)
#: refuses the probe's one extra request: that 429 ends the probe (windows as today, no cut, no
#: learning for ``FRONT_RETRY_PERIODS``). One 429, not a wave: a probe adds a request to a window,
#: it does not move the window's requests closer to the last's (which a count lagging by up to
#: 0.3 s refuses several at once).
LEARN_AFTER_WINDOWS = 6
LEARNED_MARGIN = 0.02


@dataclass(frozen=True)
class Params:
    """The configured limit of one AccessToken (after any share for a fallback)."""

    limit: int
    period_s: float
    burst: int = DEFAULT_BURST
    margin: float = PACE_MARGIN
    #: Windows per period front-loaded while the rate is whole (0: the even pace only).
    front_windows: int = FRONT_WINDOWS

    def __post_init__(self) -> None:
        if self.limit < 1 or self.period_s <= 0:
            raise ValueError("rate limit needs max_requests >= 1 and period_s > 0")

    @property
    def effective_burst(self) -> int:
        return max(1, min(self.burst, self.limit))

    @property
    def front_limit(self) -> int:
        """Requests per front-loaded window (0: none, the even pace only)."""
        per_window = self.limit // self.front_windows if self.front_windows > 0 else 0
        return per_window if FRONT_MIN_REQUESTS <= per_window <= FRONT_MAX_REQUESTS else 0

    @property
    def front_window_s(self) -> float:
        """The front-loaded window: ``front_limit`` requests at the configured rate, plus ``FRONT_MARGIN``."""
        return self.period_s * self.front_limit / self.limit * (1 + FRONT_MARGIN)

    @property
    def front_extra_max(self) -> int:
        """Requests a learned window may hold beyond ``front_limit``: those its margin left free."""
        return max(1, math.floor(self.front_limit * FRONT_MARGIN + 0.5)) if self.front_limit else 0

    @property
    def learned_period_s(self) -> float:
        """Once windows learn: at most ``limit`` requests in any such span."""
        return self.period_s * (1 + LEARNED_MARGIN)

    @property
    def interval_s(self) -> float:
        """Emission interval at factor 1: ``limit`` per ``period`` (plus ``margin``) including the burst."""
        return self.period_s * (1 + self.margin) / (self.limit - self.effective_burst + 1)


@dataclass
class State:
    """What is stored per AccessToken: times are the backend's clock (seconds)."""

    tat: float = 0.0  # theoretical arrival time of the next request
    hold: float = 0.0  # nobody sends before this (Retry-After)
    factor: float = 1.0  # learned share of the configured rate, at time ``cut``
    cut: float = 0.0  # when the factor was last lowered
    peak: float = 0.0  # the factor at which that 429 came (0: none yet)
    log: list[float] = field(default_factory=list)  # the slots booked lately, in order (see reserve)
    clean: float = 0.0  # requests booked in windows since the last 429 (the learning's evidence)


def factor_at(state: State, params: Params, now: float) -> float:
    """The factor: held after a cut, then recovering, below the (fading) rate of the last 429."""
    periods = max(0.0, now - state.cut) / params.period_s
    recovered = state.factor + RECOVERY_STEP * max(0.0, periods - RECOVERY_DELAY_PERIODS)
    if state.peak > 0:
        recovered = min(recovered, PEAK_MARGIN * state.peak + PEAK_DECAY * periods)
    return min(1.0, max(state.factor, recovered))


def front_allowed(state: State, params: Params, now: float) -> bool:
    """Whether windows may be front-loaded: no cut yet, or none for ``FRONT_RETRY_PERIODS`` periods."""
    return state.peak == 0 or now - state.cut >= FRONT_RETRY_PERIODS * params.period_s


def learning_allowed(state: State, params: Params, now: float) -> bool:
    """Whether windows may learn: no 429 yet, or none for ``FRONT_RETRY_PERIODS`` periods."""
    return state.cut == 0 or now - state.cut >= FRONT_RETRY_PERIODS * params.period_s


def front_extra(state: State, params: Params) -> int:
    """Requests a window may hold beyond ``front_limit``: one more per window sent with no 429."""
    if not params.front_limit:
        return 0
    windows = math.floor(state.clean / params.front_limit)
    return min(params.front_extra_max, max(0, windows - LEARN_AFTER_WINDOWS + 1))


def probing(state: State, params: Params) -> bool:
    """Whether a window was sent wider than today's: a 429 now ends a probe, it does not cut."""
    return params.front_limit > 0 and state.clean > params.front_limit * LEARN_AFTER_WINDOWS


def reserve(state: State, params: Params, now: float, max_wait_s: float | None) -> float | None:
    """Book the next slot; returns its time (>= now), or None (state untouched) if later than ``max_wait_s``."""
    factor = factor_at(state, params, now)
    start = max(now, state.hold)
    log = state.log
    if log and log[-1] > start + params.period_s * 10:
        log = []  # the clock stepped backwards: forget the booked slots, keep the hold
    tat = max(state.tat, start)
    if tat > start + params.period_s * 10:
        tat = start  # the clock stepped backwards: forget the queue, keep the hold
    front = params.front_limit if factor >= 1.0 and front_allowed(state, params, now) else 0
    if front:
        slot = max(start, log[-1]) if log else start
        per_window = front + front_extra(state, params)
        if len(log) >= per_window:
            slot = max(slot, log[-per_window] + params.front_window_s)
        if len(log) >= params.limit:
            slot = max(slot, log[-params.limit] + params.learned_period_s)
        tat = slot
    else:
        interval = params.interval_s / factor
        burst = params.effective_burst if factor >= 1.0 else 1
        slot = max(start, tat - (burst - 1) * interval)
        tat += interval
    if max_wait_s is not None and slot - now > max_wait_s:
        return None
    state.tat = tat
    if front and learning_allowed(state, params, now):
        state.clean = min(state.clean + 1.0, float(front * (LEARN_AFTER_WINDOWS + params.front_extra_max)))
    if params.front_limit:  # kept at every pace: front-loading resumes from what was sent
        log = [*log, slot] if not log or slot >= log[-1] else sorted([*log, slot])
        # The last ``limit`` slots, and every slot a booking from now on may meet in a window or
        # the period: when a 429 forgets the slots ahead, the past ones are still known.
        keep = len(log) - params.limit
        while keep > 0 and log[keep - 1] >= now - params.learned_period_s:
            keep -= 1
        state.log = log[max(0, keep) :]
    elif state.log:
        state.log = []
    return slot


def on_429(state: State, params: Params, now: float, retry_after_s: float, slot: float | None) -> bool:
    """Apply a 429 answered to the request sent in ``slot``. True when it lowered the factor."""
    state.hold = max(state.hold, now + retry_after_s)
    state.tat = max(state.tat, state.hold)
    # Slots before the hold's end are forgotten: their callers wake inside it and book again
    # (must_rebook). Slots after it are sent unless this 429 cuts (then every slot ahead is stale).
    state.log = [t for t in state.log if t <= now or t >= state.hold]
    if slot is not None and slot < state.cut:
        return False  # sent before the last cut: already learned from
    state.log = [t for t in state.log if t <= now]
    if probing(state, params):
        # A probe failed: today's windows again, and no learning for FRONT_RETRY_PERIODS. The
        # rate is whole (windows run only then), so the peak's cap had faded above it: forgotten,
        # lest it bar the windows; the slots booked in the wider windows are booked again.
        state.clean = 0.0
        state.peak = 0.0
        state.cut = now
        state.tat = state.hold
        return True
    state.clean = 0.0
    factor = factor_at(state, params, now)
    step = REFINE_STEP if state.peak > 0 and factor <= state.factor + 1e-9 else STEP
    state.peak = factor
    state.factor = max(FACTOR_MIN, factor - step)
    state.cut = now
    state.tat = state.hold  # the queue restarts at the hold's end, at the new pace
    return True


def must_rebook(state: State, now: float, booked_at: float) -> bool:
    """Whether a slot booked at ``booked_at`` is stale: a hold lasts, or the pace was cut since."""
    return now < state.hold or state.cut > booked_at
