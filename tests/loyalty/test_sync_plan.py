"""The pure functions of the sync modes: columns, rows, matching, diff and the removal budget."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from airflow_provider_mews.loyalty.normalize import RowRejected
from airflow_provider_mews.loyalty.sync_plan import (
    RemovalsRefused,
    SyncRow,
    check_removals,
    diff,
    index_memberships,
    match_row,
    needs_removal,
    normalize_sync_row,
    parse_max_removals,
    plan_sync_columns,
    removal_limit,
    removal_update,
    update_item,
)

ACCOUNT = "6f7d1c1e-2b1a-4f7e-9a51-5c7f3f2f0a01"
PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
OTHER_PROGRAM = "0b7a2c55-3f5e-4bfa-8d7c-1a1f0e6c9d42"
TIER = "a1b2c3d4-0000-4000-8000-000000000001"
COLUMNS = (
    "account_id", "loyalty_program_id", "is_primary", "state", "membership_number", "points",
    "expiration_date", "url", "loyalty_tier_id", "provider_membership_id", "mews_membership_id",
)  # fmt: skip


def membership(**fields: Any) -> dict[str, Any]:
    base = {
        "Id": str(uuid.uuid4()),
        "AccountId": ACCOUNT,
        "LoyaltyProgramId": PROGRAM,
        "State": "Enrolled",
        "IsPrimary": True,
        "ProviderMembershipId": None,
        "Code": "M-1",
        "MembershipNumber": "M-1",
        "Points": 10,
        "ExpirationDate": "2030-12-31T00:00:00Z",
        "Url": "https://rewards.example.com/m/1",
        "LoyaltyTierId": TIER,
    }
    return {**base, **fields}


def row(names: tuple[str, ...] = COLUMNS, **values: Any) -> SyncRow:
    """A normalized row of the given columns; unnamed ones hold the values of ``membership()``."""
    defaults = {
        "account_id": ACCOUNT, "loyalty_program_id": PROGRAM, "is_primary": True, "state": "Enrolled",
        "membership_number": "M-1", "points": 10, "expiration_date": "2030-12-31",
        "url": "https://rewards.example.com/m/1", "loyalty_tier_id": TIER, "provider_membership_id": None,
        "mews_membership_id": None,
    }  # fmt: skip
    data = {**defaults, **values}
    return normalize_sync_row(plan_sync_columns(names), [data[n] for n in names], 7)


# -- columns and rows --


def test_sync_columns_are_found_by_name_and_hidden_from_the_add_plan():
    plan = plan_sync_columns(
        [
            "Account_Id",
            "LoyaltyProgramId",
            "IsPrimary",
            "loyalty_membership_id",
            "ProviderMembershipId",
            "note",
        ]
    )
    assert (plan.id_position, plan.provider_id_position) == (3, 4)
    assert plan.columns.ignored == ("note",)
    assert plan.columns.names[3] == "loyalty_membership_id"
    assert plan.present == {"LoyaltyProgramId", "IsPrimary", "ProviderMembershipId"}
    results_table = plan_sync_columns(
        ["account_id", "loyalty_program_id", "is_primary", "mews_membership_id"]
    )
    assert results_table.id_position == 3 and results_table.provider_id_position is None


def test_sync_columns_from_field_map_and_errors():
    plan = plan_sync_columns(
        ["acct", "prog", "primary", "their_id", "our_id", "n"],
        {
            "acct": "AccountId",
            "prog": "LoyaltyProgramId",
            "primary": "IsPrimary",
            "their_id": "ProviderMembershipId",
            "our_id": "LoyaltyMembershipId",
            "n": "MembershipNumber",
        },
    )
    assert (plan.id_position, plan.provider_id_position) == (4, 3)
    assert plan.present == {"LoyaltyProgramId", "IsPrimary", "ProviderMembershipId", "MembershipNumber"}
    with pytest.raises(ValueError, match="both map to Mews field LoyaltyMembershipId"):
        plan_sync_columns(
            ["account_id", "loyalty_program_id", "is_primary", "mews_membership_id", "loyalty_membership_id"]
        )
    with pytest.raises(ValueError, match="'gone', which the source does not have"):
        plan_sync_columns(["account_id", "loyalty_program_id", "is_primary"], {"gone": "LoyaltyMembershipId"})
    with pytest.raises(
        ValueError, match=r"use one of AccountId, .*LoyaltyTierId, LoyaltyMembershipId, ProviderMembershipId$"
    ):
        plan_sync_columns(["account_id", "loyalty_program_id", "is_primary", "x"], {"x": "Nickname"})
    with pytest.raises(ValueError, match="required Mews field"):
        plan_sync_columns(["account_id", "loyalty_membership_id"])


def test_null_clears_and_absent_is_untouched():
    r = row(points=None, loyalty_tier_id="", is_primary=None)
    assert r.cleared == {"Points", "LoyaltyTierId", "IsPrimary", "ProviderMembershipId"}
    assert "Points" not in r.fields and r.fields["MembershipNumber"] == "M-1"
    narrow = row(("account_id", "loyalty_program_id", "is_primary"))
    assert narrow.cleared == frozenset() and set(narrow.fields) == {
        "AccountId",
        "LoyaltyProgramId",
        "IsPrimary",
    }


def test_row_values_are_checked():
    with pytest.raises(RowRejected, match="ProviderMembershipId: is 101 characters long"):
        row(provider_membership_id="x" * 101)
    with pytest.raises(RowRejected, match="LoyaltyMembershipId: 'M-7' is not a UUID"):
        row(mews_membership_id="M-7")
    with pytest.raises(RowRejected, match="Points"):
        row(points="lots")
    r = row(mews_membership_id=" 6F7D1C1E-2B1A-4F7E-9A51-5C7F3F2F0A99 ", provider_membership_id=1234)
    assert (
        r.membership_id == "6f7d1c1e-2b1a-4f7e-9a51-5c7f3f2f0a99"
        and r.fields["ProviderMembershipId"] == "1234"
    )


def test_add_item_of_a_new_row():
    item = row(provider_membership_id="P-1").add_item()
    assert item["Code"] == "M-1" and "MembershipNumber" not in item and "ProviderMembershipId" not in item
    assert item["ExpirationDate"] == "2030-12-31"  # format: date, as add wants it
    with pytest.raises(RowRejected, match="IsPrimary: is required to add"):
        row(is_primary=None).add_item()


# -- matching --


def test_match_by_id_wins_over_the_key():
    m, twin = membership(), membership()
    by_id, by_key = index_memberships([m, twin])
    found = match_row(row(mews_membership_id=m["Id"].upper()), by_id, by_key)
    assert found.kind == "matched" and found.membership is m
    gone = str(uuid.uuid4())
    refused = match_row(row(mews_membership_id=gone), by_id, by_key)
    assert refused.kind == "rejected" and refused.field == "LoyaltyMembershipId" and gone in refused.reason
    moved = match_row(row(mews_membership_id=m["Id"], account_id=str(uuid.uuid4())), by_id, by_key)
    assert moved.kind == "rejected" and "cannot move a membership to another account" in moved.reason


def test_match_by_account_program_and_number():
    m1, m2 = membership(MembershipNumber="A", Code="A"), membership(MembershipNumber="B", Code="B")
    by_id, by_key = index_memberships([m1, m2])
    assert match_row(row(membership_number="B"), by_id, by_key).membership is m2
    assert match_row(row(membership_number="C"), by_id, by_key).kind == "new"
    assert match_row(row(loyalty_program_id=OTHER_PROGRAM), by_id, by_key).kind == "new"
    legacy = membership(MembershipNumber=None, Code="L")  # only the deprecated Code
    assert match_row(row(membership_number="L"), *index_memberships([legacy])).membership is legacy


def test_more_than_one_candidate_is_rejected_naming_them():
    found = [membership(MembershipNumber=None, Code=None) for _ in range(7)]
    by_id, by_key = index_memberships(found)
    result = match_row(row(("account_id", "loyalty_program_id", "is_primary", "points")), by_id, by_key)
    assert result.kind == "rejected" and result.membership is None
    ids = sorted(m["Id"] for m in found)
    assert all(i in result.reason for i in ids[:5]) and "and 2 more" in result.reason
    assert "7 memberships in Mews have this account, program" in result.reason and "row 7" in result.reason


def test_rows_outside_the_mirror_scope_are_rejected():
    m = membership()
    by_id, by_key = index_memberships([m])
    scope = frozenset({OTHER_PROGRAM})
    out = match_row(row(), by_id, by_key, scope)
    assert (
        out.kind == "rejected"
        and out.field == "LoyaltyProgramId"
        and "outside loyalty_program_ids" in out.reason
    )
    by_id_out = match_row(
        row(mews_membership_id=m["Id"], loyalty_program_id=OTHER_PROGRAM), by_id, by_key, scope
    )
    assert by_id_out.kind == "rejected" and PROGRAM in by_id_out.reason  # its current program is outside
    assert match_row(row(), by_id, by_key, frozenset({PROGRAM})).kind == "matched"


def test_rows_without_account_or_program_cannot_be_matched_by_key():
    assert match_row(row(account_id=None), {}, {}).field == "AccountId"
    assert match_row(row(loyalty_program_id=""), {}, {}).field == "LoyaltyProgramId"


# -- diff --


def test_an_unchanged_row_sends_nothing():
    m = membership(ExpirationDate="2030-12-31T15:00:00Z", LoyaltyTierId=TIER.upper())
    assert diff(row(), m) == {}


def test_only_changed_fields_are_sent():
    changes = diff(row(points=11, state="canceled", url="https://rewards.example.com/m/2"), membership())
    assert changes == {
        "State": {"Value": "Canceled"},
        "Points": {"Value": 11},
        "Url": {"Value": "https://rewards.example.com/m/2"},
    }
    assert diff(row(is_primary=False, expiration_date="2031-01-01"), membership()) == {
        "IsPrimary": {"Value": False},
        "ExpirationDate": {"Value": "2031-01-01"},
    }
    assert diff(row(provider_membership_id="P-1"), membership()) == {"ProviderMembershipId": {"Value": "P-1"}}
    assert diff(row(membership_number="M-2"), membership(MembershipNumber=None, Code="M-1")) == {
        "MembershipNumber": {"Value": "M-2"}
    }
    other = diff(row(mews_membership_id=str(uuid.uuid4()), loyalty_program_id=OTHER_PROGRAM), membership())
    assert other == {"LoyaltyProgramId": {"Value": OTHER_PROGRAM}}


def test_null_clears_clearable_fields_only_and_only_when_set():
    changes = diff(
        row(loyalty_tier_id=None, points=None, state=None, is_primary=None, loyalty_program_id=None),
        membership(),
    )
    assert changes == {"Points": {"Value": None}, "LoyaltyTierId": {"Value": None}}
    assert diff(row(loyalty_tier_id=None), membership(LoyaltyTierId=None)) == {}
    assert diff(row(provider_membership_id=None), membership(ProviderMembershipId=None)) == {}


def test_absent_columns_are_never_touched():
    narrow = row(("account_id", "loyalty_program_id", "is_primary", "points"), points=10)
    assert (
        diff(narrow, membership(LoyaltyTierId=None, Url=None, State="Canceled", MembershipNumber="Z")) == {}
    )


def test_points_compare_by_type_too():
    assert diff(row(points=1), membership(Points=True)) == {"Points": {"Value": 1}}


def test_update_and_removal_items():
    assert update_item("id-1", {"Points": {"Value": 1}}) == {
        "LoyaltyMembershipId": "id-1",
        "Points": {"Value": 1},
    }
    assert removal_update("id-2") == {"LoyaltyMembershipId": "id-2", "State": {"Value": "Canceled"}}
    assert needs_removal({"State": "Enrolled"}, "cancel") and not needs_removal(
        {"State": "Canceled"}, "cancel"
    )
    assert needs_removal({"State": "Canceled"}, "delete") and not needs_removal({"State": "New"}, "keep")


# -- removal budget --


@pytest.mark.parametrize(
    ("value", "parsed"), [(0, 0), (300, 300), ("5%", 0.05), (" 12.5 % ", 0.125), ("100%", 1.0), ("40", 40)]
)
def test_max_removals_forms(value, parsed):
    assert parse_max_removals(value) == parsed


@pytest.mark.parametrize("value", [-1, "-5%", "101%", "five", "5 percent", None, True, 2.5, "%"])
def test_bad_max_removals_are_refused_with_the_forms_that_work(value):
    with pytest.raises(ValueError, match=r"count \(e.g. 500\) or a percentage"):
        parse_max_removals(value)


def test_removal_limit_and_check():
    assert removal_limit("5%", 10_000) == 500 and removal_limit("5%", 19) == 0 and removal_limit(3, 0) == 3
    assert removal_limit("7%", 100) == 7  # no float rounding down to 6
    check_removals(300, 10_000, "5%", "cancel")
    check_removals(0, 0, "5%", "delete")
    with pytest.raises(RemovalsRefused) as info:
        check_removals(2_000, 10_000, "5%", "delete")
    text = str(info.value)
    assert "delete 2000 memberships (20.0% of 10000)" in text and "max_removals='5%' allows (500)" in text
    assert "nothing was changed" in text
