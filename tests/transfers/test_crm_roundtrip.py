"""The round-trip example (dags_examples/mews_crm_roundtrip.py) against the sandbox: the night's
export lands Mews's memberships in SQL, the SQL comparison finds the CRM members Mews lacks,
and the add operator adds exactly those."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone

from conftest import task_result

from airflow_provider_mews.testing import connection_json
from airflow_provider_mews.testing.sample_data import PROGRAM_ID, write_sqlite

CRM, IN_MEWS = 30, 20


def test_roundtrip_adds_the_crm_members_mews_lacks(run_dag, mews_sandbox, tmp_path, monkeypatch):
    db = tmp_path / "crm.db"
    write_sqlite(str(db), CRM, table="crm_members")
    with sqlite3.connect(db) as conn:
        accounts = [a for (a,) in conn.execute("SELECT account_id FROM crm_members ORDER BY member_id")]
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_CRM", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", connection_json(mews_sandbox.url))
    changed = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)  # inside the night's data interval
    mews_sandbox.seed_memberships(
        IN_MEWS, program_id=PROGRAM_ID, account_ids=accounts[:IN_MEWS], created_utc=changed
    )
    old = mews_sandbox.seed_memberships(
        1, program_id=PROGRAM_ID, created_utc=datetime(2025, 6, 1, tzinfo=timezone.utc)
    )

    dr = run_dag("mews_crm_roundtrip", logical_date=datetime(2026, 3, 2, 3, 0, tzinfo=timezone.utc))
    assert dr.state == "success"
    assert dr.data_interval_start <= changed < dr.data_interval_end
    exported = task_result(dr, "export_memberships")
    assert exported["records"] == IN_MEWS  # the night's changes only, not the one of 2025
    with sqlite3.connect(db) as conn:
        rows = conn.execute('SELECT "AccountId", "ActivityState" FROM mews_loyalty_memberships').fetchall()
    assert sorted(a for a, _ in rows) == sorted(accounts[:IN_MEWS])
    added = task_result(dr, "add_missing")
    assert added["added"] == CRM - IN_MEWS
    active = [m for m in mews_sandbox.memberships() if m["ActivityState"] == "Active"]
    by_account = sorted(m["AccountId"] for m in active if m["Id"] not in old)
    assert by_account == sorted(accounts)  # every CRM member once in Mews
