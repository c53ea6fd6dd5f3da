"""Stop means stop: a run that fails reads no further, and counts what it never reached.

A 1 000 000-row SQLite table, Mews failing the very first add: the task must end after
reading no more than the batches already in flight, with ``not_reached`` counted by the
database (``SELECT COUNT(*)``), not by streaming the rest of the table.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import task_result

from airflow_provider_mews.testing import sample_data

ROWS = 1_000_000
DAG = """
import pendulum
from airflow.sdk import DAG

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

with DAG(dag_id="t_stop_reading", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    LoyaltyMembershipAddOperator(
        task_id="add", sql_conn_id="mews_big_db", sql="SELECT * FROM big ORDER BY member_id",
        if_exists="add", retries=0,
    )
"""


@pytest.fixture
def big_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A million valid members, made by SQLite itself (a recursive CTE: about a second)."""
    db = tmp_path / "big.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE big (member_id INTEGER PRIMARY KEY, account_id TEXT, loyalty_program_id TEXT, "
            "is_primary INTEGER)"
        )
        conn.execute(
            "INSERT INTO big WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "SELECT i, printf('%08x-0000-4000-8000-%012x', i, i), ?, 1 FROM n",
            (ROWS, sample_data.PROGRAM_ID),
        )
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_BIG_DB", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    return db


def test_a_failure_on_batch_1_of_a_million_rows_stops_reading(run_dag, mews_conn, mews_sandbox, big_db):
    mews_sandbox.configure(fault_script=["409"])  # the first add fails the try (retries=0: the task)
    dr = run_dag("t_stop_reading", DAG)
    assert dr.state == "failed"
    summary = task_result(dr, "add", key="mews_summary")
    # Read: the batches in flight (8 by default) and at most one more, never the rest of the table.
    assert summary["rows_read"] <= 10 * 1000, summary
    assert summary["rows_total"] == ROWS  # counted by the database
    assert summary["not_reached"] == ROWS - summary["added"] - summary["rejected"] >= ROWS - 10 * 1000
    assert (
        summary["added"] + summary["skipped_existing"] + summary["rejected"] + summary["not_reached"] == ROWS
    )
    assert summary["added"] == len(mews_sandbox.memberships())
