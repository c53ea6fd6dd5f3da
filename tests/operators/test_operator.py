"""LoyaltyMembershipAddOperator end to end: real Airflow (dag.test()), real HTTP to the sandbox, real SQLite.

Each test writes its DAG into the session dags folder and runs it with ``run_dag``; what
Mews ends up holding is read from the sandbox, what the operator reports from its XComs and
from the tables/files it writes. Faults and refusals are switched on in the sandbox, never
by mocking the operator or ``requests``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import DAGS_DIR, task_result

from airflow_provider_mews.loyalty.normalize import RowRejected, normalize, plan_columns
from airflow_provider_mews.testing import connection_json, sample_data

PROGRAM = sample_data.PROGRAM_ID
HEADER = """
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

FAST = dict(retry_delay=timedelta(seconds=0), retry_exponential_backoff=False)
START = pendulum.datetime(2026, 1, 1, tz="UTC")
"""


def dag_file(body: str) -> str:
    return HEADER + textwrap.dedent(body)


def counts_add_up(summary: dict) -> bool:
    """The summary's invariant when the source's size is known (see ``progress.py``)."""
    return (
        summary["rows_read"]
        <= summary["rows_total"]
        == (summary["added"] + summary["skipped_existing"] + summary["rejected"] + summary["not_reached"])
    )


def account_counts(sandbox) -> Counter:
    return Counter(m["AccountId"] for m in sandbox.memberships())


@pytest.fixture
def sqlite_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SQLite file behind the Airflow connection ``mews_test_db`` (conn_type sqlite, host = path)."""
    path = tmp_path / "warehouse.db"
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_TEST_DB", json.dumps({"conn_type": "sqlite", "host": str(path)}))
    return path


def source_accounts(db: Path, table: str = "loyalty_members") -> dict[int, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute(f"SELECT member_id, account_id FROM {table}"))


def valid_rows(count: int, invalid: int, seed: int = 7) -> dict[int, str]:
    """member_id -> AccountId of the rows of ``sample_data.members`` that normalize."""
    plan = plan_columns(sample_data.COLUMNS, {"tier_id": "LoyaltyTierId"})
    out = {}
    for row in sample_data.members(count, invalid, seed):
        with contextlib.suppress(RowRejected):
            out[row[0]] = normalize(plan, row)["AccountId"]
    return out


def read_table(db: Path, table: str) -> list[dict]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]


# -- sources: XCom, a Jinja template, a table, a query --

XCOM_ROWS = [
    {  # every kind of value the normalization accepts, under source names
        "Member_UUID": "FADD5BB6-B428-45D5-94F8-FD0D89FECE6D", "loyalty_program_id": PROGRAM,
        "is_primary": "yes", "MembershipNumber": "MBR-1", "points": "120",
        "expiration_date": "2029-12-24T23:30:00-05:00", "STATE": "enrolled",
        "url": "https://rewards.example.com/m/1", "email": "a@example.com",
    },
    {
        "Member_UUID": "0b9f2a4e-0d7c-4c55-9f49-2b0f6c1c8a11", "loyalty_program_id": PROGRAM, "is_primary": 0,
        "MembershipNumber": None, "points": None, "expiration_date": "", "STATE": "PENDING", "url": None,
        "email": "b@example.com",
    },
    {  # rejected locally: Points is not a whole number
        "Member_UUID": "1c0e7c64-3b1e-4b0a-9d55-0c1f6f4b8e01", "loyalty_program_id": PROGRAM,
        "is_primary": True, "points": "12.5", "email": "c@example.com",
    },
    {  # rejected locally: no AccountId
        "Member_UUID": None, "loyalty_program_id": PROGRAM, "is_primary": True, "email": "d@example.com",
    },
    {
        "Member_UUID": "2d1f8d75-4c2f-4c1b-8e66-1d2a7a5c9f12", "loyalty_program_id": PROGRAM,
        "is_primary": "true", "points": 7, "expiration_date": "2030-01-31", "email": "e@example.com",
    },
]  # fmt: skip
TEMPLATED_ROWS = [
    {"account_id": "3e2a9e86-5d3a-4d2c-9f77-2e3b8b6d0a23", "loyalty_program_id": PROGRAM, "is_primary": "no"},
    {"account_id": "4f3b0f97-6e4b-4e3d-8a88-3f4c9c7e1b34", "loyalty_program_id": PROGRAM, "is_primary": 1},
]


