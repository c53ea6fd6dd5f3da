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
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
import pytest
from conftest import DAGS_DIR, ROOT, needs, task_result

from airflow_provider_mews.loyalty.normalize import normalize, plan_columns
from airflow_provider_mews.runs.sources import SourceError, SqlSource
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
        subprocess.run(["bash", str(START_POSTGRES), "stop", cluster], capture_output=True, timeout=60)
        needs(
            "a PostgreSQL server",
            "install Debian's `postgresql` (the tests start a private cluster) or set "
            f"MEWS_TEST_POSTGRES_URI=postgresql://... ({' '.join(started.stderr.strip().splitlines()[-1:])})",
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


def load_members(
    pg: psycopg.Connection, table: str, count: int, invalid: int = 0, seed: int = 7
) -> list[tuple[Any, ...]]:
    """(Re)create ``table`` with sample members (COPY); returns the rows."""
    rows = list(members(count, invalid, seed=seed))
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


def sessions_end(pg: psycopg.Connection, application_name: str, within_s: float = 10.0) -> bool:
    """Whether the sessions of ``application_name`` are gone (a closed session's backend exits soon after)."""
    deadline = time.monotonic() + within_s
    while backend_queries(pg, application_name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- the source on its own, both drivers --


def test_sql_source_streams_through_a_server_side_cursor(pg, postgres_uri, driver, monkeypatch):
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    load_members(pg, "src_members", 2_500, invalid=5)
    app = f"mews-source-{driver}"
    # The connection asks for dict rows (for the user's other tasks); the source still reads tuples.
    dict_rows = "dictcursor" if driver == "psycopg3" else "realdictcursor"
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_PG_SRC", postgres_connection(postgres_uri, application_name=app, cursor=dict_rows)
    )
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
        first = next(chunks)
        sizes = [len(first)]
        # Mid-stream the server holds the cursor and the client fetches from it 1000 rows at a time.
        seen = backend_queries(pg, app)
        sizes += [len(chunk) for chunk in chunks]
    finally:
        source.close()
    assert sizes == [1_000, 1_000, 500]
    assert type(first[0]) is tuple and (first[0][0], first[-1][0]) == (1, 1_000)
    assert len(seen) == 1, seen
    assert seen[0].startswith("FETCH FORWARD 1000 FROM") and CURSOR_NAME in seen[0], seen
    assert sessions_end(pg, app), "the source must close its connection"


def test_a_stopped_source_is_counted_by_the_server(pg, postgres_uri, driver, monkeypatch):
    """A run that stops mid-stream closes the server-side cursor and asks the server for
    ``SELECT COUNT(*)`` of the table or query (dict-row connections too), never reading the rest."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    load_members(pg, "count_members", 2_500)
    dict_rows = "dictcursor" if driver == "psycopg3" else "realdictcursor"
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_PG_COUNT", postgres_connection(postgres_uri, cursor=dict_rows))
    for kwargs, expected in (
        ({"table": "count_members", "sql": None}, 2_500),
        (
            {"table": None, "sql": "SELECT * FROM count_members WHERE member_id > 500 ORDER BY member_id;"},
            2_000,
        ),
    ):
        source = SqlSource(PostgresHook(postgres_conn_id="mews_pg_count"), chunk_size=1_000, **kwargs)
        source.open()
        try:
            assert len(next(iter(source.chunks()))) == 1_000
            assert source.count() == expected, kwargs
        finally:
            source.close()


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
        "INSERT INTO typed_members VALUES "
        "(%s, %s, TRUE, 1200, '2029-12-24', 'MBR-Ü-1', '2029-12-24 23:30:00-05')",
        (account, PROGRAM_ID),
    )
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_PG_SRC", postgres_connection(postgres_uri))
    source = SqlSource(
        PostgresHook(postgres_conn_id="mews_pg_src"), table="typed_members", sql=None, chunk_size=10
    )
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
        "ExpirationDate": "2029-12-24",
        "Code": "MBR-Ü-1",
    }
    # A timestamptz expiration is taken in UTC (23:30 at UTC-5 is the next day there).
    plan = plan_columns([*source.columns[:4], "expiration_date"])
    assert normalize(plan, (*rows[0][:4], rows[0][6]))["ExpirationDate"] == "2029-12-25"


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

START = pendulum.datetime(2026, 1, 1, tz="UTC")

with DAG(dag_id="{dag_id}", schedule=None, start_date=START, catchup=False) as dag:
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
    """600 rows in batches of 100, one request at a time: 6 rows are invalid, Mews refuses row 280
    (HTTP 403). Batch 3 (rows 201-300) is split by the refusal: its first half (rows 201-249) is
    added, then rows 250-275 stay in doubt (4 adds dropped before storing, so the batch gives up):
    the first try fails after writing batch 3's outcomes so far. The retry reconciles batch 3 and
    rewrites its lines. Results and rejections (schema mews_out, same connection as the source)
    end with exactly one line per row."""
    rows = load_members(pg, "retry_members", 600, invalid=6)
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_PG", postgres_connection(postgres_uri))
    refused_row = 280
    refused_account = rows[refused_row - 1][1]
    mews_sandbox.configure(
        forbidden_accounts={refused_account},
        # adds: batches 1, 2; batch 3 (403); rows 201-249; rows 250-300 (403); rows 250-275 dropped.
        fault_script=[""] * 5 + ["drop_before_store"] * 4,
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
        "SELECT source_row, account_id, field, reason, request_id, row_json "
        f"FROM mews_out.rejections_{driver}"
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
import os

import pendulum

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

try:
    from airflow.sdk import DAG, task
except ImportError:  # Airflow 2.11
    from airflow import DAG
    from airflow.decorators import task


def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])


@task
def memory_mark():
    # The peak RSS (VmHWM) since the previous mark, then restart the peak at the current RSS.
    mark = {{"pid": os.getpid(), "peak_kb": status("VmHWM"), "rss_kb": status("VmRSS")}}
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return mark


def add(task_id, **source):
    return LoyaltyMembershipAddOperator(
        task_id=task_id,
        sql_conn_id="mews_pg_big",
        field_map={{"tier_id": "LoyaltyTierId"}},
        if_exists="add",
        max_rejected_rows=100,
        results_table="mews_out.results_" + task_id,
        rejections_table="mews_out.rejections_" + task_id,
        retries=0,
        **source,
    )


START = pendulum.datetime(2026, 1, 1, tz="UTC")

with DAG(dag_id="{dag_id}", schedule=None, start_date=START, catchup=False) as dag:
    (
        memory_mark.override(task_id="mark_start")()
        >> add("add_20k", sql="SELECT * FROM small_members ORDER BY member_id")
        >> memory_mark.override(task_id="mark_20k")()
        >> add("add_200k", table="big_members")
        >> memory_mark.override(task_id="mark_200k")()
    )
"""

# Runs the DAG in a fresh process (the tasks run in it: dag.test() is in-process) and reports.
RUNNER = r"""
import json, os, runpy, sys

path, dag_id = sys.argv[1:3]
dag = runpy.run_path(path)["dag"]
dag_run = dag.test()
result = {"state": str(dag_run.state), "run_id": dag_run.run_id, "pid": os.getpid()}
for ti in dag_run.get_task_instances():
    result[ti.task_id] = {
        "state": str(ti.state),
        "xcom": ti.xcom_pull(task_ids=ti.task_id, key="mews_summary" if "add" in ti.task_id else None),
    }
print("MEWS_RESULT " + json.dumps(result))
"""


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
            while not self._stop.wait(0.1):
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
    """One DAG run in its own process: 20 000 rows (query), then 200 000 rows (table), each through
    the Postgres connection into the sandbox, outcomes written back to Postgres. The peak memory of
    the two runs is (almost) the same, the server shows a cursor being fetched from, and every row
    lands in Mews and in the results exactly once."""
    small_rows = load_members(pg, "small_members", SMALL, seed=8)
    big_rows = load_members(pg, "big_members", BIG, invalid=20)
    app = "mews-operator-200k"
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", connection_json(mews_sandbox.url, **FAST_MEWS))
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_PG_BIG", postgres_connection(postgres_uri, application_name=app))
    mews_sandbox.configure(rate_limit_requests=100_000)
    dag_id = "mews_pg_200k"
    path = DAGS_DIR / f"{dag_id}.py"
    path.write_text(BIG_DAG.format(dag_id=dag_id))

    with ActivityWatch(postgres_uri, app) as watch:
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER, str(path), dag_id],
            capture_output=True, text=True, env=os.environ.copy(), timeout=400,
        )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MEWS_RESULT ")]
    assert proc.returncode == 0 and lines, f"runner failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run = json.loads(lines[-1].removeprefix("MEWS_RESULT "))
    assert run["state"] == "success", run

    # Flat memory: ten times the rows, (almost) the same peak.
    marks = [run[t]["xcom"] for t in ("mark_start", "mark_20k", "mark_200k")]
    assert {m["pid"] for m in marks} == {run["pid"]}, "the tasks must run in the measured process"
    small_peak, big_peak = marks[1]["peak_kb"] / 1024, marks[2]["peak_kb"] / 1024
    print(
        f"peak RSS: {small_peak:.0f} MB while adding {SMALL} rows, {big_peak:.0f} MB while adding {BIG} rows"
    )
    assert big_peak - small_peak < 50, (
        f"peak RSS grew by {big_peak - small_peak:.0f} MB from {SMALL} to {BIG} rows"
    )

    # Read through a server-side cursor: the server saw the cursor declared and fetched from.
    source_queries = {q for q in watch.queries if "big_members" in q or CURSOR_NAME in q}
    assert any(q.startswith("FETCH FORWARD 1000 FROM") and CURSOR_NAME in q for q in source_queries), (
        source_queries
    )
    assert not any(q.lstrip().upper().startswith("SELECT") for q in source_queries), source_queries

    # Every valid row in Mews exactly once, every outcome written back once.
    small, big = run["add_20k"]["xcom"], run["add_200k"]["xcom"]
    assert (small["rows_read"], small["added"]) == (SMALL, SMALL), small
    invalid_members = {n * 10_000 + 5_000 + 1 for n in range(20)}
    assert (big["rows_read"], big["added"], big["rejected"]) == (BIG, BIG - 20, 20), big
    stored = mews_sandbox.memberships()
    expected = [row[1] for row in small_rows] + [row[1] for row in big_rows if row[0] not in invalid_members]
    assert len(stored) == len(expected) and sorted(m["AccountId"] for m in stored) == sorted(expected)
    mews_id = {m["AccountId"]: m["Id"] for m in stored}
    counts = pg.execute(
        "SELECT count(*), count(DISTINCT source_row), min(source_row), max(source_row), "
        "count(DISTINCT run_id) FROM mews_out.results_add_200k"
    ).fetchone()
    assert counts == (BIG - 20, BIG - 20, 1, BIG, 1), counts
    results = dict(
        pg.execute("SELECT account_id, mews_membership_id FROM mews_out.results_add_200k").fetchall()
    )
    assert results == {a: mews_id[a] for a in expected[SMALL:]}
    # table= reads in the server's order (no ORDER BY): the row itself tells which member it was.
    rejected = pg.execute("SELECT source_row, row_json FROM mews_out.rejections_add_200k").fetchall()
    assert len({r[0] for r in rejected}) == len(rejected)
    assert sorted(json.loads(r[1])["member_id"] for r in rejected) == sorted(invalid_members)


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


