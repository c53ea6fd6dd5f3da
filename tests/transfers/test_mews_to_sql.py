"""MewsToSqlOperator end to end: real Airflow (``dag.test``), real HTTP to the sandbox, real
SQLite and PostgreSQL through their Airflow providers.

The sandbox refuses time filters over 3 months and takes interval ends inclusively (a record
on a slice boundary comes back from both slices); memberships are seeded on UTC midnights, so
many sit exactly on the boundaries of the 3-month slices of a year.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from conftest import ROOT, needs

from airflow_provider_mews.testing import connection_json

YEAR_START = datetime(2025, 1, 1, tzinfo=timezone.utc)
YEAR_END = datetime(2026, 1, 1, tzinfo=timezone.utc)
TABLE = "mews_memberships"
BACKENDS = ("sqlite", "postgres")

DAG = """
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_mews.transfers.mews_to_sql import MewsToSqlOperator

with DAG(dag_id="{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    MewsToSqlOperator(
        task_id="export",
        operation="loyaltyMemberships/getAll",
        sql_conn_id="export_db",
        table="{table}",
        updated_utc=("{{{{ params.start }}}}", "{{{{ params.end }}}}"),
        params={{"start": "{start}", "end": "{end}"}},
        chunk_size={chunk_size},
        max_workers={max_workers},
        retries={retries},
        retry_delay=timedelta(seconds=0),
        {extra}
    )
