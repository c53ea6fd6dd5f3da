"""Mews into the warehouse: any Connector API getAll into a SQL table (or JSON-lines files).

:class:`MewsToSqlOperator` reads the records of one getAll (``loyaltyMemberships/getAll``,
``customers/getAll``, ...) changed in a time range, however long (the hook splits it into the
3-month slices Mews allows, :meth:`~airflow_provider_mews.hooks.mews.MewsConnectorHook.paginate_range`),
and upserts them by ``Id`` into a table on any common-sql connection, in chunks, so memory
stays flat however many records there are. :class:`MewsToFileOperator` writes the same records
as JSON lines to a local path or an Airflow ``ObjectStoragePath`` (``s3://``, ``gs://``, ``file://``).

The table (docs/howto/export.md, "Reading from Mews"):

- one column per top-level field, named exactly as Mews writes it (``Id``, ``AccountId``,
  ``LoyaltyProgramId``...) and quoted, so PostgreSQL keeps the capitals (``SELECT "AccountId"``);
- every column is text: strings as Mews sends them (times in ISO 8601 UTC), numbers and
  booleans as their JSON text (``42``, ``true``), nested objects and arrays as JSON text,
  null as NULL. Lossless whatever type Mews sends, on every database; cast in SQL;
- ``Id`` is the primary key; rows are upserted by it (ON CONFLICT on PostgreSQL, INSERT OR
  REPLACE on SQLite, REPLACE/MERGE where the common-sql dialect has them, else DELETE + INSERT
  in one transaction), so a rerun or a retry never duplicates and a later run updates rows;
- a field Mews adds later: ``new_fields="add_column"`` (default) adds the column
  (``ALTER TABLE ... ADD COLUMN``, NULL in older rows); ``"ignore"`` leaves it out; ``"fail"`` stops.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from airflow_provider_mews.exceptions import MewsConfigurationError
from airflow_provider_mews.hooks.mews import (
    MAX_INTERVAL_MONTHS,
    MewsConnectorHook,
    _utc_datetime,
    validate_uuid,
)
from airflow_provider_mews.runs.sources import quote_table
from airflow_provider_mews.version_compat import AirflowFailException, AirflowNotFoundException, BaseOperator

__all__ = ["NEW_FIELDS", "OPERATIONS", "MewsExportBaseOperator", "MewsToFileOperator", "MewsToSqlOperator"]

NEW_FIELDS = ("add_column", "ignore", "fail")
#: Dialects whose common-sql ``insert_rows(replace=True)`` is an upsert by key.
UPSERT_DIALECTS = ("postgresql", "sqlite", "mysql", "mssql")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Operation:
    """What the provider knows of a getAll: its answer's list and the filters it takes."""

    result_key: str
    time_filters: tuple[str, ...]
    activity_states: bool = True
    defaults: Mapping[str, Any] = field(default_factory=dict)


OPERATIONS: dict[str, Operation] = {
    "loyaltyMemberships/getAll": Operation("LoyaltyMemberships", ("CreatedUtc", "UpdatedUtc")),
    "customers/getAll": Operation(
        "Customers",
        ("CreatedUtc", "UpdatedUtc", "DeletedUtc"),
        defaults={"Extent": {"Customers": True, "Documents": False, "Addresses": False}},
    ),
    "loyaltyPrograms/getAll": Operation("LoyaltyPrograms", ("CreatedUtc", "UpdatedUtc")),
    "loyaltyTiers/getAll": Operation("LoyaltyTiers", ("UpdatedUtc",)),
}


#: ``json.dumps(value, ensure_ascii=False, separators=(",", ":"))`` without building an encoder per
#: call (a million records carry a few million nested values).
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def cell(value: Any) -> str | None:
    """A Mews value as the table stores it: text, JSON text for anything not a string, NULL for null."""
    if value is None or isinstance(value, str):
        return value
    return _ENCODE(value)


