"""Fault matrix, end to end through Airflow: every valid row stored exactly once, whatever fails.

Each case runs a real DAG with ``dag.test()`` (the task runs in this process, with Airflow's
retries) over a SQLite table of members with some invalid rows, against the sandbox over
loopback, with one kind of fault injected, then checks:

* the sandbox holds every valid row's AccountId exactly once (no duplicate, none missing,
  nothing else) with the row's MembershipNumber;
* the invalid rows are in the rejections table with a reason, every valid row is in the
  results table once, with the Id the sandbox gave it;
* the ``mews_summary`` XCom adds up: ``rows_total = added + skipped_existing + rejected +
  not_reached``, with the exact numbers expected;
* the task ended as asked (success, after an Airflow retry where the case needs one, or
  failed when no retry was allowed), and the fault really happened (sandbox counters).

Faults: 5xx bursts, 408s, 429 storms (short and long ``Retry-After`` in seconds, and in
HTTP-date form: the sandbox-side clock shows the client waited), connection refused
(sandbox down, then up again on the same port), connection dropped after the batch was
stored, a read timeout after storing, a sandbox restart (SIGKILL) while batches are in
flight, an outage longer than the hook's retry budget (the try fails, Airflow's retry
resumes from the ``task_state_store`` checkpoint), the same with no retry allowed, and all
of them mixed over 20 000 rows with a restart in the middle.

The in-process sandbox (the ``mews_sandbox`` fixture) serves most cases; the cases that stop
the server use a sandbox subprocess with ``--state-file``, so its data survives a restart.
The helpers here are shared with ``test_kill_retry.py`` and ``test_concurrency.py``.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import task_result

from airflow_provider_mews.testing import DEMO_CLIENT_TOKEN, connection_json
from airflow_provider_mews.testing.sample_data import COLUMNS, members, write_sqlite
from reliability.secrets_scan import SecretScanner

#: The module's own AccessToken (accepted by every sandbox here): its own client-side limiter.
ACCESS_TOKEN = "RELIABILITY-FAULTS-7C1D4E0B9A2F4D8E-B3A5C6D7E8F90123"
SRC_CONN = "mews_rel_src"
TASK_ID = "add_memberships"
RESULTS = "mews_rel_results"
REJECTIONS = "mews_rel_rejections"
BOTH_OPERATIONS = ["loyaltyMemberships/add", "loyaltyMemberships/getAll"]


# -- source rows and what must come out of them --


@dataclass(frozen=True)
class Source:
    """A table of ``count`` sample members, ``invalid`` of them unusable; what Mews must end with."""

    table: str
    count: int
    invalid: int
    invalid_rows: frozenset[int]  # member_id (= source row, the query orders by it)
    valid: dict[str, str]  # AccountId -> MembershipNumber of every valid row
    valid_rows: tuple[int, ...]


def make_source(path: Path, table: str, count: int, invalid: int, where: str = "") -> Source:
    """Write the table (``sample_data.write_sqlite``) and work out the expected outcome."""
    write_sqlite(str(path), count, invalid, table=table)
    rows = list(members(count, invalid))
    clean = list(members(count, 0))  # same seed: only the broken fields differ
    bad = frozenset(r[0] for r, c in zip(rows, clean, strict=True) if r != c)
    assert len(bad) == invalid
    account, number = COLUMNS.index("account_id"), COLUMNS.index("membership_number")
    valid = {r[account]: r[number] for r in rows if r[0] not in bad}
    assert len(valid) == count - invalid  # sample accounts are unique
    return Source(table, count, invalid, bad, valid, tuple(r[0] for r in rows if r[0] not in bad))


def sqlite_conn_json(path: Path) -> str:
    return json.dumps({"conn_type": "sqlite", "host": str(path)})


def mews_conn_json(url: str, **extra: Any) -> str:
    """The connection the tests use: this module's token, a limiter of its own, ``extra`` on top."""
    extra = {"rate_limit_requests": 1000, "rate_limit_period": 30, **extra}
    return connection_json(url, access_token=ACCESS_TOKEN, client_token=DEMO_CLIENT_TOKEN, **extra)


