"""The checks of one Airflow line's leg (.ci/airflow-line.sh), run inside that line's virtualenv.

``imports``: the provider imports, and each name ``version_compat`` exports is the object from
its newest home on this line (a fallback used only where the newer home lacks it), without a
deprecation warning from the provider's own modules.

``e2e``: the Mews connection form as this line's UI builds it, ``airflow connections test`` with
the right and a wrong token, ``airflow dags test mews_loyalty_from_sqlite`` against the local
sandbox (the sandbox must hold exactly the valid rows, the results table their ids), and a
retried try: try 1 fails after a batch was stored but its answer was lost, try 2 must reconcile
through getAll (no ``task_state_store`` before 3.3) and the sandbox hold every membership once.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import warnings
from collections import Counter
from pathlib import Path

LINE = os.environ.get("AIRFLOW_LINE", "?")

#: Where each name lives, newest home first (as the official common.compat's import map).
HOMES: dict[str, tuple[tuple[str, str], ...]] = {
    "BaseOperator": (("airflow.sdk", "BaseOperator"), ("airflow.models", "BaseOperator")),
    "BaseHook": (("airflow.sdk", "BaseHook"), ("airflow.hooks.base", "BaseHook")),
    "Asset": (("airflow.sdk", "Asset"), ("airflow.datasets", "Dataset")),
    "AirflowException": (
        ("airflow.sdk.exceptions", "AirflowException"),
        ("airflow.exceptions", "AirflowException"),
    ),
    "AirflowFailException": (
        ("airflow.sdk.exceptions", "AirflowFailException"),
        ("airflow.exceptions", "AirflowFailException"),
    ),
    "AirflowNotFoundException": (
        ("airflow.sdk.exceptions", "AirflowNotFoundException"),
        ("airflow.exceptions", "AirflowNotFoundException"),
    ),
    "mask_secret": (("airflow.sdk.log", "mask_secret"), ("airflow.utils.log.secrets_masker", "mask_secret")),
}


def provider_modules() -> list[str]:
    """Every module of the provider, version_compat first."""
    import pkgutil

    import airflow_provider_mews as package

    found = sorted(m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + "."))
    first = "airflow_provider_mews.version_compat"
    return [first, *(m for m in found if m != first)]


def fail(message: str) -> None:
    print(f"airflow-{LINE}: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def check_imports() -> None:
    import airflow

    if not airflow.__version__.startswith(f"{LINE}."):
        fail(f"this environment has Airflow {airflow.__version__}, not {LINE}.x")
    print(f"Airflow {airflow.__version__}, Python {sys.version.split()[0]}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        modules = [importlib.import_module(m) for m in provider_modules()]
    own = [
        w
        for w in caught
        if issubclass(w.category, DeprecationWarning | FutureWarning)
        and "airflow_provider_mews" in w.filename
    ]
    if own:
        fail("the provider imports deprecated names: " + "; ".join(f"{w.filename}: {w.message}" for w in own))
    compat = modules[0]
    print(f"ok: the provider's {len(modules)} modules import")
    for name, homes in HOMES.items():
        found = None
        for module_name, attr in homes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    found = (module_name, getattr(importlib.import_module(module_name), attr))
                    break
                except (ImportError, AttributeError):
                    continue
        if found is None:
            fail(f"{name} is in none of {homes}")
        if getattr(compat, name) is not found[1]:
            fail(f"version_compat.{name} is not the one in {found[0]}, its newest home on Airflow {LINE}")
        print(f"ok: {name:<21} from {found[0]}")


# -- end to end ---------------------------------------------------------------------------------

ROWS, INVALID = 500, 5
RETRY_ROWS, RETRY_BATCH = 30, 10
RETRY_DAG_ID = "mews_retry_line"

RETRY_DAG = """
import json
import urllib.request
from datetime import timedelta

import pendulum

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.11
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


