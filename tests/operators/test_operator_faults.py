"""Issue 3's "Done when": 20 000 good rows and 30 bad ones through a faulty, rate-limited Mews.

The sandbox answers 10% of the adds with HTTP 500 (not stored), drops the connection
after storing 5% of them, and allows 20 requests per 2 s; the connection's client-side
limiter is set to the same. A 500 on an add is never retried blindly by the hook: the
operator reconciles with getAll before sending again. The run must end with every valid
row stored exactly once, the 30 invalid rows rejected with reasons, and counts adding up.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter

from conftest import task_result

from airflow_provider_mews.testing import connection_json, sample_data

VALID, INVALID = 20_000, 30

DAG_SOURCE = """
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")

with DAG(dag_id="t_op_faults", schedule=None, start_date=START, catchup=False):
    LoyaltyMembershipAddOperator(
        task_id="add",
        sql_conn_id="mews_faults_db",
        table="loyalty_members",
        field_map={"tier_id": "LoyaltyTierId"},
        max_rejected_rows=30,
        results_table="mews_results",
        rejections_table="mews_rejections",
        retries=3,
        retry_delay=timedelta(seconds=0),
        retry_exponential_backoff=False,
    )
"""


def test_20000_rows_through_faults_and_a_tight_rate_limit(
    run_dag, mews_sandbox, tmp_path, monkeypatch, capfd
):
    db = tmp_path / "members.db"
    sample_data.write_sqlite(str(db), VALID + INVALID, invalid=INVALID)
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_FAULTS_DB", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_DEFAULT",
        connection_json(mews_sandbox.url, rate_limit_requests=20, rate_limit_period=2),
    )
    mews_sandbox.configure(
        fault_rates={"500": 0.10, "drop_after_store": 0.05},
        fault_script=["500", "drop_after_store"],  # at least one of each, whatever the dice say
        rate_limit_requests=20,
        rate_limit_period_s=2.0,
        seed=3,
    )

    dr = run_dag("t_op_faults", DAG_SOURCE)
    log = capfd.readouterr().out
    assert dr.state == "success", log[-5000:]

    stats = mews_sandbox.stats()
    assert stats["fault:500"] > 0 and stats["fault:drop_after_store"] > 0  # the faults did happen
    assert stats["requests:loyaltyMemberships/add"] > 21  # some of the 21 batches were sent again
    assert stats["added"] == VALID  # ... and yet Mews stored each row once

    # Every valid row stored exactly once, no invalid one.
    with sqlite3.connect(db) as conn:
        source = dict(conn.execute("SELECT member_id, account_id FROM loyalty_members"))
        rejections = [
            dict(zip(("source_row", "account_id", "field", "reason"), r, strict=True))
            for r in conn.execute("SELECT source_row, account_id, field, reason FROM mews_rejections")
        ]
        results = list(conn.execute("SELECT source_row, mews_membership_id, outcome FROM mews_results"))
    stored = Counter(m["AccountId"] for m in mews_sandbox.memberships())
    assert max(stored.values()) == 1, [a for a, n in stored.items() if n > 1][:5]
    rejected_rows = {r["source_row"] for r in rejections}
    assert len(rejected_rows) == INVALID == len(rejections)
    assert set(stored) == {acc for row, acc in source.items() if row not in rejected_rows}
    assert len(stored) == VALID

    # The 30 rejected with reasons naming the field and the row; each added row paired with its Id.
    assert Counter(r["field"] for r in rejections) == {
        "AccountId": 5, "IsPrimary": 5, "Points": 5, "ExpirationDate": 5, "Url": 5, "State": 5,
    }  # fmt: skip
    assert all(r["reason"].startswith(f"row {r['source_row']}") for r in rejections)
    by_id = {m["Id"]: m["AccountId"] for m in mews_sandbox.memberships()}
    assert len(results) == VALID and {o for _, _, o in results} == {"added"}
    assert all(by_id[mid] == source[row] for row, mid, _ in results)

    # Counts add up, in the XCom that the last (successful) try pushed.
    summary = task_result(dr, "add")
    assert summary["rows_read"] == VALID + INVALID
    assert (summary["added"], summary["skipped_existing"], summary["rejected"], summary["not_reached"]) == (
        VALID, 0, INVALID, 0,
    )  # fmt: skip
    assert summary["reconciled"] > 0  # rows found stored after a dropped connection, not sent again
    assert sum(summary["rejection_reasons"].values()) == INVALID
    assert len(json.dumps(summary)) < 10_000
