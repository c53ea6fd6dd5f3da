"""Lineage: the operator's outlet is an asset downstream DAGs can schedule on."""

from __future__ import annotations

import pytest

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


# -- OpenLineage, end to end: the real listener of the OpenLineage provider, `airflow dags test` --

LINEAGE_DAG = """
import pendulum
from airflow import DAG

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

with DAG("mews_lineage", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    LoyaltyMembershipAddOperator(
        task_id="from_table", sql_conn_id="lineage_sqlite", table="loyalty_members", if_exists="add",
        field_map={"tier_id": "LoyaltyTierId"}, max_rejected_rows=10, retries=0,
    )
    LoyaltyMembershipAddOperator(
        task_id="from_query", sql_conn_id="lineage_sqlite", if_exists="add",
        sql="SELECT m.* FROM loyalty_members m JOIN vip v ON v.member_id = m.member_id ORDER BY m.member_id",
        field_map={"tier_id": "LoyaltyTierId"}, max_rejected_rows=10, retries=0,
    )
    LoyaltyMembershipAddOperator(
        task_id="wrong_token", mews_conn_id="mews_wrong", sql_conn_id="lineage_sqlite",
        table="loyalty_members", max_rejected_rows=10, retries=0,
    )
"""
ROWS, INVALID, VIPS = 40, 2, 5


@pytest.fixture(scope="module")
def lineage_events(airflow_db, _mews_sandbox_server, tmp_path_factory):
    """Runs the DAG above once with OpenLineage on (file transport); returns its events by task."""
    mews_sandbox = _mews_sandbox_server
    mews_sandbox.reset()
    tmp_path = tmp_path_factory.mktemp("lineage")
    import json
    import os
    import sqlite3
    import subprocess

    from conftest import AIRFLOW_BIN, DAGS_DIR, ROOT

    from airflow_provider_mews.testing import connection_json
    from airflow_provider_mews.testing.sample_data import write_sqlite

    db = tmp_path / "members.db"
    write_sqlite(str(db), ROWS, invalid=INVALID)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE vip (member_id INTEGER PRIMARY KEY)")
        conn.executemany("INSERT INTO vip VALUES (?)", [(n,) for n in (1, 3, 5, 7, 9)])
    (DAGS_DIR / "mews_lineage.py").write_text(LINEAGE_DAG)
    events_file = tmp_path / "openlineage.jsonl"
    env = {
        **os.environ,
        "AIRFLOW_CONN_MEWS_DEFAULT": connection_json(mews_sandbox.url),
        "AIRFLOW_CONN_MEWS_WRONG": connection_json(mews_sandbox.url, access_token=WRONG_TOKEN),
        "AIRFLOW_CONN_LINEAGE_SQLITE": json.dumps({"conn_type": "sqlite", "host": str(db)}),
        "AIRFLOW__OPENLINEAGE__DISABLED": "False",
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "mews-tests",
        # The listener extracts in a forked process, killed after 10 s by default: too short on
        # a loaded 2-core CI machine.
        "AIRFLOW__OPENLINEAGE__EXECUTION_TIMEOUT": "120",
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}
        ),
    }
    proc = subprocess.run(
        [AIRFLOW_BIN, "dags", "test", "mews_lineage"], env=env, capture_output=True, text=True, timeout=600
    )
    artifacts = ROOT / ".artifacts" / "lineage"
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "dags-test-mews_lineage.log").write_text(proc.stdout + proc.stderr)
    if events_file.exists():
        (artifacts / "openlineage.jsonl").write_text(events_file.read_text())
    assert events_file.exists(), (
        f"no OpenLineage events written:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    by_task: dict[str, dict[str, dict]] = {}
    for line in events_file.read_text().splitlines():
        event = json.loads(line)
        job = event["job"]["name"]
        if job.startswith("mews_lineage."):
            by_task.setdefault(job.removeprefix("mews_lineage."), {})[event["eventType"]] = event
    return {"events": by_task, "db": db, "sandbox": mews_sandbox, "log": proc.stdout + proc.stderr}


WRONG_TOKEN = "0BADC0DE0BADC0DE0BADC0DE0BADC0DE-0BADC0DE0BADC0DE0BADC0DE0BADC0D"


def _output(event: dict) -> dict:
    (output,) = event["outputs"]
    return output


def test_openlineage_events_name_the_real_tables_and_the_mews_platform(lineage_events):
    events, db, sandbox = lineage_events["events"], lineage_events["db"], lineage_events["sandbox"]
    namespace = f"sqlite://{db}"
    assert {"from_table", "from_query", "wrong_token"} <= events.keys(), lineage_events["log"][-3000:]

    table = events["from_table"]["COMPLETE"]
    assert [(d["namespace"], d["name"]) for d in table["inputs"]] == [(namespace, "main.loyalty_members")]
    output = _output(table)
    assert (output["namespace"], output["name"]) == (sandbox.url, "loyaltyMemberships")
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == ROWS - INVALID
    assert table["job"]["facets"]["sql"]["query"] == "SELECT * FROM loyalty_members"

    # A query: every table it reads, by its real name, parsed by OpenLineage's SQL parser; the
    # query itself in the sql job facet. Never a dataset named "query".
    query = events["from_query"]["COMPLETE"]
    assert sorted((d["namespace"], d["name"]) for d in query["inputs"]) == [
        (namespace, "main.loyalty_members"),
        (namespace, "main.vip"),
    ]
    assert "JOIN vip" in query["job"]["facets"]["sql"]["query"]
    assert _output(query)["outputFacets"]["outputStatistics"]["rowCount"] == VIPS
    assert len(sandbox.memberships()) == ROWS - INVALID + VIPS


def test_openlineage_fail_event_carries_the_mews_error(lineage_events):
    failed = lineage_events["events"]["wrong_token"]
    assert "COMPLETE" not in failed
    event = failed["FAIL"]
    error = event["run"]["facets"]["errorMessage"]
    assert "401" in error["message"] and "RequestId" in error["message"], error["message"]
    assert WRONG_TOKEN[:16] not in json_text(event)
    assert _output(event)["outputFacets"]["outputStatistics"]["rowCount"] == 0
    assert [d["name"] for d in event["inputs"]] == ["main.loyalty_members"]


def json_text(value: object) -> str:
    import json

    return json.dumps(value)
