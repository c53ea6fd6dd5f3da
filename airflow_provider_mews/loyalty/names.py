"""Members as the warehouse knows them: e-mails, loyalty codes and programme/tier codes to Mews Ids.

A CRM knows a member by e-mail or loyalty code and a programme and tier by their codes;
Mews's add wants UUIDs. :func:`plan_names` finds a source's name columns (``AccountEmail``,
``AccountLoyaltyCode``, ``LoyaltyProgramCode``, ``LoyaltyTierCode``, matched like every
column). :class:`NameResolver` looks a group of rows' names up in Mews, guests at one
``customers/getAll`` per 1000 names, programmes and tiers once per run, and fills in the Id
columns. A name that gives no Id, several, or one the row's own Id contradicts fills the
cell with a :class:`~airflow_provider_mews.loyalty.normalize.RowRejected` instead: the
normalizer raises it, so the row is rejected with its reason like any invalid row, and
nothing is guessed. :func:`decide` (the matching) is pure; the I/O is behind :class:`Directory`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from airflow_provider_mews.loyalty.normalize import (
    _FIELD_BY_KEY,
    SYNONYMS,
    ColumnPlan,
    RowRejected,
    to_uuid,
)

#: Name fields a row may carry instead of an Id, and the Id each names.
NAME_FIELDS = {
    "AccountEmail": "AccountId",
    "AccountLoyaltyCode": "AccountId",
    "LoyaltyProgramCode": "LoyaltyProgramId",
    "LoyaltyTierCode": "LoyaltyTierId",
}
#: getAll filters take at most 1000 values.
MAX_FILTER = 1000
#: Candidate Ids or codes quoted in a rejection.
MAX_QUOTED = 5

_NAME_BY_KEY = {f.lower(): f for f in NAME_FIELDS}
#: (one, several) of what a name field names, as a rejection says it.
_WHAT = {
    "AccountEmail": ("Mews customer with e-mail", "Mews customers have e-mail"),
    "AccountLoyaltyCode": ("Mews customer with loyalty code", "Mews customers have loyalty code"),
    "LoyaltyProgramCode": ("Mews loyalty programme with code", "Mews loyalty programmes have code"),
    "LoyaltyTierCode": ("tier with code", "tiers have code"),
}


def _key(name: str) -> str:
    return name.replace("_", "").replace(" ", "").replace("-", "").lower()


def _quoted(values: Sequence[str]) -> str:
    shown = ", ".join(values[:MAX_QUOTED])
    return shown + (f" and {len(values) - MAX_QUOTED} more" if len(values) > MAX_QUOTED else "")


# -- columns --


@dataclass(frozen=True)
class NamePlan:
    """Where a source's names are, and the Id columns they fill (the source's own, or appended).

    The run plans its columns over ``masked`` (name columns hidden from the Mews field
    matching) with ``field_map`` (the name entries taken out); :meth:`restore` puts the real
    column names back for the rejections' row data.
    """

    names: tuple[str, ...]  # the columns of a resolved row: the source's, then the appended Id columns
    masked: tuple[str, ...]
    field_map: dict[str, str]
    width: int  # columns of a source row
    name_at: dict[str, int]  # name field -> position in the row
    id_at: dict[str, int]  # Id field -> position in the resolved row
    program_at: int | None = None  # the LoyaltyProgramId a tier code is looked up in

    @property
    def used(self) -> bool:
        return bool(self.name_at)

    def restore(self, plan: ColumnPlan) -> ColumnPlan:
        """``plan`` (made over ``masked``) with the real column names, name columns not "ignored"."""
        if not self.used:
            return plan
        return dataclasses.replace(
            plan, names=self.names, ignored=tuple(n for n in plan.ignored if not n.startswith("\x00"))
        )


def plan_names(columns: Sequence[str], field_map: Mapping[str, str] | None = None) -> NamePlan:
    """Find the name columns of ``columns`` (by name, or named in ``field_map``). Raises
    ``ValueError`` for a ``field_map`` naming a missing column or two columns for one name."""
    fm = dict(field_map or {})
    lowered = {c.lower(): pos for pos, c in enumerate(columns)}
    mapped = {s.lower() for s in fm}
    name_at: dict[str, int] = {}

    def take(name_field: str, pos: int) -> None:
        if name_field in name_at:
            raise ValueError(
                f"columns {columns[name_at[name_field]]!r} and {columns[pos]!r} both map to {name_field}; "
                "drop one from the query or map one elsewhere with field_map"
            )
        name_at[name_field] = pos

    for source, target in list(fm.items()):
        name_field = _NAME_BY_KEY.get(_key(target))
        if name_field is None:
            continue
        pos = lowered.get(source.lower())
        if pos is None:
            raise ValueError(
                f"field_map names column {source!r}, which the source does not have (columns: {', '.join(columns)})"
            )
        take(name_field, pos)
        del fm[source]
    for pos, column in enumerate(columns):
        name_field = _NAME_BY_KEY.get(_key(column))
        if name_field is not None and column.lower() not in mapped:
            take(name_field, pos)
    id_at: dict[str, int] = {}
    extra: list[str] = []
    for id_field in dict.fromkeys(NAME_FIELDS[n] for n in name_at):
        pos = _column_of(columns, fm, id_field)
        if pos is None:
            pos = len(columns) + len(extra)
            extra.append(id_field)
        id_at[id_field] = pos
    hidden = set(name_at.values())
    masked = tuple(f"\x00{pos}" if pos in hidden else c for pos, c in enumerate(columns))
    return NamePlan(
        names=(*columns, *extra),
        masked=(*masked, *extra),
        field_map=fm,
        width=len(columns),
        name_at=name_at,
        id_at=id_at,
        program_at=id_at.get("LoyaltyProgramId", _column_of(masked, fm, "LoyaltyProgramId")),
    )


def _column_of(columns: Sequence[str], field_map: Mapping[str, str], mews_field: str) -> int | None:
    """The position of the column that feeds ``mews_field`` as the column plan will match it."""
    mapped = {s.lower(): t for s, t in field_map.items()}
    for pos, column in enumerate(columns):
        target = mapped.get(column.lower(), column)
        if (_FIELD_BY_KEY.get(_key(target)) or SYNONYMS.get(_key(target))) == mews_field:
            return pos
    return None


# -- the decision (pure) --


@dataclass(frozen=True)
class Named:
    """One name a row gives for an Id, and the Ids Mews has for it."""

    name_field: str
    value: str
    ids: tuple[str, ...]
    known: tuple[str, ...] = ()  # the codes Mews has instead (an unknown programme or tier code)
    within: str | None = None  # the programme of a tier code


def decide(id_field: str, given: str | None, named: Sequence[Named]) -> str | RowRejected | None:
    """The Id a row means: ``given`` (its own Id, lower case) and every name must agree on one.

    None when the row names nothing. A name with no Id, or several with no ``given`` Id or
    other name to pick one, or names that disagree: a RowRejected naming the candidates.
    """
    if not named:
        return given
    for n in named:
        if not n.ids:
            return RowRejected(n.name_field, _unknown(n, id_field if given is None else None))
    candidates = set(named[0].ids) if given is None else {given}
    for n in named:
        if not candidates & set(n.ids):
            return RowRejected(n.name_field, _disagree(id_field, given, named, n))
        candidates &= set(n.ids)
    if len(candidates) > 1:
        return RowRejected(named[0].name_field, _ambiguous(named, sorted(candidates)))
    return candidates.pop()


def _unknown(n: Named, id_field: str | None) -> str:
    """No Id for the name; ``id_field``: the Id the row could give instead (it has none)."""
    where = f" in loyalty programme {n.within}" if n.within else ""
    if n.name_field in ("LoyaltyProgramCode", "LoyaltyTierCode"):
        codes = f"codes in Mews: {_quoted(sorted(n.known))}" if n.known else "Mews has none"
        return f"no {_WHAT[n.name_field][0]} {n.value!r}{where} ({codes}); fix the code"
    instead = f", or give the row its {id_field}" if id_field else ""
    what = "e-mail" if n.name_field == "AccountEmail" else "loyalty code"
    return f"no {_WHAT[n.name_field][0]} {n.value!r}; fix the {what} or create the guest in Mews{instead}"


def _ambiguous(named: Sequence[Named], ids: list[str]) -> str:
    n = named[0]
    fix = (
        "merge the duplicate profiles in Mews, or give the row its AccountId"
        if n.name_field.startswith("Account")
        else "give the row the Id"
    )
    return f"{len(ids)} {_WHAT[n.name_field][1]} {n.value!r}: {_quoted(ids)}; nothing is guessed: {fix}"


def _disagree(id_field: str, given: str | None, named: Sequence[Named], n: Named) -> str:
    theirs = _quoted(sorted(n.ids))
    if given is not None:
        return f"{id_field} {given} disagrees with {n.name_field} {n.value!r}, which is {theirs}; fix either"
    first = named[0]
    return (
        f"{first.name_field} {first.value!r} is {_quoted(sorted(first.ids))} but {n.name_field} "
        f"{n.value!r} is {theirs}; fix either"
    )


def clean_email(value: Any) -> str | None:
    """An e-mail as compared: trimmed, lower case; None when empty."""
    text = str(value).strip().lower() if value is not None else ""
    return text or None


def clean_code(value: Any) -> str | None:
    """A loyalty, programme or tier code as compared: trimmed, exact; None when empty."""
    text = str(value).strip() if value is not None else ""
    return text or None


# -- the look-ups --


class Directory(Protocol):
    """What the resolver reads (the hook): getAll pages, one request each."""

    def get_customers(
        self,
        *,
        emails: Iterable[str] | None = None,
        loyalty_codes: Iterable[str] | None = None,
        chain_ids: Iterable[str] | None = None,
    ) -> Iterable[list[dict[str, Any]]]: ...
    def get_loyalty_programs(
        self, *, codes: Iterable[str] | None = None, chain_ids: Iterable[str] | None = None
    ) -> Iterable[list[dict[str, Any]]]: ...
    def get_loyalty_tiers(
        self, *, loyalty_program_ids: Iterable[str], chain_ids: Iterable[str] | None = None
    ) -> Iterable[list[dict[str, Any]]]: ...


_CLEAN = {
    "AccountEmail": clean_email,
    "AccountLoyaltyCode": clean_code,
    "LoyaltyProgramCode": clean_code,
    "LoyaltyTierCode": clean_code,
}


@dataclass
class NameResolver:
    """Fills a group of rows' Id columns from their names, asking Mews only what it has not asked.

    Guests: one ``customers/getAll`` per 1000 distinct names of a group, every page followed;
    kept for the run with ``remember`` (a mirror reads its source twice), else for the group.
    Programmes by ``Codes`` and tiers by programme: once per run. ``lookups`` counts the requests.
    """

    directory: Directory
    plan: NamePlan
    chain_id: str | None = None
    remember: bool = False
    lookups: int = 0
    _guests: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    _programs: dict[str, list[str]] = field(default_factory=dict)
    _program_codes: list[str] | None = None  # every programme's code: asked once, for a rejection
    _tiers: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def resolve(self, rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        """``rows`` (source rows) with the Id columns appended and filled in."""
        pad = (None,) * (len(self.plan.names) - self.plan.width)
        out = [(*row, *pad) for row in rows]
        if not self.remember:
            self._guests.clear()
        at = self.plan.name_at
        self._ask_guests("AccountEmail", self._values(out, "AccountEmail"))
        self._ask_guests("AccountLoyaltyCode", self._values(out, "AccountLoyaltyCode"))
        self._ask_programs(self._values(out, "LoyaltyProgramCode"))
        for i, row in enumerate(out):
            cells = list(row)
            guests = [self._guest(f, cells[at[f]]) for f in ("AccountEmail", "AccountLoyaltyCode") if f in at]
            if guests:
                self._fill(cells, "AccountId", guests)
            if "LoyaltyProgramCode" in at:
                self._fill(cells, "LoyaltyProgramId", [self._program(cells[at["LoyaltyProgramCode"]])])
            if "LoyaltyTierCode" in at:
                self._fill(cells, "LoyaltyTierId", [self._tier(cells)])
            out[i] = tuple(cells)
        return out

    # -- per row --

    def _fill(self, cells: list[Any], id_field: str, named: list[Named | None]) -> None:
        given_at = self.plan.id_at[id_field]
        raw = cells[given_at]
        given: str | None = None
        if raw is not None and raw != "" and not isinstance(raw, RowRejected):
            try:
                given = to_uuid(id_field)(raw)
            except RowRejected:
                return  # not a UUID: the normalizer rejects it
        decided = decide(id_field, given, [n for n in named if n is not None])
        if decided is not None:
            cells[given_at] = decided

    def _guest(self, name_field: str, value: Any) -> Named | None:
        clean = _CLEAN[name_field](value)
        if clean is None:
            return None
        return Named(name_field, clean, tuple(self._guests.get((name_field, clean), ())))

    def _program(self, value: Any) -> Named | None:
        code = clean_code(value)
        if code is None:
            return None
        ids = tuple(self._programs.get(code, ()))
        return Named("LoyaltyProgramCode", code, ids, () if ids else tuple(self._all_program_codes()))

    def _tier(self, cells: list[Any]) -> Named | None:
        code = clean_code(cells[self.plan.name_at["LoyaltyTierCode"]])
        program = self._program_of(cells)
        if code is None or program is None:
            return None  # no tier named, or the row's programme is unknown (rejected for that)
        tiers = self._tiers_of(program)
        ids = tuple(tiers.get(code, ()))
        return Named("LoyaltyTierCode", code, ids, () if ids else tuple(sorted(tiers)), program)

    def _program_of(self, cells: list[Any]) -> str | None:
        pos = self.plan.program_at
        value = None if pos is None else cells[pos]
        if value is None or value == "" or isinstance(value, RowRejected):
            return None
        try:
            return to_uuid("LoyaltyProgramId")(value)
        except RowRejected:
            return None

    def _values(self, rows: Sequence[Sequence[Any]], name_field: str) -> list[str]:
        pos = self.plan.name_at.get(name_field)
        if pos is None:
            return []
        clean = _CLEAN[name_field]
        return [v for v in dict.fromkeys(clean(r[pos]) for r in rows) if v is not None]

    # -- Mews --

    def _pages(self, pages: Iterable[list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        for page in pages:
            self.lookups += 1
            yield from page

    @property
    def _chains(self) -> list[str] | None:
        return [self.chain_id] if self.chain_id else None

    def _ask_guests(self, name_field: str, values: list[str]) -> None:
        """One customers/getAll per 1000 names not asked yet (more only for further pages)."""
        missing = [v for v in values if (name_field, v) not in self._guests]
        record = "Email" if name_field == "AccountEmail" else "LoyaltyCode"
        clean = _CLEAN[name_field]
        for start in range(0, len(missing), MAX_FILTER):
            part = missing[start : start + MAX_FILTER]
            for v in part:
                self._guests[(name_field, v)] = []
            if name_field == "AccountEmail":
                pages = self.directory.get_customers(emails=part, chain_ids=self._chains)
            else:
                pages = self.directory.get_customers(loyalty_codes=part, chain_ids=self._chains)
            for customer in self._pages(pages):
                ids = self._guests.get((name_field, clean(customer.get(record)) or ""))
                cid = str(customer["Id"]).lower()
                if ids is not None and cid not in ids:
                    ids.append(cid)

    def _ask_programs(self, codes: list[str]) -> None:
        missing = [c for c in codes if c not in self._programs]
        for start in range(0, len(missing), MAX_FILTER):
            part = missing[start : start + MAX_FILTER]
            for c in part:
                self._programs[c] = []
            for program in self._pages(
                self.directory.get_loyalty_programs(codes=part, chain_ids=self._chains)
            ):
                ids = self._programs.get(clean_code(program.get("Code")) or "")
                if ids is not None and str(program["Id"]).lower() not in ids:
                    ids.append(str(program["Id"]).lower())

    def _all_program_codes(self) -> list[str]:
        """Every programme's code, asked once per run (only to say which codes exist)."""
        if self._program_codes is None:
            found = self._pages(self.directory.get_loyalty_programs(chain_ids=self._chains))
            self._program_codes = sorted({str(p.get("Code")) for p in found if p.get("Code")})
        return self._program_codes

    def _tiers_of(self, program_id: str) -> dict[str, list[str]]:
        """The programme's tiers by code, asked once per run and programme."""
        tiers = self._tiers.get(program_id)
        if tiers is None:
            tiers = self._tiers[program_id] = {}
            for tier in self._pages(
                self.directory.get_loyalty_tiers(loyalty_program_ids=[program_id], chain_ids=self._chains)
            ):
                code = clean_code(tier.get("Code"))
                if code is not None:
                    tiers.setdefault(code, []).append(str(tier["Id"]).lower())
        return tiers


