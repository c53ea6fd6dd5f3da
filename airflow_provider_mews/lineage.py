"""Lineage: the Airflow asset a DAG can schedule on, and OpenLineage datasets of a run.

Each Mews connection's loyalty memberships are one asset, ``mews://<conn id>/loyaltyMemberships``:
the operator lists it as its outlet, so a downstream DAG can run whenever memberships were
added (``schedule=[loyalty_memberships_asset("mews_default")]``). The connection id, not the
host, names it, because DAGs are parsed without reading connections.

With the OpenLineage provider installed, its listener asks the operator for an
``OperatorLineage`` when the task ends; ``openlineage_facets`` builds it:

- inputs: the tables the source reads, named as the official SQL operators name them (the
  OpenLineage SQL parser shipped with the provider, on the query or on ``SELECT * FROM table``;
  the namespace from the SQL hook's ``get_openlineage_database_info``, or
  ``<conn type>://<host>[:port]`` for hooks without it, such as SQLite's); the query itself
  as the ``sql`` job facet. A query the parser cannot read yields no input, never a made-up one;
- output: ``loyaltyMemberships`` in the namespace of the Mews platform address
  (``https://api.mews.com``), with an ``outputStatistics`` facet: the memberships added;
- on failure the listener adds the ``errorMessage`` run facet (the Mews error, never a token).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from airflow_provider_mews.version_compat import AIRFLOW_V_3_0_PLUS, Asset

ASSET_SCHEME = "mews"
OUTPUT_NAME = "loyaltyMemberships"
log = logging.getLogger(__name__)


def loyalty_memberships_asset(mews_conn_id: str = "mews_default") -> Any:
    """The asset updated when memberships are added through ``mews_conn_id``."""
    uri = f"{ASSET_SCHEME}://{mews_conn_id}/loyaltyMemberships"
    if AIRFLOW_V_3_0_PLUS:
        return Asset(name=f"mews_loyalty_memberships_{mews_conn_id}", uri=uri)
    return Asset(uri)


def openlineage_facets(
    *,
    mews_base_url: str,
    sql_conn: Any | None,
    table: str | None,
    sql: str | None,
    summary: Mapping[str, Any] | None = None,
) -> Any:
    """OperatorLineage for the OpenLineage provider, when it is installed (else None).

    ``sql_conn`` is the source's Airflow connection (None for an XCom source); ``summary``
    the run's summary (its ``added`` count becomes the output statistics)."""
    try:
        from airflow.providers.openlineage.extractors import OperatorLineage
        from openlineage.client.event_v2 import OutputDataset
        from openlineage.client.facet_v2 import output_statistics_output_dataset, sql_job
    except ImportError:
        return None
    inputs: list[Any] = []
    job_facets: dict[str, Any] = {}
    run_facets: dict[str, Any] = {}
    if sql_conn is not None and (sql or table):
        query = sql or f"SELECT * FROM {table}"
        try:
            parsed = _parse_source(sql_conn, query)
        except Exception as exc:  # lineage is best effort: the output and the query are still reported
            log.warning("OpenLineage: could not name the source's tables: %s", exc)
            parsed = None
        if parsed is not None:
            inputs = list(parsed.inputs)
            run_facets.update(parsed.run_facets)
        job_facets["sql"] = sql_job.SQLJobFacet(query=query)
    output_facets: dict[str, Any] = {}
    if summary is not None and isinstance(summary.get("added"), int):
        output_facets["outputStatistics"] = (
            output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(rowCount=summary["added"])
        )
    outputs = [OutputDataset(namespace=mews_base_url, name=OUTPUT_NAME, outputFacets=output_facets)]
    return OperatorLineage(inputs=inputs, outputs=outputs, run_facets=run_facets, job_facets=job_facets)


def _parse_source(sql_conn: Any, query: str) -> Any:
    """The OperatorLineage the OpenLineage SQL parser reads from ``query`` (inputs named in the
    connection's namespace), without querying the database; None when it can't."""
    try:
        from airflow.providers.openlineage.sqlparser import DatabaseInfo, SQLParser
    except ImportError:
        return None
    hook = sql_conn.get_hook()
    get_info = getattr(hook, "get_openlineage_database_info", None)
    info = get_info(sql_conn) if get_info is not None else None
    if info is not None:  # the hook names its datasets (Postgres: postgres://host:port, db.schema.table)
        dialect = hook.get_openlineage_database_dialect(sql_conn)
        default_schema = hook.get_openlineage_default_schema()
    else:  # e.g. SQLite: named by the connection's type and host (the database file)
        authority = sql_conn.host or ""
        if sql_conn.port:
            authority += f":{sql_conn.port}"
        info = DatabaseInfo(scheme=sql_conn.conn_type, authority=authority or None)
        dialect = sql_conn.conn_type if sql_conn.conn_type in ("sqlite", "mysql", "postgres") else "generic"
        # SQLite's own name for the tables of the opened file is schema `main`.
        default_schema = "main" if sql_conn.conn_type == "sqlite" else (sql_conn.schema or None)
    parser = SQLParser(dialect=dialect, default_schema=default_schema)
    lineage = parser.generate_openlineage_metadata_from_sql(
        sql=query, hook=hook, database_info=info, use_connection=False
    )
    for dataset in lineage.inputs:  # no schema known: the parser writes "None.<table>"
        if dataset.name.startswith("None."):
            dataset.name = dataset.name.removeprefix("None.")
    return lineage
