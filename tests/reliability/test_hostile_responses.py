"""Hostile answers from Mews (or whatever sits in front of it) never become rows marked added.

The sandbox stores a batch and then answers with an HTML error page, an empty or truncated
body, a body without the list or with fewer items, wrong types, an enormous body, a
slow-loris trickle, or nothing at all. Each must end in a clear error or a correct
reconciliation:

* hook level: the answer is refused with :class:`MewsResponseError` (or a transport error)
  saying it may have been processed, so the caller reconciles instead of trusting it;
  a trickling server cannot hold a call beyond the connection's ``timeout``; an enormous
  body is not read into memory;
* end to end (``dag.test()`` over a few thousand rows with the fault on some adds): every
  row the results file marks as added is in Mews with that Id, nothing is stored twice,
  and the task succeeds after reconciling, or fails with a message naming the cause.

Every end-to-end test also scans logs, XComs, rendered fields, summary and errors for the
tokens (``secrets_scan``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import tracemalloc
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import task_result

from airflow_provider_mews.exceptions import (
    MewsConnectionError,
    MewsError,
    MewsResponseError,
    MewsServerError,
)
from airflow_provider_mews.hooks.mews import MAX_RESPONSE_BYTES, MewsConnectorHook
from airflow_provider_mews.testing import connection_json
from airflow_provider_mews.testing.sample_data import PROGRAM_ID, write_sqlite
from reliability.secrets_scan import SecretScanner, distinctive_token

ROWS = 2000
BATCH = 250

# Distinctive tokens for this module, accepted by the sandbox next to the demo pair.
CLIENT_TOKEN = distinctive_token("hostile-client")
ACCESS_TOKEN = distinctive_token("hostile-access")


@pytest.fixture
def sandbox(mews_sandbox: Any) -> Any:
    mews_sandbox.add_tokens(CLIENT_TOKEN, ACCESS_TOKEN)
    return mews_sandbox


@pytest.fixture
def scanner() -> SecretScanner:
    return SecretScanner.with_demo_tokens(CLIENT_TOKEN, ACCESS_TOKEN)


def _use_connection(
    monkeypatch: pytest.MonkeyPatch, url: str, conn_id: str = "rel_hostile", **extra: Any
) -> str:
    value = connection_json(url, access_token=ACCESS_TOKEN, client_token=CLIENT_TOKEN, **extra)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", value)
    return conn_id


def _items(count: int) -> list[dict[str, Any]]:
    return [
        {"AccountId": str(uuid.uuid4()), "LoyaltyProgramId": PROGRAM_ID, "IsPrimary": True, "Code": f"H-{i}"}
        for i in range(count)
    ]


# --------------------------------------------------------------------------------------------
# Hook level
# --------------------------------------------------------------------------------------------

STORED_THEN_HOSTILE = {
    "fewer200": "expected 20 created memberships in LoyaltyMemberships, got 19",
    "empty200": "not JSON (0 bytes)",
    "truncated200": "not JSON",
    "wrongtypes200": "has no Id",
    "nolist200": "got no list",
}


@pytest.mark.parametrize("ids_only", [False, True], ids=["full", "ids_only"])
@pytest.mark.parametrize("fault", sorted(STORED_THEN_HOSTILE))
def test_hook_refuses_a_hostile_200_and_says_it_may_be_stored(fault, ids_only, sandbox, monkeypatch, scanner):
    """Both decoders (the full one and the typed one the operator uses) refuse alike."""
    conn_id = _use_connection(monkeypatch, sandbox.url)
    hook = MewsConnectorHook(conn_id)
    sandbox.configure(fault_script=[fault])
    with pytest.raises(MewsResponseError) as caught:
        hook.add_loyalty_memberships(_items(20), ids_only=ids_only)
    exc = caught.value
    assert exc.may_have_been_processed is True
    assert exc.status == 200 and exc.operation == "loyaltyMemberships/add"
    assert STORED_THEN_HOSTILE[fault] in str(exc)
    assert "reconcile before re-sending" in str(exc)
    stats = sandbox.stats()
    # The batch really was stored, and the add was not sent again blindly.
    assert stats["added"] == 20 and stats["requests:loyaltyMemberships/add"] == 1
    assert stats[f"fault:{fault}"] == 1
    scanner.assert_clean(texts={"exception": exc}, objects=[hook, hook.settings])


def test_hook_html_error_page_is_a_clear_server_error_not_resent(sandbox, monkeypatch, scanner):
    hook = MewsConnectorHook(_use_connection(monkeypatch, sandbox.url))
    sandbox.configure(fault_script=["502html"])
    with pytest.raises(MewsServerError) as caught:
        hook.add_loyalty_memberships(_items(5))
    exc = caught.value
    assert exc.status == 502 and exc.may_have_been_processed is True
    assert "non-JSON body, text/html" in str(exc) and "502 Bad Gateway" in str(exc)
    assert sandbox.stats()["requests:loyaltyMemberships/add"] == 1  # an add is never blindly resent
    scanner.assert_clean(texts={"exception": exc}, objects=[hook])


@pytest.mark.parametrize("fault", ["502html", "truncated200", "empty200"])
def test_hook_read_is_retried_or_refused_never_trusted(fault, sandbox, monkeypatch):
    """getAll is idempotent: a 5xx page is simply retried; a broken 200 is refused."""
    hook = MewsConnectorHook(_use_connection(monkeypatch, sandbox.url), backoff_base_s=0.01)
    items = _items(3)
    hook.add_loyalty_memberships(items)
    sandbox.configure(fault_script=[fault], fault_operations={"loyaltyMemberships/getAll"})
    accounts = [i["AccountId"] for i in items]
    if fault == "502html":
        found = list(hook.get_loyalty_memberships(account_ids=accounts))
        assert sorted(m["AccountId"] for m in found) == sorted(accounts)
        assert sandbox.stats()["requests:loyaltyMemberships/getAll"] == 2
    else:
        with pytest.raises(MewsResponseError, match="not JSON"):
            list(hook.get_loyalty_memberships(account_ids=accounts))


def test_hook_hang_after_store_is_a_timeout_that_may_have_been_processed(sandbox, monkeypatch):
    hook = MewsConnectorHook(_use_connection(monkeypatch, sandbox.url, timeout=1))
    sandbox.configure(fault_script=["hang_after_store:3"])
    with pytest.raises(MewsConnectionError) as caught:
        hook.add_loyalty_memberships(_items(5))
    assert caught.value.may_have_been_processed is True
    assert "no complete answer after sending" in str(caught.value)
    assert sandbox.stats()["added"] == 5


def _call_in_thread(fn: Any, bound_s: float) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread; (finished within bound_s, result or exception)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["result"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(bound_s)
    return not thread.is_alive(), box.get("result")


def test_hook_slow_loris_answer_is_bounded_by_the_connection_timeout(sandbox, monkeypatch):
    """64 bytes every 0.2 s never trips a per-read timeout of 1 s; the whole answer must be bounded.

    The 1000-item answer (~600 kB) would take about half an hour at that pace. The 60 s
    bound below is only a liveness guard so a regression fails instead of hanging the suite.
    """
    hook = MewsConnectorHook(_use_connection(monkeypatch, sandbox.url, timeout=1))
    sandbox.configure(fault_script=["slow200:0.2"])
    finished, outcome = _call_in_thread(lambda: hook.add_loyalty_memberships(_items(1000)), 60)
    assert finished, "a slow-loris answer held the add far beyond the connection's timeout"
    assert isinstance(outcome, MewsConnectionError), outcome
    assert outcome.may_have_been_processed is True
    assert "not complete within the connection's timeout" in str(outcome)
    # The same hook (same pooled session) works normally afterwards.
    assert len(hook.add_loyalty_memberships(_items(2))) == 2


def test_hook_slow_loris_on_a_read_is_retried(sandbox, monkeypatch):
    hook = MewsConnectorHook(_use_connection(monkeypatch, sandbox.url, timeout=1), backoff_base_s=0.01)
    items = _items(200)
    hook.add_loyalty_memberships(items)
    sandbox.configure(fault_script=["slow200:0.2"], fault_operations={"loyaltyMemberships/getAll"})
    finished, outcome = _call_in_thread(
        lambda: list(hook.get_loyalty_memberships(account_ids=[i["AccountId"] for i in items])), 60
    )
    assert finished, "a slow-loris answer held a getAll far beyond the connection's timeout"
    assert isinstance(outcome, list) and len(outcome) == 200, outcome
    assert hook.stats.retries == 1


@pytest.fixture
def subprocess_sandbox(tmp_path: Path) -> Any:
    """A sandbox in its own process, so its memory does not count in this one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_mews.testing.sandbox", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


