"""Where the GCRA state lives on one host: process memory, or a per-user SQLite file.

The SQLite file is the default: every task process of the user on this machine (LocalExecutor
workers, mapped shards, other DAGs on the same AccessToken) books its slots in the same row,
one ``BEGIN IMMEDIATE`` transaction per request (SQLite's own file locking; no lock code of
ours). The file sits in a private directory (mode 0700): ``$MEWS_RATE_LIMIT_DIR``, else
``$XDG_RUNTIME_DIR/airflow-provider-mews``, else ``<tempdir>/mews-<uid>``. It holds token
*hashes*, times, learned factors and the last slots booked, never a token.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import tempfile
import threading
import time
from pathlib import Path

from airflow_provider_mews.rate_limit.gcra import Params, State, must_rebook, on_429, reserve

log = logging.getLogger(__name__)

DIR_ENV = "MEWS_RATE_LIMIT_DIR"
DB_NAME = "rate-limit.sqlite3"
#: Rows untouched for this long are deleted (their factor has long recovered).
STALE_S = 24 * 3600.0
#: Columns added after the first version: ``peak`` (the recovery cap, 0.x) and ``log`` (the last
#: slots of the front-loaded windows, as text: ``repr`` keeps every bit of a float) and ``clean``
#: (requests sent in windows since the last 429: what the windows have learned).
ADDED_COLUMNS = {
    "peak": "REAL NOT NULL DEFAULT 0",
    "log": "TEXT NOT NULL DEFAULT ''",
    "clean": "REAL NOT NULL DEFAULT 0",
}


class MemoryBackend:
    """State in this process only (threads share it): a fallback when no private directory works."""

    describe = "this process only"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, State] = {}

    def reserve(self, key: str, params: Params, max_wait_s: float | None) -> tuple[float, float] | None:
        with self._lock:
            now = time.time()
            slot = reserve(self._states.setdefault(key, State()), params, now, max_wait_s)
            return None if slot is None else (slot, now)

    def on_429(self, key: str, params: Params, retry_after_s: float, slot: float | None) -> bool:
        with self._lock:
            return on_429(self._states.setdefault(key, State()), params, time.time(), retry_after_s, slot)

    def hold_remaining(self, key: str) -> float:
        with self._lock:
            state = self._states.get(key)
            return 0.0 if state is None else max(0.0, state.hold - time.time())

    def stale(self, key: str, booked_at: float) -> bool:
        with self._lock:
            state = self._states.get(key)
            return state is not None and must_rebook(state, time.time(), booked_at)


def runtime_dir() -> Path:
    """The private per-user directory for the shared state (created 0700, checked to be ours)."""
    configured = os.environ.get(DIR_ENV)
    if configured:
        path = Path(configured)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "airflow-provider-mews"
    else:
        path = Path(tempfile.gettempdir()) / f"mews-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user (uid {info.st_uid})")
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
    return path


class SqliteBackend:
    """State shared by every process of this user on this host, in one SQLite file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or runtime_dir() / DB_NAME
        self.describe = f"this host ({self.path})"
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        with self._lock:
            conn = self._connection()
            conn.execute(
                "CREATE TABLE IF NOT EXISTS gcra (key TEXT PRIMARY KEY, tat REAL NOT NULL, hold REAL NOT NULL, "
                "factor REAL NOT NULL, cut REAL NOT NULL, used REAL NOT NULL, peak REAL NOT NULL DEFAULT 0)"
            )
            columns = {row[1] for row in conn.execute("PRAGMA table_info(gcra)")}
            for name, kind in ADDED_COLUMNS.items():
                if name not in columns:  # a file written by an earlier version
                    try:
                        conn.execute(f"ALTER TABLE gcra ADD COLUMN {name} {kind}")
                    except sqlite3.OperationalError:  # another process added it meanwhile
                        pass
            conn.execute("DELETE FROM gcra WHERE used < ?", (time.time() - STALE_S,))
        try:
            self.path.chmod(0o600)
        except OSError:  # pragma: no cover - another user's file cannot be opened anyway
            pass

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # a forked child opens its own
            self._conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=OFF")  # times, not data: a lost write costs nothing
            self._pid = os.getpid()
        return self._conn

    def _transact(self, key: str, change: object) -> object:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                row = conn.execute(
                    "SELECT tat, hold, factor, cut, peak, log, clean FROM gcra WHERE key = ?", (key,)
                ).fetchone()
                state = State()
                if row:
                    tat, hold, factor, cut, peak, slots, clean = row
                    state = State(tat, hold, factor, cut, peak, [float(t) for t in slots.split()], clean)
                result = change(state, now)  # type: ignore[operator]
                conn.execute(
                    "INSERT OR REPLACE INTO gcra (key, tat, hold, factor, cut, used, peak, log, clean) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key,
                        state.tat,
                        state.hold,
                        state.factor,
                        state.cut,
                        now,
                        state.peak,
                        " ".join(map(repr, state.log)),
                        state.clean,
                    ),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return result

    def reserve(self, key: str, params: Params, max_wait_s: float | None) -> tuple[float, float] | None:
        def change(state: State, now: float) -> tuple[float, float] | None:
            slot = reserve(state, params, now, max_wait_s)
            return None if slot is None else (slot, now)

        return self._transact(key, change)  # type: ignore[return-value]

    def on_429(self, key: str, params: Params, retry_after_s: float, slot: float | None) -> bool:
        return bool(self._transact(key, lambda state, now: on_429(state, params, now, retry_after_s, slot)))

    def hold_remaining(self, key: str) -> float:
        with self._lock:
            row = self._connection().execute("SELECT hold FROM gcra WHERE key = ?", (key,)).fetchone()
        return 0.0 if row is None else max(0.0, row[0] - time.time())

    def stale(self, key: str, booked_at: float) -> bool:
        """Whether a slot booked at ``booked_at`` must be booked again (a hold, or a cut since)."""
        with self._lock:
            row = self._connection().execute("SELECT hold, cut FROM gcra WHERE key = ?", (key,)).fetchone()
        return row is not None and must_rebook(State(hold=row[0], cut=row[1]), time.time(), booked_at)
