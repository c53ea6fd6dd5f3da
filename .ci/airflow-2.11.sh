#!/usr/bin/env bash
# Airflow 2.11 compatibility run, in its own virtualenv (.venv-211) pinned by constraints/airflow-2.11.txt:
#   1. the version-independent unit tests;
#   2. the Mews connection as 2.11 shows it (form fields from the hook's classmethods) and tests it
#      (`airflow connections test`, right and wrong token);
#   3. one end-to-end DAG run: `airflow dags test mews_loyalty_from_sqlite` (SQLite table -> local Mews
#      sandbox), then checks that the sandbox holds exactly the valid rows and the results table their ids;
#   4. a retried try: try 1 fails after a batch was stored but its answer was lost (connection dropped,
#      then an outage of HTTP 500s that the DAG's on_retry_callback ends); try 2 must reconcile through
#      getAll (Airflow 2.11 has no task_state_store) and the sandbox must hold every membership once.
# Logs of the DAG runs: .artifacts/airflow-2.11/. Env: PYTHON_211 (interpreter), VENV_211 (venv dir).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${VENV_211:-.venv-211}"
CONSTRAINTS=constraints/airflow-2.11.txt
# Test files that do not depend on the Airflow version (test_postgres needs the Postgres provider,
# which the 2.11 environment does not install). Missing files are left out.
CANDIDATE_TESTS=(tests/test_hook.py tests/test_memberships.py tests/test_sandbox.py tests/test_smoke_examples.py)

pick_python() {
  local c
  for c in "${PYTHON_211:-}" python3.11 python3.12 python3.10 "${PYTHON:-python3}" python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 || continue
    # Airflow 2.11 supports Python 3.9-3.12; this project needs 3.10+.
    if "$c" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
      echo "$c"
      return
    fi
  done
  echo "airflow-2.11: no Python 3.10-3.12 found (set PYTHON_211)" >&2
  exit 1
}

