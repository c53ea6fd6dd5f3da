"""Members named by e-mail, loyalty code, programme and tier code (issue 18), end to end.

Real Airflow (``dag.test()``), real HTTP to the sandbox (which serves customers, programmes
and tiers, and refuses an add naming an Id it does not hold), real SQLite. A CRM table with no
Mews Id: every resolvable row must be added once with the right three Ids, every other row
rejected with its reason, a second run must add nothing, and the look-ups, counted in the
sandbox's request log, must stay within one request per 1000 rows plus extra pages.
"""

from __future__ import annotations

import json
import math
import sqlite3
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import task_result

from airflow_provider_mews.testing import MewsSandbox

CUSTOMERS = 3000
SHARED = 40  # guests 2961..3000 are second profiles of guests 1..40: those e-mails are ambiguous
BY_EMAIL = range(1, 2901)  # rows named by e-mail (mixed case and spaces)
BY_CODE = range(2901, 2951)  # rows named by loyalty code
UNKNOWN_EMAILS = 20
BAD_PROGRAMME = range(2951, 2961)  # known guests, unknown programme code
BAD_TIER = range(2901, 2911)  # known guests, a tier code GOLDCLUB does not have
LOOKUPS = ("customers/getAll", "loyaltyPrograms/getAll", "loyaltyTiers/getAll")
ADD, UPDATE, DELETE = (f"loyaltyMemberships/{op}" for op in ("add", "update", "delete"))
HEADER = """
import pendulum
from airflow.sdk import DAG

from airflow_provider_mews.operators.loyalty_memberships import (
    LoyaltyMembershipAddOperator,
    LoyaltyMembershipSyncOperator,
)

START = pendulum.datetime(2026, 1, 1, tz="UTC")
"""
FIELD_MAP = {
    "email": "AccountEmail",
    "loyalty_code": "AccountLoyaltyCode",
    "programme_code": "LoyaltyProgramCode",
    "tier_code": "LoyaltyTierCode",
    "card_no": "MembershipNumber",
}


@dataclass
class Crm:
    """The CRM table written, and what each row must become."""

    program: str
    tiers: dict[str, str]
    guests: list[str]  # Mews Id of guest n at n - 1
    rows: int = 0
    expected: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # member_id -> the three Ids
    reasons: dict[int, str] = field(default_factory=dict)  # member_id -> part of its rejection


@pytest.fixture
def sqlite_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "crm.db"
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_TEST_DB", json.dumps({"conn_type": "sqlite", "host": str(path)}))
    return path


