"""Lineage: the Airflow asset a DAG can schedule on, and OpenLineage datasets of a run.

Each Mews connection's loyalty memberships are one asset, ``mews://<conn id>/loyaltyMemberships``:
the operator lists it as its outlet, so a downstream DAG can run whenever memberships were
added (``schedule=[loyalty_memberships_asset("mews_default")]``). The connection id, not the
host, names it, because DAGs are parsed without reading connections.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_mews.version_compat import AIRFLOW_V_3_0_PLUS, Asset

ASSET_SCHEME = "mews"


def loyalty_memberships_asset(mews_conn_id: str = "mews_default") -> Any:
    """The asset updated when memberships are added through ``mews_conn_id``."""
    uri = f"{ASSET_SCHEME}://{mews_conn_id}/loyaltyMemberships"
    if AIRFLOW_V_3_0_PLUS:
        return Asset(name=f"mews_loyalty_memberships_{mews_conn_id}", uri=uri)
    return Asset(uri)


def openlineage_facets(
    *, mews_base_url: str, sql_conn: Any | None, table: str | None, sql: str | None
) -> Any:
    """OperatorLineage for the OpenLineage provider, when it is installed (else None)."""
    try:
        from airflow.providers.openlineage.extractors import OperatorLineage
        from openlineage.client.event_v2 import Dataset
    except ImportError:
        return None
    inputs = []
    if sql_conn is not None:
        where = sql_conn.host or ""
        if sql_conn.port:
            where += f":{sql_conn.port}"
        namespace = f"{sql_conn.conn_type}://{where}"
        name = ".".join(p for p in (sql_conn.schema, table) if p) if table else "query"
        inputs.append(Dataset(namespace=namespace, name=name))
    outputs = [Dataset(namespace=mews_base_url, name="loyaltyMemberships")]
    job_facets: dict[str, Any] = {}
    if sql:
        try:
            from openlineage.client.facet_v2 import sql_job

            job_facets["sql"] = sql_job.SQLJobFacet(query=sql)
        except ImportError:
            pass
    return OperatorLineage(inputs=inputs, outputs=outputs, job_facets=job_facets)
