"""The sandbox is faithful to the Mews contract: its request handling is checked against the
published JSON Schema (``data/loyalty-memberships.schema.json``, a copy of
``shared/mews-api/loyalty-memberships.schema.json``).

Requests the schema accepts get 200 and responses that validate against the response schema;
requests it rejects get 400 with a ``{Message, RequestId, Details}`` body and a ``Request-Id``
header. Hypothesis generates both kinds and checks that the sandbox and the schema agree.
Beyond the schema: tokens (401), the sliding window (429 + Retry-After), CreatedUtc filters,
cursors, and the state file across restarts.

Two things the JSON Schema copy cannot judge are kept out of the generated data: ``Url``
(format ``uri``) and ``ExpirationDate`` (a plain string in that copy, ``format: date`` in the
published OpenAPI description). The sandbox asserts both formats (and uuid, date-time); its
format checks are compared below with jsonschema's own (rfc3986-validator, rfc3339-validator). Numbers like ``1.0`` are integers for JSON Schema but not for Mews's .NET
parser, so generated integers are always written without a fraction.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ROOT, needs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN, MewsSandbox, SandboxConfig
from airflow_provider_mews.testing.sandbox import FORMAT_CHECKER as SANDBOX_FORMATS

SCHEMA = json.loads((Path(__file__).parents[1] / "data" / "loyalty-memberships.schema.json").read_text())
STATES = ["New", "Pending", "Enrolled", "Canceled", "Declined"]
INT32 = (-(2**31), 2**31 - 1)
AUTH = {"ClientToken": DEMO_CLIENT_TOKEN, "AccessToken": DEMO_ACCESS_TOKEN, "Client": "sandbox tests 1.0"}
ADD = "loyaltyMemberships/add"
GET_ALL = "loyaltyMemberships/getAll"
HYPOTHESIS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"#/$defs/{name}", "$defs": SCHEMA["$defs"]},
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


ADD_REQUEST = validator("MultipleLoyaltyMembershipAddParameters")
GETALL_REQUEST = validator("LoyaltyMembershipFilterParameters")
RESULT = validator("LoyaltyMembershipResult")
ERROR = validator("ConnectorApiExceptionResult")

_http = requests.Session()


def post(sandbox: MewsSandbox, operation: str, body: Any) -> requests.Response:
    return _http.post(
        f"{sandbox.url}/api/connector/v1/{operation}",
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )


def check_ok(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    uuid.UUID(response.headers["Request-Id"])
    body = response.json()
    RESULT.validate(body)
    return body


def check_error(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    ERROR.validate(body)
    assert body["Message"]
    assert body["RequestId"] == response.headers["Request-Id"]
    uuid.UUID(body["RequestId"])
    return body


@pytest.fixture
def sandbox(mews_sandbox: MewsSandbox) -> MewsSandbox:
    """The session sandbox without the 200 / 30 s window getting in the way of many requests."""
    mews_sandbox.configure(rate_limit_requests=1_000_000)
    return mews_sandbox


# -- generated data --

uuids = st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper())
int32 = st.integers(*INT32) | st.sampled_from(list(INT32))
short_text = st.text(max_size=20) | st.text(min_size=255, max_size=255)
valid_item = st.fixed_dictionaries(
    {"AccountId": uuids, "LoyaltyProgramId": uuids, "IsPrimary": st.booleans()},
    optional={
        "State": st.sampled_from([None, *STATES]),
        "Code": st.none() | short_text,
        "MembershipNumber": st.none() | short_text,
        "Points": st.none() | int32,
        "ExpirationDate": st.none()
        | st.dates(datetime(2000, 1, 1).date(), datetime(2100, 1, 1).date()).map(str),
        "Url": st.none() | st.sampled_from(["https://rewards.example.com/m/1", "http://x.example.org/?a=1"]),
        "LoyaltyTierId": st.none() | uuids,
    },
)
language = st.sampled_from([{}, {"LanguageCode": "en-US", "CultureCode": "en-US"}])
valid_add_body = st.builds(
    lambda items, chain, lang: {**AUTH, **lang, **chain, "LoyaltyMemberships": items},
    st.lists(valid_item, min_size=1, max_size=5),
    st.sampled_from([{}, {"ChainId": None}]) | uuids.map(lambda u: {"ChainId": u}),
    language,
)

BAD_UUIDS = [
    "not-a-uuid",
    "3fa85f6457174562b3fc2c963f66afa6",
    "3fa85f64-5717-4562-b3fc-2c963f66afa",
    "",
    42,
    None,
]
maybe_uuid = uuids | st.sampled_from(BAD_UUIDS)
any_item = st.fixed_dictionaries(
    {},
    optional={
        "AccountId": maybe_uuid,
        "LoyaltyProgramId": maybe_uuid,
        "IsPrimary": st.booleans() | st.sampled_from(["true", None, 1]),
        "State": st.sampled_from([None, *STATES, "Active", "enrolled", 3]),
        "Code": st.none() | short_text | st.text(min_size=256, max_size=256) | st.just(5),
        "MembershipNumber": st.none() | short_text | st.text(min_size=256, max_size=256),
        "Points": st.none() | int32 | st.sampled_from([2**31, -(2**31) - 1, 1.5, "5", True]),
        "LoyaltyTierId": st.none() | maybe_uuid,
        "Nickname": st.just("unknown field"),
    },
)
any_add_body = st.builds(
    lambda items, extra: {**AUTH, **extra, "LoyaltyMemberships": items},
    st.lists(any_item | st.sampled_from(["item", 7, None, []]), max_size=4)
    | st.sampled_from([None, {}, "x"]),
    st.sampled_from(
        [{}, {"ChainId": "chain"}, {"ChainId": 5}, {"Extra": 1}, {"Client": ""}, {"AccessToken": ""}]
    )
    | uuids.map(lambda u: {"ChainId": u}),
)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


interval = st.none() | st.builds(
    lambda start, days, has_start, has_end: {
        "StartUtc": iso(start) if has_start else None,
        "EndUtc": iso(start + timedelta(days=days)) if has_end else None,
    },
    st.datetimes(datetime(2020, 1, 1), datetime(2030, 1, 1)),
    st.integers(0, 90),
    st.booleans(),
    st.booleans(),
)
uuid_list = st.lists(uuids, min_size=1, max_size=3)
text_list = st.lists(st.text(max_size=10), min_size=1, max_size=3)
valid_getall_body = st.builds(
    lambda limitation, filters: {**AUTH, **filters, "Limitation": limitation},
    st.fixed_dictionaries({"Count": st.integers(1, 1000)}, optional={"Cursor": st.none() | uuids}),
    st.fixed_dictionaries(
        {},
        optional={
            "ChainIds": st.none() | uuid_list,
            "LoyaltyMembershipIds": st.none() | uuid_list,
            "AccountIds": st.none() | uuid_list,
            "LoyaltyProgramIds": st.none() | uuid_list,
            "MembershipStates": st.none() | st.lists(st.sampled_from(STATES), max_size=3),
            "ActivityStates": st.none() | st.lists(st.sampled_from(["Active", "Deleted"]), max_size=2),
            "Codes": st.none() | text_list,
            "MembershipNumbers": st.none() | text_list,
            "ProviderMembershipIds": st.none() | text_list,
            "CreatedUtc": interval,
            "UpdatedUtc": interval,
        },
    ),
)


def _set(path: str, value: Any) -> Any:
    """A mutation that sets ``path`` ("Key" or "Limitation.Count") in a getAll body, or drops it."""

    def mutate(body: dict[str, Any]) -> None:
        *parents, key = path.split(".")
        target = body
        for parent in parents:
            target = target[parent]
        if value is _DROP:
            target.pop(key, None)
        else:
            target[key] = value

    return mutate


_DROP = object()
REJECTED_GETALLS = {
    "no Limitation": _set("Limitation", _DROP),
    "Limitation null": _set("Limitation", None),
    "no Count": _set("Limitation.Count", _DROP),
    "Count 0": _set("Limitation.Count", 0),
    "Count 1001": _set("Limitation.Count", 1001),
    "Count string": _set("Limitation.Count", "5"),
    "Count boolean": _set("Limitation.Count", True),
    "Cursor not a uuid": _set("Limitation.Cursor", "not-a-uuid"),
    "unknown Limitation field": _set("Limitation.Offset", 3),
    "unknown field": _set("States", ["Enrolled"]),
    "empty AccountIds": _set("AccountIds", []),
    "1001 AccountIds": _set("AccountIds", [str(uuid.UUID(int=n)) for n in range(1001)]),
    "AccountIds not uuids": _set("AccountIds", ["nope"]),
    "AccountIds not a list": _set("AccountIds", "3fa85f64-5717-4562-b3fc-2c963f66afa6"),
    "LoyaltyProgramIds of numbers": _set("LoyaltyProgramIds", [5]),
    "ChainIds with null": _set("ChainIds", [None]),
    "bad MembershipStates": _set("MembershipStates", ["Gold"]),
    "MembershipStates not a list": _set("MembershipStates", "Enrolled"),
    "bad ActivityStates": _set("ActivityStates", ["Gone"]),
    "Codes of numbers": _set("Codes", [1]),
    "Codes of lists": _set("Codes", [["a"]]),
    "empty MembershipNumbers": _set("MembershipNumbers", []),
    "ProviderMembershipIds of objects": _set("ProviderMembershipIds", [{"a": 1}]),
    "CreatedUtc unknown key": _set("CreatedUtc", {"Start": "2026-01-01T00:00:00Z"}),
    "CreatedUtc a string": _set("CreatedUtc", "2026-01-01T00:00:00Z"),
    "UpdatedUtc unknown key": _set("UpdatedUtc", {"End": "2026-01-01T00:00:00Z"}),
    "UpdatedUtc a number": _set("UpdatedUtc", 5),
    "missing AccessToken": _set("AccessToken", _DROP),
}
VALID_GETALL_CHANGES = {
    "empty MembershipStates": _set("MembershipStates", []),
    "null filters": _set("AccountIds", None),
    "null Cursor": _set("Limitation.Cursor", None),
    "empty interval": _set("UpdatedUtc", {}),
    "null interval": _set("CreatedUtc", None),
}
GETALL_CHANGES = {**REJECTED_GETALLS, **VALID_GETALL_CHANGES}


def _changed(body: dict[str, Any], names: list[str]) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    body.setdefault("Limitation", {"Count": 10})
    for name in names:
        with contextlib.suppress(KeyError, TypeError):  # e.g. "Count 0" after "no Limitation"
            GETALL_CHANGES[name](body)
    return body


any_getall_body = st.builds(
    _changed, valid_getall_body, st.lists(st.sampled_from(sorted(GETALL_CHANGES)), max_size=2)
)

# -- add --


@HYPOTHESIS
@given(body=valid_add_body)
def test_add_requests_the_schema_accepts_get_200(sandbox, body):
    ADD_REQUEST.validate(body)
    answer = check_ok(post(sandbox, ADD, body))
    created = answer["LoyaltyMemberships"]
    assert len(created) == len(body["LoyaltyMemberships"])
    for sent, got in zip(body["LoyaltyMemberships"], created, strict=True):
        assert got["AccountId"] == sent["AccountId"] and got["LoyaltyProgramId"] == sent["LoyaltyProgramId"]
        assert got["IsPrimary"] is sent["IsPrimary"]
        assert got["State"] == (sent.get("State") or "Enrolled")
        assert got["Points"] == sent.get("Points")
        assert got["ActivityState"] == "Active"
        if body.get("ChainId"):
            assert got["ChainId"] == body["ChainId"]


@HYPOTHESIS
@given(body=any_add_body)
def test_add_sandbox_and_schema_agree(sandbox, body):
    before = sandbox.stats()["stored"]
    response = post(sandbox, ADD, body)
    if ADD_REQUEST.is_valid(body):
        check_ok(response)
    else:
        check_error(response, 400)
        assert sandbox.stats()["stored"] == before


def base_add() -> dict[str, Any]:
    item = {
        "AccountId": str(uuid.uuid4()),
        "LoyaltyProgramId": str(uuid.uuid4()),
        "IsPrimary": True,
        "State": "Pending",
        "Code": "MBR-1",
        "Points": 10,
    }
    return {**AUTH, "LoyaltyMemberships": [item]}


def _item(**changes: Any) -> Any:
    def mutate(body: dict[str, Any]) -> None:
        item = body["LoyaltyMemberships"][0]
        for key, value in changes.items():
            if value is _DROP:
                del item[key]
            else:
                item[key] = value

    return mutate


REJECTED_ADDS = {
    "unknown item field": _item(Nickname="x"),
    "unknown top-level field": lambda b: b.update(Extra=1),
    "missing AccountId": _item(AccountId=_DROP),
    "missing LoyaltyProgramId": _item(LoyaltyProgramId=_DROP),
    "missing IsPrimary": _item(IsPrimary=_DROP),
    "missing LoyaltyMemberships": lambda b: b.pop("LoyaltyMemberships"),
    "missing Client": lambda b: b.pop("Client"),
    "empty AccessToken": lambda b: b.update(AccessToken=""),
    "0 items": lambda b: b.update(LoyaltyMemberships=[]),
    "1001 items": lambda b: b.update(LoyaltyMemberships=b["LoyaltyMemberships"] * 1001),
    "bad uuid": _item(AccountId="3fa85f64-5717-4562-b3fc"),
    "bad LoyaltyTierId": _item(LoyaltyTierId="gold"),
    "bad ChainId": lambda b: b.update(ChainId="chain-1"),
    "Points above int32": _item(Points=2**31),
    "Points below int32": _item(Points=-(2**31) - 1),
    "Points fraction": _item(Points=1.5),
    "Points string": _item(Points="5"),
    "Code of 256": _item(Code="x" * 256),
    "MembershipNumber of 256": _item(MembershipNumber="x" * 256),
    "Code number": _item(Code=5),
    "bad State": _item(State="Active"),
    "State wrong case": _item(State="enrolled"),
    "IsPrimary string": _item(IsPrimary="true"),
    "IsPrimary null": _item(IsPrimary=None),
    "item not an object": lambda b: b.update(LoyaltyMemberships=["x"]),
    "items not a list": lambda b: b.update(LoyaltyMemberships={"a": 1}),
}


@pytest.mark.parametrize("mutation", list(REJECTED_ADDS), ids=list(REJECTED_ADDS))
def test_add_requests_the_schema_rejects_get_400(mutation, sandbox):
    body = base_add()
    assert ADD_REQUEST.is_valid(body)
    REJECTED_ADDS[mutation](body)
    assert not ADD_REQUEST.is_valid(body)
    check_error(post(sandbox, ADD, body), 400)
    assert sandbox.stats()["stored"] == 0


def test_add_1000_items_edges_and_non_json_body(sandbox):
    body = base_add()
    item = body["LoyaltyMemberships"][0]
    edge = {**item, "Points": INT32[0], "Code": "x" * 255, "MembershipNumber": None, "State": None}
    body["LoyaltyMemberships"] = [dict(edge, AccountId=str(uuid.uuid4())) for _ in range(1000)]
    assert ADD_REQUEST.is_valid(body)
    assert len(check_ok(post(sandbox, ADD, body))["LoyaltyMemberships"]) == 1000
    assert sandbox.stats()["stored"] == 1000

    raw = _http.post(f"{sandbox.url}/api/connector/v1/{ADD}", data=b"{not json", timeout=30)
    assert "not valid JSON" in check_error(raw, 400)["Message"]
    lonely = {**base_add(), "LanguageCode": "en-US"}
    assert "together" in check_error(post(sandbox, ADD, lonely), 400)["Message"]


def test_add_403_business_rule_names_the_items(sandbox):
    body = base_add()
    body["LoyaltyMemberships"].append({**body["LoyaltyMemberships"][0], "AccountId": str(uuid.uuid4())})
    sandbox.configure(forbidden_accounts={body["LoyaltyMemberships"][1]["AccountId"]})
    error = check_error(post(sandbox, ADD, body), 403)
    assert error["Details"] == {"LoyaltyMembershipIndexes": [1]}
    assert sandbox.stats()["stored"] == 0


# -- getAll --


@HYPOTHESIS
@given(body=valid_getall_body)
def test_getall_requests_the_schema_accepts_get_200(sandbox, body):
    GETALL_REQUEST.validate(body)
    check_ok(post(sandbox, GET_ALL, body))


@HYPOTHESIS
@given(body=any_getall_body)
def test_getall_sandbox_and_schema_agree(sandbox, body):
    response = post(sandbox, GET_ALL, body)
    if GETALL_REQUEST.is_valid(body):
        check_ok(response)
    else:
        check_error(response, 400)


@pytest.mark.parametrize("change", list(REJECTED_GETALLS), ids=list(REJECTED_GETALLS))
def test_getall_requests_the_schema_rejects_get_400(change, sandbox):
    body = {**AUTH, "Limitation": {"Count": 10, "Cursor": None}}
    assert GETALL_REQUEST.is_valid(body)
    REJECTED_GETALLS[change](body)
    assert not GETALL_REQUEST.is_valid(body)
    check_error(post(sandbox, GET_ALL, body), 400)


@pytest.mark.parametrize("change", list(VALID_GETALL_CHANGES), ids=list(VALID_GETALL_CHANGES))
def test_getall_edge_requests_the_schema_accepts_get_200(change, sandbox):
    body = {**AUTH, "Limitation": {"Count": 10, "Cursor": None}}
    VALID_GETALL_CHANGES[change](body)
    GETALL_REQUEST.validate(body)
    check_ok(post(sandbox, GET_ALL, body))


def test_getall_pages_follow_the_cursor_and_validate(sandbox):
    created = check_ok(
        post(
            sandbox,
            ADD,
            {**AUTH, "LoyaltyMemberships": [base_add()["LoyaltyMemberships"][0] for _ in range(5)]},
        )
    )
    ids = [m["Id"] for m in created["LoyaltyMemberships"]]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = check_ok(post(sandbox, GET_ALL, {**AUTH, "Limitation": {"Count": 2, "Cursor": cursor}}))
        pages += 1
        seen += [m["Id"] for m in page["LoyaltyMemberships"]]
        if len(page["LoyaltyMemberships"]) < 2:
            break
        cursor = page["Cursor"]
        assert cursor == seen[-1]
    assert seen == ids and pages == 3


def test_getall_created_utc_filter(sandbox):
    first = check_ok(post(sandbox, ADD, base_add()))["LoyaltyMemberships"]
    between = datetime.now(timezone.utc)
    time.sleep(0.01)
    second = check_ok(post(sandbox, ADD, base_add()))["LoyaltyMemberships"]

    def ids(start: datetime | None, end: datetime | None) -> list[str]:
        body = {
            **AUTH,
            "CreatedUtc": {"StartUtc": start and iso(start), "EndUtc": end and iso(end)},
            "Limitation": {"Count": 10},
        }
        return [m["Id"] for m in check_ok(post(sandbox, GET_ALL, body))["LoyaltyMemberships"]]

    assert ids(between, None) == [second[0]["Id"]]
    assert ids(None, between) == [first[0]["Id"]]
    assert ids(between - timedelta(hours=1), between + timedelta(hours=1)) == [
        first[0]["Id"],
        second[0]["Id"],
    ]
    assert ids(between + timedelta(hours=1), None) == []
    # NOTES.md: an interval is at most 3 months.
    too_long = {
        **AUTH,
        "CreatedUtc": {"StartUtc": iso(between - timedelta(days=100)), "EndUtc": iso(between)},
        "Limitation": {"Count": 10},
    }
    assert GETALL_REQUEST.is_valid(too_long)
    assert "3 months" in check_error(post(sandbox, GET_ALL, too_long), 400)["Message"]


# -- tokens, rate limit, errors of the transport --


@pytest.mark.parametrize(
    "auth",
    [
        {"AccessToken": "WRONG" + DEMO_ACCESS_TOKEN[5:]},
        {"ClientToken": "WRONG" + DEMO_CLIENT_TOKEN[5:]},
        {"ClientToken": DEMO_ACCESS_TOKEN, "AccessToken": DEMO_CLIENT_TOKEN},
    ],
    ids=["wrong access token", "wrong client token", "swapped"],
)
@pytest.mark.parametrize("operation", [ADD, GET_ALL, "configuration/get"])
def test_bad_tokens_get_401(auth, operation, sandbox):
    body = {**base_add(), **auth} if operation == ADD else {**AUTH, **auth, "Limitation": {"Count": 1}}
    if operation == "configuration/get":
        body.pop("Limitation")
    assert "Invalid ClientToken or AccessToken" in check_error(post(sandbox, operation, body), 401)["Message"]
    assert sandbox.stats()["stored"] == 0


def test_tokens_are_checked_per_pair(sandbox):
    other_client, other_access = "OTHERCLIENT" + uuid.uuid4().hex, "OTHERACCESS" + uuid.uuid4().hex
    sandbox.add_tokens(other_client, other_access)
    check_ok(post(sandbox, ADD, {**base_add(), "ClientToken": other_client, "AccessToken": other_access}))
    check_error(post(sandbox, ADD, {**base_add(), "ClientToken": other_client}), 401)


def test_429_with_retry_after_from_a_sliding_window_per_access_token(mews_sandbox):
    other_client, other_access = "RATECLIENT" + uuid.uuid4().hex, "RATEACCESS" + uuid.uuid4().hex
    mews_sandbox.add_tokens(other_client, other_access)
    control = {"rate_limit_requests": 3, "rate_limit_period_s": 1.0}
    assert _http.post(f"{mews_sandbox.url}/_sandbox/config", json=control, timeout=10).json() == {"ok": True}
    for _ in range(3):
        check_ok(post(mews_sandbox, ADD, base_add()))
    limited = post(mews_sandbox, ADD, base_add())
    check_error(limited, 429)
    assert limited.headers["Retry-After"] == "1"
    # Another AccessToken has its own window.
    check_ok(
        post(mews_sandbox, ADD, {**base_add(), "ClientToken": other_client, "AccessToken": other_access})
    )
    time.sleep(float(limited.headers["Retry-After"]))
    check_ok(post(mews_sandbox, ADD, base_add()))
    stats = _http.get(f"{mews_sandbox.url}/_sandbox/stats", timeout=10).json()
    assert stats["429"] == 1 and stats["stored"] == 5


def test_every_answer_has_a_request_id(sandbox):
    unknown = post(sandbox, "loyaltyMemberships/merge", base_add())
    assert check_error(unknown, 404)["Message"] == "Not found."
    config = post(sandbox, "configuration/get", AUTH)
    assert config.status_code == 200 and config.json()["Enterprise"]["Name"]
    uuid.UUID(config.headers["Request-Id"])
    ids = {post(sandbox, ADD, base_add()).headers["Request-Id"] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize("fault", ["500", "503", "408", "409"])
def test_status_faults_answer_like_mews(fault, sandbox):
    sandbox.configure(fault_script=[fault])
    check_error(post(sandbox, ADD, base_add()), int(fault))
    assert sandbox.stats()["stored"] == 0
    check_ok(post(sandbox, ADD, base_add()))


def test_faults_of_the_transport(sandbox):
    sandbox.configure(fault_script=["502html", "drop_after_store", "drop_before_store"])
    proxy = post(sandbox, ADD, base_add())
    assert proxy.status_code == 502 and proxy.headers["Content-Type"] == "text/html"
    assert "Request-Id" not in proxy.headers
    with pytest.raises(requests.ConnectionError):
        post(sandbox, ADD, base_add())
    assert sandbox.stats()["stored"] == 1
    with pytest.raises(requests.ConnectionError):
        post(sandbox, ADD, base_add())
    assert sandbox.stats()["stored"] == 1


# -- state file --


def start_sandbox(state_file: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_mews.testing.sandbox",
            "--port",
            "0",
            "--state-file",
            str(state_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    assert line.startswith("Mews sandbox listening on "), line
    return proc, line.split()[-1]


def stop_sandbox(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(timeout=10)
    if proc.stdout:
        proc.stdout.close()


def test_state_file_persists_memberships_across_restarts(tmp_path):
    state = tmp_path / "sandbox-state.jsonl"
    proc, url = start_sandbox(state)
    try:
        sent = base_add()
        sent["LoyaltyMemberships"] *= 3
        created = requests.post(f"{url}/api/connector/v1/{ADD}", json=sent, timeout=30).json()
        before = datetime.now(timezone.utc) + timedelta(seconds=1)
    finally:
        stop_sandbox(proc)

    proc, url = start_sandbox(state)
    try:
        assert requests.get(f"{url}/_sandbox/memberships", timeout=10).json() == created["LoyaltyMemberships"]
        body = {**AUTH, "CreatedUtc": {"StartUtc": None, "EndUtc": iso(before)}, "Limitation": {"Count": 10}}
        page = requests.post(f"{url}/api/connector/v1/{GET_ALL}", json=body, timeout=30).json()
        assert page["LoyaltyMemberships"] == created["LoyaltyMemberships"]
        assert requests.post(f"{url}/_sandbox/reset", timeout=10).json() == {"ok": True}
    finally:
        stop_sandbox(proc)
    proc, url = start_sandbox(state)
    try:
        assert requests.get(f"{url}/_sandbox/memberships", timeout=10).json() == []
    finally:
        stop_sandbox(proc)


def test_reset_returns_to_the_start_up_settings():
    """``/_sandbox/reset`` empties the sandbox and undoes ``/_sandbox/config``, but keeps what it was
    started with (the command line's --rate-limit, --latency, ...)."""
    with MewsSandbox(config=SandboxConfig(rate_limit_requests=2, forbidden_accounts={"x"})) as sb:
        assert _http.post(f"{sb.url}/_sandbox/config", json={"rate_limit_requests": 50}, timeout=10).ok
        check_ok(post(sb, ADD, base_add()))
        assert _http.post(f"{sb.url}/_sandbox/reset", timeout=10).json() == {"ok": True}
        assert sb.stats() == {"stored": 0}
        assert sb.config.rate_limit_requests == 2 and sb.config.forbidden_accounts == {"x"}
        check_ok(post(sb, ADD, base_add()))
        check_ok(post(sb, ADD, base_add()))
        check_error(post(sb, ADD, base_add()), 429)


CONTRACT_COPIES = (
    "loyalty-memberships.schema.json",
    "loyalty-memberships-update-delete.schema.json",
    "add-loyalty-memberships.seed.txt",
)


@pytest.mark.parametrize("name", CONTRACT_COPIES)
def test_contract_copies_match_the_shared_contract(name):
    """tests/data holds copies so that any clone can test; beside the maintainers' checkout (and in
    CI) they must stay identical to the contract in ../shared/mews-api/."""
    shared_dir = Path(os.environ.get("MEWS_API_CONTRACT_DIR", ROOT.parent / "shared" / "mews-api"))
    if not shared_dir.is_dir():
        needs(
            "the API contract folder ../shared/mews-api",
            f"only the maintainers' layout has it (or set MEWS_API_CONTRACT_DIR); {shared_dir} is absent",
        )
    copy = Path(__file__).parents[1] / "data" / name
    assert copy.read_bytes() == (shared_dir / name).read_bytes(), (
        f"tests/data/{name} differs from {shared_dir}"
    )


# -- format assertions (the sandbox's own checks, compared with jsonschema's) --

FORMAT_SAMPLES = {
    "date": ["2029-12-24", "2000-02-29", "2029-12-24T00:00:00Z", "2029-02-30", "2029-1-2", "20291224",
             "2029-12-24 ", "", "2029-13-01"],
    "date-time": ["2026-01-01T00:00:00Z", "2026-01-01T10:30:00.123456+02:00", "2026-01-01t10:30:00z",
                  "2026-01-01", "2026-01-01T10:30:00", "2026-01-01 10:30:00Z", "2026-02-30T00:00:00Z",
                  "2026-01-01T25:00:00Z"],
    "uri": ["https://rewards.example.com/m/1?a=1#top", "http://x.example.org/?a=1", "https://[::1]:8080/x",
            "https://h/%C3%A9", "https://exa mple.com", "https://h/\u00e9", "https://h/%zz", "no-scheme.example.com",
            "https://h/<x>", "https://h/a#b#c"],
    "uuid": ["3fa85f64-5717-4562-b3fc-2c963f66afa6", "3FA85F64-5717-4562-B3FC-2C963F66AFA6",
             "3fa85f6457174562b3fc2c963f66afa6", "3fa85f64-5717-4562-b3fc-2c963f66afa", "not-a-uuid"],
}  # fmt: skip


def test_jsonschema_format_checks_are_really_on():
    """Without rfc3339-validator and rfc3986-validator, jsonschema passes every date-time and uri."""
    checker = FormatChecker()
    assert {"date", "date-time", "uri", "uuid"} <= set(checker.checkers), sorted(checker.checkers)
    assert not checker.conforms("not a date-time", "date-time")
    assert not checker.conforms("not a uri", "uri")


@pytest.mark.parametrize("fmt", sorted(FORMAT_SAMPLES))
def test_sandbox_formats_agree_with_jsonschema(fmt):
    standard = FormatChecker()
    for value in FORMAT_SAMPLES[fmt]:
        expected = standard.conforms(value, fmt)
        if fmt == "uri" and expected:  # Mews's Url is a URL: the sandbox also wants "scheme://host"
            expected = "://" in value
        assert SANDBOX_FORMATS.conforms(value, fmt) == expected, (fmt, value)
    assert any(SANDBOX_FORMATS.conforms(v, fmt) for v in FORMAT_SAMPLES[fmt])
    assert not all(SANDBOX_FORMATS.conforms(v, fmt) for v in FORMAT_SAMPLES[fmt])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ExpirationDate", "2029-12-24T00:00:00Z"),  # a date-time where the schema says format: date
        ("ExpirationDate", "2029-02-30"),
        ("Url", "https://rewards.example.com/m 1"),
        ("Url", "rewards.example.com/m/1"),
        ("LoyaltyTierId", "3fa85f6457174562b3fc2c963f66afa6"),
    ],
)
def test_add_refuses_values_out_of_format(sandbox, field, value):
    item = {**base_add()["LoyaltyMemberships"][0], field: value}
    body = check_error(post(sandbox, ADD, {**AUTH, "LoyaltyMemberships": [item]}), 400)
    assert f"LoyaltyMemberships[0].{field}" in body["Message"]