def test_outcome_tables_get_the_rewrite_index_and_a_retry_rewrites_without_duplicates(
    pg, postgres_uri, driver, monkeypatch
):
    """An outcome table of an older version gets the index; a new one is created with it; a
    retried try replaces the batches an earlier try wrote and adds the rest, nothing twice."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    from airflow_provider_mews.runs.outputs import (
        INDEX_COLUMNS,
        Outcome,
        Rejection,
        RunKey,
        TableOutput,
        index_name,
    )

    monkeypatch.setenv("AIRFLOW_CONN_MEWS_OUTCOMES_PG", postgres_connection(postgres_uri))
    results, rejections = f"mews_out.old_results_{driver}", f"mews_out.new_rejections_{driver}"
    pg.execute(f"DROP TABLE IF EXISTS {results}")
    pg.execute(f"DROP TABLE IF EXISTS {rejections}")
    pg.execute(  # as versions before the index created it
        f"CREATE TABLE {results} (dag_id VARCHAR(255), run_id VARCHAR(255), task_id VARCHAR(255), "
        "map_index INTEGER, source_row INTEGER, account_id VARCHAR(36), loyalty_program_id VARCHAR(36), "
        "code VARCHAR(255), mews_membership_id VARCHAR(36), outcome VARCHAR(32))"
    )
    key = RunKey("dag", f"manual__{driver}", "add_memberships", 3)

    def write(out: TableOutput, start: int, tag: str) -> None:
        outcomes = [
            Outcome(r, f"acc-{r}", "prog", None, f"{tag}-{r}", "added") for r in range(start, start + 999)
        ]
        out.write(start, start + 999, outcomes, [Rejection(start + 999, None, "Points", tag)])

    first = TableOutput(PostgresHook(postgres_conn_id="mews_outcomes_pg"), key, results, rejections)
    first.open()
    assert first.had_rows is False
    write(first, 1, "try1")
    write(first, 1001, "try1")
    first.close()

    found = dict(
        pg.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'mews_out' AND indexname = ANY(%s)",
            ([index_name(results), index_name(rejections)],),
        ).fetchall()
    )
    assert set(found) == {index_name(results), index_name(rejections)}
    assert all(f"({', '.join(INDEX_COLUMNS)})" in d for d in found.values()), found

    retry = TableOutput(PostgresHook(postgres_conn_id="mews_outcomes_pg"), key, results, rejections)
    retry.open()
    assert retry.had_rows is True
    write(retry, 1001, "try2")  # may have been in flight when the first try died: rewritten
    write(retry, 2001, "try2")
    retry.close()
    got = pg.execute(
        f"SELECT source_row, mews_membership_id FROM {results} WHERE run_id = %s AND map_index = 3 ORDER BY 1",
        (key.run_id,),
    ).fetchall()
    assert [r for r, _ in got] == [r for s in (1, 1001, 2001) for r in range(s, s + 999)]
    assert dict(got)[1] == "try1-1" and dict(got)[1001] == "try2-1001" and dict(got)[2999] == "try2-2999"
    reasons = pg.execute(f"SELECT source_row, reason FROM {rejections} ORDER BY 1").fetchall()
    assert reasons == [(1000, "try1"), (2000, "try2"), (3000, "try2")]
