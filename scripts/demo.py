"""The main job on the embedded default: local Mews sandbox + SQLite + the real Airflow CLI.

Run with ``make demo``. It starts the sandbox, creates a SQLite table of sample members
(a few of them invalid on purpose), tests the Mews connection with ``airflow connections
test``, runs the example DAG ``mews_loyalty_from_sqlite`` with ``airflow dags test`` and
prints what ended where. Everything lives in ``.demo/``; run it again to see that a
second run adds nothing twice.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".demo"
DB = HOME / "members.db"
ROWS = int(os.environ.get("MEWS_DEMO_ROWS", "5000"))
INVALID = 5
DAG_ID = "mews_loyalty_from_sqlite"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def airflow_env(sandbox_url: str) -> dict[str, str]:
    from airflow_provider_mews.testing import connection_json

    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(HOME / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags_examples"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW_CONN_MEWS_DEFAULT": connection_json(sandbox_url),
            "AIRFLOW_CONN_MEWS_DEMO_SQLITE": json.dumps({"conn_type": "sqlite", "host": str(DB)}),
        }
    )
    return env


def run(cmd: list[str], env: dict[str, str], quiet: bool = False) -> None:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    out = subprocess.run(cmd, env=env, cwd=ROOT, text=True, capture_output=quiet)
    if out.returncode != 0:
        if quiet:
            print(out.stdout[-4000:], out.stderr[-4000:])
        raise SystemExit(f"demo: {' '.join(cmd)} failed with exit code {out.returncode}")


def main() -> None:
    from airflow_provider_mews.testing.sample_data import write_sqlite

    HOME.mkdir(exist_ok=True)
    bin_dir = Path(sys.executable).parent
    port = free_port()
    sandbox = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_mews.testing.sandbox",
            "--port",
            str(port),
            "--state-file",
            str(HOME / "sandbox-state.jsonl"),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/_sandbox/stats", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        print(f"Mews sandbox running at {url}")
        if not DB.exists():
            write_sqlite(str(DB), ROWS, invalid=INVALID)
            print(f"Created {DB} with {ROWS} sample members ({INVALID} of them invalid on purpose).")
        env = airflow_env(url)
        run([str(bin_dir / "airflow"), "db", "migrate"], env, quiet=True)
        run([str(bin_dir / "airflow"), "connections", "test", "mews_default"], env)
        run([str(bin_dir / "airflow"), "dags", "test", DAG_ID], env)
        report(url)
    finally:
        sandbox.terminate()
        sandbox.wait(10)


def report(url: str) -> None:
    stats = json.loads(urllib.request.urlopen(url + "/_sandbox/stats").read())
    conn = sqlite3.connect(DB)
    try:
        read = conn.execute("SELECT COUNT(*) FROM loyalty_members").fetchone()[0]
        # Outcome tables keep every run; report the one that just ran.
        run_id = conn.execute(
            "SELECT run_id FROM (SELECT run_id, rowid AS r FROM mews_membership_results UNION ALL "
            "SELECT run_id, rowid FROM mews_membership_rejections) ORDER BY r DESC LIMIT 1"
        ).fetchone()[0]
        outcomes = dict(
            conn.execute(
                "SELECT outcome, COUNT(*) FROM mews_membership_results WHERE run_id = ? GROUP BY outcome",
                (run_id,),
            )
        )
        rejections = conn.execute(
            "SELECT reason FROM mews_membership_rejections WHERE run_id = ? ORDER BY source_row", (run_id,)
        ).fetchall()
    finally:
        conn.close()
    print(f"\n=== Demo result of {run_id} ===")
    print(f"rows in loyalty_members:        {read}")
    print(f"added to Mews (results table):  {outcomes.get('added', 0)}")
    print(f"already in Mews, skipped:       {outcomes.get('skipped_existing', 0)}")
    print(f"rejected with a reason:         {len(rejections)}")
    for (reason,) in rejections:
        print(f"  - {reason}")
    print(f"memberships the sandbox holds:  {stats.get('stored')} (all runs; it keeps them in .demo/)")
    print(f"requests served by the sandbox: {sum(v for k, v in stats.items() if k.startswith('requests:'))}")
    print("Details: .demo/members.db tables mews_membership_results and mews_membership_rejections.")


if __name__ == "__main__":
    main()
