"""The loop a user writes in a PythonOperator when they do not install this provider.

It is the benchmark's baseline: read the whole table with ``get_records()``, turn each row
into the JSON Mews wants with the minimum of conversion the sample data needs, and post
1000-row chunks one after the other with ``requests``. It honours ``429 Retry-After``
(without that it would fail under the rate limit, so the comparison would not be fair) and
reads the created Ids from each answer. It does not validate rows, does not reconcile a
lost answer and does not write results: it is the cheap, fragile version.
"""

from __future__ import annotations

import time
from typing import Any

import requests


def naive_load(
    sqlite_conn_id: str, sql: str, base_url: str, client_token: str, access_token: str
) -> dict[str, Any]:
    from airflow.providers.sqlite.hooks.sqlite import SqliteHook

    rows = SqliteHook(sqlite_conn_id=sqlite_conn_id).get_records(sql)
    url = base_url + "/api/connector/v1/loyaltyMemberships/add"
    session = requests.Session()
    added = requests_sent = rate_limited = 0
    for start in range(0, len(rows), 1000):
        memberships = [
            {
                "AccountId": account_id,
                "LoyaltyProgramId": program_id,
                "IsPrimary": bool(is_primary),
                "State": state.capitalize() if state else None,
                "Code": code,
                "Points": points,
                "ExpirationDate": expiration,
                "Url": link,
                "LoyaltyTierId": tier_id,
            }
            for (
                _,
                account_id,
                program_id,
                is_primary,
                state,
                code,
                points,
                expiration,
                link,
                tier_id,
                _,
            ) in rows[start : start + 1000]
        ]
        body = {
            "ClientToken": client_token,
            "AccessToken": access_token,
            "Client": "naive loop 1.0",
            "LoyaltyMemberships": memberships,
        }
        while True:
            requests_sent += 1
            response = session.post(url, json=body, timeout=60)
            if response.status_code == 429:
                rate_limited += 1
                time.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            response.raise_for_status()
            break
        added += len(response.json()["LoyaltyMemberships"])
    session.close()
    return {"rows_read": len(rows), "added": added, "requests": requests_sent, "rate_limited": rate_limited}
