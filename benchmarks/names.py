"""Members named by e-mail (issue 18) against the token's ceiling, look-ups counted as requests.

``python -m benchmarks.names [--rows 100000] [--repeats 2] [--rate 200/30]`` writes a CRM
table of ``--rows`` members named only by e-mail (mixed case, stray spaces) and a programme
code, starts the sandbox (``--rate``, adds taking ``--latency`` s per 1000, reads
``--getall-latency`` s) seeded with as many guest profiles and the programme, and runs the
operator (``if_exists="add"``) in a child process, once per repeat, each time on a fresh
sandbox. Every run must add every row once. Written to ``benchmarks/results/names.json``.

The ceiling is the token's: ``rate`` requests, each worth 1000 rows. A run's share of it
counts every request it sent, adds and look-ups alike: ``requests / (rate * wall)``; the
row share (``rows_per_s / (rate * 1000)``) is given too: a look-up is a request not spent
on an add, so rows by e-mail can never reach the rows-by-Id ceiling.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.run import ROOT, BenchmarkError, _child_env, _sandbox_call, log, sandbox
from benchmarks.workload import MARKER, MEWS_CONN_ID, SQLITE_CONN_ID, _TaskInstanceStub

RESULTS = ROOT / "benchmarks" / "results" / "names.json"
PROGRAM_CODE = "GOLDCLUB"


def write_crm(path: Path, rows: int) -> None:
    """Members 1..rows: guest n's e-mail as a CRM holds it (case and spaces vary), the programme code."""
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE IF EXISTS crm")
        conn.execute(
            "CREATE TABLE crm (member_id INTEGER PRIMARY KEY, email TEXT, programme_code TEXT, is_primary)"
        )
        conn.executemany(
            "INSERT INTO crm VALUES (?, ?, ?, 1)",
            (
                (n, f" Guest{n}@Example.com" if n % 2 else f"guest{n}@EXAMPLE.COM ", PROGRAM_CODE)
                for n in range(1, rows + 1)
            ),
        )


def child(db: str, url: str, rate: str) -> None:
    """One load in this process: the operator's ``execute()`` (as benchmarks.workload runs it)."""
    from airflow_provider_mews.testing import connection_json

    count, _, period = rate.partition("/")
    os.environ[f"AIRFLOW_CONN_{MEWS_CONN_ID.upper()}"] = connection_json(
        url, rate_limit_requests=int(count), rate_limit_period=float(period)
    )
    os.environ[f"AIRFLOW_CONN_{SQLITE_CONN_ID.upper()}"] = json.dumps({"conn_type": "sqlite", "host": db})
    from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

    operator = LoyaltyMembershipAddOperator(
        task_id=_TaskInstanceStub.task_id,
        mews_conn_id=MEWS_CONN_ID,
        sql_conn_id=SQLITE_CONN_ID,
        sql="SELECT * FROM crm ORDER BY member_id",
        field_map={"email": "AccountEmail", "programme_code": "LoyaltyProgramCode"},
        if_exists="add",
    )
    start = time.perf_counter()
    summary = operator.execute({"ti": _TaskInstanceStub()})
    wall = time.perf_counter() - start
    keep = ("rows_read", "added", "rejected", "not_reached", "requests", "lookups", "rate_limited")
    print(MARKER + json.dumps({"wall_s": wall, "summary": {k: summary.get(k) for k in keep}}), flush=True)


def measure(args: argparse.Namespace, db: Path, workdir: Path) -> dict[str, Any]:
    requests_per_s = int(args.rate.split("/")[0]) / float(args.rate.split("/")[1])
    extra = ["--seed-customers", str(args.rows), "--seed-program", f"{PROGRAM_CODE}:GOLD,BASE"]
    with sandbox(workdir, args.latency, args.getall_latency, args.rate, extra=extra) as url:
        command = [sys.executable, "-m", "benchmarks.names", "--child", str(db), url, "--rate", args.rate]
        proc = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=3600, env=_child_env()
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
        if proc.returncode != 0 or not lines:
            raise BenchmarkError(
                f"the load failed ({proc.returncode}):\n{(proc.stderr or proc.stdout)[-3000:]}"
            )
        result: dict[str, Any] = json.loads(lines[-1][len(MARKER) :])
        stats = _sandbox_call(url, "/_sandbox/stats")
    summary = result["summary"]
    if summary["added"] != args.rows or stats.get("stored", 0) != args.rows:
        raise BenchmarkError(
            f"{args.rows} rows expected in Mews: the load said {summary}, the sandbox {stats}"
        )
    wall = result["wall_s"]
    result.update(
        limiter_bound_share=limiter_bound(summary["requests"], args.rate, args.latency),
        load_average_1min_after=os.getloadavg()[0],
    )
    result.update(
        rows=args.rows,
        sandbox_429=stats.get("429", 0),
        rows_per_s=args.rows / wall,
        share_of_ceiling=summary["requests"] / (requests_per_s * wall),
        row_share_of_ceiling=args.rows / (requests_per_s * 1000 * wall),
        lookups_per_1000_rows=summary["lookups"] / args.rows * 1000,
    )
    return result


def limiter_bound(requests: int, rate: str, latency_s: float) -> float:
    """The best share ``requests`` can reach under the provider's limiter: windows of a tenth
    of the period plus FRONT_MARGIN (20 per 3.3 s at 200/30), the last window's add taking
    ``latency_s``. 202 requests need an 11th window: at most 0.891 of the token's ceiling."""
    from airflow_provider_mews.rate_limit.gcra import FRONT_MARGIN, FRONT_WINDOWS

    count, _, period = rate.partition("/")
    per_window = int(count) // FRONT_WINDOWS
    window_s = float(period) / FRONT_WINDOWS * (1 + FRONT_MARGIN)
    wall = (math.ceil(requests / per_window) - 1) * window_s + latency_s
    return requests / (int(count) / float(period) * wall)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.names")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--rate", default="200/30", help="REQUESTS/SECONDS, the sandbox's and the connection's"
    )
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per add of 1000 items")
    parser.add_argument("--getall-latency", type=float, default=0.05, help="seconds per getAll")
    parser.add_argument("--child", nargs=2, metavar=("DB", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.rate)
        return
    with tempfile.TemporaryDirectory(prefix="mews-bench-names-") as tmp:
        workdir = Path(tmp)
        db = workdir / "crm.db"
        write_crm(db, args.rows)
        runs = []
        for n in range(1, args.repeats + 1):
            load_before = os.getloadavg()[0]
            result = measure(args, db, workdir)
            result["load_average_1min_before"] = load_before
            runs.append(result)
            log(
                f"names run {n}/{args.repeats}: {args.rows} rows by e-mail in {result['wall_s']:.1f} s, "
                f"{result['summary']['requests']} requests ({result['summary']['lookups']} look-ups): "
                f"{result['share_of_ceiling']:.3f} of the token's requests, {result['rows_per_s']:.0f} rows/s"
            )
    shares = [r["share_of_ceiling"] for r in runs]
    out = {
        "command": "python -m benchmarks.names " + " ".join(sys.argv[1:]),
        "rows": args.rows,
        "rate": args.rate,
        "latency_s": args.latency,
        "getall_latency_s": args.getall_latency,
        "share_of_ceiling": {"best": max(shares), "worst": min(shares), "median": statistics.median(shares)},
        "target": ">= 0.90",
        "limiter_bound": "best share the limiter's 20-per-3.3-s windows allow this many requests",
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    log(
        f"share of the token's ceiling (look-ups counted): best {max(shares):.3f}, worst {min(shares):.3f} -> {RESULTS}"
    )


if __name__ == "__main__":
    main()
