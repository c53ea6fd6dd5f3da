"""Where the task's CPU goes: a py-spy ``raw`` profile of one in-Airflow run, grouped by step.

``python -m benchmarks.in_airflow --rows 1000000 --profile-summary OUT.md`` records the whole
``airflow dags test`` with ``py-spy record --threads --format raw`` and calls :func:`summarize`.
Only the task's work is counted: stacks under the operator's ``execute()`` (the task's thread)
and stacks of the request threads (``mews-batch``). Samples whose innermost frame waits (a
queue, a lock, a socket read, a sleep) are dropped: py-spy does not always see such a thread
as idle. Each remaining sample goes to the first step, innermost frame first, that names it.
"""

from __future__ import annotations

import collections
from pathlib import Path

#: Innermost frames that wait rather than work.
WAITING = (
    "_worker (concurrent/futures/thread.py",
    "wait (threading.py",
    "select (selectors.py",
    "readinto (socket.py",
    "recv_into",
    "sleep",
    "acquire",
)
#: (step, frame fragments that name it), matched from the innermost frame outwards.
STEPS = (
    ("read source rows (sqlite3 fetchmany)", ("SqlSource.chunks",)),
    ("normalize columns (normalize_many)", ("normalize_many",)),
    ("batch identity, rows and rejections (build_batch)", ("build_batch",)),
    ("encode request JSON (msgspec)", ("_encode_json",)),
    ("decode answer (typed msgspec)", ("MewsConnectorHook._decode",)),
    ("HTTP: requests, urllib3, http.client", ("Session.send", "_read_body", "MewsConnectorHook._request")),
    ("rate limiter (shared SQLite state)", ("TokenLimiter",)),
    ("checkpoint writes (task_state_store)", ("Checkpoint.",)),
    ("outcomes, counts, pairing", ("MembershipRun.settle", "add_loyalty_memberships", "BatchResult")),
    ("dispatch and thread hand-off", ("MembershipRun.", "BatchSender.", "ThreadPoolExecutor", "Future")),
)


def summarize(raw: Path) -> dict[str, float]:
    """Shares (0..1) of the task's working samples per step (plus "other")."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = stack.split(";")
        in_task = any("LoyaltyMembershipAddOperator.execute" in f for f in frames)
        in_sender = any("mews-batch" in f for f in frames[:2])
        if not (in_task or in_sender) or any(w in frames[-1] for w in WAITING):
            continue
        counts[_step(frames)] += int(number)
    total = sum(counts.values()) or 1
    return {step: n / total for step, n in counts.most_common()}


def _step(frames: list[str]) -> str:
    for frame in reversed(frames):
        for step, fragments in STEPS:
            if any(f in frame for f in fragments):
                return step
    return "other"


def markdown(shares: dict[str, float], us_per_row: float | None, rows: int) -> str:
    head = f"{rows:,} rows" + (f", {us_per_row:.1f} us of task CPU per row" if us_per_row else "")
    lines = [
        f"py-spy profile of one in-Airflow run ({head}):",
        "",
        "| step | share | us per row |",
        "|---|---|---|",
    ]
    for step, share in shares.items():
        per_row = f"{share * us_per_row:.1f}" if us_per_row else ""
        lines.append(f"| {step} | {share:.0%} | {per_row} |")
    return "\n".join(lines) + "\n"
