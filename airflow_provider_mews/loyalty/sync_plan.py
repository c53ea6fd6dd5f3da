"""Sync modes (upsert and mirror) as pure functions: read rows, match, diff, budget removals. No I/O.

A source row is matched to a membership Mews holds by its ``LoyaltyMembershipId`` when it
has one (for example written back from ``results_table`` as ``mews_membership_id``),
otherwise by AccountId + LoyaltyProgramId (+ MembershipNumber when the row has one). More
than one candidate rejects the row naming them: a sync never guesses.

A matched row is compared field by field and only what differs is sent, as Mews update
values (``{"Value": v}``; ``{"Value": null}`` clears). A column the source does not have is
never touched; a column present with NULL clears a clearable field; ``State``,
``IsPrimary`` and ``LoyaltyProgramId`` cannot be cleared, so NULL leaves them as they are.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_provider_mews.loyalty.normalize import ColumnPlan, RowRejected, plan_columns, to_uuid

#: Fields an update can change, in the order Mews documents them (``Code`` is left out: deprecated).
UPDATE_FIELDS = (
    "LoyaltyProgramId",
    "State",
    "IsPrimary",
    "MembershipNumber",
    "ProviderMembershipId",
    "Points",
    "ExpirationDate",
    "Url",
    "LoyaltyTierId",
)
#: Update values whose ``Value`` cannot be null (the OAS wrappers are not nullable).
NOT_CLEARABLE = frozenset({"LoyaltyProgramId", "State", "IsPrimary"})
#: Source names of the Mews Id of a membership (``mews_membership_id`` is the results table's column).
ID_NAMES = frozenset({"loyaltymembershipid", "mewsmembershipid"})
PROVIDER_ID_NAMES = frozenset({"providermembershipid"})
PROVIDER_ID_MAX = 100
ON_MISSING = ("cancel", "delete", "keep")
#: Candidate Ids quoted in an ambiguity rejection.
MAX_QUOTED = 5

_to_membership_id = to_uuid("LoyaltyMembershipId")


def _key(name: str) -> str:
    """A column name compared the way :func:`plan_columns` compares it."""
    return name.replace("_", "").replace(" ", "").replace("-", "").lower()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def to_provider_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RowRejected("ProviderMembershipId", f"{_show(value)} is not text")
    if len(value) > PROVIDER_ID_MAX:
        raise RowRejected(
            "ProviderMembershipId", f"is {len(value)} characters long; Mews accepts at most {PROVIDER_ID_MAX}"
        )
    return value


# -- columns and rows --


@dataclass(frozen=True)
class SyncPlan:
    """The add plan of the source's columns plus the two columns only a sync reads."""

    columns: ColumnPlan
    id_position: int | None  # LoyaltyMembershipId (or mews_membership_id)
    provider_id_position: int | None  # ProviderMembershipId: set by update only, add refuses it

    @property
    def present(self) -> frozenset[str]:
        """Update fields the source has a column for: the only ones a sync may change or clear."""
        names = {"MembershipNumber" if f == "Code" else f for _, f, _ in self.columns.columns}
        if self.provider_id_position is not None:
            names.add("ProviderMembershipId")
        return frozenset(names & set(UPDATE_FIELDS))


