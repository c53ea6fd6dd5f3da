"""Where each row's outcome goes: the Mews Id of what was added, and every rejection with its reason.

Outcomes are written per batch. A table output first deletes the batch's source-row range
for this task instance, then inserts, in one transaction: a retried try that redoes a
batch rewrites its rows instead of duplicating them. A JSON-lines file output appends
(consumers keep the last line per ``source_row``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from airflow_provider_mews.sources import quote_table


class Outcome(NamedTuple):
    """A row that Mews now holds: added by this task, or already there (``skipped_existing``).

    Sync modes add ``updated`` (``changed_fields`` names what was sent) and ``unchanged``; a
    mirror's removals (``canceled``, ``deleted``) have no source row (``source_row`` None).
    """

    source_row: int | None
    account_id: str
    loyalty_program_id: str
    code: str | None
    mews_membership_id: str | None
    outcome: str  # "added" | "skipped_existing" | "updated" | "unchanged" | "canceled" | "deleted"
    changed_fields: str | None = None  # comma-separated Mews fields an update sent


class Rejection(NamedTuple):
    """A row that was not added, and why. ``field`` is set when the row itself is invalid."""

    source_row: int
    account_id: str | None
    field: str | None
    reason: str
    request_id: str | None = None
    row_json: str | None = None

    def short(self) -> dict[str, Any]:
        out = self._asdict()
        out.pop("row_json")
        return out


@dataclass(frozen=True)
class RunKey:
    dag_id: str
    run_id: str
    task_id: str
    map_index: int


RESULT_COLUMNS = (
    "source_row", "account_id", "loyalty_program_id", "code", "mews_membership_id", "outcome", "changed_fields",
)  # fmt: skip
REJECTION_COLUMNS = ("source_row", "account_id", "field", "reason", "request_id", "row_json")
KEY_COLUMNS = ("dag_id", "run_id", "task_id", "map_index")


class TableOutput:
    """Writes outcomes and/or rejections to tables on a common-sql connection (created if missing)."""

    def __init__(
        self, hook: Any, key: RunKey, results_table: str | None, rejections_table: str | None
    ) -> None:
        self.hook = hook
        self.key = key
        self.results_table = quote_table(results_table) if results_table else None
        self.rejections_table = quote_table(rejections_table) if rejections_table else None
        self.placeholder = getattr(hook, "placeholder", "%s")
        self._conn: Any = None

    def open(self) -> None:
        self._conn = self.hook.get_conn()
        cur = self._conn.cursor()
        if type(self._conn).__module__.startswith("sqlite3"):
            # Let the source cursor keep reading the same database while outcomes are committed.
            cur.execute("PRAGMA journal_mode=WAL")
        text = "VARCHAR(255)"
        key_ddl = f"dag_id {text}, run_id {text}, task_id {text}, map_index INTEGER, source_row INTEGER"
        if self.results_table:
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {self.results_table} ({key_ddl}, account_id VARCHAR(36), "
                f"loyalty_program_id VARCHAR(36), code {text}, mews_membership_id VARCHAR(36), outcome VARCHAR(32), "
                f"changed_fields {text})"
            )
            # A results table made by an earlier version has no changed_fields column yet.
            cur.execute(f"SELECT * FROM {self.results_table} WHERE 1 = 0")
            if "changed_fields" not in {d[0].lower() for d in cur.description or ()}:
                cur.execute(f"ALTER TABLE {self.results_table} ADD COLUMN changed_fields {text}")
        if self.rejections_table:
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {self.rejections_table} ({key_ddl}, account_id {text}, "
                f"field VARCHAR(64), reason TEXT, request_id {text}, row_json TEXT)"
            )
        self._conn.commit()
        cur.close()

    def write(
        self, first_row: int, last_row: int, outcomes: Sequence[Outcome], rejections: Sequence[Rejection]
    ) -> None:
        if self._conn is None:
            self.open()
        ph = self.placeholder
        key = (self.key.dag_id, self.key.run_id, self.key.task_id, self.key.map_index)
        where = " AND ".join(f"{c} = {ph}" for c in KEY_COLUMNS) + f" AND source_row BETWEEN {ph} AND {ph}"
        cur = self._conn.cursor()
        try:
            for table, columns, rows in (
                (self.results_table, RESULT_COLUMNS, outcomes),
                (self.rejections_table, REJECTION_COLUMNS, rejections),
            ):
                if not table:
                    continue
                cur.execute(f"DELETE FROM {table} WHERE {where}", (*key, first_row, last_row))
                if rows:
                    names = ", ".join(KEY_COLUMNS + columns)
                    marks = ", ".join([ph] * (len(KEY_COLUMNS) + len(columns)))
                    cur.executemany(
                        f"INSERT INTO {table} ({names}) VALUES ({marks})", [(*key, *r) for r in rows]
                    )
            self._conn.commit()
        except Exception:
            self._conn.rollback()
            raise
        finally:
            cur.close()

    def write_removals(self, outcomes: Sequence[Outcome]) -> None:
        """A mirror's removals (no source row): appended, as each is done exactly once."""
        if not self.results_table or not outcomes:
            return
        if self._conn is None:
            self.open()
        ph = self.placeholder
        key = (self.key.dag_id, self.key.run_id, self.key.task_id, self.key.map_index)
        names = ", ".join(KEY_COLUMNS + RESULT_COLUMNS)
        marks = ", ".join([ph] * (len(KEY_COLUMNS) + len(RESULT_COLUMNS)))
        cur = self._conn.cursor()
        try:
            cur.executemany(
                f"INSERT INTO {self.results_table} ({names}) VALUES ({marks})", [(*key, *r) for r in outcomes]
            )
            self._conn.commit()
        except Exception:
            self._conn.rollback()
            raise
        finally:
            cur.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class FileOutput:
    """Appends outcomes and/or rejections as JSON lines to local (or mounted) files."""

    def __init__(self, key: RunKey, results_file: str | None, rejections_file: str | None) -> None:
        self.key = key
        self.paths = {"results": results_file, "rejections": rejections_file}
        self._files: dict[str, Any] = {}

    def open(self) -> None:
        for kind, path in self.paths.items():
            if path:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                self._files[kind] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run, closed in close()

    def write(
        self, first_row: int, last_row: int, outcomes: Sequence[Outcome], rejections: Sequence[Rejection]
    ) -> None:
        if not self._files:
            self.open()
        key = asdict(self.key)
        for kind, records in (("results", outcomes), ("rejections", rejections)):
            fh = self._files.get(kind)
            if fh is not None and records:
                fh.writelines(json.dumps({**key, **r._asdict()}, default=str) + "\n" for r in records)
                fh.flush()
                os.fsync(fh.fileno())

    def write_removals(self, outcomes: Sequence[Outcome]) -> None:
        """A mirror's removals (no source row), appended like outcomes."""
        self.write(0, 0, outcomes, [])

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()
