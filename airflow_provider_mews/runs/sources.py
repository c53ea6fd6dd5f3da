"""Where membership rows come from: a list (XCom, template) or a SQL table/query, streamed.

A source yields chunks of rows as value tuples in the order of ``columns``. SQL sources
read with ``fetchmany`` on a cursor (a server-side cursor on PostgreSQL), so memory does
not grow with the table. A run that stops early stops reading; :meth:`count` then tells how
many rows the source holds, counted by the database, without reading them.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*){0,2}$")


def column_names(rows: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """Every key of the rows, in first-seen order: rows of an XCom list may differ in keys."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return tuple(names)


class SourceError(ValueError):
    """The source cannot be read as configured; raised before anything is sent."""


class SourceUnavailable(Exception):
    """The source database failed in a way that passes (the connection lost, the server
    restarting or shutting down, a deadlock): not the configuration's fault, so the task fails
    as any error does and Airflow's retry runs the query again."""


#: SQLSTATE classes of faults that pass: connection exception (08), transaction rollback
#: (40: serialization failure, deadlock), insufficient resources (53), operator intervention
#: (57: admin/crash shutdown, cannot connect now, query canceled), system error (58).
TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57", "58")
#: sqlite3 raises OperationalError for a missing table as for a locked file: only these pass.
_SQLITE_TRANSIENT = ("locked", "busy", "disk i/o", "unable to open")


def is_transient(exc: BaseException) -> bool:
    """Whether a database error passes (retry) rather than names a mistake (fail once).

    The SQLSTATE decides when the driver gives one (psycopg2 ``pgcode``, psycopg ``sqlstate``,
    any driver exposing either): classes 08, 40, 53, 57 and 58 pass; syntax errors, missing
    tables or columns, permissions (42) and bad data (22) do not. Without one, a DB-API
    ``OperationalError`` or ``InterfaceError`` (the connection closed under the cursor, the
    server gone away) passes, except sqlite3's, which passes only for a locked or unreadable
    file; a socket error or timeout passes; anything else does not.
    """
    code = getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)
    if isinstance(code, str) and len(code) == 5:
        return code[:2] in TRANSIENT_SQLSTATE_CLASSES
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"OperationalError", "InterfaceError"}:
        if type(exc).__module__ == "sqlite3":
            return any(word in str(exc).lower() for word in _SQLITE_TRANSIENT)
        return True
    return isinstance(exc, (ConnectionError, TimeoutError))


