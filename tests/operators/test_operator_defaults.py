"""The operator's Airflow defaults hold for plain tasks and for mapped shards (``partial().expand()``).

``retries=3``, ``retry_delay=30 s``, exponential back-off and the asset outlet are declared in
``__init__``'s signature (``partial()`` reads defaults from there) and, for the outlet, by the
operator's ``partial()``. Checked on every example DAG as the DAG file parser sees it and as the
scheduler sees it (the serialized DAG), then end to end: a mapped shard that fails once is retried
by Airflow and succeeds.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, task_result

from airflow_provider_mews.lineage import loyalty_memberships_asset
from airflow_provider_mews.testing import sample_data

OPERATOR = "LoyaltyMembershipAddOperator"
#: Mews tasks in dags_examples/: (dag_id, task_id) -> mapped?
EXAMPLE_TASKS = {
    ("mews_loyalty_from_sqlite", "add_memberships"): False,
    ("mews_loyalty_from_task", "add_memberships"): False,
    ("mews_loyalty_sharded", "add_shard"): True,
    ("mews_loyalty_from_crm", "add_members"): False,
    ("mews_crm_roundtrip", "add_missing"): False,
}


def example_dags() -> dict[str, Any]:
    from airflow.models import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags_examples"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags


def outlet_uris(task: dict[str, Any]) -> list[str]:
    """The outlets of a serialized task, decoded as the scheduler's DAG sync decodes them."""
    from airflow.serialization.serialized_objects import BaseSerialization

    data = task["partial_kwargs"] if task.get("_is_mapped") else task
    return [BaseSerialization.deserialize(port).uri for port in data.get("outlets") or ()]


def test_every_example_task_has_the_retry_defaults_and_its_outlet_mapped_or_not():
    from airflow.serialization.serialized_objects import DagSerialization

    seen = {}
    for dag_id, dag in example_dags().items():
        data = DagSerialization.to_dict(dag)
        scheduler_dag = DagSerialization.from_dict(data)
        serialized = {t["__var"]["task_id"]: t["__var"] for t in data["dag"]["tasks"]}
        for task in dag.tasks:
            if getattr(task, "operator_name", task.task_type) != OPERATOR and task.task_type != OPERATOR:
                continue
            mapped = type(task).__name__ == "MappedOperator"
            seen[(dag_id, task.task_id)] = mapped
            asset = loyalty_memberships_asset(
                task.partial_kwargs["mews_conn_id"] if mapped else task.mews_conn_id
            )
            for view in (task, scheduler_dag.get_task(task.task_id)):  # the parser's and the scheduler's
                assert view.retries == 3, (dag_id, task.task_id, type(view).__name__)
                assert view.retry_delay == timedelta(seconds=30), (dag_id, task.task_id)
                assert view.retry_exponential_backoff in (True, 2.0), (dag_id, task.task_id)
            assert [a.uri for a in task.outlets] == [asset.uri], (dag_id, task.task_id)
            assert outlet_uris(serialized[task.task_id]) == [asset.uri], (dag_id, task.task_id)
    assert seen == EXAMPLE_TASKS


def test_partial_takes_the_outlet_of_its_connection_and_keeps_explicit_choices():
    from airflow.sdk import DAG

    from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator as Op

    with DAG("t_partial_outlets", schedule=None, default_args={"mews_conn_id": "mews_eu"}):
        inherited = Op.partial(task_id="inherited", memberships=[]).expand(chain_id=["a", "b"])
        own = Op.partial(task_id="own", mews_conn_id="mews_us", memberships=[]).expand(chain_id=["a"])
        explicit = Op.partial(task_id="explicit", memberships=[], outlets=[], retries=1).expand(
            chain_id=["a"]
        )
        plain = Op(task_id="plain", memberships=[])
    assert [a.uri for a in inherited.outlets] == ["mews://mews_eu/loyaltyMemberships"]
    assert [a.uri for a in own.outlets] == ["mews://mews_us/loyaltyMemberships"]
    assert explicit.outlets == [] and explicit.retries == 1
    assert [a.uri for a in plain.outlets] == ["mews://mews_eu/loyaltyMemberships"] and plain.retries == 3


# -- end to end: a mapped shard that fails once --

SHARDS = 2
MAPPED_DAG = f"""
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

with DAG(dag_id="t_mapped_retry", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    # No retries= here: the operator's default (3) must reach the mapped task instances.
    LoyaltyMembershipAddOperator.partial(
        task_id="add_shard",
        sql_conn_id="mews_mapped_db",
        retry_delay=timedelta(seconds=0),
        batch_size=50,
    ).expand(
        sql=[f"SELECT * FROM loyalty_members WHERE member_id % {SHARDS} = {{shard}} ORDER BY member_id"
             for shard in range({SHARDS})]
    )
"""


@pytest.fixture
def mapped_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "members.db"
    sample_data.write_sqlite(str(db), 200)
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_MAPPED_DB", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    return db


def test_a_mapped_shard_that_fails_once_is_retried_and_succeeds(run_dag, mews_conn, mews_sandbox, mapped_db):
    # The first add Mews sees fails with 409 (not retried by the hook): that shard's try fails.
    mews_sandbox.configure(fault_script=["409"])
    dr = run_dag("t_mapped_retry", MAPPED_DAG)
    assert dr.state == "success"
    assert mews_sandbox.stats()["fault:409"] == 1
    tries = sorted(dr.get_task_instance("add_shard", map_index=i).try_number for i in range(SHARDS))
    assert tries == [1, 2]  # one shard retried by Airflow, the other ran once
    assert all(dr.get_task_instance("add_shard", map_index=i).state == "success" for i in range(SHARDS))
    with sqlite3.connect(mapped_db) as conn:
        accounts = sorted(a for (a,) in conn.execute("SELECT account_id FROM loyalty_members"))
    assert sorted(m["AccountId"] for m in mews_sandbox.memberships()) == accounts  # each once
    for i in range(SHARDS):
        summary = task_result(dr, "add_shard", key="mews_summary", map_index=i)
        assert summary["added"] == 100 and summary["not_reached"] == 0, summary