def test_add_answers_the_expiration_date_as_mews_does(sandbox):
    """Sent as format date, answered as the response schema's date-time (UTC midnight)."""
    item = {**base_add()["LoyaltyMemberships"][0], "ExpirationDate": "2029-12-24"}
    (created,) = check_ok(post(sandbox, ADD, {**AUTH, "LoyaltyMemberships": [item]}))["LoyaltyMemberships"]
    assert created["ExpirationDate"] == "2029-12-24T00:00:00Z"


@pytest.mark.parametrize("start", ["2026-01-01", "2026-01-01T00:00:00", "yesterday"])
def test_getall_refuses_times_out_of_format(sandbox, start):
    body = {**AUTH, "CreatedUtc": {"StartUtc": start, "EndUtc": None}, "Limitation": {"Count": 10}}
    assert "CreatedUtc.StartUtc" in check_error(post(sandbox, GET_ALL, body), 400)["Message"]


def test_request_log_records_when_each_api_request_arrived_and_was_answered():
    """``/_sandbox/timings`` is what benchmarks time a whole run by: one record per API request
    (not the admin endpoints), in answer order, with its status; reset empties it."""
    with MewsSandbox(config=SandboxConfig(rate_limit_requests=1, add_latency_s=200.0)) as sb:
        before = time.time()
        check_ok(post(sb, ADD, base_add()))  # 1 item at 200 s per 1000: answered after 0.2 s
        check_error(post(sb, GET_ALL, {**AUTH, "Limitation": {"Count": 10}}), 429)
        assert _http.get(f"{sb.url}/_sandbox/stats", timeout=10).ok
        log = _http.get(f"{sb.url}/_sandbox/timings", timeout=10).json()
        assert [(r["operation"], r["status"]) for r in log] == [(ADD, 200), (GET_ALL, 429)]
        assert before <= log[0]["arrived"] and log[0]["answered"] - log[0]["arrived"] >= 0.2
        assert log[0]["answered"] <= log[1]["arrived"] <= log[1]["answered"] <= time.time()
        assert _http.post(f"{sb.url}/_sandbox/reset", timeout=10).ok
        assert _http.get(f"{sb.url}/_sandbox/timings", timeout=10).json() == []


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("500", "'500' needs a rate: NAME=RATE, e.g. 500=0.1"),
        ("bogus=0.5", "unknown fault 'bogus'; names: 500,"),
        ("503=1.5", "the rate of 503 must be within 0..1"),
    ],
)
def test_a_malformed_fault_option_is_one_usage_error(fault, message, capsys):
    from airflow_provider_mews.testing.sandbox import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--port", "0", "--fault", fault])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
