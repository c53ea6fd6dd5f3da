"""The benchmark's DAG: the SQLite example as users run it, sized by MEWS_BENCH_ROWS.

``benchmarks/in_airflow.py`` runs it with ``airflow dags test`` and counts the CPU of the
whole process tree. Batches of 1000, ``if_exists="add"``; with MEWS_BENCH_OUTPUTS=1 the outcomes are also written to tables.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import pendulum

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.11
    from airflow import DAG  # type: ignore[no-redef,attr-defined]

ROWS = int(os.environ.get("MEWS_BENCH_ROWS", "1000"))
#: Where to write the process CPU (all threads) at the task's start and end: ``airflow dags test``
#: runs the task in its own process on Airflow 3.3, so this is the task's CPU, start-up excluded;
#: the thread time is the task's own thread (pre/post_execute run in the thread of execute()).
CPU_FILE = os.environ.get("MEWS_BENCH_CPU_FILE")


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + sys) of each live thread of this process, by native thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in os.scandir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"{task.path}/stat", encoding="ascii") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[task.name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def _mark(context: Any, result: Any = None) -> None:
    """One JSON line: pid, the process's CPU, the task thread's CPU and its native id, every thread's CPU."""
    if CPU_FILE:
        mark = {
            "pid": os.getpid(),
            "process_s": time.process_time(),
            "thread_s": time.thread_time(),
            "thread_id": threading.get_native_id(),
            "threads_s": _thread_cpu_s(),
        }
        with open(CPU_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(mark) + "\n")


OUTPUTS = os.environ.get("MEWS_BENCH_OUTPUTS", "0") == "1"

with DAG(
    dag_id="mews_bench_in_airflow",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
):
    LoyaltyMembershipAddOperator(
        task_id="add_memberships",
        mews_conn_id="mews_default",
        sql_conn_id="mews_bench_sqlite",
        sql=f"SELECT * FROM loyalty_members WHERE member_id <= {ROWS} ORDER BY member_id",
        field_map={"tier_id": "LoyaltyTierId"},
        if_exists="add",
        batch_size=1000,
        results_table="mews_membership_results" if OUTPUTS else None,
        rejections_table="mews_membership_rejections" if OUTPUTS else None,
        retries=0,
        pre_execute=_mark,
        post_execute=_mark,
    )
