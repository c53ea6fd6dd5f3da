"""Redis stopped and restarted while processes share an AccessToken's budget through it (issue 21.3).

Three real processes book slots of one token through a real ``redis-server`` (the limiter's
Redis backend, opened by the official RedisHook), as Celery workers on several hosts do. Redis
is stopped 4 s into the run and started again, empty (no persistence), 4 s later. Proven:

* each process says once that it falls back, and once that Redis answers again;
* while Redis is down they pace on the host's shared state at ``FALLBACK_SHARE`` of the rate,
  together (the union of their slots never exceeds the share in any period);
* once Redis is back, every process books through it again: the whole rate, shared (the union
  never exceeds the limit in any period, and reaches most of it), and the state is in Redis.

The same fault under the CeleryExecutor, with rows through the sandbox: ``.ci/redis-restart.sh``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_provider_mews.rate_limit import FALLBACK_SHARE, REDIS_RETRY_S

ROOT = Path(__file__).resolve().parents[2]
LIMIT, PERIOD = 40, 1.0
STOP_AT, START_AT, END_AT = 4.0, 8.0, 8.0 + REDIS_RETRY_S + 5.0  # seconds after the common start

WORKER = textwrap.dedent(
    """
    import json, logging, sys, time
    from airflow_provider_mews.rate_limit import limiter_for
    messages = []
    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    logger = logging.getLogger("airflow_provider_mews.rate_limit")
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    limit, period, start_at, end_at = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    limiter = limiter_for("token-through-restarted-redis", limit, period, scope="test",
                          redis_conn_id="rate_redis")
    while time.time() < start_at:
        time.sleep(0.002)
    booked = []
    def kind():
        return "fallback" if limiter.key.endswith(":fallback") else "redis"
    while time.time() < end_at:
        before = kind()
        slot = limiter.acquire()
        # A slot booked in Redis and found unrebookable on the host as it fell back: "switch".
        booked.append((slot, before if kind() == before else "switch"))
    print("RESULT " + json.dumps({"booked": booked, "fallbacks": limiter.fallbacks, "recoveries": limiter.recoveries,
                                  "messages": messages}))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A real redis-server on a fixed port that can be stopped and started again."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.binary, self.port, self.workdir = binary, port, workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not _ping(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING within 20 s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # as a crash: no goodbye to the clients
            self.proc.wait(timeout=10)
        self.proc = None

    def state_keys(self) -> list[str]:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        try:
            return [k.decode() for k in client.scan_iter()]
        finally:
            client.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); CI installs it")
    server = RedisServer(binary, _free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _max_in_window(slots: list[float], window: float) -> int:
    slots = sorted(slots)
    best, j = 0, 0
    for i, s in enumerate(slots):
        while s - slots[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_processes_sharing_a_token_fall_back_once_and_come_back_when_redis_does(
    redis_server: RedisServer, tmp_path: Path
):
    env = {
        **os.environ,
        "MEWS_RATE_LIMIT_DIR": str(tmp_path / "state"),
        "PYTHONPATH": str(ROOT),
        "AIRFLOW_CONN_RATE_REDIS": json.dumps(
            {"conn_type": "redis", "host": "127.0.0.1", "port": redis_server.port}
        ),
    }
    t0 = time.time() + 15  # every process imported and waiting
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(LIMIT), str(PERIOD), str(t0), str(t0 + END_AT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for _ in range(3)
    ]
    try:
        time.sleep(max(0.0, t0 + STOP_AT - time.time()))
        redis_server.stop()
        stopped = time.time()
        time.sleep(max(0.0, t0 + START_AT - time.time()))
        redis_server.start()
        started = time.time()
        outs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    results = []
    for proc, (stdout, stderr) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT ") :]))

    share = int(LIMIT * FALLBACK_SHARE)
    for result in results:
        # Logged once each way, per process (every message of the limiter's logger is kept).
        assert result["fallbacks"] == 1 and result["recoveries"] == 1, result["messages"]
        assert len(result["messages"]) == 2, result["messages"]
        assert "is unreachable" in result["messages"][0] and f"{FALLBACK_SHARE:.0%}" in result["messages"][0]
        assert "is reachable again" in result["messages"][1]
        kinds = [kind for _slot, kind in result["booked"] if kind != "switch"]
        # Redis, then the host, then Redis again: one outage, one recovery.
        changes = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
        assert changes == ["redis", "fallback", "redis"], changes

    booked = [(slot, kind) for result in results for slot, kind in result["booked"]]
    fallback = [slot for slot, kind in booked if kind == "fallback"]
    before = [slot for slot, kind in booked if kind == "redis" and slot < stopped]
    after = [slot for slot, kind in booked if kind == "redis" and slot > started]
    # While Redis is down: the three share the host's state, at the share of the rate, together.
    assert fallback and _max_in_window(fallback, PERIOD) <= share + 1, str(
        [round(s - min(fallback), 3) for s in sorted(fallback)]
    )
    fallback_span = max(fallback) - min(fallback)
    assert len(fallback) <= share / PERIOD * fallback_span + share + 1
    # Before and after: the whole rate, through Redis, shared (never above the limit in a period).
    assert _max_in_window(before, PERIOD) <= LIMIT
    assert _max_in_window(after, PERIOD) <= LIMIT
    # Across a switch, at most the host's share on top (slots booked in Redis, then the host's).
    assert _max_in_window([slot for slot, _ in booked], PERIOD) <= LIMIT + share
    # Every process is back on Redis within REDIS_RETRY_S (plus a slot) of its restart; from then
    # on the three keep most of the whole rate together, not the share.
    back = started + REDIS_RETRY_S + 1.0
    late = [s for s in after if s >= back]
    span = t0 + END_AT - back
    assert len(late) >= 0.8 * LIMIT / PERIOD * span, (len(late), span)
    assert any(k.startswith("airflow-provider-mews:gcra:") for k in redis_server.state_keys())
