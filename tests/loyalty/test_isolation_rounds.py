"""An isolation goes by rounds of parallel requests, not a chain of halves (issue 21.4).

A batch of 500 with 2 refused rows: with ``width`` 8 the parts of a round leave at once and a
round's refused groups are split in up to 8 parts, so the isolation takes 5 rounds instead of a
chain of 35 requests; every accepted row is sent (and recorded) once, every refused row is
handed over once. Through the real hook and sandbox, BatchSender's shared state (outcomes,
rejections, pending rows) stays exact while the parts run in threads.
(Measured at 0.8 s per request: ``python -m benchmarks.isolation``, docs/guarantees.md.)
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest

from airflow_provider_mews.exceptions import MewsError
from airflow_provider_mews.hooks.mews import MewsConnectorHook
from airflow_provider_mews.loyalty.batches import BatchSender, RejectionBudget, build_batch, isolate_refusals
from airflow_provider_mews.loyalty.normalize import plan_columns

REFUSED = {123, 377}
PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
COLUMNS = ["AccountId", "LoyaltyProgramId", "IsPrimary", "Code"]


class FakeMews:
    """Refuses a group holding a refused item; records accepted items, spans and concurrency."""

    def __init__(self, latency: float = 0.05, fail_on: int | None = None) -> None:
        self.latency = latency
        self.fail_on = fail_on
        self.accepted: Counter[int] = Counter()
        self.spans: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.active = self.most_active = 0

    def send(self, group: list[int]) -> MewsError | None:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        start = time.monotonic()
        time.sleep(self.latency)
        with self.lock:
            self.active -= 1
            self.spans.append((start, time.monotonic()))
        if self.fail_on is not None and self.fail_on in group and len(group) < 500:
            raise MewsError("HTTP 500, not a refusal", status=500)
        if REFUSED & set(group):
            return MewsError("Forbidden", status=403)
        with self.lock:
            self.accepted.update(group)
        return None

    def rounds(self) -> int:
        """The longest chain of requests each sent after the previous one answered."""
        best: list[int] = []
        spans = sorted(self.spans)
        for i, (start, _end) in enumerate(spans):
            best.append(1 + max((best[j] for j in range(i) if spans[j][1] <= start), default=0))
        return max(best)


@pytest.mark.parametrize(("width", "most_rounds", "requests"), [(1, 35, 35), (2, 10, 35), (8, 5, 32)])
def test_an_isolation_takes_log_n_rounds_of_parallel_requests(width: int, most_rounds: int, requests: int):
    mews = FakeMews()
    refused: list[int] = []
    isolate_refusals(list(range(500)), mews.send, lambda item, _exc: refused.append(item), width=width)
    # Exactly once: every accepted item once, every refused item handed over once.
    assert sorted(refused) == sorted(REFUSED)
    assert set(mews.accepted) == set(range(500)) - REFUSED
    assert all(n == 1 for n in mews.accepted.values())
    assert len(mews.spans) == requests
    assert mews.rounds() <= most_rounds
    assert mews.most_active == (1 if width == 1 else min(2 * width, 8 if width == 8 else 4))


def test_an_error_in_one_part_is_raised_after_its_round_ends():
    mews = FakeMews(fail_on=400)
    with pytest.raises(MewsError, match="not a refusal"):
        isolate_refusals(list(range(500)), mews.send, lambda *_: None, width=8)
    # The other parts of the round ended (and were recorded) before the error was raised.
    assert mews.active == 0
    assert len(mews.accepted) > 0 and 400 not in mews.accepted


def test_batch_sender_isolates_in_parallel_and_stays_exact(mews_conn, mews_sandbox):
    rows = [(str(uuid.uuid4()), PROGRAM, True, f"C{i}") for i in range(500)]
    mews_sandbox.configure(forbidden_accounts={rows[i][0].lower() for i in REFUSED}, add_latency_s=2.0)
    hook = MewsConnectorHook(mews_conn)
    batch = build_batch(0, 1, plan_columns(COLUMNS), rows, keep_row_json=False)
    noted: list[int] = []
    sender = BatchSender(
        hook,
        if_exists="add",
        chain_id=None,
        budget=RejectionBudget(10),
        stop=threading.Event(),
        on_refused=lambda _b, row, _e: noted.append(row),
    )
    assert sender.isolation_width == 8  # a tenth of the connection's 200 per 30 s, at most 8
    result = sender.run(batch)
    assert result.complete and result.error is None
    assert result.added == 498 and result.unfinished == 0
    assert sorted(r.source_row for r in result.rejected) == sorted(i + 1 for i in REFUSED) == sorted(noted)
    outcome_rows = [o.source_row for o in result.outcomes]
    assert len(outcome_rows) == len(set(outcome_rows)) == 498
    stored = Counter(m["Code"] for m in mews_sandbox.memberships())
    assert set(stored) == {rows[i][3] for i in range(500) if i not in REFUSED}
    assert all(n == 1 for n in stored.values())
    ids = {m["Code"]: m["Id"] for m in mews_sandbox.memberships()}
    assert all(o.mews_membership_id == ids[o.code] for o in result.outcomes)