def test_rows_from_an_upstream_task_and_from_a_template(run_dag, mews_conn, mews_sandbox, tmp_path, capfd):
    results, rejections = tmp_path / "out" / "results.jsonl", tmp_path / "out" / "rejections.jsonl"
    source = dag_file(f"""
        with DAG(dag_id="t_op_xcom", schedule=None, start_date=START, catchup=False,
                 params={{"members": {TEMPLATED_ROWS!r}}}):
            @task
            def produce():
                return {XCOM_ROWS!r}

            LoyaltyMembershipAddOperator(
                task_id="add_from_task", memberships=produce(), field_map={{"Member_UUID": "AccountId"}},
                max_rejected_rows=2, results_file={str(results)!r}, rejections_file={str(rejections)!r},
                retries=0,
            )
            LoyaltyMembershipAddOperator(
                task_id="add_templated", memberships="{{{{ params.members | tojson }}}}", retries=0,
            )
    """)
    dr = run_dag("t_op_xcom", source)
    log = capfd.readouterr().out
    assert dr.state == "success", log[-5000:]

    # What Mews holds: exactly the 3 + 2 valid rows, normalized, without the ignored column.
    stored = {m["AccountId"]: m for m in mews_sandbox.memberships()}
    assert sorted(stored) == sorted(
        [
            "fadd5bb6-b428-45d5-94f8-fd0d89fece6d",
            "0b9f2a4e-0d7c-4c55-9f49-2b0f6c1c8a11",
            "2d1f8d75-4c2f-4c1b-8e66-1d2a7a5c9f12",
            *(r["account_id"] for r in TEMPLATED_ROWS),
        ]
    )
    first = stored["fadd5bb6-b428-45d5-94f8-fd0d89fece6d"]
    assert (first["IsPrimary"], first["Code"], first["Points"], first["State"]) == (
        True,
        "MBR-1",
        120,
        "Enrolled",
    )
    assert first["ExpirationDate"].startswith("2029-12-25")  # 23:30 at -05:00 is the 25th in UTC
    assert first["Url"] == "https://rewards.example.com/m/1"
    second = stored["0b9f2a4e-0d7c-4c55-9f49-2b0f6c1c8a11"]
    assert (second["IsPrimary"], second["State"], second["Points"]) == (False, "Pending", None)
    assert stored["3e2a9e86-5d3a-4d2c-9f77-2e3b8b6d0a23"]["IsPrimary"] is False

    # One warning names the unmapped column; it was never sent (the sandbox refuses unknown fields).
    warnings = [line for line in log.splitlines() if "match no Mews field" in line]
    assert len(warnings) == 1 and "email" in warnings[0], warnings

    summary = task_result(dr, "add_from_task")
    assert summary == task_result(dr, "add_from_task", key="mews_summary")
    assert {k: summary[k] for k in ("rows_read", "added", "skipped_existing", "rejected", "not_reached")} == {
        "rows_read": 5, "added": 3, "skipped_existing": 0, "rejected": 2, "not_reached": 0,
    }  # fmt: skip
    assert summary["rejection_reasons"] == {"invalid Points": 1, "invalid AccountId": 1}
    assert {r["source_row"]: r["field"] for r in summary["rejected_sample"]} == {3: "Points", 4: "AccountId"}
    assert summary["requests"] >= 2 and summary["duration_s"] >= 0
    templated = task_result(dr, "add_templated")
    assert (templated["rows_read"], templated["added"]) == (2, 2)

    # Every added row paired with its Mews Id; every rejected row with its reason and the row itself.
    added = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted((r["source_row"], r["mews_membership_id"]) for r in added) == sorted(
        (row, stored[acc]["Id"])
        for row, acc in (
            (1, "fadd5bb6-b428-45d5-94f8-fd0d89fece6d"),
            (2, "0b9f2a4e-0d7c-4c55-9f49-2b0f6c1c8a11"),
            (5, "2d1f8d75-4c2f-4c1b-8e66-1d2a7a5c9f12"),
        )
    )
    assert {r["outcome"] for r in added} == {"added"} and {r["task_id"] for r in added} == {"add_from_task"}
    rejected = {r["source_row"]: r for r in map(json.loads, rejections.read_text().splitlines())}
    assert set(rejected) == {3, 4}
    assert "row 3 (AccountId 1c0e7c64-3b1e-4b0a-9d55-0c1f6f4b8e01): Points:" in rejected[3]["reason"]
    assert rejected[4]["reason"].startswith("row 4: AccountId: is required")
    assert json.loads(rejected[3]["row_json"])["email"] == "c@example.com"


