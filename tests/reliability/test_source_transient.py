"""A source query's failure that passes is retried; a mistake fails once (issue 21.3).

On a real PostgreSQL of this module's own (``.ci/start-postgres.sh``, as in
test_postgres_faults.py), through the operator's own source opening (``_open_source``: the
``sql_conn_id`` connection's PostgresHook, a server-side cursor):

* the source's session is terminated (``pg_terminate_backend``) at the moment its query runs
  (the query waits on a lock the test holds, so the session is cut inside ``execute``): the
  task fails with a retryable error (``SourceUnavailable``, not ``AirflowFailException``) saying
  the database failed, and the next try (the same call again) reads every row;
* a missing table, a missing column, a syntax error: ``AirflowFailException`` (no retry), naming
  the setting (``sql=`` or ``table=``) and the connection.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

import psycopg
import pytest
from airflow.exceptions import AirflowFailException

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator
from airflow_provider_mews.runs.sources import SourceError, SourceUnavailable, is_transient
from reliability.test_postgres_faults import APP, Cluster, cluster, pg, pg_conn_json  # noqa: F401

CONN = "mews_pg_transient"
TABLE = "transient_src"


@pytest.fixture
def source_table(pg: psycopg.Connection, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: F811
    pg.execute(f"DROP TABLE IF EXISTS {TABLE}")
    pg.execute(f"CREATE TABLE {TABLE} (member_id INTEGER PRIMARY KEY, account_id TEXT)")
    pg.execute(f"INSERT INTO {TABLE} SELECT g, 'a' || g FROM generate_series(1, 2500) g")
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN.upper()}", pg_conn_json(cluster.uri))
    return TABLE


def operator(**source: Any) -> LoyaltyMembershipAddOperator:
    return LoyaltyMembershipAddOperator(task_id="add", sql_conn_id=CONN, batch_size=1000, **source)


def test_a_session_cut_while_the_query_runs_is_retried_and_the_retry_reads_every_row(
    source_table: str,
    pg: psycopg.Connection,  # noqa: F811
    cluster: Cluster,  # noqa: F811
):
    op = operator(sql=f"SELECT * FROM {source_table} ORDER BY member_id")
    outcome: dict[str, Any] = {}

    def open_source() -> None:
        try:
            outcome["source"] = op._open_source()
        except BaseException as exc:
            outcome["error"] = exc

    with psycopg.connect(cluster.uri, autocommit=False) as locker:
        locker.execute(f"LOCK TABLE {source_table} IN ACCESS EXCLUSIVE MODE")  # the query will wait here
        thread = threading.Thread(target=open_source)
        thread.start()
        deadline = time.monotonic() + 30
        while True:
            waiting = pg.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND state = 'active' "
                "AND wait_event_type = 'Lock'",
                (APP,),
            ).fetchall()
            if waiting:
                break
            assert time.monotonic() < deadline, "the source query never ran"
            assert thread.is_alive(), outcome
            time.sleep(0.05)
        # The query is running (waiting on the table): its session is cut, as by a server restart.
        pg.execute("SELECT pg_terminate_backend(%s)", (waiting[0][0],))
        thread.join(30)
        locker.rollback()

    error = outcome.get("error")
    assert isinstance(error, SourceUnavailable), repr(error)
    assert not isinstance(error, (AirflowFailException, SourceError))
    assert "Airflow's retry runs it again" in str(error) and CONN in str(error)
    assert is_transient(error.__cause__)  # type: ignore[arg-type]

    # The retry: the same source opened again reads every row.
    source = op._open_source()
    try:
        rows = [row for chunk in source.chunks() for row in chunk]
    finally:
        source.close()
    assert [r[0] for r in rows] == list(range(1, 2501))


@pytest.mark.parametrize(
    ("source", "setting", "words"),
    [
        ({"sql": "SELECT * FROM no_such_table"}, "sql", "does not exist"),
        ({"sql": f"SELECT no_such_column FROM {TABLE}"}, "sql", "does not exist"),
        ({"sql": f"SELEC * FROM {TABLE}"}, "sql", "syntax error"),
        ({"table": "no_such_table"}, "table", "does not exist"),
    ],
)
def test_a_mistake_in_the_source_fails_once_naming_the_setting(
    source_table: str, source: dict[str, str], setting: str, words: str
):
    with pytest.raises(AirflowFailException) as info:
        operator(**source)._open_source()
    message = str(info.value)
    assert words in message and f"Check {setting}=" in message and CONN in message, message


def test_what_passes_and_what_does_not():
    class OperationalError(Exception):
        pass

    class Coded(Exception):
        def __init__(self, code: str) -> None:
            self.pgcode = code

    assert is_transient(Coded("57P01")) and is_transient(Coded("08006")) and is_transient(Coded("40P01"))
    assert (
        not is_transient(Coded("42P01"))
        and not is_transient(Coded("42601"))
        and not is_transient(Coded("22P02"))
    )
    assert is_transient(OperationalError("server closed the connection unexpectedly"))
    assert is_transient(ConnectionResetError()) and not is_transient(ValueError("x"))
    assert is_transient(sqlite3.OperationalError("database is locked"))
    assert not is_transient(sqlite3.OperationalError("no such table: t"))
