"""LoyaltyMembershipAddOperator: rows from XCom or SQL into Mews, in batches, exactly once.

The operator owns the run: it reads the source in chunks, turns rows into memberships
(:mod:`~airflow_provider_mews.loyalty.normalize`), keeps several batches in flight under the
hook's rate limiter, writes every row's outcome, checkpoints progress for Airflow retries
and reconciles any batch whose fate is unknown before it would be sent again. The hook
(:class:`~airflow_provider_mews.hooks.mews.MewsConnectorHook`) does all HTTP.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, closing
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow_provider_mews.exceptions import MewsConfigurationError
from airflow_provider_mews.hooks.mews import MewsConnectorHook, validate_uuid
from airflow_provider_mews.lineage import loyalty_memberships_asset, openlineage_facets
from airflow_provider_mews.loyalty.add_run import NOT_RETRYABLE, MembershipRun, RunSettings
from airflow_provider_mews.loyalty.names import NamePlan, NameResolver, ResolvedSource, plan_names
from airflow_provider_mews.loyalty.normalize import ColumnPlan, plan_columns
from airflow_provider_mews.loyalty.sync_plan import (
    ON_MISSING,
    SyncPlan,
    parse_max_removals,
    plan_sync_columns,
)
from airflow_provider_mews.loyalty.sync_run import SyncRun, SyncSettings
from airflow_provider_mews.runs.checkpoint import Checkpoint, StateStore
from airflow_provider_mews.runs.outputs import FileOutput, RunKey, TableOutput
from airflow_provider_mews.runs.sources import ListSource, SourceError, SqlSource, rows_from_value
from airflow_provider_mews.version_compat import AirflowFailException, AirflowNotFoundException, BaseOperator

IF_EXISTS = ("skip", "add", "update")
DEFAULT_CONN_ID = MewsConnectorHook.default_conn_name

__all__ = ["IF_EXISTS", "NOT_RETRYABLE", "LoyaltyMembershipAddOperator", "LoyaltyMembershipSyncOperator"]


#: An upsert's batch at the default ``batch_size``: one row fewer, so that its lookup's page of
#: 1000 (Mews's largest) is never full when each row matches at most one membership.
UPSERT_FULL_BATCH = 1000
#: Batches in flight: a whole window of a tenth at Mews's 200 per 30 s (20 requests) leaves at once;
#: with 16 its last 4 left a second later, ~1 s per window at its end (measured: 0.93-0.95 of the
#: ceiling for 400 000 rows against Mews's own 200 per 30 s, simulated 0.965 against 0.973 with 20).
DEFAULT_MAX_ACTIVE_REQUESTS = 20


class _AutoOutlets(list):  # type: ignore[type-arg]
    """The outlet :meth:`LoyaltyMembershipAddOperator.partial` filled in for its ``mews_conn_id``;
    replaced by the right one when a mapped task's own ``mews_conn_id`` differs."""

    def __init__(self, mews_conn_id: str) -> None:
        super().__init__([loyalty_memberships_asset(mews_conn_id)])
        self.mews_conn_id = mews_conn_id


