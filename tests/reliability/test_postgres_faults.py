"""Faults of a real PostgreSQL holding the source and the outcome tables, with Airflow's retry.

Each case runs ``airflow dags test`` (the task in that process, Airflow retrying it there) over
6 000 members read from PostgreSQL (server-side cursor) and written back to the results and
rejections tables on the same server, against the sandbox (adds of 500 taking 1 s, 3 in
flight). Once a third of the rows are in Mews, the fault:

* the server restarted (``pg_ctl restart -m fast``: every session is cut, new ones refused for
  a moment);
* the source's session killed (``pg_terminate_backend``) in the middle of its read;
* the outcome tables refusing writes for 4 s (a trigger raising on every INSERT: the database
  is up, the reads go on, every write fails).

The try fails on the fault, the retry resumes from the checkpoint. At the end, every valid row
is in Mews once, every valid row in the results table once with the Id Mews holds, every
invalid row in the rejections table once.

The cluster is this module's own (``.ci/start-postgres.sh`` in a temporary directory, so it
can be restarted); it needs Debian's PostgreSQL binaries and skips without them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import AIRFLOW_BIN, DAGS_DIR, ROOT, needs

from airflow_provider_mews.testing import DEMO_CLIENT_TOKEN
from airflow_provider_mews.testing.sample_data import COLUMNS, members
from reliability.test_fault_matrix import (
    ACCESS_TOKEN,
    TASK_ID,
    assert_stored_exactly_once,
    make_source,
    mews_conn_json,
)

START_POSTGRES = ROOT / ".ci" / "start-postgres.sh"
ROWS, INVALID, BATCH = 6000, 8, 500
CONN = "mews_pgf"
APP = "mews-pg-faults"  # application_name of the task's sessions
RESULTS, REJECTIONS = "pgf_results", "pgf_rejections"
DDL = (
    "member_id INTEGER PRIMARY KEY, account_id TEXT, loyalty_program_id TEXT, is_primary TEXT, state TEXT, "
    "membership_number TEXT, points TEXT, expiration_date TEXT, url TEXT, tier_id TEXT, email TEXT"
)


class Cluster:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mews-pg-faults.", dir="/tmp")
        self.port = ""
        self.uri = ""

    def start(self) -> str:
        done = subprocess.run(
            ["bash", str(START_POSTGRES), "start", self.dir, self.port],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        self.uri = done.stdout.strip().splitlines()[-1]
        self.port = self.uri.rsplit(":", 1)[1].split("/")[0]
        return self.uri

    def restart(self) -> None:
        """Every session cut at once (``-m fast``), the server back on the same port."""
        bindir = max(Path("/usr/lib/postgresql").glob("*/bin"))
        cmd = [str(bindir / "pg_ctl"), "-D", f"{self.dir}/data", "-m", "fast", "-w", "stop"]
        if os.getuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        self.start()  # same directory and port, its server log in the directory

    def stop(self) -> None:
        subprocess.run(["bash", str(START_POSTGRES), "stop", self.dir], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        needs("PostgreSQL server binaries", "apt-get install postgresql (the test starts its own cluster)")
    c = Cluster()
    try:
        c.start()
    except RuntimeError as exc:
        c.stop()
        needs("a PostgreSQL cluster of its own", str(exc)[-300:])
    yield c
    c.stop()


@pytest.fixture
def pg(cluster: Cluster) -> Iterator[psycopg.Connection]:
    with psycopg.connect(cluster.uri, autocommit=True) as conn:
        yield conn


def pg_conn_json(uri: str) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(uri)
    extra = {"application_name": APP}
    return json.dumps(
        {
            "conn_type": "postgres",
            "host": u.hostname,
            "port": u.port,
            "login": u.username,
            "password": u.password,
            "schema": u.path.lstrip("/"),
            "extra": extra,
        }
    )


def dag_text(dag_id: str, table: str) -> str:
    return f"""
from datetime import timedelta

import pendulum

from airflow.sdk import DAG
from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    LoyaltyMembershipAddOperator(
        task_id={TASK_ID!r},
        sql_conn_id={CONN!r},
        sql="SELECT * FROM {table} ORDER BY member_id",
        field_map={{"tier_id": "LoyaltyTierId"}},
        if_exists="add",
        batch_size={BATCH},
        max_active_requests=3,
        max_rejected_rows=100,
        results_table={RESULTS!r},
        rejections_table={REJECTIONS!r},
        retries=4,
        retry_delay=timedelta(seconds=3),
        retry_exponential_backoff=False,
    )
