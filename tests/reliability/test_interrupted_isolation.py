"""Issue 21 item 4: every try makes progress, so repeated interruptions converge.

The issue's measurement, smaller: 6 000 rows in batches of 500, 4 rows Mews refuses (403, in
two batches), adds of 500 rows taking 0.8 s, the connection and the server both at 6 requests
per 2 s, ``execution_timeout=12 s``, ``retries=6``. Isolating two refused rows in a batch of
500 by halving is a chain of about 2 x 2 x 9 sequential requests, longer than a try: before,
each try was stopped (``AirflowTaskTimeout``) in the middle of it and the next started it over
from the whole batch, so the DAG run failed after 7 tries with rows never stored.

Now a refused row is written to the checkpoint as soon as an isolation proves it, and the rows
already added are found by reconciling, so each try starts where the last one stopped. The run
must succeed within its 7 tries, with every row in Mews once except the 4 refused, which are in
the rejections table once; every stored row in the results table once, with Mews's Id.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from conftest import AIRFLOW_BIN, DAGS_DIR

from airflow_provider_mews.testing import DEMO_CLIENT_TOKEN
from reliability.test_fault_matrix import (
    ACCESS_TOKEN,
    REJECTIONS,
    RESULTS,
    SRC_CONN,
    TASK_ID,
    make_source,
    mews_conn_json,
    sqlite_conn_json,
)

ROWS, BATCH = 6000, 500
REFUSED_ROWS = (700, 900, 3100, 3300)  # member_id = source row: two in batch 1, two in batch 6
TRIES = 7  # retries=6


def dag_text(dag_id: str, table: str) -> str:
    return f"""
from datetime import timedelta

import pendulum

from airflow.sdk import DAG
from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    LoyaltyMembershipAddOperator(
        task_id={TASK_ID!r},
        sql_conn_id={SRC_CONN!r},
        sql="SELECT * FROM {table} ORDER BY member_id",
        field_map={{"tier_id": "LoyaltyTierId"}},
        if_exists="add",
        batch_size={BATCH},
        max_active_requests=4,
        max_rejected_rows=10,
        results_table={RESULTS!r},
        rejections_table={REJECTIONS!r},
        execution_timeout=timedelta(seconds=12),
        retries={TRIES - 1},
        retry_delay=timedelta(seconds=0),
        retry_exponential_backoff=False,
    )
"""


def test_repeated_timeouts_in_an_isolation_converge(airflow_db, mews_sandbox, tmp_path, monkeypatch):
    db = tmp_path / "members.db"
    source = make_source(db, "members_isolation", ROWS, 0)
    row_account = {row: account for account, row in zip(source.valid, source.valid_rows, strict=True)}
    refused = {row_account[r] for r in REFUSED_ROWS}
    mews_sandbox.add_tokens(DEMO_CLIENT_TOKEN, ACCESS_TOKEN)
    mews_sandbox.configure(
        add_latency_s=1.6,  # 0.8 s per add of 500
        getall_latency_s=0.3,
        rate_limit_requests=6,
        rate_limit_period_s=2.0,
        forbidden_accounts={a.lower() for a in refused},
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_DEFAULT",
        mews_conn_json(mews_sandbox.url, rate_limit_requests=6, rate_limit_period=2),
    )
    monkeypatch.setenv(f"AIRFLOW_CONN_{SRC_CONN.upper()}", sqlite_conn_json(db))
    dag_id = "rel_interrupted_isolation"
    (DAGS_DIR / f"{dag_id}.py").write_text(dag_text(dag_id, source.table))

    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.run(
            [AIRFLOW_BIN, "dags", "test", dag_id],
            env=os.environ.copy(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    timeouts = text.count("Process timed out")
    with closing(sqlite3.connect(Path(os.environ["AIRFLOW_HOME"]) / "airflow.db", timeout=10)) as conn:
        ((run_id, state, ti_state, tries),) = conn.execute(
            "SELECT r.run_id, r.state, t.state, t.try_number FROM dag_run r JOIN task_instance t "
            "ON t.dag_id = r.dag_id AND t.run_id = r.run_id WHERE r.dag_id = ?",
            (dag_id,),
        ).fetchall()
    stored = mews_sandbox.memberships()
    print(f"{tries} tries, {timeouts} stopped by execution_timeout, {len(stored)} stored, run {state}")
    assert timeouts >= 1, "no try was stopped in an isolation: the case proves nothing"
    assert (proc.returncode, state, ti_state) == (0, "success", "success"), text[-4000:]
    assert tries <= TRIES

    accounts = [m["AccountId"] for m in stored]
    assert len(accounts) == len(set(accounts)), "a row stored twice"
    assert set(accounts) == set(source.valid) - refused
    ids = {m["AccountId"]: m["Id"] for m in stored}
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        key = "WHERE dag_id = ? AND run_id = ?"
        results = conn.execute(
            f"SELECT source_row, account_id, mews_membership_id FROM {RESULTS} {key}", (dag_id, run_id)
        ).fetchall()
        rejected = conn.execute(
            f"SELECT source_row, reason FROM {REJECTIONS} {key}", (dag_id, run_id)
        ).fetchall()
    assert sorted(r[0] for r in results) == sorted(set(source.valid_rows) - set(REFUSED_ROWS))
    assert all(ids[r[1]] == r[2] for r in results)
    assert sorted(r[0] for r in rejected) == list(REFUSED_ROWS)
    assert all("HTTP 403" in r[1] for r in rejected), rejected


@pytest.fixture(autouse=True)
def _no_leftover_dag() -> Any:
    yield
    (DAGS_DIR / "rel_interrupted_isolation.py").unlink(missing_ok=True)
