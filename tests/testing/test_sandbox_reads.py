"""The sandbox's read and look-up operations, over real HTTP: ``customers/getAll``,
``loyaltyPrograms/getAll``, ``loyaltyTiers/getAll`` and the time filters of
``loyaltyMemberships/getAll`` (``shared/mews-api/READ-API.md``).

What clients of these reads must survive is checked here as behaviour: a look-up without a
filter is refused, list filters hold at most 1000 items, a time interval is at most 3 months,
records stamped exactly on a slice boundary come back in both slices (ends inclusive), several
guests share one e-mail, deleted memberships are kept, and cursors page to the end.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests

from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN, MewsSandbox

AUTH = {"ClientToken": DEMO_CLIENT_TOKEN, "AccessToken": DEMO_ACCESS_TOKEN, "Client": "reads tests 1.0"}
CUSTOMERS = "customers/getAll"
PROGRAMS = "loyaltyPrograms/getAll"
TIERS = "loyaltyTiers/getAll"
MEMBERSHIPS = "loyaltyMemberships/getAll"
EXTENT = {"Customers": True, "Addresses": False}
LIST_KEY = {
    CUSTOMERS: "Customers",
    PROGRAMS: "LoyaltyPrograms",
    TIERS: "LoyaltyTiers",
    MEMBERSHIPS: "LoyaltyMemberships",
}
YEAR = datetime(2025, 1, 1, tzinfo=timezone.utc)

_http = requests.Session()


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def post(sandbox: MewsSandbox | str, operation: str, body: dict[str, Any]) -> requests.Response:
    url = sandbox if isinstance(sandbox, str) else sandbox.url
    return _http.post(f"{url}/api/connector/v1/{operation}", json={**AUTH, **body}, timeout=30)


def ok(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def refused(response: requests.Response, *words: str) -> str:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["RequestId"] == response.headers["Request-Id"]
    for word in words:
        assert word in body["Message"], body["Message"]
    return body["Message"]


def read_all(
    sandbox: MewsSandbox | str, operation: str, count: int = 1000, **filters: Any
) -> list[dict[str, Any]]:
    """Every record of a read, following the cursor until a page is shorter than ``count``."""
    records: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):  # a cursor that does not move on fails the test instead of hanging it
        page = ok(post(sandbox, operation, {**filters, "Limitation": {"Count": count, "Cursor": cursor}}))
        items = page[LIST_KEY[operation]]
        records += items
        if len(items) < count:
            return records
        assert page["Cursor"] == items[-1]["Id"]  # the cursor is the Id of the last item
        cursor = page["Cursor"]
    raise AssertionError(f"{operation}: still paging after 1000 pages")


def interval(start: datetime, end: datetime) -> dict[str, str]:
    return {"StartUtc": iso(start), "EndUtc": iso(end)}


@pytest.fixture
def sandbox(mews_sandbox: MewsSandbox) -> Iterator[MewsSandbox]:
    mews_sandbox.configure(rate_limit_requests=1_000_000)
    yield mews_sandbox


# -- customers/getAll --


def test_customers_need_a_filter_besides_chains_and_activity(sandbox):
    sandbox.add_customers(3)
    limitation = {"Extent": EXTENT, "Limitation": {"Count": 10}}
    refused(post(sandbox, CUSTOMERS, limitation), "CustomerIds", "required if no other filter")
    refused(post(sandbox, CUSTOMERS, {**limitation, "ChainIds": [str(uuid.uuid4())]}), "CustomerIds")
    refused(post(sandbox, CUSTOMERS, {**limitation, "ActivityStates": ["Active"]}), "CustomerIds")
    refused(post(sandbox, CUSTOMERS, {**limitation, "Emails": None}), "CustomerIds")  # null is not given
    assert len(ok(post(sandbox, CUSTOMERS, {**limitation, "LastNames": ["Tester"]}))["Customers"]) == 3
    now = datetime.now(timezone.utc)
    by_time = {**limitation, "CreatedUtc": interval(now - timedelta(hours=1), now + timedelta(hours=1))}
    assert len(ok(post(sandbox, CUSTOMERS, by_time))["Customers"]) == 3


def test_customers_extent_is_required_and_customers_false_gives_nothing(sandbox):
    sandbox.add_customers(2)
    body = {"LastNames": ["Tester"], "Limitation": {"Count": 10}}
    refused(post(sandbox, CUSTOMERS, body), "Extent")
    refused(post(sandbox, CUSTOMERS, {**body, "Extent": {"Customers": True, "Rooms": True}}), "Extent")
    refused(post(sandbox, CUSTOMERS, {**body, "Extent": {"Customers": "yes"}}), "Extent")
    assert ok(post(sandbox, CUSTOMERS, {**body, "Extent": {"Customers": False}})) == {
        "Customers": [],
        "Documents": None,
        "Cursor": None,
    }
    found = ok(post(sandbox, CUSTOMERS, {**body, "Extent": EXTENT}))["Customers"]
    assert len(found) == 2
    required = {"Id", "ChainId", "Number", "LastName", "CreatedUtc", "UpdatedUtc", "IsActive", "Classifications",
                "Options", "PreferredSpaceFeatures", "CreatorProfileId", "UpdaterProfileId"}  # fmt: skip
    wanted = {"FirstName", "Email", "LoyaltyCode", "Phone", "ActivityState"}
    assert required | wanted <= set(found[0]), set(found[0])


@pytest.mark.parametrize(
    ("operation", "name", "most", "extra"),
    [
        (CUSTOMERS, "Emails", 1000, {"Extent": EXTENT}),
        (CUSTOMERS, "CustomerIds", 1000, {"Extent": EXTENT}),
        (CUSTOMERS, "LoyaltyCodes", 1000, {"Extent": EXTENT}),
        (CUSTOMERS, "CompanyIds", 1, {"Extent": EXTENT}),
        (PROGRAMS, "Codes", 1000, {}),
        (PROGRAMS, "LoyaltyProgramIds", 1000, {}),
        (TIERS, "LoyaltyProgramIds", 1000, {}),
        (TIERS, "LoyaltyTierIds", 1000, {"LoyaltyProgramIds": [str(uuid.uuid4())]}),
        (MEMBERSHIPS, "AccountIds", 1000, {}),
    ],
)
def test_list_filters_take_at_most_their_limit(sandbox, operation, name, most, extra):
    def items(n: int) -> list[str]:
        return [str(uuid.uuid4()) if name.endswith("Ids") else f"x{i}@example.com" for i in range(n)]

    body = {**extra, "Limitation": {"Count": 10}}
    ok(post(sandbox, operation, {**body, name: items(most)}))
    refused(post(sandbox, operation, {**body, name: items(most + 1)}), name, f"1 to {most}")
    refused(post(sandbox, operation, {**body, name: []}), name)


def test_customer_pages_follow_the_cursor_to_the_end_while_guests_are_added(sandbox):
    first = sandbox.add_customers(23)
    body = {"Extent": EXTENT, "LastNames": ["Tester"]}
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = ok(post(sandbox, CUSTOMERS, {**body, "Limitation": {"Count": 5, "Cursor": cursor}}))
        pages += 1
        ids = [c["Id"] for c in page["Customers"]]
        seen += ids
        if pages == 1:  # guests added while the client pages come on later pages, once
            later = sandbox.add_customers(4)
        if len(ids) < 5:
            assert page["Cursor"] == (ids[-1] if ids else None)
            break
        cursor = page["Cursor"]
        assert cursor == ids[-1]
    assert seen == first + later and pages == 6  # 27 guests: 5 full pages and one of 2


def test_guests_sharing_an_email_are_all_returned(sandbox):
    ids = sandbox.add_customers(10, shared_emails=3)
    found = ok(
        post(
            sandbox,
            CUSTOMERS,
            {"Extent": EXTENT, "Emails": ["guest2@example.com"], "Limitation": {"Count": 10}},
        )
    )
    assert sorted(c["Id"] for c in found["Customers"]) == sorted(
        [ids[1], ids[8]]
    )  # guest 2 and its duplicate
    both = read_all(sandbox, CUSTOMERS, Extent=EXTENT, Emails=["guest1@example.com", "guest3@example.com"])
    assert sorted(c["Id"] for c in both) == sorted([ids[0], ids[2], ids[7], ids[9]])
    none = ok(
        post(
            sandbox,
            CUSTOMERS,
            {"Extent": EXTENT, "Emails": ["nobody@example.com"], "Limitation": {"Count": 10}},
        )
    )
    assert none == {"Customers": [], "Documents": None, "Cursor": None}


def test_email_matching_ignores_case_by_default_and_never_trims(sandbox):
    stored = sandbox.add_customer("Jane.Doe@Example.COM", loyalty_code="LC-1")

    def look_up(*emails: str) -> list[str]:
        body = {"Extent": EXTENT, "Emails": list(emails), "Limitation": {"Count": 10}}
        return [c["Id"] for c in ok(post(sandbox, CUSTOMERS, body))["Customers"]]

    assert look_up("jane.doe@example.com") == [stored]
    assert look_up("JANE.DOE@EXAMPLE.COM") == [stored]
    assert look_up(" jane.doe@example.com") == [] and look_up("jane.doe@example.com ") == []
    sandbox.configure(email_case_sensitive=True)  # the adversarial reading
    assert look_up("jane.doe@example.com") == []
    assert look_up("Jane.Doe@Example.COM") == [stored]
    # Loyalty codes and names match exactly.
    body = {"Extent": EXTENT, "LoyaltyCodes": ["lc-1"], "Limitation": {"Count": 10}}
    assert ok(post(sandbox, CUSTOMERS, body))["Customers"] == []


def test_mixed_case_seeding_stores_capitals(sandbox):
    sandbox.add_customers(4, shared_emails=1, mixed_case=True)
    emails = [c["Email"] for c in sandbox.customers()]
    assert emails == ["guest1@example.com", "Guest2@Example.COM", "guest3@example.com", "Guest1@Example.COM"]
    body = {"Extent": EXTENT, "Emails": ["guest1@example.com"], "Limitation": {"Count": 10}}
    assert len(ok(post(sandbox, CUSTOMERS, body))["Customers"]) == 2
    sandbox.configure(email_case_sensitive=True)
    assert len(ok(post(sandbox, CUSTOMERS, body))["Customers"]) == 1


def test_deleted_customers_need_activity_state_deleted(sandbox):
    gone = sandbox.add_customer("left@example.com", deleted_utc=YEAR + timedelta(days=10))
    kept = sandbox.add_customer("left@example.com")
    body = {"Extent": EXTENT, "Emails": ["left@example.com"], "Limitation": {"Count": 10}}
    assert [c["Id"] for c in ok(post(sandbox, CUSTOMERS, body))["Customers"]] == [kept]
    deleted = ok(post(sandbox, CUSTOMERS, {**body, "ActivityStates": ["Deleted"]}))["Customers"]
    assert [(c["Id"], c["ActivityState"], c["IsActive"]) for c in deleted] == [(gone, "Deleted", False)]
    window = {
        "DeletedUtc": interval(YEAR, YEAR + timedelta(days=30)),
        "ActivityStates": ["Deleted", "Active"],
    }
    by_deletion = ok(post(sandbox, CUSTOMERS, {"Extent": EXTENT, **window, "Limitation": {"Count": 10}}))
    assert [c["Id"] for c in by_deletion["Customers"]] == [gone]


# -- loyaltyPrograms/getAll and loyaltyTiers/getAll --


def test_programs_by_code_with_the_published_fields(sandbox):
    gold = sandbox.add_loyalty_program(
        "GOLD", name="Gold Club", tiers=["SILVER", "GOLD"], subscription="Paid"
    )
    sandbox.add_loyalty_program("BASIC")
    found = ok(post(sandbox, PROGRAMS, {"Codes": ["GOLD"], "Limitation": {"Count": 10}}))
    assert found == {
        "LoyaltyPrograms": [{"Id": gold.id, "ChainId": found["LoyaltyPrograms"][0]["ChainId"], "Name": "Gold Club",
                             "Code": "GOLD", "Type": "Hotel", "Subscription": "Paid"}],
        "Cursor": gold.id,
    }  # fmt: skip
    assert (
        ok(post(sandbox, PROGRAMS, {"Codes": ["gold"], "Limitation": {"Count": 10}}))["LoyaltyPrograms"] == []
    )
    assert [p["Code"] for p in read_all(sandbox, PROGRAMS, count=1)] == ["GOLD", "BASIC"]
    by_id = ok(post(sandbox, PROGRAMS, {"LoyaltyProgramIds": [gold.id.upper()], "Limitation": {"Count": 10}}))
    assert [p["Id"] for p in by_id["LoyaltyPrograms"]] == [gold.id]


def test_tiers_need_program_ids_and_belong_to_them(sandbox):
    gold = sandbox.add_loyalty_program("GOLD", tiers=["SILVER", "GOLD", "PLATINUM"])
    other = sandbox.add_loyalty_program("OTHER", tiers=["BRONZE"])
    refused(post(sandbox, TIERS, {"Limitation": {"Count": 10}}), "LoyaltyProgramIds")
    refused(
        post(sandbox, TIERS, {"LoyaltyProgramIds": None, "Limitation": {"Count": 10}}), "LoyaltyProgramIds"
    )
    tiers = read_all(sandbox, TIERS, count=2, LoyaltyProgramIds=[gold.id])
    assert [(t["Code"], t["Ordering"], t["LoyaltyProgramId"]) for t in tiers] == [
        ("SILVER", 1, gold.id), ("GOLD", 2, gold.id), ("PLATINUM", 3, gold.id),
    ]  # fmt: skip
    assert {t["Id"] for t in tiers} == set(gold.tiers.values())
    assert set(tiers[0]) == {"Id", "LoyaltyProgramId", "Name", "Code", "Ordering"}
    one = read_all(
        sandbox, TIERS, LoyaltyProgramIds=[gold.id, other.id], LoyaltyTierIds=[other.tiers["BRONZE"]]
    )
    assert [t["Code"] for t in one] == ["BRONZE"]
    with pytest.raises(ValueError, match="50 characters"):
        sandbox.add_loyalty_program("LONG", tiers=["T" * 51])


# -- time filters --


@pytest.mark.parametrize(
    ("operation", "key", "extra"),
    [
        (CUSTOMERS, "CreatedUtc", {"Extent": EXTENT}),
        (CUSTOMERS, "UpdatedUtc", {"Extent": EXTENT}),
        (CUSTOMERS, "DeletedUtc", {"Extent": EXTENT}),
        (PROGRAMS, "CreatedUtc", {}),
        (PROGRAMS, "UpdatedUtc", {}),
        (TIERS, "UpdatedUtc", {"LoyaltyProgramIds": ["f701dafb-5765-4cf4-b1dd-1f602a740ae5"]}),
        (MEMBERSHIPS, "CreatedUtc", {}),
        (MEMBERSHIPS, "UpdatedUtc", {}),
    ],
)
def test_time_filters_take_at_most_three_months_in_utc(sandbox, operation, key, extra):
    def send(start: str | None, end: str | None) -> requests.Response:
        return post(
            sandbox, operation, {**extra, key: {"StartUtc": start, "EndUtc": end}, "Limitation": {"Count": 5}}
        )

    ok(send("2025-01-01T00:00:00Z", "2025-04-01T00:00:00Z"))  # 3 calendar months: 90 days
    ok(send("2025-11-30T00:00:00Z", "2026-02-28T00:00:00Z"))  # day clamped to February's end
    refused(send("2025-01-01T00:00:00Z", "2025-04-01T00:00:01Z"), key, "3 months")
    refused(send("2025-11-30T00:00:00Z", "2026-03-01T00:00:00Z"), key, "3 months")  # 91 days
    refused(send("2025-04-01T00:00:00Z", "2025-01-01T00:00:00Z"), key, "before")
    refused(send("2025-01-01T00:00:00+02:00", "2025-02-01T00:00:00Z"), f"{key}.StartUtc", "UTC")
    refused(send("2025-01-01", None), f"{key}.StartUtc")
    refused(send(None, "yesterday"), f"{key}.EndUtc")
    ok(send("2025-01-01T00:00:00+00:00", None))  # an open end is not limited


def test_membership_time_filters_select_by_internal_timestamps(sandbox):
    feb, june = YEAR + timedelta(days=31), YEAR + timedelta(days=151)
    [mid] = sandbox.seed_memberships(1, created_utc=feb, updated_utc=june)

    def ids(**filters: Any) -> list[str]:
        return [m["Id"] for m in read_all(sandbox, MEMBERSHIPS, **filters)]

    assert ids(CreatedUtc=interval(feb - timedelta(days=1), feb + timedelta(days=1))) == [mid]
    assert ids(CreatedUtc=interval(june - timedelta(days=1), june + timedelta(days=1))) == []
    assert ids(UpdatedUtc=interval(june - timedelta(days=1), june + timedelta(days=1))) == [mid]
    assert ids(UpdatedUtc=interval(feb - timedelta(days=1), feb + timedelta(days=1))) == []
    [record] = read_all(sandbox, MEMBERSHIPS, LoyaltyMembershipIds=[mid])
    assert "CreatedUtc" not in record and "UpdatedUtc" not in record  # READ-API: not returned
    # An update through the API bumps the updated time to now; the created time stays.
    update = {"LoyaltyMembershipUpdates": [{"LoyaltyMembershipId": mid, "Points": {"Value": 5}}]}
    ok(post(sandbox, "loyaltyMemberships/update", update))
    now = datetime.now(timezone.utc)
    assert ids(UpdatedUtc=interval(now - timedelta(minutes=1), now + timedelta(minutes=1))) == [mid]
    assert ids(UpdatedUtc=interval(june - timedelta(days=1), june + timedelta(days=1))) == []
    assert ids(CreatedUtc=interval(feb - timedelta(days=1), feb + timedelta(days=1))) == [mid]


def test_records_exactly_on_a_boundary_come_back_in_both_slices(sandbox):
    jan, apr, jul = YEAR, datetime(2025, 4, 1, tzinfo=timezone.utc), datetime(2025, 7, 1, tzinfo=timezone.utc)
    on_jan, on_apr, on_jul = sandbox.seed_memberships(3, created_utc=[jan, apr, jul])

    def ids(start: datetime, end: datetime) -> list[str]:
        return [m["Id"] for m in read_all(sandbox, MEMBERSHIPS, CreatedUtc=interval(start, end))]

    assert ids(jan, apr) == [on_jan, on_apr]  # both ends inclusive (the default)
    assert ids(apr, jul) == [on_apr, on_jul]  # the April record a second time: dedupe by Id
    assert ids(apr, apr) == [on_apr]  # StartUtc == EndUtc: that instant only
    sandbox.configure(interval_end_inclusive=False)  # Mews's documented half-open form
    assert ids(jan, apr) == [on_jan]
    assert ids(apr, jul) == [on_apr]
    assert ids(apr, apr) == [on_apr]


def test_a_year_exported_in_three_month_slices_needs_dedupe_by_id(sandbox):
    """120 memberships over 2025 on UTC midnights (seed_on_boundaries), read in calendar
    quarters with small pages: every record is found, the boundary ones twice."""
    sandbox.configure(seed_on_boundaries=True)
    seeded = sandbox.seed_memberships(120, start_utc=YEAR, end_utc=datetime(2026, 1, 1, tzinfo=timezone.utc))
    bounds = [datetime(2025, m, 1, tzinfo=timezone.utc) for m in (1, 4, 7, 10)] + [
        datetime(2026, 1, 1, tzinfo=timezone.utc)
    ]
    raw: list[str] = []
    for start, end in itertools.pairwise(bounds):
        raw += [m["Id"] for m in read_all(sandbox, MEMBERSHIPS, count=7, CreatedUtc=interval(start, end))]
    assert set(raw) == set(seeded)
    assert len(raw) > len(set(raw))  # records on Apr 1, Jul 1, Oct 1 came twice
    too_long = {"CreatedUtc": interval(YEAR, bounds[-1]), "Limitation": {"Count": 10}}
    refused(post(sandbox, MEMBERSHIPS, too_long), "CreatedUtc", "3 months")


def test_deleted_memberships_are_kept_and_returned_only_when_asked(sandbox):
    add = {"LoyaltyMemberships": [{"AccountId": str(uuid.uuid4()), "LoyaltyProgramId": str(uuid.uuid4()),
                                   "IsPrimary": True} for _ in range(2)]}  # fmt: skip
    kept, gone = (m["Id"] for m in ok(post(sandbox, "loyaltyMemberships/add", add))["LoyaltyMemberships"])
    ok(post(sandbox, "loyaltyMemberships/delete", {"LoyaltyMembershipIds": [gone]}))
    assert [m["Id"] for m in read_all(sandbox, MEMBERSHIPS)] == [kept]  # no ActivityStates: active only
    deleted = read_all(sandbox, MEMBERSHIPS, ActivityStates=["Deleted"])
    assert [(m["Id"], m["ActivityState"]) for m in deleted] == [(gone, "Deleted")]
    assert {m["Id"] for m in read_all(sandbox, MEMBERSHIPS, ActivityStates=["Active", "Deleted"])} == {
        kept,
        gone,
    }
    now = datetime.now(timezone.utc)  # the delete is an update: UpdatedUtc finds it
    recent = read_all(
        sandbox,
        MEMBERSHIPS,
        ActivityStates=["Deleted"],
        UpdatedUtc=interval(now - timedelta(minutes=1), now + timedelta(minutes=1)),
    )
    assert [m["Id"] for m in recent] == [gone]


# -- add against seeded references, rate limit, latency --


def test_add_refuses_unknown_references_only_once_seeded(sandbox):
    item = {"AccountId": str(uuid.uuid4()), "LoyaltyProgramId": str(uuid.uuid4()), "IsPrimary": True}
    ok(post(sandbox, "loyaltyMemberships/add", {"LoyaltyMemberships": [item]}))  # nothing seeded: accepted
    gold = sandbox.add_loyalty_program("GOLD", tiers=["SILVER"])
    other = sandbox.add_loyalty_program("OTHER", tiers=["BRONZE"])
    refused(
        post(sandbox, "loyaltyMemberships/add", {"LoyaltyMemberships": [item]}), "Invalid LoyaltyProgramId"
    )
    mismatched = {**item, "LoyaltyProgramId": gold.id, "LoyaltyTierId": other.tiers["BRONZE"]}
    refused(
        post(sandbox, "loyaltyMemberships/add", {"LoyaltyMemberships": [mismatched]}), "Invalid LoyaltyTierId"
    )
    fine = {**item, "LoyaltyProgramId": gold.id, "LoyaltyTierId": gold.tiers["SILVER"]}
    [stored] = ok(post(sandbox, "loyaltyMemberships/add", {"LoyaltyMemberships": [fine]}))[
        "LoyaltyMemberships"
    ]
    update = {"LoyaltyMembershipId": stored["Id"], "LoyaltyProgramId": {"Value": str(uuid.uuid4())}}
    refused(
        post(sandbox, "loyaltyMemberships/update", {"LoyaltyMembershipUpdates": [update]}),
        "Invalid LoyaltyProgramId",
    )
    [guest] = sandbox.add_customers(1)
    refused(post(sandbox, "loyaltyMemberships/add", {"LoyaltyMemberships": [fine]}), "Invalid AccountId")
    ok(
        post(
            sandbox, "loyaltyMemberships/add", {"LoyaltyMemberships": [{**fine, "AccountId": guest.upper()}]}
        )
    )
    sandbox.configure(check_references=False)
    ok(post(sandbox, "loyaltyMemberships/add", {"LoyaltyMemberships": [item]}))


def test_reads_count_against_the_access_tokens_budget(sandbox):
    program = sandbox.add_loyalty_program("GOLD")
    sandbox.configure(rate_limit_requests=3, rate_limit_period_s=30)
    ok(post(sandbox, PROGRAMS, {"Limitation": {"Count": 1}}))
    ok(post(sandbox, TIERS, {"LoyaltyProgramIds": [program.id], "Limitation": {"Count": 1}}))
    ok(post(sandbox, CUSTOMERS, {"Extent": EXTENT, "Emails": ["a@example.com"], "Limitation": {"Count": 1}}))
    limited = post(sandbox, MEMBERSHIPS, {"Limitation": {"Count": 1}})
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1


def test_read_latency_and_jitter_apply_to_every_read(sandbox):
    sandbox.configure(getall_latency_s=0.2, getall_jitter_s=0.2, seed=3)
    times = []
    for _ in range(3):
        started = time.monotonic()
        ok(post(sandbox, PROGRAMS, {"Limitation": {"Count": 1}}))
        times.append(time.monotonic() - started)
    assert min(times) >= 0.2 and max(times) < 2
    assert max(times) - min(times) > 0.005  # the jitter makes pages arrive unevenly


# -- the command line --


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_mews.testing.sandbox", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_seeds_customers_programs_and_memberships():
    proc = _cli(
        "--seed-customers", "8", "--shared-emails", "2", "--mixed-case-emails",
        "--seed-program", "GOLD:SILVER,GOLD", "--seed-program", "BASIC",
        "--seed-memberships", "40", "--seed-period", "2025-01-01/2026-01-01",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        listening = proc.stdout.readline()
        assert listening.startswith("Mews sandbox listening on "), listening
        url = listening.split()[-1]
        seeded = json.loads(proc.stdout.readline().removeprefix("Seeded: "))
        assert seeded["Customers"] == 8 and seeded["LoyaltyMemberships"] == 40
        gold, basic = seeded["LoyaltyPrograms"]
        assert (gold["Code"], list(gold["Tiers"]), basic["Code"], basic["Tiers"]) == (
            "GOLD",
            ["SILVER", "GOLD"],
            "BASIC",
            {},
        )
        shared = read_all(url, CUSTOMERS, Extent=EXTENT, Emails=["guest1@example.com"])
        assert [c["Email"] for c in shared] == ["guest1@example.com", "guest1@example.com"]  # guests 1 and 7
        assert [c["Email"] for c in read_all(url, CUSTOMERS, Extent=EXTENT, LoyaltyCodes=["LC000002"])] == [
            "Guest2@Example.COM"
        ]
        assert [p["Id"] for p in read_all(url, PROGRAMS, Codes=["GOLD"])] == [gold["Id"]]
        tiers = read_all(url, TIERS, LoyaltyProgramIds=[gold["Id"]])
        assert {t["Code"]: t["Id"] for t in tiers} == gold["Tiers"]
        quarters = [("2025-01-01", "2025-04-01"), ("2025-04-01", "2025-07-01"), ("2025-07-01", "2025-10-01"),
                    ("2025-10-01", "2026-01-01")]  # fmt: skip
        found = {
            m["Id"]
            for start, end in quarters
            for m in read_all(
                url,
                MEMBERSHIPS,
                count=9,
                CreatedUtc={"StartUtc": f"{start}T00:00:00Z", "EndUtc": f"{end}T00:00:00Z"},
            )
        }
        assert len(found) == 40
        memberships = read_all(url, MEMBERSHIPS)
        assert {m["LoyaltyProgramId"] for m in memberships} == {gold["Id"]}
        assert {m["LoyaltyTierId"] for m in memberships} == set(gold["Tiers"].values())
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--seed-customers", "4", "--shared-emails", "3"],
            "--shared-emails 3 needs --seed-customers of at least 6",
        ),
        (["--seed-customers", "-1"], "cannot be negative"),
        (["--seed-program", "GOLD:" + "T" * 51], "1 to 50 characters"),
        (["--seed-program", "GOLD:A,A"], "names a tier twice"),
        (["--seed-customers", "1", "--seed-period", "2026-01-01/2025-01-01"], "START before END"),
        (["--mixed-case-emails"], "needs --seed-customers"),
    ],
)
def test_cli_refuses_bad_seeding_flags(args, message):
    proc = _cli(*args)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and message in err, err
