"""Source rows to Mews ``LoyaltyMembershipAddParameters``: pure functions, no I/O.

A warehouse row arrives with whatever column names and types its database has. Here it
becomes exactly the JSON object the Mews contract accepts, or a :class:`RowRejected`
naming the field and saying how to fix it. Nothing else can come out, so nothing invalid
is ever sent and no unknown field reaches Mews.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pendulum

#: Mews fields of a membership to add, in the order they are documented.
MEWS_FIELDS = (
    "AccountId",
    "LoyaltyProgramId",
    "IsPrimary",
    "State",
    "Code",
    "Points",
    "ExpirationDate",
    "Url",
    "LoyaltyTierId",
)
REQUIRED_FIELDS = ("AccountId", "LoyaltyProgramId", "IsPrimary")
STATES = ("New", "Pending", "Enrolled", "Canceled", "Declined")
#: Source names that mean a Mews field under another name (MembershipNumber replaced Code).
SYNONYMS = {"membershipnumber": "Code"}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
CODE_MAX = 255

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
#: An absolute URL as RFC 3986 (the schema's ``format: uri``) allows it: scheme, "//" and a host,
#: then only URI characters, "%" only as a %XX escape. Checked without ``urlsplit``, which costs
#: more than all other fields of a row together. Each "(?:[chars]|%XX)*" is written unrolled,
#: "[chars]*(?:%XX[chars]*)*": the same strings, matched a run of characters per step.
_PCT = r"%[0-9A-Fa-f]{2}"
_HOST_CHARS = r"[A-Za-z0-9\-._~!$&'()*+,;=:@\[\]]"
_PART_CHARS = r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?]"
_URI_PART = rf"{_PART_CHARS}*(?:{_PCT}{_PART_CHARS}*)*"
_URL_RE = re.compile(
    rf"[A-Za-z][A-Za-z0-9+.\-]*://(?:{_HOST_CHARS}|{_PCT}){_HOST_CHARS}*(?:{_PCT}{_HOST_CHARS}*)*"
    rf"(?:[/?]{_URI_PART})?(?:#{_URI_PART})?"
)
#: Every ASCII character: ``quote`` with these safe percent-encodes only non-ASCII ones.
_ASCII = "".join(map(chr, range(128)))
_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})
_STATE_BY_KEY = {s.lower(): s for s in STATES}
_FIELD_BY_KEY = {f.lower(): f for f in MEWS_FIELDS}


class RowRejected(ValueError):
    """A row that cannot become a valid membership. ``field`` is the Mews field at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _key(name: str) -> str:
    return name.replace("_", "").replace(" ", "").replace("-", "").lower()


@dataclass(frozen=True)
class ColumnPlan:
    """Which source column feeds which Mews field; built once per column layout."""

    #: (position in the source row, Mews field, normalizer) for every used column.
    columns: tuple[tuple[int, str, Callable[[Any], Any]], ...]
    ignored: tuple[str, ...]
    names: tuple[str, ...]

    def position_of(self, field: str) -> int | None:
        for pos, name, _ in self.columns:
            if name == field:
                return pos
        return None


def plan_columns(
    names: Sequence[str], field_map: Mapping[str, str] | None = None, also: Sequence[str] = ()
) -> ColumnPlan:
    """Match source column names to Mews fields (case/underscore-insensitive, then ``field_map``).

    Raises ``ValueError`` for a configuration that can only be fixed by the user: a
    ``field_map`` target that is not a Mews field, two columns feeding one field, or a
    required field that no column provides. ``also``: further targets the caller takes out of
    ``field_map`` itself (a sync's Id columns), named in the message listing the valid targets.
    """
    explicit: dict[str, str] = {}
    for source, target in (field_map or {}).items():
        field = _FIELD_BY_KEY.get(_key(target)) or SYNONYMS.get(_key(target))
        if field is None:
            raise ValueError(
                f"field_map[{source!r}] = {target!r} is not a Mews field; use one of {', '.join((*MEWS_FIELDS, *also))}"
            )
        explicit[source] = field
    lowered_names = {n.lower(): n for n in names}
    for source in explicit:
        if source not in names and source.lower() not in lowered_names:
            raise ValueError(
                f"field_map names column {source!r}, which the source does not have "
                f"(columns: {', '.join(names)})"
            )
    explicit_lower = {s.lower(): f for s, f in explicit.items()}
    used: dict[str, str] = {}
    columns: list[tuple[int, str, Callable[[Any], Any]]] = []
    ignored: list[str] = []
    for pos, name in enumerate(names):
        field = explicit_lower.get(name.lower())
        if field is None:
            field = _FIELD_BY_KEY.get(_key(name)) or SYNONYMS.get(_key(name))
        if field is None:
            ignored.append(name)
            continue
        if field in used:
            raise ValueError(
                f"columns {used[field]!r} and {name!r} both map to Mews field {field}; "
                "drop one from the query or map one elsewhere with field_map"
            )
        used[field] = name
        columns.append((pos, field, NORMALIZERS[field]))
    missing = [f for f in REQUIRED_FIELDS if f not in used]
    if missing:
        raise ValueError(
            f"no source column provides the required Mews field(s) {', '.join(missing)} "
            f"(columns: {', '.join(names) or 'none'}); rename the columns or set field_map"
        )
    return ColumnPlan(tuple(columns), tuple(ignored), tuple(names))