def test_hook_huge_body_is_not_read_into_memory(subprocess_sandbox, monkeypatch):
    """A 200 MB answer: refused after MAX_RESPONSE_BYTES, with Python memory staying far below it."""
    url = subprocess_sandbox
    requests.post(f"{url}/_sandbox/config", json={"fault_script": ["huge200:200"]}, timeout=10)
    hook = MewsConnectorHook(_use_connection(monkeypatch, url))
    requests.post(
        f"{url}/_sandbox/tokens", json={"ClientToken": CLIENT_TOKEN, "AccessToken": ACCESS_TOKEN}, timeout=10
    )
    hook.settings  # noqa: B018 - connection parsed before measuring
    tracemalloc.start()
    try:
        with pytest.raises(MewsResponseError) as caught:
            hook.add_loyalty_memberships(_items(10))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_RESPONSE_BYTES < 200 * 2**20, f"peak Python memory {peak / 2**20:.0f} MiB"
    assert "larger than" in str(caught.value) and caught.value.may_have_been_processed is True
    stats = requests.get(f"{url}/_sandbox/stats", timeout=10).json()
    assert stats["added"] == 10


# --------------------------------------------------------------------------------------------
# End to end: dag.test() over a few thousand rows with the fault on some adds
# --------------------------------------------------------------------------------------------

