"""The hook reads a time range longer than Mews allows as 3-month slices, each record once.

Real HTTP to the sandbox, which refuses an interval over 3 months and (by default) takes both
ends of an interval inclusively: a record stamped exactly on a slice boundary comes back from
both slices unless the hook dedupes it. ``interval_end_inclusive=False`` is the half-open
server; ``seed_on_boundaries`` puts every record on a UTC midnight, so many sit on boundaries.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from airflow_provider_mews.exceptions import MewsConfigurationError, MewsError
from airflow_provider_mews.hooks.mews import slice_count, time_slices

YEAR_START = datetime(2025, 1, 1, tzinfo=timezone.utc)
YEAR_END = datetime(2026, 1, 1, tzinfo=timezone.utc)
OP = "loyaltyMemberships/getAll"
ALL_STATES = {"ActivityStates": ["Active", "Deleted"]}
_limits = itertools.count(300_000)


@pytest.fixture
def hook(mews_sandbox, monkeypatch):
    from airflow_provider_mews.hooks.mews import MewsConnectorHook
    from airflow_provider_mews.testing import connection_json

    extra = {"rate_limit_requests": next(_limits), "rate_limit_period": 1}
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_SLICES", connection_json(mews_sandbox.url, **extra))
    hook = MewsConnectorHook("mews_slices", backoff_base_s=0.01, backoff_max_s=0.05)
    yield hook
    hook.close()


def read_ids(hook, **kwargs):
    kwargs.setdefault("start", YEAR_START)
    kwargs.setdefault("end", YEAR_END)
    return Counter(r["Id"] for page in hook.paginate_range(OP, ALL_STATES, **kwargs) for r in page)


def test_slices_are_consecutive_equal_and_at_most_three_calendar_months():
    slices = time_slices("2025-01-31T00:00:00Z", "2026-01-01T00:00:00Z")
    # 335 days in 4 equal slices of 83 d 18 h: each within 3 calendar months of its start.
    assert slices[0] == (
        datetime(2025, 1, 31, tzinfo=timezone.utc),
        datetime(2025, 4, 24, 18, tzinfo=timezone.utc),
    )
    assert all(a[1] == b[0] for a, b in itertools.pairwise(slices))
    assert slices[-1][1] == YEAR_END and len(slices) == 4
    # A year needs 5: 91 d 6 h is more than Jan 1 .. Apr 1.
    assert len(time_slices(YEAR_START, YEAR_END)) == 5
    eight = time_slices(YEAR_START, YEAR_END, parts=8)
    assert len(eight) == 8 and all(b.microsecond == 0 for _, b in eight)
    assert {round((b - a).total_seconds()) for a, b in eight} == {365 * 86400 // 8}
    assert time_slices(YEAR_START, YEAR_START) == [(YEAR_START, YEAR_START)]
    with pytest.raises(MewsConfigurationError, match="ends"):
        time_slices(YEAR_END, YEAR_START)


def test_slice_count_keeps_the_workers_busy_but_a_night_in_one_slice():
    day = timedelta(days=1)
    assert slice_count(YEAR_START, YEAR_START + day, 3, 8) == 1  # a nightly interval: one read
    assert slice_count(YEAR_START, YEAR_START + 3 * day, 3, 8) == 3  # none shorter than a day
    assert slice_count(YEAR_START, YEAR_END, 3, 8) == 8
    # A year needs 5 slices; with 4 workers, 8, so no chain is left to finish alone.
    assert slice_count(YEAR_START, YEAR_END, 3, 4) == 8
    assert slice_count(YEAR_START, YEAR_END, 3, 1) == 5


def test_the_sandbox_refuses_a_year_in_one_interval(hook):
    with pytest.raises(MewsError, match="3 months"):
        next(
            hook.paginate(
                OP, {"UpdatedUtc": {"StartUtc": "2025-01-01T00:00:00Z", "EndUtc": "2026-01-01T00:00:00Z"}}
            )
        )


@pytest.mark.parametrize("inclusive", [True, False], ids=["ends-inclusive", "half-open"])
@pytest.mark.parametrize("workers", [1, 4, 8])
def test_a_year_on_boundaries_is_read_once_each(hook, mews_sandbox, inclusive, workers):
    mews_sandbox.configure(seed_on_boundaries=True, interval_end_inclusive=inclusive)
    # 3 000 memberships on the year's midnights (about 8 per day), including the year's first
    # and last instants, and 30 stamped exactly on each boundary of the slices the hook cuts.
    ids = mews_sandbox.seed_memberships(3000, start_utc=YEAR_START, end_utc=YEAR_END)
    slices = time_slices(YEAR_START, YEAR_END, 3, slice_count(YEAR_START, YEAR_END, 3, workers))
    on_boundaries = [b for _, b in slices[:-1]]
    for b in on_boundaries:
        ids += mews_sandbox.seed_memberships(30, created_utc=b)
    stamped = Counter(mews_sandbox.state.updated_at[i] for i in ids)
    assert all(stamped[b.timestamp()] >= 30 for b in on_boundaries) and len(on_boundaries) >= 4
    got = read_ids(hook, max_workers=workers, page_size=100)
    # A half-open server leaves out the records stamped at the range's very end (the next range has them).
    expected = {i for i in ids if inclusive or mews_sandbox.state.updated_at[i] < YEAR_END.timestamp()}
    assert (stamped[YEAR_END.timestamp()] > 0 and len(expected) < len(ids)) or inclusive
    assert set(got) == expected
    assert max(got.values()) == 1, [i for i, n in got.items() if n > 1][:5]


def test_boundary_reads_run_beside_the_slices(hook, mews_sandbox, monkeypatch):
    """The [b, b] reads do not hold the slices back: a boundary read waits (up to 5 s) until a
    slice has sent its first request; read one after the other before the slices, it never would."""
    mews_sandbox.configure(seed_on_boundaries=True)
    ids = mews_sandbox.seed_memberships(400, start_utc=YEAR_START, end_utc=YEAR_END)
    slice_started = threading.Event()
    waited: list[bool] = []
    call = type(hook).call

    def spying(self, operation, payload=None, **kwargs):
        interval = (payload or {}).get("UpdatedUtc") or {}
        if interval.get("StartUtc") == interval.get("EndUtc"):
            waited.append(slice_started.wait(5))
        else:
            slice_started.set()
        return call(self, operation, payload, **kwargs)

    monkeypatch.setattr(type(hook), "call", spying)
    got = read_ids(hook, max_workers=8, page_size=50)
    assert set(got) == set(ids) and max(got.values()) == 1
    assert len(waited) >= 7 and all(waited)


def test_the_sandbox_time_filter_index_matches_a_walk(hook, mews_sandbox):
    """The sandbox finds a time filter's records by bisection when their times follow insertion
    order, and walks the store when an update broke that order: the same records either way."""
    mews_sandbox.configure(seed_on_boundaries=True)
    ids = mews_sandbox.seed_memberships(365, start_utc=YEAR_START, end_utc=YEAR_END)
    state = mews_sandbox.state
    midnight = datetime(2025, 3, 1, tzinfo=timezone.utc)

    def read(low, high, page_size=7):
        body = {**ALL_STATES, "UpdatedUtc": {"StartUtc": low, "EndUtc": high}}
        return [r["Id"] for page in hook.paginate(OP, body, page_size=page_size) for r in page]

    def walk(low, high):
        a, b = datetime.fromisoformat(low).timestamp(), datetime.fromisoformat(high).timestamp()
        return [i for i in state.order if (a <= state.updated_at[i] <= b)]

    cases = [
        (midnight.isoformat(), midnight.isoformat()),  # [b, b]: the one record stamped then
        ("2025-02-10T12:00:00+00:00", "2025-03-01T00:00:00+00:00"),  # both ends inclusive
        ("2025-12-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00"),
    ]
    for low, high in cases:
        assert read(low, high) == walk(low, high) and walk(low, high)
    assert state.span("UpdatedUtc", (midnight.timestamp(),) * 2, True) == (59, 60)
    state.updated_at[ids[10]] = midnight.timestamp()  # out of order now: the sandbox walks
    assert state.span("UpdatedUtc", (midnight.timestamp(),) * 2, True) is None
    for low, high in cases:
        assert read(low, high) == walk(low, high)
    assert ids[10] in read(midnight.isoformat(), midnight.isoformat())


def test_deleted_and_active_both_come_back(hook, mews_sandbox):
    ids = mews_sandbox.seed_memberships(50, start_utc=YEAR_START, end_utc=YEAR_END)
    hook.delete_loyalty_memberships(ids[:5])
    got = read_ids(hook, end=datetime.now(timezone.utc))
    assert set(got) == set(ids) and max(got.values()) == 1


def test_more_slices_than_needed_still_read_each_record_once(hook, mews_sandbox):
    """One-month slices (12 boundaries) read by 4 threads, pages of 7: the same set, each once."""
    mews_sandbox.configure(seed_on_boundaries=True)
    ids = mews_sandbox.seed_memberships(500, start_utc=YEAR_START, end_utc=YEAR_END)
    got = read_ids(hook, max_interval_months=1, page_size=7, max_workers=4)
    assert set(got) == set(ids) and max(got.values()) == 1


def test_a_failing_slice_stops_the_readers_and_raises(hook, mews_sandbox):
    mews_sandbox.seed_memberships(300, start_utc=YEAR_START, end_utc=YEAR_END)
    # The sandbox answers 400 for an unknown field: not retried, raised in the consumer.
    with pytest.raises(MewsError, match="unknown field"):
        list(hook.paginate_range(OP, {"NoSuchFilter": 1}, start=YEAR_START, end=YEAR_END, max_workers=4))


def test_closing_early_stops_the_threads(hook, mews_sandbox):
    import threading

    mews_sandbox.seed_memberships(2000, start_utc=YEAR_START, end_utc=YEAR_END)
    pages = hook.paginate_range(OP, ALL_STATES, start=YEAR_START, end=YEAR_END, page_size=10, queue_pages=1)
    next(pages)
    pages.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("mews-slice-")]
