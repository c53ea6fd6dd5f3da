"""The learning, shared rate limiter: its transitions, each backend, real processes and a lagging server.

* pure GCRA transitions (:mod:`airflow_provider_mews.rate_limit.gcra`): even pace, small
  burst, Retry-After hold, one cut per congestion epoch, slow recovery;
* every backend (process memory, the per-user SQLite file, a real ``redis-server`` through
  the official RedisHook) behaves the same;
* several real processes on one token: the union of their booked slots never exceeds the
  limit in any window (SQLite and Redis), and through a real sandbox none meets a 429;
* the hook against a sandbox that enforces the same average rate over a shorter window and
  counts each request up to 100 ms late: it learns and stops meeting 429s;
* Redis unreachable: the limiter falls back to the host's state at a share, logged once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_mews import rate_limit
from airflow_provider_mews.hooks.mews import MewsConnectorHook
from airflow_provider_mews.rate_limit import FALLBACK_SHARE, TokenLimiter, gcra, limiter_for
from airflow_provider_mews.rate_limit.gcra import Params, State
from airflow_provider_mews.rate_limit.local import MemoryBackend, SqliteBackend, runtime_dir
from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, MewsSandbox, connection_json

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configuration/get"


def max_in_window(times: list[float], window_s: float) -> int:
    """The most ``times`` in any half-open window of ``window_s`` seconds."""
    times = sorted(times)
    best = start = 0
    for end, t in enumerate(times):
        while times[start] <= t - window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


# -- pure transitions --


def test_gcra_paces_evenly_after_a_small_burst():
    params = Params(limit=11, period_s=10.0, burst=2)  # interval 10 * 1.02 / (11 - 2 + 1) = 1.02 s
    state = State()
    slots = [gcra.reserve(state, params, 100.0, None) for _ in range(6)]
    assert slots == pytest.approx([100.0, 100.0, 101.02, 102.04, 103.06, 104.08])
    # Any window of the period, and of the period plus the margin (a server counting up to 2% of
    # a period late), holds at most the limit, however the requests come.
    assert gcra.PACE_MARGIN == 0.02
    state = State()
    many = [gcra.reserve(state, params, 100.0 + i * 0.01, None) for i in range(60)]
    assert max_in_window([s for s in many if s is not None], 10.0) == 11
    assert max_in_window([s for s in many if s is not None], 10.2 - 1e-9) == 11


def test_while_the_rate_is_whole_each_tenth_of_the_period_is_front_loaded():
    """200 per 30 s: 20 slots at once, the next 20 one window (3 s plus FRONT_MARGIN) later,
    however many ask; any such window holds 20 and any 30 s at most 200. A 429 ends it: the even
    pace at the cut rate from the hold's end; windows resume an hour after the 429."""
    params = Params(limit=200, period_s=30.0)
    assert (params.front_limit, params.front_window_s) == (20, pytest.approx(3.0 * (1 + gcra.FRONT_MARGIN)))
    state = State()
    slots = [gcra.reserve(state, params, 100.0 + i * 0.001, None) for i in range(40)]  # before learning
    assert slots[:20] == pytest.approx([100.0 + i * 0.001 for i in range(20)])
    assert slots[20] == pytest.approx(slots[0] + params.front_window_s)
    assert slots == sorted(slots)
    assert max_in_window(slots, params.front_window_s - 1e-9) == 20
    assert max_in_window(slots, 30.0) <= 200
    assert len(state.log) == 40  # the last `limit` slots are kept (learning reads a period's)
    # A 429: held, then even at the cut rate (no windows while the rate is cut).
    now = slots[30]
    assert gcra.on_429(state, params, now, 1.0, slots[25]) is True
    assert all(t <= now for t in state.log)  # slots still ahead are booked again
    after = [gcra.reserve(state, params, now, None) for _ in range(4)]
    assert after[0] == pytest.approx(now + 1.0)
    gaps = [b - a for a, b in itertools.pairwise(after)]
    assert gaps == pytest.approx([params.interval_s / (1 - gcra.STEP)] * 3)
    # The rate whole again (33 periods on) but the 429 recent: even, not in windows.
    whole = now + 1000.0
    assert gcra.factor_at(state, params, whole) == 1.0
    even = [gcra.reserve(state, params, whole, None) for _ in range(5)]
    assert even[4] - even[0] == pytest.approx(3 * params.interval_s)  # a burst of 2, then even
    # An hour (FRONT_RETRY_PERIODS) after the 429: windows again, starting from what was sent.
    later = now + gcra.FRONT_RETRY_PERIODS * 30.0 + 1.0
    assert gcra.factor_at(state, params, later) == 1.0
    again = [gcra.reserve(state, params, later, None) for _ in range(21)]
    assert again[:20] == pytest.approx([later] * 20)
    assert again[20] == pytest.approx(later + params.front_window_s)
    # Under 10 per window (100 per period), or front_windows=0: the even pace only.
    assert Params(limit=99, period_s=30.0).front_limit == 0
    assert Params(limit=100, period_s=30.0).front_limit == 10
    # Over 100 per window (a limit far above Mews's, or lifted): the even pace, and no log.
    assert Params(limit=1009, period_s=30.0).front_limit == 100
    assert Params(limit=1010, period_s=30.0).front_limit == 0
    lifted = Params(limit=1_000_000, period_s=1.0)
    assert lifted.front_limit == 0
    state = State(log=[99.0] * 500)  # as a version that kept windows of 100 000 left it
    for i in range(1000):
        gcra.reserve(state, lifted, 100.0 + i * 1e-3, None)
    assert state.log == []
    assert Params(limit=200, period_s=30.0, front_windows=0).front_limit == 0


def test_gcra_refuses_a_slot_beyond_the_wait_allowed_and_books_nothing():
    params = Params(limit=2, period_s=1.0, burst=1)
    state = State()
    assert gcra.reserve(state, params, 0.0, 0.0) == 0.0
    tat = state.tat
    assert gcra.reserve(state, params, 0.0, 0.1) is None
    assert state.tat == tat
    assert gcra.reserve(state, params, 0.0, params.interval_s) == params.interval_s  # 0.51 s


