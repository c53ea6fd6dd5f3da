"""The table/query source and the write-back against a real PostgreSQL server.

The server comes from ``MEWS_TEST_POSTGRES_URI`` (``.ci/services.sh`` starts a throw-away
cluster and exports it). Without it, CI fails here; on a developer machine with Debian's
``postgresql`` installed, the session starts its own cluster with ``.ci/start-postgres.sh``.

Everything goes through the Postgres provider's connection (``conn_type`` postgres), the way
a user's DAG reads a warehouse table. Both drivers the provider can use are covered: psycopg 3
(Airflow 3 with SQLAlchemy 2) and psycopg2 (what the provider picks with SQLAlchemy 1.4, e.g.
Airflow 2.11): ``driver`` switches the provider's own ``USE_PSYCOPG3`` flag.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
import pytest
from conftest import DAGS_DIR, ROOT, task_result

from airflow_provider_mews.memberships import normalize, plan_columns
from airflow_provider_mews.sources import SourceError, SqlSource
from airflow_provider_mews.testing import connection_json
from airflow_provider_mews.testing.sample_data import COLUMNS, PROGRAM_ID, members

START_POSTGRES = ROOT / ".ci" / "start-postgres.sh"
CURSOR_NAME = "mews_membership_source"  # SqlSource's server-side cursor
DRIVERS = ("psycopg3", "psycopg2")
BIG, SMALL = 200_000, 20_000
FAST_MEWS = {"rate_limit_requests": 100_000, "rate_limit_period": 1}  # the limiter is not under test here

MEMBERS_DDL = (
    "member_id INTEGER PRIMARY KEY, account_id TEXT, loyalty_program_id TEXT, is_primary TEXT, state TEXT, "
    "membership_number TEXT, points TEXT, expiration_date TEXT, url TEXT, tier_id TEXT, email TEXT"
)


# -- the server --


@pytest.fixture(scope="session")
def postgres_uri() -> Iterator[str]:
    uri = os.environ.get("MEWS_TEST_POSTGRES_URI")
    if uri:
        yield uri
        return
    if os.environ.get("CI"):
        pytest.fail(
            "MEWS_TEST_POSTGRES_URI is not set: CI must start PostgreSQL before the tests "
            "(`source .ci/services.sh`, as .ci/run does) so the Postgres tests run against a real server"
        )
    # A developer machine: start a private cluster for this session (needs Debian's postgresql).
    cluster = tempfile.mkdtemp(prefix="mews-test-postgres.", dir="/tmp")
    started = subprocess.run(
        ["bash", str(START_POSTGRES), "start", cluster], capture_output=True, text=True, timeout=120
    )
    if started.returncode != 0:
        pytest.fail(
            "could not start a local PostgreSQL for the Postgres tests; install Debian's `postgresql` "
            f"or set MEWS_TEST_POSTGRES_URI.\n{started.stderr.strip()}"
        )
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(START_POSTGRES), "stop", cluster], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def pg(postgres_uri: str) -> Iterator[psycopg.Connection]:
    """A plain autocommit connection for setting up tables and inspecting the server."""
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS mews_out CASCADE")
        conn.execute("CREATE SCHEMA mews_out")
        yield conn


def postgres_connection(uri: str, **extra: Any) -> str:
    """An ``AIRFLOW_CONN_...`` value of type postgres (the provider's connection) for ``uri``."""
    u = urlsplit(uri)
    return json.dumps(
        {
            "conn_type": "postgres",
            "host": u.hostname,
            "port": u.port,
            "login": unquote(u.username or ""),
            "password": unquote(u.password or ""),
            "schema": u.path.lstrip("/"),
            "extra": extra,
        }
    )


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which DB-API driver the Postgres provider uses for this test."""
    import airflow.providers.postgres.hooks.postgres as provider

    monkeypatch.setattr(provider, "USE_PSYCOPG3", request.param == "psycopg3")
    return request.param


def load_members(pg: psycopg.Connection, table: str, count: int, invalid: int = 0) -> list[tuple[Any, ...]]:
    """(Re)create ``table`` with sample members (COPY); returns the rows."""
    rows = list(members(count, invalid))
    pg.execute(f"DROP TABLE IF EXISTS {table}")
    pg.execute(f"CREATE TABLE {table} ({MEMBERS_DDL})")
    with pg.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    return rows


def backend_queries(pg: psycopg.Connection, application_name: str) -> list[str]:
    """What the server's sessions of ``application_name`` run (or last ran)."""
    found = pg.execute("SELECT query FROM pg_stat_activity WHERE application_name = %s", (application_name,))
    return [q for (q,) in found.fetchall()]


# -- the source on its own, both drivers --


def test_sql_source_streams_through_a_server_side_cursor(pg, postgres_uri, driver, monkeypatch):
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    load_members(pg, "src_members", 2_500, invalid=5)
    app = f"mews-source-{driver}"
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_PG_SRC", postgres_connection(postgres_uri, application_name=app))
    source = SqlSource(
        PostgresHook(postgres_conn_id="mews_pg_src"),
        table=None,
        sql="SELECT * FROM src_members ORDER BY member_id",
        chunk_size=1_000,
    )
    source.open()
    try:
        assert source.columns == COLUMNS
        chunks = source.chunks()
        sizes = [len(next(chunks))]
        # Mid-stream the server holds the cursor and the client fetches from it 1000 rows at a time.
        seen = backend_queries(pg, app)
        sizes += [len(chunk) for chunk in chunks]
    finally:
        source.close()
    assert sizes == [1_000, 1_000, 500]
    assert len(seen) == 1, seen
    assert seen[0].startswith("FETCH FORWARD 1000 FROM") and CURSOR_NAME in seen[0], seen
    assert backend_queries(pg, app) == [], "the source connection must be closed"


def test_sql_source_maps_postgres_types(pg, postgres_uri, driver, monkeypatch):
    """Native column types (uuid, boolean, date, numeric, timestamptz) become valid Mews values."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    account = uuid.uuid4()
    pg.execute("DROP TABLE IF EXISTS typed_members")
    pg.execute(
        "CREATE TABLE typed_members (account_id UUID, loyalty_program_id UUID, is_primary BOOLEAN, "
        "points NUMERIC(12, 0), expiration_date DATE, code VARCHAR(255), valid_to TIMESTAMPTZ)"
    )
    pg.execute(
        "INSERT INTO typed_members VALUES (%s, %s, TRUE, 1200, '2029-12-24', 'MBR-Ü-1', '2029-12-24 23:30:00-05')",
        (account, PROGRAM_ID),
    )
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_PG_SRC", postgres_connection(postgres_uri))
    source = SqlSource(PostgresHook(postgres_conn_id="mews_pg_src"), table="typed_members", sql=None, chunk_size=10)
    source.open()
    try:
        rows = [row for chunk in source.chunks() for row in chunk]
    finally:
        source.close()
    assert source.columns == (
        "account_id", "loyalty_program_id", "is_primary", "points", "expiration_date", "code", "valid_to",
    )  # fmt: skip
    assert isinstance(rows[0][2], bool) and isinstance(rows[0][3], decimal.Decimal)
    assert isinstance(rows[0][4], dt.date) and isinstance(rows[0][6], dt.datetime)
    plan = plan_columns(source.columns[:6])
    assert normalize(plan, rows[0][:6]) == {
        "AccountId": str(account),
        "LoyaltyProgramId": PROGRAM_ID,
        "IsPrimary": True,
        "Points": 1200,
        "ExpirationDate": "2029-12-24T00:00:00Z",
        "Code": "MBR-Ü-1",
    }
    # A timestamptz expiration is taken in UTC (23:30 at UTC-5 is the next day there).
    plan = plan_columns([*source.columns[:4], "expiration_date"])
    assert normalize(plan, (*rows[0][:4], rows[0][6]))["ExpirationDate"] == "2029-12-25T00:00:00Z"


def test_sql_source_empty_table_and_bad_query(pg, postgres_uri, driver, monkeypatch):
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    pg.execute("DROP TABLE IF EXISTS empty_members")
    pg.execute(f"CREATE TABLE empty_members ({MEMBERS_DDL})")
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_PG_SRC", postgres_connection(postgres_uri))
    hook = PostgresHook(postgres_conn_id="mews_pg_src")
    source = SqlSource(hook, table="empty_members", sql=None, chunk_size=100)
    source.open()
    try:
        assert source.columns == COLUMNS
        assert list(source.chunks()) == []
    finally:
        source.close()
    missing = SqlSource(hook, table="no_such_members", sql=None, chunk_size=100)
    with pytest.raises(SourceError, match=r"'mews_pg_src'.*no_such_members"):
        missing.open()


# -- the operator in a DAG: write-back, a retried try --

RETRY_DAG = """
from datetime import timedelta

import pendulum

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.11
    from airflow import DAG

with DAG(dag_id="{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    LoyaltyMembershipAddOperator(
        task_id="add",
        sql_conn_id="mews_pg",
        table="retry_members",
        field_map={{"tier_id": "LoyaltyTierId"}},
        batch_size=100,
        max_active_requests=1,
        if_exists="add",
        max_rejected_rows=50,
        results_table="mews_out.results_{driver}",
        rejections_table="mews_out.rejections_{driver}",
        retries=1,
        retry_delay=timedelta(seconds=0),
        retry_exponential_backoff=False,
    )
"""


def test_write_back_on_postgres_is_rewritten_by_a_retried_try(
    pg, postgres_uri, driver, run_dag, mews_conn, mews_sandbox, monkeypatch
):
    """600 rows in batches of 100: 6 are invalid, Mews refuses 1 (HTTP 403). Batch 3 (rows 201-300) is
    split by the refusal, its first half is added, then its second half stays in doubt (4 requests
    dropped before storing): the first try fails after writing batch 3's outcomes so far; the retry
    reconciles and rewrites batch 3. Results and rejections (schema mews_out, same connection) end
    with exactly one line per row."""
    rows = load_members(pg, "retry_members", 600, invalid=6)
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_PG", postgres_connection(postgres_uri))
    refused_row = 280
    refused_account = rows[refused_row - 1][1]
    mews_sandbox.configure(
        forbidden_accounts={refused_account},
        fault_script=["", "", "", ""] + ["drop_before_store"] * 4,
    )
    dag_id = f"mews_pg_retry_{driver}"
    dr = run_dag(dag_id, RETRY_DAG.format(dag_id=dag_id, driver=driver))

    ti = dr.get_task_instance("add")
    assert dr.state == "success" and ti.try_number == 2, "the first try must fail and the retry finish"
    invalid_rows = {51, 151, 251, 351, 451, 551}
    added_rows = set(range(1, 601)) - invalid_rows - {refused_row}
    expected = {rows[n - 1][1]: n for n in added_rows}
    stored = mews_sandbox.memberships()
    assert sorted(m["AccountId"] for m in stored) == sorted(expected), "each valid row added exactly once"
    mews_id = {m["AccountId"]: m["Id"] for m in stored}

    results = pg.execute(
        f"SELECT dag_id, run_id, task_id, map_index, source_row, account_id, loyalty_program_id, code, "
        f"mews_membership_id, outcome FROM mews_out.results_{driver}"
    ).fetchall()
    assert len(results) == len(added_rows), "no row written twice by the retried try"
    assert {r[:4] for r in results} == {(dag_id, dr.run_id, "add", -1)}
    assert {r[4]: (r[5], r[8]) for r in results} == {n: (a, mews_id[a]) for a, n in expected.items()}
    assert {r[9] for r in results} == {"added"}
    assert all(r[6] == PROGRAM_ID and r[7] == f"MBR-{r[4]:08d}" for r in results)

    rejections = pg.execute(
        f"SELECT source_row, account_id, field, reason, request_id, row_json FROM mews_out.rejections_{driver}"
    ).fetchall()
    assert sorted(r[0] for r in rejections) == sorted([*invalid_rows, refused_row])
    by_row = {r[0]: r for r in rejections}
    refused = by_row[refused_row]
    assert refused[1] == refused_account and refused[2] is None and "HTTP 403" in refused[3] and refused[4]
    assert json.loads(refused[5])["AccountId"] == refused_account
    assert by_row[51][2] == "AccountId" and json.loads(by_row[51][5])["member_id"] == 51

    summary = task_result(dr, "add")
    assert (summary["added"], summary["rejected"], summary["rows_read"]) == (len(added_rows), 7, 600)


# -- 200 000 rows: flat memory, exactly once, in a separate process --

BIG_DAG = """
import pendulum

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.11
    from airflow import DAG

with DAG(dag_id="{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    LoyaltyMembershipAddOperator(
        task_id="add",
        sql_conn_id="mews_pg_big",
        {source},
        field_map={{"tier_id": "LoyaltyTierId"}},
        if_exists="add",
        max_rejected_rows=100,
        results_table="mews_out.results_{rows}",
        rejections_table="mews_out.rejections_{rows}",
        retries=0,
    )
"""

# Runs one DAG in this process and reports the run and the peak memory of the run itself.
RUNNER = r"""
import json, runpy, sys

path, dag_id = sys.argv[1:3]


def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])


