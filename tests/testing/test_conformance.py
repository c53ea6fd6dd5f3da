"""Conformance, judged by an independent validator: Stoplight Prism, a validating proxy built
from the OpenAPI description in ``data/mews-connector-openapi.yaml`` (formats asserted: uuid,
date, date-time, uri), sits between the provider and the sandbox while the example DAGs run
end to end. Every request the provider sends (add, getAll, configuration/get, update, delete)
and every answer the sandbox gives must pass; Prism answers 422 to an invalid request and 500
to an invalid answer, and logs both, so one violation is enough to fail the test.

Prism comes from npm (``bash .ci/prism.sh``, run by ``make test``); without node/npm the test is
skipped and listed (it fails instead in CI). An operation the provider starts calling goes into
the OpenAPI description and OPERATIONS below: the tests fail until Prism has seen it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ROOT, needs, task_result

from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN, MewsSandbox, connection_json
from airflow_provider_mews.testing.sample_data import write_sqlite

OPENAPI = Path(__file__).parents[1] / "data" / "mews-connector-openapi.yaml"
OPERATIONS = (
    "loyaltyMemberships/add",
    "loyaltyMemberships/getAll",
    "configuration/get",
    "loyaltyMemberships/update",
    "loyaltyMemberships/delete",
)
#: The look-up reads (resolving guests, programmes, tiers; incremental exports): each is sent
#: through Prism by test_the_validator_checks_the_look_up_reads, valid and invalid.
READ_OPERATIONS = (
    "customers/getAll",
    "loyaltyPrograms/getAll",
    "loyaltyTiers/getAll",
    "loyaltyMemberships/getAll",
)
PREFIX = "/api/connector/v1/"
AUTH = {"ClientToken": DEMO_CLIENT_TOKEN, "AccessToken": DEMO_ACCESS_TOKEN, "Client": "conformance 1.0"}
ITEM = {
    "AccountId": "fadd5bb6-b428-45d5-94f8-fd0d89fece6d",
    "LoyaltyProgramId": "f701dafb-5765-4cf4-b1dd-1f602a740ae5",
    "IsPrimary": True,
}
ROWS, INVALID = 300, 3
PROGRAM = ITEM["LoyaltyProgramId"]
TIERS = ("a1b2c3d4-0000-4000-8000-000000000001", "a1b2c3d4-0000-4000-8000-000000000002")
SYNC_COLUMNS = (
    "member_id", "loyalty_membership_id", "account_id", "loyalty_program_id", "is_primary", "state",
    "membership_number", "points", "expiration_date", "url", "loyalty_tier_id",
)  # fmt: skip
SYNC_DAG = """
import pendulum
from airflow.sdk import DAG

from airflow_provider_mews.operators.loyalty_memberships import (
    LoyaltyMembershipAddOperator,
    LoyaltyMembershipSyncOperator,
)

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    {operator}(task_id="sync", mews_conn_id="mews_default", sql_conn_id="mews_conformance_db",
               sql="SELECT * FROM members ORDER BY member_id", retries=0, {args})
