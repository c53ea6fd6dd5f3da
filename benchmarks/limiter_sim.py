"""The rate limiter in a simulated clock: issue 10's adversarial server without the machine's load.

``python -m benchmarks.limiter_sim`` replays the operator's request pattern (``max_active_requests``
workers, 20 by default as the operator's, each add answered after 1.0 s, a getAll after 0.05 s before each add with
``if_exists="skip"``) against a model of the sandbox (20 requests per 3 s sliding window, each
request counted 0-300 ms after it arrives, Retry-After = whole seconds until the oldest
counted request leaves the window, as the sandbox answers). The limiter under test is the real
one (:mod:`airflow_provider_mews.rate_limit.gcra`, connection default 200 / 30 s), beside its
even pace alone (``front_windows=0``, the limiter of the previous release) and two reference
schedulers *told* the server's window; a second table puts both limiters against servers
that are not issue 10's (a window shorter than a tenth, a longer lag, Mews's own 200 / 30 s). Wall-clock runs (``benchmarks.run --adversarial``) depend on CPU: on a shared,
loaded machine the sandbox process cannot serve 6.7 adds of 1000 items per second, and the
limiter is then not what bounds the throughput.

Results: median and worst of 20 seeds, written to ``benchmarks/results/limiter_sim.md``.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import math
import random
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from airflow_provider_mews.rate_limit import gcra
from airflow_provider_mews.rate_limit.gcra import Params, State

RESULTS = Path(__file__).resolve().parent / "results"


class Scheduler(Protocol):
    @property
    def hold(self) -> float: ...

    def stale(self, now: float, booked_at: float) -> bool: ...

    def reserve(self, now: float) -> float: ...

    def on_429(self, now: float, retry_after_s: float, slot: float) -> None: ...


class LearningGcra:
    """The provider's limiter (pure transitions; the backends add only storage)."""

    def __init__(self, params: Params) -> None:
        self.params, self.state = params, State()

    @property
    def hold(self) -> float:
        return self.state.hold

    def stale(self, now: float, booked_at: float) -> bool:
        return gcra.must_rebook(self.state, now, booked_at)

    def reserve(self, now: float) -> float:
        slot = gcra.reserve(self.state, self.params, now, None)
        assert slot is not None
        return slot

    def on_429(self, now: float, retry_after_s: float, slot: float) -> None:
        gcra.on_429(self.state, self.params, now, retry_after_s, slot)


class WindowsOnly(LearningGcra):
    """The provider's limiter with its learning off: windows of a tenth throughout (issue 10's)."""

    def reserve(self, now: float) -> float:
        learn, gcra.LEARN_AFTER_WINDOWS = gcra.LEARN_AFTER_WINDOWS, 10**9
        try:
            return super().reserve(now)
        finally:
            gcra.LEARN_AFTER_WINDOWS = learn


