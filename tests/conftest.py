"""Shared test set-up: a throw-away Airflow home with a migrated metadata DB, and DAG runs.

Airflow reads its configuration at import, so the environment is set here, before any
test module imports Airflow. DAG files must live in the dags folder for ``dag.test()``;
``run_dag`` writes a test's DAG file there and runs it with the real Airflow machinery.
The ``mews_sandbox`` and ``mews_conn`` fixtures come from the package's pytest plugin.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SESSION_DIR = Path(tempfile.mkdtemp(prefix="mews-tests-"))
DAGS_DIR = SESSION_DIR / "dags"
os.environ["AIRFLOW_HOME"] = str(SESSION_DIR / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS_DIR)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__TEST_CONNECTION"] = "Enabled"
# The rate limiter's per-user state (shared by processes on the token): one per test session.
os.environ["MEWS_RATE_LIMIT_DIR"] = str(SESSION_DIR / "rate-limit")
os.environ.pop("AIRFLOW_CONN_MEWS_DEFAULT", None)
DAGS_DIR.mkdir(parents=True, exist_ok=True)
for example in (ROOT / "dags_examples").glob("mews_*.py"):
    shutil.copy(example, DAGS_DIR / example.name)

AIRFLOW_BIN = str(Path(sys.executable).parent / "airflow")


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database (SQLite) for the whole session."""
    subprocess.run([AIRFLOW_BIN, "db", "migrate"], check=True, capture_output=True, env=os.environ.copy())
    return SESSION_DIR / "airflow"


@pytest.fixture
def run_dag(airflow_db: Path) -> Callable[..., Any]:
    """``run_dag(dag_id, source=None)``: write ``source`` as a DAG file (if given), run it with
    ``dag.test()`` and return the DagRun. Example DAGs are already in the dags folder."""

    def _run(dag_id: str, source: str | None = None, **test_kwargs: Any) -> Any:
        path = DAGS_DIR / f"{dag_id}.py"
        if source is not None:
            path.write_text(source)
        return load_dag(path, dag_id).test(**test_kwargs)

    return _run


def load_dag(path: Path, dag_id: str) -> Any:
    """The DAG ``dag_id`` defined by the file at ``path`` (portable across Airflow versions)."""
    namespace = runpy.run_path(str(path), run_name=f"mews_test_{dag_id}")
    for value in namespace.values():
        if getattr(value, "dag_id", None) == dag_id and hasattr(value, "test"):
            return value
    from airflow.models import DagBag  # DAGs created with `with DAG(...)` but not bound to a name

    bag = DagBag(dag_folder=str(path))
    dag = bag.get_dag(dag_id)
    assert dag is not None, f"DAG {dag_id} not found in {path}: {bag.import_errors}"
    return dag


def task_result(dag_run: Any, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    """The XCom a task of a finished DAG run pushed."""
    ti = dag_run.get_task_instance(task_id, map_index=map_index)
    return ti.xcom_pull(task_ids=task_id, key=key, map_indexes=map_index)