def test_rows_from_a_sqlite_table_and_a_query_written_back(run_dag, mews_conn, mews_sandbox, sqlite_db):
    sample_data.write_sqlite(str(sqlite_db), 300, invalid=6, table="members_a", seed=1)
    sample_data.write_sqlite(str(sqlite_db), 300, invalid=6, table="members_b", seed=2)
    source = dag_file("""
        with DAG(dag_id="t_op_sqlite", schedule=None, start_date=START, catchup=False,
                 params={"table": "members_b", "last": 150}):
            LoyaltyMembershipAddOperator(
                task_id="from_table", sql_conn_id="mews_test_db", table="members_a",
                field_map={"tier_id": "LoyaltyTierId"}, batch_size=40, max_rejected_rows=6,
                results_table="mews_results", rejections_table="mews_rejections", retries=0,
            )
            LoyaltyMembershipAddOperator(
                task_id="from_query", sql_conn_id="mews_test_db",
                sql="SELECT * FROM {{ params.table }} WHERE member_id <= {{ params.last }} "
                "ORDER BY member_id",
                field_map={"tier_id": "LoyaltyTierId"}, batch_size=40, max_rejected_rows=6,
                results_table="mews_results", rejections_table="mews_rejections", retries=0,
            )
    """)
    dr = run_dag("t_op_sqlite", source)
    assert dr.state == "success"

    a, b = source_accounts(sqlite_db, "members_a"), source_accounts(sqlite_db, "members_b")
    good_a, good_b = valid_rows(300, 6, seed=1), valid_rows(300, 6, seed=2)
    stored = account_counts(mews_sandbox)
    assert max(stored.values()) == 1
    assert set(stored) == set(good_a.values()) | {acc for row, acc in good_b.items() if row <= 150}

    table_summary, query_summary = task_result(dr, "from_table"), task_result(dr, "from_query")
    assert (table_summary["rows_read"], table_summary["added"], table_summary["rejected"]) == (300, 294, 6)
    assert query_summary["rows_read"] == 150 and counts_add_up(query_summary)
    assert (query_summary["added"], query_summary["rejected"]) == (147, 3)  # rows 26, 76 and 126 are bad

    # Results: every added row with its Mews Id, keyed by task; source_row is the position (= member_id).
    by_id = {m["Id"]: m for m in mews_sandbox.memberships()}
    results = read_table(sqlite_db, "mews_results")
    assert len(results) == 294 + query_summary["added"]
    for r in results:
        source_rows = a if r["task_id"] == "from_table" else b
        assert r["outcome"] == "added" and r["dag_id"] == "t_op_sqlite" and r["run_id"] == dr.run_id
        assert by_id[r["mews_membership_id"]]["AccountId"] == source_rows[r["source_row"]] == r["account_id"]
    assert {r["source_row"] for r in results if r["task_id"] == "from_table"} == set(good_a)
    # Rejections: each with the field, a reason naming the row, and the source row as JSON.
    rejections = [r for r in read_table(sqlite_db, "mews_rejections") if r["task_id"] == "from_table"]
    assert len(rejections) == 6
    assert {r["field"] for r in rejections} == {
        "AccountId",
        "IsPrimary",
        "Points",
        "ExpirationDate",
        "Url",
        "State",
    }
    for r in rejections:
        assert r["reason"].startswith(f"row {r['source_row']}")
        assert json.loads(r["row_json"])["member_id"] == r["source_row"]


# -- refused rows and the rejection budget --


