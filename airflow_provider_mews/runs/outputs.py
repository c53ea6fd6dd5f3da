"""Where each row's outcome goes: the Mews Id of what was added, and every rejection with its reason.

Outcomes are written per batch. A table output first deletes the batch's source-row range
for this task instance, then inserts, in one transaction: a retried try that redoes a
batch rewrites its rows instead of duplicating them. The delete is needed only when an
earlier try (or an earlier run of the cleared task instance) may have written that range:
a try that finds no row of its task instance when it opens the tables, or a batch the
caller knows was never written, is inserted without it. Both tables carry an index on the
task instance and ``source_row``, created with them and added to tables made by older
versions, so the delete and the check stay an index lookup however many runs the tables
hold. A JSON-lines file output appends (consumers keep the last line per ``source_row``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from airflow_provider_mews.runs.sources import quote_table

log = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """A row that Mews now holds: added by this task, or already there (``skipped_existing``).

    Sync modes add ``updated`` (``changed_fields`` names what was sent) and ``unchanged``; a
    mirror's removals (``canceled``, ``deleted``) have no source row (``source_row`` None). A dry
    run writes each as ``planned_<outcome>``.
    """

    source_row: int | None
    account_id: str
    loyalty_program_id: str
    code: str | None
    mews_membership_id: str | None
    outcome: str  # "added" | "skipped_existing" | "updated" | "unchanged" | "canceled" | "deleted" (dry run: "planned_...")
    changed_fields: str | None = None  # comma-separated Mews fields an update sent
    #: The tier the membership holds (a row naming its tier by code shows where it went).
    loyalty_tier_id: str | None = None


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
    "loyalty_tier_id",
)  # fmt: skip
REJECTION_COLUMNS = ("source_row", "account_id", "field", "reason", "request_id", "row_json")
KEY_COLUMNS = ("dag_id", "run_id", "task_id", "map_index")
#: What the per-batch rewrite filters on, in this order: the index of both outcome tables.
INDEX_COLUMNS = (*KEY_COLUMNS, "source_row")
#: PostgreSQL cuts identifiers at 63 bytes.
MAX_IDENTIFIER = 63


def index_name(table: str) -> str:
    """The index of an outcome table: ``<table>_mews_row_idx``, unqualified, at most 63 bytes."""
    base = table.rsplit(".", 1)[-1]
    suffix = "_mews_row_idx"
    return base[: MAX_IDENTIFIER - len(suffix)] + suffix


class TableOutput:
    """Writes outcomes and/or rejections to tables on a common-sql connection (created if missing)."""

    def __init__(
        self, hook: Any, key: RunKey, results_table: str | None, rejections_table: str | None
    ) -> None:
        self.hook = hook
        self.key = key
        self.results_table = quote_table(results_table, "results_table") if results_table else None
        self.rejections_table = (
            quote_table(rejections_table, "rejections_table") if rejections_table else None
        )
        self.placeholder = getattr(hook, "placeholder", "%s")
        self._conn: Any = None
        #: True when this task instance had rows in the tables when they were opened.
        self.had_rows = True

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
                f"changed_fields {text}, loyalty_tier_id VARCHAR(36))"
            )
            # A results table made by an earlier version lacks the columns added since.
            cur.execute(f"SELECT * FROM {self.results_table} WHERE 1 = 0")
            have = {d[0].lower() for d in cur.description or ()}
            for column, ddl in (("changed_fields", text), ("loyalty_tier_id", "VARCHAR(36)")):
                if column not in have:
                    cur.execute(f"ALTER TABLE {self.results_table} ADD COLUMN {column} {ddl}")
        if self.rejections_table:
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {self.rejections_table} ({key_ddl}, account_id {text}, "
                f"field VARCHAR(64), reason TEXT, request_id {text}, row_json TEXT)"
            )
        self._conn.commit()
        try:
            for table in self._tables():
                self._ensure_index(cur, table)
            self.had_rows = any(self._has_rows(cur, table) for table in self._tables())
        finally:
            cur.close()

    def _tables(self) -> list[str]:
        return [t for t in (self.results_table, self.rejections_table) if t]

    def _ensure_index(self, cur: Any, table: str) -> None:
        """Create the rewrite's index if missing (new tables and tables of older versions alike)."""
        name = index_name(table)
        schema, _, base = table.rpartition(".")
        if self._is_sqlite():  # SQLite qualifies the index, not the table
            ddl = f"CREATE INDEX IF NOT EXISTS {schema + '.' if schema else ''}{name} ON {base}"
        else:
            ddl = f"CREATE INDEX IF NOT EXISTS {name} ON {table}"
        try:
            cur.execute(f"{ddl} ({', '.join(INDEX_COLUMNS)})")
            self._conn.commit()
        except Exception as exc:
            # A database without IF NOT EXISTS, a shard creating it at the same moment, or no
            # right to create it: outcomes stay correct, only the rewrite scans the table.
            self._conn.rollback()
            log.warning(
                "Could not create index %s on %s (%s: %s); create it yourself: CREATE INDEX %s ON %s (%s)",
                name, table, type(exc).__name__, str(exc).strip()[:200], name, table, ", ".join(INDEX_COLUMNS),
            )  # fmt: skip

    def _has_rows(self, cur: Any, table: str) -> bool:
        ph = self.placeholder
        where = " AND ".join(f"{c} = {ph}" for c in KEY_COLUMNS)
        try:
            cur.execute(f"SELECT 1 FROM {table} WHERE {where} LIMIT 1", self._key())
            found = cur.fetchone() is not None
        except Exception:  # a dialect without LIMIT: assume rows, so every batch is rewritten
            self._conn.rollback()
            return True
        self._conn.commit()  # end the read transaction (PostgreSQL) before the run
        return found

    def _key(self) -> tuple[str, str, str, int]:
        return (self.key.dag_id, self.key.run_id, self.key.task_id, self.key.map_index)

    def _is_sqlite(self) -> bool:
        return type(self._conn).__module__.startswith("sqlite3")

    def write(
        self,
        first_row: int,
        last_row: int,
        outcomes: Sequence[Outcome],
        rejections: Sequence[Rejection],
        may_have_been_written: bool = True,
    ) -> None:
        """Rewrite the outcomes of source rows ``first_row..last_row`` in one transaction.

        ``may_have_been_written=False``: the caller knows no earlier try wrote this range (a
        batch beyond every earlier try's dispatch mark), so the delete is skipped. It is also
        skipped when this task instance had no rows in the tables when they were opened.
        """
        if self._conn is None:
            self.open()
        rewrite = may_have_been_written and self.had_rows
        ph = self.placeholder
        key = self._key()
        where = " AND ".join(f"{c} = {ph}" for c in KEY_COLUMNS) + f" AND source_row BETWEEN {ph} AND {ph}"
        with self._transaction() as cur:
            for table, columns, rows in (
                (self.results_table, RESULT_COLUMNS, outcomes),
                (self.rejections_table, REJECTION_COLUMNS, rejections),
            ):
                if not table:
                    continue
                if rewrite:
                    cur.execute(f"DELETE FROM {table} WHERE {where}", (*key, first_row, last_row))
                if rows:
                    self._insert(cur, table, columns, rows)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A cursor whose work is committed at the end of the block, or rolled back on an error."""
        if self._conn is None:
            self.open()
        cur = self._conn.cursor()
        try:
            yield cur
            self._conn.commit()
        except Exception:
            self._conn.rollback()
            raise
        finally:
            cur.close()

    def _insert(self, cur: Any, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """This task instance's rows into ``table`` (the key columns first), in one executemany."""
        names = ", ".join([*KEY_COLUMNS, *columns])
        marks = ", ".join([self.placeholder] * (len(KEY_COLUMNS) + len(columns)))
        key = self._key()
        cur.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", [(*key, *r) for r in rows])

    def write_removals(self, outcomes: Sequence[Outcome]) -> None:
        """A mirror's removals (no source row): appended, as each is done exactly once."""
        if not self.results_table or not outcomes:
            return
        with self._transaction() as cur:
            self._insert(cur, self.results_table, RESULT_COLUMNS, outcomes)

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
        """Open (create) every file for appending; an OSError names the parameter and the path."""
        for kind, path in self.paths.items():
            if path:
                try:
                    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                    self._files[kind] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run, closed in close()
                except OSError as exc:
                    raise OSError(
                        f"{kind}_file={path!r} cannot be opened for appending ({exc.strerror or exc}): "
                        "name a file in a folder the worker can write"
                    ) from None

    def write(
        self,
        first_row: int,
        last_row: int,
        outcomes: Sequence[Outcome],
        rejections: Sequence[Rejection],
        may_have_been_written: bool = True,
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
