"""Fuzzed rows: the normalizer either builds a membership Mews's schema accepts or names the bad field.

Property-based (hypothesis) over arbitrary column names, ``field_map`` entries and values of
every type a database driver, an XCom or a template can produce. For every generated row:

* :func:`plan_columns` returns a plan or raises a plain ``ValueError`` (a configuration
  error the user must fix), nothing else;
* :func:`normalize` returns an object that validates against
  ``$defs/LoyaltyMembershipAddParameters`` of the published schema (Draft 2020-12 with a
  format checker; ``uri`` is checked against RFC 3986, which jsonschema cannot do without
  an optional package), that has only Mews fields and that the hook can send (JSON without
  NaN, UTF-8 encodable); or it raises :class:`RowRejected` naming a Mews field. Any other
  exception fails the test.

Example counts are modest so the file runs in seconds; the seed is derandomized so CI is
reproducible (``--hypothesis-seed`` explores further).
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re
import string
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from airflow_provider_mews.loyalty.normalize import (
    MEWS_FIELDS,
    REQUIRED_FIELDS,
    STATES,
    RowRejected,
    normalize,
    normalize_many,
    plan_columns,
)

# The published contract (tests/data holds a copy of ../shared/mews-api, checked by test_sandbox.py).
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "data" / "loyalty-memberships.schema.json"
DOCUMENT = json.loads(SCHEMA_PATH.read_text())

# RFC 3986 absolute URI: a scheme, then only URI characters, "%" only as a %XX escape, one "#".
_URI_RE = re.compile(
    r"[A-Za-z][A-Za-z0-9+.\-]*:(?:[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*"
    r"(?:#(?:[A-Za-z0-9\-._~:/?@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)?"
)


def _format_checker() -> FormatChecker:
    checker = FormatChecker()  # everything jsonschema can check with what is installed (uuid, date, ...)

    @checker.checks("uri")
    def is_uri(value: object) -> bool:
        return not isinstance(value, str) or _URI_RE.fullmatch(value) is not None

    return checker


VALIDATOR = Draft202012Validator(
    {"$defs": DOCUMENT["$defs"], "$ref": "#/$defs/LoyaltyMembershipAddParameters"},
    format_checker=_format_checker(),
)
EXPIRATION_RE = re.compile(r"\d{4}-\d{2}-\d{2}")

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies --------------------------------------------------------------------------------

# Any code point, with lone surrogates and control characters often (a JSON XCom can carry them).
any_char = st.one_of(
    st.characters(codec=None, exclude_categories=()),
    st.characters(categories=["Cs"]),  # lone surrogates: no UTF-8 request can carry them
    st.characters(categories=["Cc"]),
)
any_text = st.lists(any_char, max_size=40).map("".join)  # st.text() would drop the surrogates
# Text with at least one lone surrogate (what a JSON XCom with "\ud800" decodes to).
broken_text = st.tuples(st.text(max_size=8), st.characters(categories=["Cs"]), st.text(max_size=8)).map(
    "".join
)
any_value = st.one_of(
    st.none(),
    st.just(""),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**33), max_value=2**33),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    any_text,
    st.text(string.printable, max_size=20),
    st.binary(max_size=24),
    st.uuids(),
    st.dates(),
    st.datetimes(),
    st.datetimes(timezones=st.timezones()),
    st.times(),
    st.timedeltas(),
    st.complex_numbers(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.tuples(st.integers()),
)


def _cased(text: str) -> st.SearchStrategy[str]:
    return st.sampled_from([text, text.upper(), text.lower(), text.title(), f"  {text} ", f"\t{text}\n"])


# Values a warehouse, an XCom or a template produce for each field: VALID ones (in every
# shape the normalizer accepts) and EDGY ones (boundaries, near misses, garbage).
uuid_valid = st.one_of(
    st.uuids().map(str).flatmap(_cased),
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: u.urn),
    st.uuids().map(lambda u: u.bytes),
    st.uuids(),
)
uuid_edgy = st.one_of(
    st.uuids().map(lambda u: str(u)[:-1]),
    st.uuids().map(lambda u: str(u) + "0"),
    st.uuids().map(lambda u: str(u).replace("-", "_")),
    st.binary(min_size=15, max_size=17),
    st.from_regex(r"[0-9a-fA-FxXgG{}-]{30,40}", fullmatch=True),
)
bool_valid = st.one_of(
    st.sampled_from(["true", "false", "t", "f", "yes", "no", "y", "n", "1", "0"]).flatmap(_cased),
    st.sampled_from([0, 1, 0.0, 1.0, decimal.Decimal("1"), decimal.Decimal("0.0"), True, False]),
)
bool_edgy = st.sampled_from(
    ["maybe", "2", "-1", "tru", "on", 2, -1, 0.5, decimal.Decimal("NaN"), b"1", "\uff11"]
)
state_valid = st.sampled_from(STATES).flatmap(_cased)
state_edgy = st.sampled_from(["Gold", "Enroled", "Pending!", "", "NEW\x00", 1])
points_valid = st.one_of(
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.integers(min_value=-(2**31), max_value=2**31 - 1).flatmap(
        lambda n: st.sampled_from([str(n), f" +{n} " if n >= 0 else f" {n} ", decimal.Decimal(n), float(n)])
    ),
)
points_edgy = st.one_of(
    st.sampled_from([2**31, -(2**31) - 1, 10**400, "2147483648", "-2147483649", "12.5", "1e3", "--1", "+"]),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.from_regex(r"[+-]?[0-9\u0660-\u0669\uff10-\uff19]{1,12}", fullmatch=True),
    st.floats(),
)
# No zone can move these off the calendar; ISO 8601 offsets are whole minutes (isoformat would
# write the seconds of a historical local mean time, which no ISO parser reads).
SAFE_FROM, SAFE_TO = dt.datetime(1900, 1, 1), dt.datetime(2200, 1, 1)
minute_zones = st.integers(-14 * 60, 14 * 60).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
date_valid = st.one_of(
    st.dates(),
    st.datetimes(),
    st.datetimes(SAFE_FROM, SAFE_TO, timezones=st.timezones()),
    st.dates().map(dt.date.isoformat),
    st.datetimes(SAFE_FROM, SAFE_TO, timezones=minute_zones).map(dt.datetime.isoformat),
    st.datetimes(SAFE_FROM, SAFE_TO).map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ")),
)
date_edgy = st.one_of(
    st.datetimes(timezones=st.timezones()),  # year 1 or 9999 in a zone: off the calendar in UTC
    st.datetimes(timezones=st.timezones()).map(dt.datetime.isoformat),
    st.datetimes().map(lambda d: d.strftime("%Y-%m-%d %H:%M")),
    st.from_regex(r"\d{1,5}-\d{1,2}-\d{1,2}(T\d\d:\d\d(:\d\d)?(Z|[+-]\d\d:\d\d)?)?", fullmatch=True),
    st.sampled_from(
        ["next year", "2029-02-30", "2029-13-01", "0000-01-01", "9999-12-31T23:59:59-12:00", "P1Y"]
    ),
    st.times(),
)
url_valid = st.from_regex(
    r"https?://[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?(:[0-9]{1,5})?"
    r"(/([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-F]{2}){0,10}){0,3}(\?[A-Za-z0-9=&-]{0,10})?(#[a-z0-9]{0,5})?",
    fullmatch=True,
)
url_edgy = st.one_of(
    st.tuples(
        st.sampled_from(["https", "http", "HTTP", "mailto", "ftp", "x+y", "1http", ""]),
        st.sampled_from(["://", ":", ":///", "//"]),
        st.one_of(any_text, broken_text),
    ).map("".join),
    # A good URL with one character URLs do not allow, or a non-ASCII one (an IRI).
    st.tuples(
        url_valid, st.sampled_from([*' "<>\\^`{|}%#[]', "\x00", "\n", "é", "ü/", "€", "\U0001f600"])
    ).map("".join),
)
code_valid = st.one_of(
    st.text(max_size=255), st.integers(), st.decimals(allow_nan=False, allow_infinity=False)
)
code_edgy = st.one_of(st.text(min_size=250, max_size=300), any_text, broken_text, st.decimals(allow_nan=True))

VALID = {
    "AccountId": uuid_valid, "LoyaltyProgramId": uuid_valid, "LoyaltyTierId": uuid_valid,
    "IsPrimary": bool_valid, "State": state_valid, "Points": points_valid,
    "ExpirationDate": date_valid, "Url": url_valid, "Code": code_valid,
}  # fmt: skip
EDGY = {
    "AccountId": uuid_edgy, "LoyaltyProgramId": uuid_edgy, "LoyaltyTierId": uuid_edgy,
    "IsPrimary": bool_edgy, "State": state_edgy, "Points": points_edgy,
    "ExpirationDate": date_edgy, "Url": url_edgy, "Code": code_edgy,
}  # fmt: skip
SNAKE = {
    "AccountId": "account_id", "LoyaltyProgramId": "loyalty_program_id", "IsPrimary": "is_primary",
    "State": "state", "Code": "code", "Points": "points", "ExpirationDate": "expiration_date",
    "Url": "url", "LoyaltyTierId": "loyalty_tier_id",
}  # fmt: skip


def _name_variants(field: str) -> st.SearchStrategy[str]:
    snake = SNAKE[field]
    variants = [field, snake, snake.upper(), snake.replace("_", "-"), snake.replace("_", " ")]
    if field == "Code":
        variants += ["membership_number", "MembershipNumber"]
    return st.sampled_from(variants)


Row = tuple[list[Any], "str | None"]  # values, and the Mews field whose value was fuzzed (if any)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[str], dict[str, str], list[Row]]:
    """Column names, a field_map and a few rows: valid values except, mostly, one fuzzed column."""
    fields = [f for f in MEWS_FIELDS if f not in REQUIRED_FIELDS and draw(st.booleans())]
    if draw(st.integers(0, 19)) > 0:  # mostly: the required fields are there
        fields += REQUIRED_FIELDS
    fields = list(draw(st.permutations(fields)))
    names: list[str] = []
    field_map: dict[str, str] = {}
    columns: list[str | None] = []  # the Mews field a column is meant for (None: an extra column)
    for field in fields:
        if draw(st.integers(0, 7)) == 0:  # an arbitrary name mapped with field_map
            taken = {x.lower() for x in names}
            name = draw(
                st.text(min_size=1, max_size=12).filter(lambda n, taken=taken: n.lower() not in taken)
            )
            field_map[name] = draw(st.sampled_from([field, SNAKE[field], field.upper()]))
        else:
            name = draw(_name_variants(field))
        names.append(name)
        columns.append(field)
    for _ in range(draw(st.integers(0, 3))):  # extra columns with any name
        names.append(draw(any_text))
        columns.append(None)
    if draw(st.integers(0, 19)) == 0:  # a field_map naming a column the source lacks, or no Mews field
        taken = {x.lower() for x in names}
        missing = draw(any_text.filter(lambda n: n.lower() not in taken))
        field_map[missing] = draw(st.one_of(any_text, st.sampled_from(MEWS_FIELDS)))
    rows: list[Row] = []
    for _ in range(draw(st.integers(1, 3))):
        fuzzed = draw(st.sampled_from([None, None, *range(len(columns))]))  # usually one column fuzzed
        values = []
        for i, field in enumerate(columns):
            if field is None:
                values.append(draw(any_value))
            elif i == fuzzed:
                values.append(draw(st.one_of(EDGY[field], any_value)))
            else:
                values.append(draw(VALID[field]))
        rows.append((values, None if fuzzed is None else columns[fuzzed]))
    return names, field_map, rows


# -- the properties ----------------------------------------------------------------------------


def _check_membership(out: Any) -> None:
    assert isinstance(out, dict)
    assert set(out) <= set(MEWS_FIELDS), f"unknown field(s) {set(out) - set(MEWS_FIELDS)}"
    errors = sorted(VALIDATOR.iter_errors(out), key=str)
    assert not errors, f"{out!r} does not validate: {errors[0].message}"
    # What the hook sends: strict JSON (no NaN/Infinity) in UTF-8.
    json.dumps(out, ensure_ascii=False, allow_nan=False).encode("utf-8")
    if "ExpirationDate" in out:
        text = out["ExpirationDate"]
        assert EXPIRATION_RE.fullmatch(text), text
        dt.date.fromisoformat(text[:10])
    for field in ("AccountId", "LoyaltyProgramId", "LoyaltyTierId"):
        if field in out:
            assert str(uuid.UUID(out[field])) == out[field]  # canonical, lower case


def _check_row(names: list[str], field_map: dict[str, str], rows: list[Row]) -> str:
    """One letter per row: a(dded), r(ejected); or "c" for a configuration error."""
    try:
        plan = plan_columns(names, field_map)
    except RowRejected as exc:  # pragma: no cover - a row error raised for a configuration
        raise AssertionError(f"plan_columns raised RowRejected: {exc}") from exc
    except ValueError as exc:
        text = str(exc)
        assert "field_map" in text or "required Mews field" in text or "both map" in text, text
        return "c"
    assert {field for _, field, _ in plan.columns} <= set(MEWS_FIELDS)
    outcome = ""
    for values, fuzzed in rows:
        try:
            out = normalize(plan, values)
        except RowRejected as exc:
            # Only the fuzzed field can be at fault: every other value is valid.
            assert exc.field == fuzzed, f"{exc} (fuzzed: {fuzzed})"
            assert str(exc).startswith(f"{exc.field}: ") and exc.reason
            outcome += "r"
        else:
            _check_membership(out)
            outcome += "a"
    return outcome


@FUZZ
@given(layouts())
def test_any_row_becomes_a_valid_membership_or_names_the_bad_field(layout):
    _check_row(*layout)


@FUZZ
@given(st.lists(any_text, max_size=8), st.dictionaries(any_text, any_text, max_size=3))
def test_any_column_names_give_a_plan_or_a_configuration_error(names, field_map):
    try:
        plan = plan_columns(names, field_map)
    except RowRejected as exc:  # pragma: no cover
        raise AssertionError(f"plan_columns raised RowRejected: {exc}") from exc
    except ValueError:
        return
    assert {field for _, field, _ in plan.columns} <= set(MEWS_FIELDS)
    assert set(REQUIRED_FIELDS) <= {field for _, field, _ in plan.columns}


@FUZZ
@given(st.fixed_dictionaries({f: st.one_of(VALID[f], VALID[f], EDGY[f], any_value) for f in MEWS_FIELDS}))
def test_normalizing_a_normalized_membership_changes_nothing(values):
    plan = plan_columns(list(MEWS_FIELDS))
    try:
        first = normalize(plan, [values[f] for f in MEWS_FIELDS])
    except RowRejected:
        return
    _check_membership(first)
    again = normalize(plan, [first.get(f) for f in MEWS_FIELDS])
    assert again == first


def _exact(result: Any) -> Any:
    """A result with its types: 1 == True and 1.0 == 1 must not hide a difference."""
    if isinstance(result, RowRejected):
        return ("rejected", result.field, str(result))
    return [(k, type(v).__name__, v) for k, v in result.items()]


@FUZZ
@given(layouts(), st.integers(1, 12))
def test_a_batch_normalizes_exactly_as_each_of_its_rows(layout, copies):
    """normalize_many (a column at a time, with fast paths) == normalize row by row, reasons included."""
    names, field_map, rows = layout
    try:
        plan = plan_columns(names, field_map)
    except ValueError:
        return
    batch = [values for values, _ in rows] * copies  # >= 9 rows reach the one-regex column paths
    expected = []
    for values in batch:
        try:
            expected.append(_exact(normalize(plan, values)))
        except RowRejected as exc:
            expected.append(_exact(exc))
    assert [_exact(r) for r in normalize_many(plan, batch)] == expected


def test_the_fuzzer_reaches_both_outcomes():
    """Guard against a generator that only ever produces rejections (or only valid rows)."""
    seen: set[str] = set()

    @settings(max_examples=150, deadline=None, derandomize=True, database=None)
    @given(layouts())
    def collect(layout):
        seen.update(_check_row(*layout))

    collect()
    assert {"a", "r"} <= seen, seen


@pytest.mark.parametrize(
    "field, value",
    [
        ("Code", "\ud800 lone surrogate"),
        ("Url", "https://example.com/\x00"),
        ("Url", "https://example.com/a b"),
        ("Url", 'https://example.com/"quoted"'),
        ("Points", decimal.Decimal("NaN")),
        ("Points", float("inf")),
        ("ExpirationDate", "2029-02-30"),
    ],
)
def test_known_hostile_values_are_rejected_or_made_valid(field, value):
    """Values the fuzzer found (or that are worth pinning): never an invalid payload, never a crash."""
    names = ["AccountId", "LoyaltyProgramId", "IsPrimary", field]
    values = [str(uuid.uuid4()), str(uuid.uuid4()), True, value]
    assert _check_row(names, {}, [(values, field)]) in ("a", "r")


def test_the_validator_is_strict():
    """The checks above mean something: unknown fields, bad UUIDs and non-URIs are invalid."""
    good = {"AccountId": str(uuid.uuid4()), "LoyaltyProgramId": str(uuid.uuid4()), "IsPrimary": True}
    assert VALIDATOR.is_valid(good)
    for bad in (
        {**good, "Foo": 1},
        {**good, "AccountId": "not-a-uuid"},
        {**good, "Url": "https://example.com/a b"},
        {**good, "Points": 2**31},
        {k: v for k, v in good.items() if k != "IsPrimary"},
    ):
        assert not VALIDATOR.is_valid(bad), bad
