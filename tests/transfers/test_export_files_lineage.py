"""JSON-lines output (local path and file:// ObjectStoragePath) and OpenLineage of the exports,
through ``airflow dags test`` with the OpenLineage provider's real listener (file transport)."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timezone

import pytest

YEAR_START = datetime(2025, 1, 1, tzinfo=timezone.utc)
YEAR_END = datetime(2026, 1, 1, tzinfo=timezone.utc)
COUNT = 1500

DAG = """
import pendulum
from airflow.sdk import DAG

from airflow_provider_mews.transfers.mews_to_sql import MewsToFileOperator, MewsToSqlOperator

YEAR = ("2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z")
with DAG("mews_export_lineage", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    MewsToSqlOperator(
        task_id="to_table", operation="loyaltyMemberships/getAll", sql_conn_id="export_lineage_db",
        table="mews_memberships", updated_utc=YEAR, retries=0,
    )
    MewsToFileOperator(
        task_id="to_url", operation="loyaltyMemberships/getAll", path="file://{out}/url/{{{{ ds }}}}.jsonl",
        updated_utc=YEAR, retries=0,
    )
    MewsToFileOperator(
        task_id="to_path", operation="loyaltyMemberships/getAll", path="{out}/plain/memberships.jsonl",
        updated_utc=YEAR, retries=0,
    )
"""


@pytest.fixture(scope="module")
def exported(airflow_db, _mews_sandbox_server, tmp_path_factory):
    from conftest import AIRFLOW_BIN, DAGS_DIR

    from airflow_provider_mews.testing import connection_json

    sandbox = _mews_sandbox_server
    sandbox.reset()
    sandbox.configure(seed_on_boundaries=True)
    ids = sandbox.seed_memberships(COUNT, start_utc=YEAR_START, end_utc=YEAR_END)
    tmp = tmp_path_factory.mktemp("export-lineage")
    db, out = tmp / "warehouse.db", tmp / "lake"
    (DAGS_DIR / "mews_export_lineage.py").write_text(DAG.format(out=out))
    events_file = tmp / "openlineage.jsonl"
    env = {
        **os.environ,
        "AIRFLOW_CONN_MEWS_DEFAULT": connection_json(sandbox.url),
        "AIRFLOW_CONN_EXPORT_LINEAGE_DB": json.dumps({"conn_type": "sqlite", "host": str(db)}),
        "AIRFLOW__OPENLINEAGE__DISABLED": "False",
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "mews-tests",
        "AIRFLOW__OPENLINEAGE__EXECUTION_TIMEOUT": "120",
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}
        ),
    }
    runs = []
    for _ in range(2):  # run twice: files are rewritten, not appended to
        runs.append(
            subprocess.run(
                [AIRFLOW_BIN, "dags", "test", "mews_export_lineage"],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
        )
    events: dict[str, dict[str, dict]] = {}
    if events_file.exists():
        for line in events_file.read_text().splitlines():
            event = json.loads(line)
            job = event["job"]["name"]
            if job.startswith("mews_export_lineage."):
                events.setdefault(job.removeprefix("mews_export_lineage."), {})[event["eventType"]] = event
    yield {"ids": ids, "db": db, "out": out, "events": events, "sandbox": sandbox,
           "log": "".join(p.stdout + p.stderr for p in runs)}  # fmt: skip
    sandbox.reset()


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_lines_hold_every_record_once_as_mews_sends_it(exported):
    out, ids = exported["out"], exported["ids"]
    (by_url,) = list((out / "url").glob("*.jsonl"))
    for path in (by_url, out / "plain" / "memberships.jsonl"):
        records = read_lines(path)
        assert sorted(r["Id"] for r in records) == sorted(ids), exported["log"][-3000:]
        first = next(r for r in records if r["Id"] == ids[0])
        assert first == exported["sandbox"].state.memberships[ids[0]]


def test_openlineage_input_is_the_mews_operation_and_output_the_table_or_file(exported):
    events, url = exported["events"], exported["sandbox"].url
    assert {"to_table", "to_url", "to_path"} <= events.keys(), exported["log"][-3000:]
    for task in ("to_table", "to_url", "to_path"):
        complete = events[task]["COMPLETE"]
        assert [(d["namespace"], d["name"]) for d in complete["inputs"]] == [
            (url, "loyaltyMemberships/getAll")
        ]
    (table,) = events["to_table"]["COMPLETE"]["outputs"]
    assert (table["namespace"], table["name"]) == (f"sqlite://{exported['db']}", "main.mews_memberships")
    (path,) = events["to_path"]["COMPLETE"]["outputs"]
    assert (path["namespace"], path["name"]) == ("file", str(exported["out"] / "plain" / "memberships.jsonl"))
