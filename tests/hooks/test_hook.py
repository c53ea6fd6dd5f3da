"""MewsConnectorHook against the sandbox over real HTTP: every status path, retries, pagination, limiter.

Most tests give the connection a very loose client-side rate limit so that the process-wide
limiter of the demo AccessToken (200 / 30 s, shared with every other test of the session)
never slows them down; the limiter tests set their own limits.
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from airflow_provider_mews.exceptions import (
    MewsAuthenticationError,
    MewsBadRequestError,
    MewsConfigurationError,
    MewsConflictError,
    MewsConnectionError,
    MewsError,
    MewsForbiddenError,
    MewsNotFoundError,
    MewsRateLimitError,
    MewsRequestTimeoutError,
    MewsResponseError,
    MewsServerError,
)
from airflow_provider_mews.hooks.mews import MewsConnectorHook, parse_retry_after
from airflow_provider_mews.rate_limit import limiter_for
from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN, MewsSandbox, connection_json

ADD = "loyaltyMemberships/add"
GET_ALL = "loyaltyMemberships/getAll"
CONFIG = "configuration/get"
PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
LOOSE = {"rate_limit_requests": 100_000, "rate_limit_period": 1}
#: The limiter is process-wide per (AccessToken, limits), and a 429 pauses it for every user of
#: the token. A distinct limit per connection keeps one test's pause out of the next test.
_limits = itertools.count(100_000)


def items(count: int, prefix: str = "C") -> list[dict[str, Any]]:
    """``count`` valid add items with distinct codes."""
    return [
        {
            "AccountId": str(uuid.uuid4()),
            "LoyaltyProgramId": PROGRAM,
            "IsPrimary": True,
            "Code": f"{prefix}-{n:04d}",
        }
        for n in range(count)
    ]


def requests_to(sandbox: MewsSandbox, operation: str) -> int:
    return sandbox.stats().get(f"requests:{operation}", 0)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def connect(mews_sandbox: MewsSandbox, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """``connect(conn_id="mews_default", url=None, **kw)`` defines an env-var connection to the sandbox."""

    def _connect(conn_id: str = "mews_default", url: str | None = None, **kwargs: Any) -> str:
        extra = {**LOOSE, "rate_limit_requests": next(_limits), **kwargs}
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}", connection_json(url or mews_sandbox.url, **extra)
        )
        return conn_id

    return _connect


@pytest.fixture
def make_hook(connect: Callable[..., str]) -> Iterator[Callable[..., MewsConnectorHook]]:
    """``make_hook(conn=None, **hook_kwargs)``: a hook with fast backoff on a sandbox connection."""
    hooks: list[MewsConnectorHook] = []

    def _make(conn: dict[str, Any] | None = None, **kwargs: Any) -> MewsConnectorHook:
        conn_id = connect(**(conn or {}))
        kwargs.setdefault("backoff_base_s", 0.01)
        kwargs.setdefault("backoff_max_s", 0.05)
        hook = MewsConnectorHook(conn_id, **kwargs)
        hooks.append(hook)
        return hook

    yield _make
    for hook in hooks:
        hook.close()


def check_error_text(exc: MewsError, status: int | None, message: str) -> None:
    """The text names the status, Mews's Message and the RequestId, and no token."""
    text = str(exc)
    assert exc.status == status
    assert message in exc.message and message in text
    if exc.request_id is not None:
        uuid.UUID(exc.request_id)
    assert f"RequestId={exc.request_id or 'none'}" in text
    if status is not None:
        assert f"HTTP {status}" in text
    for token in (DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN):
        assert token not in text and token not in repr(exc) and token not in repr(exc.args)


# -- 200 --


def test_call_200_sends_auth_fields_and_decodes(make_hook, mews_sandbox):
    answer = make_hook().call(CONFIG)
    assert answer["Enterprise"]["Name"] == "Mews Sandbox Hotel"
    assert requests_to(mews_sandbox, CONFIG) == 1