"""


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


def test_the_validator_refuses_invalid_update_and_delete_requests(prism, mews_sandbox):
    """Update and delete are described, wrappers and formats included: Prism refuses before the
    sandbox sees anything; a valid update and delete pass both ways."""
    since = prism.mark()
    [stored], _ = mews_sandbox.add({"LoyaltyMemberships": [ITEM]})
    mews_sandbox.state.store([stored])
    mid = stored["Id"]
    invalid_updates = {
        "State cleared": {"LoyaltyMembershipId": mid, "State": {"Value": None}},
        "bare value": {"LoyaltyMembershipId": mid, "Points": 5},
        "AccountId": {"LoyaltyMembershipId": mid, "AccountId": {"Value": ITEM["AccountId"]}},
        "date-time": {"LoyaltyMembershipId": mid, "ExpirationDate": {"Value": "2038-01-19T03:14:07Z"}},
        "long number": {"LoyaltyMembershipId": mid, "ProviderMembershipId": {"Value": "x" * 101}},
    }
    for what, item in invalid_updates.items():
        refused = _post(prism.url, "loyaltyMemberships/update", {**AUTH, "LoyaltyMembershipUpdates": [item]})
        assert refused.status_code == 422, (what, refused.text)
    for ids in ([], ["not-a-uuid"]):
        refused = _post(prism.url, "loyaltyMemberships/delete", {**AUTH, "LoyaltyMembershipIds": ids})
        assert refused.status_code == 422, (ids, refused.text)
    assert mews_sandbox.memberships() == [stored]  # nothing reached the sandbox
    assert len(prism.errors(since)) == len(invalid_updates) + 2, prism.text()[since:]

    since = prism.mark()
    valid = {
        "LoyaltyMembershipId": mid,
        "State": {"Value": "Pending"},
        "Points": {"Value": None},
        "ExpirationDate": {"Value": "2030-12-31"},
        "Url": None,  # a null wrapper keeps the value
        "LoyaltyTierId": {"Value": TIERS[0]},
    }
    fine = _post(prism.url, "loyaltyMemberships/update", {**AUTH, "LoyaltyMembershipUpdates": [valid]})
    assert fine.status_code == 200, fine.text
    assert fine.json()["LoyaltyMemberships"][0]["State"] == "Pending"
    fine = _post(prism.url, "loyaltyMemberships/delete", {**AUTH, "LoyaltyMembershipIds": [mid]})
    assert fine.status_code == 200 and fine.json() == {}, fine.text
    assert not prism.errors(since), prism.text()[since:]


def test_the_validator_checks_the_look_up_reads(prism, mews_sandbox):
    """customers/getAll, loyaltyPrograms/getAll, loyaltyTiers/getAll and the time filters of
    loyaltyMemberships/getAll are described: valid look-ups pass both ways (the seeded answers
    match the schemas) and Prism refuses invalid ones before the sandbox sees them."""
    mews_sandbox.configure(rate_limit_requests=1_000_000)
    gold = mews_sandbox.add_loyalty_program("GOLD", tiers=["SILVER", "GOLD"])
    mews_sandbox.add_customers(6, shared_emails=2, mixed_case=True)
    mews_sandbox.seed_memberships(5, start_utc="2025-01-01T00:00:00Z", end_utc="2025-03-01T00:00:00Z")
    quarter = {"StartUtc": "2025-01-01T00:00:00Z", "EndUtc": "2025-04-01T00:00:00Z"}
    page = {"Count": 2, "Cursor": None}
    extent = {"Customers": True, "Addresses": False}
    valid = [
        ("customers/getAll", {"Extent": extent, "Emails": ["guest1@example.com"], "Limitation": page}),
        ("customers/getAll", {"Extent": extent, "LoyaltyCodes": ["LC000002"], "ActivityStates": ["Active"],
                              "Limitation": page}),
        ("customers/getAll", {"Extent": {"Customers": False}, "CustomerIds": [str(uuid.uuid4())],
                              "Limitation": page}),
        ("loyaltyPrograms/getAll", {"Codes": ["GOLD"], "ActivityStates": ["Active"], "Limitation": page}),
        ("loyaltyPrograms/getAll", {"UpdatedUtc": {"StartUtc": None, "EndUtc": "2030-01-01T00:00:00Z"},
                                    "Limitation": page}),
        ("loyaltyTiers/getAll", {"LoyaltyProgramIds": [gold.id], "Limitation": page}),
        ("loyaltyMemberships/getAll", {"CreatedUtc": quarter, "ActivityStates": ["Active"], "Limitation": page}),
        ("loyaltyMemberships/getAll", {"UpdatedUtc": quarter, "Limitation": {"Count": 1000}}),
    ]  # fmt: skip
    invalid = [
        ("customers/getAll", {"Emails": ["guest1@example.com"], "Limitation": page}),  # no Extent
        ("customers/getAll", {"Extent": extent, "CompanyIds": [str(uuid.uuid4()), str(uuid.uuid4())],
                              "Limitation": page}),
        ("customers/getAll", {"Extent": extent, "Emails": [], "Limitation": page}),
        ("loyaltyPrograms/getAll", {"Codes": ["GOLD"], "Limitation": {"Count": 0}}),
        ("loyaltyPrograms/getAll", {"Codes": ["GOLD"], "Options": {}, "Limitation": page}),
        ("loyaltyTiers/getAll", {"Limitation": page}),  # LoyaltyProgramIds is required
        ("loyaltyTiers/getAll", {"LoyaltyProgramIds": ["GOLD"], "Limitation": page}),
        ("loyaltyMemberships/getAll", {"CreatedUtc": {"StartUtc": "2025-01-01"}, "Limitation": page}),
    ]  # fmt: skip
    since = prism.mark()
    for operation, body in valid:
        answer = _post(prism.url, operation, {**AUTH, **body})
        assert answer.status_code == 200, (operation, body, answer.text)
    answers = [_post(prism.url, op, {**AUTH, **body}).json() for op, body in valid[:2]]
    assert len(answers[0]["Customers"]) == 2 and answers[1]["Customers"][0]["Email"] == "Guest2@Example.COM"
    assert not prism.errors(since), prism.text()[since:]
    seen = prism.operations(since)
    assert set(READ_OPERATIONS) <= set(seen), f"not every read went through Prism: {dict(seen)}"
    since = prism.mark()
    before = mews_sandbox.stats()
    for operation, body in invalid:
        answer = _post(prism.url, operation, {**AUTH, **body})
        assert answer.status_code == 422, (operation, body, answer.text)
    after = mews_sandbox.stats()
    assert {k: v for k, v in after.items() if k.startswith("requests:")} == {
        k: v for k, v in before.items() if k.startswith("requests:")
    }  # nothing reached the sandbox
    assert len(prism.errors(since)) == len(invalid), prism.text()[since:]
    # What Prism cannot see, the sandbox refuses: no filter at all, and an interval over 3 months.
    for operation, body in [
        ("customers/getAll", {"Extent": extent, "Limitation": page}),
        ("loyaltyMemberships/getAll", {"CreatedUtc": {**quarter, "EndUtc": "2025-04-02T00:00:00Z"},
                                       "Limitation": page}),
    ]:  # fmt: skip
        answer = _post(prism.url, operation, {**AUTH, **body})
        assert answer.status_code == 400, answer.text


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
    assert set(OPERATIONS[:3]) <= set(seen), f"not every operation went through Prism: {dict(seen)}"


def _seed(sandbox: MewsSandbox, count: int) -> list[dict[str, Any]]:
    """``count`` memberships stored in the sandbox directly (not through Prism)."""
    items = [
        {
            "AccountId": str(uuid.uuid4()), "LoyaltyProgramId": PROGRAM, "IsPrimary": True,
            "Code": f"C-{n}", "Points": n, "ExpirationDate": "2030-06-30",
            "Url": f"https://loyalty.example.com/m/{n}", "LoyaltyTierId": TIERS[n % 2],
        }
        for n in range(count)
    ]  # fmt: skip
    created, _ = sandbox.add({"LoyaltyMemberships": items})
    sandbox.state.store(created)
    return created


def _row(n: int, m: dict[str, Any], **changes: Any) -> tuple[Any, ...]:
    row = {
        "member_id": n, "loyalty_membership_id": m["Id"], "account_id": m["AccountId"],
        "loyalty_program_id": m["LoyaltyProgramId"], "is_primary": 1, "state": m["State"],
        "membership_number": m["MembershipNumber"], "points": m["Points"],
        "expiration_date": (m["ExpirationDate"] or "")[:10] or None, "url": m["Url"],
        "loyalty_tier_id": m["LoyaltyTierId"],
    }  # fmt: skip
    row.update(changes)
    return tuple(row[c] for c in SYNC_COLUMNS)


def _write_members(db: Path, rows: list[tuple[Any, ...]]) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE IF EXISTS members")
        conn.execute(f"CREATE TABLE members ({', '.join(SYNC_COLUMNS)})")
        conn.executemany(f"INSERT INTO members VALUES ({', '.join('?' * len(SYNC_COLUMNS))})", rows)


def test_sync_modes_pass_the_independent_validator(prism, mews_sandbox, run_dag, monkeypatch, tmp_path):
    """An upsert (new, changed and unchanged rows; NULLs that clear fields) and the mirrors with
    on_missing="cancel" and "delete", through Prism: every update and delete request, and every
    answer, matches the description."""
    since = prism.mark()
    db = tmp_path / "members.db"
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", connection_json(prism.url))
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_CONFORMANCE_DB", json.dumps({"conn_type": "sqlite", "host": str(db)})
    )

    def run(dag_id: str, operator: str, **kwargs: Any) -> dict[str, Any]:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        dr = run_dag(dag_id, textwrap.dedent(SYNC_DAG).format(dag_id=dag_id, operator=operator, args=args))
        summary = task_result(dr, "sync")
        assert dr.state == "success", (summary, prism.errors(since))  # a 422 from Prism fails the task
        return summary

    from airflow_provider_mews.hooks.mews import MewsConnectorHook

    ok, message = MewsConnectorHook("mews_default").test_connection()  # configuration/get
    assert ok, message
    seeded = _seed(mews_sandbox, 30)
    rows = [_row(n, m) for n, m in enumerate(seeded[:10])]  # unchanged
    rows += [  # changed: new values (a date, a URL, a state) and NULLs that clear
        _row(
            n,
            m,
            points=m["Points"] + 100,
            expiration_date="2031-01-15" if n % 2 else None,
            url=None if n % 3 == 0 else f"https://loyalty.example.com/v2/{n}",
            loyalty_tier_id=None if n % 2 else TIERS[0],
            membership_number=None if n == 10 else m["MembershipNumber"],
            state="Pending" if n % 4 == 0 else m["State"],
        )
        for n, m in enumerate(seeded[10:30], start=10)
    ]
    rows += [  # new
        (30 + i, None, str(uuid.uuid4()), PROGRAM, 0, "New", f"NEW-{i}", 7, "2032-02-29",
         f"https://loyalty.example.com/new/{i}", TIERS[1])
        for i in range(5)
    ]  # fmt: skip
    _write_members(db, rows)
    summary = run("conformance_upsert", "LoyaltyMembershipAddOperator", if_exists="update")
    assert (summary["added"], summary["updated"], summary["unchanged"], summary["rejected"]) == (5, 20, 10, 0)
    stored = {m["Id"]: m for m in mews_sandbox.memberships()}
    assert (
        stored[seeded[11]["Id"]]["LoyaltyTierId"] is None
        and stored[seeded[12]["Id"]]["ExpirationDate"] is None
    )
    assert stored[seeded[10]["Id"]]["MembershipNumber"] is None and stored[seeded[12]["Id"]]["Url"] is None

    # The mirrors: the table loses 3 rows each time; they are canceled, then deleted.
    kept = [r for r in rows if r[0] not in (0, 1, 2)]
    _write_members(db, kept)
    summary = run("conformance_mirror_cancel", "LoyaltyMembershipSyncOperator", loyalty_program_ids=[PROGRAM],
                  on_missing="cancel", max_removals=3)  # fmt: skip
    assert summary["canceled"] == 3, summary
    _write_members(db, [r for r in kept if r[0] not in (3, 4, 5)])
    summary = run("conformance_mirror_delete", "LoyaltyMembershipSyncOperator", loyalty_program_ids=[PROGRAM],
                  on_missing="delete", max_removals=6)  # fmt: skip
    assert summary["deleted"] == 6, summary  # the 3 canceled ones too: they left the table
    stored = {m["Id"]: m for m in mews_sandbox.memberships()}
    assert {i for i, m in stored.items() if m["ActivityState"] == "Deleted"} == {m["Id"] for m in seeded[:6]}

    errors = prism.errors(since)
    assert not errors, "Prism found violations:\n" + "\n".join(errors)
    seen = prism.operations(since)
    assert set(OPERATIONS) <= set(seen), f"not every operation went through Prism: {dict(seen)}"