def dag_source(
    dag_id: str,
    table: str,
    *,
    if_exists: str = "skip",
    batch_size: int = 1000,
    max_active_requests: int = 1,
    retries: int = 0,
    outputs: bool = True,
) -> str:
    """A DAG with one LoyaltyMembershipAddOperator reading ``table`` in member_id order."""
    out = f"results_table={RESULTS!r}, rejections_table={REJECTIONS!r}," if outputs else ""
    return f"""
from datetime import timedelta

import pendulum

from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.11
    from airflow import DAG

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    LoyaltyMembershipAddOperator(
        task_id={TASK_ID!r},
        sql_conn_id={SRC_CONN!r},
        sql="SELECT * FROM {table} ORDER BY member_id",
        field_map={{"tier_id": "LoyaltyTierId"}},
        if_exists={if_exists!r},
        batch_size={batch_size},
        max_active_requests={max_active_requests},
        max_rejected_rows=1000,
        {out}
        retries={retries},
        retry_delay=timedelta(seconds=0),
        retry_exponential_backoff=False,
    )
"""


# -- checks --


def assert_stored_exactly_once(stored: list[dict[str, Any]], source: Source) -> dict[str, str]:
    """Every valid row once, nothing else; returns AccountId -> Mews Id."""
    counts = Counter(m["AccountId"] for m in stored)
    duplicated = {a: n for a, n in counts.items() if n > 1}
    assert not duplicated, (
        f"{len(duplicated)} accounts stored twice or more, e.g. {list(duplicated.items())[:3]}"
    )
    missing = source.valid.keys() - counts.keys()
    assert not missing, f"{len(missing)} valid rows never stored, e.g. {sorted(missing)[:3]}"
    unexpected = counts.keys() - source.valid.keys()
    assert not unexpected, f"{len(unexpected)} memberships match no valid row, e.g. {sorted(unexpected)[:3]}"
    wrong = [m for m in stored if m.get("MembershipNumber") != source.valid[m["AccountId"]]]
    assert not wrong, f"{len(wrong)} memberships stored with another row's MembershipNumber"
    return {m["AccountId"]: m["Id"] for m in stored}


def assert_counts(summary: dict[str, Any], source: Source, *, added: int | None = None) -> None:
    """The summary accounts for every row, with the numbers of a complete run unless told."""
    assert summary["rows_read"] == summary["rows_total"] == source.count
    assert summary["rows_total"] == (
        summary["added"] + summary["skipped_existing"] + summary["rejected"] + summary["not_reached"]
    ), summary
    assert summary["added"] == (len(source.valid) if added is None else added), summary
    assert summary["rejected"] == source.invalid, summary
    if added is None:
        assert summary["not_reached"] == 0 and summary["skipped_existing"] == 0, summary


def assert_outputs(db: Path, dag_id: str, run_id: str, source: Source, ids: dict[str, str]) -> None:
    """The rejections table names each invalid row and why; the results table each valid row, once."""
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        key = "WHERE dag_id = ? AND run_id = ?"
        rejected = conn.execute(
            f"SELECT source_row, field, reason FROM {REJECTIONS} {key}", (dag_id, run_id)
        ).fetchall()
        results = conn.execute(
            f"SELECT source_row, account_id, mews_membership_id, outcome FROM {RESULTS} {key}",
            (dag_id, run_id),
        ).fetchall()
    assert sorted(r[0] for r in rejected) == sorted(source.invalid_rows)
    assert all(r[1] and r[2] and f"row {r[0]}" in r[2] for r in rejected), rejected[:3]
    assert sorted(r[0] for r in results) == list(source.valid_rows), "results table: a row missing or twice"
    assert all(r[3] == "added" and ids[r[1]] == r[2] for r in results), "results table: an Id not in Mews"


def check_run(dr: Any, sandbox: Any, source: Source, db: Path, *, try_number: int = 1) -> dict[str, Any]:
    """The common end state of a successful run; returns the summary."""
    assert dr.state == "success", f"DAG run ended {dr.state}"
    ti = dr.get_task_instance(TASK_ID)
    assert ti.state == "success" and ti.try_number == try_number, (ti.state, ti.try_number)
    summary = task_result(dr, TASK_ID, key="mews_summary")
    ids = assert_stored_exactly_once(sandbox.memberships(), source)
    assert_counts(summary, source)
    assert_outputs(db, dr.dag_id, dr.run_id, source, ids)
    return summary


def assert_no_secret(captured: Any, runs: list[Any], **texts: Any) -> None:
    """Neither token in the task logs (the console ``dag.test()`` and the CLI write them to), the
    runs' XComs and rendered fields, or ``texts`` (``reliability.secrets_scan``)."""
    scanner = SecretScanner.with_demo_tokens(ACCESS_TOKEN)
    scanner.assert_clean(captured=captured, texts=texts)
    for dr in runs:
        scanner.assert_clean(dag_run=dr, logs_dir=os.devnull)


def api_requests(stats: dict[str, int]) -> int:
    return sum(n for k, n in stats.items() if k.startswith("requests:loyaltyMemberships/"))


