"""One try of the load: source rows through Mews in batches, every row taken to an outcome.

:class:`MembershipRun` is the loop the operator runs, cut into named steps:

* :meth:`~MembershipRun.resume`: on a retry, check that the batches an earlier try finished
  are the same rows (:mod:`~airflow_provider_mews.runs.checkpoint`), and skip them;
* :meth:`~MembershipRun.read`: the next chunk of source rows, or None once the run stops;
* :meth:`~MembershipRun.build`: a chunk into a :class:`~airflow_provider_mews.loyalty.batches.Batch`;
* :meth:`~MembershipRun.dispatch`: skip it (finished by an earlier try) or send it to a
  worker thread (:class:`~airflow_provider_mews.loyalty.batches.BatchSender`);
* :meth:`~MembershipRun.settle`: a finished batch's outcomes written, counted, checkpointed;
* :meth:`~MembershipRun.finish`: the summary (counting what was never reached) and the
  checkpoint cleared on success; :meth:`~MembershipRun.failure` says how the try ended.

Stop means stop: after a Mews failure or once the rejections exceed the budget, nothing more
is read from the source; the rows never reached are counted by the database instead.

Stopped from outside (:meth:`~MembershipRun.interrupt`: the operator's ``on_kill`` on SIGTERM,
or Airflow's ``execution_timeout``), the try reads and sends nothing more, settles the batches
in flight that end within :data:`STOP_GRACE_S`, leaves the others in doubt (below the
checkpoint's dispatch mark, so the next try reconciles them), writes the checkpoint and fails
with a retryable error: all before the supervisor's SIGKILL, 5 s after its SIGTERM.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from airflow_provider_mews.exceptions import MewsConfigurationError, MewsError
from airflow_provider_mews.loyalty.batches import (
    Batch,
    BatchResult,
    BatchSender,
    RejectionBudget,
    build_batch,
    isolation_width_for,
)
from airflow_provider_mews.loyalty.normalize import ColumnPlan
from airflow_provider_mews.runs.checkpoint import Checkpoint, fold
from airflow_provider_mews.runs.outputs import FileOutput, TableOutput
from airflow_provider_mews.runs.progress import RunTally, summary_table
from airflow_provider_mews.version_compat import AirflowException, AirflowFailException

#: Mews errors that another Airflow try cannot fix: fail at once instead of retrying.
NOT_RETRYABLE = (400, 401, 403, 404)
#: Seconds an interrupted try waits for its batches in flight before leaving them in doubt:
#: the supervisor sends SIGKILL 5 s after SIGTERM, and the outcomes and checkpoint of what
#: ended must be written before it (writing them takes well under a second).
STOP_GRACE_S = 3.0


class Source(Protocol):
    """What a run reads (:mod:`airflow_provider_mews.runs.sources`)."""

    description: str
    total: int | None

    def chunks(self) -> Iterator[Sequence[Sequence[Any]]]: ...
    def count(self) -> int | None: ...


@dataclass(frozen=True)
class RunSettings:
    """The operator's arguments a run needs."""

    batch_size: int
    if_exists: str
    max_active_requests: int
    max_rejected_rows: int
    chain_id: str | None = None
    keep_rows: bool = False  # keep each rejected row's data (a rejections output exists)
    progress_interval_s: float = 30.0
    rejected_sample_size: int = 20
    results: str | None = None  # where outcomes go, for the summary
    rejections: str | None = None


