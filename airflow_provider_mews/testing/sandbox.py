"""A local stand-in for the Mews Connector API, faithful to ``loyaltyMemberships/add``, ``update``,
``delete`` and ``getAll``, and to the look-up reads ``customers/getAll``, ``loyaltyPrograms/getAll``
and ``loyaltyTiers/getAll`` (data seeded with ``add_customers``, ``add_loyalty_program``,
``seed_memberships`` or the ``--seed-*`` flags).

Reads: cursor = Id of the last record; pages follow insertion order (oldest stored first), so
records added while a client pages come at the end. Time filters are UTC, at most 3 calendar
months, and by default inclusive at both ends (see ``SandboxConfig.interval_end_inclusive``).
Without ``ActivityStates`` only active records are returned.

It is a real HTTP server on loopback: the demo, the tests and the benchmarks run against
it, and users run it (``mews-sandbox``, port 8780) to try their DAGs offline. It checks
tokens (401), validates every field as the published schema says (400, unknown fields
refused), enforces the sliding-window rate limit per AccessToken (429 + Retry-After),
always answers with a ``Request-Id`` header and JSON error bodies, and can inject the
faults that real networks and APIs produce. It shares no code with the provider it tests.

Admin endpoints (not part of Mews), for tests and demos:
``GET /_sandbox/memberships``, ``GET /_sandbox/stats``, ``GET /_sandbox/requests`` (the request
log: which operation, status and, for writes, what was sent), ``GET /_sandbox/timings`` (when
each API request arrived and was answered, and with what status), ``POST /_sandbox/config``,
``POST /_sandbox/reset``.

Where the contract is silent the sandbox picks the strict reading and says so (INFERRED):
an update or delete naming an unknown or deleted Id refuses the whole request with 400, so a
client that blindly repeats a delete that was already processed is caught; an update wrapper
without ``Value`` (``{}``) keeps the value; deleted memberships stay readable through
``ActivityStates: ["Deleted"]``.
"""

from __future__ import annotations

import argparse
import bisect
import calendar
import copy
import itertools
import json
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jsonschema import FormatChecker

#: The public demo pair from Mews's "Environments" guide: the sandbox accepts it by default.
DEMO_CLIENT_TOKEN = "E0D439EE522F44368DC78E1BFB03710C-D24FB11DBE31D4621C4817E028D9E1D"
DEMO_ACCESS_TOKEN = "C66EF7B239D24632943D115EDE9CB810-EA00F8FD8294692C940F6B5A8F9453D"
SANDBOX_CHAIN_ID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
SANDBOX_ENTERPRISE_ID = "851df8c8-90f2-4c4a-8e01-a4fc46b25178"
#: CreatorProfileId/UpdaterProfileId of the seeded customers.
SANDBOX_PROFILE_ID = "3cd637ef-4728-47f9-8fb1-afb900c9cdcf"
#: ``mews-sandbox``'s port: clear of Airflow's (8080 API server, 8793/8794 log servers, 8974
#: health check), Celery Flower's 5555, Redis's 6379, PostgreSQL's 5432 and Locust's 8089.
DEFAULT_PORT = 8780

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
#: RFC 3986 URI with an authority ("scheme://host..."): only the characters the RFC allows,
#: "%" only as a percent-encoding, brackets only around an IP literal host.
_URI = re.compile(
    r"^[A-Za-z][A-Za-z0-9+.\-]*://"
    r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:]|%[0-9A-Fa-f]{2})*@?"  # userinfo@ (or the host itself)
    r"(?:\[[0-9A-Fa-f:.vV]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)"  # host
    r"(?::[0-9]*)?"  # port
    r"(?:[/?#](?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*)?"  # path, query
    r"(?:#(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*)?$"  # fragment
)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: RFC 3339 date-time: a "T" (or space is not allowed), seconds, optional fraction, Z or an offset.
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _is_date(value: object) -> bool:
    """JSON Schema ``format: date`` (RFC 3339 full-date): ``YYYY-MM-DD``, a real calendar day."""
    if not isinstance(value, str) or not _DATE.match(value):
        return False
    try:
        datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        return False
    return True


def _is_date_time(value: object) -> bool:
    """JSON Schema ``format: date-time`` (RFC 3339): date, time and a zone, all valid."""
    if not isinstance(value, str) or not _DATE_TIME.match(value):
        return False
    try:
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


#: The format assertions the sandbox applies to requests, as a jsonschema FormatChecker whose
#: checks are all built in: jsonschema's own ``uri`` and ``date-time`` checks need optional
#: packages (rfc3986-validator, rfc3339-validator) and pass everything silently without them.
FORMAT_CHECKER = FormatChecker(formats=())
FORMAT_CHECKER.checks("uuid")(lambda v: isinstance(v, str) and bool(_UUID.match(v)))
FORMAT_CHECKER.checks("uri")(lambda v: isinstance(v, str) and bool(_URI.match(v)))
FORMAT_CHECKER.checks("date")(_is_date)
FORMAT_CHECKER.checks("date-time")(_is_date_time)
STATES = ("New", "Pending", "Enrolled", "Canceled", "Declined")
ADD_FIELDS = {
    "AccountId", "LoyaltyProgramId", "IsPrimary", "State", "Code", "MembershipNumber",
    "Points", "ExpirationDate", "Url", "LoyaltyTierId",
}  # fmt: skip
AUTH_FIELDS = {"ClientToken", "AccessToken", "Client", "LanguageCode", "CultureCode"}
GETALL_LISTS = {
    "ChainIds": "uuid", "LoyaltyMembershipIds": "uuid", "AccountIds": "uuid",
    "LoyaltyProgramIds": "uuid", "Codes": "str", "MembershipNumbers": "str",
    "ProviderMembershipIds": "str",
}  # fmt: skip
#: Update-value wrappers of ``loyaltyMemberships/update``: field -> (value kind, clearable with null).
UPDATE_VALUES: dict[str, tuple[str, bool]] = {
    "LoyaltyProgramId": ("uuid", False),
    "State": ("state", False),
    "IsPrimary": ("bool", False),
    "MembershipNumber": ("str255", True),
    "ProviderMembershipId": ("str100", True),
    "Points": ("int32", True),
    "ExpirationDate": ("date", True),
    "Url": ("uri", True),
    "LoyaltyTierId": ("uuid", True),
    "Code": ("str", True),  # deprecated: the same value as MembershipNumber
}
GETALL_FIELDS = AUTH_FIELDS | set(GETALL_LISTS) | {
    "CreatedUtc", "UpdatedUtc", "MembershipStates", "ActivityStates", "Limitation",
}  # fmt: skip
INT32 = (-(2**31), 2**31 - 1)

#: Request fields of the look-up reads (auth fields aside) and the list filters of customers/getAll.
CUSTOMER_LISTS = {
    "CustomerIds": ("uuid", 1000), "Emails": ("str", 1000), "FirstNames": ("str", 1000),
    "LastNames": ("str", 1000), "LoyaltyCodes": ("str", 1000), "CompanyIds": ("uuid", 1),
    "ChainIds": ("uuid", 1000),
}  # fmt: skip
CUSTOMER_FIELDS = AUTH_FIELDS | set(CUSTOMER_LISTS) | {
    "CreatedUtc", "UpdatedUtc", "DeletedUtc", "ActivityStates", "Extent", "Limitation",
}  # fmt: skip
PROGRAM_FIELDS = AUTH_FIELDS | {
    "LoyaltyProgramIds", "Codes", "ChainIds", "CreatedUtc", "UpdatedUtc", "ActivityStates", "Limitation",
}  # fmt: skip
TIER_FIELDS = AUTH_FIELDS | {
    "LoyaltyProgramIds", "LoyaltyTierIds", "ChainIds", "UpdatedUtc", "ActivityStates", "Limitation",
}  # fmt: skip
#: Names of list filters, logged as item counts (ActivityStates/MembershipStates are logged as sent).
LIST_SUFFIXES = ("Ids", "Codes", "Numbers", "Emails", "Names")
PROGRAM_TYPES = ("Hotel", "ExternalPartner", "SoftBrand", "Unknown")
SUBSCRIPTIONS = ("Free", "Paid")
#: The read operations and the MewsSandbox method answering each.
READS = {
    "loyaltyMemberships/getAll": "get_all",
    "customers/getAll": "get_customers",
    "loyaltyPrograms/getAll": "get_loyalty_programs",
    "loyaltyTiers/getAll": "get_loyalty_tiers",
}

#: Faults a script entry or a rate can name. "NAME" or "NAME:ARG" (seconds for 429/hang).
FAULTS = (
    "500", "502html", "503", "408", "409", "429", "429date", "drop_before_store", "drop_after_store",
    "hang_after_store", "empty200", "truncated200", "fewer200", "nolist200", "wrongtypes200",
    "huge200", "slow200",
)  # fmt: skip


@dataclass
class SeededProgram:
    """What ``MewsSandbox.add_loyalty_program`` stored: the programme's Id and code, tier Ids by code."""

    id: str
    code: str
    tiers: dict[str, str] = field(default_factory=dict)


class ApiError(Exception):
    def __init__(self, status: int, message: str, details: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details
        self.headers = headers or {}


_ids = random.Random()


def _new_id() -> str:
    """A random version-4 UUID, several times faster than ``str(uuid.uuid4())`` (1000 per add)."""
    n = _ids.getrandbits(128) & ~(0xF000 << 64) & ~(0xC000 << 48) | (0x4000 << 64) | (0x8000 << 48)
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_utc(value: Any, name: str) -> float | None:
    """An ISO 8601 date-time in UTC ("Z" or a zero offset) as epoch seconds; None stays None.

    Mews's time filters are "in UTC timezone in ISO 8601 format": another offset is refused
    rather than converted, so a client that forgets to convert local times is caught."""
    if value is None:
        return None
    if not FORMAT_CHECKER.conforms(value, "date-time"):
        raise ApiError(400, f"Invalid {name}: an RFC 3339 date-time is required.")
    try:
        parsed = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"Invalid {name}.") from None
    if parsed.utcoffset():
        raise ApiError(400, f"Invalid {name}: a time in UTC (ending in Z) is required.")
    return parsed.timestamp()


