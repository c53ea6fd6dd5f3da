"""ScopeIndex: the mirror's scope and matched Ids on disk, with memory that does not grow with the scope."""

from __future__ import annotations

import os
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

from airflow_provider_mews.loyalty.scope import ScopeIndex
from airflow_provider_mews.loyalty.sync_plan import SyncRow, match_row

PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"


def membership(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "Id": str(uuid.UUID(int=n + 1)),
        "AccountId": str(uuid.UUID(int=10**9 + n)),
        "LoyaltyProgramId": PROGRAM,
        "State": "Enrolled",
        "IsPrimary": True,
        "MembershipNumber": f"M-{n}",
        "Code": f"M-{n}",
        "Points": n,
        "CreatorProfile": None,
        **fields,
    }


def sync_row(row: int, m: dict[str, Any], **fields: Any) -> SyncRow:
    base = {"AccountId": m["AccountId"], "LoyaltyProgramId": PROGRAM, "IsPrimary": True}
    return SyncRow(row, {**base, **fields}, frozenset())


def test_candidates_feed_match_row(tmp_path):
    with ScopeIndex(str(tmp_path)) as scope:
        ms = [membership(n) for n in range(5)]
        twin = membership(99, AccountId=ms[4]["AccountId"], MembershipNumber="T", Code="T")
        assert scope.add_scope(ms[:3]) == 3 and scope.add_scope([*ms[2:], twin]) == 3
        assert scope.size == 6
        rows = [
            sync_row(1, ms[0]),
            SyncRow(2, {}, frozenset(), ms[1]["Id"].upper()),
            sync_row(3, ms[4]),
            sync_row(4, ms[4], MembershipNumber="T"),
            sync_row(5, membership(7)),
        ]
        by_id, by_key = scope.candidates([*rows, SyncRow(6, {}, frozenset(), str(uuid.uuid4()))])
        assert set(by_id) == {ms[1]["Id"]}
        assert "CreatorProfile" not in by_id[ms[1]["Id"]]  # only what matching and diff read
        kinds = [match_row(r, by_id, by_key).kind for r in rows]
        assert kinds == ["matched", "matched", "rejected", "matched", "new"]
        assert match_row(rows[3], by_id, by_key).membership["Id"] == twin["Id"]


def test_claims_tell_a_second_row_for_the_same_membership(tmp_path):
    with ScopeIndex(str(tmp_path)) as scope:
        mid = str(uuid.uuid4())
        assert scope.claim(mid, 5) is None
        assert scope.claim(mid.upper(), 9) == 5
        assert scope.claim(mid, 5) is None  # the same row again (a redone batch) is not a duplicate
        other = str(uuid.uuid4())
        assert scope.claim_many([(other, 9), (str(uuid.uuid4()), 10), (other, 11), (mid, 12)]) == {
            other: 9,
            mid: 5,
        }


def test_unmatched_by_on_missing(tmp_path):
    with ScopeIndex(str(tmp_path)) as scope:
        ms = [membership(n, State="Canceled" if n % 10 == 0 else "Enrolled") for n in range(2500)]
        scope.add_scope(ms)
        for m in ms[:2000]:
            scope.claim(m["Id"], 1)
        cancel = [m["Id"] for page in scope.unmatched("cancel", page_size=200) for m in page]
        delete = [m["Id"] for page in scope.unmatched("delete") for m in page]
        assert delete == [m["Id"] for m in ms[2000:]]
        assert cancel == [m["Id"] for m in ms[2000:] if m["State"] != "Canceled"]
        assert scope.count_unmatched("cancel") == len(cancel) == 450
        assert scope.count_unmatched("delete") == len(delete) == 500
        assert scope.count_unmatched("keep") == 0 and list(scope.unmatched("keep")) == []


def test_the_file_is_removed_on_close(tmp_path):
    scope = ScopeIndex(str(tmp_path))
    scope.add_scope([membership(1)])
    assert os.path.exists(scope.path)
    scope.close()
    assert os.listdir(tmp_path) == []


def test_memory_does_not_grow_with_the_scope(tmp_path):
    """20 000 memberships held as dicts would take over 20 MB; on disk the Python peak stays small."""
    tracemalloc.start()
    try:
        with ScopeIndex(str(tmp_path)) as scope:
            for start in range(0, 20_000, 1000):
                scope.add_scope(membership(n) for n in range(start, start + 1000))
                conflicts = scope.claim_many(
                    (str(uuid.UUID(int=n + 1)), n) for n in range(start, start + 1000, 2)
                )
                assert conflicts == {}
            assert sum(len(p) for p in scope.unmatched("delete")) == 10_000
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"peak Python allocation {peak / 2**20:.1f} MiB"


def test_folders_of_killed_tasks_are_swept_and_live_ones_kept(tmp_path):
    """A task killed with SIGKILL leaves its scope (membership data); the next index removes it."""
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time; from airflow_provider_mews.loyalty.scope import ScopeIndex; "
        f"s = ScopeIndex({str(tmp_path)!r}); print(s.path, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    orphan = Path(child.stdout.readline().strip()).parent
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert orphan.is_dir() and orphan.name.startswith(f"mews-sync-{child.pid}-")
    unrelated = tmp_path / "mews-sync-notapid"
    unrelated.mkdir()
    with ScopeIndex(str(tmp_path)) as live:
        assert not orphan.exists()  # swept: its process is gone
        assert unrelated.is_dir()  # not named after a process: not ours to judge
        with ScopeIndex(str(tmp_path)) as second:  # a live sibling's folder stays
            assert Path(live.path).exists() and Path(second.path).exists()
