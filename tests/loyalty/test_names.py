"""Names instead of Ids (issue 18): column planning, the decision, and the look-ups' cost, no I/O.

The directory here is an in-memory Mews answering getAll pages the way the contract says
(filters, pages of ``page_size``, a full page followed by one more read); the code under test
is all of :mod:`airflow_provider_mews.loyalty.names` and the normalizer it feeds.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from airflow_provider_mews.exceptions import MewsError
from airflow_provider_mews.loyalty.batches import build_batch
from airflow_provider_mews.loyalty.names import (
    Named,
    NamePlan,
    NameResolver,
    ResolvedSource,
    clean_email,
    decide,
    plan_names,
)
from airflow_provider_mews.loyalty.normalize import RowRejected, plan_columns
from airflow_provider_mews.runs.sources import ListSource

A1, A2, A3 = (f"00000000-0000-4000-8000-00000000000{n}" for n in (1, 2, 3))
GOLD_CLUB, SILVER_CLUB = "10000000-0000-4000-8000-000000000001", "10000000-0000-4000-8000-000000000002"
T_GOLD, T_BASE = "20000000-0000-4000-8000-000000000001", "20000000-0000-4000-8000-000000000002"


class Directory:
    """Mews's three reads over a few records; ``calls`` logs (operation, filters) per page."""

    def __init__(
        self, customers: list[dict[str, Any]], page_size: int = 1000, case_sensitive: bool = False
    ) -> None:
        self.customers = customers
        self.case_sensitive = case_sensitive
        self.programs = [{"Id": GOLD_CLUB, "Code": "GOLDCLUB"}, {"Id": SILVER_CLUB, "Code": "SILVER"}]
        self.tiers = [
            {"Id": T_GOLD, "LoyaltyProgramId": GOLD_CLUB, "Code": "GOLD"},
            {"Id": T_BASE, "LoyaltyProgramId": GOLD_CLUB, "Code": "BASE"},
        ]
        self.page_size = page_size
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _pages(self, operation: str, records: list[dict[str, Any]], filters: dict[str, Any]) -> Any:
        size = self.page_size
        for start in range(0, len(records) + 1, size):
            self.calls.append((operation, filters))
            page = records[start : start + size]
            yield page
            if len(page) < size:
                return

    def get_customers(self, *, emails: Any = None, loyalty_codes: Any = None, chain_ids: Any = None) -> Any:
        assert (emails is None) != (loyalty_codes is None) and len(emails or loyalty_codes) <= 1000
        fold = (lambda e: e) if self.case_sensitive else str.lower
        wanted = {fold(e) for e in emails or ()}
        found = [
            c
            for c in self.customers
            if fold(c.get("Email") or "") in wanted or (c.get("LoyaltyCode") in (loyalty_codes or ()))
        ]
        return self._pages(
            "customers", found, {"emails": emails, "codes": loyalty_codes, "chains": chain_ids}
        )

    def get_loyalty_programs(self, *, codes: Any = None, chain_ids: Any = None) -> Any:
        found = [p for p in self.programs if codes is None or p["Code"] in codes]
        return self._pages("programs", found, {"codes": codes, "chains": chain_ids})

    def get_loyalty_tiers(self, *, loyalty_program_ids: Any, chain_ids: Any = None) -> Any:
        found = [t for t in self.tiers if t["LoyaltyProgramId"] in loyalty_program_ids]
        return self._pages("tiers", found, {"programs": loyalty_program_ids})

    def count(self, operation: str) -> int:
        return sum(1 for op, _ in self.calls if op == operation)


def guests() -> list[dict[str, Any]]:
    return [
        {"Id": A1, "Email": "Ann@Example.com", "LoyaltyCode": "LC1"},
        {"Id": A2, "Email": "dup@example.com", "LoyaltyCode": "LC2"},
        {"Id": A3, "Email": "DUP@example.com", "LoyaltyCode": "LC3"},
    ]


CRM = ("member_id", "email", "programme_code", "tier_code", "is_primary")
CRM_MAP = {"email": "AccountEmail", "programme_code": "LoyaltyProgramCode", "tier_code": "LoyaltyTierCode"}


