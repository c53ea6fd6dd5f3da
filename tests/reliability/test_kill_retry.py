"""The worker killed with SIGKILL in the middle of a batch; then the task retried, or a new DAG run.

The task runs in a real ``airflow dags test`` process (the task executes inside it, as in a
worker), over 8 000 rows in batches of 500 with 3 in flight, against the in-process sandbox
whose adds take 1 s each. Once the task's checkpoint (``task_state_store``) holds finished
batches, the process gets SIGKILL while adds are in flight: the sandbox completes and stores
them, but nobody hears the answer. These batches are *in doubt*.

**Retrying the same task instance.** What Airflow 3.3 offers, checked:

* ``airflow dags test DAG DATE`` twice: the second call deletes the DAG run of that logical
  date (``get_or_create_dagrun``) and with it its ``task_state_store`` rows (foreign key,
  ``ON DELETE CASCADE``): that is a new run, not a retry.
* ``airflow tasks test DAG TASK RUN_ID`` runs the existing task instance of that run again
  (it sees the checkpoint) but as the same try, without the scheduler's bookkeeping.
* In production the scheduler notices the dead worker (no heartbeat), calls
  ``TaskInstance.handle_failure``, which puts the task instance in ``up_for_retry`` (try 1
  recorded in the task instance history), then schedules try 2 of the *same* task instance
  (same dag, run, task and map index, hence the same ``task_state_store``).

The retry here does exactly that last sequence on the run the killed process left
``running``: ``handle_failure`` (as for a heartbeat timeout), then the loop ``dag.test()``
itself uses to schedule and run task instances (``DagRun.update_state``, ``try_number + 1``,
``_run_task``). Try 2 must resume from the checkpoint (``resumed_batches`` > 0), find the
in-doubt batches stored (``reconciled`` = exactly the rows stored beyond the checkpoint) and
not send them again (no duplicate in the sandbox), and add the rest.

**A new DAG run over the same rows** has no checkpoint: with ``if_exists="skip"`` it finds
what the killed run stored (in-doubt batches included) and adds only the rest; after a
complete run it adds nothing.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from conftest import AIRFLOW_BIN, DAGS_DIR, load_dag, task_result

from airflow_provider_mews.testing import DEMO_CLIENT_TOKEN
from reliability.test_fault_matrix import (
    ACCESS_TOKEN,
    RESULTS,
    SRC_CONN,
    TASK_ID,
    Source,
    assert_counts,
    assert_no_secret,
    assert_outputs,
    assert_stored_exactly_once,
    dag_source,
    make_source,
    mews_conn_json,
    sqlite_conn_json,
    wait_for,
)

BATCH = 500
CHECKPOINT_KEY = "mews_loyalty_checkpoint"


@pytest.fixture(scope="module")
def source_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Source]:
    db = tmp_path_factory.mktemp("kill-retry") / "members.db"
    return db, make_source(db, "members_8k", 8000, 16)


@pytest.fixture
def slow_sandbox(mews_sandbox: Any, source_db: tuple[Path, Source], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The in-process sandbox, adds taking 1 s per 500 rows; connections in the environment
    (inherited by the ``airflow`` subprocess)."""
    mews_sandbox.add_tokens(DEMO_CLIENT_TOKEN, ACCESS_TOKEN)
    mews_sandbox.configure(add_latency_s=2.0)
    store = mews_sandbox.state.store

    def counted_store(memberships: list[dict[str, Any]]) -> None:  # one call per stored add
        store(memberships)
        with mews_sandbox.state.lock:
            mews_sandbox.state.stats["stores"] += 1

    monkeypatch.setattr(mews_sandbox.state, "store", counted_store)
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", mews_conn_json(mews_sandbox.url))
    monkeypatch.setenv(f"AIRFLOW_CONN_{SRC_CONN.upper()}", sqlite_conn_json(source_db[0]))
    return mews_sandbox


def write_dag(dag_id: str, table: str, if_exists: str) -> Path:
    path = DAGS_DIR / f"{dag_id}.py"
    path.write_text(
        dag_source(dag_id, table, if_exists=if_exists, batch_size=BATCH, max_active_requests=3, retries=2)
    )
    return path


