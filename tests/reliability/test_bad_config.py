"""Bad configuration gives one clear error, naming the setting and the fix, before anything is sent.

* Operator arguments that can be checked without any connection (batch_size, the source,
  table/sql, if_exists, ...) fail when the DAG file is parsed: the DAG shows up as an import
  error in Airflow, with the operator's ``ValueError``.
* The Mews connection (host, password, extra fields), ``chain_id``, the source (a missing
  table, a failing query, templated rows that are no list) and the column mapping
  (``field_map``, required columns) are checked at the start of ``execute``: the task fails
  with ``AirflowFailException`` on its first try (an Airflow retry cannot fix them), and the
  sandbox has not received a single request.

Every task's failure is recorded by an ``on_failure_callback`` (exception type, text, try) so
each error is checked exactly; the run is scanned for tokens (``secrets_scan``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_mews.testing import connection_json
from airflow_provider_mews.testing.sample_data import PROGRAM_ID, write_sqlite
from reliability.secrets_scan import SecretScanner, distinctive_token

CLIENT_TOKEN = distinctive_token("config-client")
ACCESS_TOKEN = distinctive_token("config-access")
ROW = {"AccountId": "0f2b6a53-5b8e-4c52-a1a4-6e3c2f1d9b70", "LoyaltyProgramId": PROGRAM_ID, "IsPrimary": True}

# -- parse time ---------------------------------------------------------------------------------

PARSE_DAG = """
import pendulum

from airflow.sdk import DAG
from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    LoyaltyMembershipAddOperator(task_id="add", {kwargs})
"""
ROWS_ARG = f"memberships=[{ROW!r}]"

#: case -> (operator arguments, what the error must say)
PARSE_CASES = {
    "batch_size_0": (
        f"{ROWS_ARG}, batch_size=0",
        "batch_size must be 1..1000 (Mews's limit per request), got 0",
    ),
    "batch_size_1001": (f"{ROWS_ARG}, batch_size=1001", "batch_size must be 1..1000"),
    "both_sources": (
        f"{ROWS_ARG}, sql_conn_id='src', table='members'",
        "give exactly one source: memberships=... or sql_conn_id=...",
    ),
    "neither_source": ("batch_size=10", "give exactly one source: memberships=... or sql_conn_id=..."),
    "table_and_sql": (
        "sql_conn_id='src', table='members', sql='SELECT * FROM members'",
        "with sql_conn_id give exactly one of table=... or sql=...",
    ),
    "sql_conn_without_table_or_sql": (
        "sql_conn_id='src'",
        "with sql_conn_id give exactly one of table=... or sql=",
    ),
    "table_without_sql_conn": (f"{ROWS_ARG}, table='members'", "table/sql need sql_conn_id"),
    "if_exists_unknown": (
        f"{ROWS_ARG}, if_exists='replace'",
        "if_exists must be 'skip', 'add' or 'update', got 'replace'",
    ),
    "results_table_without_sql_conn": (
        f"{ROWS_ARG}, results_table='results'",
        "results_table/rejections_table need a SQL connection: set output_conn_id",
    ),
}


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_bad_operator_arguments_fail_when_the_dag_is_parsed(case, tmp_path, airflow_db):
    from airflow.models import DagBag

    kwargs, expected = PARSE_CASES[case]
    path = tmp_path / f"rel_config_{case}.py"
    path.write_text(PARSE_DAG.format(dag_id=f"rel_config_{case}", kwargs=kwargs))
    bag = DagBag(dag_folder=str(path))
    assert not bag.dags, "a DAG with a bad operator argument was loaded"
    assert list(bag.import_errors) == [str(path)]
    error = bag.import_errors[str(path)]
    assert "ValueError" in error and "LoyaltyMembershipAddOperator(task_id='add')" in error
    assert expected in error, error
    assert error.count("Error:") == 1, error  # one error, not a cascade


# -- execute time -------------------------------------------------------------------------------

RUN_DAG = """
import json
from datetime import timedelta

import pendulum

from airflow.sdk import DAG
from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

CASES = {cases!r}
ROWS = [{row!r}]


def record(context):
    exc = context.get("exception")
    ti = context["ti"]
    with open({errors!r}, "a") as fh:
        fh.write(json.dumps({{"task_id": ti.task_id, "try_number": ti.try_number,
                             "type": type(exc).__name__, "message": str(exc)}}) + "\\n")


with DAG(
    dag_id={dag_id!r},
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    default_args={{"retries": 2, "retry_delay": timedelta(seconds=0), "retry_exponential_backoff": False,
                  "on_failure_callback": record}},
):
    for task_id, kwargs in CASES.items():
        LoyaltyMembershipAddOperator(task_id=task_id, **kwargs)
"""


def _conn(url: str, **fields: Any) -> str:
    """A mews connection to the sandbox with the module's tokens, ``fields`` overriding any part."""
    base = json.loads(connection_json(url, access_token=ACCESS_TOKEN, client_token=CLIENT_TOKEN))
    extra = {**base["extra"], **fields.pop("extra", {})}
    for name in fields.pop("drop_extra", ()):
        extra.pop(name)
    return json.dumps({**base, **fields, "extra": extra})