def test_a_429_holds_everyone_then_they_leave_one_by_one_and_the_rate_is_cut_once_per_epoch():
    params = Params(limit=10, period_s=10.0, burst=1)  # 1.02 s apart
    state = State()
    in_flight = [gcra.reserve(state, params, 0.0, None) for _ in range(3)]  # 0, 1.02, 2.04
    assert gcra.on_429(state, params, 2.5, retry_after_s=4.0, slot=in_flight[2]) is True
    assert state.factor == pytest.approx(1 - gcra.STEP)
    # The other requests of the same burst answer 429 too: honoured, but no second cut.
    assert gcra.on_429(state, params, 2.6, retry_after_s=4.0, slot=in_flight[0]) is False
    assert state.factor == pytest.approx(1 - gcra.STEP)
    after = [gcra.reserve(state, params, 3.0, None) for _ in range(3)]
    interval = params.interval_s / (1 - gcra.STEP)
    assert after == pytest.approx([6.6, 6.6 + interval, 6.6 + 2 * interval], rel=1e-3)  # no herd at 6.6
    # A request sent after the cut that meets a 429 again: a new epoch, a new cut; the rate did
    # not recover (RECOVERY_DELAY_PERIODS), so the limit is just below it: a half step.
    assert gcra.on_429(state, params, 7.0, retry_after_s=1.0, slot=after[0]) is True
    assert state.factor == pytest.approx(1 - gcra.STEP - gcra.REFINE_STEP)
    assert state.peak == pytest.approx(1 - gcra.STEP)
    # Once it has recovered above the cut, a 429 is a whole step again.
    recovered = gcra.factor_at(state, params, 7.0 + 10.0 * (gcra.RECOVERY_DELAY_PERIODS + 2))
    assert recovered > state.factor
    assert gcra.on_429(state, params, 7.0 + 10.0 * (gcra.RECOVERY_DELAY_PERIODS + 2), 1.0, None) is True
    assert state.factor == pytest.approx(recovered - gcra.STEP)


def test_the_rate_recovers_slowly_and_the_burst_comes_back_when_whole():
    params = Params(limit=10, period_s=10.0, burst=3)
    state = State(factor=0.9, cut=0.0)
    delay = gcra.RECOVERY_DELAY_PERIODS * 10.0
    assert gcra.factor_at(state, params, 0.0) == pytest.approx(0.9)
    assert gcra.factor_at(state, params, delay) == pytest.approx(0.9)  # held after a cut
    assert gcra.factor_at(state, params, delay + 50.0) == pytest.approx(0.95)  # RECOVERY_STEP per period
    assert gcra.factor_at(state, params, 1000.0) == 1.0
    cut = gcra.reserve(state, params, 5.0, None), gcra.reserve(state, params, 5.0, None)
    assert cut[1] > cut[0]  # burst 1 while the factor is below 1
    state = State(factor=0.9, cut=0.0)
    whole = [gcra.reserve(state, params, 200.0, None) for _ in range(3)]
    assert whole == [200.0, 200.0, 200.0]
    floor = State(factor=gcra.FACTOR_MIN)
    gcra.on_429(floor, params, 0.0, 1.0, None)
    assert floor.factor == gcra.FACTOR_MIN
    assert gcra.factor_at(floor, params, 10.0 * (gcra.RECOVERY_DELAY_PERIODS + 1)) >= gcra.FACTOR_MIN


def test_a_cut_makes_every_slot_booked_before_it_stale_and_restarts_the_queue_at_the_hold():
    params = Params(limit=10, period_s=10.0, burst=1)  # 1.02 s apart
    state = State()
    # 8 threads (of any process) booked at 0.0: slots 0..7.14 s, the queue reaching 8.16 s.
    waiting = [gcra.reserve(state, params, 0.0, None) for _ in range(8)]
    assert waiting[-1] == pytest.approx(7 * params.interval_s)
    assert gcra.on_429(state, params, 0.5, retry_after_s=1.0, slot=waiting[0]) is True
    # After the hold, the slots booked before the cut are stale, though the hold has passed ...
    assert gcra.must_rebook(state, 5.0, booked_at=0.0) is True
    assert gcra.must_rebook(state, 1.0, booked_at=0.6) is True  # ... and during the hold, any slot
    # ... and booking again starts at the hold's end at the cut pace, not after the old queue.
    interval = params.interval_s / (1 - gcra.STEP)
    again = [gcra.reserve(state, params, 2.0, None) for _ in range(3)]
    assert again == pytest.approx([2.0, 2.0 + interval, 2.0 + 2 * interval])
    assert gcra.must_rebook(state, again[2], booked_at=2.0) is False  # booked after the cut: kept
    # A 429 of a request in flight at the cut (no new epoch) holds, but keeps the queue.
    tat = state.tat
    assert gcra.on_429(state, params, 2.1, retry_after_s=0.5, slot=waiting[0]) is False
    assert state.tat == tat
    assert gcra.must_rebook(state, 2.7, booked_at=2.0) is False


def test_recovery_stays_below_the_rate_of_the_last_429_and_that_memory_fades():
    params = Params(limit=10, period_s=10.0, burst=1)
    state = State(factor=0.8, cut=0.0, peak=0.9)  # a 429 at 0.9 cut the factor to 0.8
    cap = gcra.PEAK_MARGIN * 0.9
    # Recovery alone would pass the rate of the 429 (0.9) after 10 periods of recovery; it stops below.
    long_after = 10.0 * (gcra.RECOVERY_DELAY_PERIODS + 12)
    assert 0.8 + 12 * gcra.RECOVERY_STEP > 0.9
    assert gcra.factor_at(state, params, long_after) == pytest.approx(
        cap + gcra.PEAK_DECAY * long_after / 10.0
    )
    assert gcra.factor_at(state, params, long_after) < 0.9
    # The memory fades: the ceiling rises PEAK_DECAY per period, back to the whole rate.
    assert gcra.factor_at(state, params, 10.0 * ((1 - cap) / gcra.PEAK_DECAY + 1)) == 1.0
    # on_429 remembers the factor it cut from.
    fresh = State()
    gcra.on_429(fresh, params, 100.0, 1.0, None)
    assert (fresh.peak, fresh.factor) == (1.0, pytest.approx(1 - gcra.STEP))


def book_windows(state: State, params: Params, windows: int, now: float) -> list[float]:
    """Book ``windows`` windows' worth of slots, all asked at ``now`` (callers waiting in line)."""
    return [gcra.reserve(state, params, now, None) for _ in range(windows * params.front_limit)]  # type: ignore[misc]


def window_gaps(slots: list[float], front: int) -> list[float]:
    """The time between the first slots of consecutive windows."""
    return [b - a for a, b in itertools.pairwise(slots[::front])]


