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
