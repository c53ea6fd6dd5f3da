"""Nightly mirror of one loyalty programme from a SQL table: Mews ends equal to the table.

Every row of ``loyalty_members`` is upserted (new memberships added, changed ones updated with
only the fields that differ, unchanged ones left alone), then every membership of the
programme that no row matched is canceled (``on_missing="cancel"``). If that would cancel more
than 5% of the programme (``max_removals="5%"``), the run fails before changing anything: a
half-loaded table must not cancel half the members.

Try it first with ``dry_run=True`` below: no write request is sent (only reads), and the
results table holds the plan: each row's planned outcome (``planned_added``, ``planned_updated``
with the fields that would change, ``planned_unchanged``; rejected rows in the rejections
table) and each planned removal (``planned_canceled``, ``source_row`` NULL), and the
summary (XCom ``mews_summary``) the counts and whether ``max_removals`` would refuse the run.

A column that is NULL clears the field in Mews (tier, points, number, expiration, URL); a
column the query does not select is never touched.
"""

from __future__ import annotations

import pendulum

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipSyncOperator

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.11
    from airflow import DAG  # type: ignore[no-redef,attr-defined]

PROGRAMME = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"  # the demo programme (sample_data.PROGRAM_ID)

with DAG(
    dag_id="mews_loyalty_sync",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["mews", "example"],
):
    LoyaltyMembershipSyncOperator(
        task_id="mirror_programme",
        mews_conn_id="mews_default",
        sql_conn_id="mews_demo_sqlite",
        sql="SELECT * FROM loyalty_members ORDER BY member_id",
        field_map={"tier_id": "LoyaltyTierId"},
        loyalty_program_ids=[PROGRAMME],
        on_missing="cancel",
        max_removals="5%",
        max_rejected_rows=100,  # the demo table has invalid rows on purpose; their members are kept
        dry_run=False,
        results_table="mews_sync_results",
        rejections_table="mews_sync_rejections",
    )