def plan_sync_columns(names: Sequence[str], field_map: Mapping[str, str] | None = None) -> SyncPlan:
    """:func:`~airflow_provider_mews.loyalty.normalize.plan_columns`, plus the LoyaltyMembershipId and
    ProviderMembershipId columns (by name, or named in ``field_map``). Raises ``ValueError``."""
    field_map = dict(field_map or {})
    special: dict[str, str] = {}  # lower-case column name -> sync field
    for source, wanted in list(field_map.items()):
        if _key(wanted) in ID_NAMES:
            special[source.lower()] = "LoyaltyMembershipId"
            del field_map[source]
        elif _key(wanted) in PROVIDER_ID_NAMES:
            special[source.lower()] = "ProviderMembershipId"
            del field_map[source]
    positions: dict[str, int] = {}
    for pos, name in enumerate(names):
        target: str | None = special.get(name.lower())
        if target is None and name not in field_map and name.lower() not in {s.lower() for s in field_map}:
            key = _key(name)
            target = (
                "LoyaltyMembershipId"
                if key in ID_NAMES
                else "ProviderMembershipId"
                if key in PROVIDER_ID_NAMES
                else None
            )
        if target is None:
            continue
        if target in positions:
            raise ValueError(
                f"columns {names[positions[target]]!r} and {name!r} both map to Mews field {target}; "
                "drop one from the query or map one elsewhere with field_map"
            )
        positions[target] = pos
    missing = [s for s in special if s not in {n.lower() for n in names}]
    if missing:
        raise ValueError(
            f"field_map names column {missing[0]!r}, which the source does not have (columns: {', '.join(names)})"
        )
    hidden = set(positions.values())
    # The add plan must not see the sync columns (it would ignore them, with a warning).
    masked = [f"\x00{pos}" if pos in hidden else name for pos, name in enumerate(names)]
    plan = plan_columns(masked, field_map, also=("LoyaltyMembershipId", "ProviderMembershipId"))
    plan = dataclasses.replace(
        plan, ignored=tuple(n for n in plan.ignored if not n.startswith("\x00")), names=tuple(names)
    )
    return SyncPlan(plan, positions.get("LoyaltyMembershipId"), positions.get("ProviderMembershipId"))


@dataclass(slots=True)
class SyncRow:
    """One source row, normalized for a sync.

    ``fields`` holds the non-empty values under their update names (``MembershipNumber``, not
    ``Code``); ``cleared`` the fields whose column is present but empty.
    """

    row: int
    fields: dict[str, Any]
    cleared: frozenset[str]
    membership_id: str | None = None

    @property
    def account_id(self) -> str | None:
        return self.fields.get("AccountId")

    @property
    def program_id(self) -> str | None:
        return self.fields.get("LoyaltyProgramId")

    def add_item(self) -> dict[str, Any]:
        """The add parameters of a new row. RowRejected when add's required fields are missing.

        Add does not take ``ProviderMembershipId``: :func:`diff` of the row against the created
        membership gives the update that sets it.
        """
        for name in ("AccountId", "LoyaltyProgramId", "IsPrimary"):
            if name not in self.fields:
                raise RowRejected(name, "is required to add a new membership but empty")
        item = {k: v for k, v in self.fields.items() if k != "ProviderMembershipId"}
        if "MembershipNumber" in item:
            item["Code"] = item.pop("MembershipNumber")
        return item


def normalize_sync_row(plan: SyncPlan, values: Sequence[Any], row: int) -> SyncRow:
    """A source row for a sync; unlike add, an empty required column is not an error here
    (an update leaves the field alone). Raises RowRejected for a value Mews cannot take."""
    fields: dict[str, Any] = {}
    cleared: set[str] = set()
    for pos, field, fn in plan.columns.columns:
        name = "MembershipNumber" if field == "Code" else field
        value = values[pos]
        if value is None or value == "":
            cleared.add(name)
            continue
        fields[name] = _convert(fn, field, value)
    if plan.provider_id_position is not None:
        value = values[plan.provider_id_position]
        if value is None or value == "":
            cleared.add("ProviderMembershipId")
        else:
            fields["ProviderMembershipId"] = _convert(to_provider_id, "ProviderMembershipId", value)
    membership_id = None
    if plan.id_position is not None:
        value = values[plan.id_position]
        if value is not None and value != "":
            membership_id = _convert(_to_membership_id, "LoyaltyMembershipId", value)
    return SyncRow(row, fields, frozenset(cleared), membership_id)


def _convert(fn: Any, field: str, value: Any) -> Any:
    try:
        return fn(value)
    except RowRejected:
        raise
    except (ValueError, TypeError, ArithmeticError, OverflowError) as exc:
        raise RowRejected(field, f"{_show(value)} is not valid ({exc})") from None


def identity_of(plan: SyncPlan, values: Sequence[Any], row: int) -> SyncRow | None:
    """What a row that failed normalization still names: its LoyaltyMembershipId, AccountId and
    LoyaltyProgramId, each read on its own (None where that cell is not valid either); None when
    it names no membership. A mirror keeps what such a row names instead of removing it."""
    fields: dict[str, Any] = {}
    for pos, field, fn in plan.columns.columns:
        if field in ("AccountId", "LoyaltyProgramId") and values[pos] not in (None, ""):
            try:
                fields[field] = fn(values[pos])
            except (ValueError, TypeError):  # RowRejected is a ValueError
                pass
    membership_id = None
    if plan.id_position is not None and values[plan.id_position] not in (None, ""):
        try:
            membership_id = _to_membership_id(values[plan.id_position])
        except (ValueError, TypeError):
            pass
    r = SyncRow(row, fields, frozenset(), membership_id)
    return r if membership_id or (r.account_id and r.program_id) else None


