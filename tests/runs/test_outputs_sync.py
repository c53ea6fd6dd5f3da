"""Outputs of the sync modes: the fields an update changed, and a mirror's removals (no source row)."""

from __future__ import annotations

import json
import sqlite3
from types import SimpleNamespace

from airflow_provider_mews.runs.outputs import FileOutput, Outcome, RunKey, TableOutput

KEY = RunKey("dag", "run", "task", -1)


def sqlite_hook(path: str) -> SimpleNamespace:
    return SimpleNamespace(get_conn=lambda: sqlite3.connect(path), placeholder="?")


def test_results_table_gains_changed_fields_and_removals(tmp_path):
    db = str(tmp_path / "out.db")
    with sqlite3.connect(db) as conn:  # a results table made by an earlier version
        conn.execute(
            "CREATE TABLE results (dag_id TEXT, run_id TEXT, task_id TEXT, map_index INTEGER, source_row INTEGER, "
            "account_id TEXT, loyalty_program_id TEXT, code TEXT, mews_membership_id TEXT, outcome TEXT)"
        )
        conn.execute("INSERT INTO results VALUES ('d', 'r', 't', -1, 1, 'a', 'p', NULL, 'm0', 'added')")
    out = TableOutput(sqlite_hook(db), KEY, "results", None)
    out.open()
    out.write(
        1,
        2,
        [
            Outcome(1, "a", "p", None, "m1", "updated", "Points,LoyaltyTierId"),
            Outcome(2, "b", "p", "N", "m2", "unchanged"),
        ],
        [],
    )
    out.write_removals([Outcome(None, "c", "p", None, "m3", "canceled")])
    out.write_removals([Outcome(None, "d", "p", None, "m4", "deleted")])
    out.close()
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT source_row, mews_membership_id, outcome, changed_fields FROM results WHERE dag_id = 'dag' ORDER BY rowid"
        ).fetchall()
    assert rows == [
        (1, "m1", "updated", "Points,LoyaltyTierId"),
        (2, "m2", "unchanged", None),
        (None, "m3", "canceled", None),
        (None, "m4", "deleted", None),
    ]


def test_results_file_carries_changed_fields_and_removals(tmp_path):
    path = tmp_path / "results.jsonl"
    out = FileOutput(KEY, str(path), None)
    out.write(1, 1, [Outcome(1, "a", "p", None, "m1", "updated", "State")], [])
    out.write_removals([Outcome(None, "c", "p", None, "m3", "deleted")])
    out.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["source_row"], r["outcome"], r["changed_fields"]) for r in lines] == [
        (1, "updated", "State"),
        (None, "deleted", None),
    ]