def test_add_200_returns_created_memberships_in_order(make_hook, mews_sandbox):
    batch = items(5)
    created = make_hook().add_loyalty_memberships(batch)
    assert [m["Code"] for m in created] == [b["Code"] for b in batch]
    assert all(uuid.UUID(m["Id"]) for m in created)
    assert [m["Id"] for m in mews_sandbox.memberships()] == [m["Id"] for m in created]
    assert requests_to(mews_sandbox, ADD) == 1


def test_add_sends_chain_id_from_argument_and_connection(make_hook, mews_sandbox):
    chain = "0c8a4f42-5f5b-4f55-9a8f-8ef5d3ad5b11"
    other = "6d2f5a54-7f2c-4e5d-8b22-0a0e2b7c1f33"
    hook = make_hook(conn={"chain_id": chain})
    assert hook.add_loyalty_memberships(items(1))[0]["ChainId"] == chain
    assert hook.add_loyalty_memberships(items(1), chain_id=other)[0]["ChainId"] == other


# -- 4xx: not retried, plain messages --


def test_400_is_not_retried_and_names_the_field(make_hook, mews_sandbox):
    hook = make_hook()
    batch = items(2)
    batch[1]["AccountId"] = "not-a-uuid"
    with pytest.raises(MewsBadRequestError) as info:
        hook.add_loyalty_memberships(batch)
    check_error_text(info.value, 400, "Invalid LoyaltyMemberships[1].AccountId")
    assert info.value.may_have_been_processed is False
    assert "Fix the request data" in str(info.value)
    assert requests_to(mews_sandbox, ADD) == 1
    assert mews_sandbox.stats()["stored"] == 0

    with pytest.raises(MewsBadRequestError) as info:
        list(hook.get_loyalty_memberships(membership_states=["Gold"]))
    check_error_text(info.value, 400, "Invalid MembershipStates")
    assert requests_to(mews_sandbox, GET_ALL) == 1


def test_401_wrong_token_is_not_retried(make_hook, mews_sandbox):
    wrong = "WRONG0ACCESS0TOKEN-1234567890ABCDEF"
    hook = make_hook(conn={"access_token": wrong})
    with pytest.raises(MewsAuthenticationError) as info:
        hook.call(CONFIG)
    check_error_text(info.value, 401, "Invalid ClientToken or AccessToken")
    assert wrong not in str(info.value)
    assert "AccessToken (password) and extra.client_token" in str(info.value)
    assert info.value.conn_id == hook.mews_conn_id
    assert f"Airflow connection: '{hook.mews_conn_id}'." in str(info.value)
    assert requests_to(mews_sandbox, CONFIG) == 1
    with pytest.raises(MewsAuthenticationError) as info:
        hook.add_loyalty_memberships(items(1))
    assert info.value.may_have_been_processed is False
    assert requests_to(mews_sandbox, ADD) == 1


def test_403_business_rule_is_not_retried(make_hook, mews_sandbox):
    batch = items(3)
    mews_sandbox.configure(forbidden_accounts={batch[1]["AccountId"]})
    with pytest.raises(MewsForbiddenError) as info:
        make_hook().add_loyalty_memberships(batch)
    check_error_text(info.value, 403, f"The customer account {batch[1]['AccountId']} cannot be enrolled")
    assert info.value.details == {"LoyaltyMembershipIndexes": [1]}
    assert info.value.may_have_been_processed is False
    assert requests_to(mews_sandbox, ADD) == 1
    assert mews_sandbox.stats()["stored"] == 0