def _execute_cases(url: str) -> tuple[dict[str, str], dict[str, tuple[dict[str, Any], list[str]]]]:
    """(connection env values by conn id, case -> (operator kwargs, what the error must say))."""
    host_port = url.split("://", 1)[1]
    conns = {
        "no_host": _conn(url, host=""),
        "host_without_scheme": _conn(url, host=host_port),
        "host_with_trailing_slash": _conn(url, host=url + "/"),
        "host_with_path": _conn(url, host=url + "/api/connector/v1"),
        "empty_password": _conn(url, password=""),
        "missing_client_token": _conn(url, drop_extra=["client_token"]),
        "chain_id_not_uuid": _conn(url, extra={"chain_id": "my-chain"}),
        "timeout_negative": _conn(url, extra={"timeout": -5}),
        "timeout_not_a_number": _conn(url, extra={"timeout": "soon"}),
        "good": _conn(url),
    }
    rows = {"memberships": [ROW]}
    src = {"mews_conn_id": "rel_cfg_good", "sql_conn_id": "rel_cfg_src"}

    def conn(case: str) -> dict[str, Any]:
        return {"mews_conn_id": f"rel_cfg_{case}", **rows}

    where = "Airflow connection 'rel_cfg_{}' (type mews): "
    cases: dict[str, tuple[dict[str, Any], list[str]]] = {
        "no_host": (conn("no_host"), [where, "host (Platform address) is empty", "https://api.mews.com"]),
        "host_without_scheme": (conn("host_without_scheme"), [where, "must start with https://"]),
        "host_with_trailing_slash": (
            conn("host_with_trailing_slash"),
            [where, "without a trailing slash or path", f"(e.g. {url})"],
        ),
        "host_with_path": (
            conn("host_with_path"),
            [where, "without a trailing slash or path", f"(e.g. {url})"],
        ),
        "empty_password": (conn("empty_password"), [where, "password (Access token) is empty"]),
        "missing_client_token": (
            conn("missing_client_token"),
            [where, "extra.client_token (Client token) is missing"],
        ),
        "chain_id_not_uuid": (conn("chain_id_not_uuid"), [where, "extra.chain_id must be a UUID like"]),
        "timeout_negative": (
            conn("timeout_negative"),
            [where, "extra.timeout must be a positive number, got -5"],
        ),
        "timeout_not_a_number": (
            conn("timeout_not_a_number"),
            [where, "extra.timeout must be a positive number, got 'soon'"],
        ),
        "chain_id_argument_not_uuid": (
            {"mews_conn_id": "rel_cfg_good", "chain_id": "chain-7", **rows},
            ["chain_id_argument_not_uuid: chain_id must be a UUID like"],
        ),
        "memberships_not_a_list": (
            {"mews_conn_id": "rel_cfg_good", "memberships": "members, please"},
            ["memberships rendered to text that is neither JSON nor a Python literal list of dicts"],
        ),
        "missing_table": (
            {**src, "table": "no_such_table"},
            ["the source query failed on connection 'rel_cfg_src'", "no such table: no_such_table"],
        ),
        "failing_query": (
            {**src, "sql": "SELECT account_id FROM loyalty_members WHERE"},
            ["the source query failed on connection 'rel_cfg_src'", "OperationalError: incomplete input"],
        ),
        "field_map_to_unknown_field": (
            {**src, "table": "loyalty_members", "field_map": {"tier_id": "Tier"}},
            ["field_map['tier_id'] = 'Tier' is not a Mews field; use one of AccountId, LoyaltyProgramId"],
        ),
        "field_map_from_unknown_column": (
            {**src, "table": "loyalty_members", "field_map": {"tier": "LoyaltyTierId"}},
            ["field_map names column 'tier', which the source does not have (columns: member_id, account_id"],
        ),
        "missing_required_column": (
            {**src, "sql": "SELECT account_id, loyalty_program_id FROM loyalty_members"},
            [
                "no source column provides the required Mews field(s) IsPrimary",
                "rename the columns or set field_map",
            ],
        ),
    }
    return conns, cases


def test_bad_configuration_fails_each_task_once_before_anything_is_sent(
    run_dag, tmp_path: Path, monkeypatch, mews_sandbox, capfd
):
    mews_sandbox.add_tokens(CLIENT_TOKEN, ACCESS_TOKEN)
    conns, cases = _execute_cases(mews_sandbox.url)
    for conn_id, value in conns.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_REL_CFG_{conn_id.upper()}", value)
    db = tmp_path / "members.db"
    write_sqlite(str(db), 20)
    monkeypatch.setenv("AIRFLOW_CONN_REL_CFG_SRC", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    errors_file = tmp_path / "errors.jsonl"
    dag_id = "rel_config_execute"
    source = RUN_DAG.format(
        dag_id=dag_id,
        cases={case: kwargs for case, (kwargs, _) in cases.items()},
        row=ROW,
        errors=str(errors_file),
    )
    dr = run_dag(dag_id, source)
    captured = capfd.readouterr()

    # Not one request reached the sandbox: every error came before anything was sent.
    stats = mews_sandbox.stats()
    assert not {k: v for k, v in stats.items() if k.startswith("requests:")}, stats

    records = [json.loads(line) for line in errors_file.read_text().splitlines()]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_task.setdefault(record["task_id"], []).append(record)
    assert sorted(by_task) == sorted(cases), "every bad configuration must fail its task"
    problems = []
    for case, (_, expected) in cases.items():
        (record,) = by_task[case]  # one failure: no retry of something a retry cannot fix
        message = record["message"]
        if record["type"] != "AirflowFailException" or record["try_number"] != 1:
            problems.append(f"{case}: {record['type']} on try {record['try_number']}: {message}")
        for part in expected:
            if part.replace("{}", case) not in message:
                problems.append(f"{case}: {part.replace('{}', case)!r} not in {message!r}")
    assert not problems, "\n".join(problems)
    states = {ti.task_id: (ti.state, ti.try_number) for ti in dr.get_task_instances()}
    assert set(states.values()) == {("failed", 1)}, states

    scanner = SecretScanner.with_demo_tokens(CLIENT_TOKEN, ACCESS_TOKEN)
    scanner.assert_clean(
        dag_run=dr, captured=captured, texts={f"exception of {r['task_id']}": r["message"] for r in records}
    )
