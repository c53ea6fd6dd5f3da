"""The upsert (``if_exists="update"``) against its ceiling: 100 000 rows of which 10% changed.

``python -m benchmarks.upsert [--rows 100000] [--changed 0.1] [--rate 20/3] [--latency 0.05]``

A sandbox process holds the ``--rows`` memberships already (a state file written first);
the SQLite source has the same rows, ``--changed`` of them with one more point. The
operator's ``execute()`` runs in this process with a minimal context. Ceiling: Mews's rate
limit (scaled by ``--rate``) at 1 getAll + at most 1 add + at most 1 update per 1000 rows,
the issue's definition. Prints one JSON line with rows/s, requests by operation, the
fraction of the ceiling, the process CPU and the machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from benchmarks.run import _free_port
from benchmarks.workload import _TaskInstanceStub

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"


def write_inputs(workdir: Path, rows: int, changed: float) -> tuple[Path, Path]:
    """The sandbox's state file (the memberships Mews holds) and the SQLite source."""
    state, db = workdir / "state.jsonl", workdir / "source.db"
    every = round(1 / changed) if changed else 0
    profile = {"Discriminator": "Integration", "EnterpriseProfile": None}
    with open(state, "w", encoding="utf-8") as fh, sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE members (member_id INTEGER PRIMARY KEY, account_id TEXT, loyalty_program_id TEXT, "
            "is_primary INTEGER, membership_number TEXT, points INTEGER)"
        )
        batch = []
        for n in range(rows):
            m = {
                "Id": str(uuid.uuid4()), "ChainId": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
                "AccountId": str(uuid.uuid4()), "LoyaltyProgramId": PROGRAM, "State": "Enrolled",
                "IsPrimary": True, "ProviderMembershipId": None, "Code": f"M-{n}", "MembershipNumber": f"M-{n}",
                "Points": n, "ExpirationDate": None, "Url": None, "LoyaltyTierId": None,
                "ActivityState": "Active", "DeletedUtc": None, "CreatorProfile": profile, "UpdaterProfile": profile,
            }  # fmt: skip
            fh.write(json.dumps({"m": m, "t": time.time()}) + "\n")
            points = n + 1 if every and n % every == 0 else n
            batch.append((n, m["AccountId"], PROGRAM, 1, m["MembershipNumber"], points))
        conn.executemany("INSERT INTO members VALUES (?, ?, ?, ?, ?, ?)", batch)
    return state, db


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.upsert")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--changed", type=float, default=0.1)
    parser.add_argument("--rate", default="20/3", help="REQUESTS/SECONDS, sandbox and client (Mews: 200/30)")
    parser.add_argument("--latency", type=float, default=0.05, help="sandbox seconds per add of 1000")
    parser.add_argument("--getall-latency", type=float, default=0.05)
    args = parser.parse_args(argv)
    count, _, period = args.rate.partition("/")
    ceiling = int(count) / float(period) * 1000 / 3  # rows/s at 3 requests per 1000 rows

    from airflow_provider_mews.testing import connection_json

    with tempfile.TemporaryDirectory(prefix="mews-upsert-bench-") as tmp:
        workdir = Path(tmp)
        state, db = write_inputs(workdir, args.rows, args.changed)
        port = _free_port()
        command = [
            sys.executable, "-m", "airflow_provider_mews.testing.sandbox", "--port", str(port),
            "--rate-limit", args.rate, "--latency", str(args.latency), "--getall-latency", str(args.getall_latency),
            "--state-file", str(state),
        ]  # fmt: skip
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            if "listening" not in proc.stdout.readline():
                raise SystemExit("the sandbox did not start")
            url = f"http://127.0.0.1:{port}"
            os.environ["AIRFLOW_CONN_MEWS_BENCH"] = connection_json(
                url, rate_limit_requests=int(count), rate_limit_period=float(period)
            )
            os.environ["AIRFLOW_CONN_BENCH_SQLITE"] = json.dumps({"conn_type": "sqlite", "host": str(db)})
            from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

            op = LoyaltyMembershipAddOperator(
                task_id="upsert", mews_conn_id="mews_bench", sql_conn_id="bench_sqlite",
                sql="SELECT * FROM members ORDER BY member_id", if_exists="update",
            )  # fmt: skip
            cpu0, wall0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), time.monotonic()
            summary = op.execute({"ti": _TaskInstanceStub()})
            wall = time.monotonic() - wall0
            cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0
            with urllib.request.urlopen(url + "/_sandbox/stats", timeout=30) as response:
                stats: dict[str, Any] = json.loads(response.read())
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    requests = {k.split(":", 1)[1].split("/")[-1]: v for k, v in stats.items() if k.startswith("requests:")}
    result = {
        "rows": args.rows,
        "changed": args.changed,
        "rate_limit": args.rate,
        "summary": {k: summary[k] for k in ("added", "updated", "unchanged", "rejected", "not_reached")},
        "requests": requests,
        "wall_s": round(wall, 1),
        "rows_per_s": round(args.rows / wall),
        "ceiling_rows_per_s": round(ceiling),
        "fraction_of_ceiling": round(args.rows / wall / ceiling, 3),
        "cpu_s": round(cpu, 1),
        "cpu_us_per_row": round(cpu / args.rows * 1e6, 1),
        "load_avg_1m": os.getloadavg()[0],
    }
    print(json.dumps(result))
    expected = round(args.rows * args.changed)
    return 0 if summary["updated"] == expected and summary["unchanged"] == args.rows - expected else 1


if __name__ == "__main__":
    raise SystemExit(main())