def test_404_wrong_address_is_not_retried(make_hook, mews_sandbox):
    with pytest.raises(MewsNotFoundError) as info:
        make_hook().call("loyaltyMembership/add", {"LoyaltyMemberships": items(1)})
    check_error_text(info.value, 404, "Not found.")
    assert "Check the connection's host" in str(info.value)
    assert requests_to(mews_sandbox, "loyaltyMembership/add") == 1


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("{url}/api/connector/v1", "must be the platform address only"),
        ("{url}/", "must be the platform address only"),
        ("", "host (Platform address) is empty"),
        ("127.0.0.1:1", "must start with https://"),
    ],
)
def test_wrong_host_is_refused_before_sending(host, expected, mews_sandbox, monkeypatch):
    value = connection_json(host.format(url=mews_sandbox.url), **LOOSE)
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_BADHOST", value)
    hook = MewsConnectorHook("mews_badhost")
    with pytest.raises(MewsConfigurationError) as info:
        hook.call(CONFIG)
    assert expected in str(info.value) and "mews_badhost" in str(info.value)
    assert mews_sandbox.stats() == {"stored": 0}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"client_token": ""}, "extra.client_token (Client token) is missing"),
        ({"chain_id": "chain-1"}, "extra.chain_id must be a UUID"),
        ({"timeout": "-3"}, "extra.timeout must be a positive number"),
        ({"rate_limit_requests": "lots"}, "extra.rate_limit_requests must be a positive number"),
    ],
)
def test_invalid_connection_fields_are_refused_before_sending(extra, expected, connect, mews_sandbox):
    token = extra.pop("client_token", DEMO_CLIENT_TOKEN)
    hook = MewsConnectorHook(connect(client_token=token, **extra))
    with pytest.raises(MewsConfigurationError, match=re.escape(expected)):
        hook.call(CONFIG)
    assert mews_sandbox.stats() == {"stored": 0}


def test_408_add_raises_as_maybe_processed_getall_retries(make_hook, mews_sandbox):
    hook = make_hook()
    mews_sandbox.configure(fault_script=["408"])
    with pytest.raises(MewsRequestTimeoutError) as info:
        hook.add_loyalty_memberships(items(2))
    check_error_text(info.value, 408, "Sandbox fault 408.")
    assert info.value.may_have_been_processed is True
    assert "send smaller batches" in str(info.value)
    assert requests_to(mews_sandbox, ADD) == 1

    mews_sandbox.configure(fault_operations={GET_ALL}, fault_script=["408"])
    assert list(hook.get_loyalty_memberships()) == []
    assert requests_to(mews_sandbox, GET_ALL) == 2
    assert mews_sandbox.stats()["fault:408"] == 2


def test_409_conflict_is_not_retried(make_hook, mews_sandbox):
    mews_sandbox.configure(fault_script=["409", "409"])
    with pytest.raises(MewsConflictError) as info:
        make_hook().add_loyalty_memberships(items(2))
    check_error_text(info.value, 409, "Sandbox fault 409.")
    assert info.value.may_have_been_processed is False
    assert "the hook does not repeat the request, the task's retry reads and resubmits" in str(info.value)
    assert requests_to(mews_sandbox, ADD) == 1
    assert mews_sandbox.stats()["stored"] == 0


# -- 429 and Retry-After --


def test_429_from_sliding_window_waits_retry_after_seconds(make_hook, mews_sandbox):
    """Sandbox window of 1 request per 1 s: the second call meets 429 + Retry-After: 1. A hook that
    waits that long gets through on its next try; one that retries sooner meets more 429s."""
    mews_sandbox.configure(rate_limit_requests=1, rate_limit_period_s=1.0)
    hook = make_hook()
    hook.call(CONFIG)
    assert hook.call(CONFIG)["Enterprise"]["Name"] == "Mews Sandbox Hotel"
    stats = mews_sandbox.stats()
    assert stats["429"] == 1
    assert stats[f"requests:{CONFIG}"] == 3
    assert hook.stats.rate_limited == 1 and hook.stats.rate_limit_wait_s == 1.0


