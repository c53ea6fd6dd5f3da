"""One batch of source rows through Mews: check, add, isolate refused rows, reconcile doubt.

A :class:`Batch` is ``batch_size`` consecutive source rows, already normalized (rows that
could not be are rejected locally and never sent). :class:`BatchSender` takes one batch
to its end in a worker thread and returns a :class:`BatchResult` that accounts for every
row: added, skipped_existing, rejected, or unfinished (when the run is stopping).
It never raises for a Mews error: a fatal one is returned with the partial result, so
what was already added is always reported.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from airflow_provider_mews.exceptions import MewsCallStopped, MewsError
from airflow_provider_mews.loyalty.normalize import ColumnPlan, RowRejected, normalize_many, readable_account
from airflow_provider_mews.loyalty.reconcile import find_existing, find_stored
from airflow_provider_mews.runs.outputs import Outcome, Rejection

#: Statuses by which Mews refuses a batch because of (some of) its rows.
ROW_REFUSALS = (400, 403)
#: Rounds of "may have been stored -> reconcile -> resend" before giving up to an Airflow retry.
MAX_DOUBT_ROUNDS = 3
#: Most requests one isolation sends at once (its parts of a round); fewer when the token's
#: rate is low: a tenth of its requests per period (a window of a tenth), at least 2.
ISOLATION_WIDTH = 8

T = TypeVar("T")


class StopRun(Exception):
    """Internal: the run is stopping; leave the rest of this batch unfinished."""


def is_row_refusal(exc: MewsError) -> bool:
    """Mews refused the request because of (some of) its rows and processed none of it."""
    return exc.status in ROW_REFUSALS and not exc.may_have_been_processed


def isolate_refusals(
    items: Sequence[T],
    send: Callable[[list[T]], MewsError | None],
    refused: Callable[[T, MewsError], None],
    stop: threading.Event | None = None,
    *,
    width: int = 1,
) -> None:
    """Send ``items`` as one request; when Mews refuses it for its rows, send its parts again
    until every refused item is alone, and hand that item to ``refused``.

    Mews answers a refused batch with one message for the whole request, so splitting is the
    only way to learn which rows it meant. With ``width`` 1 a refused group is halved and the
    halves leave one after the other, depth first (r refused rows of n cost about 2·r·log2(n)
    requests, in a chain). With a larger ``width`` the search goes by rounds: the parts of a
    round leave at once (each in its own thread, under the hook's rate limiter)
    and each refused group is split into ``width // refused groups`` parts (at least 2), so a
    few refused rows among n take about log(n) / log(width / r) rounds instead of a chain. When
    most parts of a round of 4 or more are refused (many refused rows: parallel parts would mostly be
    refused too, and the rejection budget may stop the run soon), the rest goes depth first,
    as with ``width`` 1. Every accepted row is sent once either way. ``send`` records what it
    sent and returns None, or returns the refusal (:func:`is_row_refusal`) and records nothing;
    any other error it raises (in a round, after the round's other parts ended). ``send`` and
    ``refused`` must be thread-safe when ``width`` > 1. ``stop`` is checked before each send and
    each hand-over.
    """
    level = [list(items)] if items else []
    while level and width > 1:
        _check(stop)
        answers = _send_round(level, send, width)
        refused_groups = [(group, refusal) for group, refusal in zip(level, answers, strict=True) if refusal]
        dense = len(level) >= 4 and 2 * len(refused_groups) > len(level)
        parts = 2 if dense else max(2, width // max(1, len(refused_groups)))
        level = []
        for group, refusal in refused_groups:
            if len(group) == 1:
                _check(stop)
                refused(group[0], refusal)
            else:
                level += _split(group, parts)
        if dense:
            break
    stack = level[::-1]  # depth first, in source order
    while stack:
        group = stack.pop()
        _check(stop)
        answer = send(group)
        if answer is None:
            continue
        if len(group) == 1:
            refused(group[0], answer)
        else:
            half = len(group) // 2
            stack += [group[half:], group[:half]]


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise StopRun


def _split(group: list[T], parts: int) -> list[list[T]]:
    """``group`` in ``parts`` (at most one per item) consecutive parts of nearly equal size."""
    parts = min(parts, len(group))
    size, extra = divmod(len(group), parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        out.append(group[start:stop])
        start = stop
    return out


def _send_round(
    level: list[list[T]], send: Callable[[list[T]], MewsError | None], width: int
) -> list[MewsError | None]:
    """Send every group of a round, at once when ``width`` > 1; the answers in order."""
    if width <= 1 or len(level) == 1:
        return [send(group) for group in level]
    answers: list[MewsError | None] = [None] * len(level)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            answers[i] = send(level[i])
        except BaseException as exc:  # raised in the caller's thread once the round has ended
            errors.append(exc)

    # A round holds at most max(width, 4) parts (isolate_refusals goes depth first when most
    # of a round's parts are refused); more would leave in waves.
    wave = max(width, 4)
    for first in range(0, len(level), wave):
        threads = [
            threading.Thread(target=one, args=(i,), name=f"mews-isolate-{i}", daemon=True)
            for i in range(first, min(len(level), first + wave))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            break
    if errors:
        real = [e for e in errors if not isinstance(e, (StopRun, MewsCallStopped))]
        raise (real or errors)[0]
    return answers


@dataclass
class Batch:
    index: int
    first_row: int  # 1-based position of the first source row
    last_row: int
    items: list[dict[str, Any]]  # valid memberships, ready to send
    item_rows: list[int]  # source row of each item
    rejected: list[Rejection]  # rows that failed normalization
    fingerprint: str

    @property
    def size(self) -> int:
        return self.last_row - self.first_row + 1


def build_batch(
    index: int, first_row: int, plan: ColumnPlan, rows: Sequence[Sequence[Any]], keep_row_json: bool
) -> Batch:
    """Normalize a chunk of source rows (pure: no I/O)."""
    normalized = normalize_many(plan, rows)
    last_row = first_row + len(rows) - 1
    if not any(isinstance(item, RowRejected) for item in normalized):  # the usual batch: all valid
        items: list[dict[str, Any]] = normalized  # type: ignore[assignment]
        identities: list[str] = [""] * (3 * len(items))  # (account, program, code) per item, as below
        identities[0::3] = [item["AccountId"] for item in items]
        identities[1::3] = [item["LoyaltyProgramId"] for item in items]
        identities[2::3] = [item.get("Code") or "" for item in items]
        item_rows = list(range(first_row, last_row + 1))
        return Batch(index, first_row, last_row, items, item_rows, [], _fingerprint(identities))
    items = []
    item_rows = []
    rejected: list[Rejection] = []
    identities = []  # fingerprint input, hashed once per batch
    for offset, item in enumerate(normalized):
        row_no = first_row + offset
        if isinstance(item, RowRejected):
            values = rows[offset]
            account = readable_account(plan, values)
            where = f"row {row_no}" + (f" (AccountId {account})" if account else "")
            rejected.append(
                Rejection(
                    row_no,
                    account,
                    item.field,
                    f"{where}: {item}",
                    None,
                    _row_json(plan.names, values) if keep_row_json else None,
                )
            )
            identities.append(f"!{row_no}")
            continue
        items.append(item)
        item_rows.append(row_no)
        identities += (item["AccountId"], item["LoyaltyProgramId"], item.get("Code") or "")
    return Batch(index, first_row, last_row, items, item_rows, rejected, _fingerprint(identities))


def _fingerprint(identities: list[str]) -> str:
    """The batch's rows, in order, as 24 hex digits (valid rows by identity, rejected by position)."""
    return hashlib.blake2b("\x1f".join(identities).encode(), digest_size=12).hexdigest()


def _row_json(names: Sequence[str], values: Sequence[Any]) -> str:
    return json.dumps(dict(zip(names, values, strict=False)), default=str)[:4000]


class BatchResult:
    """What became of a batch's rows. Outcomes are kept as groups of item positions and built
    as :class:`Outcome` rows only when read (an output writes them): a load without outputs
    pays per batch, not per row."""

    def __init__(self, batch: Batch, rejected: list[Rejection] | None = None) -> None:
        self.batch = batch
        self.rejected: list[Rejection] = rejected if rejected is not None else []
        self.reconciled = 0  # rows found already stored while reconciling
        self.error: MewsError | None = None
        self.added = 0
        self.skipped = 0
        # (item positions, their Mews Ids or None, outcome) in the order taken
        self._groups: list[tuple[list[int], Sequence[str | None], str]] = []
        self._outcomes: list[Outcome] | None = None
        #: The parts of an isolation record their outcomes from several threads at once.
        self.lock = threading.RLock()

    def take(self, positions: list[int], ids: Sequence[str | None], outcome: str) -> None:
        """Items at ``positions`` (of ``batch.items``) reached ``outcome``; ``ids`` pairs them."""
        if outcome not in ("added", "skipped_existing"):
            raise ValueError(f"an add batch's rows are added or skipped_existing, not {outcome!r}")
        with self.lock:
            self._groups.append((positions, ids, outcome))
            self._outcomes = None
            if outcome == "added":
                self.added += len(positions)
            else:
                self.skipped += len(positions)

    @property
    def outcomes(self) -> list[Outcome]:
        if self._outcomes is None:
            items, rows = self.batch.items, self.batch.item_rows
            self._outcomes = [
                Outcome(
                    rows[p],
                    item["AccountId"],
                    item["LoyaltyProgramId"],
                    item.get("Code"),
                    mid,
                    outcome,
                    None,
                    item.get("LoyaltyTierId"),
                )
                for positions, ids, outcome in self._groups
                for p, mid in zip(positions, ids, strict=True)
                for item in (items[p],)
            ]
        return self._outcomes

    @property
    def unfinished(self) -> int:
        """Rows not taken to an end because the run is stopping or Mews failed."""
        return self.batch.size - self.added - self.skipped - len(self.rejected)

    @property
    def complete(self) -> bool:
        return self.error is None and self.unfinished == 0


def isolation_width_for(hook: Any, max_active_requests: int | None = None) -> int:
    """Parts an isolation sends at once: a tenth of the token's requests per period (a window of
    a tenth leaves at once), 2 to ``ISOLATION_WIDTH``, and no more than ``max_active_requests``
    (1: one request at a time, halves one after the other)."""
    limit = getattr(getattr(hook, "limiter", None), "max_requests", None)
    width = max(2, min(ISOLATION_WIDTH, limit // 10 if isinstance(limit, int) else ISOLATION_WIDTH))
    return width if max_active_requests is None else max(1, min(width, max_active_requests))


class RejectionBudget:
    """Rows that may be rejected before the run stops; shared by all worker threads."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.used = 0
        self._lock = threading.Lock()

    def spend(self, count: int) -> None:
        with self._lock:
            self.used += count

    @property
    def exceeded(self) -> bool:
        return self.used > self.allowed


class BatchSender:
    """Takes batches through Mews with one hook; safe to call from several threads."""

    def __init__(
        self,
        hook: Any,
        *,
        if_exists: str,
        chain_id: str | None,
        budget: RejectionBudget,
        stop: threading.Event,
        clock_skew: timedelta = timedelta(minutes=5),
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        known_refusals: Callable[[Batch], dict[int, tuple[Any, ...]]] | None = None,
        on_refused: Callable[[Batch, int, MewsError], None] | None = None,
        isolation_width: int | None = None,
    ) -> None:
        self.hook = hook
        self.if_exists = if_exists
        self.chain_id = chain_id
        self.budget = budget
        self.stop = stop
        self.clock_skew = clock_skew
        self.now = now
        #: Rows an earlier try proved refused (source row -> status, request_id, message), and
        #: where to note each refusal as it is proven: an interrupted isolation is not redone.
        self.known_refusals = known_refusals
        self.on_refused = on_refused
        #: Requests an isolation sends at once (:func:`isolate_refusals`); by default
        #: :func:`isolation_width`. 1 halves a refused group and sends the halves one after the other.
        self.isolation_width = max(
            1, isolation_width if isolation_width is not None else isolation_width_for(hook)
        )
        # if_exists="skip": (account, program) of rows being checked or added by a batch in flight,
        # so that the same membership in two concurrent batches is added once (getAll can't see it yet).
        self._in_flight: set[tuple[str, str]] = set()
        self._in_flight_lock = threading.Lock()

    def run(self, batch: Batch, stored_since: datetime | None = None) -> BatchResult:
        """Take ``batch`` to its end. ``stored_since``: an earlier try may have sent it since then."""
        result = BatchResult(batch, rejected=list(batch.rejected))
        pending = list(range(len(batch.items)))
        claimed: list[tuple[str, str]] = []
        try:
            if stored_since is not None and pending:
                found = find_stored(self.hook, batch.items, stored_since - self.clock_skew, self._until())
                self._take(result, pending, found, "added")
                result.reconciled += len(found)
            if self.known_refusals is not None and pending:
                self._reject_known(result, pending, self.known_refusals(batch))
            if self.if_exists == "skip" and pending:
                pending = self._drop_duplicates(batch, pending, result)
                pending = self._claim(batch, pending, result, claimed)
                existing = find_existing(self.hook, [batch.items[p] for p in pending]) if pending else {}
                self._take(
                    result, pending, {pending[i]: mid for i, mid in existing.items()}, "skipped_existing"
                )
            self._send(result, pending)
        except (StopRun, MewsCallStopped):  # the run is stopping: this batch stays unfinished
            pass
        except MewsError as exc:
            result.error = exc
        finally:
            with self._in_flight_lock:
                self._in_flight.difference_update(claimed)
        return result

    def _claim(
        self, batch: Batch, pending: list[int], result: BatchResult, claimed: list[tuple[str, str]]
    ) -> list[int]:
        """Skip rows another batch in flight is adding; claim the others until this batch ends."""
        keep: list[int] = []
        with self._in_flight_lock:
            for pos in pending:
                item = batch.items[pos]
                key = (item["AccountId"], item["LoyaltyProgramId"])
                if key in self._in_flight:
                    result.take([pos], [None], "skipped_existing")
                else:
                    self._in_flight.add(key)
                    claimed.append(key)
                    keep.append(pos)
        return keep

    def _until(self) -> datetime:
        return self.now() + self.clock_skew

    @staticmethod
    def _take(result: BatchResult, pending: list[int], found: dict[int, str], outcome: str) -> None:
        """Positions in ``found`` (position -> Mews Id) reached ``outcome`` and leave ``pending``."""
        if not found:
            return
        positions = sorted(found)
        result.take(positions, [found[p] for p in positions], outcome)
        if len(found) == len(pending):
            pending.clear()  # all of them (the usual add): no per-row filtering
        else:
            pending[:] = [p for p in pending if p not in found]

    @staticmethod
    def _drop_duplicates(batch: Batch, pending: list[int], result: BatchResult) -> list[int]:
        """With if_exists="skip", a second row for the same account and program is not added."""
        first: dict[tuple[str, str], int] = {}
        keep: list[int] = []
        for pos in pending:
            item = batch.items[pos]
            key = (item["AccountId"], item["LoyaltyProgramId"])
            if key in first:
                result.take([pos], [None], "skipped_existing")
            else:
                first[key] = pos
                keep.append(pos)
        return keep

    def _send(self, result: BatchResult, pending: list[int]) -> None:
        """Add ``pending``; refused rows are isolated (:func:`isolate_refusals`); doubt reconciled."""

        def send(group: list[int]) -> MewsError | None:
            refusal = self._add_group(result, group)
            if refusal is None:
                with result.lock:
                    self._remove(pending, group)
            return refusal

        def refused(pos: int, error: MewsError) -> None:
            self._reject(result, pos, error)
            with result.lock:
                self._remove(pending, [pos])
            if self.budget.exceeded:
                self.stop.set()

        isolate_refusals(pending, send, refused, self.stop, width=self.isolation_width)

    def _add_group(self, result: BatchResult, group: list[int]) -> MewsError | None:
        """Add one group. None when every row of it is accounted for; the refusal otherwise."""
        batch = result.batch
        remaining = list(group)
        last: MewsError | None = None
        for _round in range(MAX_DOUBT_ROUNDS + 1):
            sent_at = self.now()
            try:
                created = self.hook.add_loyalty_memberships(
                    [batch.items[p] for p in remaining], chain_id=self.chain_id, ids_only=True
                )
            except MewsError as exc:
                if is_row_refusal(exc):
                    if len(remaining) < len(group):
                        # A resend after reconciling was refused: isolate among the rows left.
                        self._send(result, remaining)
                        return None
                    return exc
                if not exc.may_have_been_processed:
                    raise
                last = exc
                found = find_stored(
                    self.hook, [batch.items[p] for p in remaining], sent_at - self.clock_skew, self._until()
                )
                mapped = {remaining[i]: mid for i, mid in found.items()}
                self._take(result, remaining, mapped, "added")
                with result.lock:
                    result.reconciled += len(mapped)
                if not remaining:
                    return None
                continue
            result.take(remaining, created, "added")  # the ids in the order sent
            return None
        raise MewsError(
            f"a batch stayed in doubt after {MAX_DOUBT_ROUNDS} reconcile rounds, the last answer being: "
            f"{last.message if last else 'none'}; Airflow's retry will resume it",
            status=last.status if last else None,
            request_id=last.request_id if last else None,
            operation="loyaltyMemberships/add",
        )

    @staticmethod
    def _remove(pending: list[int], group: list[int]) -> None:
        done = set(group)
        pending[:] = [p for p in pending if p not in done]

    def _reject_known(
        self, result: BatchResult, pending: list[int], known: dict[int, tuple[Any, ...]]
    ) -> None:
        """Reject, without a request, the rows an earlier try of this batch proved Mews refuses."""
        rows = result.batch.item_rows
        for pos in [p for p in pending if rows[p] in known]:
            status, request_id, message = known[rows[pos]]
            self._reject(result, pos, MewsError(message, status=status, request_id=request_id))
            pending.remove(pos)

    def _reject(self, result: BatchResult, pos: int, error: MewsError) -> None:
        batch = result.batch
        item = batch.items[pos]
        row_no = batch.item_rows[pos]
        status = f"HTTP {error.status}" if error.status else "refused"
        rejection = Rejection(
            row_no,
            item["AccountId"],
            None,
            f"row {row_no} (AccountId {item['AccountId']}): Mews refused it ({status}): {error.message}",
            error.request_id,
            json.dumps(item),
        )
        with result.lock:
            result.rejected.append(rejection)
        self.budget.spend(1)
        if self.on_refused is not None:
            self.on_refused(batch, row_no, error)
