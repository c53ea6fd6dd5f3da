"""A CRM's member table into Mews: members named by e-mail, programmes and tiers by code.

The CRM knows no Mews Id: ``crm_members(member_id, email, programme_code, tier_code, card_no,
points)``. The operator looks each e-mail up among Mews's guest profiles (one
``customers/getAll`` per 1000 rows), each programme and tier code once per run, and adds the
memberships with the Ids found. A row whose e-mail matches no profile, several profiles (a
guest with duplicate profiles: merge them in Mews), or whose code Mews does not know is
rejected with the reason in ``mews_crm_rejections``; ``mews_crm_results`` says which guest
each row went to. See docs/howto/names.md.
"""

from __future__ import annotations

import pendulum

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.11
    from airflow import DAG  # type: ignore[no-redef,attr-defined]

with DAG(
    dag_id="mews_loyalty_from_crm",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["mews", "example"],
):
    LoyaltyMembershipAddOperator(
        task_id="add_members",
        mews_conn_id="mews_default",
        sql_conn_id="mews_crm",
        # IsPrimary is required by Mews and the CRM has no such column: every member is primary.
        sql="SELECT member_id, email, programme_code, tier_code, card_no, points, 1 AS is_primary "
        "FROM crm_members ORDER BY member_id",
        field_map={
            "email": "AccountEmail",  # or "AccountLoyaltyCode" for the guest's loyalty code
            "programme_code": "LoyaltyProgramCode",
            "tier_code": "LoyaltyTierCode",
            "card_no": "MembershipNumber",
        },
        if_exists="skip",  # a second run adds nothing: members Mews has are skipped
        max_rejected_rows=100,
        results_table="mews_crm_results",
        rejections_table="mews_crm_rejections",
    )
