"""Sync modes end to end: real Airflow (dag.test()), real HTTP to the sandbox, real SQLite.

The upsert and the mirror are checked on what Mews ends up holding and on the sandbox's
request log: which write requests were sent and which fields each update carried.
"""

from __future__ import annotations

import json
import sqlite3
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import task_result

from airflow_provider_mews.testing import MewsSandbox

PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
OTHER = "0b7a2c55-3f5e-4bfa-8d7c-1a1f0e6c9d42"
TIERS = ["a1b2c3d4-0000-4000-8000-000000000001", "a1b2c3d4-0000-4000-8000-000000000002"]
ADD, UPDATE, DELETE = (f"loyaltyMemberships/{op}" for op in ("add", "update", "delete"))
WRITES = (ADD, UPDATE, DELETE)
COLUMNS = (
    "member_id",
    "account_id",
    "loyalty_program_id",
    "is_primary",
    "state",
    "membership_number",
    "points",
    "loyalty_tier_id",
)
HEADER = """
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_mews.operators.loyalty_memberships import (
    LoyaltyMembershipAddOperator,
    LoyaltyMembershipSyncOperator,
)

START = pendulum.datetime(2026, 1, 1, tz="UTC")
"""


@pytest.fixture
def sqlite_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "warehouse.db"
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_TEST_DB", json.dumps({"conn_type": "sqlite", "host": str(path)}))
    return path


def seed(sandbox: MewsSandbox, count: int, program: str = PROGRAM) -> list[dict[str, Any]]:
    """``count`` memberships stored in the sandbox directly (not through the API: not in its log)."""
    stored: list[dict[str, Any]] = []
    for start in range(0, count, 1000):
        items = [
            {
                "AccountId": str(uuid.uuid4()), "LoyaltyProgramId": program, "IsPrimary": True,
                "Code": f"M-{program[:4]}-{n}", "Points": n, "LoyaltyTierId": TIERS[n % 2],
            }
            for n in range(start, min(count, start + 1000))
        ]  # fmt: skip
        created, _ = sandbox.add({"LoyaltyMemberships": items})
        sandbox.state.store(created)
        stored += created
    return stored


def as_row(n: int, m: dict[str, Any]) -> tuple[Any, ...]:
    return (
        n,
        m["AccountId"],
        m["LoyaltyProgramId"],
        1,
        m["State"],
        m["MembershipNumber"],
        m["Points"],
        m["LoyaltyTierId"],
    )


def write_table(db: Path, rows: list[tuple[Any, ...]]) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TABLE members ({', '.join(COLUMNS)})")
        conn.executemany(f"INSERT INTO members VALUES ({', '.join('?' * len(COLUMNS))})", rows)


def read(db: Path, query: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query).fetchall()


def writes(sandbox: MewsSandbox) -> list[dict[str, Any]]:
    return [e for e in sandbox.request_log() if e["operation"] in WRITES]


def run(run_dag: Any, dag_id: str, operator: str, **kwargs: Any) -> Any:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    source = HEADER + textwrap.dedent(f"""
        with DAG(dag_id={dag_id!r}, schedule=None, start_date=START, catchup=False):
            {operator}(task_id="sync", sql_conn_id="mews_test_db", sql="SELECT * FROM members ORDER BY member_id",
                       retries=0, {args})
    """)
    return run_dag(dag_id, source)