with DAG("DAG_ID", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
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


def dags_test(dag_id: str, env: dict[str, str], artifacts: Path) -> str:
    log = artifacts / f"dags-test-{dag_id}.log"
    if LINE == "3.0":
        # 3.0's `dags test` does not register the DAG's assets, and refuses to run a task whose
        # outlet (the operator's Mews asset) is not active: parse the DAGs first, as a DAG
        # processor does before any scheduled run.
        subprocess.run(
            [os.environ["AIRFLOW_BIN"], "dags", "reserialize"], env=env, capture_output=True, check=True
        )
    print(f"$ airflow dags test {dag_id}  (log: {log})", flush=True)
    with open(log, "w") as fh:
        rc = subprocess.run(
            [os.environ["AIRFLOW_BIN"], "dags", "test", dag_id], env=env, stdout=fh, stderr=subprocess.STDOUT
        ).returncode
    text = log.read_text()
    if rc != 0 or not re.search(r"state=(DagRunState\.)?success", text, re.I):
        print(text[-6000:])
        fail(f"airflow dags test {dag_id} exited {rc} without a successful DAG run")
    return text


def check_connection_form() -> None:
    """The Mews form as this line's UI builds it: Airflow 2.11's Flask UI from the hook's classmethods
    (through the ProvidersManager), Airflow 3's React UI from the API server's hook metadata (from the
    classmethods before 3.2, from the provider's ``conn-fields`` from 3.2)."""
    from airflow.providers_manager import ProvidersManager

    if LINE.startswith("2."):
        manager = ProvidersManager()
        widgets = {k.removeprefix("extra__mews__"): w for k, w in manager.connection_form_widgets.items()}
        widgets = {k: w for k, w in widgets.items() if "__" not in k}
        behaviour = manager.field_behaviours.get("mews") or {}
        hidden = set(behaviour.get("hidden_fields", ()))
        titles = behaviour.get("relabeling", {})
        field = widgets["client_token"].field if "client_token" in widgets else None
        secret_ok = "Password" in getattr(field, "field_class", type(field)).__name__  # an UnboundField
    else:
        from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

        meta = next((m for m in HookMetaService.hook_meta_data() if m.connection_type == "mews"), None)
        if LINE == "3.0" and meta is not None and meta.standard_fields is meta.extra_fields is None:
            # 3.0 builds every provider's form through flask-appbuilder, which it no longer installs:
            # without the FAB provider the type is listed with the plain fields (client_token in Extra).
            print("ok: the 3.0 API server lists the Mews type; no custom form without the FAB provider")
            return
        if meta is None or meta.standard_fields is None:
            fail(f"the Airflow {LINE} API server has no form for the mews connection type: {meta}")
        widgets = dict(meta.extra_fields or {})
        std = meta.standard_fields
        hidden = {n for n in ("url_schema", "port", "login") if (f := getattr(std, n)) and f.hidden}
        hidden = {"schema" if n == "url_schema" else n for n in hidden}
        titles = {n: f.title for n in ("host", "password") if (f := getattr(std, n)) and f.title}
        schema = (widgets.get("client_token") or {}).get("schema", {})
        secret_ok = schema.get("format") == "password"
    # After the form: Airflow 3's API server loads the hooks (once) with the Flask imports mocked.
    hook = ProvidersManager().hooks.get("mews")
    if hook is None or not hook.connection_testable:
        fail(f"Airflow {LINE} does not register the testable mews connection type: {hook}")
    from airflow_provider_mews.get_provider_info import CONN_FIELDS

    if set(widgets) != set(CONN_FIELDS):
        fail(f"the {LINE} connection form has the extra fields {sorted(widgets)}, not {sorted(CONN_FIELDS)}")
    if not {"login", "port", "schema"} <= hidden or titles.get("password") != "Access token":
        fail(f"the {LINE} form does not hide/relabel the standard fields: hidden {hidden}, titles {titles}")
    if not secret_ok:
        fail(f"the {LINE} form does not show client_token as a password field")
    print(
        f"ok: the {LINE} connection form has {sorted(widgets)}, client_token a password field; hides {sorted(hidden)}"
    )


def connections_test(env: dict[str, str], expect: str, also: str = "") -> None:
    print(f"$ airflow connections test mews_default  (expecting {expect!r})", flush=True)
    out = subprocess.run(
        [os.environ["AIRFLOW_BIN"], "connections", "test", "mews_default"],
        env=env,
        capture_output=True,
        text=True,
    )
    text = " ".join((out.stdout + out.stderr).split())  # the CLI wraps long lines
    if expect not in text or also not in text:
        print(text[-4000:])
        fail(f"airflow connections test did not say {expect!r} {also!r}")


def check_unique(memberships: list[dict], what: str) -> None:
    pairs = Counter((m["AccountId"].lower(), m["LoyaltyProgramId"].lower()) for m in memberships)
    doubled = [p for p, n in pairs.items() if n > 1]
    if doubled:
        fail(f"{what}: {len(doubled)} memberships added more than once, e.g. {doubled[0]}")


def e2e() -> None:
    from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN, connection_json
    from airflow_provider_mews.testing.sample_data import write_sqlite

    work = Path(os.environ["WORK"])
    artifacts = Path(os.environ["ARTIFACTS"])
    db = work / "members.db"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sandbox = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-m", "airflow_provider_mews.testing.sandbox", "--port", str(port)],
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
        write_sqlite(str(db), ROWS, invalid=INVALID)
        write_sqlite(str(db), RETRY_ROWS, table="retry_members", seed=11)
        env = dict(os.environ)
        env["AIRFLOW_CONN_MEWS_DEFAULT"] = connection_json(url)
        env["AIRFLOW_CONN_MEWS_DEMO_SQLITE"] = json.dumps({"conn_type": "sqlite", "host": str(db)})

        # 0. The connection: the form, and the Test button's code path (`airflow connections test`).
        check_connection_form()
        connections_test(env, "Connection success!")
        wrong_token = "WRONGACCESS0123456789ABCDEF0123456789"
        wrong = {**env, "AIRFLOW_CONN_MEWS_DEFAULT": connection_json(url, access_token=wrong_token)}
        connections_test(wrong, "Connection failed!", "HTTP 401")
        print(
            "ok: connections test succeeds with the sandbox tokens, fails clearly (HTTP 401) with a wrong one"
        )

        # 1. The example DAG, as a user runs it.
        log = dags_test("mews_loyalty_from_sqlite", env, artifacts)
        # Airflow 3.0's in-process supervisor logs, at debug level, each value it is asked to mask
        # (msg=MaskSecret(value=...)); every other line must show the tokens masked.
        shown = [
            line
            for line in log.splitlines()
            if "msg=MaskSecret(" not in line and (DEMO_ACCESS_TOKEN in line or DEMO_CLIENT_TOKEN in line)
        ]
        if shown:
            fail(f"a token shows in the output of airflow dags test: {shown[0][:300]}")
        stored = http(url + "/_sandbox/memberships")
        check_unique(stored, "mews_loyalty_from_sqlite")
        with sqlite3.connect(db) as conn:
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
        stats_file = work / "stats-at-retry.json"
        dag = RETRY_DAG.replace("BATCH_SIZE", str(RETRY_BATCH)).replace("SANDBOX_URL", url)
        dag = dag.replace("STATS_FILE", str(stats_file)).replace("DAG_ID", RETRY_DAG_ID)
        (work / "dags" / f"{RETRY_DAG_ID}.py").write_text(dag)
        log = dags_test(RETRY_DAG_ID, env, artifacts)
        stats = http(url + "/_sandbox/stats")
        stored = http(url + "/_sandbox/memberships")
        check_unique(stored, RETRY_DAG_ID)
        if not stats_file.exists():
            fail(
                "try 1 did not fail and retry as the faults intend (on_retry_callback never ran): "
                + str(stats)
            )
        if not re.search(r"up_for_retry", log, re.I):
            fail("the log of the retried DAG run does not show the task marked up for retry")
        at_retry = json.loads(stats_file.read_text())
        if at_retry.get("stored") != 2 * RETRY_BATCH or at_retry.get("fault:drop_after_store") != 1:
            fail(f"try 1 should have failed with 2 batches stored, one of them unanswered: {at_retry}")
        reconciled = re.findall(r"^\s+reconciled\s+(\d+)\s*$", log, re.M)
        if not reconciled or int(reconciled[-1]) != 2 * RETRY_BATCH:
            fail(f"try 2 should have found the 2 batches of try 1 through getAll, the log says {reconciled}")
        with sqlite3.connect(db) as conn:
            codes = sorted(c for (c,) in conn.execute("SELECT membership_number FROM retry_members"))
        if sorted(m["Code"] for m in stored) != codes:
            fail(f"after the retry the sandbox holds {len(stored)} memberships, not {RETRY_ROWS} once each")
        adds = stats.get("requests:loyaltyMemberships/add")
        print("ok: try 1 failed with a stored batch in doubt, try 2 reconciled it through getAll;")
        print(f"    the sandbox holds the {len(stored)} memberships once each ({adds} add requests)")
    finally:
        sandbox.terminate()
        sandbox.wait(10)


if __name__ == "__main__":
    {"imports": check_imports, "e2e": e2e}[sys.argv[1]]()