def normalize(plan: ColumnPlan, values: Sequence[Any]) -> dict[str, Any]:
    """One source row (values in ``plan.names`` order) to a Mews membership, or RowRejected."""
    out: dict[str, Any] = {}
    for pos, field, fn in plan.columns:
        value = values[pos]
        if value is None or value == "":
            if field in REQUIRED_FIELDS:
                raise RowRejected(field, "is required but empty")
            continue
        try:
            out[field] = fn(value)
        except RowRejected:
            raise
        except (ValueError, TypeError, ArithmeticError, OverflowError) as exc:
            raise RowRejected(field, f"{_show(value)} is not valid ({exc})") from None
    return out


# -- a whole batch at once: the same results as ``normalize`` per row, a column at a time --

_ABSENT: Any = object()  # None or "": the field is left out
_SLOW: Any = object()  # not certain on the fast path: the row goes through ``normalize``
_NONE_TYPE = type(None)
_URL_LINES_RE = re.compile(rf"(?:{_URL_RE.pattern}\n)*{_URL_RE.pattern}")
_UUID_FIELDS = frozenset({"AccountId", "LoyaltyProgramId", "LoyaltyTierId"})
#: Lowercase hex digits to "x", uppercase ones to "X", "-" kept, any other byte to "?": a column
#: of UUIDs, concatenated and translated, is this shape repeated (one C call per column).
_UUID_SHAPE_TABLE = bytes(
    ord("x") if chr(b) in "0123456789abcdef" else ord("X") if chr(b) in "ABCDEF" else
    ord("-") if b == ord("-") else ord("?")
    for b in range(256)
)  # fmt: skip
_UUID_SHAPE = b"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"


def normalize_many(plan: ColumnPlan, rows: Sequence[Sequence[Any]]) -> list[dict[str, Any] | RowRejected]:
    """``normalize`` for every row: each row's membership, or the RowRejected ``normalize`` raises.

    Per column instead of per cell: a column of UUID strings is checked with one regex call,
    repeated values (program, state, dates, flags) are normalized once per batch, and integer
    points are range-checked with min/max. Any value the fast path is not certain of sends its
    row through ``normalize``, so results and reasons are exactly the per-row ones.
    """
    if not rows or not plan.columns:
        return [_normalize_or_reason(plan, r) for r in rows]
    width = len(rows[0])
    if max(pos for pos, _, _ in plan.columns) >= width or any(len(r) != width for r in rows):
        return [_normalize_or_reason(plan, r) for r in rows]
    columns = list(zip(*rows, strict=True))
    fields: list[str] = []
    values: list[Sequence[Any]] = []
    slow: set[int] = set()
    absent: list[tuple[str, list[int]]] = []
    for pos, field, fn in plan.columns:
        out, gaps, bad = _column(field, fn, columns[pos])
        fields.append(field)
        values.append(out)
        if bad:
            slow.update(i for i, v in enumerate(out) if v is _SLOW)
        if gaps:
            where = [i for i, v in enumerate(out) if v is _ABSENT]
            if field in REQUIRED_FIELDS:
                slow.update(where)
            else:
                absent.append((field, where))
    items: list[Any] = list(map(_dict_maker(tuple(fields)), *values))
    for field, where in absent:
        for i in where:
            del items[i][field]
    for i in slow:
        items[i] = _normalize_or_reason(plan, rows[i])
    return items


@functools.lru_cache(maxsize=64)
def _dict_maker(fields: tuple[str, ...]) -> Callable[..., dict[str, Any]]:
    """``lambda a0, a1, ...: {"AccountId": a0, ...}``: a dict display builds a row twice as fast as
    ``dict(zip(...))``. Only Mews field names (constants of this module) ever reach the source."""
    assert all(f in MEWS_FIELDS for f in fields)
    args = ", ".join(f"a{i}" for i in range(len(fields)))
    pairs = ", ".join(f"{f!r}: a{i}" for i, f in enumerate(fields))
    return eval(f"lambda {args}: {{{pairs}}}")  # type: ignore[no-any-return]


