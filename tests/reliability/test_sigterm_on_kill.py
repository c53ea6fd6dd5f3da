"""SIGTERM to the task in the middle of a run: ``on_kill`` stops it cleanly within the 5 s the
supervisor allows before SIGKILL; the retry (or the next run) is exact.

What Airflow 3.3 does, read in ``airflow/sdk/execution_time``: ``task_runner.run()`` installs a
SIGTERM handler in the task process that calls ``ti.task.on_kill()`` and returns (the task
goes on unless ``on_kill`` stops it); the supervisor, stopping a task ("mark failed", a cleared
task, a lost heartbeat), sends SIGTERM and SIGKILL 5 s later (``kill(SIGTERM, force=True)``,
``escalation_delay=5.0``); ``execution_timeout`` raises ``AirflowTaskTimeout`` in ``execute``
and then calls ``on_kill()``.

The task runs in ``airflow dags test`` (the same ``run()``, so the same SIGTERM handler, in the
process the test signals), over 9 000 rows in batches of 500 with 3 in flight, adds taking 2 s
each. At about a third of the rows stored, the test sends SIGTERM, and plays the supervisor:
SIGKILL 5 s later if the try has not ended.

* With a retry allowed: try 1 must end (its ``task_instance_history`` end) within 5 s of the
  SIGTERM, failed for a retry; try 2 (run by ``dags test`` in the same process) resumes it:
  every valid row once in Mews and once in the results table with Mews's Id.
* With no retry ("mark failed"): the process must leave by itself within 5 s, and what Mews
  holds then is exactly what the results table says (no batch Mews stored is missing from
  it); a new run with ``if_exists="skip"`` adds only the rest.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import AIRFLOW_BIN, DAGS_DIR, task_result

from airflow_provider_mews.testing import DEMO_CLIENT_TOKEN
from reliability.test_fault_matrix import (
    ACCESS_TOKEN,
    RESULTS,
    SRC_CONN,
    TASK_ID,
    Source,
    assert_counts,
    assert_outputs,
    assert_stored_exactly_once,
    dag_source,
    make_source,
    mews_conn_json,
    sqlite_conn_json,
    wait_for,
)

ROWS, INVALID, BATCH = 9000, 12, 500
#: The supervisor's SIGTERM -> SIGKILL delay (``ActivitySubprocess.kill``'s ``escalation_delay``).
KILL_AFTER_S = 5.0


@pytest.fixture
def source_db(tmp_path: Path) -> tuple[Path, Source]:
    db = tmp_path / "members.db"
    return db, make_source(db, "members_sigterm", ROWS, INVALID)


@pytest.fixture
def slow_sandbox(mews_sandbox: Any, source_db: tuple[Path, Source], monkeypatch: pytest.MonkeyPatch) -> Any:
    mews_sandbox.add_tokens(DEMO_CLIENT_TOKEN, ACCESS_TOKEN)
    mews_sandbox.configure(add_latency_s=4.0)  # 2 s per add of 500: the rest of the run outlasts 5 s
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", mews_conn_json(mews_sandbox.url))
    monkeypatch.setenv(f"AIRFLOW_CONN_{SRC_CONN.upper()}", sqlite_conn_json(source_db[0]))
    return mews_sandbox


def metadata(sql: str, *args: Any) -> list[Any]:
    with closing(sqlite3.connect(Path(os.environ["AIRFLOW_HOME"]) / "airflow.db", timeout=10)) as conn:
        return conn.execute(sql, args).fetchall()


def first_try_end(dag_id: str) -> float | None:
    """When try 1 ended (epoch s), once Airflow recorded it: in the history (a retry followed) or
    on the task instance itself (it failed for good)."""
    rows = metadata(
        "SELECT end_date FROM task_instance_history WHERE dag_id = ? AND task_id = ? AND try_number = 1 "
        "UNION ALL SELECT end_date FROM task_instance WHERE dag_id = ? AND task_id = ? AND try_number = 1 "
        "AND state IN ('failed', 'up_for_retry', 'success')",
        dag_id,
        TASK_ID,
        dag_id,
        TASK_ID,
    )
    ends = [r[0] for r in rows if r[0]]
    return datetime.fromisoformat(ends[0]).timestamp() if ends else None


def sigterm_at_a_third(dag_id: str, sandbox: Any, log: Path) -> tuple[subprocess.Popen[bytes], float]:
    """``airflow dags test DAG`` in its own process group; SIGTERM to it once a third of the rows
    are in Mews. Returns the process and when the SIGTERM was sent (epoch s)."""
    out = log.open("wb")
    proc = subprocess.Popen(
        [AIRFLOW_BIN, "dags", "test", dag_id],
        env=os.environ.copy(),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for(
        lambda: proc.poll() is not None or len(sandbox.memberships()) >= ROWS // 3,
        timeout=180,
        what="a third of the rows in Mews",
    )
    assert proc.poll() is None, "the run ended before the SIGTERM:\n" + log.read_text()[-3000:]
    sent = time.time()
    proc.send_signal(signal.SIGTERM)  # to the task process only, as the supervisor does
    return proc, sent


def settle_sandbox(sandbox: Any) -> None:
    """Adds a SIGKILLed try left in flight answer within their 2 s latency."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < 2.5:
        now = len(sandbox.memberships())
        if now != last:
            last, since = now, time.monotonic()
        time.sleep(0.1)


