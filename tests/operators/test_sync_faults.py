"""Faults over the upsert and the mirror: 5xx, drops after storing, 429s, on every write.

The sandbox answers adds, updates and deletes with 500 (not done), drops the connection after
doing them, and answers 429s. Adds are reconciled before a resend, updates are retried (they
set values), deletes are read back before a resend. The run must end with Mews equal to the
source: no row lost, nothing added twice, every removal done once.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import seed_sandbox, task_result

from airflow_provider_mews.testing import MewsSandbox, connection_json

PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
WRITES = {f"loyaltyMemberships/{op}" for op in ("add", "update", "delete")}
COLUMNS = ("member_id", "account_id", "loyalty_program_id", "is_primary", "membership_number", "points")
SCOPE, KEPT, CHANGED, NEW = 3_000, 2_800, 400, 600
DAG = """
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_mews.operators.loyalty_memberships import (
    LoyaltyMembershipAddOperator,
    LoyaltyMembershipSyncOperator,
)

with DAG(dag_id="{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    {operator}(
        task_id="sync", sql_conn_id="mews_faults_db", sql="SELECT * FROM members ORDER BY member_id",
        batch_size=250, results_table="results", retries=3, retry_delay=timedelta(seconds=0),
        retry_exponential_backoff=False, {args}
    )
"""


def build(sandbox: MewsSandbox, db: Path) -> tuple[list[dict[str, Any]], list[str]]:
    scope = seed_sandbox(sandbox, SCOPE, PROGRAM)
    rows = [
        (n, m["AccountId"], PROGRAM, 1, m["MembershipNumber"], m["Points"] + (1 if n < CHANGED else 0))
        for n, m in enumerate(scope[:KEPT])
    ]
    new_accounts = [str(uuid.uuid4()) for _ in range(NEW)]
    rows += [(KEPT + i, a, PROGRAM, 0, f"N-{i}", 1) for i, a in enumerate(new_accounts)]
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TABLE members ({', '.join(COLUMNS)})")
        conn.executemany(f"INSERT INTO members VALUES ({', '.join('?' * len(COLUMNS))})", rows)
    return scope, new_accounts


@pytest.mark.parametrize("mode", ["upsert", "mirror"])
def test_sync_through_5xx_drops_and_429s(run_dag, mews_sandbox, tmp_path, monkeypatch, mode):
    db = tmp_path / "members.db"
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_FAULTS_DB", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_DEFAULT",
        connection_json(mews_sandbox.url, rate_limit_requests=100, rate_limit_period=1),
    )
    scope, new_accounts = build(mews_sandbox, db)
    mews_sandbox.configure(
        fault_operations=WRITES,
        fault_rates={"500": 0.15, "drop_after_store": 0.1, "429:1": 0.1},
        fault_script=["500", "drop_after_store", "429:1"],
        seed=11,
    )
    if mode == "upsert":
        operator, args = "LoyaltyMembershipAddOperator", "if_exists='update'"
    else:
        operator, args = (
            "LoyaltyMembershipSyncOperator",
            f"loyalty_program_ids=[{PROGRAM!r}], on_missing='delete', max_removals='10%'",
        )
    dr = run_dag(
        f"t_sync_faults_{mode}", DAG.format(dag_id=f"t_sync_faults_{mode}", operator=operator, args=args)
    )
    assert dr.state == "success"

    stats = mews_sandbox.stats()
    assert stats["fault:500"] > 0 and stats["fault:drop_after_store"] > 0 and stats["fault:429"] > 0
    active = [m for m in mews_sandbox.memberships() if m["ActivityState"] == "Active"]
    per_account = Counter(m["AccountId"] for m in active)
    assert max(per_account.values()) == 1  # nothing added twice
    assert set(new_accounts) <= set(per_account)  # no new row lost
    assert stats["added"] == NEW
    by_id = {m["Id"]: m for m in mews_sandbox.memberships()}
    assert all(by_id[m["Id"]]["Points"] == m["Points"] + 1 for m in scope[:CHANGED])  # every change made
    assert all(by_id[m["Id"]]["Points"] == m["Points"] for m in scope[CHANGED:KEPT])
    gone = {m["Id"] for m in scope[KEPT:]}
    deleted = {i for i, m in by_id.items() if m["ActivityState"] == "Deleted"}
    if mode == "mirror":
        assert deleted == gone and stats["deleted"] == len(gone)  # every removal done, once
    else:
        assert deleted == set()
    summary = task_result(dr, "sync")
    # A retried try finds what an earlier try added or updated but did not checkpoint: unchanged now.
    assert summary["added"] + summary["updated"] + summary["unchanged"] == KEPT + NEW
    assert summary["rejected"] == 0 and summary["not_reached"] == 0
    assert summary["deleted"] == (len(gone) if mode == "mirror" else 0)
    with sqlite3.connect(db) as conn:
        rows = dict(
            conn.execute(
                "SELECT outcome, COUNT(*) FROM results WHERE source_row IS NOT NULL GROUP BY outcome"
            )
        )
    assert sum(rows.values()) == KEPT + NEW
