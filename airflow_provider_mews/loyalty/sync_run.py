"""One try of a sync: an upsert (``if_exists="update"``) or a mirror (``LoyaltyMembershipSyncOperator``).

:class:`SyncRun` is :class:`~airflow_provider_mews.loyalty.add_run.MembershipRun` with sync batches
(:mod:`~airflow_provider_mews.loyalty.sync_batches`: added, updated, unchanged or rejected), and for
a mirror two more steps:

* :meth:`~SyncRun.prepare`, before any write: list the scope's memberships into an on-disk
  index (:class:`~airflow_provider_mews.loyalty.scope.ScopeIndex`), read the source once to match
  every row (sending nothing), and refuse the run when the memberships no row matched exceed
  ``max_removals``;
* :meth:`~SyncRun.remove`, once every row is done: cancel or delete what no row matched,
  each exactly once.

With ``dry_run`` no write request is sent: the outcomes and removals written are the plan.
"""

from __future__ import annotations

import errno
import sqlite3
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from airflow_provider_mews.exceptions import MewsError
from airflow_provider_mews.loyalty.add_run import MembershipRun, RunSettings, Source
from airflow_provider_mews.loyalty.batches import isolation_width_for
from airflow_provider_mews.loyalty.scope import ScopeIndex
from airflow_provider_mews.loyalty.sync_batches import (
    Remover,
    SyncBatch,
    SyncBatchResult,
    SyncBatchSender,
    build_sync_batch,
    removal_outcome,
)
from airflow_provider_mews.loyalty.sync_plan import (
    RemovalsRefused,
    SyncPlan,
    check_removals,
    identity_of,
    match_row,
    named_memberships,
    removal_limit,
)
from airflow_provider_mews.runs.outputs import Outcome
from airflow_provider_mews.version_compat import AirflowException, AirflowFailException

#: getAll takes at most 1000 LoyaltyProgramIds.
MAX_FILTER = 1000


@dataclass(frozen=True)
class SyncSettings:
    """The sync arguments of the operators."""

    mirror: bool = False
    loyalty_program_ids: frozenset[str] = frozenset()  # lower case: the mirror's scope
    on_missing: str = "cancel"
    max_removals: Any = "5%"
    dry_run: bool = False
    work_dir: str | None = None  # where the on-disk index is made (default: the temp directory)


