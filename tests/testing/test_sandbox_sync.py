"""The sandbox's ``loyaltyMemberships/update`` and ``/delete`` and getAll's filters, over real HTTP.

Requests are checked against the published JSON Schema of both bodies
(``data/loyalty-memberships-update-delete.schema.json``, a copy of
``shared/mews-api/loyalty-memberships-update-delete.schema.json``): what it accepts gets 200,
what it refuses gets 400. Beyond the schema: unknown or deleted Ids (400, nothing changed),
update-value rules (what can be cleared), soft delete, the one rate budget per AccessToken,
the request log, and persistence of updates and deletes in the state file.

As for add, ``ExpirationDate`` and ``Url`` are generated valid only: the schema cannot judge an
ISO 8601 date or an absolute URI, and the sandbox (like Mews) does.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN, MewsSandbox

DATA = Path(__file__).parents[1] / "data"
SYNC_SCHEMA = json.loads((DATA / "loyalty-memberships-update-delete.schema.json").read_text())
ADD_SCHEMA = json.loads((DATA / "loyalty-memberships.schema.json").read_text())
AUTH = {
    "ClientToken": DEMO_CLIENT_TOKEN,
    "AccessToken": DEMO_ACCESS_TOKEN,
    "Client": "sandbox sync tests 1.0",
}
ADD = "loyaltyMemberships/add"
UPDATE = "loyaltyMemberships/update"
DELETE = "loyaltyMemberships/delete"
GET_ALL = "loyaltyMemberships/getAll"
PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
STATES = ["New", "Pending", "Enrolled", "Canceled", "Declined"]
INT32 = (-(2**31), 2**31 - 1)
HYPOTHESIS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def validator(schema: dict[str, Any], name: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"#/$defs/{name}", "$defs": schema["$defs"]},
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


UPDATE_REQUEST = validator(SYNC_SCHEMA, "MultipleLoyaltyMembershipUpdateParameters")
DELETE_REQUEST = validator(SYNC_SCHEMA, "LoyaltyMembershipDeleteParameters")
DELETE_RESPONSE = validator(SYNC_SCHEMA, "DeleteResponse_Unit")
# The sandbox answers with the later documented ActivityState/DeletedUtc too: the add contract's result.
RESULT = validator(ADD_SCHEMA, "LoyaltyMembershipResult")
ERROR = validator(ADD_SCHEMA, "ConnectorApiExceptionResult")

_http = requests.Session()


def post(sandbox: MewsSandbox, operation: str, body: Any) -> requests.Response:
    return _http.post(
        f"{sandbox.url}/api/connector/v1/{operation}",
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )


def ok(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    uuid.UUID(response.headers["Request-Id"])
    return response.json()


def refused(response: requests.Response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    ERROR.validate(body)
    assert body["RequestId"] == response.headers["Request-Id"]
    return body["Message"]


def add(sandbox: MewsSandbox, count: int = 1, **fields: Any) -> list[dict[str, Any]]:
    items = [
        {"AccountId": str(uuid.uuid4()), "LoyaltyProgramId": PROGRAM, "IsPrimary": True, **fields}
        for _ in range(count)
    ]
    return ok(post(sandbox, ADD, {**AUTH, "LoyaltyMemberships": items}))["LoyaltyMemberships"]


def update(sandbox: MewsSandbox, *items: dict[str, Any]) -> requests.Response:
    return post(sandbox, UPDATE, {**AUTH, "LoyaltyMembershipUpdates": list(items)})


def delete(sandbox: MewsSandbox, *ids: str) -> requests.Response:
    return post(sandbox, DELETE, {**AUTH, "LoyaltyMembershipIds": list(ids)})


def get_all(sandbox: MewsSandbox, **filters: Any) -> list[dict[str, Any]]:
    body = {**AUTH, **filters, "Limitation": {"Count": 1000, "Cursor": None}}
    answer = ok(post(sandbox, GET_ALL, body))
    RESULT.validate(answer)
    return answer["LoyaltyMemberships"]


def stored(sandbox: MewsSandbox, mid: str) -> dict[str, Any]:
    return next(m for m in sandbox.memberships() if m["Id"] == mid)


@pytest.fixture
def sandbox(mews_sandbox: MewsSandbox) -> MewsSandbox:
    mews_sandbox.configure(rate_limit_requests=1_000_000)
    return mews_sandbox


# -- generated update bodies: valid wrappers, and wrappers the schema refuses --

uuids = st.uuids().map(str)
text = st.text(max_size=12)
VALID_VALUES: dict[str, Any] = {
    "LoyaltyProgramId": uuids,
    "State": st.sampled_from(STATES),
    "IsPrimary": st.booleans(),
    "MembershipNumber": st.none() | text | st.text(min_size=255, max_size=255),
    "ProviderMembershipId": st.none() | text | st.text(min_size=100, max_size=100),
    "Points": st.none() | st.integers(*INT32) | st.sampled_from(list(INT32)),
    "ExpirationDate": st.none() | st.sampled_from(["2030-12-31", "2038-01-19T03:14:07Z"]),
    "Url": st.none() | st.just("https://rewards.example.com/m/1"),
    "LoyaltyTierId": st.none() | uuids,
    "Code": st.none() | text,
}
BAD_VALUES: dict[str, Any] = {
    "LoyaltyProgramId": st.sampled_from([None, "nope", 5]),
    "State": st.sampled_from([None, "Active", "enrolled", 1]),
    "IsPrimary": st.sampled_from([None, "true", 1]),
    "MembershipNumber": st.text(min_size=256, max_size=256) | st.just(5),
    "ProviderMembershipId": st.text(min_size=101, max_size=101) | st.just(True),
    "Points": st.sampled_from([2**31, -(2**31) - 1, 1.5, "5", True]),
    "LoyaltyTierId": st.sampled_from(["nope", 7]),
    "Code": st.just(["a"]),
}


def wrapper(field: str, valid: bool) -> Any:
    values = VALID_VALUES if valid else BAD_VALUES
    return (
        st.none() | values[field].map(lambda v: {"Value": v})
        if valid
        else values[field].map(lambda v: {"Value": v}) | st.sampled_from([{"Value": 1, "Other": 2}, "x", 3])
    )


def update_item(ids: list[str], valid: bool) -> Any:
    fields = st.fixed_dictionaries({}, optional={f: wrapper(f, True) for f in VALID_VALUES})
    if valid:
        return st.builds(
            lambda i, f: {"LoyaltyMembershipId": ids[i], **f}, st.integers(0, len(ids) - 1), fields
        )
    broken = st.sampled_from(sorted(BAD_VALUES)).flatmap(lambda f: wrapper(f, False).map(lambda w: {f: w}))
    return st.builds(
        lambda i, f, bad: {"LoyaltyMembershipId": ids[i], **f, **bad},
        st.integers(0, len(ids) - 1),
        fields,
        broken | st.sampled_from([{"Nickname": {"Value": "x"}}, {"AccountId": {"Value": str(uuid.uuid4())}}]),
    )


@HYPOTHESIS
@given(data=st.data())
def test_updates_the_schema_accepts_get_200_and_change_only_what_they_name(sandbox, data):
    if not sandbox.memberships():
        add(sandbox, 3, Code="C", Points=1)
    ids = [m["Id"] for m in sandbox.memberships()]
    items = data.draw(st.lists(update_item(ids, valid=True), min_size=1, max_size=4))
    body = {**AUTH, "LoyaltyMembershipUpdates": items}
    UPDATE_REQUEST.validate(body)
    before = {m["Id"]: m for m in sandbox.memberships()}
    answer = ok(post(sandbox, UPDATE, body))
    RESULT.validate(answer)
    assert [m["Id"] for m in answer["LoyaltyMemberships"]] == [i["LoyaltyMembershipId"] for i in items]
    expected = {mid: dict(m) for mid, m in before.items()}
    for item in items:
        m = expected[item["LoyaltyMembershipId"]]
        for name, w in item.items():
            if name == "LoyaltyMembershipId" or w is None:
                continue
            value = w["Value"]
            if name == "ExpirationDate" and value is not None and len(value) == 10:
                value += "T00:00:00Z"
            if name in ("Code", "MembershipNumber"):
                m["Code"] = m["MembershipNumber"] = value
            else:
                m[name] = value
        if "MembershipNumber" in item and item["MembershipNumber"] is not None:  # wins over Code
            m["Code"] = m["MembershipNumber"] = item["MembershipNumber"]["Value"]
    assert {m["Id"]: m for m in sandbox.memberships()} == expected


@HYPOTHESIS
@given(data=st.data())
def test_updates_the_schema_refuses_get_400_and_change_nothing(sandbox, data):
    if not sandbox.memberships():
        add(sandbox, 3)
    ids = [m["Id"] for m in sandbox.memberships()]
    items = data.draw(
        st.lists(update_item(ids, valid=True), max_size=2).flatmap(
            lambda good: update_item(ids, valid=False).map(lambda bad: [*good, bad])
        )
    )
    body = {**AUTH, "LoyaltyMembershipUpdates": items}
    assert not UPDATE_REQUEST.is_valid(body)
    before = sandbox.memberships()
    refused(post(sandbox, UPDATE, body))
    assert sandbox.memberships() == before


@pytest.mark.parametrize(
    "body",
    [
        {"LoyaltyMembershipUpdates": []},
        {"LoyaltyMembershipUpdates": None},
        {},
        {"LoyaltyMembershipUpdates": [{"Points": {"Value": 1}}]},
        {"LoyaltyMembershipUpdates": [{"LoyaltyMembershipId": "nope"}]},
        {"LoyaltyMembershipUpdates": [{"LoyaltyMembershipId": str(uuid.uuid4())}], "ChainId": "chain"},
        {"LoyaltyMembershipUpdates": [{"LoyaltyMembershipId": str(uuid.uuid4())}], "Extra": 1},
    ],
    ids=["empty", "null", "missing", "no Id", "Id not a uuid", "bad ChainId", "unknown field"],
)
def test_malformed_update_requests_get_400(sandbox, body):
    assert not UPDATE_REQUEST.is_valid({**AUTH, **body})
    refused(post(sandbox, UPDATE, {**AUTH, **body}))


def test_update_values_keep_set_and_clear_as_documented(sandbox):
    tier = str(uuid.uuid4())
    [m] = add(
        sandbox, Code="N-1", Points=10, LoyaltyTierId=tier, Url="https://x.example.com/1", State="Pending"
    )
    mid = m["Id"]
    # Left out or null: kept. {"Value": null}: cleared. {"Value": v}: set. {} (INFERRED): kept.
    ok(
        update(
            sandbox, {"LoyaltyMembershipId": mid, "Points": None, "LoyaltyTierId": {"Value": None}, "Url": {}}
        )
    )
    after = stored(sandbox, mid)
    assert (after["Points"], after["LoyaltyTierId"], after["Url"]) == (10, None, "https://x.example.com/1")
    ok(update(sandbox, {"LoyaltyMembershipId": mid.upper(), "ProviderMembershipId": {"Value": "P-9"}}))
    assert stored(sandbox, mid)["ProviderMembershipId"] == "P-9"
    ok(update(sandbox, {"LoyaltyMembershipId": mid, "MembershipNumber": {"Value": "N-2"}}))
    assert (stored(sandbox, mid)["MembershipNumber"], stored(sandbox, mid)["Code"]) == ("N-2", "N-2")
    ok(update(sandbox, {"LoyaltyMembershipId": mid, "ExpirationDate": {"Value": "2031-05-01"}}))
    assert stored(sandbox, mid)["ExpirationDate"] == "2031-05-01T00:00:00Z"
    for name in ("State", "IsPrimary", "LoyaltyProgramId"):
        message = refused(update(sandbox, {"LoyaltyMembershipId": mid, name: {"Value": None}}))
        assert name in message and "cannot be removed" in message
    message = refused(update(sandbox, {"LoyaltyMembershipId": mid, "State": {}}))
    assert "State" in message  # Mews documents the state's Value as required
    refused(update(sandbox, {"LoyaltyMembershipId": mid, "ExpirationDate": {"Value": "next week"}}))
    refused(update(sandbox, {"LoyaltyMembershipId": mid, "Url": {"Value": "not a url"}}))
    refused(update(sandbox, {"LoyaltyMembershipId": mid, "AccountId": {"Value": str(uuid.uuid4())}}))
    assert stored(sandbox, mid)["State"] == "Pending"


def test_update_with_an_unknown_or_deleted_id_changes_nothing(sandbox):
    first, second = add(sandbox, 2, Points=1)
    unknown = str(uuid.uuid4())
    message = refused(
        update(
            sandbox,
            {"LoyaltyMembershipId": first["Id"], "Points": {"Value": 2}},
            {"LoyaltyMembershipId": unknown, "Points": {"Value": 2}},
        )
    )
    assert unknown in message and "LoyaltyMembershipUpdates[1]" in message
    assert stored(sandbox, first["Id"])["Points"] == 1
    ok(delete(sandbox, second["Id"]))
    refused(update(sandbox, {"LoyaltyMembershipId": second["Id"], "Points": {"Value": 2}}))


def test_update_takes_1_to_1000_items(sandbox):
    ids = [m["Id"] for m in add(sandbox, 1000)]
    answer = ok(update(sandbox, *({"LoyaltyMembershipId": i, "Points": {"Value": 5}} for i in ids)))
    assert len(answer["LoyaltyMemberships"]) == 1000
    assert {m["Points"] for m in sandbox.memberships()} == {5}
    refused(update(sandbox, *({"LoyaltyMembershipId": i} for i in [*ids, ids[0]])))
    refused(update(sandbox))


def test_forbidden_memberships_get_403_naming_the_items(sandbox):
    first, second = add(sandbox, 2)
    sandbox.configure(forbidden_memberships={second["Id"]})
    response = update(sandbox, {"LoyaltyMembershipId": first["Id"]}, {"LoyaltyMembershipId": second["Id"]})
    refused(response, 403)
    assert response.json()["Details"] == {"LoyaltyMembershipIndexes": [1]}
    refused(delete(sandbox, second["Id"]), 403)
    ok(delete(sandbox, first["Id"]))


# -- delete --


def test_delete_is_soft_and_not_repeatable(sandbox):
    kept, gone = add(sandbox, 2)
    answer = ok(delete(sandbox, gone["Id"]))
    assert answer == {}
    DELETE_RESPONSE.validate(answer)
    assert [m["Id"] for m in get_all(sandbox, ActivityStates=["Active"])] == [kept["Id"]]
    deleted = get_all(sandbox, ActivityStates=["Deleted"])
    assert [m["Id"] for m in deleted] == [gone["Id"]]
    assert deleted[0]["ActivityState"] == "Deleted" and deleted[0]["DeletedUtc"]
    assert {m["Id"] for m in get_all(sandbox, ActivityStates=["Active", "Deleted"])} == {
        kept["Id"],
        gone["Id"],
    }
    # A second delete of the same Id (a blind retry) is refused whole: the kept one stays.
    message = refused(delete(sandbox, kept["Id"], gone["Id"]))
    assert gone["Id"] in message and "LoyaltyMembershipIds[1]" in message
    assert [m["Id"] for m in get_all(sandbox, ActivityStates=["Active"])] == [kept["Id"]]


@pytest.mark.parametrize(
    "ids",
    [[], None, ["nope"], [5], [str(uuid.UUID(int=n)) for n in range(1001)]],
    ids=["empty", "null", "not a uuid", "a number", "1001 Ids"],
)
def test_malformed_delete_requests_get_400(sandbox, ids):
    body = {**AUTH, "LoyaltyMembershipIds": ids}
    assert not DELETE_REQUEST.is_valid(body)
    refused(post(sandbox, DELETE, body))


def test_delete_of_unknown_ids_and_1000_items(sandbox):
    ids = [m["Id"] for m in add(sandbox, 1000)]
    refused(delete(sandbox, *ids[:999], str(uuid.uuid4())))
    assert len(get_all(sandbox, ActivityStates=["Active"])) == 1000
    body = {**AUTH, "ChainId": None, "LoyaltyMembershipIds": ids}
    DELETE_REQUEST.validate(body)
    ok(post(sandbox, DELETE, body))
    assert get_all(sandbox, ActivityStates=["Active"]) == []
    assert sandbox.stats()["deleted"] == 1000


# -- getAll filters --


def test_getall_filters_of_sync(sandbox):
    a, b, c = add(sandbox, 3)
    ok(update(sandbox, {"LoyaltyMembershipId": a["Id"], "MembershipNumber": {"Value": "A-1"}}))
    ok(update(sandbox, {"LoyaltyMembershipId": b["Id"], "ProviderMembershipId": {"Value": "PB"}}))
    ok(update(sandbox, {"LoyaltyMembershipId": c["Id"], "State": {"Value": "Canceled"}}))

    def ids(**filters: Any) -> list[str]:
        return [m["Id"] for m in get_all(sandbox, **filters)]

    assert ids(LoyaltyMembershipIds=[c["Id"].upper(), a["Id"]]) == [a["Id"], c["Id"]]
    assert ids(MembershipNumbers=["A-1"]) == [a["Id"]]
    assert ids(Codes=["A-1"]) == [a["Id"]]
    assert ids(ProviderMembershipIds=["PB"]) == [b["Id"]]
    assert ids(MembershipStates=["Canceled"]) == [c["Id"]]
    assert ids(MembershipStates=["Enrolled"], ActivityStates=["Active"]) == [a["Id"], b["Id"]]
    ok(delete(sandbox, a["Id"]))
    assert ids(MembershipNumbers=["A-1"], ActivityStates=["Active"]) == []
    assert ids(MembershipNumbers=["A-1"], ActivityStates=["Deleted"]) == [a["Id"]]
    assert ids(LoyaltyMembershipIds=[a["Id"]], ActivityStates=["Deleted"]) == [a["Id"]]


def test_getall_updated_utc_follows_updates(sandbox):
    _first, second = add(sandbox, 2)
    time.sleep(0.01)
    between = datetime.now(timezone.utc)
    time.sleep(0.01)
    ok(update(sandbox, {"LoyaltyMembershipId": second["Id"], "Points": {"Value": 3}}))
    since = {"StartUtc": between.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "EndUtc": None}
    assert [m["Id"] for m in get_all(sandbox, UpdatedUtc=since)] == [second["Id"]]
    assert get_all(sandbox, CreatedUtc=since) == []
    later = {"StartUtc": (between + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"), "EndUtc": None}
    assert get_all(sandbox, UpdatedUtc=later) == []


def test_getall_cursor_pages_a_program_without_gaps(sandbox):
    ids = [m["Id"] for m in add(sandbox, 25)]
    seen: list[str] = []
    cursor = None
    while True:
        body = {
            **AUTH,
            "LoyaltyProgramIds": [PROGRAM],
            "ActivityStates": ["Active"],
            "Limitation": {"Count": 10, "Cursor": cursor},
        }
        page = ok(post(sandbox, GET_ALL, body))
        seen += [m["Id"] for m in page["LoyaltyMemberships"]]
        if len(page["LoyaltyMemberships"]) < 10:
            break
        cursor = page["Cursor"]
    assert seen == ids


# -- rate budget, request log, faults, persistence --


def test_update_delete_and_getall_share_one_rate_budget_per_access_token(mews_sandbox):
    [m] = add(mews_sandbox)
    mews_sandbox.configure(rate_limit_requests=3, rate_limit_period_s=30)  # the add above counts
    ok(update(mews_sandbox, {"LoyaltyMembershipId": m["Id"], "Points": {"Value": 1}}))
    get_all(mews_sandbox)
    response = delete(mews_sandbox, m["Id"])
    refused(response, 429)
    assert int(response.headers["Retry-After"]) >= 1


def test_request_log_shows_what_each_write_sent(sandbox):
    [m] = add(sandbox)
    ok(update(sandbox, {"LoyaltyMembershipId": m["Id"], "Points": {"Value": 4}, "Url": None}))
    refused(update(sandbox, {"LoyaltyMembershipId": str(uuid.uuid4()), "Points": {"Value": 4}}))
    ok(delete(sandbox, m["Id"]))
    get_all(sandbox, LoyaltyMembershipIds=[m["Id"]], ActivityStates=["Deleted"])
    log = sandbox.request_log()
    assert [(e["operation"], e["status"]) for e in log] == [
        (ADD, 200),
        (UPDATE, 200),
        (UPDATE, 400),
        (DELETE, 200),
        (GET_ALL, 200),
    ]
    assert log[0]["items"] == 1
    assert log[1]["ChainId"] is None and log[1]["LoyaltyMembershipUpdates"] == [
        {"LoyaltyMembershipId": m["Id"], "Points": {"Value": 4}, "Url": None}
    ]
    assert log[3]["LoyaltyMembershipIds"] == [m["Id"]]
    assert log[4]["filters"] == {"LoyaltyMembershipIds": 1, "ActivityStates": ["Deleted"]}
    assert DEMO_ACCESS_TOKEN not in json.dumps(log)
    over_http = _http.get(f"{sandbox.url}/_sandbox/requests", timeout=10).json()
    assert over_http == log
    assert sandbox.request_log(UPDATE) == log[1:3]
    sandbox.configure(request_log_size=2)
    get_all(sandbox)
    assert [e["operation"] for e in sandbox.request_log()] == [GET_ALL, GET_ALL]


@pytest.mark.parametrize("operation", [UPDATE, DELETE])
def test_drops_before_and_after_storing_updates_and_deletes(sandbox, operation):
    first, second = add(sandbox, 2, Points=1)
    sandbox.configure(fault_operations={operation}, fault_script=["drop_before_store", "drop_after_store"])

    def send(m: dict[str, Any]) -> None:
        with pytest.raises(requests.ConnectionError):
            if operation == UPDATE:
                update(sandbox, {"LoyaltyMembershipId": m["Id"], "Points": {"Value": 2}})
            else:
                delete(sandbox, m["Id"])

    send(first)
    send(second)
    changed = [m["Id"] for m in sandbox.memberships() if m["Points"] == 2 or m["ActivityState"] == "Deleted"]
    assert changed == [second["Id"]]  # dropped before storing: not done; after: done
    log = sandbox.request_log(operation)
    assert [(e["status"], e["fault"]) for e in log] == [(0, "drop_before_store"), (0, "drop_after_store")]


def test_state_file_keeps_updates_and_deletes(tmp_path):
    state = str(tmp_path / "state.jsonl")
    with MewsSandbox(state_file=state) as sb:
        a, b = add(sb, 2, Points=1)
        ok(update(sb, {"LoyaltyMembershipId": a["Id"], "Points": {"Value": 9}}))
        ok(delete(sb, b["Id"]))
        before = sb.memberships()
    with MewsSandbox(state_file=state) as sb:
        assert sb.memberships() == before
        assert [m["Id"] for m in get_all(sb, ActivityStates=["Active"])] == [a["Id"]]
        assert get_all(sb, ActivityStates=["Active"])[0]["Points"] == 9
