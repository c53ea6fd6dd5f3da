"""How many ``loyaltyMemberships/add`` requests of 1000 items per second the local sandbox serves.

The sandbox must never be the bottleneck of a benchmark (target: at least 50 requests/s, i.e.
50 000 memberships/s, on the project's 2-core machine). This starts it as a subprocess with no
latency and no rate limit, sends adds of 1000 valid items from several client threads for a
fixed time and prints the rate. Memberships are cleared between rounds so memory stays flat.

    python benchmarks/sandbox_throughput.py [--seconds 10] [--threads 4] [--min-rps 50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import uuid

import requests

from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN

TARGET_RPS = 50.0


def add_body(items: int) -> bytes:
    program = str(uuid.uuid4())
    memberships = [
        {
            "AccountId": str(uuid.uuid4()),
            "LoyaltyProgramId": program,
            "IsPrimary": n % 3 != 0,
            "State": "Enrolled",
            "Code": f"MBR-{n:08d}",
            "Points": n * 7,
            "ExpirationDate": "2027-12-31",
            "Url": f"https://rewards.example.com/m/{n}",
        }
        for n in range(items)
    ]
    body = {
        "ClientToken": DEMO_CLIENT_TOKEN,
        "AccessToken": DEMO_ACCESS_TOKEN,
        "Client": "sandbox-throughput 1.0",
        "LoyaltyMemberships": memberships,
    }
    return json.dumps(body).encode()


def start_sandbox() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_mews.testing.sandbox", "--port", "0",
         "--rate-limit", "1000000000/1"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("Mews sandbox listening on "):
        proc.kill()
        raise SystemExit(f"sandbox did not start: {line!r}")
    return proc, line.split()[-1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    import os

    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(url: str, seconds: float, threads: int, items: int) -> tuple[int, int, float]:
    body = add_body(items)
    endpoint = f"{url}/api/connector/v1/loyaltyMemberships/add"
    ok = [0] * threads
    failed = [0] * threads
    start_gate = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        with requests.Session() as session:
            session.headers["Content-Type"] = "application/json"
            session.post(endpoint, data=body, timeout=60)  # warm the connection
            start_gate.wait()
            while time.monotonic() < stop_at[0]:
                response = session.post(endpoint, data=body, timeout=60)
                if response.status_code == 200 and response.content.startswith(b'{"LoyaltyMemberships":['):
                    ok[i] += 1
                else:
                    failed[i] += 1
                    if failed[i] == 1:
                        answer = response.text[:200]
                        print(f"unexpected answer: HTTP {response.status_code} {answer!r}", flush=True)

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    stop_at[0] = time.monotonic() + 3600
    start_gate.wait()
    began = time.monotonic()
    stop_at[0] = began + seconds
    for w in workers:
        w.join()
    elapsed = time.monotonic() - began
    return sum(ok), sum(failed), elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--items", type=int, default=1000, help="memberships per add request")
    parser.add_argument("--min-rps", type=float, default=0.0, help="exit 1 below this rate (0: never)")
    args = parser.parse_args(argv)

    proc, url = start_sandbox()
    try:
        rates = []
        for n in range(args.rounds):
            requests.post(f"{url}/_sandbox/reset", timeout=30)
            cpu_before = cpu_seconds(proc.pid)
            ok, failed, elapsed = run(url, args.seconds, args.threads, args.items)
            cpu_ms = (cpu_seconds(proc.pid) - cpu_before) * 1000 / max(ok + failed, 1)
            rate = ok / elapsed
            rates.append(rate)
            ceiling = 1000 / max(cpu_ms, 0.001)
            print(
                f"round {n + 1}: {ok} adds of {args.items} items in {elapsed:.1f} s"
                f" from {args.threads} threads = {rate:.1f} req/s"
                f" ({rate * args.items:,.0f} memberships/s), {failed} failed;"
                f" sandbox CPU {cpu_ms:.1f} ms per request (at most {ceiling:.0f} req/s on one free core)",
                flush=True,
            )
            if failed:
                print("FAILED: the sandbox answered something other than 200", flush=True)
                return 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    best = max(rates)
    verdict = "meets" if best >= TARGET_RPS else "BELOW"
    print(f"sandbox throughput: {best:.1f} req/s ({verdict} the target of {TARGET_RPS:.0f} req/s)")
    return 1 if args.min_rps and best < args.min_rps else 0


if __name__ == "__main__":
    sys.exit(main())