def test_windows_that_meet_no_429_learn_to_send_more_within_the_period_and_its_bounds():
    """200 per 30 s: 120 requests as today (windows of 20, 3.3 s apart), then each window may hold
    one more (the probe) up to 22 (a tenth more: the margin's share), and any 30.6 s (the period
    plus LEARNED_MARGIN, the lag over Mews's own window) holds at most 200: a long run keeps 0.98
    of the rate where windows of a tenth keep 0.91. The evidence kept is bounded."""
    params = Params(limit=200, period_s=30.0)
    assert (gcra.LEARN_AFTER_WINDOWS, gcra.LEARNED_MARGIN, params.front_extra_max) == (6, 0.02, 2)
    state = State()
    slots = book_windows(state, params, 40, 100.0)
    assert slots[:120] == pytest.approx([100.0 + 3.3 * (i // 20) for i in range(120)])  # as today
    assert slots[120] == pytest.approx(116.5)  # the probe: a 21st request in the sixth window
    assert max_in_window(slots[:120], 3.3 - 1e-9) == 20
    assert max_in_window(slots[:121], 3.3 - 1e-9) == 21
    assert max_in_window(slots, params.front_window_s - 1e-9) == 22  # never more per window
    assert max_in_window(slots, 30.6 - 1e-9) == 200  # nor more per period and its margin
    assert slots[600] - slots[400] == pytest.approx(30.6)  # 0.98 of the rate once learned
    assert state.clean == 20 * (gcra.LEARN_AFTER_WINDOWS + 2)  # bounded evidence
    assert gcra.front_extra(State(clean=1e9), params) == 2
    # 100 per 4 s (windows of 10): one more at most; limits outside windows learn nothing.
    assert Params(100, 4.0).front_extra_max == 1
    even = Params(limit=60, period_s=30.0, burst=1)
    quiet = State()
    for _ in range(300):
        gcra.reserve(quiet, even, 0.0, None)
    assert quiet.clean == 0 and gcra.front_extra(State(clean=1e9), even) == 0


def test_a_429_of_a_learned_window_drops_back_to_windows_of_a_tenth_and_a_second_one_cuts():
    params = Params(limit=200, period_s=30.0)
    state = State()
    slots = book_windows(state, params, 8, 100.0)  # learned: 22 per window
    assert gcra.front_extra(state, params) == 2
    now = slots[-1] + 0.2
    # The probe failed: held for Retry-After, back to today's windows (20), the rate whole.
    assert gcra.on_429(state, params, now, 1.0, slots[-1]) is True
    assert (state.factor, state.peak, state.clean, state.cut) == (1.0, 0.0, 0.0, now)
    assert gcra.front_extra(state, params) == 0
    assert gcra.must_rebook(state, now + 2.0, booked_at=now - 0.1)  # booked in a wider window: again
    # Windows of a tenth go on, and do not learn again for FRONT_RETRY_PERIODS (an hour at 30 s).
    after = book_windows(state, params, 15, now)
    assert after[0] >= now + 1.0
    assert window_gaps(after, 20) == pytest.approx([3.3] * 14)
    assert max_in_window(after, 3.3 - 1e-9) == 20
    assert state.clean == 0
    # The other requests of the failed window answer 429 too: honoured, nothing more learned.
    assert gcra.on_429(state, params, now + 0.1, 1.0, slots[-2]) is False
    assert state.factor == 1.0
    # A 429 at today's windows: today's answer, the cut to the even pace.
    assert gcra.on_429(state, params, after[-1] + 0.1, 1.0, after[-1]) is True
    assert state.factor == pytest.approx(1 - gcra.STEP) and state.peak == 1.0
    # A 429 before the windows learned anything (a server shorter than a tenth) cuts at once.
    early = State()
    first = book_windows(early, params, 2, 0.0)
    assert gcra.on_429(early, params, 0.3, 1.0, first[0]) is True
    assert early.factor == pytest.approx(1 - gcra.STEP)
    # An hour after the failed probe the windows learn again.
    later = now + gcra.FRONT_RETRY_PERIODS * 30.0 + 1.0
    probe = State(cut=now)
    book_windows(probe, params, 1, now + 10.0)
    assert probe.clean == 0
    book_windows(probe, params, 1, later)
    assert probe.clean == 20


def test_a_429_forgets_only_the_slots_its_hold_makes_stale_and_the_log_keeps_the_past():
    """Learned windows (22), 44 slots booked at once (two windows). A probe fails 0.5 s in: the
    slots ahead are forgotten, the 22 sent are still known, so the next window leaves a whole
    window after them (not at the hold's end: 44 in 3.3 s). A later 429 of a request sent
    before that cut forgets nothing booked after its hold."""
    params = Params(limit=200, period_s=30.0)
    state = State(clean=20.0 * (gcra.LEARN_AFTER_WINDOWS + 2))
    slots = [gcra.reserve(state, params, 0.0, None) for _ in range(44)]
    assert slots == pytest.approx([0.0] * 22 + [3.3] * 22)
    assert gcra.on_429(state, params, 0.5, 1.0, slots[0]) is True
    assert state.log == slots[:22]
    again = book_windows(state, params, 1, 0.5)
    assert again == pytest.approx([3.3] * 20)  # 20 (today's) after the 22 sent at 0
    assert gcra.on_429(state, params, 0.6, 0.5, slots[1]) is False  # in flight before the cut
    assert state.log == slots[:22] + again  # booked after its hold (1.1 s): still sent
    assert book_windows(state, params, 1, 0.6)[0] == pytest.approx(6.6)


# -- backends --


def _redis_binary() -> str | None:
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real redis-server on a random loopback port (CI installs it: .ci/system-deps.sh)."""
    binary = _redis_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); CI installs it")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING within 20 s")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def redis_conn_env(port: int) -> str:
    return json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": port})


@pytest.fixture(params=["memory", "sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    if request.param == "memory":
        return MemoryBackend()
    if request.param == "sqlite":
        return SqliteBackend(tmp_path / "state.sqlite3")
    port = request.getfixturevalue("redis_server")
    monkeypatch.setenv("AIRFLOW_CONN_RATE_REDIS", redis_conn_env(port))
    from airflow_provider_mews.rate_limit.redis import RedisBackend

    return RedisBackend("rate_redis")


def test_every_backend_paces_holds_and_learns(backend: Any, request: pytest.FixtureRequest):
    key = f"backend-test-{request.node.name}-{time.time()}"
    params = Params(limit=10, period_s=1.0, burst=2)  # 1.02 / 9 s apart
    limiter = TokenLimiter(key, params, backend)
    slots = [limiter.acquire() for _ in range(6)]
    assert all(s is not None for s in slots)
    offsets = [s - slots[0] for s in slots]  # type: ignore[operator]
    assert offsets[1] == pytest.approx(0.0, abs=0.05)  # the burst of 2 (booked at once, or nearly)
    assert offsets[2:] == pytest.approx([k * params.interval_s for k in range(1, 5)], abs=1e-6)
    assert limiter.waited_s > 0.3
    # Nothing within 0.05 s while a 429's hold of 0.5 s lasts, then paced at the cut rate.
    limiter.on_429(0.5, slots[-1])
    assert limiter.cuts == 1
    assert backend.hold_remaining(key) == pytest.approx(0.5, abs=0.1)
    assert limiter.acquire(deadline=time.monotonic() + 0.05) is None
    resumed = [limiter.acquire() for _ in range(3)]
    assert resumed[1] - resumed[0] == pytest.approx(params.interval_s / (1 - gcra.STEP), abs=0.002)  # type: ignore[operator]
    limiter.on_429(0.0, slots[0])  # an old request's 429: honoured, no second cut
    assert limiter.cuts == 1


def test_every_backend_front_loads_as_the_pure_functions_say(backend: Any, request: pytest.FixtureRequest):
    key = f"front-test-{request.node.name}-{time.time()}"
    params = Params(limit=100, period_s=4.0)  # windows of 10 requests per 0.44 s
    slots = [slot for slot, _ in (backend.reserve(key, params, None) for _ in range(21))]
    assert [s - slots[0] for s in slots[:10]] == pytest.approx([0.0] * 10, abs=0.05)
    assert slots[10] - slots[0] == pytest.approx(params.front_window_s, abs=1e-6)
    assert slots[20] - slots[10] == pytest.approx(params.front_window_s, abs=1e-6)
    assert backend.reserve(key, params, 0.0) is None  # the next window is ahead: nothing booked
    # A 429: every slot still ahead is forgotten, then the even pace at the cut rate.
    assert backend.on_429(key, params, 0.0, slots[0]) is True
    first, _ = backend.reserve(key, params, None)
    second, _ = backend.reserve(key, params, None)
    assert second - first == pytest.approx(params.interval_s / (1 - gcra.STEP), abs=1e-6)
    assert first < slots[20]  # the forgotten slots no longer push the queue back


def test_every_backend_learns_and_drops_back_as_the_pure_functions_say(
    backend: Any, request: pytest.FixtureRequest
):
    """Limit 100 per 4 s (windows of 10 per 0.44 s): 140 slots booked at once learn to send 11
    per window (after 60) within 100 per 4.08 s, slot for slot as :func:`gcra.reserve` replays them; a 429
    then (a failed probe) drops back to windows of 10 and does not cut; a second 429 cuts."""
    key = f"learn-test-{request.node.name}-{time.time()}"
    params = Params(limit=100, period_s=4.0)
    booked = [backend.reserve(key, params, None) for _ in range(140)]
    replay = State()
    for slot, now in booked:
        assert gcra.reserve(replay, params, now, None) == pytest.approx(slot, abs=1e-9)
    slots = [slot for slot, _ in booked]
    assert max_in_window(slots[:60], params.front_window_s - 0.05) == 10  # as today, then ...
    assert max_in_window(slots, params.front_window_s - 0.05) == 11  # ... one more per window
    assert max_in_window(slots, 4.08 - 0.05) <= 100
    assert backend.on_429(key, params, 0.0, slots[-1]) is True  # the probe failed: no cut
    again = [slot for slot, _ in (backend.reserve(key, params, None) for _ in range(30))]
    assert max_in_window(again, params.front_window_s - 0.05) == 10  # windows of a tenth
    assert backend.on_429(key, params, 0.0, again[-1]) is True  # a 429 at today's windows: the cut
    first, _ = backend.reserve(key, params, None)
    second, _ = backend.reserve(key, params, None)
    assert second - first == pytest.approx(params.interval_s / (1 - gcra.STEP), abs=1e-6)


def _seed(backend: Any, key: str, state: State) -> None:
    """Write a learned state straight into a backend's storage (as an earlier run left it)."""
    if isinstance(backend, MemoryBackend):
        backend._states[key] = state
    elif isinstance(backend, SqliteBackend):
        backend._connection().execute(
            "INSERT OR REPLACE INTO gcra (key, tat, hold, factor, cut, used, peak) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, state.tat, state.hold, state.factor, state.cut, time.time(), state.peak),
        )
    else:
        from airflow_provider_mews.rate_limit.redis import KEY_PREFIX

        fields = {
            "tat": state.tat,
            "hold": state.hold,
            "factor": state.factor,
            "cut": state.cut,
            "peak": state.peak,
        }
        backend.client.hset(KEY_PREFIX + key, mapping={k: repr(v) for k, v in fields.items()})


@pytest.mark.parametrize(("periods_since_429", "in_windows"), [(30.0, False), (130.0, True)])
def test_every_backend_front_loads_again_only_an_hour_after_a_429(
    backend: Any, request: pytest.FixtureRequest, periods_since_429: float, in_windows: bool
):
    key = f"front-retry-{request.node.name}-{time.time()}"
    params = Params(limit=100, period_s=4.0)  # windows of 10 per 0.44 s; even: 4.08 / 99 s apart
    _seed(backend, key, State(factor=1.0, cut=time.time() - periods_since_429 * 4.0, peak=1.0))
    slots = [slot for slot, _ in (backend.reserve(key, params, None) for _ in range(10))]
    spread = slots[-1] - slots[0]
    if in_windows:
        assert spread == pytest.approx(0.0, abs=0.05)
    else:
        assert spread == pytest.approx(8 * params.interval_s, abs=1e-6)  # a burst of 2, then even


@pytest.mark.parametrize(
    ("periods_since_cut", "peak"),
    [(2.0, 0.9), (20.0, 0.9), (20.0, 0.0), (200.0, 0.9)],
    ids=["held", "capped", "uncapped", "faded"],
)
def test_every_backend_recovers_as_the_pure_functions_say(
    backend: Any, request: pytest.FixtureRequest, periods_since_cut: float, peak: float
):
    key = f"recover-test-{request.node.name}-{time.time()}"
    params = Params(limit=11, period_s=1.0, burst=1)  # 0.1 s apart at factor 1
    learned = State(factor=0.8, cut=time.time() - periods_since_cut, peak=peak)
    _seed(backend, key, learned)
    expected = gcra.factor_at(learned, params, time.time())
    first, _ = backend.reserve(key, params, None)
    second, _ = backend.reserve(key, params, None)
    assert second - first == pytest.approx(params.interval_s / expected, rel=0.01)


def test_every_backend_steps_half_as_far_when_a_429_comes_at_the_cut_rate(
    backend: Any, request: pytest.FixtureRequest
):
    key = f"refine-test-{request.node.name}-{time.time()}"
    params = Params(limit=11, period_s=1.0, burst=1)
    assert backend.on_429(key, params, 0.0, None) is True  # from 1.0: a whole step
    assert backend.on_429(key, params, 0.0, None) is True  # at the cut rate, nothing recovered
    first, _ = backend.reserve(key, params, None)
    second, _ = backend.reserve(key, params, None)
    factor = 1 - gcra.STEP - gcra.REFINE_STEP
    assert second - first == pytest.approx(params.interval_s / factor, rel=0.01)


def test_every_backend_rebooks_slots_booked_before_a_cut(backend: Any, request: pytest.FixtureRequest):
    key = f"rebook-test-{request.node.name}-{time.time()}"
    params = Params(limit=10, period_s=2.0, burst=1)  # 0.2 s apart
    booked = [backend.reserve(key, params, None) for _ in range(10)]  # 10 waiters, slots up to 1.8 s ahead
    booked_at = booked[-1][1]
    assert backend.stale(key, booked_at) is False
    assert backend.on_429(key, params, 0.1, booked[0][0]) is True
    time.sleep(0.15)  # the hold has passed; the cut makes the old slots stale all the same
    assert backend.hold_remaining(key) == 0.0
    assert backend.stale(key, booked_at) is True
    again, now = backend.reserve(key, params, None)
    assert again - now < 0.05  # the queue restarted at the hold's end, not 1.8 s ahead
    assert backend.stale(key, now) is False
    # Through the limiter: a thread waiting on a slot booked before another worker's cut
    # books again when it wakes (its old slot belonged to the old pace), though the hold is over.
    bookings: list[float] = []

    class Counting:  # the real backend, counting this thread's bookings
        describe = backend.describe

        def __getattr__(self, name: str) -> Any:
            return getattr(backend, name)

        def reserve(self, *args: Any) -> Any:
            booked = backend.reserve(*args)
            bookings.append(booked[0])
            return booked

    limiter = TokenLimiter(key, params, Counting())
    for _ in range(5):
        backend.reserve(key, params, None)  # other workers' slots: the waiter's is ~1 s ahead
    waiter_slots: list[float | None] = []
    waiter = threading.Thread(target=lambda: waiter_slots.append(limiter.acquire()))
    waiter.start()
    time.sleep(0.1)
    assert backend.on_429(key, params, 0.05, None) is True
    waiter.join(timeout=10)
    assert len(bookings) == 2, bookings
    assert waiter_slots == [bookings[1]]


def test_the_redis_script_mirrors_the_pure_functions_float_for_float(
    redis_server: int, monkeypatch: pytest.MonkeyPatch
):
    """400 random states (learning or learned, held, cut, with slots logged ahead and behind) and
    random operations on them: the Lua script (on Redis's clock, whose ``now`` it returns) and
    :mod:`gcra` (replaying that ``now``) give the same slots and leave the same state, bit for bit."""
    import random

    from airflow_provider_mews.rate_limit.redis import KEY_PREFIX, RedisBackend

    monkeypatch.setenv("AIRFLOW_CONN_RATE_REDIS", redis_conn_env(redis_server))
    backend = RedisBackend("rate_redis")
    rng = random.Random(21)
    choices = [Params(200, 30.0), Params(100, 4.0), Params(50, 30.0, burst=1), Params(2000, 30.0)]
    ops = Counter()
    for case in range(400):
        params = rng.choice(choices)
        key = f"mirror-{case}-{time.time()}"
        t = time.time()
        front = params.front_limit or 10
        state = State(
            tat=rng.choice([0.0, t + rng.uniform(-5.0, 5.0)]),
            hold=rng.choice([0.0, 0.0, t + rng.uniform(-1.0, 2.0)]),
            factor=rng.choice([1.0, 1.0, 0.9, gcra.FACTOR_MIN]),
            cut=rng.choice([0.0, t - rng.uniform(0.0, 2 * gcra.FRONT_RETRY_PERIODS * params.period_s)]),
            peak=rng.choice([0.0, 0.0, 1.0, 0.95]),
            log=sorted(
                t + rng.uniform(-params.period_s / 5, params.period_s / 5)
                for _ in range(rng.randint(0, 3 * front))
            ),
            clean=rng.choice([0.0, float(rng.randint(0, 13 * front)), 12.0 * front]),
        )
        fields = {
            name: repr(getattr(state, name)) for name in ("tat", "hold", "factor", "cut", "peak", "clean")
        }
        backend.client.hset(KEY_PREFIX + key, mapping={**fields, "log": " ".join(map(repr, state.log))})
        booked: list[float] = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.8:
                wait = rng.choice([None, None, 0.0, rng.uniform(0.0, 3.0)])
                arg = -1.0 if wait is None else wait
                slot, now = backend._run(key, "reserve", *backend._base(params), repr(arg))
                expected = gcra.reserve(state, params, float(now), wait)
                assert (float(slot) if slot else None) == expected, (case, state)
                if expected is not None:
                    booked.append(expected)
                ops["reserve"] += 1
            else:
                slot_of = rng.choice([None, *booked[-5:], state.cut - 1.0 if state.cut > 1 else None])
                retry = rng.choice([0.0, 1.0, rng.uniform(0.0, 3.0)])
                arg = -1.0 if slot_of is None else slot_of
                cut, now = backend._run(key, "429", *backend._base(params), repr(retry), repr(arg))
                expected_cut = gcra.on_429(state, params, float(now), retry, slot_of)
                assert (cut in (b"1", "1")) == expected_cut, (case, state)
                ops["429 cut" if expected_cut else "429"] += 1
            stored = backend.client.hgetall(KEY_PREFIX + key)
            stored = {k.decode(): v.decode() for k, v in stored.items()}
            for name in ("tat", "hold", "factor", "cut", "peak", "clean"):
                assert float(stored[name]) == getattr(state, name), (case, name, stored, state)
            assert [float(x) for x in stored["log"].split()] == state.log, (case, stored, state)
            ops["learning"] += gcra.front_extra(state, params) > 0
    assert min(ops.values()) >= 50, ops  # every kind of step was met, learned windows included


def test_a_state_file_of_the_previous_version_gains_the_peak_and_log_columns(tmp_path: Path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE gcra (key TEXT PRIMARY KEY, tat REAL NOT NULL, hold REAL NOT NULL, "
            "factor REAL NOT NULL, cut REAL NOT NULL, used REAL NOT NULL)"
        )
        conn.execute("INSERT INTO gcra VALUES ('k', 0, 0, 0.9, ?, ?)", (time.time(), time.time()))
    backend = SqliteBackend(path)
    params = Params(limit=11, period_s=1.0, burst=1)
    first, _ = backend.reserve("k", params, None)
    second, _ = backend.reserve("k", params, None)
    assert second - first == pytest.approx(params.interval_s / 0.9, rel=0.01)  # the learned factor is kept
    assert backend.on_429("k", params, 0.0, None) is True
    front = Params(limit=100, period_s=4.0)
    slots = [backend.reserve("new", front, None)[0] for _ in range(11)]  # type: ignore[index]
    assert slots[10] - slots[0] == pytest.approx(front.front_window_s, abs=1e-6)


def test_the_state_directory_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "state"
    monkeypatch.setenv("MEWS_RATE_LIMIT_DIR", str(target))
    assert runtime_dir() == target
    assert target.stat().st_mode & 0o777 == 0o700
    target.chmod(0o755)
    runtime_dir()
    assert target.stat().st_mode & 0o777 == 0o700
    monkeypatch.delenv("MEWS_RATE_LIMIT_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert runtime_dir() == tmp_path / "run" / "airflow-provider-mews"
    backend = SqliteBackend(target / "x.sqlite3")
    TokenLimiter("k", Params(5, 1.0), backend).acquire()
    assert (target / "x.sqlite3").stat().st_mode & 0o777 == 0o600
    assert DEMO_ACCESS_TOKEN not in (target / "x.sqlite3").read_bytes().decode("latin-1")


# -- several real processes on one token --

WORKER = textwrap.dedent(
    """
    import json, sys, time
    from airflow_provider_mews.rate_limit import limiter_for
    count, limit, period, redis_conn_id, start_at = sys.argv[1:]
    limiter = limiter_for("token-shared-by-processes", int(limit), float(period), scope="test",
                          redis_conn_id=redis_conn_id or None)
    while time.time() < float(start_at):
        time.sleep(0.002)
    print(json.dumps([limiter.acquire() for _ in range(int(count))]))
    """
)


def run_workers(
    processes: int, count: int, limit: int, period: float, env: dict[str, str], redis_conn_id: str = ""
) -> list[list[float]]:
    start_at = time.time() + (20 if redis_conn_id else 6)  # every process imported and waiting
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(count), str(limit), str(period), redis_conn_id, str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for _ in range(processes)
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr[-2000:]
        out.append(json.loads(stdout))
    return out


@pytest.mark.parametrize("where", ["sqlite", "redis"])
def test_processes_on_one_token_share_one_window(where: str, tmp_path: Path, request: pytest.FixtureRequest):
    """4 processes x 15 requests, limit 10 per 1 s: the union of their slots never exceeds 10 in
    any 1 s window, and together they keep the pace (not 4 times it, not a quarter of it)."""
    env = {**os.environ, "MEWS_RATE_LIMIT_DIR": str(tmp_path / "state"), "PYTHONPATH": str(ROOT)}
    redis_conn_id = ""
    if where == "redis":
        env["AIRFLOW_CONN_RATE_REDIS"] = redis_conn_env(request.getfixturevalue("redis_server"))
        redis_conn_id = "rate_redis"
    per_process = run_workers(4, 15, 10, 1.0, env, redis_conn_id)
    slots = [s for slots in per_process for s in slots]
    assert len(slots) == 60 and all(isinstance(s, float) for s in slots)
    assert max_in_window(slots, 1.0) <= 10
    # Together at the pace of one (9 per second after a burst of 2), not a share of it each:
    # most slots follow the previous one by one interval (a late starter only adds a gap).
    gaps = sorted(b - a for a, b in zip(sorted(slots), sorted(slots)[1:], strict=False))
    assert statistics.median(gaps) == pytest.approx(Params(10, 1.0).interval_s, abs=0.002)  # 1.02 / 9
    assert all(len(set(p)) == 15 for p in per_process)


@pytest.mark.parametrize("where", ["sqlite", "redis"])
def test_processes_on_one_token_share_front_loaded_windows(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
):
    """4 processes x 15 requests, limit 100 per 4 s (windows of 10 per 0.44 s): the union of their
    slots never holds more than 10 in any window nor 100 in any 4 s, and the 60 leave in 6
    windows, back to back (front-loaded together, not each process on its own)."""
    env = {**os.environ, "MEWS_RATE_LIMIT_DIR": str(tmp_path / "state"), "PYTHONPATH": str(ROOT)}
    redis_conn_id = ""
    if where == "redis":
        env["AIRFLOW_CONN_RATE_REDIS"] = redis_conn_env(request.getfixturevalue("redis_server"))
        redis_conn_id = "rate_redis"
    params = Params(100, 4.0)
    slots = sorted(s for slots in run_workers(4, 15, 100, 4.0, env, redis_conn_id) for s in slots)
    assert len(slots) == 60
    assert max_in_window(slots, params.front_window_s - 1e-6) <= params.front_limit == 10
    assert max_in_window(slots, 4.0) <= 100
    assert slots[-1] - slots[0] == pytest.approx(5 * params.front_window_s, abs=0.3)


@pytest.mark.parametrize("where", ["sqlite", "redis"])
def test_processes_on_one_token_learn_together(where: str, tmp_path: Path, request: pytest.FixtureRequest):
    """4 processes x 35 requests, limit 100 per 5 s (not the limit of the other tests: Redis keeps
    their state): the windows they share learn together (the evidence is every process's): 10 per
    window (0.55 s) for the first 60, then 11, never more, and at most 100 in any 5.1 s."""
    env = {**os.environ, "MEWS_RATE_LIMIT_DIR": str(tmp_path / "state"), "PYTHONPATH": str(ROOT)}
    redis_conn_id = ""
    if where == "redis":
        env["AIRFLOW_CONN_RATE_REDIS"] = redis_conn_env(request.getfixturevalue("redis_server"))
        redis_conn_id = "rate_redis"
    slots = sorted(s for slots in run_workers(4, 35, 100, 5.0, env, redis_conn_id) for s in slots)
    assert len(slots) == 140
    window = Params(100, 5.0).front_window_s - 0.05
    assert max_in_window(slots[:50], window) == 10  # (sorted: the probe may join the 6th window early)
    assert max_in_window(slots, window) == 11
    assert max_in_window(slots, 5.1 - 0.05) <= 100


def test_processes_through_a_real_sandbox_meet_no_429(tmp_path: Path):
    """3 worker processes call Mews (the sandbox, limiting to 6 per 0.8 s) through the hook with a
    connection saying 6 per 1 s: no 429 (each alone would send 6 per second, 18 together).
    (0.2 s of slack: one pace interval, for
    a loaded machine where a request takes that long to reach the sandbox's count.)"""
    with MewsSandbox() as sandbox:
        sandbox.configure(rate_limit_requests=6, rate_limit_period_s=0.8)
        env = {
            **os.environ,
            "MEWS_RATE_LIMIT_DIR": str(tmp_path / "state"),
            "PYTHONPATH": str(ROOT),
            "AIRFLOW_CONN_MEWS_SHARED": connection_json(
                sandbox.url, rate_limit_requests=6, rate_limit_period=1
            ),
        }
        code = textwrap.dedent(
            """
            import sys, time
            from airflow_provider_mews.hooks.mews import MewsConnectorHook
            hook = MewsConnectorHook("mews_shared")
            hook.limiter
            start_at = float(sys.argv[1])
            while time.time() < start_at:
                time.sleep(0.002)
            for _ in range(12):
                hook.call("configuration/get")
            print(hook.stats.rate_limited)
            """
        )
        start_at = str(time.time() + 15)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, start_at],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=ROOT,
            )
            for _ in range(3)
        ]
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=180)
            assert proc.returncode == 0, stderr[-2000:]
            assert stdout.strip().splitlines()[-1] == "0", stdout
        stats = sandbox.stats()
        assert stats.get("429", 0) == 0
        counted = sandbox.counted_times(DEMO_ACCESS_TOKEN)
        assert len(counted) == 36


# -- learning from a server that counts late --


@contextlib.contextmanager
def lagging_mews(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    limit: int,
    period_s: float,
    lag_ms: float,
    connection_period_s: float = 10,
) -> Iterator[tuple[MewsSandbox, MewsConnectorHook]]:
    """A sandbox enforcing ``limit`` per ``period_s``, counting each request 0-``lag_ms`` late, and a
    hook whose connection says 100 per ``connection_period_s`` (Mews's rate scaled)."""
    monkeypatch.setenv("MEWS_RATE_LIMIT_DIR", str(tmp_path / "state"))
    with MewsSandbox() as sandbox:
        sandbox.configure(
            rate_limit_requests=limit, rate_limit_period_s=period_s, count_delay_ms=lag_ms, seed=7
        )
        monkeypatch.setenv(
            "AIRFLOW_CONN_MEWS_LAG",
            connection_json(sandbox.url, rate_limit_requests=100, rate_limit_period=connection_period_s),
        )
        yield sandbox, MewsConnectorHook("mews_lag", max_retry_after_s=2.0)


def test_the_hook_front_loads_windows_a_lagging_server_of_a_tenth_of_the_period_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The sandbox allows 10 requests per 1 s and counts each request 0-100 ms after it arrived;
    the connection says 100 per 10 s (the same average, over ten times the window). The hook
    sends each window's 10 requests at once and meets no 429 in 60 requests."""
    with lagging_mews(monkeypatch, tmp_path, 10, 1.0, 100) as (sandbox, hook):
        calls = iter(range(60))

        def work() -> None:
            for _ in calls:
                hook.call(CONFIG)

        threads = [threading.Thread(target=work) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counted = sorted(sandbox.counted_times(DEMO_ACCESS_TOKEN))
        assert sandbox.stats().get("429", 0) == 0
    assert len(counted) == 60
    assert counted[9] - counted[0] < 0.3  # the first window's 10 left together (counted 0-100 ms late)
    assert counted[-1] - counted[0] == pytest.approx(5 * 1.1, abs=0.4)  # 6 windows of 1.1 s
    assert hook.limiter.cuts == 0


def test_the_hook_learns_a_window_shorter_than_a_tenth_and_a_lagging_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The sandbox allows 5 requests per 0.5 s and counts each request 0-50 ms after it arrived;
    the connection says 100 per 10 s (the same average). The front-loaded windows (10 per 1.1 s)
    meet its 429s; the limiter must learn (honouring each Retry-After) and then stop meeting
    them: at most 5 in 90 requests, at most 1 in the last 45 and fewer than in the first 45
    (without learning, they keep coming at about the same rate)."""
    with lagging_mews(monkeypatch, tmp_path, 5, 0.5, 50) as (sandbox, hook):
        outcome: list[tuple[int, int]] = []  # (request number, 429s so far)
        lock = threading.Lock()
        calls = iter(range(90))

        def work() -> None:
            for n in calls:
                hook.call(CONFIG)
                with lock:
                    outcome.append((n, sandbox.stats().get("429", 0)))

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total_429 = sandbox.stats().get("429", 0)
        at_half = max(count for n, count in outcome if n < 45)
    late = total_429 - at_half
    assert 1 <= total_429 <= 5, f"{total_429} x 429"
    assert late <= 1 and late < at_half, f"{at_half} x 429 in the first 45 requests, {late} in the last 45"
    assert hook.limiter.cuts >= 1
    assert hook.stats.rate_limited == total_429
    assert hook.stats.limiter_wait_s > 0
    assert len(sandbox.counted_times(DEMO_ACCESS_TOKEN)) == 90


def _calls(hook: MewsConnectorHook, count: int, threads: int) -> None:
    calls = iter(range(count))

    def work() -> None:
        for _ in calls:
            hook.call(CONFIG)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()


def _stored_state(hook: MewsConnectorHook) -> State:
    backend = hook.limiter.backend
    assert isinstance(backend, SqliteBackend)
    return backend._transact(hook.limiter.key, lambda state, now: state)  # type: ignore[return-value]


def test_the_hook_learns_to_send_more_to_a_server_with_the_connections_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Sandbox and connection both 100 per 5 s, the sandbox counting 0-30 ms late: after 60
    requests the windows (10 per 0.55 s) learn to hold 11, within 100 per 5.1 s, and 160
    requests meet no 429, faster than windows of 10 (7.85 s against 8.25 s to the 160th); the
    learned state is the token's."""
    with lagging_mews(monkeypatch, tmp_path, 100, 5.0, 30, connection_period_s=5) as (sandbox, hook):
        _calls(hook, 160, 12)
        counted = sorted(sandbox.counted_times(DEMO_ACCESS_TOKEN))
        assert sandbox.stats().get("429", 0) == 0
    assert len(counted) == 160 and hook.limiter.cuts == 0
    assert gcra.front_extra(_stored_state(hook), hook.limiter.params) == 1
    assert max_in_window(counted, 0.5) == 11  # 11 per window (counted within 30 ms of each other)
    assert counted[-1] - counted[0] < 15 * 0.55 - 0.25  # windows of 10: the 16th at 8.25 s


def test_the_hook_probing_a_server_window_of_a_tenth_drops_back_after_at_most_3_429s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The sandbox allows 10 per 0.5 s counting 0-50 ms late (issue 10's server, scaled); the
    connection says 100 per 5 s. Windows of a tenth (10 per 0.55 s) hold; the probe (an 11th
    request in a window) meets a 429: at most 3 (one, but for requests in flight), then windows of
    a tenth again (no cut to the even pace, the rate whole) and no further 429 in the run."""
    with lagging_mews(monkeypatch, tmp_path, 10, 0.5, 50, connection_period_s=5) as (sandbox, hook):
        seen: list[int] = []
        lock = threading.Lock()
        calls = iter(range(160))

        def work() -> None:
            for _ in calls:
                hook.call(CONFIG)
                with lock:
                    seen.append(sandbox.stats().get("429", 0))

        threads = [threading.Thread(target=work) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total_429 = sandbox.stats().get("429", 0)
    first = next((n for n, count in enumerate(seen) if count), None)
    assert 1 <= total_429 <= 3, f"{total_429} x 429"
    assert first is not None and first >= 50, first  # not before six windows as today (60 requests)
    assert seen[min(len(seen) - 1, first + 30)] == total_429  # none after the probe's window
    state = _stored_state(hook)
    assert state.factor == 1.0 and state.clean == 0 and gcra.front_extra(state, hook.limiter.params) == 0
    assert hook.limiter.cuts == 1 and hook.stats.rate_limited == total_429


# -- Redis unreachable --


def test_unreachable_redis_falls_back_to_the_host_at_a_share_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv("MEWS_RATE_LIMIT_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AIRFLOW_CONN_RATE_REDIS_DOWN", redis_conn_env(_free_port()))
    monkeypatch.setattr(rate_limit, "_local", None)
    limiter = limiter_for(
        "token-with-redis-down", 40, 1.0, scope=str(tmp_path), redis_conn_id="rate_redis_down"
    )
    with caplog.at_level(logging.WARNING, logger="airflow_provider_mews.rate_limit"):
        slots = [limiter.acquire() for _ in range(6)]
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "rate_redis_down" in warnings[0] and f"{FALLBACK_SHARE:.0%}" in warnings[0]
    assert limiter.params.limit == int(40 * FALLBACK_SHARE)
    assert isinstance(limiter.backend, SqliteBackend)
    offsets = [s - slots[0] for s in slots]  # type: ignore[operator]
    assert offsets[2:] == pytest.approx([k * 1.02 / (10 - 2 + 1) for k in range(1, 5)], abs=1e-6)


# -- the sandbox's own window and its lagging count --


def _post(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str]]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


def _config_call(token: str = DEMO_ACCESS_TOKEN) -> dict[str, str]:
    from airflow_provider_mews.testing import DEMO_CLIENT_TOKEN

    return {"ClientToken": DEMO_CLIENT_TOKEN, "AccessToken": token, "Client": "rate test"}


def test_the_sandbox_counts_late_as_configured_over_http():
    """``count_delay_ms`` set through /_sandbox/config: each request is counted 0..N ms after it
    arrived (spread over that range), within its answer time."""
    with MewsSandbox() as sandbox:
        assert _post(sandbox.url, "/_sandbox/config", {"count_delay_ms": 200, "seed": 3})[0] == 200
        assert sandbox.config.count_delay_ms == 200
        lags = []
        for _ in range(12):
            sent = time.monotonic()
            status, _ = _post(sandbox.url, "/api/connector/v1/configuration/get", _config_call())
            answered = time.monotonic()
            assert status == 200
            counted = sandbox.counted_times(DEMO_ACCESS_TOKEN)[-1]
            assert sent <= counted <= answered
            lags.append(counted - sent)
    assert max(lags) <= 0.2 + 0.1  # 0.1 s for a loaded machine
    assert max(lags) - min(lags) > 0.05, lags  # drawn at random, not a fixed shift


def test_the_sandbox_cli_enforces_its_own_window_whatever_the_connection_says(tmp_path: Path):
    """``mews-sandbox --rate-limit 3/2 --count-delay-ms 50``: a 4th request within 2 s meets a 429
    with Retry-After, although the hook's connection would allow 200 per 30 s."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_mews.testing.sandbox", "--port", str(port),
         "--rate-limit", "3/2", "--count-delay-ms", "50"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        answers = [_post(url, "/api/connector/v1/configuration/get", _config_call()) for _ in range(4)]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert [status for status, _ in answers] == [200, 200, 200, 429]
    assert 1 <= int(answers[3][1]["Retry-After"]) <= 2


# -- the rate settings of the connection --


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"rate_limit_requests": 2.5},
            "extra.rate_limit_requests must be a whole number of requests, got 2.5",
        ),
        ({"rate_limit_requests": 0}, "extra.rate_limit_requests must be a positive number, got 0"),
        ({"rate_limit_period": "soon"}, "extra.rate_limit_period must be a positive number, got 'soon'"),
        (
            {"rate_limit_redis_conn_id": "my redis!"},
            "extra.rate_limit_redis_conn_id must name an Airflow connection",
        ),
        ({"rate_limit_redis_conn_id": 7}, "extra.rate_limit_redis_conn_id must name an Airflow connection"),
    ],
)
def test_bad_rate_settings_fail_naming_the_field(extra: dict[str, Any], message: str):
    from airflow.models.connection import Connection

    from airflow_provider_mews.exceptions import MewsConfigurationError
    from airflow_provider_mews.hooks.mews import settings_from_connection

    conn = Connection(
        conn_id="mews_rate_bad",
        conn_type="mews",
        host="https://api.mews-demo.com",
        password="access",
        extra=json.dumps({"client_token": "client", **extra}),
    )
    with pytest.raises(MewsConfigurationError, match=message.replace("(", r"\(").replace(".", r"\.")):
        settings_from_connection(conn)


