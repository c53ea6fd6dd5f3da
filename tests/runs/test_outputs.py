"""Outcome tables on real SQLite: the rewrite's index, and rewrites only where a row may exist.

What a retried try relies on: a batch an earlier try wrote is replaced, never duplicated; a
try that starts on a task instance with no rows inserts without deleting; and the delete and
the check are index lookups (created with new tables and added to tables of older versions),
so tables holding many runs stay fast. PostgreSQL: ``tests/operators/test_postgres.py``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from airflow.providers.sqlite.hooks.sqlite import SqliteHook

from airflow_provider_mews.runs.outputs import (
    INDEX_COLUMNS,
    Outcome,
    Rejection,
    RunKey,
    TableOutput,
    index_name,
)

RESULTS, REJECTIONS = "mews_results", "mews_rejections"
KEY = RunKey("dag", "manual__2026-01-01", "add_memberships", -1)
OLD_RESULTS_DDL = (
    "CREATE TABLE mews_results (dag_id VARCHAR(255), run_id VARCHAR(255), task_id VARCHAR(255), "
    "map_index INTEGER, source_row INTEGER, account_id VARCHAR(36), loyalty_program_id VARCHAR(36), "
    "code VARCHAR(255), mews_membership_id VARCHAR(36), outcome VARCHAR(32))"
)


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "outcomes.db"
    monkeypatch.setenv("AIRFLOW_CONN_OUTCOMES_DB", f'{{"conn_type": "sqlite", "host": "{path}"}}')
    return path


def table_output(key: RunKey = KEY) -> TableOutput:
    out = TableOutput(SqliteHook(sqlite_conn_id="outcomes_db"), key, RESULTS, REJECTIONS)
    out.open()
    return out


def batch(first: int, last: int, tag: str) -> tuple[list[Outcome], list[Rejection]]:
    outcomes = [Outcome(r, f"acc-{r}", "prog", None, f"{tag}-{r}", "added") for r in range(first, last)]
    return outcomes, [Rejection(last, f"acc-{last}", "Points", f"{tag}: bad points")]


def index_columns(db: Path, table: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        names = [row[1] for row in conn.execute(f"PRAGMA index_list({table})")]
        assert index_name(table) in names, names
        return [row[2] for row in conn.execute(f"PRAGMA index_info({index_name(table)})")]


def rows(db: Path, table: str, key: RunKey = KEY) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            f"SELECT source_row, * FROM {table} WHERE run_id = ? AND map_index = ? ORDER BY source_row",
            (key.run_id, key.map_index),
        ).fetchall()


def statements(out: TableOutput) -> list[str]:
    seen: list[str] = []
    out._conn.set_trace_callback(seen.append)
    return seen


def test_new_tables_are_created_with_the_rewrite_index(db):
    table_output().close()
    for table in (RESULTS, REJECTIONS):
        assert index_columns(db, table) == list(INDEX_COLUMNS)


def test_tables_of_older_versions_get_the_index_when_opened(db):
    with sqlite3.connect(db) as conn:
        conn.execute(OLD_RESULTS_DDL)
        conn.execute("INSERT INTO mews_results (dag_id, run_id, task_id, map_index, source_row) "
                     "VALUES ('old', 'old_run', 't', -1, 1)")  # fmt: skip
    table_output().close()
    assert index_columns(db, RESULTS) == list(INDEX_COLUMNS)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM mews_results").fetchone()[0] == 1  # kept


def test_the_rewrite_is_an_index_lookup(db):
    table_output().close()
    with sqlite3.connect(db) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN DELETE FROM mews_results WHERE dag_id = ? AND run_id = ? AND task_id = ? "
            "AND map_index = ? AND source_row BETWEEN ? AND ?",
            (*KEY.__dict__.values(), 1, 1000),
        ).fetchall()
    assert any(index_name(RESULTS) in str(step) for step in plan), plan


def test_a_first_try_inserts_without_deleting(db):
    out = table_output()
    assert out.had_rows is False
    seen = statements(out)
    out.write(1, 1000, *batch(1, 1000, "try1"))
    out.close()
    assert not [s for s in seen if s.startswith("DELETE")], seen
    assert len(rows(db, RESULTS)) == 999 and len(rows(db, REJECTIONS)) == 1


def test_a_retried_try_replaces_what_an_earlier_try_wrote_and_adds_the_rest(db):
    first = table_output()
    for start in (1, 1001, 2001):  # the first try wrote three batches, then died
        first.write(start, start + 999, *batch(start, start + 999, "try1"))
    first.close()
    other = RunKey("dag", "manual__2026-01-02", "add_memberships", -1)
    table_output(other).write(1, 1000, *batch(1, 1000, "other"))  # another run: never touched

    retry = table_output()
    assert retry.had_rows is True
    seen = statements(retry)
    for start in (2001, 3001):  # batch 3 redone (it may have been in flight), batch 4 new
        retry.write(start, start + 999, *batch(start, start + 999, "try2"))
    retry.close()
    assert len([s for s in seen if s.startswith("DELETE")]) == 4  # both tables, both batches

    results = rows(db, RESULTS)
    assert [r[0] for r in results] == [r for s in (1, 1001, 2001, 3001) for r in range(s, s + 999)]
    ids = {r[0]: r[-4] for r in results}  # results end with mews_membership_id, outcome, changed_fields, tier
    assert ids[1] == "try1-1" and ids[2001] == "try2-2001" and ids[3998] == "try2-3998"
    assert [r[0] for r in rows(db, REJECTIONS)] == [1000, 2000, 3000, 4000]
    assert [r[-3] for r in rows(db, REJECTIONS)][2:] == ["try2: bad points"] * 2
    assert len(rows(db, RESULTS, other)) == 999


def test_a_batch_known_never_written_skips_the_delete_on_a_retry(db):
    table_output().write(1, 1000, *batch(1, 1000, "try1"))
    retry = table_output()
    seen = statements(retry)
    retry.write(1001, 2000, *batch(1001, 2000, "try2"), may_have_been_written=False)
    retry.write(1, 1000, *batch(1, 1000, "try2"))
    retry.close()
    deletes = [s for s in seen if s.startswith("DELETE")]
    assert len(deletes) == 2 and all("BETWEEN 1 AND 1000" in s for s in deletes), deletes
    assert len(rows(db, RESULTS)) == 2 * 999
