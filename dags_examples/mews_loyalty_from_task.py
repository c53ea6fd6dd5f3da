"""Rows from an upstream task (XCom) into Mews loyalty memberships."""

from __future__ import annotations

import pendulum

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

try:
    from airflow.sdk import DAG, task
except ImportError:  # Airflow 2.11
    from airflow import DAG  # type: ignore[no-redef,attr-defined]
    from airflow.decorators import task  # type: ignore[no-redef]

PROGRAM_ID = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"

with DAG(
    dag_id="mews_loyalty_from_task",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["mews", "example"],
):

    @task
    def new_members() -> list[dict]:
        """Stands for whatever produces members: an API, a file, a transformation."""
        return [
            {
                "account_id": "fadd5bb6-b428-45d5-94f8-fd0d89fece6d",
                "loyalty_program_id": PROGRAM_ID,
                "is_primary": True,
                "membership_number": "MBR-2026-0001",
                "points": 120,
                "expiration_date": "2029-12-24",
            },
            {
                "account_id": "0b9f2a4e-0d7c-4c55-9f49-2b0f6c1c8a11",
                "loyalty_program_id": PROGRAM_ID,
                "is_primary": "yes",
                "membership_number": "MBR-2026-0002",
                "state": "pending",
            },
        ]

    LoyaltyMembershipAddOperator(
        task_id="add_memberships",
        mews_conn_id="mews_default",
        memberships=new_members(),
    )