def results_rows(db: Path, dag_id: str) -> list[tuple[int, str, str]]:
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        return conn.execute(
            f"SELECT source_row, account_id, mews_membership_id FROM {RESULTS} WHERE dag_id = ?", (dag_id,)
        ).fetchall()


def test_sigterm_ends_the_try_within_5_s_and_the_retry_is_exact(
    airflow_db, slow_sandbox, source_db, tmp_path
):
    db, source = source_db
    dag_id = "rel_sigterm_retry"
    (DAGS_DIR / f"{dag_id}.py").write_text(
        dag_source(dag_id, source.table, if_exists="add", batch_size=BATCH, max_active_requests=3, retries=1)
    )
    log = tmp_path / "run.log"
    proc, sent = sigterm_at_a_third(dag_id, slow_sandbox, log)
    try:
        wait_for(
            lambda: first_try_end(dag_id) is not None or time.time() - sent > KILL_AFTER_S,
            timeout=KILL_AFTER_S + 2,
            what="try 1 to end",
        )
        ended = first_try_end(dag_id)
        assert ended is not None, (
            f"try 1 still running {KILL_AFTER_S} s after SIGTERM: the supervisor SIGKILLs it"
        )
        took = ended - sent
        print(f"try 1 ended {took:.2f} s after SIGTERM")
        assert took <= KILL_AFTER_S
        proc.wait(timeout=180)  # try 2, in the same `dags test` process
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "Stopped from outside (on_kill" in text
    ((run_id, state, ti_state, tries),) = metadata(
        "SELECT r.run_id, r.state, t.state, t.try_number FROM dag_run r JOIN task_instance t "
        "ON t.dag_id = r.dag_id AND t.run_id = r.run_id WHERE r.dag_id = ?",
        dag_id,
    )
    assert (state, ti_state, tries) == ("success", "success", 2)
    ids = assert_stored_exactly_once(slow_sandbox.memberships(), source)
    assert_outputs(db, dag_id, run_id, source, ids)


def test_sigterm_without_retry_leaves_outcomes_equal_to_mews_then_a_new_run_adds_the_rest(
    run_dag, slow_sandbox, source_db, tmp_path
):
    db, source = source_db
    dag_id = "rel_sigterm_no_retry"
    (DAGS_DIR / f"{dag_id}.py").write_text(
        dag_source(dag_id, source.table, if_exists="skip", batch_size=BATCH, max_active_requests=3, retries=0)
    )
    proc, sent = sigterm_at_a_third(dag_id, slow_sandbox, tmp_path / "run.log")
    try:
        proc.wait(timeout=KILL_AFTER_S)
        exited = time.time() - sent
    except subprocess.TimeoutExpired:
        exited = None
    finally:
        if proc.poll() is None:  # the supervisor's SIGKILL
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"process exited {exited} s after SIGTERM")
    assert exited is not None, f"still running {KILL_AFTER_S} s after SIGTERM: SIGKILLed"
    assert proc.returncode == 1
    settle_sandbox(slow_sandbox)
    stored = {m["AccountId"]: m["Id"] for m in slow_sandbox.memberships()}
    assert ROWS // 3 <= len(stored) < len(source.valid)
    recorded = results_rows(db, dag_id)
    assert len(recorded) == len({r[0] for r in recorded}), "a row twice in the results table"
    assert {r[1]: r[2] for r in recorded} == stored, "Mews and the results table differ after the stop"

    dr = run_dag(dag_id)  # the next run (no checkpoint): skips what the stopped one stored
    assert dr.state == "success"
    summary = task_result(dr, TASK_ID, key="mews_summary")
    ids = assert_stored_exactly_once(slow_sandbox.memberships(), source)
    assert_counts(summary, source, added=len(source.valid) - len(stored))
    assert summary["skipped_existing"] == len(stored)
    rows = [r for r in results_rows(db, dag_id) if r[1] in ids]
    assert all(ids[r[1]] == r[2] for r in rows)
