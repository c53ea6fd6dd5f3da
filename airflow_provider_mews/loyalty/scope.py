"""What a sync has seen, on disk: the mirror's scope and the memberships source rows matched.

A mirror compares the source with every membership of its programs; at 1 000 000
memberships that set cannot live in Python objects (hundreds of MB), so it lives in a
temporary SQLite file next to the task and memory stays flat. The file is private to one
try of one task: an Airflow retry lists the scope again (Mews is the truth, and the earlier
try may have changed it).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sqlite3
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

from airflow_provider_mews.loyalty.sync_plan import SyncRow, needs_removal

#: Membership fields kept per scope entry: what matching, diff and removal read.
KEPT_FIELDS = (
    "Id", "AccountId", "LoyaltyProgramId", "State", "IsPrimary", "ProviderMembershipId",
    "MembershipNumber", "Code", "Points", "ExpirationDate", "Url", "LoyaltyTierId",
)  # fmt: skip
#: SQLite host parameters per statement (the old default limit is 999).
_CHUNK = 500


_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    @functools.wraps(method)
    def locked(self: ScopeIndex, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return cast(_F, locked)


#: Scope folders are named after the process that made them: ``mews-sync-<pid>-<random>``.
_PREFIX = "mews-sync-"


def sweep_orphans(directory: str | None = None) -> list[str]:
    """Remove the scope folders of processes that are gone (a task killed with SIGKILL cannot
    remove its own): they hold membership data nobody will read. Only this user's folders, and
    only those whose process no longer exists; returns the folders removed."""
    base = directory or tempfile.gettempdir()
    removed: list[str] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        pid_text = entry.name[len(_PREFIX) :].split("-", 1)[0]
        if not entry.name.startswith(_PREFIX) or not pid_text.isdigit():
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid() or not entry.is_dir(
                follow_symlinks=False
            ):
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:  # its process is gone
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        except OSError:  # alive but another user's (EPERM), or vanished meanwhile
            continue
    return removed


class ScopeIndex:
    """Scope memberships and matched Ids in a temporary SQLite file; safe to share between threads."""

    def __init__(self, directory: str | None = None, cache_kib: int = 8192) -> None:
        sweep_orphans(directory)
        self._dir = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=directory)
        self.path = os.path.join(self._dir, "scope.sqlite")
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            # A scratch file: no journal, no fsync; a bounded page cache keeps memory flat.
            db.executescript(
                f"""
                PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-{int(cache_kib)};
                PRAGMA temp_store=FILE;
                CREATE TABLE scope (id TEXT PRIMARY KEY, account TEXT, program TEXT, state TEXT, data TEXT);
                CREATE INDEX scope_key ON scope (account, program);
                CREATE TABLE matched (id TEXT PRIMARY KEY, row INTEGER) WITHOUT ROWID;
                """
            )
        except BaseException:  # e.g. a full disk: leave nothing behind
            if db is not None:
                db.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._db = db
        self.lock = threading.RLock()  # one statement (or transaction) at a time
        self.size = 0

    # -- the scope --

    @_locked
    def add_scope(self, memberships: Iterable[Mapping[str, Any]]) -> int:
        """Store memberships of the scope (e.g. one getAll page); returns how many were new."""
        rows = [
            (
                m["Id"].lower(),
                m["AccountId"].lower(),
                m["LoyaltyProgramId"].lower(),
                m.get("State"),
                json.dumps({k: m.get(k) for k in KEPT_FIELDS}, separators=(",", ":")),
            )
            for m in memberships
        ]
        before = self._db.total_changes
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR IGNORE INTO scope VALUES (?, ?, ?, ?, ?)", rows)
        self._db.execute("COMMIT")
        added = self._db.total_changes - before
        self.size += added
        return added

    @_locked
    def candidates(
        self, rows: Sequence[SyncRow]
    ) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], list[dict[str, Any]]]]:
        """The scope memberships ``rows`` could match, indexed as :func:`~airflow_provider_mews.loyalty.sync_plan.match_row` reads them."""
        ids = list({r.membership_id for r in rows if r.membership_id})
        keys = list({(r.account_id, r.program_id) for r in rows if r.account_id and r.program_id})
        by_id: dict[str, dict[str, Any]] = {}
        by_key: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for (data,) in self._db.execute(f"SELECT data FROM scope WHERE id IN ({marks})", chunk):
                m = json.loads(data)
                by_id[m["Id"].lower()] = m
        accounts = list({a for a, _ in keys})
        wanted = set(keys)
        for start in range(0, len(accounts), _CHUNK):
            chunk = accounts[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT account, program, data FROM scope WHERE account IN ({marks}) ORDER BY rowid"
            for account, program, data in self._db.execute(query, chunk):
                if (account, program) in wanted:
                    by_key[(account, program)].append(json.loads(data))
        return by_id, by_key

    # -- what source rows matched --

    @_locked
    def claim(self, membership_id: str, row: int) -> int | None:
        """Record that source ``row`` matched ``membership_id``; the earlier row when one already did."""
        mid = membership_id.lower()
        cur = self._db.execute("INSERT OR IGNORE INTO matched VALUES (?, ?)", (mid, row))
        if cur.rowcount == 1:
            return None
        (earlier,) = self._db.execute("SELECT row FROM matched WHERE id = ?", (mid,)).fetchone()
        return int(earlier) if earlier != row else None

    @_locked
    def claim_many(self, matches: Iterable[tuple[str, int]]) -> dict[str, int]:
        """:meth:`claim` for a batch, in one transaction: ``{membership Id: earlier row}`` of the conflicts."""
        conflicts: dict[str, int] = {}
        self._db.execute("BEGIN")
        try:
            for membership_id, row in matches:
                earlier = self.claim(membership_id, row)
                if earlier is not None:
                    conflicts[membership_id] = earlier
        finally:
            self._db.execute("COMMIT")
        return conflicts

    def unmatched(self, on_missing: str, page_size: int = 1000) -> Iterator[list[dict[str, Any]]]:
        """Pages of scope memberships no source row matched that ``on_missing`` has to change."""
        last = 0
        while True:
            with self.lock:
                page = self._db.execute(
                    "SELECT s.rowid, s.data FROM scope s LEFT JOIN matched m ON m.id = s.id "
                    "WHERE m.id IS NULL AND s.rowid > ? ORDER BY s.rowid LIMIT ?",
                    (last, page_size),
                ).fetchall()
            if not page:
                return
            last = page[-1][0]
            found = [m for m in (json.loads(data) for _, data in page) if needs_removal(m, on_missing)]
            if found:
                yield found

    @_locked
    def count_unmatched(self, on_missing: str) -> int:
        """How many removals ``on_missing`` needs: checked against max_removals before any write."""
        if on_missing == "keep":
            return 0
        query = "SELECT COUNT(*) FROM scope s LEFT JOIN matched m ON m.id = s.id WHERE m.id IS NULL"
        if on_missing == "cancel":
            query += " AND (s.state IS NULL OR s.state != 'Canceled')"
        return int(self._db.execute(query).fetchone()[0])

    def close(self) -> None:
        self._db.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ScopeIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