def named_memberships(
    row: SyncRow,
    by_id: Mapping[str, Mapping[str, Any]],
    by_key: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]],
) -> list[Mapping[str, Any]]:
    """Every membership a row could mean (its Id's, else all of its account and program): what a
    mirror must not remove when the row itself is rejected."""
    if row.membership_id is not None:
        m = by_id.get(row.membership_id)
        return [m] if m is not None else []
    if row.account_id and row.program_id:
        return list(by_key.get((row.account_id, row.program_id), ()))
    return []


# -- matching --


@dataclass(frozen=True)
class Match:
    """How a source row relates to what Mews holds: ``new``, ``matched`` or ``rejected``."""

    kind: str
    membership: Mapping[str, Any] | None = None
    field: str | None = None
    reason: str | None = None


def index_memberships(
    memberships: Iterable[Mapping[str, Any]],
) -> tuple[dict[str, Mapping[str, Any]], dict[tuple[str, str], list[Mapping[str, Any]]]]:
    """Memberships by lower-case Id and by (account, program), as :func:`match_row` reads them."""
    by_id: dict[str, Mapping[str, Any]] = {}
    by_key: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for m in memberships:
        by_id[m["Id"].lower()] = m
        by_key[(m["AccountId"].lower(), m["LoyaltyProgramId"].lower())].append(m)
    return by_id, by_key


def _number(m: Mapping[str, Any]) -> str | None:
    return m.get("MembershipNumber") or m.get("Code") or None


def match_row(
    row: SyncRow,
    by_id: Mapping[str, Mapping[str, Any]],
    by_key: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]],
    scope: frozenset[str] | None = None,
) -> Match:
    """Match ``row`` among the memberships Mews holds (active ones, indexed by :func:`index_memberships`).

    ``scope``: the lower-case LoyaltyProgramIds a mirror covers; rows outside are rejected.
    """
    where = f"row {row.row}" + (f" (AccountId {row.account_id})" if row.account_id else "")
    if row.membership_id is not None:
        m = by_id.get(row.membership_id)
        if m is None:
            return Match(
                "rejected",
                field="LoyaltyMembershipId",
                reason=f"{where}: LoyaltyMembershipId {row.membership_id} is not an active membership in Mews "
                + ("of loyalty_program_ids " if scope is not None else "")
                + "(deleted, or never there); clear the column to add the row as new",
            )
        if row.account_id is not None and m["AccountId"].lower() != row.account_id:
            return Match(
                "rejected",
                field="AccountId",
                reason=f"{where}: membership {m['Id']} belongs to account {m['AccountId']}; Mews cannot move a "
                "membership to another account (remove it and add a new one)",
            )
        programs = {m["LoyaltyProgramId"].lower(), row.program_id or m["LoyaltyProgramId"].lower()}
        if scope is not None and not programs <= scope:
            return _out_of_scope(where, programs, scope)
        return Match("matched", m)
    if row.account_id is None or row.program_id is None:
        missing = "AccountId" if row.account_id is None else "LoyaltyProgramId"
        return Match(
            "rejected",
            field=missing,
            reason=f"{where}: {missing} is empty; a row needs AccountId and LoyaltyProgramId, "
            "or a LoyaltyMembershipId, to be matched",
        )
    if scope is not None and row.program_id not in scope:
        return _out_of_scope(where, {row.program_id}, scope)
    candidates = list(by_key.get((row.account_id, row.program_id), ()))
    number = row.fields.get("MembershipNumber")
    if number is not None:
        candidates = [m for m in candidates if _number(m) == number]
    if not candidates:
        return Match("new")
    if len(candidates) > 1:
        ids = sorted(m["Id"] for m in candidates)
        quoted = ", ".join(ids[:MAX_QUOTED]) + (
            f" and {len(ids) - MAX_QUOTED} more" if len(ids) > MAX_QUOTED else ""
        )
        key = "account, program" + (" and MembershipNumber" if number is not None else "")
        return Match(
            "rejected",
            field="LoyaltyMembershipId",
            reason=f"{where}: {len(ids)} memberships in Mews have this {key}: {quoted}; "
            "give the row a LoyaltyMembershipId (or a MembershipNumber) to say which",
        )
    return Match("matched", candidates[0])