class MewsExportBaseOperator(BaseOperator):
    """What both exports share: the request, the time range, reading and chunking."""

    template_fields: Sequence[str] = ("operation", "filters", "updated_utc", "created_utc", "chain_id")
    template_fields_renderers = {"filters": "json"}
    ui_color = "#c1e0f4"

    def __init__(
        self,
        *,
        operation: str,
        mews_conn_id: str = MewsConnectorHook.default_conn_name,
        filters: Mapping[str, Any] | None = None,
        updated_utc: Sequence[Any] | None = None,
        created_utc: Sequence[Any] | None = None,
        result_key: str | None = None,
        chain_id: str | None = None,
        include_deleted: bool = True,
        chunk_size: int = 5000,
        page_size: int = 1000,
        max_workers: int = 8,
        max_interval_months: int = MAX_INTERVAL_MONTHS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.operation = operation
        self.mews_conn_id = mews_conn_id
        self.filters = filters
        self.updated_utc = updated_utc
        self.created_utc = created_utc
        self.result_key = result_key
        self.chain_id = chain_id
        self.include_deleted = include_deleted
        self.chunk_size = chunk_size
        self.page_size = page_size
        self.max_workers = max_workers
        self.max_interval_months = max_interval_months
        where = f"{type(self).__name__}(task_id={self.task_id!r})"
        if updated_utc is not None and created_utc is not None:
            raise ValueError(f"{where}: give updated_utc or created_utc, not both")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{where}: chunk_size must be a positive integer, got {chunk_size!r}")
        if not isinstance(page_size, int) or not 1 <= page_size <= 1000:
            raise ValueError(
                f"{where}: page_size must be 1..1000 (Mews's Limitation.Count), got {page_size!r}"
            )
        if not isinstance(max_workers, int) or not 1 <= max_workers <= 16:
            raise ValueError(f"{where}: max_workers must be 1..16, got {max_workers!r}")

    # -- the request --

    def _body(self) -> dict[str, Any]:
        known = OPERATIONS.get(self.operation)
        filters = dict(self.filters or {})
        if "Limitation" in filters:
            raise AirflowFailException(f"{self.task_id}: filters must not set Limitation (the hook pages)")
        body: dict[str, Any] = dict(known.defaults) if known else {}
        if known and known.activity_states and self.include_deleted:
            body["ActivityStates"] = ["Active", "Deleted"]
        chain = self._chain_id()
        if chain:
            body["ChainIds"] = [chain]
        body.update(filters)
        return body

    def _chain_id(self) -> str | None:
        if not self.chain_id:
            return None
        try:
            return validate_uuid(self.chain_id, "chain_id")
        except ValueError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None

    def _time_range(self) -> tuple[str, datetime, datetime] | None:
        for name, value in (("UpdatedUtc", self.updated_utc), ("CreatedUtc", self.created_utc)):
            if value is None:
                continue
            if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
                raise AirflowFailException(
                    f"{self.task_id}: {name.lower()} must be a (start, end) pair, got {value!r}"
                )
            start, end = value
            try:
                low = _utc_datetime(start, f"{name} start")
                high = _utc_datetime(end, f"{name} end") if end not in (None, "", "None") else None
            except MewsConfigurationError as exc:
                raise AirflowFailException(f"{self.task_id}: {exc}") from None
            return name, low, high or datetime.now(timezone.utc)
        return None

    _hook: MewsConnectorHook | None = None

    def on_kill(self) -> None:
        """Airflow's task runner calls this on SIGTERM ("mark failed", a cleared task, a worker
        shutdown; SIGKILL follows 5 s later) and after ``execution_timeout``. It runs in a signal
        handler, so it only sets the hook's ``abort``: no further page is asked for, waits for the
        limiter end, and the readers' error ends ``execute`` once the pages on the wire answer.
        What was written stays (rows are upserted by ``Id``); the next try reads the range again."""
        hook = self._hook
        if hook is not None:
            hook.abort.set()

    def _connect(self) -> MewsConnectorHook:
        hook = MewsConnectorHook(self.mews_conn_id, pool_size=max(16, self.max_workers + 2))
        self._hook = hook
        try:
            hook.settings  # noqa: B018 - validate the connection before reading anything
        except MewsConfigurationError as exc:
            raise AirflowFailException(str(exc)) from None
        except AirflowNotFoundException:
            raise AirflowFailException(
                f"{self.task_id}: mews_conn_id={self.mews_conn_id!r} names no Airflow connection"
            ) from None
        return hook

    def _pages(self, hook: MewsConnectorHook) -> Iterator[list[dict[str, Any]]]:
        known = OPERATIONS.get(self.operation)
        result_key = self.result_key or (known.result_key if known else None)
        body = self._body()
        span = self._time_range()
        if span is None:
            return hook.paginate(self.operation, body, result_key=result_key, page_size=self.page_size)
        name, start, end = span
        if known and name not in known.time_filters:
            raise AirflowFailException(f"{self.task_id}: {self.operation} has no {name} filter")
        self.log.info(
            "Reading %s with %s from %s to %s", self.operation, name, start.isoformat(), end.isoformat()
        )
        return hook.paginate_range(
            self.operation,
            body,
            time_filter=name,
            start=start,
            end=end,
            result_key=result_key,
            page_size=self.page_size,
            max_interval_months=self.max_interval_months,
            max_workers=self.max_workers,
        )

    def _chunks(self, pages: Iterable[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
        """Pages regrouped in lists of at most ``chunk_size`` records."""
        chunk: list[dict[str, Any]] = []
        for page in pages:
            chunk.extend(page)
            while len(chunk) >= self.chunk_size:
                yield chunk[: self.chunk_size]
                chunk = chunk[self.chunk_size :]
        if chunk:
            yield chunk

    def _mews_dataset(self, hook: MewsConnectorHook | None = None) -> Any:
        from openlineage.client.event_v2 import InputDataset

        hook = hook or MewsConnectorHook(self.mews_conn_id)
        return InputDataset(namespace=hook.settings.base_url, name=self.operation)


class MewsToSqlOperator(MewsExportBaseOperator):
    """
    Export the records of a Mews getAll into a table, upserted by ``Id``.

    .. seealso:: docs/howto/export.md ("Reading from Mews"): the column policy, incremental
        and backfill DAGs, deleted records, lineage, and the benchmark.

    :param operation: the getAll, e.g. ``"loyaltyMemberships/getAll"``, ``"customers/getAll"``,
        ``"loyaltyPrograms/getAll"``, ``"loyaltyTiers/getAll"`` (known ones need no
        ``result_key``), or any other Connector API getAll.
    :param sql_conn_id: a common-sql connection (sqlite, postgres, mysql, ...).
    :param table: the table (``name`` or ``schema.name``), created if missing with ``create_table``.
    :param mews_conn_id: Mews connection (type ``mews``).
    :param filters: the operation's filters, merged into the request body (templated), e.g.
        ``{"LoyaltyProgramIds": ["..."]}``. Overrides the defaults below.
    :param updated_utc: ``(start, end)`` of ``UpdatedUtc`` (templated), e.g.
        ``("{{ data_interval_start }}", "{{ data_interval_end }}")``: any length, read in
        3-month slices; an empty ``end`` means now. None: no time filter.
    :param created_utc: the same for ``CreatedUtc`` (one of the two at most).
    :param result_key: the answer's list (``"Customers"``); None: known per operation, else the
        one list in the answer.
    :param chain_id: for a Portfolio Access Token: sent as ``ChainIds: [chain_id]``.
    :param include_deleted: ask for ``ActivityStates: ["Active", "Deleted"]`` (known operations),
        so a deleted record keeps its row with ``ActivityState`` ``Deleted``.
    :param create_table: create the table when missing.
    :param new_fields: a top-level field the table has no column for: ``"add_column"``,
        ``"ignore"`` or ``"fail"``.
    :param chunk_size: records per upsert transaction.
    :param page_size: records per request (Mews's maximum is 1000).
    :param max_workers: slices read at once (all under the token's rate limiter); a range of two
        days or more is cut into at least this many slices, so enough cursor chains run at once.
    :param max_interval_months: the longest slice, in calendar months (Mews: 3).
    """

    template_fields: Sequence[str] = (*MewsExportBaseOperator.template_fields, "table")

    def __init__(
        self,
        *,
        sql_conn_id: str,
        table: str,
        create_table: bool = True,
        new_fields: str = "add_column",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sql_conn_id = sql_conn_id
        self.table = table
        self.create_table = create_table
        self.new_fields = new_fields
        if new_fields not in NEW_FIELDS:
            raise ValueError(
                f"MewsToSqlOperator(task_id={self.task_id!r}): new_fields must be one of {NEW_FIELDS}, got {new_fields!r}"
            )

    def _db_hook(self) -> Any:
        from airflow.providers.common.sql.hooks.sql import DbApiHook

        from airflow_provider_mews.version_compat import BaseHook

        try:
            conn = BaseHook.get_connection(self.sql_conn_id)
        except AirflowNotFoundException:
            raise AirflowFailException(
                f"{self.task_id}: sql_conn_id={self.sql_conn_id!r} names no Airflow connection"
            ) from None
        hook = conn.get_hook()
        if not isinstance(hook, DbApiHook):
            raise AirflowFailException(
                f"{self.task_id}: sql_conn_id={self.sql_conn_id!r} is of type {conn.conn_type!r}, not a "
                "common-sql database connection"
            )
        return hook

    def execute(self, context: Any) -> dict[str, Any]:
        table = quote_table(self.table, "table")
        writer = TableWriter(self._db_hook(), table, self.create_table, self.new_fields, self.log)
        hook = self._connect()
        records = 0
        try:
            for chunk in self._chunks(self._pages(hook)):
                writer.write(chunk)
                records += len(chunk)
                self.log.info("%d records upserted into %s so far", records, table)
        finally:
            hook.close()
        summary = {
            "records": records,
            "table": table,
            "columns": list(writer.columns),
            "requests": hook.stats.requests,
        }
        self.log.info("Exported %d records of %s into %s", records, self.operation, table)
        return summary

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Input: the Mews dataset of the operation; output: the table, named by the SQL hook."""
        from airflow.providers.openlineage.extractors import OperatorLineage

        from airflow_provider_mews.lineage import _parse_source
        from airflow_provider_mews.version_compat import BaseHook

        outputs: list[Any] = []
        try:
            conn = BaseHook.get_connection(self.sql_conn_id)
            parsed = _parse_source(conn, f"INSERT INTO {quote_table(self.table)} SELECT * FROM mews_export")
            if parsed is not None:
                outputs = list(parsed.outputs)
        except Exception as exc:  # best effort: the input is still reported
            self.log.warning("OpenLineage: could not name the table: %s", exc)
        return OperatorLineage(inputs=[self._mews_dataset()], outputs=outputs)


class TableWriter:
    """Upserts chunks of Mews records into a table by ``Id``, creating and widening it as needed."""

    def __init__(self, hook: Any, table: str, create: bool, new_fields: str, log: Any) -> None:
        self.hook = hook
        self.table = table
        self.create = create
        self.new_fields = new_fields
        self.log = log
        self.quote = getattr(hook, "escape_word_format", '"{}"') or '"{}"'
        self.dialect = self._dialect_name()
        self.columns: list[str] = []
        self._known: set[str] | None = None

    def _dialect_name(self) -> str:
        try:
            return str(self.hook.dialect_name)
        except Exception:
            return "default"

    def q(self, name: str) -> str:
        return str(self.quote.format(name))

    def _existing_columns(self) -> list[str] | None:
        conn = self.hook.get_conn()
        try:
            cur = conn.cursor()
            try:
                cur.execute(f"SELECT * FROM {self.table} WHERE 1 = 0")
                return [d[0] for d in cur.description or ()]
            except Exception:
                conn.rollback()
                return None
            finally:
                cur.close()
        finally:
            conn.close()

    def _prepare(self, chunk: list[dict[str, Any]]) -> None:
        """Create the table (first chunk) or add the columns of new fields, as ``new_fields`` says."""
        fields = list(dict.fromkeys(name for record in chunk for name in record))
        if "Id" not in fields:
            raise AirflowFailException("the records have no Id field: they cannot be upserted")
        bad = [name for name in fields if not _FIELD.match(name)]
        if bad:
            raise AirflowFailException(f"fields {bad} cannot be column names")
        if self._known is None:
            existing = self._existing_columns()
            if existing is None:
                if not self.create:
                    raise AirflowFailException(f"table {self.table} does not exist and create_table is False")
                ordered = ["Id", *(f for f in fields if f != "Id")]
                ddl = ", ".join(f"{self.q(f)} TEXT" for f in ordered[1:])
                self.hook.run(
                    f"CREATE TABLE IF NOT EXISTS {self.table} ({self.q('Id')} VARCHAR(64) PRIMARY KEY"
                    + (f", {ddl}" if ddl else "")
                    + ")"
                )
                self.log.info("Created table %s with %d columns", self.table, len(ordered))
                existing = ordered
            # Every column of the table is written (a field a record lacks: NULL).
            self.columns = list(existing)
            self._known = {c.lower() for c in existing}
        missing = [f for f in fields if f.lower() not in self._known]
        if not missing:
            return
        if self.new_fields == "fail":
            raise AirflowFailException(
                f"Mews sent fields {missing} that table {self.table} has no column for (new_fields='fail')"
            )
        if self.new_fields == "ignore":
            self.log.warning(
                "Fields %s have no column in %s: left out (new_fields='ignore')", missing, self.table
            )
            self._known.update(f.lower() for f in missing)
            return
        for name in missing:
            self.hook.run(f"ALTER TABLE {self.table} ADD COLUMN {self.q(name)} TEXT")
            self.columns.append(name)
            self._known.add(name.lower())
        self.log.warning("Mews sent new fields %s: columns added to %s", missing, self.table)

    def write(self, chunk: list[dict[str, Any]]) -> None:
        self._prepare(chunk)
        by_id: dict[str, dict[str, Any]] = {}
        for record in chunk:  # one row per Id in one statement (the last version wins)
            by_id[str(record["Id"]).lower()] = record
        names = self.columns
        rows = [tuple([cell(record.get(name)) for name in names]) for record in by_id.values()]
        quoted = [self.q(n) for n in names]
        if self.dialect in UPSERT_DIALECTS:
            self.hook.insert_rows(
                self.table,
                rows,
                target_fields=quoted,
                commit_every=len(rows),
                replace=True,
                replace_index=[self.q("Id")],
                executemany=True,
            )
            return
        self._delete_insert(rows, quoted, names.index("Id"))

    def _delete_insert(self, rows: list[tuple[Any, ...]], quoted: list[str], id_at: int) -> None:
        """Where the dialect has no upsert: delete the chunk's Ids, insert the rows, one transaction."""
        ph = getattr(self.hook, "placeholder", "%s")
        conn = self.hook.get_conn()
        try:
            cur = conn.cursor()
            try:
                cur.executemany(
                    f"DELETE FROM {self.table} WHERE {self.q('Id')} = {ph}", [(r[id_at],) for r in rows]
                )
                cur.executemany(
                    f"INSERT INTO {self.table} ({', '.join(quoted)}) VALUES ({', '.join([ph] * len(quoted))})",
                    rows,
                )
                conn.commit()
            except Exception:
                conn.rollback()
                raise
            finally:
                cur.close()
        finally:
            conn.close()


class MewsToFileOperator(MewsExportBaseOperator):
    """
    Export the records of a Mews getAll as JSON lines (one record per line, as Mews sends it).

    Takes every parameter of :class:`MewsToSqlOperator` about the request (``operation``,
    ``filters``, ``updated_utc``, ``created_utc``, ``result_key``, ``chain_id``,
    ``include_deleted``, ``page_size``, ``max_workers``...), plus:

    :param path: a local path or an Airflow ``ObjectStoragePath``/URL (``file://``, ``s3://``,
        ``gs://``...; templated), e.g. ``"s3://lake/mews/memberships/{{ ds }}.jsonl"``. The file
        is written whole by each try (a retry rewrites it, never appends): name one file per
        data interval.
    :param conn_id: the Airflow connection of the object store (e.g. ``aws_default``), if any.
    """

    template_fields: Sequence[str] = (*MewsExportBaseOperator.template_fields, "path")

    def __init__(self, *, path: Any, conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.conn_id = conn_id

    def _target(self) -> Any:
        text = str(self.path)
        if "://" not in text and not hasattr(self.path, "protocol"):
            from pathlib import Path

            return Path(text)
        try:
            from airflow.sdk import ObjectStoragePath
        except ImportError:  # Airflow 2.11
            from airflow.io.path import ObjectStoragePath  # type: ignore[no-redef]
        if isinstance(self.path, ObjectStoragePath):
            return self.path
        return ObjectStoragePath(text, conn_id=self.conn_id) if self.conn_id else ObjectStoragePath(text)

    def execute(self, context: Any) -> dict[str, Any]:
        target = self._target()
        target.parent.mkdir(parents=True, exist_ok=True)
        hook = self._connect()
        records = 0
        try:
            with target.open("w", encoding="utf-8") as fh:
                for chunk in self._chunks(self._pages(hook)):
                    fh.write(
                        "".join(
                            json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in chunk
                        )
                    )
                    records += len(chunk)
        finally:
            hook.close()
        self.log.info("Exported %d records of %s to %s", records, self.operation, target)
        return {"records": records, "path": str(target), "requests": hook.stats.requests}

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Input: the Mews dataset of the operation; output: the file (``file`` or ``scheme://bucket``)."""
        from urllib.parse import urlsplit

        from airflow.providers.openlineage.extractors import OperatorLineage
        from openlineage.client.event_v2 import OutputDataset

        text = str(self.path)
        url = urlsplit(text)
        if url.scheme in ("", "file"):
            import os

            output = OutputDataset(namespace="file", name=os.path.abspath(url.path if url.scheme else text))
        else:
            output = OutputDataset(namespace=f"{url.scheme}://{url.netloc}", name=url.path.lstrip("/"))
        return OperatorLineage(inputs=[self._mews_dataset()], outputs=[output])
