"""A SQLite table of members into Mews loyalty memberships; each row's Mews Id written back.

The README's main-job command (``make demo``) runs this DAG against the local sandbox.
"""

from __future__ import annotations

import pendulum

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.11
    from airflow import DAG  # type: ignore[no-redef,attr-defined]

with DAG(
    dag_id="mews_loyalty_from_sqlite",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["mews", "example"],
):
    LoyaltyMembershipAddOperator(
        task_id="add_memberships",
        mews_conn_id="mews_default",
        sql_conn_id="mews_demo_sqlite",
        sql="SELECT * FROM loyalty_members ORDER BY member_id",
        field_map={"tier_id": "LoyaltyTierId"},
        max_rejected_rows=100,
        results_table="mews_membership_results",
        rejections_table="mews_membership_rejections",
    )