def metadata_db() -> closing[sqlite3.Connection]:
    """A short read of Airflow's metadata database (SQLite here), closed right after."""
    return closing(sqlite3.connect(Path(os.environ["AIRFLOW_HOME"]) / "airflow.db", timeout=10))


def saved_checkpoint(dag_id: str) -> dict[str, Any] | None:
    """The operator's checkpoint as the task_state_store holds it now."""
    with metadata_db() as conn:
        rows = conn.execute(
            "SELECT value FROM task_state_store WHERE dag_id = ? AND task_id = ? AND key = ?",
            (dag_id, TASK_ID, CHECKPOINT_KEY),
        ).fetchall()
    return json.loads(rows[0][0]) if rows else None


def checkpoint_row(dag_id: str) -> tuple[int, str | None] | None:
    """(size of the stored value, expires_at) of the operator's checkpoint row."""
    with metadata_db() as conn:
        rows = conn.execute(
            "SELECT length(value), expires_at FROM task_state_store WHERE dag_id = ? AND task_id = ? AND key = ?",
            (dag_id, TASK_ID, CHECKPOINT_KEY),
        ).fetchall()
    return rows[0] if rows else None


def finished_batches(saved: dict[str, Any]) -> int:
    """Batches the record says are finished: all below the watermark, and the few beyond it."""
    return int(saved["upto"]) + len(saved["beyond"])


def finished_added(saved: dict[str, Any]) -> int:
    """Rows the record says were added by finished batches."""
    return int(saved["counts"][0]) + sum(int(entry[2]) for entry in saved["beyond"])


def the_run(dag_id: str) -> tuple[str, str, str, int]:
    with metadata_db() as conn:
        (run_id, run_state), *others = conn.execute(
            "SELECT run_id, state FROM dag_run WHERE dag_id = ?", (dag_id,)
        ).fetchall()
        assert not others
        ((ti_state, try_number),) = conn.execute(
            "SELECT state, try_number FROM task_instance WHERE dag_id = ? AND run_id = ?", (dag_id, run_id)
        ).fetchall()
    return run_id, run_state, ti_state, try_number


