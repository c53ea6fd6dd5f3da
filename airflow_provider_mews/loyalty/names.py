"""Members as the warehouse knows them: e-mails, loyalty codes and programme/tier codes to Mews Ids.

A CRM knows a member by e-mail or loyalty code and a programme and tier by their codes;
Mews's add wants UUIDs. :func:`plan_names` finds a source's name columns (``AccountEmail``,
``AccountLoyaltyCode``, ``LoyaltyProgramCode``, ``LoyaltyTierCode``, matched like every
column). :class:`NameResolver` looks rows' names up in Mews, guests at one
``customers/getAll`` per 999 names (so a page of names that each match one profile is not
full and needs no second read), programmes and tiers once per run, and fills in the Id
columns; :class:`ResolvedSource` runs it on a thread of its own, ahead of the batches in flight. A name that gives no Id, several, or one the row's own Id contradicts fills the
cell with a :class:`~airflow_provider_mews.loyalty.normalize.RowRejected` instead: the
normalizer raises it, so the row is rejected with its reason like any invalid row, and
nothing is guessed. :func:`decide` (the matching) is pure; the I/O is behind :class:`Directory`.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
#: Names per customers/getAll, asked with Count 1000: one fewer than a page, so names that each
#: match one profile come back on a page that is not full, and need no second (empty) read to
#: prove it was the last (Mews's pagination rule). Only duplicate profiles cost a page more.
NAMES_PER_LOOKUP = MAX_FILTER - 1
#: Rows a ResolvedSource reads and looks up before the run takes them.
AHEAD_ROWS = 16 * MAX_FILTER
#: customers/getAll a ResolvedSource has in flight at once (each a slot of the token's limiter).
PARALLEL_LOOKUPS = 3
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


class LookupsStopped(Exception):
    """Internal: the run is stopping; no look-up request is sent any more."""


#: The name fields looked up with customers/getAll, and the record field each is matched on.
_GUEST_FIELDS = {"AccountEmail": "Email", "AccountLoyaltyCode": "LoyaltyCode"}

#: One fed chunk: its rows (Id columns appended) and the (name field, key) pairs it names.
_Pending = tuple[list[tuple[Any, ...]], set[tuple[str, str]]]


@dataclass
class NameResolver:
    """Fills rows' Id columns from their names, asking Mews only what it has not asked.

    Guests: rows are fed in order (:meth:`feed`, then :meth:`drain` at the end); their names
    queue up, and each ``customers/getAll`` asks the next :data:`NAMES_PER_LOOKUP` (999)
    distinct names, whatever chunk or group they came from, every page followed. A chunk comes
    back resolved once all its names were asked. E-mails are sent as the source wrote them
    (trimmed) and compared case-insensitively; an e-mail with capitals that found no profile
    is asked once more in lower case (a server that compares e-mails case-sensitively finds a
    profile stored in lower case too). Names are kept while a fed chunk still needs them, or
    for the run with ``remember`` (a mirror reads its source twice). Programmes by ``Codes`` and
    tiers by programme: once per run. ``lookups`` counts the requests (pages included).
    """

    directory: Directory
    plan: NamePlan
    chain_id: str | None = None
    remember: bool = False
    lookups: int = 0
    _guests: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (field, key) -> Ids
    _asked: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (field, key) -> forms sent
    _queue: dict[str, dict[str, None]] = field(default_factory=dict)  # field -> forms to send, in order
    _queued: dict[tuple[str, str], int] = field(default_factory=dict)  # (field, key) -> forms queued
    _refs: dict[tuple[str, str], int] = field(default_factory=dict)  # fed chunks naming (field, key)
    _pending: deque[_Pending] = field(default_factory=deque)
    _programs: dict[str, list[str]] = field(default_factory=dict)
    _program_codes: list[str] | None = None  # every programme's code: asked once, for a rejection
    _tiers: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=lambda: threading.Condition(threading.RLock()))
    _halted: Callable[[], bool] | None = None
    _pool: ThreadPoolExecutor | None = None  # asks customers/getAll in parallel when started
    _asking: int = 0  # asks in flight
    _failed: BaseException | None = None  # an ask's error, raised to the reader
    _generation: int = 0  # asks of an earlier read of the source are dropped

    def resolve(self, rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        """``rows`` (source rows) with the Id columns appended and filled in (feed and drain)."""
        self.feed(rows)
        return [row for chunk in self.drain() for row in chunk]

    def feed(self, rows: Sequence[Sequence[Any]], halted: Callable[[], bool] | None = None) -> None:
        """Take the next chunk of source rows and queue its names; send a request for each
        NAMES_PER_LOOKUP queued (on the pool when started). :meth:`ready` gives the chunks back.

        ``halted``: checked before every request; once true, :class:`LookupsStopped` is raised."""
        with self._cond:
            self._halted = halted
            pad = (None,) * (len(self.plan.names) - self.plan.width)
            out = [(*row, *pad) for row in rows]
            keys: set[tuple[str, str]] = set()
            for name_field in _GUEST_FIELDS:
                pos = self.plan.name_at.get(name_field)
                if pos is None:
                    continue
                queue = self._queue.setdefault(name_field, {})
                for form in dict.fromkeys(clean_code(row[pos]) for row in out):
                    if form is None:
                        continue
                    key = (name_field, _CLEAN[name_field](form) or "")
                    if key not in keys:
                        keys.add(key)
                        self._refs[key] = self._refs.get(key, 0) + 1
                        self._guests.setdefault(key, [])
                    if form not in self._asked.get(key, ()) and form not in queue:
                        self._enqueue(queue, key, form)
            self._pending.append((out, keys))
            self._send(final=False)

    def drain(self, halted: Callable[[], bool] | None = None) -> list[list[tuple[Any, ...]]]:
        """Ask the names still queued; return every chunk left, resolved."""
        return self.ready(block=True, final=True, halted=halted)

    def ready(
        self, block: bool = False, final: bool = False, halted: Callable[[], bool] | None = None
    ) -> list[list[tuple[Any, ...]]]:
        """The chunks whose names are all answered, resolved, in order. ``block``: wait for one
        at least (flushing a partial request when nothing else is in flight); ``final``: the
        source ended, send everything queued and wait for every chunk."""
        with self._cond:
            self._halted = halted
            done: list[list[tuple[Any, ...]]] = []
            while True:
                if self._failed is None and (final or (block and self._asking == 0)):
                    self._send(final=True)  # after a failure nothing more is asked
                done += self._ready()
                if not self._pending or (not final and (done or not block)):
                    return done
                if self._failed is not None:
                    if done:
                        return done  # the chunks answered before it; the error on the next call
                    if self._asking == 0:
                        raise self._failed
                    # Asks still in flight may answer chunks ahead of the failed one (asks run in
                    # parallel and end in any order): wait for them, so what was resolved is given.
                if halted is not None and halted():
                    raise LookupsStopped
                self._cond.wait(0.5)

    def start(self, parallel: int) -> None:
        """Ask up to ``parallel`` customers/getAll at once, on threads of their own."""
        self.reset()
        if parallel > 1:
            self._pool = ThreadPoolExecutor(parallel, thread_name_prefix="mews-names")

    def shutdown(self) -> None:
        with self._cond:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def reset(self) -> None:
        """Forget the chunks fed and not returned (a read of the source that ended early)."""
        with self._cond:
            while self._pending:
                self._release(self._pending.popleft()[1])
            self._queue.clear()
            self._queued.clear()
            self._asking = 0
            self._failed = None
            self._generation += 1

    # -- chunks --

    def _ready(self) -> list[list[tuple[Any, ...]]]:
        done = []
        while self._pending and not self._waiting(self._pending[0][1]):
            rows, keys = self._pending.popleft()
            done.append(self._fill_rows(rows))
            self._release(keys)
        return done

    def _waiting(self, keys: set[tuple[str, str]]) -> bool:
        """Whether a name of the chunk is still to be asked (in any of its forms)."""
        return any(key in self._queued for key in keys)

    def _release(self, keys: set[tuple[str, str]]) -> None:
        if self.remember:
            return
        for key in keys:
            left = self._refs.get(key, 0) - 1
            if left > 0:
                self._refs[key] = left
                continue
            self._refs.pop(key, None)
            self._guests.pop(key, None)
            self._asked.pop(key, None)

    def _fill_rows(self, out: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        at = self.plan.name_at
        self._ask_programs(self._values(out, "LoyaltyProgramCode"))
        for i, row in enumerate(out):
            cells = list(row)
            guests = [self._guest(f, cells[at[f]]) for f in _GUEST_FIELDS if f in at]
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

    def _pages(
        self, pages: Iterable[list[dict[str, Any]]], halted: Callable[[], bool] | None = None
    ) -> Iterator[dict[str, Any]]:
        """The records of ``pages``, one request each, none once the run is stopping."""
        halted = halted or self._halted
        it = iter(pages)
        while True:
            if halted is not None and halted():
                raise LookupsStopped
            page = next(it, None)
            if page is None:
                return
            with self._cond:
                self.lookups += 1
            yield from page

    @property
    def _chains(self) -> list[str] | None:
        return [self.chain_id] if self.chain_id else None

    def _send(self, final: bool) -> None:
        """Ask the queued names NAMES_PER_LOOKUP at a time (all of them when ``final``): on the
        pool when started, else at once. A form stays counted in ``_queued`` until answered."""
        for name_field, queue in self._queue.items():
            while len(queue) >= NAMES_PER_LOOKUP or (final and queue):
                part = list(itertools.islice(queue, NAMES_PER_LOOKUP))
                clean = _CLEAN[name_field]
                for form in part:
                    del queue[form]
                    key = (name_field, clean(form) or "")
                    self._asked.setdefault(key, set()).add(form)
                    self._guests.setdefault(key, [])
                if self._pool is None:
                    self._record(name_field, part, self._fetch(name_field, part, self._halted))
                    continue
                self._asking += 1
                self._pool.submit(self._ask, name_field, part, self._halted, self._generation)

    def _ask(
        self, name_field: str, forms: list[str], halted: Callable[[], bool] | None, generation: int
    ) -> None:
        """One ask on a pool thread: the request without the lock, its answer recorded with it."""
        try:
            records = self._fetch(name_field, forms, halted)
        except BaseException as exc:  # any error: raised to the reader by ready()
            with self._cond:
                if generation == self._generation:
                    self._asking -= 1
                    self._failed = self._failed or exc
                    self._cond.notify_all()
            return
        with self._cond:
            if generation == self._generation:
                self._asking -= 1
                self._record(name_field, forms, records)
                self._cond.notify_all()

    def _fetch(
        self, name_field: str, forms: list[str], halted: Callable[[], bool] | None
    ) -> list[dict[str, Any]]:
        """One customers/getAll for ``forms``, every page followed."""
        if name_field == "AccountEmail":
            pages = self.directory.get_customers(emails=forms, chain_ids=self._chains)
        else:
            pages = self.directory.get_customers(loyalty_codes=forms, chain_ids=self._chains)
        return list(self._pages(pages, halted))

    def _record(self, name_field: str, forms: list[str], records: list[dict[str, Any]]) -> None:
        """The profiles found for ``forms`` by their key; an e-mail with capitals that found
        nobody is queued again in lower case."""
        clean = _CLEAN[name_field]
        record = _GUEST_FIELDS[name_field]
        for customer in records:
            ids = self._guests.get((name_field, clean(customer.get(record)) or ""))
            cid = str(customer["Id"]).lower()
            if ids is not None and cid not in ids:
                ids.append(cid)
        queue = self._queue[name_field]
        for form in forms:
            key = (name_field, clean(form) or "")
            if name_field == "AccountEmail":
                lower = key[1]
                if not self._guests.get(key) and lower not in self._asked.get(key, ()) and lower not in queue:
                    self._enqueue(queue, key, lower)
            left = self._queued.get(key, 0) - 1
            if left > 0:
                self._queued[key] = left
            else:
                self._queued.pop(key, None)

    def _enqueue(self, queue: dict[str, None], key: tuple[str, str], form: str) -> None:
        queue[form] = None
        self._queued[key] = self._queued.get(key, 0) + 1

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
            tiers = {}
            for tier in self._pages(
                self.directory.get_loyalty_tiers(loyalty_program_ids=[program_id], chain_ids=self._chains)
            ):
                code = clean_code(tier.get("Code"))
                if code is not None:
                    tiers.setdefault(code, []).append(str(tier["Id"]).lower())
            self._tiers[program_id] = tiers
        return tiers


# -- the source the run reads --


class ResolvedSource:
    """A run's source whose rows come with their Id columns filled in from their names.

    The source is read by the caller's thread, as before; the guests' look-ups run on up to
    ``parallel`` threads of their own, ahead of the rows the run is sending: up to
    ``ahead_rows`` rows are read and their names asked before the run takes them, so the next
    names are looked up while the batches before them are in flight, and the token's budget
    serves adds and look-ups without a gap. Chunks come out whole and in order; which names
    go in which request depends only on the source's order, and a row's Ids only on what Mews
    holds for its names. ``stop`` (the run's event): once set, no look-up request is sent any more
    and no further chunk is given; a look-up's error is raised to the reader with its chunk.
    """

    def __init__(
        self,
        source: Any,
        resolver: NameResolver,
        ahead_rows: int = AHEAD_ROWS,
        parallel: int = PARALLEL_LOOKUPS,
    ) -> None:
        self.source = source
        self.resolver = resolver
        self.ahead_rows = ahead_rows
        self.parallel = parallel
        self.stop: threading.Event | None = None
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
        closed = threading.Event()
        run_stop = self.stop

        def halted() -> bool:
            return closed.is_set() or (run_stop is not None and run_stop.is_set())

        ahead = 0  # rows handed to the look-ups and not yet given to the run
        self.resolver.start(self.parallel)
        try:
            for chunk in self.source.chunks():
                if halted():
                    return
                self.resolver.feed(chunk, halted)
                ahead += len(chunk)
                if ahead < self.ahead_rows:
                    continue  # read on: the look-ups stay ahead_rows ahead of the run
                for rows in self.resolver.ready(block=True, halted=halted):
                    if halted():
                        return
                    ahead -= len(rows)
                    yield rows
            while resolved := self.resolver.drain(halted):
                for rows in resolved:
                    if halted():
                        return
                    yield rows
        except LookupsStopped:
            return
        finally:
            closed.set()
            self.resolver.shutdown()

    def count(self) -> int | None:
        return self.source.count()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.source.close()
