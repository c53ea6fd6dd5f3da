"""Sample loyalty members for the demo, the tests and the benchmarks."""

from __future__ import annotations

import random
import sqlite3
import uuid
from collections.abc import Iterator
from typing import Any

PROGRAM_ID = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
TIER_IDS = ("69eedfd2-6f25-42fc-b3c8-39df70f85e37", "0f2b6a53-5b8e-4c52-a1a4-6e3c2f1d9b70")
COLUMNS = (
    "member_id", "account_id", "loyalty_program_id", "is_primary", "state", "membership_number",
    "points", "expiration_date", "url", "tier_id", "email",
)  # fmt: skip
#: Kinds of invalid rows mixed in by ``invalid=``: each breaks one field the way warehouses do.
INVALID_KINDS = ("account_id", "is_primary", "points", "expiration_date", "url", "state")


def members(
    count: int, invalid: int = 0, seed: int = 7, program_id: str = PROGRAM_ID
) -> Iterator[tuple[Any, ...]]:
    """``count`` rows in COLUMNS order; ``invalid`` of them (spread evenly) fail normalization."""
    rng = random.Random(seed)
    step = count // invalid if invalid else 0
    bad_at = {i * step + step // 2 for i in range(invalid)} if invalid else set()
    for n in range(count):
        account = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        row: list[Any] = [
            n + 1,
            account,
            program_id,
            1 if n % 3 else 0,
            ("Enrolled", "new", "PENDING")[n % 3],
            f"MBR-{n + 1:08d}",
            rng.randint(0, 50_000),
            f"20{27 + n % 5}-12-{1 + n % 28:02d}",
            f"https://rewards.example.com/m/{n + 1}" if n % 2 else None,
            TIER_IDS[n % 2] if n % 4 else None,
            f"member{n + 1}@example.com",
        ]
        if n in bad_at:
            kind = INVALID_KINDS[len([b for b in bad_at if b < n]) % len(INVALID_KINDS)]
            row[COLUMNS.index(kind)] = {
                "account_id": "not-a-uuid",
                "is_primary": "maybe",
                "points": "12.5",
                "expiration_date": "next year",
                "url": "/relative/path",
                "state": "Gold",
            }[kind]
        yield tuple(row)


def write_sqlite(
    path: str, count: int, invalid: int = 0, table: str = "loyalty_members", seed: int = 7
) -> None:
    """(Re)create ``table`` in the SQLite database at ``path`` with sample members."""
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(
            f"CREATE TABLE {table} (member_id INTEGER PRIMARY KEY, account_id TEXT, loyalty_program_id TEXT, "
            "is_primary INTEGER, state TEXT, membership_number TEXT, points INTEGER, expiration_date TEXT, "
            "url TEXT, tier_id TEXT, email TEXT)"
        )
        marks = ", ".join("?" * len(COLUMNS))
        conn.executemany(f"INSERT INTO {table} VALUES ({marks})", members(count, invalid, seed))
        conn.commit()
    finally:
        conn.close()


def guests(count: int, shared_emails: int = 0, mixed_case: bool = False) -> Iterator[dict[str, Any]]:
    """``count`` guest profiles for ``MewsSandbox.add_customer``: guest n (from 1) has e-mail
    ``guest{n}@example.com``, loyalty code ``LC{n:06d}`` and names ``Guest{n}``/``Tester``.

    The last ``shared_emails`` profiles are duplicates (hotels keep several profiles per person):
    they reuse the e-mails of guests 1, 2, ... with their own Ids and loyalty codes. With
    ``mixed_case`` every even-numbered guest's e-mail is stored with capitals
    (``Guest2@Example.COM``), as guests type them."""
    if count < 0 or not 0 <= shared_emails <= count // 2:
        raise ValueError(f"shared_emails must be within 0..count // 2 ({count // 2}), got {shared_emails}")
    for n in range(1, count + 1):
        owner = n - (count - shared_emails) if n > count - shared_emails else n
        email = f"guest{owner}@example.com"
        if mixed_case and n % 2 == 0:
            email = f"Guest{owner}@Example.COM"
        yield {
            "email": email,
            "first_name": f"Guest{n}",
            "last_name": "Tester",
            "loyalty_code": f"LC{n:06d}",
            "phone": f"+420 600 {n:06d}",
        }
