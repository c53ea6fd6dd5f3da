"""The disk of ``sync_work_dir`` fills up while the mirror lists its scope.

``sync_work_dir`` is a 256 KiB tmpfs mounted for the test; the scope is 6 000 memberships (the
on-disk index needs about 200 bytes each, so about 1.2 MB). The mirror's source describes 10 of
them, so a complete run would cancel the other 5 990 (``max_removals="100%"``). The task must
fail with an error naming ``sync_work_dir`` and the fix, having removed nothing from Mews (no
update or delete request, every membership as it was), and leave nothing on the full disk.
Needs root (or CAP_SYS_ADMIN) for the mount; skips without it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import needs, seed_sandbox

PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
SCOPE = 6000


@pytest.fixture
def small_disk() -> Iterator[Path]:
    mount = Path(tempfile.mkdtemp(prefix="mews-full-disk."))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        mount.rmdir()
        needs("a small tmpfs to fill (root or CAP_SYS_ADMIN)", done.stderr.strip()[-200:])
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        mount.rmdir()


def mirror_onto(run_dag: Any, dag_id: str, stored: list[dict[str, Any]], work_dir: Path) -> Any:
    """Run a mirror of 10 of the stored memberships with its scope index in ``work_dir``."""
    rows = [
        {"AccountId": m["AccountId"], "LoyaltyProgramId": PROGRAM, "IsPrimary": True, "Code": m["Code"]}
        for m in stored[:10]
    ]
    return run_dag(
        dag_id,
        f"""
import pendulum
from airflow.sdk import DAG
from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipSyncOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    LoyaltyMembershipSyncOperator(
        task_id="mirror",
        memberships={rows!r},
        loyalty_program_ids=[{PROGRAM!r}],
        on_missing="cancel",
        max_removals="100%",
        sync_work_dir={str(work_dir)!r},
        retries=0,
    )
""",
    )


def test_a_full_sync_work_dir_fails_clearly_and_removes_nothing(
    run_dag, mews_sandbox: Any, mews_conn: str, small_disk: Path, capfd: Any
) -> None:
    stored = seed_sandbox(mews_sandbox, SCOPE, PROGRAM)
    before = {m["Id"]: m.get("State") for m in mews_sandbox.memberships()}
    dr = mirror_onto(run_dag, "rel_sync_work_dir_full", stored, small_disk)
    out = capfd.readouterr()
    text = out.out + out.err
    assert dr.state == "failed"
    assert f"ran out of space in sync_work_dir={small_disk}" in text, text[-3000:]
    assert "nothing was removed from Mews" in text
    writes = [e for e in mews_sandbox.request_log() if e["operation"] != "loyaltyMemberships/getAll"]
    assert not writes, writes[:3]
    assert {m["Id"]: m.get("State") for m in mews_sandbox.memberships()} == before
    assert not os.listdir(small_disk), "the scope index was left on the full disk"


def test_a_sync_work_dir_already_full_fails_clearly_before_sending_anything(
    run_dag, mews_sandbox: Any, mews_conn: str, small_disk: Path, capfd: Any
) -> None:
    """The disk is full before the sync starts: creating the index (in ``SyncRun.__init__``)
    fails with the same error naming ``sync_work_dir``, before any request, leaving nothing."""
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # fill the tmpfs to its last byte
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    stored = seed_sandbox(mews_sandbox, 20, PROGRAM)
    before = {m["Id"]: m.get("State") for m in mews_sandbox.memberships()}
    log_before = len(mews_sandbox.request_log())
    dr = mirror_onto(run_dag, "rel_sync_work_dir_full_at_start", stored, small_disk)
    out = capfd.readouterr()
    text = out.out + out.err
    assert dr.state == "failed"
    assert f"ran out of space in sync_work_dir={small_disk} while creating it" in text, text[-3000:]
    assert "nothing was removed from Mews" in text
    assert mews_sandbox.request_log()[log_before:] == []  # not even the scope's listing
    assert {m["Id"]: m.get("State") for m in mews_sandbox.memberships()} == before
    assert os.listdir(small_disk) == ["filler"], "the scope index was left on the full disk"