def _out_of_scope(where: str, programs: set[str], scope: frozenset[str]) -> Match:
    outside = sorted(programs - scope)
    return Match(
        "rejected",
        field="LoyaltyProgramId",
        reason=f"{where}: LoyaltyProgramId {', '.join(outside)} is outside loyalty_program_ids "
        f"({', '.join(sorted(scope))}); a mirror changes only the programs it names",
    )


# -- diff --


def _same(field: str, ours: Any, theirs: Any) -> bool:
    if theirs is None:
        return False
    if field in ("LoyaltyProgramId", "LoyaltyTierId"):
        return str(theirs).lower() == ours
    if field == "ExpirationDate":  # a date: Mews may keep a time of day the source cannot express
        return str(theirs)[:10] == ours[:10]
    return bool(theirs == ours) and type(theirs) is type(ours)


def diff(row: SyncRow, membership: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The update values that make ``membership`` equal to ``row``: only fields that differ.

    A field the row leaves empty clears a clearable field that has a value; an absent
    column (neither in ``fields`` nor ``cleared``) is never touched.
    """
    changes: dict[str, dict[str, Any]] = {}
    for field in UPDATE_FIELDS:
        theirs = _number(membership) if field == "MembershipNumber" else membership.get(field)
        if field in row.fields:
            ours = row.fields[field]
            if not _same(field, ours, theirs):
                changes[field] = {"Value": ours}
        elif field in row.cleared and field not in NOT_CLEARABLE and theirs is not None:
            changes[field] = {"Value": None}
    return changes


def update_item(membership_id: str, changes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One ``LoyaltyMembershipUpdates`` item."""
    return {"LoyaltyMembershipId": membership_id, **changes}


# -- mirror: removals --


def removal_update(membership_id: str) -> dict[str, Any]:
    """``on_missing="cancel"``: the update that cancels a membership (Mews has no cancel operation)."""
    return {"LoyaltyMembershipId": membership_id, "State": {"Value": "Canceled"}}


def needs_removal(membership: Mapping[str, Any], on_missing: str) -> bool:
    """Whether an unmatched membership of the scope needs a write (a canceled one is already out)."""
    if on_missing == "keep":
        return False
    if on_missing == "cancel":
        return membership.get("State") != "Canceled"
    return True


_PERCENT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")


def parse_max_removals(value: Any) -> int | float:
    """``max_removals`` as an int (a count) or a float (a fraction of the scope). ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        found = _PERCENT.fullmatch(value)
        if found:
            percent = float(found.group(1))
            if percent <= 100:
                return percent / 100
        elif value.strip().isdigit():
            return int(value)
    raise ValueError(
        f"max_removals must be a count (e.g. 500) or a percentage of the scope (e.g. '5%'), got {value!r}"
    )


def removal_limit(max_removals: Any, scope_size: int) -> int:
    """Removals allowed for a scope of ``scope_size`` memberships (a percentage rounds down)."""
    parsed = parse_max_removals(max_removals)
    if isinstance(parsed, float):
        return int(parsed * scope_size + 1e-9)
    return parsed


class RemovalsRefused(ValueError):
    """The mirror would remove more than ``max_removals``: nothing is removed."""


def check_removals(count: int, scope_size: int, max_removals: Any, on_missing: str) -> None:
    """Raise :class:`RemovalsRefused`, naming the count and the limit, when ``count`` is too many."""
    limit = removal_limit(max_removals, scope_size)
    if count <= limit:
        return
    share = f" ({100 * count / scope_size:.1f}% of {scope_size})" if scope_size else ""
    verb = {"cancel": "cancel", "delete": "delete"}.get(on_missing, "remove")
    raise RemovalsRefused(
        f"the mirror would {verb} {count} memberships{share} that no source row matches, more than "
        f"max_removals={max_removals!r} allows ({limit}); nothing was changed. Check that the source "
        "describes the whole scope, or raise max_removals."
    )