@pytest.mark.parametrize("fault", ["429:1", "429date:2"])
def test_429_on_add_is_resent_after_retry_after(fault, make_hook, mews_sandbox):
    """429 (seconds or HTTP date) means surely not processed, so even an add is re-sent, once the
    wait is over. The sandbox window (1 request / 1 s) answers 429 again if the hook comes back
    less than a second later; no such 429 is seen."""
    mews_sandbox.configure(fault_script=[fault], rate_limit_requests=1, rate_limit_period_s=1.0)
    hook = make_hook()
    created = hook.add_loyalty_memberships(items(4))
    stats = mews_sandbox.stats()
    assert stats[f"fault:{fault.split(':')[0]}"] == 1
    assert stats.get("429", 0) == 0
    assert stats[f"requests:{ADD}"] == 2
    assert stats["stored"] == 4 and len(created) == 4
    assert hook.stats.rate_limited == 1
    assert 0.5 <= hook.stats.rate_limit_wait_s <= 2.0


def test_retry_after_http_date_parsing():
    now = 1_700_000_000.0
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now=now) == 20.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_retry_after_is_capped_by_max_retry_after(make_hook, mews_sandbox):
    mews_sandbox.configure(fault_script=["429:30"])
    hook = make_hook(max_retry_after_s=0.2)
    assert len(hook.add_loyalty_memberships(items(1))) == 1
    assert hook.stats.rate_limit_wait_s == 0.2
    assert requests_to(mews_sandbox, ADD) == 2


def test_429_longer_than_the_retry_budget_raises_surely_not_processed(make_hook, mews_sandbox):
    mews_sandbox.configure(fault_script=["429:30"])
    hook = make_hook(max_retry_time_s=2)
    with pytest.raises(MewsRateLimitError) as info:
        hook.add_loyalty_memberships(items(1))
    check_error_text(info.value, 429, "Too many requests.")
    assert info.value.may_have_been_processed is False
    assert requests_to(mews_sandbox, ADD) == 1
    assert mews_sandbox.stats()["stored"] == 0


# -- 5xx and the ambiguous-failure flag --


@pytest.mark.parametrize("operation", [GET_ALL, CONFIG])
def test_5xx_burst_is_retried_for_idempotent_calls(operation, make_hook, mews_sandbox):
    hook = make_hook()
    hook.add_loyalty_memberships(items(3))
    mews_sandbox.configure(fault_operations={operation}, fault_script=["500", "503", "502html"])
    if operation == GET_ALL:
        assert len(list(hook.get_loyalty_memberships())) == 3
    else:
        assert hook.call(operation)["Enterprise"]["Name"] == "Mews Sandbox Hotel"
    assert requests_to(mews_sandbox, operation) == 4
    assert hook.stats.retries == 3


@pytest.mark.parametrize("fault", ["500", "503"])
def test_5xx_on_add_is_not_resent(fault, make_hook, mews_sandbox):
    mews_sandbox.configure(fault_script=[fault, fault])
    with pytest.raises(MewsServerError) as info:
        make_hook().add_loyalty_memberships(items(3))
    check_error_text(info.value, int(fault), f"Sandbox fault {fault}.")
    assert info.value.may_have_been_processed is True
    assert "reconcile before re-sending" in str(info.value)
    assert requests_to(mews_sandbox, ADD) == 1


def test_drop_after_store_raises_maybe_processed_and_is_stored_once(make_hook, mews_sandbox):
    mews_sandbox.configure(fault_script=["drop_after_store"])
    with pytest.raises(MewsConnectionError) as info:
        make_hook().add_loyalty_memberships(items(3))
    check_error_text(info.value, None, "no complete answer after sending")
    assert info.value.may_have_been_processed is True
    assert requests_to(mews_sandbox, ADD) == 1
    assert mews_sandbox.stats()["stored"] == 3


