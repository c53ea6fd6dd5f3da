"""Source rows to Mews memberships: every normalization rule of issue 3, as pure unit tests.

No Airflow, no HTTP: ``plan_columns`` + ``normalize`` (and ``build_batch`` for the rejection
reasons) are pure functions. What the sandbox accepts is checked end to end in test_operator.py.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import pendulum
import pytest

from airflow_provider_mews.loyalty.batches import build_batch
from airflow_provider_mews.loyalty.normalize import RowRejected, normalize, plan_columns

ACCOUNT = "fadd5bb6-b428-45d5-94f8-fd0d89fece6d"
PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
TIER = "69eedfd2-6f25-42fc-b3c8-39df70f85e37"
BASE = {"AccountId": ACCOUNT, "LoyaltyProgramId": PROGRAM, "IsPrimary": True}


def norm(**fields):
    """Normalize one row given as Mews-named columns (required ones defaulted)."""
    row = {**BASE, **fields}
    plan = plan_columns(list(row))
    return normalize(plan, list(row.values()))


def rejected(**fields) -> RowRejected:
    with pytest.raises(RowRejected) as info:
        norm(**fields)
    return info.value


# -- column matching --


@pytest.mark.parametrize("name", ["AccountId", "account_id", "ACCOUNTID", "Account_ID", "accountid"])
def test_column_names_match_case_and_underscore_insensitively(name):
    plan = plan_columns([name, "loyalty_program_id", "IS_PRIMARY"])
    assert [(pos, field) for pos, field, _ in plan.columns] == [
        (0, "AccountId"),
        (1, "LoyaltyProgramId"),
        (2, "IsPrimary"),
    ]
    assert normalize(plan, [ACCOUNT.upper(), PROGRAM, 1]) == BASE


def test_all_fields_match_by_snake_case_name():
    names = [
        "account_id", "loyalty_program_id", "is_primary", "state", "code", "points",
        "expiration_date", "url", "loyalty_tier_id",
    ]  # fmt: skip
    plan = plan_columns(names)
    assert [f for _, f, _ in plan.columns] == [
        "AccountId", "LoyaltyProgramId", "IsPrimary", "State", "Code", "Points",
        "ExpirationDate", "Url", "LoyaltyTierId",
    ]  # fmt: skip
    assert plan.ignored == ()


def test_field_map_covers_names_that_do_not_match():
    plan = plan_columns(
        ["member_uuid", "program", "primary_flag", "tier"],
        {
            "member_uuid": "AccountId",
            "program": "loyalty_program_id",
            "primary_flag": "IsPrimary",
            "tier": "LoyaltyTierId",
        },
    )
    assert normalize(plan, [ACCOUNT, PROGRAM, "yes", TIER]) == {**BASE, "LoyaltyTierId": TIER}


def test_field_map_wins_over_a_matching_name():
    # "account_id" would match AccountId by name; the map sends it to LoyaltyTierId instead.
    plan = plan_columns(
        ["account_id", "legacy_account", "loyalty_program_id", "is_primary"],
        {"legacy_account": "AccountId", "account_id": "LoyaltyTierId"},
    )
    assert normalize(plan, [TIER, ACCOUNT, PROGRAM, 0]) == {**BASE, "IsPrimary": False, "LoyaltyTierId": TIER}


def test_field_map_errors_are_configuration_errors():
    with pytest.raises(ValueError, match=r"not a Mews field; use one of AccountId, .*, LoyaltyTierId$"):
        plan_columns(["account_id", "loyalty_program_id", "is_primary", "x"], {"x": "Nickname"})
    with pytest.raises(ValueError, match="does not have"):
        plan_columns(["account_id", "loyalty_program_id", "is_primary"], {"missing_col": "Code"})
    with pytest.raises(ValueError, match="both map to Mews field AccountId"):
        plan_columns(["account_id", "AccountId", "loyalty_program_id", "is_primary"])
    with pytest.raises(ValueError, match="IsPrimary"):
        plan_columns(["account_id", "loyalty_program_id"])


@pytest.mark.parametrize("name", ["MembershipNumber", "membership_number", "MEMBERSHIPNUMBER"])
def test_membership_number_is_a_synonym_of_code(name):
    plan = plan_columns(["account_id", "loyalty_program_id", "is_primary", name])
    out = normalize(plan, [ACCOUNT, PROGRAM, True, "MBR-1"])
    assert out == {**BASE, "Code": "MBR-1"}
    assert "MembershipNumber" not in out
    mapped = plan_columns(
        ["a", "loyalty_program_id", "is_primary", "m"], {"a": "AccountId", "m": "MembershipNumber"}
    )
    assert normalize(mapped, [ACCOUNT, PROGRAM, True, "MBR-2"])["Code"] == "MBR-2"


def test_unmapped_columns_are_listed_and_never_in_the_membership():
    names = ["member_id", "account_id", "email", "loyalty_program_id", "is_primary", "Notes"]
    plan = plan_columns(names)
    assert plan.ignored == ("member_id", "email", "Notes")
    out = normalize(plan, [17, ACCOUNT, "a@example.com", PROGRAM, True, "vip"])
    assert out == BASE


# -- values --


def test_uuids_from_objects_bytes_and_strings_in_any_case():
    u = uuid.UUID(ACCOUNT)
    assert norm(AccountId=u)["AccountId"] == ACCOUNT
    assert norm(AccountId=ACCOUNT.upper())["AccountId"] == ACCOUNT
    assert norm(AccountId=f" {ACCOUNT} ")["AccountId"] == ACCOUNT
    assert norm(AccountId=u.hex)["AccountId"] == ACCOUNT
    assert norm(AccountId=u.bytes)["AccountId"] == ACCOUNT
    assert norm(LoyaltyProgramId=uuid.UUID(PROGRAM))["LoyaltyProgramId"] == PROGRAM
    assert norm(LoyaltyTierId=TIER.upper())["LoyaltyTierId"] == TIER
    for bad in ("not-a-uuid", ACCOUNT[:-1], 12345):
        assert rejected(AccountId=bad).field == "AccountId"
    assert rejected(LoyaltyTierId="gold").field == "LoyaltyTierId"


@pytest.mark.parametrize(
    "value, expected",
    [
        (True, True), (False, False), (1, True), (0, False), (decimal.Decimal(1), True), (1.0, True),
        ("true", True), ("FALSE", False), ("Yes", True), ("no", False), ("1", True), ("0", False),
        (" TRUE ", True),
    ],
)  # fmt: skip
def test_booleans_from_bools_numbers_and_words(value, expected):
    assert norm(IsPrimary=value)["IsPrimary"] is expected


@pytest.mark.parametrize("value", ["maybe", 2, -1, "2", 0.5, "oui"])
def test_other_boolean_values_are_rejected(value):
    assert rejected(IsPrimary=value).field == "IsPrimary"


def test_state_is_case_insensitive_to_the_enum():
    for value, expected in (
        ("enrolled", "Enrolled"),
        ("PENDING", "Pending"),
        ("New", "New"),
        (" canceled", "Canceled"),
    ):
        assert norm(State=value)["State"] == expected
    for bad in ("Gold", "Active", 1):
        assert rejected(State=bad).field == "State"


def test_points_from_int_decimal_and_integer_strings_within_int32():
    assert norm(Points=42)["Points"] == 42
    assert norm(Points=decimal.Decimal("7"))["Points"] == 7
    assert norm(Points=decimal.Decimal("12.000"))["Points"] == 12
    assert norm(Points="  120 ")["Points"] == 120
    assert norm(Points="-5")["Points"] == -5
    assert norm(Points=0)["Points"] == 0
    assert norm(Points=2**31 - 1)["Points"] == 2**31 - 1
    assert norm(Points=-(2**31))["Points"] == -(2**31)
    assert type(norm(Points=decimal.Decimal("7"))["Points"]) is int


@pytest.mark.parametrize(
    "value",
    [12.5, decimal.Decimal("12.5"), "12.5", 2**31, -(2**31) - 1, str(2**31), True, False, "1e3", "ten",
     decimal.Decimal("NaN"), float("inf")],
)  # fmt: skip
def test_points_rejections(value):
    err = rejected(Points=value)
    assert err.field == "Points"


def test_expiration_date_from_dates_datetimes_in_any_zone_and_iso_strings():
    def exp(value):
        return norm(ExpirationDate=value)["ExpirationDate"]

    assert exp(dt.date(2029, 12, 24)) == "2029-12-24"
    assert exp(dt.datetime(2029, 12, 24, 23, 30)) == "2029-12-24"  # naive: taken as UTC
    minus5 = dt.timezone(dt.timedelta(hours=-5))
    assert exp(dt.datetime(2029, 12, 24, 23, 30, tzinfo=minus5)) == "2029-12-25"
    assert exp(pendulum.datetime(2029, 12, 25, 0, 30, tz="Europe/Prague")) == "2029-12-24"
    assert exp(dt.datetime(2029, 12, 24, 10, tzinfo=dt.timezone.utc)) == "2029-12-24"
    assert exp("2029-12-24") == "2029-12-24"
    assert exp(" 2029-12-24 ") == "2029-12-24"
    assert exp("2029-12-24T10:00:00Z") == "2029-12-24"
    assert exp("2029-12-24T23:30:00-05:00") == "2029-12-25"
    assert exp("2029-12-25T00:30:00+01:00") == "2029-12-24"
    assert exp("2029-12-24 10:00") == "2029-12-24"


@pytest.mark.parametrize(
    "value",
    ["next year", "2029-02-30", "10:00", "T10:00", "01/02/2029", "24.12.2029", "1 Jan 2030", "P1Y", 20291224],
)
def test_expiration_dates_that_are_not_iso_dates_are_rejected(value):
    # A time alone is not a date, and 01/02/2029 means February in Europe and January in the US.
    assert rejected(ExpirationDate=value).field == "ExpirationDate"


def test_url_must_be_absolute():
    assert norm(Url="https://rewards.example.com/m/1")["Url"] == "https://rewards.example.com/m/1"
    assert norm(Url=" http://x.example/a?b=1 ")["Url"] == "http://x.example/a?b=1"
    for bad in (
        "/relative/path",
        "rewards.example.com/m/1",
        "mailto:a@example.com",
        "https://exa mple.com/x",
        42,
    ):
        assert rejected(Url=bad).field == "Url"


def test_code_at_most_255_characters():
    assert norm(Code="C" * 255)["Code"] == "C" * 255
    assert norm(Code=1234)["Code"] == "1234"
    err = rejected(Code="C" * 256)
    assert err.field == "Code" and "256" in str(err) and "255" in str(err)
    assert rejected(MembershipNumber="M" * 300).field == "Code"
    assert rejected(Code=True).field == "Code"


@pytest.mark.parametrize("empty", [None, ""])
def test_null_and_empty_mean_absent_for_optional_fields(empty):
    row = {
        **BASE,
        "State": empty, "Code": empty, "Points": empty, "ExpirationDate": empty,
        "Url": empty, "LoyaltyTierId": empty,
    }  # fmt: skip
    plan = plan_columns(list(row))
    assert normalize(plan, list(row.values())) == BASE


@pytest.mark.parametrize("field", ["AccountId", "LoyaltyProgramId", "IsPrimary"])
@pytest.mark.parametrize("empty", [None, ""])
def test_null_and_empty_are_rejected_for_required_fields(field, empty):
    err = rejected(**{field: empty})
    assert err.field == field
    assert "required" in str(err)


def test_a_valid_row_becomes_exactly_the_mews_object():
    row = {
        "Account_Id": uuid.UUID(ACCOUNT), "loyalty_program_id": PROGRAM.upper(), "is_primary": "no",
        "state": "enrolled", "membership_number": "MBR-1", "points": decimal.Decimal("120"),
        "expiration_date": dt.date(2029, 12, 24), "url": "https://rewards.example.com/m/1",
        "loyalty_tier_id": TIER, "email": "a@example.com",
    }  # fmt: skip
    plan = plan_columns(list(row))
    assert normalize(plan, list(row.values())) == {
        "AccountId": ACCOUNT, "LoyaltyProgramId": PROGRAM, "IsPrimary": False, "State": "Enrolled",
        "Code": "MBR-1", "Points": 120, "ExpirationDate": "2029-12-24",
        "Url": "https://rewards.example.com/m/1", "LoyaltyTierId": TIER,
    }  # fmt: skip


# -- the rejection names the field and the row --


def test_rejections_name_the_field_the_row_position_and_the_account():
    names = ["account_id", "loyalty_program_id", "is_primary", "points", "email"]
    plan = plan_columns(names)
    rows = [
        (ACCOUNT, PROGRAM, 1, 10, "ok@example.com"),
        ("0b9f2a4e-0d7c-4c55-9f49-2b0f6c1c8a11", PROGRAM, 1, "12.5", "bad-points@example.com"),
        (None, PROGRAM, 1, 10, "no-account@example.com"),
        ("not-a-uuid", PROGRAM, "maybe", 10, "x@example.com"),
    ]
    batch = build_batch(0, 101, plan, rows, keep_row_json=True)
    assert [m["AccountId"] for m in batch.items] == [ACCOUNT]
    assert batch.item_rows == [101]
    by_row = {r.source_row: r for r in batch.rejected}
    assert set(by_row) == {102, 103, 104}

    points = by_row[102]
    assert points.field == "Points"
    assert points.account_id == "0b9f2a4e-0d7c-4c55-9f49-2b0f6c1c8a11"
    assert points.reason.startswith("row 102 (AccountId 0b9f2a4e-0d7c-4c55-9f49-2b0f6c1c8a11): Points:")
    assert "12.5" in points.reason
    assert "bad-points@example.com" in points.row_json  # the whole source row, to fix and replay

    no_account = by_row[103]
    assert no_account.field == "AccountId" and no_account.account_id is None
    assert no_account.reason.startswith("row 103: AccountId:")

    # The first field at fault is named; an unreadable AccountId is still shown as written.
    bad_account = by_row[104]
    assert bad_account.field == "AccountId"
    assert bad_account.reason.startswith("row 104 (AccountId not-a-uuid): AccountId:")


def _exact(result):
    if isinstance(result, RowRejected):
        return ("rejected", result.field, str(result))
    return [(k, type(v).__name__, v) for k, v in result.items()]


def _per_row(plan, rows):
    out = []
    for values in rows:
        try:
            out.append(_exact(normalize(plan, values)))
        except RowRejected as exc:
            out.append(_exact(exc))
    return out


@pytest.mark.parametrize("size", [1, 9, 1000])
def test_a_batch_normalizes_exactly_as_its_rows_on_every_fast_path(size):
    """Clean columns take the one-call paths (UUID regex, Code, Url, int Points, repeated values)."""
    from airflow_provider_mews.loyalty.normalize import normalize_many
    from airflow_provider_mews.testing import sample_data

    plan = plan_columns(sample_data.COLUMNS, {"tier_id": "LoyaltyTierId"})
    rows = [list(r) for r in sample_data.members(size)]
    for r in rows[::2]:
        r[1] = r[1].upper()  # upper-case AccountIds: lowered on the fast path
    got = [_exact(r) for r in normalize_many(plan, [tuple(r) for r in rows])]
    assert got == _per_row(plan, rows)
    assert all(item[0] != "rejected" for item in got)


@pytest.mark.parametrize(
    "column, value",
    [
        ("account_id", "not-a-uuid"),
        ("account_id", None),
        ("account_id", "3FA85F64-5717-4562-B3FC-2C963F66AFA6\n3fa85f64-5717-4562-b3fc-2c963f66afa6"),
        ("account_id", "3fa85f64-5717-4562-b3fc-2c963f66afag"),
        ("account_id", "3fa85f64x5717-4562-b3fc-2c963f66afa6"),
        ("account_id", "\uff13fa85f64-5717-4562-b3fc-2c963f66afa6"),
        ("account_id", "3fa85f64-5717-4562-b3fc-2c963f66afa"),
        ("loyalty_program_id", ""),
        ("is_primary", "maybe"),
        ("is_primary", True),
        ("is_primary", 2),
        ("state", "Gold"),
        ("membership_number", "x" * 256),
        ("membership_number", "\ud800"),
        ("membership_number", 12),
        ("points", 2**31),
        ("points", True),
        ("points", "12.5"),
        ("expiration_date", "next year"),
        ("url", "/relative/path"),
        ("url", " https://example.com/a "),
        ("url", "https://example.com/a\nhttps://example.com/b"),
        ("url", "https://exämple.com/"),
        ("tier_id", uuid.UUID(int=5)),
    ],
)
def test_a_batch_with_one_odd_value_normalizes_exactly_as_its_rows(column, value):
    """One value off the fast path sends its row through normalize: same result, same reason."""
    from airflow_provider_mews.loyalty.normalize import normalize_many
    from airflow_provider_mews.testing import sample_data

    plan = plan_columns(sample_data.COLUMNS, {"tier_id": "LoyaltyTierId"})
    rows = [list(r) for r in sample_data.members(40)]
    rows[17][sample_data.COLUMNS.index(column)] = value
    got = [_exact(r) for r in normalize_many(plan, [tuple(r) for r in rows])]
    assert got == _per_row(plan, rows)


def test_a_uuid_split_across_two_rows_is_not_taken_for_two_uuids():
    """The column check concatenates the UUIDs: one 35 and one 37 characters long still join into
    valid UUIDs, yet both rows are rejected, as ``normalize`` rejects them."""
    from airflow_provider_mews.loyalty.normalize import normalize_many
    from airflow_provider_mews.testing import sample_data

    plan = plan_columns(sample_data.COLUMNS, {"tier_id": "LoyaltyTierId"})
    rows = [list(r) for r in sample_data.members(20)]
    col = sample_data.COLUMNS.index("account_id")
    rows[5][col], rows[6][col] = rows[5][col][:-1], rows[5][col][-1] + rows[6][col]
    got = [_exact(r) for r in normalize_many(plan, [tuple(r) for r in rows])]
    assert got == _per_row(plan, rows)
    assert [g[1] for g in got if g[0] == "rejected"] == ["AccountId", "AccountId"]


def test_the_unrolled_url_pattern_accepts_exactly_the_rfc_3986_alternation():
    """``_URL_RE`` is written unrolled for speed; it must accept exactly the strings of the plain
    "(?:[chars]|%XX)*" form of the same grammar (kept here as the reference)."""
    import random
    import re

    from airflow_provider_mews.loyalty.normalize import _URL_RE

    part = r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*"
    reference = re.compile(
        rf"[A-Za-z][A-Za-z0-9+.\-]*://(?:[A-Za-z0-9\-._~!$&'()*+,;=:@\[\]]|%[0-9A-Fa-f]{{2}})+"
        rf"(?:[/?]{part})?(?:#{part})?"
    )
    rng = random.Random(3)
    pieces = [
        "https://",
        "h://",
        "%2F",
        "%4",
        "%",
        "#",
        "?",
        "/",
        "a",
        "x.y",
        "[::1]",
        "@",
        " ",
        "é",
        '"',
        "9",
    ]
    accepted = 0
    for _ in range(50_000):
        text = rng.choice(["", "https://"]) + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        expected = reference.fullmatch(text) is not None
        assert (_URL_RE.fullmatch(text) is not None) == expected, text
        accepted += expected
    assert 2_000 < accepted < 48_000  # both kinds were met
