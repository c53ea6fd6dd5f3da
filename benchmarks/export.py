"""Export benchmark: MewsToSqlOperator reading a year of memberships into SQLite, against the
sandbox at Mews's rate limit (200 requests / 30 s).

For each size (10 000 and 1 000 000 memberships by default) and each repeat, a sandbox
subprocess is seeded with that many memberships on the UTC midnights of 2025 (many on the
3-month slice boundaries) and serves them rate-limited; a second subprocess runs the operator
(``updated_utc`` = the year, cut into 8 slices of 45 d 15 h read by 8 threads, the 7 boundary
reads beside them, upserted in chunks of 5000) and reports its wall time and peak RSS, with
the load average before and after each run. Measured:

- ``share_of_ceiling``: records per second / the token's ceiling (200 / 30 s x 1000 records per
  request = 6 667 records/s), the wall time from ``execute`` to its return. Target: at least
  0.90. The client's limiter sends at most 20 requests per 3.3 s while the rate is whole
  (rate_limit/gcra.py, FRONT_MARGIN), 0.909 of the token's rate: the share cannot exceed it;
- ``peak_rss_mb``: the exporting process's peak resident memory; the 1 000 000-record run must
  stay within 100 MB of the 10 000-record run (flat memory).

    python -m benchmarks.export [--sizes 10000 1000000] [--repeats 2] [--out benchmarks/results/export.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RATE_REQUESTS, RATE_PERIOD_S = 200, 30.0
CEILING = RATE_REQUESTS / RATE_PERIOD_S * 1000  # records per second
START, END = "2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z"
ROOT = Path(__file__).resolve().parents[1]


def serve(count: int) -> None:
    """The sandbox, seeded with ``count`` memberships over 2025; prints its URL, then serves."""
    from airflow_provider_mews.testing.sandbox import MewsSandbox, SandboxConfig

    config = SandboxConfig(rate_limit_requests=RATE_REQUESTS, rate_limit_period_s=RATE_PERIOD_S)
    config.seed_on_boundaries = True
    sandbox = MewsSandbox(config=config)
    started = time.monotonic()
    sandbox.seed_memberships(count, start_utc=START, end_utc=END)
    print(json.dumps({"url": sandbox.url, "seed_s": round(time.monotonic() - started, 1)}), flush=True)
    sandbox.serve_forever()


def export(url: str, db: str) -> None:
    """Runs the operator once against ``url`` into the SQLite file ``db``; prints the figures."""
    from airflow_provider_mews.testing import connection_json

    os.environ["AIRFLOW_CONN_MEWS_BENCH"] = connection_json(
        url, rate_limit_requests=RATE_REQUESTS, rate_limit_period=RATE_PERIOD_S
    )
    os.environ["AIRFLOW_CONN_BENCH_DB"] = json.dumps({"conn_type": "sqlite", "host": db})
    from airflow_provider_mews.transfers.mews_to_sql import MewsToSqlOperator

    op = MewsToSqlOperator(
        task_id="bench",
        mews_conn_id="mews_bench",
        operation="loyaltyMemberships/getAll",
        sql_conn_id="bench_db",
        table="memberships",
        updated_utc=(START, END),
    )
    import logging

    logging.getLogger("airflow.task").setLevel(logging.WARNING)
    started = time.monotonic()
    summary = op.execute({})
    elapsed = time.monotonic() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "records": summary["records"],
                "requests": summary["requests"],
                "elapsed_s": round(elapsed, 2),
                "peak_rss_mb": round(peak_kb / 1024, 1),
            }
        ),
        flush=True,
    )


def one_run(count: int) -> dict[str, object]:
    load_before = os.getloadavg()[0]
    env = {**os.environ, "MEWS_RATE_LIMIT_DIR": tempfile.mkdtemp(prefix="mews-bench-limit-")}
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.export", "--serve", str(count)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        ready = json.loads(server.stdout.readline())
        with tempfile.TemporaryDirectory(prefix="mews-bench-db-") as tmp:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.export", "--export", ready["url"], str(Path(tmp) / "w.db")],
                capture_output=True, text=True, cwd=ROOT, env=env, check=False,
            )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"export failed:\n{done.stderr[-3000:]}")
        figures = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(timeout=30)
    records = int(figures["records"])
    rate = records / float(figures["elapsed_s"])
    return {
        "size": count,
        **figures,
        "seed_s": ready["seed_s"],
        "records_per_s": round(rate),
        "share_of_ceiling": round(rate / CEILING, 3),
        "complete": records == count,
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export.json"))
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--export", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve)
    if args.export:
        return export(*args.export)
    runs = []
    for size in args.sizes:
        for _ in range(args.repeats):
            result = one_run(size)
            print(json.dumps(result), flush=True)
            runs.append(result)
    by_size: dict[str, object] = {}
    for size in args.sizes:
        mine = [r for r in runs if r["size"] == size]
        shares = [float(r["share_of_ceiling"]) for r in mine]  # type: ignore[arg-type]
        rss = [float(r["peak_rss_mb"]) for r in mine]  # type: ignore[arg-type]
        by_size[str(size)] = {
            "share_best": max(shares), "share_worst": min(shares),
            "peak_rss_mb_best": min(rss), "peak_rss_mb_worst": max(rss),
        }  # fmt: skip
    small, big = str(min(args.sizes)), str(max(args.sizes))
    report = {
        "command": "python -m benchmarks.export " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "rate_limit": f"{RATE_REQUESTS} requests / {RATE_PERIOD_S:g} s (sandbox and client)",
        "ceiling_records_per_s": round(CEILING),
        "runs": runs,
        "summary": by_size,
        "rss_growth_mb_worst": round(
            by_size[big]["peak_rss_mb_worst"] - by_size[small]["peak_rss_mb_best"],  # type: ignore[index]
            1,
        ),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2), f"RSS growth (worst): {report['rss_growth_mb_worst']} MB")


if __name__ == "__main__":
    main()
