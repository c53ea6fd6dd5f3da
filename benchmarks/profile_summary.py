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


def summarize(raw: Path) -> dict[str, dict[str, float]]:
    """Per thread group ("task thread", "request threads"): the share (0..1) of its working
    samples per step (plus "other"). Shares are within a group: py-spy samples the threads
    unevenly, so the groups' CPU comes from the measured thread times instead."""
    counts: dict[str, collections.Counter[str]] = {
        "task thread": collections.Counter(),
        "request threads": collections.Counter(),
    }
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = stack.split(";")
        if any(w in frames[-1] for w in WAITING):
            continue
        if any("LoyaltyMembershipAddOperator.execute" in f for f in frames):
            group = "task thread"
        elif any("mews-batch" in f for f in frames[:2]):
            group = "request threads"
        else:
            continue
        counts[group][_step(frames)] += int(number)
    return {
        group: {step: n / (sum(c.values()) or 1) for step, n in c.most_common()}
        for group, c in counts.items()
    }


def _step(frames: list[str]) -> str:
    for frame in reversed(frames):
        for step, fragments in STEPS:
            if any(f in frame for f in fragments):
                return step
    return "other"


def markdown(shares: dict[str, dict[str, float]], run: dict[str, float], rows: int) -> str:
    """``run``: the measured task CPU per row split by thread (``task_us_per_row``,
    ``task_main_thread_us_per_row``, ``task_airflow_threads_us_per_row``). The task thread's CPU
    is split by its samples' shares; the request threads are shown whole, with their samples'
    shares only as a hint: py-spy counts a thread waiting on a lock held by C code as working."""
    task = run.get("task_us_per_row", 0.0)
    main = run.get("task_main_thread_us_per_row", 0.0)
    airflow = run.get("task_airflow_threads_us_per_row", 0.0)
    requests = task - main - airflow
    hint = ", ".join(f"{step} {share:.0%}" for step, share in shares.get("request threads", {}).items())
    lines = [
        f"One in-Airflow run of {rows:,} rows under py-spy (which costs CPU itself): task CPU {task:.1f} us "
        "per row, split by thread from /proc's thread times, the task's thread by the shares of its samples.",
        "",
        "| where | us per row | share |",
        "|---|---|---|",
    ]
    for step, share in shares.get("task thread", {}).items():
        lines.append(f"| task thread: {step} | {share * main:.1f} | {share * main / task:.0%} |")
    lines.append(f"| request threads (samples: {hint}) | {requests:.1f} | {requests / task:.0%} |")
    lines.append(
        f"| Airflow's threads (execution API: the checkpoint's writes) | {airflow:.1f} | {airflow / task:.0%} |"
    )
    return "\n".join(lines) + "\n"
