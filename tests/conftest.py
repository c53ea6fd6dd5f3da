"""Shared test set-up: a throw-away Airflow home with a migrated metadata DB, and DAG runs.

Airflow reads its configuration at import, so the environment is set here, before any
test module imports Airflow. DAG files must live in the dags folder for ``dag.test()``;
``run_dag`` writes a test's DAG file there and runs it with the real Airflow machinery.
The ``mews_sandbox`` and ``mews_conn`` fixtures come from the package's pytest plugin, loaded
here (opt-in, as users load it: ``pytest_plugins = [...]``).

Tests that need something outside Python (Chromium, a PostgreSQL server, Prism) call
``needs(what, how)`` when it is missing: the test is skipped with how to enable it, and the
run ends with the list. Under ``MEWS_REQUIRE_ALL_TESTS=1`` (set by ``.ci/run``) or ``CI``,
a missing dependency fails the test instead; ``MEWS_REQUIRE_ALL_TESTS=1`` also turns any other
skip into a failure, so CI cannot go green with a test left out.
"""

from __future__ import annotations

import itertools
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

MEWS_PLUGIN = "airflow_provider_mews.testing.pytest_plugin"


def _plugin_autoloaded() -> bool:
    """An editable install made before the plugin became opt-in still registers it through a
    ``pytest11`` entry point until reinstalled; loading it twice would be an error."""
    from importlib.metadata import entry_points

    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == MEWS_PLUGIN for ep in entry_points(group="pytest11"))


pytest_plugins = [] if _plugin_autoloaded() else [MEWS_PLUGIN]

ROOT = Path(__file__).resolve().parents[1]
SESSION_DIR = Path(tempfile.mkdtemp(prefix="mews-tests-"))
DAGS_DIR = SESSION_DIR / "dags"
os.environ["AIRFLOW_HOME"] = str(SESSION_DIR / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS_DIR)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__TEST_CONNECTION"] = "Enabled"
# The OpenLineage listener (dev extra) only where a test turns it on (tests/operators/test_lineage.py):
# elsewhere it would fork and emit events for every task of every test.
os.environ.setdefault("AIRFLOW__OPENLINEAGE__DISABLED", "True")
# The rate limiter's per-user state (shared by processes on the token): one per test session.
os.environ["MEWS_RATE_LIMIT_DIR"] = str(SESSION_DIR / "rate-limit")
os.environ.pop("AIRFLOW_CONN_MEWS_DEFAULT", None)
DAGS_DIR.mkdir(parents=True, exist_ok=True)
for example in (ROOT / "dags_examples").glob("mews_*.py"):
    shutil.copy(example, DAGS_DIR / example.name)

AIRFLOW_BIN = str(Path(sys.executable).parent / "airflow")

#: Every test must run: set by .ci/run for `make test`.
REQUIRE_ALL = os.environ.get("MEWS_REQUIRE_ALL_TESTS", "0") not in ("", "0")
#: CI (any CI sets it) must not skip for a missing dependency either.
REQUIRE_DEPENDENCIES = REQUIRE_ALL or os.environ.get("CI", "").lower() not in ("", "0", "false")
NEEDS_PREFIX = "needs "


def needs(what: str, how: str) -> NoReturn:
    """Skip the calling test because ``what`` is missing, saying ``how`` to enable it; fail
    instead when every test is required (``MEWS_REQUIRE_ALL_TESTS=1`` or ``CI``)."""
    if REQUIRE_DEPENDENCIES:
        pytest.fail(
            f"{what} is missing, and CI/MEWS_REQUIRE_ALL_TESTS requires this test to run: {how}",
            pytrace=False,
        )
    pytest.skip(f"{NEEDS_PREFIX}{what}: {how}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under MEWS_REQUIRE_ALL_TESTS=1 a skipped test is a failed one (xfail stays xfail)."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but MEWS_REQUIRE_ALL_TESTS=1 requires every test to run: {reason}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The tests skipped for a missing dependency, grouped by how to enable them."""
    groups: dict[str, list[str]] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if reason.startswith(NEEDS_PREFIX):
            groups.setdefault(reason.removeprefix(NEEDS_PREFIX), []).append(report.nodeid)
    if not groups:
        return
    count = sum(len(ids) for ids in groups.values())
    terminalreporter.section(f"{count} tests skipped: a dependency outside Python is missing", sep="=")
    for reason, ids in groups.items():
        what, _, how = reason.partition(": ")
        terminalreporter.write_line(f"{len(ids)} need {what}; to run them: {how}")
        for nodeid in ids:
            terminalreporter.write_line(f"    {nodeid}")
    terminalreporter.write_line("CI (MEWS_REQUIRE_ALL_TESTS=1) runs them all and fails instead of skipping.")


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


_sync_limits = itertools.count(200_000)  # a limiter of its own per connection (see test_hook.py)


@pytest.fixture
def sync_hook(mews_sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A hook on the connection ``mews_sync`` to the sandbox, with fast backoff and a limit of its own."""
    from airflow_provider_mews.hooks.mews import MewsConnectorHook
    from airflow_provider_mews.testing import connection_json

    extra = {"rate_limit_requests": next(_sync_limits), "rate_limit_period": 1}
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_SYNC", connection_json(mews_sandbox.url, **extra))
    hook = MewsConnectorHook("mews_sync", backoff_base_s=0.01, backoff_max_s=0.05)
    yield hook
    hook.close()


def seed_sandbox(sandbox: Any, count: int, program: str) -> list[dict[str, Any]]:
    """``count`` memberships stored in the sandbox directly (Code ``M-n``, Points ``n``), as created."""
    import uuid

    stored: list[dict[str, Any]] = []
    for start in range(0, count, 1000):
        items = [
            {
                "AccountId": str(uuid.uuid4()),
                "LoyaltyProgramId": program,
                "IsPrimary": True,
                "Code": f"M-{n}",
                "Points": n,
            }
            for n in range(start, min(start + 1000, count))
        ]
        created, _ = sandbox.add({"LoyaltyMemberships": items})
        sandbox.state.store(created)
        stored += created
    return stored