def test_read_timeout_after_store_raises_maybe_processed(make_hook, mews_sandbox):
    mews_sandbox.configure(fault_script=["hang_after_store:3"])
    hook = make_hook(conn={"timeout": 0.5})
    with pytest.raises(MewsConnectionError) as info:
        hook.add_loyalty_memberships(items(2))
    assert "ReadTimeout" in str(info.value)
    assert info.value.may_have_been_processed is True
    assert requests_to(mews_sandbox, ADD) == 1
    assert mews_sandbox.stats()["stored"] == 2


def test_connection_refused_is_retried_and_surely_not_processed(make_hook, mews_sandbox):
    hook = make_hook(conn={"url": f"http://127.0.0.1:{closed_port()}"}, max_attempts=3)
    with pytest.raises(MewsConnectionError) as info:
        hook.add_loyalty_memberships(items(2))
    assert "connection failed before sending" in str(info.value)
    assert info.value.may_have_been_processed is False
    assert "reconcile" not in str(info.value)
    assert hook.stats.requests == 3 and hook.stats.retries == 2


def test_non_json_502_gives_a_readable_message(make_hook, mews_sandbox):
    mews_sandbox.configure(fault_script=["502html"])
    with pytest.raises(MewsServerError) as info:
        make_hook().add_loyalty_memberships(items(1))
    check_error_text(info.value, 502, "502 Bad Gateway")
    assert "non-JSON body, text/html" in info.value.message
    assert info.value.may_have_been_processed is True
    assert requests_to(mews_sandbox, ADD) == 1


def test_tokens_echoed_by_mews_are_redacted(make_hook, mews_sandbox):
    """Even when Mews's message repeats a token (here an unknown field named like it), the error
    text shows *** instead."""
    with pytest.raises(MewsBadRequestError) as info:
        make_hook().call(ADD, {DEMO_ACCESS_TOKEN: 1, DEMO_CLIENT_TOKEN: 2, "LoyaltyMemberships": items(1)})
    check_error_text(info.value, 400, "unknown field(s) ***, ***")


# -- bounded retries --


def test_retries_are_bounded_in_attempts(make_hook, mews_sandbox):
    mews_sandbox.configure(fault_operations={GET_ALL}, fault_rates={"500": 1.0})
    hook = make_hook(max_attempts=4)
    with pytest.raises(MewsServerError) as info:
        list(hook.get_loyalty_memberships())
    assert info.value.may_have_been_processed is False
    assert requests_to(mews_sandbox, GET_ALL) == 4
    assert hook.stats.retries == 3


def test_retries_are_bounded_in_total_time(make_hook, mews_sandbox):
    """Backoff 0.05-0.1 s per retry and a budget of 0.5 s: at most about 10 attempts, not 50."""
    mews_sandbox.configure(fault_operations={CONFIG}, fault_rates={"503": 1.0})
    hook = make_hook(max_attempts=50, backoff_base_s=0.1, backoff_max_s=0.1, max_retry_time_s=0.5)
    with pytest.raises(MewsServerError):
        hook.call(CONFIG)
    assert 2 <= requests_to(mews_sandbox, CONFIG) <= 12


def test_add_refuses_0_and_1001_items_before_sending(make_hook, mews_sandbox):
    hook = make_hook()
    for count in (0, 1001):
        with pytest.raises(MewsConfigurationError, match=f"1 to 1000 memberships per request, got {count}"):
            hook.add_loyalty_memberships(items(count))
    assert mews_sandbox.stats() == {"stored": 0}
    assert len(hook.add_loyalty_memberships(items(1000))) == 1000


# -- getAll: filters and lazy pagination --


def test_getall_follows_the_cursor_page_by_page(make_hook, mews_sandbox):
    hook = make_hook()
    created = hook.add_loyalty_memberships(items(20))
    got = list(hook.get_loyalty_memberships(page_size=7))
    assert [m["Id"] for m in got] == [m["Id"] for m in created]
    assert requests_to(mews_sandbox, GET_ALL) == 3  # 7 + 7 + 6

    # A full last page needs one more (empty) page to know it was the last.
    hook.add_loyalty_memberships(items(1))
    assert len(list(hook.get_loyalty_memberships(page_size=7))) == 21
    assert requests_to(mews_sandbox, GET_ALL) == 3 + 4  # 7 + 7 + 7 + 0


