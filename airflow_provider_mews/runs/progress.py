"""Counting every row to an outcome, progress lines, and the run's small summary (its XCom).

The summary's invariant, in both cases a run can end:

* the source's size is known (always for ``memberships=``; for SQL, the source was read to
  its end, or the run stopped early and the database counted it with ``SELECT COUNT(*)``):
  ``rows_total = added + skipped_existing + rejected + not_reached`` and
  ``rows_read <= rows_total``; a run that succeeds has ``not_reached = 0`` and
  ``rows_read = rows_total``;
* the run stopped early and the source could not be counted: ``rows_total`` and
  ``not_reached`` are None (unknown) and ``added + skipped_existing + rejected <= rows_read``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_mews.runs.outputs import Rejection


@dataclass
class RunTally:
    """rows_total = added + skipped_existing + rejected + not_reached, when rows_total is known."""

    sample_size: int = 20
    rows_read: int = 0  # read from the source by this try (a stopped run reads no further)
    rows_total: int | None = None  # rows in the source; None until the run ends, or when unknown
    added: int = 0
    skipped_existing: int = 0
    rejected: int = 0
    not_reached: int | None = 0  # rows_total - done; None when rows_total is unknown
    sync: bool = False  # a sync mode: the summary has updated, unchanged, canceled, deleted
    updated: int = 0
    unchanged: int = 0
    canceled: int = 0  # a mirror's removals: memberships, not rows
    deleted: int = 0
    reconciled: int = 0
    resumed_batches: int = 0  # batches done by an earlier try, skipped without a request
    lookups: int | None = None  # requests that resolved names to Ids (None: the rows carry Ids)
    reasons: Counter[str] = field(default_factory=Counter)
    sample: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _last_log: float = field(default_factory=time.monotonic)

    def reject(self, rejections: list[Rejection]) -> None:
        self.rejected += len(rejections)
        for r in rejections:
            self.reasons[_reason_kind(r)] += 1
            if len(self.sample) < self.sample_size:
                self.sample.append(r.short())

    @property
    def done(self) -> int:
        return self.added + self.skipped_existing + self.rejected + self.updated + self.unchanged

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def due(self, interval_s: float) -> bool:
        now = time.monotonic()
        if now - self._last_log >= interval_s:
            self._last_log = now
            return True
        return False

    def progress_line(
        self, total: int | None, rate_limited: int, rate_wait_s: float, limiter_wait_s: float = 0.0
    ) -> str:
        elapsed = max(self.elapsed(), 1e-9)
        rate = self.done / elapsed
        line = (
            f"progress: {self.done} rows done ({self.added} added, "
            + (f"{self.updated} updated, {self.unchanged} unchanged, " if self.sync else "")
            + f"{self.skipped_existing} skipped, "
            f"{self.rejected} rejected) of {total if total is not None else self.rows_read} read, "
            f"{rate:.0f} rows/s, {limiter_wait_s:.1f} s waited in the rate limiter (all threads), "
            f"{rate_limited} x 429 ({rate_wait_s:.1f} s held)"
        )
        if self.lookups is not None:
            line += f", {self.lookups} look-up requests"
        if total and rate > 0:
            line += f", ETA {max(0.0, (total - self.done) / rate):.0f} s"
        return line

    def summary(self, **extra: Any) -> dict[str, Any]:
        duration = self.elapsed()
        return {
            "rows_read": self.rows_read,
            "rows_total": self.rows_total,
            "added": self.added,
            "skipped_existing": self.skipped_existing,
            **(
                {
                    "updated": self.updated,
                    "unchanged": self.unchanged,
                    "canceled": self.canceled,
                    "deleted": self.deleted,
                }
                if self.sync
                else {}
            ),
            "rejected": self.rejected,
            "not_reached": self.not_reached,
            "reconciled": self.reconciled,
            "resumed_batches": self.resumed_batches,
            **({"lookups": self.lookups} if self.lookups is not None else {}),
            "duration_s": round(duration, 3),
            "rows_per_s": round(self.done / duration, 1) if duration > 0 else 0.0,
            "rejection_reasons": dict(self.reasons.most_common(10)),
            "rejected_sample": self.sample,
            **extra,
        }


def _reason_kind(rejection: Rejection) -> str:
    if rejection.field:
        return f"invalid {rejection.field}"
    reason = rejection.reason
    _, _, tail = reason.partition("Mews refused it ")
    return f"Mews refused: {tail[:120]}" if tail else reason[:120]


def summary_table(summary: dict[str, Any]) -> str:
    keys = (
        "rows_read", "rows_total", "added", "updated", "unchanged", "skipped_existing", "rejected", "not_reached",
        "canceled", "deleted", "planned_removals", "reconciled",
        "resumed_batches", "lookups", "requests", "limiter_wait_s", "rate_limited", "rate_limit_wait_s", "duration_s",
        "rows_per_s",
    )  # fmt: skip
    width = max(len(k) for k in keys)
    lines = [f"  {k.ljust(width)}  {_shown(summary[k])}" for k in keys if k in summary]
    for reason, count in summary.get("rejection_reasons", {}).items():
        lines.append(f"  rejected: {count} x {reason}")
    return "\n".join(["Mews loyalty memberships summary:", *lines])


def _shown(value: Any) -> str:
    return "unknown" if value is None else str(value)