class MembershipRun:
    """One try: read, build, dispatch, settle, finish. Not reusable; one instance per try."""

    def __init__(
        self,
        settings: RunSettings,
        hook: Any,
        source: Source,
        plan: ColumnPlan,
        outputs: Sequence[TableOutput | FileOutput],
        checkpoint: Checkpoint,
        log: logging.Logger | Any,
    ) -> None:
        self.settings = settings
        self.hook = hook
        self.source = source
        self.plan = plan
        self.outputs = outputs
        self.checkpoint = checkpoint
        self.log = log
        self.tally = RunTally(sample_size=settings.rejected_sample_size)
        self.budget = RejectionBudget(settings.max_rejected_rows)
        self.stop = threading.Event()
        self.since = datetime.fromisoformat(checkpoint.since)
        self.sender = self.make_sender()
        self.errors: list[MewsError] = []
        self.inflight: set[Future[BatchResult]] = set()
        self.summary: dict[str, Any] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._chunks: Iterator[Sequence[Sequence[Any]]] = iter(())
        self._exhausted = False  # the source was read to its end
        self._next_index = 0
        self.interrupted: str | None = None  # why the try was stopped from outside (on_kill)
        self._grace_until = 0.0

    def make_sender(self) -> BatchSender:
        """What takes one batch through Mews (in a worker thread)."""
        s = self.settings
        return BatchSender(
            self.hook,
            if_exists=s.if_exists,
            chain_id=s.chain_id,
            budget=self.budget,
            stop=self.stop,
            known_refusals=lambda batch: self.checkpoint.known_refusals(batch.index, batch.fingerprint),
            on_refused=self.note_refused,
            isolation_width=isolation_width_for(self.hook, s.max_active_requests),
        )

    def note_refused(self, batch: Batch, row: int, error: MewsError) -> None:
        """A row of ``batch`` proven refused (in a worker thread): into the checkpoint at once."""
        try:
            self.checkpoint.note_refused(
                batch.index, batch.fingerprint, row, error.status, error.request_id, error.message
            )
        except Exception as exc:  # only progress is lost: the next try isolates the row again
            self.log.warning("Could not checkpoint a refused row: %s", exc)

    # -- the run --

    def execute(self) -> dict[str, Any]:
        """Run the try to its end and return the summary; :meth:`failure` says if it failed."""
        s = self.settings
        self.log.info(
            "Adding loyalty memberships from %s to Mews (%s), batches of %d, if_exists=%s, %d in flight.",
            self.source.description,
            self.hook.settings.base_url,
            s.batch_size,
            s.if_exists,
            s.max_active_requests,
        )
        self._chunks = iter(self.source.chunks())
        pool = self._pool = ThreadPoolExecutor(s.max_active_requests, thread_name_prefix="mews-batch")
        try:
            self.resume()
            while (rows := self.read()) is not None:
                self.dispatch(self.build(rows))
            if self.interrupted is not None:  # on_kill: the read loop ended early
                self.drain()
            while self.inflight:
                self.settle_next(block=True)
        except BaseException as exc:
            if type(exc).__name__ != "AirflowTaskTimeout":
                raise
            # execution_timeout: Airflow raised this here and calls on_kill after. Settle what
            # ends in the grace, so the next try does not redo (or re-isolate) it.
            self.interrupt(f"execution_timeout ({exc})")
            self.drain()
            raise
        finally:
            self.stop.set()
            for future in self.inflight:
                future.cancel()
            self.checkpoint.flush(force=True)
            # Interrupted: do not wait for a request still on the wire (its batch is in doubt).
            pool.shutdown(wait=self.interrupted is None, cancel_futures=True)
        return self.finish()

    def interrupt(self, why: str) -> None:
        """Stop the try from outside: read and send nothing more, and give the batches in flight
        :data:`STOP_GRACE_S` to end. Safe in a signal handler (``on_kill`` runs in one, on the
        main thread, between any two bytecodes): it only sets flags."""
        if self.interrupted is None:
            self.interrupted = why
            self._grace_until = time.monotonic() + STOP_GRACE_S
        self.stop.set()
        abort = getattr(self.hook, "abort", None)
        if abort is not None:
            abort.set()

    def drain(self) -> None:
        """After an interruption: settle the batches in flight that end within the grace."""
        self.log.warning(
            "Stopping (%s): nothing more is sent; %d batch(es) in flight get %.0f s to end.",
            self.interrupted,
            len(self.inflight),
            STOP_GRACE_S,
        )
        try:
            while self.inflight and time.monotonic() < self._grace_until:
                self.settle_next(block=True)
        except Exception as exc:  # the original interruption is what the try reports
            self.log.warning("While stopping, settling the batches in flight failed: %s", exc)

    def resume(self) -> None:
        """On a retry, read again the batches below the earlier try's watermark (sending nothing)
        and skip them all if they are the same rows; else start over, reconciling instead."""
        ck = self.checkpoint
        if not ck.resumed:
            return
        earlier = ck.earlier
        prefix = ""
        while self._next_index < earlier.upto and (rows := self.read()) is not None:
            prefix = fold(prefix, self.build(rows).fingerprint)
        if self._next_index == earlier.upto and prefix == earlier.prefix:
            ck.accept_earlier_prefix()
            self.count_earlier(earlier.counts)
            self.tally.resumed_batches += earlier.upto
            self.log.info(
                "Resuming: %d batches finished by an earlier try are skipped (%d more finished out of "
                "order may be); batches that may have been sent are reconciled with Mews (created since %s).",
                earlier.upto,
                len(earlier.beyond),
                ck.since,
            )
            return
        self.log.warning(
            "The source's first %d batches are not the rows an earlier try finished (the source changed, "
            "or its order is not stable: give sql= an ORDER BY). Reading it again from the start; every "
            "batch that may have been sent is reconciled with Mews instead of skipped.",
            earlier.upto,
        )
        ck.forget_earlier()
        self._chunks = iter(self.source.chunks())
        self._exhausted = False
        self.tally.rows_read = 0
        self._next_index = 0

    def read(self) -> Sequence[Sequence[Any]] | None:
        """The next chunk of source rows; None at the end, and at once when the run stops."""
        if self.stop.is_set() or self._exhausted:
            return None
        rows = next(self._chunks, None)
        if not rows:
            self._exhausted = True
            return None
        return rows

    def build(self, rows: Sequence[Sequence[Any]]) -> Batch:
        first_row = self.tally.rows_read + 1
        self.tally.rows_read += len(rows)
        batch = build_batch(self._next_index, first_row, self.plan, rows, self.settings.keep_rows)
        self._next_index += 1
        return batch

    def dispatch(self, batch: Batch) -> None:
        """Skip a batch an earlier try finished; otherwise send it once a worker (and the
        checkpoint's window) allows."""
        ck = self.checkpoint
        earlier = ck.done_counts(batch.index, batch.fingerprint)
        if earlier is not None:
            self.count_earlier(earlier)
            self.tally.resumed_batches += 1
            ck.mark_done(batch.index, batch.fingerprint, *earlier)
            return
        self.budget.spend(len(batch.rejected))
        if self.budget.exceeded:
            self.stop.set()
            self.settle(BatchResult(batch, rejected=list(batch.rejected)), may_have_been_written=True)
            return
        limit = self.settings.max_active_requests
        while self.inflight and (len(self.inflight) >= limit or not ck.within_window(batch.index)):
            self.settle_next(block=True)
        if self.stop.is_set():
            return  # read, but never sent: not reached
        stored_since = self.since if ck.maybe_sent(batch.index) else None
        ck.reserve(batch.index)
        assert self._pool is not None
        self.inflight.add(self._pool.submit(self.sender.run, batch, stored_since))
        self.settle_next(block=False)
        if self.tally.due(self.settings.progress_interval_s):
            stats = self.hook.stats
            self.tally.lookups = self.lookups()
            self.log.info(
                self.tally.progress_line(
                    self.source.total, stats.rate_limited, stats.rate_limit_wait_s, stats.limiter_wait_s
                )
            )

    def lookups(self) -> int | None:
        """Requests that looked names up so far (a source of rows named by e-mail or code:
        :class:`~airflow_provider_mews.loyalty.names.ResolvedSource`); None when rows carry Ids."""
        return getattr(self.source, "lookups", None)

    def count_earlier(self, counts: Sequence[int]) -> None:
        """Counts of batches an earlier try finished (as :meth:`settle` checkpointed them)."""
        added, skipped, rejected = counts
        self.tally.added += added
        self.tally.skipped_existing += skipped
        self.tally.rejected += rejected
        self.budget.spend(rejected)

    def settle_next(self, block: bool) -> None:
        """Settle the batches that finished (waiting for one when ``block``)."""
        if not self.inflight:
            return
        timeout = None if block else 0.0
        if self.interrupted is not None:  # wait no longer than the grace, then leave the rest in doubt
            timeout = max(0.0, self._grace_until - time.monotonic()) if block else 0.0
        finished, _ = wait(self.inflight, timeout=timeout, return_when=FIRST_COMPLETED)
        if not finished and block:
            self.log.warning(
                "Stopping (%s): %d batch(es) still in flight are left in doubt; the next try reconciles "
                "them with Mews before sending anything again.",
                self.interrupted,
                len(self.inflight),
            )
            self.inflight.clear()
            return
        for future in finished:
            self.inflight.discard(future)
            self.settle(future.result())

    def may_have_been_written(self, index: int) -> bool:
        """Whether an earlier try may have written batch ``index``'s outcomes (so they are
        replaced, not only inserted); without a checkpoint to say otherwise, assume so."""
        ck = self.checkpoint
        return not ck.resumed or ck.maybe_sent(index)

    def settle(self, result: BatchResult, may_have_been_written: bool | None = None) -> None:
        """A batch's end: its outcomes written, counted, and (when complete) checkpointed.

        Outcomes of a batch an earlier try may have written replace that try's rows; a batch
        beyond every earlier try's dispatch mark is only inserted (no DELETE to pay). Without a
        checkpoint to say so, assume it may have been written."""
        batch = result.batch
        if may_have_been_written is None:
            may_have_been_written = self.may_have_been_written(batch.index)
        for out in self.outputs:
            out.write(
                batch.first_row, batch.last_row, result.outcomes, result.rejected, may_have_been_written
            )
        added, skipped = result.added, result.skipped
        self.tally.added += added
        self.tally.skipped_existing += skipped
        self.tally.reject(result.rejected)
        self.tally.reconciled += result.reconciled
        if result.complete:
            self.checkpoint.mark_done(batch.index, batch.fingerprint, added, skipped, len(result.rejected))
        if result.error is not None:
            self.errors.append(result.error)
            self.stop.set()

    def finish(self) -> dict[str, Any]:
        """The summary. Rows never reached: the source's count (made by the database when the
        run stopped before the end) minus the rows done; unknown (None) if it can't be counted."""
        tally = self.tally
        total = tally.rows_read if self._exhausted else self.source.count()
        if total is not None and total < tally.rows_read:
            total = None  # rows were deleted while the run read: the count proves nothing
        tally.rows_total = total
        tally.not_reached = None if total is None else total - tally.done
        tally.lookups = self.lookups()
        stats = self.hook.stats
        self.summary = tally.summary(
            requests=stats.requests,
            rate_limited=stats.rate_limited,
            limiter_wait_s=round(stats.limiter_wait_s, 1),
            rate_limit_wait_s=round(stats.rate_limit_wait_s, 1),
            if_exists=self.settings.if_exists,
            results=self.settings.results,
            rejections=self.settings.rejections,
        )
        self.log.info("%s", summary_table(self.summary))
        if self.failure() is None:
            self.checkpoint.clear()
        return self.summary

    def failure(self) -> AirflowException | None:
        """How the try failed (the exception to raise), or None when it succeeded."""
        summary = self.summary
        if self.interrupted is not None:
            return AirflowException(
                f"Stopped from outside ({self.interrupted}): nothing more was read or sent; the batches "
                f"that ended are recorded, any left in flight are reconciled by the next try. "
                f"{counts_text(summary)} An Airflow retry (or a new run with if_exists='skip') resumes "
                "without adding anything twice."
            )
        if self.errors:
            error = self.errors[0]
            if isinstance(error, MewsConfigurationError) or error.status in NOT_RETRYABLE:
                return AirflowFailException(f"{error} {counts_text(summary)}")
            return AirflowException(
                f"{error} {counts_text(summary)} An Airflow retry resumes without adding anything twice."
            )
        if self.budget.exceeded:
            rejected = summary["rejected"]
            return AirflowFailException(
                f"{rejected} row{'s' if rejected != 1 else ''} rejected, more than max_rejected_rows="
                f"{self.settings.max_rejected_rows} (fix the rows or raise it): {top_reasons(summary)}. "
                f"First: {first_rejections(summary)}. {counts_text(summary)} Rejected rows: "
                f"{summary['rejections'] or 'rejected_sample in the mews_summary XCom (or set rejections_table)'}."
            )
        return None


