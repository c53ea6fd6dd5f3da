from __future__ import annotations

from conftest import task_result


def test_task_example_adds_both_rows(run_dag, mews_conn, mews_sandbox):
    dr = run_dag("mews_loyalty_from_task")
    assert dr.state == "success"
    summary = task_result(dr, "add_memberships")
    assert summary["added"] == 2 and summary["rows_read"] == 2
    stored = mews_sandbox.memberships()
    assert sorted(m["Code"] for m in stored) == ["MBR-2026-0001", "MBR-2026-0002"]
    assert {m["State"] for m in stored} == {"Enrolled", "Pending"}


def test_crm_example_adds_members_named_by_email_and_codes(
    run_dag, mews_conn, mews_sandbox, tmp_path, monkeypatch
):
    import json
    import sqlite3

    guests = mews_sandbox.add_customers(
        4, shared_emails=1, mixed_case=True
    )  # guest 4 is a 2nd profile of guest 1
    gold = mews_sandbox.add_loyalty_program("GOLDCLUB", tiers=["BASE", "GOLD"])
    db = tmp_path / "crm.db"
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_CRM", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE crm_members (member_id, email, programme_code, tier_code, card_no, points)"
        )
        conn.executemany(
            "INSERT INTO crm_members VALUES (?, ?, ?, ?, ?, ?)",
            [
                (1, " Guest2@example.com", "GOLDCLUB", "GOLD", "C-1", 10),
                (2, "guest3@example.com", "GOLDCLUB", "BASE", "C-2", 20),
                (3, "guest1@example.com", "GOLDCLUB", "GOLD", "C-3", 30),  # two profiles: rejected
                (4, "nobody@example.com", "GOLDCLUB", "GOLD", "C-4", 40),  # no profile: rejected
            ],
        )
    dr = run_dag("mews_loyalty_from_crm")
    assert dr.state == "success"
    summary = task_result(dr, "add_members")
    assert (summary["added"], summary["rejected"]) == (2, 2) and summary["lookups"] == 3
    assert {(m["AccountId"], m["LoyaltyTierId"]) for m in mews_sandbox.memberships()} == {
        (guests[1], gold.tiers["GOLD"]),
        (guests[2], gold.tiers["BASE"]),
    }
    with sqlite3.connect(db) as conn:
        reasons = dict(conn.execute("SELECT source_row, reason FROM mews_crm_rejections").fetchall())
    assert "2 Mews customers have e-mail 'guest1@example.com'" in reasons[3]
    assert "no Mews customer with e-mail 'nobody@example.com'" in reasons[4]
