"""Lineage: the operator's outlet is an asset downstream DAGs can schedule on."""

from __future__ import annotations

from airflow_provider_mews.lineage import loyalty_memberships_asset
from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator


def test_operator_outlet_is_the_connections_memberships_asset():
    op = LoyaltyMembershipAddOperator(task_id="add", mews_conn_id="mews_eu", memberships=[])
    assert [a.uri for a in op.outlets] == ["mews://mews_eu/loyaltyMemberships"]
    assert op.outlets == [loyalty_memberships_asset("mews_eu")]


def test_a_successful_run_records_an_asset_event(run_dag, mews_conn, mews_sandbox):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    dr = run_dag("mews_loyalty_from_task")
    assert dr.state == "success"
    with create_session() as session:
        events = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.uri == "mews://mews_default/loyaltyMemberships")
            .where(AssetEvent.source_run_id == dr.run_id)
        ).all()
    assert len(events) == 1
    assert events[0].source_task_id == "add_memberships"
