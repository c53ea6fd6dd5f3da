"""Progress that survives an Airflow retry, so a retried try neither repeats nor loses an add.

The checkpoint is one small record per task instance, of bounded size whatever the run's
length (about 1 KB; at most ``2 * max_active_requests`` batch entries, never more than 64):

* ``since``: when the first try started, the lower bound for reconciliation;
* ``dispatched``: batches with a lower index may have been sent (reserved ahead of sending,
  :data:`RESERVE` at a time, so a crash can never hide a batch that was sent);
* a **watermark**: batches ``0 .. upto-1`` all finished, with their summed counts and one
  rolling fingerprint of their rows (``prefix``: each batch's fingerprint folded in order);
* ``beyond``: the few batches finished out of order past the watermark, each with its own
  fingerprint and counts. The run never dispatches a batch :attr:`Checkpoint.window` or more
  past the watermark, so there are never more of them than that;
* ``refused``: rows Mews refused in batches not finished yet (at most :data:`MAX_REFUSED`),
  written as soon as an isolation proves them. A try stopped in the middle of isolating a
  batch (``execution_timeout``, SIGTERM, SIGKILL) would otherwise start the isolation over from
  the whole batch; the next try rejects these rows without a request, finds the rows already
  added by reconciling, and sends only the rest, so repeated interruptions converge.

On a retry (:mod:`airflow_provider_mews.loyalty.add_run`):

* the batches below the watermark are read again and their fingerprints folded; when the
  fold equals ``prefix``, all of them are skipped without a request, their counts taken from
  the record. Nothing is sent before that check, so when it fails (the source changed
  between tries) the source is read again from the start and every batch that may have been
  sent is reconciled with Mews instead: slower, equally exact. Why one fold instead of one
  fingerprint per batch: the record stays bounded, and a changed source is rare (SQL sources
  are read in a stable ``ORDER BY``);
* a batch in ``beyond`` whose rows have the same fingerprint is skipped without a request;
* any other batch below the dispatch mark is reconciled with Mews (it may have been sent);
* anything beyond the mark was surely never sent and is sent normally.

It lives in Airflow 3.3's ``task_state_store``, with the store's default retention
(``[state_store] default_retention_days``), and is deleted when the task succeeds. Where
that store does not exist, there is no checkpoint and every batch of a retried try is
reconciled with Mews instead: slower, equally exact.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

KEY = "mews_loyalty_checkpoint"
VERSION = 2
#: Batches reserved per write of the dispatch mark, at least: one state write per this many batches.
RESERVE = 16
#: ... or as many batches as the run dispatches in this many seconds, when it is faster: a state
#: write costs ~10 ms of task CPU through the execution API, so writes are kept a few per 10 s at
#: any speed. A retry reconciles (one getAll each) the reserved batches that were never sent.
RESERVE_S = 5.0
#: ... but never more than this many: what a retry may have to reconcile for nothing stays bounded.
MAX_RESERVE = 256
#: Seconds between writes of the progress (the watermark) when nothing forces one.
FLUSH_EVERY_S = 5.0
#: Hex digits of a batch fingerprint kept in the record and folded into ``prefix`` (64 bits).
FINGERPRINT_HEX = 16
#: Most batches ever finished beyond the watermark (the record's only part that varies in size).
MAX_WINDOW = 64
#: A mark beyond any batch: every batch may have been sent.
ALL = 2**62
#: Most refused rows of unfinished batches remembered (beyond it, a retry isolates them again).
MAX_REFUSED = 32
#: Characters of Mews's refusal message kept per remembered row.
REFUSED_MESSAGE_CHARS = 300


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
        return value if isinstance(value, dict) else None

    def save(self, value: dict[str, Any]) -> None:
        if self._store is not None:
            # The store's default retention: a task that failed for good does not keep it forever.
            self._store.set(KEY, value)

    def clear(self) -> None:
        if self._store is not None:
            try:
                self._store.delete(KEY)
            except Exception:  # expires with the store's retention anyway
                pass


def fold(prefix: str, fingerprint: str) -> str:
    """The rolling fingerprint of a run of batches, one batch more."""
    data = (prefix + fingerprint[:FINGERPRINT_HEX]).encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Finished:
    """Batches finished by an earlier try, as its record says."""

    upto: int = 0  # batches 0 .. upto-1 all finished
    prefix: str = ""  # their rolling fingerprint
    counts: tuple[int, ...] = (0, 0, 0)  # their added, skipped_existing, rejected (a sync counts more)
    beyond: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # index -> fp, *counts


@dataclass
class Checkpoint:
    since: str  # ISO UTC: nothing this task added can be older
    batch_size: int
    window: int = 16  # batches may finish at most this far beyond the watermark
    dispatched: int = 0  # batches with index < dispatched may have been sent (by any try)
    resumed: bool = False  # loaded from an earlier try
    earlier: Finished = field(default_factory=Finished)  # what an earlier try finished
    sent_before: int = 0  # the dispatch mark an earlier try left: below it, a batch may have been sent
    # This try's progress, continuing the earlier try's once its batches are checked.
    upto: int = 0
    prefix: str = ""
    counts: list[int] = field(default_factory=lambda: [0, 0, 0])
    beyond: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    #: batch index -> (fingerprint, {source row: (status, request_id, message)}) of unfinished batches
    refused: dict[int, tuple[str, dict[int, tuple[Any, ...]]]] = field(default_factory=dict)
    _store: StateStore | None = None
    #: Refusals are noted from worker threads; every change and save of the record holds it.
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _dirty: bool = False
    _saved_at: float = 0.0
    _reserved: tuple[int, float] | None = None  # (batch index, monotonic time) of the last reserve

    @classmethod
    def start(
        cls, store: StateStore, since: str, batch_size: int, max_active_requests: int = 16
    ) -> Checkpoint:
        window = min(2 * max_active_requests, MAX_WINDOW)
        saved = store.load()
        if saved is None:
            checkpoint = cls(since=since, batch_size=batch_size, window=window, _store=store)
            checkpoint.flush(force=True)
            return checkpoint
        since = str(saved.get("since") or since)
        if saved.get("v") != VERSION or saved.get("batch_size") != batch_size:
            # Batches of another size (or a record of another version) can't be matched:
            # reconcile every batch instead.
            checkpoint = cls(
                since=since, batch_size=batch_size, window=window, dispatched=ALL, resumed=True, _store=store
            )
            checkpoint.sent_before = ALL
            checkpoint.flush(force=True)
            return checkpoint
        beyond = {int(e[0]): (str(e[1]), *(int(n) for n in e[2:])) for e in saved.get("beyond", [])}
        earlier = Finished(
            upto=int(saved.get("upto", 0)),
            prefix=str(saved.get("prefix", "")),
            counts=tuple(int(n) for n in saved.get("counts", (0, 0, 0))),  # type: ignore[arg-type]
            beyond=beyond,
        )
        dispatched = int(saved.get("dispatched", 0))
        refused = {
            int(index): (str(fp), {int(r[0]): (r[1], r[2], str(r[3])) for r in rows})
            for index, fp, rows in saved.get("refused", [])
        }
        return cls(
            refused=refused,
            since=since,
            batch_size=batch_size,
            window=window,
            dispatched=dispatched,
            resumed=True,
            earlier=earlier,
            sent_before=dispatched,
            _store=store,
        )

    def clear(self) -> None:
        """The task succeeded: a later, deliberate re-run starts afresh."""
        if self._store is not None:
            self._store.clear()

    # -- a retry meets the earlier try's batches --

    def accept_earlier_prefix(self) -> None:
        """The batches below the earlier watermark were read again and are the same: continue from
        it. The earlier try's batches beyond it join this try's record as they are met again."""
        self.upto = self.earlier.upto
        self.prefix = self.earlier.prefix
        self.counts = list(self.earlier.counts)

    def forget_earlier(self) -> None:
        """The source changed: trust no finished batch, reconcile every batch that may have been sent."""
        self.earlier = Finished()
        self.upto, self.prefix, self.counts, self.beyond = 0, "", [0, 0, 0], {}
        self._dirty = True

    def reconcile_all(self, since: str) -> None:
        """No record to go by (no store on this Airflow): any batch may have been sent since ``since``."""
        self.since = since
        self.resumed = True
        self.dispatched = self.sent_before = ALL

    def done_counts(self, index: int, fingerprint: str) -> tuple[int, ...] | None:
        """Counts of batch ``index`` if an earlier try finished it beyond its watermark with these
        same rows (then :meth:`mark_done` it again); None when it must be taken through Mews."""
        entry = self.earlier.beyond.pop(index, None)
        if entry is None:
            return None
        if entry[0] == fingerprint[:FINGERPRINT_HEX]:
            return tuple(entry[1:])
        return None  # its rows changed: this try redoes it

    def known_refusals(self, index: int, fingerprint: str) -> dict[int, tuple[Any, ...]]:
        """Rows of batch ``index`` an earlier try proved Mews refuses (source row -> status,
        request_id, message), if the batch holds the same rows; else none."""
        with self._lock:
            entry = self.refused.get(index)
            if entry is None or entry[0] != fingerprint[:FINGERPRINT_HEX]:
                return {}
            return dict(entry[1])

    def note_refused(
        self, index: int, fingerprint: str, row: int, status: Any, request_id: Any, message: str
    ) -> None:
        """An isolation proved Mews refuses source row ``row`` of batch ``index``: saved at once
        (any thread), so a try stopped before the batch ends does not isolate it again."""
        with self._lock:
            fp = fingerprint[:FINGERPRINT_HEX]
            entry = self.refused.get(index)
            if entry is None or entry[0] != fp:
                entry = self.refused[index] = (fp, {})
            if row in entry[1] or sum(len(e[1]) for e in self.refused.values()) >= MAX_REFUSED:
                return
            entry[1][row] = (status, request_id, message[:REFUSED_MESSAGE_CHARS])
            self._dirty = True
            self.flush(force=True)

    def maybe_sent(self, index: int) -> bool:
        """An earlier try may have sent batch ``index``: reconcile before sending it."""
        return self.resumed and index < self.sent_before

    # -- this try's progress --

    def within_window(self, index: int) -> bool:
        """Batch ``index`` may be dispatched without the record growing past its bound."""
        return index < self.upto + self.window

    def reserve(self, index: int) -> None:
        """Must be called before batch ``index`` is sent: the mark is written ahead."""
        if index >= self.dispatched:
            now = time.monotonic()
            ahead = RESERVE
            if self._reserved is not None:
                since_index, since_at = self._reserved
                pace = (index - since_index) / max(now - since_at, 1e-3)  # batches per second
                ahead = max(RESERVE, min(int(pace * RESERVE_S), MAX_RESERVE))
            self._reserved = (index, now)
            self.dispatched = index + ahead
            self.flush(force=True)

    def mark_done(self, index: int, fingerprint: str, *counts: int) -> None:
        """``counts``: added, skipped_existing, rejected (a sync: added, updated, unchanged, rejected)."""
        entry = (fingerprint[:FINGERPRINT_HEX], *counts)
        with self._lock:
            self.refused.pop(index, None)  # finished: its rejections are in the counts
            if index < self.upto:
                return  # already below the watermark (an earlier try's batch, skipped)
            self.beyond[index] = entry
            while self.upto in self.beyond:  # advance the watermark over every contiguous finished batch
                fp, *done = self.beyond.pop(self.upto)
                self.prefix = fold(self.prefix, fp)
                self.counts += [0] * (len(done) - len(self.counts))
                for slot, n in enumerate(done):
                    self.counts[slot] += n
                self.upto += 1
            self._dirty = True
            self.flush()

    def record(self) -> dict[str, Any]:
        """What is saved: constant size for any run length."""
        return {
            "v": VERSION,
            "since": self.since,
            "batch_size": self.batch_size,
            "dispatched": self.dispatched,
            "upto": self.upto,
            "prefix": self.prefix,
            "counts": list(self.counts),
            "beyond": [[i, *entry] for i, entry in sorted(self.beyond.items())],
            "refused": [
                [i, fp, [[row, *why] for row, why in sorted(rows.items())]]
                for i, (fp, rows) in sorted(self.refused.items())
            ],
        }

    def flush(self, force: bool = False, every_s: float = FLUSH_EVERY_S) -> None:
        if self._store is None or not self._store.available:
            return
        now = time.monotonic()
        if not force and (not self._dirty or now - self._saved_at < every_s):
            return
        with self._lock:
            self._store.save(self.record())
            self._dirty = False
            self._saved_at = now
