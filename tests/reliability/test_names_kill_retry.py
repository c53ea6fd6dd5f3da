"""Rows named by e-mail and codes (issue 18), the worker SIGKILLed mid-run, then retried.

The CRM table of ``tests/operators/test_names_operator.py`` (no Mews Id) runs in a real
``airflow dags test`` process against the in-process sandbox, adds slowed so the kill lands
with batches in flight. Try 2 (the scheduler's retry of a dead worker) resolves the rows
again, to the same Ids, skips what the checkpoint says is done and reconciles what may have
been sent: every resolvable row ends in Mews once, with its three Ids; every other row is
rejected with its reason.
"""

from __future__ import annotations

import sqlite3
from collections import Counter

import pytest
from conftest import DAGS_DIR, task_result
from operators.test_names_operator import FIELD_MAP, write_crm

from airflow_provider_mews.testing import DEMO_CLIENT_TOKEN
from reliability.test_fault_matrix import ACCESS_TOKEN, SRC_CONN, TASK_ID, mews_conn_json, sqlite_conn_json
from reliability.test_kill_retry import kill_worker_mid_batch, retry_after_worker_death, the_run

DAG = """
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_mews.operators.loyalty_memberships import {operator}

with DAG(dag_id="{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    {operator}(
        task_id="{task_id}", sql_conn_id="{src}", sql="SELECT * FROM crm ORDER BY member_id",
        field_map={field_map!r}, batch_size=250, max_active_requests=2, max_rejected_rows=1000,
        results_table="results", rejections_table="rejections", retries=2,
        retry_delay=timedelta(seconds=0), retry_exponential_backoff=False, {args}
    )
"""


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("operator", "args"),
    [
        ("LoyaltyMembershipAddOperator", 'if_exists="add"'),
        ("LoyaltyMembershipSyncOperator", 'loyalty_program_ids=["{program}"], max_removals=0'),
    ],
    ids=["add", "mirror"],
)
def test_sigkill_mid_run_of_named_rows_then_retried(
    airflow_db, mews_sandbox, tmp_path, monkeypatch, operator, args
):
    db = tmp_path / "crm.db"
    mews_sandbox.add_tokens(DEMO_CLIENT_TOKEN, ACCESS_TOKEN)
    crm = write_crm(mews_sandbox, db)
    mews_sandbox.configure(add_latency_s=1.0)
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", mews_conn_json(mews_sandbox.url))
    monkeypatch.setenv(f"AIRFLOW_CONN_{SRC_CONN.upper()}", sqlite_conn_json(db))
    dag_id = "rel_names_kill_" + ("add" if "Add" in operator else "mirror")
    (DAGS_DIR / f"{dag_id}.py").write_text(
        DAG.format(
            operator=operator,
            dag_id=dag_id,
            task_id=TASK_ID,
            src=SRC_CONN,
            field_map=FIELD_MAP,
            args=args.format(program=crm.program),
        )
    )

    kill_worker_mid_batch(dag_id, tmp_path / "try1.log", lambda: mews_sandbox.stats().get("added", 0) > 0)
    run_id, run_state, ti_state, try_number = the_run(dag_id)
    assert (run_state, ti_state, try_number) == ("running", "running", 1)
    assert 0 < len(mews_sandbox.memberships()) < len(crm.expected)  # killed mid-run

    dr = retry_after_worker_death(dag_id, run_id)
    assert dr.state == "success"
    held = mews_sandbox.memberships()
    assert max(Counter(m["MembershipNumber"] for m in held).values()) == 1  # nothing added twice
    by_card = {m["MembershipNumber"]: m for m in held}
    assert set(by_card) == {f"CARD-{member}" for member in crm.expected}
    for member, ids in crm.expected.items():
        m = by_card[f"CARD-{member}"]
        assert (m["AccountId"], m["LoyaltyProgramId"], m["LoyaltyTierId"]) == ids
    with sqlite3.connect(db) as conn:
        results = dict(conn.execute("SELECT source_row, mews_membership_id FROM results").fetchall())
        rejections = dict(conn.execute("SELECT source_row, reason FROM rejections").fetchall())
    assert results == {member: by_card[f"CARD-{member}"]["Id"] for member in crm.expected}
    assert set(rejections) == set(crm.reasons)
    assert all(reason in rejections[member] for member, reason in crm.reasons.items())
    summary = task_result(dr, TASK_ID)
    # A mirror's try 2 finds what try 1 added before any batch finished as matching rows: unchanged.
    assert summary["added"] + summary.get("unchanged", 0) == len(crm.expected)
    assert summary["rejected"] == len(crm.reasons)
    assert summary["lookups"] > 0 and summary["not_reached"] == 0