def test_getall_is_lazy(make_hook, mews_sandbox):
    hook = make_hook()
    hook.add_loyalty_memberships(items(20))
    pages = hook.get_loyalty_memberships(page_size=7)
    assert requests_to(mews_sandbox, GET_ALL) == 0
    first = [next(pages) for _ in range(7)]
    assert requests_to(mews_sandbox, GET_ALL) == 1
    eighth = next(pages)
    assert requests_to(mews_sandbox, GET_ALL) == 2
    pages.close()
    assert requests_to(mews_sandbox, GET_ALL) == 2
    assert eighth["Id"] not in {m["Id"] for m in first}


def test_getall_filters(make_hook, mews_sandbox):
    hook = make_hook()
    first = hook.add_loyalty_memberships(items(3, "A"))
    between = datetime.now(timezone.utc)
    time.sleep(0.01)
    batch = items(4, "B")
    batch[0]["State"] = "Pending"
    second = hook.add_loyalty_memberships(batch)

    by_account = hook.get_loyalty_memberships(account_ids=[first[1]["AccountId"], second[2]["AccountId"]])
    assert [m["Id"] for m in by_account] == [first[1]["Id"], second[2]["Id"]]
    by_id = hook.get_loyalty_memberships(loyalty_membership_ids=[second[3]["Id"]])
    assert [m["Code"] for m in by_id] == ["B-0003"]
    pending = hook.get_loyalty_memberships(membership_states=["Pending"], activity_states=["Active"])
    assert [m["Id"] for m in pending] == [second[0]["Id"]]
    # Strings go to Mews as they are (here with microseconds) ...
    later = hook.get_loyalty_memberships(created_utc=(between.isoformat(), None))
    assert [m["Code"] for m in later] == ["B-0000", "B-0001", "B-0002", "B-0003"]
    earlier = hook.get_loyalty_memberships(created_utc=(None, between.isoformat()))
    assert [m["Code"] for m in earlier] == ["A-0000", "A-0001", "A-0002"]
    # ... datetimes in any zone are sent as UTC.
    prague = timezone(timedelta(hours=2))
    today = hook.get_loyalty_memberships(created_utc=(between.astimezone(prague) - timedelta(hours=1), None))
    assert len(list(today)) == 7
    tomorrow = hook.get_loyalty_memberships(
        created_utc=(between.astimezone(prague) + timedelta(hours=1), None)
    )
    assert list(tomorrow) == []
    assert list(hook.get_loyalty_memberships(loyalty_program_ids=[str(uuid.uuid4())])) == []
    with pytest.raises(MewsConfigurationError, match="AccountIds takes 1 to 1000 ids, got 0"):
        next(hook.get_loyalty_memberships(account_ids=[]))


# -- client-side rate limiter --


def test_limiter_keeps_threads_under_the_sandbox_window(make_hook, mews_sandbox):
    """Sandbox: 5 requests per 0.9 s per AccessToken; the connection says 5 per 1 s. 20 calls from
    4 threads (each with its own hook, sharing the token's limiter) meet no 429. (0.1 s of slack
    for a loaded test machine, where a request can take that long to reach the sandbox's check.)"""
    mews_sandbox.configure(rate_limit_requests=5, rate_limit_period_s=0.9)
    hooks = [make_hook(conn={"rate_limit_requests": 5, "rate_limit_period": 1}) for _ in range(4)]
    assert len({id(h.limiter) for h in hooks}) == 1
    errors: list[BaseException] = []

    def work(hook: MewsConnectorHook) -> None:
        try:
            for _ in range(5):
                hook.call(CONFIG)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(h,)) for h in hooks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = mews_sandbox.stats()
    assert stats[f"requests:{CONFIG}"] == 20
    assert stats.get("429", 0) == 0
    assert sum(h.stats.rate_limited for h in hooks) == 0


