"""Progress that survives an Airflow retry, so a retried try neither repeats nor loses an add.

The checkpoint records, per task instance: when the first try started (``since``, the
lower bound for reconciliation), how far batches were *dispatched* (reserved ahead of
sending, so a crash can never hide a batch that was sent), and the batches known
*done* with a fingerprint of their rows and their counts. On a retry:

* a done batch whose rows have the same fingerprint is skipped without any request;
* a batch below the dispatch mark that is not known done is reconciled with Mews;
* anything beyond the mark was surely never sent and is sent normally.

It lives in Airflow 3.3's ``task_state_store`` (cleared when the task succeeds). Where
that does not exist, there is no checkpoint and every batch of a retried try is
reconciled with Mews instead: slower, equally exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

KEY = "mews_loyalty_checkpoint"
VERSION = 1
#: Batches reserved per write of the dispatch mark: one state write per this many batches.
RESERVE = 16


class StateStore:
    """Adapter over ``context["task_state_store"]``; a missing store makes every call a no-op."""

    def __init__(self, store: Any) -> None:
        self._store = store

    @property
    def available(self) -> bool:
        return self._store is not None

    def load(self) -> dict[str, Any] | None:
        if self._store is None:
            return None
        value = self._store.get(KEY)
        return value if isinstance(value, dict) and value.get("v") == VERSION else None

    def save(self, value: dict[str, Any]) -> None:
        if self._store is not None:
            self._store.set(KEY, value, **_retention())

    def clear(self) -> None:
        if self._store is not None:
            try:
                self._store.delete(KEY)
            except Exception:  # cleared on success by Airflow anyway
                pass


def _retention() -> dict[str, Any]:
    try:
        from airflow.sdk.execution_time.context import NEVER_EXPIRE
    except ImportError:
        return {}
    return {"retention": NEVER_EXPIRE}


@dataclass
class Checkpoint:
    since: str  # ISO UTC: nothing this task added can be older
    batch_size: int
    dispatched: int = 0  # batches with index < dispatched may have been sent
    done: dict[str, list[Any]] = field(
        default_factory=dict
    )  # index -> [fingerprint, added, skipped, rejected]
    resumed: bool = False  # loaded from an earlier try
    _store: StateStore | None = None
    _dirty: bool = False
    _saved_at: float = 0.0

    @classmethod
    def start(cls, store: StateStore, since: str, batch_size: int) -> Checkpoint:
        saved = store.load()
        if saved and saved.get("batch_size") == batch_size:
            return cls(
                since=saved["since"],
                batch_size=batch_size,
                dispatched=int(saved.get("dispatched", 0)),
                done=dict(saved.get("done", {})),
                resumed=True,
                _store=store,
            )
        if saved:
            # Batches of another size can't be matched: reconcile every batch instead.
            resumed = cls(
                since=saved["since"], batch_size=batch_size, dispatched=2**62, resumed=True, _store=store
            )
            resumed.flush(force=True)
            return resumed
        checkpoint = cls(since=since, batch_size=batch_size, _store=store)
        checkpoint.flush(force=True)
        return checkpoint

    def clear(self) -> None:
        """The task succeeded: a later, deliberate re-run starts afresh."""
        if self._store is not None:
            self._store.clear()

    def done_counts(self, index: int, fingerprint: str) -> tuple[int, int, int] | None:
        entry = self.done.get(str(index))
        if entry and entry[0] == fingerprint:
            return int(entry[1]), int(entry[2]), int(entry[3])
        return None

    def maybe_sent(self, index: int) -> bool:
        return self.resumed and index < self.dispatched

    def reserve(self, index: int) -> None:
        """Must be called before batch ``index`` is sent: the mark is written ahead."""
        if index >= self.dispatched:
            self.dispatched = index + RESERVE
            self.flush(force=True)

    def mark_done(self, index: int, fingerprint: str, added: int, skipped: int, rejected: int) -> None:
        self.done[str(index)] = [fingerprint, added, skipped, rejected]
        self._dirty = True
        self.flush()

    def flush(self, force: bool = False, every_s: float = 2.0) -> None:
        if self._store is None or not self._store.available:
            return
        now = time.monotonic()
        if not force and (not self._dirty or now - self._saved_at < every_s):
            return
        self._store.save(
            {
                "v": VERSION,
                "since": self.since,
                "batch_size": self.batch_size,
                "dispatched": self.dispatched,
                "done": self.done,
            }
        )
        self._dirty = False
        self._saved_at = now
