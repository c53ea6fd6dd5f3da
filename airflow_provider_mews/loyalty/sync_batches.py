"""One batch of source rows through a sync (upsert or mirror), and the mirror's removals.

:class:`SyncBatchSender` takes a :class:`SyncBatch` to its end in a worker thread: it finds
the memberships the rows may match (one getAll per batch for an upsert; the on-disk scope
for a mirror), matches and diffs them (:mod:`airflow_provider_mews.loyalty.sync_plan`), adds the new
rows with the add machinery of :class:`~airflow_provider_mews.loyalty.batches.BatchSender`
(refused rows isolated by bisection, doubt reconciled), then sends one update with only
the changed fields of the matched rows. Refused updates are isolated by bisection too.
Every row ends added, updated, unchanged or rejected, or unfinished when the run stops.

:class:`Remover` cancels or deletes, a page at a time, what no source row matched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from airflow_provider_mews.exceptions import MewsCallStopped, MewsError
from airflow_provider_mews.loyalty.batches import (
    Batch,
    BatchSender,
    RejectionBudget,
    StopRun,
    is_row_refusal,
    isolate_refusals,
)
from airflow_provider_mews.loyalty.normalize import RowRejected
from airflow_provider_mews.loyalty.reconcile import find_deleted
from airflow_provider_mews.loyalty.scope import ScopeIndex
from airflow_provider_mews.loyalty.sync_plan import (
    SyncPlan,
    SyncRow,
    diff,
    index_memberships,
    match_row,
    normalize_sync_row,
    removal_update,
    update_item,
)
from airflow_provider_mews.runs.outputs import Outcome, Rejection

log = logging.getLogger(__name__)
#: getAll filters take at most 1000 values.
MAX_FILTER = 1000


@dataclass
class SyncBatch:
    index: int
    first_row: int
    last_row: int
    rows: list[SyncRow]  # rows that normalized
    rejected: list[Rejection]  # rows that did not
    fingerprint: str

    @property
    def size(self) -> int:
        return self.last_row - self.first_row + 1


def build_sync_batch(
    index: int, first_row: int, plan: SyncPlan, rows: Sequence[Sequence[Any]], keep_row_json: bool
) -> SyncBatch:
    """Normalize a chunk of source rows for a sync (pure: no I/O)."""
    good: list[SyncRow] = []
    rejected: list[Rejection] = []
    identities: list[str] = []
    account_pos = plan.columns.position_of("AccountId")
    for offset, values in enumerate(rows):
        row_no = first_row + offset
        try:
            r = normalize_sync_row(plan, values, row_no)
        except RowRejected as exc:
            cell = None if account_pos is None else values[account_pos]
            account = None if cell is None or isinstance(cell, RowRejected) else str(cell)[:64]
            where = f"row {row_no}" + (f" (AccountId {account})" if account else "")
            row_json = json.dumps(dict(zip(plan.columns.names, values, strict=False)), default=str)[:4000]
            rejected.append(
                Rejection(
                    row_no, account, exc.field, f"{where}: {exc}", None, row_json if keep_row_json else None
                )
            )
            identities.append(f"!{row_no}")
            continue
        good.append(r)
        identities += (
            r.membership_id or "",
            r.account_id or "",
            r.program_id or "",
            r.fields.get("MembershipNumber") or "",
        )
    fingerprint = hashlib.blake2b("\x1f".join(identities).encode(), digest_size=12).hexdigest()
    return SyncBatch(index, first_row, first_row + len(rows) - 1, good, rejected, fingerprint)


@dataclass
class SyncBatchResult:
    batch: SyncBatch
    outcomes: list[Outcome] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    #: source row -> the fields an update changed (or, in a dry run, would change)
    changed: dict[int, list[str]] = field(default_factory=dict)
    reconciled: int = 0
    error: MewsError | None = None

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes if o.outcome == outcome)

    @property
    def unfinished(self) -> int:
        return self.batch.size - len(self.outcomes) - len(self.rejected)

    @property
    def complete(self) -> bool:
        return self.error is None and self.unfinished == 0


@dataclass
class _Update:
    row: SyncRow
    membership_id: str
    changes: dict[str, dict[str, Any]]
    outcome: str  # "updated", or "added" for the follow-up that sets ProviderMembershipId


class SyncBatchSender:
    """Takes sync batches through Mews with one hook; safe to call from several threads.

    :param index: on-disk claims of matched Ids (and, for a mirror, the scope it was filled with).
    :param scope: lower-case LoyaltyProgramIds of a mirror; None for an upsert (candidates by getAll).
    :param dry_run: plan only: outcomes say what would be done, no write request is sent.
    """

    def __init__(
        self,
        hook: Any,
        *,
        index: ScopeIndex,
        scope: frozenset[str] | None,
        chain_id: str | None,
        budget: RejectionBudget,
        stop: threading.Event,
        dry_run: bool = False,
        known_refusals: Callable[[Any], dict[int, tuple[Any, ...]]] | None = None,
        on_refused: Callable[[Any, int, MewsError], None] | None = None,
        isolation_width: int | None = None,
    ) -> None:
        self.hook = hook
        self.index = index
        self.scope = scope
        self.chain_id = chain_id
        self.budget = budget
        self.stop = stop
        self.dry_run = dry_run
        #: Rows an earlier try proved Mews refuses (an add or an update), by source row, and where to
        #: note each one proven (the checkpoint): an interrupted isolation is not redone.
        self.known_refusals = known_refusals
        self.on_refused = on_refused
        self.adder = BatchSender(
            hook,
            if_exists="add",
            chain_id=chain_id,
            budget=budget,
            stop=stop,
            known_refusals=known_refusals,
            on_refused=on_refused,
            isolation_width=isolation_width,
        )

    def run(self, batch: SyncBatch, stored_since: datetime | None = None) -> SyncBatchResult:
        """Take ``batch`` to its end. ``stored_since``: an earlier try may have sent its adds since then."""
        result = SyncBatchResult(batch, rejected=list(batch.rejected))
        try:
            new, updates = self._plan(result, *self._candidates(batch.rows))
            if self.dry_run:
                self._planned(result, new, updates)
                return result
            updates += self._add(result, new, stored_since)
            self._update(result, updates)
        except (StopRun, MewsCallStopped):  # the run is stopping: this batch stays unfinished
            pass
        except MewsError as exc:
            result.error = exc
        return result

    # -- steps --

    def _candidates(self, rows: list[SyncRow]) -> tuple[dict[str, Any], dict[tuple[str, str], list[Any]]]:
        if self.scope is not None:
            return self.index.candidates(rows)
        found: list[dict[str, Any]] = []
        ids = list(dict.fromkeys(r.membership_id for r in rows if r.membership_id))
        for start in range(0, len(ids), MAX_FILTER):
            found += self.hook.get_loyalty_memberships(
                loyalty_membership_ids=ids[start : start + MAX_FILTER], activity_states=["Active"]
            )
        keyed = [r for r in rows if not r.membership_id and r.account_id and r.program_id]
        accounts = list(dict.fromkeys(r.account_id for r in keyed if r.account_id))
        programs = list(dict.fromkeys(r.program_id for r in keyed if r.program_id))
        for start in range(0, len(accounts), MAX_FILTER):
            for p_start in range(0, len(programs), MAX_FILTER):
                found += self.hook.get_loyalty_memberships(
                    account_ids=accounts[start : start + MAX_FILTER],
                    loyalty_program_ids=programs[p_start : p_start + MAX_FILTER],
                    activity_states=["Active"],
                )
        return index_memberships(found)

    def _plan(
        self, result: SyncBatchResult, by_id: dict[str, Any], by_key: dict[tuple[str, str], list[Any]]
    ) -> tuple[list[SyncRow], list[_Update]]:
        """Match every row; record unchanged rows and rejections; return rows to add and updates."""
        new: list[SyncRow] = []
        updates: list[_Update] = []
        for r in result.batch.rows:
            match = match_row(r, by_id, by_key, self.scope)
            if match.kind == "rejected":
                self._reject(result, r, match.field, match.reason or "rejected")
                continue
            if match.kind == "new":
                key = f"new:{r.account_id}:{r.program_id}:{r.fields.get('MembershipNumber') or ''}"
                earlier = self.index.claim(key, r.row)
                if earlier is not None:
                    self._reject(
                        result, r, "AccountId",
                        f"row {r.row} (AccountId {r.account_id}): row {earlier} of the source is the same new "
                        "membership (account, program and MembershipNumber); it is added once",
                    )  # fmt: skip
                    continue
                new.append(r)
                continue
            assert match.membership is not None
            m = match.membership
            earlier = self.index.claim(m["Id"], r.row)
            if earlier is not None:
                self._reject(
                    result, r, "LoyaltyMembershipId",
                    f"row {r.row} (AccountId {r.account_id or m['AccountId']}): membership {m['Id']} is already "
                    f"matched by row {earlier} of the source; one row per membership",
                )  # fmt: skip
                continue
            changes = diff(r, m)
            if changes:
                updates.append(_Update(r, m["Id"], changes, "updated"))
            else:
                result.outcomes.append(_outcome(r, m, "unchanged"))
        return new, updates

    def _planned(self, result: SyncBatchResult, new: list[SyncRow], updates: list[_Update]) -> None:
        for r in new:
            try:
                r.add_item()
            except RowRejected as exc:
                self._reject(result, r, exc.field, f"row {r.row} (AccountId {r.account_id}): {exc}")
                continue
            result.outcomes.append(_outcome(r, None, "added"))
        for u in updates:
            result.outcomes.append(_outcome(u.row, {"Id": u.membership_id}, "updated", list(u.changes)))
            result.changed[u.row.row] = list(u.changes)

    def _add(
        self, result: SyncBatchResult, new: list[SyncRow], stored_since: datetime | None
    ) -> list[_Update]:
        """Add the new rows; returns the follow-up updates that set their ProviderMembershipId."""
        items: list[dict[str, Any]] = []
        item_rows: list[int] = []
        by_row: dict[int, SyncRow] = {}
        for r in new:
            try:
                items.append(r.add_item())
            except RowRejected as exc:
                self._reject(result, r, exc.field, f"row {r.row} (AccountId {r.account_id}): {exc}")
                continue
            item_rows.append(r.row)
            by_row[r.row] = r
        if not items:
            return []
        # Only first/last_row's count matters to BatchSender (rows unfinished); outcomes carry item_rows.
        # Its index and fingerprint are the sync batch's: refusals are checkpointed under them.
        inner = Batch(result.batch.index, 1, len(items), items, item_rows, [], result.batch.fingerprint)
        added = self.adder.run(inner, stored_since)
        result.outcomes += added.outcomes
        result.rejected += added.rejected
        result.reconciled += added.reconciled
        if added.error is not None:
            raise added.error
        if added.unfinished:
            raise StopRun
        # A later row that finds this membership by getAll is a second row for it, as for matches.
        done = [
            (o.mews_membership_id, o.source_row)
            for o in added.outcomes
            if o.mews_membership_id and o.source_row
        ]
        self.index.claim_many(done)
        follow: list[_Update] = []
        for mid, row in done:
            r = by_row[row]
            if "ProviderMembershipId" in r.fields:
                changes = {"ProviderMembershipId": {"Value": r.fields["ProviderMembershipId"]}}
                follow.append(_Update(r, mid, changes, "added"))
        return follow

    def _update(self, result: SyncBatchResult, updates: list[_Update]) -> None:
        """One update for the batch; refused rows are isolated (:func:`isolate_refusals`), one
        request after the other; rows an earlier try proved refused are rejected without one."""
        known = self.known_refusals(result.batch) if self.known_refusals is not None and updates else {}
        if known:
            keep = []
            for u in updates:
                if u.outcome == "updated" and u.row.row in known:
                    status, request_id, message = known[u.row.row]
                    self._reject_update(result, u, MewsError(message, status=status, request_id=request_id))
                else:
                    keep.append(u)
            updates = keep

        def send(group: list[_Update]) -> MewsError | None:
            try:
                self.hook.update_loyalty_memberships(
                    [update_item(u.membership_id, u.changes) for u in group], chain_id=self.chain_id
                )
            except MewsError as exc:
                if is_row_refusal(exc):
                    return exc
                raise
            for u in group:
                if u.outcome == "updated":
                    result.outcomes.append(
                        _outcome(u.row, {"Id": u.membership_id}, "updated", list(u.changes))
                    )
                    result.changed[u.row.row] = list(u.changes)
            return None

        def refused(u: _Update, exc: MewsError) -> None:
            if u.outcome == "added":  # the add stands; only its ProviderMembershipId was refused
                self._reject_follow_up(result, u, exc)
                return
            self._reject_update(result, u, exc)
            if self.on_refused is not None:
                self.on_refused(result.batch, u.row.row, exc)

        isolate_refusals(updates, send, refused, self.stop)

    def _reject_update(self, result: SyncBatchResult, u: _Update, exc: MewsError) -> None:
        self._reject(
            result, u.row, None,
            f"row {u.row.row} (AccountId {u.row.account_id}): Mews refused the update of membership "
            f"{u.membership_id} (HTTP {exc.status}): {exc.message}",
            exc.request_id, json.dumps(update_item(u.membership_id, u.changes)),
        )  # fmt: skip

    def _reject_follow_up(self, result: SyncBatchResult, u: _Update, exc: MewsError) -> None:
        # The row was added (its outcome stands); only setting its ProviderMembershipId was refused.
        result.changed[u.row.row] = [f"ProviderMembershipId refused (HTTP {exc.status}): {exc.message}"]
        log.warning(
            "row %d was added as membership %s, but Mews refused its ProviderMembershipId (HTTP %s): %s "
            "RequestId=%s; the next run sets it (the row then matches and differs)",
            u.row.row, u.membership_id, exc.status, exc.message, exc.request_id,
        )  # fmt: skip

    def _reject(
        self,
        result: SyncBatchResult,
        r: SyncRow,
        field_name: str | None,
        reason: str,
        request_id: str | None = None,
        row_json: str | None = None,
    ) -> None:
        result.rejected.append(Rejection(r.row, r.account_id, field_name, reason, request_id, row_json))
        self.budget.spend(1)
        if self.budget.exceeded:
            self.stop.set()


def _outcome(r: SyncRow, m: Any, outcome: str, changed: Sequence[str] | None = None) -> Outcome:
    return Outcome(
        r.row,
        r.account_id or (m or {}).get("AccountId") or "",
        r.program_id or (m or {}).get("LoyaltyProgramId") or "",
        r.fields.get("MembershipNumber"),
        (m or {}).get("Id"),
        outcome,
        ",".join(changed) if changed else None,
        r.fields.get("LoyaltyTierId") or (m or {}).get("LoyaltyTierId"),
    )


def removal_outcome(m: Mapping[str, Any], outcome: str) -> Outcome:
    """A mirror's removal (``canceled`` or ``deleted``): no source row."""
    return Outcome(
        None,
        m["AccountId"],
        m["LoyaltyProgramId"],
        m.get("MembershipNumber"),
        m["Id"],
        outcome,
        None,
        m.get("LoyaltyTierId"),
    )