# -- a sandbox in a subprocess that can be killed and restarted on the same port --


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SandboxProcess:
    """``python -m airflow_provider_mews.testing.sandbox`` with a state file, killable with SIGKILL."""

    def __init__(self, state_file: Path, *args: str) -> None:
        self.port = free_port()
        self.state_file = state_file
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> SandboxProcess:
        cmd = [sys.executable, "-m", "airflow_provider_mews.testing.sandbox", "--port", str(self.port)]
        cmd += ["--state-file", str(self.state_file), "--token", f"{DEMO_CLIENT_TOKEN}:{ACCESS_TOKEN}"]
        cmd += self.args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.stats()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sandbox on port {self.port} did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: in-flight requests die with it; what it stored is in the state file."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def _call(self, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(urllib.request.Request(self.url + path, data=data), timeout=10) as r:
            return json.loads(r.read())

    def configure(self, **config: Any) -> None:
        self._call("/_sandbox/config", config)

    def stats(self) -> dict[str, int]:
        return self._call("/_sandbox/stats")  # type: ignore[no-any-return]

    def memberships(self) -> list[dict[str, Any]]:
        return self._call("/_sandbox/memberships")  # type: ignore[no-any-return]


@dataclass
class Watcher:
    """A background thread that acts on the sandbox while ``dag.test()`` runs in the main thread."""

    action: Callable[[], None]
    errors: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def __enter__(self) -> Watcher:
        def run() -> None:
            try:
                self.action()
            except BaseException as exc:  # reported by __exit__
                self.errors.append(exc)

        self.thread = threading.Thread(target=run, name="fault-watcher", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.thread is not None
        self.thread.join(timeout=60)
        if self.errors:
            raise self.errors[0]


def wait_for(condition: Callable[[], bool], timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def task_running(dag_id: str) -> bool:
    """The task instance is running (read from the metadata database, as the UI would)."""
    db = Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        rows = conn.execute("SELECT state FROM task_instance WHERE dag_id = ?", (dag_id,)).fetchall()
    return rows == [("running",)]


# -- fixtures --


@pytest.fixture
def run_dag(run_dag: Callable[..., Any], capfd: pytest.CaptureFixture[str]) -> Iterator[Callable[..., Any]]:
    """``run_dag`` of conftest, then a scan for the tokens in all it produced."""
    runs: list[Any] = []

    def run(*args: Any, **kwargs: Any) -> Any:
        runs.append(run_dag(*args, **kwargs))
        return runs[-1]

    yield run
    assert_no_secret(capfd.readouterr(), runs)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Source, Source]:
    """One SQLite file: a 3 000-row table and a 20 000-row table, both with invalid rows."""
    db = tmp_path_factory.mktemp("fault-matrix") / "members.db"
    small = make_source(db, "members_3k", 3000, 12)
    large = make_source(db, "members_20k", 20000, 60)
    return db, small, large


@pytest.fixture
def src(sources: tuple[Path, Source, Source], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Source, Source]:
    monkeypatch.setenv(f"AIRFLOW_CONN_{SRC_CONN.upper()}", sqlite_conn_json(sources[0]))
    return sources


@pytest.fixture
def sandbox(mews_sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The in-process sandbox, accepting this module's token, with the connection pointing at it."""
    mews_sandbox.add_tokens(DEMO_CLIENT_TOKEN, ACCESS_TOKEN)
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", mews_conn_json(mews_sandbox.url))
    return mews_sandbox


@pytest.fixture
def sandbox_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    started: list[SandboxProcess] = []

    def make(*args: str, **extra: Any) -> SandboxProcess:
        sb = SandboxProcess(tmp_path / f"sandbox-{len(started)}.jsonl", *args)
        started.append(sb)
        monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", mews_conn_json(sb.url, **extra))
        return sb

    yield make
    for sb in started:
        sb.kill()


@pytest.fixture
def request_log(sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, str, str | None]]:
    """(monotonic time, operation, fault served) of every API request the sandbox handled."""
    log: list[tuple[float, str, str | None]] = []
    original = sandbox.next_fault

    def next_fault(operation: str) -> str | None:
        fault = original(operation)
        log.append((time.monotonic(), operation, fault))
        return fault

    monkeypatch.setattr(sandbox, "next_fault", next_fault)
    return log


# -- the matrix --


@pytest.mark.parametrize(
    ("case", "script", "operations"),
    [
        # An add failing before the store (reconciled: nothing found, so sent again), and
        # getAlls failing three times in a row (the hook retries them: 5 attempts at most).
        ("5xx_burst", ["", "500", "503", "502html", "500", "", "", "503", "502html", "503"], BOTH_OPERATIONS),
        ("408", ["408", "", "408", "408"], ["loyaltyMemberships/add"]),
    ],
)
def test_retryable_errors_end_with_every_row_once(run_dag, src, sandbox, case, script, operations):
    db, source, _ = src
    sandbox.configure(fault_script=script, fault_operations=operations)
    dag_id = f"rel_fault_{case}"
    dr = run_dag(dag_id, dag_source(dag_id, source.table))
    summary = check_run(dr, sandbox, source, db)
    stats = sandbox.stats()
    assert served(stats) == sum(1 for f in script if f), stats
    assert summary["requests"] == api_requests(stats)


@pytest.mark.parametrize(
    ("case", "script", "min_waits"),
    [
        # Retry-After in seconds: a short storm, then a long-ish one.
        ("429_seconds", ["429:1", "429:1", "429:1", "", "", "429:3"], [1, 1, 1, 3]),
        # Retry-After as an HTTP date (whole seconds: the wait is at least the delta minus one).
        ("429_http_date", ["429date:2", "429date:2", "", "429date:3"], [1, 1, 2]),
    ],
)
def test_429_storms_are_waited_out_as_told(run_dag, src, sandbox, request_log, case, script, min_waits):
    db, source, _ = src
    sandbox.configure(fault_script=script, fault_operations=BOTH_OPERATIONS)
    dag_id = f"rel_fault_{case}"
    dr = run_dag(dag_id, dag_source(dag_id, source.table))  # one request at a time: gaps are waits
    summary = check_run(dr, sandbox, source, db)
    assert summary["rate_limited"] == len(min_waits)
    # Seen from the server: after each 429 the next request came no sooner than Retry-After.
    gaps = [
        (fault, later[0] - when)
        for (when, _, fault), later in itertools.pairwise(request_log)
        if fault and fault.startswith("429")
    ]
    assert len(gaps) == len(min_waits), request_log
    for (fault, gap), wait in zip(gaps, min_waits, strict=True):
        assert gap >= wait - 0.05, f"request {gap:.2f} s after a {fault} answer, Retry-After asked {wait} s"


@pytest.mark.parametrize(
    ("case", "script", "conn_extra"),
    [
        # The batch is stored, then the connection is cut before the answer.
        ("drop_after_store", ["drop_after_store", "", "drop_after_store"], {}),
        # The batch is stored, then the answer never comes: the read timeout (1.5 s) ends the wait.
        ("read_timeout_after_store", ["", "hang_after_store:4"], {"timeout": 1.5}),
    ],
)
def test_lost_answers_are_reconciled_not_resent(run_dag, src, sandbox, monkeypatch, case, script, conn_extra):
    db, source, _ = src
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", mews_conn_json(sandbox.url, **conn_extra))
    sandbox.configure(fault_script=script)
    dag_id = f"rel_fault_{case}"
    dr = run_dag(dag_id, dag_source(dag_id, source.table, if_exists="add"))
    summary = check_run(dr, sandbox, source, db)
    # The batches whose answer was lost were found stored by reconciliation, and not sent again.
    lost = [i for i, f in enumerate(script) if f]
    expected = sum(1 for r in source.valid_rows if (r - 1) // 1000 in lost)
    assert summary["reconciled"] == expected, summary
    assert sandbox.stats()["requests:loyaltyMemberships/add"] == 3


def test_connection_refused_until_the_sandbox_is_back(run_dag, src, sandbox_process):
    """The sandbox is stopped when the task starts, and back on the same port a second later."""
    db, source, _ = src
    sb = sandbox_process().start()
    sb.kill()
    dag_id = "rel_fault_connection_refused"

    def restart_once_the_task_runs() -> None:
        wait_for(lambda: task_running(dag_id), what="the task to start")
        time.sleep(1.0)  # the task's first attempts meet a closed port
        sb.start()

    with Watcher(restart_once_the_task_runs):
        dr = run_dag(dag_id, dag_source(dag_id, source.table, if_exists="add"))
    summary = check_run(dr, sb, source, db)
    # Attempts the sandbox never saw were refused; the adds were retried without a doubt.
    assert summary["requests"] > api_requests(sb.stats())
    assert summary["reconciled"] == 0


def test_sandbox_restart_in_the_middle_of_a_run(run_dag, src, sandbox_process):
    """SIGKILL while batches are in flight; the same server (same port and data) is back 1 s later."""
    db, source, _ = src
    sb = sandbox_process("--latency", "2").start()  # 1 s per 500-row add
    dag_id = "rel_fault_restart"
    seen: dict[str, Any] = {}

    def restart_after_first_batch() -> None:
        wait_for(lambda: sb.stats().get("stored", 0) >= 400, what="the first batch to be stored")
        seen.update(sb.stats())
        sb.kill()
        time.sleep(1.0)
        sb.start()

    with Watcher(restart_after_first_batch):
        dr = run_dag(dag_id, dag_source(dag_id, source.table, batch_size=500, max_active_requests=2))
    assert seen["stored"] < len(source.valid), "the restart came after the last batch"
    summary = check_run(dr, sb, source, db)
    # Attempts made while it was down reached no sandbox.
    assert summary["requests"] > api_requests(seen) + api_requests(sb.stats())


def outage_script() -> list[str]:
    """Two batches go through (getAll + add each), then Mews answers 503 to six requests in a row:
    more than the hook's five attempts at the third batch's getAll."""
    return ["", "", "", "", *["503"] * 6]


def test_outage_longer_than_the_retry_budget_is_resumed_by_airflow_retry(run_dag, src, sandbox):
    db, source, _ = src
    sandbox.configure(fault_script=outage_script(), fault_operations=BOTH_OPERATIONS)
    dag_id = "rel_fault_outage_retry"
    dr = run_dag(dag_id, dag_source(dag_id, source.table, retries=2))
    summary = check_run(dr, sandbox, source, db, try_number=2)
    # Try 2 skipped the two batches try 1 finished, from the task_state_store checkpoint.
    assert summary["resumed_batches"] == 2, summary
    assert sandbox.stats()["fault:503"] == 6


def test_outage_without_retry_fails_with_exact_counts(run_dag, src, sandbox):
    """No retry allowed: the task fails, and its summary says exactly what Mews has."""
    _, source, _ = src
    sandbox.configure(fault_script=outage_script(), fault_operations=BOTH_OPERATIONS)
    dag_id = "rel_fault_outage_no_retry"
    dr = run_dag(dag_id, dag_source(dag_id, source.table, retries=0))
    assert dr.state == "failed"
    ti = dr.get_task_instance(TASK_ID)
    assert ti.state == "failed" and ti.try_number == 1
    summary = task_result(dr, TASK_ID, key="mews_summary")
    first_two = [r for r in source.valid_rows if r <= 2000]
    # The failure was on the last batch: all was read; the source's size is known either way.
    assert summary["rows_read"] <= summary["rows_total"] == source.count
    assert summary["rows_total"] == (
        summary["added"] + summary["skipped_existing"] + summary["rejected"] + summary["not_reached"]
    ), summary
    assert summary["added"] == len(first_two) and summary["skipped_existing"] == 0, summary
    stored = Counter(m["AccountId"] for m in sandbox.memberships())
    assert stored == Counter(a for a, number in source.valid.items() if int(number[4:]) <= 2000)


def test_all_faults_mixed_over_20000_rows_with_a_restart(run_dag, src, sandbox_process):
    """Every fault kind, 8 batches in flight, and a SIGKILL + restart of the server midway."""
    db, _, source = src
    sb = sandbox_process("--latency", "0.3", timeout=2).start()
    faults = [
        "500", "503", "502html", "408", "429:1", "429date:2", "drop_before_store", "drop_after_store",
        "hang_after_store:4",
    ]  # fmt: skip
    # On adds only, so that every "after store" fault really loses an add's answer (5xx and
    # 429 on getAll have their own cases above).
    sb.configure(fault_script=[entry for fault in faults for entry in (fault, "")])
    dag_id = "rel_fault_mix"

    seen: dict[str, int] = {}

    def restart_midway() -> None:
        # Once every fault was served, kill the server with batches in flight; back 1 s later.
        wait_for(lambda: served(sb.stats()) == len(faults), what="the faults to be served")
        seen.update(sb.stats())
        sb.kill()
        time.sleep(1.0)
        sb.start()  # the same port and memberships; fresh faults for the rest of the run
        sb.configure(fault_script=["drop_after_store", "", "500", "", "429:1", "", "hang_after_store:4"])

    with Watcher(restart_midway):
        dr = run_dag(dag_id, dag_source(dag_id, source.table, max_active_requests=8, retries=3))
    assert {f"fault:{f.split(':')[0]}" for f in faults} <= seen.keys(), seen
    assert seen["stored"] < len(source.valid), "the restart came after the last batch"
    ti = dr.get_task_instance(TASK_ID)
    check_run(dr, sb, source, db, try_number=ti.try_number)


def served(stats: dict[str, int]) -> int:
    return sum(n for k, n in stats.items() if k.startswith("fault:"))