def _inherited_default(name: str, kwargs: Mapping[str, Any]) -> tuple[bool, Any]:
    """``name`` from the default_args a ``partial()`` call inherits (its own, task group's, DAG's)."""
    own = kwargs.get("default_args") or {}
    if name in own:
        return True, own[name]
    try:
        from airflow.sdk.definitions._internal.contextmanager import DagContext, TaskGroupContext
    except ImportError:  # Airflow 2.11
        from airflow.models.dag import DagContext  # type: ignore[attr-defined,no-redef]
        from airflow.utils.task_group import TaskGroupContext  # type: ignore[no-redef]
    dag = kwargs.get("dag") or DagContext.get_current()
    group = kwargs.get("task_group") or (TaskGroupContext.get_current(dag) if dag else None)
    for holder in (group, dag):
        args = getattr(holder, "default_args", None) or {}
        if name in args:
            return True, args[name]
    return False, None


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
    :param batch_size: memberships per request, 1..1000. An upsert (``if_exists="update"``) reads
        the default 1000 as 999: its lookup then asks for at most 999 accounts' memberships with
        a page of 1000 that such a batch cannot fill (one membership each), so one getAll answers
        it, where a full page needs a second read to learn it was the last.
    :param max_rejected_rows: rejections tolerated before the task stops and fails.
    :param if_exists: ``"skip"``: never add a membership (account + program) Mews already
        has, at one getAll per batch; ``"add"``: add without checking; ``"update"``: upsert:
        add new rows, send only the changed fields of rows Mews has (docs/howto/upsert.md).
    :param max_active_requests: batches in flight at once (all under the rate limiter); 20 lets a
        front-loaded window of 20 requests (a tenth of Mews's 200 per 30 s) leave at once.
    :param results_table: table (on ``output_conn_id``) receiving each row's Mews Id.
    :param rejections_table: table (on ``output_conn_id``) receiving each rejected row and why.
    :param output_conn_id: connection of the two tables; defaults to ``sql_conn_id``.
    :param results_file: JSON-lines file receiving each row's Mews Id.
    :param rejections_file: JSON-lines file receiving each rejected row and why.
    :param progress_interval_s: seconds between progress lines in the log.
    :param rejected_sample_size: rejections quoted in the returned summary.
    :param retries: Airflow retries of the task (a retry resumes without adding anything twice).
    :param retry_delay: delay before the first retry.
    :param retry_exponential_backoff: grow the delay between retries (``True``: double it).
    :param outlets: defaults to the asset of ``mews_conn_id``'s loyalty memberships
        (:func:`~airflow_provider_mews.lineage.loyalty_memberships_asset`).

    The Airflow defaults above are in the signature, so ``partial().expand()`` (mapped shards)
    gets them too; :meth:`partial` fills in the outlet of the partial's ``mews_conn_id``.
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
        mews_conn_id: str = DEFAULT_CONN_ID,
        memberships: Any = None,
        sql_conn_id: str | None = None,
        table: str | None = None,
        sql: str | None = None,
        field_map: Mapping[str, str] | None = None,
        chain_id: str | None = None,
        batch_size: int = 1000,
        max_rejected_rows: int = 0,
        if_exists: str = "skip",
        max_active_requests: int = DEFAULT_MAX_ACTIVE_REQUESTS,
        results_table: str | None = None,
        rejections_table: str | None = None,
        output_conn_id: str | None = None,
        results_file: str | None = None,
        rejections_file: str | None = None,
        progress_interval_s: float = 30.0,
        rejected_sample_size: int = 20,
        retries: int | None = 3,
        retry_delay: timedelta | float = timedelta(seconds=30),
        retry_exponential_backoff: bool | float = True,
        outlets: Any | None = None,
        **kwargs: Any,
    ) -> None:
        if outlets is None or (isinstance(outlets, _AutoOutlets) and outlets.mews_conn_id != mews_conn_id):
            outlets = [loyalty_memberships_asset(mews_conn_id)]
        super().__init__(
            retries=retries,
            retry_delay=retry_delay,
            retry_exponential_backoff=retry_exponential_backoff,
            outlets=outlets,
            **kwargs,
        )
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

    @classmethod
    def partial(cls, **kwargs: Any) -> Any:  # type: ignore[override]
        """``BaseOperator.partial``, with the outlet of the partial's ``mews_conn_id`` filled in.

        Airflow reads the other defaults (retries, retry_delay, retry_exponential_backoff)
        from ``__init__``'s signature; the outlet depends on the connection, so it is set here,
        where the DAG is parsed. A ``mews_conn_id`` mapped with ``expand()`` gets its own outlet
        when the task runs; give ``outlets=`` to ``partial()`` so the scheduler knows them all.
        """
        if "outlets" not in kwargs and not _inherited_default("outlets", kwargs)[0]:
            found, inherited = _inherited_default("mews_conn_id", kwargs)
            conn_id = kwargs.get("mews_conn_id", inherited if found else DEFAULT_CONN_ID)
            if isinstance(conn_id, str):
                kwargs["outlets"] = _AutoOutlets(conn_id)
        return super().partial(**kwargs)

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
            raise ValueError(f"{where}: if_exists must be 'skip', 'add' or 'update', got {self.if_exists!r}")
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
            settings = self._settings()
            with ExitStack() as opened:
                hook = self._connect()
                opened.callback(hook.close)
                # Outputs first: on SQLite they switch the database to WAL so the source can stay open.
                outputs = [opened.enter_context(closing(out)) for out in self._open_outputs(context)]
                read = opened.enter_context(closing(self._open_source()))
                names = self._names(read.columns)
                source = self._resolved(read, hook, names, settings.chain_id) if names.used else read
                run: MembershipRun
                if self.if_exists == "update":
                    run = SyncRun(
                        settings,
                        self._sync_settings(),
                        hook,
                        source,
                        self._sync_plan(names),
                        outputs,
                        self._checkpoint(context),
                        self.log,
                    )
                else:
                    run = MembershipRun(
                        settings,
                        hook,
                        source,
                        self._plan(names),
                        outputs,
                        self._checkpoint(context),
                        self.log,
                    )
                self._run = run
                if isinstance(source, ResolvedSource):
                    source.stop = run.stop  # its look-ups (ahead of the run) stop with the run
                summary = run.execute()
        finally:
            self._run = None
            gc.unfreeze()
        self._push_summary(context, summary)
        if (failure := run.failure()) is not None:
            raise failure
        return summary

    _run: MembershipRun | None = None

    def on_kill(self) -> None:
        """Airflow's task runner calls this on SIGTERM ("mark failed", a cleared task, a lost
        heartbeat, a worker shutdown: the supervisor sends SIGKILL 5 s later) and after an
        ``execution_timeout``. Without it the try would run on to its end or die mid-batch.

        It runs in a signal handler, so it only asks the run to stop
        (:meth:`~airflow_provider_mews.loyalty.add_run.MembershipRun.interrupt`); ``execute``
        then sends nothing more, records the batches that end within 3 s (the rest stay in
        doubt, reconciled by the next try), writes the checkpoint and fails, retryable."""
        run = self._run
        if run is not None:
            run.interrupt("on_kill: the task was asked to stop (SIGTERM)")

    def _connect(self) -> MewsConnectorHook:
        hook = MewsConnectorHook(self.mews_conn_id, pool_size=self.max_active_requests + 2)
        try:
            hook.settings  # noqa: B018 - validate the connection before reading anything
        except MewsConfigurationError as exc:
            raise AirflowFailException(str(exc)) from None
        except AirflowNotFoundException:
            raise self._no_connection("mews_conn_id", self.mews_conn_id, "mews") from None
        return hook

    def _db_hook(self, setting: str, conn_id: str) -> Any:
        """The common-sql hook of ``conn_id``; a missing or non-database connection fails the task once."""
        from airflow.providers.common.sql.hooks.sql import DbApiHook

        from airflow_provider_mews.version_compat import BaseHook

        try:
            conn = BaseHook.get_connection(conn_id)
        except AirflowNotFoundException:
            raise self._no_connection(setting, conn_id, "a database (sqlite, postgres, ...)") from None
        hook = conn.get_hook()
        if not isinstance(hook, DbApiHook):
            raise AirflowFailException(
                f"{self.task_id}: {setting}={conn_id!r} is a connection of type {conn.conn_type!r}, not a "
                "database one: name a connection whose hook is a common-sql DbApiHook (sqlite, postgres, "
                "mysql, snowflake, ...)"
            )
        return hook

    def _no_connection(self, setting: str, conn_id: str, kind: str) -> AirflowFailException:
        return AirflowFailException(
            f"{self.task_id}: {setting}={conn_id!r} names no Airflow connection. Create a connection of type "
            f"{kind} with that id (Admin > Connections, `airflow connections add`, or the environment variable "
            f"AIRFLOW_CONN_{conn_id.upper()}), or fix {setting}."
        )

    @property
    def _batch_rows(self) -> int:
        """Rows per batch: ``batch_size``, but 999 for an upsert left at the default 1000 (one getAll)."""
        if self.if_exists == "update" and self.batch_size == UPSERT_FULL_BATCH:
            return UPSERT_FULL_BATCH - 1
        return self.batch_size

    def _settings(self) -> RunSettings:
        return RunSettings(
            batch_size=self._batch_rows,
            if_exists=self.if_exists,
            max_active_requests=self.max_active_requests,
            max_rejected_rows=self.max_rejected_rows,
            chain_id=self._chain_id(),
            keep_rows=bool(self.rejections_table or self.rejections_file),
            progress_interval_s=self.progress_interval_s,
            rejected_sample_size=self.rejected_sample_size,
            results=self.results_table or self.results_file,
            rejections=self.rejections_table or self.rejections_file,
        )

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
                return ListSource(rows_from_value(self.memberships), self._batch_rows)
            db_hook = self._db_hook("sql_conn_id", self.sql_conn_id)
            source = SqlSource(db_hook, table=self.table, sql=self.sql, chunk_size=self._batch_rows)
            source.open()
            return source
        except SourceError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None

    def _names(self, columns: Sequence[str]) -> NamePlan:
        """Where the source names members instead of giving Ids (``AccountEmail``, ...)."""
        try:
            return plan_names(columns, self.field_map)
        except ValueError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None

    #: Resolve each name once per run: a mirror reads its source twice (to plan, then to write).
    _remember_names = False

    def _resolved(
        self, source: ListSource | SqlSource, hook: MewsConnectorHook, names: NamePlan, chain_id: str | None
    ) -> ResolvedSource:
        """The source with its rows' Ids looked up in Mews from their names (loyalty.names)."""
        self.log.info(
            "Rows name members by %s: their Ids are looked up in Mews (one customers/getAll per 999 names, "
            "ahead of the batches in flight; programmes and tiers once per run).",
            ", ".join(names.name_at),
        )
        resolver = NameResolver(hook, names, chain_id=chain_id, remember=self._remember_names)
        return ResolvedSource(source, resolver)

    def _plan(self, names: NamePlan) -> ColumnPlan:
        if not names.names:
            return ColumnPlan((), (), ())
        try:
            plan = names.restore(plan_columns(names.masked, names.field_map))
        except ValueError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        if plan.ignored:
            self.log.warning(
                "Columns %s match no Mews field and are not sent (map them with field_map if they should be).",
                ", ".join(plan.ignored),
            )
        return plan

    def _sync_settings(self) -> SyncSettings:
        """An upsert; :class:`LoyaltyMembershipSyncOperator` makes it a mirror."""
        return SyncSettings()

    def _sync_plan(self, names: NamePlan) -> SyncPlan:
        if not names.names:
            return SyncPlan(ColumnPlan((), (), ()), None, None)
        try:
            plan = plan_sync_columns(names.masked, names.field_map)
        except ValueError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        plan = dataclasses.replace(plan, columns=names.restore(plan.columns))
        if plan.columns.ignored:
            self.log.warning(
                "Columns %s match no Mews field and are not sent (map them with field_map if they should be).",
                ", ".join(plan.columns.ignored),
            )
        return plan

    def _open_outputs(self, context: Any) -> list[TableOutput | FileOutput]:
        ti = context["ti"]
        map_index = getattr(ti, "map_index", None)
        key = RunKey(ti.dag_id, ti.run_id, ti.task_id, -1 if map_index is None else int(map_index))
        outputs: list[TableOutput | FileOutput] = []
        if self.results_table or self.rejections_table:
            db_hook = self._db_hook(
                "output_conn_id" if self.output_conn_id != self.sql_conn_id else "sql_conn_id",
                self.output_conn_id or "",
            )
            try:
                table_out = TableOutput(db_hook, key, self.results_table, self.rejections_table)
            except SourceError as exc:
                raise AirflowFailException(f"{self.task_id}: {exc}") from None
            table_out.open()
            outputs.append(table_out)
        if self.results_file or self.rejections_file:
            file_out = FileOutput(key, self.results_file, self.rejections_file)
            try:
                file_out.open()
            except OSError as exc:
                raise AirflowFailException(f"{self.task_id}: {exc}") from None
            outputs.append(file_out)
        return outputs

    def _checkpoint(self, context: Any) -> Checkpoint:
        store = StateStore(context.get("task_state_store"))
        now = datetime.now(timezone.utc)
        checkpoint = Checkpoint.start(store, now.isoformat(), self._batch_rows, self.max_active_requests)
        if not store.available and getattr(context["ti"], "try_number", 1) > 1:
            # No checkpoint on this Airflow: any batch may have been sent by an earlier try
            # of this run, so reconcile them all against what Mews stored since the run began.
            run_start = getattr(context.get("dag_run"), "start_date", None) or now
            checkpoint.reconcile_all(run_start.isoformat())
        return checkpoint

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


