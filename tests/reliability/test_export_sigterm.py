"""SIGTERM to an export in the middle: ``on_kill`` stops it within the 5 s the supervisor allows
before SIGKILL, and the next run leaves the table equal to Mews, each ``Id`` once.

The export runs in ``airflow dags test`` (Airflow's task runner and its SIGTERM handler, in the
process the test signals): 60 000 memberships over a year, pages answering in 2 s, 8 slices read
at once, so the whole export lasts about 20 s. Once the first chunk is in the table the test
sends SIGTERM and plays the supervisor (SIGKILL 5 s later). Without ``on_kill`` the runner's
handler returns and the export reads on to its end: the test fails.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest
from conftest import AIRFLOW_BIN, DAGS_DIR

from airflow_provider_mews.testing import MewsSandbox, connection_json

RECORDS = 60_000
KILL_AFTER_S = 5.0
TABLE = "mews_memberships"

DAG = """
import pendulum

from airflow_provider_mews.transfers.mews_to_sql import MewsToSqlOperator

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.11
    from airflow import DAG

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    MewsToSqlOperator(
        task_id="export",
        operation="loyaltyMemberships/getAll",
        updated_utc=("2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
        sql_conn_id="warehouse",
        table={table!r},
        chunk_size=1000,
        retries=0,
    )
"""


def count_rows(db: Path) -> int:
    try:
        with closing(sqlite3.connect(db, timeout=10)) as conn:
            return conn.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not there yet
        return 0


def ids(db: Path) -> list[str]:
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        return [r[0] for r in conn.execute(f'SELECT "Id" FROM {TABLE}')]


def dags_test(dag_id: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [AIRFLOW_BIN, "dags", "test", dag_id],
        env=os.environ.copy(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.fixture
def warehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mews_sandbox: MewsSandbox) -> Path:
    db = tmp_path / "warehouse.db"
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", connection_json(mews_sandbox.url))
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", f'{{"conn_type": "sqlite", "host": "{db}"}}')
    return db


def test_sigterm_stops_an_export_within_the_supervisors_grace_and_the_next_run_is_exact(
    airflow_db: Path, mews_sandbox: MewsSandbox, warehouse: Path, tmp_path: Path
) -> None:
    mews_sandbox.seed_memberships(RECORDS, start_utc="2025-01-01T00:00:00Z", end_utc="2025-12-31T00:00:00Z")
    mews_sandbox.configure(getall_latency_s=2.0)
    dag_id = "t_export_sigterm"
    (DAGS_DIR / f"{dag_id}.py").write_text(DAG.format(dag_id=dag_id, table=TABLE))

    log = tmp_path / "try1.log"
    proc = dags_test(dag_id, log)
    deadline = time.monotonic() + 180
    while proc.poll() is None and count_rows(warehouse) == 0:
        assert time.monotonic() < deadline, "no chunk was written within 180 s:\n" + log.read_text()[-3000:]
        time.sleep(0.1)
    assert proc.poll() is None, "the export ended before the SIGTERM:\n" + log.read_text()[-3000:]
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # to the task process, as the supervisor does
    try:
        proc.wait(timeout=KILL_AFTER_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the supervisor's escalation
        proc.wait()
        pytest.fail(
            f"the export was still running {KILL_AFTER_S} s after SIGTERM:\n" + log.read_text()[-3000:]
        )
    took = time.monotonic() - sent
    partial = count_rows(warehouse)
    assert 0 < partial < RECORDS, (partial, took)

    mews_sandbox.configure(getall_latency_s=0.0)
    again = dags_test(dag_id, tmp_path / "try2.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "try2.log").read_text()[-3000:]
    held = {m["Id"] for m in mews_sandbox.memberships()}
    got = ids(warehouse)
    assert len(got) == len(set(got)) == RECORDS and set(got) == held