class SyncRun(MembershipRun):
    """One try of a sync; the steps of :class:`MembershipRun` plus :meth:`prepare` and :meth:`remove`."""

    def __init__(
        self,
        settings: RunSettings,
        sync: SyncSettings,
        hook: Any,
        source: Source,
        plan: SyncPlan,
        outputs: Sequence[Any],
        checkpoint: Any,
        log: Any,
    ) -> None:
        self.sync = sync
        self.sync_plan = plan
        try:
            self.index = ScopeIndex(sync.work_dir)
        except (sqlite3.Error, OSError) as exc:  # sync_work_dir already full: nothing was sent yet
            if not is_disk_full(exc):
                raise
            raise work_dir_full(sync.work_dir, None, exc) from exc
        self.refusal: str | None = None  # why the mirror was refused before any write
        self.removals_refused: list[str] = []
        self.planned_removals: int | None = None
        super().__init__(settings, hook, source, plan.columns, outputs, checkpoint, log)
        self.tally.sync = True

    def make_sender(self) -> Any:
        return SyncBatchSender(
            self.hook,
            index=self.index,
            scope=self.sync.loyalty_program_ids if self.sync.mirror else None,
            chain_id=self.settings.chain_id,
            budget=self.budget,
            stop=self.stop,
            dry_run=self.sync.dry_run,
            known_refusals=lambda batch: self.checkpoint.known_refusals(batch.index, batch.fingerprint),
            on_refused=self.note_refused,
            isolation_width=isolation_width_for(self.hook, self.settings.max_active_requests),
        )

    # -- the run --

    def execute(self) -> dict[str, Any]:
        try:
            if self.sync.mirror:
                try:
                    self.prepare()
                except MewsError as exc:  # listing the scope failed: nothing was written
                    self.errors.append(exc)
                    return self.finish()
                if self.refusal is not None and not self.sync.dry_run:
                    return self.finish()  # nothing was written
            return super().execute()
        except (sqlite3.Error, OSError) as exc:
            if not is_disk_full(exc):
                raise
            raise work_dir_full(self.sync.work_dir, self.index.size, exc) from exc
        finally:
            self.index.close()

    def prepare(self) -> None:
        """List the scope, match every row against it (no write), check ``max_removals``."""
        s = self.sync
        scope = sorted(s.loyalty_program_ids)
        page: list[dict[str, Any]] = []
        for start in range(0, len(scope), MAX_FILTER):
            for m in self.hook.get_loyalty_memberships(
                loyalty_program_ids=scope[start : start + MAX_FILTER], activity_states=["Active"]
            ):
                page.append(m)
                if len(page) == 1000:
                    self.index.add_scope(page)
                    page = []
        self.index.add_scope(page)
        first_row = 1
        for index, rows in enumerate(self.source.chunks()):
            batch = build_sync_batch(index, first_row, self.sync_plan, rows, False)
            first_row += len(rows)
            # A rejected row is still in the source: what it names is kept, never removed.
            unreadable = [
                identity_of(self.sync_plan, rows[j.source_row - batch.first_row], j.source_row)
                for j in batch.rejected
            ]
            kept = [r for r in unreadable if r is not None]
            by_id, by_key = self.index.candidates([*batch.rows, *kept])
            matched = []
            for r in batch.rows:
                match = match_row(r, by_id, by_key, s.loyalty_program_ids)
                if match.kind == "matched" and match.membership is not None:
                    matched.append((match.membership["Id"], r.row))
                elif match.kind == "rejected":  # e.g. twins it cannot tell apart: keep them both
                    kept.append(r)
            matched += [(m["Id"], r.row) for r in kept for m in named_memberships(r, by_id, by_key)]
            self.index.claim_many(matched)
        count = self.index.count_unmatched(s.on_missing)
        self.planned_removals = count
        self.log.info(
            "Mirror of %d program(s): %d memberships in Mews, %d source rows; %d would be %s (limit %d).",
            len(scope),
            self.index.size,
            first_row - 1,
            count,
            {"cancel": "canceled", "delete": "deleted"}.get(s.on_missing, "kept"),
            removal_limit(s.max_removals, self.index.size),
        )
        try:
            check_removals(count, self.index.size, s.max_removals, s.on_missing)
        except RemovalsRefused as exc:
            self.refusal = str(exc)
            self.log.error("%s", exc)

    def build(self, rows: Sequence[Sequence[Any]]) -> SyncBatch:  # type: ignore[override]
        first_row = self.tally.rows_read + 1
        self.tally.rows_read += len(rows)
        batch = build_sync_batch(self._next_index, first_row, self.sync_plan, rows, self.settings.keep_rows)
        self._next_index += 1
        return batch

    def settle(self, result: Any, may_have_been_written: bool | None = None) -> None:
        """A batch's end: outcomes written and counted; checkpointed as (added, updated, unchanged, rejected)."""
        if not isinstance(result, SyncBatchResult):  # the budget ran out before the batch was sent
            result = SyncBatchResult(result.batch, rejected=list(result.rejected))
        batch = result.batch
        if may_have_been_written is None:
            may_have_been_written = self.may_have_been_written(batch.index)
        for out in self.outputs:
            out.write(
                batch.first_row,
                batch.last_row,
                self._as_written(result.outcomes),
                result.rejected,
                may_have_been_written,
            )
        counts = (
            result.count("added"),
            result.count("updated"),
            result.count("unchanged"),
            len(result.rejected),
        )
        self.tally.added += counts[0]
        self.tally.updated += counts[1]
        self.tally.unchanged += counts[2]
        self.tally.reject(result.rejected)
        self.tally.reconciled += result.reconciled
        if result.complete:
            self.checkpoint.mark_done(batch.index, batch.fingerprint, *counts)
        if result.error is not None:
            self.errors.append(result.error)
            self.stop.set()

    def count_earlier(self, counts: Sequence[int]) -> None:
        # An earlier try killed before any batch finished left the checkpoint's default (0, 0, 0).
        added, updated, unchanged, rejected = (*counts, 0, 0, 0, 0)[:4]
        self.tally.added += added
        self.tally.updated += updated
        self.tally.unchanged += unchanged
        self.tally.rejected += rejected
        self.budget.spend(rejected)

    def finish(self) -> dict[str, Any]:
        refused = self.refusal is not None and not self.sync.dry_run  # a dry run still writes the plan
        # Stopped from outside (on_kill), the source was not read to its end: a scope matched
        # against part of it would remove memberships the rest describes.
        stopped = self.interrupted is not None
        if self.sync.mirror and not self.errors and not self.budget.exceeded and not refused and not stopped:
            self.remove()
        summary = super().finish()
        summary["dry_run"] = self.sync.dry_run
        if self.sync.mirror:
            summary.update(
                scope_memberships=self.index.size,
                planned_removals=self.planned_removals,
                removals_refused=len(self.removals_refused),
                refused=self.refusal,
            )
        return summary

    def _as_written(self, outcomes: list[Outcome]) -> list[Outcome]:
        """A dry run writes its plan as ``planned_added``, ``planned_canceled``, ...: a reader of the
        outcome tables can never take a plan for a change Mews holds."""
        if not self.sync.dry_run:
            return outcomes
        return [o._replace(outcome=f"planned_{o.outcome}") for o in outcomes]

    def remove(self) -> None:
        """Cancel or delete, a page at a time, the scope's memberships no source row matched."""
        s = self.sync
        if s.on_missing == "keep":
            return
        outcome = "canceled" if s.on_missing == "cancel" else "deleted"
        remover = Remover(self.hook, s.on_missing, self.settings.chain_id)
        for page in self.index.unmatched(s.on_missing):
            if s.dry_run:
                done = page
            else:
                result = remover.remove(page)
                done = result.done
                for m, exc in result.refused:
                    self.removals_refused.append(
                        f"{m['Id']}: HTTP {exc.status} {exc.message} (RequestId {exc.request_id})"
                    )
                if result.error is not None:
                    self.errors.append(result.error)
            outcomes = self._as_written([removal_outcome(m, outcome) for m in done])
            for out in self.outputs:
                out.write_removals(outcomes)
            if outcome == "canceled":
                self.tally.canceled += len(done)
            else:
                self.tally.deleted += len(done)
            if self.errors:
                return

    def failure(self) -> AirflowException | None:
        if self.refusal is not None and not self.sync.dry_run:
            return AirflowFailException(self.refusal)
        found = super().failure()
        if found is None and self.removals_refused:
            return AirflowFailException(
                f"Mews refused {len(self.removals_refused)} removal(s); Mews is not equal to the source: "
                + "; ".join(self.removals_refused[:5])
            )
        return found


def work_dir_full(work_dir: str | None, size: int | None, exc: BaseException) -> AirflowException:
    """The scope index's disk filled up (``size`` memberships in, or None: while creating it, before
    any request). Nothing was removed: removals come only after every row is done, and this
    error ends the try before them."""
    where = work_dir or f"{tempfile.gettempdir()} (the default: the system's temporary directory)"
    when = (
        "while creating it, before the sync sent anything"
        if size is None
        else f"after {size} memberships of the scope"
    )
    return AirflowException(
        f"The sync's on-disk scope index ran out of space in sync_work_dir={where} {when} "
        f"(it needs about 200 bytes per membership): nothing was removed from Mews. Point sync_work_dir "
        f"at a directory with room for the scope, or free space there; Airflow's retry starts the sync "
        f"over. ({type(exc).__name__}: {exc})"
    )


def is_disk_full(exc: BaseException) -> bool:
    """SQLite's "database or disk is full", or the OS's no space / file too large / quota."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
