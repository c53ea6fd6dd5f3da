"""MewsConnectorHook's update and delete calls and getAll's sync filters against the sandbox, over real HTTP.

Update sets values, so the hook retries it like a read; delete is not documented to accept
an Id it already deleted, so the hook never re-sends it in doubt and the caller re-reads
(:func:`~airflow_provider_mews.loyalty.reconcile.find_deleted`) before sending what is still active.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from airflow_provider_mews.exceptions import (
    MewsBadRequestError,
    MewsConfigurationError,
    MewsConnectionError,
    MewsForbiddenError,
    MewsResponseError,
    MewsServerError,
)
from airflow_provider_mews.hooks.mews import MewsConnectorHook
from airflow_provider_mews.loyalty.reconcile import find_deleted
from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN

UPDATE = "loyaltyMemberships/update"
DELETE = "loyaltyMemberships/delete"
PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"


@pytest.fixture
def hook(sync_hook: MewsConnectorHook) -> MewsConnectorHook:
    return sync_hook


@pytest.fixture
def memberships(hook: MewsConnectorHook) -> Callable[..., list[dict[str, Any]]]:
    def _add(count: int = 3, **fields: Any) -> list[dict[str, Any]]:
        items = [
            {"AccountId": str(uuid.uuid4()), "LoyaltyProgramId": PROGRAM, "IsPrimary": True, **fields}
            for _ in range(count)
        ]
        return hook.add_loyalty_memberships(items)

    return _add


def no_token_in(exc: Exception) -> None:
    for token in (DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN):
        assert token not in str(exc) and token not in repr(exc.args)


def test_update_returns_the_updated_memberships_in_the_order_sent(hook, memberships, mews_sandbox):
    a, b, c = memberships(3, Points=1, LoyaltyTierId=str(uuid.uuid4()))
    updates = [
        {"LoyaltyMembershipId": c["Id"], "Points": {"Value": 30}},
        {
            "LoyaltyMembershipId": a["Id"].upper(),
            "LoyaltyTierId": {"Value": None},
            "State": {"Value": "Canceled"},
        },
    ]
    answer = hook.update_loyalty_memberships(updates)
    assert [m["Id"] for m in answer] == [c["Id"], a["Id"]]
    assert (
        answer[0]["Points"] == 30 and answer[1]["LoyaltyTierId"] is None and answer[1]["State"] == "Canceled"
    )
    [entry] = mews_sandbox.request_log(UPDATE)
    assert entry["LoyaltyMembershipUpdates"] == updates and entry["status"] == 200
    assert next(m for m in mews_sandbox.memberships() if m["Id"] == b["Id"])["Points"] == 1


def test_update_and_delete_send_chain_id(hook, memberships, mews_sandbox):
    [m] = memberships(1)
    chain = "0c8a4f42-5f5b-4f55-9a8f-8ef5d3ad5b11"
    hook.update_loyalty_memberships([{"LoyaltyMembershipId": m["Id"]}], chain_id=chain)
    hook.delete_loyalty_memberships([m["Id"]], chain_id=chain)
    entries = mews_sandbox.request_log(UPDATE) + mews_sandbox.request_log(DELETE)
    assert [(e["status"], e["ChainId"]) for e in entries] == [(200, chain), (200, chain)]


@pytest.mark.parametrize("count", [0, 1001])
def test_update_and_delete_refuse_batches_outside_1_to_1000_without_a_request(hook, mews_sandbox, count):
    with pytest.raises(MewsConfigurationError, match="1 to 1000"):
        hook.update_loyalty_memberships([{"LoyaltyMembershipId": str(uuid.uuid4())}] * count)
    with pytest.raises(MewsConfigurationError, match="1 to 1000"):
        hook.delete_loyalty_memberships([str(uuid.uuid4())] * count)
    assert mews_sandbox.request_log() == []


def test_update_item_without_an_id_is_refused_before_sending(hook, mews_sandbox):
    with pytest.raises(MewsConfigurationError, match="item 1 has no LoyaltyMembershipId"):
        hook.update_loyalty_memberships(
            [{"LoyaltyMembershipId": str(uuid.uuid4())}, {"Points": {"Value": 1}}]
        )
    assert mews_sandbox.request_log() == []


def test_update_of_an_unknown_id_raises_400_with_message_and_request_id(hook, mews_sandbox):
    unknown = str(uuid.uuid4())
    with pytest.raises(MewsBadRequestError) as info:
        hook.update_loyalty_memberships([{"LoyaltyMembershipId": unknown, "Points": {"Value": 1}}])
    assert unknown in info.value.message and info.value.status == 400
    assert info.value.request_id == mews_sandbox.request_log(UPDATE)[0]["request_id"]
    assert info.value.may_have_been_processed is False
    assert f"RequestId={info.value.request_id}" in str(info.value)
    no_token_in(info.value)


def test_update_403_is_not_retried(hook, memberships, mews_sandbox):
    [m] = memberships(1)
    mews_sandbox.configure(forbidden_memberships={m["Id"]})
    with pytest.raises(MewsForbiddenError) as info:
        hook.update_loyalty_memberships([{"LoyaltyMembershipId": m["Id"], "Points": {"Value": 1}}])
    assert info.value.details == {"LoyaltyMembershipIndexes": [0]}
    assert len(mews_sandbox.request_log(UPDATE)) == 1


@pytest.mark.parametrize("fault", ["500", "502html", "503", "drop_before_store", "drop_after_store"])
def test_update_is_retried_after_faults_because_it_is_value_idempotent(
    hook, memberships, mews_sandbox, fault
):
    [m] = memberships(1, Points=1)
    mews_sandbox.configure(fault_operations={UPDATE}, fault_script=[fault])
    [answer] = hook.update_loyalty_memberships([{"LoyaltyMembershipId": m["Id"], "Points": {"Value": 2}}])
    assert answer["Points"] == 2
    log = mews_sandbox.request_log(UPDATE)
    assert [e["fault"] for e in log] == [fault, None] and log[-1]["status"] == 200
    assert hook.stats.retries == 1


def test_update_gives_up_after_max_attempts_without_doubt(memberships, mews_sandbox, hook):
    [m] = memberships(1)
    mews_sandbox.configure(fault_operations={UPDATE}, fault_script=["500"] * 5)
    with pytest.raises(MewsServerError) as info:
        hook.update_loyalty_memberships([{"LoyaltyMembershipId": m["Id"], "Points": {"Value": 2}}])
    assert info.value.may_have_been_processed is False  # re-sending an update is safe
    assert len(mews_sandbox.request_log(UPDATE)) == hook.max_attempts


@pytest.mark.parametrize("fault", ["fewer200", "nolist200", "wrongtypes200"])
def test_update_answer_that_breaks_the_contract_raises(hook, memberships, mews_sandbox, fault):
    a, b = memberships(2)
    mews_sandbox.configure(fault_operations={UPDATE}, fault_script=[fault])
    with pytest.raises(MewsResponseError):
        hook.update_loyalty_memberships([{"LoyaltyMembershipId": a["Id"]}, {"LoyaltyMembershipId": b["Id"]}])


def test_delete_then_getall_sees_them_deleted(hook, memberships, mews_sandbox):
    kept, gone, also_gone = memberships(3)
    assert hook.delete_loyalty_memberships([gone["Id"], also_gone["Id"]]) is None
    active = list(hook.get_loyalty_memberships(loyalty_program_ids=[PROGRAM], activity_states=["Active"]))
    assert [m["Id"] for m in active] == [kept["Id"]]
    assert find_deleted(hook, [kept["Id"], gone["Id"].upper(), also_gone["Id"]]) == {
        gone["Id"],
        also_gone["Id"],
    }


@pytest.mark.parametrize("fault", ["500", "drop_after_store", "drop_before_store"])
def test_delete_in_doubt_is_not_resent_and_find_deleted_tells_what_to_resend(
    hook, memberships, mews_sandbox, fault
):
    a, b = memberships(2)
    mews_sandbox.configure(fault_operations={DELETE}, fault_script=[fault])
    with pytest.raises((MewsServerError, MewsConnectionError)) as info:
        hook.delete_loyalty_memberships([a["Id"], b["Id"]])
    assert info.value.may_have_been_processed is True
    assert len(mews_sandbox.request_log(DELETE)) == 1  # not re-sent by the hook
    done = find_deleted(hook, [a["Id"], b["Id"]])
    assert done == ({a["Id"], b["Id"]} if fault == "drop_after_store" else set())
    rest = [i for i in (a["Id"], b["Id"]) if i not in done]
    if rest:
        hook.delete_loyalty_memberships(rest)
    assert find_deleted(hook, [a["Id"], b["Id"]]) == {a["Id"], b["Id"]}
    assert mews_sandbox.stats()["deleted"] == 2  # each removal done once


def test_blind_repeat_of_a_delete_is_refused(hook, memberships):
    [m] = memberships(1)
    hook.delete_loyalty_memberships([m["Id"]])
    with pytest.raises(MewsBadRequestError, match=m["Id"]):
        hook.delete_loyalty_memberships([m["Id"]])


def test_getall_filters_by_membership_numbers_and_provider_ids(hook, memberships, mews_sandbox):
    a, b = memberships(2)
    hook.update_loyalty_memberships(
        [
            {"LoyaltyMembershipId": a["Id"], "MembershipNumber": {"Value": "N-A"}},
            {"LoyaltyMembershipId": b["Id"], "ProviderMembershipId": {"Value": "P-B"}},
        ]
    )
    found = hook.get_loyalty_memberships(membership_numbers=["N-A", "N-A"], activity_states=["Active"])
    assert [m["Id"] for m in found] == [a["Id"]]
    found = hook.get_loyalty_memberships(provider_membership_ids=["P-B"], activity_states=["Active"])
    assert [m["Id"] for m in found] == [b["Id"]]
    entry = mews_sandbox.request_log("loyaltyMemberships/getAll")[-2]
    assert entry["filters"] == {"MembershipNumbers": 1, "ActivityStates": ["Active"]}  # de-duplicated
    with pytest.raises(MewsConfigurationError, match="MembershipNumbers takes 1 to 1000"):
        list(hook.get_loyalty_memberships(membership_numbers=[str(n) for n in range(1001)]))


def test_getall_by_ids_stops_when_every_id_was_found(hook, memberships, mews_sandbox):
    ids = [m["Id"] for m in memberships(1000)]
    assert (
        len(list(hook.get_loyalty_memberships(loyalty_membership_ids=ids, activity_states=["Active"])))
        == 1000
    )
    assert (
        len(mews_sandbox.request_log("loyaltyMemberships/getAll")) == 1
    )  # a full page, but no page can follow
    found = list(
        hook.get_loyalty_memberships(loyalty_membership_ids=ids[:10], activity_states=["Active"], page_size=4)
    )
    assert len(found) == 10 and len(mews_sandbox.request_log("loyaltyMemberships/getAll")) == 4  # 4 + 4 + 2