def _normalize_or_reason(plan: ColumnPlan, values: Sequence[Any]) -> dict[str, Any] | RowRejected:
    try:
        return normalize(plan, values)
    except RowRejected as exc:
        return exc


def _column(field: str, fn: Callable[[Any], Any], column: Sequence[Any]) -> tuple[Sequence[Any], bool, bool]:
    """One column normalized: (values with ``_ABSENT``/``_SLOW`` markers, any absent, any slow)."""
    types = set(map(type, column))
    if types == {str}:
        if field in _UUID_FIELDS and len(column) > 8:
            uuids = _uuid_column(column)
            if uuids is not None:
                return uuids, False, False
        elif field == "Code":
            if "".join(column).isascii() and max(map(len, column)) <= CODE_MAX and "" not in column:
                return column, False, False
        elif field == "Url":
            joined = "\n".join(column)
            if _URL_LINES_RE.fullmatch(joined) and joined.count("\n") == len(column) - 1:
                return column, False, False
    elif types == {int} and field == "Points":
        if min(column) >= INT32_MIN and max(column) <= INT32_MAX:
            return column, False, False
    elif field == "Url" and types == {str, _NONE_TYPE}:
        present = [v for v in column if v is not None]
        joined = "\n".join(present)
        if _URL_LINES_RE.fullmatch(joined) and joined.count("\n") == len(present) - 1:
            return [_ABSENT if v is None else v for v in column], True, False
    types.discard(_NONE_TYPE)
    if len(types) <= 1 and types <= {str, int}:
        # Equal values of one type (str or int, never bool) normalize alike: once per distinct value.
        memo = {v: _one(fn, v) for v in set(column)}
        results: Iterable[Any] = memo.values()
        out: Sequence[Any] = [memo[v] for v in column]
    else:
        out = results = [_one(fn, v) for v in column]
    return out, any(r is _ABSENT for r in results), any(r is _SLOW for r in results)


def _uuid_column(column: Sequence[str]) -> Sequence[str] | None:
    """The column in lowercase when every string is a UUID in its 8-4-4-4-12 hex form
    (``_UUID_RE``); None when any is not (those rows take the per-value path)."""
    if set(map(len, column)) != {36}:
        return None
    joined = "".join(column)
    if not joined.isascii():
        return None
    shape = joined.encode().translate(_UUID_SHAPE_TABLE)
    expected = _UUID_SHAPE * len(column)
    if shape == expected:
        return column
    if shape.replace(b"X", b"x") == expected:
        return [v.lower() for v in column]
    return None


def _one(fn: Callable[[Any], Any], value: Any) -> Any:
    if value is None or value == "":
        return _ABSENT
    try:
        return fn(value)
    except Exception:  # normalize says which field and why, or raises what it raises
        return _SLOW


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- one normalizer per field: value (not None/"") -> JSON value, or raise RowRejected --


def to_uuid(field: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if isinstance(value, RowRejected):  # a name that gave no Id (loyalty.names): its reason
            raise value
        if isinstance(value, str):
            if _UUID_RE.fullmatch(value):
                return value.lower()
            try:
                return str(uuid.UUID(value.strip()))
            except ValueError:
                pass
        elif isinstance(value, uuid.UUID):
            return str(value)
        elif isinstance(value, bytes) and len(value) == 16:
            return str(uuid.UUID(bytes=value))
        raise RowRejected(field, f"{_show(value)} is not a UUID (like 3fa85f64-5717-4562-b3fc-2c963f66afa6)")

    return convert


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, decimal.Decimal)) and value in (0, 1):
        return bool(value)
    if isinstance(value, float) and value in (0.0, 1.0):
        return bool(value)
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _TRUE:
            return True
        if key in _FALSE:
            return False
    raise RowRejected("IsPrimary", f"{_show(value)} is not a boolean (use true/false, 1/0 or yes/no)")


def to_state(value: Any) -> str:
    if isinstance(value, str):
        state = _STATE_BY_KEY.get(value.strip().lower())
        if state is not None:
            return state
    raise RowRejected("State", f"{_show(value)} is not one of {', '.join(STATES)}")