# -- the source the run reads --


class ResolvedSource:
    """A run's source whose rows come with their Id columns filled in from their names.

    Rows are resolved in groups of at least ``group_rows`` (whole chunks), so a small
    ``batch_size`` still costs one guest look-up per 1000 rows.
    """

    def __init__(self, source: Any, resolver: NameResolver, group_rows: int = MAX_FILTER) -> None:
        self.source = source
        self.resolver = resolver
        self.group_rows = group_rows
        self.columns = resolver.plan.names
        self.description = f"{source.description} (members named by {', '.join(resolver.plan.name_at)})"

    @property
    def total(self) -> int | None:
        return self.source.total  # type: ignore[no-any-return]

    @total.setter
    def total(self, value: int | None) -> None:
        self.source.total = value

    @property
    def lookups(self) -> int:
        """Look-up requests sent so far (pages included)."""
        return self.resolver.lookups

    def chunks(self) -> Iterator[list[tuple[Any, ...]]]:
        group: list[Sequence[Sequence[Any]]] = []
        size = 0
        for chunk in self.source.chunks():
            group.append(chunk)
            size += len(chunk)
            if size >= self.group_rows:
                yield from self._resolved(group)
                group, size = [], 0
        yield from self._resolved(group)

    def _resolved(self, group: list[Sequence[Sequence[Any]]]) -> Iterator[list[tuple[Any, ...]]]:
        if not group:
            return
        rows = self.resolver.resolve([row for chunk in group for row in chunk])
        start = 0
        for chunk in group:
            yield rows[start : start + len(chunk)]
            start += len(chunk)

    def count(self) -> int | None:
        return self.source.count()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.source.close()
