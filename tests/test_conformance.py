"""Conformance, judged by an independent validator: Stoplight Prism, a validating proxy built
from the OpenAPI description in ``data/mews-connector-openapi.yaml`` (formats asserted: uuid,
date, date-time, uri), sits between the provider and the sandbox while the example DAGs run
end to end. Every request the provider sends (add, getAll, configuration/get) and every answer
the sandbox gives must pass; Prism answers 422 to an invalid request and 500 to an invalid
answer, and logs both, so one violation is enough to fail the test.

Prism comes from npm (``bash .ci/prism.sh``, run by ``make test``); without node/npm the test is
skipped and listed (it fails instead in CI). Operations the provider adds later (update,
delete) go into the OpenAPI description and OPERATIONS below.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ROOT, needs, task_result

from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN, MewsSandbox, connection_json
from airflow_provider_mews.testing.sample_data import write_sqlite

OPENAPI = Path(__file__).parent / "data" / "mews-connector-openapi.yaml"
OPERATIONS = ("loyaltyMemberships/add", "loyaltyMemberships/getAll", "configuration/get")
PREFIX = "/api/connector/v1/"
AUTH = {"ClientToken": DEMO_CLIENT_TOKEN, "AccessToken": DEMO_ACCESS_TOKEN, "Client": "conformance 1.0"}
ITEM = {
    "AccountId": "fadd5bb6-b428-45d5-94f8-fd0d89fece6d",
    "LoyaltyProgramId": "f701dafb-5765-4cf4-b1dd-1f602a740ae5",
    "IsPrimary": True,
}
ROWS, INVALID = 300, 3


def _prism_bin() -> str:
    for candidate in (
        os.environ.get("MEWS_PRISM"),
        str(ROOT / ".tools" / "prism" / "node_modules" / ".bin" / "prism"),
        shutil.which("prism"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    needs(
        "Prism (@stoplight/prism-cli)",
        "`bash .ci/prism.sh` (npm install into .tools/prism; needs node and npm; run by make test) "
        "or MEWS_PRISM=/path/to/prism",
    )


class Prism:
    """``prism proxy --errors`` in front of the sandbox; reads what it logged."""

    def __init__(self, upstream: str, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(
            [
                _prism_bin(),
                "proxy",
                str(OPENAPI),
                upstream,
                "--errors",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"},
        )
        deadline = time.monotonic() + 180  # a cold node start on a loaded 2-core machine
        while "Prism is listening" not in self.text():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"Prism did not start:\n{self.text()[-3000:]}")
            time.sleep(0.2)  # polling interval of the readiness wait

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def mark(self) -> int:
        return len(self.text())

    def settle(self) -> None:
        """Prism logs after answering: wait until its log stops growing (at most 15 s)."""
        size, deadline = -1, time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.log.stat().st_size == size:
                return
            size = self.log.stat().st_size
            time.sleep(0.5)  # polling interval of the wait

    def errors(self, since: int = 0) -> list[str]:
        """Requests Prism refused (422) or answers it found invalid (500): its "✖ error" lines.
        An upstream that drops the connection on purpose (FetchError) is a fault, not a violation."""
        self.settle()
        lines = self.text()[since:].splitlines()
        return [line for line in lines if "✖" in line and "FetchError" not in line]

    def operations(self, since: int = 0) -> Counter[str]:
        """The operations Prism received requests for."""
        self.settle()
        found = re.findall(
            r"post " + re.escape(PREFIX) + r"(\S+) \S*\s*info\s+Request received", self.text()[since:]
        )
        return Counter(found)

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._out.close()


@pytest.fixture(scope="module")
def prism(_mews_sandbox_server: MewsSandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prism]:
    artifacts = Path(os.environ.get("MEWS_TEST_ARTIFACTS", ROOT / ".artifacts")) / "conformance"
    artifacts.mkdir(parents=True, exist_ok=True)
    proxy = Prism(_mews_sandbox_server.url, artifacts / "prism.log")
    try:
        yield proxy
    finally:
        proxy.stop()


def _post(url: str, operation: str, body: Any) -> requests.Response:
    return requests.post(f"{url}{PREFIX}{operation}", json=body, timeout=60)


def test_the_validator_refuses_what_the_description_forbids(prism, mews_sandbox):
    """The validator is really on, for requests and for answers, formats included."""
    since = prism.mark()
    sent_as_datetime = {**ITEM, "ExpirationDate": "2029-12-24T00:00:00Z"}
    refused = _post(prism.url, "loyaltyMemberships/add", {**AUTH, "LoyaltyMemberships": [sent_as_datetime]})
    assert refused.status_code == 422, refused.text
    assert "ExpirationDate" in refused.text and "date" in refused.text
    mews_sandbox.configure(fault_script=["wrongtypes200"])  # a 200 whose Ids are numbers
    broken = _post(prism.url, "loyaltyMemberships/add", {**AUTH, "LoyaltyMemberships": [ITEM]})
    assert broken.status_code == 500, broken.text
    assert "LoyaltyMemberships.0.Id" in broken.headers.get("sl-violations", "")
    assert len(prism.errors(since)) == 2, prism.text()[since:]
    fine = _post(
        prism.url,
        "loyaltyMemberships/add",
        {**AUTH, "LoyaltyMemberships": [{**ITEM, "ExpirationDate": "2029-12-24"}]},
    )
    assert fine.status_code == 200, fine.text


def test_example_dags_pass_the_independent_validator(prism, mews_sandbox, run_dag, monkeypatch, tmp_path):
    """The example DAGs, through Prism: XCom source, SQLite source (with an add whose answer is
    lost, so the operator reconciles through getAll with CreatedUtc), and the connection test."""
    from airflow_provider_mews.hooks.mews import MewsConnectorHook

    since = prism.mark()
    db = tmp_path / "members.db"
    write_sqlite(str(db), ROWS, invalid=INVALID)
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", connection_json(prism.url))
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEMO_SQLITE", json.dumps({"conn_type": "sqlite", "host": str(db)}))

    ok, message = MewsConnectorHook("mews_default").test_connection()
    assert ok, message
    # A wrong token: the 401 answer must match the error schema too.
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", connection_json(prism.url, access_token="0BADC0DE-WRONG"))
    ok, message = MewsConnectorHook("mews_default").test_connection()
    assert not ok and "401" in message, message
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", connection_json(prism.url))

    dr = run_dag("mews_loyalty_from_task")
    assert dr.state == "success" and task_result(dr, "add_memberships")["added"] == 2

    # The add's answer is lost after the sandbox stored it: the operator asks getAll (CreatedUtc).
    mews_sandbox.configure(fault_script=["drop_after_store"])
    dr = run_dag("mews_loyalty_from_sqlite")
    summary = task_result(dr, "add_memberships")
    assert dr.state == "success", summary
    assert summary["added"] == ROWS - INVALID and summary["rejected"] == INVALID, summary
    assert summary["reconciled"] > 0, summary  # the getAll by CreatedUtc went through Prism too
    with sqlite3.connect(db) as conn:
        expirations = conn.execute(
            "SELECT COUNT(*) FROM loyalty_members WHERE expiration_date IS NOT NULL"
        ).fetchone()[0]
    assert expirations > 0  # the rows carry ExpirationDate (and Url): formats were exercised

    errors = prism.errors(since)
    assert not errors, "Prism found violations:\n" + "\n".join(errors)
    seen = prism.operations(since)
    assert set(OPERATIONS) <= set(seen), f"not every operation went through Prism: {dict(seen)}"
