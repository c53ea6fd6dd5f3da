"""The retry checkpoint: bounded size, constant cost, and every guarantee a retry relies on.

The size tests drive :class:`Checkpoint` the way a run does (batches reserved in order, finished
out of order within the window) and measure every record it writes. The resume tests run
:class:`MembershipRun` in this process against the sandbox over real HTTP, with the record kept
in a small dict standing in for Airflow's ``task_state_store`` (which needs a task supervisor;
the real store is exercised end to end in ``reliability/test_kill_retry.py``).
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_mews.hooks.mews import MewsConnectorHook
from airflow_provider_mews.loyalty.add_run import MembershipRun, RunSettings
from airflow_provider_mews.loyalty.batches import BatchSender, RejectionBudget, build_batch
from airflow_provider_mews.loyalty.normalize import plan_columns
from airflow_provider_mews.runs.checkpoint import KEY, Checkpoint, StateStore
from airflow_provider_mews.runs.sources import ListSource, SqlSource
from airflow_provider_mews.testing import connection_json, sample_data

LOG = logging.getLogger("test_checkpoint")


class DictStore:
    """The ``task_state_store`` interface (get/set/delete), in memory; records every write."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.writes: list[tuple[int, dict[str, Any]]] = []  # (JSON size, set() keyword arguments)

    def get(self, key: str) -> Any:
        value = self.values.get(key)
        return json.loads(json.dumps(value)) if value is not None else None  # as a JSON round trip

    def set(self, key: str, value: Any, **kwargs: Any) -> None:
        self.values[key] = value
        self.writes.append((len(json.dumps(value)), kwargs))

    def delete(self, key: str) -> None:
        self.values.pop(key, None)


def simulate(
    checkpoint: Checkpoint, batches: int, in_flight: int, seed: int = 1, write_each: bool = False
) -> None:
    """Batches dispatched in order, ``in_flight`` at most and within the checkpoint's window
    (as :class:`MembershipRun` does), finishing in random order."""
    rng = random.Random(seed)
    pending: list[int] = []
    next_index = 0
    while next_index < batches or pending:
        while next_index < batches and len(pending) < in_flight and checkpoint.within_window(next_index):
            checkpoint.reserve(next_index)
            pending.append(next_index)
            next_index += 1
        done = pending.pop(rng.randrange(len(pending)))
        checkpoint.mark_done(done, f"{done:024x}", 1000, 0, 0)
        if write_each:
            checkpoint.flush(force=True)  # the record as it would be written at this point
        assert len(checkpoint.beyond) < checkpoint.window
    checkpoint.flush(force=True)  # as the run does when it ends


@pytest.mark.parametrize("in_flight", [8, 64])
def test_the_record_stays_under_4_kb_and_costs_the_same_at_batch_10_and_100_000(in_flight):
    store = DictStore()
    checkpoint = Checkpoint.start(StateStore(store), "2026-01-01T00:00:00+00:00", 1000, in_flight)
    simulate(checkpoint, 100_000, in_flight, write_each=True)
    sizes = [size for size, _ in store.writes]  # the record after every batch
    assert len(sizes) > 100_000
    assert max(sizes) < 4096, max(sizes)
    # Constant cost: the largest write at the end is the largest at the start (batches 10 to
    # 1 000) but for the extra digits of larger batch numbers and counts (at most 3 more per number).
    early, late = max(sizes[1:1000]), max(sizes[-1000:])
    assert late - early <= 3 * (checkpoint.window + 4), (early, late)
    saved = store.values[KEY]
    assert saved["upto"] == 100_000 and saved["counts"] == [100_000_000, 0, 0] and saved["beyond"] == []
    # The store's default retention: no retention= (never NEVER_EXPIRE).
    assert all(kwargs == {} for _, kwargs in store.writes)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("batches_per_s", [0.5, 6.67, 60.0, 5000.0])
def test_state_writes_are_a_few_per_reserve_period_at_any_pace_and_the_mark_stays_close(
    batches_per_s, monkeypatch
):
    """A state write costs the task ~10 ms through the execution API: at a fast pace the dispatch
    mark is written ahead by RESERVE_S seconds of batches (16 at least, MAX_RESERVE at most), so
    the writes stay a few per RESERVE_S; the mark never runs further ahead of the batches sent
    than that (what a retry reconciles for nothing)."""
    from airflow_provider_mews.runs import checkpoint as module

    clock = FakeClock()
    monkeypatch.setattr(module.time, "monotonic", clock)
    store = DictStore()
    checkpoint = Checkpoint.start(StateStore(store), "2026-01-01T00:00:00+00:00", 1000, 8)
    batches = 3000 if batches_per_s >= 60 else 200
    for index in range(batches):
        checkpoint.reserve(index)
        assert checkpoint.dispatched - index <= 256  # MAX_RESERVE: a retry reconciles at most that
        checkpoint.mark_done(index, f"{index:024x}", 1000, 0, 0)
        clock.now += 1 / batches_per_s
    seconds = batches / batches_per_s
    # progress every FLUSH_EVERY_S, plus a reserve at most every RESERVE batches
    assert len(store.writes) <= seconds / module.FLUSH_EVERY_S + batches / module.RESERVE + 4
    if batches_per_s >= 60:
        assert len(store.writes) < batches / module.RESERVE / 2  # fewer than one per 16 batches


