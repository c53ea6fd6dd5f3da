"""An isolation's chain of requests (issue 21.4): a batch of 500 with 2 rows Mews refuses.

``python -m benchmarks.isolation`` takes one batch of 500 memberships, 2 of whose accounts the
sandbox refuses (403), through :class:`~airflow_provider_mews.loyalty.batches.BatchSender` with
the real hook and limiter, every add answered 0.8 s after it was sent (as in the issue's
measurement), at two rates (connection and sandbox alike): Mews's own 200 per 30 s, and the
issue's 6 per 2 s. For each: ``width`` 1 (halves, one request after the other: the behaviour
before) and the default width (the parts of a round at once). Prints wall time, requests,
rounds (the longest chain of requests one after the other) and whether every row is in Mews
exactly once (498 stored, 2 rejected); writes ``benchmarks/results/isolation.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from airflow_provider_mews.hooks.mews import MewsConnectorHook
from airflow_provider_mews.loyalty.batches import BatchSender, RejectionBudget, build_batch
from airflow_provider_mews.loyalty.normalize import plan_columns
from airflow_provider_mews.testing import MewsSandbox, connection_json

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = "f701dafb-5765-4cf4-b1dd-1f602a740ae5"
COLUMNS = ["AccountId", "LoyaltyProgramId", "IsPrimary", "Code"]
ROWS, REFUSED_AT = 500, (123, 377)
LATENCY_S = 0.8


class Timed:
    """The hook's add, answered ``LATENCY_S`` after it was sent; records each call's span."""

    def __init__(self, hook: MewsConnectorHook) -> None:
        self.hook = hook
        self.spans: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.limiter = hook.limiter

    def add_loyalty_memberships(self, items: list[dict[str, Any]], **kw: Any) -> Any:
        start = time.monotonic()
        try:
            return self.hook.add_loyalty_memberships(items, **kw)
        finally:
            time.sleep(max(0.0, LATENCY_S - (time.monotonic() - start)))
            with self.lock:
                self.spans.append((start, time.monotonic()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.hook, name)


def chain(spans: list[tuple[float, float]]) -> int:
    """The longest run of requests each sent after the previous one answered."""
    best: dict[int, int] = {}
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    for i in order:
        before = [best[j] for j in best if spans[j][1] <= spans[i][0] + 1e-6]
        best[i] = 1 + max(before, default=0)
    return max(best.values(), default=0)


def measure(limit: int, period: float, width: int | None) -> dict[str, Any]:
    with MewsSandbox() as sandbox:
        sandbox.configure(rate_limit_requests=limit, rate_limit_period_s=period)
        rows = [(str(uuid.uuid4()), PROGRAM, True, f"C{i}") for i in range(ROWS)]
        sandbox.configure(forbidden_accounts={rows[i][0].lower() for i in REFUSED_AT})
        conn = "mews_isolation_bench"
        os.environ[f"AIRFLOW_CONN_{conn.upper()}"] = connection_json(
            sandbox.url, rate_limit_requests=limit, rate_limit_period=period
        )
        os.environ["MEWS_RATE_LIMIT_DIR"] = tempfile.mkdtemp(prefix="mews-isolation-")
        hook = Timed(MewsConnectorHook(conn))
        batch = build_batch(0, 1, plan_columns(COLUMNS), rows, keep_row_json=False)
        sender = BatchSender(
            hook,
            if_exists="add",
            chain_id=None,
            budget=RejectionBudget(10),
            stop=threading.Event(),
            isolation_width=width,
        )
        t = time.monotonic()
        result = sender.run(batch)
        wall = time.monotonic() - t
        stored = [m["Code"] for m in sandbox.memberships()]
        expected = sorted(r[3] for i, r in enumerate(rows) if i not in REFUSED_AT)
        return {
            "rate": f"{limit}/{period:g}s",
            "width": sender.isolation_width,
            "wall_s": round(wall, 2),
            "requests": len(hook.spans),
            "rounds": chain(hook.spans),
            "most_at_once": max(sum(1 for a, b in hook.spans if a <= s < b) for s, _ in hook.spans),
            "exactly_once": sorted(stored) == expected
            and result.complete
            and result.added == ROWS - 2
            and sorted(r.source_row for r in result.rejected) == [i + 1 for i in REFUSED_AT],
        }


def main() -> int:
    runs = []
    for limit, period in ((200, 30.0), (6, 2.0)):
        for width in (1, None):
            runs.append(measure(limit, period, width))
            print(json.dumps(runs[-1]), flush=True)
    print()
    print(f"Isolation of a batch of {ROWS} with 2 refused rows, {LATENCY_S} s per request")
    print("| Rate (connection = server) | Width | Wall | Requests | Rounds | Most at once | Exactly once |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['rate']} | {r['width'] if r['width'] > 1 else '1 (halves in sequence, before)'} | "
              f"{r['wall_s']:.1f} s | {r['requests']} | {r['rounds']} | {r['most_at_once']} | {r['exactly_once']} |")  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "isolation.json"
    out.write_text(json.dumps(runs, indent=2) + "\n")
    return 0 if all(r["exactly_once"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
