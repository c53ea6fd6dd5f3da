"""Round trip between a CRM and Mews: export memberships nightly, compare in SQL, add what is missing.

1. ``export_memberships`` (:class:`~airflow_provider_mews.transfers.mews_to_sql.MewsToSqlOperator`)
   upserts the loyalty memberships Mews changed during the run's data interval into
   ``mews_loyalty_memberships`` (one text column per Mews field, named as Mews writes them,
   ``Id`` the key; deleted memberships keep their row with ``ActivityState`` ``Deleted``).
   With ``catchup=True`` every missed night is exported in turn; a first run over a long
   range is read in 3-month slices by the hook.
2. ``add_missing`` (:class:`~airflow_provider_mews.operators.loyalty_memberships.LoyaltyMembershipAddOperator`)
   reads, in SQL, the CRM members (``crm_members``, the columns of ``sample_data.COLUMNS``) whose
   account has no active membership of the programme in the exported table, and adds them to
   Mews (``if_exists="skip"`` checks Mews once more, so a member exported late is not doubled).

Both tables live on the ``mews_crm`` connection (SQLite here; any common-sql database works).
The data interval comes from ``CronDataIntervalTimetable``: each run covers the previous day.
"""

from __future__ import annotations

import pendulum

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator
from airflow_provider_mews.transfers.mews_to_sql import MewsToSqlOperator

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.11
    from airflow import DAG  # type: ignore[no-redef,attr-defined]
try:
    from airflow.timetables.interval import CronDataIntervalTimetable
except ImportError:  # pragma: no cover
    from airflow.sdk import CronDataIntervalTimetable  # type: ignore[attr-defined,no-redef]

PROGRAMME = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"  # the demo programme (sample_data.PROGRAM_ID)

MISSING_IN_MEWS = f"""
SELECT c.*
FROM crm_members c
WHERE c.loyalty_program_id = '{PROGRAMME}'
  AND NOT EXISTS (
    SELECT 1 FROM mews_loyalty_memberships m
    WHERE lower(m."AccountId") = lower(c.account_id)
      AND lower(m."LoyaltyProgramId") = lower(c.loyalty_program_id)
      AND m."ActivityState" = 'Active'
  )
ORDER BY c.member_id
"""

with DAG(
    dag_id="mews_crm_roundtrip",
    schedule=CronDataIntervalTimetable("0 2 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=True,
    max_active_runs=1,
    tags=["mews", "example"],
):
    export = MewsToSqlOperator(
        task_id="export_memberships",
        mews_conn_id="mews_default",
        operation="loyaltyMemberships/getAll",
        filters={"LoyaltyProgramIds": [PROGRAMME]},
        updated_utc=("{{ data_interval_start }}", "{{ data_interval_end }}"),
        sql_conn_id="mews_crm",
        table="mews_loyalty_memberships",
        retries=3,
    )
    add_missing = LoyaltyMembershipAddOperator(
        task_id="add_missing",
        mews_conn_id="mews_default",
        sql_conn_id="mews_crm",
        sql=MISSING_IN_MEWS,
        field_map={"tier_id": "LoyaltyTierId"},
        if_exists="skip",
        max_rejected_rows=100,
        results_table="mews_crm_results",
        rejections_table="mews_crm_rejections",
    )
    export >> add_missing