# -- the mirror's removals --


@dataclass
class RemovalResult:
    done: list[dict[str, Any]] = field(default_factory=list)  # memberships canceled or deleted
    refused: list[tuple[dict[str, Any], MewsError]] = field(default_factory=list)
    error: MewsError | None = None


class Remover:
    """Cancels (an update of State) or deletes a page of unmatched memberships, each exactly once.

    A delete whose fate is unknown is never repeated blindly: the Ids are read back
    (:func:`~airflow_provider_mews.loyalty.reconcile.find_deleted`) and only those still active are sent.
    """

    MAX_DOUBT_ROUNDS = 3

    def __init__(self, hook: Any, on_missing: str, chain_id: str | None) -> None:
        if on_missing not in ("cancel", "delete"):
            raise ValueError(f"on_missing {on_missing!r} removes nothing")
        self.hook = hook
        self.on_missing = on_missing
        self.chain_id = chain_id

    def remove(self, page: list[dict[str, Any]]) -> RemovalResult:
        result = RemovalResult()

        def refused(m: dict[str, Any], exc: MewsError) -> None:
            if self.on_missing == "delete" and find_deleted(self.hook, [m["Id"]]):
                result.done.append(m)  # deleted meanwhile (or by an earlier try): gone once
            else:
                result.refused.append((m, exc))

        try:
            isolate_refusals(page, lambda group: self._send(group, result), refused)
        except MewsError as exc:
            result.error = exc
        return result

    def _send(self, group: list[dict[str, Any]], result: RemovalResult) -> MewsError | None:
        """Cancel or delete ``group``: None when done, Mews's refusal of it otherwise."""
        try:
            self._remove(group, result)
        except MewsError as exc:
            if is_row_refusal(exc):
                return exc
            raise
        return None

    def _remove(self, group: list[dict[str, Any]], result: RemovalResult) -> None:
        if self.on_missing == "cancel":  # an update: value-idempotent, retried by the hook
            self.hook.update_loyalty_memberships(
                [removal_update(m["Id"]) for m in group], chain_id=self.chain_id
            )
            result.done += group
            return
        remaining = list(group)
        for _round in range(self.MAX_DOUBT_ROUNDS + 1):
            try:
                self.hook.delete_loyalty_memberships([m["Id"] for m in remaining], chain_id=self.chain_id)
            except MewsError as exc:
                if not exc.may_have_been_processed:
                    raise
                gone = find_deleted(self.hook, [m["Id"] for m in remaining])
                result.done += [m for m in remaining if m["Id"].lower() in gone]
                remaining = [m for m in remaining if m["Id"].lower() not in gone]
                if not remaining:
                    return
                continue
            result.done += remaining
            return
        raise MewsError(
            f"a delete stayed in doubt after {self.MAX_DOUBT_ROUNDS} rounds; Airflow's retry will resume it",
            operation="loyaltyMemberships/delete",
        )