def write_crm(sandbox: MewsSandbox, db: Path) -> Crm:
    """Seed guests, two programmes and tiers in the sandbox; write the CRM table naming them."""
    guests = sandbox.add_customers(CUSTOMERS, shared_emails=SHARED, mixed_case=True)
    gold = sandbox.add_loyalty_program("GOLDCLUB", tiers=["BASE", "GOLD"])
    sandbox.add_loyalty_program("SILVERCLUB", tiers=["BASE"])
    crm = Crm(gold.id, gold.tiers, guests)
    rows: list[tuple[Any, ...]] = []

    def row(email: str | None, code: str | None, programme: str, tier: str | None) -> int:
        member_id = len(rows) + 1
        rows.append((member_id, email, code, programme, tier, f"CARD-{member_id}", member_id % 500, 1))
        return member_id

    for n in BY_EMAIL:
        tier = "GOLD" if n % 2 else "BASE"
        email = f"  GUEST{n}@example.com " if n % 3 == 0 else f"Guest{n}@EXAMPLE.com" if n % 3 == 1 else f"guest{n}@example.com"  # fmt: skip
        member = row(email, None, "GOLDCLUB", tier)
        if n <= SHARED:
            crm.reasons[member] = f"2 Mews customers have e-mail 'guest{n}@example.com': "
        else:
            crm.expected[member] = (guests[n - 1], gold.id, gold.tiers[tier])
    for n in BY_CODE:
        tier = "PLATINUM" if n in BAD_TIER else "GOLD"
        member = row(None, f"LC{n:06d}", " GOLDCLUB ", tier)
        if n in BAD_TIER:
            crm.reasons[member] = "no tier with code 'PLATINUM' in loyalty programme"
        else:
            crm.expected[member] = (guests[n - 1], gold.id, gold.tiers["GOLD"])
    for i in range(UNKNOWN_EMAILS):
        member = row(f"nobody{i}@example.com", None, "GOLDCLUB", "GOLD")
        crm.reasons[member] = f"no Mews customer with e-mail 'nobody{i}@example.com'"
    for n in BAD_PROGRAMME:
        member = row(f"guest{n}@example.com", None, "BRONZECLUB", "GOLD")
        crm.reasons[member] = (
            "no Mews loyalty programme with code 'BRONZECLUB' (codes in Mews: GOLDCLUB, SILVERCLUB)"
        )
    crm.rows = len(rows)
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE crm (member_id INTEGER PRIMARY KEY, email TEXT, loyalty_code TEXT, programme_code TEXT, "
            "tier_code TEXT, card_no TEXT, points INTEGER, is_primary INTEGER)"
        )
        conn.executemany("INSERT INTO crm VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    sandbox.state.log.clear()  # count only the run's requests
    return crm


def run(run_dag: Any, dag_id: str, operator: str = "LoyaltyMembershipAddOperator", **kwargs: Any) -> Any:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    source = HEADER + textwrap.dedent(f"""
        with DAG(dag_id={dag_id!r}, schedule=None, start_date=START, catchup=False):
            {operator}(task_id="load", sql_conn_id="mews_test_db", sql="SELECT * FROM crm ORDER BY member_id",
                       field_map={FIELD_MAP!r}, results_table="results", rejections_table="rejections",
                       max_rejected_rows=1000, retries=0, {args})
    """)
    return run_dag(dag_id, source)


def read(db: Path, query: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query).fetchall()


def count(sandbox: MewsSandbox, *operations: str) -> int:
    return sum(1 for e in sandbox.request_log() if e["operation"] in operations)


def check_first_run(sandbox: MewsSandbox, db: Path, crm: Crm, summary: dict[str, Any], outcome: str) -> None:
    """Each resolvable row added once with its three Ids; every other one rejected with its reason;
    the look-ups within one request per 1000 rows plus pages, and counted in the summary."""
    held = sandbox.memberships()
    by_card = {m["MembershipNumber"]: m for m in held}
    assert len(held) == len(by_card) == len(crm.expected)
    for member, (account, program, tier) in crm.expected.items():
        m = by_card[f"CARD-{member}"]
        assert (m["AccountId"], m["LoyaltyProgramId"], m["LoyaltyTierId"]) == (account, program, tier), member
    results = read(
        db,
        "SELECT source_row, account_id, loyalty_program_id, loyalty_tier_id, mews_membership_id, outcome "
        "FROM results",
    )
    assert len(results) == len(crm.expected)
    for member, account, program, tier, mid, got in results:
        # The results say which guest, programme and tier each row's names resolved to.
        assert (account, program, tier, got) == (*crm.expected[member], outcome)
        assert by_card[f"CARD-{member}"]["Id"] == mid
    rejections = dict(read(db, "SELECT source_row, reason FROM rejections"))
    assert set(rejections) == set(crm.reasons)
    for member, reason in crm.reasons.items():
        assert reason in rejections[member], (member, rejections[member])
    assert summary["added"] == len(crm.expected) and summary["rejected"] == len(crm.reasons)
    # The look-ups: 999 e-mails a request (whatever the batches), each followed to its last page
    # (the 40 duplicate profiles make the first request's answer 1039 records: one page more),
    # the 50 loyalty codes once, each programme code once (GOLDCLUB first, BRONZECLUB last) and
    # all programmes once (to name the codes that exist), the tiers of GOLDCLUB once.
    customers = count(sandbox, "customers/getAll")
    emails = len(BY_EMAIL) + UNKNOWN_EMAILS + len(BAD_PROGRAMME)
    assert customers == math.ceil(emails / 999) + 1 + 1
    assert all(e["filters"].get("Emails", 0) <= 999 for e in sandbox.request_log("customers/getAll"))
    assert count(sandbox, "loyaltyPrograms/getAll") == 3 and count(sandbox, "loyaltyTiers/getAll") == 1
    assert summary["lookups"] == count(sandbox, *LOOKUPS) == customers + 4
    assert all(
        e["filters"]["Extent"] == {"Customers": True, "Documents": False, "Addresses": False}
        and sum(v for k, v in e["filters"].items() if k in ("Emails", "LoyaltyCodes")) <= 1000
        for e in sandbox.request_log("customers/getAll")
    )


@pytest.mark.parametrize("if_exists", ["skip", "add", "update"])
def test_crm_rows_named_by_email_and_codes_are_added_once_with_their_ids(
    run_dag: Any, mews_conn: str, mews_sandbox: MewsSandbox, sqlite_db: Path, if_exists: str
) -> None:
    crm = write_crm(mews_sandbox, sqlite_db)
    dr = run(run_dag, f"t_names_{if_exists}", if_exists=if_exists)
    assert dr.state == "success"
    summary = task_result(dr, "load")
    check_first_run(mews_sandbox, sqlite_db, crm, summary, "added")
    assert count(mews_sandbox, ADD) == math.ceil(crm.rows / 1000)  # one add per batch: nothing sent twice

    if if_exists == "add":
        return  # add never checks: a second run would add again, as documented
    mews_sandbox.state.log.clear()
    again = task_result(run(run_dag, f"t_names_{if_exists}_again", if_exists=if_exists), "load")
    assert again["added"] == 0 and count(mews_sandbox, ADD, UPDATE) == 0
    assert again["skipped_existing" if if_exists == "skip" else "unchanged"] == len(crm.expected)
    assert again["rejected"] == len(crm.reasons) and len(mews_sandbox.memberships()) == len(crm.expected)


def test_the_mirror_matches_rows_after_resolving_their_names(
    run_dag: Any, mews_conn: str, mews_sandbox: MewsSandbox, sqlite_db: Path
) -> None:
    crm = write_crm(mews_sandbox, sqlite_db)
    # Mews already holds two of the members (one with another tier), and one member the CRM no longer has.
    member, (account, program, tier) = next(iter(crm.expected.items()))
    other_tier = next(t for t in crm.tiers.values() if t != tier)
    items = [
        {"AccountId": account, "LoyaltyProgramId": program, "IsPrimary": True, "Code": f"CARD-{member}", "LoyaltyTierId": other_tier},
        {"AccountId": crm.guests[-1], "LoyaltyProgramId": program, "IsPrimary": True, "Code": "CARD-LEFT"},
    ]  # fmt: skip
    created, _ = mews_sandbox.add({"LoyaltyMemberships": items})
    mews_sandbox.state.store(created)
    kept, gone = (m["Id"] for m in created)
    mews_sandbox.state.log.clear()

    dr = run(
        run_dag,
        "t_names_mirror",
        "LoyaltyMembershipSyncOperator",
        loyalty_program_ids=[crm.program],
        max_removals=5,
    )
    assert dr.state == "success"
    summary = task_result(dr, "load")
    assert summary["updated"] == 1 and summary["added"] == len(crm.expected) - 1 and summary["canceled"] == 1
    by_id = {m["Id"]: m for m in mews_sandbox.memberships()}
    assert by_id[kept]["LoyaltyTierId"] == tier and by_id[kept]["AccountId"] == account
    assert by_id[gone]["State"] == "Canceled"
    # The mirror read its source twice (to plan, then to write): each name was looked up once.
    assert count(mews_sandbox, "customers/getAll") <= 2 * math.ceil(crm.rows / 1000) + 1
    assert summary["lookups"] == count(mews_sandbox, *LOOKUPS)
    rejections = dict(read(sqlite_db, "SELECT source_row, reason FROM rejections"))
    assert set(rejections) == set(crm.reasons)

    mews_sandbox.state.log.clear()
    again = task_result(
        run(
            run_dag,
            "t_names_mirror_again",
            "LoyaltyMembershipSyncOperator",
            loyalty_program_ids=[crm.program],
        ),
        "load",
    )
    assert again["unchanged"] == len(crm.expected) and again["added"] == again["canceled"] == 0
    assert count(mews_sandbox, ADD, UPDATE, DELETE) == 0


def test_dry_run_resolves_and_plans_without_writing(
    run_dag: Any, mews_conn: str, mews_sandbox: MewsSandbox, sqlite_db: Path
) -> None:
    crm = write_crm(mews_sandbox, sqlite_db)
    dr = run(
        run_dag,
        "t_names_dry",
        "LoyaltyMembershipSyncOperator",
        loyalty_program_ids=[crm.program],
        dry_run=True,
    )
    assert dr.state == "success"
    assert count(mews_sandbox, ADD, UPDATE, DELETE) == 0 and mews_sandbox.memberships() == []
    planned = read(sqlite_db, "SELECT source_row, account_id, loyalty_program_id, outcome FROM results")
    assert {(m, a, p, o) for m, a, p, o in planned} == {
        (m, a, p, "planned_added") for m, (a, p, _) in crm.expected.items()
    }


def test_a_row_whose_id_and_e_mail_disagree_is_rejected(
    run_dag: Any, mews_conn: str, mews_sandbox: MewsSandbox, sqlite_db: Path
) -> None:
    guests = mews_sandbox.add_customers(3)
    gold = mews_sandbox.add_loyalty_program("GOLDCLUB")
    rows = [
        {"AccountId": guests[0], "AccountEmail": "guest1@example.com", "LoyaltyProgramCode": "GOLDCLUB", "IsPrimary": True},
        {"AccountId": guests[1], "AccountEmail": "guest3@example.com", "LoyaltyProgramCode": "GOLDCLUB", "IsPrimary": True},
        {"AccountId": guests[2], "AccountEmail": None, "LoyaltyProgramId": gold.id, "IsPrimary": True},
    ]  # fmt: skip
    source = HEADER + textwrap.dedent(f"""
        with DAG(dag_id="t_names_disagree", schedule=None, start_date=START, catchup=False):
            LoyaltyMembershipAddOperator(task_id="load", memberships={rows!r}, max_rejected_rows=1, retries=0)
    """)
    summary = task_result(run_dag("t_names_disagree", source), "load")
    assert summary["added"] == 2 and summary["rejected"] == 1
    (rejection,) = summary["rejected_sample"]
    assert rejection["source_row"] == 2 and rejection["field"] == "AccountEmail"
    assert (
        f"AccountId {guests[1]} disagrees with AccountEmail 'guest3@example.com', which is {guests[2]}"
        in rejection["reason"]
    )
    assert {m["AccountId"] for m in mews_sandbox.memberships()} == {guests[0], guests[2]}


def test_e_mails_against_a_server_comparing_them_case_sensitively(
    run_dag: Any, mews_conn: str, mews_sandbox: MewsSandbox, sqlite_db: Path
) -> None:
    """E-mails go as written; one with capitals that found nobody is asked again in lower case.
    What a case-sensitive Mews can and cannot give (docs/howto/names.md)."""
    mews_sandbox.configure(email_case_sensitive=True)
    same = mews_sandbox.add_customer("Ann.Lee@Example.COM")  # stored as the warehouse writes it
    lower = mews_sandbox.add_customer("bob@example.com")  # stored lower case, warehouse capitals
    mews_sandbox.add_customer("Cy@Example.com")  # stored with capitals, warehouse lower case
    gold = mews_sandbox.add_loyalty_program("GOLDCLUB")
    rows = [
        {"AccountEmail": " Ann.Lee@Example.COM", "LoyaltyProgramCode": "GOLDCLUB", "IsPrimary": True},
        {"AccountEmail": "Bob@Example.com ", "LoyaltyProgramCode": "GOLDCLUB", "IsPrimary": True},
        {"AccountEmail": "cy@example.com", "LoyaltyProgramCode": "GOLDCLUB", "IsPrimary": True},
    ]
    mews_sandbox.state.log.clear()
    source = HEADER + textwrap.dedent(f"""
        with DAG(dag_id="t_names_case", schedule=None, start_date=START, catchup=False):
            LoyaltyMembershipAddOperator(task_id="load", memberships={rows!r}, max_rejected_rows=1, retries=0)
    """)
    summary = task_result(run_dag("t_names_case", source), "load")
    assert summary["added"] == 2 and summary["rejected"] == 1
    assert {(m["AccountId"], m["LoyaltyProgramId"]) for m in mews_sandbox.memberships()} == {
        (same, gold.id),
        (lower, gold.id),
    }
    (rejection,) = summary["rejected_sample"]
    assert "no Mews customer with e-mail 'cy@example.com'" in rejection["reason"]
    # the three as written, then bob's in lower case (the log holds counts, not the e-mails)
    assert [e["filters"]["Emails"] for e in mews_sandbox.request_log("customers/getAll")] == [3, 1]