def _plus_months(moment: datetime, months: int) -> datetime:
    """``moment`` shifted by calendar months, the day clamped to the month's last (Jan 31 + 1 = Feb 28)."""
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    return moment.replace(year=year, month=month, day=min(moment.day, calendar.monthrange(year, month)[1]))


#: Time filters: at most 3 calendar months after StartUtc (x-max-interval-in-months: 3) and,
#: where 3 months are shorter (Feb 1 .. May 1 is 89 days), never less than 90 days.
MAX_INTERVAL_MONTHS, MIN_INTERVAL_LIMIT_S = 3, 90 * 86400.0


def _interval(body: dict[str, Any], key: str) -> tuple[float | None, float | None] | None:
    """Validate the time filter ``key`` ({StartUtc, EndUtc}, each nullable) of a getAll body."""
    interval = body.get(key)
    if interval is None:
        return None
    if not isinstance(interval, dict) or set(interval) - {"StartUtc", "EndUtc"}:
        raise ApiError(400, f"Invalid {key}: a time interval {{StartUtc, EndUtc}} is required.")
    low = _parse_utc(interval.get("StartUtc"), f"{key}.StartUtc")
    high = _parse_utc(interval.get("EndUtc"), f"{key}.EndUtc")
    if low is not None and high is not None:
        if high < low:
            raise ApiError(400, f"Invalid {key}: EndUtc is before StartUtc.")
        start = datetime.fromtimestamp(low, timezone.utc)
        limit = max(_plus_months(start, MAX_INTERVAL_MONTHS).timestamp(), low + MIN_INTERVAL_LIMIT_S)
        if high > limit:
            raise ApiError(
                400,
                f"Invalid {key}: the interval exceeds the maximum length of {MAX_INTERVAL_MONTHS} months.",
            )
    return low, high


def _within(moment: float, bounds: tuple[float | None, float | None], end_inclusive: bool) -> bool:
    """Whether ``moment`` is in the interval: StartUtc always inclusive; EndUtc inclusive too
    unless ``end_inclusive`` is False (Mews's documented half-open form); Start == End is an
    exact-instant match either way."""
    low, high = bounds
    if low is not None and low == high:
        return moment == low
    if low is not None and moment < low:
        return False
    return high is None or moment < high or (end_inclusive and moment == high)


def _iso(moment: float) -> str:
    """Epoch seconds as Mews writes times: ISO 8601 UTC with a Z, fraction only when there is one."""
    text = datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return (text[:-7] if text.endswith(".000000") else text) + "Z"