def to_points(value: Any) -> int:
    if isinstance(value, bool):
        raise RowRejected("Points", f"{_show(value)} is a boolean, not a number of points")
    if isinstance(value, int):
        number = value
    elif isinstance(value, decimal.Decimal):
        if not value.is_finite() or value != value.to_integral_value():
            raise RowRejected("Points", f"{_show(value)} is not a whole number")
        number = int(value)
    elif isinstance(value, float):
        if not value.is_integer():
            raise RowRejected("Points", f"{_show(value)} is not a whole number")
        number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not (text.lstrip("+-").isdigit() and text.isascii()):
            raise RowRejected("Points", f"{_show(value)} is not a whole number")
        number = int(text)
    else:
        raise RowRejected("Points", f"{_show(value)} is not a whole number")
    if not INT32_MIN <= number <= INT32_MAX:
        raise RowRejected("Points", f"{number} is outside the 32-bit integer range")
    return number


def to_expiration(value: Any) -> str:
    """A date (or datetime in any zone, converted to UTC) as ``YYYY-MM-DD``: the add schema's
    ``format: date`` (answers carry a UTC-midnight date-time; nothing here reads them)."""
    day: dt.date
    if isinstance(value, dt.datetime):
        moment = pendulum.instance(value) if value.tzinfo else pendulum.instance(value, tz="UTC")
        day = moment.in_timezone("UTC").date()
    elif isinstance(value, dt.date):
        day = value
    elif isinstance(value, str):
        text = value.strip()
        if len(text) == 10:
            try:
                return dt.date.fromisoformat(text).isoformat()
            except ValueError:
                pass
        try:
            # ISO 8601 only (strict): "01/02/2029" is February in Europe and January in the US;
            # exact: a time alone ("10:00") stays a Time and is refused instead of becoming today.
            parsed = pendulum.parse(text, strict=True, exact=True)
        except (ValueError, TypeError):
            raise RowRejected(
                "ExpirationDate", f"{_show(value)} is not an ISO 8601 date (like 2029-12-24)"
            ) from None
        if isinstance(parsed, pendulum.DateTime):
            if len(text) > 10:
                parsed = parsed.in_timezone("UTC")
            day = parsed.date()
        elif isinstance(parsed, pendulum.Date):
            day = parsed
        else:
            raise RowRejected("ExpirationDate", f"{_show(value)} is not a date")
    else:
        raise RowRejected("ExpirationDate", f"{_show(value)} is not a date")
    return day.isoformat()


def to_url(value: Any) -> str:
    if isinstance(value, str):
        text = value.strip()
        if not text.isascii():  # an IRI: its URI is the UTF-8 of non-ASCII characters, %-encoded (RFC 3987)
            try:
                text = quote(text, safe=_ASCII)
            except UnicodeEncodeError:
                raise RowRejected("Url", f"{_show(value)} has characters that are not valid text") from None
        if _URL_RE.fullmatch(text):
            return text
    raise RowRejected(
        "Url",
        f"{_show(value)} is not an absolute URL (like https://rewards.example.com/m/1; "
        "percent-encode spaces, quotes and brackets)",
    )


def to_code(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (int, decimal.Decimal)) and not isinstance(value, bool):
        text = str(value)
    else:
        raise RowRejected("Code", f"{_show(value)} is not a text code")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no JSON encoder of a request can send it
            raise RowRejected("Code", f"{_show(value)} contains characters that are not valid text") from None
    if len(text) > CODE_MAX:
        raise RowRejected("Code", f"is {len(text)} characters long; Mews accepts at most {CODE_MAX}")
    return text


NORMALIZERS: dict[str, Callable[[Any], Any]] = {
    "AccountId": to_uuid("AccountId"),
    "LoyaltyProgramId": to_uuid("LoyaltyProgramId"),
    "IsPrimary": to_bool,
    "State": to_state,
    "Code": to_code,
    "Points": to_points,
    "ExpirationDate": to_expiration,
    "Url": to_url,
    "LoyaltyTierId": to_uuid("LoyaltyTierId"),
}


def identity(membership: Mapping[str, Any]) -> tuple[str, str, str | None]:
    """What makes two memberships "the same" when reconciling: account, program, code."""
    return (
        membership["AccountId"].lower(),
        membership["LoyaltyProgramId"].lower(),
        membership.get("Code") or membership.get("MembershipNumber") or None,
    )


def readable_account(plan: ColumnPlan, values: Sequence[Any]) -> str | None:
    """The row's AccountId as text, for rejection reasons, when there is one."""
    pos = plan.position_of("AccountId")
    if pos is None:
        return None
    value = values[pos]
    return None if value is None or isinstance(value, RowRejected) else str(value)[:64]
