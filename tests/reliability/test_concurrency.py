"""Several mapped tasks in flight together, sharing one AccessToken and its rate limit.

The shipped example ``dags_examples/mews_loyalty_sharded.py`` (4 shards of one table, dynamic
task mapping, pool ``mews_api``) runs over 20 000 rows, each shard in its own worker process
at the same time, against a sandbox whose rate limit for the token is tight (16 requests per
2 s: Mews's 200 per 30 s, scaled down so the test is short). The connection sets
``rate_limit_requests`` to the limit divided by the pool's slots, as the example says.

What is real: the pool is created and the DAG run triggered as ``airflow pools set`` and
``airflow dags trigger`` do it (the CLI's local API client, called in this process to spare
two CLI start-ups); triggering expands the mapped task into 4 task instances; each of them
then runs in its own ``airflow tasks test DAG TASK RUN_ID --map-index N`` process, all
started together: real parallel workers, one per pool slot, sharing the token. What is not:
no scheduler, so the pool's slot accounting is not what limits the parallelism here (we start
exactly as many workers as the pool has slots). ``dag.test()`` would run the 4 mapped tasks
one after the other in one process.

Checks: every task instance succeeded, and they overlapped in time; the sandbox answered
few 429s and each was handled (the tasks' summaries count exactly the 429s the sandbox
sent, and nothing failed); every valid row is stored exactly once across the shards; the
counts add up per shard and in total; the results and rejections tables account for
every row of every shard.
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from conftest import AIRFLOW_BIN, task_result

from airflow_provider_mews.testing import DEMO_CLIENT_TOKEN
from reliability.test_fault_matrix import (
    ACCESS_TOKEN,
    Source,
    assert_no_secret,
    assert_stored_exactly_once,
    make_source,
    mews_conn_json,
    sqlite_conn_json,
)

DAG_ID = "mews_loyalty_sharded"
TASK_ID = "add_shard"
SHARDS = 4
POOL = "mews_api"
LIMIT, PERIOD = 16, 2.0  # the sandbox's limit for the token


@pytest.fixture
def shared_token_sandbox(mews_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    mews_sandbox.add_tokens(DEMO_CLIENT_TOKEN, ACCESS_TOKEN)
    mews_sandbox.configure(rate_limit_requests=LIMIT, rate_limit_period_s=PERIOD)
    # Each worker's client-side limiter gets its share of the token's limit.
    conn = mews_conn_json(mews_sandbox.url, rate_limit_requests=LIMIT // SHARDS, rate_limit_period=PERIOD)
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", conn)
    yield mews_sandbox


def create_pool() -> None:
    """What ``airflow pools set mews_api 4 ...`` does (the CLI's local API client), in this process."""
    from airflow.api.client import get_current_api_client

    get_current_api_client().create_pool(
        name=POOL, slots=SHARDS, description="Mews API: one slot per shard", include_deferred=False
    )
    pool = get_current_api_client().get_pool(POOL)
    assert pool[:2] == (POOL, SHARDS), pool


def trigger_run(run_id: str) -> None:
    """Serialize the dags folder and create the run, as ``airflow dags reserialize`` and
    ``airflow dags trigger`` do."""
    from airflow.api.client import get_current_api_client
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    manager = DagBundlesManager()
    manager.sync_bundles_to_db()
    for bundle in manager.get_all_dag_bundles():
        bundle.initialize()
        bag = BundleDagBag(bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
        assert DAG_ID in bag.dags, bag.import_errors
        sync_bag_to_db(bag, bundle.name, None)
    get_current_api_client().trigger_dag(dag_id=DAG_ID, run_id=run_id)


def task_instances(run_id: str) -> list[tuple[Any, ...]]:
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TI).filter(TI.dag_id == DAG_ID, TI.run_id == run_id).order_by(TI.map_index).all()
        return [(ti.map_index, ti.state, ti.pool, ti.start_date, ti.end_date) for ti in tis]


def the_dag_run(run_id: str) -> Any:
    from airflow.models.dagrun import DagRun

    (dr,) = DagRun.find(dag_id=DAG_ID, run_id=run_id)
    return dr


def test_mapped_shards_in_parallel_share_the_rate_limit(
    airflow_db, shared_token_sandbox, tmp_path, monkeypatch
):
    db = tmp_path / "members.db"
    source = make_source(db, "loyalty_members", 20000, 40)
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEMO_SQLITE", sqlite_conn_json(db))
    run_id = "rel_concurrency_1"

    create_pool()
    trigger_run(run_id)
    tis = task_instances(run_id)
    assert [(t[0], t[2]) for t in tis] == [(i, POOL) for i in range(SHARDS)]

    logs = [tmp_path / f"shard-{i}.log" for i in range(SHARDS)]
    workers = [
        subprocess.Popen(
            [AIRFLOW_BIN, "tasks", "test", DAG_ID, TASK_ID, run_id, "--map-index", str(i)],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        for i, log in enumerate(logs)
    ]
    codes = [w.wait(timeout=300) for w in workers]
    assert codes == [0] * SHARDS, "\n".join(log.read_text()[-3000:] for log in logs)

    tis = task_instances(run_id)
    assert [t[1] for t in tis] == ["success"] * SHARDS
    assert max(t[3] for t in tis) < min(t[4] for t in tis), "the shards did not all run at the same time"

    dr = the_dag_run(run_id)
    summaries = [task_result(dr, TASK_ID, key="mews_summary", map_index=i) for i in range(SHARDS)]
    for s in summaries:
        assert s["rows_read"] == s["added"] + s["skipped_existing"] + s["rejected"] + s["not_reached"], s
        assert s["not_reached"] == 0 and s["skipped_existing"] == 0, s
    assert sum(s["rows_read"] for s in summaries) == source.count
    assert sum(s["added"] for s in summaries) == len(source.valid)
    assert sum(s["rejected"] for s in summaries) == source.invalid

    stats = shared_token_sandbox.stats()
    answered_429 = stats.get("429", 0)
    assert answered_429 == sum(s["rate_limited"] for s in summaries), (stats, summaries)
    requests = sum(s["requests"] for s in summaries)
    assert answered_429 <= max(3, requests // 10), (
        f"{answered_429} requests of {requests} answered 429: the shared limit was not kept"
    )

    ids = assert_stored_exactly_once(shared_token_sandbox.memberships(), source)
    assert_shard_outputs(db, run_id, source, ids, summaries)
    assert_no_secret("", [dr], **{f"shard {i} worker output": log.read_text() for i, log in enumerate(logs)})


def assert_shard_outputs(
    db: Path, run_id: str, source: Source, ids: dict[str, str], summaries: list[dict[str, Any]]
) -> None:
    """Per shard, the results and rejections tables hold one row per source row."""
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        results = conn.execute(
            "SELECT map_index, source_row, account_id, mews_membership_id, outcome "
            "FROM mews_membership_results WHERE dag_id = ? AND run_id = ?",
            (DAG_ID, run_id),
        ).fetchall()
        rejected = conn.execute(
            "SELECT map_index, source_row, reason FROM mews_membership_rejections "
            "WHERE dag_id = ? AND run_id = ?",
            (DAG_ID, run_id),
        ).fetchall()
    for i, s in enumerate(summaries):
        rows = sorted(r[1] for r in results if r[0] == i) + sorted(r[1] for r in rejected if r[0] == i)
        assert sorted(rows) == list(range(1, s["rows_read"] + 1)), f"shard {i}: a row missing or twice"
    assert all(r[4] == "added" and ids[r[2]] == r[3] for r in results)
    assert len(rejected) == source.invalid and all(r[2] for r in rejected)