def kill_worker_mid_batch(dag_id: str, log: Path, ready: Any) -> None:
    """``airflow dags test DAG`` in its own process group, SIGKILLed once ``ready()``."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [AIRFLOW_BIN, "dags", "test", dag_id],
            env=os.environ.copy(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(lambda: proc.poll() is not None or ready(), timeout=180, what="batches in flight")
            assert proc.poll() is None, "the run ended before the kill:\n" + log_excerpt(log)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def log_excerpt(log: Path) -> str:
    lines = log.read_text().splitlines()
    errors = [line for line in lines if "error" in line.lower() or "exception" in line.lower()]
    return "\n".join([*errors[:20], "...", *lines[-30:]])


def settled(sandbox: Any) -> int:
    """Memberships stored once the adds the dead worker left in flight are done: every add the
    sandbox received has answered (stored, or refused), and nothing new came for a second."""

    def answered() -> int:
        stats = sandbox.stats()
        return stats.get("stores", 0) + sum(n for k, n in stats.items() if k.startswith("status:"))

    last, since = (-1, -1), time.monotonic()
    while True:
        now = (sandbox.stats().get("requests:loyaltyMemberships/add", 0), answered())
        if now != last:
            last, since = now, time.monotonic()
        elif now[0] == now[1] and time.monotonic() - since >= 1.0:
            return len(sandbox.memberships())
        assert time.monotonic() - since < 60, f"adds still in flight a minute after the kill: {now}"
        time.sleep(0.1)


def retry_after_worker_death(dag_id: str, run_id: str) -> Any:
    """What the scheduler does for a task instance whose worker died: fail it into
    ``up_for_retry`` (``handle_failure``), then schedule and run its next try, as
    ``dag.test()`` runs task instances. Returns the finished DagRun."""
    from airflow.models.dagrun import DagRun
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    dag = load_dag(DAGS_DIR / f"{dag_id}.py", dag_id)
    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    with create_session() as session:  # closed on exit: no lock left on the metadata database
        (dr,) = DagRun.find(dag_id=dag_id, run_id=run_id, session=session)
        dr.dag = scheduler_dag
        ti = dr.get_task_instance(TASK_ID, session=session)
        assert ti.state == TaskInstanceState.RUNNING, (
            "the killed try should have left its task instance running"
        )
        ti.task = scheduler_dag.get_task(TASK_ID)
        ti.handle_failure("worker killed (SIGKILL): no heartbeat", session=session)
        session.commit()
        assert ti.state == TaskInstanceState.UP_FOR_RETRY
        while dr.state == DagRunState.RUNNING:
            session.expire_all()
            schedulable, _ = dr.update_state(session=session)
            for s in schedulable:
                s.try_number += 1
                s.state = TaskInstanceState.SCHEDULED
            session.commit()
            for s in dr.get_task_instances(state=[TaskInstanceState.SCHEDULED], session=session):
                _run_task(ti=s, task=dag.task_dict[s.task_id])
    (finished,) = DagRun.find(dag_id=dag_id, run_id=run_id)
    return finished


def test_sigkill_mid_batch_then_the_same_task_instance_retried(
    run_dag, slow_sandbox, source_db, tmp_path, capfd
):
    db, source = source_db
    dag_id = "rel_kill_retry"
    # if_exists="add": only reconciliation stands between the in-doubt batches and duplicates.
    write_dag(dag_id, source.table, if_exists="add")

    def checkpoint_has_finished_batches() -> bool:
        saved = saved_checkpoint(dag_id)
        return bool(saved and finished_batches(saved) >= 2)

    log = tmp_path / "try1.log"
    kill_worker_mid_batch(dag_id, log, checkpoint_has_finished_batches)
    run_id, run_state, ti_state, try_number = the_run(dag_id)
    assert (run_state, ti_state, try_number) == ("running", "running", 1)
    stored = settled(slow_sandbox)
    checkpoint = saved_checkpoint(dag_id)
    assert checkpoint is not None
    in_doubt = stored - finished_added(checkpoint)
    assert in_doubt > 0, "no batch was in flight when the worker died"

    dr = retry_after_worker_death(dag_id, run_id)
    assert dr.state == "success"
    ti = dr.get_task_instance(TASK_ID)
    assert (ti.state, ti.try_number) == ("success", 2)
    summary = task_result(dr, TASK_ID, key="mews_summary")
    ids = assert_stored_exactly_once(slow_sandbox.memberships(), source)
    assert_counts(summary, source)
    assert summary["resumed_batches"] == finished_batches(checkpoint) > 0, summary
    assert summary["reconciled"] == in_doubt, summary
    assert_outputs(db, dag_id, run_id, source, ids)

    # A new DAG run over the same rows adds nothing.
    rerun_id = "rel_kill_retry_new_run"
    write_dag(rerun_id, source.table, if_exists="skip")
    again = run_dag(rerun_id)
    assert again.state == "success"
    summary = task_result(again, TASK_ID, key="mews_summary")
    assert summary["added"] == 0 and summary["skipped_existing"] == len(source.valid), summary
    assert summary["rejected"] == source.invalid
    assert_stored_exactly_once(slow_sandbox.memberships(), source)
    assert_no_secret(capfd.readouterr(), [dr, again], killed_try_output=log.read_text())


def test_sigkill_mid_batch_then_a_new_dag_run_adds_only_the_rest(
    run_dag, slow_sandbox, source_db, tmp_path, capfd
):
    db, source = source_db
    dag_id = "rel_kill_new_run"
    write_dag(dag_id, source.table, if_exists="skip")
    log = tmp_path / "killed.log"
    kill_worker_mid_batch(dag_id, log, lambda: len(slow_sandbox.memberships()) >= 1500)
    stored = settled(slow_sandbox)
    assert 0 < stored < len(source.valid)

    dr = run_dag(dag_id)  # dag.test(): a new run of the same DAG, without the killed run's checkpoint
    assert dr.state == "success"
    summary = task_result(dr, TASK_ID, key="mews_summary")
    ids = assert_stored_exactly_once(slow_sandbox.memberships(), source)
    assert_counts(summary, source, added=len(source.valid) - stored)
    assert summary["skipped_existing"] == stored and summary["not_reached"] == 0, summary
    assert summary["resumed_batches"] == 0
    assert_outputs_skip_aware(db, dr, source, ids)
    assert_no_secret(capfd.readouterr(), [dr], killed_run_output=log.read_text())


def assert_outputs_skip_aware(db: Path, dr: Any, source: Source, ids: dict[str, str]) -> None:
    """Every valid row in the results table once, added or skipped_existing, with Mews's Id."""
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        rows = conn.execute(
            f"SELECT source_row, account_id, mews_membership_id, outcome FROM {RESULTS} "
            "WHERE dag_id = ? AND run_id = ?",
            (dr.dag_id, dr.run_id),
        ).fetchall()
    assert sorted(r[0] for r in rows) == list(source.valid_rows)
    assert all(ids[r[1]] == r[2] for r in rows)
    assert {r[3] for r in rows} == {"added", "skipped_existing"}