def test_limiter_for_is_one_per_token_scope_and_limits():
    a = limiter_for("token-A-for-test", 7, 3.0)
    assert limiter_for("token-A-for-test", 7, 3.0) is a
    assert limiter_for("token-B-for-test", 7, 3.0) is not a
    assert limiter_for("token-A-for-test", 8, 3.0) is not a
    assert limiter_for("token-A-for-test", 7, 3.0, scope="http://elsewhere") is not a
    from airflow_provider_mews import rate_limit

    assert not any("token-A-for-test" in part for key in rate_limit._registry for part in map(str, key))
    assert "token-A-for-test" not in a.key


def test_add_ids_only_returns_the_ids_in_the_order_sent(make_hook, mews_sandbox):
    """The typed decoder the operator uses: only the Ids, paired with the rows by position."""
    batch = items(20)
    ids = make_hook().add_loyalty_memberships(batch, ids_only=True)
    stored = mews_sandbox.memberships()
    assert ids == [m["Id"] for m in stored]
    assert [m["Code"] for m in stored] == [b["Code"] for b in batch]


def test_add_ids_only_refuses_an_answer_out_of_order(make_hook, mews_sandbox, monkeypatch):
    """Ids that cannot be paired with their rows are never reported: the caller reconciles."""
    import msgspec

    hook = make_hook()
    real = hook._decode

    def swapped(response, operation, ids_only=False):
        answer = real(response, operation, ids_only)
        first, second, *rest = answer.LoyaltyMemberships
        return msgspec.structs.replace(answer, LoyaltyMemberships=[second, first, *rest])

    monkeypatch.setattr(hook, "_decode", swapped)
    with pytest.raises(MewsResponseError, match="not come back in the order sent") as caught:
        hook.add_loyalty_memberships(items(3), ids_only=True)
    assert caught.value.may_have_been_processed is True


# -- the environment's proxy settings --


class _ForwardingProxy:
    """A plain HTTP forward proxy on loopback: records each request line, relays it to the sandbox."""

    def __init__(self, sandbox_url: str) -> None:
        import http.server
        import urllib.parse
        import urllib.request

        self.request_lines: list[str] = []
        proxy = self
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # not itself again

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                proxy.request_lines.append(self.requestline)
                path = urllib.parse.urlsplit(self.path).path
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = urllib.request.Request(
                    sandbox_url + path, data=body, headers={"Content-Type": "application/json"}, method="POST"
                )
                with direct.open(request, timeout=30) as answer:
                    data = answer.read()
                    status = answer.status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_environments_proxy_and_no_proxy_are_honoured(make_hook, mews_sandbox, monkeypatch):
    """HTTP(S)_PROXY and NO_PROXY as requests reads them (read once per hook, not per request):
    a host only the proxy can reach works through it; NO_PROXY sends straight to the host."""
    proxy = _ForwardingProxy(mews_sandbox.url)
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        hook = make_hook(
            conn={"url": "http://mews-via-proxy.invalid"}
        )  # resolvable by no DNS: only by the proxy
        assert hook.add_loyalty_memberships(items(2), ids_only=True)
        assert hook.call(CONFIG)["Enterprise"]["Name"] == "Mews Sandbox Hotel"
        assert proxy.request_lines == [
            f"POST http://mews-via-proxy.invalid/api/connector/v1/{ADD} HTTP/1.1",
            f"POST http://mews-via-proxy.invalid/api/connector/v1/{CONFIG} HTTP/1.1",
        ]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        direct = make_hook(conn={"conn_id": "mews_direct"})
        assert direct.call(CONFIG)["Enterprise"]["Name"] == "Mews Sandbox Hotel"
        assert len(proxy.request_lines) == 2  # not through the proxy
    finally:
        proxy.close()
