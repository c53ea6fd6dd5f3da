"""One measured workload, run in its own process by :mod:`benchmarks.run`.

``python -m benchmarks.workload operator|naive --db PATH --url URL --rows N [...]`` loads
rows 1..N of the SQLite table ``loyalty_members`` into the sandbox at URL and prints one
line ``BENCH_RESULT {json}`` with the wall time, the CPU time (user + sys) and the peak
RSS of this process.

The operator's ``execute()`` is called directly with a minimal context (a ``ti`` stub, no
``task_state_store``), so the numbers measure the provider, not Airflow's task start-up;
the naive loop runs in the same kind of process. Wall and CPU time cover only the load
itself (``execute()`` / ``naive_load()``), not the interpreter and Airflow imports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

MARKER = "BENCH_RESULT "
SQLITE_CONN_ID = "bench_sqlite"
MEWS_CONN_ID = "mews_bench"


class _TaskInstanceStub:
    """What the operator reads from ``context["ti"]``; XComs go nowhere."""

    dag_id = "benchmark"
    run_id = "benchmark_run"
    task_id = "add_memberships"
    map_index = -1
    try_number = 1

    def xcom_push(self, key: str, value: Any) -> None:
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.workload")
    parser.add_argument("kind", choices=("operator", "naive"))
    parser.add_argument("--db", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--if-exists", default="add", choices=("add", "skip"))
    parser.add_argument(
        "--rate", default="200/30", help="client-side limit REQUESTS/SECONDS (connection extra)"
    )
    args = parser.parse_args(argv)

    from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN, connection_json

    count, _, period = args.rate.partition("/")
    os.environ[f"AIRFLOW_CONN_{MEWS_CONN_ID.upper()}"] = connection_json(
        args.url, rate_limit_requests=int(count), rate_limit_period=float(period)
    )
    os.environ[f"AIRFLOW_CONN_{SQLITE_CONN_ID.upper()}"] = json.dumps(
        {"conn_type": "sqlite", "host": args.db}
    )
    sql = f"SELECT * FROM loyalty_members WHERE member_id <= {int(args.rows)} ORDER BY member_id"

    if args.kind == "operator":
        from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

        operator = LoyaltyMembershipAddOperator(
            task_id=_TaskInstanceStub.task_id,
            mews_conn_id=MEWS_CONN_ID,
            sql_conn_id=SQLITE_CONN_ID,
            sql=sql,
            field_map={"tier_id": "LoyaltyTierId"},
            if_exists=args.if_exists,
        )

        def load() -> dict[str, Any]:
            return operator.execute({"ti": _TaskInstanceStub()})

    else:
        from airflow.providers.sqlite.hooks.sqlite import SqliteHook  # noqa: F401 - import before timing

        from benchmarks.naive import naive_load

        def load() -> dict[str, Any]:
            return naive_load(SQLITE_CONN_ID, sql, args.url, DEMO_CLIENT_TOKEN, DEMO_ACCESS_TOKEN)

    setup_cpu = sum(_cpu())
    rss_before_kb = _status_kb("VmRSS")
    user0, sys0 = _cpu()
    start = time.perf_counter()
    summary = load()
    wall = time.perf_counter() - start
    user1, sys1 = _cpu()
    result = {
        "kind": args.kind,
        "if_exists": args.if_exists if args.kind == "operator" else None,
        "rows": args.rows,
        "wall_s": wall,
        "cpu_user_s": user1 - user0,
        "cpu_sys_s": sys1 - sys0,
        "cpu_s": (user1 - user0) + (sys1 - sys0),
        "setup_cpu_s": setup_cpu,
        "rss_before_kb": rss_before_kb,
        "peak_rss_kb": _status_kb("VmHWM"),
        "summary": {
            k: summary.get(k)
            for k in (
                "rows_read",
                "added",
                "skipped_existing",
                "rejected",
                "not_reached",
                "requests",
                "rate_limited",
            )
            if k in summary
        },
    }
    sys.stdout.flush()
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