class LoyaltyMembershipSyncOperator(LoyaltyMembershipAddOperator):
    """
    Make Mews's loyalty memberships of the named programs equal to the source (a mirror).

    Every source row is upserted as with ``LoyaltyMembershipAddOperator(if_exists="update")``;
    then every membership of ``loyalty_program_ids`` that no row matched is canceled or deleted
    (``on_missing``). The scope is listed and every row matched *before* any write: when the
    removals would exceed ``max_removals`` the task fails having changed nothing. Same sources,
    outputs and retries as the add operator; removals are written to the results with no
    source row (outcome ``canceled`` or ``deleted``).

    :param loyalty_program_ids: the programs the source describes completely (required).
    :param on_missing: ``"cancel"`` (State becomes Canceled), ``"delete"`` or ``"keep"``.
    :param max_removals: most removals allowed: a count, or a percentage of the scope's
        memberships such as ``"5%"``.
    :param dry_run: send no write request; the outputs and summary hold the plan.
    :param sync_work_dir: directory of the temporary on-disk index of the scope (default: the
        system's temporary directory); about 200 bytes of disk per membership of the scope.
    """

    template_fields: Sequence[str] = (*LoyaltyMembershipAddOperator.template_fields, "loyalty_program_ids")
    ui_color = "#c9e4d6"
    _remember_names = True

    def __init__(
        self,
        *,
        loyalty_program_ids: Sequence[str],
        on_missing: str = "cancel",
        max_removals: int | str = "5%",
        dry_run: bool = False,
        sync_work_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if "if_exists" in kwargs:
            raise ValueError(
                f"LoyaltyMembershipSyncOperator(task_id={kwargs.get('task_id')!r}): a mirror always upserts; "
                "drop if_exists"
            )
        self.loyalty_program_ids = loyalty_program_ids
        self.on_missing = on_missing
        self.max_removals = max_removals
        self.plan_only = dry_run  # ``dry_run`` is a BaseOperator method
        self.sync_work_dir = sync_work_dir
        super().__init__(if_exists="update", **kwargs)

    def _check_arguments(self) -> None:
        super()._check_arguments()
        where = f"LoyaltyMembershipSyncOperator(task_id={self.task_id!r})"
        ids = self.loyalty_program_ids
        if (isinstance(ids, str) and "{{" not in ids) or not isinstance(ids, (str, list, tuple)) or not ids:
            raise ValueError(
                f"{where}: loyalty_program_ids must be a non-empty list of LoyaltyProgramIds (the scope "
                f"the source describes completely), got {ids!r}"
            )
        if isinstance(ids, (list, tuple)):
            for value in ids:
                validate_uuid(value, f"{where}: loyalty_program_ids item")
        if self.on_missing not in ON_MISSING:
            raise ValueError(
                f"{where}: on_missing must be one of {', '.join(ON_MISSING)}, got {self.on_missing!r}"
            )
        try:
            parse_max_removals(self.max_removals)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def _sync_settings(self) -> SyncSettings:
        ids = self.loyalty_program_ids
        if isinstance(ids, str):  # a template that rendered to text
            ids = [
                i.strip() for i in ids.strip("[]").replace("'", "").replace('"', "").split(",") if i.strip()
            ]
        try:
            scope = frozenset(validate_uuid(i, "loyalty_program_ids item").lower() for i in ids)
        except ValueError as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from None
        return SyncSettings(
            mirror=True,
            loyalty_program_ids=scope,
            on_missing=self.on_missing,
            max_removals=self.max_removals,
            dry_run=self.plan_only,
            work_dir=self.sync_work_dir,
        )