class SlidingLog:
    """At most ``limit`` slots in any ``window_s``, a hold after each 429. Told the server's limit
    and a window widened by the count delay, it is a reference that front-loads each window; with
    the connection's 200 per 30.05 s it is the limiter before issue 10."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window_s, self.hold = limit, window_s, 0.0
        self.slots: list[float] = []

    def stale(self, now: float, booked_at: float) -> bool:
        return self.hold > now

    def reserve(self, now: float) -> float:
        slot = max(now, self.hold, self.slots[-1] if self.slots else 0.0)
        if len(self.slots) >= self.limit:
            slot = max(slot, self.slots[-self.limit] + self.window_s)
        self.slots.append(slot)
        return slot

    def on_429(self, now: float, retry_after_s: float, slot: float) -> None:
        self.hold = max(self.hold, now + retry_after_s)


def simulate(
    scheduler: Scheduler,
    *,
    skip: bool,
    batches: int = 100,
    workers: int = 20,
    add_latency_s: float = 1.0,
    getall_latency_s: float = 0.05,
    limit: int = 20,
    window_s: float = 3.0,
    count_delay_s: float = 0.3,
    seed: int = 0,
    late_s: float = 0.0,
) -> tuple[float, int]:
    """(fraction of the ceiling, 429s) for ``batches`` batches of 1000 rows; ``late_s``: mean
    (exponential) delay between a slot and its send, as threads wake late on a loaded machine."""
    rng = random.Random(seed)
    late = random.Random(seed + 1000)
    counted: list[float] = []
    events: list[tuple[float, int, str, Any]] = []
    order = 0
    answered_429 = 0
    left = batches
    finished = 0.0

    def at(t: float, kind: str, data: Any = None) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (t, order, kind, data))

    for _ in range(workers):
        at(0.0, "batch")
    while events:
        t, _, kind, data = heapq.heappop(events)
        if kind == "batch":
            if left:
                left -= 1
                at(t, "ask", ["getAll", "add"] if skip else ["add"])
        elif kind == "ask":
            slot = scheduler.reserve(t)
            at(slot + (late.expovariate(1 / late_s) if late_s else 0.0), "send", (data, t))
        elif kind == "send":
            calls, booked_at = data
            if scheduler.stale(t, booked_at):  # a 429 came while this request waited: book again
                at(t, "ask", calls)
                continue
            arrived = t + rng.uniform(0.0, 0.005)
            at(arrived + rng.uniform(0.0, count_delay_s), "count", (calls, t, arrived))
        elif kind == "count":
            calls, slot, arrived = data
            del counted[: bisect.bisect_right(counted, t - window_s)]
            if len(counted) >= limit:
                answered_429 += 1
                scheduler.on_429(t, max(1, math.ceil(counted[0] + window_s - t)), slot)
                at(t, "ask", calls)
            else:
                bisect.insort(counted, t)
                latency = add_latency_s if calls[0] == "add" else getall_latency_s
                at(max(t, arrived + latency), "answer", calls[1:])
        elif kind == "answer":
            if data:
                at(t, "ask", data)
            else:
                finished = t
                at(t, "batch")
    ceiling = limit / window_s * 1000 / (2 if skip else 1)
    return batches * 1000 / finished / ceiling, answered_429


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.limiter_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument(
        "--scale-workers", type=int, nargs="*", default=[8, 32, 64],
        help="worker counts for the scale-out table (200 batches, skip, as benchmarks.scale_out)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    seeds = range(args.seeds)
    strategies: dict[str, Callable[[], Scheduler]] = {
        "before issue 10: sliding window 200 per 30.05 s": lambda: SlidingLog(200, 30.05),
        "provider limiter (windows of a tenth that learn; connection 200/30)": lambda: LearningGcra(
            Params(200, 30.0)
        ),
        "its windows of a tenth without learning (issue 10's release)": lambda: WindowsOnly(
            Params(200, 30.0)
        ),
        "its even pace alone (front_windows=0, the previous release)": lambda: LearningGcra(
            Params(200, 30.0, front_windows=0)
        ),
        "reference: even pace, told 20 per 3.3 s": lambda: LearningGcra(
            Params(20, 3.3, burst=1, margin=0.0, front_windows=0)
        ),
        "reference: sliding log, told 20 per 3.3 s": lambda: SlidingLog(20, 3.3),
    }
    lines = [
        "Simulated (`python -m benchmarks.limiter_sim`): server 20 requests / 3 s counting 0-300 ms late, "
        f"20 workers, add 1.0 s, getAll 0.05 s, 100 batches of 1000 rows; median (worst) of {args.seeds} seeds.",
        "",
        '| scheduler | `"add"` fraction of ceiling | 429s | `"skip"` fraction of ceiling | 429s |',
        "|---|---|---|---|---|",
    ]
    for name, make in strategies.items():
        cells = []
        for skip in (False, True):
            cells += _cells([simulate(make(), skip=skip, seed=seed) for seed in seeds])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Other servers (connection 200/30, 20 workers; 8 workers where named): the learning windows, "
        'the windows of a tenth without learning and the even pace alone, `"add"` and `"skip"`; median (worst) of '
        f"{args.seeds} seeds.",
        "",
        '| server | limiter | `"add"` fraction of ceiling | 429s | `"skip"` fraction of ceiling | 429s |',
        "|---|---|---|---|---|---|",
    ]
    servers: dict[str, dict[str, Any]] = {
        "20 / 3 s, count 0-300 ms late, 8 workers": {"workers": 8},
        "20 / 3 s, count 0-500 ms late": {"count_delay_s": 0.5},
        "20 / 3 s, count 0-300 ms late, threads 30 ms late": {"late_s": 0.03},
        "10 / 1.5 s (shorter than a tenth), 0-300 ms late": {"limit": 10, "window_s": 1.5},
        "40 / 6 s, 0-300 ms late": {"limit": 40, "window_s": 6.0},
        "200 / 30 s (Mews's), 0-300 ms late, 400 batches": {
            "limit": 200, "window_s": 30.0, "batches": 400
        },
        "200 / 30 s (Mews's), 0-50 ms late, 1000 batches": {
            "limit": 200, "window_s": 30.0, "count_delay_s": 0.05, "batches": 1000
        },
        "20 / 3 s, 0-300 ms late, 1000 batches (a long run probes once)": {"batches": 1000},
    }  # fmt: skip
    for server, kwargs in servers.items():
        limiters: dict[str, Callable[[], Scheduler]] = {
            "learning windows": lambda: LearningGcra(Params(200, 30.0)),
            "windows of a tenth": lambda: WindowsOnly(Params(200, 30.0)),
            "even pace alone": lambda: LearningGcra(Params(200, 30.0, front_windows=0)),
        }
        for name, make_limiter in limiters.items():
            cells = []
            for skip in (False, True):
                runs = [
                    simulate(
                        make_limiter(),
                        skip=skip,
                        seed=seed,
                        **kwargs,
                    )
                    for seed in seeds
                ]
                cells += _cells(runs)
            lines.append(f"| {server} | {name} | " + " | ".join(cells) + " |")
    if args.scale_workers:
        lines += [
            "",
            'Many workers on one token (as `benchmarks.scale_out`: 200 batches, `"skip"`, the provider '
            f"limiter at 200/30, server 20 / 3 s counting 0-300 ms late); median (worst) of {args.seeds} seeds.",
            "",
            "| workers | sends on time: fraction of ceiling | 429s | sends 60 ms late on average "
            "(a loaded machine) | 429s |",
            "|---|---|---|---|---|",
        ]
        for workers in args.scale_workers:
            cells = []
            for late_s in (0.0, 0.06):
                runs = [
                    simulate(
                        LearningGcra(Params(200, 30.0)),
                        skip=True,
                        batches=200,
                        workers=workers,
                        seed=seed,
                        late_s=late_s,
                    )
                    for seed in seeds
                ]
                cells += _cells(runs)
            lines.append(f"| {workers} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "A server whose limit is the configured one (20 per 3 s, connection 20/3) and counts each request "
        "0-50 ms after it arrives, threads sending 20 ms late on average: why the pace keeps "
        f"`PACE_MARGIN` ({gcra.PACE_MARGIN:.0%}) of each period free; 150 batches, median (worst) of {args.seeds} seeds.",
        "",
        '| pace | `"add"` fraction of ceiling | 429s |',
        "|---|---|---|",
    ]
    for margin in (0.0, gcra.PACE_MARGIN):
        runs = [
            simulate(
                LearningGcra(Params(20, 3.0, margin=margin)),  # 2 per window: the even pace only
                skip=False,
                batches=150,
                count_delay_s=0.05,
                late_s=0.02,
                seed=seed,
            )
            for seed in seeds
        ]
        lines.append(f"| margin {margin:.0%} | " + " | ".join(_cells(runs)) + " |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "limiter_sim.md").write_text(text)
    print(text)


def _cells(runs: list[tuple[float, int]]) -> list[str]:
    fractions = [r[0] for r in runs]
    limited = [r[1] for r in runs]
    return [
        f"{statistics.median(fractions):.3f} ({min(fractions):.3f})",
        f"{statistics.mean(limited):.1f} (max {max(limited)})",
    ]


if __name__ == "__main__":
    main()