def test_a_refused_batch_keeps_its_997_good_rows(run_dag, mews_conn, mews_sandbox, sqlite_db):
    sample_data.write_sqlite(str(sqlite_db), 1000)
    accounts = source_accounts(sqlite_db)
    forbidden = {accounts[17], accounts[500], accounts[999]}
    mews_sandbox.configure(forbidden_accounts=forbidden)
    source = dag_file("""
        with DAG(dag_id="t_op_refused", schedule=None, start_date=START, catchup=False):
            LoyaltyMembershipAddOperator(
                task_id="add", sql_conn_id="mews_test_db", table="loyalty_members", max_rejected_rows=3,
                rejections_table="mews_rejections", results_table="mews_results", retries=0,
            )
    """)
    dr = run_dag("t_op_refused", source)
    assert dr.state == "success"
    summary = task_result(dr, "add")
    assert (summary["added"], summary["rejected"], summary["rows_read"]) == (997, 3, 1000)
    stored = account_counts(mews_sandbox)
    assert set(stored) == set(accounts.values()) - forbidden and max(stored.values()) == 1
    # Isolating 3 rows among 1000 takes a few dozen requests, not one per row.
    assert summary["requests"] < 80

    rejections = read_table(sqlite_db, "mews_rejections")
    assert {r["source_row"] for r in rejections} == {17, 500, 999}
    for r in rejections:
        assert r["account_id"] in forbidden
        assert "HTTP 403" in r["reason"] and "cannot be enrolled in the loyalty program" in r["reason"]
        assert r["request_id"] and len(r["request_id"]) == 36  # Mews's RequestId, for its support
    assert len(read_table(sqlite_db, "mews_results")) == 997
    assert all(s["request_id"] for s in summary["rejected_sample"])


def test_isolating_refused_rows_stops_once_the_budget_is_spent(
    run_dag, mews_conn, mews_sandbox, sqlite_db, capfd
):
    sample_data.write_sqlite(str(sqlite_db), 1000)
    accounts = source_accounts(sqlite_db)
    mews_sandbox.configure(forbidden_accounts={accounts[row] for row in range(5, 1001, 10)})  # 100 bad rows
    source = dag_file("""
        with DAG(dag_id="t_op_refused_many", schedule=None, start_date=START, catchup=False):
            LoyaltyMembershipAddOperator(
                task_id="add", sql_conn_id="mews_test_db", table="loyalty_members", max_rejected_rows=5,
                if_exists="add", retries=0,
            )
    """)
    dr = run_dag("t_op_refused_many", source)
    assert dr.state == "failed"
    summary = task_result(dr, "add", key="mews_summary")
    assert summary["rejected"] == 6 and counts_add_up(summary)
    assert sum(account_counts(mews_sandbox).values()) == summary["added"]
    # Isolating all 100 would take hundreds of requests; stopping at the 6th takes a few dozen.
    assert summary["requests"] < 60
    # The task's error names the first refused rows with Mews's message and RequestId.
    message = next(
        line for line in capfd.readouterr().out.splitlines() if "more than max_rejected_rows" in line
    )
    first = summary["rejected_sample"][0]
    assert "6 rows rejected" in message and f"First: row {first['source_row']} " in message
    assert f"(RequestId {first['request_id']})" in message and "cannot be enrolled" in message


