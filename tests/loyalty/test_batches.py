"""BatchSender against the sandbox: reconciliation bounds that only matter over long gaps."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone

from airflow_provider_mews.hooks.mews import MewsConnectorHook
from airflow_provider_mews.loyalty.batches import BatchSender, RejectionBudget, build_batch
from airflow_provider_mews.loyalty.normalize import plan_columns

PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
COLUMNS = ["AccountId", "LoyaltyProgramId", "IsPrimary", "Code"]


def _batch(count: int):
    rows = [(str(uuid.uuid4()), PROGRAM, True, f"C{i}") for i in range(count)]
    return build_batch(0, 1, plan_columns(COLUMNS), rows, keep_row_json=False)


def _sender(hook: MewsConnectorHook, now) -> BatchSender:
    return BatchSender(
        hook,
        if_exists="add",
        chain_id=None,
        budget=RejectionBudget(0),
        stop=threading.Event(),
        now=now,
    )


def test_retry_hours_after_the_first_try_still_finds_what_it_stored(mews_conn, mews_sandbox):
    """The reconcile window starts at the first try, not at "now minus the clock skew"."""
    hook = MewsConnectorHook(mews_conn)
    batch = _batch(10)
    first_try = datetime.now(timezone.utc)
    hook.add_loyalty_memberships(batch.items[:6])  # what a crashed first try managed to store

    two_hours_later = lambda: datetime.now(timezone.utc) + timedelta(hours=2)  # noqa: E731
    result = _sender(hook, two_hours_later).run(batch, stored_since=first_try)

    assert result.complete
    assert result.reconciled == 6
    assert result.added == 10
    stored = [m["AccountId"] for m in mews_sandbox.memberships()]
    assert sorted(stored) == sorted(item["AccountId"] for item in batch.items)  # none twice


def test_memberships_stored_before_the_run_are_not_taken_for_ours(mews_conn, mews_sandbox):
    """In add mode a membership created long before the first try is someone else's: add ours."""
    hook = MewsConnectorHook(mews_conn)
    batch = _batch(4)
    hook.add_loyalty_memberships(batch.items[:2])
    # The first try "started" an hour after those were created (as seen by the clocks here).
    shifted_now = lambda: datetime.now(timezone.utc) + timedelta(hours=1)  # noqa: E731
    first_try = shifted_now()
    result = _sender(hook, shifted_now).run(batch, stored_since=first_try)

    assert result.reconciled == 0
    assert result.added == 4
    assert len(mews_sandbox.memberships()) == 6