def counts_text(summary: dict[str, Any]) -> str:
    total = summary.get("rows_total")
    if total is None:
        unreached = "an unknown number not reached (the source could not be counted)"
    else:
        unreached = f"not reached {summary['not_reached']} of the source's {total} rows"
    synced = (
        f"updated {summary['updated']}, unchanged {summary['unchanged']}, " if "updated" in summary else ""
    )
    return (
        f"Added {summary['added']}, {synced}skipped {summary['skipped_existing']}, rejected {summary['rejected']}, "
        f"{unreached}; {summary['rows_read']} rows read."
    )


def top_reasons(summary: dict[str, Any]) -> str:
    reasons = summary.get("rejection_reasons") or {}
    return "; ".join(f"{count} x {reason.rstrip('.')}" for reason, count in reasons.items()) or "see log"


def first_rejections(summary: dict[str, Any], count: int = 3) -> str:
    """The first rejected rows of the sample, in source order, with their reasons and, for Mews's
    refusals, its RequestId (batches finish out of order; the sample keeps the first to finish)."""
    shown = [
        r["reason"].rstrip(".") + (f" (RequestId {r['request_id']})" if r.get("request_id") else "")
        for r in sorted(summary.get("rejected_sample") or [], key=lambda r: r.get("source_row") or 0)[:count]
    ]
    return "; ".join(shown) or "see log"
