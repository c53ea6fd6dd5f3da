"""Upsert: rows an isolation proved refused are kept across tries (issue 21.4, the upsert path).

A refused add (an account Mews forbids) and a refused update (a membership Mews forbids) are
noted as soon as their isolation proves them (``on_refused``: the checkpoint, in a run); a later
try of the same batch (``known_refusals``) rejects them with the same status and message without
sending them again, so an isolation stopped by ``execution_timeout`` or SIGTERM is not redone.
"""

from __future__ import annotations

import threading
from typing import Any

from loyalty.test_sync_batches import ADD, COLUMNS, UPDATE, new_row, seed, source_row, writes

from airflow_provider_mews.loyalty.batches import RejectionBudget
from airflow_provider_mews.loyalty.scope import ScopeIndex
from airflow_provider_mews.loyalty.sync_batches import SyncBatchSender, build_sync_batch
from airflow_provider_mews.loyalty.sync_plan import plan_sync_columns


def test_an_upsert_rejects_rows_an_earlier_try_proved_refused_without_sending_them(
    sync_hook, mews_sandbox, tmp_path
):
    existing = seed(sync_hook, 4)
    mews_sandbox.reset()
    mews_sandbox.state.store(existing)
    rows = [source_row(m, points=500 + n) for n, m in enumerate(existing)]  # 4 updates
    rows += [new_row(n) for n in range(4)]  # 4 adds
    forbidden_account = rows[6][0]
    mews_sandbox.configure(
        forbidden_memberships={existing[1]["Id"]}, forbidden_accounts={forbidden_account.lower()}
    )
    batch = build_sync_batch(3, 101, plan_sync_columns(COLUMNS), rows, keep_row_json=True)
    noted: dict[int, tuple[Any, ...]] = {}

    def note(b: Any, row: int, exc: Any) -> None:
        assert (b.index, b.fingerprint) == (batch.index, batch.fingerprint)
        noted[row] = (exc.status, exc.request_id, exc.message)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def sender(scope_dir: str, known: dict[int, tuple[Any, ...]] | None) -> SyncBatchSender:
        return SyncBatchSender(
            sync_hook,
            index=ScopeIndex(scope_dir),
            scope=None,
            chain_id=None,
            budget=RejectionBudget(10),
            stop=threading.Event(),
            known_refusals=None
            if known is None
            else (lambda b: known if b.fingerprint == batch.fingerprint else {}),
            on_refused=note,
        )

    first = sender(str(tmp_path / "a"), None).run(batch)
    assert first.complete, first.error
    assert sorted(noted) == [102, 107]  # the forbidden update (row 2) and add (row 7), proven
    assert sorted(r.source_row for r in first.rejected) == [102, 107]

    # The next try of the same batch (here after the first ended; in a run, after it was stopped).
    before = len(writes(mews_sandbox))
    second = sender(str(tmp_path / "b"), dict(noted)).run(batch)
    assert second.complete, second.error
    sent = writes(mews_sandbox)[before:]
    sent_rows = [e for e in sent if e["operation"] in (ADD, UPDATE)]
    # Nothing refused is sent again (the rest is unchanged or reconciled as already added).
    assert all(
        existing[1]["Id"] not in str(e) and forbidden_account.lower() not in str(e).lower() for e in sent_rows
    ), sent_rows
    rejected = {r.source_row: r.reason for r in second.rejected}
    assert sorted(rejected) == [102, 107]
    assert "HTTP 403" in rejected[102] and "HTTP 403" in rejected[107]
