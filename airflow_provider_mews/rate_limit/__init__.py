"""One request budget per AccessToken, paced by windows, learned from the server, shared by every worker.

Mews allows 200 requests per AccessToken per 30 s, one budget for every endpoint, enforced
on a best-effort sliding window that "can be changed without prior notice". The limiter:

* sends windows of a tenth while nothing was learned: at most ``limit / 10`` requests in any
  ``period / 10`` plus 10 % (``FRONT_MARGIN``), each window's requests at once, which any server
  window from a tenth of the period up holds at the same average rate even when it counts
  requests late, where a 30 s window's 200 requests leaving in a burst would not; and a
  run's last window leaves together, not one by one as at an even pace (:mod:`.gcra`);
* while those windows meet no 429, learns the server: one more request per window (up to a
  tenth more) within ``limit`` per period plus 2 % (``LEARNED_MARGIN``), 0.98 of Mews's rate
  where windows of a tenth keep 0.91; the server that refuses the extra request costs one
  429, and the token drops back to windows of a tenth (not to the even pace);
* after a 429 (and for limits under 100 per period), paces requests evenly (GCRA) with a small
  burst, 2 % below the rate (``PACE_MARGIN``: a server counts a request only once it has read it);
* learns from 429s: it always honours ``Retry-After`` (nobody sends before it has passed,
  then callers leave one by one at the pace, never all at once), lowers the rate
  additively once per congestion epoch (every slot booked before the cut is booked again at
  the new pace) and recovers it slowly, below the rate at which the last 429 came (AIMD);
* shares that state per AccessToken (keyed by a hash of the platform address and token, never
  the token) between every thread and every process of the user on the host, in a private
  SQLite file (:mod:`.local`), with no configuration; and between hosts in Redis when the
  connection names one (``extra.rate_limit_redis_conn_id``, :mod:`.redis`). If Redis
  cannot be reached, the limiter falls back to the host's SQLite state at
  ``FALLBACK_SHARE`` of the rate and says so once in the log; it asks Redis again every
  ``REDIS_RETRY_S`` and, once Redis answers, shares the budget through it again (logged once).

Why not pyrate-limiter or ``limits``: both implement fixed-rate window or bucket algorithms
whose rates are set when the bucket is built. Measured with pyrate-limiter 4.5.1,
``Limiter(InMemoryBucket([Rate(200, Duration.SECOND * 30)]))`` let all 200 acquires through
in 2 ms (the 21st after 0.4 ms: a 429 from a server enforcing 20 per 3 s); even pacing is
possible with a second ``Rate(1, 150 ms)``, but neither library can lower a running shared
bucket's rate after a 429 (AIMD), book a future slot (waiting threads leave in order instead of
polling), or hold every client until a server-given time (Retry-After). The learning
transitions are 40 lines of pure functions (:mod:`.gcra`) over state that SQLite
transactions and one Redis Lua script keep atomic; the locking is theirs, not ours.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, Protocol

from airflow_provider_mews.rate_limit.gcra import DEFAULT_BURST, Params

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUESTS = 200
DEFAULT_PERIOD_S = 30.0
#: Share of the configured rate used on this host while Redis is unreachable.
FALLBACK_SHARE = 0.25
#: Seconds between two attempts to reach Redis again while falling back.
REDIS_RETRY_S = 5.0

__all__ = [
    "DEFAULT_MAX_REQUESTS",
    "DEFAULT_PERIOD_S",
    "FALLBACK_SHARE",
    "REDIS_RETRY_S",
    "TokenLimiter",
    "limiter_for",
]


class Backend(Protocol):
    describe: str

    def reserve(self, key: str, params: Params, max_wait_s: float | None) -> tuple[float, float] | None: ...

    def on_429(self, key: str, params: Params, retry_after_s: float, slot: float | None) -> bool: ...

    def hold_remaining(self, key: str) -> float: ...

    def stale(self, key: str, booked_at: float) -> bool: ...


class TokenLimiter:
    """The budget of one AccessToken, as seen by this process. Thread-safe; one per token and limit."""

    def __init__(
        self, key: str, params: Params, backend: Backend, *, redis_conn_id: str | None = None
    ) -> None:
        self.key = key
        self.params = params
        self.backend = backend
        self.redis_conn_id = redis_conn_id
        self._lock = threading.Lock()
        #: Seconds threads of this process spent waiting for a slot (pace and Retry-After holds).
        self.waited_s = 0.0
        #: 429s that lowered the rate (one per congestion epoch).
        self.cuts = 0
        #: While Redis is unreachable: (its backend, key, params) to go back to, and when to try.
        self._shared: tuple[Backend, str, Params] | None = None
        self._retry_at = 0.0
        #: Times this limiter fell back to the host (Redis unreachable) and came back to Redis.
        self.fallbacks = 0
        self.recoveries = 0

    @property
    def max_requests(self) -> int:
        return self.params.limit

    @property
    def period_s(self) -> float:
        return self.params.period_s

    def acquire(self, deadline: float | None = None, cancel: threading.Event | None = None) -> float | None:
        """Wait for this request's slot; returns the slot (for :meth:`on_429`), or None if it
        would come after ``deadline`` (``time.monotonic()``), in which case nothing is booked,
        or if ``cancel`` is set while waiting (the task is stopping; the slot goes unused)."""
        while True:
            max_wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            booked = self._backend_call("reserve", max_wait)
            if booked is None:
                return None
            slot, now = booked
            delay = slot - now
            if delay <= 0:
                return slot
            if cancel is None:
                time.sleep(delay)
            elif cancel.wait(delay):
                return None
            with self._lock:
                self.waited_s += delay
            # A 429 seen meanwhile (by any worker) holds everyone, and a cut makes every slot
            # booked before it stale: book again, at the new pace, after the hold.
            if not self._backend_call("stale", now):
                return slot

    def on_429(self, retry_after_s: float, slot: float | None) -> None:
        """Mews answered 429 to the request sent in ``slot``: hold everyone, and learn."""
        if self._backend_call("on_429", retry_after_s, slot):
            with self._lock:
                self.cuts += 1

    def _backend_call(self, name: str, *args: Any) -> Any:
        if self._shared is not None and name == "reserve" and time.monotonic() >= self._retry_at:
            back = self._try_shared(name, *args)
            if back is not None:
                return back[0]
        try:
            return self._call(name, *args)
        except Exception as exc:
            if self.redis_conn_id is None or not _is_redis_failure(exc):
                raise
            self._fall_back(exc)
            return self._call(name, *args)

    def _call(self, name: str, *args: Any) -> Any:
        backend, key, params = self.backend, self.key, self.params
        if name == "hold_remaining":
            return backend.hold_remaining(key)
        if name == "stale":
            return backend.stale(key, *args)
        return getattr(backend, name)(key, params, *args)

    def _fall_back(self, exc: BaseException) -> None:
        with self._lock:
            if self.redis_conn_id is None or self._shared is not None:
                return
            log.warning(
                "Mews rate limiter: Redis connection '%s' is unreachable (%s: %s); this worker now paces "
                "requests on its host only, at %.0f%% of the configured rate, until Redis answers again "
                "(asked every %.0f s).",
                self.redis_conn_id,
                type(exc).__name__,
                str(exc)[:200],
                FALLBACK_SHARE * 100,
                REDIS_RETRY_S,
            )
            self.fallbacks += 1
            self._shared = (self.backend, self.key, self.params)
            self._retry_at = time.monotonic() + REDIS_RETRY_S
            share = max(1, int(self.params.limit * FALLBACK_SHARE))
            self.params = Params(share, self.params.period_s, self.params.burst)
            self.key = f"{self.key}:fallback"
            self.backend = _local_backend()

    def _try_shared(self, name: str, *args: Any) -> tuple[Any] | None:
        """While falling back: one thread at a time asks Redis again; when it answers, every
        later call shares the budget through it again. Returns (Redis's answer,) or None."""
        with self._lock:
            shared = self._shared
            if shared is None or time.monotonic() < self._retry_at:
                return None
            self._retry_at = time.monotonic() + REDIS_RETRY_S  # the other threads keep falling back
        backend, key, params = shared
        try:
            answer = getattr(backend, name)(key, params, *args)
        except Exception as exc:
            if not _is_redis_failure(exc):
                raise
            return None
        with self._lock:
            if self._shared is shared:
                self.backend, self.key, self.params = shared
                self._shared = None
                self.recoveries += 1
                log.info(
                    "Mews rate limiter: Redis connection '%s' is reachable again; this worker shares the "
                    "AccessToken's budget through it again, at the whole configured rate.",
                    self.redis_conn_id,
                )
        return (answer,)


def _is_redis_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - the Redis backend cannot exist without redis
        return False
    return isinstance(exc, RedisError)


_registry: dict[tuple[str, int, float, str | None], TokenLimiter] = {}
_registry_lock = threading.Lock()
_local: Backend | None = None
_local_lock = threading.Lock()


def _local_backend() -> Backend:
    """The host's SQLite state, or this process's memory when no private directory can be used."""
    global _local
    with _local_lock:
        if _local is None:
            from airflow_provider_mews.rate_limit.local import MemoryBackend, SqliteBackend

            try:
                _local = SqliteBackend()
            except (OSError, ValueError) as exc:
                log.warning(
                    "Mews rate limiter: no private state directory (%s); processes on this host will "
                    "not share the AccessToken's budget. Set MEWS_RATE_LIMIT_DIR to a private directory.",
                    exc,
                )
                _local = MemoryBackend()
            except Exception as exc:  # sqlite3.Error
                log.warning("Mews rate limiter: shared state unusable (%s); per process only.", exc)
                _local = MemoryBackend()
        return _local


def token_key(access_token: str, scope: str = "") -> str:
    """A stable name for an AccessToken at one platform address that does not reveal it."""
    return hashlib.sha256(f"{scope}\n{access_token}".encode()).hexdigest()[:40]


def limiter_for(
    access_token: str,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    period_s: float = DEFAULT_PERIOD_S,
    *,
    scope: str = "",
    redis_conn_id: str | None = None,
    burst: int = DEFAULT_BURST,
) -> TokenLimiter:
    """The process-wide limiter of an AccessToken at ``scope`` (the platform address).

    Its state is shared with every process using the same token, scope and limit: on this
    host by default, across hosts through ``redis_conn_id``.
    """
    params = Params(int(max_requests), float(period_s), burst)
    token_hash = token_key(access_token, scope)
    key = f"{token_hash}:{params.limit}:{params.period_s!r}"
    registry_key = (token_hash, params.limit, params.period_s, redis_conn_id)
    with _registry_lock:
        limiter = _registry.get(registry_key)
        if limiter is not None:
            return limiter
        if redis_conn_id:
            from airflow_provider_mews.rate_limit.redis import RedisBackend

            backend: Backend = RedisBackend(redis_conn_id)
        else:
            backend = _local_backend()
        limiter = _registry[registry_key] = TokenLimiter(key, params, backend, redis_conn_id=redis_conn_id)
        return limiter