def test_the_record_is_cleared_on_success():
    store = DictStore()
    checkpoint = Checkpoint.start(StateStore(store), "2026-01-01T00:00:00+00:00", 1000)
    checkpoint.mark_done(0, "ab" * 12, 3, 0, 0)
    checkpoint.flush(force=True)
    assert KEY in store.values
    checkpoint.clear()
    assert KEY not in store.values


# -- resuming, in process, against the sandbox --

SETTINGS = dict(batch_size=10, if_exists="add", max_active_requests=4, max_rejected_rows=0)
PLAN = plan_columns(sample_data.COLUMNS, {"tier_id": "LoyaltyTierId"})


@pytest.fixture
def hook(mews_sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_CKPT",
        connection_json(mews_sandbox.url, rate_limit_requests=10_000, rate_limit_period=1),
    )
    hook = MewsConnectorHook("mews_ckpt", pool_size=8, backoff_base_s=0.01)
    yield hook
    hook.close()


def rows(count: int, seed: int = 7) -> list[dict[str, Any]]:
    return [dict(zip(sample_data.COLUMNS, r, strict=True)) for r in sample_data.members(count, seed=seed)]


def one_try(hook: Any, store: DictStore, source: Any, **settings: Any) -> MembershipRun:
    """One try of the run (as the operator makes it), returning the finished run."""
    s = RunSettings(**{**SETTINGS, **settings})
    checkpoint = Checkpoint.start(
        StateStore(store), datetime.now(timezone.utc).isoformat(), s.batch_size, s.max_active_requests
    )
    run = MembershipRun(s, hook, source, PLAN, [], checkpoint, LOG)
    run.execute()
    return run


def stored_accounts(sandbox: Any) -> list[str]:
    return [m["AccountId"] for m in sandbox.memberships()]


def test_a_retry_skips_finished_batches_without_a_request_and_reconciles_the_rest(hook, mews_sandbox):
    members = rows(200)
    store = DictStore()
    # Try 1: batch 12's add is stored but its answer lost, and the getAll that would settle it fails.
    mews_sandbox.configure(
        fault_operations={"loyaltyMemberships/add", "loyaltyMemberships/getAll"},
        fault_script=[*[""] * 12, "drop_after_store", *["503"] * 6],
    )
    first = one_try(hook, store, ListSource(members, 10), max_active_requests=1)
    assert first.failure() is not None
    saved = store.values[KEY]
    assert saved["upto"] == 12 and saved["dispatched"] >= 13
    mews_sandbox.configure(fault_script=[])
    before = mews_sandbox.stats()

    second = one_try(hook, store, ListSource(members, 10), max_active_requests=1)
    assert second.failure() is None
    summary = second.summary
    assert summary["resumed_batches"] == 12  # skipped without a request ...
    assert summary["reconciled"] == 10  # ... batch 12 found stored, not sent again
    assert (summary["added"], summary["rows_total"], summary["not_reached"]) == (200, 200, 0)
    accounts = stored_accounts(mews_sandbox)
    assert sorted(accounts) == sorted(m["account_id"] for m in members)  # each once
    after = mews_sandbox.stats()
    # Adds only for batches 13..19 (batch 12 was found); one getAll per batch that may have been sent.
    assert after["requests:loyaltyMemberships/add"] - before["requests:loyaltyMemberships/add"] == 7
    assert KEY not in store.values  # cleared on success


