"""Redis restarted under CeleryExecutor workers sharing an AccessToken through it (issue 21.3).

``python -m benchmarks.redis_restart`` runs the scale-out proof's CeleryExecutor stack
(:mod:`benchmarks.scale_out`: api-server, scheduler, dag-processor, two ``airflow celery worker``
processes standing for two hosts, the sandbox enforcing 20 requests / 3 s) with a *second*
``redis-server`` as the limiter's store (the ``mews_redis`` connection the Mews connection names
in ``extra.rate_limit_redis_conn_id``); Celery's broker and result backend stay on the first.
A few thousand rows in batches of 100 (so the run lasts long enough), 4 mapped shards. Once the
sandbox has stored ``--stop-after`` rows, the limiter's Redis is killed (SIGKILL, as a crash),
and started again, empty, ``--down-s`` seconds later. Checks (every one fails the run):

* the DAG run succeeded, on both workers, and every row is in Mews once and in the results
  table once with the Id Mews holds (no row twice);
* each task try that lost Redis logged the fallback once (``is unreachable``), and at least one did;
* each try that lost Redis and ran on for ``REDIS_RETRY_S`` + 2 s after the restart logged once
  that it shares the budget through Redis again (``is reachable again``), and at least one did;
* the restarted (empty) Redis holds the token's state afterwards: the budget is shared again.

Why a second Redis: stopping the broker's Redis stops Celery itself (no task is delivered or
acknowledged while it is down, and a task not yet acknowledged may be delivered again); that is
Celery's fault, proven by Celery and Airflow. What the provider owns is the limiter's store; a
deployment that shares one Redis meets the same limiter behaviour (it falls back and comes back
the same way) plus Celery's own reconnection.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from benchmarks import scale_out
from benchmarks.scale_out import Stack, free_port, log, redis_keys, redis_ping

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "is unreachable"
BACK = "is reachable again"

DAG = '''
"""Like dags_examples/mews_loyalty_sharded.py, in batches of 100 (a longer run on few rows)."""
import os

import pendulum

from airflow.sdk import DAG
from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

SHARDS = int(os.environ.get("MEWS_EXAMPLE_SHARDS", "4"))

with DAG(dag_id="mews_loyalty_sharded", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
         catchup=False):
    LoyaltyMembershipAddOperator.partial(
        task_id="add_shard",
        mews_conn_id="mews_default",
        sql_conn_id="mews_demo_sqlite",
        pool="mews_api",
        field_map={"tier_id": "LoyaltyTierId"},
        batch_size=100,
        max_rejected_rows=100,
        results_table="mews_membership_results",
        rejections_table="mews_membership_rejections",
    ).expand(
        sql=[f"SELECT * FROM loyalty_members WHERE member_id % {SHARDS} = {s} ORDER BY member_id" for s in range(SHARDS)]
    )
'''


class RedisRestart:
    """The fault: the limiter's own redis-server, killed and started again mid-run."""

    def __init__(self, redis_server: str, stop_after_rows: int, down_s: float) -> None:
        self.redis_server = redis_server
        self.stop_after_rows = stop_after_rows
        self.down_s = down_s
        self.port = free_port()
        self.stack: Stack | None = None
        self.work: Path | None = None
        self.stopped_at: float | None = None  # wall clock
        self.restarted_at: float | None = None
        self.generation = 0

    def _start(self) -> None:
        assert self.stack is not None and self.work is not None
        self.generation += 1
        self.stack.start(
            f"redis-limiter-{self.generation}",
            [self.redis_server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.work), "--protected-mode", "yes"],
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            with suppress(OSError):
                if redis_ping(self.port):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("the limiter's redis-server did not answer PING within 30 s")
            time.sleep(0.05)

    def setup(self, stack: Stack, env: dict[str, str], work: Path) -> None:
        self.stack, self.work = stack, work
        (work / "dags" / f"{scale_out.DAG_ID}.py").write_text(DAG)
        self._start()
        # The limiter's store: this server (db 0), not the broker's.
        env["AIRFLOW_CONN_MEWS_REDIS"] = json.dumps(
            {"conn_type": "redis", "host": "127.0.0.1", "port": self.port}
        )

    def tick(self, sandbox_url: str) -> None:
        assert self.stack is not None
        if self.stopped_at is None:
            stored = int(requests.get(f"{sandbox_url}/_sandbox/stats", timeout=30).json().get("stored", 0))
            if stored >= self.stop_after_rows:
                name = f"redis-limiter-{self.generation}"
                proc = next(p for n, p in self.stack.procs if n == name)
                self.stack.procs = [(n, p) for n, p in self.stack.procs if n != name]
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                self.stopped_at = time.time()
                log(f"FAULT: killed the limiter's Redis at {stored} rows stored")
        elif self.restarted_at is None and time.time() >= self.stopped_at + self.down_s:
            self._start()
            self.restarted_at = time.time()
            log(
                f"FAULT: the limiter's Redis started again (empty) after {self.restarted_at - self.stopped_at:.1f} s"
            )

    def finish(self, result: dict[str, Any], work: Path, tis: list[dict[str, Any]]) -> None:
        from airflow_provider_mews.rate_limit import REDIS_RETRY_S

        checks = result["checks"]
        checks["redis_was_restarted"] = self.stopped_at is not None and self.restarted_at is not None
        restarted = self.restarted_at or float("inf")
        end_of = {
            ti["map_index"]: datetime.fromisoformat(ti["end_date"].replace("Z", "+00:00")).timestamp()
            for ti in tis
            if ti.get("end_date")
        }
        tries: list[dict[str, Any]] = []
        for path in sorted((work / "airflow" / "logs").rglob("attempt=*.log")):
            text = path.read_text(errors="replace")
            m = re.search(r"map_index=(\d+)", str(path))
            map_index = int(m.group(1)) if m else -1
            tries.append(
                {
                    "log": str(path.relative_to(work)),
                    "map_index": map_index,
                    "fallback_logged": text.count(UNREACHABLE),
                    "back_logged": text.count(BACK),
                    "ran_past_recovery": end_of.get(map_index, 0.0) > restarted + REDIS_RETRY_S + 2,
                }
            )
        fell_back = [t for t in tries if t["fallback_logged"]]
        must_come_back = [t for t in fell_back if t["ran_past_recovery"]]
        checks["fallback_logged_once_per_try"] = bool(fell_back) and all(
            t["fallback_logged"] == 1 and t["back_logged"] <= 1 for t in tries
        )
        checks["back_on_redis_logged_once"] = bool(must_come_back) and all(
            t["back_logged"] == 1 for t in must_come_back
        )
        keys = redis_keys(self.port, 0)
        checks["budget_back_in_restarted_redis"] = any(
            k.startswith("airflow-provider-mews:gcra:") for k in keys
        )
        # scale_out looked for the state in the broker's Redis; here it lives in the limiter's.
        checks["shared_state_in_redis"] = checks["budget_back_in_restarted_redis"]
        # Accepted requests per second: before the fault, while Redis was down, after recovery.
        timings = json.loads((work / "logs-components" / "sandbox-requests.json").read_text())
        stopped = self.stopped_at or float("inf")

        def rate(lo: float, hi: float) -> float | None:
            n = sum(1 for r in timings if lo <= r["arrived"] < hi and r["status"] != 429)
            return round(n / (hi - lo), 2) if hi > lo else None

        first = min(r["arrived"] for r in timings)
        last = max(r["arrived"] for r in timings)
        result["redis_restart"] = {
            "limiter_redis_port": self.port,
            "down_s": round(restarted - stopped, 1) if self.restarted_at else None,
            "stop_after_rows": self.stop_after_rows,
            "tries": tries,
            "limiter_keys_after": keys,
            "accepted_per_s_before": rate(first, stopped),
            "accepted_per_s_while_down": rate(stopped + 1, restarted),
            "accepted_per_s_after_recovery": rate(restarted + REDIS_RETRY_S + 1, last),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.redis_restart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=12_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stop-after", type=int, default=2_000, help="rows stored when the Redis is killed")
    parser.add_argument("--down-s", type=float, default=6.0, help="seconds the limiter's Redis stays down")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "redis-restart.json"))
    parser.add_argument("--keep", action="store_true")
    opts = parser.parse_args(argv)
    args = argparse.Namespace(
        executor="celery",
        shards=opts.shards,
        rows=opts.rows,
        workers=opts.workers,
        worker_concurrency=max(1, -(-opts.shards // opts.workers)),
        timeout=opts.timeout,
        metadata_db=None,
        redis_server=opts.redis_server,
        sandbox_arg=[],
        artifacts=str(ROOT / ".artifacts" / "redis-restart"),
        keep=opts.keep,
    )
    fault = RedisRestart(opts.redis_server, opts.stop_after, opts.down_s)
    with scale_out.signals_raise():
        result = scale_out.run(args, fault)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    enforced = [*scale_out.CORRECTNESS, "shared_state_in_redis", "redis_was_restarted",
                "fallback_logged_once_per_try", "back_on_redis_logged_once", "budget_back_in_restarted_redis"]  # fmt: skip
    checks = result["checks"]
    info = result.get("redis_restart", {})
    print()
    print(f"Redis restart under CeleryExecutor: {result['rows']} rows, {result['shards']} shards, "
          f"hosts {', '.join(result['hosts'])}; limiter Redis down {info.get('down_s')} s")  # fmt: skip
    print(f"  stored {result['stored']}, duplicates {result['duplicates']}, missing {result['missing']}, "
          f"results table {'ok' if result['results_table_ok'] else 'WRONG'}; 429s {result['429']}")  # fmt: skip
    print(f"  accepted requests/s: before {info.get('accepted_per_s_before')}, while down "
          f"{info.get('accepted_per_s_while_down')}, after recovery {info.get('accepted_per_s_after_recovery')}")  # fmt: skip
    for t in info.get("tries", []):
        print(f"  shard {t['map_index']}: fallback logged {t['fallback_logged']}x, back logged {t['back_logged']}x"
              f"{'' if t['ran_past_recovery'] else ' (ended before recovery was due)'}")  # fmt: skip
    missed = [k for k in enforced if not checks.get(k, False)]
    for k in enforced:
        print(f"  {'ok    ' if k not in missed else 'FAILED'} {k}")
    print(f"JSON: {out}")
    if missed:
        print("REDIS RESTART PROOF FAILED: " + ", ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