def test_more_rejections_than_allowed_fail_the_task_after_reporting(
    run_dag, mews_conn, mews_sandbox, sqlite_db, tmp_path, capfd
):
    sample_data.write_sqlite(str(sqlite_db), 2000, invalid=10)  # bad rows 101, 301, 501, 701, ...
    rejections = tmp_path / "rejections.jsonl"
    source = dag_file(f"""
        with DAG(dag_id="t_op_budget", schedule=None, start_date=START, catchup=False):
            LoyaltyMembershipAddOperator(
                task_id="add", sql_conn_id="mews_test_db", table="loyalty_members", batch_size=100,
                max_rejected_rows=3, rejections_file={str(rejections)!r}, retries=2, **FAST,
            )
    """)
    dr = run_dag("t_op_budget", source)
    log = capfd.readouterr().out
    assert dr.state == "failed"
    ti = dr.get_task_instance("add")
    assert ti.state == "failed" and ti.try_number == 1  # too many bad rows: no retry can fix that

    summary = task_result(dr, "add", key="mews_summary")
    assert summary["rows_total"] == 2000 and counts_add_up(summary)
    assert summary["rejected"] == 4  # stopped at the 4th bad row, in batch 8 of 20
    assert summary["rows_read"] == 800  # ... and read no further: the database counted the rest
    assert summary["not_reached"] >= 1200  # the rest of the table was never sent
    assert sum(account_counts(mews_sandbox).values()) == summary["added"] > 0
    assert len(rejections.read_text().splitlines()) == 4
    message = next(line for line in log.splitlines() if "more than max_rejected_rows" in line)
    assert "4 rows rejected, more than max_rejected_rows=3" in message
    assert "First: row 101 (AccountId not-a-uuid): AccountId: 'not-a-uuid' is not a UUID" in message
    assert "invalid AccountId" in message and f"Added {summary['added']}" in message


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('mews_conn_id="mews_nope", sql_conn_id="mews_test_db"', "mews_conn_id='mews_nope' names no Airflow connection"),
        ('sql_conn_id="nope_db"', "sql_conn_id='nope_db' names no Airflow connection"),
        ('sql_conn_id="mews_test_db", output_conn_id="nope_out", results_table="r"',
         "output_conn_id='nope_out' names no Airflow connection"),
        ('sql_conn_id="mews_default"', "sql_conn_id='mews_default' is a connection of type 'mews', not a database one"),
        ('sql_conn_id="mews_test_db", rejections_file=RESULTS_DIR', "cannot be opened for appending (File exists): name a file in a folder the worker can write"),
    ],
    ids=["mews_conn_id", "sql_conn_id", "output_conn_id", "not_a_database", "rejections_file"],
)  # fmt: skip
def test_a_wrong_connection_or_output_path_fails_once_naming_the_setting(
    run_dag, mews_conn, mews_sandbox, sqlite_db, tmp_path, capfd, arguments, expected
):
    sample_data.write_sqlite(str(sqlite_db), 10)
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a file where the output's folder should be
    source = dag_file(f"""
        RESULTS_DIR = {str(blocker / "rejections.jsonl")!r}
        with DAG(dag_id="t_op_misconfigured", schedule=None, start_date=START, catchup=False):
            LoyaltyMembershipAddOperator(task_id="add", table="loyalty_members", {arguments}, retries=2, **FAST)
    """)
    dr = run_dag("t_op_misconfigured", source)
    ti = dr.get_task_instance("add")
    assert ti.state == "failed" and ti.try_number == 1  # no retry can fix a setting
    log = capfd.readouterr().out
    assert expected in log, log[-3000:]
    assert mews_sandbox.stats()["stored"] == 0


# -- exactly once: retries, ambiguous failures, re-runs --


def test_a_retry_after_a_crash_resumes_without_duplicates_or_gaps(
    run_dag, mews_conn, mews_sandbox, sqlite_db, capfd
):
    sample_data.write_sqlite(str(sqlite_db), 1000)
    # Batch 3 is stored but its connection drops, and the getAll that would reconcile it
    # fails too: try 1 dies with batch 3 in Mews but not in its checkpoint.
    mews_sandbox.configure(
        fault_operations={"loyaltyMemberships/add", "loyaltyMemberships/getAll"},
        fault_script=["", "", "drop_after_store", "nolist200"],
    )
    source = dag_file("""
        with DAG(dag_id="t_op_retry", schedule=None, start_date=START, catchup=False):
            LoyaltyMembershipAddOperator(
                task_id="add", sql_conn_id="mews_test_db",
                sql="SELECT * FROM loyalty_members ORDER BY member_id",
                batch_size=100, if_exists="add", max_active_requests=1, results_table="mews_results",
                retries=2, **FAST,
            )
    """)
    dr = run_dag("t_op_retry", source)
    log = capfd.readouterr().out
    assert dr.state == "success", log[-5000:]
    ti = dr.get_task_instance("add")
    assert ti.try_number == 2
    assert mews_sandbox.stats()["fault:drop_after_store"] == 1

    accounts = source_accounts(sqlite_db)
    stored = account_counts(mews_sandbox)
    assert set(stored) == set(accounts.values())  # nothing missing
    assert max(stored.values()) == 1  # no duplicate
    summary = task_result(dr, "add")
    assert (summary["rows_read"], summary["added"], summary["not_reached"]) == (1000, 1000, 0)
    assert summary["resumed_batches"] == 2  # batches 1-2 were skipped without a request
    assert summary["reconciled"] == 100  # batch 3 was found in Mews, not sent again
    # The results table pairs every row with its Mews Id, across both tries.
    by_id = {m["Id"]: m["AccountId"] for m in mews_sandbox.memberships()}
    results = read_table(sqlite_db, "mews_results")
    assert sorted(r["source_row"] for r in results) == list(range(1, 1001))
    assert all(by_id[r["mews_membership_id"]] == accounts[r["source_row"]] for r in results)