# -- columns --


def test_name_columns_are_matched_like_every_column_and_the_ids_appended() -> None:
    plan = plan_names(["Account_Email", "loyalty_program_code", "LOYALTYTIERCODE", "IsPrimary"])
    assert plan.name_at == {"AccountEmail": 0, "LoyaltyProgramCode": 1, "LoyaltyTierCode": 2}
    assert plan.names[4:] == ("AccountId", "LoyaltyProgramId", "LoyaltyTierId")
    assert plan.id_at == {"AccountId": 4, "LoyaltyProgramId": 5, "LoyaltyTierId": 6}
    columns = plan.restore(plan_columns(plan.masked, plan.field_map))
    assert columns.ignored == () and columns.names == plan.names
    assert {f for _, f, _ in columns.columns} == {
        "AccountId", "LoyaltyProgramId", "LoyaltyTierId", "IsPrimary",
    }  # fmt: skip


def test_field_map_names_columns_and_an_id_column_of_the_source_is_the_one_filled() -> None:
    plan = plan_names(
        ["guest", "mail", "Code"],
        {"mail": "account_email", "Code": "AccountLoyaltyCode", "guest": "AccountId"},
    )
    assert plan.name_at == {"AccountEmail": 1, "AccountLoyaltyCode": 2}
    assert plan.id_at == {"AccountId": 0} and plan.names == ("guest", "mail", "Code")
    assert plan.field_map == {"guest": "AccountId"}
    # "Code" is a Mews field by name: mapped to a name, it must not also feed Code.
    columns = plan.restore(plan_columns([*plan.masked, "LoyaltyProgramId", "IsPrimary"], plan.field_map))
    assert "Code" not in {f for _, f, _ in columns.columns}


def test_a_source_without_names_plans_as_before() -> None:
    plan = plan_names(["AccountId", "email", "LoyaltyProgramId"])
    assert not plan.used and plan.masked == plan.names == ("AccountId", "email", "LoyaltyProgramId")