def _utc_seconds(value: datetime | str | float, name: str = "time") -> float:
    """A seeding time (aware datetime, naive = UTC, ISO string or epoch seconds) as epoch seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if not isinstance(value, datetime):
        raise ValueError(f"{name}: a datetime, an ISO 8601 string or epoch seconds is required")
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


def _limitation(body: dict[str, Any]) -> tuple[int, str | None]:
    """The required ``Limitation`` of a getAll: (Count 1..1000, Cursor UUID or None)."""
    limitation = body.get("Limitation")
    if not isinstance(limitation, dict) or set(limitation) - {"Count", "Cursor"}:
        raise ApiError(400, "Invalid Limitation: {Count: 1..1000, Cursor} is required.")
    count = limitation.get("Count")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1000:
        raise ApiError(400, "Invalid Limitation.Count: 1 to 1000 is required.")
    cursor = limitation.get("Cursor")
    if cursor is not None and not (isinstance(cursor, str) and _UUID.match(cursor)):
        raise ApiError(400, "Invalid Limitation.Cursor: a UUID is required.")
    return count, cursor.lower() if cursor else None


def _lists(body: dict[str, Any], spec: dict[str, tuple[str, int]]) -> dict[str, list[str]]:
    """The list filters of a getAll body, ``spec`` name -> (kind "uuid"/"str", max items): each
    given one has 1..max items (null means not given); UUIDs come back lower-cased."""
    found: dict[str, list[str]] = {}
    for name, (kind, most) in spec.items():
        values = body.get(name)
        if values is None:
            continue
        if not isinstance(values, list) or not 1 <= len(values) <= most:
            raise ApiError(400, f"Invalid {name}: 1 to {most} items are required.")
        if not all(isinstance(v, str) and (kind != "uuid" or _UUID.match(v)) for v in values):
            what = "UUIDs" if kind == "uuid" else "strings"
            raise ApiError(400, f"Invalid {name}: {what} are required.")
        found[name] = [v.lower() if kind == "uuid" else v for v in values]
    return found


def _activity(body: dict[str, Any]) -> list[str] | None:
    activity = body.get("ActivityStates")
    if activity is not None and (
        not isinstance(activity, list) or any(s not in ("Active", "Deleted") for s in activity)
    ):
        raise ApiError(400, "Invalid ActivityStates: Active and/or Deleted are required.")
    return activity


def _unknown_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise ApiError(400, f"Invalid request: unknown field(s) {', '.join(sorted(unknown))}.")


@dataclass
class SandboxConfig:
    """Behaviour switches. Every field can be changed at run time through ``configure``."""

    tokens: dict[str, set[str]] = field(
        default_factory=lambda: {DEMO_CLIENT_TOKEN: {DEMO_ACCESS_TOKEN}}
    )  # ClientToken -> accepted AccessTokens
    add_latency_s: float = 0.0  # per add request of 1000 items (scaled by item count)
    #: Seconds every read (the four getAll operations) waits before answering, and a random
    #: 0..N seconds more per request (jitter): pages of an export arrive unevenly.
    getall_latency_s: float = 0.0
    getall_jitter_s: float = 0.0
    rate_limit_requests: int = 200
    rate_limit_period_s: float = 30.0
    #: The window counts a request only a random 0..N ms after it arrived (a server reading the
    #: request under load); the delay is part of the request's latency, not added to it.
    count_delay_ms: float = 0.0
    fault_rates: dict[str, float] = field(default_factory=dict)  # fault -> probability per request
    fault_script: list[str] = field(default_factory=list)  # consumed one per API request, first
    fault_operations: set[str] = field(default_factory=lambda: {"loyaltyMemberships/add"})
    forbidden_accounts: set[str] = field(default_factory=set)  # 403 business rule
    unknown_program_ids: set[str] = field(default_factory=set)  # 400 Invalid LoyaltyProgramId
    forbidden_memberships: set[str] = field(default_factory=set)  # 403 on update/delete of these Ids
    request_log_size: int = 100_000  # entries kept by the request log (oldest dropped)
    #: ``customers/getAll`` ``Emails``: False (default) matches case-insensitively but otherwise
    #: exactly (no trimming: " a@x.com" never matches "a@x.com"); True (adversarial: Mews does not
    #: document it) matches only the stored spelling, so "John@X.com" misses "john@x.com".
    email_case_sensitive: bool = False
    #: Time filters (CreatedUtc, UpdatedUtc, DeletedUtc): True (default, adversarial) takes both
    #: ends inclusively, so a record stamped exactly on the boundary of two consecutive slices is
    #: returned by both and the client must dedupe by Id; False is Mews's documented half-open
    #: StartUtc <= t < EndUtc. StartUtc == EndUtc is an exact-instant match either way.
    interval_end_inclusive: bool = True
    #: Seeding helpers that spread records over a period put each on a UTC midnight: several
    #: share one instant and many sit exactly on day-, month- or 3-month-aligned slice boundaries.
    seed_on_boundaries: bool = False
    #: Once programmes (or customers) are seeded, add/update refuse an unknown LoyaltyProgramId,
    #: a LoyaltyTierId not of the membership's programme (or an unknown AccountId) with 400
    #: "Invalid ...", as Mews does; unseeded, any UUID is accepted (what the tests relied on).
    check_references: bool = True
    seed: int | None = None


class _Table:
    """Records of one kind (customers, programmes, tiers) kept in insertion order, with the
    internal times the time filters select by. Callers hold ``SandboxState.lock``.

    Pages follow insertion order (oldest stored first) and the cursor is the Id of the last
    record returned: a record added while a client pages goes to the end, so no record is
    skipped or returned twice by the paging itself. (Mews's guideline says newest first;
    clients must not rely on the order, and a stable order is what makes cursors work.)"""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.position: dict[str, int] = {}
        self.created: dict[str, float] = {}
        self.updated: dict[str, float] = {}
        self.deleted: dict[str, float] = {}

    def put(self, record: dict[str, Any], created: float, updated: float | None = None) -> None:
        rid = record["Id"].lower()
        if rid not in self.records:
            self.position[rid] = len(self.order)
            self.order.append(rid)
        self.records[rid] = record
        self.created[rid] = created
        self.updated[rid] = created if updated is None else updated

    def page(self, cursor: str | None, count: int, keep: Any) -> list[dict[str, Any]]:
        """Up to ``count`` records after ``cursor`` for which ``keep(id, record)`` holds."""
        start = 0
        if cursor is not None:
            if cursor.lower() not in self.position:
                return []  # as loyaltyMemberships/getAll: a cursor naming nothing ends the paging
            start = self.position[cursor.lower()] + 1
        page: list[dict[str, Any]] = []
        for rid in itertools.islice(self.order, start, None):
            record = self.records[rid]
            if keep(rid, record):
                page.append(record)
                if len(page) == count:
                    break
        return page

    def clear(self) -> None:
        for part in (self.records, self.order, self.position, self.created, self.updated, self.deleted):
            part.clear()


class _Stamps(dict):  # type: ignore[type-arg]
    """Id -> time of one time filter; ``version`` changes with every write, so an index built
    from it (:meth:`SandboxState.span`) knows when it is stale, whoever writes (tests do too)."""

    version = 0

    def __setitem__(self, key: str, value: float) -> None:
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.version += 1
        super().__delitem__(key)

    def clear(self) -> None:
        self.version += 1
        super().clear()


class SandboxState:
    """Memberships, the seeded customers, programmes and tiers, and counters; thread-safe."""

    def __init__(self, state_file: str | None = None) -> None:
        self.lock = threading.Lock()
        self.memberships: dict[str, dict[str, Any]] = {}
        self.created_at: dict[str, float] = _Stamps()
        self.updated_at: dict[str, float] = _Stamps()
        #: Per time filter: ((version, count), the times in insertion order) when they never
        #: decrease along it (seeded in time order), else None: see :meth:`span`.
        self._spans: dict[str, tuple[tuple[int, int], list[float] | None]] = {}
        #: One entry per API request (see ``MewsSandbox.log_request``); bounded by ``request_log_size``.
        self.log: deque[dict[str, Any]] = deque()
        self.order: list[str] = []
        self.position: dict[str, int] = {}
        self.by_account: dict[str, list[str]] = {}
        self.stats: Counter[str] = Counter()
        self.windows: dict[str, deque[float]] = {}
        #: One record per answered API request: operation, arrived/answered (epoch s), status.
        self.requests: list[dict[str, Any]] = []
        #: When each accepted API request was counted (monotonic), per AccessToken.
        self.counted: dict[str, list[float]] = {}
        #: Seeded look-up data (``MewsSandbox.add_customers``, ``add_loyalty_program``); not persisted.
        self.customers = _Table()
        self.programs = _Table()
        self.tiers = _Table()
        self.state_file = state_file
        if state_file:
            self._load(state_file)

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        record = json.loads(line)
                        if "u" in record:  # an update or delete of a stored membership
                            self.memberships[record["u"]["Id"]] = record["u"]
                            self.updated_at[record["u"]["Id"]] = record["t"]
                        else:
                            self._index(record["m"], record["t"])
        except FileNotFoundError:
            pass

    def span(
        self, key: str, bounds: tuple[float | None, float | None], end_inclusive: bool
    ) -> tuple[int, int] | None:
        """Positions ``first..last`` (in insertion order) outside which no membership's ``key``
        time is within ``bounds``, found by bisection, or None when the times are not in
        insertion order (then the caller walks everything). Callers hold ``lock``.

        A seeded store of a million memberships otherwise walks from the first membership on
        every time-filtered page (a slice's first page, its last one, each ``[b, b]`` read),
        holding the lock for seconds while every other request waits."""
        stamps = self.created_at if key == "CreatedUtc" else self.updated_at
        version = (getattr(stamps, "version", -1), len(self.order))
        cached = self._spans.get(key)
        if cached is None or cached[0] != version or version[0] < 0:
            stamped = [stamps[i] for i in self.order]
            ordered = all(a <= b for a, b in itertools.pairwise(stamped))
            cached = self._spans[key] = (version, stamped if ordered else None)
        times = cached[1]
        if times is None:
            return None
        low, high = bounds
        first = 0 if low is None else bisect.bisect_left(times, low)
        if high is None:
            last = len(times)
        elif end_inclusive or low == high:
            last = bisect.bisect_right(times, high)
        else:
            last = bisect.bisect_left(times, high)
        return first, max(first, last)

    def _index(self, membership: dict[str, Any], created: float) -> None:
        mid = membership["Id"]
        self.memberships[mid] = membership
        self.created_at[mid] = created
        self.updated_at[mid] = created
        self.position[mid] = len(self.order)
        self.order.append(mid)
        self.by_account.setdefault(membership["AccountId"].lower(), []).append(mid)

    def store(
        self, memberships: list[dict[str, Any]], created: float | None = None, updated: float | None = None
    ) -> None:
        """Store new memberships, stamped ``created`` (default now) and ``updated`` (default created)."""
        now = time.time() if created is None else created
        with self.lock:
            for m in memberships:
                self._index(m, now)
                if updated is not None:
                    self.updated_at[m["Id"]] = updated
            if self.state_file:
                with open(self.state_file, "a", encoding="utf-8") as fh:
                    fh.writelines(json.dumps({"m": m, "t": now}) + "\n" for m in memberships)
                    if updated is not None:
                        fh.writelines(json.dumps({"u": m, "t": updated}) + "\n" for m in memberships)

    def replace(self, memberships: list[dict[str, Any]]) -> None:
        """Store new versions of existing memberships (an update or a delete), persisted too."""
        now = time.time()
        with self.lock:
            for m in memberships:
                self.memberships[m["Id"]] = m
                self.updated_at[m["Id"]] = now
            if self.state_file:
                with open(self.state_file, "a", encoding="utf-8") as fh:
                    fh.writelines(json.dumps({"u": m, "t": now}) + "\n" for m in memberships)

    def reset(self) -> None:
        with self.lock:
            self.memberships.clear()
            self.created_at.clear()
            self.updated_at.clear()
            self.log.clear()
            self.order.clear()
            self.position.clear()
            self.by_account.clear()
            self.stats.clear()
            self.windows.clear()
            self.requests.clear()
            self.counted.clear()
            for table in (self.customers, self.programs, self.tiers):
                table.clear()
            if self.state_file:
                open(self.state_file, "w").close()


class MewsSandbox:
    """The sandbox server. ``with MewsSandbox() as sb: sb.url`` runs it in a background thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        config: SandboxConfig | None = None,
        state_file: str | None = None,
        quiet: bool = True,
    ) -> None:
        self.config = config or SandboxConfig()
        #: What ``reset()`` returns to: the start-up settings (e.g. the command line's --rate-limit).
        self._initial_config = copy.deepcopy(self.config)
        self.state = SandboxState(state_file)
        self.quiet = quiet
        self._rng = random.Random(self.config.seed)
        self._server = _Server((host, port), _Handler)
        self._server.sandbox = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MewsSandbox:
        self._thread = threading.Thread(target=self._server.serve_forever, name="mews-sandbox", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> MewsSandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection and control (also reachable over HTTP as /_sandbox/...) --

    def memberships(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return [self.state.memberships[i] for i in self.state.order]

    def stats(self) -> dict[str, int]:
        with self.state.lock:
            out = dict(self.state.stats)
            out["stored"] = len(self.state.memberships)
            return out

    def reset(self) -> None:
        self.state.reset()
        self.config = replace(copy.deepcopy(self._initial_config), tokens=self.config.tokens)
        self._rng = random.Random(self.config.seed)

    def configure(self, **changes: Any) -> None:
        for name, value in changes.items():
            if not hasattr(self.config, name):
                raise ValueError(f"unknown sandbox setting {name!r}")
            current = getattr(self.config, name)
            if isinstance(current, set):
                value = set(value)
            elif name == "tokens":
                value = {k: set(v) if not isinstance(v, str) else {v} for k, v in value.items()}
            elif name == "fault_script":
                value = list(value)
            setattr(self.config, name, value)
            if name == "seed":
                self._rng = random.Random(value)

    def add_tokens(self, client_token: str, access_token: str) -> None:
        self.config.tokens.setdefault(client_token, set()).add(access_token)

    # -- seeding: look-up data and memberships with chosen times (Python; the CLI calls these) --

    def customers(self) -> list[dict[str, Any]]:
        """The seeded customers in paging order (deleted ones included)."""
        with self.state.lock:
            return [self.state.customers.records[i] for i in self.state.customers.order]

    def loyalty_programs(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return [self.state.programs.records[i] for i in self.state.programs.order]

    def loyalty_tiers(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return [self.state.tiers.records[i] for i in self.state.tiers.order]

    def _spread(self, count: int, start: Any, end: Any, at: Any, name: str) -> list[float]:
        """``count`` times: each of ``at`` (one time or one per record), or spread evenly from
        ``start`` to ``end`` (both hit exactly), or now; on UTC midnights with ``seed_on_boundaries``."""
        if at is not None:
            if isinstance(at, (list, tuple)):
                if len(at) != count:
                    raise ValueError(f"{name}: {count} times are required, got {len(at)}")
                return [_utc_seconds(t, name) for t in at]
            return [_utc_seconds(at, name)] * count
        if start is None and end is None:
            return [time.time()] * count
        if start is None or end is None:
            raise ValueError(f"{name}: give both start_utc and end_utc, or neither")
        low, high = _utc_seconds(start, "start_utc"), _utc_seconds(end, "end_utc")
        if high < low:
            raise ValueError("end_utc is before start_utc")
        step = (high - low) / (count - 1) if count > 1 else 0.0
        times = [low + i * step for i in range(count)]
        if self.config.seed_on_boundaries:
            times = [round(t / 86400) * 86400.0 for t in times]
        return times

    def add_customer(
        self,
        email: str | None = None,
        *,
        first_name: str | None = None,
        last_name: str = "Guest",
        loyalty_code: str | None = None,
        phone: str | None = None,
        company_id: str | None = None,
        chain_id: str = SANDBOX_CHAIN_ID,
        created_utc: Any = None,
        updated_utc: Any = None,
        deleted_utc: Any = None,
        customer_id: str | None = None,
    ) -> str:
        """Store one customer (the e-mail kept exactly as given, case included); returns its Id.
        With ``deleted_utc`` it is deleted then: returned only for ``ActivityStates: ["Deleted"]``."""
        created = time.time() if created_utc is None else _utc_seconds(created_utc, "created_utc")
        updated = created if updated_utc is None else _utc_seconds(updated_utc, "updated_utc")
        deleted = None if deleted_utc is None else _utc_seconds(deleted_utc, "deleted_utc")
        with self.state.lock:
            number = str(len(self.state.customers.order) + 1)
        cid = (customer_id or _new_id()).lower()
        record: dict[str, Any] = {
            "Id": cid, "ChainId": chain_id, "Number": number, "Title": None, "Sex": None,
            "FirstName": first_name, "LastName": last_name, "SecondLastName": None,
            "NationalityCode": None, "PreferredLanguageCode": None, "LanguageCode": None,
            "BirthDate": None, "BirthPlace": None, "Occupation": None,
            "Email": email, "HasOtaEmail": False, "Phone": phone, "LoyaltyCode": loyalty_code,
            "AccountingCode": None, "BillingCode": None, "Notes": None,
            "CreatedUtc": _iso(created), "UpdatedUtc": _iso(max(updated, deleted or updated)),
            "AddressId": None, "Classifications": [], "Options": [], "CompanyId": company_id,
            "MergeTargetId": None, "ActivityState": "Deleted" if deleted else "Active",
            "IsActive": deleted is None, "PreferredSpaceFeatures": [],
            "CreatorProfileId": SANDBOX_PROFILE_ID, "UpdaterProfileId": SANDBOX_PROFILE_ID,
        }  # fmt: skip
        with self.state.lock:
            self.state.customers.put(record, created, max(updated, deleted or updated))
            if deleted is not None:
                self.state.customers.deleted[cid] = deleted
        return cid

    def add_customers(
        self,
        count: int,
        *,
        shared_emails: int = 0,
        mixed_case: bool = False,
        start_utc: Any = None,
        end_utc: Any = None,
        created_utc: Any = None,
    ) -> list[str]:
        """``count`` guests from ``sample_data.guests`` (e-mail ``guest{n}@example.com``, loyalty
        code ``LC{n:06d}``); the last ``shared_emails`` are duplicate profiles reusing the e-mails
        of the first ones; ``mixed_case`` stores every other e-mail with capitals. Created times:
        ``created_utc`` or spread from ``start_utc`` to ``end_utc`` (else now). Returns the Ids."""
        from airflow_provider_mews.testing.sample_data import guests

        people = list(guests(count, shared_emails=shared_emails, mixed_case=mixed_case))
        times = self._spread(count, start_utc, end_utc, created_utc, "created_utc")
        return [self.add_customer(**person, created_utc=t) for person, t in zip(people, times, strict=True)]

    def add_loyalty_program(
        self,
        code: str,
        *,
        name: str | None = None,
        tiers: Iterable[str | dict[str, Any]] = (),
        program_type: str = "Hotel",
        subscription: str = "Free",
        chain_id: str = SANDBOX_CHAIN_ID,
        program_id: str | None = None,
        created_utc: Any = None,
        updated_utc: Any = None,
        deleted: bool = False,
    ) -> SeededProgram:
        """Store a loyalty programme and its tiers (codes, or dicts with Code and optionally Name,
        Ordering, Id); returns its Id and the tier Ids by code. Codes: 1..50 characters."""
        if not isinstance(code, str) or not 1 <= len(code) <= 50:
            raise ValueError(f"programme code {code!r}: 1 to 50 characters are required")
        if program_type not in PROGRAM_TYPES or subscription not in SUBSCRIPTIONS:
            raise ValueError(f"type one of {PROGRAM_TYPES}, subscription one of {SUBSCRIPTIONS}")
        created = time.time() if created_utc is None else _utc_seconds(created_utc, "created_utc")
        updated = created if updated_utc is None else _utc_seconds(updated_utc, "updated_utc")
        pid = (program_id or _new_id()).lower()
        program = {
            "Id": pid, "ChainId": chain_id, "Name": name or code, "Code": code,
            "Type": program_type, "Subscription": subscription,
        }  # fmt: skip
        seeded = SeededProgram(pid, code)
        tier_records = []
        for ordering, tier in enumerate(tiers, start=1):
            spec = {"Code": tier} if isinstance(tier, str) else dict(tier)
            tier_code = spec.get("Code")
            if not isinstance(tier_code, str) or not 1 <= len(tier_code) <= 50:
                raise ValueError(f"tier code {tier_code!r}: 1 to 50 characters are required")
            if tier_code in seeded.tiers:
                raise ValueError(f"tier code {tier_code!r} is given twice")
            tid = str(spec.get("Id") or _new_id()).lower()
            seeded.tiers[tier_code] = tid
            tier_records.append({
                "Id": tid, "LoyaltyProgramId": pid, "Name": str(spec.get("Name") or tier_code)[:50],
                "Code": tier_code, "Ordering": int(spec.get("Ordering", ordering)),
            })  # fmt: skip
        with self.state.lock:
            self.state.programs.put(program, created, updated)
            if deleted:
                self.state.programs.deleted[pid] = updated
            for record in tier_records:
                self.state.tiers.put(record, created, updated)
        return seeded

    def seed_memberships(
        self,
        count: int,
        *,
        program_id: str | None = None,
        tier_ids: Iterable[str] | None = None,
        account_ids: Iterable[str] | None = None,
        start_utc: Any = None,
        end_utc: Any = None,
        created_utc: Any = None,
        updated_utc: Any = None,
    ) -> list[str]:
        """Store ``count`` memberships directly (no request, no rate limit) with chosen internal
        times: ``created_utc`` (one time or one per membership) or spread evenly from
        ``start_utc`` to ``end_utc`` (e.g. a year, to page an export through 3-month slices);
        ``updated_utc`` likewise, default the created time. Programme: ``program_id``, else the
        first seeded one, else ``sample_data.PROGRAM_ID``; tiers cycle through ``tier_ids`` (else
        that programme's seeded tiers); accounts cycle through ``account_ids`` (else the seeded
        customers, else new random Ids). Returns the membership Ids in creation order."""
        from airflow_provider_mews.testing.sample_data import PROGRAM_ID

        if count < 1:
            raise ValueError("count must be at least 1")
        created = self._spread(count, start_utc, end_utc, created_utc, "created_utc")
        updated = (
            created if updated_utc is None else self._spread(count, None, None, updated_utc, "updated_utc")
        )
        with self.state.lock:
            programs, tiers = self.state.programs, self.state.tiers
            pid = program_id or (programs.order[0] if programs.order else PROGRAM_ID)
            known_tiers = [t for t in tiers.order if tiers.records[t]["LoyaltyProgramId"] == pid.lower()]
            accounts = list(account_ids or [c for c in self.state.customers.order])
        tier_cycle = list(tier_ids) if tier_ids is not None else known_tiers
        ids = []
        for n in range(count):
            item = {
                "AccountId": accounts[n % len(accounts)] if accounts else _new_id(),
                "LoyaltyProgramId": pid,
                "IsPrimary": True,
                "MembershipNumber": f"SEED-{n + 1:07d}",
                "LoyaltyTierId": tier_cycle[n % len(tier_cycle)] if tier_cycle else None,
            }
            membership = self._membership(n, item, SANDBOX_CHAIN_ID)
            self.state.store([membership], created[n], updated[n] if updated[n] != created[n] else None)
            ids.append(membership["Id"])
        return ids

    def request_log(self, operation: str | None = None) -> list[dict[str, Any]]:
        """The logged API requests, oldest first (``operation`` e.g. "loyaltyMemberships/update").

        Each entry: ``operation``, ``status`` (0 when the connection was dropped), ``request_id``,
        ``fault`` and what was sent without the tokens: ``items`` (count) for add,
        ``LoyaltyMembershipUpdates`` (the items as sent) for update, ``LoyaltyMembershipIds``
        for delete, ``filters`` (list filters as item counts, states as sent) for getAll.
        """
        with self.state.lock:
            return [e for e in self.state.log if operation is None or e["operation"] == operation]

    def log_request(
        self, operation: str, status: int, request_id: str, body: Any, fault: str | None = None
    ) -> None:
        entry: dict[str, Any] = {
            "operation": operation,
            "status": status,
            "request_id": request_id,
            "fault": fault,
        }
        if isinstance(body, dict):
            if operation == "loyaltyMemberships/add":
                items = body.get("LoyaltyMemberships")
                entry["items"] = len(items) if isinstance(items, list) else None
            elif operation == "loyaltyMemberships/update":
                entry["ChainId"] = body.get("ChainId")
                entry["LoyaltyMembershipUpdates"] = body.get("LoyaltyMembershipUpdates")
            elif operation == "loyaltyMemberships/delete":
                entry["ChainId"] = body.get("ChainId")
                entry["LoyaltyMembershipIds"] = body.get("LoyaltyMembershipIds")
            elif operation in READS:
                entry["filters"] = {
                    k: len(v) if k.endswith(LIST_SUFFIXES) and isinstance(v, list) else v
                    for k, v in body.items()
                    if k not in AUTH_FIELDS and k != "Limitation"
                }
        with self.state.lock:
            log = self.state.log
            log.append(entry)
            while len(log) > max(0, self.config.request_log_size):
                log.popleft()

    # -- the API --

    def next_fault(self, operation: str) -> str | None:
        cfg = self.config
        if operation not in cfg.fault_operations:
            return None
        with self.state.lock:
            if cfg.fault_script:
                entry = cfg.fault_script.pop(0)
                return entry or None
            for name, rate in cfg.fault_rates.items():
                if rate > 0 and self._rng.random() < rate:
                    return name
        return None

    def authenticate(self, body: dict[str, Any]) -> str:
        client_token = body.get("ClientToken")
        access_token = body.get("AccessToken")
        client = body.get("Client")
        for name, value in (("ClientToken", client_token), ("AccessToken", access_token), ("Client", client)):
            if not isinstance(value, str) or not value:
                raise ApiError(400, f"Invalid {name}.")
        if access_token not in self.config.tokens.get(client_token, ()):  # type: ignore[arg-type]
            raise ApiError(401, "Invalid ClientToken or AccessToken, or the integration is disabled.")
        if (body.get("LanguageCode") is None) != (body.get("CultureCode") is None):
            raise ApiError(400, "LanguageCode and CultureCode must be given together.")
        return access_token  # type: ignore[return-value]

    def check_rate(self, access_token: str) -> None:
        cfg = self.config
        now = time.monotonic()
        with self.state.lock:
            window = self.state.windows.setdefault(access_token, deque())
            while window and window[0] <= now - cfg.rate_limit_period_s:
                window.popleft()
            if len(window) >= cfg.rate_limit_requests:
                retry = max(1, int(window[0] + cfg.rate_limit_period_s - now + 0.999))
                self.state.stats["429"] += 1
                raise ApiError(
                    429, "Too many requests for this AccessToken.", headers={"Retry-After": str(retry)}
                )
            window.append(now)
            self.state.counted.setdefault(access_token, []).append(now)

    def counted_times(self, access_token: str) -> list[float]:
        """When each request of ``access_token`` the rate limit let through was counted (monotonic s)."""
        with self.state.lock:
            return list(self.state.counted.get(access_token, ()))

    def count_delay(self) -> float:
        """Seconds to wait before counting this request (``count_delay_ms``), drawn at random."""
        top = self.config.count_delay_ms
        if top <= 0:
            return 0.0
        with self.state.lock:
            return self._rng.uniform(0.0, top) / 1000.0

    def read_delay(self) -> float:
        """Seconds a read waits before answering: ``getall_latency_s`` plus 0..``getall_jitter_s``."""
        jitter = self.config.getall_jitter_s
        if jitter <= 0:
            return self.config.getall_latency_s
        with self.state.lock:
            return self.config.getall_latency_s + self._rng.uniform(0.0, jitter)

    def add(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        unknown = set(body) - AUTH_FIELDS - {"ChainId", "LoyaltyMemberships"}
        if unknown:
            raise ApiError(400, f"Invalid request: unknown field(s) {', '.join(sorted(unknown))}.")
        chain_id = body.get("ChainId")
        if chain_id is not None and not (isinstance(chain_id, str) and _UUID.match(chain_id)):
            raise ApiError(400, "Invalid ChainId.")
        items = body.get("LoyaltyMemberships")
        if not isinstance(items, list) or not 1 <= len(items) <= 1000:
            raise ApiError(400, "Invalid LoyaltyMemberships: 1 to 1000 items are required.")
        created = [self._membership(i, item, chain_id or SANDBOX_CHAIN_ID) for i, item in enumerate(items)]
        forbidden = self.config.forbidden_accounts
        if forbidden:
            bad = [i for i, m in enumerate(created) if m["AccountId"].lower() in forbidden]
            if bad:
                raise ApiError(
                    403,
                    f"The customer account {created[bad[0]]['AccountId']} cannot be enrolled in the loyalty program.",
                    details={"LoyaltyMembershipIndexes": bad},
                )
        return created, {"LoyaltyMemberships": created}

    def _membership(self, i: int, item: Any, chain_id: str) -> dict[str, Any]:
        where = f"LoyaltyMemberships[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"Invalid {where}: an object is required.")
        unknown = item.keys() - ADD_FIELDS
        if unknown:
            raise ApiError(400, f"Invalid {where}: unknown field(s) {', '.join(sorted(unknown))}.")
        for name in ("AccountId", "LoyaltyProgramId"):
            value = item.get(name)
            if not isinstance(value, str) or not _UUID.match(value):
                raise ApiError(400, f"Invalid {where}.{name}: a UUID is required.")
        if item["LoyaltyProgramId"].lower() in self.config.unknown_program_ids:
            raise ApiError(400, f"Invalid LoyaltyProgramId {item['LoyaltyProgramId']}.")
        if not isinstance(item.get("IsPrimary"), bool):
            raise ApiError(400, f"Invalid {where}.IsPrimary: a boolean is required.")
        state = item.get("State")
        if state is not None and state not in STATES:
            raise ApiError(400, f"Invalid {where}.State: one of {', '.join(STATES)} is required.")
        for name in ("Code", "MembershipNumber"):
            value = item.get(name)
            if value is not None and (not isinstance(value, str) or len(value) > 255):
                raise ApiError(
                    400, f"Invalid {where}.{name}: a string of at most 255 characters is required."
                )
        points = item.get("Points")
        if points is not None and (
            not isinstance(points, int) or isinstance(points, bool) or not INT32[0] <= points <= INT32[1]
        ):
            raise ApiError(400, f"Invalid {where}.Points: a 32-bit integer is required.")
        expiration = item.get("ExpirationDate")
        if expiration is not None:
            # format: date in the published schema; answers carry it as a date-time (UTC midnight).
            if not FORMAT_CHECKER.conforms(expiration, "date"):
                raise ApiError(400, f"Invalid {where}.ExpirationDate: a date (YYYY-MM-DD) is required.")
            expiration += "T00:00:00Z"
        url = item.get("Url")
        if url is not None and not FORMAT_CHECKER.conforms(url, "uri"):
            raise ApiError(400, f"Invalid {where}.Url: an absolute URI (RFC 3986) is required.")
        tier = item.get("LoyaltyTierId")
        if tier is not None and not (isinstance(tier, str) and _UUID.match(tier)):
            raise ApiError(400, f"Invalid {where}.LoyaltyTierId: a UUID is required.")
        self._check_references(item["AccountId"], item["LoyaltyProgramId"], tier)
        code = item.get("Code") if item.get("Code") is not None else item.get("MembershipNumber")
        profile = {"Discriminator": "Integration", "EnterpriseProfile": None}
        return {
            "Id": _new_id(),
            "ChainId": chain_id,
            "AccountId": item["AccountId"],
            "LoyaltyProgramId": item["LoyaltyProgramId"],
            "State": state or "Enrolled",
            "IsPrimary": item["IsPrimary"],
            "ProviderMembershipId": None,
            "Code": code,
            "MembershipNumber": code,
            "Points": points,
            "ExpirationDate": expiration,
            "Url": url,
            "LoyaltyTierId": tier,
            "ActivityState": "Active",
            "DeletedUtc": None,
            "CreatorProfile": profile,
            "UpdaterProfile": profile,
        }

    def _check_references(self, account: str | None, program: str | None, tier: str | None) -> None:
        """400 "Invalid ..." for an Id the seeded data does not know (``check_references``): an
        AccountId once customers are seeded, a LoyaltyProgramId (active) once programmes are, a
        LoyaltyTierId not of ``program`` (any programme when ``program`` is None). Unseeded
        kinds are not checked: the sandbox cannot know what the client's Mews holds."""
        if not self.config.check_references:
            return
        st = self.state
        with st.lock:
            if account is not None and st.customers.records:
                customer = account.lower()
                if customer not in st.customers.records or customer in st.customers.deleted:
                    raise ApiError(400, f"Invalid AccountId {account}.")
            if not st.programs.records:
                return
            if program is not None and (
                program.lower() not in st.programs.records or program.lower() in st.programs.deleted
            ):
                raise ApiError(400, f"Invalid LoyaltyProgramId {program}.")
            if tier is not None:
                known = st.tiers.records.get(tier.lower())
                if known is None or (program is not None and known["LoyaltyProgramId"] != program.lower()):
                    raise ApiError(400, f"Invalid LoyaltyTierId {tier}.")

    @staticmethod
    def _date(value: Any, where: str) -> str:
        if isinstance(value, str):
            if _DATE.match(value):
                return value + "T00:00:00Z"
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                parsed = None
            if parsed is not None and parsed.tzinfo is not None:
                return parsed.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        raise ApiError(400, f"Invalid {where}: an ISO 8601 date in UTC is required.")

    # -- update and delete: validate everything first (all or nothing), then apply --

    def update(self, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Validate an update request; returns (membership Id, {field: new value}) per item."""
        unknown = set(body) - AUTH_FIELDS - {"ChainId", "LoyaltyMembershipUpdates"}
        if unknown:
            raise ApiError(400, f"Invalid request: unknown field(s) {', '.join(sorted(unknown))}.")
        self._chain(body)
        items = body.get("LoyaltyMembershipUpdates")
        if not isinstance(items, list) or not 1 <= len(items) <= 1000:
            raise ApiError(400, "Invalid LoyaltyMembershipUpdates: 1 to 1000 items are required.")
        changes = [self._update_item(i, item) for i, item in enumerate(items)]
        where = [f"LoyaltyMembershipUpdates[{i}].LoyaltyMembershipId" for i in range(len(changes))]
        self._existing([mid for mid, _ in changes], where)
        return changes

    def _update_item(self, i: int, item: Any) -> tuple[str, dict[str, Any]]:
        where = f"LoyaltyMembershipUpdates[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"Invalid {where}: an object is required.")
        unknown = item.keys() - UPDATE_VALUES.keys() - {"LoyaltyMembershipId"}
        if unknown:
            raise ApiError(400, f"Invalid {where}: unknown field(s) {', '.join(sorted(unknown))}.")
        mid = item.get("LoyaltyMembershipId")
        if not isinstance(mid, str) or not _UUID.match(mid):
            raise ApiError(400, f"Invalid {where}.LoyaltyMembershipId: a UUID is required.")
        values: dict[str, Any] = {}
        for name, (kind, clearable) in UPDATE_VALUES.items():
            wrapper = item.get(name)
            if wrapper is None:  # left out or null: keep the current value
                continue
            if not isinstance(wrapper, dict) or set(wrapper) - {"Value"}:
                raise ApiError(400, f'Invalid {where}.{name}: an update value {{"Value": ...}} is required.')
            if "Value" not in wrapper:
                if kind == "state":  # Mews documents Value as required for the state
                    raise ApiError(400, f"Invalid {where}.{name}.Value: a state is required.")
                continue  # INFERRED: an empty wrapper changes nothing
            value = wrapper["Value"]
            if value is None:
                if not clearable:
                    raise ApiError(400, f"Invalid {where}.{name}.Value: {name} cannot be removed.")
                values[name] = None
                continue
            values[name] = self._update_value(kind, value, f"{where}.{name}.Value")
        if (
            "LoyaltyProgramId" in values
            and values["LoyaltyProgramId"].lower() in self.config.unknown_program_ids
        ):
            raise ApiError(400, f"Invalid LoyaltyProgramId {values['LoyaltyProgramId']}.")
        self._check_references(None, values.get("LoyaltyProgramId"), values.get("LoyaltyTierId"))
        return mid.lower(), values

    def _update_value(self, kind: str, value: Any, where: str) -> Any:
        if kind == "uuid" and isinstance(value, str) and _UUID.match(value):
            return value
        if kind == "state" and value in STATES:
            return value
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind.startswith("str") and isinstance(value, str):
            limit = int(kind[3:] or 0)
            if not limit or len(value) <= limit:
                return value
            raise ApiError(400, f"Invalid {where}: at most {limit} characters are allowed.")
        if (
            kind == "int32"
            and isinstance(value, int)
            and not isinstance(value, bool)
            and INT32[0] <= value <= INT32[1]
        ):
            return value
        if kind == "date":
            return self._date(value, where)
        if kind == "uri" and FORMAT_CHECKER.conforms(value, "uri"):
            return value
        wanted = {
            "uuid": "a UUID", "state": f"one of {', '.join(STATES)}", "bool": "a boolean",
            "int32": "a 32-bit integer", "uri": "an absolute URI",
        }.get(kind, "a string")  # fmt: skip
        raise ApiError(400, f"Invalid {where}: {wanted} is required.")

    def apply_update(self, changes: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Store validated changes; returns the updated memberships in request order."""
        st = self.state
        with st.lock:
            current = {mid: st.memberships[mid] for mid, _ in changes}
        for mid, values in changes:
            new = dict(current[mid])  # a new dict: answers already given stay as they were
            new.update(values)
            # Code is the deprecated name of MembershipNumber: both always carry the same value.
            number = values.get("MembershipNumber", values.get("Code", new.get("MembershipNumber")))
            new["Code"] = new["MembershipNumber"] = number
            current[mid] = new
        st.replace(list(current.values()))
        return [current[mid] for mid, _ in changes]

    def delete(self, body: dict[str, Any]) -> list[str]:
        """Validate a delete request; returns the Ids to delete."""
        unknown = set(body) - AUTH_FIELDS - {"ChainId", "LoyaltyMembershipIds"}
        if unknown:
            raise ApiError(400, f"Invalid request: unknown field(s) {', '.join(sorted(unknown))}.")
        self._chain(body)
        ids = body.get("LoyaltyMembershipIds")
        if not isinstance(ids, list) or not 1 <= len(ids) <= 1000:
            raise ApiError(400, "Invalid LoyaltyMembershipIds: 1 to 1000 items are required.")
        for i, mid in enumerate(ids):
            if not isinstance(mid, str) or not _UUID.match(mid):
                raise ApiError(400, f"Invalid LoyaltyMembershipIds[{i}]: a UUID is required.")
        lowered = [mid.lower() for mid in ids]
        self._existing(lowered, [f"LoyaltyMembershipIds[{i}]" for i in range(len(ids))])
        return list(dict.fromkeys(lowered))

    def apply_delete(self, ids: list[str]) -> None:
        """Soft-delete: the memberships stay readable with ``ActivityStates: ["Deleted"]``."""
        now = _now_iso()
        with self.state.lock:
            deleted = [
                {**self.state.memberships[mid], "ActivityState": "Deleted", "DeletedUtc": now} for mid in ids
            ]
        self.state.replace(deleted)

    def _existing(self, ids: list[str], where: list[str]) -> None:
        """400 unless every Id is an active membership; 403 for ``forbidden_memberships``."""
        with self.state.lock:
            for mid, name in zip(ids, where, strict=True):
                m = self.state.memberships.get(mid)
                if m is None or m["ActivityState"] != "Active":
                    raise ApiError(400, f"Invalid {name}: {mid} is not an active loyalty membership.")
        forbidden = self.config.forbidden_memberships
        if forbidden:
            bad = [i for i, mid in enumerate(ids) if mid in forbidden]
            if bad:
                raise ApiError(
                    403,
                    f"The loyalty membership {ids[bad[0]]} cannot be changed.",
                    details={"LoyaltyMembershipIndexes": bad},
                )

    @staticmethod
    def _chain(body: dict[str, Any]) -> None:
        chain_id = body.get("ChainId")
        if chain_id is not None and not (isinstance(chain_id, str) and _UUID.match(chain_id)):
            raise ApiError(400, "Invalid ChainId.")

    def get_all(self, body: dict[str, Any]) -> dict[str, Any]:
        unknown = set(body) - GETALL_FIELDS
        if unknown:
            raise ApiError(400, f"Invalid request: unknown field(s) {', '.join(sorted(unknown))}.")
        count, cursor = _limitation(body)
        spec = {name: (kind, 1000) for name, kind in GETALL_LISTS.items()}
        filters = {name: set(values) for name, values in _lists(body, spec).items()}
        states = body.get("MembershipStates")
        if states is not None and (not isinstance(states, list) or any(s not in STATES for s in states)):
            raise ApiError(400, "Invalid MembershipStates.")
        activity = _activity(body)
        bounds = {k: b for k in ("CreatedUtc", "UpdatedUtc") if (b := _interval(body, k)) is not None}
        if activity is None:  # INFERRED (the default is undocumented): active ones only
            activity = ["Active"]
        inclusive = self.config.interval_end_inclusive
        st = self.state
        times = {"CreatedUtc": st.created_at, "UpdatedUtc": st.updated_at}
        with st.lock:
            accounts = filters.get("AccountIds")
            wanted_ids = filters.get("LoyaltyMembershipIds")
            if accounts is not None:
                ids: Iterable[str] = sorted(
                    (i for a in accounts for i in st.by_account.get(a, ())), key=st.position.__getitem__
                )
            elif wanted_ids is not None:
                ids = sorted((i for i in wanted_ids if i in st.position), key=st.position.__getitem__)
            else:
                ids = st.order
            started = cursor is None
            if not started and ids is st.order and cursor in st.position:
                ids = itertools.islice(st.order, st.position[cursor] + 1, None)  # no walk from the start
                started = True
            if started and bounds and (accounts is None and wanted_ids is None):
                # Only the positions whose time can be within the filter (a bisection of the
                # times when they follow insertion order): no walk over the whole store.
                key, interval = next(iter(bounds.items()))
                span = st.span(key, interval, inclusive)
                if span is not None:
                    after = st.position[cursor] + 1 if cursor is not None else 0
                    ids = itertools.islice(st.order, max(span[0], after), span[1])
            page: list[dict[str, Any]] = []
            for mid in ids:
                if not started:
                    started = mid == cursor
                    continue
                m = st.memberships[mid]
                if not self._matches(m, filters, states, activity):
                    continue
                if not all(_within(times[key][mid], b, inclusive) for key, b in bounds.items()):
                    continue
                page.append(m)
                if len(page) == count:
                    break
        return {"LoyaltyMemberships": page, "Cursor": page[-1]["Id"] if page else None}

    @staticmethod
    def _matches(m: dict[str, Any], filters: dict[str, set[str]], states: Any, activity: Any) -> bool:
        for name, key in (
            ("LoyaltyProgramIds", "LoyaltyProgramId"),
            ("LoyaltyMembershipIds", "Id"),
            ("ChainIds", "ChainId"),
        ):
            wanted = filters.get(name)
            if wanted is not None and m[key].lower() not in wanted:
                return False
        for name, key in (
            ("Codes", "Code"),
            ("MembershipNumbers", "MembershipNumber"),
            ("ProviderMembershipIds", "ProviderMembershipId"),
        ):
            wanted = filters.get(name)
            if wanted is not None and m[key] not in wanted:
                return False
        if states is not None and m["State"] not in states:
            return False
        return activity is None or m["ActivityState"] in activity

    # -- the look-up reads: customers, loyalty programmes, loyalty tiers --

    def _read(
        self,
        table: _Table,
        body: dict[str, Any],
        lists: dict[str, list[str]],
        fields: dict[str, str],
        times: tuple[str, ...],
        match: Any = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of ``table``: ``lists`` (validated list filters) are matched against the record
        fields ``fields`` names (filter -> field; UUIDs case-insensitively), ``times`` are the time
        filters the body may carry, ``match(filter, values, record)`` handles the rest. Only active
        records unless ``ActivityStates`` asks for Deleted (INFERRED: defaults are undocumented)."""
        count, cursor = _limitation(body)
        activity = set(_activity(body) or ["Active"])
        bounds = {k: b for k in times if (b := _interval(body, k)) is not None}
        inclusive = self.config.interval_end_inclusive
        wanted = {name: set(values) for name, values in lists.items()}
        stamps = {"CreatedUtc": table.created, "UpdatedUtc": table.updated, "DeletedUtc": table.deleted}

        def keep(rid: str, record: dict[str, Any]) -> bool:
            if ("Deleted" if rid in table.deleted else "Active") not in activity:
                return False
            for name, values in wanted.items():
                if name in fields:
                    value = record[fields[name]]
                    if (value.lower() if name.endswith("Ids") and value else value) not in values:
                        return False
                elif match is not None and not match(name, values, record):
                    return False
            for key, b in bounds.items():
                moment = stamps[key].get(rid)
                if moment is None or not _within(moment, b, inclusive):
                    return False
            return True

        with self.state.lock:
            page = table.page(cursor, count, keep)
        return page, page[-1]["Id"] if page else None

    def get_customers(self, body: dict[str, Any]) -> dict[str, Any]:
        """``customers/getAll``. At least one filter besides ChainIds/ActivityStates is required
        (Mews: "CustomerIds ... required if no other filter is provided"); ``Extent`` is required
        and ``Extent.Customers`` false gives an empty list. ``Emails`` match case-insensitively
        but otherwise exactly, or case-sensitively with ``email_case_sensitive``; names and
        loyalty codes match exactly."""
        _unknown_fields(body, CUSTOMER_FIELDS)
        extent = body.get("Extent")
        if not isinstance(extent, dict) or set(extent) - {"Customers", "Documents", "Addresses"}:
            raise ApiError(400, "Invalid Extent: {Customers, Documents, Addresses} is required.")
        if any(v is not None and not isinstance(v, bool) for v in extent.values()):
            raise ApiError(400, "Invalid Extent: booleans are required.")
        lists = _lists(body, CUSTOMER_LISTS)
        times = [k for k in ("CreatedUtc", "UpdatedUtc", "DeletedUtc") if body.get(k) is not None]
        if not set(lists) - {"ChainIds"} and not times:
            raise ApiError(400, "Invalid CustomerIds: required if no other filter is provided.")
        case_sensitive = self.config.email_case_sensitive

        def match(name: str, values: set[str], record: dict[str, Any]) -> bool:  # Emails
            email = record["Email"]
            return email is not None and (email if case_sensitive else email.lower()) in values

        if "Emails" in lists and not case_sensitive:
            lists["Emails"] = [v.lower() for v in lists["Emails"]]
        page, cursor = self._read(
            self.state.customers,
            body,
            lists,
            {"CustomerIds": "Id", "FirstNames": "FirstName", "LastNames": "LastName",
             "LoyaltyCodes": "LoyaltyCode", "CompanyIds": "CompanyId", "ChainIds": "ChainId"},
            ("CreatedUtc", "UpdatedUtc", "DeletedUtc"),
            match,
        )  # fmt: skip
        if not extent.get("Customers"):
            return {"Customers": [], "Documents": None, "Cursor": None}
        return {"Customers": page, "Documents": None, "Cursor": cursor}

    def get_loyalty_programs(self, body: dict[str, Any]) -> dict[str, Any]:
        """``loyaltyPrograms/getAll``: no filter is required; ``Codes`` match exactly."""
        _unknown_fields(body, PROGRAM_FIELDS)
        lists = _lists(
            body, {"LoyaltyProgramIds": ("uuid", 1000), "Codes": ("str", 1000), "ChainIds": ("uuid", 1000)}
        )
        fields = {"LoyaltyProgramIds": "Id", "Codes": "Code", "ChainIds": "ChainId"}
        page, cursor = self._read(self.state.programs, body, lists, fields, ("CreatedUtc", "UpdatedUtc"))
        return {"LoyaltyPrograms": page, "Cursor": cursor}

    def get_loyalty_tiers(self, body: dict[str, Any]) -> dict[str, Any]:
        """``loyaltyTiers/getAll``: ``LoyaltyProgramIds`` is required; the only time filter is
        ``UpdatedUtc``. ``ChainIds`` selects by the chain of the tier's programme."""
        _unknown_fields(body, TIER_FIELDS)
        if body.get("LoyaltyProgramIds") is None:
            raise ApiError(400, "Invalid LoyaltyProgramIds: 1 to 1000 items are required.")
        lists = _lists(
            body,
            {
                "LoyaltyProgramIds": ("uuid", 1000),
                "LoyaltyTierIds": ("uuid", 1000),
                "ChainIds": ("uuid", 1000),
            },
        )
        programs = self.state.programs.records

        def match(name: str, values: set[str], record: dict[str, Any]) -> bool:  # ChainIds
            program = programs.get(record["LoyaltyProgramId"].lower())
            return program is not None and program["ChainId"].lower() in values

        fields = {"LoyaltyProgramIds": "LoyaltyProgramId", "LoyaltyTierIds": "Id"}
        page, cursor = self._read(self.state.tiers, body, lists, fields, ("UpdatedUtc",), match)
        return {"LoyaltyTiers": page, "Cursor": cursor}

    def configuration(self) -> dict[str, Any]:
        return {
            "NowUtc": _now_iso(),
            "Enterprise": {
                "Id": SANDBOX_ENTERPRISE_ID,
                "ChainId": SANDBOX_CHAIN_ID,
                "Name": "Mews Sandbox Hotel",
                "TimeZoneIdentifier": "Europe/Prague",
            },
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    sandbox: MewsSandbox


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    _arrived: float | None = None  # when the API request being answered arrived
    _operation = ""

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.sandbox.quiet:
            super().log_message(format, *args)

    # -- plumbing --

    def _send(
        self, status: int, payload: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
    ) -> None:
        data = raw if raw is not None else json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        arrived = self._arrived
        if arrived is not None:
            self._arrived = None
            record = {
                "operation": self._operation,
                "arrived": arrived,
                "answered": time.time(),
                "status": status,
            }
            with self.server.sandbox.state.lock:
                self.server.sandbox.state.requests.append(record)

    _logging: tuple[str, str] | None = None
    _body: Any = None
    _fault: str | None = None

    def send_response(self, code: int, message: str | None = None) -> None:
        self._log(code)
        super().send_response(code, message)

    def _log(self, status: int) -> None:
        if self._logging is not None:
            operation, request_id = self._logging
            self._logging = None
            self.server.sandbox.log_request(operation, status, request_id, self._body, self._fault)

    def _drop(self) -> None:
        self._log(0)  # no answer at all
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:
        sb = self.server.sandbox
        if self.path == "/_sandbox/memberships":
            self._send(200, sb.memberships())
        elif self.path == "/_sandbox/stats":
            self._send(200, sb.stats())
        elif self.path == "/_sandbox/requests":
            self._send(200, sb.request_log())
        elif self.path == "/_sandbox/timings":
            with sb.state.lock:
                requests = list(sb.state.requests)
            self._send(200, requests)
        else:
            self._send(404, {"Message": "Not found.", "RequestId": None, "Details": None})

    def do_POST(self) -> None:
        sb = self.server.sandbox
        arrived = time.time()
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.startswith("/_sandbox/"):
            self._admin(self.path[len("/_sandbox/") :], raw)
            return
        request_id = str(uuid.uuid4())
        headers = {"Request-Id": request_id}
        prefix = "/api/connector/v1/"
        operation = self.path[len(prefix) :] if self.path.startswith(prefix) else ""
        self._arrived, self._operation = arrived, operation
        handlers = {
            "loyaltyMemberships/add": "add",
            **{operation: "getAll" for operation in READS},
            "loyaltyMemberships/update": "update",
            "loyaltyMemberships/delete": "delete",
            "configuration/get": "configuration",
        }
        kind = handlers.get(operation)
        with sb.state.lock:
            sb.state.stats[f"requests:{operation or self.path}"] += 1
        if kind is None:
            self._send(404, {"Message": "Not found.", "RequestId": request_id, "Details": None}, headers)
            return
        # The request log entry is written with the first status line sent (or the drop).
        self._logging = (operation, request_id)
        self._body = self._fault = None
        try:
            try:
                body = self._body = json.loads(raw)
            except ValueError:
                raise ApiError(400, "Invalid request: the body is not valid JSON.") from None
            if not isinstance(body, dict):
                raise ApiError(400, "Invalid request: a JSON object is required.")
            access_token = sb.authenticate(body)
            counted_after = sb.count_delay()
            if counted_after:
                time.sleep(counted_after)
            sb.check_rate(access_token)
            fault = self._fault = sb.next_fault(operation)
            if fault:
                with sb.state.lock:
                    sb.state.stats[f"fault:{fault.split(':')[0]}"] += 1
                if self._fault_before(fault, request_id, headers):
                    return
            if kind == "add":
                delay = sb.config.add_latency_s * len(body.get("LoyaltyMemberships") or ()) / 1000
                delay -= counted_after
                if delay > 0:
                    time.sleep(delay)
                created, answer = sb.add(body)
                if fault == "drop_before_store":
                    self._drop()
                    return
                sb.state.store(created)
                with sb.state.lock:
                    sb.state.stats["added"] += len(created)
            elif kind == "update":
                changes = sb.update(body)
                if fault == "drop_before_store":
                    self._drop()
                    return
                answer = {"LoyaltyMemberships": sb.apply_update(changes)}
                with sb.state.lock:
                    sb.state.stats["updated"] += len(changes)
            elif kind == "delete":
                ids = sb.delete(body)
                if fault == "drop_before_store":
                    self._drop()
                    return
                sb.apply_delete(ids)
                answer = {}
                with sb.state.lock:
                    sb.state.stats["deleted"] += len(ids)
            elif kind == "getAll":
                delay = sb.read_delay() - counted_after
                if delay > 0:
                    time.sleep(delay)
                answer = getattr(sb, READS[operation])(body)
            else:
                answer = sb.configuration()
            if fault and self._fault_after(fault, answer, headers):
                return
            self._send(200, answer, headers)
        except ApiError as err:
            with sb.state.lock:
                sb.state.stats[f"status:{err.status}"] += 1
            self._send(
                err.status,
                {"Message": err.message, "RequestId": request_id, "Details": err.details},
                {**headers, **err.headers},
            )

    def _fault_before(self, fault: str, request_id: str, headers: dict[str, str]) -> bool:
        """Faults answered before any work is done. True when the request is finished."""
        name, _, arg = fault.partition(":")
        if name in ("500", "503", "408", "409"):
            self._send(
                int(name),
                {"Message": f"Sandbox fault {name}.", "RequestId": request_id, "Details": None},
                headers,
            )
        elif name == "502html":
            html = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
            self.send_response(502)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)
        elif name == "429":
            self._send(
                429,
                {"Message": "Too many requests.", "RequestId": request_id, "Details": None},
                {**headers, "Retry-After": arg or "1"},
            )
        elif name == "429date":
            when = datetime.fromtimestamp(time.time() + float(arg or 1), timezone.utc)
            self._send(
                429,
                {"Message": "Too many requests.", "RequestId": request_id, "Details": None},
                {**headers, "Retry-After": format_datetime(when, usegmt=True)},
            )
        else:
            return False
        return True

    def _fault_after(self, fault: str, answer: dict[str, Any], headers: dict[str, str]) -> bool:
        """Faults that happen after the work was done (the batch is stored). True when finished."""
        name, _, arg = fault.partition(":")
        if name == "drop_after_store":
            self._drop()
        elif name == "hang_after_store":
            time.sleep(float(arg or 60))
            self._drop()
        elif name == "empty200":
            self._send(200, None, headers, raw=b"")
        elif name == "truncated200":
            data = json.dumps(answer).encode()
            self._send(200, None, headers, raw=data[: len(data) // 2])
        elif name == "fewer200":
            self._send(
                200, {**answer, "LoyaltyMemberships": answer.get("LoyaltyMemberships", [])[:-1]}, headers
            )
        elif name == "nolist200":
            self._send(200, {"Cursor": None}, headers)
        elif name == "wrongtypes200":
            items = [{**m, "Id": 12345} for m in answer.get("LoyaltyMemberships", [])]
            self._send(200, {**answer, "LoyaltyMemberships": items}, headers)
        elif name == "huge200":
            self._send(
                200, None, headers, raw=b'{"Padding": "' + b"x" * int(float(arg or 50) * 2**20) + b'"}'
            )
        elif name == "slow200":
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            pause = float(arg or 5)
            for i in range(0, len(data), 64):
                self.wfile.write(data[i : i + 64])
                self.wfile.flush()
                time.sleep(pause)
        else:
            return False
        return True

    def _admin(self, action: str, raw: bytes) -> None:
        sb = self.server.sandbox
        try:
            body = json.loads(raw) if raw else {}
            if action == "reset":
                sb.reset()
            elif action == "config":
                sb.configure(**body)
            elif action == "tokens":
                sb.add_tokens(body["ClientToken"], body["AccessToken"])
            else:
                self._send(404, {"Message": f"unknown admin action {action}"})
                return
        except (ValueError, KeyError, TypeError) as exc:
            self._send(400, {"Message": str(exc)})
            return
        self._send(200, {"ok": True})


def _rate(value: str) -> tuple[int, float]:
    count, _, period = value.partition("/")
    return int(count), float(period or 30)


def _fault_rate(value: str) -> tuple[str, float]:
    """``NAME=RATE`` (a fault of FAULTS, a rate in 0..1) for ``--fault``; argparse says what is wrong."""
    name, _, rate = value.partition("=")
    if name.split(":")[0] not in FAULTS:
        raise argparse.ArgumentTypeError(f"unknown fault {name!r}; names: {', '.join(FAULTS)}")
    try:
        number = float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} needs a rate: NAME=RATE, e.g. {name}=0.1") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"the rate of {name} must be within 0..1, got {rate}")
    return name, number


def _count(value: str) -> int:
    """A non-negative count for the --seed-* flags."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number is required, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"a count cannot be negative, got {number}")
    return number


def _program_spec(value: str) -> tuple[str, list[str]]:
    """``CODE`` or ``CODE:TIER,TIER,...`` for --seed-program: codes of 1 to 50 characters."""
    code, _, tiers = value.partition(":")
    tier_codes = [t for t in tiers.split(",")] if tiers else []
    for what, text in [("programme", code), *(("tier", t) for t in tier_codes)]:
        if not 1 <= len(text) <= 50:
            raise argparse.ArgumentTypeError(
                f"{what} code {text!r} in {value!r}: 1 to 50 characters are required (CODE:TIER,TIER)"
            )
    if len(set(tier_codes)) != len(tier_codes):
        raise argparse.ArgumentTypeError(f"{value!r} names a tier twice")
    return code, tier_codes


def _period(value: str) -> tuple[float, float]:
    """``START/END`` (ISO 8601 dates or UTC date-times) for --seed-period."""
    start, sep, end = value.partition("/")
    try:
        low, high = _utc_seconds(start), _utc_seconds(end)
    except ValueError:
        low, high = 0.0, -1.0
    if not sep or high <= low:
        raise argparse.ArgumentTypeError(
            f"{value!r}: START/END with START before END is required, e.g. 2025-01-01/2026-01-01"
        )
    return low, high


def seed(sandbox: MewsSandbox, args: argparse.Namespace) -> dict[str, Any]:
    """What the --seed-* flags ask for, in order: programmes, customers, memberships (of the
    first programme, owned by the seeded customers). Returns a summary with the Ids."""
    summary: dict[str, Any] = {}
    start, end = args.seed_period or (time.time() - 365 * 86400, time.time())
    programs = [sandbox.add_loyalty_program(code, tiers=tiers) for code, tiers in args.seed_program]
    if programs:
        summary["LoyaltyPrograms"] = [{"Id": p.id, "Code": p.code, "Tiers": p.tiers} for p in programs]
    if args.seed_customers:
        ids = sandbox.add_customers(
            args.seed_customers,
            shared_emails=args.shared_emails,
            mixed_case=args.mixed_case_emails,
            start_utc=start,
            end_utc=end,
        )
        summary["Customers"] = len(ids)
    if args.seed_memberships:
        ids = sandbox.seed_memberships(args.seed_memberships, start_utc=start, end_utc=end)
        summary["LoyaltyMemberships"] = len(ids)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mews-sandbox", description="Local stand-in for the Mews Connector API (loyalty memberships)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per add of 1000 items")
    parser.add_argument("--getall-latency", type=float, default=0.0, help="seconds per getAll request")
    parser.add_argument(
        "--rate-limit", type=_rate, default=(200, 30.0), help="REQUESTS/SECONDS, default 200/30"
    )
    parser.add_argument(
        "--count-delay-ms",
        type=float,
        default=0.0,
        metavar="N",
        help="count each request in the rate-limit window a random 0..N ms after it arrived (within its latency)",
    )
    parser.add_argument(
        "--fault",
        type=_fault_rate,
        action="append",
        default=[],
        metavar="NAME=RATE",
        help=f"inject a fault at a rate, e.g. 500=0.1; names: {', '.join(FAULTS)}",
    )
    parser.add_argument("--forbid-account", action="append", default=[], help="answer 403 for this AccountId")
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="CLIENT:ACCESS",
        help="accept this ClientToken:AccessToken pair (the Mews demo pair is always accepted)",
    )
    parser.add_argument("--state-file", help="persist memberships here (JSON lines) across restarts")
    seeding = parser.add_argument_group("seeding (look-up data and memberships to read back; not persisted)")
    seeding.add_argument("--seed-customers", type=_count, default=0, metavar="N", help="N guest profiles")
    seeding.add_argument(
        "--shared-emails",
        type=_count,
        default=0,
        metavar="K",
        help="the last K guests reuse the e-mails of the first K (duplicate profiles); K <= N/2",
    )
    seeding.add_argument(
        "--mixed-case-emails", action="store_true", help="store every other e-mail with capitals"
    )
    seeding.add_argument(
        "--seed-program",
        type=_program_spec,
        action="append",
        default=[],
        metavar="CODE[:TIER,...]",
        help="a loyalty programme and its tier codes, e.g. GOLDCLUB:SILVER,GOLD (repeatable)",
    )
    seeding.add_argument(
        "--seed-memberships", type=_count, default=0, metavar="N", help="N memberships of the first programme"
    )
    seeding.add_argument(
        "--seed-period",
        type=_period,
        metavar="START/END",
        help="created times of seeded customers and memberships, spread evenly (default: the last 365 days)",
    )
    adversarial = parser.add_argument_group("read behaviour")
    adversarial.add_argument(
        "--email-case-sensitive", action="store_true", help="customers/getAll Emails match case-sensitively"
    )
    adversarial.add_argument(
        "--half-open-intervals",
        action="store_true",
        help="time filters StartUtc <= t < EndUtc (Mews's documented form; default: both ends inclusive)",
    )
    adversarial.add_argument(
        "--seed-on-boundaries", action="store_true", help="seeded times on UTC midnights (slice boundaries)"
    )
    adversarial.add_argument(
        "--getall-jitter",
        type=float,
        default=0.0,
        metavar="S",
        help="up to S seconds more per read, at random",
    )
    adversarial.add_argument(
        "--no-reference-checks",
        action="store_true",
        help="add/update accept any AccountId/LoyaltyProgramId/LoyaltyTierId even when seeded",
    )
    parser.add_argument("--seed", type=int)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.shared_emails > args.seed_customers // 2:
        parser.error(
            f"--shared-emails {args.shared_emails} needs --seed-customers of at least {2 * args.shared_emails}"
        )
    if args.mixed_case_emails and not args.seed_customers:
        parser.error("--mixed-case-emails needs --seed-customers")
    if args.seed_period and not (args.seed_customers or args.seed_memberships):
        parser.error("--seed-period needs --seed-customers or --seed-memberships")
    if min(args.getall_jitter, args.getall_latency) < 0:
        parser.error("--getall-latency and --getall-jitter cannot be negative")
    config = SandboxConfig(
        add_latency_s=args.latency,
        getall_latency_s=args.getall_latency,
        rate_limit_requests=args.rate_limit[0],
        rate_limit_period_s=args.rate_limit[1],
        count_delay_ms=args.count_delay_ms,
        fault_rates=dict(args.fault),
        forbidden_accounts={a.lower() for a in args.forbid_account},
        seed=args.seed,
        getall_jitter_s=args.getall_jitter,
        email_case_sensitive=args.email_case_sensitive,
        interval_end_inclusive=not args.half_open_intervals,
        seed_on_boundaries=args.seed_on_boundaries,
        check_references=not args.no_reference_checks,
    )
    for pair in args.token:
        client_token, _, access_token = pair.partition(":")
        config.tokens.setdefault(client_token, set()).add(access_token)
    sandbox = MewsSandbox(args.host, args.port, config, state_file=args.state_file, quiet=not args.verbose)
    seeded = seed(sandbox, args)
    print(f"Mews sandbox listening on {sandbox.url}", flush=True)
    if seeded:
        print(f"Seeded: {json.dumps(seeded)}", flush=True)
    try:
        sandbox.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