def test_ambiguous_failures_inside_a_try_are_reconciled_exactly_once(
    run_dag, mews_conn, mews_sandbox, sqlite_db
):
    sample_data.write_sqlite(str(sqlite_db), 600)
    # Stored then dropped (must not be re-sent), a 500 (not stored: must be sent again),
    # dropped before storing (must be sent again).
    mews_sandbox.configure(
        fault_script=["drop_after_store", "500", "", "drop_before_store", "drop_after_store"]
    )
    source = dag_file("""
        with DAG(dag_id="t_op_ambiguous", schedule=None, start_date=START, catchup=False):
            LoyaltyMembershipAddOperator(
                task_id="add", sql_conn_id="mews_test_db", table="loyalty_members", batch_size=100,
                retries=0,
            )
    """)
    dr = run_dag("t_op_ambiguous", source)
    assert dr.state == "success"
    stats = mews_sandbox.stats()
    assert (
        stats["fault:drop_after_store"] == 2
        and stats["fault:500"] == 1
        and stats["fault:drop_before_store"] == 1
    )
    stored = account_counts(mews_sandbox)
    assert set(stored) == set(source_accounts(sqlite_db).values()) and max(stored.values()) == 1
    summary = task_result(dr, "add")
    assert (summary["added"], summary["reconciled"], summary["rejected"]) == (600, 200, 0)
    assert stats["added"] == 600  # Mews stored each row once: nothing was sent twice


def test_if_exists_skip_adds_nothing_on_a_rerun_and_add_adds_again(run_dag, mews_conn, mews_sandbox):
    rows = [
        {"account_id": acc, "loyalty_program_id": PROGRAM, "is_primary": True}
        for acc in valid_rows(50, 0, seed=11).values()
    ]
    rows.append(dict(rows[0]))  # the same membership twice in one input, in batches 1 and 3
    template = """
        with DAG(dag_id="{dag_id}", schedule=None, start_date=START, catchup=False):
            LoyaltyMembershipAddOperator(
                task_id="add", memberships={rows!r}, if_exists="{mode}", batch_size=20, retries=0,
            )
    """
    skip = dag_file(template.format(dag_id="t_op_skip", rows=rows, mode="skip"))
    # Slow adds: batches 1 and 3 are in flight together, and getAll can't see the duplicate yet.
    mews_sandbox.configure(add_latency_s=20.0)
    first = run_dag("t_op_skip", skip)
    mews_sandbox.configure(add_latency_s=0.0)
    s1 = task_result(first, "add")
    assert (s1["added"], s1["skipped_existing"]) == (50, 1)
    assert sum(account_counts(mews_sandbox).values()) == 50

    second = run_dag("t_op_skip", skip)
    assert second.run_id != first.run_id
    s2 = task_result(second, "add")
    assert (s2["rows_read"], s2["added"], s2["skipped_existing"]) == (51, 0, 51)
    assert sum(account_counts(mews_sandbox).values()) == 50

    # if_exists="add" does not look: by design (and as documented) it adds them all again.
    third = run_dag("t_op_add", dag_file(template.format(dag_id="t_op_add", rows=rows, mode="add")))
    s3 = task_result(third, "add")
    assert (s3["added"], s3["skipped_existing"]) == (51, 0)
    counts = account_counts(mews_sandbox)
    assert sum(counts.values()) == 101 and counts[rows[0]["account_id"]] == 3


# -- memory --

SMALL, LARGE = 10_000, 100_000

MEMORY_SCRIPT = """
import json, resource, runpy

peaks = []
for dag_id in ("t_op_mem_small", "t_op_mem_large"):
    namespace = runpy.run_path(f"{dags}/{{dag_id}}.py", run_name=dag_id)
    dr = namespace["dag"].test()
    ti = dr.get_task_instance("add")
    summary = ti.xcom_pull(task_ids="add")
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    result = {{"dag_id": dag_id, "state": str(dr.state), "summary": summary, "peak_kib": peaks[-1]}}
    print("RESULT", json.dumps(result))
"""