"""


def dag_source(dag_id: str, start: datetime, end: datetime | None, **options: Any) -> str:
    values = {"table": TABLE, "chunk_size": 500, "max_workers": 4, "retries": 0, "extra": ""}
    values.update(options)
    return DAG.format(dag_id=dag_id, start=start.isoformat(), end=end.isoformat() if end else "", **values)


# -- the two databases --


@pytest.fixture(scope="session")
def export_postgres_uri() -> Iterator[str]:
    uri = os.environ.get("MEWS_TEST_POSTGRES_URI")
    if uri:
        yield uri
        return
    cluster = tempfile.mkdtemp(prefix="mews-export-postgres.", dir="/tmp")
    script = str(ROOT / ".ci" / "start-postgres.sh")
    started = subprocess.run(["bash", script, "start", cluster], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        subprocess.run(["bash", script, "stop", cluster], capture_output=True, timeout=60)
        needs(
            "a PostgreSQL server",
            "install Debian's `postgresql` or set MEWS_TEST_POSTGRES_URI=postgresql://...",
        )
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", script, "stop", cluster], capture_output=True, timeout=60)


class Database:
    """The table's rows as dicts, read with the database's own driver (not the code under test)."""

    def __init__(self, kind: str, conn_json: str, connect: Any, table: str) -> None:
        self.kind, self.conn_json, self._connect, self.table = kind, conn_json, connect, table

    def rows(self) -> list[dict[str, Any]]:
        conn = self._connect()
        try:
            cur = conn.cursor()
            cur.execute(f"SELECT * FROM {self.table}")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path, monkeypatch) -> Iterator[Database]:
    if request.param == "sqlite":
        path = tmp_path / "warehouse.db"
        conn_json = json.dumps({"conn_type": "sqlite", "host": str(path)})
        database = Database("sqlite", conn_json, lambda: sqlite3.connect(path), TABLE)
    else:
        import psycopg

        uri = request.getfixturevalue("export_postgres_uri")
        schema = f"export_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}"
        with psycopg.connect(uri, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            admin.execute(f"CREATE SCHEMA {schema}")
        u = urlsplit(uri)
        conn_json = json.dumps(
            {
                "conn_type": "postgres", "host": u.hostname, "port": u.port, "login": unquote(u.username or ""),
                "password": unquote(u.password or ""), "schema": u.path.lstrip("/"),
            }
        )  # fmt: skip
        database = Database("postgres", conn_json, lambda: psycopg.connect(uri), f"{schema}.{TABLE}")
    monkeypatch.setenv("AIRFLOW_CONN_EXPORT_DB", database.conn_json)
    yield database


@pytest.fixture
def mews(mews_sandbox, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_DEFAULT",
        connection_json(mews_sandbox.url, rate_limit_requests=100_000, rate_limit_period=1),
    )
    mews_sandbox.configure(seed_on_boundaries=True)
    return mews_sandbox


def mews_view(sandbox: Any, ids: Any = None) -> dict[str, dict[str, Any]]:
    """What Mews holds, as the table should: every field as text (JSON text for non-strings)."""
    from airflow_provider_mews.transfers.mews_to_sql import cell

    with sandbox.state.lock:
        records = [sandbox.state.memberships[i] for i in (ids if ids is not None else sandbox.state.order)]
    return {r["Id"]: {k: cell(v) for k, v in r.items()} for r in records}


def table_view(db: Database) -> dict[str, dict[str, Any]]:
    rows = db.rows()
    view = {r["Id"]: r for r in rows}
    assert len(view) == len(rows), "an Id has two rows"
    return view


def run(run_dag, db: Database, dag_id: str, start: datetime, end: datetime | None, **options: Any) -> Any:
    options.setdefault("table", db.table)
    dr = run_dag(dag_id, dag_source(dag_id, start, end, **options))
    return dr


# -- the "Done when" of issue 19 --


def test_a_year_through_the_3_month_limit_equals_the_sandbox(run_dag, mews, db):
    from airflow_provider_mews.hooks.mews import slice_count, time_slices

    ids = mews.seed_memberships(4000, start_utc=YEAR_START, end_utc=YEAR_END)
    # The slices the hook cuts (8 for 4 workers), and 20 memberships stamped on each boundary.
    slices = time_slices(YEAR_START, YEAR_END, 3, slice_count(YEAR_START, YEAR_END, 3, 4))
    for _, boundary in slices[:-1]:
        ids += mews.seed_memberships(20, created_utc=boundary)
    dr = run(run_dag, db, "t_export_year", YEAR_START, YEAR_END)
    assert dr.state == "success"
    assert table_view(db) == mews_view(mews, ids)
    # The year was read as slices of at most 3 months (the sandbox refuses longer ones, with 400).
    intervals = [e["filters"]["UpdatedUtc"] for e in mews.request_log("loyaltyMemberships/getAll")]
    starts = {i["StartUtc"] for i in intervals if i["StartUtc"] != i["EndUtc"]}
    assert len(slices) == 8 and starts == {low.strftime("%Y-%m-%dT%H:%M:%SZ") for low, _ in slices}


def test_a_later_interval_run_twice_leaves_the_table_equal_to_mews(run_dag, mews, db, mews_sandbox):
    from airflow_provider_mews.hooks.mews import MewsConnectorHook

    first = mews.seed_memberships(600, start_utc=YEAR_START, end_utc=YEAR_END)
    assert run(run_dag, db, "t_export_first", YEAR_START, YEAR_END).state == "success"
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    hook = MewsConnectorHook("mews_default")
    changed = first[:30]
    hook.update_loyalty_memberships([{"LoyaltyMembershipId": i, "Points": {"Value": 777}} for i in changed])
    hook.delete_loyalty_memberships(first[30:35])
    new = mews.seed_memberships(40, created_utc=datetime.now(timezone.utc))
    hook.close()
    for _ in range(2):
        dr = run(run_dag, db, "t_export_later", since, None)
        assert dr.state == "success"
        view = table_view(db)
        assert view == mews_view(mews, first + new)
    assert {view[i]["Points"] for i in changed} == {"777"}
    # A deleted membership keeps its row, with its state.
    assert {view[i]["ActivityState"] for i in first[30:35]} == {"Deleted"}
    assert all(view[i]["DeletedUtc"] for i in first[30:35])


def test_a_retry_after_a_fault_mid_export_duplicates_nothing(run_dag, mews, db, capfd):
    ids = mews.seed_memberships(3000, start_utc=YEAR_START, end_utc=YEAR_END)
    # The 6th read answers 200 without the list: not retried by the hook, the task fails after
    # some chunks were committed; Airflow's retry exports everything again.
    mews.configure(
        fault_operations={"loyaltyMemberships/getAll"}, fault_script=["", "", "", "", "", "nolist200"]
    )
    dr = run(run_dag, db, "t_export_retry", YEAR_START, YEAR_END, retries=1, chunk_size=200, page_size=100,
             max_workers=1, extra="page_size=100,")  # fmt: skip
    log = capfd.readouterr().out
    assert dr.state == "success", log[-3000:]
    ti = dr.get_task_instance("export")
    assert ti.try_number == 2, "the first try did not fail: the fault was not met"
    assert table_view(db) == mews_view(mews, ids)


def test_a_new_field_does_not_break_the_next_run(run_dag, mews, db):
    ids = mews.seed_memberships(200, start_utc=YEAR_START, end_utc=YEAR_END)
    assert run(run_dag, db, "t_export_field_1", YEAR_START, YEAR_END).state == "success"
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    with mews.state.lock:  # Mews starts sending a field the table has no column for
        for mid in ids[:10]:
            mews.state.memberships[mid] = {
                **mews.state.memberships[mid],
                "Marketing": {"Consent": True, "Tags": []},
            }
            mews.state.updated_at[mid] = datetime.now(timezone.utc).timestamp()
    dr = run(run_dag, db, "t_export_field_2", since, None)
    assert dr.state == "success"
    view = table_view(db)
    assert view[ids[0]]["Marketing"] == '{"Consent":true,"Tags":[]}'
    assert view[ids[50]]["Marketing"] is None
    assert {k: v for k, v in view[ids[0]].items()} == mews_view(mews, ids[:1])[ids[0]]


def test_a_new_field_with_new_fields_fail_stops_the_run(run_dag, mews, db):
    ids = mews.seed_memberships(20, start_utc=YEAR_START, end_utc=YEAR_END)
    assert run(run_dag, db, "t_export_strict_1", YEAR_START, YEAR_END).state == "success"
    with mews.state.lock:
        mews.state.memberships[ids[0]] = {**mews.state.memberships[ids[0]], "Surprise": 1}
    dr = run(run_dag, db, "t_export_strict_2", YEAR_START, YEAR_END, extra='new_fields="fail",')
    assert dr.state == "failed"