echo "== Airflow 2.11: virtualenv $VENV"
STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ] || [ "$CONSTRAINTS" -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  PY_BASE="$(pick_python)"
  rm -rf "$VENV"
  "$PY_BASE" -m venv "$VENV"
  {
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -c "$CONSTRAINTS" -e . pytest pytest-timeout hypothesis jsonschema psutil
  } 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'
  "$VENV/bin/pip" check
  touch "$STAMP"
fi
PY="$VENV/bin/python"
"$PY" -c 'import airflow, sys; print("Airflow", airflow.__version__, "Python", sys.version.split()[0]);
assert airflow.__version__.startswith("2.11."), airflow.__version__'

echo "== Airflow 2.11: unit tests"
TESTS=()
for t in "${CANDIDATE_TESTS[@]}"; do [ -f "$t" ] && TESTS+=("$t"); done
"$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/mews-af211-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export AIRFLOW_HOME="$WORK/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$WORK/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__TEST_CONNECTION=Enabled
export ARTIFACTS="$ROOT/.artifacts/airflow-2.11"
mkdir -p "$AIRFLOW__CORE__DAGS_FOLDER" "$ARTIFACTS"
cp dags_examples/mews_loyalty_from_sqlite.py "$AIRFLOW__CORE__DAGS_FOLDER/"

echo "== Airflow 2.11: airflow db migrate"
"$VENV/bin/airflow" db migrate >"$ARTIFACTS/db-migrate.log" 2>&1 || { tail -40 "$ARTIFACTS/db-migrate.log"; exit 1; }

echo "== Airflow 2.11: end-to-end DAG runs against the local Mews sandbox"
export AIRFLOW_BIN="$(cd "$VENV" && pwd)/bin/airflow" WORK
"$PY" -W ignore::DeprecationWarning -W ignore::FutureWarning - <<'PYTHON'
"""Runs the DAGs with the real Airflow 2.11 CLI and checks what the sandbox holds."""

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

from airflow_provider_mews.testing import connection_json
from airflow_provider_mews.testing.sample_data import write_sqlite

WORK = Path(os.environ["WORK"])
ARTIFACTS = Path(os.environ["ARTIFACTS"])
DB = WORK / "members.db"
ROWS, INVALID = 500, 5
RETRY_ROWS, RETRY_BATCH = 30, 10

RETRY_DAG = """
import json
import urllib.request
from datetime import timedelta

import pendulum
from airflow import DAG

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

SANDBOX = "SANDBOX_URL"


def end_outage(context):
    # Try 1 failed: note what Mews held then, and end the outage so that try 2 meets a healthy Mews.
    with urllib.request.urlopen(SANDBOX + "/_sandbox/stats", timeout=10) as r:
        stats = json.loads(r.read())
    with open("STATS_FILE", "w") as fh:
        json.dump(stats, fh)
    body = json.dumps({"fault_rates": {}}).encode()
    urllib.request.urlopen(urllib.request.Request(SANDBOX + "/_sandbox/config", data=body), timeout=10).read()


with DAG("mews_retry_211", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    LoyaltyMembershipAddOperator(
        task_id="add_memberships",
        sql_conn_id="mews_demo_sqlite",
        sql="SELECT * FROM retry_members ORDER BY member_id",
        field_map={"tier_id": "LoyaltyTierId"},
        batch_size=BATCH_SIZE,
        max_active_requests=1,  # one request at a time: the fault script below meets a known order
        if_exists="add",  # no existence check: only reconciliation can keep a retry from adding twice
        retries=1,
        retry_delay=timedelta(seconds=0),
        retry_exponential_backoff=False,
        on_retry_callback=end_outage,
    )
"""


def fail(message: str) -> None:
    print(f"airflow-2.11: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(
        urllib.request.Request(url, data=data, method="POST" if data else "GET"), timeout=30
    ) as r:
        return json.loads(r.read())


def dags_test(dag_id: str, env: dict[str, str]) -> str:
    log = ARTIFACTS / f"dags-test-{dag_id}.log"
    print(f"$ airflow dags test {dag_id}  (log: {log})", flush=True)
    with open(log, "w") as fh:
        rc = subprocess.run(
            [os.environ["AIRFLOW_BIN"], "dags", "test", dag_id], env=env, stdout=fh, stderr=subprocess.STDOUT
        ).returncode
    text = log.read_text()
    if rc != 0 or "state=success" not in text:
        print(text[-6000:])
        fail(f"airflow dags test {dag_id} exited {rc}")
    return text


def check_connection_form() -> None:
    """Airflow 2.11's UI builds the Mews form from the hook's classmethods, through ProvidersManager."""
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    hook = manager.hooks.get("mews")
    if hook is None or not hook.connection_testable:
        fail(f"Airflow 2.11 does not register the testable mews connection type: {hook}")
    widgets = {k.removeprefix("extra__mews__") for k in manager.connection_form_widgets if "__mews__" in k}
    if widgets != {"client_token", "client", "chain_id", "timeout"}:
        fail(f"the 2.11 connection form has the extra fields {sorted(widgets)}")
    behaviour = manager.field_behaviours.get("mews") or {}
    if not {"login", "port", "schema"} <= set(behaviour.get("hidden_fields", ())) or not behaviour.get(
        "relabeling", {}
    ).get("password"):
        fail(f"the 2.11 connection form does not hide/relabel the standard fields: {behaviour}")
    print(f"ok: the 2.11 connection form has {sorted(widgets)}; hides {behaviour['hidden_fields']}")


def connections_test(env: dict[str, str], expect: str, also: str = "") -> None:
    print(f"$ airflow connections test mews_default  (expecting {expect!r})", flush=True)
    out = subprocess.run(
        [os.environ["AIRFLOW_BIN"], "connections", "test", "mews_default"],
        env=env,
        capture_output=True,
        text=True,
    )
    text = out.stdout + out.stderr
    if expect not in text or also not in text:
        print(text[-4000:])
        fail(f"airflow connections test did not say {expect!r} {also!r}")


def check_unique(memberships: list[dict], what: str) -> None:
    pairs = Counter((m["AccountId"].lower(), m["LoyaltyProgramId"].lower()) for m in memberships)
    doubled = [p for p, n in pairs.items() if n > 1]
    if doubled:
        fail(f"{what}: {len(doubled)} memberships added more than once, e.g. {doubled[0]}")


def main() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sandbox = subprocess.Popen(
        [
            sys.executable,
            "-W",
            "ignore::RuntimeWarning",
            "-m",
            "airflow_provider_mews.testing.sandbox",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                http(url + "/_sandbox/stats")
                break
            except OSError:
                time.sleep(0.1)
        else:
            fail("the sandbox did not start")
        write_sqlite(str(DB), ROWS, invalid=INVALID)
        write_sqlite(str(DB), RETRY_ROWS, table="retry_members", seed=11)
        env = dict(os.environ)
        env["AIRFLOW_CONN_MEWS_DEFAULT"] = connection_json(url)
        env["AIRFLOW_CONN_MEWS_DEMO_SQLITE"] = json.dumps({"conn_type": "sqlite", "host": str(DB)})

        # 0. The connection: the 2.11 form, and the Test button's code path (also `connections test`).
        check_connection_form()
        connections_test(env, "Connection success!")
        wrong = {**env, "AIRFLOW_CONN_MEWS_DEFAULT": connection_json(url, access_token="not-the-token")}
        connections_test(wrong, "Connection failed!", "HTTP 401")
        print(
            "ok: connections test succeeds with the sandbox tokens, fails clearly (HTTP 401) with a wrong one"
        )

        # 1. The example DAG, as a user runs it.
        dags_test("mews_loyalty_from_sqlite", env)
        stored = http(url + "/_sandbox/memberships")
        check_unique(stored, "mews_loyalty_from_sqlite")
        with sqlite3.connect(DB) as conn:
            results = conn.execute(
                "SELECT code, mews_membership_id, outcome FROM mews_membership_results"
            ).fetchall()
            rejected = [r[0] for r in conn.execute("SELECT source_row FROM mews_membership_rejections")]
            rows = conn.execute("SELECT member_id, membership_number FROM loyalty_members").fetchall()
        codes = {code for member_id, code in rows if member_id not in rejected}
        if len(rejected) != INVALID:
            fail(f"expected {INVALID} rejected rows, the rejections table has {len(rejected)}")
        if sorted(m["Code"] for m in stored) != sorted(codes) or len(stored) != ROWS - INVALID:
            fail(f"the sandbox holds {len(stored)} memberships, expected the {ROWS - INVALID} valid rows")
        added_ids = {mews_id for _code, mews_id, outcome in results if outcome == "added"}
        if added_ids != {m["Id"] for m in stored} or len(results) != len(stored):
            fail("the results table does not hold the Mews ids of the added memberships")
        print(
            f"ok: {len(stored)} memberships added once each, {len(rejected)} rows rejected with a reason, "
            "every Mews id written back"
        )

        # 2. A retried try without task_state_store: reconciliation through getAll.
        http(url + "/_sandbox/reset", {})
        http(
            url + "/_sandbox/config",
            {
                "fault_operations": ["loyaltyMemberships/add", "loyaltyMemberships/getAll"],
                # Batch 1 is stored and answered; batch 2 is stored but the connection drops before
                # the answer; then every request fails with a 500 (an outage) until try 1 has failed
                # and the DAG's on_retry_callback ends the outage. Try 2 must find batch 1 and 2.
                "fault_script": ["", "drop_after_store"],
                "fault_rates": {"500": 1.0},
            },
        )
        stats_file = WORK / "stats-at-retry.json"
        dag = RETRY_DAG.replace("BATCH_SIZE", str(RETRY_BATCH)).replace("SANDBOX_URL", url)
        (WORK / "dags" / "mews_retry_211.py").write_text(dag.replace("STATS_FILE", str(stats_file)))
        log = dags_test("mews_retry_211", env)
        stats = http(url + "/_sandbox/stats")
        stored = http(url + "/_sandbox/memberships")
        check_unique(stored, "mews_retry_211")
        if "Marking task as UP_FOR_RETRY" not in log or "AIRFLOW_CTX_TRY_NUMBER='2'" not in log:
            fail("try 1 did not fail and retry as the faults intend: " + json.dumps(stats))
        at_retry = json.loads(stats_file.read_text())
        if at_retry.get("stored") != 2 * RETRY_BATCH or at_retry.get("fault:drop_after_store") != 1:
            fail(f"try 1 should have failed with 2 batches stored, one of them unanswered: {at_retry}")
        reconciled = re.findall(r"^\s+reconciled\s+(\d+)$", log, re.M)
        if not reconciled or int(reconciled[-1]) != 2 * RETRY_BATCH:
            fail(f"try 2 should have found the 2 batches of try 1 through getAll, log says {reconciled}")
        with sqlite3.connect(DB) as conn:
            codes = sorted(c for (c,) in conn.execute("SELECT membership_number FROM retry_members"))
        if sorted(m["Code"] for m in stored) != codes:
            fail(f"after the retry the sandbox holds {len(stored)} memberships, not {RETRY_ROWS} once each")
        adds = stats.get("requests:loyaltyMemberships/add")
        print("ok: try 1 failed with a stored batch in doubt, try 2 reconciled it through getAll;")
        print(f"    the sandbox holds the {len(stored)} memberships once each ({adds} add requests)")
    finally:
        sandbox.terminate()
        sandbox.wait(10)


main()
PYTHON
echo "== Airflow 2.11: all passed"