def test_memory_stays_flat_as_the_table_grows(sqlite_db, tmp_path, airflow_db):
    """100 000 rows need about the memory of 10 000: the table is streamed, not loaded."""
    small, large = tmp_path / "small.db", sqlite_db
    sample_data.write_sqlite(str(small), SMALL)
    sample_data.write_sqlite(str(large), LARGE)
    # A sandbox process of its own, so what it stores does not count here; no rate limit in the way.
    port_file = tmp_path / "sandbox.out"
    sandbox = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_mews.testing.sandbox",
            "--port",
            "0",
            "--rate-limit",
            "100000/30",
        ],
        stdout=port_file.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        url = _wait_for_url(port_file, sandbox)
        for dag_id in ("t_op_mem_small", "t_op_mem_large"):
            conn = f"mews_{dag_id}"
            (DAGS_DIR / f"{dag_id}.py").write_text(
                dag_file(f"""
                with DAG(dag_id="{dag_id}", schedule=None, start_date=START, catchup=False) as dag:
                    LoyaltyMembershipAddOperator(
                        task_id="add", mews_conn_id="mews_mem", sql_conn_id="{conn}", table="loyalty_members",
                        if_exists="add", field_map={{"tier_id": "LoyaltyTierId"}}, retries=0,
                        results_table="mews_results", progress_interval_s=5,
                    )
                """)
            )
        env = {
            **os.environ,
            "AIRFLOW_CONN_MEWS_MEM": connection_json(url, rate_limit_requests=100000, rate_limit_period=30),
            "AIRFLOW_CONN_MEWS_T_OP_MEM_SMALL": json.dumps({"conn_type": "sqlite", "host": str(small)}),
            "AIRFLOW_CONN_MEWS_T_OP_MEM_LARGE": json.dumps({"conn_type": "sqlite", "host": str(large)}),
        }
        script = MEMORY_SCRIPT.format(dags=str(DAGS_DIR))
        proc = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        sandbox.terminate()
        sandbox.wait(10)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    small_run, large_run = results
    for run, rows in ((small_run, SMALL), (large_run, LARGE)):
        assert run["state"] == "success", proc.stdout[-3000:]
        assert (run["summary"]["rows_read"], run["summary"]["added"]) == (rows, rows)
        assert len(json.dumps(run["summary"])) < 5000  # the XCom stays small too
    growth_mib = (large_run["peak_kib"] - small_run["peak_kib"]) / 1024
    # Streaming: a few MiB. Loading the table (fetchall) would take about 80 MiB more here.
    assert growth_mib < 40, f"peak RSS grew by {growth_mib:.0f} MiB from {SMALL} to {LARGE} rows"
    with sqlite3.connect(large) as conn:
        assert conn.execute("SELECT count(*) FROM mews_results").fetchone()[0] == LARGE


def _wait_for_url(port_file: Path, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = port_file.read_text()
        if "listening on " in text:
            return text.split("listening on ", 1)[1].split()[0]
        assert proc.poll() is None, text
        time.sleep(0.1)
    raise AssertionError("the sandbox did not start")


def test_time_waited_in_the_client_limiter_is_reported(run_dag, mews_sandbox, monkeypatch, capfd):
    """A connection paced at 4 requests/s: 12 batches must wait in the limiter, and the summary
    and progress lines say how long (not only the 429 holds, of which there are none here)."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_PACED",
        connection_json(mews_sandbox.url, rate_limit_requests=4, rate_limit_period=1),
    )
    rows = [
        {
            "account_id": f"{i:08x}-0000-4000-8000-000000000000",
            "loyalty_program_id": PROGRAM,
            "is_primary": True,
        }
        for i in range(120)
    ]
    source = dag_file(f"""
        with DAG(dag_id="t_op_paced", schedule=None, start_date=START, catchup=False):
            LoyaltyMembershipAddOperator(
                task_id="add", mews_conn_id="mews_paced", memberships={rows!r}, batch_size=10,
                if_exists="add", progress_interval_s=0, retries=0,
            )
    """)
    dr = run_dag("t_op_paced", source)
    log = capfd.readouterr().out
    assert dr.state == "success", log[-5000:]
    summary = task_result(dr, "add")
    assert summary["added"] == 120 and summary["rate_limited"] == 0
    assert summary["limiter_wait_s"] > 0.5  # 12 requests at 4/s: about 2 s of pacing, summed over threads
    assert "s waited in the rate limiter" in log