def test_upsert_20000_rows_adds_updates_only_changed_fields_and_skips_unchanged(
    run_dag, mews_conn, mews_sandbox, sqlite_db
):
    existing = seed(mews_sandbox, 15_000)
    rows: list[tuple[Any, ...]] = []
    expected: dict[str, dict[str, Any]] = {}  # membership Id -> the update values it must get
    for n, m in enumerate(existing):
        row = list(as_row(n, m))
        if n >= 10_000:  # 5 000 changed in one to three fields
            kind = n % 3
            changes: dict[str, Any] = {"Points": {"Value": m["Points"] + 1}}
            row[6] = m["Points"] + 1
            if kind >= 1:
                row[7] = None  # NULL clears the tier
                changes["LoyaltyTierId"] = {"Value": None}
            if kind == 2:
                row[4] = "Pending"
                changes["State"] = {"Value": "Pending"}
            expected[m["Id"]] = changes
        rows.append(tuple(row))
    new_accounts = [str(uuid.uuid4()) for _ in range(5_000)]
    rows += [(15_000 + i, a, PROGRAM, 0, "New", f"NEW-{i}", 5, None) for i, a in enumerate(new_accounts)]
    write_table(sqlite_db, rows)

    dr = run(
        run_dag, "t_sync_upsert", "LoyaltyMembershipAddOperator", if_exists="update", results_table="results"
    )
    assert dr.state == "success"
    summary = task_result(dr, "sync")
    assert (summary["added"], summary["updated"], summary["unchanged"], summary["rejected"]) == (
        5_000,
        5_000,
        10_000,
        0,
    )
    assert summary["rows_read"] == summary["rows_total"] == 20_000 and summary["not_reached"] == 0

    log = writes(mews_sandbox)
    sent = {
        u["LoyaltyMembershipId"]: {k: v for k, v in u.items() if k != "LoyaltyMembershipId"}
        for e in log
        if e["operation"] == UPDATE
        for u in e["LoyaltyMembershipUpdates"]
    }
    assert sent == expected  # exactly the changed fields, nothing for the unchanged rows
    # Batches of 999 (an upsert at the default batch_size): rows 0-9989 (batches 1-10) unchanged,
    # no write; the changed rows 10 000-14 999 fall in batches 11-16, the new ones in 16-21.
    assert sorted(e["operation"] for e in log) == [ADD] * 6 + [UPDATE] * 6
    stored = {m["Id"]: m for m in mews_sandbox.memberships()}
    assert len(stored) == 20_000 and {m["AccountId"] for m in stored.values()} >= set(new_accounts)
    assert all(stored[i]["LoyaltyTierId"] is None for i, c in expected.items() if "LoyaltyTierId" in c)
    outcomes = dict(read(sqlite_db, "SELECT outcome, COUNT(*) FROM results GROUP BY outcome"))
    assert outcomes == {"added": 5_000, "updated": 5_000, "unchanged": 10_000}
    fields = dict(
        read(sqlite_db, "SELECT mews_membership_id, changed_fields FROM results WHERE outcome = 'updated'")
    )
    assert {i: set(f.split(",")) for i, f in fields.items()} == {i: set(c) for i, c in expected.items()}


def test_an_upsert_batch_whose_memberships_all_exist_costs_one_getall(
    run_dag, mews_conn, mews_sandbox, sqlite_db
):
    """3 000 rows, every membership in Mews, 300 changed: batches of 999 rows, so the lookup's page
    of 1000 is never full and one getAll answers each batch (a batch of 1000 costs two: its full
    page needs a second read to learn it was the last). Nothing is read twice, nothing added."""
    existing = seed(mews_sandbox, 3_000)
    rows = [as_row(n, m) for n, m in enumerate(existing)]
    rows = [(*r[:6], r[6] + 1, r[7]) if n % 10 == 0 else r for n, r in enumerate(rows)]
    write_table(sqlite_db, rows)

    dr = run(run_dag, "t_sync_one_read", "LoyaltyMembershipAddOperator", if_exists="update")
    assert dr.state == "success"
    summary = task_result(dr, "sync")
    assert (summary["added"], summary["updated"], summary["unchanged"]) == (0, 300, 2_700)
    reads = mews_sandbox.request_log("loyaltyMemberships/getAll")
    # One per batch; batches are in flight together, so their reads arrive in any order.
    assert sorted(e["filters"]["AccountIds"] for e in reads) == [3, 999, 999, 999]
    assert (
        len(mews_sandbox.request_log(UPDATE)) == 3 and mews_sandbox.request_log(ADD) == []
    )  # 300 changed: batches 1-3


def mirror_source(sandbox: MewsSandbox, db: Path, keep: int, total: int = 10_000) -> list[dict[str, Any]]:
    scope = seed(sandbox, total)
    seed(sandbox, 50, program=OTHER)  # outside the scope: never touched
    write_table(db, [as_row(n, m) for n, m in enumerate(scope[:keep])])
    return scope


