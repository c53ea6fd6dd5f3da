"""A large table split into shards, one mapped task each, all sharing one Airflow pool.

This is how the job scales out on Celery or Kubernetes executors: each shard is an
independent, retryable task instance with its own checkpoint (the operator's defaults reach
mapped tasks too: 3 retries, 30 s apart with exponential back-off, and its asset outlet). The
pool caps how many shards talk to Mews at once. The shards share one rate budget per
AccessToken: on one host with no configuration, across hosts when the Mews connection names a
Redis connection in ``extra.rate_limit_redis_conn_id`` (docs/rate-limiting.md, "Scaling out").

Create the pool before the first run (the scheduler does not schedule tasks whose pool does
not exist; ``airflow dags test`` ignores pools): ``airflow pools set mews_api 4 "Mews API"``.

The shard count comes from the ``MEWS_EXAMPLE_SHARDS`` environment variable (default 4),
read when the file is parsed: set it alike for the DAG processor and every worker.
"""

from __future__ import annotations

import os

import pendulum

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.11
    from airflow import DAG  # type: ignore[no-redef,attr-defined]

SHARDS = int(os.environ.get("MEWS_EXAMPLE_SHARDS", "4"))

with DAG(
    dag_id="mews_loyalty_sharded",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["mews", "example"],
):
    LoyaltyMembershipAddOperator.partial(
        task_id="add_shard",
        mews_conn_id="mews_default",
        sql_conn_id="mews_demo_sqlite",
        pool="mews_api",
        field_map={"tier_id": "LoyaltyTierId"},
        max_rejected_rows=100,
        results_table="mews_membership_results",
        rejections_table="mews_membership_rejections",
    ).expand(
        sql=[
            f"SELECT * FROM loyalty_members WHERE member_id % {SHARDS} = {shard} ORDER BY member_id"
            for shard in range(SHARDS)
        ]
    )