dag = next(v for v in runpy.run_path(path).values() if getattr(v, "dag_id", None) == dag_id)
with open("/proc/self/clear_refs", "w") as fh:  # restart the peak (VmHWM) at the current RSS
    fh.write("5")
start_kb = status("VmRSS")
dag_run = dag.test()
ti = dag_run.get_task_instance("add")
result = {
    "state": str(dag_run.state),
    "run_id": dag_run.run_id,
    "summary": ti.xcom_pull(task_ids="add", key="mews_summary"),
    "start_kb": start_kb,
    "peak_kb": status("VmHWM"),
}
print("MEWS_RESULT " + json.dumps(result))
"""


def run_in_subprocess(dag_id: str, source: str, rows: int, env: dict[str, str]) -> dict[str, Any]:
    path = DAGS_DIR / f"{dag_id}.py"
    path.write_text(BIG_DAG.format(dag_id=dag_id, source=source, rows=rows))
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(path), dag_id], capture_output=True, text=True, env=env, timeout=240
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MEWS_RESULT ")]
    assert proc.returncode == 0 and lines, f"runner failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("MEWS_RESULT "))


class ActivityWatch:
    """Samples, from another session, what the operator's Postgres sessions run."""

    def __init__(self, uri: str, application_name: str) -> None:
        self.uri = uri
        self.application_name = application_name
        self.queries: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        with psycopg.connect(self.uri, autocommit=True) as conn:
            while not self._stop.wait(0.05):
                self.queries.update(backend_queries(conn, self.application_name))

    def __enter__(self) -> ActivityWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_200k_rows_stream_with_flat_memory_and_land_exactly_once(
    pg, postgres_uri, airflow_db, mews_conn, mews_sandbox, monkeypatch
):
    rows = load_members(pg, "big_members", BIG, invalid=20)
    app = "mews-operator-200k"
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", connection_json(mews_sandbox.url, **FAST_MEWS))
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_PG_BIG", postgres_connection(postgres_uri, application_name=app))
    env = os.environ.copy()

    mews_sandbox.configure(rate_limit_requests=100_000)
    small = run_in_subprocess(
        "mews_pg_20k", f'sql="SELECT * FROM big_members WHERE member_id <= {SMALL} ORDER BY member_id"', SMALL, env
    )
    assert small["state"] == "success" and small["summary"]["rows_read"] == SMALL, small
    mews_sandbox.reset()
    mews_sandbox.configure(rate_limit_requests=100_000)

    with ActivityWatch(postgres_uri, app) as watch:
        big = run_in_subprocess("mews_pg_200k", 'table="big_members"', BIG, env)
    assert big["state"] == "success", big

    # Read through a server-side cursor: the server saw the cursor declared and fetched from.
    source_queries = {q for q in watch.queries if "big_members" in q or CURSOR_NAME in q}
    assert any(q.startswith("FETCH FORWARD 1000 FROM") and CURSOR_NAME in q for q in source_queries), source_queries
    assert not any(q.strip().upper().startswith("SELECT") for q in source_queries), source_queries

    # Flat memory: ten times the rows, (almost) the same peak.
    growth_mb = (big["peak_kb"] - small["peak_kb"]) / 1024
    print(f"peak RSS of the run: {small['peak_kb'] // 1024} MB for {SMALL} rows, {big['peak_kb'] // 1024} MB for {BIG}")
    assert growth_mb < 50, f"peak RSS grew by {growth_mb:.0f} MB from {SMALL} to {BIG} rows"

    # Every valid row in Mews exactly once, every outcome written back once.
    invalid_rows = {n * 10_000 + 5_000 + 1 for n in range(20)}
    summary = big["summary"]
    assert (summary["rows_read"], summary["added"], summary["rejected"]) == (BIG, BIG - 20, 20), summary
    stored = mews_sandbox.memberships()
    expected = {row[1]: row[0] for row in rows if row[0] not in invalid_rows}
    assert len(stored) == len(expected) and {m["AccountId"] for m in stored} == set(expected)
    counts = pg.execute(
        "SELECT count(*), count(DISTINCT source_row), count(DISTINCT mews_membership_id), "
        "min(source_row), max(source_row) FROM mews_out.results_200000 WHERE run_id = %s",
        (big["run_id"],),
    ).fetchone()
    assert counts == (BIG - 20, BIG - 20, BIG - 20, 1, BIG), counts
    sample = dict(pg.execute("SELECT account_id, mews_membership_id FROM mews_out.results_200000").fetchall())
    assert sample == {m["AccountId"]: m["Id"] for m in stored}
    rejected = pg.execute("SELECT source_row FROM mews_out.rejections_200000 ORDER BY source_row").fetchall()
    assert [r for (r,) in rejected] == sorted(invalid_rows)


def test_missing_server_fails_in_ci_instead_of_skipping(tmp_path):
    """CI without MEWS_TEST_POSTGRES_URI must fail the Postgres tests, never skip them."""
    env = {k: v for k, v in os.environ.items() if k != "MEWS_TEST_POSTGRES_URI"}
    env["CI"] = "true"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", "test_sql_source_empty_table_and_bad_query"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "MEWS_TEST_POSTGRES_URI is not set" in proc.stdout
    assert " skipped" not in proc.stdout.splitlines()[-1]