# -- a long run: the bounded checkpoint at batch 1 500 of 2 000 --

LONG_BATCH, LONG_BATCHES = 5, 2000


@pytest.fixture
def quick_sandbox(mews_sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Adds of 5 rows taking 30 ms, no rate limit on either side: 2 000 batches in seconds."""
    mews_sandbox.add_tokens(DEMO_CLIENT_TOKEN, ACCESS_TOKEN)
    mews_sandbox.configure(add_latency_s=6.0, rate_limit_requests=1_000_000)
    store = mews_sandbox.state.store

    def counted_store(memberships: list[dict[str, Any]]) -> None:
        store(memberships)
        with mews_sandbox.state.lock:
            mews_sandbox.state.stats["stores"] += 1

    monkeypatch.setattr(mews_sandbox.state, "store", counted_store)
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_DEFAULT", mews_conn_json(mews_sandbox.url, rate_limit_requests=1_000_000)
    )
    return mews_sandbox


def test_sigkill_at_batch_1500_of_2000_then_retried_adds_nothing_twice(
    run_dag, quick_sandbox, tmp_path, monkeypatch
):
    """A 2 000-batch run (batches of 5, ``if_exists="add"``) killed once its checkpoint is past
    batch 1 500: the record stayed small with the store's default retention, and the retry
    skips what it says is finished, reconciles the rest of what was sent, and adds nothing twice."""
    db = tmp_path / "long.db"
    source = make_source(db, "members_long", LONG_BATCH * LONG_BATCHES, 20)
    monkeypatch.setenv(f"AIRFLOW_CONN_{SRC_CONN.upper()}", sqlite_conn_json(db))
    dag_id = "rel_kill_long_run"
    (DAGS_DIR / f"{dag_id}.py").write_text(
        dag_source(
            dag_id,
            source.table,
            if_exists="add",
            batch_size=LONG_BATCH,
            max_active_requests=4,
            retries=2,
            outputs=False,  # 2 000 outcome-table commits would only slow the test down
        )
    )
    sizes: list[int] = []

    def past_batch_1500() -> bool:
        row = checkpoint_row(dag_id)
        if row is None:
            return False
        sizes.append(row[0])
        saved = saved_checkpoint(dag_id)
        return bool(saved and saved["upto"] >= 1500)

    started = time.monotonic()
    kill_worker_mid_batch(dag_id, tmp_path / "try1.log", past_batch_1500)
    print(f"try 1 killed after {time.monotonic() - started:.0f} s")
    run_id, *_ = the_run(dag_id)
    stored = settled(quick_sandbox)
    checkpoint = saved_checkpoint(dag_id)
    assert checkpoint is not None and 1500 <= checkpoint["upto"] < LONG_BATCHES
    size, expires_at = checkpoint_row(dag_id) or (0, None)
    assert max([*sizes, size]) < 4096, max(sizes)  # every version of the record seen while it ran
    assert expires_at is not None  # the store's default retention, not NEVER_EXPIRE
    in_doubt = stored - finished_added(checkpoint)
    assert in_doubt > 0, "nothing was in flight or unrecorded when the worker died"

    started = time.monotonic()
    dr = retry_after_worker_death(dag_id, run_id)
    print(f"try 2 took {time.monotonic() - started:.0f} s")
    assert dr.state == "success"
    ti = dr.get_task_instance(TASK_ID)
    assert (ti.state, ti.try_number) == ("success", 2)
    summary = task_result(dr, TASK_ID, key="mews_summary")
    assert_stored_exactly_once(quick_sandbox.memberships(), source)
    assert_counts(summary, source)
    assert summary["resumed_batches"] == finished_batches(checkpoint), summary
    assert summary["reconciled"] == in_doubt, summary
    assert saved_checkpoint(dag_id) is None  # cleared on success