@pytest.mark.parametrize("on_missing", ["cancel", "delete"])
def test_mirror_removes_the_300_memberships_the_source_lost(
    run_dag, mews_conn, mews_sandbox, sqlite_db, on_missing
):
    scope = mirror_source(mews_sandbox, sqlite_db, keep=9_700)
    gone = {m["Id"] for m in scope[9_700:]}
    dr = run(
        run_dag,
        f"t_sync_mirror_{on_missing}",
        "LoyaltyMembershipSyncOperator",
        loyalty_program_ids=[PROGRAM],
        on_missing=on_missing,
        results_table="results",
    )
    assert dr.state == "success"
    summary = task_result(dr, "sync")
    outcome = "canceled" if on_missing == "cancel" else "deleted"
    assert summary[outcome] == 300 and summary["unchanged"] == 9_700 and summary["planned_removals"] == 300
    assert summary["scope_memberships"] == 10_000
    log = writes(mews_sandbox)
    if on_missing == "cancel":
        assert [e["operation"] for e in log] == [UPDATE]
        assert {u["LoyaltyMembershipId"]: u["State"] for u in log[0]["LoyaltyMembershipUpdates"]} == {
            i: {"Value": "Canceled"} for i in gone
        }
    else:
        assert [e["operation"] for e in log] == [DELETE] and set(log[0]["LoyaltyMembershipIds"]) == gone
    stored = {m["Id"]: m for m in mews_sandbox.memberships()}
    changed = {i for i, m in stored.items() if m["State"] == "Canceled" or m["ActivityState"] == "Deleted"}
    assert changed == gone
    assert set(
        read(
            sqlite_db,
            f"SELECT mews_membership_id FROM results WHERE outcome = '{outcome}' AND source_row IS NULL",
        )
    ) == {(i,) for i in gone}


@pytest.mark.parametrize("on_missing", ["cancel", "delete"])
def test_a_mirror_keeps_the_membership_of_a_row_it_rejected(
    run_dag, mews_conn, mews_sandbox, sqlite_db, on_missing
):
    """A bad cell (Points 12.5, an IsPrimary of "maybe") or an ambiguous match (two memberships of
    one account and programme) rejects the row; the member is still in the source, so the mirror
    must not cancel or delete it. Only what no row names is removed."""
    scope = mirror_source(mews_sandbox, sqlite_db, keep=20, total=22)
    with sqlite3.connect(sqlite_db) as conn:
        conn.execute("UPDATE members SET points = '12.5' WHERE member_id = 3")
        conn.execute("UPDATE members SET is_primary = 'maybe' WHERE member_id = 11")
        conn.execute("UPDATE members SET membership_number = NULL WHERE member_id = 5")
    twin = {k: scope[5][k] for k in ("AccountId", "LoyaltyProgramId", "IsPrimary")}  # row 5 now means 2
    created, _ = mews_sandbox.add({"LoyaltyMemberships": [twin]})
    mews_sandbox.state.store(created)
    dr = run(
        run_dag,
        f"t_sync_mirror_keeps_rejected_{on_missing}",
        "LoyaltyMembershipSyncOperator",
        loyalty_program_ids=[PROGRAM],
        on_missing=on_missing,
        max_rejected_rows=3,
        max_removals=5,
    )
    assert dr.state == "success"
    summary = task_result(dr, "sync")
    outcome = "canceled" if on_missing == "cancel" else "deleted"
    assert summary["rejected"] == 3 and summary["unchanged"] == 17
    assert summary[outcome] == 2 == summary["planned_removals"]
    stored = {m["Id"]: m for m in mews_sandbox.memberships()}
    removed = {i for i, m in stored.items() if m["State"] == "Canceled" or m["ActivityState"] == "Deleted"}
    assert removed == {m["Id"] for m in scope[20:]}  # the two the source lost, not those of rows 3, 5, 11