def rows_from_value(value: Any) -> list[Mapping[str, Any]]:
    """Accept what ``memberships=`` may hold after templating: a list of mappings (or its text)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise SourceError(
                    "memberships rendered to text that is neither JSON nor a Python literal list of dicts; "
                    "return a list from the upstream task or set render_template_as_native_obj=True"
                ) from None
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise SourceError(
            f"memberships must be a list of dicts (one per membership), got {type(value).__name__}"
        )
    for i, row in enumerate(value):
        if not isinstance(row, Mapping):
            raise SourceError(
                f"memberships[{i}] is a {type(row).__name__}, not a dict of column -> value; "
                "each membership must be a dict such as {'AccountId': ..., 'LoyaltyProgramId': ..., 'IsPrimary': True}"
            )
    return list(value)


class ListSource:
    """Rows already in memory (an upstream task's XCom)."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], chunk_size: int) -> None:
        self.rows = rows
        self.chunk_size = chunk_size
        self.columns = column_names(rows)
        self.total: int | None = len(rows)
        self.description = f"{len(rows)} rows from memberships="

    def chunks(self) -> Iterator[list[tuple[Any, ...]]]:
        """The rows from the first, each call."""
        cols = self.columns
        for start in range(0, len(self.rows), self.chunk_size):
            yield [tuple(row.get(c) for c in cols) for row in self.rows[start : start + self.chunk_size]]

    def count(self) -> int | None:
        return len(self.rows)

    def close(self) -> None:
        pass


def quote_table(table: str, setting: str = "table") -> str:
    """``table`` when it is a plain (optionally schema-qualified) name; SourceError naming ``setting`` otherwise."""
    if not _IDENTIFIER.match(table):
        hint = "; use sql= for anything else" if setting == "table" else ""
        raise SourceError(
            f"{setting} {table!r} is not a plain table name (letters, digits, _ and up to two dots){hint}"
        )
    return table


class SqlSource:
    """Rows of a table or query on any common-sql connection, read with a streaming cursor."""

    def __init__(self, hook: Any, *, table: str | None, sql: str | None, chunk_size: int) -> None:
        if (table is None) == (sql is None):
            raise SourceError("give exactly one of table= or sql= with sql_conn_id")
        self.hook = hook
        self.sql = sql if sql is not None else f"SELECT * FROM {quote_table(table or '')}"
        self.table = table
        self.chunk_size = chunk_size
        self.total: int | None = None
        self.description = f"table {table}" if table else "sql query"
        self._conn: Any = None
        self._cursor: Any = None
        self._server_side = False
        self._first: list[Any] | None = None
        self._started = False
        self.columns: tuple[str, ...] = ()

    def open(self) -> None:
        self._conn = self.hook.get_conn()
        server_cursor = self._server_side_cursor()
        self._server_side = server_cursor is not None
        self._cursor = server_cursor or self._conn.cursor()
        self._first = None
        self._started = False
        try:
            self._cursor.execute(self.sql)
            if self._cursor.description is None and self._server_side:
                # A psycopg2 named cursor describes its columns only after the first fetch.
                self._first = self._cursor.fetchmany(self.chunk_size)
        except Exception as exc:
            self.close()
            what = (
                f"the source query failed on connection {self.hook.get_conn_id()!r}: "
                f"{type(exc).__name__}: {str(exc).strip()[:500]}"
            )
            if is_transient(exc):
                raise SourceUnavailable(
                    f"{what}. The database failed, not the query: Airflow's retry runs it again."
                ) from exc
            setting = "table" if self.table is not None else "sql"
            raise SourceError(f"{what}. Check {setting}= and sql_conn_id (this does not retry).") from exc
        if self._cursor.description is None:
            self.close()
            raise SourceError("the source query returned no result set; it must be a SELECT")
        self.columns = tuple(str(d[0]) for d in self._cursor.description)

    def _server_side_cursor(self) -> Any:
        """A named (server-side) cursor on PostgreSQL, so the server streams the rows.

        Rows are plain tuples even when the connection's ``cursor`` extra asks for dict rows.
        """
        module = type(self._conn).__module__
        if module.startswith("psycopg2"):
            from psycopg2.extensions import cursor as tuple_cursor

            cursor = self._conn.cursor(name="mews_membership_source", cursor_factory=tuple_cursor)
            cursor.itersize = self.chunk_size
            return cursor
        if module.startswith("psycopg"):
            from psycopg.rows import tuple_row

            return self._conn.cursor(name="mews_membership_source", row_factory=tuple_row)
        return None

    def chunks(self) -> Iterator[list[tuple[Any, ...]]]:
        """The rows from the first, each call (a second call runs the query again)."""
        if self._cursor is None or self._started:
            self.close()
            self.open()
        self._started = True
        if self._first:
            yield self._first
        self._first = None
        while True:
            rows = self._cursor.fetchmany(self.chunk_size)
            if not rows:
                return
            yield rows

    def count(self) -> int | None:
        """``SELECT COUNT(*)`` over the table or the query, made by the database; None if it fails.

        Called when a run stopped early: the streaming cursor is closed first (reading stops),
        and the count runs on the same connection. A query the database cannot wrap in a
        subquery, or a broken connection, gives None (unknown) rather than an error.
        """
        if self.table is not None:
            query = f"SELECT COUNT(*) FROM {quote_table(self.table)}"
        else:
            body = (self.sql or "").strip().rstrip(";").rstrip()
            query = f"SELECT COUNT(*) FROM (\n{body}\n) mews_source"  # newlines: a trailing -- comment
        self._close_cursor()
        cursor = None
        try:
            if self._conn is None:
                self._conn = self.hook.get_conn()
            cursor = self._conn.cursor()
            cursor.execute(query)
            row = cursor.fetchone()
            value = next(iter(row.values())) if isinstance(row, Mapping) else row[0]
            return int(value)
        except Exception:
            return None
        finally:
            if cursor is not None:
                try:
                    cursor.close()
                except Exception:
                    pass

    def _close_cursor(self) -> None:
        if self._cursor is not None:
            try:
                self._cursor.close()
            except Exception:
                pass
        self._cursor = None

    def close(self) -> None:
        for obj in (self._cursor, self._conn):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
        self._cursor = self._conn = None