def test_good_rate_settings_are_typed(monkeypatch: pytest.MonkeyPatch):
    from airflow.models.connection import Connection

    from airflow_provider_mews.hooks.mews import settings_from_connection

    conn = Connection(
        conn_id="mews_rate_good",
        conn_type="mews",
        host="https://api.mews-demo.com",
        password="access",
        extra=json.dumps(
            {
                "client_token": "c",
                "rate_limit_requests": "150",
                "rate_limit_period": 20.5,
                "rate_limit_redis_conn_id": " redis_default ",
            }
        ),
    )
    s = settings_from_connection(conn)
    assert (s.rate_limit_requests, s.rate_limit_period_s, s.rate_limit_redis_conn_id) == (
        150,
        20.5,
        "redis_default",
    )


def test_a_missing_redis_connection_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, mews_sandbox: MewsSandbox
):
    from airflow_provider_mews.exceptions import MewsConfigurationError

    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_RATE_NOREDIS",
        connection_json(mews_sandbox.url, rate_limit_requests=123, rate_limit_redis_conn_id="no_such_redis"),
    )
    with pytest.raises(
        MewsConfigurationError, match="names the Airflow connection 'no_such_redis', which does not exist"
    ):
        MewsConnectorHook("mews_rate_noredis").call(CONFIG)
