"""Outcome tables stay fast: many runs of 100 000 rows into the same SQLite tables.

``python -m benchmarks.outcome_tables [--runs 100] [--rows 100000]`` drives
:class:`~airflow_provider_mews.runs.outputs.TableOutput` the way the operator does (one write
per batch of 1000: delete the batch's range when it may have been written, then insert),
one new DAG run after another into the same results and rejections tables, and prints the
median time (wall and CPU) per batch write of the first and the last runs, and of one run
into empty tables right after the last (the same load, so the fair comparison). ``--retry``
makes every run a retried try (its rows were there when it opened the tables), so each
batch also pays the indexed delete; ``--legacy`` drops the index and rewrites every batch,
as versions before the index did, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from airflow_provider_mews.runs.outputs import Outcome, Rejection, RunKey, TableOutput, index_name

RESULTS, REJECTIONS = "mews_membership_results", "mews_membership_rejections"
BATCH = 1000


class _SqliteHook:
    """What TableOutput needs of a common-sql hook: a DB-API connection and its placeholder."""

    placeholder = "?"

    def __init__(self, path: str) -> None:
        self.path = path

    def get_conn(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path)


def _batch(first_row: int) -> tuple[list[Outcome], list[Rejection]]:
    program = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
    outcomes = [
        Outcome(
            first_row + i,
            str(uuid.UUID(int=first_row + i)),
            program,
            f"MBR-{first_row + i:08d}",
            str(uuid.UUID(int=2**100 + first_row + i)),
            "added",
        )
        for i in range(BATCH - 1)
    ]
    rejections = [
        Rejection(first_row + BATCH - 1, "not-a-uuid", "AccountId", "invalid AccountId", None, "{}")
    ]
    return outcomes, rejections


def one_run(db: str, run_no: int, rows: int, retry: bool, legacy: bool) -> list[tuple[float, float]]:
    out = TableOutput(_SqliteHook(db), RunKey("bench", f"run_{run_no:04d}", "add", -1), RESULTS, REJECTIONS)
    out.open()
    if legacy:
        for table in (RESULTS, REJECTIONS):
            out._conn.execute(f"DROP INDEX IF EXISTS {index_name(table)}")
        out._conn.commit()
    if retry or legacy:
        out.had_rows = True
    times = []
    for first in range(1, rows + 1, BATCH):
        outcomes, rejections = _batch(first)
        wall, cpu = time.perf_counter(), time.process_time()
        out.write(first, first + BATCH - 1, outcomes, rejections)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    out.close()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.outcome_tables", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--retry", action="store_true", help="every run rewrites (as a retried try does)")
    parser.add_argument("--legacy", action="store_true", help="no index, every batch rewritten (before)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mews-outcomes-") as tmp:
        db = os.path.join(tmp, "outcomes.db")
        per_run: list[dict[str, Any]] = []
        for run_no in range(1, args.runs + 1):
            times = one_run(db, run_no, args.rows, args.retry, args.legacy)
            per_run.append({
                "run": run_no,
                "wall_ms_per_batch": statistics.median(t[0] for t in times) * 1e3,
                "cpu_ms_per_batch": statistics.median(t[1] for t in times) * 1e3,
            })  # fmt: skip
            if run_no in (1, 2) or run_no % 10 == 0:
                r = per_run[-1]
                print(f"run {run_no:3d}: {r['wall_ms_per_batch']:.2f} ms wall, {r['cpu_ms_per_batch']:.2f} ms CPU "
                      "per batch write (median)", file=sys.stderr, flush=True)  # fmt: skip
        size_mb = Path(db).stat().st_size / 2**20
        with sqlite3.connect(db) as conn:
            held = conn.execute(f"SELECT COUNT(*) FROM {RESULTS}").fetchone()[0]
        # The same run into empty tables now, under the machine's load of now: the fair baseline
        # for the last runs (CPU time per call drifts with the load of other processes).
        control = one_run(os.path.join(tmp, "control.db"), 1, args.rows, args.retry, args.legacy)
    first, last = per_run[:5], per_run[-5:]
    summary = {
        "runs": args.runs,
        "rows_per_run": args.rows,
        "mode": "legacy" if args.legacy else ("retry" if args.retry else "first try"),
        "rows_held_at_end": held,
        "db_mb_at_end": round(size_mb, 1),
        "first_5_runs_cpu_ms_per_batch": round(statistics.median(r["cpu_ms_per_batch"] for r in first), 3),
        "last_5_runs_cpu_ms_per_batch": round(statistics.median(r["cpu_ms_per_batch"] for r in last), 3),
        "first_5_runs_wall_ms_per_batch": round(statistics.median(r["wall_ms_per_batch"] for r in first), 3),
        "last_5_runs_wall_ms_per_batch": round(statistics.median(r["wall_ms_per_batch"] for r in last), 3),
        "control_empty_tables_cpu_ms_per_batch": round(statistics.median(t[1] for t in control) * 1e3, 3),
        "control_empty_tables_wall_ms_per_batch": round(statistics.median(t[0] for t in control) * 1e3, 3),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