@pytest.mark.parametrize(
    ("columns", "field_map", "message"),
    [
        (
            ["email"],
            {"e_mail": "AccountEmail"},
            "field_map names column 'e_mail', which the source does not have",
        ),
        (["AccountEmail", "mail"], {"mail": "AccountEmail"}, "both map to AccountEmail"),
    ],
)
def test_bad_name_configuration_is_one_clear_error(
    columns: list[str], field_map: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_names(columns, field_map)


# -- the decision --


def test_decide_one_match_gives_the_id_and_no_name_keeps_the_given_id() -> None:
    assert decide("AccountId", None, [Named("AccountEmail", "a@x", (A1,))]) == A1
    assert decide("AccountId", A2, []) == A2
    assert decide("AccountId", None, []) is None


def test_decide_rejects_unknown_ambiguous_and_disagreeing_names() -> None:
    unknown = decide("AccountId", None, [Named("AccountEmail", "no@x", ())])
    assert isinstance(unknown, RowRejected) and unknown.field == "AccountEmail"
    assert "no Mews customer with e-mail 'no@x'" in str(unknown)
    several = decide("AccountId", None, [Named("AccountEmail", "dup@x", (A3, A2))])
    assert isinstance(several, RowRejected)
    assert f"2 Mews customers have e-mail 'dup@x': {A2}, {A3}; nothing is guessed: merge" in str(several)
    clash = decide("AccountId", A1, [Named("AccountEmail", "b@x", (A2,))])
    assert isinstance(
        clash, RowRejected
    ) and f"AccountId {A1} disagrees with AccountEmail 'b@x', which is {A2}" in str(clash)
    names = decide(
        "AccountId", None, [Named("AccountEmail", "a@x", (A1,)), Named("AccountLoyaltyCode", "LC2", (A2,))]
    )
    assert isinstance(names, RowRejected) and "but AccountLoyaltyCode 'LC2' is" in str(names)
    code = decide("LoyaltyProgramId", None, [Named("LoyaltyProgramCode", "GOLD", (), ("GOLDCLUB", "SILVER"))])
    assert isinstance(code, RowRejected) and "(codes in Mews: GOLDCLUB, SILVER)" in str(code)


def test_an_id_or_a_second_name_picks_one_of_duplicate_profiles() -> None:
    dup = Named("AccountEmail", "dup@x", (A2, A3))
    assert decide("AccountId", A3, [dup]) == A3
    assert decide("AccountId", None, [dup, Named("AccountLoyaltyCode", "LC2", (A2,))]) == A2


def test_emails_are_compared_trimmed_and_case_insensitively() -> None:
    assert clean_email("  Ann@Example.COM ") == "ann@example.com"
    assert clean_email("   ") is None and clean_email(None) is None


# -- the resolver --


def resolver(directory: Directory, columns: tuple[str, ...] = CRM, **kwargs: Any) -> NameResolver:
    return NameResolver(directory, plan_names(columns, CRM_MAP), **kwargs)


def test_rows_get_their_three_ids_or_the_reason_in_the_id_cell() -> None:
    d = Directory(guests())
    r = resolver(d, chain_id="c0000000-0000-4000-8000-000000000000")
    rows = r.resolve(
        [
            (1, "  ann@EXAMPLE.com ", "GOLDCLUB", "GOLD", True),
            (2, "dup@example.com", "GOLDCLUB", "BASE", True),
            (3, "nobody@example.com", "GOLDCLUB", None, True),
            (4, "ann@example.com", "BRONZE", "GOLD", True),
            (5, "ann@example.com", "GOLDCLUB", "PLATINUM", True),
            (6, "ann@example.com", "SILVER", None, True),
        ]
    )
    assert rows[0][5:] == (A1, GOLD_CLUB, T_GOLD)
    assert isinstance(rows[1][5], RowRejected) and f"{A2}, {A3}" in str(rows[1][5])
    assert "no Mews customer with e-mail 'nobody@example.com'" in str(rows[2][5])
    assert "no Mews loyalty programme with code 'BRONZE' (codes in Mews: GOLDCLUB, SILVER)" in str(rows[3][6])
    assert rows[3][7] is None  # the programme is unknown: no tier is looked up
    assert (
        f"no tier with code 'PLATINUM' in loyalty programme {GOLD_CLUB} (codes in Mews: BASE, GOLD)"
        in str(rows[4][7])
    )
    assert rows[5][5:] == (A1, SILVER_CLUB, None)
    # one look-up of the e-mails, one of the codes, all programmes once (to name them), tiers of GOLDCLUB once
    assert [op for op, _ in d.calls] == ["customers", "programs", "tiers", "programs"]
    # e-mails go as written (trimmed), each spelling once; compared case-insensitively
    assert d.calls[0][1]["emails"] == [
        "ann@EXAMPLE.com",
        "dup@example.com",
        "nobody@example.com",
        "ann@example.com",
    ]
    assert d.calls[0][1]["chains"] == ["c0000000-0000-4000-8000-000000000000"]
    assert r.lookups == len(d.calls)


def test_a_normalized_batch_rejects_the_unresolved_rows_with_their_reason() -> None:
    d = Directory(guests())
    plan = plan_names(CRM, CRM_MAP)
    columns = plan.restore(plan_columns(plan.masked, plan.field_map))
    rows = NameResolver(d, plan).resolve(
        [(1, "Ann@example.com", "GOLDCLUB", "GOLD", 1), (2, "x@y", "GOLDCLUB", "", 1)]
    )
    batch = build_batch(0, 1, columns, rows, keep_row_json=True)
    assert batch.items == [
        {"AccountId": A1, "LoyaltyProgramId": GOLD_CLUB, "LoyaltyTierId": T_GOLD, "IsPrimary": True}
    ]
    (rejected,) = batch.rejected
    assert rejected.source_row == 2 and rejected.field == "AccountEmail" and rejected.account_id is None
    assert rejected.reason.startswith("row 2: AccountEmail: no Mews customer with e-mail 'x@y'")
    assert '"email": "x@y"' in (rejected.row_json or "")


def test_a_row_whose_id_and_name_disagree_is_rejected_and_an_agreeing_one_kept() -> None:
    d = Directory(guests())
    columns = ("AccountId", "AccountEmail", "LoyaltyProgramId", "IsPrimary")
    r = NameResolver(d, plan_names(columns))
    rows = r.resolve([(A1.upper(), "ann@example.com", GOLD_CLUB, 1), (A1, "dup@example.com", GOLD_CLUB, 1), (A3, "dup@example.com", GOLD_CLUB, 1), (A2, None, GOLD_CLUB, 1)])  # fmt: skip
    assert [row[0] for row in rows[:1]] == [A1]
    assert isinstance(rows[1][0], RowRejected) and "disagrees with AccountEmail 'dup@example.com'" in str(
        rows[1][0]
    )
    assert rows[2][0] == A3 and rows[3][0] == A2
    assert len(rows[0]) == 4  # no column appended: the source's AccountId is the one filled


def test_look_ups_cost_one_request_per_999_names_plus_pages_for_duplicates() -> None:
    people = [{"Id": f"00000000-0000-4000-8000-{n:012d}", "Email": f"g{n}@x.com"} for n in range(2500)]
    d = Directory(people)
    source = ListSource(
        [{"email": f" G{n}@X.com", "programme_code": "GOLDCLUB", "is_primary": 1} for n in range(2500)], 250
    )
    plan = plan_names(source.columns, {"email": "AccountEmail", "programme_code": "LoyaltyProgramCode"})
    resolved = ResolvedSource(source, NameResolver(d, plan))
    chunks = list(resolved.chunks())
    assert [len(c) for c in chunks] == [250] * 10
    assert all(
        row[3] == f"00000000-0000-4000-8000-{n:012d}" for n, row in enumerate(r for c in chunks for r in c)
    )
    # 999 names a request, across chunk boundaries: 999 + 999 + 502; each page holds fewer than
    # its Count (1000), so none needs a second read to prove it was the last
    asked = [call[1]["emails"] for call in d.calls if call[0] == "customers"]
    assert [len(a) for a in asked] == [999, 999, 502] and d.count("programs") == 1
    assert asked[0][0] == "G0@X.com"  # as the source wrote it, trimmed
    assert resolved.lookups == 4 and resolved.columns == (*source.columns, "AccountId", "LoyaltyProgramId")
    # a second profile per name: 1998 records for 999 names, a page of 1000 and one of 998
    twins = people + [{**p, "Id": p["Id"].replace("-8000-", "-9000-")} for p in people]
    d = Directory(twins)
    rows = NameResolver(d, plan).resolve([(f"g{n}@x.com", "GOLDCLUB", 1) for n in range(999)])
    assert d.count("customers") == 2 and all("2 Mews customers" in str(row[3]) for row in rows)


def test_e_mails_found_on_a_case_sensitive_server_and_what_it_hides() -> None:
    guests_ = [
        {"Id": A1, "Email": "Ann@Example.com"},  # stored mixed case
        {"Id": A2, "Email": "bob@example.com"},  # stored lower case
        {"Id": A3, "Email": "Cy@Example.com"},
    ]
    rows = [
        ("Ann@Example.com ", "GOLDCLUB", 1),
        ("BOB@Example.com", "GOLDCLUB", 1),
        ("cy@example.com", "GOLDCLUB", 1),
    ]
    plan = plan_names(("email", "programme_code", "is_primary"), {"email": "AccountEmail", "programme_code": "LoyaltyProgramCode"})  # fmt: skip
    sensitive = Directory(guests_, case_sensitive=True)
    resolved = NameResolver(sensitive, plan).resolve(rows)
    # as written: found; warehouse capitals, Mews lower case: found by the second, lower-case ask;
    # warehouse lower case, Mews capitals: a case-sensitive server cannot find it
    assert resolved[0][3] == A1 and resolved[1][3] == A2
    assert "no Mews customer with e-mail 'cy@example.com'" in str(resolved[2][3])
    asked = [call[1]["emails"] for call in sensitive.calls if call[0] == "customers"]
    assert asked == [["Ann@Example.com", "BOB@Example.com", "cy@example.com"], ["bob@example.com"]]
    # a server comparing case-insensitively finds them all with the first request alone
    insensitive = Directory(guests_)
    resolved = NameResolver(insensitive, plan).resolve(rows)
    assert [row[3] for row in resolved] == [A1, A2, A3] and insensitive.count("customers") == 1


def test_guests_are_asked_again_per_group_unless_remembered_programmes_and_tiers_once_per_run() -> None:
    rows = [(1, "ann@example.com", "GOLDCLUB", "GOLD", 1)]
    d = Directory(guests())
    forgetful = resolver(d)
    forgetful.resolve(rows)
    forgetful.resolve(rows)
    assert (d.count("customers"), d.count("programs"), d.count("tiers")) == (2, 1, 1)
    d = Directory(guests())
    remembering = resolver(d, remember=True)
    assert remembering.resolve(rows) == remembering.resolve(rows)
    assert (d.count("customers"), d.count("programs"), d.count("tiers")) == (1, 1, 1)


# -- look-ups ahead of the run --


class SlowDirectory(Directory):
    """A Directory whose customers/getAll takes ``delay`` s, notes its thread, and fails on call ``fail_at``."""

    def __init__(
        self, customers: list[dict[str, Any]], delay: float = 0.0, fail_at: int | None = None
    ) -> None:
        super().__init__(customers)
        self.delay, self.fail_at = delay, fail_at
        self.threads: set[str] = set()

    def get_customers(self, **kwargs: Any) -> Any:
        for page in super().get_customers(**kwargs):
            self.threads.add(threading.current_thread().name)
            if self.fail_at is not None and self.count("customers") >= self.fail_at:
                raise MewsError("HTTP 503 from customers/getAll", status=503, operation="customers/getAll")
            time.sleep(self.delay)
            yield page


def numbered(n: int, chunk: int = 999) -> tuple[list[dict[str, Any]], ListSource, NamePlan]:
    people = [{"Id": f"00000000-0000-4000-8000-{i:012d}", "Email": f"g{i}@x.com"} for i in range(n)]
    source = ListSource([{"email": f"g{i}@x.com", "is_primary": 1} for i in range(n)], chunk)
    return people, source, plan_names(source.columns, {"email": "AccountEmail"})


def test_names_are_looked_up_on_a_thread_of_their_own_ahead_of_the_rows_taken() -> None:
    people, source, plan = numbered(10 * 999)
    d = SlowDirectory(people)
    resolved = ResolvedSource(source, NameResolver(d, plan), ahead_rows=5 * 999)
    chunks = resolved.chunks()
    first = next(chunks)
    time.sleep(0.2)  # the run sends the first batch: the look-up thread goes on meanwhile
    assert d.threads and all(t.startswith("mews-names") for t in d.threads)
    assert first[0][-1] == people[0]["Id"]
    assert d.count("customers") == 5  # the five chunks handed ahead were looked up, no more
    rest = list(chunks)
    assert [row[-1] for c in (first, *rest) for row in c] == [p["Id"] for p in people]
    assert d.count("customers") == 10


def test_look_ups_stop_with_the_run_and_their_errors_reach_the_reader() -> None:
    people, source, plan = numbered(20 * 999)
    d = SlowDirectory(people, delay=0.05)
    resolved = ResolvedSource(source, NameResolver(d, plan), ahead_rows=20 * 999)
    resolved.stop = stop = threading.Event()
    chunks = resolved.chunks()
    next(chunks)
    stop.set()  # the run stops: no further chunk, and no look-up request after those under way
    asked = d.count("customers")
    assert list(chunks) == []
    time.sleep(0.3)
    assert d.count("customers") <= asked + 3 < 20  # at most the three under way

    people, source, plan = numbered(6 * 999)
    failing = ResolvedSource(source, NameResolver(SlowDirectory(people, fail_at=4), plan))
    got = []
    with pytest.raises(MewsError, match="HTTP 503"):
        for chunk in failing.chunks():
            got.append(chunk)
    assert len(got) == 3  # the chunks resolved before the failing look-up, then its error