"""


def run_with_fault(
    dag_id: str, sandbox: Any, pg: psycopg.Connection, cluster: Cluster, tmp: Path, fault: Callable[[], None]
) -> tuple[str, Any]:
    """Load the source, run the DAG in ``airflow dags test`` and call ``fault()`` once a third of
    the rows are in Mews; return the run's log and the expected rows."""
    table = f"src_{dag_id}"
    source = make_source(tmp / "unused.db", table, ROWS, INVALID)  # the expected outcome
    pg.execute(f"DROP TABLE IF EXISTS {table}")
    pg.execute(f"CREATE TABLE {table} ({DDL})")
    with pg.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN") as copy:
        for row in members(ROWS, INVALID):
            copy.write_row(row)
    (DAGS_DIR / f"{dag_id}.py").write_text(dag_text(dag_id, table))
    env = {
        **os.environ,
        "AIRFLOW_CONN_MEWS_DEFAULT": mews_conn_json(sandbox.url),
        f"AIRFLOW_CONN_{CONN.upper()}": pg_conn_json(cluster.uri),
    }
    log = tmp / f"{dag_id}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [AIRFLOW_BIN, "dags", "test", dag_id], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 180
            while len(sandbox.memberships()) < ROWS // 3 and proc.poll() is None:
                assert time.monotonic() < deadline, "a third of the rows never reached Mews"
                time.sleep(0.05)
            assert proc.poll() is None, "the run ended before the fault:\n" + log.read_text()[-3000:]
            fault()
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text, source


def check_exact(dag_id: str, sandbox: Any, pg: psycopg.Connection, source: Any) -> int:
    """Every valid row once in Mews and in the results table (with Mews's Id); returns the tries."""
    with closing(sqlite3.connect(Path(os.environ["AIRFLOW_HOME"]) / "airflow.db", timeout=10)) as conn:
        ((run_id, state, ti_state, tries),) = conn.execute(
            "SELECT r.run_id, r.state, t.state, t.try_number FROM dag_run r JOIN task_instance t "
            "ON t.dag_id = r.dag_id AND t.run_id = r.run_id WHERE r.dag_id = ?",
            (dag_id,),
        ).fetchall()
    assert (state, ti_state) == ("success", "success")
    ids = assert_stored_exactly_once(sandbox.memberships(), source)
    key = "WHERE dag_id = %s AND run_id = %s"
    results = pg.execute(
        f"SELECT source_row, account_id, mews_membership_id, outcome FROM {RESULTS} {key}", (dag_id, run_id)
    ).fetchall()
    rejected = pg.execute(f"SELECT source_row FROM {REJECTIONS} {key}", (dag_id, run_id)).fetchall()
    assert sorted(r[0] for r in results) == list(source.valid_rows), "results table: a row missing or twice"
    assert all(r[3] == "added" and ids[r[1]] == r[2] for r in results), "results table: an Id not in Mews"
    assert sorted(r[0] for r in rejected) == sorted(source.invalid_rows)
    return int(tries)


@pytest.fixture
def sandbox(airflow_db: Any, mews_sandbox: Any) -> Any:
    mews_sandbox.add_tokens(DEMO_CLIENT_TOKEN, ACCESS_TOKEN)
    mews_sandbox.configure(add_latency_s=2.0)  # 1 s per add of 500
    return mews_sandbox


def test_postgres_restarted_mid_run_then_retried(sandbox, pg, cluster, tmp_path):
    dag_id = "rel_pg_restart"
    _, source = run_with_fault(dag_id, sandbox, pg, cluster, tmp_path, cluster.restart)
    with psycopg.connect(cluster.uri, autocommit=True) as fresh:  # the fixture's session was cut
        tries = check_exact(dag_id, sandbox, fresh, source)
    assert tries >= 2, "the restart did not fail a try: the case proves nothing"


def test_source_session_killed_mid_read_then_retried(sandbox, pg, cluster, tmp_path):
    dag_id = "rel_pg_source_killed"

    def kill_the_reader() -> None:
        killed = pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
            "AND query LIKE 'FETCH FORWARD%%'",
            (APP,),
        ).fetchall()
        assert killed, "no source session reading"

    _, source = run_with_fault(dag_id, sandbox, pg, cluster, tmp_path, kill_the_reader)
    assert check_exact(dag_id, sandbox, pg, source) >= 2


def test_outcome_tables_refusing_writes_for_a_while_then_retried(sandbox, pg, cluster, tmp_path):
    dag_id = "rel_pg_writes_refused"
    pg.execute(
        "CREATE OR REPLACE FUNCTION pgf_refuse() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'writes refused for a while (test)'; END $$"
    )

    def refuse_writes_for_4_s() -> None:
        for table in (RESULTS, REJECTIONS):
            pg.execute(
                f"CREATE TRIGGER pgf_refuse BEFORE INSERT OR DELETE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION pgf_refuse()"
            )

        def allow() -> None:
            with psycopg.connect(cluster.uri, autocommit=True) as conn:
                for table in (RESULTS, REJECTIONS):
                    conn.execute(f"DROP TRIGGER pgf_refuse ON {table}")

        threading.Timer(4.0, allow).start()

    text, source = run_with_fault(dag_id, sandbox, pg, cluster, tmp_path, refuse_writes_for_4_s)
    assert "writes refused for a while" in text
    assert check_exact(dag_id, sandbox, pg, source) >= 2
