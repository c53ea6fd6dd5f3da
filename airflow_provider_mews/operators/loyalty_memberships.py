"""LoyaltyMembershipAddOperator: rows from XCom or SQL into Mews, in batches, exactly once.

The operator owns the run: it reads the source in chunks, turns rows into memberships
(:mod:`~airflow_provider_mews.memberships`), keeps several batches in flight under the
hook's rate limiter, writes every row's outcome, checkpoints progress for Airflow retries
and reconciles any batch whose fate is unknown before it would be sent again. The hook
(:class:`~airflow_provider_mews.hooks.mews.MewsConnectorHook`) does all HTTP.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow_provider_mews.batches import BatchResult, BatchSender, RejectionBudget, build_batch
from airflow_provider_mews.checkpoint import Checkpoint, StateStore
from airflow_provider_mews.exceptions import MewsConfigurationError, MewsError
from airflow_provider_mews.hooks.mews import MewsConnectorHook, validate_uuid
from airflow_provider_mews.lineage import loyalty_memberships_asset, openlineage_facets
from airflow_provider_mews.memberships import ColumnPlan, plan_columns
from airflow_provider_mews.outputs import FileOutput, RunKey, TableOutput
from airflow_provider_mews.progress import RunTally, summary_table
from airflow_provider_mews.sources import ListSource, SourceError, SqlSource, rows_from_value
from airflow_provider_mews.version_compat import AirflowException, AirflowFailException, BaseOperator

IF_EXISTS = ("skip", "add")
#: Mews errors that another Airflow try cannot fix: fail at once instead of retrying.
NOT_RETRYABLE = (400, 401, 403, 404)


class LoyaltyMembershipAddOperator(BaseOperator):
    """
    Add loyalty memberships to Mews from an upstream task's rows or a SQL table/query.

    Every source row ends added (its Mews Id written to ``results_table``/``results_file``),
    skipped because Mews already has it (``if_exists="skip"``), or rejected with a reason
    (``rejections_table``/``rejections_file``). Airflow retries resume the work without
    adding anything twice.

    :param mews_conn_id: Mews connection (type ``mews``).
    :param memberships: rows as a list of dicts, an XComArg, or a template rendering to a list.
    :param sql_conn_id: a common-sql connection (sqlite, postgres, ...) to read rows from.
    :param table: with ``sql_conn_id``, the table to read.
    :param sql: with ``sql_conn_id``, the query to read (templated). Give it an ORDER BY so a
        retry meets the rows in the same order and can skip finished batches without a request.
    :param field_map: ``{source column: Mews field}`` for names that do not match.
    :param chain_id: ChainId for Portfolio Access Tokens; overrides the connection's.
    :param batch_size: memberships per request, 1..1000.
    :param max_rejected_rows: rejections tolerated before the task stops and fails.
    :param if_exists: ``"skip"``: never add a membership (account + program) Mews already
        has, at one getAll per batch; ``"add"``: add without checking.
    :param max_active_requests: batches in flight at once (all under the rate limiter).
    :param results_table: table (on ``output_conn_id``) receiving each row's Mews Id.
    :param rejections_table: table (on ``output_conn_id``) receiving each rejected row and why.
    :param output_conn_id: connection of the two tables; defaults to ``sql_conn_id``.
    :param results_file: JSON-lines file receiving each row's Mews Id.
    :param rejections_file: JSON-lines file receiving each rejected row and why.
    :param progress_interval_s: seconds between progress lines in the log.
    :param rejected_sample_size: rejections quoted in the returned summary.
    """

    template_fields: Sequence[str] = (
        "memberships",
        "sql",
        "table",
        "chain_id",
        "results_table",
        "rejections_table",
        "results_file",
        "rejections_file",
    )
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers = {"sql": "sql", "memberships": "json"}
    ui_color = "#f4d6c1"

    def __init__(
        self,
        *,
        mews_conn_id: str = MewsConnectorHook.default_conn_name,
        memberships: Any = None,
        sql_conn_id: str | None = None,
        table: str | None = None,
        sql: str | None = None,
        field_map: Mapping[str, str] | None = None,
        chain_id: str | None = None,
        batch_size: int = 1000,
        max_rejected_rows: int = 0,
        if_exists: str = "skip",
        max_active_requests: int = 8,
        results_table: str | None = None,
        rejections_table: str | None = None,
        output_conn_id: str | None = None,
        results_file: str | None = None,
        rejections_file: str | None = None,
        progress_interval_s: float = 30.0,
        rejected_sample_size: int = 20,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("retries", 3)
        kwargs.setdefault("retry_delay", timedelta(seconds=30))
        kwargs.setdefault("retry_exponential_backoff", True)
        kwargs.setdefault("outlets", [loyalty_memberships_asset(mews_conn_id)])
        super().__init__(**kwargs)
        self.mews_conn_id = mews_conn_id
        self.memberships = memberships
        self.sql_conn_id = sql_conn_id
        self.table = table
        self.sql = sql
        self.field_map = dict(field_map or {})
        self.chain_id = chain_id
        self.batch_size = batch_size
        self.max_rejected_rows = max_rejected_rows
        self.if_exists = if_exists
        self.max_active_requests = max_active_requests
        self.results_table = results_table
        self.rejections_table = rejections_table
        self.output_conn_id = output_conn_id or sql_conn_id
        self.results_file = results_file
        self.rejections_file = rejections_file
        self.progress_interval_s = progress_interval_s
        self.rejected_sample_size = rejected_sample_size
        self._check_arguments()

    def _check_arguments(self) -> None:
        """Everything that can be checked when the DAG is parsed, with one clear message each."""
        where = f"LoyaltyMembershipAddOperator(task_id={self.task_id!r})"
        if (self.memberships is None) == (self.sql_conn_id is None):
            raise ValueError(
                f"{where}: give exactly one source: memberships=... or sql_conn_id=... with table/sql"
            )
        if self.sql_conn_id is not None and (self.table is None) == (self.sql is None):
            raise ValueError(f"{where}: with sql_conn_id give exactly one of table=... or sql=...")
        if self.memberships is not None and (self.table is not None or self.sql is not None):
            raise ValueError(f"{where}: table/sql need sql_conn_id; they cannot be combined with memberships")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 1000:
            raise ValueError(
                f"{where}: batch_size must be 1..1000 (Mews's limit per request), got {self.batch_size!r}"
            )
        if self.if_exists not in IF_EXISTS:
            raise ValueError(f"{where}: if_exists must be 'skip' or 'add', got {self.if_exists!r}")
        if not isinstance(self.max_rejected_rows, int) or self.max_rejected_rows < 0:
            raise ValueError(
                f"{where}: max_rejected_rows must be an integer >= 0, got {self.max_rejected_rows!r}"
            )
        if not isinstance(self.max_active_requests, int) or not 1 <= self.max_active_requests <= 64:
            raise ValueError(f"{where}: max_active_requests must be 1..64, got {self.max_active_requests!r}")
        if (self.results_table or self.rejections_table) and not self.output_conn_id:
            raise ValueError(
                f"{where}: results_table/rejections_table need a SQL connection: set output_conn_id (or sql_conn_id)"
            )

    # -- execution --

    def execute(self, context: Any) -> dict[str, Any]:
        # The collector would re-walk the ~165k objects Airflow leaves from start-up on every
        # full collection of a long run (1-2 us per row): park them for the run.
        gc.freeze()
        try:
            return self._execute(context)
        finally:
            gc.unfreeze()

    def _execute(self, context: Any) -> dict[str, Any]:
        hook = MewsConnectorHook(self.mews_conn_id, pool_size=self.max_active_requests + 2)
        chain_id = self._chain_id()
        try:
            hook.settings  # noqa: B018 - validate the connection before reading anything
        except MewsConfigurationError as exc:
            raise AirflowFailException(str(exc)) from None
        # Outputs first: on SQLite they switch the database to WAL so the source can stay open.
        outputs = self._open_outputs(context)
        try:
            source = self._open_source()
            try:
                summary = self._run(context, hook, source, self._plan(source.columns), outputs, chain_id)
            finally:
                source.close()
        finally:
            for out in outputs:
                out.close()
            hook.close()
        return summary

    def _chain_id(self) -> str | None:
        if not self.chain_id:
            return None
        try:
            return validate_uuid(self.chain_id, "chain_id")
        except ValueError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None

    def _open_source(self) -> ListSource | SqlSource:
        try:
            if self.sql_conn_id is None:
                return ListSource(rows_from_value(self.memberships), self.batch_size)
            from airflow_provider_mews.version_compat import BaseHook

            db_hook = BaseHook.get_connection(self.sql_conn_id).get_hook()
            source = SqlSource(db_hook, table=self.table, sql=self.sql, chunk_size=self.batch_size)
            source.open()
            return source
        except SourceError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None

    def _plan(self, columns: Sequence[str]) -> ColumnPlan:
        if not columns:
            return ColumnPlan((), (), ())
        try:
            plan = plan_columns(columns, self.field_map)
        except ValueError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        if plan.ignored:
            self.log.warning(
                "Columns %s match no Mews field and are not sent (map them with field_map if they should be).",
                ", ".join(plan.ignored),
            )
        return plan

    def _open_outputs(self, context: Any) -> list[TableOutput | FileOutput]:
        ti = context["ti"]
        map_index = getattr(ti, "map_index", None)
        key = RunKey(ti.dag_id, ti.run_id, ti.task_id, -1 if map_index is None else int(map_index))
        outputs: list[TableOutput | FileOutput] = []
        if self.results_table or self.rejections_table:
            from airflow_provider_mews.version_compat import BaseHook

            db_hook = BaseHook.get_connection(self.output_conn_id or "").get_hook()
            try:
                table_out = TableOutput(db_hook, key, self.results_table, self.rejections_table)
            except SourceError as exc:
                raise AirflowFailException(f"{self.task_id}: {exc}") from None
            table_out.open()
            outputs.append(table_out)
        if self.results_file or self.rejections_file:
            file_out = FileOutput(key, self.results_file, self.rejections_file)
            file_out.open()
            outputs.append(file_out)
        return outputs

    def _checkpoint(self, context: Any) -> Checkpoint:
        store = StateStore(context.get("task_state_store"))
        now = datetime.now(timezone.utc)
        checkpoint = Checkpoint.start(store, now.isoformat(), self.batch_size)
        ti = context["ti"]
        if not store.available and getattr(ti, "try_number", 1) > 1:
            # No checkpoint on this Airflow: any batch may have been sent by an earlier try
            # of this run, so reconcile them all against what Mews stored since the run began.
            run_start = getattr(context.get("dag_run"), "start_date", None) or now
            checkpoint.since = run_start.isoformat()
            checkpoint.resumed = True
            checkpoint.dispatched = 2**62
        if checkpoint.resumed:
            self.log.info(
                "Resuming: %d batches finished by an earlier try; batches that may have been sent "
                "will be reconciled with Mews (created since %s).",
                len(checkpoint.done),
                checkpoint.since,
            )
        return checkpoint

    def _run(
        self,
        context: Any,
        hook: MewsConnectorHook,
        source: ListSource | SqlSource,
        plan: ColumnPlan,
        outputs: list[TableOutput | FileOutput],
        chain_id: str | None,
    ) -> dict[str, Any]:
        tally = RunTally(sample_size=self.rejected_sample_size)
        checkpoint = self._checkpoint(context)
        since = datetime.fromisoformat(checkpoint.since)
        budget = RejectionBudget(self.max_rejected_rows)
        stop = threading.Event()
        sender = BatchSender(hook, if_exists=self.if_exists, chain_id=chain_id, budget=budget, stop=stop)
        keep_rows = bool(self.rejections_table or self.rejections_file)
        errors: list[MewsError] = []
        inflight: set[Future[BatchResult]] = set()

        def settle(result: BatchResult) -> None:
            batch = result.batch
            for out in outputs:
                out.write(batch.first_row, batch.last_row, result.outcomes, result.rejected)
            added, skipped = result.added, result.skipped
            tally.added += added
            tally.skipped_existing += skipped
            tally.reject(result.rejected)
            tally.not_reached += result.unfinished
            tally.reconciled += result.reconciled
            if result.complete:
                checkpoint.mark_done(batch.index, batch.fingerprint, added, skipped, len(result.rejected))
            if result.error is not None:
                errors.append(result.error)
                stop.set()

        def settle_finished(block: bool) -> None:
            if not inflight:
                return
            finished, _ = wait(inflight, timeout=None if block else 0, return_when=FIRST_COMPLETED)
            for future in finished:
                inflight.discard(future)
                settle(future.result())

        self.log.info(
            "Adding loyalty memberships from %s to Mews (%s), batches of %d, if_exists=%s, %d in flight.",
            source.description,
            hook.settings.base_url,
            self.batch_size,
            self.if_exists,
            self.max_active_requests,
        )
        chunks = source.chunks()
        with ThreadPoolExecutor(self.max_active_requests, thread_name_prefix="mews-batch") as pool:
            try:
                for index, rows in enumerate(chunks):
                    first_row = tally.rows_read + 1
                    tally.rows_read += len(rows)
                    if stop.is_set():
                        tally.not_reached += len(rows)
                        break
                    batch = build_batch(index, first_row, plan, rows, keep_rows)
                    earlier = checkpoint.done_counts(index, batch.fingerprint)
                    if earlier is not None:
                        tally.added += earlier[0]
                        tally.skipped_existing += earlier[1]
                        tally.rejected += earlier[2]
                        tally.resumed_batches += 1
                        budget.spend(earlier[2])
                        continue
                    budget.spend(len(batch.rejected))
                    if budget.exceeded:
                        stop.set()
                        settle(BatchResult(batch, rejected=list(batch.rejected)))
                        break
                    stored_since = since if checkpoint.maybe_sent(index) else None
                    checkpoint.reserve(index)
                    inflight.add(pool.submit(sender.run, batch, stored_since))
                    while len(inflight) >= self.max_active_requests:
                        settle_finished(block=True)
                    settle_finished(block=False)
                    if tally.due(self.progress_interval_s):
                        self.log.info(
                            tally.progress_line(
                                source.total, hook.stats.rate_limited, hook.stats.rate_limit_wait_s
                            )
                        )
                while inflight:
                    settle_finished(block=True)
            finally:
                stop.set()
                for future in inflight:
                    future.cancel()
                checkpoint.flush(force=True)
        for rows in chunks:  # the rest of the source, never reached because the run stopped
            tally.rows_read += len(rows)
            tally.not_reached += len(rows)

        summary = tally.summary(
            requests=hook.stats.requests,
            rate_limited=hook.stats.rate_limited,
            rate_limit_wait_s=round(hook.stats.rate_limit_wait_s, 1),
            if_exists=self.if_exists,
            results=self.results_table or self.results_file,
            rejections=self.rejections_table or self.rejections_file,
        )
        self.log.info("%s", summary_table(summary))
        self._push_summary(context, summary)
        if not errors and not budget.exceeded:
            checkpoint.clear()
        if errors:
            raise self._failure(errors[0], summary)
        if budget.exceeded:
            raise AirflowFailException(
                f"{tally.rejected} rows rejected, more than max_rejected_rows={self.max_rejected_rows}: "
                f"{_top_reasons(summary)}. Added {tally.added}, skipped {tally.skipped_existing}, "
                f"not reached {tally.not_reached} of {tally.rows_read} rows read. "
                f"Rejected rows: {summary['rejections'] or 'see rejected_sample in the mews_summary XCom'}."
            )
        return summary

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Inputs (the source's tables), output (Mews loyalty memberships, with the rows added)."""
        from airflow_provider_mews.version_compat import BaseHook

        sql_conn = BaseHook.get_connection(self.sql_conn_id) if self.sql_conn_id else None
        base_url = MewsConnectorHook(self.mews_conn_id).settings.base_url
        return openlineage_facets(
            mews_base_url=base_url,
            sql_conn=sql_conn,
            table=self.table,
            sql=self.sql,
            summary=getattr(self, "_lineage_summary", None),
        )

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        """As on completion: what was added before the failure (the listener adds the error)."""
        return self.get_openlineage_facets_on_complete(task_instance)

    def _push_summary(self, context: Any, summary: dict[str, Any]) -> None:
        """The summary is an XCom even when the task fails, so nothing needs the logs."""
        self._lineage_summary = summary  # for OpenLineage, which may ask from a forked process
        try:
            context["ti"].xcom_push(key="mews_summary", value=summary)
        except Exception as exc:  # the summary is also in the log
            self.log.warning("Could not push the summary XCom: %s", exc)

    @staticmethod
    def _failure(error: MewsError, summary: dict[str, Any]) -> AirflowException:
        counts = (
            f"Added {summary['added']}, skipped {summary['skipped_existing']}, rejected {summary['rejected']}, "
            f"not reached {summary['not_reached']} of {summary['rows_read']} rows read."
        )
        if isinstance(error, MewsConfigurationError) or error.status in NOT_RETRYABLE:
            return AirflowFailException(f"{error} {counts}")
        return AirflowException(f"{error} {counts} An Airflow retry resumes without adding anything twice.")


def _top_reasons(summary: dict[str, Any]) -> str:
    reasons = summary.get("rejection_reasons") or {}
    return (
        "; ".join(f"{count} x {reason}" for count, reason in ((c, r) for r, c in reasons.items()))
        or "see log"
    )