def test_mirror_that_would_remove_20_percent_is_refused_before_any_write(
    run_dag, mews_conn, mews_sandbox, sqlite_db
):
    mirror_source(mews_sandbox, sqlite_db, keep=8_000)
    with sqlite3.connect(sqlite_db) as conn:  # a changed row too: it must not be updated either
        conn.execute("UPDATE members SET points = 999999 WHERE member_id = 0")
    dr = run(
        run_dag,
        "t_sync_refused",
        "LoyaltyMembershipSyncOperator",
        loyalty_program_ids=[PROGRAM],
        on_missing="delete",
    )
    assert dr.state == "failed"
    assert writes(mews_sandbox) == []
    summary = task_result(dr, "sync", key="mews_summary")
    assert "delete 2000 memberships (20.0% of 10000)" in summary["refused"] and "(500)" in summary["refused"]
    assert summary["added"] == summary["updated"] == summary["deleted"] == 0


def test_dry_run_sends_no_write_and_writes_the_plan(run_dag, mews_conn, mews_sandbox, sqlite_db):
    scope = mirror_source(mews_sandbox, sqlite_db, keep=990, total=1_000)
    with sqlite3.connect(sqlite_db) as conn:
        conn.execute("UPDATE members SET points = 999999 WHERE member_id = 0")
        conn.execute(
            f"INSERT INTO members VALUES (5000, '{uuid.uuid4()}', '{PROGRAM}', 1, 'New', 'X-1', 1, NULL)"
        )
        conn.execute(
            f"INSERT INTO members VALUES (5001, '{uuid.uuid4()}', '{OTHER}', 1, 'New', 'X-2', 1, NULL)"
        )
    dr = run(
        run_dag,
        "t_sync_dry",
        "LoyaltyMembershipSyncOperator",
        loyalty_program_ids=[PROGRAM],
        dry_run=True,
        max_rejected_rows=1,
        max_removals=5,
        results_table="results",
        rejections_table="rejections",
    )
    assert dr.state == "success"  # a dry run reports a refusal instead of failing
    assert writes(mews_sandbox) == []
    summary = task_result(dr, "sync")
    assert summary["dry_run"] is True and "cancel 10 memberships" in summary["refused"]
    assert (
        summary["added"],
        summary["updated"],
        summary["unchanged"],
        summary["rejected"],
        summary["canceled"],
    ) == (1, 1, 989, 1, 10)
    plan = dict(read(sqlite_db, "SELECT outcome, COUNT(*) FROM results GROUP BY outcome"))
    # Written as a plan: no reader of the table can take it for changes Mews holds.
    assert plan == {
        "planned_added": 1,
        "planned_updated": 1,
        "planned_unchanged": 989,
        "planned_canceled": 10,
    }
    assert read(sqlite_db, "SELECT changed_fields FROM results WHERE outcome = 'planned_updated'") == [
        ("Points",)
    ]
    [(reason,)] = read(sqlite_db, "SELECT reason FROM rejections")
    assert "outside loyalty_program_ids" in reason
    assert {m["State"] for m in mews_sandbox.memberships()} == {"Enrolled"} and len(scope) == 1_000


def test_example_mirror_dag_follows_the_table(run_dag, mews_conn, mews_sandbox, tmp_path, monkeypatch):
    from airflow_provider_mews.testing import sample_data

    db = tmp_path / "demo.db"
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEMO_SQLITE", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    sample_data.write_sqlite(str(db), 200)
    first = run_dag("mews_loyalty_sync")
    assert first.state == "success"
    assert task_result(first, "mirror_programme")["added"] == 200
    with sqlite3.connect(db) as conn:  # five members left the programme, one earned points
        conn.execute("DELETE FROM loyalty_members WHERE member_id <= 5")
        conn.execute("UPDATE loyalty_members SET points = points + 1 WHERE member_id = 6")
    second = run_dag("mews_loyalty_sync")
    assert second.state == "success"
    summary = task_result(second, "mirror_programme")
    assert (summary["added"], summary["updated"], summary["unchanged"], summary["canceled"]) == (0, 1, 194, 5)
    assert sum(m["State"] == "Canceled" for m in mews_sandbox.memberships()) == 5
