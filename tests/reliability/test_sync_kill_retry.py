"""A mirror whose worker gets SIGKILL while writes are in flight, then the same task instance retried.

The task runs in a real ``airflow dags test`` process against the in-process sandbox (reads
slowed so the kill lands mid-run). Once some adds or updates are stored, the process gets
SIGKILL; the retry is what the scheduler does for a dead worker (``handle_failure``, then try
2 of the same task instance, see ``test_kill_retry.py``). Try 2 lists the scope again, matches
every row, resumes from the checkpoint, and removes what no row matched: Mews ends equal to
the source, nothing added twice, every removal done once.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from conftest import DAGS_DIR, seed_sandbox, task_result

from airflow_provider_mews.testing import DEMO_CLIENT_TOKEN
from reliability.test_fault_matrix import ACCESS_TOKEN, SRC_CONN, TASK_ID, mews_conn_json, sqlite_conn_json
from reliability.test_kill_retry import kill_worker_mid_batch, retry_after_worker_death, the_run

PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
SCOPE, KEPT, CHANGED, NEW = 4_000, 3_800, 600, 500
DAG = """
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipSyncOperator

with DAG(dag_id="{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    LoyaltyMembershipSyncOperator(
        task_id="{task_id}", sql_conn_id="{src}", sql="SELECT * FROM members ORDER BY member_id",
        loyalty_program_ids=["{program}"], on_missing="delete", max_removals="10%",
        batch_size=250, max_active_requests=2, results_table="results", retries=2,
        retry_delay=timedelta(seconds=0), retry_exponential_backoff=False,
    )
"""


@pytest.mark.timeout(600)
def test_sigkill_mid_mirror_then_retried(airflow_db, mews_sandbox, tmp_path, monkeypatch):
    import sqlite3

    db = tmp_path / "members.db"
    mews_sandbox.add_tokens(DEMO_CLIENT_TOKEN, ACCESS_TOKEN)
    scope = seed_sandbox(mews_sandbox, SCOPE, PROGRAM)
    new_accounts = [str(uuid.uuid4()) for _ in range(NEW)]
    rows = [
        (n, m["AccountId"], PROGRAM, 1, m["MembershipNumber"], m["Points"] + (n < CHANGED))
        for n, m in enumerate(scope[:KEPT])
    ]
    rows += [(KEPT + i, a, PROGRAM, 0, f"N-{i}", 1) for i, a in enumerate(new_accounts)]
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE members (member_id, account_id, loyalty_program_id, is_primary, membership_number, points)"
        )
        conn.executemany("INSERT INTO members VALUES (?, ?, ?, ?, ?, ?)", rows)
    mews_sandbox.configure(getall_latency_s=0.3, add_latency_s=1.0)
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", mews_conn_json(mews_sandbox.url))
    monkeypatch.setenv(f"AIRFLOW_CONN_{SRC_CONN.upper()}", sqlite_conn_json(db))
    dag_id = "rel_sync_kill"
    (DAGS_DIR / f"{dag_id}.py").write_text(
        DAG.format(dag_id=dag_id, task_id=TASK_ID, src=SRC_CONN, program=PROGRAM)
    )

    def writes_stored() -> bool:
        stats = mews_sandbox.stats()
        return stats.get("added", 0) > 0 and stats.get("updated", 0) > 0

    kill_worker_mid_batch(dag_id, tmp_path / "try1.log", writes_stored)
    run_id, run_state, ti_state, try_number = the_run(dag_id)
    assert (run_state, ti_state, try_number) == ("running", "running", 1)
    before = mews_sandbox.stats()
    assert before.get("deleted", 0) == 0  # killed before the removals

    dr = retry_after_worker_death(dag_id, run_id)
    assert dr.state == "success"
    stats = mews_sandbox.stats()
    active = [m for m in mews_sandbox.memberships() if m["ActivityState"] == "Active"]
    assert max(Counter(m["AccountId"] for m in active).values()) == 1
    assert stats["added"] == NEW and set(new_accounts) <= {m["AccountId"] for m in active}  # added once
    by_id = {m["Id"]: m for m in mews_sandbox.memberships()}
    assert all(by_id[m["Id"]]["Points"] == m["Points"] + 1 for m in scope[:CHANGED])
    gone = {m["Id"] for m in scope[KEPT:]}
    assert {i for i, m in by_id.items() if m["ActivityState"] == "Deleted"} == gone
    assert stats["deleted"] == len(gone)  # every removal done once
    summary = task_result(dr, TASK_ID)
    assert summary["deleted"] == len(gone) and summary["rejected"] == 0 and summary["not_reached"] == 0
    assert summary["added"] + summary["updated"] + summary["unchanged"] == KEPT + NEW