DAG_TEMPLATE = """
from datetime import timedelta

import pendulum

from airflow.sdk import DAG
from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    LoyaltyMembershipAddOperator(
        task_id="add",
        mews_conn_id={conn_id!r},
        sql_conn_id={sql_conn_id!r},
        table="loyalty_members",
        field_map={{"tier_id": "LoyaltyTierId"}},
        batch_size={batch},
        max_active_requests=4,
        results_file={results!r},
        rejections_file={rejections!r},
        retries={retries},
        retry_delay=timedelta(seconds=0),
        retry_exponential_backoff=False,
    )
"""


def _run(
    run_dag: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox: Any, name: str,
    *, retries: int = 1, timeout: float = 2, seed: int = 11,
) -> tuple[Any, Path]:  # fmt: skip
    db = tmp_path / "members.db"
    write_sqlite(str(db), ROWS, seed=seed)
    monkeypatch.setenv("AIRFLOW_CONN_REL_HOSTILE_SRC", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    conn_id = _use_connection(monkeypatch, sandbox.url, timeout=timeout)
    results = tmp_path / "results.jsonl"
    dag_id = f"rel_hostile_{name}"
    source = DAG_TEMPLATE.format(
        dag_id=dag_id,
        conn_id=conn_id,
        sql_conn_id="rel_hostile_src",
        batch=BATCH,
        results=str(results),
        rejections=str(tmp_path / "rejections.jsonl"),
        retries=retries,
    )
    return run_dag(dag_id, source), results


def _last_outcomes(results: Path) -> dict[int, dict[str, Any]]:
    """The results file's last line per source row (a retried batch rewrites its rows)."""
    outcomes: dict[int, dict[str, Any]] = {}
    if results.exists():
        for line in results.read_text().splitlines():
            record = json.loads(line)
            outcomes[record["source_row"]] = record
    return outcomes


def _assert_added_rows_are_in_mews(sandbox: Any, results: Path) -> dict[int, dict[str, Any]]:
    """Every row marked added exists in Mews with that Id and its own data; nothing stored twice."""
    stored = {m["Id"]: m for m in sandbox.memberships()}
    keys = Counter((m["AccountId"].lower(), m["LoyaltyProgramId"].lower()) for m in stored.values())
    assert not [k for k, n in keys.items() if n > 1], "a membership was stored twice"
    outcomes = _last_outcomes(results)
    added = [r for r in outcomes.values() if r["outcome"] == "added"]
    ids = Counter(r["mews_membership_id"] for r in added)
    assert not [i for i, n in ids.items() if n > 1], "two rows marked added with the same Mews Id"
    for record in added:
        membership = stored.get(record["mews_membership_id"])
        assert membership is not None, (
            f"row {record['source_row']} marked added with an Id Mews does not have"
        )
        assert membership["AccountId"].lower() == record["account_id"].lower()
        assert membership["LoyaltyProgramId"].lower() == record["loyalty_program_id"].lower()
        assert membership["Code"] == record["code"]
    return outcomes


#: fault -> was the batch stored before the hostile answer (so reconciliation must find it)?
E2E_FAULTS = {
    "502html": False,
    "empty200": True,
    "truncated200": True,
    "nolist200": True,
    "fewer200": True,
    "wrongtypes200": True,
    "huge200:40": True,
    "slow200:0.05": True,  # ~150 kB answers at 64 B / 0.05 s: minutes, cut at the 2 s timeout
    "hang_after_store:4": True,  # timeout 2 s
}


@pytest.mark.parametrize("fault", list(E2E_FAULTS))
def test_e2e_fault_on_some_adds_ends_reconciled(
    fault, run_dag, tmp_path, monkeypatch, sandbox, scanner, capfd
):
    name = fault.split(":")[0]
    sandbox.configure(fault_script=["", fault, "", "", fault])  # 2nd and 5th add requests
    dr, results = _run(run_dag, tmp_path, monkeypatch, sandbox, name)
    captured = capfd.readouterr()
    summary = task_result(dr, "add", key="mews_summary")
    assert dr.state == "success", captured.out[-3000:]
    stats = sandbox.stats()
    assert stats[f"fault:{name}"] == 2, stats

    outcomes = _assert_added_rows_are_in_mews(sandbox, results)
    assert len(outcomes) == ROWS and {r["outcome"] for r in outcomes.values()} == {"added"}
    assert stats["stored"] == ROWS
    assert summary["added"] == ROWS and summary["rejected"] == 0 and summary["not_reached"] == 0
    if E2E_FAULTS[fault]:
        # Both hostile answers were for stored batches: found by reconciliation, not resent.
        assert summary["reconciled"] == 2 * BATCH, summary
        assert stats["added"] == ROWS
    else:
        assert summary["reconciled"] == 0
    scanned = scanner.assert_clean(dag_run=dr, captured=captured, texts={"summary": summary})
    assert scanned > 5


def test_e2e_persistent_html_errors_fail_clearly_with_nothing_marked_added(
    run_dag, tmp_path, monkeypatch, sandbox, scanner, capfd
):
    """Every add answered by a proxy's 502 page: nothing stored, nothing marked added, a clear failure."""
    sandbox.configure(fault_rates={"502html": 1.0})
    dr, results = _run(run_dag, tmp_path, monkeypatch, sandbox, "persistent_502", retries=0)
    captured = capfd.readouterr()
    assert dr.state == "failed"
    summary = task_result(dr, "add", key="mews_summary")
    assert summary["added"] == 0 and sandbox.stats()["stored"] == 0
    assert not [r for r in _last_outcomes(results).values() if r["outcome"] == "added"]
    log = captured.out + captured.err
    assert "HTTP 502" in log and "502 Bad Gateway" in log, log[-3000:]
    assert "An Airflow retry resumes without adding anything twice" in log
    scanner.assert_clean(dag_run=dr, captured=captured, texts={"summary": summary})


def test_e2e_hostile_getall_fails_clearly_without_adding(
    run_dag, tmp_path, monkeypatch, sandbox, scanner, capfd
):
    """The skip-check's getAll answers garbage: no add is sent on a guess, the task fails saying why."""
    sandbox.configure(fault_rates={"truncated200": 1.0}, fault_operations={"loyaltyMemberships/getAll"})
    dr, results = _run(run_dag, tmp_path, monkeypatch, sandbox, "hostile_getall", retries=0)
    captured = capfd.readouterr()
    assert dr.state == "failed"
    assert sandbox.stats().get("requests:loyaltyMemberships/add", 0) == 0
    assert not _last_outcomes(results)
    log = captured.out + captured.err
    assert "loyaltyMemberships/getAll failed with HTTP 200" in log and "not JSON" in log, log[-3000:]
    summary = task_result(dr, "add", key="mews_summary")
    assert summary["added"] == 0 and summary["not_reached"] == ROWS
    scanner.assert_clean(dag_run=dr, captured=captured, texts={"summary": summary})


def test_scanner_catches_a_leak(scanner):
    """The scanner itself must see a token whole, cut, or inside a structure."""
    with pytest.raises(AssertionError, match="token2"):
        scanner.assert_clean(texts={"summary": {"x": f"...{ACCESS_TOKEN[:20]}"}})
    with pytest.raises(AssertionError, match="demo AccessToken"):
        from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN

        scanner.assert_clean(texts={"error": MewsError(f"boom {DEMO_ACCESS_TOKEN}")})