def test_a_changed_row_below_the_watermark_is_reconciled_not_skipped(hook, mews_sandbox):
    members = rows(100)
    store = DictStore()
    mews_sandbox.configure(
        fault_operations={"loyaltyMemberships/add", "loyaltyMemberships/getAll"},
        fault_script=[*[""] * 6, *["503"] * 10],
    )
    first = one_try(hook, store, ListSource(members, 10), max_active_requests=1)
    assert first.failure() is not None and store.values[KEY]["upto"] == 6
    mews_sandbox.configure(fault_script=[])
    # Between the tries, a row of batch 3 is replaced by another member: the earlier try's
    # batches are no longer the source's, and skipping them would lose the new row.
    changed = list(members)
    newcomer = rows(1, seed=99)[0]
    changed[34] = newcomer

    second = one_try(hook, store, ListSource(changed, 10), max_active_requests=1)
    assert second.failure() is None
    summary = second.summary
    assert summary["resumed_batches"] == 0
    assert summary["reconciled"] == 59  # the 60 rows of try 1 but the replaced one, found stored
    accounts = stored_accounts(mews_sandbox)
    assert len(accounts) == len(set(accounts)) == 101  # nothing twice; the newcomer added
    assert newcomer["account_id"] in accounts


def test_a_changed_batch_finished_out_of_order_is_reconciled_not_skipped(hook, mews_sandbox):
    """A batch beyond the watermark keeps its own fingerprint: a change to it is caught alone."""
    members = rows(100)
    store = DictStore()
    # What try 1 leaves when batch 0 is lost in flight while batches 1 and 2 finish: the sandbox
    # holds batches 1 and 2, the record has them beyond the watermark (which is still 0).
    checkpoint = Checkpoint.start(StateStore(store), datetime.now(timezone.utc).isoformat(), 10, 4)
    sender = BatchSender(
        hook, if_exists="add", chain_id=None, budget=RejectionBudget(0), stop=threading.Event()
    )
    chunks = list(ListSource(members, 10).chunks())
    checkpoint.reserve(0)
    for index in (1, 2):
        batch = build_batch(index, index * 10 + 1, PLAN, chunks[index], False)
        result = sender.run(batch)
        assert result.complete
        checkpoint.mark_done(index, batch.fingerprint, result.added, 0, 0)
    checkpoint.flush(force=True)
    assert store.values[KEY]["upto"] == 0 and len(store.values[KEY]["beyond"]) == 2

    changed = list(members)
    newcomer = rows(1, seed=98)[0]
    changed[25] = newcomer  # batch 2 changed; batch 1 unchanged
    before = mews_sandbox.stats()
    second = one_try(hook, store, ListSource(changed, 10))
    assert second.failure() is None
    assert second.summary["resumed_batches"] == 1  # batch 1 only
    assert second.summary["reconciled"] == 9  # batch 2's unchanged rows found stored
    accounts = stored_accounts(mews_sandbox)
    assert len(accounts) == len(set(accounts)) == 101 and newcomer["account_id"] in accounts
    adds = mews_sandbox.stats()["requests:loyaltyMemberships/add"] - before["requests:loyaltyMemberships/add"]
    assert adds == 9  # batch 1 skipped; every other batch once


# -- stop means stop --


class UncountableSource(ListSource):
    """Rows whose total nobody can tell (as a query the database cannot wrap in COUNT(*))."""

    def count(self) -> int | None:
        return None


def test_a_stopped_run_reports_not_reached_as_unknown_when_the_source_cannot_be_counted(hook, mews_sandbox):
    mews_sandbox.configure(fault_script=["", "409"])  # batch 2's add fails the try
    run = one_try(hook, DictStore(), UncountableSource(rows(1000), 10), max_active_requests=1)
    assert run.failure() is not None
    summary = run.summary
    assert summary["rows_total"] is None and summary["not_reached"] is None
    assert summary["added"] == 10 and summary["rows_read"] < 1000
    assert summary["added"] + summary["skipped_existing"] + summary["rejected"] <= summary["rows_read"]
    assert "unknown number not reached" in str(run.failure())


def test_sql_count_is_made_by_the_database(tmp_path: Path):
    db = tmp_path / "m.db"
    sample_data.write_sqlite(str(db), 25)

    class Hook:  # what SqlSource needs of a common-sql hook
        def get_conn(self) -> Any:
            return sqlite3.connect(db)

    for kwargs, expected in (
        ({"table": "loyalty_members", "sql": None}, 25),
        ({"table": None, "sql": "SELECT * FROM loyalty_members WHERE member_id > 5 ORDER BY member_id;"}, 20),
        ({"table": None, "sql": "SELECT * FROM loyalty_members ORDER BY member_id -- trailing; comment"}, 25),
        ({"table": None, "sql": "SELECT * FROM loyalty_members UNION ALL SELECT * FROM loyalty_members"}, 50),
    ):
        source = SqlSource(Hook(), chunk_size=10, **kwargs)
        source.open()
        assert next(iter(source.chunks()))  # reading has begun
        assert source.count() == expected, kwargs
        source.close()
