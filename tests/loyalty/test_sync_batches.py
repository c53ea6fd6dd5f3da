"""Sync batches and removals against the sandbox over real HTTP, checked on its request log."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_mews.hooks.mews import MewsConnectorHook
from airflow_provider_mews.loyalty.batches import RejectionBudget
from airflow_provider_mews.loyalty.scope import ScopeIndex
from airflow_provider_mews.loyalty.sync_batches import Remover, SyncBatchSender, build_sync_batch
from airflow_provider_mews.loyalty.sync_plan import plan_sync_columns
from airflow_provider_mews.testing import MewsSandbox

PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
OTHER = "0b7a2c55-3f5e-4bfa-8d7c-1a1f0e6c9d42"
TIER = "a1b2c3d4-0000-4000-8000-000000000001"
ADD, UPDATE, DELETE, GET_ALL = (f"loyaltyMemberships/{op}" for op in ("add", "update", "delete", "getAll"))
COLUMNS = (
    "account_id",
    "loyalty_program_id",
    "is_primary",
    "membership_number",
    "points",
    "loyalty_tier_id",
    "provider_membership_id",
)


@pytest.fixture
def hook(sync_hook: MewsConnectorHook) -> MewsConnectorHook:
    return sync_hook


@pytest.fixture
def index(tmp_path) -> Iterator[ScopeIndex]:
    with ScopeIndex(str(tmp_path)) as scope:
        yield scope


def seed(hook: MewsConnectorHook, count: int, program: str = PROGRAM) -> list[dict[str, Any]]:
    items = [
        {
            "AccountId": str(uuid.uuid4()),
            "LoyaltyProgramId": program,
            "IsPrimary": True,
            "Code": f"N-{n}",
            "Points": n,
            "LoyaltyTierId": TIER,
        }
        for n in range(count)
    ]
    return hook.add_loyalty_memberships(items)


def source_row(m: dict[str, Any], **changes: Any) -> list[Any]:
    values = {
        "account_id": m["AccountId"], "loyalty_program_id": m["LoyaltyProgramId"], "is_primary": True,
        "membership_number": m["MembershipNumber"], "points": m["Points"], "loyalty_tier_id": m["LoyaltyTierId"],
        "provider_membership_id": m.get("ProviderMembershipId"), **changes,
    }  # fmt: skip
    return [values[c] for c in COLUMNS]


def new_row(n: int, **changes: Any) -> list[Any]:
    m = {
        "AccountId": str(uuid.uuid4()),
        "LoyaltyProgramId": PROGRAM,
        "MembershipNumber": f"NEW-{n}",
        "Points": 1,
        "LoyaltyTierId": None,
    }
    return source_row(m, **changes)


def sender(hook, index, scope=None, dry_run=False, allowed=100) -> SyncBatchSender:
    return SyncBatchSender(
        hook,
        index=index,
        scope=scope,
        chain_id=None,
        budget=RejectionBudget(allowed),
        stop=threading.Event(),
        dry_run=dry_run,
    )


def run(s: SyncBatchSender, rows: list[list[Any]], index_no: int = 0, first_row: int = 1) -> Any:
    batch = build_sync_batch(index_no, first_row, plan_sync_columns(COLUMNS), rows, keep_row_json=True)
    result = s.run(batch)
    assert result.error is None, result.error
    assert result.complete
    return result


def writes(sb: MewsSandbox) -> list[dict[str, Any]]:
    return [e for e in sb.request_log() if e["operation"] in (ADD, UPDATE, DELETE)]


def test_upsert_batch_adds_new_updates_only_changed_fields_and_leaves_the_rest(hook, index, mews_sandbox):
    existing = seed(hook, 6)
    mews_sandbox.reset()
    mews_sandbox.state.store(existing)  # the seeding is not part of the log below
    rows = [
        source_row(existing[0]),
        source_row(existing[1], points=99),
        source_row(existing[2], loyalty_tier_id=None, points=7),  # NULL clears the tier
        source_row(existing[3], provider_membership_id="P-3"),
        source_row(existing[4]),
        source_row(existing[5]),
        new_row(1),
        new_row(2, provider_membership_id="P-NEW"),
    ]
    result = run(sender(hook, index), rows)
    kinds = {o.source_row: o.outcome for o in result.outcomes}
    assert kinds == {
        1: "unchanged",
        2: "updated",
        3: "updated",
        4: "updated",
        5: "unchanged",
        6: "unchanged",
        7: "added",
        8: "added",
    }
    assert result.changed == {2: ["Points"], 3: ["Points", "LoyaltyTierId"], 4: ["ProviderMembershipId"]}
    log = mews_sandbox.request_log()
    assert [e["operation"] for e in log] == [GET_ALL, ADD, UPDATE]
    assert log[0]["filters"]["ActivityStates"] == ["Active"]
    added = {o.source_row: o.mews_membership_id for o in result.outcomes if o.outcome == "added"}
    assert log[2]["LoyaltyMembershipUpdates"] == [
        {"LoyaltyMembershipId": existing[1]["Id"], "Points": {"Value": 99}},
        {"LoyaltyMembershipId": existing[2]["Id"], "Points": {"Value": 7}, "LoyaltyTierId": {"Value": None}},
        {"LoyaltyMembershipId": existing[3]["Id"], "ProviderMembershipId": {"Value": "P-3"}},
        {"LoyaltyMembershipId": added[8], "ProviderMembershipId": {"Value": "P-NEW"}},  # add cannot set it
    ]
    stored = {m["Id"]: m for m in mews_sandbox.memberships()}
    assert (
        stored[existing[2]["Id"]]["LoyaltyTierId"] is None
        and stored[added[8]]["ProviderMembershipId"] == "P-NEW"
    )
    # Run again: everything is unchanged now, and no write is sent.
    again = run(sender(hook, ScopeIndex()), rows)
    assert {o.outcome for o in again.outcomes} == {"unchanged"} and len(writes(mews_sandbox)) == 2


def test_ambiguous_rows_are_rejected_naming_the_candidates(hook, index, mews_sandbox):
    account = str(uuid.uuid4())
    twins = hook.add_loyalty_memberships(
        [{"AccountId": account, "LoyaltyProgramId": PROGRAM, "IsPrimary": True}] * 2
    )
    row = source_row({**twins[0], "MembershipNumber": None, "Points": None, "LoyaltyTierId": None})
    result = run(sender(hook, index), [row])
    [rejection] = result.rejected
    assert all(t["Id"] in rejection.reason for t in twins) and rejection.field == "LoyaltyMembershipId"
    assert writes(mews_sandbox)[1:] == []


def test_refused_updates_are_isolated_by_bisection(hook, index, mews_sandbox):
    existing = seed(hook, 8)
    mews_sandbox.configure(forbidden_memberships={existing[5]["Id"]})
    result = run(sender(hook, index), [source_row(m, points=1000 + n) for n, m in enumerate(existing)])
    assert result.count("updated") == 7
    [rejection] = result.rejected
    assert rejection.source_row == 6 and "HTTP 403" in rejection.reason and rejection.request_id
    assert len(mews_sandbox.request_log(UPDATE)) > 2  # split until the refused row stood alone


def test_a_second_row_for_the_same_membership_is_rejected_across_batches(hook, index, mews_sandbox):
    [m] = seed(hook, 1)
    s = sender(hook, index)
    fresh = new_row(1)
    first = run(s, [source_row(m, points=5), fresh])
    second = run(s, [source_row(m, points=6), fresh], index_no=1, first_row=3)
    assert sorted(o.outcome for o in first.outcomes) == ["added", "updated"]
    assert [r.source_row for r in second.rejected] == [3, 4]
    assert "already matched by row 1" in second.rejected[0].reason
    assert "already matched by row 2" in second.rejected[1].reason  # getAll found what row 2 added
    assert len(mews_sandbox.request_log(ADD)) == 2  # the seed and row 2


def test_the_same_new_membership_twice_in_one_batch_is_added_once(hook, index, mews_sandbox):
    fresh = new_row(1)
    result = run(sender(hook, index), [fresh, fresh])
    assert [o.outcome for o in result.outcomes] == ["added"]
    assert "row 1 of the source is the same new membership" in result.rejected[0].reason
    assert mews_sandbox.stats()["added"] == 1


def test_dry_run_sends_no_write(hook, index, mews_sandbox):
    existing = seed(hook, 3)
    before = len(writes(mews_sandbox))
    result = run(
        sender(hook, index, dry_run=True),
        [source_row(existing[0], points=50), source_row(existing[1]), new_row(1)],
    )
    assert sorted(o.outcome for o in result.outcomes) == ["added", "unchanged", "updated"]
    assert result.changed == {1: ["Points"]}
    assert len(writes(mews_sandbox)) == before


def fill_scope(hook: MewsConnectorHook, index: ScopeIndex, programs: list[str]) -> None:
    page: list[dict[str, Any]] = []
    for m in hook.get_loyalty_memberships(loyalty_program_ids=programs, activity_states=["Active"]):
        page.append(m)
        if len(page) == 1000:
            index.add_scope(page)
            page = []
    index.add_scope(page)


@pytest.mark.parametrize("on_missing", ["cancel", "delete"])
def test_mirror_matches_in_scope_and_removes_the_rest_once(hook, index, mews_sandbox, on_missing):
    kept, gone = seed(hook, 5), seed(hook, 3)
    outside = seed(hook, 2, program=OTHER)
    fill_scope(hook, index, [PROGRAM])
    assert index.size == 8
    rows = [source_row(m) for m in kept] + [source_row(outside[0])]
    result = run(sender(hook, index, scope=frozenset({PROGRAM})), rows)
    assert result.count("unchanged") == 5 and "outside loyalty_program_ids" in result.rejected[0].reason
    assert index.count_unmatched(on_missing) == 3
    mews_sandbox.configure(fault_operations={UPDATE, DELETE}, fault_script=["drop_after_store"])
    remover = Remover(hook, on_missing, None)
    done = [m["Id"] for page in index.unmatched(on_missing) for m in remover.remove(page).done]
    assert sorted(done) == sorted(m["Id"] for m in gone)
    stored = {m["Id"]: m for m in mews_sandbox.memberships()}
    if on_missing == "cancel":
        assert {stored[i]["State"] for i in done} == {"Canceled"}
        assert index.count_unmatched("cancel") == 3  # the scope was read before: it still says Enrolled
    else:
        assert {stored[i]["ActivityState"] for i in done} == {"Deleted"}
        assert mews_sandbox.stats()["deleted"] == 3
        assert len(mews_sandbox.request_log(DELETE)) == 1  # the dropped delete was read back, not repeated
    untouched = [m["Id"] for m in kept + outside]
    assert {stored[i]["State"] for i in untouched} == {"Enrolled"} and {
        stored[i]["ActivityState"] for i in untouched
    } == {"Active"}


@pytest.mark.parametrize("on_missing", ["cancel", "delete"])
def test_a_refused_removal_is_isolated_and_the_rest_of_the_page_removed_once(
    hook, index, mews_sandbox, on_missing
):
    gone = seed(hook, 6)
    mews_sandbox.configure(forbidden_memberships={gone[4]["Id"]})
    result = Remover(hook, on_missing, None).remove(gone)
    assert result.error is None
    assert sorted(m["Id"] for m in result.done) == sorted(m["Id"] for m in gone if m is not gone[4])
    [(refused, exc)] = result.refused
    assert refused["Id"] == gone[4]["Id"] and exc.status == 403 and exc.request_id
    operation = UPDATE if on_missing == "cancel" else DELETE
    assert len(mews_sandbox.request_log(operation)) > 2  # split until the refused one stood alone
    stored = {m["Id"]: m for m in mews_sandbox.memberships()}
    assert stored[gone[4]["Id"]]["State"] == "Enrolled" and stored[gone[4]["Id"]]["ActivityState"] == "Active"
