"""Ask Mews what it already has, so that an add is never repeated.

Two questions, both answered with ``loyaltyMemberships/getAll`` filtered by the batch's
AccountIds and LoyaltyProgramIds (one request per 1000 accounts, more pages only when
the accounts already hold many memberships):

* :func:`find_stored` - which of these rows did *we* store since ``since``? Used after a
  failure that may have been processed and for batches a crashed try may have sent.
* :func:`find_existing` - which of these rows does Mews already hold in any way? Used by
  ``if_exists="skip"``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from airflow_provider_mews.loyalty.normalize import identity

#: Mews accepts CreatedUtc intervals of at most three months.
MAX_INTERVAL = timedelta(days=90)


class MembershipReader(Protocol):
    def get_loyalty_memberships(self, **filters: Any) -> Iterable[dict[str, Any]]: ...


def _filters(items: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    return {
        "account_ids": list(dict.fromkeys(m["AccountId"] for m in items)),
        "loyalty_program_ids": list(dict.fromkeys(m["LoyaltyProgramId"] for m in items)),
    }


def find_stored(
    hook: MembershipReader,
    items: Sequence[Mapping[str, Any]],
    since: datetime,
    until: datetime,
) -> dict[int, str]:
    """Positions in ``items`` that Mews stored since ``since``, mapped to the Mews Id.

    Rows match memberships by account, program and code; two identical rows match two
    memberships, so a partly stored duplicate pair is still told apart.
    """
    waiting: dict[tuple[str, str, str | None], list[int]] = defaultdict(list)
    for pos, item in enumerate(items):
        waiting[identity(item)].append(pos)
    start = max(since, until - MAX_INTERVAL)
    found: dict[int, str] = {}
    for membership in hook.get_loyalty_memberships(
        **_filters(items), created_utc=(start, until), activity_states=["Active"]
    ):
        positions = waiting.get(identity(membership))
        if positions:
            found[positions.pop(0)] = membership["Id"]
    return found


def find_existing(hook: MembershipReader, items: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """Positions in ``items`` whose account already has an active membership in the program."""
    wanted: dict[tuple[str, str], list[int]] = defaultdict(list)
    for pos, item in enumerate(items):
        wanted[(item["AccountId"].lower(), item["LoyaltyProgramId"].lower())].append(pos)
    found: dict[int, str] = {}
    for membership in hook.get_loyalty_memberships(**_filters(items), activity_states=["Active"]):
        key = (membership["AccountId"].lower(), membership["LoyaltyProgramId"].lower())
        for pos in wanted.pop(key, ()):
            found[pos] = membership["Id"]
    return found


def find_deleted(hook: MembershipReader, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` (lower case) Mews holds as deleted: asked after a delete whose fate is unknown.

    A repeated delete of an Id Mews already deleted is not documented to succeed, so only the
    Ids still active are sent again. One getAll per 1000 Ids, ``ActivityStates: ["Deleted"]``.
    """
    found: set[str] = set()
    unique = list(dict.fromkeys(i.lower() for i in ids))
    for start in range(0, len(unique), 1000):
        for membership in hook.get_loyalty_memberships(
            loyalty_membership_ids=unique[start : start + 1000], activity_states=["Deleted"]
        ):
            found.add(membership["Id"].lower())
    return found
